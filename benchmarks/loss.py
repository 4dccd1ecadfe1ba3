"""Speed of the topology losses: topojax's against PyTorch's, cheap and dear.

Times the forward pass and the forward + backward pass (float32, a warm-up,
then the median of several repeats) of:

* every topological loss of topojax's training table
  (``topojax.train.LOSS_TABLE``), with what the table prepares once per
  case (Skeleton Recall's tubed skeleton) computed beforehand, as training
  does: the Projected Pooling Loss (its fast path) and PPL-norm, clDice, the
  persistent-homology losses (Hu et al.; Betti matching, on topojax's own
  compiled kernel), Skeleton Recall and cbDice; these, and below, named
  "topojax" and the table's label;
* the Projected Pooling Loss with the target's pooled features computed
  once beforehand (``pooled_target_features``);
* topojax's reference path of it (every max a ``reduce_window``);
* the PyTorch reference of the tests (``tests/torch_reference.py``);
* clDice's old path through XLA's pooling gradients
  (``cldice._reference_loss``), and the tests' PyTorch transcription of the
  authors' 3D soft skeleton (``topolosses``' ``CLDiceLoss`` takes 2D input
  only); and the memory of both topojax paths' compiled forward + backward;
* the tests' PyTorch transcription of the authors' cbDice
  (``SoftcbDiceLoss``, per sample as topojax reduces it);
* the persistent-homology losses of ``topolosses`` (Betti matching, Hu et
  al.'s TopoLoss), when installed; these and topojax's persistent-homology
  losses within a time budget each, both cbDice up to 128³;
* a NumPy copy of the prediction's bytes, the memory floor;
* the host-side losses on one worker thread and on every core, on a
  training batch (4 × 32³) and a large one (2 × 96³);

for volumes from 32³ to the paper's 160×160×128, batch 1 and 2, on whatever
JAX backend is present. Prints a table with ratios, writes JSON and a log-log
PNG of time against voxel count under ``--out``, and the tables into the loss
section of ``benchmarks/RESULTS.md``::

  python -m benchmarks.loss              # full run, a few minutes
  python -m benchmarks.loss --quick      # one small input, no PH losses
  python -m benchmarks.loss --losses cbdice   # one loss and its peers

The inputs are a synthetic ball label and a blurred, slightly noisy copy of it
as the prediction: the persistent-homology losses take longer the more
critical points the prediction has, the others do not care.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
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
from topojax.train import losses as loss_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out"
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION_START = "<!-- loss benchmark: start (written by python -m benchmarks.loss) -->"
SECTION_END = "<!-- loss benchmark: end -->"

# The host-parallel comparison: a training batch at 32³ and a large one.
PARALLEL_SHAPES = ((4, 32, 32, 32, 1), (2, 96, 96, 96, 1))
CLDICE_MEMORY_SIZES = ((64, 64, 64), (128, 128, 128))
SIZES = ((32, 32, 32), (64, 64, 64), (96, 96, 96), (128, 128, 128),
         (160, 160, 128))
BATCHES = (1, 2)
QUICK_SIZES, QUICK_BATCHES = ((24, 24, 24),), (1,)



def topojax_method(name):
  """The method name of a loss of topojax's training table."""
  return f"topojax {loss_table.LOSS_TABLE[name].label}"


# One method per topological loss of the table, in its order.
TOPOJAX = {name: topojax_method(name)
           for name, entry in loss_table.LOSS_TABLE.items()
           if entry.function is not None}
FAST, CLDICE, SKELETON, PH, BETTI_JAX, CBDICE = (
    TOPOJAX[name] for name in ("ppl", "cldice", "skeleton_recall", "hutopo",
                               "betti_matching", "cbdice"))
FEATURES, REFERENCE, TORCH, FLOOR = (
    "topojax PPL, precomputed target", "topojax PPL, reference path",
    "PPL, PyTorch", "NumPy copy (floor)")
