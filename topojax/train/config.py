"""Training configuration: the losses, one phase's settings and a run's.

A run is configured by a JSON file per task (``experiments/configs/``)
holding a ``TrainConfig``, whose ``phase1`` and ``phase2`` are
``PhaseConfig``s; ``load_config`` reads it. Every value is checked when the
dataclass is made, so a bad file raises a ``ValueError`` naming the field
before anything is loaded or traced.

Loss names: ``LOSSES`` are the ones a phase can train with, the keys of
``topojax.train.losses.LOSS_TABLE`` (which says what each is);
``resolve_loss`` maps the older names onto them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from topojax import data
from topojax import losses
from topojax import unet
from topojax.train import losses as loss_table
# The table's checks, importable from here as before.
from topojax.train.losses import check_loss_name  # noqa: F401
from topojax.train.losses import resolve_loss  # noqa: F401

# Losses a phase can train with: Dice alone, or a topological loss + λ·Dice.
LOSSES = tuple(loss_table.LOSS_TABLE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseConfig:
  """One training phase.

  Attributes:
    loss: a name in ``LOSSES``: the Dice loss alone, or a topological loss
      trained as ``L_topo + λ·L_dice`` (λ = ``TrainConfig.dice_weight``);
      ``topojax.train.losses.LOSS_TABLE`` describes each. Older names resolve as
      ``resolve_loss`` says.
    epochs: passes over the training cases at most.
    learning_rate: Adam's step size, constant.
    patience: stop after this many epochs without a better validation Dice;
      ``None`` runs every epoch (the best epoch is still the one kept).
  """
  loss: str
  epochs: int
  learning_rate: float
  patience: int | None = None

  def __post_init__(self):
    check_loss_name(self.loss, "loss")
    if not isinstance(self.epochs, int) or self.epochs < 1:
      raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
    if not self.learning_rate > 0:
      raise ValueError(
          f"learning_rate must be positive, got {self.learning_rate!r}")
    if self.patience is not None and (not isinstance(self.patience, int)
                                      or self.patience < 1):
      raise ValueError(
          f"patience must be a positive int or null, got {self.patience!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything that defines a training run, as stored in a config file.

  Two protocols. The paper's (``patch_size=None``): every case resized to
  ``shape`` and trained and predicted whole. nnU-Net's (``patch_size``
  set): steps on random patches of the cases (``foreground_fraction`` of
  each batch centred on foreground), validation and prediction of whole
  cases by sliding windows (``topojax.sliding_window``, Gaussian blending,
  ``overlap``); the cases keep their own shapes (``shape=None``), at a
  target ``spacing`` or on their own grids, or are resized to ``shape``.

  Attributes:
    shape: ``(X, Y, Z)`` every case is resized to, in voxels; each side a
      multiple of ``2^(depth - 1)``; ``None`` (only with ``patch_size``)
      keeps each case's own shape.
    patch_size: ``(X, Y, Z)`` of the training patches and the prediction
      windows, in voxels; each side a multiple of ``2^(depth - 1)``, none
      larger than ``shape``. ``None``: whole volumes (the paper's).
    spacing: ``(X, Y, Z)`` in mm every case is resampled to (images by
      cubic spline, labels by nearest neighbour), with ``shape=None``;
      ``None`` keeps each case's voxel grid.
    foreground_fraction: share of each batch of patches centred on a
      foreground voxel (nnU-Net: 1/3).
    patches_per_case: patches drawn of every training case in an epoch;
      each epoch ends with a validation by sliding windows, which costs
      more than a pass of one patch per case over volumes much larger than
      the patch.
    overlap: share of a window overlapping the next in sliding-window
      validation and prediction, in [0, 1).
    validation_overlap: the ``overlap`` of the per-epoch validation alone,
      in [0, 1); ``None``: ``overlap``. Validation only ranks a run's
      epochs, and fewer windows (8 against 27 for a 64³ case of 32³
      windows at 0 and 0.5) make it cheaper; the test cases are still
      predicted at ``overlap``, where seams could cut thin structures.
    modalities: image channels to keep (``data.PreprocessConfig``).
    label_mode: ``"binary"`` (sigmoid output) or ``"onehot"`` (softmax).
    flip_axes: spatial axes randomly flipped during training (0 = X).
    split_seed: seed of the train/validation/test split; fixed per task, so
      every training seed sees the same test cases.
    seed: seed of the initial weights and of the batch order.
    base_channels: U-Net width at full resolution.
    depth: U-Net resolution levels.
    norm: ``"batch"``, ``"group"`` or ``"instance"``.
    batch_size: cases per step, a multiple of the device count.
    dice_weight: λ in ``L_topo + λ L_dice``, for every topological loss.
    normalize: makes an older loss name resolve to its normalised form
      (``topojax.train.losses.LEGACY_NAMES``); other names ignore it.
    kernel_sizes: PPL pooling kernel sizes, in voxels; also used for the
      validation topological loss (the PPL whatever the phase's loss).
    phase1: pre-training.
    phase2: fine-tuning from phase 1's best checkpoint.
    description: free text, e.g. where the values come from.
  """
  shape: tuple[int, int, int] | None = None
  patch_size: tuple[int, int, int] | None = None
  spacing: tuple[float, float, float] | None = None
  foreground_fraction: float = 1 / 3
  patches_per_case: int = 1
  overlap: float = 0.5
  validation_overlap: float | None = None
  modalities: tuple[int | str, ...] | None = None
  label_mode: str = "binary"
  flip_axes: tuple[int, ...] = ()
  split_seed: int = 0
  seed: int = 0
  base_channels: int = 16
  depth: int = 4
  norm: str = "group"
  batch_size: int = 2
  dice_weight: float = 1.0
  normalize: bool = False
  kernel_sizes: tuple[int, ...] = losses.DEFAULT_KERNEL_SIZES
  phase1: PhaseConfig = PhaseConfig(loss="dice", epochs=150,
                                    learning_rate=1e-3)
  phase2: PhaseConfig = PhaseConfig(loss=loss_table.PAPER_LOSS, epochs=150,
                                    learning_rate=1e-4)
  description: str = ""

  def __post_init__(self):
    for name in ("flip_axes", "kernel_sizes"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ("shape", "patch_size", "spacing", "modalities"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ("phase1", "phase2"):
      value = getattr(self, name)
      if isinstance(value, dict):
        object.__setattr__(self, name, PhaseConfig(**value))
    if self.shape is None and self.patch_size is None:
      raise ValueError("shape may be null only with a patch_size (cases in "
                       "their own shapes are trained on patches)")
    # The data module checks shape, spacing, modalities and label_mode.
    self.preprocess_config()
    if self.shape is not None:
      unet.check_spatial_shape(self.shape, self.depth)
    if self.patch_size is not None:
      self._check_patches()
    if self.norm not in unet.NORMS:
      raise ValueError(f"norm must be one of {unet.NORMS}, got {self.norm!r}")
    for name in ("base_channels", "depth", "batch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.seed < 0 or self.split_seed < 0:
      raise ValueError(f"seed and split_seed must be non-negative, got "
                       f"{self.seed} and {self.split_seed}")
    if self.dice_weight < 0:
      raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")
    if not isinstance(self.normalize, bool):
      raise ValueError(f"normalize must be true or false, got "
                       f"{self.normalize!r}")
    # The network sees patches when there are, and the losses with it.
    seen = self.shape if self.patch_size is None else self.patch_size
    if (not self.kernel_sizes or min(self.kernel_sizes) < 1
        or max(self.kernel_sizes) > min(seen)):
      raise ValueError(
          f"kernel_sizes {self.kernel_sizes} must be positive, non-empty and "
          f"fit in every projected plane of shape {seen}")

  def _check_patches(self) -> None:
    patch = self.patch_size
    if len(patch) != 3 or not all(
        isinstance(p, int) and not isinstance(p, bool) and p > 0
        for p in patch):
      raise ValueError(f"patch_size must be three positive ints (X, Y, Z) or "
                       f"null, got {list(patch)}")
    try:
      unet.check_spatial_shape(patch, self.depth)
    except ValueError as err:
      raise ValueError(f"patch_size: {err}") from None
    if self.shape is not None and any(
        p > s for p, s in zip(patch, self.shape)):
      raise ValueError(f"patch_size {patch} is larger than the shape "
                       f"{self.shape} the cases are resized to")
    if not 0 <= self.foreground_fraction <= 1:
      raise ValueError(f"foreground_fraction must be in [0, 1], got "
                       f"{self.foreground_fraction!r}")
    if (not isinstance(self.patches_per_case, int)
        or isinstance(self.patches_per_case, bool)
        or self.patches_per_case < 1):
      raise ValueError(f"patches_per_case must be a positive int, got "
                       f"{self.patches_per_case!r}")
    if not 0 <= self.overlap < 1:
      raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
    if (self.validation_overlap is not None
        and not 0 <= self.validation_overlap < 1):
      raise ValueError(f"validation_overlap must be in [0, 1) or null, got "
                       f"{self.validation_overlap!r}")

  def preprocess_config(self) -> data.PreprocessConfig:
    return data.PreprocessConfig(shape=self.shape, modalities=self.modalities,
                                 label_mode=self.label_mode,
                                 spacing=self.spacing)

  def to_json(self) -> dict[str, Any]:
    """The fields as JSON values (tuples become lists), as in config files."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


def load_config(path: str | os.PathLike) -> TrainConfig:
  """Reads a ``TrainConfig`` from a JSON file.

  Keys are ``TrainConfig``'s fields; ``phase1`` and ``phase2`` are objects
  with ``PhaseConfig``'s fields. Missing keys keep their defaults.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not JSON, an unknown key, or an invalid value.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} not found")
  try:
    spec = json.loads(path.read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not valid JSON ({err})") from None
  if not isinstance(spec, dict):
    raise ValueError(f"{path}: expected a JSON object of TrainConfig fields")
  for fields, where in ((spec, ""), (spec.get("phase1"), "phase1."),
                        (spec.get("phase2"), "phase2.")):
    if fields is None:
      continue
    if not isinstance(fields, dict):
      raise ValueError(f"{path}: {where.rstrip('.')} must be an object")
    known = {f.name for f in dataclasses.fields(
        TrainConfig if not where else PhaseConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"{path}: unknown keys {[where + k for k in unknown]}; "
                       f"expected some of {sorted(known)}")
  try:
    return TrainConfig(**spec)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{path}: {err}") from None
