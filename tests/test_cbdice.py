"""Tests for topojax/losses/cbdice.py: parity with the authors' code, in
PyTorch (tests/torch_reference.py), and the family's conventions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import topojax
from topojax.losses import cbdice

torch = pytest.importorskip("torch", reason="the parity tests need PyTorch")
pytest.importorskip("monai", reason="the reference uses MONAI's transform")
import loss_inputs  # noqa: E402  (tests/ is on sys.path under pytest)
import torch_reference  # noqa: E402

CASES = {
    # name: (channels-last shape, loss keyword arguments)
    "2d_1ch": ((2, 23, 19, 1), {}),
    "2d_3ch": ((2, 17, 21, 3), {}),
    "2d_3ch_from0": ((1, 18, 15, 3), dict(start_channel=0)),
    "2d_2_iterations": ((1, 16, 15, 1), dict(iterations=2)),
    "3d_1ch": ((2, 13, 11, 12, 1), {}),
    "3d_2ch": ((1, 12, 14, 10, 2), {}),
    "3d_3ch_from2": ((1, 9, 10, 11, 3), dict(start_channel=2)),
    "3d_0_iterations_smooth": ((1, 14, 12, 13, 1),
                               dict(iterations=0, smooth=1e-3)),
}


def _case(shape, seed):
  """Smooth blobs as the label and a sigmoid of a perturbed copy of their
  field as the prediction: tubes and lumps a few voxels thick, so that the
  radii, the skeletons and both sides of the radius choice all vary."""
  rng = np.random.default_rng(seed)
  sigma = (0, *[1.5] * (len(shape) - 2), 0)
  field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  target = (field > 0.1).astype(np.float64)
  pred = 1 / (1 + np.exp(-(40 * field + 10 * noise)))
  return pred, target


def _start(shape, kwargs):
  return kwargs.get("start_channel", 0 if shape[-1] == 1 else 1)


def _reference(pred, target, shape, kwargs, skeleton=None):
  return torch_reference.value_and_grad(
      torch_reference.cbdice_loss, pred, target,
      **{**kwargs, "start_channel": _start(shape, kwargs)},
      **({} if skeleton is None else {"skeleton": torch.tensor(
          np.moveaxis(skeleton, -1, 1), dtype=torch.float64)}))


def _thinned(target):
  """topojax's skeleton of every sample and channel of a label."""
  skeleton = np.zeros(target.shape, bool)
  for n in range(target.shape[0]):
    for c in range(target.shape[-1]):
      skeleton[n, ..., c] = topojax.skeletonize(target[n, ..., c] > 0.5)
  return skeleton


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_reference_float64(name, backend):
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name))
  expected, expected_grad = _reference(pred, target, shape, kwargs)
  device = jax.devices(backend)[0]
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(functools.partial(
        cbdice.cbdice_loss, **kwargs))(jax.device_put(pred, device),
                                       jax.device_put(target, device))
    assert value.dtype == jnp.float64
  np.testing.assert_allclose(float(value), expected, rtol=0, atol=1e-10)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-10)
  assert np.abs(expected_grad).max() > 1e-4
  assert 0.02 < expected < 0.98  # Neither side trivial.


@pytest.mark.parametrize("name", ["2d_1ch", "2d_3ch", "3d_1ch", "3d_2ch"])
def test_float32_is_within_1e_5_of_the_float64_reference(name):
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name))
  expected, expected_grad = _reference(pred, target, shape, kwargs)
  value, grad = jax.value_and_grad(functools.partial(
      cbdice.cbdice_loss, **kwargs))(pred.astype(np.float32),
                                     target.astype(np.float32))
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-5 * np.abs(expected_grad).max())


@pytest.mark.parametrize("name", ["2d_1ch", "2d_3ch", "3d_1ch", "3d_2ch"])
def test_precomputed_label_skeleton_matches_torch_reference(name):
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name) + 1)
  skeleton = _thinned(target)
  expected, expected_grad = _reference(pred, target, shape, kwargs, skeleton)
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(functools.partial(
        cbdice.cbdice_loss, skeleton=skeleton, **kwargs))(pred, target)
  np.testing.assert_allclose(float(value), expected, rtol=0, atol=1e-10)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-10)
  # The thinned skeleton is another skeleton than the soft one.
  with jax.enable_x64(True):
    assert abs(float(cbdice.cbdice_loss(pred, target, **kwargs))
               - expected) > 1e-6


