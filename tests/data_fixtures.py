"""Shared inputs of the tests of topojax/data/: MSD task folders and cases.

A helper, not a conftest: the test modules import what they use, fixtures
included, so nothing here reaches other tests.
"""

import json
import pathlib

import nibabel as nib
import numpy as np
import pytest

from topojax import data
from topojax import synthetic

SYNTH = synthetic.SynthConfig(shape=(20, 18, 16), num_cases=10,
                              spacing=(0.7, 0.9, 2.5), seed=7)


def sheared_affine(spacing=(0.8, 1.2, 3.0), origin=(-10.0, 4.0, 7.5)):
  matrix = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
  matrix[:3, 3] = origin
  matrix[0, 1] = 0.1  # Sheared on purpose: nothing may assume a diagonal.
  return matrix


def write_task(root, cases, *, modality=("CT",),
               labels=("background", "organ"), affine=None):
  """An MSD folder from ``{case_id: (image, label)}`` arrays."""
  root = pathlib.Path(root)
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  affine = sheared_affine() if affine is None else affine
  training = []
  for case_id, (image, label) in cases.items():
    name = f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
    training.append({"image": f"./imagesTr/{name}",
                     "label": f"./labelsTr/{name}"})
  spec = {"name": root.name,
          "modality": {str(i): m for i, m in enumerate(modality)},
          "labels": {str(i): n for i, n in enumerate(labels)},
          "training": training, "test": []}
  (root / "dataset.json").write_text(json.dumps(spec))
  return root


def ramp_case(shape=(9, 11, 7), seed=0):
  """Two modalities: a ramp along X and a constant; labels 0, 1, 2."""
  x = np.arange(shape[0], dtype=np.float32)[:, None, None]
  ramp = np.broadcast_to(3.0 * x - 5.0, shape)
  image = np.stack([ramp, np.full(shape, 4.0, np.float32)], axis=-1)
  label = np.random.default_rng(seed).integers(0, 3, size=shape)
  return image.astype(np.float32), label.astype(np.uint8)


@pytest.fixture(scope="module")
def synth_task(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth") / "Task00_Synthetic"
  return synthetic.generate_task(root, SYNTH, progress=False)


@pytest.fixture
def cache_dir(tmp_path):
  return tmp_path / "cache"


def entries(cache_dir):
  return sorted(cache_dir.iterdir()) if cache_dir.exists() else []


def good_task(root):
  """Two valid single-modality cases, ``(6, 7, 5)`` voxels, to corrupt."""
  return write_task(root, {f"case_{i}": (np.random.default_rng(i).random(
      (6, 7, 5), dtype=np.float32), np.zeros((6, 7, 5), np.uint8))
                           for i in range(2)})


def check_bad_task(tmp_path, cache_dir, case):
  """``load_dataset`` of a good task broken by ``case = (corrupt, error,
  match)`` raises ``error`` matching ``match`` and leaves no cache entry."""
  corrupt, error, match = case
  root = good_task(tmp_path / "Task05_Bad")
  corrupt(root)
  config = data.PreprocessConfig(shape=(4, 4, 4))
  with pytest.raises(error, match=match):
    data.load_dataset(root, config, cache_dir=cache_dir, progress=False)
  assert not any(p.name.endswith(".tmp") or p.is_dir()
                 for p in entries(cache_dir))
