"""A trained model applied to images: the compiled forward pass and masks.

``Segmenter`` is the run's best model on one device, taking an image (array
or NIfTI file) of any shape and giving the mask in that image's own voxel
grid; ``segment`` is the same forward pass on a batch of preprocessed cases,
for a model restored by ``runs.restore_best``.

Two ways back to the image's grid, one per training protocol. A run trained
on whole volumes (the paper's) predicts at its ``shape`` and its label map
is resized back by nearest neighbour. A run trained on patches (nnU-Net's)
predicts the image on its preprocessing grid (own voxels, target spacing or
``shape``) by sliding windows, and, as nnU-Net exports, its probabilities
are resampled back linearly before they become labels.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import numpy as np

from topojax import data
from topojax import postprocess
from topojax import train
from topojax import windows
from topojax.data.preprocessing import checked_spacing
from topojax.predict import runs
from topojax.train import steps as train_steps

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def segment(model_def, model_state, images: np.ndarray, *,
            batch_size: int) -> list[np.ndarray]:
  """Probabilities of each case, whole-volume.

  Args:
    model_def: the model's ``nnx.GraphDef``.
    model_state: its ``nnx.State``.
    images: ``(num_cases, X, Y, Z, C_in)`` at the training shape.
    batch_size: cases per forward pass.

  Returns:
    One float32 ``(X, Y, Z, C_out)`` probability volume per case.
  """
  forward = train_steps.make_forward(model_def)
  out = []
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size], np.float32)
    out.extend(np.asarray(forward(model_state, batch)))
  return out


def _check_keep_largest(keep_largest: int | None) -> None:
  if keep_largest is not None and (
      isinstance(keep_largest, bool)
      or not isinstance(keep_largest, (int, np.integer)) or keep_largest < 1):
    raise ValueError(
        f"keep_largest must be a positive int, got {keep_largest!r}")


def _label_map(probabilities: np.ndarray,
               keep_largest: int | None) -> np.ndarray:
  """``(X, Y, Z)`` uint8 labels of ``(X, Y, Z, C_out)`` probabilities."""
  mask = data.as_label_map(probabilities)
  if keep_largest is not None:
    mask = postprocess.keep_largest_components(mask, n=keep_largest)
  return mask


def _real_array(image) -> np.ndarray:
  """``image`` as float32, checked to be a real ``(X, Y, Z[, C])`` array."""
  image = np.asarray(image)
  if image.ndim not in (3, 4) or not image.size or not (
      np.issubdtype(image.dtype, np.integer)
      or np.issubdtype(image.dtype, np.floating)
      or image.dtype == np.bool_):
    raise ValueError(f"image must be a real (X, Y, Z) or (X, Y, Z, C) "
                     f"array or a NIfTI path, got shape {image.shape} "
                     f"and dtype {image.dtype}")
  return image.astype(np.float32, copy=False)


def _resized(probabilities: np.ndarray, shape) -> np.ndarray:
  """``(*shape, C_out)``: each channel of ``probabilities`` resized linearly."""
  return np.stack([data.resize(probabilities[..., c], shape, order=1)
                   for c in range(probabilities.shape[-1])], axis=-1)


def _in_image_grid(config: train.TrainConfig, probabilities: np.ndarray,
                   shape, keep_largest: int | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
  """``(mask, probabilities)`` in the image's ``(X, Y, Z)`` grid ``shape``.

  A whole-volume run's label map is resized back by nearest neighbour (the
  probabilities, ``None`` here, only when asked for); a patch run's
  probabilities are resampled back linearly, then made labels.
  """
  shape = tuple(shape)
  if config.patch_size is None:
    mask = data.resize(_label_map(probabilities, keep_largest), shape,
                       order=0)
    return mask, None
  if probabilities.shape[:3] != shape:
    probabilities = _resized(probabilities, shape)
  return _label_map(probabilities, keep_largest), probabilities


def _nifti_spacing(nifti) -> tuple[float, float, float]:
  """Voxel size of an opened NIfTI image in mm, from its header."""
  return tuple(float(z) for z in nifti.header.get_zooms()[:3])


def _case_meta(path: pathlib.Path, shape, nifti) -> data.CaseMeta:
  """The ``data.CaseMeta`` that writes a mask in the space of ``nifti``.

  Args:
    path: the image file, naming the case.
    shape: its ``(X, Y, Z)`` voxel grid.
    nifti: the opened image, for its affine and voxel size (mm).
  """
  return data.CaseMeta(
      case_id=data._case_id(path), image_path=path, label_path=None,
      original_shape=tuple(shape),
      affine=np.asarray(nifti.affine, dtype=np.float64),
      spacing=_nifti_spacing(nifti))


@dataclasses.dataclass(frozen=True, eq=False)
class Segmenter:
  """A trained run's best model, segmenting images of any shape.

  ``Segmenter.from_run(run_dir)`` restores it; ``segmenter(image)`` gives
  the mask in the image's own voxel grid, exactly as ``write_prediction``
  (and ``topojax predict``) writes it::

    segmenter = topojax.Segmenter.from_run("runs/spleen")
    mask = segmenter("case.nii.gz", keep_largest=1)  # (X, Y, Z) uint8
    mask, probs = segmenter(volume, return_probabilities=True)

  Attributes:
    phase: the phase folder the model comes from.
    config: the run's configuration: how images are preprocessed, and
      whether they are predicted whole or by sliding windows.
    model_def: the model's ``nnx.GraphDef``.
    model_state: its ``nnx.State``, on one device.
    in_channels: ``C_in``, the network's input channels.
    out_channels: ``C_out``: 1 (sigmoid, binary foreground) or one per label
      (softmax).
    modalities: names of the input channels in training order; ``None`` for
      a run without ``model.json``.
    task_modalities: every modality of the task the run was trained on, in
      the order of its images' channels; ``None`` likewise.
    modality_indices: index in ``task_modalities`` of each input channel;
      ``None`` likewise.
    label_names: the task's label names by value; ``None`` likewise.
  """
  phase: pathlib.Path
  config: train.TrainConfig
  model_def: Any = dataclasses.field(repr=False)
  model_state: Any = dataclasses.field(repr=False)
  in_channels: int
  out_channels: int
  modalities: tuple[str, ...] | None = None
  task_modalities: tuple[str, ...] | None = None
  modality_indices: tuple[int, ...] | None = None
  label_names: tuple[str, ...] | None = None

  @classmethod
  def from_run(cls, run_dir: str | os.PathLike) -> Segmenter:
    """Restores the best checkpoint of a run's last finished phase.

    Args:
      run_dir: a run folder (its last finished phase is used, as
        ``phase_dir``) or a phase folder.

    Raises:
      FileNotFoundError: no finished phase or no checkpoint there.
      checkpoint.CheckpointError: the best checkpoint cannot be read or
        fails its checksums (one line naming it).
    """
    phase = runs.phase_dir(run_dir).absolute()
    config = runs._read_config(phase)
    io = runs._model_io(phase)
    model_def, model_state = runs._restore(
        phase, config, in_channels=io["in_channels"],
        out_channels=io["out_channels"],
        sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return cls(phase=phase, config=config, model_def=model_def,
               model_state=model_state, **io)

  def forward(self, images: np.ndarray) -> np.ndarray:
    """Probabilities of preprocessed images.

    Whole-volume for a run trained on whole volumes, compiled once per
    batch size; by ``topojax.sliding_window`` for a run trained on patches
    (windows of ``config.patch_size``, ``config.overlap``, Gaussian
    blending, ``config.batch_size`` windows per call, compiled once), as
    validation predicted them.

    Args:
      images: ``(N, X, Y, Z, C_in)`` as from
        ``topojax.data.preprocess_image`` (or ``Dataset.images``): at
        ``config.shape`` where the run has one, else of any shape.

    Returns:
      ``(N, X, Y, Z, C_out)`` float32 probabilities.
    """
    shape = np.shape(images)
    forward = train_steps.make_forward(self.model_def)
    if self.config.shape is None:
      if len(shape) != 5 or shape[-1] != self.in_channels or 0 in shape:
        raise ValueError(f"images must be (N, X, Y, Z, C_in) with C_in = "
                         f"{self.in_channels} for this run, got shape "
                         f"{shape}")
    else:
      expected = (*self.config.shape, self.in_channels)
      if len(shape) != 5 or tuple(shape[1:]) != expected:
        raise ValueError(f"images must be (N, X, Y, Z, C_in) = (N, "
                         f"{', '.join(map(str, expected))}) for this run, "
                         f"got shape {shape}")
    images = np.asarray(images, np.float32)
    if self.config.patch_size is None:
      return np.asarray(forward(self.model_state, images))
    return np.asarray(windows.sliding_window(
        functools.partial(forward, self.model_state), images,
        patch_size=self.config.patch_size, overlap=self.config.overlap,
        batch_size=self.config.batch_size))

  def _channels(self, channels: int, where) -> tuple[int, ...] | None:
    """The channels to feed of an image with ``channels``; ``None``: all."""
    if channels == self.in_channels:
      return None
    if (self.task_modalities is not None
        and channels == len(self.task_modalities)):
      return self.modality_indices
    expected = str(self.in_channels)
    if self.modalities is not None:
      expected += f" ({', '.join(self.modalities)}, in this order)"
      if len(self.task_modalities) != self.in_channels:
        expected += (f" or all {len(self.task_modalities)} of its task's "
                     f"modalities ({', '.join(self.task_modalities)})")
    raise ValueError(f"{where}: has {channels} channel(s) but the run "
                     f"{self.phase} takes {expected}")

  def _open(self, path: pathlib.Path):
    """The NIfTI image at ``path``, checked from its header alone."""
    if not path.is_file():
      raise FileNotFoundError(f"image {path} not found")
    image = data._open_nifti(path)
    if len(image.shape) not in (3, 4) or not all(image.shape):
      raise ValueError(f"{path}: expected a 3D (X, Y, Z) or 4D (X, Y, Z, "
                       f"modality) image, got shape {image.shape}")
    self._channels(image.shape[3] if len(image.shape) == 4 else 1, path)
    return image

  def check_file(self, path: str | os.PathLike) -> None:
    """Checks from the header alone that this run can segment a NIfTI file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file: not readable NIfTI, not 3D or 4D, or
        channels the run does not take.
    """
    self._open(pathlib.Path(path))

  def _read(self, path: pathlib.Path) -> tuple[np.ndarray, Any]:
    """``(X, Y, Z, C)`` float32 voxels of a NIfTI file, and the file."""
    nifti = self._open(path)
    image = data._decode(nifti, path, dtype=np.float32)
    return image.reshape(*image.shape[:3], -1), nifti

  def _probabilities(self, image: np.ndarray, where,
                     spacing: Sequence[float] | None) -> np.ndarray:
    """Probabilities of an image of any shape, on its preprocessing grid.

    The grid is ``config.shape``, or the image's own at ``config.spacing``
    (``data.case_grid``), or the image's own.
    """
    if image.ndim == 3:
      image = image[..., None]
    selected = self._channels(image.shape[-1], where)
    if selected is not None:
      image = image[..., list(selected)]
    if not np.isfinite(image).all():
      raise ValueError(f"{where}: the image holds NaN or infinite values")
    preprocessing = self.config.preprocess_config()
    if preprocessing.spacing is not None and spacing is None:
      raise ValueError(
          f"spacing: the run resamples images to {preprocessing.spacing} mm; "
          f"pass the voxel size of {where} in mm (a NIfTI file gives its own)")
    grid = data.case_grid(preprocessing, image.shape[:3], spacing)
    prepared = data.preprocess_image(image, grid,
                                     order=data.image_order(preprocessing))
    return self.forward(prepared[None])[0]

  def __call__(self, image: np.ndarray | str | os.PathLike, *,
               spacing: Sequence[float] | None = None,
               keep_largest: int | None = None,
               return_probabilities: bool = False):
    """Segments one image in its own voxel grid.

    As in training, each channel is resampled to the run's grid and min-max
    normalised. A run trained on whole volumes predicts at ``config.shape``
    and its label map (thresholded sigmoid, or arg-max of the softmax) is
    resized back by nearest neighbour; a run trained on patches predicts by
    sliding windows and its probabilities are resampled back linearly before
    they become labels.

    Args:
      image: ``(X, Y, Z)`` or channels-last ``(X, Y, Z, C)`` array (any
        real dtype) or the path of a 3D or 4D NIfTI file holding one. ``C``
        is the run's input channels, in training order (``modalities``), or
        every modality of its task (``task_modalities``), from which the
        run's are picked.
      spacing: ``(X, Y, Z)`` voxel size of an array ``image`` in mm, needed
        where the run resamples to a target spacing (``config.spacing``); a
        NIfTI file's header gives its own, and this is then ignored.
      keep_largest: keep this many largest connected components of each
        class (``topojax.postprocess``), at the training shape for a
        whole-volume run, in the image's grid for a patch run; ``None``
        keeps everything.
      return_probabilities: also return the probabilities.

    Returns:
      ``mask``, uint8 ``(X, Y, Z)`` labels: 0 background, 1 foreground for a
      binary run, the label value for a one-hot run. With
      ``return_probabilities``, ``(mask, probabilities)``: float32
      ``(X, Y, Z, C_out)``, each channel resampled linearly from the grid
      the network predicted on.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a 3D or 4D real image, channels the run does not take,
        non-finite values, unreadable NIfTI, or a missing or non-positive
        ``spacing`` where one is needed; the file or ``image`` is named.
    """
    _check_keep_largest(keep_largest)
    if isinstance(image, (str, os.PathLike)):
      where = pathlib.Path(image)
      image, nifti = self._read(where)
      spacing = _nifti_spacing(nifti)
    else:
      where = "image"
      image = _real_array(image)
      if spacing is not None:
        spacing = checked_spacing(spacing)
    probabilities = self._probabilities(image, where, spacing)
    shape = image.shape[:3]
    mask, resampled = _in_image_grid(self.config, probabilities, shape,
                                     keep_largest)
    if not return_probabilities:
      return mask
    return mask, (_resized(probabilities, shape) if resampled is None
                  else resampled)

  def write_prediction(self, image_path: str | os.PathLike,
                       out_path: str | os.PathLike, *,
                       keep_largest: int | None = None,
                       overwrite: bool = False) -> pathlib.Path:
    """Segments a NIfTI file and writes the mask in its space.

    The mask is ``self(image_path, keep_largest=keep_largest)``, written as
    uint8 with the image's affine and header (orientation codes, units,
    description) by ``topojax.data.write_prediction``.

    Args:
      image_path: a 3D or 4D NIfTI image (see ``__call__``).
      out_path: the mask file, ending in ``.nii.gz`` or ``.nii``; missing
        folders are created.
      keep_largest: as for ``__call__``.
      overwrite: replace an existing ``out_path``.

    Returns:
      ``out_path``.

    Raises:
      FileExistsError: ``out_path`` exists and not ``overwrite`` (checked
        before any work).
      FileNotFoundError, ValueError: as ``__call__``.
    """
    _check_keep_largest(keep_largest)
    image_path, out_path = pathlib.Path(image_path), pathlib.Path(out_path)
    if not out_path.name.endswith(NIFTI_SUFFIXES):
      raise ValueError(f"out_path must end in .nii.gz or .nii, got {out_path}")
    if out_path.exists() and not overwrite:
      raise FileExistsError(f"{out_path} exists; pass overwrite=True to "
                            "replace it")
    image, nifti = self._read(image_path)
    probabilities = self._probabilities(image, image_path,
                                        _nifti_spacing(nifti))
    mask, _ = _in_image_grid(self.config, probabilities, image.shape[:3],
                             keep_largest)
    return data.write_prediction(
        mask, _case_meta(image_path, image.shape[:3], nifti), out_path,
        overwrite=overwrite)
