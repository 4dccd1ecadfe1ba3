"""Synthetic tasks on disk: an MSD-layout folder, and a preview of it."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import nibabel as nib
from scipy import ndimage
import tqdm

from topojax.synthetic.cases import make_case
from topojax.synthetic.config import SynthConfig
from topojax.synthetic.config import affine


def generate_task(out_dir: str | os.PathLike,
                  config: SynthConfig = SynthConfig(), *,
                  overwrite: bool = False, progress: bool = True
                  ) -> pathlib.Path:
  """Writes a complete MSD-layout task folder of synthetic cases.

  Args:
    out_dir: the task folder to create, e.g. ``data/Task00_Synthetic``.
    config: the task.
    overwrite: write into a folder that is not empty, replacing the files of
      the same names.
    progress: show a progress bar.

  Returns:
    ``out_dir``.

  Raises:
    FileExistsError: ``out_dir`` exists and is not empty, without
      ``overwrite``, or is a file.
  """
  root = pathlib.Path(out_dir)
  if root.exists() and not root.is_dir():
    raise FileExistsError(f"out_dir {root} exists and is a file")
  if root.is_dir() and any(root.iterdir()) and not overwrite:
    raise FileExistsError(f"out_dir {root} exists and is not empty; pass "
                          "overwrite=True (--overwrite) to write into it")
  (root / "imagesTr").mkdir(parents=True, exist_ok=True)
  (root / "labelsTr").mkdir(exist_ok=True)
  # dataset.json goes last: a folder interrupted mid-way has none and cannot
  # be mistaken for a complete task (an old one would list half-new files).
  (root / "dataset.json").unlink(missing_ok=True)

  matrix = affine(config)
  training = []
  for index in tqdm.tqdm(range(config.num_cases), desc="synthesising",
                         unit="case", disable=not progress):
    image, label, num_objects = make_case(config, index)
    name = f"synth_{index:03d}.nii.gz"
    for folder, volume in (("imagesTr", image), ("labelsTr", label)):
      nifti = nib.Nifti1Image(volume, matrix)
      nifti.header.set_xyzt_units("mm")
      nifti.set_qform(matrix, code=1)  # Scanner coordinates.
      nifti.set_sform(matrix, code=1)
      nib.save(nifti, root / folder / name)
    training.append({"image": f"./imagesTr/{name}",
                     "label": f"./labelsTr/{name}",
                     "num_objects": num_objects})

  spec = {
      "name": "Synthetic",
      "description": "topojax synthetic topology task: labelled objects, "
                     "unlabelled bright distractors, blur, bias and noise",
      "tensorImageSize": "3D",
      "modality": {"0": "synthetic"},
      "labels": {"0": "background", "1": "object"},
      "numTraining": config.num_cases,
      "numTest": 0,
      "training": training,
      "test": [],
      "synthetic": dataclasses.asdict(config),
  }
  (root / "dataset.json").write_text(json.dumps(spec, indent=1))
  return root


def save_preview(task_dir: str | os.PathLike, path: str | os.PathLike, *,
                 num_cases: int = 4, overwrite: bool = False) -> pathlib.Path:
  """Draws the first cases of a task as a PNG.

  Top row: the axial slice through each case's label centre, label outline
  in red. Bottom row: the maximum over Z of the image smoothed by a Gaussian
  of 1 voxel, where the noise fades and every bright blob, labelled or not,
  shows.

  Args:
    task_dir: an MSD task folder.
    path: the PNG to write.
    num_cases: how many cases to draw.
    overwrite: replace an existing file.

  Returns:
    ``path``.
  """
  # Imported here: the preview is the only use of plotting in data handling.
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  from topojax import data

  path = pathlib.Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  task = data.read_task(task_dir)
  cases = task.cases[:num_cases]
  figure, axes = plt.subplots(2, len(cases), squeeze=False,
                              figsize=(2.6 * len(cases), 5.4))
  for column, case in enumerate(cases):
    image, label, _ = data.load_case(task, case)
    image = image[..., 0]
    z = (int(round(ndimage.center_of_mass(label)[2])) if label.any()
         else label.shape[2] // 2)
    views = ((image[:, :, z], label[:, :, z], f"{case.case_id}, z={z}"),
             (ndimage.gaussian_filter(image, 1.0).max(axis=2),
              label.max(axis=2), "smoothed, max over Z"))
    for row, (picture, outline, title) in enumerate(views):
      ax = axes[row, column]
      # Transposed so that X runs left to right and Y bottom to top.
      ax.imshow(picture.T, cmap="gray", origin="lower")
      if outline.any():
        ax.contour(outline.T, levels=[0.5], colors="red", linewidths=0.8)
      ax.set_title(title, fontsize=9)
      ax.set_axis_off()
  figure.suptitle(f"{task.name}: image with label outline (red)")
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path
