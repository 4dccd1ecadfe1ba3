"""The paper's preprocessing: a fixed shape and min-max normalised images.

Preprocessing follows the paper (Fu et al., SPIE Medical Imaging 2023, §3.1):
every case is resized to the task's fixed shape, linearly for images and by
nearest neighbour for labels, and each image channel is min-max normalised to
[0, 1].

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
    shape: ``(X, Y, Z)`` in voxels that images and labels are resized to.
    modalities: channels of a multi-modal image to keep, in order, each a
      name from ``dataset.json`` "modality" (e.g. ``"FLAIR"``) or its index;
      ``None`` keeps all of them.
    label_mode: ``"binary"`` (one foreground channel, every non-zero label)
      or ``"onehot"`` (one channel per ``dataset.json`` label, background
      first).
  """
  shape: tuple[int, int, int]
  modalities: tuple[int | str, ...] | None = None
  label_mode: str = "binary"

  def __post_init__(self):
    shape = tuple(self.shape)
    if len(shape) != 3 or not all(
        isinstance(s, (int, np.integer)) and s > 0 for s in shape):
      raise ValueError(
          f"shape must be three positive ints (X, Y, Z), got {self.shape!r}")
    object.__setattr__(self, "shape", tuple(int(s) for s in shape))
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


def resize(volume: np.ndarray, shape: Sequence[int], *, order: int
           ) -> np.ndarray:
  """Resamples a 3D volume to exactly ``shape``.

  The corner voxels of input and output coincide (``scipy.ndimage.zoom``
  without grid mode), so resizing there and back keeps the volume in place.

  Args:
    volume: ``(X, Y, Z)`` array.
    shape: output ``(X', Y', Z')`` in voxels.
    order: 1 for linear (images), 0 for nearest neighbour (labels, masks).

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


def preprocess_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Resizes and normalises an image as ``preprocess`` does, without a label.

  Args:
    image: ``(X, Y, Z, C)`` float32, as from ``load_case``.
    shape: ``(X', Y', Z')`` in voxels (``PreprocessConfig.shape``).

  Returns:
    ``(X', Y', Z', C)`` float32, each channel resized linearly, then min-max
    normalised to [0, 1].
  """
  channels = [_min_max(resize(image[..., c], shape, order=1))
              for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1).astype(np.float32, copy=False)


def preprocess(image: np.ndarray, label: np.ndarray, config: PreprocessConfig,
               *, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
  """Resizes and normalises one case as in the paper (§3.1).

  Args:
    image: ``(X, Y, Z, C_in)`` float32, as from ``load_case``.
    label: ``(X, Y, Z)`` integer labels ``0 .. num_labels - 1``.
    config: target shape and label mode (its modalities are already applied).
    num_labels: ``K``, the number of labels background included.

  Returns:
    ``(image, label)``: image ``(*config.shape, C_in)`` float32, each channel
    min-max normalised to [0, 1]; label ``(*config.shape, C_out)`` float32 in
    {0, 1}.
  """
  image = preprocess_image(image, config.shape)
  label = resize(label, config.shape, order=0)
  if config.label_mode == "binary":
    label = (label > 0)[..., None]
  else:
    label = label[..., None] == np.arange(num_labels, dtype=label.dtype)
  return image, label.astype(np.float32)
