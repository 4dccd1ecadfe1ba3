"""Sliding-window prediction: ``topojax.sliding_window`` against MONAI's.

Both predict a random ``(1, S, S, S, 1)`` volume through the same U-Net
architecture (topojax's in Flax; its transcription in PyTorch,
``benchmarks/torch_unet.py``) with the same windows (``--patch``, overlap
0.5, Gaussian blending, ``--batch`` windows per call), in alternating rounds
in one process. Reported per volume side: the windows, the median seconds of
each, voxels per second, and the blending's share of the time (the same
run with the network replaced by a trivial function of the window). With
``--memory``, a fresh process predicts a 512×512×300 volume with the trivial
function and reports its peak resident memory: what the sliding window
itself holds (the volume, the weighted sums, the weights), the network's
activations for one batch of windows aside.

Usage::

    python -m benchmarks.sliding_window                  # 128³ and 256³
    python -m benchmarks.sliding_window --memory         # + 512×512×300
    (--overwrite replaces an earlier run's benchmarks/out/sliding_window.*)
    python -m benchmarks.sliding_window --quick          # a smoke test
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import outputs as outputs_lib

QUICK_SIZES = (40,)
MEMORY_SHAPE = (512, 512, 300)


def _topojax_predictors(args):
  """The network's and the trivial predictor, each on window batches."""
  import jax
  from flax import nnx

  from topojax import unet

  model = unet.UNet(in_channels=1, out_channels=1, base_channels=args.base,
                    depth=args.depth, norm="group", rngs=nnx.Rngs(0))
  model.eval()
  graph, state = nnx.split(model)

  @jax.jit
  def forward(state, windows):
    return unet.probabilities(nnx.merge(graph, state)(windows))

  network = functools.partial(forward, state)
  trivial = jax.jit(lambda windows: jax.nn.sigmoid(windows))
  return network, trivial


def _monai_predictors(args):
  import torch

  from benchmarks.torch_unet import torch_unet

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = torch_unet(base=args.base, depth=args.depth).eval()

  def network(windows):
    return torch.sigmoid(model(windows))

  return network, torch.sigmoid


def _timers(args, size):
  """Callables predicting one volume with each implementation and fn."""
  import jax
  import torch
  from monai.inferers import sliding_window_inference

  import topojax

  volume = np.random.default_rng(0).random((1, size, size, size, 1),
                                           dtype=np.float32)
  channels_first = torch.from_numpy(np.moveaxis(volume, -1, 1)).contiguous()
  patch = (args.patch,) * 3
  ours = _topojax_predictors(args)
  theirs = _monai_predictors(args)

  def topojax_run(fn):
    out = topojax.sliding_window(fn, volume, patch_size=patch,
                                 batch_size=args.batch)
    jax.block_until_ready(out)

  def monai_run(fn):
    with torch.no_grad():
      sliding_window_inference(channels_first, patch, args.batch, fn,
                               overlap=0.5, mode="gaussian")

  return {
      "topojax": functools.partial(topojax_run, ours[0]),
      "monai": functools.partial(monai_run, theirs[0]),
      "topojax, trivial fn": functools.partial(topojax_run, ours[1]),
      "monai, trivial fn": functools.partial(monai_run, theirs[1]),
  }


def _time_alternating(runs, repeats):
  for run in runs.values():  # Compilation and warm-up.
    run()
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      began = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - began)
  return {name: statistics.median(t) for name, t in times.items()}


def _windows(size, patch):
  from topojax import windows
  return len(windows.window_starts((size,) * 3, (patch,) * 3, (0.5,) * 3))


def measure_memory(shape=MEMORY_SHAPE, patch=32, batch=4) -> dict:
  """Peak resident memory of a fresh process predicting ``shape``."""
  # VmHWM, the peak of this process's own memory: getrusage's ru_maxrss
  # would also count the parent's, which it keeps across fork and exec.
  code = (
      "import jax, numpy as np, re, topojax\n"
      "def peak():\n"
      "  status = open('/proc/self/status').read()\n"
      "  return int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
      f"v = np.zeros((1, *{tuple(shape)}, 1), np.float32)\n"
      "before = peak()\n"
      "out = topojax.sliding_window(jax.jit(jax.nn.sigmoid), v, "
      f"patch_size={(patch,) * 3}, batch_size={batch})\n"
      "jax.block_until_ready(out)\n"
      "print(before, peak())\n")
  began = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", code], check=True,
                       capture_output=True, text=True).stdout.split()
  seconds = time.perf_counter() - began
  before, peak = (int(x) * 1024 for x in out[-2:])  # VmHWM is in kB.
  return {"shape": list(shape), "patch": patch, "seconds": seconds,
          "peak_bytes": peak, "before_bytes": before,
          "volume_bytes": int(np.prod(shape)) * 4}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=(128, 256))
  parser.add_argument("--patch", type=int, default=32)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--base", type=int, default=8)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--memory", action="store_true",
                      help="also the peak memory for a 512×512×300 volume")
  parser.add_argument("--quick", action="store_true",
                      help="one 40³ volume, one repeat, a small U-Net")
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path("benchmarks/out"))
  parser.add_argument("--overwrite", action="store_true",
                      help="replace sliding_window.md and .json if they exist")
  args = parser.parse_args(argv)
  outputs = [args.out / "sliding_window.md", args.out / "sliding_window.json"]
  outputs_lib.claim(outputs, overwrite=args.overwrite)
  if args.quick:
    args.sizes, args.repeats, args.base, args.depth = QUICK_SIZES, 1, 4, 2
  load = os.getloadavg()[0]
  rows = []
  for size in args.sizes:
    medians = _time_alternating(_timers(args, size), args.repeats)
    rows.append({"size": size, "windows": _windows(size, args.patch),
                 **{f"{name} (s)": s for name, s in medians.items()}})
    print(json.dumps(rows[-1]), flush=True)
  memory = measure_memory() if args.memory else None

  lines = [f"Load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} "
           f"at the end; U-Net base {args.base}, depth {args.depth}, "
           f"GroupNorm; {args.patch}³ windows, overlap 0.5, Gaussian, "
           f"{args.batch} windows per call; median of {args.repeats}.", "",
           "| volume | windows | topojax (s) | MONAI (s) | MONAI / topojax "
           "| topojax (Mvoxel/s) | blending, topojax | blending, MONAI |",
           "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    ours, theirs = row["topojax (s)"], row["monai (s)"]
    lines.append(
        f"| {row['size']}³ | {row['windows']} | {ours:.2f} | {theirs:.2f} | "
        f"{theirs / ours:.2f} | {row['size'] ** 3 / ours / 1e6:.2f} | "
        f"{row['topojax, trivial fn (s)'] / ours:.0%} | "
        f"{row['monai, trivial fn (s)'] / theirs:.0%} |")
  if memory:
    lines += ["", f"512×512×300 volume, trivial fn: peak resident memory "
              f"{memory['peak_bytes'] / 2**30:.2f} GiB (the volume alone "
              f"{memory['volume_bytes'] / 2**30:.2f} GiB; "
              f"{memory['before_bytes'] / 2**30:.2f} GiB before the call), "
              f"{memory['seconds']:.0f} s."]
  outputs[0].write_text("\n".join(lines) + "\n")
  outputs[1].write_text(
      json.dumps({"rows": rows, "memory": memory, "load": load}, indent=1))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
