"""Tests for topojax/data/patches.py: nnU-Net's patch sampling."""

import numpy as np
import pytest

from topojax.data import patches


def _cases(shapes, seed=0):
  """Images of random values and labels with one small foreground box."""
  rng = np.random.default_rng(seed)
  images, labels = [], []
  for shape in shapes:
    images.append(rng.random((*shape, 2)).astype(np.float32))
    label = np.zeros((*shape, 1), np.float32)
    corner = [rng.integers(0, s - 2) for s in shape]
    label[tuple(slice(c, c + 2) for c in corner)] = 1
    labels.append(label)
  return images, labels


SHAPES = [(40, 30, 20), (12, 50, 33), (25, 25, 25), (9, 8, 40)]


def _draw(seed=3, epoch=1, **options):
  images, labels = _cases(SHAPES)
  foreground = [patches.foreground_voxels(label) for label in labels]
  settings = dict(patch_size=(16, 16, 16), batch_size=2, seed=seed,
                  epoch=epoch, flip_axes=(0, 2))
  settings.update(options)
  return images, labels, list(patches.iterate_patches(
      (images, labels), foreground, range(len(SHAPES)), **settings))


def test_same_seed_and_epoch_same_patches_other_epoch_others():
  _, _, first = _draw()
  _, _, again = _draw()
  _, _, other = _draw(epoch=2)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_shapes_and_forced_foreground():
  _, _, batches = _draw(foreground_fraction=0.5)
  assert len(batches) == 2
  for images, labels in batches:
    assert images.shape == (2, 16, 16, 16, 2)
    assert labels.shape == (2, 16, 16, 16, 1)
    assert images.dtype == labels.dtype == np.float32
    # round(2 · (1 − 0.5)) = 1: the second patch of a batch is centred on
    # foreground, so it contains some.
    assert labels[1].any()


def test_patches_are_crops_of_their_case_with_zero_padding():
  images, labels = _cases(SHAPES)
  foreground = [patches.foreground_voxels(label) for label in labels]
  cases, corners, flips = patches.patch_corners(
      [s for s in SHAPES], foreground, range(4), patch_size=(16, 16, 16),
      batch_size=4, foreground_fraction=0.25, seed=0, epoch=0)
  assert flips.shape == (4, 0) and sorted(cases) == [0, 1, 2, 3]
  for case, corner in zip(cases, corners):
    shape = np.array(SHAPES[case])
    padded = np.pad(images[case], [(16, 16)] * 3 + [(0, 0)])
    start = corner + 16
    expected = padded[tuple(slice(s, s + 16) for s in start)]
    np.testing.assert_array_equal(
        patches.crop(images[case], corner, (16, 16, 16)), expected)
    # Outside the case only where the case is smaller than the patch, and
    # then by at most the difference.
    short = np.maximum(16 - shape, 0)
    assert np.all(corner >= -short) and np.all(corner + 16 <= shape + short)
    assert np.all((corner >= 0) | (short > 0))


def test_foreground_voxels_are_a_sample_of_the_label():
  label = np.zeros((30, 30, 30, 3), np.float32)
  label[..., 0] = 1  # background channel of a one-hot label
  label[5:25, 5:25, 5:25, 2] = 1
  voxels = patches.foreground_voxels(label, start_channel=1, max_voxels=500)
  assert voxels.shape == (500, 3)
  assert len(np.unique(voxels, axis=0)) == 500
  assert label[tuple(voxels.T)][:, 2].all()
  assert patches.foreground_voxels(np.zeros((4, 4, 4, 1))).shape == (0, 3)


def test_a_case_without_foreground_gets_a_random_patch():
  images = [np.ones((20, 20, 20, 1), np.float32)]
  labels = [np.zeros((20, 20, 20, 1), np.float32)]
  batches = list(patches.iterate_patches(
      (images, labels), [patches.foreground_voxels(labels[0])], [0],
      patch_size=(8, 8, 8), batch_size=1, foreground_fraction=1.0, seed=0,
      epoch=0))
  assert len(batches) == 1 and batches[0][0].shape == (1, 8, 8, 8, 1)


@pytest.mark.parametrize("options, message", [
    (dict(patch_size=(16, 16)), "patch_size"),
    (dict(patch_size=(16, 0, 16)), "patch_size"),
    (dict(foreground_fraction=1.5), "foreground_fraction"),
])
def test_bad_arguments_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    _draw(**options)


def test_arrays_of_different_shapes_are_refused():
  images, labels = _cases(SHAPES[:2])
  with pytest.raises(ValueError, match="case 1"):
    patches.iterate_patches((images, [labels[0], labels[0]]),
                            [np.zeros((0, 3), int)] * 2, [0, 1],
                            patch_size=(8, 8, 8), batch_size=1, seed=0,
                            epoch=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_case_foreground_samples_the_rows_asked_for(channels):
  labels = []
  for i in range(3):
    # Background everywhere (one-hot), then two voxels of the last class.
    label = np.zeros((6, 5, 4, channels), np.float32)
    label[..., 0] = channels > 1
    label[i, 1:3, 2] = np.eye(channels)[-1]
    labels.append(label)
  foreground = patches.case_foreground(labels, [2, 0])
  assert len(foreground) == 3 and foreground[1].shape == (0, 3)
  for row in (0, 2):
    np.testing.assert_array_equal(foreground[row],
                                  [[row, 1, 2], [row, 2, 2]])
