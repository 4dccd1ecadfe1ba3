"""Tests for topojax/data/msd.py: reading MSD task folders and ``dataset.json``,
modality selection, and every bad ``dataset.json``."""

import json

import numpy as np
import pytest

from topojax import data

# tests/ is on sys.path under pytest.
from data_fixtures import cache_dir  # noqa: F401  (a fixture)
from data_fixtures import check_bad_task
from data_fixtures import entries
from data_fixtures import good_task
from data_fixtures import ramp_case
from data_fixtures import write_task


def test_multimodal_selection_by_name_and_index(tmp_path, cache_dir):
  root = write_task(tmp_path / "Task01_Multi",
                    {f"case_{i}": ramp_case(seed=i) for i in range(3)},
                    modality=("FLAIR", "T1w"),
                    labels=("background", "edema", "tumour"))
  task = data.read_task(root)
  image, _, _ = data.load_case(task, "case_1", modalities=("T1w", 0))
  np.testing.assert_array_equal(image[..., 0], 4.0)
  np.testing.assert_array_equal(image[..., 1], ramp_case()[0][..., 0])
  config = data.PreprocessConfig(shape=(9, 11, 7), modalities="FLAIR",
                                 label_mode="onehot")
  dataset = data.load_dataset(root, config, cache_dir=cache_dir,
                              progress=False)
  assert dataset.images.shape == (3, 9, 11, 7, 1)
  assert dataset.labels.shape == (3, 9, 11, 7, 3)
  np.testing.assert_allclose(dataset.images[2, :, 0, 0, 0],
                             np.arange(9) / 8, atol=1e-6)
  for i in range(3):
    np.testing.assert_array_equal(np.argmax(dataset.labels[i], -1),
                                  ramp_case(seed=i)[1])


# --------------------------------------------------------------------------
# Bad input: each names the file and what was wrong, before anything is
# written to the cache.


BAD_TASKS = {
    "missing dataset.json": (
        lambda root: (root / "dataset.json").unlink(),
        FileNotFoundError, "dataset.json not found"),
    "dataset.json not JSON": (
        lambda root: (root / "dataset.json").write_text("{'training': "),
        ValueError, "dataset.json: not valid JSON"),
    "no training list": (
        lambda root: (root / "dataset.json").write_text(json.dumps(
            {"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "fg"}})),
        ValueError, "'training' must be"),
    "labels not 0..K-1": (
        lambda root: (root / "dataset.json").write_text(
            (root / "dataset.json").read_text().replace('"1": "organ"',
                                                        '"2": "organ"')),
        ValueError, "'labels' keys must be 0 .. 1"),
    "listed image missing": (
        lambda root: (root / "imagesTr/case_1.nii.gz").unlink(),
        FileNotFoundError, "imagesTr/case_1.nii.gz is listed in"),
    "listed label missing": (
        lambda root: (root / "labelsTr/case_0.nii.gz").unlink(),
        FileNotFoundError, "labelsTr/case_0.nii.gz is listed in"),
}


@pytest.mark.parametrize("name", list(BAD_TASKS))
def test_bad_task(tmp_path, cache_dir, name):
  check_bad_task(tmp_path, cache_dir, BAD_TASKS[name])


def test_missing_task_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="task_dir .*nowhere"):
    data.read_task(tmp_path / "nowhere")


@pytest.mark.parametrize("modalities, match", [
    (("T2",), "modality 'T2' is not in"),
    ((2,), "modality 2 is neither"),
])
def test_unknown_modality(tmp_path, cache_dir, modalities, match):
  root = good_task(tmp_path / "Task05")
  config = data.PreprocessConfig(shape=(4, 4, 4), modalities=modalities)
  with pytest.raises(ValueError, match=match):
    data.load_dataset(root, config, cache_dir=cache_dir, progress=False)
  assert entries(cache_dir) == []
