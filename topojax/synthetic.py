"""A synthetic segmentation task with known topology, in the MSD layout.

The default task runs anywhere: small volumes that a 3D U-Net trains on in
minutes on a CPU, yet hard in the way the paper cares about (Fu et al., SPIE
Medical Imaging 2023, §1). Each case holds

* ``num_objects`` labelled objects (smooth star-shaped blobs, ellipsoids,
  tori, rings: thin tori with a narrow neck, or branches: trees of thin
  tubes), at random orientations, separate from each other, so the label has
  exactly that many 26-connected components, one tunnel per torus or ring
  and no cavity;
* ``num_distractors`` unlabelled bright spheres a little smaller and dimmer
  than the objects (beside branches, thin straight tube fragments instead):
  locally they look like object, so a network trained with Dice alone tends
  to keep bits of them as small spurious components;
* partial-volume blur, a smooth multiplicative bias field and heavy Gaussian
  noise.

Sizes are fractions of the smallest side of the volume, so a task at another
``shape`` looks the same, only finer. Case ``i`` is drawn from its own
generator seeded by ``(seed, i)``: the same config gives the same files, and
more cases only add files.

Three tasks are built in (``TASKS``): ``"components"``, the default, where
the difficulty is spurious components, ``"loops"``, rings whose narrow
neck a network readily breaks (a lost tunnel) and whose hole it may fill,
and ``"branches"``, thin branching trees among unlabelled tube fragments,
whose thin tips a network breaks off or loses and whose fragments it keeps.

``generate_task(out_dir, config)`` writes ``dataset.json``, ``imagesTr/``
(float32) and ``labelsTr/`` (uint8, label 1 = object) with an anisotropic,
rotated affine; ``dataset.json`` also records the config and each case's
``num_objects``. ``save_preview(task_dir, path)`` draws the first cases.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation
import tqdm

from topojax import metrics

KINDS = ("blob", "ellipsoid", "torus", "ring", "branch", "vessel")

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
_DISTRACTOR_RADIUS = (0.06, 0.1)
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
_FRAGMENT_RADIUS = (0.031, 0.05)
# Beside vessels, as thin as their middle generations, in voxels.
_VESSEL_FRAGMENT_RADIUS = (0.6, 1.2)
# A vessel tree splits like a branch, over more generations, but its radii
# are in voxels, not fractions of the side: what makes it hard is how its
# width compares with a voxel, whatever the volume's size. The radius falls
# geometrically from the root's to the finest generation's, which is
# thinner than a voxel (diameter 0.6-0.9): such a tube fills a voxel only in
# part, and the image shows it at that share of the contrast (partial
# volume, sampled on a grid _SUPERSAMPLE times finer). Lengths are fractions
# of the side, as for branches: at 96³ the root is 12-16 voxels long.
_VESSEL_LENGTH = (0.12, 0.16)
_VESSEL_SHRINK = (0.75, 0.88)
_VESSEL_RADIUS = (1.8, 2.4)  # Root, in voxels.
_VESSEL_TIP = (0.3, 0.45)  # Finest generation, in voxels.
_VESSEL_GENERATIONS = (4, 5)
# Smallest side of a volume with vessels: their radii do not shrink with
# the volume, so a smaller one has no room for a tree of 4-5 generations.
_VESSEL_MIN_SIDE = 64
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
_BACKGROUND = 0.2
_BLUR_SIGMA = 0.7  # Partial-volume blur, in voxels.
_GAP = 2  # Voxels kept free around every shape, so none touch.
_TRIES = 50  # Positions tried for one shape.
_ATTEMPTS = 20  # Draws of a case's objects before giving up.
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity.


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthConfig:
  """What the synthetic task looks like.

  Attributes:
    shape: ``(X, Y, Z)`` of every volume, in voxels.
    num_cases: number of labelled cases.
    kinds: object shapes to draw from, uniformly, among ``KINDS``;
      ``"vessel"`` needs sides of at least 64 voxels.
    num_objects: inclusive ``(min, max)`` labelled objects per case.
    num_distractors: inclusive ``(min, max)`` unlabelled bright blobs per
      case; thin tube fragments instead when ``kinds`` holds ``"branch"``.
    distractor_intensity: ``(min, max)`` of a distractor's intensity, drawn
      uniformly; objects have 1, background 0.2.
    noise: standard deviation of the Gaussian noise, in the units of the
      intensities (object 1, background 0.2).
    bias: amplitude of the smooth multiplicative bias field; intensities are
      scaled by a factor within ``[1 - bias, 1 + bias]``.
    spacing: voxel size ``(X, Y, Z)`` in mm written to the affine.
    seed: seed of the whole task.
  """
  shape: tuple[int, int, int] = (32, 32, 32)
  num_cases: int = 60
  kinds: tuple[str, ...] = ("ellipsoid",)
  num_objects: tuple[int, int] = (1, 1)
  num_distractors: tuple[int, int] = (2, 4)
  distractor_intensity: tuple[float, float] = (0.8, 1.0)
  noise: float = 0.35
  bias: float = 0.3
  spacing: tuple[float, float, float] = (1.0, 1.0, 1.5)
  seed: int = 0

  def __post_init__(self):
    for name in ("shape", "kinds", "num_objects", "num_distractors",
                 "distractor_intensity", "spacing"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if len(self.shape) != 3 or min(self.shape) < 8:
      raise ValueError(f"shape must be three sides of at least 8 voxels, got "
                       f"{self.shape}")
    if self.num_cases < 1:
      raise ValueError(f"num_cases must be positive, got {self.num_cases}")
    if not self.kinds or any(k not in KINDS for k in self.kinds):
      raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got "
                       f"{self.kinds}")
    if "vessel" in self.kinds and min(self.shape) < _VESSEL_MIN_SIDE:
      raise ValueError(f"kinds with 'vessel' need a shape of at least "
                       f"{_VESSEL_MIN_SIDE} voxels a side, got {self.shape}")
    for name, low in (("num_objects", 1), ("num_distractors", 0)):
      bounds = getattr(self, name)
      if len(bounds) != 2 or bounds[0] < low or bounds[1] < bounds[0]:
        raise ValueError(f"{name} must be an inclusive (min, max) range with "
                         f"min >= {low}, got {bounds}")
    if len(self.distractor_intensity) != 2 or not (
        0 <= self.distractor_intensity[0] <= self.distractor_intensity[1]):
      raise ValueError(f"distractor_intensity must be a (min, max) range with "
                       f"0 <= min <= max, got {self.distractor_intensity}")
    if self.noise < 0 or not 0 <= self.bias < 1:
      raise ValueError(f"noise must be >= 0 and bias in [0, 1), got "
                       f"noise={self.noise}, bias={self.bias}")
    if len(self.spacing) != 3 or min(self.spacing) <= 0:
      raise ValueError(f"spacing must be three positive sizes in mm, got "
                       f"{self.spacing}")
    if self.seed < 0:
      raise ValueError(f"seed must be non-negative, got {self.seed}")


# The built-in tasks, at the default 32³ (pass another shape with
# dataclasses.replace):
# * components: one ellipsoid among 2-4 bright unlabelled distractors; a Dice
#   network keeps bits of them, spurious components (|Δβ0|);
# * loops: a ring with a narrow neck, fainter than the rest of the tube once
#   blurred, and at most one distractor; a Dice network breaks the neck,
#   losing the tunnel (|Δβ1|), or fills the hole;
# * branches: one tree of thin tubes (radius 1.6-1.9 voxels at the root, 1 at
#   the tips, 3-4 generations), β = (1, 0, 0), among 1-3 unlabelled tube
#   fragments; a Dice network keeps fragments and breaks or loses thin
#   branches (|Δβ0|; experiments/README.md has how it was tuned).
# * vessels: 1-2 vessel trees at 96³ (radius about 2 voxels at the root,
#   below half a voxel at the finest generation, 4-5 generations), each with
#   1-3 stenoses where the image drops toward the background over 1-3
#   voxels, at most one unlabelled tube fragment; the label runs through
#   the stenoses, β = (trees, 0, 0). A Dice network breaks the trees at the
#   stenoses and loses the finest branches (breaks, clDice).
TASKS = {
    "components": SynthConfig(),
    "loops": SynthConfig(kinds=("ring",), num_distractors=(0, 1)),
    "branches": SynthConfig(kinds=("branch",), num_distractors=(1, 3)),
    "vessels": SynthConfig(shape=(96, 96, 96), kinds=("vessel",),
                           num_objects=(1, 2), num_distractors=(0, 1)),
}


def affine(config: SynthConfig) -> np.ndarray:
  """The ``(4, 4)`` voxel-to-world matrix of every case, in mm.

  Voxel sizes ``config.spacing``, rotated 15° about the world z axis and
  centred on the world origin: not the identity, as real scans are not.
  """
  rotation = Rotation.from_euler("z", 15, degrees=True).as_matrix()
  matrix = np.eye(4)
  matrix[:3, :3] = rotation @ np.diag(config.spacing)
  matrix[:3, 3] = -matrix[:3, :3] @ ((np.array(config.shape) - 1) / 2)
  return matrix


def _draw_shape(kind: str, rng: np.random.Generator, size: float):
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
    segments, bound = _tree(rng, rng.uniform(*_BRANCH_LENGTH) * size, radii,
                            shrink=_BRANCH_SHRINK)
    return lambda u: _near_segments(u, segments), bound
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


def _place(rng, grid, inside, radius, occupied) -> np.ndarray | None:
  """Puts a shape at a random centre and orientation where it fits.

  Args:
    rng: random generator.
    grid: ``(3, X, Y, Z)`` voxel coordinates.
    inside: the shape's membership test, from ``_draw_shape``.
    radius: the shape's bounding radius, in voxels; keeps it in the volume.
    occupied: ``(X, Y, Z)`` bool, voxels the shape must not touch.

  Returns:
    The shape's ``(X, Y, Z)`` bool mask, or ``None`` when no try fitted.
  """
  shape = np.asarray(grid.shape[1:], dtype=float)
  low = np.minimum(radius + 1, shape / 2 - 0.5)
  for _ in range(_TRIES):
    centre = rng.uniform(low, shape - 1 - low).astype(np.float32)
    rotation = Rotation.random(rng=rng).as_matrix().astype(np.float32)
    offsets = grid - centre[:, None, None, None]
    mask = inside(np.tensordot(rotation.T, offsets, 1))
    if mask.any() and not (mask & occupied).any():
      return mask
  return None


def _near_segments(u, segments) -> np.ndarray:
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


def _tree(rng, length: float, radii, *, shrink):
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


def _vessel_tree(rng, size: float):
  """A vessel tree centred on the origin, and its stenoses.

  Returns:
    ``(segments, stenoses, radius)``: ``segments`` as ``_tree``;
    ``stenoses`` ``(segment index, centre, length, contrast)``: the stretch
    of that segment centred ``centre`` voxels from its start, ``length``
    voxels long, where the image keeps the share ``contrast`` of the
    vessel's contrast; ``radius`` bounds the tree.
  """
  generations = int(rng.integers(_VESSEL_GENERATIONS[0],
                                 _VESSEL_GENERATIONS[1] + 1))
  radii = np.geomspace(rng.uniform(*_VESSEL_RADIUS),
                       rng.uniform(*_VESSEL_TIP), generations)
  segments, bound = _tree(rng, rng.uniform(*_VESSEL_LENGTH) * size, radii,
                          shrink=_VESSEL_SHRINK)
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


def _tube_label(shape, segments) -> np.ndarray:
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


def _tube_contrast(shape, segments, stenoses=()) -> np.ndarray:
  """The noise-free contrast of a tree of tubes, ``shape`` float32 in
  [0, 1]: the share of each voxel inside the tubes (sampled
  ``_SUPERSAMPLE``³ times per voxel), times the kept contrast inside a
  stenosis.

  Args:
    shape: ``(X, Y, Z)`` of the volume.
    segments: ``(start, end, radius)`` in voxel coordinates of the volume.
    stenoses: as ``_vessel_tree``'s.
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


