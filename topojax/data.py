"""Medical Segmentation Decathlon tasks: reading, preprocessing, cache, splits.

Everything training and evaluation read goes through this module. It works on
NumPy arrays and NIfTI files only and knows nothing of models or losses.

A task folder has the Medical Segmentation Decathlon (MSD) layout::

    Task09_Spleen/
      dataset.json      "modality", "labels" and the "training" image/label list
      imagesTr/*.nii.gz 3D (X, Y, Z), or 4D (X, Y, Z, M) for M modalities
      labelsTr/*.nii.gz 3D integer labels 0 .. K-1, K = len(dataset.json labels)

Only the labelled ``training`` cases are used; the paper splits them into its
own train, validation and test sets (MSD keeps its test labels private). One
MSD case is one participant, so splitting cases is splitting participants.

Preprocessing follows the paper (Fu et al., SPIE Medical Imaging 2023, §3.1):
every case is resized to the task's fixed shape, linearly for images and by
nearest neighbour for labels, and each image channel is min-max normalised to
[0, 1]. The result is cached on disk as memory-mapped ``.npy`` files, so only
the first run ever decodes NIfTI.

Arrays are channels-last float32:

* images ``(num_cases, X, Y, Z, C_in)``, ``C_in`` = selected modalities;
* labels ``(num_cases, X, Y, Z, C_out)`` in {0, 1}: ``C_out = 1`` for
  ``label_mode="binary"`` (every non-zero label is foreground) and ``K`` for
  ``label_mode="onehot"`` (channel ``k`` is label ``k``, background included).

Public API:

* ``PreprocessConfig(*, shape, modalities=None, label_mode="binary")``.
* ``PAPER_TASKS``: the paper's shape and split counts per MSD task folder name.
* ``read_task(task_dir) -> Task``: parses and checks ``dataset.json``.
* ``load_case(task, case, *, modalities=None) -> (image, label, CaseMeta)``:
  one case in its original space; image ``(X, Y, Z, M)`` float32, label
  ``(X, Y, Z)`` uint8.
* ``resize(volume, shape, *, order) -> ndarray``: ``(X, Y, Z)`` to ``shape``.
* ``preprocess(image, label, config, *, num_labels) -> (image, label)``, and
  ``preprocess_image(image, shape) -> image`` for an image without a label.
* ``load_dataset(task_dir, config, *, cache_dir=None, progress=True)
  -> Dataset``: every case preprocessed, from the cache when it is valid.
* ``make_split(case_ids, *, num_val, num_test, seed) -> Split`` and
  ``default_split(task, *, seed) -> Split``; ``Split.save(path)`` and
  ``Split.load(path)`` keep it next to a run.
* ``iterate_batches(images, labels, indices, *, batch_size, seed, epoch,
  shuffle=True, flip_axes=(), drop_remainder=True)``: ``(images, labels)``
  batches ``(N, X, Y, Z, C)``, prepared in a background thread.
* ``write_prediction(mask, meta, path, *, overwrite=False)``: a mask back in
  the original image's shape, affine and header.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import hashlib
import json
import os
import pathlib
import queue
import shutil
import threading
import uuid
import zlib

import nibabel as nib
import numpy as np
from scipy import ndimage
import tqdm

LABEL_MODES = ("binary", "onehot")

# Bump when preprocessing changes what it writes, so old cache entries are
# never mistaken for new ones.
_CACHE_FORMAT = 1

# Batches prepared ahead of the consumer by the background thread.
_PREFETCH = 2


@dataclasses.dataclass(frozen=True)
class TaskProtocol:
  """The paper's preprocessing shape and split counts for one MSD task.

  Attributes:
    shape: ``(X, Y, Z)`` every case is resized to, in voxels.
    num_train: training cases.
    num_val: validation cases (early stopping only).
    num_test: test cases, touched once at the end.
  """
  shape: tuple[int, int, int]
  num_train: int
  num_val: int
  num_test: int


# Keyed by the MSD task folder name (``dataset.json`` names are less
# consistent: Task02_Heart calls itself "LeftAtrium"). DESIGN.md §3.
PAPER_TASKS = {
    "Task09_Spleen": TaskProtocol((160, 160, 128), 25, 7, 9),
    "Task02_Heart": TaskProtocol((160, 160, 128), 12, 4, 4),
    "Task04_Hippocampus": TaskProtocol((64, 64, 48), 166, 42, 52),
}


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


@dataclasses.dataclass(frozen=True)
class Case:
  """One labelled case listed in ``dataset.json``."""
  case_id: str
  image_path: pathlib.Path
  label_path: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Task:
  """A parsed MSD task folder.

  Attributes:
    root: the task folder.
    name: ``dataset.json`` "name", or the folder name when it has none.
    modalities: modality names by channel index.
    label_names: label names by label value ``0 .. K-1``.
    cases: the labelled cases, in ``dataset.json`` order.
  """
  root: pathlib.Path
  name: str
  modalities: tuple[str, ...]
  label_names: tuple[str, ...]
  cases: tuple[Case, ...]

  def case(self, case_id: str) -> Case:
    """The case called ``case_id``; ``ValueError`` when there is none."""
    for case in self.cases:
      if case.case_id == case_id:
        return case
    raise ValueError(f"no case {case_id!r} in {self.root / 'dataset.json'}")


@dataclasses.dataclass(frozen=True, eq=False)
class CaseMeta:
  """What it takes to put a prediction back into a case's original space.

  Attributes:
    case_id: the case's name (its image file name without ``.nii.gz``).
    image_path: the original image file; its header is reused on writing.
    label_path: the original label file; ``None`` for an image without one
      (a new image to segment).
    original_shape: spatial ``(X, Y, Z)`` of the original image, in voxels.
    affine: ``(4, 4)`` float64 voxel-to-world matrix of the image, in mm.
    spacing: voxel size ``(X, Y, Z)`` in mm, from the image header.
  """
  case_id: str
  image_path: pathlib.Path
  label_path: pathlib.Path | None
  original_shape: tuple[int, int, int]
  affine: np.ndarray
  spacing: tuple[float, float, float]

  def to_json(self) -> dict:
    return {"case_id": self.case_id, "image_path": str(self.image_path),
            "label_path": (None if self.label_path is None
                           else str(self.label_path)),
            "original_shape": list(self.original_shape),
            "affine": self.affine.tolist(), "spacing": list(self.spacing)}

  @classmethod
  def from_json(cls, item: dict) -> CaseMeta:
    return cls(case_id=item["case_id"],
               image_path=pathlib.Path(item["image_path"]),
               label_path=(None if item["label_path"] is None
                           else pathlib.Path(item["label_path"])),
               original_shape=tuple(item["original_shape"]),
               affine=np.asarray(item["affine"], dtype=np.float64),
               spacing=tuple(item["spacing"]))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Every case of a task, preprocessed; arrays are read-only memory maps.

  Attributes:
    task: the task folder it came from.
    config: the preprocessing applied.
    case_ids: case names; row ``i`` of ``images`` and ``labels`` is
      ``case_ids[i]``.
    images: ``(num_cases, X, Y, Z, C_in)`` float32 in [0, 1].
    labels: ``(num_cases, X, Y, Z, C_out)`` float32 in {0, 1}.
    meta: per-case original shape, affine, spacing and paths.
    cache_path: the cache entry folder the arrays live in.
    from_cache: whether the entry existed already (no NIfTI was decoded).
  """
  task: Task
  config: PreprocessConfig
  case_ids: tuple[str, ...]
  images: np.ndarray
  labels: np.ndarray
  meta: tuple[CaseMeta, ...]
  cache_path: pathlib.Path
  from_cache: bool

  @property
  def modality_indices(self) -> tuple[int, ...]:
    """Index in ``task.modalities`` of each image channel, in channel order."""
    return _modality_indices(self.task, self.config.modalities)

  def indices(self, case_ids: Sequence[str]) -> np.ndarray:
    """Row indices of ``case_ids``, e.g. of ``Split.train``, as int64."""
    rows = {case_id: i for i, case_id in enumerate(self.case_ids)}
    missing = [c for c in case_ids if c not in rows]
    if missing:
      raise ValueError(f"case ids not in the dataset of {self.task.root}: "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return np.array([rows[c] for c in case_ids], dtype=np.int64)


# --------------------------------------------------------------------------
# Reading.


def _contiguous_names(mapping, key: str, path: pathlib.Path) -> tuple[str, ...]:
  """``{"0": a, "1": b}`` as ``(a, b)``; the keys must be 0 .. n-1."""
  if not isinstance(mapping, dict) or not mapping:
    raise ValueError(f"{path}: {key!r} must be a non-empty object such as "
                     f'{{"0": "background", "1": "spleen"}}')
  try:
    by_index = {int(k): str(v) for k, v in mapping.items()}
  except ValueError:
    raise ValueError(f"{path}: {key!r} keys must be integers, got "
                     f"{sorted(mapping)}") from None
  if sorted(by_index) != list(range(len(by_index))):
    raise ValueError(f"{path}: {key!r} keys must be 0 .. {len(by_index) - 1}, "
                     f"got {sorted(by_index)}")
  return tuple(by_index[i] for i in range(len(by_index)))


def _case_id(image_path: pathlib.Path) -> str:
  name = image_path.name
  for suffix in (".nii.gz", ".nii"):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def read_task(task_dir: str | os.PathLike) -> Task:
  """Parses ``dataset.json`` of an MSD task folder and checks its files exist.

  Args:
    task_dir: the task folder (e.g. ``Task09_Spleen``).

  Returns:
    The task's modalities, labels and labelled cases.

  Raises:
    FileNotFoundError: the folder, ``dataset.json`` or a file it lists is
      missing.
    ValueError: ``dataset.json`` is not valid JSON or lacks what MSD puts in
      it ("modality", "labels" with keys 0 .. K-1, "training" image/label
      pairs), or two cases share a name.
  """
  # Absolute, so the paths kept in the cache and in CaseMeta stay valid from
  # any working directory.
  root = pathlib.Path(task_dir).absolute()
  if not root.is_dir():
    raise FileNotFoundError(f"task_dir {root} is not a folder; expected an MSD "
                            "task folder with dataset.json, imagesTr/ and "
                            "labelsTr/")
  path = root / "dataset.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found; an MSD task folder needs "
                            "dataset.json next to imagesTr/ and labelsTr/")
  try:
    spec = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f"{path}: not valid JSON ({err})") from None
  if not isinstance(spec, dict):
    raise ValueError(f"{path}: expected a JSON object at the top level")
  modalities = _contiguous_names(spec.get("modality"), "modality", path)
  label_names = _contiguous_names(spec.get("labels"), "labels", path)
  if len(label_names) < 2:
    raise ValueError(f"{path}: 'labels' must list background and at least one "
                     f"foreground label, got {label_names}")
  if len(label_names) > 256:
    raise ValueError(f"{path}: at most 256 labels are supported, got "
                     f"{len(label_names)}")
  training = spec.get("training")
  if not isinstance(training, list) or not training:
    raise ValueError(f"{path}: 'training' must be a non-empty list of "
                     '{"image": ..., "label": ...} entries')

  cases = []
  for i, entry in enumerate(training):
    if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
            and isinstance(entry.get("label"), str)):
      raise ValueError(f"{path}: training[{i}] must be an object with 'image' "
                       f"and 'label' paths, got {entry!r}")
    image_path, label_path = root / entry["image"], root / entry["label"]
    for listed in (image_path, label_path):
      if not listed.is_file():
        raise FileNotFoundError(f"{listed} is listed in {path} (training[{i}]) "
                                "but does not exist")
    cases.append(Case(_case_id(image_path), image_path, label_path))
  ids = [case.case_id for case in cases]
  duplicates = sorted({c for c in ids if ids.count(c) > 1})
  if duplicates:
    raise ValueError(f"{path}: several training images share the names "
                     f"{duplicates}")
  return Task(root=root, name=str(spec.get("name", root.name)),
              modalities=modalities, label_names=label_names,
              cases=tuple(cases))


