"""Tests for topojax/predict/cases.py: a tiny run's test cases written as
NIfTI."""

import nibabel as nib
import numpy as np
import pytest

from topojax import checkpoint
from topojax import cli
from topojax import data
from topojax import evaluate
from topojax import metrics
from topojax import predict
from topojax import train

# tests/ is on sys.path under pytest.
from predict_fixtures import CONFIG
from predict_fixtures import run  # noqa: F401  (a fixture)


def test_writes_the_test_cases_in_image_space(run):
  root, task = run
  paths = predict.predict_run(root / "run", task, root / "pred",
                              cache_dir=root / "cache")
  split = data.Split.load(root / "run" / "phase1" / "split.json")
  assert [p.name for p in paths] == [f"{c}.nii.gz" for c in split.test]
  for path, case_id in zip(paths, split.test):
    image = nib.load(task / "imagesTr" / f"{case_id}.nii.gz")
    written = nib.load(path)
    assert written.shape == image.shape[:3]
    np.testing.assert_allclose(written.affine, image.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


def test_masks_equal_the_validation_step_masks(run):
  # Same checkpoint, same cases: the written masks are what the compiled
  # evaluation step of training thresholds (the synthetic images are stored
  # at the training shape, so no resampling intervenes).
  root, task = run
  phase = root / "run" / "phase1"
  paths = predict.predict_run(phase, task, root / "pred_eval",
                              cache_dir=root / "cache")
  dataset = data.load_dataset(task, CONFIG.preprocess_config(),
                              cache_dir=root / "cache", progress=False)
  split = data.Split.load(phase / "split.json")
  mesh = train.data_mesh()
  model_def, state = train.init_state(CONFIG, in_channels=1, out_channels=1,
                                      mesh=mesh)
  with checkpoint.open_manager(phase / "checkpoints",
                               read_only=True) as manager:
    model_state = checkpoint.restore(manager, manager.best_step(),
                                     model=state["model"])["model"]
  eval_step = train.make_eval_step(model_def, mesh,
                                   kernel_sizes=CONFIG.kernel_sizes)
  rows = dataset.indices(split.test)
  images = np.stack([dataset.images[r] for r in rows])
  labels = np.stack([dataset.labels[r] for r in rows])
  pad = CONFIG.batch_size - len(rows)
  masks, _ = eval_step(model_state,
                       np.concatenate([images, np.zeros_like(images[:pad])]),
                       np.concatenate([labels, np.zeros_like(labels[:pad])]))
  for path, mask in zip(paths, np.asarray(masks)):
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj),
                                  mask[..., 0])


def test_keep_largest_leaves_one_component(run):
  root, task = run
  paths = predict.predict_run(root / "run", task, root / "pred_clean",
                              keep_largest=1, cache_dir=root / "cache")
  for path in paths:
    assert metrics.count_components(np.asarray(nib.load(path).dataobj)) <= 1


def test_refuses_to_overwrite_and_cli_reports_it(run, capsys):
  root, task = run
  args = ["predict", "--run", str(root / "run"), "--data", str(task),
          "--out", str(root / "pred_cli"), "--cache-dir", str(root / "cache")]
  assert cli.main(args) == 0
  before = {p: p.stat().st_mtime_ns for p in (root / "pred_cli").iterdir()}
  assert cli.main(args) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert {p: p.stat().st_mtime_ns
          for p in (root / "pred_cli").iterdir()} == before
  assert cli.main(args + ["--overwrite"]) == 0
  results = evaluate.evaluate_runs(
      {"tiny": root / "pred_cli"}, task / "labelsTr",
      case_ids=data.Split.load(root / "run" / "phase1" / "split.json").test)
  assert results["tiny"][1]


@pytest.mark.parametrize("bad, message", [
    ({"keep_largest": 0}, "keep_largest"),
])
def test_bad_arguments(run, bad, message):
  root, task = run
  with pytest.raises(ValueError, match=message):
    predict.predict_run(root / "run", task, root / "never", **bad)


def test_missing_run_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no finished training phase"):
    predict.predict_run(tmp_path / "nothing", tmp_path, tmp_path / "out")
