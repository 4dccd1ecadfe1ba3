"""Tests for topojax/losses/skeleton_recall.py: the tube and the loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import morphology

from topojax import skeleton
from topojax import synthetic
from topojax.losses import skeleton_recall

torch = pytest.importorskip("torch", reason="the parity tests need PyTorch")
import loss_inputs  # noqa: E402  (tests/ is on sys.path under pytest)
import torch_reference  # noqa: E402

CASES = {
    # name: (spatial shape, batch, channels, loss keyword arguments)
    "2d_1ch": ((31, 29), 2, 1, {}),
    "2d_3ch": ((30, 33), 2, 3, {}),
    "2d_3ch_batch_dice": ((27, 26), 3, 3, dict(batch_dice=True)),
    "3d_1ch": ((18, 17, 16), 2, 1, {}),
    "3d_3ch": ((17, 16, 18), 2, 3, {}),
    "3d_3ch_smooth_batch_dice": ((16, 16, 15), 2, 3,
                                 dict(smooth=1.0, batch_dice=True)),
}


def _label_map(spatial, batch, channels, seed):
  """``(N, *spatial)`` class indices in ``[0, channels)`` (0/1 for one
  channel): thresholded smooth noise, so the classes form blobs and ridges
  that touch each other and the border."""
  rng = np.random.default_rng(seed)
  noise = ndimage.uniform_filter(rng.random((batch, *spatial)),
                                 size=(1, *(5,) * len(spatial)))
  levels = np.quantile(noise, [0.55, 0.75] if channels > 1 else [0.6])
  label_map = np.digitize(noise, levels)
  return np.minimum(label_map, max(channels - 1, 1))


def _one_hot(label_map, channels):
  if channels == 1:
    return label_map[..., None].astype(np.float64)
  return np.eye(channels)[label_map]


def _probabilities(shape, seed):
  rng = np.random.default_rng(seed + 100)
  logits = rng.normal(size=shape) * 2
  if shape[-1] == 1:
    return 1 / (1 + np.exp(-logits))
  return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def _default_start(channels, kwargs):
  return kwargs.get("start_channel", 0 if channels == 1 else 1)


# --- Parity with the authors' pipeline ----------------------------------------
#
# The authors skeletonise with scikit-image, whose 3D (Lee) thinning deletes
# parts two voxels thick whole (its issue 3757), where topojax's thinning
# keeps a centre line; and whose 2D default is Zhang–Suen's thinning, where
# topojax thins 2D by Lee's algorithm too. The parity tests compare the rest
# of the pipeline (binarise, dilate, cut to the classes, the loss), so the
# reference side skeletonises 2D with scikit-image's method='lee', and the
# label maps are those of the first seeds on which scikit-image's skeleton
# and topojax's agree on every sample (tests/test_skeleton.py compares the
# two thinnings themselves).


def _agreed_label_map(name):
  """The case's label map from the first seed (from ``len(name)``) on which
  scikit-image's Lee skeleton equals topojax's for every sample."""
  spatial, batch, channels, _ = CASES[name]
  for seed in range(len(name), len(name) + 10):
    label_map = _label_map(spatial, batch, channels, seed)
    if all(np.array_equal(skeleton.skeletonize(m > 0),
                          morphology.skeletonize(m > 0, method="lee"))
           for m in label_map):
      return label_map
  raise AssertionError(f"no seed where the skeletons agree for {name}")


@pytest.fixture
def authors_with_lee_in_2d(monkeypatch):
  """The reference's ``skimage.morphology.skeletonize``, Lee's in 2D too."""
  zhang_or_lee = morphology.skeletonize
  monkeypatch.setattr(morphology, "skeletonize", functools.partial(
      zhang_or_lee, method="lee"))


@pytest.mark.usefixtures("authors_with_lee_in_2d")
@pytest.mark.parametrize("name", list(CASES))
def test_tube_matches_the_authors_label_map_tube(name):
  _, _, channels, _ = CASES[name]
  label_map = _agreed_label_map(name)
  expected = torch_reference.tubed_skeleton_label_map(label_map[:, None])[:, 0]
  tube = skeleton_recall.tubed_skeleton(_one_hot(label_map, channels))
  assert tube.dtype == np.bool_ and tube.shape == (*label_map.shape, channels)
  if channels == 1:
    np.testing.assert_array_equal(tube[..., 0], expected > 0)
  else:
    np.testing.assert_array_equal(tube[..., 0], False)
    for c in range(1, channels):
      np.testing.assert_array_equal(tube[..., c], expected == c)
  assert expected.any()


@pytest.mark.usefixtures("authors_with_lee_in_2d")
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_reference_float64(name, backend):
  _, _, channels, kwargs = CASES[name]
  label_map = _agreed_label_map(name)
  target = _one_hot(label_map, channels)
  pred = _probabilities(target.shape, seed=len(name))
  # The authors' pipeline: tube of the integer label map, one-hot encoded
  # inside the loss, minus the recall.
  tube_map = torch_reference.tubed_skeleton_label_map(label_map[:, None])
  expected, expected_grad = torch_reference.value_and_grad(
      torch_reference.skeleton_recall_loss, pred,
      np.moveaxis(tube_map, 1, -1).astype(np.float64),
      **{**kwargs, "start_channel": _default_start(channels, kwargs)})
  device = jax.devices(backend)[0]
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(functools.partial(
        skeleton_recall.skeleton_recall_loss, **kwargs))(
            jax.device_put(pred, device), target)
    assert value.dtype == jnp.float64
  np.testing.assert_allclose(float(value), 1 + expected, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-12 * np.abs(expected_grad).max())
  assert np.abs(expected_grad).max() > 0


# --- The tube on hand-made labels ---------------------------------------------


def _within_city_block(mask, radius):
  """Voxels within city-block distance ``radius`` of ``mask``, computed by a
  distance transform rather than by repeated dilation."""
  return ndimage.distance_transform_cdt(~mask, metric="taxicab") <= radius


@pytest.mark.parametrize("shape", [(1, 20, 20, 1), (1, 16, 14, 12, 1)])
def test_skeleton_of_a_one_voxel_line_is_the_line(shape):
  line = np.zeros(shape, bool)
  # Along X, at Y = 6 (and Z = 5 in 3D).
  line[(0, slice(3, 15), 6, *(5,) * (len(shape) - 4), 0)] = True
  for radius in (0, 2):
    # The tube is cut to the label, so a 1-voxel line is its own tube.
    np.testing.assert_array_equal(
        skeleton_recall.tubed_skeleton(line, radius=radius), line)


def test_cylinder_skeletonizes_to_its_centreline_and_tube_is_a_diamond():
  # A solid cylinder of radius 3 around the X axis through (y, z) = (8, 8).
  shape = (24, 17, 17)
  x, y, z = np.indices(shape)
  cylinder = ((y - 8)**2 + (z - 8)**2 <= 9) & (x >= 2) & (x < 22)
  label = cylinder[None, ..., None]

  skeleton = skeleton_recall.tubed_skeleton(label, radius=0)[0, ..., 0]
  xs, ys, zs = np.nonzero(skeleton)
  # One voxel per slice, on the axis, in one unbroken run along X.
  np.testing.assert_array_equal(ys, 8)
  np.testing.assert_array_equal(zs, 8)
  np.testing.assert_array_equal(xs, np.arange(xs.min(), xs.max() + 1))
  assert xs.min() <= 6 and xs.max() >= 17

  tube = skeleton_recall.tubed_skeleton(label)[0, ..., 0]
  np.testing.assert_array_equal(tube, cylinder & _within_city_block(
      skeleton, skeleton_recall.DEFAULT_TUBE_RADIUS))
  # Radius-2 diamond: 13 voxels across each skeleton slice (1 + 4 + 8),
  # all inside the cylinder, and caps of 5 and 1 voxels 1 and 2 slices
  # beyond each end, where those slices are in the cylinder.
  inside = lambda x: 2 <= x < 22  # noqa: E731
  caps = sum(size * inside(end + step * sign)
             for size, step in ((5, 1), (1, 2))
             for end, sign in ((xs.min(), -1), (xs.max(), 1)))
  assert tube.sum() == 13 * xs.size + caps
  assert np.all(tube <= cylinder) and np.all(skeleton <= tube)


def test_thick_bar_in_2d_keeps_its_middle_row():
  label = np.zeros((1, 30, 21, 1), bool)
  label[0, 4:26, 8:13, 0] = True  # 5 pixels thick across Y.
  skeleton = skeleton_recall.tubed_skeleton(label, radius=0)[0, ..., 0]
  # Lee's thinning leaves the middle row, short of the ends.
  np.testing.assert_array_equal(skeleton[6:23], label[0, 6:23, :, 0]
                                & (np.arange(21) == 10))
  assert skeleton.sum() < 25
  tube = skeleton_recall.tubed_skeleton(label)[0, ..., 0]
  np.testing.assert_array_equal(tube, label[0, ..., 0]
                                & _within_city_block(skeleton, 2))
  # In the bar's middle the whole 5-pixel thickness is within distance 2.
  np.testing.assert_array_equal(tube[10:20], label[0, 10:20, :, 0])


@pytest.mark.parametrize("spatial", [(20, 22), (14, 15, 16)])
def test_one_hot_classes_share_the_union_skeleton_or_get_their_own(spatial):
  # A thick bar along X whose two halves across Y are classes 1 and 2:
  # the union's centreline runs along their border.
  label_map = np.zeros(spatial, int)
  label_map[2:-2, 4:8, ...] = 1
  label_map[2:-2, 8:12, ...] = 2
  one_hot = np.eye(3)[label_map][None]
  union = (label_map > 0)[None, ..., None]
  tube = skeleton_recall.tubed_skeleton(one_hot)
  union_tube = skeleton_recall.tubed_skeleton(union)[0, ..., 0]
  np.testing.assert_array_equal(tube[0, ..., 0], False)
  for c in (1, 2):
    np.testing.assert_array_equal(tube[0, ..., c],
                                  union_tube & (label_map == c))
    assert tube[0, ..., c].any()

  own = skeleton_recall.tubed_skeleton(one_hot, per_channel=True)
  for c in (1, 2):
    np.testing.assert_array_equal(
        own[0, ..., c], skeleton_recall.tubed_skeleton(
            (label_map == c)[None, ..., None])[0, ..., 0])
  assert not np.array_equal(own, tube)


def test_start_channel_and_empty_samples():
  label = np.zeros((2, 12, 12, 2), np.float32)
  label[0, 2:10, 5:7, 1] = 1
  label[0, ..., 0] = 1 - label[0, ..., 1]
  label[1, ..., 0] = 1  # Background only: no tube at all.
  tube = skeleton_recall.tubed_skeleton(label)
  assert tube[0, ..., 1].any() and not tube[0, ..., 0].any()
  assert not tube[1].any()
  # Channel 0 counted as a class: the union is the whole image.
  with_background = skeleton_recall.tubed_skeleton(label, start_channel=0)
  assert with_background[..., 0].any()
  assert not skeleton_recall.tubed_skeleton(np.zeros((1, 6, 6, 5, 1))).any()


def test_tube_accepts_integer_boolean_and_jax_labels():
  label = np.zeros((1, 14, 12, 1), np.uint8)
  label[0, 3:11, 4:8, 0] = 1
  expected = skeleton_recall.tubed_skeleton(label)
  for variant in (label.astype(bool), jnp.asarray(label, jnp.float32),
                  label.tolist()):
    np.testing.assert_array_equal(
        skeleton_recall.tubed_skeleton(variant), expected)


def _components_without(label, tube):
  """How many 26-connected components of ``label`` hold no tube voxel."""
  components, count = ndimage.label(label, np.ones((3,) * label.ndim))
  return count - np.unique(components[tube & label]).size


def test_tube_covers_every_component_of_the_synthetic_labels():
  # The comparison's "components" task: one ellipsoid per case. The
  # authors' scikit-image skeleton leaves some of them no tube at all.
  labels = np.stack([synthetic.make_case(synthetic.TASKS["components"], i)[1]
                     for i in range(40)]) > 0
  tube = skeleton_recall.tubed_skeleton(labels[..., None])[..., 0]
  assert all(_components_without(l, t) == 0 for l, t in zip(labels, tube))
  authors = torch_reference.tubed_skeleton_label_map(
      labels[:, None].astype(np.int16))[:, 0] > 0
  assert sum(_components_without(l, t) for l, t in zip(labels, authors)) > 0


# --- The loss -----------------------------------------------------------------


def _tube_case(shape=(2, 14, 13, 12, 1), seed=5):
  spatial, batch, channels = shape[1:-1], shape[0], shape[-1]
  target = _one_hot(_label_map(spatial, batch, channels, seed), channels)
  pred = _probabilities(target.shape, seed).astype(np.float32)
  return pred, target, skeleton_recall.tubed_skeleton(target)


def test_perfect_prediction_gives_zero_and_a_gap_does_not():
  tube = np.zeros((1, 18, 12, 12, 1), np.float32)
  tube[0, 2:16, 5:8, 5:8, 0] = 1
  assert float(skeleton_recall.skeleton_recall_loss(tube, tube)) == 0
  broken = tube.copy()
  broken[0, 8:10] = 0
  assert float(skeleton_recall.skeleton_recall_loss(broken, tube)) > 0.1
  # Recall ignores false positives: a prediction of ones everywhere is 0.
  assert float(skeleton_recall.skeleton_recall_loss(
      np.ones_like(tube), tube)) == 0


def test_precomputed_skeleton_equals_computed_one():
  pred, target, skeleton = _tube_case((2, 17, 15, 3))
  np.testing.assert_allclose(
      skeleton_recall.skeleton_recall_loss(pred, target, skeleton=skeleton),
      skeleton_recall.skeleton_recall_loss(pred, jnp.asarray(target)),
      rtol=1e-7)


def test_empty_label_gives_a_finite_loss():
  pred = np.random.default_rng(0).random((2, 9, 8, 7, 1)).astype(np.float32)
  empty = np.zeros_like(pred)
  # Nothing to recall: (0 + s) / (0 + s) = 1, so the loss is 0.
  value, grad = jax.value_and_grad(skeleton_recall.skeleton_recall_loss)(
      pred, empty)
  assert float(value) == 0 and np.all(np.asarray(grad) == 0)
  # Without smoothing the clip of the denominator gives 0 / 1e-8 = 0.
  assert float(skeleton_recall.skeleton_recall_loss(pred, empty,
                                                    smooth=0.0)) == 1


def test_nan_in_pred_gives_nan():
  pred, target, skeleton = _tube_case()
  for where in (skeleton, ~skeleton):  # On the tube and off it.
    nan_pred = pred.copy()
    nan_pred[tuple(np.argwhere(where)[0])] = np.nan
    assert np.isnan(skeleton_recall.skeleton_recall_loss(
        nan_pred, target, skeleton=skeleton))


def test_jit_vmap_grad():
  pred, target, skeleton = _tube_case()
  value = skeleton_recall.skeleton_recall_loss(pred, target, skeleton=skeleton)
  loss = lambda p, t, s: skeleton_recall.skeleton_recall_loss(  # noqa: E731
      p, t, skeleton=s)
  np.testing.assert_allclose(jax.jit(loss)(pred, target, skeleton), value,
                             rtol=1e-6)
  per_sample = jax.vmap(lambda p, t, s: loss(p[None], t[None], s[None]))(
      pred, target, skeleton)
  np.testing.assert_allclose(per_sample.mean(), value, rtol=1e-6)
  grad = jax.jit(jax.grad(loss))(pred, target, skeleton)
  # d/dP of 1 - (ΣPT + s)/(ΣT + s): -T/(ΣT + s), per sample and channel.
  tube = skeleton.astype(np.float32)
  totals = tube.sum(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(grad, -tube / (totals + 1e-5) / 2,
                             rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtypes(dtype):
  pred, target, skeleton = _tube_case((2, 15, 14, 2))
  with jax.enable_x64(dtype == jnp.float64):
    value = skeleton_recall.skeleton_recall_loss(
        jnp.asarray(pred, dtype), target, skeleton=skeleton)
    grad = jax.grad(skeleton_recall.skeleton_recall_loss)(
        jnp.asarray(pred, dtype), target, skeleton=skeleton)
    reference = skeleton_recall.skeleton_recall_loss(
        pred.astype(np.float64), target, skeleton=skeleton)
  assert value.dtype == (jnp.float32 if dtype == jnp.bfloat16 else dtype)
  assert grad.dtype == dtype
  np.testing.assert_allclose(float(value), float(reference),
                             rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)


# --- Argument checks ----------------------------------------------------------

BAD_INPUTS = {**loss_inputs.BAD_INPUTS, **loss_inputs.BAD_SKELETONS}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_tracing(name):
  spec, message = BAD_INPUTS[name]
  loss_inputs.assert_refused_before_tracing(
      skeleton_recall.skeleton_recall_loss,
      skeleton_recall._skeleton_recall_loss, spec, message)


def test_traced_target_without_skeleton_is_refused_before_tracing():
  pred, target, skeleton = _tube_case()
  compiled_before = skeleton_recall._skeleton_recall_loss._cache_size()
  with pytest.raises(ValueError, match=r"skeleton=tubed_skeleton\(target\)"):
    jax.jit(skeleton_recall.skeleton_recall_loss)(pred, target)
  assert skeleton_recall._skeleton_recall_loss._cache_size() == compiled_before
  # A traced pred with a concrete target is fine: the tube is made on the
  # host while tracing.
  np.testing.assert_allclose(
      jax.jit(lambda p: skeleton_recall.skeleton_recall_loss(p, target))(pred),
      skeleton_recall.skeleton_recall_loss(pred, target, skeleton=skeleton),
      rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(label=np.zeros((8, 8, 1))), "label must be channels-last"),
    (dict(label=np.zeros((0, 8, 8, 1))), "at least one sample"),
    (dict(label=[["a", "b"]]), "label must hold numbers"),
    (dict(radius=-1), "radius"),
    (dict(radius=1.5), "radius"),
    (dict(radius=True), "radius"),
    (dict(start_channel=2), "start_channel"),
])
def test_tubed_skeleton_bad_input(kwargs, message):
  kwargs = {"label": np.zeros((1, 8, 8, 2)), **kwargs}
  with pytest.raises(ValueError, match=message):
    skeleton_recall.tubed_skeleton(**kwargs)


def test_tubed_skeleton_refuses_a_tracer():
  with pytest.raises(ValueError, match="label must be a concrete array"):
    jax.jit(skeleton_recall.tubed_skeleton)(np.zeros((1, 6, 6, 1)))