def _modality_indices(task: Task, modalities) -> tuple[int, ...]:
  """Resolves names and indices of ``modalities`` against the task's list."""
  if modalities is None:
    return tuple(range(len(task.modalities)))
  if isinstance(modalities, (str, int)):
    modalities = (modalities,)
  available = ", ".join(f"{i}={n!r}" for i, n in enumerate(task.modalities))
  path = task.root / "dataset.json"
  indices = []
  for m in modalities:
    if isinstance(m, str):
      if m not in task.modalities:
        raise ValueError(f"modality {m!r} is not in {path} (available: "
                         f"{available})")
      indices.append(task.modalities.index(m))
    elif isinstance(m, (int, np.integer)) and 0 <= m < len(task.modalities):
      indices.append(int(m))
    else:
      raise ValueError(f"modality {m!r} is neither a name nor an index in "
                       f"{path} (available: {available})")
  return tuple(indices)


_NIFTI_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError,
                 zlib.error, ValueError)


def _open_nifti(path: pathlib.Path):
  """The NIfTI image object, its header read and its voxels not yet."""
  try:
    image = nib.load(path)
  except _NIFTI_ERRORS as err:
    raise ValueError(f"{path}: cannot read as NIfTI ({type(err).__name__}: "
                     f"{err})") from None
  if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
    raise ValueError(f"{path}: cannot read as NIfTI (it is a "
                     f"{type(image).__name__})")
  return image


