"""``predict_images``: NIfTI files in, each mask written in its own space.

This is ``topojax predict --images``. The inputs are files and folders of
them; everything that can be checked without decoding voxels (names,
outputs, headers) is checked for all of them before the first is segmented.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import pathlib

import tqdm

from topojax import data
from topojax.predict import segmenter as segmenter_lib
from topojax.predict.segmenter import NIFTI_SUFFIXES


def _image_files(images: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
  """The NIfTI files named by ``images``, folders expanded, in order."""
  if isinstance(images, (str, os.PathLike)):
    images = [images]
  files = []
  for item in images:
    path = pathlib.Path(item)
    if path.is_dir():
      files.extend(_folder_images(path))
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


def _folder_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """The NIfTI files directly in ``folder``, sorted by name; at least one."""
  # Hidden files include the "._*" metadata files macOS leaves in archives;
  # they are not images.
  found = sorted(p for p in folder.iterdir()
                 if p.name.endswith(NIFTI_SUFFIXES)
                 and not p.name.startswith(".") and p.is_file())
  if not found:
    raise FileNotFoundError(f"--images {folder}: no .nii or .nii.gz file "
                            "in that folder")
  return found


def _refuse_existing(paths, out_dir, *, overwrite: bool) -> None:
  """Raises unless ``overwrite`` or none of ``paths`` exists yet, before any
  work, so that no earlier prediction is replaced silently."""
  existing = [str(p) for p in paths if p.exists()]
  if existing and not overwrite:
    raise FileExistsError(
        f"--out {out_dir} already holds {len(existing)} of the predictions "
        f"(e.g. {existing[0]}); pass overwrite=True (--overwrite) to replace "
        "them")


def _output_paths(files: Sequence[pathlib.Path],
                  out_dir: pathlib.Path) -> list[pathlib.Path]:
  """``<out_dir>/<name>.nii.gz`` of each file, in order.

  Raises:
    ValueError: two files would write one mask, or a mask would replace its
      own image.
  """
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
  return outputs


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
  segmenter_lib._check_keep_largest(keep_largest)
  files = _image_files(images)
  out_dir = pathlib.Path(out_dir)
  outputs = _output_paths(files, out_dir)
  _refuse_existing(outputs, out_dir, overwrite=overwrite)
  segmenter = segmenter_lib.Segmenter.from_run(run_dir)
  for path in files:
    segmenter.check_file(path)
  out_dir.mkdir(parents=True, exist_ok=True)
  for path, output in zip(tqdm.tqdm(files, desc="predicting", unit="image",
                                    disable=not progress), outputs):
    segmenter.write_prediction(path, output, keep_largest=keep_largest,
                               overwrite=overwrite)
  return outputs
