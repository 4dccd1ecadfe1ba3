"""Tests for topojax/postprocess.py: keeping the largest components."""

import numpy as np
import pytest

from topojax.postprocess import keep_largest_components

# Three separate cubes of 27, 8 and 1 voxels.
BIG, MEDIUM, SMALL = np.s_[0:3, 0:3, 0:3], np.s_[5:7, 5:7, 5:7], np.s_[9, 9, 9]


def _volume(*boxes, value=1, dtype=np.uint8):
  volume = np.zeros((11, 11, 11), dtype)
  for box in boxes:
    volume[box] = value
  return volume


@pytest.mark.parametrize("n, kept", [
    (1, (BIG,)),
    (2, (BIG, MEDIUM)),
    (3, (BIG, MEDIUM, SMALL)),
    (7, (BIG, MEDIUM, SMALL)),
])
def test_keeps_the_n_largest(n, kept):
  mask = _volume(SMALL, BIG, MEDIUM)
  np.testing.assert_array_equal(keep_largest_components(mask, n=n),
                                _volume(*kept))


def test_uses_full_connectivity():
  # Two voxels sharing only a corner are one component of 2 voxels, larger
  # than the single voxel elsewhere; face connectivity would see three 1s.
  mask = _volume(np.s_[9, 9, 9], np.s_[0, 0, 0], np.s_[1, 1, 1])
  np.testing.assert_array_equal(keep_largest_components(mask, n=1),
                                _volume(np.s_[0, 0, 0], np.s_[1, 1, 1]))


def test_ties_keep_the_component_met_first_in_c_order():
  mask = _volume(np.s_[8, 0, 0], np.s_[0, 8, 0])
  np.testing.assert_array_equal(keep_largest_components(mask, n=1),
                                _volume(np.s_[0, 8, 0]))


def test_cleans_each_label_value_on_its_own():
  # Class 2's cubes touch class 1's big cube; each class keeps its largest.
  labels = _volume(BIG, SMALL) + _volume(np.s_[3:5, 0:2, 0:2], np.s_[9, 0, 0],
                                         value=2)
  expected = _volume(BIG) + _volume(np.s_[3:5, 0:2, 0:2], value=2)
  np.testing.assert_array_equal(keep_largest_components(labels, n=1),
                                expected)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16])
def test_keeps_dtype_and_leaves_input_alone(dtype):
  mask = _volume(BIG, SMALL, dtype=dtype)
  original = mask.copy()
  cleaned = keep_largest_components(mask, n=1)
  assert cleaned.dtype == dtype
  np.testing.assert_array_equal(mask, original)
  np.testing.assert_array_equal(cleaned, _volume(BIG, dtype=dtype))


def test_empty_mask_stays_empty():
  np.testing.assert_array_equal(
      keep_largest_components(_volume(), n=1), _volume())


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_rejects_bad_n(n):
  with pytest.raises(ValueError, match="n must be a positive integer"):
    keep_largest_components(_volume(BIG), n=n)


def test_rejects_float_masks():
  with pytest.raises(ValueError, match="bool or integer label map"):
    keep_largest_components(_volume(BIG).astype(np.float32), n=1)
