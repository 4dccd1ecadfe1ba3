"""Tests for topojax/data/writer.py: predictions written back in the
original space."""

import nibabel as nib
import numpy as np
import pytest

from topojax import data

# tests/ is on sys.path under pytest.
from data_fixtures import cache_dir  # noqa: F401  (a fixture)
from data_fixtures import ramp_case
from data_fixtures import write_task


@pytest.fixture
def ramp_dataset(tmp_path, cache_dir):
  root = write_task(tmp_path / "Task01_Multi",
                    {f"case_{i}": ramp_case(seed=i) for i in range(2)},
                    modality=("FLAIR", "T1w"),
                    labels=("background", "edema", "tumour"))
  config = data.PreprocessConfig(shape=(17, 21, 13), label_mode="onehot")
  return data.load_dataset(root, config, cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize("form", ["onehot", "labels", "probabilities"])
def test_write_prediction_in_original_space(ramp_dataset, tmp_path, form):
  meta = ramp_dataset.meta[1]
  onehot = np.asarray(ramp_dataset.labels[1])
  expected = ramp_case(seed=1)[1]
  if form == "labels":
    mask = np.argmax(onehot, -1)
  elif form == "probabilities":  # Sigmoid output of a binary network.
    mask = 0.2 + 0.6 * (np.argmax(onehot, -1) > 0)[..., None]
    expected = (expected > 0).astype(np.uint8)
  else:
    mask = onehot
  path = data.write_prediction(mask, meta, tmp_path / "pred" / "case_1.nii.gz")
  written = nib.load(path)
  original = nib.load(meta.image_path)
  assert written.shape == (9, 11, 7) == meta.original_shape
  assert written.get_data_dtype() == np.uint8
  np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
  np.testing.assert_allclose(written.header.get_zooms(),
                             original.header.get_zooms()[:3])
  assert written.header["sform_code"] == original.header["sform_code"]
  np.testing.assert_array_equal(np.asarray(written.dataobj), expected)


def test_write_prediction_never_overwrites_silently(ramp_dataset, tmp_path):
  mask = np.zeros((17, 21, 13), np.uint8)
  path = tmp_path / "case_0.nii.gz"
  data.write_prediction(mask, ramp_dataset.meta[0], path)
  with pytest.raises(FileExistsError, match="case_0.nii.gz"):
    data.write_prediction(mask, ramp_dataset.meta[0], path)
  data.write_prediction(mask + 1, ramp_dataset.meta[0], path, overwrite=True)
  assert np.all(np.asarray(nib.load(path).dataobj) == 1)
  # No temporary file is left next to it.
  assert {p.name for p in tmp_path.iterdir()} == {"cache", "case_0.nii.gz",
                                                  "Task01_Multi"}
  with pytest.raises(ValueError, match="must end in"):
    data.write_prediction(mask, ramp_dataset.meta[0], tmp_path / "case.npy")
  with pytest.raises(ValueError, match="mask must be"):
    data.write_prediction(mask[0], ramp_dataset.meta[0], tmp_path / "x.nii")