def _place_vessels(rng, shape, size, occupied):
  """Draws a vessel tree and puts it at a random centre and orientation
  where it fits, as ``_place`` does a shape.

  Returns:
    ``(label, contrast)`` of ``_tube_label`` and ``_tube_contrast``, or
    ``None`` when no try fitted.
  """
  segments, stenoses, radius = _vessel_tree(rng, size)
  extent = np.asarray(shape, dtype=float)
  low = np.minimum(radius + 1, extent / 2 - 0.5)
  for _ in range(_TRIES):
    centre = rng.uniform(low, extent - 1 - low)
    rotation = Rotation.random(rng=rng).as_matrix()
    placed = [(rotation @ start + centre, rotation @ end + centre, r)
              for start, end, r in segments]
    label = _tube_label(shape, placed)
    if label.any() and not (label & occupied).any():
      return label, _tube_contrast(shape, placed, stenoses)
  return None


def _fragment(rng, size: float, radii: tuple[float, float]):
  """An unlabelled straight tube along x, centred on the origin.

  Args:
    rng: random generator.
    size: smallest side of the volume, in voxels.
    radii: ``(min, max)`` of its radius, in voxels.

  Returns:
    ``(inside, radius)`` as ``_draw_shape``.
  """
  half = rng.uniform(*_FRAGMENT_LENGTH) * size / 2
  radius = rng.uniform(*radii)
  segment = (np.array([-half, 0.0, 0.0]), np.array([half, 0.0, 0.0]), radius)
  return lambda u: _near_segments(u, [segment]), half + radius