CLDICE_TORCH, CBDICE_TORCH = "clDice, PyTorch", "cbDice, PyTorch"
# clDice through XLA's generic pooling gradients: topojax's path before the
# winner-routing custom VJP, kept as cldice._reference_loss.
CLDICE_OLD = "topojax clDice, old path"
BETTI, HUTOPO = "Betti matching", "Hu et al. TopoLoss"
# Beside each loss of the table, the other paths and peers timed with it.
RELATED = {"ppl": (FEATURES, REFERENCE, TORCH),
           "cldice": (CLDICE_OLD, CLDICE_TORCH),
           "hutopo": (HUTOPO,), "betti_matching": (BETTI,),
           "cbdice": (CBDICE_TORCH,)}
# Timed in PyTorch, on the faster of one thread and torch's default.
TORCH_METHODS = (TORCH, CLDICE_TORCH, CBDICE_TORCH)
# topolosses' classes, in tests/torch_reference.TOPOLOSSES.
PEERS = {BETTI: "BettiMatchingLoss", HUTOPO: "HutopoLoss"}
# Persistent homology grows faster than the volume: these get a time budget.
SLOW = (PH, BETTI_JAX, BETTI, HUTOPO)
# Voxels per sample beyond which a method is not timed: cbDice's distance
# transforms on one core and its PyTorch transcription would take minutes
# at the paper's shape. These, like SLOW, run at most 2 repeats.
LARGEST = {CBDICE: 128**3, CBDICE_TORCH: 128**3}
# topolosses 0.2.0's CLDiceLoss raises on anything but (N, C, H, W).
CLDICE_NOTE = ("\"clDice, PyTorch\" is the tests' transcription of the "
               "authors' 3D code: topolosses' CLDiceLoss takes 2D input only")


def make_inputs(shape, seed=0):
  """A ball label and a smooth, imperfect prediction, ``(N, X, Y, Z, 1)`` float32.

  The prediction is the label plus noise, blurred: soft edges and a few
  shallow bumps, like a network's output, rather than white noise, whose
  countless critical points would make the persistent-homology losses far
  slower than in training.
  """
  rng = np.random.default_rng(seed)
  n, spatial = shape[0], shape[1:-1]
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in spatial],
                              indexing="ij"))
  ball = (np.sum(grid**2, axis=0) < 0.5**2).astype(np.float32)
  target = np.repeat(ball[None, ..., None], n, axis=0)
  noisy = target + 0.3 * rng.standard_normal(target.shape).astype(np.float32)
  pred = ndimage.gaussian_filter(noisy, sigma=(0, 2, 2, 2, 0))
  return np.clip(pred, 0, 1).astype(np.float32), target


