"""Speed of topojax's thinning against scikit-image's, one core and threads.

Times ``topojax.skeletonize`` and ``skimage.morphology.skeletonize`` (Lee's
thinning in 3D, the one Skeleton Recall and clDice take) on two kinds of
3D label, at sizes from 32³ to 128³:

* a vessel tree: the label of the synthetic "branches" task
  (``topojax.synthetic``) drawn at that size;
* blobs: smoothed noise thresholded to fill a third of the volume.

The two are timed in alternating rounds in one process, after a warm-up
call of each (numba's compilation, or loading its cache, is not timed), so
that a change of load touches both alike; the table gives medians and
their ratio, and whether the two skeletons are equal (they differ where
scikit-image deletes a part two voxels thick whole). Then a batch of blobs
is thinned by ``topojax.skeletonize_batch`` on 1, 2, ... threads.

  python -m benchmarks.skeleton            # 32³ to 128³, a minute or two
  python -m benchmarks.skeleton --quick    # one small input (a smoke test)

Writes ``skeleton.md`` (the tables), ``skeleton.json`` and ``skeleton.png``
(time against voxel count) under ``--out`` (default ``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
from scipy import ndimage

from benchmarks import outputs as outputs_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out"
SIZES, QUICK_SIZES = (32, 64, 96, 128), (24,)
KINDS = ("vessel tree", "blobs")
OURS, SCIKIT = "topojax", "scikit-image"
# Threads scaling: this many masks of blobs at this size.
BATCH, BATCH_SIZE = 8, 64
QUICK_BATCH, QUICK_BATCH_SIZE = 2, 24


def make_mask(kind: str, size: int, seed: int = 0) -> np.ndarray:
  """A bool ``(size, size, size)`` label of ``kind``."""
  from topojax import synthetic
  if kind == "vessel tree":
    config = dataclasses.replace(synthetic.TASKS["branches"],
                                 shape=(size,) * 3)
    return synthetic.make_case(config, seed)[1] > 0
  noise = np.random.default_rng(seed).random((size,) * 3)
  smooth = ndimage.gaussian_filter(noise, sigma=size / 32)
  return smooth > np.quantile(smooth, 2 / 3)


def _timed(fn, mask) -> float:
  start = time.perf_counter()
  fn(mask)
  return time.perf_counter() - start


def compare(*, sizes, repeats, log=print) -> list[dict]:
  """Alternating timings of both thinnings, one record per input."""
  from skimage import morphology

  from topojax import skeleton
  methods = {OURS: skeleton.skeletonize, SCIKIT: morphology.skeletonize}
  records = []
  for size in sizes:
    for kind in KINDS:
      mask = make_mask(kind, size)
      answers = {name: fn(mask) for name, fn in methods.items()}  # Warm-up.
      times = {name: [] for name in methods}
      for _ in range(repeats):
        for name, fn in methods.items():
          times[name].append(_timed(fn, mask))
      record = {"kind": kind, "size": size, "voxels": mask.size,
                "fill": float(mask.mean()),
                "equal": bool(np.array_equal(*answers.values())),
                "repeats": repeats}
      for name in methods:
        record[name] = {"median_s": statistics.median(times[name]),
                        "min_s": min(times[name])}
      records.append(record)
      log(f"{kind} {size}³: topojax {record[OURS]['median_s'] * 1e3:.1f} ms, "
          f"scikit-image {record[SCIKIT]['median_s'] * 1e3:.1f} ms")
  return records


def threads(*, batch, size, repeats, log=print) -> list[dict]:
  """``skeletonize_batch`` of ``batch`` blob masks on 1, 2, 4... threads."""
  from topojax import skeleton
  masks = [make_mask("blobs", size, seed) for seed in range(batch)]
  cores = skeleton._worker_count(None)  # Every core this process may use.
  counts = sorted({1, *(2 ** i for i in range(1, 8) if 2 ** i <= cores),
                   cores})
  skeleton.skeletonize_batch(masks[:1], num_workers=1)  # Warm-up.
  records = []
  for workers in counts:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      skeleton.skeletonize_batch(masks, num_workers=workers)
      times.append(time.perf_counter() - start)
    records.append({"workers": workers, "batch": batch, "size": size,
                    "median_s": statistics.median(times)})
    log(f"batch of {batch} × {size}³ on {workers} threads: "
        f"{records[-1]['median_s'] * 1e3:.0f} ms")
  return records


def environment(load_at_start) -> dict:
  """Machine, versions and load, for the record."""
  from llvmlite import binding  # numba's LLVM, which compiled the kernel.
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": "python -m benchmarks.skeleton " + " ".join(sys.argv[1:]),
      "cpu": f"{platform.machine()} ({binding.get_host_cpu_name()})",
      "cpu_count": os.cpu_count(),
      "load_average_start": list(load_at_start),
      "load_average_end": list(os.getloadavg()),
      "versions": {p: importlib.metadata.version(p)
                   for p in ("numpy", "numba", "scipy", "scikit-image")},
  }


def markdown(records, scaling, env) -> str:
  versions = ", ".join(f"{p} {v}" for p, v in env["versions"].items())
  lines = [
      "## Skeleton: topojax's thinning and scikit-image's",
      "",
      f"`{env['command'].strip()}` on {env['date']}: {env['cpu']}, "
      f"{env['cpu_count']} cores (1-minute load average "
      f"{env['load_average_start'][0]:.2f} at the start, "
      f"{env['load_average_end'][0]:.2f} at the end); {versions}.",
      "",
      "One core, medians of alternating rounds after a warm-up, in ms. "
      "\"equal\": the two skeletons are the same voxels (scikit-image's "
      "differs where it thins a part two voxels thick away).",
      "",
      "| label | size | fill | topojax | scikit-image | scikit-image ÷ "
      "topojax | equal |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in records:
    ours, theirs = r[OURS]["median_s"], r[SCIKIT]["median_s"]
    lines.append(
        f"| {r['kind']} | {r['size']}³ | {r['fill']:.1%} | {ours * 1e3:.1f} "
        f"| {theirs * 1e3:.1f} | {theirs / ours:.1f}× | "
        f"{'yes' if r['equal'] else 'no'} |")
  if scaling:
    first = scaling[0]
    lines += [
        "",
        f"`skeletonize_batch` of {first['batch']} blob labels of "
        f"{first['size']}³ on threads (the kernel releases the GIL):",
        "",
        "| threads | ms | speed-up |",
        "|---|---|---|",
    ]
    lines += [f"| {s['workers']} | {s['median_s'] * 1e3:.0f} | "
              f"{first['median_s'] / s['median_s']:.2f}× |" for s in scaling]
  return "\n".join(lines) + "\n"


def plot(records, path) -> None:
  """Log-log time against voxel count, one line per label and method."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for kind, marker in zip(KINDS, "os"):
    for method, style in ((OURS, "-"), (SCIKIT, "--")):
      points = sorted((r["voxels"], r[method]["median_s"]) for r in records
                      if r["kind"] == kind)
      voxels, seconds = zip(*points)
      ax.plot(voxels, np.array(seconds) * 1e3, style, marker=marker,
              label=f"{method}, {kind}")
  ax.set(xscale="log", yscale="log", xlabel="voxels",
         ylabel="skeleton, ms (median, one core)",
         title="Lee's thinning: topojax and scikit-image")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.skeleton",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="one small input and a batch of two (a smoke test)")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help="folder for skeleton.md, .json and .png (default "
                      f"{DEFAULT_OUT.relative_to(ROOT)})")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace those files if they exist")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed rounds per input (default 5)")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
  outputs = [args.out / f"skeleton.{ext}" for ext in ("md", "json", "png")]
  outputs_lib.claim(outputs, overwrite=args.overwrite)

  load_at_start = os.getloadavg()
  records = compare(sizes=QUICK_SIZES if args.quick else SIZES,
                    repeats=args.repeats)
  scaling = threads(batch=QUICK_BATCH if args.quick else BATCH,
                    size=QUICK_BATCH_SIZE if args.quick else BATCH_SIZE,
                    repeats=args.repeats)
  env = environment(load_at_start)
  table = markdown(records, scaling, env)
  print("\n" + table)
  outputs[0].write_text(table)
  outputs[1].write_text(json.dumps(
      {"environment": env, "records": records, "threads": scaling}, indent=1))
  plot(records, outputs[2])
  print(f"wrote {', '.join(str(p) for p in outputs)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
