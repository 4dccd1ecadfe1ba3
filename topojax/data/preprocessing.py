"""Preprocessing: each case on its grid, images min-max normalised.

The grid is one of three (``PreprocessConfig``, ``case_grid``):

* the paper's (Fu et al., SPIE Medical Imaging 2023, §3.1): every case
  resized to the task's fixed ``shape``, linearly for images;
* nnU-Net's: every case resampled to a target ``spacing`` in mm, in a shape
  of its own, images by cubic spline (smooth, as nnU-Net's plans resample
  them);
* the case's own voxel grid (neither set), untouched.

Labels always go by nearest neighbour, and each image channel is then
min-max normalised to [0, 1].

Arrays are channels-last float32: images ``(X, Y, Z, C_in)``, ``C_in`` =
selected modalities; labels ``(X, Y, Z, C_out)`` in {0, 1}, ``C_out = 1`` for
``label_mode="binary"`` (every non-zero label is foreground) and ``K`` for
``label_mode="onehot"`` (channel ``k`` is label ``k``, background included).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np
from scipy import ndimage

LABEL_MODES = ("binary", "onehot")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
  """How each case is turned into network input.

  Attributes:
    shape: ``(X, Y, Z)`` in voxels that images and labels are resized to;
      ``None`` keeps each case's own shape (at ``spacing`` if given).
    spacing: ``(X, Y, Z)`` voxel size in mm every case is resampled to, in
      a shape of its own; ``None`` keeps each case's own. Only with
      ``shape=None``: both would set the grid.
    modalities: channels of a multi-modal image to keep, in order, each a
      name from ``dataset.json`` "modality" (e.g. ``"FLAIR"``) or its index;
      ``None`` keeps all of them.
    label_mode: ``"binary"`` (one foreground channel, every non-zero label)
      or ``"onehot"`` (one channel per ``dataset.json`` label, background
      first).
  """
  shape: tuple[int, int, int] | None
  modalities: tuple[int | str, ...] | None = None
  label_mode: str = "binary"
  spacing: tuple[float, float, float] | None = None

  def __post_init__(self):
    if self.shape is not None:
      shape = tuple(self.shape)
      if len(shape) != 3 or not all(
          isinstance(s, (int, np.integer)) and s > 0 for s in shape):
        raise ValueError(f"shape must be three positive ints (X, Y, Z) or "
                         f"None, got {self.shape!r}")
      object.__setattr__(self, "shape", tuple(int(s) for s in shape))
    if self.spacing is not None:
      object.__setattr__(self, "spacing", checked_spacing(self.spacing))
      if self.shape is not None:
        raise ValueError(
            f"shape {self.shape} and spacing {self.spacing} both set the "
            "grid cases are resampled to; give one (shape: the paper's "
            "fixed shape; spacing: nnU-Net's target spacing, with patches)")
    if self.modalities is not None:
      modalities = self.modalities
      if isinstance(modalities, (str, int)):
        modalities = (modalities,)
      modalities = tuple(modalities)
      if not modalities:
        raise ValueError("modalities must name at least one modality, or be "
                         "None for all of them")
      object.__setattr__(self, "modalities", modalities)
    if self.label_mode not in LABEL_MODES:
      raise ValueError(f"label_mode must be one of {LABEL_MODES}, got "
                       f"{self.label_mode!r}")


def checked_spacing(spacing) -> tuple[float, float, float]:
  """``spacing`` as three positive finite floats (mm), or a ``ValueError``."""
  try:
    values = tuple(float(s) for s in spacing)
  except (TypeError, ValueError):
    values = ()
  if len(values) != 3 or not all(np.isfinite(s) and s > 0 for s in values):
    raise ValueError(f"spacing must be three positive voxel sizes (X, Y, Z) "
                     f"in mm, got {spacing!r}")
  return values


def case_grid(config: PreprocessConfig, shape: Sequence[int],
              spacing: Sequence[float] | None) -> tuple[int, int, int]:
  """The ``(X, Y, Z)`` a case of ``shape`` voxels of ``spacing`` mm becomes.

  ``config.shape``; or, with a target ``config.spacing``, the case's extent
  in mm over that spacing, rounded (at least one voxel); or ``shape``.
  ``spacing`` is read (and needed) only in the second case.
  """
  if config.shape is not None:
    return config.shape
  if config.spacing is None:
    return tuple(int(s) for s in shape[:3])
  if spacing is None:
    raise ValueError(f"spacing: the case's voxel size in mm is needed to "
                     f"resample it to {config.spacing} mm")
  # In float64 whatever the header's float32 zooms: the grid must not
  # depend on which of the two a caller passes.
  return tuple(max(int(round(int(s) * float(old) / new)), 1)
               for s, old, new in zip(shape[:3], spacing, config.spacing))


def image_order(config: PreprocessConfig) -> int:
  """Spline order that resamples images: 3 to a target spacing, else 1."""
  return 3 if config.spacing is not None else 1


def resize(volume: np.ndarray, shape: Sequence[int], *, order: int
           ) -> np.ndarray:
  """Resamples a 3D volume to exactly ``shape``.

  The corner voxels of input and output coincide (``scipy.ndimage.zoom``
  without grid mode), so resizing there and back keeps the volume in place.

  Args:
    volume: ``(X, Y, Z)`` array.
    shape: output ``(X', Y', Z')`` in voxels.
    order: spline order: 1 for linear (images), 3 for cubic (images to a
      target spacing), 0 for nearest neighbour (labels, masks).

  Returns:
    ``(X', Y', Z')`` array of ``volume``'s dtype.
  """
  shape = tuple(int(s) for s in shape)
  if volume.ndim != 3 or len(shape) != 3:
    raise ValueError(f"resize takes a 3D volume and a 3D shape, got volume "
                     f"shape {volume.shape} and shape {shape}")
  if volume.shape == shape:
    return volume
  if volume.flags.f_contiguous and not volume.flags.c_contiguous:
    # NIfTI voxels come in Fortran order. Resampling the transposed, C-ordered
    # view is several times faster than striding through it, and cheaper than
    # copying the (larger) input into C order.
    return resize(volume.T, shape[::-1], order=order).T
  factors = [o / i for o, i in zip(shape, volume.shape)]
  out = ndimage.zoom(volume, factors, order=order, mode="nearest")
  # zoom rounds in * (out / in), which is out up to float error, so this holds;
  # checking is cheap and keeps a shape bug from reaching the cache.
  assert out.shape == shape, (out.shape, shape)
  return out


def _min_max(channel: np.ndarray) -> np.ndarray:
  low, high = float(channel.min()), float(channel.max())
  if high == low:  # A constant channel carries no information.
    return np.zeros_like(channel)
  return (channel - low) * np.float32(1.0 / (high - low))


def preprocess_image(image: np.ndarray, shape: Sequence[int], *,
                     order: int = 1) -> np.ndarray:
  """Resizes and normalises an image as ``preprocess`` does, without a label.

  Args:
    image: ``(X, Y, Z, C)`` float32, as from ``load_case``.
    shape: ``(X', Y', Z')`` in voxels (``case_grid``).
    order: spline order of the resampling (``image_order``): 1, linear, the
      paper's; 3 to a target spacing.

  Returns:
    ``(X', Y', Z', C)`` float32, each channel resized, then min-max
    normalised to [0, 1].
  """
  channels = [_min_max(resize(image[..., c], shape, order=order))
              for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1).astype(np.float32, copy=False)


def preprocess(image: np.ndarray, label: np.ndarray, config: PreprocessConfig,
               *, num_labels: int, spacing: Sequence[float] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Resamples and normalises one case (the paper's §3.1, or nnU-Net's).

  Args:
    image: ``(X, Y, Z, C_in)`` float32, as from ``load_case``.
    label: ``(X, Y, Z)`` integer labels ``0 .. num_labels - 1``.
    config: the grid and label mode (its modalities are already applied).
    num_labels: ``K``, the number of labels background included.
    spacing: the case's voxel size in mm (``CaseMeta.spacing``); needed
      only to resample to ``config.spacing``.

  Returns:
    ``(image, label)`` on the case's grid ``G = case_grid(config, ...)``:
    image ``(*G, C_in)`` float32, each channel min-max normalised to [0, 1];
    label ``(*G, C_out)`` float32 in {0, 1}.
  """
  grid = case_grid(config, image.shape[:3], spacing)
  image = preprocess_image(image, grid, order=image_order(config))
  label = resize(label, grid, order=0)
  if config.label_mode == "binary":
    label = (label > 0)[..., None]
  else:
    label = label[..., None] == np.arange(num_labels, dtype=label.dtype)
  return image, label.astype(np.float32)