def time_call(fn, repeats, warmup=1):
  """Median and minimum of ``repeats`` timed calls after ``warmup`` calls, s."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times),
          "repeats": repeats}


def _jax_methods(pred, target):
  """``{name: (forward, forward_backward)}`` thunks for topojax's paths: each
  loss of the training table, then the PPL's and clDice's other paths."""
  import jax

  from topojax import losses
  from topojax.losses import cldice
  from topojax.losses import projected_pooling

  kernel_sizes = losses.DEFAULT_KERNEL_SIZES
  pred, target = jax.device_put(pred), jax.device_put(target)
  cases = {}
  for name, method in TOPOJAX.items():
    entry = loss_table.LOSS_TABLE[name]
    loss = entry.topology(kernel_sizes=kernel_sizes)
    if entry.prepare is None:
      cases[method] = (loss, (pred, target))
    else:
      # Prepared once on the host, as training does (training_targets).
      cases[method] = (_with_prepared(loss),
                       (pred, target, entry.prepare(np.asarray(target))))
  cases[FEATURES] = (losses.projected_pooling_loss,
                     (pred, losses.pooled_target_features(target)))
  cases[REFERENCE] = (functools.partial(
      projected_pooling._reference_loss, kernel_sizes=kernel_sizes,
      strides=kernel_sizes, start_channel=0), (pred, target))
  cases[CLDICE_OLD] = (cldice._reference_loss, (pred, target))
  methods = {}
  for name, (loss, args) in cases.items():
    forward = jax.jit(loss)
    forward_backward = jax.jit(jax.value_and_grad(loss))
    methods[name] = (
        lambda f=forward, a=args: jax.block_until_ready(f(*a)),
        lambda f=forward_backward, a=args: jax.block_until_ready(f(*a)))
  return methods


def _with_prepared(loss):
  """``loss`` of ``(pred, target, prepared)``: what the table prepares is
  its ``skeleton``."""
  return lambda pred, target, prepared: loss(pred, target, skeleton=prepared)


def _load_torch_reference():
  spec = importlib.util.spec_from_file_location(
      "torch_reference", ROOT / "tests" / "torch_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _torch_thunks(loss, pred, target):
  """Forward and forward + backward thunks of a channels-first torch loss."""
  import torch

  pred = torch.from_numpy(np.ascontiguousarray(np.moveaxis(pred, -1, 1)))
  target = torch.from_numpy(np.ascontiguousarray(np.moveaxis(target, -1, 1)))
  leaf = pred.clone().requires_grad_(True)

  def forward():
    with torch.no_grad():
      return loss(pred, target)

  def forward_backward():
    leaf.grad = None
    value = loss(leaf, target)
    value.backward()
    return value

  return forward, forward_backward


def _fastest_threads(forward, forward_backward, repeats):
  """Times a torch loss on one thread and on torch's default, keeps the faster.

  On a loaded machine, torch's parallel regions wait for a second core and can
  run a hundred times slower than on one thread; keeping the faster setting
  is fair to PyTorch. The persistent-homology losses, timed after, run with
  the same setting.
  """
  import torch

  best = None
  for threads in sorted({1, torch.get_num_threads()}):
    torch.set_num_threads(threads)
    timing = {"threads": threads, "forward": time_call(forward, repeats),
              "forward_backward": time_call(forward_backward, repeats)}
    if (best is None or timing["forward_backward"]["median_s"]
        < best["forward_backward"]["median_s"]):
      best = timing
  return best


def _load_peers(torch_reference):
  """The topolosses loss classes by name, or a reason they are missing."""
  classes = {name: torch_reference.topolosses_class(cls)
             for name, cls in PEERS.items()}
  if None in classes.values():
    return {}, ("topolosses is not installed (pip install torch==2.13.0, then "
                "pip install -e '.[bench]')")
  return classes, None


class _Budget:
  """Seconds left for one slow method; sizes are run smallest first."""

  def __init__(self, seconds):
    self.left = seconds
    self.last = None  # (voxels, seconds per forward + backward call)

  def allows(self, voxels, calls):
    if self.last is None:
      return True
    last_voxels, last_call = self.last
    # Persistent homology grows faster than linearly; assume an exponent of
    # 1.5, then let the budget, not the guess, stop a run that grows faster.
    return calls * last_call * (voxels / last_voxels)**1.5 <= self.left

  def spend(self, seconds, voxels, per_call):
    self.left -= seconds
    self.last = (voxels, per_call)


def selected_methods(names=None):
  """The methods of the table's losses ``names`` (default all) and of their
  other paths and peers, in table order, then the floor."""
  names = TOPOJAX if names is None else names
  return [method for name in TOPOJAX if name in names
          for method in (TOPOJAX[name], *RELATED.get(name, ()))] + [FLOOR]


def run(*, sizes, batches, repeats, peers, peer_budget_s, losses=None,
        log=print):
  """Times every method on every input; returns a list of result records.

  ``losses``: names in the training table whose methods are timed (default
  all); ``peers=False`` leaves out the persistent-homology losses.
  """
  import torch

  torch_reference = _load_torch_reference()
  peer_classes, peers_missing = (_load_peers(torch_reference) if peers
                                 else ({}, "not run"))
  budgets = {name: _Budget(peer_budget_s) for name in SLOW}
  default_threads = torch.get_num_threads()
  records = []
  for batch in batches:
    for spatial in sizes:
      shape = (batch, *spatial, 1)
      voxels = int(np.prod(shape))
      pred, target = make_inputs(shape)
      methods = _jax_methods(pred, target)
      methods[TORCH] = _torch_thunks(functools.partial(
          torch_reference.projected_pooling_loss, start_channel=0),
                                     pred, target)
      methods[CLDICE_TORCH] = _torch_thunks(functools.partial(
          torch_reference.cldice_loss, start_channel=0), pred, target)
      methods[CBDICE_TORCH] = _torch_thunks(functools.partial(
          torch_reference.cbdice_loss, start_channel=0), pred, target)
      copy = np.empty_like(pred)
      methods[FLOOR] = (None, lambda: np.copyto(copy, pred))
      for name, cls in peer_classes.items():
        loss = cls(use_base_loss=False, include_background=True, alpha=1.0)
        methods[name] = _torch_thunks(loss, pred, target)
      chosen = [m for m in selected_methods(losses) if m in methods
                and (peers or m not in (PH, BETTI_JAX))]
      for name, (forward, forward_backward) in ((m, methods[m])
                                                for m in chosen):
        record = {"method": name, "shape": list(shape), "voxels": voxels}
        budget = budgets.get(name)
        n = min(repeats, 2) if budget or name in LARGEST else repeats
        if voxels // batch > LARGEST.get(name, voxels):
          record["skipped"] = "larger than the inputs this method is timed on"
          records.append(record)
          log(f"{str(shape):22} {name:30} skipped (size)")
          continue
        if budget and not budget.allows(voxels, 2 * (n + 1)):
          record["skipped"] = (f"time budget of {peer_budget_s:.0f} s would "
                               "be exceeded")
          records.append(record)
          log(f"{str(shape):22} {name:30} skipped (time budget)")
          continue
        start = time.perf_counter()
        if name in TORCH_METHODS:
          record.update(_fastest_threads(forward, forward_backward, n))
          torch.set_num_threads(record["threads"])
        else:
          if forward is not None:
            record["forward"] = time_call(forward, n)
          record["forward_backward"] = time_call(forward_backward, n)
        if budget:
          budget.spend(time.perf_counter() - start, voxels,
                       record["forward_backward"]["median_s"])
        records.append(record)
        fwd = record.get("forward", {}).get("median_s")
        log(f"{str(shape):22} {name:30} "
            f"forward {_ms(fwd):>9}  forward+backward "
            f"{_ms(record['forward_backward']['median_s']):>9} ms")
      torch.set_num_threads(default_threads)
  return records, peers_missing


def _alternating(thunks, repeats):
  """Median seconds of each thunk, called in turn ``repeats`` times after a
  warm-up, so that a change of load touches every thunk alike."""
  for thunk in thunks:
    thunk()
  times = [[] for _ in thunks]
  for _ in range(repeats):
    for thunk, spent in zip(thunks, times):
      start = time.perf_counter()
      thunk()
      spent.append(time.perf_counter() - start)
  return [statistics.median(spent) for spent in times]


def run_host_parallel(*, repeats, log=print):
  """The host-side losses' forward + backward on one worker and on every core.

  Returns:
    Records ``{"method", "shape", "workers", "serial_s", "parallel_s"}``.
  """
  import jax

  from topojax import losses
  from topojax.losses import _host

  workers = _host.available_cores()
  records = []
  for shape in PARALLEL_SHAPES:
    pred, target = (jax.device_put(a) for a in make_inputs(shape))
    for name, loss in ((PH, losses.hutopo_loss),
                       (BETTI_JAX, losses.betti_matching_loss)):
      thunks = []
      for count in (1, workers):
        f = jax.jit(jax.value_and_grad(functools.partial(
            loss, num_workers=count)))
        thunks.append(lambda f=f: jax.block_until_ready(f(pred, target)))
      serial, parallel = _alternating(thunks, repeats)
      records.append({"method": name, "shape": list(shape),
                      "workers": workers, "serial_s": serial,
                      "parallel_s": parallel})
      log(f"{str(tuple(shape)):22} {name:30} 1 worker {_ms(serial):>9} ms, "
          f"{workers} workers {_ms(parallel):>9} ms")
  return records


def cldice_memory(sizes):
  """Bytes of the compiled clDice forward + backward (temporaries, arguments
  and outputs, from XLA's ``memory_analysis``), old path and custom VJP."""
  import jax

  from topojax import losses
  from topojax.losses import cldice

  records = []
  for spatial in sizes:
    pred, target = make_inputs((1, *spatial, 1))
    for name, loss in ((CLDICE, losses.cldice_loss),
                       (CLDICE_OLD, cldice._reference_loss)):
      memory = jax.jit(jax.value_and_grad(loss)).lower(
          pred, target).compile().memory_analysis()
      records.append({
          "method": name, "shape": [1, *spatial, 1],
          "temp_bytes": memory.temp_size_in_bytes,
          "total_bytes": (memory.temp_size_in_bytes
                          + memory.argument_size_in_bytes
                          + memory.output_size_in_bytes)})
  return records


def _ms(seconds):
  return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def environment(peers_missing, load_at_start):
  """Machine, versions and load, for the record."""
  import jax

  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  cpu = platform.processor()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import torch
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": "python -m benchmarks.loss " + " ".join(sys.argv[1:]),
      "cpu": cpu, "cpu_count": os.cpu_count(),
      "load_average_start": list(load_at_start),
      "load_average_end": list(os.getloadavg()),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in jax.devices()],
      "torch_default_threads": torch.get_num_threads(),
      "versions": {p: version(p) for p in (
          "jax", "jaxlib", "numpy", "torch", "topolosses", "gudhi")},
      "python": platform.python_version(),
      "peers_missing": peers_missing,
  }


