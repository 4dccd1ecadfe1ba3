"""What a synthetic task looks like: ``SynthConfig``, the built-in ``TASKS``
and the voxel-to-world matrix of their cases."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.spatial.transform import Rotation

from topojax.synthetic import vessels

KINDS = ("blob", "ellipsoid", "torus", "ring", "branch", "vessel")


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
      case; thin tube fragments instead when ``kinds`` holds ``"branch"``
      or ``"vessel"``.
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
    if "vessel" in self.kinds and min(self.shape) < vessels.MIN_SIDE:
      raise ValueError(f"kinds with 'vessel' need a shape of at least "
                       f"{vessels.MIN_SIDE} voxels a side, got {self.shape}")
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
