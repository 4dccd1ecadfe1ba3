"""Soak: many phase-2 steps with each host-side loss; memory and compilations.

The host-side losses (persistent homology, Betti matching, ...) run NumPy
and numba code through ``jax.pure_callback`` on every step; a leak there, or
a step that recompiles, shows only after thousands of steps. This runs
``--steps`` train steps of a small 3D U-Net per loss, cycling through the
epochs of a synthetic task as training does, and records the process's
resident memory (``VmRSS`` of ``/proc/self/status``) and the train step's
compilations after the first step, after a warm-up (a tenth of the steps)
and at the end. Both must stay flat: memory after the warm-up within a few
MB, and one compilation.

Not a test: the full run (2,000 steps per loss at 32³) takes about 25
minutes on a busy 2-core CPU (0.36 s per step). ``--quick`` is the smoke
test CI runs.

Usage::

    python -m benchmarks.soak                      # 2000 steps per loss
    python -m benchmarks.soak --losses hutopo --steps 500
    python -m benchmarks.soak --quick --results /tmp/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import resource
import time

import jax
import numpy as np

from topojax import data
from topojax import synthetic
from topojax import train
from topojax.train import steps

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
SECTION_START = "<!-- soak benchmark: start (written by python -m benchmarks.soak) -->"
SECTION_END = "<!-- soak benchmark: end -->"
# Losses computed on the host, the ones a soak is for, in training's names.
HOST_SIDE_LOSSES = tuple(name for name, loss in train.LOSS_TABLE.items()
                         if loss.host_callback)
BATCH_SIZE = 2


def resident_mb() -> float:
  """This process's resident memory now, in MB (``VmRSS``; the peak where
  ``/proc`` is missing)."""
  status = pathlib.Path("/proc/self/status")
  if status.is_file():
    for line in status.read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024  # kB
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024 if platform.system() == "Darwin" else 1024)


def _task(shape, num_cases: int):
  """Synthetic cases: ``(images, labels)`` ``(N, X, Y, Z, 1)`` float32."""
  config = synthetic.SynthConfig(shape=shape, num_cases=num_cases, seed=0)
  cases = [synthetic.make_case(config, i)[:2] for i in range(num_cases)]
  images = np.stack([image for image, _ in cases])[..., None]
  low = images.min(axis=(1, 2, 3, 4), keepdims=True)
  high = images.max(axis=(1, 2, 3, 4), keepdims=True)
  images = (images - low) / (high - low)
  labels = np.stack([label for _, label in cases])[..., None]
  return images.astype(np.float32), labels.astype(np.float32)


def soak(loss: str, *, num_steps: int, shape, num_cases: int = 8
         ) -> dict[str, float | int | str]:
  """``num_steps`` train steps of ``loss``; memory and compilations seen.

  Returns:
    A row of the table: the loss, steps, seconds per step after the first,
    resident MB and compilations after step 1, after the warm-up (a tenth
    of the steps, at least 1) and at the end.
  """
  config = train.TrainConfig(
      shape=shape, base_channels=4, depth=2, batch_size=BATCH_SIZE,
      kernel_sizes=(2, 4),
      phase2=train.PhaseConfig(loss=loss, epochs=1, learning_rate=1e-4))
  images, labels = _task(shape, num_cases)
  mesh = steps.data_mesh()
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  model_def, state = steps.init_state(config, in_channels=1, out_channels=1,
                                      mesh=mesh)
  # A step of its own, not the factory's cached one: another caller in the
  # process may have compiled that one for other shapes, and this counts.
  train_step = steps.make_train_step.__wrapped__(
      model_def, mesh, loss=loss, kernel_sizes=config.kernel_sizes,
      normalize=config.normalize)
  targets = steps.training_targets(loss, labels, range(num_cases))
  warm_up = max(num_steps // 10, 1)
  marks, done, epoch = {}, 0, 0
  began = None
  while done < num_steps:
    for batch_images, batch_labels in data.iterate_batches(
        images, targets, range(num_cases), batch_size=BATCH_SIZE, seed=0,
        epoch=epoch, flip_axes=(0,)):
      state, loss_value = train_step(state,
                                     steps.to_global(batch_images, sharding),
                                     steps.to_global(batch_labels, sharding),
                                     1e-4, config.dice_weight)
      float(loss_value)  # Waits for the step, host callbacks included.
      done += 1
      if done == 1:
        began = time.perf_counter()
      if done in (1, warm_up, num_steps):
        marks[done] = (resident_mb(), train_step._cache_size())
      if done == num_steps:
        break
    epoch += 1
  seconds = (time.perf_counter() - began) / max(num_steps - 1, 1)
  (first_mb, first_c), (warm_mb, warm_c), (end_mb, end_c) = (
      marks[1], marks[warm_up], marks[num_steps])
  return {"loss": loss, "steps": num_steps, "s_per_step": seconds,
          "warm_up": warm_up, "rss_first_mb": first_mb,
          "rss_warm_mb": warm_mb, "rss_end_mb": end_mb,
          "compilations_first": first_c, "compilations_warm": warm_c,
          "compilations_end": end_c}


def markdown(rows, *, shape, command: str) -> str:
  """The RESULTS.md section: one row per loss."""
  lines = [
      SECTION_START, "",
      "## Soak: host-side losses over many steps (`benchmarks/soak.py`)", "",
      f"`{command}`; 3D U-Net (base 4 channels, depth 2), batch "
      f"{BATCH_SIZE} of {'×'.join(map(str, shape))} synthetic volumes, "
      f"{platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPU(s), jax {jax.__version__} on "
      f"{jax.default_backend()}, load {os.getloadavg()[0]:.2f}. Resident "
      "memory (MB) after the first step, after the warm-up, at the end; "
      "compilations of the train step at the same points. The losses run "
      "one after another in one process, so a row's memory includes the "
      "rows above; its growth after the warm-up is its own.", "",
      "| loss | steps | s/step | RSS step 1 | RSS warm-up (step) | RSS end | "
      "growth after warm-up | compilations (1 / warm-up / end) |",
      "|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['loss']} | {r['steps']} | {r['s_per_step']:.3f} | "
        f"{r['rss_first_mb']:.0f} | {r['rss_warm_mb']:.0f} ({r['warm_up']}) "
        f"| {r['rss_end_mb']:.0f} | "
        f"{r['rss_end_mb'] - r['rss_warm_mb']:+.1f} | "
        f"{r['compilations_first']} / {r['compilations_warm']} / "
        f"{r['compilations_end']} |")
  lines += ["", SECTION_END, ""]
  return "\n".join(lines)


def update_results(path: pathlib.Path, section: str) -> None:
  """Replaces the soak section of ``path`` (or appends it)."""
  text = path.read_text() if path.exists() else "# Benchmark results\n"
  if SECTION_START in text and SECTION_END in text:
    head, rest = text.split(SECTION_START, 1)
    text = head + section.rstrip("\n") + rest.split(SECTION_END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + section
  path.write_text(text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000,
                      help="train steps per loss (default 2000)")
  parser.add_argument("--losses", nargs="+", default=list(HOST_SIDE_LOSSES),
                      choices=train.LOSSES,
                      help="losses to soak (default: the host-side ones, "
                      f"{' '.join(HOST_SIDE_LOSSES)})")
  parser.add_argument("--shape", type=int, nargs=3, default=(32, 32, 32),
                      metavar=("X", "Y", "Z"))
  parser.add_argument("--quick", action="store_true",
                      help="a smoke test: 4 steps of 16³ volumes")
  parser.add_argument("--results", type=pathlib.Path, default=None,
                      help="markdown file whose soak section is replaced "
                      "(default benchmarks/RESULTS.md; with --quick, none)")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.shape = 4, (16, 16, 16)
  if args.steps < 1:
    parser.error(f"--steps must be at least 1, got {args.steps}")
  shape = tuple(args.shape)
  rows = []
  for loss in args.losses:
    rows.append(soak(loss, num_steps=args.steps, shape=shape))
    r = rows[-1]
    print(f"{loss}: {r['steps']} steps, {r['s_per_step']:.3f} s/step, RSS "
          f"{r['rss_first_mb']:.0f} -> {r['rss_warm_mb']:.0f} -> "
          f"{r['rss_end_mb']:.0f} MB, compilations "
          f"{r['compilations_first']} -> {r['compilations_end']}", flush=True)
  command = "python -m benchmarks.soak" + (
      " --quick" if args.quick else f" --steps {args.steps}")
  section = markdown(rows, shape=shape, command=command)
  print(section)
  results = args.results or (None if args.quick else RESULTS)
  if results is not None:
    update_results(results, section)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