def _lookup(records):
  table = {}
  for r in records:
    table[(tuple(r["shape"]), r["method"])] = r
  return table


def _ratio(a, b):
  return "–" if a is None or b is None else f"{a / b:.1f}×"


def _median(record, mode):
  if record is None or mode not in record:
    return None
  return record[mode]["median_s"]


def summary(records):
  """The issue's targets, measured: ``{name: value}`` (None when not run)."""
  table = _lookup(records)
  shapes = sorted({tuple(r["shape"]) for r in records},
                  key=lambda s: (s[0], np.prod(s)))
  fb = functools.partial(_median, mode="forward_backward")

  def ratio(shape, numerator, denominator):
    return _safe_div(fb(table.get((shape, numerator))),
                     fb(table.get((shape, denominator))))

  paper = (2, 160, 160, 128, 1)
  ball96 = (1, 96, 96, 96, 1)
  out = {
      "paper_torch_over_fast": ratio(paper, TORCH, FAST),
      "paper_fast_over_floor": ratio(paper, FAST, FLOOR),
      "paper_features_over_floor": ratio(paper, FEATURES, FLOOR),
      "96_betti_over_fast": ratio(ball96, BETTI, FAST),
      "96_hutopo_over_fast": ratio(ball96, HUTOPO, FAST),
      "96_ph_over_fast": ratio(ball96, PH, FAST),
      "96_cldice_over_fast": ratio(ball96, CLDICE, FAST),
      "96_torch_cldice_over_cldice": ratio(ball96, CLDICE_TORCH, CLDICE),
  }
  # The same loss on the host and in PyTorch, where both ran.
  out["hutopo_over_ph"] = {
      str(shape): fb(table[(shape, HUTOPO)]) / fb(table[(shape, PH)])
      for shape in shapes
      if fb(table.get((shape, HUTOPO))) and fb(table.get((shape, PH)))}
  # The same Betti matching loss, topolosses' and topojax's kernel.
  out["betti_over_topojax_betti"] = {
      str(shape): fb(table[(shape, BETTI)]) / fb(table[(shape, BETTI_JAX)])
      for shape in shapes
      if fb(table.get((shape, BETTI))) and fb(table.get((shape, BETTI_JAX)))}
  # cbDice: the tests' PyTorch transcription of the authors' code ÷ topojax.
  out["cbdice_torch_over_cbdice"] = {
      str(shape): ratio(shape, CBDICE_TORCH, CBDICE) for shape in shapes
      if fb(table.get((shape, CBDICE_TORCH))) and fb(table.get((shape,
                                                                 CBDICE)))}
  per_voxel = [fb(table.get((s, FAST))) / np.prod(s) for s in shapes
               if fb(table.get((s, FAST)))]
  out["fast_per_voxel_spread"] = (max(per_voxel) / min(per_voxel)
                                  if per_voxel else None)
  return out


