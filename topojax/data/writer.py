"""Predicted masks written back as NIfTI in the original image's space.

A mask in the preprocessed space is resized back to the case's original shape
by nearest neighbour and saved with the original image's affine and header,
so it overlays the image it was predicted from in any viewer.
"""

from __future__ import annotations

import os
import pathlib

import nibabel as nib
import numpy as np

from topojax.data.nifti import CaseMeta
from topojax.data.nifti import _open_nifti
from topojax.data.preprocessing import resize


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
