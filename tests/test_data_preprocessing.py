"""Tests for topojax/data/preprocessing.py: resizing, normalisation, label
encoding and ``PreprocessConfig``."""

import numpy as np
import pytest

from topojax import data

# tests/ is on sys.path under pytest.
from data_fixtures import ramp_case


@pytest.mark.parametrize("size_in, size_out", [
    (35, 64), (51, 64), (512, 160), (97, 128), (3, 48), (160, 160), (7, 4)])
def test_resize_gives_the_exact_shape_and_interpolates_linearly(size_in,
                                                                size_out):
  ramp = np.broadcast_to(
      np.arange(size_in, dtype=np.float32)[:, None, None], (size_in, 3, 2))
  out = data.resize(np.ascontiguousarray(ramp), (size_out, 5, 2), order=1)
  assert out.shape == (size_out, 5, 2) and out.dtype == np.float32
  # Corners aligned: output voxel i samples input position i (n-1)/(m-1),
  # where a linear ramp is known exactly.
  expected = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  np.testing.assert_allclose(out[:, 2, 1], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("order", [0, 1])
def test_resize_ignores_memory_order(order):
  # NIfTI arrays arrive in Fortran order; the result must not depend on it.
  volume = np.random.default_rng(1).random((13, 9, 6)).astype(np.float32)
  expected = data.resize(volume, (7, 12, 5), order=order)
  assert volume.flags.c_contiguous
  np.testing.assert_array_equal(
      data.resize(np.asfortranarray(volume), (7, 12, 5), order=order),
      expected)


def test_nearest_resize_round_trip_is_exact():
  labels = np.random.default_rng(0).integers(0, 4, (5, 6, 4)).astype(np.uint8)
  # 2n - 1 voxels: every original voxel centre is an output voxel centre.
  up = data.resize(labels, (9, 11, 7), order=0)
  assert set(np.unique(up)) <= set(np.unique(labels))
  np.testing.assert_array_equal(up[::2, ::2, ::2], labels)
  np.testing.assert_array_equal(data.resize(up, (5, 6, 4), order=0), labels)


def test_preprocess_normalises_and_encodes_labels():
  image, label = ramp_case()
  config = data.PreprocessConfig(shape=(17, 21, 13), label_mode="onehot")
  out_image, out_label = data.preprocess(image, label, config, num_labels=3)
  assert out_image.shape == (17, 21, 13, 2) and out_image.dtype == np.float32
  # The ramp min-max normalised is i / 16 along X; the constant becomes 0.
  np.testing.assert_allclose(out_image[:, 3, 4, 0], np.arange(17) / 16,
                             atol=1e-6)
  assert np.all(out_image[..., 1] == 0)
  assert out_label.shape == (17, 21, 13, 3) and out_label.dtype == np.float32
  np.testing.assert_array_equal(out_label.sum(-1), 1)
  np.testing.assert_array_equal(np.argmax(out_label[::2, ::2, ::2], -1), label)

  binary = data.PreprocessConfig(shape=(17, 21, 13))
  _, out_label = data.preprocess(image, label, binary, num_labels=3)
  assert out_label.shape == (17, 21, 13, 1)
  np.testing.assert_array_equal(out_label[::2, ::2, ::2, 0], label > 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(4, 4)), "shape"),
    (dict(shape=(4, 0, 4)), "shape"),
    (dict(shape=(4, 4, 4.5)), "shape"),
    (dict(shape=(4, 4, 4), label_mode="multi"), "label_mode"),
    (dict(shape=(4, 4, 4), modalities=()), "modalities"),
])
def test_bad_preprocess_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.PreprocessConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=None, spacing=(1.0, 0.0, 1.0)), "spacing must be three"),
    (dict(shape=None, spacing=(1.0, 1.0)), "spacing must be three"),
    (dict(shape=None, spacing=(1.0, float("nan"), 1.0)),
     "spacing must be three"),
    (dict(shape=(4, 4, 4), spacing=(1.0, 1.0, 1.0)), "both set the grid"),
])
def test_bad_spacing(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.PreprocessConfig(**kwargs)


@pytest.mark.parametrize("config, grid", [
    (data.PreprocessConfig(shape=(8, 8, 8)), (8, 8, 8)),
    (data.PreprocessConfig(shape=None), (30, 21, 7)),
    # 30 · 0.5 / 1 = 15; 21 · 1 / 3 = 7; 7 · 3 / 1.5 = 14.
    (data.PreprocessConfig(shape=None, spacing=(1.0, 3.0, 1.5)), (15, 7, 14)),
    # Rounded to the nearest voxel, never below one.
    (data.PreprocessConfig(shape=None, spacing=(0.7, 100.0, 2.0)),
     (21, 1, 10)),
])
def test_case_grid(config, grid):
  assert data.case_grid(config, (30, 21, 7), (0.5, 1.0, 3.0)) == grid


def test_preprocess_to_a_spacing_resamples_smoothly_and_labels_nearest():
  x = np.arange(20, dtype=np.float32)
  image = np.broadcast_to((x ** 2)[:, None, None, None], (20, 6, 5, 1))
  label = np.zeros((20, 6, 5), np.uint8)
  label[5:15, 2:4, 1:4] = 2
  config = data.PreprocessConfig(shape=None, spacing=(0.5, 1.0, 0.5))
  out_image, out_label = data.preprocess(image, label, config, num_labels=3,
                                         spacing=(1.0, 1.0, 1.0))
  assert out_image.shape == (40, 6, 10, 1) and out_label.shape == (40, 6, 10, 1)
  # Away from the edges a cubic spline reproduces a parabola between the
  # samples (error 1e-5), where a linear resampling would miss the
  # midpoints by 1/4 of a sample step squared, 7e-4 after normalising.
  position = np.linspace(0, 19, 40)  # corner-aligned, as resize says
  np.testing.assert_allclose(out_image[10:30, 3, 5, 0],
                             position[10:30] ** 2 / 19 ** 2, atol=5e-5)
  assert set(np.unique(out_label)) == {0.0, 1.0}
  with pytest.raises(ValueError, match="spacing: the case's voxel size"):
    data.preprocess(image, label, config, num_labels=3)
  assert data.image_order(config) == 3
  assert data.image_order(data.PreprocessConfig(shape=(4, 4, 4))) == 1
  # Each case's own grid: nothing is resampled.
  own = data.PreprocessConfig(shape=None)
  same_image, same_label = data.preprocess(image, label, own, num_labels=3)
  np.testing.assert_allclose(same_image[..., 0], image[..., 0] / 361,
                             rtol=1e-6)
  np.testing.assert_array_equal(same_label[..., 0], label > 0)
