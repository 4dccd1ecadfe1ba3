"""Decoding one MSD case from NIfTI, headers checked before any voxel.

``load_case`` reads a case in its original space: image ``(X, Y, Z, M)``
float32 with the header's intensity scaling applied, label ``(X, Y, Z)``
uint8, and the ``CaseMeta`` (shape, affine, spacing, paths) it takes to put a
prediction back into that space. A file that is not readable NIfTI, or
whose shape disagrees with ``dataset.json``, is a ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib

import nibabel as nib
import numpy as np

from topojax.data.msd import Case
from topojax.data.msd import Task
from topojax.data.msd import _modality_indices


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
