"""The labelled shapes and unlabelled distractors of the synthetic tasks.

Each ``draw_shape`` returns a membership test in the shape's own frame and
a bounding radius; ``place`` puts it at a random centre and orientation
where it touches nothing else. Sizes are fractions of the smallest side of
the volume (``size``), so a task at another shape looks the same, only
finer.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

# Object sizes as fractions of the smallest side of the volume. At 32³ an
# ellipsoid's semi-axes span 4-8 voxels, a distractor's radius 2-3 voxels.
_ELLIPSOID_AXES = (0.12, 0.25)
_BLOB_RADIUS = (0.14, 0.22)
_BLOB_WOBBLE = 0.3  # Largest relative change of the blob radius.
_TORUS_MAJOR = (0.17, 0.24)
_TORUS_MINOR = (0.06, 0.09)
# A ring's tube narrows from _RING_MINOR to _RING_NECK over about
# _RING_NECK_WIDTH radians: at 32³ from 2.2-2.9 voxels to about 1.
_RING_MAJOR = (0.2, 0.26)
_RING_MINOR = (0.07, 0.09)
_RING_NECK = 0.035
_RING_NECK_WIDTH = 0.5
DISTRACTOR_RADIUS = (0.06, 0.1)
# A branch is a tree of straight tubes: a root segment, then each tip splits
# in two, over _BRANCH_GENERATIONS segments from root to tip. At 32³ the root
# is 7-9 voxels long and 1.6-1.9 voxels in radius; each generation is shorter
# by _BRANCH_SHRINK and thinner, down to a radius of _BRANCH_TIP (1 voxel).
_BRANCH_LENGTH = (0.22, 0.28)
_BRANCH_SHRINK = (0.65, 0.8)
_BRANCH_RADIUS = (0.05, 0.06)
_BRANCH_TIP = 0.031
_BRANCH_ANGLE = (0.45, 0.8)  # Between a child and its parent, in radians.
_BRANCH_GENERATIONS = (3, 4)
# Unlabelled fragments of tube beside a branch (instead of spheres): straight,
# 5-10 voxels long at 32³, as thin as the branch's middle generations.
_FRAGMENT_LENGTH = (0.15, 0.3)
FRAGMENT_RADIUS = (0.031, 0.05)
TRIES = 50  # Positions tried for one shape.


def draw_shape(kind: str, rng: np.random.Generator, size: float):
  """Draws one shape centred on the origin.

  Args:
    kind: one of ``KINDS``.
    rng: random generator.
    size: smallest side of the volume, in voxels.

  Returns:
    ``(inside, radius)``: ``inside`` maps ``(3, ...)`` voxel offsets in the
    shape's own frame to a boolean mask; ``radius`` bounds the shape, in
    voxels.
  """
  if kind == "ellipsoid":
    axes = rng.uniform(*_ELLIPSOID_AXES, size=3) * size
    return (lambda u: sum((ui / a) ** 2 for ui, a in zip(u, axes)) <= 1,
            axes.max())
  if kind == "torus":
    major = rng.uniform(*_TORUS_MAJOR) * size
    minor = rng.uniform(*_TORUS_MINOR) * size
    return (lambda u: (np.hypot(u[0], u[1]) - major) ** 2 + u[2] ** 2
            <= minor ** 2, major + minor)
  if kind == "ring":
    major = rng.uniform(*_RING_MAJOR) * size
    minor = rng.uniform(*_RING_MINOR) * size
    neck = _RING_NECK * size
    where = rng.uniform(-math.pi, math.pi)

    def inside(u):
      # Angle from the neck, wrapped to [-pi, pi).
      angle = (np.arctan2(u[1], u[0]) - where + math.pi) % (2 * math.pi)
      narrowing = np.exp(-0.5 * ((angle - math.pi) / _RING_NECK_WIDTH) ** 2)
      tube = minor - (minor - neck) * narrowing
      return (np.hypot(u[0], u[1]) - major) ** 2 + u[2] ** 2 <= tube ** 2

    return inside, major + minor
  if kind == "branch":
    generations = int(rng.integers(_BRANCH_GENERATIONS[0],
                                   _BRANCH_GENERATIONS[1] + 1))
    root_radius = rng.uniform(*_BRANCH_RADIUS) * size
    radii = np.linspace(root_radius, _BRANCH_TIP * size, generations)
    segments, bound = tree(rng, rng.uniform(*_BRANCH_LENGTH) * size, radii,
                            shrink=_BRANCH_SHRINK)
    return lambda u: near_segments(u, segments), bound
  # Star-shaped blob: the radius varies smoothly with direction and stays
  # positive, so the blob is one component without holes.
  radius = rng.uniform(*_BLOB_RADIUS) * size
  waves = rng.normal(size=(3, 3))
  waves /= np.linalg.norm(waves, axis=1, keepdims=True)
  weights = rng.dirichlet(np.ones(3)) * _BLOB_WOBBLE
  phases = rng.uniform(0, 2 * math.pi, size=3)

  def inside(u):
    distance = np.sqrt((u ** 2).sum(axis=0))
    direction = u / np.maximum(distance, 1e-6)
    wobble = sum(w * np.cos(2 * np.tensordot(v, direction, 1) + p)
                 for w, v, p in zip(weights, waves, phases))
    return distance <= radius * (1 + wobble)

  return inside, radius * (1 + _BLOB_WOBBLE)


def place(rng, grid, inside, radius, occupied) -> np.ndarray | None:
  """Puts a shape at a random centre and orientation where it fits.

  Args:
    rng: random generator.
    grid: ``(3, X, Y, Z)`` voxel coordinates.
    inside: the shape's membership test, from ``draw_shape``.
    radius: the shape's bounding radius, in voxels; keeps it in the volume.
    occupied: ``(X, Y, Z)`` bool, voxels the shape must not touch.

  Returns:
    The shape's ``(X, Y, Z)`` bool mask, or ``None`` when no try fitted.
  """
  shape = np.asarray(grid.shape[1:], dtype=float)
  low = np.minimum(radius + 1, shape / 2 - 0.5)
  for _ in range(TRIES):
    centre = rng.uniform(low, shape - 1 - low).astype(np.float32)
    rotation = Rotation.random(rng=rng).as_matrix().astype(np.float32)
    offsets = grid - centre[:, None, None, None]
    mask = inside(np.tensordot(rotation.T, offsets, 1))
    if mask.any() and not (mask & occupied).any():
      return mask
  return None


def near_segments(u, segments) -> np.ndarray:
  """Whether points lie within some segment's radius: a union of capsules.

  Args:
    u: ``(3, ...)`` points, in voxels.
    segments: ``(start, end, radius)`` triples, ``(3,)`` ends and radius in
      voxels.

  Returns:
    A bool array of ``u.shape[1:]``.
  """
  inside = np.zeros(u.shape[1:], dtype=bool)
  for start, end, radius in segments:
    offset = u - start.reshape((3,) + (1,) * (u.ndim - 1))
    axis = end - start
    # Nearest point of the segment: the projection onto its line, clipped
    # to the ends.
    t = np.clip(np.tensordot(axis, offset, 1) / axis.dot(axis), 0, 1)
    distance2 = ((offset - axis.reshape(offset.shape[:1] + (1,) * t.ndim)
                  * t) ** 2).sum(axis=0)
    inside |= distance2 <= radius ** 2
  return inside


def tree(rng, length: float, radii, *, shrink):
  """A random tree of straight tubes, centred on the origin.

  Each tip splits into two children in a random plane through its
  direction, one on each side, each turned by an angle in
  ``_BRANCH_ANGLE``, so siblings diverge and the tree is a tree: one
  component without loops, as long as no branch reaches another (the caller
  checks the Betti numbers and draws again if one does).

  Args:
    rng: random generator.
    length: of the root segment, in voxels.
    radii: tube radius of each generation, root first, in voxels.
    shrink: ``(min, max)`` ratio of a child's length to its parent's.

  Returns:
    ``(segments, radius)``: ``(start, end, radius)`` triples in voxels, root
    first and each generation after the one before, and a radius that bounds
    the tree.
  """
  tips = [(np.zeros(3), np.array([0.0, 0.0, 1.0]), length)]
  segments = []
  for radius in radii:
    grown = []
    for start, direction, segment_length in tips:
      end = start + direction * segment_length
      segments.append((start, end, float(radius)))
      # A unit vector across the direction, at a random angle around it.
      across = np.cross(direction, rng.normal(size=3))
      across /= np.linalg.norm(across)
      for side in (1, -1):
        angle = rng.uniform(*_BRANCH_ANGLE)
        child = math.cos(angle) * direction + side * math.sin(angle) * across
        grown.append((end, child / np.linalg.norm(child),
                      segment_length * rng.uniform(*shrink)))
    tips = grown
  points = np.array([p for start, end, _ in segments for p in (start, end)])
  centre = (points.min(axis=0) + points.max(axis=0)) / 2
  segments = [(start - centre, end - centre, r) for start, end, r in segments]
  bound = np.linalg.norm(points - centre, axis=1).max() + radii[0]
  return segments, bound


def fragment(rng, size: float, radii: tuple[float, float]):
  """An unlabelled straight tube along x, centred on the origin.

  Args:
    rng: random generator.
    size: smallest side of the volume, in voxels.
    radii: ``(min, max)`` of its radius, in voxels.

  Returns:
    ``(inside, radius)`` as ``draw_shape``.
  """
  half = rng.uniform(*_FRAGMENT_LENGTH) * size / 2
  radius = rng.uniform(*radii)
  segment = (np.array([-half, 0.0, 0.0]), np.array([half, 0.0, 0.0]), radius)
  return lambda u: near_segments(u, [segment]), half + radius


def sphere(radius: float):
  return lambda u: (u ** 2).sum(axis=0) <= radius ** 2
