"""Tests for topojax/data/batches.py: shuffled, flipped batches from a
background thread."""

import threading

import numpy as np
import pytest

from topojax import data


def _numbered(num_cases=10, shape=(4, 5, 3)):
  """Images whose every voxel holds the case number plus a spatial code, so a
  batch says which case it holds and how it was flipped."""
  x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
  code = (x * 100 + y * 10 + z).astype(np.float32)[..., None]
  images = np.stack([code + 1000 * i for i in range(num_cases)])
  return images, images.copy()


def test_batches_cover_each_case_once_per_epoch():
  images, labels = _numbered()
  indices = [0, 2, 3, 5, 6, 7, 9]
  batches = list(data.iterate_batches(images, labels, indices, batch_size=2,
                                      seed=0, epoch=0))
  assert len(batches) == 3  # The last, partial batch is dropped.
  for image_batch, label_batch in batches:
    assert image_batch.shape == (2, 4, 5, 3, 1)
    assert image_batch.dtype == label_batch.dtype == np.float32
  seen = [int(b[0][j, 0, 0, 0, 0]) // 1000 for b in batches for j in range(2)]
  assert len(set(seen)) == 6 and set(seen) <= set(indices)

  kept = list(data.iterate_batches(images, labels, indices, batch_size=2,
                                   seed=0, epoch=0, shuffle=False,
                                   drop_remainder=False))
  assert [b[0].shape[0] for b in kept] == [2, 2, 2, 1]
  order = [int(v) // 1000 for b in kept for v in b[0][:, 0, 0, 0, 0]]
  assert order == indices


def test_shuffle_depends_on_seed_and_epoch_only():
  images, labels = _numbered(num_cases=20)

  def order(seed, epoch):
    return [int(v) // 1000 for b, _ in data.iterate_batches(
        images, labels, range(20), batch_size=4, seed=seed, epoch=epoch,
        flip_axes=(0, 1, 2)) for v in b[:, 0, 0, 0, 0]]

  assert order(1, 5) == order(1, 5)
  assert order(1, 5) != order(1, 6)
  assert order(1, 5) != order(2, 5)
  assert sorted(order(1, 5)) == list(range(20))


def test_flips_apply_to_image_and_label_together():
  images, labels = _numbered(num_cases=40)
  labels = labels * 2  # Different from the image, flipped the same way.
  flipped = {(): 0, (0,): 0, (2,): 0, (0, 2): 0}
  for image_batch, label_batch in data.iterate_batches(
      images, labels, range(40), batch_size=8, seed=0, epoch=0,
      flip_axes=(0, 2)):
    np.testing.assert_array_equal(label_batch, 2 * image_batch)
    for sample in image_batch:
      original = images[int(sample[0, 0, 0, 0]) // 1000]
      matches = [axes for axes in flipped
                 if np.array_equal(sample, np.flip(original, axes))]
      assert len(matches) == 1
      flipped[matches[0]] += 1
  # Each of the four combinations has probability 1/4 over 40 cases.
  assert all(count >= 3 for count in flipped.values()), flipped


def test_background_errors_reach_the_consumer_and_threads_stop():
  images, labels = _numbered()

  class Broken:
    shape = images.shape

    def __getitem__(self, index):
      if index == 7:
        raise OSError("disk gone")
      return images[index]

  before = threading.active_count()
  with pytest.raises(OSError, match="disk gone"):
    list(data.iterate_batches(Broken(), labels, range(10), batch_size=1,
                              seed=0, epoch=0, shuffle=False))
  batches = data.iterate_batches(images, labels, range(10), batch_size=1,
                                 seed=0, epoch=0)
  next(batches)
  batches.close()  # A consumer that stops early.
  assert threading.active_count() == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=11), "batch_size=11 exceeds"),
    (dict(indices=[0, 10]), "indices"),
    (dict(flip_axes=(3,)), "flip_axes"),
    (dict(flip_axes=(1, 1)), "flip_axes"),
    (dict(seed=-1), "seed"),
    (dict(labels=np.zeros((10, 4, 5, 2, 1))), "differ"),
    (dict(images=np.zeros((10, 4, 5, 3))), "num_cases, X, Y, Z, C"),
])
def test_bad_batch_arguments(kwargs, match):
  images, labels = _numbered()
  arguments = dict(images=images, labels=labels, indices=range(10),
                   batch_size=2, seed=0, epoch=0)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=match):
    data.iterate_batches(**arguments)