def _decode(image, path: pathlib.Path, dtype=None) -> np.ndarray:
  """The voxels, header scaling applied; a truncated file fails here."""
  try:
    return (np.asarray(image.dataobj) if dtype is None
            else image.get_fdata(dtype=dtype))
  except _NIFTI_ERRORS as err:
    raise ValueError(f"{path}: cannot read as NIfTI ({type(err).__name__}: "
                     f"{err})") from None


def _open_case(task: Task, case: Case):
  """Opens a case's image and label and checks their shapes from the headers.

  Cheap (no voxels are decoded), so ``load_dataset`` runs it on every case
  before the slow work starts.
  """
  image, label = _open_nifti(case.image_path), _open_nifti(case.label_path)
  if len(image.shape) not in (3, 4):
    raise ValueError(f"{case.image_path}: expected a 3D (X, Y, Z) or 4D "
                     f"(X, Y, Z, modality) image, got shape {image.shape}")
  channels = image.shape[3] if len(image.shape) == 4 else 1
  if channels != len(task.modalities):
    raise ValueError(
        f"{case.image_path}: has {channels} channel(s) but "
        f"{task.root / 'dataset.json'} lists {len(task.modalities)} "
        f"modalities {task.modalities}")
  if len(label.shape) != 3:
    raise ValueError(f"{case.label_path}: expected a 3D (X, Y, Z) label "
                     f"volume, got shape {label.shape}")
  if label.shape != image.shape[:3]:
    raise ValueError(f"{case.label_path}: label shape {label.shape} differs "
                     f"from image shape {image.shape[:3]} of "
                     f"{case.image_path}")
  return image, label