def _safe_div(a, b):
  return None if a is None or b is None else a / b


def markdown(records, env, parallel=(), memory=()):
  """The loss section of RESULTS.md: environment, two tables, targets, and
  the host-parallel and clDice tables where ``parallel`` and ``memory``
  (from ``run_host_parallel`` and ``cldice_memory``) were measured."""
  table = _lookup(records)
  shapes = sorted({tuple(r["shape"]) for r in records},
                  key=lambda s: (s[0], np.prod(s)))
  methods = [m for m in selected_methods()
             if any(r["method"] == m for r in records)]
  versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
  lines = [
      SECTION_START, "", "## Loss: forward and forward + backward", "",
      f"`{env['command'].strip()}` on {env['date']}: {env['cpu']}, "
      f"{env['cpu_count']} cores (1-minute load average "
      f"{env['load_average_start'][0]:.2f} at the start, "
      f"{env['load_average_end'][0]:.2f} at the end), JAX backend "
      f"`{env['jax_backend']}`; PyTorch timed on 1 and on "
      f"{env['torch_default_threads']} threads, the faster kept (per input, in "
      "the JSON); " f"{versions}.", "",
      "float32, medians of the repeats after a warm-up, in ms; ratios are "
      "from this one run. The label is a ball, the prediction a blurred noisy "
      "copy of it (`make_inputs` in `benchmarks/loss.py`).", "",
  ]
  if env["peers_missing"]:
    lines += [f"Persistent-homology losses: {env['peers_missing']}.", ""]
  else:
    lines += [f"Peers from topolosses, topological term only; {CLDICE_NOTE}; "
              "\"budget\" marks inputs a persistent-homology loss skipped to "
              "keep the run short; cbDice is timed up to 128³ per sample. "
              "\"PyTorch ÷ topojax\" compares the Projected Pooling Loss.",
              ""]
  for mode, title in (("forward_backward", "Forward + backward"),
                      ("forward", "Forward")):
    cols = [m for m in methods if not (mode == "forward" and m == FLOOR)]
    lines += [f"### {title}", "",
              "| input (N, X, Y, Z, C) | " + " | ".join(cols)
              + " | PyTorch ÷ topojax | topojax ÷ floor |",
              "|---" * (len(cols) + 3) + "|"]
    for shape in shapes:
      cells = []
      for m in cols:
        r = table.get((shape, m))
        if r is not None and "skipped" in r:
          cells.append("budget" if m in SLOW else "–")
        else:
          cells.append(_ms(_median(r, mode)))
      fast = _median(table.get((shape, FAST)), mode)
      floor = _median(table.get((shape, FLOOR)), "forward_backward")
      lines.append(
          f"| {shape} | " + " | ".join(cells) + " | "
          + _ratio(_median(table.get((shape, TORCH)), mode), fast) + " | "
          + (_ratio(fast, floor) if mode == "forward_backward" else "–")
          + " |")
    lines.append("")
  s = summary(records)

  def fmt(value, unit="×"):
    return "not measured" if value is None else f"{value:.1f}{unit}"

  lines += [
      "### Targets (forward + backward)", "",
      f"- (2, 160, 160, 128, 1): PyTorch reference ÷ topojax = "
      f"{fmt(s['paper_torch_over_fast'])} (target ≥ 50×); topojax ÷ NumPy "
      f"copy = {fmt(s['paper_fast_over_floor'])}, with a precomputed target "
      f"{fmt(s['paper_features_over_floor'])} (target ≤ 4×).",
      f"- 96³, batch 1: Betti matching ÷ topojax = "
      f"{fmt(s['96_betti_over_fast'])} (target ≥ 1000×); Hu et al. ÷ "
      f"topojax = {fmt(s['96_hutopo_over_fast'])}.",
      f"- topojax's time per voxel, slowest ÷ fastest over all inputs: "
      f"{fmt(s['fast_per_voxel_spread'])} (target ≤ 2×).", "",
      "### The other losses (forward + backward)", "",
      f"- 96³, batch 1, against topojax's PPL: topojax clDice "
      f"{fmt(s['96_cldice_over_fast'])}, topojax PH "
      f"{fmt(s['96_ph_over_fast'])} slower; PyTorch clDice ÷ topojax clDice "
      f"= {fmt(s['96_torch_cldice_over_cldice'])}.",
      "- The same persistent-homology loss, topolosses' HutopoLoss ÷ "
      "topojax's: " + (", ".join(f"{shape} {fmt(v)}" for shape, v in
                                 s["hutopo_over_ph"].items())
                       or "not measured") + ".",
      "- The same Betti matching loss, topolosses Betti matching ÷ topojax "
      "Betti matching: " + (", ".join(
          f"{shape} {fmt(v)}" for shape, v in
          s["betti_over_topojax_betti"].items()) or "not measured") + ".",
      "- cbDice, the PyTorch transcription of the authors' code ÷ topojax: "
      + (", ".join(f"{shape} {fmt(v)}" for shape, v in
                   s["cbdice_torch_over_cbdice"].items())
         or "not measured") + ".",
      ""]
  lines += _parallel_lines(parallel) + _cldice_lines(table, memory)
  lines.append(SECTION_END)
  return "\n".join(lines) + "\n"


