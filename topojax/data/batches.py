"""Training and evaluation batches, prepared in a background thread.

The order and the flips of an epoch are drawn from ``(seed, epoch)`` alone,
so a resumed run replays exactly the batches it would have seen; a thread
reads (and flips) the next batches, e.g. from the cache's memory maps, while
the consumer works on the current one.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
import queue
import threading

import numpy as np

# Batches prepared ahead of the consumer by the background thread.
_PREFETCH = 2


class _Failure:
  """Carries an exception from the background thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_DONE = object()


def iterate_batches(images, labels, indices: Sequence[int], *,
                    batch_size: int, seed: int, epoch: int,
                    shuffle: bool = True, flip_axes: Sequence[int] = (),
                    drop_remainder: bool = True
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(images, labels)`` batches, prepared in a background thread.

  The order and the flips are drawn from ``(seed, epoch)`` alone, so a
  resumed run replays exactly the batches it would have seen.

  Args:
    images: ``(num_cases, X, Y, Z, C_in)`` array-like (e.g.
      ``Dataset.images``).
    labels: ``(num_cases, X, Y, Z, C_out)`` array-like.
    indices: rows to draw from (e.g. ``Dataset.indices(split.train)``).
    batch_size: cases per batch.
    seed: non-negative seed of the run.
    epoch: non-negative epoch number.
    shuffle: shuffle the rows (training); ``False`` keeps ``indices`` order
      (evaluation).
    flip_axes: spatial axes (0 = X, 1 = Y, 2 = Z) each flipped with
      probability 1/2, per case, image and label together.
    drop_remainder: drop a last batch smaller than ``batch_size``, so every
      batch has the same shape (no recompilation); evaluation wants
      ``False``.

  Returns:
    An iterator of float32 ``(N, X, Y, Z, C_in)`` and ``(N, X, Y, Z, C_out)``
    pairs, ``N = batch_size`` except perhaps for the last batch.

  Raises:
    ValueError: mismatched arrays, indices out of range, a bad
      ``batch_size``, ``flip_axes``, ``seed`` or ``epoch``, or
      ``drop_remainder`` with fewer rows than one batch.
  """
  indices, flip_axes = _checked_batch_arguments(
      images, labels, indices, batch_size=batch_size, seed=seed, epoch=epoch,
      flip_axes=flip_axes, drop_remainder=drop_remainder)

  # Every random draw happens here, in a fixed order, so the batches do not
  # depend on thread timing.
  rng = np.random.default_rng((seed, epoch))
  order = rng.permutation(indices) if shuffle else indices
  flips = rng.random((order.size, len(flip_axes))) < 0.5
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
  starts = range(0, stop, batch_size)
  return _prefetched(
      _read_batch(images, labels, order[s:s + batch_size],
                  flips[s:s + batch_size], flip_axes) for s in starts)


def _checked_batch_arguments(images, labels, indices, *, batch_size: int,
                             seed: int, epoch: int, flip_axes: Sequence[int],
                             drop_remainder: bool
                             ) -> tuple[np.ndarray, tuple[int, ...]]:
  """Checks ``iterate_batches``' arguments (see there for the ``ValueError``).

  Returns:
    ``indices`` as a flat int64 array and ``flip_axes`` as a tuple of ints.
  """
  image_shape, label_shape = np.shape(images), np.shape(labels)
  if len(image_shape) != 5 or len(label_shape) != 5:
    raise ValueError(f"images and labels must be (num_cases, X, Y, Z, C), got "
                     f"shapes {image_shape} and {label_shape}")
  if image_shape[:4] != label_shape[:4]:
    raise ValueError(f"images {image_shape} and labels {label_shape} differ in "
                     "number of cases or spatial shape")
  indices = np.asarray(indices, dtype=np.int64).reshape(-1)
  if indices.size and (indices.min() < 0 or indices.max() >= image_shape[0]):
    raise ValueError(f"indices must lie in [0, {image_shape[0]}), got "
                     f"[{indices.min()}, {indices.max()}]")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if drop_remainder and indices.size < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {indices.size} "
                     "cases given and drop_remainder=True would yield nothing")
  flip_axes = tuple(int(a) for a in flip_axes)
  if any(a not in (0, 1, 2) for a in flip_axes) or len(set(flip_axes)) != len(
      flip_axes):
    raise ValueError(f"flip_axes must be distinct spatial axes among 0, 1, 2, "
                     f"got {flip_axes}")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, "
                     f"epoch={epoch}")
  return indices, flip_axes


def _read_batch(images, labels, rows, row_flips, flip_axes: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray]:
  """Stacks ``rows`` into float32 ``(N, X, Y, Z, C)`` image and label batches.

  ``row_flips[i, j]`` says whether row ``i`` is flipped along
  ``flip_axes[j]``, image and label together.
  """
  image_batch, label_batch = [], []
  for row, flip in zip(rows, row_flips):
    axes = [a for a, f in zip(flip_axes, flip) if f]
    image_batch.append(np.flip(np.asarray(images[row]), axes))
    label_batch.append(np.flip(np.asarray(labels[row]), axes))
  return (np.stack(image_batch).astype(np.float32, copy=False),
          np.stack(label_batch).astype(np.float32, copy=False))


def _prefetched(items: Iterator) -> Iterator:
  """Iterates ``items`` in a background thread, ``_PREFETCH`` ahead."""
  buffer = queue.Queue(maxsize=_PREFETCH)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
    except BaseException as err:  # Re-raised in the consumer's thread.
      put(_Failure(err))
    else:
      put(_DONE)

  def consume():
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = buffer.get()
        if item is _DONE:
          return
        if isinstance(item, _Failure):
          raise item.error
        yield item
    finally:
      stop.set()
      thread.join()

  return consume()
