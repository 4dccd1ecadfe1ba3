"""Training-step benchmark: topojax's 3D U-Net against PyTorch, on this machine.

One Adam step of a 3D U-Net (Çiçek et al. 2016; base 16 channels, 4 levels,
GroupNorm) on a batch of random volumes, by default 2 × 64×64×48 (the
hippocampus shape of the paper), timed after compilation.

Implementations (``--impl``):

* ``topojax``: ``topojax.train``'s compiled step, as used for training.
* ``flax-naive``: the same network with Flax's stock layers, i.e. the 3D
  ``lax.conv_general_dilated``, ``nnx.ConvTranspose`` and ``nnx.max_pool``;
  ``--naive conv,upconv,pool`` puts back only some of them.
* ``torch``: a PyTorch U-Net of the same architecture (``Conv3d``,
  ``GroupNorm``, ``MaxPool3d``, ``ConvTranspose3d``), Adam, soft Dice.

``--compare`` runs topojax (oneDNN convolutions), topojax on XLA's
convolutions and PyTorch side by side in one process, in alternating rounds.
Every implementation runs with glibc keeping freed memory
(``topojax.allocator``), as topojax's training does.
``--conv`` times one 16→16 ``3×3×3`` convolution instead, forward and
forward+backward, in several formulations. ``--all`` runs the table recorded
in ``benchmarks/RESULTS.md`` (each row in a fresh process, so XLA flags can
differ) and prints it as markdown.

Usage::

    python benchmarks/train_step.py --impl topojax --loss topo_dice
    python benchmarks/train_step.py --impl torch
    XLA_FLAGS=--xla_cpu_use_xnnpack=false python benchmarks/train_step.py
    python benchmarks/train_step.py --conv
    python benchmarks/train_step.py --all
    python benchmarks/train_step.py --compare --shape 32 32 32 --batch 4 \\
        --base 8 --depth 3 --repeats 10       # side by side, one process
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from unittest import mock

if __package__ in (None, ""):  # Run as a script: the repository's root.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))


def _time(fn, repeats: int) -> tuple[float, list[float]]:
  """Seconds of the first call (compilation included) and of each repeat."""
  began = time.perf_counter()
  fn()
  first = time.perf_counter() - began
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    fn()
    times.append(time.perf_counter() - began)
  return first, times


def _random_batch(args):
  import numpy as np
  rng = np.random.default_rng(0)
  shape = (args.batch, *args.shape, 1)
  images = rng.random(shape, dtype=np.float32)
  labels = (rng.random(shape) > 0.7).astype(np.float32)
  return images, labels


def _jax_step(args):
  import jax
  from flax import nnx

  from topojax import conv
  from topojax import train
  from topojax import unet

  if args.impl == "flax-naive":
    # Put Flax's stock layers back in place of topojax's CPU formulations;
    # they are read when the network is built (and called, for pooling).
    naive = set(args.naive.split(","))
    if "conv" in naive:
      unet._conv_general_dilated = jax.lax.conv_general_dilated
    if "upconv" in naive:
      unet.UpConv = lambda c_in, c_out, *, rngs: nnx.ConvTranspose(
          c_in, c_out, (2, 2, 2), (2, 2, 2), rngs=rngs)
    if "pool" in naive:
      unet._max_pool = lambda x: nnx.max_pool(x, (2, 2, 2), (2, 2, 2))
  config = train.TrainConfig(
      shape=tuple(args.shape), base_channels=args.base, depth=args.depth,
      norm="group", batch_size=args.batch,
      # The paper's kernels that fit (all of them from 20 voxels up).
      kernel_sizes=tuple(k for k in (4, 5, 8, 10, 20) if k <= min(args.shape)))
  mesh = train.data_mesh()
  model_def, state = train.init_state(config, in_channels=1, out_channels=1,
                                      mesh=mesh)
  # A step of its own (not the factory's cached one), so that one process
  # can hold the step on oneDNN and on XLA's convolutions side by side.
  step = train.make_train_step.__wrapped__(
      model_def, mesh, loss=args.loss, kernel_sizes=config.kernel_sizes)
  images, labels = _random_batch(args)
  holder = {"state": state}
  native = contextlib.nullcontext
  if getattr(args, "xla_conv", False):
    native = lambda: mock.patch.object(conv, "available", lambda: False)

  def run():
    with native():  # read when the step is traced, at its first call
      holder["state"], loss = step(holder["state"], images, labels, 1e-3,
                                   config.dice_weight)
    loss.block_until_ready()

  return run


def _torch_step(args):
  import torch

  from benchmarks.torch_unet import torch_unet

  torch.set_num_threads(os.cpu_count())

  model = torch_unet(base=args.base, depth=args.depth)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  images, labels = _random_batch(args)
  # Channels-first, as PyTorch's Conv3d wants.
  images = torch.from_numpy(images).permute(0, 4, 1, 2, 3).contiguous()
  labels = torch.from_numpy(labels).permute(0, 4, 1, 2, 3).contiguous()

  def run():
    optimizer.zero_grad()
    probs = torch.sigmoid(model(images))
    overlap = (probs * labels).sum(dim=(2, 3, 4))
    total = probs.sum(dim=(2, 3, 4)) + labels.sum(dim=(2, 3, 4))
    loss = (1 - (overlap + 1) / (total / 2 + 1)).mean()
    loss.backward()
    optimizer.step()

  return run


def _conv_rows(repeats: int) -> list[dict]:
  """One 16→16 3×3×3 'SAME' convolution on 2 × 64×64×48, many ways."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from topojax import conv
  from topojax import unet

  torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((2, 64, 64, 48, 16), dtype=np.float32))
  w = jnp.asarray(rng.random((3, 3, 3, 16, 16), dtype=np.float32))

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1, 1), "SAME",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

  def lax_conv_ncdhw(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1, 1), "SAME",
        dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))

  def im2col(x, w):
    # The 27 shifted copies side by side, one matrix product.
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    sx, sy, sz = x.shape[1:4]
    columns = jnp.concatenate(
        [padded[:, i:i + sx, j:j + sy, k:k + sz] for i in range(3)
         for j in range(3) for k in range(3)], axis=-1)
    return columns @ w.reshape(-1, w.shape[-1])

  cases = [
      ("lax 3D conv, NDHWC", lax_conv, x, w),
      ("lax 3D conv, NCDHW", lax_conv_ncdhw, jnp.moveaxis(x, -1, 1),
       jnp.transpose(w, (4, 3, 0, 1, 2))),
      ("lax 3D conv, bfloat16", lax_conv, x.astype(jnp.bfloat16),
       w.astype(jnp.bfloat16)),
      ("im2col + one matmul", im2col, x, w),
      ("3 × 2D conv over (Y, Z) (topojax without oneDNN)",
       unet.conv3d_by_planes, x, w),
      ("3 × 2D conv, bfloat16", unet.conv3d_by_planes,
       x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),
  ]
  if conv.available():
    cases.append(("oneDNN through XLA's FFI (topojax on CPU)", conv.conv3d,
                  x, w))
  rows = []
  for name, conv_fn, a, b in cases:
    forward = jax.jit(conv_fn)
    both = jax.jit(jax.grad(
        lambda a, b, f=conv_fn: jnp.sum(f(a, b).astype(jnp.float32) ** 2),
        argnums=(0, 1)))
    _, fwd = _time(lambda: forward(a, b).block_until_ready(), repeats)
    _, bwd = _time(lambda: jax.block_until_ready(both(a, b)), repeats)
    rows.append({"conv": name, "forward_ms": 1e3 * statistics.median(fwd),
                 "forward_backward_ms": 1e3 * statistics.median(bwd)})

  tx = torch.tensor(np.asarray(jnp.moveaxis(x, -1, 1)), requires_grad=True)
  tw = torch.tensor(np.asarray(jnp.transpose(w, (4, 3, 0, 1, 2))),
                    requires_grad=True)

  def torch_forward():
    with torch.no_grad():
      torch.nn.functional.conv3d(tx, tw, padding=1)

  def torch_both():
    (torch.nn.functional.conv3d(tx, tw, padding=1) ** 2).sum().backward()

  _, fwd = _time(torch_forward, repeats)
  _, bwd = _time(torch_both, repeats)
  rows.append({"conv": "PyTorch Conv3d", "forward_ms":
               1e3 * statistics.median(fwd),
               "forward_backward_ms": 1e3 * statistics.median(bwd)})
  return rows