def _parallel_lines(parallel):
  if not parallel:
    return []
  lines = ["### Host work on every core (forward + backward)", "",
           "Samples × channels on `num_workers` threads against one, calls "
           "alternating (`run_host_parallel`); the results are the same bit "
           "for bit (tests).", "",
           "| input (N, X, Y, Z, C) | loss | 1 worker | all workers | "
           "speedup |", "|---|---|---|---|---|"]
  for r in parallel:
    lines.append(
        f"| {tuple(r['shape'])} | {r['method']} | {_ms(r['serial_s'])} | "
        f"{_ms(r['parallel_s'])} ({r['workers']}) | "
        f"{_ratio(r['serial_s'], r['parallel_s'])} |")
  return lines + [""]


def _cldice_lines(table, memory):
  if not memory:
    return []
  lines = ["### clDice: the custom VJP against the old path", "",
           "Forward + backward from the tables above; memory of the compiled "
           "forward + backward (XLA's `memory_analysis`: temporaries + "
           "arguments + outputs), MiB.", "",
           "| input (N, X, Y, Z, C) | old path | custom VJP | PyTorch | old ÷ "
           "new | PyTorch ÷ new | memory, old path | memory, custom VJP |",
           "|---|---|---|---|---|---|---|---|"]
  fb = functools.partial(_median, mode="forward_backward")
  mib = {(tuple(r["shape"]), r["method"]): r["total_bytes"] / 2**20
         for r in memory}
  for shape in sorted({tuple(r["shape"]) for r in memory},
                      key=lambda s: np.prod(s)):
    old, new, torch = (fb(table.get((shape, m)))
                       for m in (CLDICE_OLD, CLDICE, CLDICE_TORCH))
    lines.append(
        f"| {shape} | {_ms(old)} | {_ms(new)} | {_ms(torch)} | "
        f"{_ratio(old, new)} | {_ratio(torch, new)} | "
        f"{mib[(shape, CLDICE_OLD)]:.0f} | {mib[(shape, CLDICE)]:.0f} |")
  return lines + [""]


