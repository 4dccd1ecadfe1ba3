"""Tests for topojax/predict/runs.py: phase folders, model descriptions and
checkpoints of finished runs."""

import json
import logging
import shutil

import nibabel as nib
import numpy as np
import pytest

import topojax
from topojax import checkpoint
from topojax import predict

# tests/ is on sys.path under pytest.
from predict_fixtures import CONFIG
from predict_fixtures import MODALITIES
from predict_fixtures import multimodal  # noqa: F401  (a fixture)
from predict_fixtures import run  # noqa: F401  (a fixture)


def test_phase_dir_prefers_the_last_finished_phase(run):
  root, _ = run
  assert predict.phase_dir(root / "run") == root / "run" / "phase1"
  summary = json.loads(
      (root / "run" / "phase1" / "summary.json").read_text())
  assert summary["best_epoch"] == 1


def test_restoring_logs_no_warnings(run, caplog):
  root, _ = run
  with caplog.at_level(logging.WARNING):
    topojax.Segmenter.from_run(root / "run")
    predict.restore_best(root / "run" / "phase1", CONFIG, in_channels=1,
                         out_channels=1)
  assert [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING] == []


def test_run_records_its_modalities(multimodal):
  root, _ = multimodal
  spec = json.loads((root / "run" / "phase1" / "model.json").read_text())
  assert spec == {"in_channels": 2, "out_channels": 1,
                  "modalities": ["FLAIR", "T1"], "modality_indices": [2, 0],
                  "task_modalities": list(MODALITIES),
                  "label_names": ["background", "ball"]}


def test_runs_without_model_json_read_the_checkpoint(multimodal, tmp_path):
  root, task = multimodal
  old = tmp_path / "phase1"
  shutil.copytree(root / "run" / "phase1", old)
  (old / "model.json").unlink()
  segmenter = topojax.Segmenter.from_run(old)
  assert (segmenter.in_channels, segmenter.out_channels) == (2, 1)
  assert segmenter.modalities is None
  every = nib.load(task / "imagesTr" / "case_1.nii.gz").get_fdata(
      dtype=np.float32)
  np.testing.assert_array_equal(
      segmenter(every[..., [2, 0]]),
      topojax.Segmenter.from_run(root / "run")(every))
  with pytest.raises(ValueError, match="has 3 channel"):
    segmenter(every)


def test_read_only_checkpoints_agree_with_the_manager(tmp_path):
  manager = checkpoint.open_manager(tmp_path)
  for epoch, dice in ((1, 0.5), (2, 0.7), (3, 0.6)):
    checkpoint.save(manager, epoch, model={"w": np.full(3, epoch, np.float32)},
                    optimizer={"step": np.int32(epoch)},
                    meta={"epoch": epoch, "val_dice": dice})
  try:
    with checkpoint.open_manager(tmp_path, read_only=True) as reader:
      # Epoch 1 is neither the latest nor the best: deleted.
      assert reader.all_steps() == manager.all_steps() == [2, 3]
      assert reader.latest_step() == manager.latest_step() == 3
      assert reader.best_step() == manager.best_step() == 2
      restored = checkpoint.restore(
          reader, 2, model={"w": np.zeros(3, np.float32)})
      np.testing.assert_array_equal(restored["model"]["w"], [2, 2, 2])
      assert restored["meta"]["val_dice"] == 0.7
      with pytest.raises(FileNotFoundError, match="no finished epoch 1"):
        checkpoint.restore(reader, 1, model={"w": np.zeros(3, np.float32)})
  finally:
    manager.close()
  with pytest.raises(FileNotFoundError, match="not found"):
    checkpoint.open_manager(tmp_path / "nothing", read_only=True)
