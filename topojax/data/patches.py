"""Training patches of cases of any shape, drawn as nnU-Net draws them.

A network trained at the data's own resolution sees random crops of
``patch_size`` voxels, not whole volumes (Isensee et al., nnU-Net, Nature
Methods 2021): each epoch takes a patch of every training case it is given
(``topojax.train`` gives each case ``patches_per_case`` times), in a
shuffled order; in each batch the last ``round(batch_size ·
foreground_fraction)`` patches are centred on a random foreground voxel of
their case (so that rare structures are seen), the others lie anywhere. A
case smaller than the patch along an axis is placed at a random offset
inside it and zero-padded; crops never leave a case by more than that.

Every draw comes from ``(seed, epoch)`` alone, in a fixed order, so a
resumed run replays the same patches, and the arrays are read in a
background thread (``batches._prefetched``) while the consumer trains.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from topojax.data.batches import _prefetched

# nnU-Net keeps at most this many foreground voxels per case to centre
# patches on: a fair sample of where the structures are, without holding
# every coordinate of a large label in memory.
MAX_FOREGROUND_VOXELS = 10_000


def foreground_voxels(label, *, start_channel: int = 0,
                      max_voxels: int = MAX_FOREGROUND_VOXELS,
                      seed: int = 0) -> np.ndarray:
  """Coordinates of (a sample of) a label's foreground voxels.

  Args:
    label: ``(X, Y, Z, C)`` label of one case.
    start_channel: the first foreground channel (1 for one-hot labels
      whose channel 0 is the background).
    max_voxels: the most coordinates kept, drawn without replacement.
    seed: seed of that draw.

  Returns:
    int64 ``(M, 3)`` voxel coordinates, ``M ≤ max_voxels`` (0 rows for an
    empty label).
  """
  label = np.asarray(label)
  if label.ndim != 4:
    raise ValueError(f"label must be (X, Y, Z, C), got shape {label.shape}")
  voxels = np.argwhere((label[..., start_channel:] > 0).any(axis=-1))
  if len(voxels) > max_voxels:
    keep = np.random.default_rng(seed).choice(len(voxels), max_voxels,
                                               replace=False)
    voxels = voxels[np.sort(keep)]
  return voxels


def case_foreground(labels: Sequence, rows: Sequence[int]
                    ) -> list[np.ndarray]:
  """``foreground_voxels`` of the cases ``rows``, indexed by case.

  Each sample is drawn with the case's row as its seed, so every process
  and every resumed run has the same; the other cases get none.

  Args:
    labels: per case, ``(X, Y, Z, C)`` labels (``Dataset.labels``); one
      channel is the foreground, several are one-hot with the background
      first.
    rows: the cases patches will be drawn from.

  Returns:
    One int64 ``(M, 3)`` array per case of ``labels``.
  """
  rows = {int(row) for row in rows}
  start_channel = 0 if labels[0].shape[-1] == 1 else 1
  return [foreground_voxels(labels[row], start_channel=start_channel,
                            seed=row)
          if row in rows else np.zeros((0, 3), np.int64)
          for row in range(len(labels))]


def patch_corners(case_shapes: Sequence[Sequence[int]],
                  foreground: Sequence[np.ndarray], indices: Sequence[int], *,
                  patch_size: Sequence[int], batch_size: int,
                  foreground_fraction: float, seed: int, epoch: int,
                  flip_axes: Sequence[int] = ()
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The epoch's patches: which case, where, and which flips.

  Args:
    case_shapes: spatial ``(X, Y, Z)`` of every case.
    foreground: per case, ``foreground_voxels`` of its label.
    indices: the training cases (rows of ``case_shapes``).
    patch_size: ``(X, Y, Z)`` of a patch.
    batch_size: patches per batch; a last partial batch is dropped.
    foreground_fraction: share of each batch centred on foreground.
    seed, epoch: the draws' seed.
    flip_axes: spatial axes each flipped with probability 1/2 per patch.

  Returns:
    ``(cases, corners, flips)``: int ``(P,)`` case rows, int ``(P, 3)``
    first voxels of the patches in case coordinates (negative or past the
    end where the case is smaller than the patch), bool
    ``(P, len(flip_axes))``; ``P`` a multiple of ``batch_size``.
  """
  patch = np.asarray(patch_size, np.int64)
  rng = np.random.default_rng((seed, epoch))
  order = rng.permutation(np.asarray(indices, np.int64))
  order = order[:len(order) - len(order) % batch_size]
  forced_from = int(round(batch_size * (1 - foreground_fraction)))
  corners = np.empty((len(order), 3), np.int64)
  for i, case in enumerate(order):
    shape = np.asarray(case_shapes[case], np.int64)
    short = np.maximum(patch - shape, 0)
    lowest = -(short // 2)
    highest = shape + short // 2 + short % 2 - patch
    voxels = foreground[case]
    if i % batch_size >= forced_from and len(voxels):
      centre = voxels[rng.integers(len(voxels))]
      corners[i] = np.clip(centre - patch // 2, lowest, highest)
    else:
      corners[i] = [rng.integers(lo, hi + 1)
                    for lo, hi in zip(lowest, highest)]
  flips = rng.random((len(order), len(flip_axes))) < 0.5
  return order, corners, flips


def crop(volume, corner: Sequence[int], patch_size: Sequence[int]
         ) -> np.ndarray:
  """``volume[corner : corner + patch_size]``, zero where it lies outside.

  Args:
    volume: ``(X, Y, Z, C)`` array-like (a memory map is read only inside
      the patch).
    corner: the patch's first voxel, possibly negative.
    patch_size: ``(X, Y, Z)``.

  Returns:
    float32 ``(*patch_size, C)``.
  """
  out = np.zeros((*patch_size, volume.shape[-1]), np.float32)
  source, target = [], []
  for start, side, size in zip(corner, patch_size, volume.shape[:3]):
    lo, hi = max(start, 0), min(start + side, size)
    source.append(slice(lo, hi))
    target.append(slice(lo - start, hi - start))
  out[tuple(target)] = volume[tuple(source)]
  return out


def iterate_patches(arrays: Sequence[Sequence], foreground: Sequence,
                    indices: Sequence[int], *, patch_size: Sequence[int],
                    batch_size: int, foreground_fraction: float = 1 / 3,
                    seed: int, epoch: int, flip_axes: Sequence[int] = ()
                    ) -> Iterator[tuple[np.ndarray, ...]]:
  """Yields batches of patches, prepared in a background thread.

  Args:
    arrays: per-case ``(X, Y, Z, C)`` arrays cropped together: e.g.
      ``(images, labels)``, or ``(images, labels, tubes)`` where a loss
      needs a per-case target computed on the whole label (a patch's own
      skeleton would be wrong at its borders).
    foreground: per case, ``foreground_voxels`` of its label.
    indices: the training cases.
    patch_size, batch_size, foreground_fraction, seed, epoch, flip_axes:
      as ``patch_corners``.

  Returns:
    An iterator of tuples of float32 ``(batch_size, *patch_size, C)``
    batches, one per entry of ``arrays``.
  """
  patch = _checked_patch_size(patch_size)
  if not 0 <= foreground_fraction <= 1:
    raise ValueError(f"foreground_fraction must be in [0, 1], got "
                     f"{foreground_fraction}")
  first = arrays[0]
  if any(len(a) != len(first) for a in arrays) or len(foreground) != len(
      first):
    raise ValueError("arrays and foreground must hold the same cases")
  shapes = [np.shape(case)[:3] for case in first]
  for column in arrays[1:]:
    for row, (shape, case) in enumerate(zip(shapes, column)):
      if np.shape(case)[:3] != shape:
        raise ValueError(f"case {row}: arrays of spatial shapes {shape} and "
                         f"{np.shape(case)[:3]} cannot be cropped together")
  cases, corners, flips = patch_corners(
      shapes, foreground, indices, patch_size=patch, batch_size=batch_size,
      foreground_fraction=foreground_fraction, seed=seed, epoch=epoch,
      flip_axes=flip_axes)
  flip_axes = tuple(flip_axes)

  def read(part):
    batches = []
    for column in arrays:
      patches = []
      for case, corner, flip in zip(cases[part], corners[part], flips[part]):
        axes = [a for a, f in zip(flip_axes, flip) if f]
        patches.append(np.flip(crop(column[case], corner, patch), axes))
      batches.append(np.stack(patches))
    return tuple(batches)

  return _prefetched(read(slice(s, s + batch_size))
                     for s in range(0, len(cases), batch_size))


def _checked_patch_size(patch_size) -> tuple[int, int, int]:
  patch = tuple(patch_size)
  if len(patch) != 3 or not all(
      isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p > 0
      for p in patch):
    raise ValueError(f"patch_size must be three positive ints (X, Y, Z), got "
                     f"{patch_size!r}")
  return tuple(int(p) for p in patch)