def update_results(path, section):
  """Replaces the loss section of ``path``, leaving the rest as it was."""
  path = pathlib.Path(path)
  text = path.read_text() if path.exists() else "# Benchmark results\n"
  if SECTION_START in text and SECTION_END in text:
    head, rest = text.split(SECTION_START, 1)
    _, tail = rest.split(SECTION_END, 1)
    text = head + section.rstrip("\n") + tail
  else:
    text = text.rstrip("\n") + "\n\n" + section
  path.write_text(text)


def plot(records, path):
  """Log-log forward + backward time against voxel count, one line a method."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 5))
  methods = list(dict.fromkeys(r["method"] for r in records))
  # More methods than the default colour cycle: one colour and marker each.
  colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(methods), 2)))
  for i, method in enumerate(methods):
    points = sorted((r["voxels"], r["forward_backward"]["median_s"])
                    for r in records
                    if r["method"] == method and "forward_backward" in r)
    if points:
      voxels, seconds = zip(*points)
      ax.plot(voxels, np.array(seconds) * 1e3, "-", marker="osv^Dp"[i % 6],
              color=colours[i], label=method)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("voxels (N·X·Y·Z)")
  ax.set_ylabel("forward + backward, ms (median)")
  ax.set_title("Topology losses, forward + backward, float32")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.loss", description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="one small input, batch 1, no persistent-homology "
                      "losses, RESULTS.md untouched (a smoke test)")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                      help="folder for loss.json and loss.png "
                      f"(default {DEFAULT_OUT.relative_to(ROOT)})")
  parser.add_argument("--results", type=pathlib.Path, default=None,
                      help="markdown file whose loss section is replaced "
                      f"(default {DEFAULT_RESULTS.relative_to(ROOT)}; none "
                      "with --quick)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace loss.json and loss.png if they exist")
  parser.add_argument("--repeats", type=int, default=7,
                      help="timed calls per method and input (default 7; "
                      "at most 2 for persistent-homology losses)")
  parser.add_argument("--peer-budget", type=float, default=120.0,
                      help="seconds each persistent-homology loss may take "
                      "over all inputs (default 120)")
  parser.add_argument("--losses", nargs="+", choices=tuple(TOPOJAX),
                      metavar="LOSS",
                      help="time only these losses of the training table "
                      f"({', '.join(TOPOJAX)}) and their peers; RESULTS.md "
                      "untouched unless --results is given")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
  results = args.results
  if results is None and not args.quick and args.losses is None:
    results = DEFAULT_RESULTS
  outputs = [args.out / "loss.json", args.out / "loss.png"]
  outputs_lib.claim(outputs, overwrite=args.overwrite)

  load_at_start = os.getloadavg()
  records, peers_missing = run(
      sizes=QUICK_SIZES if args.quick else SIZES,
      batches=QUICK_BATCHES if args.quick else BATCHES,
      repeats=args.repeats, peers=not args.quick,
      peer_budget_s=args.peer_budget, losses=args.losses)
  parallel = memory = ()
  if not args.quick and args.losses is None:
    parallel = run_host_parallel(repeats=3)
    memory = cldice_memory(CLDICE_MEMORY_SIZES)
  env = environment(peers_missing, load_at_start)
  section = markdown(records, env, parallel, memory)
  print("\n" + section)
  outputs[0].write_text(json.dumps(
      {"environment": env, "summary": summary(records), "records": records,
       "host_parallel": list(parallel), "cldice_memory": list(memory)},
      indent=1))
  plot(records, outputs[1])
  print(f"wrote {outputs[0]} and {outputs[1]}")
  if results is not None:
    update_results(results, section)
    print(f"updated the loss section of {results}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