def _sphere(radius: float):
  return lambda u: (u ** 2).sum(axis=0) <= radius ** 2


def _bias_field(rng, grid, shape) -> np.ndarray:
  """A smooth field in [-1, 1]: three waves of about one cycle per volume."""
  field = 0.0
  for _ in range(3):
    frequency = rng.uniform(-1, 1, size=3) / np.asarray(shape)
    phase = rng.uniform(0, 2 * math.pi)
    field = field + np.cos(2 * math.pi * np.tensordot(frequency, grid, 1)
                           + phase)
  return field / 3


def _surroundings(mask: np.ndarray) -> np.ndarray:
  """``mask`` grown by ``_GAP`` voxels (26-neighbourhood)."""
  if not mask.any():
    return mask
  return ndimage.binary_dilation(mask, structure=_FULL, iterations=_GAP)


def make_case(config: SynthConfig, index: int
              ) -> tuple[np.ndarray, np.ndarray, int]:
  """Draws case ``index`` of the task.

  Args:
    config: the task.
    index: case number; the same config and index give the same case
      (``num_cases`` plays no part).

  Returns:
    ``(image, label, num_objects)``: image ``config.shape`` float32, label
    ``config.shape`` uint8 in {0, 1} with Betti numbers exactly
    ``(num_objects, tori and rings, 0)``: ``num_objects`` 26-connected
    components, one tunnel per torus or ring, no cavity.
  """
  rng = np.random.default_rng((config.seed, index))
  shape, size = config.shape, min(config.shape)
  grid = np.indices(shape, dtype=np.float32)
  num_objects = int(rng.integers(config.num_objects[0],
                                 config.num_objects[1] + 1))
  num_distractors = int(rng.integers(config.num_distractors[0],
                                     config.num_distractors[1] + 1))
  # Drawing again until the objects fit and digitise to exactly
  # num_objects components is what makes the topology known.
  for _ in range(_ATTEMPTS):
    label = np.zeros(shape, dtype=bool)
    clean = np.zeros(shape, dtype=np.float32)
    loops = 0
    for _ in range(num_objects):
      kind = config.kinds[rng.integers(len(config.kinds))]
      loops += kind in ("torus", "ring")
      if kind == "vessel":
        placed = _place_vessels(rng, shape, size, _surroundings(label))
        if placed is None:
          break
        mask, contrast = placed
      else:
        inside, radius = _draw_shape(kind, rng, size)
        mask = _place(rng, grid, inside, radius, _surroundings(label))
        if mask is None:
          break
        contrast = mask
      label |= mask
      clean = np.maximum(clean, contrast)
    else:
      # A neck digitised too thin would cut a ring, two branches of a tree
      # that touch would close a loop: every Betti number is checked.
      if metrics.betti_numbers(label) == (num_objects, loops, 0):
        break
  else:
    raise ValueError(f"could not fit {num_objects} separate objects of kinds "
                     f"{config.kinds} into shape {shape}; lower num_objects "
                     "or enlarge shape")

  occupied = label.copy()
  # Beside branches and vessels, distractors are tube fragments: what a
  # tree's broken tip looks like, and what a vessel tree's unlabelled
  # neighbours are.
  tubes = "branch" in config.kinds or "vessel" in config.kinds
  for _ in range(num_distractors):
    if tubes:
      inside, radius = _fragment(
          rng, size, _VESSEL_FRAGMENT_RADIUS if "vessel" in config.kinds
          else tuple(r * size for r in _FRAGMENT_RADIUS))
    else:
      radius = rng.uniform(*_DISTRACTOR_RADIUS) * size
      inside = _sphere(radius)
    mask = _place(rng, grid, inside, radius, _surroundings(occupied))
    if mask is None:  # No room left: fewer distractors, never an overlap.
      continue
    clean[mask] = rng.uniform(*config.distractor_intensity)
    occupied |= mask

  image = ndimage.gaussian_filter(clean + _BACKGROUND, _BLUR_SIGMA)
  image *= 1 + config.bias * _bias_field(rng, grid, shape)
  image += rng.normal(scale=config.noise, size=shape)
  return image.astype(np.float32), label.astype(np.uint8), num_objects