def load_case(task: Task, case: Case | str, *, modalities=None
              ) -> tuple[np.ndarray, np.ndarray, CaseMeta]:
  """Reads one case in its original space.

  Args:
    task: the task, from ``read_task``.
    case: a ``Case`` of ``task`` or its id.
    modalities: names or indices of the channels to keep (see
      ``PreprocessConfig``); ``None`` keeps all.

  Returns:
    ``(image, label, meta)``: image ``(X, Y, Z, M)`` float32 (intensity
    scaling of the header applied), label ``(X, Y, Z)`` uint8 with values in
    ``0 .. K-1``, and the case's ``CaseMeta``.

  Raises:
    ValueError: a file is not readable NIfTI, the image is not 3D or 4D with
      one channel per modality, the label is not 3D, their spatial shapes
      differ, the image is not finite, or the label holds a value that is not
      one of the task's labels.
  """
  if isinstance(case, str):
    case = task.case(case)
  channels = _modality_indices(task, modalities)
  image_nii, label_nii = _open_case(task, case)
  image = _decode(image_nii, case.image_path, dtype=np.float32)
  image = image.reshape(*image.shape[:3], -1)[..., channels]
  if not np.isfinite(image).all():
    raise ValueError(f"{case.image_path}: the image holds NaN or infinite "
                     "values")

  label = _decode(label_nii, case.label_path)
  num_labels = len(task.label_names)
  integral = (not np.issubdtype(label.dtype, np.floating)
              or bool(np.all(np.mod(label, 1) == 0)))
  if not integral or label.min() < 0 or label.max() >= num_labels:
    unexpected = np.setdiff1d(np.unique(label), np.arange(num_labels))
    raise ValueError(
        f"{case.label_path}: unexpected label values "
        f"{unexpected[:10].tolist()}; {task.root / 'dataset.json'} lists "
        f"labels 0 .. {num_labels - 1} {task.label_names}")
  label = label.astype(np.uint8)

  zooms = image_nii.header.get_zooms()[:3]
  meta = CaseMeta(case_id=case.case_id, image_path=case.image_path,
                  label_path=case.label_path,
                  original_shape=tuple(int(s) for s in label.shape),
                  affine=np.asarray(image_nii.affine, dtype=np.float64),
                  spacing=tuple(float(z) for z in zooms))
  return image, label, meta


