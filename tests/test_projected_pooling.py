"""Tests for topojax/losses/projected_pooling.py: parity with PyTorch and the
published values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from topojax.losses import projected_pooling as losses

torch = pytest.importorskip("torch", reason="the parity tests need PyTorch")
import loss_inputs  # noqa: E402  (tests/ is on sys.path under pytest)
import torch_reference  # noqa: E402

F32_EPS = float(np.finfo(np.float32).eps)


def _torch_device(backend):
  if backend == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


def _torch_loss_and_grad(pred, target, device="cpu", **kwargs):
  """Reference loss and gradient, float64, channels-last in and out."""
  p = torch.tensor(np.moveaxis(pred, -1, 1), dtype=torch.float64,
                   device=device, requires_grad=True)
  t = torch.tensor(np.moveaxis(target, -1, 1), dtype=torch.float64,
                   device=device)
  value = torch_reference.projected_pooling_loss(p, t, **kwargs)
  value.backward()
  return value.item(), np.moveaxis(p.grad.cpu().numpy(), 1, -1)


def _jax_loss_and_grad(pred, target, backend, **kwargs):
  device = jax.devices(backend)[0]
  pred, target = jax.device_put(pred, device), jax.device_put(target, device)
  value, grad = jax.value_and_grad(
      functools.partial(losses.projected_pooling_loss, **kwargs))(pred, target)
  assert grad.devices() == {device}
  return float(value), np.asarray(grad)


def _plane_sum_scale(pred, target, kernel_sizes, strides=None):
  """Total of the pooled-plane sums that the loss differences cancel.

  A float32 sum of ``M`` terms carries a rounding error of at most about
  ``M·eps`` times the sum's magnitude (much less with pairwise summation), and
  the loss subtracts two such sums; the float32 tolerance below is therefore
  relative to this scale, not to the (possibly tiny) loss.
  """
  kwargs = dict(kernel_sizes=kernel_sizes, strides=strides, start_channel=0)
  # |a| + |b| bounds |a - b|; the loss of pred against zeros is its plane sum.
  zeros = np.zeros_like(pred)
  return float(losses.projected_pooling_loss(pred, zeros, **kwargs)
               + losses.projected_pooling_loss(target, zeros, **kwargs))


def _random_case(shape, *, seed, ties=False, dtype=np.float64):
  rng = np.random.default_rng(seed)
  if ties:
    # Few distinct levels: tied maxima in most windows, as with saturated
    # predictions, where the gradient depends on tie-breaking.
    pred = rng.choice([0.0, 0.5, 1.0], size=shape, p=[0.7, 0.2, 0.1])
  else:
    pred = rng.random(shape)
  target = (rng.random(shape) < 0.3).astype(np.float64)
  return pred.astype(dtype), target.astype(dtype)


RANDOM_CASES = {
    # name: (channels-last shape, loss keyword arguments)
    "2d_batch3": ((3, 37, 41, 1), dict(kernel_sizes=(4, 5, 8, 10, 20))),
    "2d_3ch_odd": ((2, 23, 19, 3), dict(kernel_sizes=(2, 3, 7))),
    "3d_batch2_odd": ((2, 19, 23, 21, 1), dict(kernel_sizes=(4, 5, 8))),
    "3d_3ch": ((2, 13, 17, 15, 3), dict(kernel_sizes=(2, 3, 5))),
    "3d_3ch_from0": ((1, 13, 17, 15, 3),
                     dict(kernel_sizes=(3, 4), start_channel=0)),
    "3d_overlap": ((2, 21, 26, 30, 2),
                   dict(kernel_sizes=(4, 6, 5), strides=(2, 3, 1))),
    "3d_default_64x64x48": ((1, 64, 64, 48, 1), {}),
}


def _reference_kwargs(shape, kwargs):
  """Our keyword arguments spelled out for the reference (no None default)."""
  out = dict(kernel_sizes=kwargs.get("kernel_sizes",
                                     losses.DEFAULT_KERNEL_SIZES),
             strides=kwargs.get("strides"),
             start_channel=kwargs.get("start_channel",
                                      0 if shape[-1] == 1 else 1))
  return out


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("name", list(RANDOM_CASES))
def test_matches_torch_reference_float64(name, ties, backend):
  shape, kwargs = RANDOM_CASES[name]
  pred, target = _random_case(shape, seed=len(name), ties=ties)
  expected, expected_grad = _torch_loss_and_grad(
      pred, target, _torch_device(backend), **_reference_kwargs(shape, kwargs))
  with jax.enable_x64(True):
    value, grad = _jax_loss_and_grad(pred, target, backend, **kwargs)
  np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12)
  # Exact routing: every gradient entry is a sum of a few ±1/(N·C'·3·|K|).
  np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", list(RANDOM_CASES))
def test_float32_within_rounding_of_float64(name, backend):
  shape, kwargs = RANDOM_CASES[name]
  pred, target = _random_case(shape, seed=len(name), dtype=np.float32)
  expected, expected_grad = _torch_loss_and_grad(
      pred, target, _torch_device(backend), **_reference_kwargs(shape, kwargs))
  value, grad = _jax_loss_and_grad(pred, target, backend, **kwargs)
  # The plane sums hold at most a few thousand cells each; 64·eps of their
  # total is a generous bound on float32 summation error (see
  # _plane_sum_scale), yet a single misrouted or dropped cell (≥ 1e-3 of the
  # scale here) would exceed it by orders of magnitude.
  scale = _plane_sum_scale(pred, target, kwargs.get(
      "kernel_sizes", losses.DEFAULT_KERNEL_SIZES), kwargs.get("strides"))
  assert abs(value - expected) <= 64 * F32_EPS * scale
  # Gradient entries are counts times 1/(N·C'·3·|K|): float32 represents them
  # to within a few ulps.
  np.testing.assert_allclose(grad, expected_grad, rtol=0,
                             atol=8 * F32_EPS * np.abs(expected_grad).max())


def _fixture_kwargs(meta):
  kw = meta["kwargs"]
  out = dict(start_channel=kw["start_channel"])
  if "kernel_list" in kw:
    out["kernel_sizes"] = tuple(kw["kernel_list"])
  if "stride_list" in kw:
    out["strides"] = tuple(kw["stride_list"])
  return out


FIXTURE_CASES = ["ball3d", "ball2d", "ball3d_soft", "multiclass3d",
                 "overlap3d", "binary2d"]


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_matches_published_values_float64(case, reference_ppl, backend):
  ref = reference_ppl[case]
  pred = np.moveaxis(ref["pred"], 1, -1).astype(np.float64)
  target = np.moveaxis(ref["target"], 1, -1).astype(np.float64)
  with jax.enable_x64(True):
    value, grad = _jax_loss_and_grad(pred, target, backend,
                                     **_fixture_kwargs(ref["meta"]))
  np.testing.assert_allclose(value, float(ref["loss"]), rtol=1e-13)
  np.testing.assert_allclose(value, ref["meta"]["loss"], rtol=1e-13)
  # Binary balls: tied maxima everywhere, so this pins the tie-breaking too.
  np.testing.assert_allclose(grad, np.moveaxis(ref["grad"], 1, -1), rtol=0,
                             atol=1e-14)


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_matches_published_values_float32(case, reference_ppl, backend):
  ref = reference_ppl[case]
  pred = np.moveaxis(ref["pred"], 1, -1)
  target = np.moveaxis(ref["target"], 1, -1)
  kwargs = _fixture_kwargs(ref["meta"])
  value, grad = _jax_loss_and_grad(pred, target, backend, **kwargs)
  scale = _plane_sum_scale(pred, target, kwargs.get(
      "kernel_sizes", losses.DEFAULT_KERNEL_SIZES), kwargs.get("strides"))
  assert abs(value - float(ref["loss"])) <= 64 * F32_EPS * scale
  expected_grad = np.moveaxis(ref["grad"], 1, -1)
  np.testing.assert_allclose(grad, expected_grad, rtol=0,
                             atol=8 * F32_EPS * np.abs(expected_grad).max())


def test_published_ball_example_value(reference_ppl):
  # The design notes quote 24.33 for the authors' synthetic ball pair.
  ref = reference_ppl["ball3d"]
  value = losses.projected_pooling_loss(
      np.moveaxis(ref["pred"], 1, -1), np.moveaxis(ref["target"], 1, -1),
      start_channel=0)
  assert float(value) == pytest.approx(24.33, abs=5e-3)


# --- The fast path against the reduce_window formulation --------------------


def _reference_path_loss_and_grad(pred, target, backend, **kwargs):
  """Loss and gradient of ``losses._reference_loss``, the exact formulation."""
  kwargs = _reference_kwargs(np.shape(pred), kwargs)
  kwargs["strides"] = kwargs["strides"] or kwargs["kernel_sizes"]
  kwargs = {key: tuple(value) if isinstance(value, (list, tuple)) else value
            for key, value in kwargs.items()}
  device = jax.devices(backend)[0]
  pred, target = jax.device_put(pred, device), jax.device_put(target, device)
  value, grad = jax.value_and_grad(
      functools.partial(losses._reference_loss, **kwargs))(pred, target)
  return float(value), np.asarray(grad)


def _assert_same_routing(grad, expected):
  # Gradient entries are sums of a few ±1/(N·C'·3·|K|) terms; the two paths
  # may add them in another order, which moves the result by an ulp or two,
  # while a single misrouted window moves it by a whole term.
  np.testing.assert_allclose(grad, expected, rtol=0,
                             atol=4 * np.finfo(grad.dtype).eps
                             * max(np.abs(expected).max(), 1.0))


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("name", list(RANDOM_CASES))
def test_fast_path_matches_reference_path(name, ties, backend):
  shape, kwargs = RANDOM_CASES[name]
  pred, target = _random_case(shape, seed=len(name) + 1, ties=ties)
  with jax.enable_x64(True):
    value, grad = _jax_loss_and_grad(pred, target, backend, **kwargs)
    expected, expected_grad = _reference_path_loss_and_grad(
        pred, target, backend, **kwargs)
  np.testing.assert_allclose(value, expected, rtol=1e-13)
  _assert_same_routing(grad, expected_grad)


def test_project_matches_reduce_window_and_routes_to_first_maximum():
  pred, _ = _random_case((2, 9, 11, 7, 2), seed=11, ties=True)
  cotangents = _random_case((3, 2, 11, 11, 2), seed=12)[0]
  with jax.enable_x64(True):
    planes, vjp = jax.vjp(losses.project, pred)
    expected, expected_vjp = jax.vjp(losses._reference_planes, pred)
    expected = dict(zip(losses.PLANES, expected))
    for name in losses.PLANES:
      np.testing.assert_array_equal(planes[name], expected[name])
    plane_grads = {name: cotangents[i, :, :p.shape[1], :p.shape[2]]
                   for i, (name, p) in enumerate(expected.items())}
    grad, = vjp(plane_grads)
    expected_grad, = expected_vjp([plane_grads[name] for name in losses.PLANES])
  _assert_same_routing(np.asarray(grad), np.asarray(expected_grad))


# --- Precomputed target features -----------------------------------------------


FEATURE_CASES = {
    "3d": ((2, 19, 23, 21, 1), dict(kernel_sizes=(4, 5, 8))),
    "3d_3ch_overlap": ((2, 21, 26, 30, 3),
                       dict(kernel_sizes=(4, 6), strides=(2, 3))),
    "2d_from0": ((3, 37, 41, 2), dict(kernel_sizes=(4, 5), start_channel=0)),
}


@pytest.mark.parametrize("name, normalize", [
    ("3d", False), ("3d_3ch_overlap", True), ("2d_from0", False)])
def test_target_features_give_the_label_loss_and_gradient(name, normalize):
  shape, kwargs = FEATURE_CASES[name]
  pred, target = _random_case(shape, seed=13, ties=True)
  with jax.enable_x64(True):
    features = losses.pooled_target_features(target.astype(bool), **kwargs)
    loss = jax.jit(jax.value_and_grad(functools.partial(
        losses.projected_pooling_loss, normalize=normalize, **kwargs)))
    value, grad = loss(pred, target)
    value_from_features, grad_from_features = loss(pred, features)
  np.testing.assert_allclose(value_from_features, value, rtol=1e-13)
  _assert_same_routing(np.asarray(grad_from_features), np.asarray(grad))


def test_target_features_count_pooled_cells():
  # One foreground voxel lights one cell of every pooled plane.
  target = np.zeros((2, 20, 20, 20, 1), np.uint8)
  target[1, 3, 7, 11, 0] = 1
  features = losses.pooled_target_features(target, kernel_sizes=(4, 5))
  assert features.sums.shape == (2, 2, 3, 1)
  np.testing.assert_array_equal(features.sums[0], 0)
  np.testing.assert_array_equal(features.sums[1], 1)


def test_target_features_of_cases_concatenate_into_a_batch():
  _, target = _random_case((3, 12, 14, 10, 1), seed=14)
  kwargs = dict(kernel_sizes=(2, 3))
  per_case = [losses.pooled_target_features(t[None], **kwargs)
              for t in target]
  stacked = jax.tree.map(lambda *s: jnp.concatenate(s), *per_case)
  batch = losses.pooled_target_features(target, **kwargs)
  np.testing.assert_array_equal(stacked.sums, batch.sums)
  assert jax.tree.structure(stacked) == jax.tree.structure(batch)


FEATURE_MISMATCHES = {
    "kernel_sizes": (dict(kernel_sizes=(2, 4)), "kernel_sizes"),
    "strides": (dict(strides=(1, 3)), "strides"),
    "start_channel": (dict(start_channel=0), "start_channel"),
    "spatial shape": (dict(pred=(2, 12, 12, 10, 2)), "spatial_shape"),
    "channels": (dict(pred=(2, 12, 12, 12, 3)), "num_channels"),
    "batch": (dict(pred=(3, 12, 12, 12, 2)), r"shape \(N, K, P, C'\)"),
}


@pytest.mark.parametrize("name", list(FEATURE_MISMATCHES))
def test_target_features_made_for_another_call_raise(name):
  spec, message = FEATURE_MISMATCHES[name]
  spec = dict(spec)
  features = losses.pooled_target_features(
      np.zeros((2, 12, 12, 12, 2), np.float32), kernel_sizes=(2, 3))
  pred = np.zeros(spec.pop("pred", (2, 12, 12, 12, 2)), np.float32)
  kwargs = {"kernel_sizes": (2, 3), **spec}
  compiled_before = losses._projected_pooling_loss._cache_size()
  with pytest.raises(ValueError, match=message):
    losses.projected_pooling_loss(pred, features, **kwargs)
  with pytest.raises(ValueError, match=message):
    losses.topo_dice_loss(pred, pred, target_features=features, **kwargs)
  assert losses._projected_pooling_loss._cache_size() == compiled_before


def test_target_features_reject_bad_config():
  with pytest.raises(ValueError, match="target must be channels-last"):
    losses.pooled_target_features(np.zeros((4, 16, 1)))
  with pytest.raises(ValueError, match="kernel size 8"):
    losses.pooled_target_features(np.zeros((1, 30, 30, 6, 1)),
                                  kernel_sizes=(4, 8))


# --- Normalisation -------------------------------------------------------------


@pytest.mark.parametrize("name", ["2d_3ch_odd", "3d_overlap"])
def test_normalize_matches_torch_reference_divided_by_cells(name):
  shape, kwargs = RANDOM_CASES[name]
  pred, target = _random_case(shape, seed=15, ties=True)
  expected, expected_grad = _torch_loss_and_grad(
      pred, target, normalize=True, **_reference_kwargs(shape, kwargs))
  with jax.enable_x64(True):
    value, grad = _jax_loss_and_grad(pred, target, "cpu", normalize=True,
                                     **kwargs)
  np.testing.assert_allclose(value, expected, rtol=1e-12)
  np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-16)


def test_normalize_gives_the_fraction_of_pooled_cells():
  # All-ones against all-zeros lights every cell: with 20³ and kernels 4, 5
  # each plane has 5·5 = 25 and 4·4 = 16 cells, so the plain loss is their
  # mean and every normalised term is 1.
  pred = np.ones((2, 20, 20, 20, 1), np.float32)
  target = np.zeros_like(pred)
  loss = functools.partial(losses.projected_pooling_loss, kernel_sizes=(4, 5))
  assert float(loss(pred, target)) == (25 + 16) / 2
  assert float(loss(pred, target, normalize=True)) == 1.0


def test_topo_dice_loss_passes_normalize_and_features_through():
  rng = np.random.default_rng(16)
  logits = rng.normal(size=(2, 12, 14, 10, 1)).astype(np.float32)
  target = (rng.random(logits.shape) < 0.3).astype(np.float32)
  kwargs = dict(kernel_sizes=(2, 5), normalize=True)
  features = losses.pooled_target_features(target, kernel_sizes=(2, 5))
  combined = functools.partial(losses.topo_dice_loss, **kwargs)
  value, grad = jax.value_and_grad(combined)(logits, target)
  value2, grad2 = jax.value_and_grad(
      lambda x: combined(x, target, target_features=features))(logits)
  expected = (losses.projected_pooling_loss(jax.nn.sigmoid(logits), target,
                                            **kwargs)
              + jnp.mean(optax.losses.dice_loss(logits, target)))
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(value2, value, rtol=1e-6)
  np.testing.assert_allclose(grad2, grad, rtol=0,
                             atol=1e-6 * np.abs(grad).max())


# --- Semantics that need no reference ---------------------------------------


def test_identical_inputs_give_zero():
  pred, _ = _random_case((2, 16, 16, 16, 1), seed=0, dtype=np.float32)
  assert float(losses.projected_pooling_loss(pred, pred,
                                             kernel_sizes=(2, 4))) == 0.0


def test_counts_pooled_cells_of_a_spurious_voxel():
  # One extra voxel in an empty volume lights one cell per plane per kernel:
  # the loss is exactly 1 pooled cell.
  target = np.zeros((1, 20, 20, 20, 1), np.float32)
  pred = target.copy()
  pred[0, 3, 7, 11, 0] = 1.0
  assert float(losses.projected_pooling_loss(pred, target)) == 1.0


def test_absolute_value_after_summing():
  # Moving a voxel within one pooled window changes no plane sum, so the loss
  # is 0 although the voxel-wise difference is not; and, as in PyTorch, the
  # derivative of |·| at 0 is 0, so no gradient flows either.
  target = np.zeros((1, 8, 8, 8, 1), np.float32)
  pred = target.copy()
  target[0, 0, 0, 0, 0] = 1.0
  pred[0, 1, 1, 1, 0] = 1.0
  loss = functools.partial(losses.projected_pooling_loss, kernel_sizes=(4,))
  assert float(loss(pred, target)) == 0.0
  assert not np.any(jax.grad(loss)(pred, target))


def test_equal_sums_pass_no_gradient_like_torch():
  pred = np.full((2, 12, 12, 1), 0.5)
  target = np.zeros_like(pred)
  target[:, ::4, ::4] = 0.5  # One tied maximum per 4×4 window of pred.
  _, expected_grad = _torch_loss_and_grad(pred, target, kernel_sizes=(4,),
                                          start_channel=0)
  with jax.enable_x64(True):
    grad = jax.grad(losses.projected_pooling_loss)(pred, target,
                                                   kernel_sizes=(4,))
  assert not np.any(expected_grad)
  np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("channels, implied", [(1, 0), (3, 1)])
def test_default_start_channel(channels, implied):
  pred, target = _random_case((2, 12, 12, 12, channels), seed=1,
                              dtype=np.float32)
  kwargs = dict(kernel_sizes=(2, 3))
  np.testing.assert_array_equal(
      losses.projected_pooling_loss(pred, target, **kwargs),
      losses.projected_pooling_loss(pred, target, start_channel=implied,
                                    **kwargs))


def test_nan_in_pred_gives_nan():
  pred, target = _random_case((1, 12, 12, 12, 1), seed=2, dtype=np.float32)
  pred[0, 5, 5, 5, 0] = np.nan
  loss = functools.partial(losses.projected_pooling_loss, kernel_sizes=(2, 3))
  assert np.isnan(float(loss(pred, target)))
  assert np.isnan(jax.grad(loss)(pred, target)).any()


# --- Transformations and dtypes ---------------------------------------------


def test_jit_matches_eager_and_compiles_once():
  pred, target = _random_case((2, 16, 18, 14, 1), seed=3, dtype=np.float32)
  loss = functools.partial(losses.projected_pooling_loss,
                           kernel_sizes=(2, 4), strides=(1, 4))
  jitted = jax.jit(loss)
  np.testing.assert_allclose(jitted(pred, target), loss(pred, target),
                             rtol=1e-6)
  jitted(pred + 0.5, target)
  assert jitted._cache_size() == 1


def test_grad_and_value_and_grad_agree_under_jit():
  pred, target = _random_case((2, 16, 18, 14, 2), seed=4, dtype=np.float32)
  loss = functools.partial(losses.projected_pooling_loss, kernel_sizes=(2, 5))
  grad = jax.jit(jax.grad(loss))(pred, target)
  value, grad2 = jax.value_and_grad(loss)(pred, target)
  np.testing.assert_array_equal(grad, grad2)
  assert float(value) == pytest.approx(float(loss(pred, target)), rel=1e-6)


def test_vmap_over_stacked_batches():
  pred, target = _random_case((3, 2, 12, 14, 10, 1), seed=5, dtype=np.float32)
  loss = functools.partial(losses.projected_pooling_loss, kernel_sizes=(2, 3))
  batched = jax.vmap(loss)(pred, target)
  expected = [loss(p, t) for p, t in zip(pred, target)]
  np.testing.assert_allclose(batched, expected, rtol=1e-6)
  grads = jax.vmap(jax.grad(loss))(pred, target)
  np.testing.assert_array_equal(grads[1], jax.grad(loss)(pred[1], target[1]))


def test_bfloat16_sums_in_float32():
  pred, target = _random_case((2, 24, 24, 24, 1), seed=6, dtype=np.float32)
  pred_bf16 = jnp.asarray(pred, jnp.bfloat16)
  value = losses.projected_pooling_loss(pred_bf16, target)
  assert value.dtype == jnp.float32
  # Max pooling is exact in bfloat16, so the loss equals the float32 loss of
  # the same (rounded) values, up to float32 summation order.
  expected = losses.projected_pooling_loss(pred_bf16.astype(jnp.float32),
                                           target)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  grad = jax.grad(losses.projected_pooling_loss)(pred_bf16, target)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      grad.astype(jnp.float32),
      jax.grad(losses.projected_pooling_loss)(
          pred_bf16.astype(jnp.float32), target).astype(jnp.bfloat16)
      .astype(jnp.float32))


def test_float64_with_x64():
  pred, target = _random_case((1, 16, 16, 16, 1), seed=7)
  with jax.enable_x64(True):
    loss = functools.partial(losses.projected_pooling_loss, kernel_sizes=(2, 4))
    assert loss(pred, target).dtype == jnp.float64
    assert jax.grad(loss)(pred, target).dtype == jnp.float64


@pytest.mark.parametrize("target_dtype", [np.bool_, np.uint8, np.int32])
def test_integer_and_boolean_targets(target_dtype):
  pred, target = _random_case((1, 12, 12, 12, 1), seed=8, dtype=np.float32)
  loss = functools.partial(losses.projected_pooling_loss, kernel_sizes=(2, 4))
  np.testing.assert_array_equal(loss(pred, target.astype(target_dtype)),
                                loss(pred, target))


# --- Bad input ----------------------------------------------------------------


BAD_INPUTS = {
    "rank 3": (dict(pred=(4, 16, 1)), "rank 3"),
    "rank 6": (dict(pred=(1, 8, 8, 8, 8, 1)), "rank 6"),
    "shape mismatch": (dict(target=(1, 20, 20, 19, 1)), "same shape"),
    "rank mismatch": (dict(target=(1, 20, 20, 1)), "same shape"),
    "kernel larger than plane": (
        dict(pred=(1, 30, 30, 6, 1), target=(1, 30, 30, 6, 1),
             kernel_sizes=(4, 8)),
        r"kernel size 8 .* sagittal plane \(Y×Z = 30×6\)"),
    "kernel larger than 2d plane": (
        dict(pred=(1, 30, 7, 1), target=(1, 30, 7, 1), kernel_sizes=(8,)),
        r"kernel size 8 .*plane \(X×Y = 30×7\)"),
    "zero kernel": (dict(kernel_sizes=(0, 2)),
                    r"kernel_sizes \(0, 2\) must be a positive integer, got 0"),
    "fractional kernel": (dict(kernel_sizes=(2.5, 4)),
                          "kernel_sizes .* positive integer, got 2.5"),
    "boolean kernel": (dict(kernel_sizes=(True,)), "positive integer, got True"),
    "kernel not a sequence": (dict(kernel_sizes=4), "must be sequences"),
    "negative stride": (dict(kernel_sizes=(2,), strides=(-1,)),
                        "strides .* positive integer, got -1"),
    "fractional stride": (dict(kernel_sizes=(2,), strides=(1.5,)),
                          "strides .* positive integer, got 1.5"),
    "empty batch": (dict(pred=(0, 20, 20, 20, 1)), "at least one sample"),
    "empty axis": (dict(pred=(1, 20, 0, 20, 1)), "empty spatial or channel"),
    "ragged list": (dict(pred=[[[[0.5]]], [[[0.5], [0.5]]]]), "rectangular"),
    "length mismatch": (dict(kernel_sizes=(2, 3), strides=(2,)),
                        "kernel_sizes and strides must have the same length"),
    "no kernels": (dict(kernel_sizes=()), "at least one kernel"),
    "start_channel too large": (dict(start_channel=1), r"start_channel .*\[0, 1\)"),
    "start_channel negative": (dict(start_channel=-1), "start_channel"),
    "integer pred": (dict(pred_dtype=np.int32), "pred must be a floating"),
    "boolean pred": (dict(pred_dtype=np.bool_), "pred must be a floating"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("loss_fn", [losses.projected_pooling_loss,
                                     losses.topo_dice_loss])
def test_bad_input_raises_before_tracing(name, loss_fn):
  spec, message = BAD_INPUTS[name]
  spec = dict(spec)
  pred = spec.pop("pred", (1, 20, 20, 20, 1))
  if isinstance(pred, tuple):
    pred = np.zeros(pred, spec.pop("pred_dtype", np.float32))
  target = np.zeros(spec.pop("target", np.shape(pred) if isinstance(
      pred, np.ndarray) else (1, 20, 20, 20, 1)), np.float32)
  compiled_before = losses._projected_pooling_loss._cache_size()
  with pytest.raises(ValueError, match=message):
    loss_fn(pred, target, **spec)
  assert losses._projected_pooling_loss._cache_size() == compiled_before


def test_nested_lists_are_arrays():
  rng = np.random.default_rng(11)
  pred = rng.random((1, 6, 7, 5, 1))
  target = (rng.random(pred.shape) < 0.5).astype(np.float32)
  kwargs = dict(kernel_sizes=(2, 3))
  np.testing.assert_allclose(
      losses.projected_pooling_loss(pred.tolist(), target.tolist(), **kwargs),
      losses.projected_pooling_loss(pred.astype(np.float32), target,
                                    **kwargs), rtol=1e-6)


# --- The combined loss ---------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dice_weight", [1.0, 0.25])
def test_topo_dice_loss_is_topo_plus_weighted_dice(channels, dice_weight):
  logits, target, probs = loss_inputs.logits_and_target(
      (2, 16, 12, 14), channels, seed=9)
  kwargs = dict(kernel_sizes=(2, 4))
  topo, _ = _torch_loss_and_grad(
      probs, target, start_channel=0 if channels == 1 else 1, **kwargs)
  with jax.enable_x64(True):
    value = losses.topo_dice_loss(logits, target, dice_weight=dice_weight,
                                  **kwargs)
    grad = jax.grad(functools.partial(losses.topo_dice_loss, **kwargs))(
        logits, target)
  expected = topo + dice_weight * torch_reference.numpy_dice_loss(probs,
                                                                  target)
  np.testing.assert_allclose(float(value), expected, rtol=1e-10)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_topo_dice_loss_dice_term_is_optax():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(2, 10, 10, 10, 1)).astype(np.float32)
  target = (rng.random(logits.shape) < 0.5).astype(np.float32)
  kwargs = dict(kernel_sizes=(2,))
  np.testing.assert_allclose(
      losses.topo_dice_loss(logits, target, dice_weight=2.0, **kwargs)
      - losses.topo_dice_loss(logits, target, dice_weight=1.0, **kwargs),
      jnp.mean(optax.losses.dice_loss(logits, target)), rtol=1e-5)