def _loss_rows(args) -> list[dict]:
  """Forward + backward of the training losses alone, on logits."""
  import jax

  from topojax import train

  images, labels = _random_batch(args)
  logits = jax.numpy.asarray(images * 8 - 4)
  rows = []
  for name in ("dice", "topo_dice"):
    loss = train.make_loss(name, dice_weight=1.0,
                           kernel_sizes=train.TrainConfig(
                               shape=tuple(args.shape)).kernel_sizes)
    grad = jax.jit(jax.grad(loss))
    _, times = _time(lambda: grad(logits, labels).block_until_ready(),
                     args.repeats)
    rows.append({"loss": name, "ms": 1e3 * statistics.median(times)})
  return rows


def _versions() -> str:
  import importlib.metadata as metadata
  names = ("jax", "jaxlib", "flax", "optax", "torch")
  found = []
  for name in names:
    try:
      found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      pass
  return ", ".join(found)


# The rows of RESULTS.md: (label, extra arguments, XLA_FLAGS).
_TABLE = (
    ("topojax, Dice", ["--impl", "topojax"], ""),
    ("topojax, PPL + Dice", ["--impl", "topojax", "--loss", "topo_dice"], ""),
    ("Flax stock layers (conv3d, ConvTranspose, max_pool)",
     ["--impl", "flax-naive", "--naive", "conv,upconv,pool"], ""),
    ("topojax with stock 3D conv only",
     ["--impl", "flax-naive", "--naive", "conv"], ""),
    ("topojax with stock ConvTranspose only",
     ["--impl", "flax-naive", "--naive", "upconv"], ""),
    ("topojax with stock max_pool only",
     ["--impl", "flax-naive", "--naive", "pool"], ""),
    ("topojax, XNNPACK off", ["--impl", "topojax"],
     "--xla_cpu_use_xnnpack=false"),
    ("topojax, oneDNN on", ["--impl", "topojax"], "--xla_cpu_use_onednn=true"),
    ("topojax, XNN graph fusion", ["--impl", "topojax"],
     "--xla_cpu_experimental_xnn_graph_fusion_mode="
     "XNN_GRAPH_FUSION_MODE_GREEDY"),
    ("PyTorch, same architecture, Dice", ["--impl", "torch"], ""),
)


