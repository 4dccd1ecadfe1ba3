"""A task's preprocessed cases, cached on disk as memory-mapped ``.npy``.

``load_dataset`` preprocesses every labelled case of a task and caches the
result in a folder keyed by the settings and the files it came from, so only
the first run ever decodes NIfTI; later runs map the cached arrays. Its
``Dataset`` holds channels-last float32 arrays:

* images ``(num_cases, X, Y, Z, C_in)`` in [0, 1], ``C_in`` = selected
  modalities;
* labels ``(num_cases, X, Y, Z, C_out)`` in {0, 1}: ``C_out = 1`` for
  ``label_mode="binary"`` and ``K`` for ``label_mode="onehot"``.

Without a fixed ``shape`` (nnU-Net's protocol: each case at a target spacing
or on its own grid), cases differ in shape: each array file is then one flat
run of every case's voxels, and ``images[i]`` (a ``CaseArrays``) is case
``i``'s ``(X_i, Y_i, Z_i, C)`` view of it, still memory-mapped.

An entry heals: ``meta.json`` records each array file's size, dtype, shape
and CRC-32, checked whenever the entry is opened; an entry that disagrees (a
file cut short by a full disk, a flipped bit, a lost file) is rebuilt, with
one warning line naming it. The check reads every byte once: about 1 s for
the 1.1 GB of Task09_Spleen at 160×160×128 (CRC-32 runs at about 1.2 GB/s
on one core from the page cache).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import shutil
import sys
from typing import Any
import uuid
import zlib

import numpy as np
import tqdm

from topojax.data.msd import Task
from topojax.data.msd import _modality_indices
from topojax.data.msd import read_task
from topojax.data.nifti import CaseMeta
from topojax.data.nifti import _open_case
from topojax.data.nifti import load_case
from topojax.data.preprocessing import PreprocessConfig
from topojax.data.preprocessing import case_grid
from topojax.data.preprocessing import preprocess

# Bump when preprocessing changes what it writes, so old cache entries are
# never mistaken for new ones (2: meta.json describes the array files).
_CACHE_FORMAT = 2
_ARRAY_FILES = ("images.npy", "labels.npy")
_CHUNK_BYTES = 1 << 24


class CaseArrays(Sequence):
  """Cases of different shapes, read-only views of one flat memory map.

  ``arrays[i]`` is case ``i``'s ``(X_i, Y_i, Z_i, C)`` array; nothing is read
  from disk until its voxels are.
  """

  def __init__(self, flat: np.ndarray, shapes: Sequence[Sequence[int]]):
    self._flat = flat
    self.shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
    sizes = [int(np.prod(shape)) for shape in self.shapes]
    self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if self._offsets[-1] != flat.size:
      raise ValueError(f"case shapes {self.shapes} hold {self._offsets[-1]} "
                       f"values, the array {flat.size}")

  def __len__(self) -> int:
    return len(self.shapes)

  def __getitem__(self, row) -> np.ndarray:
    row = range(len(self))[row]  # Negative rows and range checks.
    first, last = self._offsets[row], self._offsets[row + 1]
    return self._flat[first:last].reshape(self.shapes[row])

  @property
  def channels(self) -> int:
    return self.shapes[0][-1]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Every case of a task, preprocessed; arrays are read-only memory maps.

  Attributes:
    task: the task folder it came from.
    config: the preprocessing applied.
    case_ids: case names; row ``i`` of ``images`` and ``labels`` is
      ``case_ids[i]``.
    images: ``(num_cases, X, Y, Z, C_in)`` float32 in [0, 1]; with
      ``config.shape=None``, ``CaseArrays`` of ``(X_i, Y_i, Z_i, C_in)``.
    labels: ``(num_cases, X, Y, Z, C_out)`` float32 in {0, 1}; likewise.
    meta: per-case original shape, affine, spacing and paths.
    cache_path: the cache entry folder the arrays live in.
    from_cache: whether the entry existed already (no NIfTI was decoded).
  """
  task: Task
  config: PreprocessConfig
  case_ids: tuple[str, ...]
  images: np.ndarray | CaseArrays
  labels: np.ndarray | CaseArrays
  meta: tuple[CaseMeta, ...]
  cache_path: pathlib.Path
  from_cache: bool

  @property
  def in_channels(self) -> int:
    return self.images[0].shape[-1]

  @property
  def out_channels(self) -> int:
    return self.labels[0].shape[-1]

  @property
  def case_shapes(self) -> tuple[tuple[int, int, int], ...]:
    """Spatial ``(X, Y, Z)`` of every case, in rows."""
    if isinstance(self.images, CaseArrays):
      return tuple(shape[:3] for shape in self.images.shapes)
    return (tuple(self.images.shape[1:4]),) * len(self.case_ids)

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
      # Only when set, so that the keys of fixed-shape entries stay as they
      # were before there was a spacing.
      **({"spacing": config.spacing} if config.spacing is not None else {}),
      "channels": channels,
      "label_mode": config.label_mode,
      "label_names": task.label_names,
      "cases": [case.case_id for case in task.cases],
      "files": files,
  }
  return hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def _crc32(path: pathlib.Path) -> int:
  """CRC-32 of a file, read in chunks (a cache entry may not fit in memory)."""
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      crc = zlib.crc32(chunk, crc)
  return crc


