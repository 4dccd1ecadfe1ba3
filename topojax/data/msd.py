"""Medical Segmentation Decathlon (MSD) task folders and their ``dataset.json``.

A task folder has the MSD layout::

    Task09_Spleen/
      dataset.json      "modality", "labels" and the "training" image/label list
      imagesTr/*.nii.gz 3D (X, Y, Z), or 4D (X, Y, Z, M) for M modalities
      labelsTr/*.nii.gz 3D integer labels 0 .. K-1, K = len(dataset.json labels)

Only the labelled ``training`` cases are used; the paper splits them into its
own train, validation and test sets (MSD keeps its test labels private). One
MSD case is one participant, so splitting cases is splitting participants.

``read_task`` parses and checks ``dataset.json`` without decoding any voxel;
``PAPER_TASKS`` holds the paper's preprocessing shape and split counts per
task folder name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np


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
  path, spec = _read_spec(root)
  modalities = _contiguous_names(spec.get("modality"), "modality", path)
  label_names = _label_names(spec, path)
  cases = _training_cases(root, path, spec.get("training"))
  return Task(root=root, name=str(spec.get("name", root.name)),
              modalities=modalities, label_names=label_names, cases=cases)


def _read_spec(root: pathlib.Path) -> tuple[pathlib.Path, dict]:
  """The path of ``root``'s ``dataset.json`` and its parsed top-level object."""
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
  return path, spec


def _label_names(spec: dict, path: pathlib.Path) -> tuple[str, ...]:
  """``dataset.json`` "labels" by value; background and 1 to 255 foregrounds."""
  label_names = _contiguous_names(spec.get("labels"), "labels", path)
  if len(label_names) < 2:
    raise ValueError(f"{path}: 'labels' must list background and at least one "
                     f"foreground label, got {label_names}")
  if len(label_names) > 256:
    raise ValueError(f"{path}: at most 256 labels are supported, got "
                     f"{len(label_names)}")
  return label_names


def _training_cases(root: pathlib.Path, path: pathlib.Path,
                    training) -> tuple[Case, ...]:
  """The ``dataset.json`` "training" list as cases whose files all exist."""
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
  return tuple(cases)


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
