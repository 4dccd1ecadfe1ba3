"""Vessel trees: tubes thinner than a voxel at their tips, stenoses.

A vessel tree branches as a branch does (``shapes.tree``), but its radii
are in voxels, and the image shows it at its partial volume: the share of
each voxel inside the tubes. Its finest generation is thinner than a voxel,
so it never reaches full contrast; at its stenoses the image keeps a small
share of the contrast over 1-3 voxels. The label is each tree whole,
through the stenoses: a network that follows the image breaks it there.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

from topojax.synthetic import shapes

# A vessel tree splits like a branch, over more generations, but its radii
# are in voxels, not fractions of the side: what makes it hard is how its
# width compares with a voxel, whatever the volume's size. The radius falls
# geometrically from the root's to the finest generation's, which is
# thinner than a voxel (diameter 0.6-0.9): such a tube fills a voxel only in
# part, and the image shows it at that share of the contrast (partial
# volume, sampled on a grid _SUPERSAMPLE times finer). Lengths are fractions
# of the side, as for branches: at 96³ the root is 12-16 voxels long.
_LENGTH = (0.12, 0.16)
_SHRINK = (0.75, 0.88)
_ROOT_RADIUS = (1.8, 2.4)  # Root, in voxels.
_TIP_RADIUS = (0.3, 0.45)  # Finest generation, in voxels.
_GENERATIONS = (4, 5)
# Smallest side of a volume with vessels: their radii do not shrink with
# the volume, so a smaller one has no room for a tree of 4-5 generations.
MIN_SIDE = 64
# Stenoses: stretches of a vessel (radius >= _STENOSIS_MIN_RADIUS voxels)
# where the image keeps only a share _STENOSIS_CONTRAST of the vessel's
# contrast over 1-3 voxels of its length, away from its ends; the label
# runs through them.
_STENOSES = (1, 3)  # Per tree.
_STENOSIS_LENGTH = (1.0, 3.0)  # Voxels along the centre line.
_STENOSIS_CONTRAST = (0.0, 0.2)
_STENOSIS_MIN_RADIUS = 1.0
_SUPERSAMPLE = 3
# A label voxel is one whose centre lies within max(radius, this) of the
# centre line: every voxel the line passes through has its centre within
# half a diagonal, so the thinnest tube's label is still one 26-connected
# chain.
_LABEL_MIN_RADIUS = math.sqrt(3) / 2
# Unlabelled fragments beside vessels (shapes.fragment): as thin as the
# trees' middle generations, in voxels.
FRAGMENT_RADIUS = (0.6, 1.2)


def draw_tree(rng, size: float):
  """A vessel tree centred on the origin, and its stenoses.

  Returns:
    ``(segments, stenoses, radius)``: ``segments`` as ``shapes.tree``'s;
    ``stenoses`` ``(segment index, centre, length, contrast)``: the stretch
    of that segment centred ``centre`` voxels from its start, ``length``
    voxels long, where the image keeps the share ``contrast`` of the
    vessel's contrast; ``radius`` bounds the tree.
  """
  generations = int(rng.integers(_GENERATIONS[0],
                                 _GENERATIONS[1] + 1))
  radii = np.geomspace(rng.uniform(*_ROOT_RADIUS),
                       rng.uniform(*_TIP_RADIUS), generations)
  segments, bound = shapes.tree(rng, rng.uniform(*_LENGTH) * size, radii,
                          shrink=_SHRINK)
  # A stenosis sits on a segment long enough to keep a voxel of tube on
  # either side of it, so that it narrows a vessel, not a junction.
  candidates = [i for i, (start, end, radius) in enumerate(segments)
                if radius >= _STENOSIS_MIN_RADIUS
                and np.linalg.norm(end - start) >= _STENOSIS_LENGTH[1] + 4]
  count = min(len(candidates),
              int(rng.integers(_STENOSES[0], _STENOSES[1] + 1)))
  stenoses = []
  for i in rng.choice(candidates, size=count, replace=False):
    start, end, _ = segments[i]
    stretch = rng.uniform(*_STENOSIS_LENGTH)
    span = np.linalg.norm(end - start)
    centre = rng.uniform(stretch / 2 + 2, span - stretch / 2 - 2)
    stenoses.append((int(i), float(centre), float(stretch),
                     float(rng.uniform(*_STENOSIS_CONTRAST))))
  return segments, stenoses, bound


def _segment_box(start, end, reach: float, shape) -> tuple[slice, ...]:
  """The voxels within ``reach`` of a segment's bounding box, clipped."""
  low = np.floor(np.minimum(start, end) - reach).astype(int)
  high = np.ceil(np.maximum(start, end) + reach).astype(int) + 1
  return tuple(slice(max(lo, 0), min(hi, n))
               for lo, hi, n in zip(low, high, shape))