def _describe(path: pathlib.Path) -> dict[str, Any]:
  """What ``meta.json`` records of an array file, to check it against."""
  array = np.load(path, mmap_mode="r")
  return {"size": path.stat().st_size, "dtype": array.dtype.str,
          "shape": list(array.shape), "crc32": _crc32(path)}


def _damage(entry: pathlib.Path) -> str | None:
  """Why the entry's files disagree with its ``meta.json``; ``None`` if not."""
  try:
    expected = json.loads((entry / "meta.json").read_text())["files"]
  except (OSError, ValueError, KeyError, TypeError) as err:
    return f"meta.json unreadable: {err}"
  for name in _ARRAY_FILES:
    path, want = entry / name, expected[name]
    try:
      size = path.stat().st_size
      if size != want["size"]:
        return f"{name} has {size} bytes, {want['size']} expected"
      array = np.load(path, mmap_mode="r")
      found = (array.dtype.str, list(array.shape))
      del array
    except (OSError, ValueError) as err:
      return f"{name} unreadable: {err}"
    if found != (want["dtype"], want["shape"]):
      return (f"{name} holds {found[0]} {found[1]}, {want['dtype']} "
              f"{want['shape']} expected")
    if _crc32(path) != want["crc32"]:
      return f"{name} fails its checksum"
  return None


def _discard(entry: pathlib.Path) -> None:
  """Removes a damaged entry: renamed aside first, so none is seen half gone."""
  aside = entry.with_name(f".{entry.name}.{os.getpid()}-"
                          f"{uuid.uuid4().hex[:8]}.damaged")
  try:
    os.replace(entry, aside)
  except FileNotFoundError:
    return  # Another run removed it first.
  shutil.rmtree(aside, ignore_errors=True)