def _machine() -> str:
  model = platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{model}, {os.cpu_count()} cores"


def _load() -> str:
  """The 1-minute load average: other processes share the cores."""
  return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def _run_all(args) -> None:
  common = ["--shape", *map(str, args.shape), "--batch", str(args.batch),
            "--base", str(args.base), "--depth", str(args.depth),
            "--repeats", str(args.repeats)]
  print(f"{_machine()}; {_versions()}; batch {args.batch} × "
        f"{'×'.join(map(str, args.shape))}, base {args.base}, depth "
        f"{args.depth}, GroupNorm; load average {_load()} at the start\n")
  print("| implementation | XLA_FLAGS | compile + 1st step (s) | step, median "
        "(s) | step, min (s) |")
  print("|---|---|---|---|---|")
  for label, extra, flags in _TABLE:
    env = {**os.environ, "XLA_FLAGS": flags}
    out = subprocess.run([sys.executable, __file__, *extra, *common],
                         env=env, capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {label} | {flags or '—'} | {row['first_s']:.1f} | "
          f"{row['median_s']:.2f} | {row['min_s']:.2f} |", flush=True)
  print(f"\nload average {_load()} after the steps\n")
  print(f"| loss alone, gradient w.r.t. logits {args.batch} × "
        f"{'×'.join(map(str, args.shape))} | median (ms) |")
  print("|---|---|")
  for row in _loss_rows(args):
    print(f"| {row['loss']} | {row['ms']:.1f} |", flush=True)
  print()
  print("| 16→16 3×3×3 conv, 2 × 64×64×48 | forward (ms) | forward + "
        "backward (ms) |")
  print("|---|---|---|")
  for row in _conv_rows(args.repeats):
    print(f"| {row['conv']} | {row['forward_ms']:.0f} | "
          f"{row['forward_backward_ms']:.0f} |", flush=True)
  print(f"\nload average {_load()} at the end")


