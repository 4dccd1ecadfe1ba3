"""Tests for topojax/losses/cldice.py: parity with PyTorch and topolosses."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topojax.losses import cldice

torch = pytest.importorskip("torch", reason="the parity tests need PyTorch")
import loss_inputs  # noqa: E402  (tests/ is on sys.path under pytest)
import torch_reference  # noqa: E402

CASES = {
    # name: (channels-last shape, loss keyword arguments)
    "2d_1ch": ((2, 23, 19, 1), {}),
    "2d_3ch": ((2, 17, 21, 3), {}),
    "2d_1_iteration": ((1, 16, 15, 1), dict(iterations=1)),
    "3d_1ch": ((2, 13, 11, 12, 1), {}),
    "3d_2ch": ((1, 12, 14, 10, 2), {}),
    "3d_3ch_from0": ((1, 9, 10, 11, 3), dict(start_channel=0)),
    "3d_0_iterations": ((1, 10, 9, 8, 1), dict(iterations=0)),
    "3d_5_iterations_smooth": ((1, 14, 12, 13, 1),
                               dict(iterations=5, smooth=1.0)),
}


def _case(shape, seed):
  """Tie-free probabilities and a binary label with some structure."""
  rng = np.random.default_rng(seed)
  pred = rng.random(shape)
  target = (rng.random(shape) < 0.4).astype(np.float64)
  return pred, target


def _default_start(shape, kwargs):
  return kwargs.get("start_channel", 0 if shape[-1] == 1 else 1)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_reference_float64(name, backend):
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name))
  expected, expected_grad = torch_reference.value_and_grad(
      torch_reference.cldice_loss, pred, target,
      **{**kwargs, "start_channel": _default_start(shape, kwargs)})
  device = jax.devices(backend)[0]
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(functools.partial(
        cldice.cldice_loss, **kwargs))(jax.device_put(pred, device),
                                       jax.device_put(target, device))
    assert value.dtype == jnp.float64
  # Same operations in the same order on doubles: only summation order
  # differs, a few ulps of the sums.
  np.testing.assert_allclose(float(value), expected, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-12 * np.abs(expected_grad).max())
  assert np.abs(expected_grad).max() > 0


@pytest.mark.parametrize("name", ["2d_1ch", "2d_3ch", "2d_1_iteration"])
def test_matches_topolosses_float32(name):
  cldice_class = torch_reference.topolosses_class("CLDiceLoss")
  if cldice_class is None:
    pytest.skip("topolosses is not installed (pip install -e '.[test]')")
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name))
  pred, target = pred.astype(np.float32), target.astype(np.float32)
  peer = cldice_class(iter_=kwargs.get("iterations", 3),
                      use_base_loss=False, alpha=1.0)
  with (pytest.warns(UserWarning) if shape[-1] == 1
        else contextlib.nullcontext()):
    expected, expected_grad = torch_reference.value_and_grad(
        peer, pred, target, dtype=torch.float32)
  value, grad = jax.value_and_grad(functools.partial(
      cldice.cldice_loss, **kwargs))(pred, target)
  # float32 on both sides; the sums of a few hundred terms differ in order.
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-5 * np.abs(expected_grad).max())


# Predictions full of ties, where which voxel takes a pool's gradient is
# decided by the first-extremum rule and a tie in the erosion's minimum
# halves the gradient: binary, saturated (clipped) and few-level ones.
TIED = {
    "binary": lambda p: (p < 0.5).astype(np.float64),
    "saturated": lambda p: np.clip(3 * p - 1, 0, 1),
    "four_levels": lambda p: np.round(3 * p) / 3,
}
TIED_CASES = [(name, kind) for name in ("2d_1ch", "2d_3ch", "3d_1ch",
                                        "3d_2ch", "3d_0_iterations")
              for kind in TIED]


def _tied_case(name, kind):
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name) + len(kind))
  return shape, kwargs, TIED[kind](pred), target


@pytest.mark.parametrize("name,kind", TIED_CASES)
def test_tied_predictions_match_torch_reference_float64(name, kind):
  shape, kwargs, pred, target = _tied_case(name, kind)
  expected, expected_grad = torch_reference.value_and_grad(
      torch_reference.cldice_loss, pred, target,
      **{**kwargs, "start_channel": _default_start(shape, kwargs)})
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(functools.partial(
        cldice.cldice_loss, **kwargs))(pred, target)
  np.testing.assert_allclose(float(value), expected, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-12 * np.abs(expected_grad).max())
  assert np.abs(expected_grad).max() > 0


@pytest.mark.parametrize("kind", list(TIED))
def test_tied_predictions_match_topolosses_float32(kind):
  cldice_class = torch_reference.topolosses_class("CLDiceLoss")
  if cldice_class is None:
    pytest.skip("topolosses is not installed (pip install -e '.[test]')")
  _, _, pred, target = _tied_case("2d_3ch", kind)
  pred, target = pred.astype(np.float32), target.astype(np.float32)
  peer = cldice_class(iter_=3, use_base_loss=False, alpha=1.0)
  expected, expected_grad = torch_reference.value_and_grad(
      peer, pred, target, dtype=torch.float32)
  value, grad = jax.value_and_grad(cldice.cldice_loss)(pred, target)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-5 * np.abs(expected_grad).max())


@pytest.mark.parametrize("name,kind", [(name, kind) for name in CASES
                                       for kind in (None, *TIED)])
def test_fast_path_matches_reference_path(name, kind):
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name))
  if kind is not None:
    pred = TIED[kind](pred)
  settings = dict(iterations=kwargs.get("iterations", 3),
                  smooth=kwargs.get("smooth", 1e-5),
                  start_channel=_default_start(shape, kwargs))
  with jax.enable_x64(True):
    # Same maxima and minima: the skeletons agree bit for bit.
    np.testing.assert_array_equal(
        cldice._soft_skeleton(jnp.asarray(pred), settings["iterations"]),
        cldice._reference_soft_skeleton(jnp.asarray(pred),
                                        settings["iterations"]))
    value, grad = jax.value_and_grad(functools.partial(
        cldice._cldice_loss, **settings))(pred, target)
    expected, expected_grad = jax.value_and_grad(functools.partial(
        cldice._reference_loss, **settings))(pred, target)
  np.testing.assert_allclose(float(value), float(expected), rtol=1e-14)
  # The gradients go to the same voxels with the same weights; only the
  # order in which contributions are summed differs.
  np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad),
                             rtol=0,
                             atol=1e-13 * np.abs(expected_grad).max())


@pytest.mark.parametrize("shape", [(1, 1, 5, 2, 1), (2, 2, 1, 3, 2),
                                   (1, 1, 1, 1, 1), (1, 2, 1, 1),
                                   (1, 1, 7, 2)])
def test_fast_path_matches_reference_path_on_thin_volumes(shape):
  # Axes of one or two voxels: every window is clipped by the border.
  pred, target = _case(shape, seed=sum(shape))
  pred = np.round(3 * pred) / 3  # Ties too.
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(functools.partial(
        cldice._cldice_loss, iterations=3, smooth=1e-5, start_channel=0))(
            pred, target)
    expected, expected_grad = jax.value_and_grad(functools.partial(
        cldice._reference_loss, iterations=3, smooth=1e-5,
        start_channel=0))(pred, target)
  np.testing.assert_allclose(float(value), float(expected), rtol=1e-14)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad),
                             rtol=0, atol=1e-13)


def test_pools_keep_borders_and_route_to_the_first_extremum():
  # A constant volume ties every window: all of a dilation's gradient goes
  # to the first voxel of each window in row-major order, and the erosion
  # halves its gradient between tied axes.
  x = jnp.ones((1, 4, 5, 3, 1))
  for pool, reference in ((cldice._dilate, cldice._soft_dilate),
                          (cldice._erode, cldice._soft_erode)):
    cotangent = jnp.asarray(
        np.random.default_rng(0).random(x.shape), jnp.float32)
    np.testing.assert_array_equal(pool(x), reference(x))
    np.testing.assert_allclose(
        jax.vjp(pool, x)[1](cotangent)[0],
        jax.vjp(reference, x)[1](cotangent)[0], rtol=1e-6)


def test_skeleton_of_a_one_voxel_line_is_the_line():
  # Erosion removes a 1-voxel-wide line, so the opening is empty and the
  # first residue is the line itself.
  line = np.zeros((1, 12, 12, 9, 1), np.float32)
  line[0, 2:10, 5, 4, 0] = 1
  np.testing.assert_array_equal(cldice.soft_skeleton(line), line)


@pytest.mark.parametrize("shape", [(1, 24, 24, 1), (1, 20, 20, 20, 1)])
def test_skeleton_of_a_thick_bar_is_thin_and_inside(shape):
  bar = np.zeros(shape, np.float32)
  bar[0, 3:21, 8:13, ...] = 1  # 5 voxels thick across Y.
  skeleton = np.asarray(cldice.soft_skeleton(bar, iterations=3))
  assert np.all(skeleton <= bar)
  assert 0 < skeleton.sum() < 0.5 * bar.sum()
  # Across the bar's thickness, only the middle layer survives.
  across = skeleton[0, 12, :, ...].reshape(shape[2], -1).max(axis=1)
  np.testing.assert_array_equal(np.nonzero(across)[0], [10])


def test_skeleton_keeps_dtype_and_stays_in_unit_interval():
  x = np.random.default_rng(3).random((2, 11, 12, 10, 2)).astype(np.float32)
  skeleton = cldice.soft_skeleton(jnp.asarray(x, jnp.bfloat16))
  assert skeleton.dtype == jnp.bfloat16
  skeleton = np.asarray(cldice.soft_skeleton(x, iterations=6))
  assert skeleton.min() >= 0 and skeleton.max() <= 1


def test_identical_masks_give_zero_and_a_gap_does_not():
  tube = np.zeros((1, 16, 16, 16, 1), np.float32)
  tube[0, 2:14, 7:9, 7:9, 0] = 1
  assert float(cldice.cldice_loss(tube, tube)) == 0
  broken = tube.copy()
  broken[0, 7:9] = 0
  assert float(cldice.cldice_loss(broken, tube)) > 0.05


def test_jit_vmap_grad_and_bfloat16():
  pred, target = _case((2, 10, 11, 12, 1), seed=5)
  pred = pred.astype(np.float32)
  value = cldice.cldice_loss(pred, target)
  np.testing.assert_allclose(jax.jit(cldice.cldice_loss)(pred, target), value,
                             rtol=1e-6)
  per_sample = jax.vmap(lambda p, t: cldice.cldice_loss(p[None], t[None]))(
      pred, target)
  np.testing.assert_allclose(per_sample.mean(), value, rtol=1e-6)
  half = cldice.cldice_loss(jnp.asarray(pred, jnp.bfloat16), target)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, value, rtol=2e-2)
  grad = jax.grad(cldice.cldice_loss)(pred, target)
  assert grad.shape == pred.shape and np.isfinite(grad).all()


def test_nested_lists_are_arrays():
  pred, target = _case((1, 7, 8, 1), seed=6)
  np.testing.assert_allclose(
      cldice.cldice_loss(pred.tolist(), target.tolist()),
      cldice.cldice_loss(pred.astype(np.float32), target), rtol=1e-6)


BAD_INPUTS = {**loss_inputs.BAD_INPUTS, **loss_inputs.BAD_ITERATIONS}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_tracing(name):
  spec, message = BAD_INPUTS[name]
  loss_inputs.assert_refused_before_tracing(cldice.cldice_loss, cldice._cldice_loss, spec,
                                            message)


def test_soft_skeleton_bad_input():
  with pytest.raises(ValueError, match="x must be a floating"):
    cldice.soft_skeleton(np.zeros((1, 5, 5, 1), np.int32))
  with pytest.raises(ValueError, match="iterations"):
    cldice.soft_skeleton(np.zeros((1, 5, 5, 1)), iterations=-2)
