"""Smoke tests of benchmarks/conv_passes.py."""

import jax
from flax import nnx
import pytest

from benchmarks import conv_passes  # The repository root is on pytest's path.
from topojax import conv
from topojax import unet


@pytest.mark.parametrize("base, depth", [(8, 2), (8, 3), (4, 4)])
def test_the_listed_convolutions_are_the_unets(base, depth):
  model = nnx.eval_shape(lambda: unet.UNet(
      in_channels=1, out_channels=1, base_channels=base, depth=depth,
      rngs=nnx.Rngs(0)))
  kernels = {leaf.shape[3:] for leaf in jax.tree.leaves(nnx.state(model))
             if leaf.ndim == 5 and leaf.shape[:3] == (3, 3, 3)}
  listed = conv_passes.unet_convolutions((16, 16, 16), base=base,
                                         depth=depth)
  assert {(c_in, c_out) for _, c_in, c_out in listed} == kernels
  assert listed[0][0] == (16, 16, 16)
  assert min(side[0] for side, _, _ in listed) == 16 // 2 ** (depth - 1)


def test_quick_run_times_every_pass(capsys):
  if conv._native() is not None:
    pytest.skip(f"native convolutions unavailable: {conv._native()}")
  assert conv_passes.main(["--quick"]) == 0
  rows = [line for line in capsys.readouterr().out.splitlines()
          if line.startswith("| 8×8×8") or line.startswith("| 4×4×4")]
  assert len(rows) == len(conv_passes.unet_convolutions((8, 8, 8), base=8,
                                                        depth=2))
  for row in rows:
    times = [float(v) for v in row.strip("| ").split(" | ")[2:]]
    assert len(times) == 3 and min(times) > 0