def _along_and_across(points, start, end):
  """Each point's distance along a segment's line from ``start`` and from
  the segment (nearest point, clipped to the ends), both ``points.shape[1:]``.
  """
  axis = end - start
  span = np.linalg.norm(axis)
  offset = points - start.reshape((3,) + (1,) * (points.ndim - 1))
  along = np.tensordot(axis / span, offset, 1)
  nearest = np.clip(along, 0, span)
  across = np.sqrt(((offset - (axis / span).reshape(offset.shape[:1] + (1,) * (
      points.ndim - 1)) * nearest) ** 2).sum(axis=0))
  return along, across


def tube_label(shape, segments) -> np.ndarray:
  """The label of a tree of tubes: the voxels whose centre lies within
  ``max(radius, _LABEL_MIN_RADIUS)`` of some segment, ``shape`` bool.

  Args:
    shape: ``(X, Y, Z)`` of the volume.
    segments: ``(start, end, radius)`` in voxel coordinates of the volume.
  """
  label = np.zeros(shape, bool)
  for start, end, radius in segments:
    reach = max(radius, _LABEL_MIN_RADIUS)
    box = _segment_box(start, end, reach + 1, shape)
    centres = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) for b in box],
                                   indexing="ij")).astype(np.float32)
    label[box] |= _along_and_across(centres, start, end)[1] <= reach
  return label


def tube_contrast(shape, segments, stenoses=()) -> np.ndarray:
  """The noise-free contrast of a tree of tubes, ``shape`` float32 in
  [0, 1]: the share of each voxel inside the tubes (sampled
  ``_SUPERSAMPLE``³ times per voxel), times the kept contrast inside a
  stenosis.

  Args:
    shape: ``(X, Y, Z)`` of the volume.
    segments: ``(start, end, radius)`` in voxel coordinates of the volume.
    stenoses: as ``draw_tree``'s.
  """
  n = _SUPERSAMPLE
  boxes = [_segment_box(start, end, radius + 1, shape)
           for start, end, radius in segments]
  # Everything happens in the union of the segments' boxes, sampled on a
  # grid n times finer: voxel i spans [i - 0.5, i + 0.5].
  low = [min(box[axis].start for box in boxes) for axis in range(3)]
  high = [max(max(box[axis].stop for box in boxes), low[axis])
          for axis in range(3)]
  fine = np.zeros([(h - l) * n for l, h in zip(low, high)], bool)
  offsets = (np.arange(n) + 0.5) / n - 0.5
  for (start, end, radius), box in zip(segments, boxes):
    samples = np.stack(np.meshgrid(
        *[(np.arange(b.start, b.stop)[:, None] + offsets).ravel()
          for b in box], indexing="ij")).astype(np.float32)
    fine[tuple(slice((b.start - l) * n, (b.stop - l) * n)
               for b, l in zip(box, low))] |= (
        _along_and_across(samples, start, end)[1] <= radius)
  contrast = np.zeros(shape, np.float32)
  sides = [h - l for l, h in zip(low, high)]
  contrast[tuple(slice(l, h) for l, h in zip(low, high))] = fine.reshape(
      sides[0], n, sides[1], n, sides[2], n).sum(
          axis=(1, 3, 5), dtype=np.float32) / n ** 3
  for index, centre, stretch, kept in stenoses:
    start, end, radius = segments[index]
    box = _segment_box(start, end, radius + 2, shape)
    points = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) for b in box],
                                  indexing="ij")).astype(np.float32)
    along, across = _along_and_across(points, start, end)
    inside = (np.abs(along - centre) <= stretch / 2) & (across <= radius + 1)
    contrast[box] = np.where(inside, contrast[box] * kept, contrast[box])
  return contrast


def place_tree(rng, shape, size, occupied):
  """Draws a vessel tree and puts it at a random centre and orientation
  where it fits, as ``shapes.place`` does a shape.

  Returns:
    ``(label, contrast)`` of ``tube_label`` and ``tube_contrast``, or
    ``None`` when no try fitted.
  """
  segments, stenoses, radius = draw_tree(rng, size)
  extent = np.asarray(shape, dtype=float)
  low = np.minimum(radius + 1, extent / 2 - 0.5)
  for _ in range(shapes.TRIES):
    centre = rng.uniform(low, extent - 1 - low)
    rotation = Rotation.random(rng=rng).as_matrix()
    placed = [(rotation @ start + centre, rotation @ end + centre, r)
              for start, end, r in segments]
    label = tube_label(shape, placed)
    if label.any() and not (label & occupied).any():
      return label, tube_contrast(shape, placed, stenoses)
  return None