@pytest.mark.parametrize("shape", [(3, 20, 17, 15, 2), (2, 9, 30, 1)])
def test_host_distances_on_bounding_boxes_equal_whole_volume_ones(shape):
  rng = np.random.default_rng(1)
  sigma = (0, *[2] * (len(shape) - 2), 0)
  masks = ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > 0.6
  masks[0, ..., 0] = False  # Nothing.
  masks[-1, :3, :4, ..., -1] = True  # Touching the volume's border.
  masks[-1, 5, 6, ..., 0] = True
  expected = np.zeros(shape)
  for n in range(shape[0]):
    for c in range(shape[-1]):
      expected[n, ..., c] = ndimage.distance_transform_edt(masks[n, ..., c])
  distances = cbdice._host_distances(masks, spatial_ndim=len(shape) - 2,
                                     dtype=np.float64)
  np.testing.assert_array_equal(distances, expected)
  assert expected.max() > 2


def test_one_sample_one_channel_is_one_plus_the_authors_value():
  pred, target = _case((1, 20, 18, 16, 1), seed=3)
  authors = torch_reference.authors_cbdice(
      torch.tensor(pred[..., 0]), torch.tensor(target[..., 0]))
  with jax.enable_x64(True):
    value = cbdice.cbdice_loss(pred, target)
  np.testing.assert_allclose(float(value), 1 + float(authors), atol=1e-12)


def test_identical_masks_give_zero_and_a_missed_thin_tube_weighs_more():
  # A thick and a thin tube of one length. The inverse radius weight is 1
  # on the thinnest skeleton voxels and less on thicker ones, so missing the
  # thin tube costs more than missing the thick one, though it holds a third
  # of the voxels.
  label = np.zeros((1, 40, 30, 1))
  label[0, 4:36, 4:13] = 1  # 9 wide.
  label[0, 4:36, 20:23] = 1  # 3 wide.
  assert float(cbdice.cbdice_loss(label, label)) == pytest.approx(0, abs=1e-6)
  no_thin, no_thick = label.copy(), label.copy()
  no_thin[0, :, 20:23] = 0
  no_thick[0, :, 4:13] = 0
  thin_loss = float(cbdice.cbdice_loss(no_thin, label))
  thick_loss = float(cbdice.cbdice_loss(no_thick, label))
  assert thin_loss > 2 * thick_loss > 0.1


def test_jit_vmap_grad_jvp_and_bfloat16():
  pred, target = _case((2, 10, 11, 12, 1), seed=5)
  pred = pred.astype(np.float32)
  value = cbdice.cbdice_loss(pred, target)
  np.testing.assert_allclose(jax.jit(cbdice.cbdice_loss)(pred, target),
                             value, rtol=1e-6)
  per_sample = jax.vmap(lambda p, t: cbdice.cbdice_loss(p[None], t[None]))(
      pred, target)
  np.testing.assert_allclose(per_sample.mean(), value, rtol=1e-6)
  grad = jax.grad(cbdice.cbdice_loss)(pred, target)
  assert grad.shape == pred.shape and np.isfinite(grad).all()
  # Forward mode too: no gradient goes through the skeletons.
  tangent = np.random.default_rng(0).standard_normal(pred.shape)
  _, derivative = jax.jvp(lambda p: cbdice.cbdice_loss(p, target), (pred,),
                          (tangent.astype(np.float32),))
  np.testing.assert_allclose(derivative, np.sum(grad * tangent), rtol=1e-4)
  half = cbdice.cbdice_loss(jnp.asarray(pred, jnp.bfloat16), target)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, value, rtol=5e-2)


def test_nan_in_pred_gives_nan():
  pred, target = _case((1, 9, 10, 11, 1), seed=7)
  pred[0, 0, 0, 0, 0] = np.nan
  assert np.isnan(float(cbdice.cbdice_loss(pred, target)))


def test_empty_label_gives_a_finite_loss():
  pred, _ = _case((2, 12, 12, 12, 1), seed=8)
  empty = np.zeros(pred.shape)
  value = float(cbdice.cbdice_loss(pred, empty))
  assert np.isfinite(value) and 0 < value <= 1
  assert float(cbdice.cbdice_loss(np.zeros(pred.shape), empty)) == 0
  assert np.isfinite(jax.grad(cbdice.cbdice_loss)(pred, empty)).all()


BAD_INPUTS = {**loss_inputs.BAD_INPUTS, **loss_inputs.BAD_ITERATIONS,
              **loss_inputs.BAD_SKELETONS}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_tracing(name):
  spec, message = BAD_INPUTS[name]
  loss_inputs.assert_refused_before_tracing(
      cbdice.cbdice_loss, cbdice._cbdice_loss, spec, message)
