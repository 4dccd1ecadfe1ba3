"""Tests for topojax/train/validation.py: the validation Dice and PPL, of
whole volumes and by sliding windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topojax import train
from topojax.train import steps
from topojax.train import validation


def test_validate_averages_over_cases_and_leaves_padding_out():
  rng = np.random.default_rng(0)
  labels = (rng.random((5, 4, 4, 4, 1)) > 0.5).astype(np.float32)
  images = rng.random((5, 4, 4, 4, 1)).astype(np.float32) + 1

  def eval_step(model_state, images, labels):
    # A perfect model whose "PPL" is the mean intensity: padded (zero) cases
    # would pull the mean down if they were counted.
    return labels > 0.5, jnp.mean(images, axis=(1, 2, 3, 4))

  # Rows 0, 2, 4 in batches of 2: the last batch is padded with a zero case.
  scores = train.validate(eval_step, None, images, labels, [0, 2, 4],
                          batch_size=2, mesh=train.data_mesh())
  assert scores["val_dice"] == 1.0
  np.testing.assert_allclose(scores["val_topo"],
                             images[[0, 2, 4]].mean(), rtol=1e-6)


@pytest.mark.parametrize("out_channels", [1, 3])
def test_one_window_per_case_validates_as_the_whole_volume_step(
    out_channels):
  # A patch as large as the volume: one window, whose Gaussian weight
  # divides out, so the sliding window must give the whole-volume numbers.
  config = train.TrainConfig(shape=(8, 8, 8), patch_size=(8, 8, 8),
                             base_channels=2, depth=2, batch_size=2,
                             kernel_sizes=(2, 4))
  mesh = train.data_mesh()
  model_def, state = train.init_state(config, in_channels=1,
                                      out_channels=out_channels, mesh=mesh)
  rng = np.random.default_rng(0)
  images = rng.random((3, 8, 8, 8, 1)).astype(np.float32)
  classes = rng.integers(0, out_channels + 1, (3, 8, 8, 8))
  labels = (classes[..., None] == np.arange(max(out_channels, 2))[
      -out_channels:]).astype(np.float32)
  whole = train.validate(
      train.make_eval_step(model_def, mesh, kernel_sizes=(2, 4)),
      state["model"], images, labels, [2, 0], batch_size=2, mesh=mesh)
  windows = validation.validate_by_windows(
      steps.make_forward(model_def), state["model"], images, labels,
      [2, 0], config=config)
  np.testing.assert_allclose(windows["val_topo"], whole["val_topo"],
                             rtol=1e-5)
  # A voxel within float32 rounding of the threshold may fall either way.
  assert abs(windows["val_dice"] - whole["val_dice"]) < 1e-2


@pytest.mark.parametrize("overlap, validation_overlap, expected", [
    (0.5, None, 27),  # validation_overlap None: overlap's 3 windows a side
    (0.5, 0.0, 8),  # 2 a side at overlap 0, whatever overlap says
    (0.0, 0.5, 27),
])
def test_validation_by_windows_uses_the_validation_overlap(
    overlap, validation_overlap, expected):
  config = train.TrainConfig(shape=None, patch_size=(8, 8, 8), depth=2,
                             batch_size=1, kernel_sizes=(2, 4),
                             overlap=overlap,
                             validation_overlap=validation_overlap)
  seen = []

  def forward(state, windows):
    # Counts the windows predicted (batch_size 1: no filling repeats), not
    # the abstract call that checks the output's shape.
    if not isinstance(windows, jax.core.Tracer):
      seen.append(windows.shape[0])
    return jnp.full(windows.shape[:-1] + (1,), 0.75) * state

  images = np.zeros((1, 16, 16, 16, 1), np.float32)
  labels = np.ones((1, 16, 16, 16, 1), np.float32)
  scores = validation.validate_by_windows(forward, jnp.ones(()), images,
                                          labels, [0], config=config)
  assert sum(seen) == expected
  assert scores["val_dice"] == pytest.approx(1.0)