def _compare(args) -> None:
  """topojax (oneDNN), topojax on XLA's convolutions and PyTorch, the same
  step in one process, in alternating rounds of ``--repeats`` steps."""
  impls = {"topojax": _jax_step(args),
           "topojax, XLA conv": _jax_step(argparse.Namespace(
               **{**vars(args), "xla_conv": True})),
           "PyTorch": _torch_step(args)}
  print(f"{_machine()}; {_versions()}; batch {args.batch} × "
        f"{'×'.join(map(str, args.shape))}, base {args.base}, depth "
        f"{args.depth}, GroupNorm, {args.loss}; load average {_load()} at "
        "the start\n")
  for run in impls.values():  # compile and warm up
    run()
  print("| round | " + " | ".join(f"{name} (ms)" for name in impls)
        + " | PyTorch ÷ topojax | XLA conv ÷ topojax |")
  print("|---" * (len(impls) + 3) + "|")
  ratios = []
  for round_ in range(1, args.rounds + 1):
    ms = {}
    for name, run in impls.items():
      ms[name] = 1e3 * statistics.median(_time(run, args.repeats)[1])
    ratios.append(ms["PyTorch"] / ms["topojax"])
    print(f"| {round_} | " + " | ".join(f"{v:.0f}" for v in ms.values())
          + f" | {ratios[-1]:.2f} | "
          f"{ms['topojax, XLA conv'] / ms['topojax']:.2f} |", flush=True)
  print(f"\nPyTorch ÷ topojax, median over rounds: "
        f"{statistics.median(ratios):.2f}; load average {_load()} at the end")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", choices=("topojax", "flax-naive", "torch"),
                      default="topojax")
  parser.add_argument("--loss", choices=("dice", "topo_dice"), default="dice",
                      help="topojax only; PyTorch trains with Dice")
  parser.add_argument("--naive", default="conv,upconv,pool",
                      help="flax-naive: the layers to take from Flax")
  parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48),
                      metavar=("X", "Y", "Z"))
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--base", type=int, default=16)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed steps after the first")
  parser.add_argument("--conv", action="store_true",
                      help="time one convolution in several formulations")
  parser.add_argument("--all", action="store_true",
                      help="run the whole RESULTS.md table")
  parser.add_argument("--compare", action="store_true",
                      help="topojax, topojax on XLA's convolutions and "
                      "PyTorch in alternating rounds, in one process")
  parser.add_argument("--rounds", type=int, default=3,
                      help="--compare: rounds")
  parser.add_argument("--quick", action="store_true",
                      help="--compare on a tiny network, 1 round (CI)")
  args = parser.parse_args(argv)
  # topojax's training has glibc keep freed memory (topojax.allocator); so
  # does every implementation here, PyTorch included, which in --compare
  # shares the process anyway.
  from topojax import allocator
  allocator.keep_freed_memory()
  if args.quick:
    args.shape, args.batch, args.base, args.depth = (8, 8, 8), 2, 2, 2
    args.rounds, args.repeats, args.compare = 1, 1, True
  if args.compare:
    _compare(args)
    return
  if args.all:
    _run_all(args)
    return
  if args.conv:
    for row in _conv_rows(args.repeats):
      print(json.dumps(row))
    return
  run = _torch_step(args) if args.impl == "torch" else _jax_step(args)
  first, times = _time(run, args.repeats)
  print(json.dumps({"impl": args.impl, "loss": args.loss,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "first_s": first, "median_s": statistics.median(times),
                    "min_s": min(times)}))


if __name__ == "__main__":
  main()