def generate_task(out_dir: str | os.PathLike,
                  config: SynthConfig = SynthConfig(), *,
                  overwrite: bool = False, progress: bool = True
                  ) -> pathlib.Path:
  """Writes a complete MSD-layout task folder of synthetic cases.

  Args:
    out_dir: the task folder to create, e.g. ``data/Task00_Synthetic``.
    config: the task.
    overwrite: write into a folder that is not empty, replacing the files of
      the same names.
    progress: show a progress bar.

  Returns:
    ``out_dir``.

  Raises:
    FileExistsError: ``out_dir`` exists and is not empty, without
      ``overwrite``, or is a file.
  """
  root = pathlib.Path(out_dir)
  if root.exists() and not root.is_dir():
    raise FileExistsError(f"out_dir {root} exists and is a file")
  if root.is_dir() and any(root.iterdir()) and not overwrite:
    raise FileExistsError(f"out_dir {root} exists and is not empty; pass "
                          "overwrite=True (--overwrite) to write into it")
  (root / "imagesTr").mkdir(parents=True, exist_ok=True)
  (root / "labelsTr").mkdir(exist_ok=True)
  # dataset.json goes last: a folder interrupted mid-way has none and cannot
  # be mistaken for a complete task (an old one would list half-new files).
  (root / "dataset.json").unlink(missing_ok=True)

  matrix = affine(config)
  training = []
  for index in tqdm.tqdm(range(config.num_cases), desc="synthesising",
                         unit="case", disable=not progress):
    image, label, num_objects = make_case(config, index)
    name = f"synth_{index:03d}.nii.gz"
    for folder, volume in (("imagesTr", image), ("labelsTr", label)):
      nifti = nib.Nifti1Image(volume, matrix)
      nifti.header.set_xyzt_units("mm")
      nifti.set_qform(matrix, code=1)  # Scanner coordinates.
      nifti.set_sform(matrix, code=1)
      nib.save(nifti, root / folder / name)
    training.append({"image": f"./imagesTr/{name}",
                     "label": f"./labelsTr/{name}",
                     "num_objects": num_objects})

  spec = {
      "name": "Synthetic",
      "description": "topojax synthetic topology task: labelled objects, "
                     "unlabelled bright distractors, blur, bias and noise",
      "tensorImageSize": "3D",
      "modality": {"0": "synthetic"},
      "labels": {"0": "background", "1": "object"},
      "numTraining": config.num_cases,
      "numTest": 0,
      "training": training,
      "test": [],
      "synthetic": dataclasses.asdict(config),
  }
  (root / "dataset.json").write_text(json.dumps(spec, indent=1))
  return root


