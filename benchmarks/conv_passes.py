"""The native convolution's three passes, one by one, at a U-Net's shapes.

For each distinct 3×3×3 convolution of the U-Net (``--shape``, ``--batch``,
``--base``, ``--depth``; the main job's by default), the median time of one
call of each FFI target of ``topojax/conv.py``: forward, input gradient and
kernel gradient, compiled alone. It is what ``step_profile.py`` sums as
``ffi_call``, taken apart: compare two builds of the native part (e.g. a
worktree at an older commit, ``pip install -e .`` there) by running this in
each, one after the other.

    python benchmarks/conv_passes.py
    python benchmarks/conv_passes.py --shape 64 64 48 --batch 2 --base 16 --depth 4
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def unet_convolutions(shape, *, base: int, depth: int
                      ) -> list[tuple[tuple[int, int, int], int, int]]:
  """``(side, C_in, C_out)`` of each distinct 3×3×3 convolution of the
  U-Net (``topojax.unet.UNet``, one input channel), in network order."""
  found = []
  channels, side = 1, tuple(shape)
  for level in range(depth):
    width = base * 2 ** level
    found += [(side, channels, width), (side, width, width)]
    channels = width
    if level < depth - 1:
      side = tuple(s // 2 for s in side)
  for level in reversed(range(depth - 1)):
    width = base * 2 ** level
    side = tuple(s * 2 for s in side)
    # After the up-convolution, the skip connection doubles the channels.
    found += [(side, 2 * width, width), (side, width, width)]
  return list(dict.fromkeys(found))


def time_passes(shape, *, batch: int, base: int, depth: int,
                repeats: int) -> list[dict]:
  """One row per convolution: its milliseconds per pass (median)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import loss as loss_benchmark
  from topojax import conv

  if not conv.available():
    raise SystemExit(f"the native convolutions are unavailable: "
                     f"{conv._native()}")
  rng = np.random.default_rng(0)
  strides, pads = (1, 1, 1), ((1, 1),) * 3

  def median_ms(function, *args):
    timed = loss_benchmark.time_call(
        lambda: jax.block_until_ready(function(*args)), repeats)
    return timed["median_s"] * 1e3

  rows = []
  for side, c_in, c_out in unet_convolutions(shape, base=base, depth=depth):
    x = jnp.asarray(rng.normal(size=(batch, *side, c_in)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(batch, *side, c_out)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, c_in, c_out)), jnp.float32)
    forward = jax.jit(lambda x, k: conv._call(
        "forward", dy.shape, x, k, strides, pads))
    input_grad = jax.jit(lambda dy, k: conv._call(
        "input", x.shape, dy, k, strides, pads))
    kernel_grad = jax.jit(lambda x, dy: conv._call(
        "kernel", kernel.shape, x, dy, strides, pads))
    rows.append({"side": side, "c_in": c_in, "c_out": c_out,
                 "forward_ms": median_ms(forward, x, kernel),
                 "input_ms": median_ms(input_grad, dy, kernel),
                 "kernel_ms": median_ms(kernel_grad, x, dy)})
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", type=int, nargs=3, default=(32, 32, 32),
                      metavar=("X", "Y", "Z"))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--base", type=int, default=8)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--quick", action="store_true",
                      help="a tiny network, 2 repeats (CI)")
  args = parser.parse_args(argv)
  if args.quick:
    args.shape, args.batch, args.base, args.depth = (8, 8, 8), 2, 8, 2
    args.repeats = 2
  rows = time_passes(args.shape, batch=args.batch, base=args.base,
                     depth=args.depth, repeats=args.repeats)
  print(f"batch {args.batch}, base {args.base}, depth {args.depth}, "
        f"{os.cpu_count()} cores; load average "
        f"{os.getloadavg()[0]:.2f} at the end\n")
  print("| side | C_in → C_out | forward (ms) | input gradient (ms) "
        "| kernel gradient (ms) |")
  print("|---|---|---|---|---|")
  for row in rows:
    print(f"| {'×'.join(map(str, row['side']))} | {row['c_in']} → "
          f"{row['c_out']} | {row['forward_ms']:.2f} | {row['input_ms']:.2f} "
          f"| {row['kernel_ms']:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
