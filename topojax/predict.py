"""Predictions of a trained run, as arrays or NIfTI files in image space.

One model and one preprocessing, the training one (each channel resized
linearly to the run's shape and min-max normalised,
``topojax.data.preprocess_image``), three ways in:

* ``Segmenter.from_run(run_dir)``: the run's best model in Python; called on
  an image (an array or a NIfTI file) it gives the mask in that image's own
  voxel grid, and the probabilities if asked for.
* ``predict_images(run_dir, images, out_dir)``: NIfTI files, or folders of
  them, each written as ``<out_dir>/<name>.nii.gz`` in its own shape, affine
  and header (``topojax predict --images``).
* ``predict_run(run_dir, task_dir, out_dir)``: the test cases of the run's
  split, from the task's preprocessing cache, written as
  ``<case_id>.nii.gz`` as ``topojax evaluate`` expects (``topojax predict
  --data``).

Every image is segmented whole-volume at the training shape, the paper's
fixed-shape protocol (§3.1), one image at a time: the forward pass compiles
once, and memory does not grow with the number of images. The label map
(optionally only the largest connected components of each class) is resized
back by nearest neighbour and written with ``topojax.data.write_prediction``.

A phase folder's ``model.json`` (written by ``topojax.train``) names the
network's input channels (the modalities, in training order), the task's
modalities and its labels. For runs made before that file, the channel
counts are read from the checkpoint and images must have exactly the
network's input channels.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import tqdm

from topojax import checkpoint
from topojax import data
from topojax import postprocess
from topojax import train
from topojax import unet

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MODEL_FILE = "model.json"


def phase_dir(run_dir: str | os.PathLike) -> pathlib.Path:
  """The phase folder to predict with: ``run_dir`` itself, or its last phase.

  Raises:
    FileNotFoundError: no finished phase (``summary.json``) there.
  """
  run_dir = pathlib.Path(run_dir)
  for candidate in (run_dir, run_dir / train.PHASE_DIRS[2],
                    run_dir / train.PHASE_DIRS[1]):
    if (candidate / "summary.json").is_file():
      return candidate
  raise FileNotFoundError(
      f"--run {run_dir}: no finished training phase there (expected "
      f"summary.json in it or in its {train.PHASE_DIRS[2]}/ or "
      f"{train.PHASE_DIRS[1]}/ folder)")


def _read_config(phase: pathlib.Path) -> train.TrainConfig:
  return train.TrainConfig(
      **json.loads((phase / "config.json").read_text())["config"])


def _best_epoch(manager: checkpoint.ReadOnlyCheckpoints) -> int:
  best = manager.best_step()
  if best is None:
    raise FileNotFoundError(f"{manager.directory}: no finished epoch to "
                            "restore")
  return best


def _restore(phase: pathlib.Path, config: train.TrainConfig, *,
             in_channels: int, out_channels: int,
             sharding: jax.sharding.Sharding):
  """``(model_def, model_state)`` of the best epoch, placed by ``sharding``."""
  from flax import nnx

  # Restoring needs the shapes only: an abstract model is the template, and
  # no initialisation is computed (or compiled) just to be overwritten.
  abstract = nnx.eval_shape(lambda: train.create_model(
      config, in_channels=in_channels, out_channels=out_channels))
  model_def, template = nnx.split(abstract)
  template = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                        sharding=sharding), template)
  with checkpoint.open_manager(phase / "checkpoints",
                               read_only=True) as manager:
    restored = checkpoint.restore(manager, _best_epoch(manager),
                                  model=template)
  return model_def, restored["model"]


def restore_best(phase: pathlib.Path, config: train.TrainConfig, *,
                 in_channels: int, out_channels: int):
  """``(model_def, model_state)`` of a finished phase's best checkpoint.

  The arrays are replicated over ``train.data_mesh()``, for ``segment``.
  """
  return _restore(phase, config, in_channels=in_channels,
                  out_channels=out_channels,
                  sharding=jax.NamedSharding(train.data_mesh(), jax.P()))


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
  forward = _forward(model_def)
  out = []
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size], np.float32)
    out.extend(np.asarray(forward(model_state, batch)))
  return out


@functools.lru_cache(maxsize=8)
def _forward(model_def):
  from flax import nnx

  @jax.jit
  def forward(model_state, images):
    model = nnx.merge(model_def, model_state)
    model.eval()
    return unet.probabilities(model(images))

  return forward


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


def _model_io(phase: pathlib.Path) -> dict[str, Any]:
  """The phase's ``model.json``, or the channel counts of its checkpoint."""
  path = phase / MODEL_FILE
  if path.is_file():
    try:
      spec = json.loads(path.read_text())
      return {"in_channels": int(spec["in_channels"]),
              "out_channels": int(spec["out_channels"]),
              "modalities": tuple(spec["modalities"]),
              "task_modalities": tuple(spec["task_modalities"]),
              "modality_indices": tuple(spec["modality_indices"]),
              "label_names": tuple(spec["label_names"])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
      raise ValueError(f"{path}: not the model description topojax.train "
                       f"writes ({type(err).__name__}: {err})") from None
  # A run from before model.json: the arrays' shapes tell the channel counts.
  with checkpoint.open_manager(phase / "checkpoints",
                               read_only=True) as manager:
    leaves = jax.tree_util.tree_flatten_with_path(
        manager.model_metadata(_best_epoch(manager)))[0]
  shapes = {tuple(str(getattr(k, "key", getattr(k, "idx", k)))
                  for k in key_path): leaf.shape
            for key_path, leaf in leaves}

  def kernel(*prefix):
    for key, shape in shapes.items():
      if key[:len(prefix)] == prefix:
        return shape
    raise ValueError(f"{phase}: no {MODEL_FILE}, and its checkpoint has no "
                     f"{'/'.join(prefix)} array to read the channels from")

  # unet.UNet: the first convolution's kernel is (3, 3, 3, C_in, width), the
  # head's (1, 1, 1, width, C_out).
  return {"in_channels": int(kernel("encoder", "0", "conv1", "kernel")[-2]),
          "out_channels": int(kernel("head", "kernel")[-1]),
          "modalities": None, "task_modalities": None,
          "modality_indices": None, "label_names": None}


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
    config: the run's configuration; images are resized to ``config.shape``.
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
    """
    phase = phase_dir(run_dir).absolute()
    config = _read_config(phase)
    io = _model_io(phase)
    model_def, model_state = _restore(
        phase, config, in_channels=io["in_channels"],
        out_channels=io["out_channels"],
        sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return cls(phase=phase, config=config, model_def=model_def,
               model_state=model_state, **io)

  def forward(self, images: np.ndarray) -> np.ndarray:
    """Probabilities of preprocessed images, whole-volume.

    Compiled once per batch size.

    Args:
      images: ``(N, X, Y, Z, C_in)`` at ``config.shape``, as from
        ``topojax.data.preprocess_image`` (or ``Dataset.images``).

    Returns:
      ``(N, X, Y, Z, C_out)`` float32 probabilities.
    """
    expected = (*self.config.shape, self.in_channels)
    shape = np.shape(images)
    if len(shape) != 5 or tuple(shape[1:]) != expected:
      raise ValueError(f"images must be (N, X, Y, Z, C_in) = (N, "
                       f"{', '.join(map(str, expected))}) for this run, got "
                       f"shape {shape}")
    return np.asarray(_forward(self.model_def)(
        self.model_state, np.asarray(images, np.float32)))

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

  def _probabilities(self, image: np.ndarray, where) -> np.ndarray:
    """``(*config.shape, C_out)`` probabilities of an image of any shape."""
    if image.ndim == 3:
      image = image[..., None]
    selected = self._channels(image.shape[-1], where)
    if selected is not None:
      image = image[..., list(selected)]
    if not np.isfinite(image).all():
      raise ValueError(f"{where}: the image holds NaN or infinite values")
    prepared = data.preprocess_image(image, self.config.shape)
    return self.forward(prepared[None])[0]

  def _read(self, path: pathlib.Path) -> tuple[np.ndarray, Any]:
    """``(X, Y, Z, C)`` float32 voxels of a NIfTI file, and the file."""
    nifti = self._open(path)
    image = data._decode(nifti, path, dtype=np.float32)
    return image.reshape(*image.shape[:3], -1), nifti

  def __call__(self, image: np.ndarray | str | os.PathLike, *,
               keep_largest: int | None = None,
               return_probabilities: bool = False):
    """Segments one image in its own voxel grid.

    As in training, each channel is resized linearly to ``config.shape`` and
    min-max normalised; the network's label map (thresholded sigmoid, or
    arg-max of the softmax) is resized back by nearest neighbour.

    Args:
      image: ``(X, Y, Z)`` or channels-last ``(X, Y, Z, C)`` array (any
        real dtype) or the path of a 3D or 4D NIfTI file holding one. ``C``
        is the run's input channels, in training order (``modalities``), or
        every modality of its task (``task_modalities``), from which the
        run's are picked.
      keep_largest: keep this many largest connected components of each
        class, at the training shape (``topojax.postprocess``); ``None``
        keeps everything.
      return_probabilities: also return the probabilities.

    Returns:
      ``mask``, uint8 ``(X, Y, Z)`` labels: 0 background, 1 foreground for a
      binary run, the label value for a one-hot run. With
      ``return_probabilities``, ``(mask, probabilities)``: float32
      ``(X, Y, Z, C_out)``, each channel resized linearly from the training
      shape (``mask`` is resized from the label map, not thresholded from
      these).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a 3D or 4D real image, channels the run does not take,
        non-finite values, unreadable NIfTI; the file or ``image`` is named.
    """
    _check_keep_largest(keep_largest)
    if isinstance(image, (str, os.PathLike)):
      where = pathlib.Path(image)
      image, _ = self._read(where)
    else:
      where = "image"
      image = np.asarray(image)
      if image.ndim not in (3, 4) or not image.size or not (
          np.issubdtype(image.dtype, np.integer)
          or np.issubdtype(image.dtype, np.floating)
          or image.dtype == np.bool_):
        raise ValueError(f"image must be a real (X, Y, Z) or (X, Y, Z, C) "
                         f"array or a NIfTI path, got shape {image.shape} "
                         f"and dtype {image.dtype}")
      image = image.astype(np.float32, copy=False)
    probabilities = self._probabilities(image, where)
    shape = image.shape[:3]
    mask = data.resize(_label_map(probabilities, keep_largest), shape,
                       order=0)
    if not return_probabilities:
      return mask
    resized = np.stack([data.resize(probabilities[..., c], shape, order=1)
                        for c in range(probabilities.shape[-1])], axis=-1)
    return mask, resized

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
    mask = _label_map(self._probabilities(image, image_path), keep_largest)
    meta = data.CaseMeta(
        case_id=data._case_id(image_path), image_path=image_path,
        label_path=None, original_shape=tuple(image.shape[:3]),
        affine=np.asarray(nifti.affine, dtype=np.float64),
        spacing=tuple(float(z) for z in nifti.header.get_zooms()[:3]))
    return data.write_prediction(mask, meta, out_path, overwrite=overwrite)


def _image_files(images: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
  """The NIfTI files named by ``images``, folders expanded, in order."""
  if isinstance(images, (str, os.PathLike)):
    images = [images]
  files = []
  for item in images:
    path = pathlib.Path(item)
    if path.is_dir():
      # Hidden files include the "._*" metadata files macOS leaves in
      # archives; they are not images.
      found = sorted(p for p in path.iterdir()
                     if p.name.endswith(NIFTI_SUFFIXES)
                     and not p.name.startswith(".") and p.is_file())
      if not found:
        raise FileNotFoundError(f"--images {path}: no .nii or .nii.gz file "
                                "in that folder")
      files.extend(found)
    elif path.is_file():
      if not path.name.endswith(NIFTI_SUFFIXES):
        raise ValueError(f"--images {path}: expected a .nii or .nii.gz file "
                         "or a folder of them")
      files.append(path)
    else:
      raise FileNotFoundError(f"--images {path}: no such file or folder")
  if not files:
    raise ValueError("--images: give at least one NIfTI file or folder")
  return files


def _refuse_existing(paths, out_dir, *, overwrite: bool) -> None:
  """Raises unless ``overwrite`` or none of ``paths`` exists yet, before any
  work, so that no earlier prediction is replaced silently."""
  existing = [str(p) for p in paths if p.exists()]
  if existing and not overwrite:
    raise FileExistsError(
        f"--out {out_dir} already holds {len(existing)} of the predictions "
        f"(e.g. {existing[0]}); pass overwrite=True (--overwrite) to replace "
        "them")


def predict_images(run_dir: str | os.PathLike,
                   images: Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, *,
                   keep_largest: int | None = None, overwrite: bool = False,
                   progress: bool = True) -> list[pathlib.Path]:
  """Segments NIfTI images with a run's model, each written in its own space.

  Image ``<name>.nii.gz`` (or ``.nii``) becomes ``<out_dir>/<name>.nii.gz``:
  a uint8 mask with the image's shape, affine and header
  (``Segmenter.write_prediction``). One image is in memory at a time.

  What can be checked without decoding voxels is checked for every file
  before any is segmented: the outputs (none may exist, unless
  ``overwrite``; no two inputs may share a name) and each header (NIfTI, 3D
  or 4D, channels the run takes). A file that fails only when its voxels
  are decoded (a truncated ``.nii.gz``, NaN values) stops the run there, with
  an error naming it; the predictions written before it stay.

  Args:
    run_dir: a run folder (its last finished phase is used) or a phase
      folder.
    images: NIfTI files (``.nii``, ``.nii.gz``) and folders, each folder
      standing for the NIfTI files in it (not in sub-folders) sorted by
      name; 3D images, or 4D with the run's modalities
      (``Segmenter.__call__``).
    out_dir: folder for the masks (created).
    keep_largest: keep this many largest connected components of each class
      (``topojax.postprocess``); ``None`` keeps everything.
    overwrite: replace masks already in ``out_dir``.
    progress: show a progress bar over the files.

  Returns:
    The paths written, in input order.

  Raises:
    FileExistsError: a mask exists and not ``overwrite``.
    FileNotFoundError: a missing file or folder, a folder without NIfTI
      files, no finished phase in ``run_dir``.
    ValueError: two inputs with one name, an input that would be replaced by
      its own mask, a file the run cannot segment (named).
  """
  _check_keep_largest(keep_largest)
  files = _image_files(images)
  out_dir = pathlib.Path(out_dir)
  outputs = [out_dir / f"{data._case_id(path)}.nii.gz" for path in files]
  first_of = {}
  for path, output in zip(files, outputs):
    if output in first_of:
      raise ValueError(f"--images {first_of[output]} and {path} would both "
                       f"be written to {output}; rename one")
    first_of[output] = path
    if output.exists() and output.resolve() == path.resolve():
      raise ValueError(f"--out {out_dir}: the mask of {path} would replace "
                       "the image itself; choose another folder")
  _refuse_existing(outputs, out_dir, overwrite=overwrite)
  segmenter = Segmenter.from_run(run_dir)
  for path in files:
    segmenter.check_file(path)
  out_dir.mkdir(parents=True, exist_ok=True)
  for path, output in zip(tqdm.tqdm(files, desc="predicting", unit="image",
                                    disable=not progress), outputs):
    segmenter.write_prediction(path, output, keep_largest=keep_largest,
                               overwrite=overwrite)
  return outputs


def predict_run(run_dir: str | os.PathLike, task_dir: str | os.PathLike,
                out_dir: str | os.PathLike, *,
                keep_largest: int | None = None, overwrite: bool = False,
                cache_dir: str | os.PathLike | None = None,
                case_ids: Sequence[str] | None = None) -> list[pathlib.Path]:
  """Writes the run's test-set predictions as NIfTI masks.

  The cases come from the task's preprocessing cache (the arrays training
  saw) and are segmented by the run's ``Segmenter``.

  Args:
    run_dir: a run folder (its last finished phase is used) or a phase folder.
    task_dir: the MSD task folder the run was trained on.
    out_dir: folder for ``<case_id>.nii.gz`` (created).
    keep_largest: keep this many largest connected components of each class
      (``topojax.postprocess``); ``None`` keeps everything.
    overwrite: replace prediction files already in ``out_dir``.
    cache_dir: preprocessing cache (``topojax.data.load_dataset``).
    case_ids: cases to predict; the run's test split by default.

  Returns:
    The paths written.

  Raises:
    FileExistsError: a prediction file exists and ``overwrite`` is False
      (checked for every case before any work).
  """
  _check_keep_largest(keep_largest)
  phase = phase_dir(run_dir)
  config = _read_config(phase)
  split = data.Split.load(phase / "split.json")
  case_ids = split.test if case_ids is None else tuple(case_ids)
  out_dir = pathlib.Path(out_dir)
  paths = [out_dir / f"{case_id}.nii.gz" for case_id in case_ids]
  _refuse_existing(paths, out_dir, overwrite=overwrite)
  dataset = data.load_dataset(task_dir, config.preprocess_config(),
                              cache_dir=cache_dir, progress=False)
  rows = dataset.indices(case_ids)
  segmenter = Segmenter.from_run(phase)
  channels = (dataset.images.shape[-1], dataset.labels.shape[-1])
  if channels != (segmenter.in_channels, segmenter.out_channels):
    raise ValueError(
        f"--data {task_dir} gives {channels[0]} input and {channels[1]} "
        f"output channel(s) but the run {phase} has {segmenter.in_channels} "
        f"and {segmenter.out_channels}: it was trained on another task")
  out_dir.mkdir(parents=True, exist_ok=True)
  for path, row in zip(paths, rows):
    # One case at a time, like any other image: one compiled forward pass.
    probabilities = segmenter.forward(dataset.images[row][None])[0]
    data.write_prediction(_label_map(probabilities, keep_largest),
                          dataset.meta[row], path, overwrite=overwrite)
  return paths
