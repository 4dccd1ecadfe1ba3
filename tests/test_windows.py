"""Tests for topojax/windows.py: MONAI's placement and blend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import topojax
from topojax import windows as sw

torch = pytest.importorskip("torch")
inferers = pytest.importorskip(
    "monai.inferers", reason="MONAI (the test extra) is the reference")


def _ramp(patch, arange):
  """A different weight at every voxel of a window, so that a window placed
  or blended one voxel off changes the output."""
  total = 0
  for axis, side in enumerate(patch):
    shape = [1] * len(patch)
    shape[axis] = side
    total = total + arange(side).reshape(shape) * (axis + 1)
  return total


@jax.jit
def _predict(windows):
  """Two output channels from C inputs: voxelwise and window-wide terms."""
  ramp = _ramp(windows.shape[1:-1],
               lambda n: jnp.arange(n, dtype=jnp.float32))
  mean = windows.mean(axis=tuple(range(1, windows.ndim)), keepdims=True)
  first = jnp.tanh(2 * windows[..., :1] + 0.1 * ramp[None, ..., None] + mean)
  return jnp.concatenate([first, windows.sum(-1, keepdims=True) * mean], -1)


def _predict_torch(windows):
  """``_predict`` channels-first, in PyTorch."""
  ramp = _ramp(windows.shape[2:],
               lambda n: torch.arange(n, dtype=torch.float32))
  mean = windows.mean(dim=tuple(range(1, windows.ndim)), keepdim=True)
  first = torch.tanh(2 * windows[:, :1] + 0.1 * ramp[None, None] + mean)
  return torch.cat([first, windows.sum(1, keepdim=True) * mean], 1)


def _monai(volume, patch, **options):
  channels_first = torch.from_numpy(np.moveaxis(volume, -1, 1))
  out = inferers.sliding_window_inference(
      channels_first, patch, options["batch_size"], _predict_torch,
      overlap=options["overlap"], mode=options["blend"],
      sigma_scale=options["sigma_scale"])
  return np.moveaxis(out.numpy(), 1, -1)


@pytest.mark.parametrize("shape, patch, overlap, blend, sigma, batch", [
    ((2, 37, 29, 11, 2), (16, 12, 16), 0.5, "gaussian", 0.125, 3),  # Z < patch
    ((1, 21, 23, 19, 1), (8, 9, 10), 0.25, "constant", 0.125, 4),
    ((3, 9, 40, 33, 2), (12, 13, 7), 0.6, "gaussian", 0.3, 5),  # X < patch
    ((1, 16, 17, 15, 1), (16, 17, 15), 0.5, "gaussian", 0.125, 2),  # one window
    ((2, 31, 27, 2), (10, 9), 0.5, "gaussian", 0.125, 4),  # 2D
])
def test_equals_monai(shape, patch, overlap, blend, sigma, batch):
  volume = np.random.default_rng(sum(shape)).normal(size=shape).astype(
      np.float32)
  options = dict(overlap=overlap, blend=blend, sigma_scale=sigma,
                 batch_size=batch)
  ours = np.asarray(topojax.sliding_window(_predict, volume, patch_size=patch,
                                           **options))
  reference = _monai(volume, patch, **options)
  assert ours.shape == reference.shape == shape[:-1] + (2,)
  np.testing.assert_allclose(ours, reference, rtol=0,
                             atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("image, patch, overlap", [
    ((37, 29, 16), (16, 12, 16), 0.5), ((100,), (32,), 0.25),
    ((33, 7), (8, 7), 0.9), ((50,), (7,), 0.0)])
def test_window_starts_match_monai(image, patch, overlap):
  from monai.data import utils as monai_data
  from monai.inferers import utils as monai_inferers
  interval = monai_inferers._get_scan_interval(  # pylint: disable=protected-access
      image, patch, len(image), (overlap,) * len(image))
  slices = monai_data.dense_patch_slices(image, patch, interval)
  expected = np.array([[s.start for s in window] for window in slices])
  np.testing.assert_array_equal(
      sw.window_starts(image, patch, (overlap,) * len(image)), expected)


@pytest.mark.parametrize("patch", [(16, 12, 16), (5, 8)])
@pytest.mark.parametrize("blend", sw.BLENDS)
def test_importance_map_matches_monai(patch, blend):
  from monai.data import utils as monai_data
  expected = monai_data.compute_importance_map(
      patch, mode=blend, sigma_scale=0.125).numpy()
  np.testing.assert_allclose(sw.importance_map(patch, blend=blend), expected,
                             rtol=1e-6)


def test_fn_sees_one_shape_and_compiles_once():
  shapes = set()

  def fn(windows):
    shapes.add(windows.shape)
    return windows * 2.0

  fn = jax.jit(fn)
  volume = np.ones((2, 20, 18, 9, 1), np.float32)
  out = topojax.sliding_window(fn, volume, patch_size=(8, 8, 8), batch_size=3)
  # A constant prediction blends to itself, whatever the weights.
  np.testing.assert_allclose(np.asarray(out), 2.0, rtol=1e-6)
  assert shapes == {(3, 8, 8, 8, 1)}


def test_bfloat16_predictions_are_blended_in_float32():
  volume = np.random.default_rng(0).normal(size=(1, 12, 12, 12, 1))
  out = topojax.sliding_window(lambda w: (w * 0.5).astype(jnp.bfloat16),
                               volume.astype(np.float32), patch_size=(8,) * 3)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), volume * 0.5, rtol=1e-2,
                             atol=1e-2)


@pytest.mark.parametrize("options, message", [
    (dict(patch_size=(8, 8)), "volume must be"),
    (dict(patch_size=(8, 0, 8)), "patch_size"),
    (dict(patch_size=8), "patch_size"),
    (dict(patch_size=(8, 8, 8.0)), "patch_size"),
    (dict(patch_size=(8,) * 3, overlap=1.0), "overlap"),
    (dict(patch_size=(8,) * 3, overlap=-0.1), "overlap"),
    (dict(patch_size=(8,) * 3, blend="mean"), "blend"),
    (dict(patch_size=(8,) * 3, sigma_scale=0.0), "sigma_scale"),
    (dict(patch_size=(8,) * 3, batch_size=0), "batch_size"),
])
def test_bad_arguments_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    topojax.sliding_window(lambda w: w, np.zeros((1, 10, 10, 10, 1)),
                           **options)


def test_fn_with_the_wrong_output_shape_is_named():
  with pytest.raises(ValueError, match="fn must map windows"):
    topojax.sliding_window(lambda w: w[:, ::2], np.zeros((1, 10, 10, 10, 1)),
                           patch_size=(8,) * 3)
