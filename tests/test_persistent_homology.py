"""Tests for topojax/losses/persistent_homology.py: diagrams, parity, gradients."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topojax.losses import persistent_homology as ph

torch = pytest.importorskip("torch", reason="the parity tests need PyTorch")
import loss_inputs  # noqa: E402  (tests/ is on sys.path under pytest)
import torch_reference  # noqa: E402

CASES = {
    # name: (channels-last shape, loss keyword arguments)
    "2d_1ch": ((2, 14, 13, 1), {}),
    "2d_3ch": ((1, 11, 12, 3), {}),
    "3d_1ch": ((2, 9, 8, 10, 1), {}),
    "3d_2ch": ((1, 8, 9, 7, 2), {}),
    "3d_3ch_from0": ((1, 7, 8, 6, 3), dict(start_channel=0)),
}


def _case(shape, seed):
  """Tie-free probabilities and a label with a few components and holes."""
  rng = np.random.default_rng(seed)
  pred = rng.random(shape)
  target = (rng.random(shape) < 0.4).astype(np.float64)
  return pred, target


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_reference_float64(name, backend):
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name))
  start = kwargs.get("start_channel", 0 if shape[-1] == 1 else 1)
  expected, expected_grad = torch_reference.value_and_grad(
      torch_reference.hutopo_loss, pred, target, start_channel=start)
  device = jax.devices(backend)[0]
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(functools.partial(
        ph.hutopo_loss, **kwargs))(jax.device_put(pred, device),
                                   jax.device_put(target, device))
    assert value.dtype == jnp.float64
  np.testing.assert_allclose(float(value), expected, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-12 * np.abs(expected_grad).max())
  assert np.count_nonzero(expected_grad) > 0


@pytest.mark.parametrize("name", ["2d_1ch", "3d_1ch", "3d_2ch"])
def test_matches_topolosses_float32(name):
  hutopo_class = torch_reference.topolosses_class("HutopoLoss")
  if hutopo_class is None:
    pytest.skip("topolosses is not installed (pip install -e '.[test]')")
  shape, kwargs = CASES[name]
  pred, target = _case(shape, seed=len(name))
  pred, target = pred.astype(np.float32), target.astype(np.float32)
  peer = hutopo_class(use_base_loss=False, alpha=1.0)
  with (pytest.warns(UserWarning) if shape[-1] == 1
        else contextlib.nullcontext()):
    expected, expected_grad = torch_reference.value_and_grad(
        peer, pred, target, dtype=torch.float32)
  value, grad = jax.value_and_grad(functools.partial(
      ph.hutopo_loss, **kwargs))(pred, target)
  # Both gather the same float32 values and match them alike; only the
  # order of the float32 sum over a few hundred pairs differs.
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-5 * np.abs(expected_grad).max())


@pytest.mark.parametrize("shape", [(9, 12), (7, 8, 9)])
def test_diagrams_equal_those_of_the_betti_matching_code(shape):
  # topolosses computes its diagrams with the C++ of Stucki et al.; cripser
  # must give the same finite pairs, at voxels holding those values.
  if torch_reference.topolosses_class("HutopoLoss") is None:
    pytest.skip("topolosses is not installed (pip install -e '.[test]')")
  from topolosses.losses.betti_matching.src import betti_matching

  f = np.random.default_rng(7).random(shape)
  barcode = betti_matching.compute_barcode([f])[0]
  ours = ph._persistence_pairs(f)
  assert len(ours) == len(shape)
  for dim, (values, voxels) in enumerate(ours):
    theirs = sorted(
        (f[tuple(b)], f[tuple(d)]) for b, d in
        zip(barcode.birth_coordinates[dim], barcode.death_coordinates[dim]))
    assert sorted(map(tuple, values)) == theirs
    np.testing.assert_array_equal(f.ravel()[voxels], values)


def _ring(shape=(1, 16, 16, 8, 1), value=1.0):
  """A torus-like ring in the axial planes: one component, one tunnel."""
  x, y = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
  radius = np.hypot(x - 7.5, y - 7.5)
  ring = np.zeros(shape, np.float32)
  ring[0, (radius > 3.5) & (radius < 6), 3:5, 0] = value
  return ring


def test_identical_masks_give_zero():
  ring = _ring()
  assert float(ph.hutopo_loss(ring, ring)) == 0


def test_gradient_closes_a_broken_ring():
  label = _ring()
  pred = 0.9 * label
  gap = (0, slice(6, 10), slice(0, 5), slice(3, 5), 0)
  pred[gap] = 0.3  # The ring is broken: its tunnel dies early.
  pred += np.random.default_rng(0).uniform(0, 1e-3, pred.shape).astype(
      np.float32)  # No ties.
  value, grad = jax.value_and_grad(ph.hutopo_loss)(pred, label)
  grad = np.asarray(grad)
  # The tunnel is born when the gap fills, at f = 1 - 0.3, instead of at 0:
  # a matched pair off by 0.7, costing 0.49.
  assert float(value) > 0.45
  # Descending the loss raises the gap voxel that closes the ring, by far
  # the steepest; the noise's tiny features pull almost nothing.
  in_gap = np.zeros(grad.shape, bool)
  in_gap[gap] = True
  assert grad[in_gap].min() < -1
  assert np.abs(grad[~in_gap]).max() < 0.05


def test_jit_vmap_jvp_and_bfloat16():
  pred, target = _case((2, 8, 9, 7, 1), seed=3)
  pred = pred.astype(np.float32)
  value = ph.hutopo_loss(pred, target)
  np.testing.assert_allclose(jax.jit(ph.hutopo_loss)(pred, target), value,
                             rtol=1e-6)
  per_sample = jax.vmap(lambda p, t: ph.hutopo_loss(p[None], t[None]))(
      pred, target)
  np.testing.assert_allclose(per_sample.mean(), value, rtol=1e-6)
  tangent = np.ones_like(pred)
  primal, directional = jax.jvp(lambda p: ph.hutopo_loss(p, target), (pred,),
                                (tangent,))
  np.testing.assert_allclose(primal, value, rtol=1e-6)
  np.testing.assert_allclose(
      directional, np.sum(jax.grad(ph.hutopo_loss)(pred, target)), rtol=1e-4)
  assert ph.hutopo_loss(jnp.asarray(pred, jnp.bfloat16),
                        target).dtype == jnp.float32


def test_nan_gives_nan():
  pred, target = _case((1, 6, 7, 1), seed=4)
  pred[0, 2, 3, 0] = np.nan
  assert np.isnan(float(ph.hutopo_loss(pred, target)))


@pytest.mark.parametrize("shape", [(3, 9, 8, 10, 2), (4, 14, 13, 1)])
def test_parallel_workers_give_the_serial_answer_exactly(shape):
  pred, target = _case(shape, seed=11)
  pred = pred.astype(np.float32)
  results = {
      workers: jax.value_and_grad(functools.partial(
          ph.hutopo_loss, start_channel=0, num_workers=workers))(pred, target)
      for workers in (1, 2, 3, 16, None)}
  value, grad = results[1]
  assert np.count_nonzero(np.asarray(grad)) > 0
  for workers, (other_value, other_grad) in results.items():
    assert float(other_value) == float(value), workers
    np.testing.assert_array_equal(np.asarray(other_grad), np.asarray(grad),
                                  err_msg=f"num_workers={workers}")


def test_parallel_host_tables_equal_the_serial_ones():
  pred, target = _case((2, 3, 7, 8, 6), seed=12)
  f_pred, f_target = 1 - pred, 1 - target
  serial = ph._host_matchings(f_pred, f_target, spatial_rank=3,
                              num_workers=1)
  parallel = ph._host_matchings(f_pred, f_target, spatial_rank=3,
                                num_workers=4)
  for ours, theirs in zip(parallel, serial):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_a_failing_item_raises_with_workers(monkeypatch):
  pred, target = _case((3, 6, 7, 1), seed=13)

  def refuse(*args):
    raise RuntimeError("hutopo_loss: too many pairs")

  monkeypatch.setattr(ph, "_matching_table", refuse)
  with pytest.raises(RuntimeError, match="too many pairs"):
    ph._host_matchings(1 - pred[..., 0], 1 - target[..., 0], spatial_rank=2,
                       num_workers=2)


BAD_INPUTS = {
    "rank 3": (dict(pred=(4, 16, 1)), "rank 3"),
    "shape mismatch": (dict(target=(1, 8, 8, 7, 1)), "same shape"),
    "integer pred": (dict(pred_dtype=np.int32), "pred must be a floating"),
    "empty batch": (dict(pred=(0, 8, 8, 8, 1)), "at least one sample"),
    "start_channel too large": (dict(start_channel=2), "start_channel"),
    "zero workers": (dict(num_workers=0), "num_workers"),
    "negative workers": (dict(num_workers=-2), "num_workers"),
    "fractional workers": (dict(num_workers=2.5), "num_workers"),
    "bool workers": (dict(num_workers=True), "num_workers"),
    "string workers": (dict(num_workers="2"), "num_workers"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_tracing(name):
  spec, message = BAD_INPUTS[name]
  loss_inputs.assert_refused_before_tracing(ph.hutopo_loss, ph._hutopo_loss, spec,
                                            message)