def _open_entry(task: Task, config: PreprocessConfig, entry: pathlib.Path,
                from_cache: bool) -> Dataset:
  meta = json.loads((entry / "meta.json").read_text())
  images = np.load(entry / "images.npy", mmap_mode="r")
  labels = np.load(entry / "labels.npy", mmap_mode="r")
  if "case_shapes" in meta:
    images = CaseArrays(images, meta["case_shapes"]["images"])
    labels = CaseArrays(labels, meta["case_shapes"]["labels"])
  return Dataset(
      task=task, config=config, case_ids=tuple(meta["case_ids"]),
      images=images, labels=labels,
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
  An entry whose files disagree with its ``meta.json`` (size, dtype, shape,
  CRC-32) is rebuilt, saying so on stderr. Entries are never deleted
  otherwise; removing the cache folder is always safe.

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
  if entry.is_dir():
    damage = _damage(entry)
    if damage is None:
      return _open_entry(task, config, entry, from_cache=True)
    print(f"topojax: warning: cache entry {entry} is damaged ({damage}); "
          "rebuilding it", file=sys.stderr, flush=True)
    _discard(entry)
  for case in task.cases:  # Headers first: bad shapes fail in seconds.
    _open_case(task, case)

  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = cache_dir / f".{entry.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
  tmp.mkdir()
  try:
    _write_entry(task, config, channels, tmp, progress=progress)
    _move_into_place(tmp, entry)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return _open_entry(task, config, entry, from_cache=False)


def _reserve(path: pathlib.Path) -> None:
  """Allocates a (sparse) file's blocks now.

  Writing into a memory map on a full disk kills the process (SIGBUS);
  reserving first turns that into an ``OSError`` before any work.
  """
  if not hasattr(os, "posix_fallocate"):  # macOS
    return
  with path.open("r+b") as f:
    try:
      os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
    except OSError as err:
      if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return  # A file system that cannot reserve: written as before.
      raise OSError(err.errno, f"cannot write the preprocessing cache in "
                    f"{path.parent.parent}: {err.strerror}; free space or "
                    "choose another --cache-dir") from None


def _write_entry(task: Task, config: PreprocessConfig,
                 channels: tuple[int, ...], tmp: pathlib.Path, *,
                 progress: bool) -> None:
  """Preprocesses every case into the folder ``tmp``, ``meta.json`` last.

  ``meta.json`` is written after the arrays are flushed, so its presence
  marks a complete entry.
  """
  num_labels = len(task.label_names)
  out_channels = 1 if config.label_mode == "binary" else num_labels
  # Every case's grid from its header, so the files are sized (and their
  # space reserved) before the first voxel is decoded.
  grids = []
  for case in task.cases:
    header = _open_case(task, case)[0].header
    grids.append(case_grid(config, header.get_data_shape()[:3],
                           header.get_zooms()[:3]))
  fixed = config.shape is not None
  shapes = {"images": [(*g, len(channels)) for g in grids],
            "labels": [(*g, out_channels) for g in grids]}
  arrays = {}
  for name, case_shapes in shapes.items():
    size = (len(task.cases), *case_shapes[0]) if fixed else (
        sum(int(np.prod(s)) for s in case_shapes),)
    arrays[name] = np.lib.format.open_memmap(
        tmp / f"{name}.npy", mode="w+", dtype=np.float32, shape=size)
    _reserve(tmp / f"{name}.npy")
  views = {name: array if fixed else CaseArrays(array, shapes[name])
           for name, array in arrays.items()}
  metas = []
  for i, case in enumerate(tqdm.tqdm(task.cases, desc=f"preprocessing "
                                     f"{task.root.name}", unit="case",
                                     disable=not progress)):
    image, label, meta = load_case(task, case, modalities=channels)
    image, label = preprocess(image, label, config, num_labels=num_labels,
                              spacing=meta.spacing)
    views["images"][i][...], views["labels"][i][...] = image, label
    metas.append(meta.to_json())
  for array in arrays.values():
    array.flush()
  del arrays, views
  (tmp / "meta.json").write_text(json.dumps(
      {"task": str(task.root), "config": dataclasses.asdict(config),
       "case_ids": [case.case_id for case in task.cases], "cases": metas,
       **({} if fixed else {"case_shapes": shapes}),
       "files": {name: _describe(tmp / name) for name in _ARRAY_FILES}}))


def _move_into_place(tmp: pathlib.Path, entry: pathlib.Path) -> None:
  """Renames the complete ``tmp`` folder to ``entry``, atomically."""
  try:
    os.replace(tmp, entry)
  except OSError:
    # Another run finished the same entry first; theirs is as good.
    if not (entry / "meta.json").is_file():
      raise
    shutil.rmtree(tmp)