# --------------------------------------------------------------------------
# Preprocessing.


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


# --------------------------------------------------------------------------
# The cache.


def _default_cache_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "topojax"


def _cache_key(task: Task, config: PreprocessConfig,
               channels: tuple[int, ...]) -> str:
  """Hash of everything the cached arrays depend on."""
  files = []
  for case in task.cases:
    for path in (case.image_path, case.label_path):
      stat = path.stat()
      files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
  settings = {
      "format": _CACHE_FORMAT,
      "shape": config.shape,
      "channels": channels,
      "label_mode": config.label_mode,
      "label_names": task.label_names,
      "cases": [case.case_id for case in task.cases],
      "files": files,
  }
  return hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def _open_entry(task: Task, config: PreprocessConfig, entry: pathlib.Path,
                from_cache: bool) -> Dataset:
  meta = json.loads((entry / "meta.json").read_text())
  return Dataset(
      task=task, config=config, case_ids=tuple(meta["case_ids"]),
      images=np.load(entry / "images.npy", mmap_mode="r"),
      labels=np.load(entry / "labels.npy", mmap_mode="r"),
      meta=tuple(CaseMeta.from_json(m) for m in meta["cases"]),
      cache_path=entry, from_cache=from_cache)


def load_dataset(task_dir: str | os.PathLike, config: PreprocessConfig, *,
                 cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> Dataset:
  """Every labelled case of a task, preprocessed, from the cache if valid.

  The cache entry is a folder ``<cache_dir>/<task folder>-<key>`` holding
  ``images.npy``, ``labels.npy`` and ``meta.json``. ``key`` hashes the
  preprocessing settings, the case list and each file's path, size and
  modification time, so changing any of them makes a new entry. An entry is
  written under a temporary name and renamed into place when complete: an
  interrupted run never leaves a half-written entry behind to be read.
  Entries are never deleted; removing the cache folder is always safe.

  Args:
    task_dir: an MSD task folder.
    config: the preprocessing.
    cache_dir: where entries live; ``None`` is ``$XDG_CACHE_HOME/topojax``
      (``~/.cache/topojax``).
    progress: show a progress bar while decoding cases.

  Returns:
    The ``Dataset``; its arrays are read-only memory maps of the entry.

  Raises:
    FileNotFoundError, ValueError: as ``read_task`` and ``load_case``; every
      header is checked before any voxel is decoded, and nothing is left in
      the cache.
  """
  task = read_task(task_dir)
  channels = _modality_indices(task, config.modalities)
  cache_dir = (_default_cache_dir() if cache_dir is None
               else pathlib.Path(cache_dir))
  key = _cache_key(task, config, channels)
  entry = cache_dir / f"{task.root.name}-{key[:20]}"
  if (entry / "meta.json").is_file():
    return _open_entry(task, config, entry, from_cache=True)
  for case in task.cases:  # Headers first: bad shapes fail in seconds.
    _open_case(task, case)

  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = cache_dir / f".{entry.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
  tmp.mkdir()
  num_labels = len(task.label_names)
  out_channels = 1 if config.label_mode == "binary" else num_labels
  try:
    images = np.lib.format.open_memmap(
        tmp / "images.npy", mode="w+", dtype=np.float32,
        shape=(len(task.cases), *config.shape, len(channels)))
    labels = np.lib.format.open_memmap(
        tmp / "labels.npy", mode="w+", dtype=np.float32,
        shape=(len(task.cases), *config.shape, out_channels))
    metas = []
    for i, case in enumerate(tqdm.tqdm(task.cases, desc=f"preprocessing "
                                       f"{task.root.name}", unit="case",
                                       disable=not progress)):
      image, label, meta = load_case(task, case, modalities=channels)
      images[i], labels[i] = preprocess(image, label, config,
                                        num_labels=num_labels)
      metas.append(meta.to_json())
    images.flush()
    labels.flush()
    del images, labels
    (tmp / "meta.json").write_text(json.dumps(
        {"task": str(task.root), "config": dataclasses.asdict(config),
         "case_ids": [case.case_id for case in task.cases], "cases": metas}))
    try:
      os.replace(tmp, entry)
    except OSError:
      # Another run finished the same entry first; theirs is as good.
      if not (entry / "meta.json").is_file():
        raise
      shutil.rmtree(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return _open_entry(task, config, entry, from_cache=False)


# --------------------------------------------------------------------------
# Splits.


@dataclasses.dataclass(frozen=True)
class Split:
  """A participant-level train/validation/test split of case ids.

  Attributes:
    train: case ids to train on.
    val: case ids for early stopping and model selection.
    test: case ids evaluated once, at the end.
    seed: the seed it was drawn from.
  """
  train: tuple[str, ...]
  val: tuple[str, ...]
  test: tuple[str, ...]
  seed: int

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes the split as JSON (e.g. ``<run>/split.json``)."""
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True to replace "
                            "it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps(dataclasses.asdict(self), indent=1))

  @classmethod
  def load(cls, path: str | os.PathLike) -> Split:
    """Reads a split written by ``save``."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"split file {path} not found")
    try:
      spec = json.loads(path.read_text())
      split = cls(train=tuple(spec["train"]), val=tuple(spec["val"]),
                  test=tuple(spec["test"]), seed=int(spec["seed"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
      raise ValueError(f"{path}: not a split file with 'train', 'val', 'test' "
                       f"and 'seed' ({type(err).__name__}: {err})") from None
    ids = split.train + split.val + split.test
    if len(set(ids)) != len(ids):
      raise ValueError(f"{path}: a case id appears twice in the split")
    return split


def _write_atomically(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def make_split(case_ids: Sequence[str], *, num_val: int, num_test: int,
               seed: int) -> Split:
  """Draws a deterministic split; the cases left over are for training.

  The ids are sorted before shuffling, so the split depends on the seed and
  the set of ids only, not on their order in ``dataset.json``. The test set
  is drawn first: changing ``num_val`` leaves it unchanged.

  Args:
    case_ids: all case ids, one per participant.
    num_val: validation cases.
    num_test: test cases.
    seed: non-negative seed.

  Returns:
    The ``Split``, each part sorted.
  """
  ids = sorted(case_ids)
  if len(set(ids)) != len(ids):
    raise ValueError("case_ids must be unique")
  if num_val < 0 or num_test < 0 or num_val + num_test >= len(ids):
    raise ValueError(
        f"num_val={num_val} and num_test={num_test} must be non-negative and "
        f"leave at least one of the {len(ids)} cases for training")
  order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
  return Split(train=tuple(sorted(order[num_test + num_val:])),
               val=tuple(sorted(order[num_test:num_test + num_val])),
               test=tuple(sorted(order[:num_test])), seed=int(seed))


def default_split(task: Task, *, seed: int) -> Split:
  """The paper's split counts for its tasks, else 20 % validation, 20 % test.

  The paper's counts (``PAPER_TASKS``, DESIGN.md §3) apply when the folder
  has a paper task's name and that task's full number of cases.
  """
  ids = [case.case_id for case in task.cases]
  protocol = PAPER_TASKS.get(task.root.name)
  if protocol is not None and len(ids) == (
      protocol.num_train + protocol.num_val + protocol.num_test):
    return make_split(ids, num_val=protocol.num_val,
                      num_test=protocol.num_test, seed=seed)
  fifth = round(0.2 * len(ids))
  return make_split(ids, num_val=fifth, num_test=fifth, seed=seed)


# --------------------------------------------------------------------------
# Batches.


class _Failure:
  """Carries an exception from the background thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


_DONE = object()


def iterate_batches(images, labels, indices: Sequence[int], *,
                    batch_size: int, seed: int, epoch: int,
                    shuffle: bool = True, flip_axes: Sequence[int] = (),
                    drop_remainder: bool = True
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(images, labels)`` batches, prepared in a background thread.

  The order and the flips are drawn from ``(seed, epoch)`` alone, so a
  resumed run replays exactly the batches it would have seen.

  Args:
    images: ``(num_cases, X, Y, Z, C_in)`` array-like (e.g.
      ``Dataset.images``).
    labels: ``(num_cases, X, Y, Z, C_out)`` array-like.
    indices: rows to draw from (e.g. ``Dataset.indices(split.train)``).
    batch_size: cases per batch.
    seed: non-negative seed of the run.
    epoch: non-negative epoch number.
    shuffle: shuffle the rows (training); ``False`` keeps ``indices`` order
      (evaluation).
    flip_axes: spatial axes (0 = X, 1 = Y, 2 = Z) each flipped with
      probability 1/2, per case, image and label together.
    drop_remainder: drop a last batch smaller than ``batch_size``, so every
      batch has the same shape (no recompilation); evaluation wants
      ``False``.

  Returns:
    An iterator of float32 ``(N, X, Y, Z, C_in)`` and ``(N, X, Y, Z, C_out)``
    pairs, ``N = batch_size`` except perhaps for the last batch.

  Raises:
    ValueError: mismatched arrays, indices out of range, a bad
      ``batch_size``, ``flip_axes``, ``seed`` or ``epoch``, or
      ``drop_remainder`` with fewer rows than one batch.
  """
  image_shape, label_shape = np.shape(images), np.shape(labels)
  if len(image_shape) != 5 or len(label_shape) != 5:
    raise ValueError(f"images and labels must be (num_cases, X, Y, Z, C), got "
                     f"shapes {image_shape} and {label_shape}")
  if image_shape[:4] != label_shape[:4]:
    raise ValueError(f"images {image_shape} and labels {label_shape} differ in "
                     "number of cases or spatial shape")
  indices = np.asarray(indices, dtype=np.int64).reshape(-1)
  if indices.size and (indices.min() < 0 or indices.max() >= image_shape[0]):
    raise ValueError(f"indices must lie in [0, {image_shape[0]}), got "
                     f"[{indices.min()}, {indices.max()}]")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if drop_remainder and indices.size < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {indices.size} "
                     "cases given and drop_remainder=True would yield nothing")
  flip_axes = tuple(int(a) for a in flip_axes)
  if any(a not in (0, 1, 2) for a in flip_axes) or len(set(flip_axes)) != len(
      flip_axes):
    raise ValueError(f"flip_axes must be distinct spatial axes among 0, 1, 2, "
                     f"got {flip_axes}")
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, "
                     f"epoch={epoch}")

  # Every random draw happens here, in a fixed order, so the batches do not
  # depend on thread timing.
  rng = np.random.default_rng((seed, epoch))
  order = rng.permutation(indices) if shuffle else indices
  flips = rng.random((order.size, len(flip_axes))) < 0.5
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
  starts = range(0, stop, batch_size)

  def read(rows, row_flips):
    image_batch, label_batch = [], []
    for row, flip in zip(rows, row_flips):
      axes = [a for a, f in zip(flip_axes, flip) if f]
      image_batch.append(np.flip(np.asarray(images[row]), axes))
      label_batch.append(np.flip(np.asarray(labels[row]), axes))
    return (np.stack(image_batch).astype(np.float32, copy=False),
            np.stack(label_batch).astype(np.float32, copy=False))

  return _prefetched(read(order[s:s + batch_size], flips[s:s + batch_size])
                     for s in starts)


def _prefetched(items: Iterator) -> Iterator:
  """Iterates ``items`` in a background thread, ``_PREFETCH`` ahead."""
  buffer = queue.Queue(maxsize=_PREFETCH)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
    except BaseException as err:  # Re-raised in the consumer's thread.
      put(_Failure(err))
    else:
      put(_DONE)

  def consume():
    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = buffer.get()
        if item is _DONE:
          return
        if isinstance(item, _Failure):
          raise item.error
        yield item
    finally:
      stop.set()
      thread.join()

  return consume()


# --------------------------------------------------------------------------
# Writing predictions.


def as_label_map(mask: np.ndarray) -> np.ndarray:
  """``(X, Y, Z)`` integer labels from a mask, probabilities or one-hot."""
  mask = np.asarray(mask)
  if mask.ndim == 4 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.ndim == 4:
    return np.argmax(mask, axis=-1).astype(np.uint8)
  if mask.ndim != 3:
    raise ValueError(f"mask must be (X, Y, Z) or channels-last (X, Y, Z, C), "
                     f"got shape {mask.shape}")
  if np.issubdtype(mask.dtype, np.floating):
    return (mask > 0.5).astype(np.uint8)
  if mask.size and (mask.min() < 0 or mask.max() > 255):
    raise ValueError(f"mask labels must lie in 0 .. 255, got "
                     f"[{mask.min()}, {mask.max()}]")
  return mask.astype(np.uint8)


def write_prediction(mask: np.ndarray, meta: CaseMeta,
                     path: str | os.PathLike, *,
                     overwrite: bool = False) -> pathlib.Path:
  """Saves a predicted mask as NIfTI in the case's original space.

  The mask is resized back to ``meta.original_shape`` by nearest neighbour
  and written as uint8 with ``meta.affine`` and the original image's header
  (orientation codes, units, description), its data type and intensity
  scaling reset for labels.

  Args:
    mask: in the preprocessed space, one of: ``(X, Y, Z)`` integer or bool
      labels; ``(X, Y, Z)`` or ``(X, Y, Z, 1)`` floats, thresholded at 0.5
      (sigmoid output); ``(X, Y, Z, C)`` one-hot or softmax scores, arg-maxed
      over channels.
    meta: the case's ``CaseMeta`` (``Dataset.meta[i]``).
    path: output file ending in ``.nii.gz`` or ``.nii``; missing folders are
      created.
    overwrite: replace an existing file.

  Returns:
    ``path``.
  """
  path = pathlib.Path(path)
  if not path.name.endswith((".nii.gz", ".nii")):
    raise ValueError(f"path must end in .nii.gz or .nii, got {path}")
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  labels = as_label_map(mask)
  if not pathlib.Path(meta.image_path).is_file():
    raise FileNotFoundError(f"original image {meta.image_path} of case "
                            f"{meta.case_id} not found; its header is needed")
  header = _open_nifti(meta.image_path).header.copy()

  labels = resize(labels, meta.original_shape, order=0)
  image = nib.Nifti1Image(labels, meta.affine, header=header)
  image.header.set_data_dtype(np.uint8)
  image.header.set_slope_inter(1.0, 0.0)
  image.header["cal_min"], image.header["cal_max"] = 0, int(labels.max())
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written aside and renamed, so a crash never leaves a truncated file
  # under the final name; nibabel picks the compression from the suffix.
  suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
  tmp = path.with_name(
      f".{path.name[:-len(suffix)]}.{os.getpid()}.tmp{suffix}")
  try:
    nib.save(image, tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path
