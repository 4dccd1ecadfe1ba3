"""Where a U-Net training step's time goes: topojax and PyTorch, per operation.

Profiles the compiled Adam step of ``benchmarks/train_step.py`` (the same
networks, batch and Dice loss) with each framework's profiler and prints a
markdown table of the largest items per step:

* topojax: ``jax.profiler`` traces ``--steps`` steps; the trace's XLA:CPU
  operations (fusions, convolutions, custom calls) are summed over the
  runtime's threads and grouped by kind (the HLO name without its number);
* PyTorch: ``torch.profiler`` over as many steps, self CPU time per
  operator.

Both columns are thread time summed per step (milliseconds), so they can
exceed the step's wall time where operations overlap.

Usage::

    python benchmarks/step_profile.py                           # main job
    python benchmarks/step_profile.py --shape 64 64 48 --batch 2 --base 16 \\
        --depth 4
    python benchmarks/step_profile.py --xla-conv   # topojax without oneDNN
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import statistics
import sys
import tempfile
import time
from unittest import mock

if __package__ in (None, ""):
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))

from benchmarks import train_step


def _wall(run, steps: int) -> float:
  times = []
  for _ in range(steps):
    began = time.perf_counter()
    run()
    times.append(time.perf_counter() - began)
  return statistics.median(times)


def jax_profile(args) -> tuple[collections.Counter, float]:
  """Milliseconds per step by XLA operation kind, and the median step (s)."""
  import jax
  from jax.profiler import ProfileData

  run = train_step._jax_step(args)
  for _ in range(2):
    run()
  wall = _wall(run, args.steps)
  with tempfile.TemporaryDirectory() as out:
    jax.profiler.start_trace(out)
    for _ in range(args.steps):
      run()
    jax.profiler.stop_trace()
    trace = ProfileData.from_file(
        sorted(glob.glob(f"{out}/**/*.xplane.pb", recursive=True))[-1])
  kinds = collections.Counter()
  for line in trace.find_plane_with_name("/host:CPU").lines:
    if line.name == "python":
      continue
    for event in line.events:
      # Executor bookkeeping wraps the operations; they are what we count.
      if "ThunkExecutor" in event.name or "Dispatch" in event.name:
        continue
      kinds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns
  return (collections.Counter({k: v / 1e6 / args.steps
                               for k, v in kinds.items()}), wall)


def torch_profile(args) -> tuple[collections.Counter, float]:
  """Self CPU milliseconds per step by operator, and the median step (s)."""
  import torch.profiler

  run = train_step._torch_step(args)
  for _ in range(2):
    run()
  wall = _wall(run, args.steps)
  with torch.profiler.profile(
      activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
      run()
  kinds = collections.Counter()
  for event in prof.key_averages():
    kinds[event.key] += event.self_cpu_time_total / 1e3 / args.steps
  return kinds, wall


def table(name: str, kinds: collections.Counter, wall: float,
          rows: int) -> str:
  lines = [f"**{name}**: step {1e3 * wall:.0f} ms (median, unprofiled); "
           f"operations {sum(kinds.values()):.0f} ms of thread time",
           "", "| operation | ms per step | share |", "|---|---|---|"]
  total = sum(kinds.values())
  for key, ms in kinds.most_common(rows):
    lines.append(f"| `{key[:60]}` | {ms:.1f} | {100 * ms / total:.0f} % |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", type=int, nargs=3, default=(32, 32, 32),
                      metavar=("X", "Y", "Z"))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--base", type=int, default=8)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rows", type=int, default=12)
  parser.add_argument("--xla-conv", action="store_true",
                      help="topojax on XLA's convolutions (no oneDNN)")
  parser.add_argument("--quick", action="store_true",
                      help="a tiny network, 2 steps (CI)")
  args = parser.parse_args()
  if args.quick:
    args.shape, args.batch, args.base, args.depth, args.steps = (
        (8, 8, 8), 2, 2, 2, 2)
  args.impl, args.loss, args.naive = "topojax", "dice", ""
  print(f"batch {args.batch} × {'×'.join(map(str, args.shape))}, base "
        f"{args.base}, depth {args.depth}, {args.steps} steps; "
        f"{train_step._machine()}; load average {train_step._load()}\n")
  if args.xla_conv:
    from topojax import conv
    with mock.patch.object(conv, "available", lambda: False):
      kinds, wall = jax_profile(args)
  else:
    kinds, wall = jax_profile(args)
  print(table("topojax" + (" (XLA convolutions)" if args.xla_conv else ""),
              kinds, wall, args.rows), end="\n\n", flush=True)
  print(table("PyTorch", *torch_profile(args), args.rows))


if __name__ == "__main__":
  main()