def save_preview(task_dir: str | os.PathLike, path: str | os.PathLike, *,
                 num_cases: int = 4, overwrite: bool = False) -> pathlib.Path:
  """Draws the first cases of a task as a PNG.

  Top row: the axial slice through each case's label centre, label outline
  in red. Bottom row: the maximum over Z of the image smoothed by a Gaussian
  of 1 voxel, where the noise fades and every bright blob, labelled or not,
  shows.

  Args:
    task_dir: an MSD task folder.
    path: the PNG to write.
    num_cases: how many cases to draw.
    overwrite: replace an existing file.

  Returns:
    ``path``.
  """
  # Imported here: the preview is the only use of plotting in data handling.
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  from topojax import data

  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  task = data.read_task(task_dir)
  cases = task.cases[:num_cases]
  figure, axes = plt.subplots(2, len(cases), squeeze=False,
                              figsize=(2.6 * len(cases), 5.4))
  for column, case in enumerate(cases):
    image, label, _ = data.load_case(task, case)
    image = image[..., 0]
    z = (int(round(ndimage.center_of_mass(label)[2])) if label.any()
         else label.shape[2] // 2)
    views = ((image[:, :, z], label[:, :, z], f"{case.case_id}, z={z}"),
             (ndimage.gaussian_filter(image, 1.0).max(axis=2),
              label.max(axis=2), "smoothed, max over Z"))
    for row, (picture, outline, title) in enumerate(views):
      ax = axes[row, column]
      # Transposed so that X runs left to right and Y bottom to top.
      ax.imshow(picture.T, cmap="gray", origin="lower")
      if outline.any():
        ax.contour(outline.T, levels=[0.5], colors="red", linewidths=0.8)
      ax.set_title(title, fontsize=9)
      ax.set_axis_off()
  figure.suptitle(f"{task.name}: image with label outline (red)")
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path
