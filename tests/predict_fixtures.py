"""Shared inputs of the tests of topojax/predict/: tiny trained runs and
NIfTI images of odd shapes and orientations.

A helper, not a conftest: the test modules import what they use, fixtures
included, so nothing here reaches other tests.
"""

import json

import nibabel as nib
import numpy as np
import pytest

from topojax import cli
from topojax import data
from topojax import synthetic
from topojax import train

CONFIG = train.TrainConfig(
    shape=(16, 16, 16), base_channels=4, depth=2, batch_size=4,
    kernel_sizes=(2, 4),
    phase1=train.PhaseConfig(loss="dice", epochs=1, learning_rate=1e-2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """``(root, task)``: a tiny task and a one-epoch run of it, ``root/run``."""
  root = tmp_path_factory.mktemp("predict")
  task = root / "Task00_Tiny"
  synthetic.generate_task(
      task, synthetic.SynthConfig(shape=(16, 16, 16), num_cases=10, seed=3),
      progress=False)
  train.train(CONFIG, task, root / "run", phases=(1,),
              cache_dir=root / "cache", progress=False)
  return root, task


def _oblique_affine(spacing, degrees, origin):
  """Rotated about X, then Y, by ``degrees``; anisotropic voxels in mm."""
  (a, b) = np.radians(degrees)
  about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)],
                      [0, np.sin(a), np.cos(a)]])
  about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0],
                      [-np.sin(b), 0, np.cos(b)]])
  affine = np.eye(4)
  affine[:3, :3] = about_y @ about_x @ np.diag(spacing)
  affine[:3, 3] = origin
  return affine


def save_nifti(path, volume, affine, *, qform_code=1, sform_code=1):
  """Writes ``volume`` as float32 NIfTI with ``affine`` and the given codes."""
  image = nib.Nifti1Image(np.asarray(volume, np.float32), affine)
  image.set_qform(affine, code=qform_code)
  image.set_sform(affine, code=sform_code)
  nib.save(image, path)
  return path


# name, shape, spacing (mm), rotations (degrees), origin (mm), qform and
# sform codes.
ODD = (("a.nii.gz", (13, 17, 11), (0.7, 1.1, 2.5), (20, 35),
        (-40.0, 12.5, 7.0), 1, 2),
       ("b.nii", (20, 9, 15), (1.5, 0.8, 1.2), (-15, 50),
        (3.0, -60.0, 25.0), 2, 4))


@pytest.fixture(scope="module")
def odd(run):
  """Two task images resampled to odd shapes, oblique; and the CLI's masks."""
  root, task = run
  folder = root / "odd"
  folder.mkdir()
  split = data.Split.load(root / "run" / "phase1" / "split.json")
  for case_id, (name, shape, spacing, degrees, origin, qform, sform) in zip(
      split.test, ODD):
    source = nib.load(task / "imagesTr" / f"{case_id}.nii.gz").get_fdata(
        dtype=np.float32)
    save_nifti(folder / name, data.resize(source, shape, order=1),
          _oblique_affine(spacing, degrees, origin), qform_code=qform,
          sform_code=sform)
  out = root / "odd_pred"
  assert cli.main(["predict", "--run", str(root / "run"), "--images",
                   str(folder), "--out", str(out)]) == 0
  return folder, out


# A multi-modal run: three modalities, trained on two of them, reordered.

MODALITIES = ("T1", "T2", "FLAIR")


def _multimodal_task(root, *, num_cases=6, shape=(8, 8, 8)):
  rng = np.random.default_rng(5)
  task = root / "Task00_Multi"
  for folder in ("imagesTr", "labelsTr"):
    (task / folder).mkdir(parents=True)
  grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
  training = []
  for i in range(num_cases):
    center = rng.uniform(2.5, 5.5, 3)
    label = (np.linalg.norm(grid - center, axis=-1) < 2.5).astype(np.uint8)
    image = np.stack([label * gain + rng.normal(0, 0.3, shape)
                      for gain in (1.0, -0.5, 2.0)], -1)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine),
             task / "imagesTr" / f"case_{i}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine),
             task / "labelsTr" / f"case_{i}.nii.gz")
    training.append({"image": f"./imagesTr/case_{i}.nii.gz",
                     "label": f"./labelsTr/case_{i}.nii.gz"})
  (task / "dataset.json").write_text(json.dumps({
      "name": "Multi", "modality": dict(enumerate(MODALITIES)),
      "labels": {"0": "background", "1": "ball"}, "training": training}))
  return task


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
  root = tmp_path_factory.mktemp("multimodal")
  task = _multimodal_task(root)
  config = train.TrainConfig(
      shape=(8, 8, 8), modalities=("FLAIR", "T1"), base_channels=4, depth=2,
      batch_size=2, kernel_sizes=(2, 4),
      phase1=train.PhaseConfig(loss="dice", epochs=1, learning_rate=1e-2))
  train.train(config, task, root / "run", phases=(1,),
              cache_dir=root / "cache", progress=False)
  return root, task
