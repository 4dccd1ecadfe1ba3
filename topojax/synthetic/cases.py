"""One synthetic case: objects placed apart, distractors, blur, bias, noise.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from topojax import metrics
from topojax.synthetic import shapes
from topojax.synthetic import vessels
from topojax.synthetic.config import SynthConfig

_BACKGROUND = 0.2
_BLUR_SIGMA = 0.7  # Partial-volume blur, in voxels.
_GAP = 2  # Voxels kept free around every shape, so none touch.
_ATTEMPTS = 20  # Draws of a case's objects before giving up.
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity.


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
        placed = vessels.place_tree(rng, shape, size, _surroundings(label))
        if placed is None:
          break
        mask, contrast = placed
      else:
        inside, radius = shapes.draw_shape(kind, rng, size)
        mask = shapes.place(rng, grid, inside, radius, _surroundings(label))
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
      inside, radius = shapes.fragment(
          rng, size, vessels.FRAGMENT_RADIUS if "vessel" in config.kinds
          else tuple(r * size for r in shapes.FRAGMENT_RADIUS))
    else:
      radius = rng.uniform(*shapes.DISTRACTOR_RADIUS) * size
      inside = shapes.sphere(radius)
    mask = shapes.place(rng, grid, inside, radius, _surroundings(occupied))
    if mask is None:  # No room left: fewer distractors, never an overlap.
      continue
    clean[mask] = rng.uniform(*config.distractor_intensity)
    occupied |= mask

  image = ndimage.gaussian_filter(clean + _BACKGROUND, _BLUR_SIGMA)
  image *= 1 + config.bias * _bias_field(rng, grid, shape)
  image += rng.normal(scale=config.noise, size=shape)
  return image.astype(np.float32), label.astype(np.uint8), num_objects
