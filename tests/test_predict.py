"""Tests for topojax/predict.py: a tiny run's test cases written as NIfTI."""

import json
import logging
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

import topojax
from topojax import checkpoint
from topojax import cli
from topojax import data
from topojax import evaluate
from topojax import metrics
from topojax import predict
from topojax import synthetic
from topojax import train

CONFIG = train.TrainConfig(
    shape=(16, 16, 16), base_channels=4, depth=2, batch_size=4,
    kernel_sizes=(2, 4),
    phase1=train.PhaseConfig(loss="dice", epochs=1, learning_rate=1e-2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  task = root / "Task00_Tiny"
  synthetic.generate_task(
      task, synthetic.SynthConfig(shape=(16, 16, 16), num_cases=10, seed=3),
      progress=False)
  train.train(CONFIG, task, root / "run", phases=(1,),
              cache_dir=root / "cache", progress=False)
  return root, task


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
                                      learning_rate=1.0, mesh=mesh)
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


def test_phase_dir_prefers_the_last_finished_phase(run):
  root, _ = run
  assert predict.phase_dir(root / "run") == root / "run" / "phase1"
  summary = json.loads(
      (root / "run" / "phase1" / "summary.json").read_text())
  assert summary["best_epoch"] == 1


# --------------------------------------------------------------------------
# Any images: topojax predict --images and the Segmenter.


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


def _save(path, volume, affine, *, qform_code=1, sform_code=1):
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
    _save(folder / name, data.resize(source, shape, order=1),
          _oblique_affine(spacing, degrees, origin), qform_code=qform,
          sform_code=sform)
  out = root / "odd_pred"
  assert cli.main(["predict", "--run", str(root / "run"), "--images",
                   str(folder), "--out", str(out)]) == 0
  return folder, out


def test_images_keep_their_own_shape_affine_and_header(odd):
  folder, out = odd
  assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]
  for name, shape, spacing, _, _, qform, sform in ODD:
    image = nib.load(folder / name)
    written = nib.load(out / (name.split(".")[0] + ".nii.gz"))
    assert written.shape == shape
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-6)
    np.testing.assert_allclose(written.header.get_zooms(), spacing,
                               rtol=1e-6)
    assert int(written.header["qform_code"]) == qform
    assert int(written.header["sform_code"]) == sform
    np.testing.assert_allclose(written.get_qform(), image.get_qform(),
                               atol=1e-6)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


def test_segmenter_on_an_array_and_a_path_equals_the_cli_file(run, odd):
  root, _ = run
  folder, out = odd
  segmenter = topojax.Segmenter.from_run(root / "run")
  assert segmenter.phase == (root / "run" / "phase1").absolute()
  assert (segmenter.in_channels, segmenter.out_channels) == (1, 1)
  for name, shape, *_ in ODD:
    written = np.asarray(nib.load(out / (name.split(".")[0] + ".nii.gz"))
                         .dataobj)
    from_path = segmenter(folder / name)
    from_array = segmenter(nib.load(folder / name).get_fdata())
    assert from_path.dtype == np.uint8 and from_path.shape == shape
    np.testing.assert_array_equal(from_path, written)
    np.testing.assert_array_equal(from_array, written)
  # The masks are not trivially empty, or the comparisons prove little.
  assert any(segmenter(folder / name).any() for name, *_ in ODD)


def test_return_probabilities(run, odd):
  root, task = run
  folder, _ = odd
  segmenter = topojax.Segmenter.from_run(root / "run" / "phase1")
  name, shape = ODD[0][:2]
  mask, probs = segmenter(folder / name, return_probabilities=True)
  np.testing.assert_array_equal(mask, segmenter(folder / name))
  assert probs.shape == (*shape, 1) and probs.dtype == np.float32
  assert 0 <= probs.min() and probs.max() <= 1 and probs.std() > 0
  # At the training shape nothing is resampled: the mask is the thresholded
  # probability map.
  case = task / "imagesTr" / "synth_000.nii.gz"
  mask, probs = segmenter(case, return_probabilities=True)
  assert probs.shape == (*CONFIG.shape, 1)
  np.testing.assert_array_equal(mask, probs[..., 0] > 0.5)


def test_images_mode_equals_the_test_split_mode(run):
  # Same images, preprocessed on the fly or read from the cache.
  root, task = run
  split = data.Split.load(root / "run" / "phase1" / "split.json")
  from_images = predict.predict_images(
      root / "run", [task / "imagesTr" / f"{c}.nii.gz" for c in split.test],
      root / "same_images", progress=False)
  from_split = predict.predict_run(root / "run", task, root / "same_split",
                                   cache_dir=root / "cache")
  for a, b in zip(from_images, from_split, strict=True):
    assert a.name == b.name
    np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj),
                                  np.asarray(nib.load(b).dataobj))


def test_truncated_file_fails_when_reached_and_earlier_masks_stay(
    run, odd, tmp_path, capsys):
  root, _ = run
  folder, out = odd
  full = (folder / "a.nii.gz").read_bytes()
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "1_good.nii.gz").write_bytes(full)
  (tmp_path / "in" / "2_cut.nii.gz").write_bytes(full[:len(full) // 2])
  (tmp_path / "in" / "3_good.nii.gz").write_bytes(full)
  assert nib.load(tmp_path / "in" / "2_cut.nii.gz").shape == ODD[0][1]
  status = cli.main(["predict", "--run", str(root / "run"), "--images",
                     str(tmp_path / "in"), "--out", str(tmp_path / "out")])
  assert status == 2
  assert str(tmp_path / "in" / "2_cut.nii.gz") in capsys.readouterr().err
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "1_good.nii.gz"]
  np.testing.assert_array_equal(
      np.asarray(nib.load(tmp_path / "out" / "1_good.nii.gz").dataobj),
      np.asarray(nib.load(out / "a.nii.gz").dataobj))


def _write_two_channels(path, shape=(12, 10, 8)):
  volume = np.random.default_rng(0).random((*shape, 2))
  return _save(path, volume, np.diag([1.0, 1.0, 2.0, 1.0]))


@pytest.mark.parametrize("bad, message", [
    ("channels", "has 2 channel.s. but the run .* takes 1"),
    ("not_nifti", "cannot read as NIfTI"),
    ("2d", r"expected a 3D \(X, Y, Z\) or 4D"),
])
def test_a_bad_header_fails_before_any_file_is_written(run, odd, tmp_path,
                                                       capsys, bad, message):
  root, _ = run
  folder, _ = odd
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "1_good.nii.gz").write_bytes(
      (folder / "a.nii.gz").read_bytes())
  bad_path = tmp_path / "in" / "2_bad.nii.gz"
  if bad == "channels":
    _write_two_channels(bad_path)
  elif bad == "not_nifti":
    bad_path.write_bytes(b"not an image")
  else:
    _save(bad_path, np.zeros((5, 6)), np.eye(4))
  status = cli.main(["predict", "--run", str(root / "run"), "--images",
                     str(tmp_path / "in"), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert status == 2
  assert str(bad_path) in err
  assert re.search(message, err)
  assert not (tmp_path / "out").exists()


def test_existing_outputs_are_refused_without_overwrite(run, odd, tmp_path,
                                                        capsys):
  root, _ = run
  folder, _ = odd
  args = ["predict", "--run", str(root / "run"), "--images",
          str(folder / "b.nii"), "--out", str(tmp_path)]
  (tmp_path / "b.nii.gz").write_bytes(b"mine")
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "--overwrite" in err and "--out" in err
  assert (tmp_path / "b.nii.gz").read_bytes() == b"mine"
  assert cli.main(args + ["--overwrite"]) == 0
  assert nib.load(tmp_path / "b.nii.gz").shape == ODD[1][1]


def test_two_inputs_with_one_name_are_refused_before_any_work(odd, tmp_path):
  folder, _ = odd
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "a.nii").write_bytes(b"")
  with pytest.raises(ValueError,
                     match=r"a\.nii would both be written to .*/a\.nii\.gz"):
    # No run there either: the names are checked first.
    predict.predict_images(tmp_path / "no_run", [folder, tmp_path / "other"],
                           tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("images, error, message", [
    (["missing.nii.gz"], FileNotFoundError, "no such file or folder"),
    (["notes.txt"], ValueError, "expected a .nii or .nii.gz file"),
    (["empty"], FileNotFoundError, "no .nii or .nii.gz file"),
    ([], ValueError, "at least one"),
])
def test_bad_image_arguments(tmp_path, images, error, message):
  (tmp_path / "notes.txt").write_text("x")
  (tmp_path / "empty").mkdir()
  with pytest.raises(error, match=message):
    predict.predict_images(tmp_path, [tmp_path / p for p in images],
                           tmp_path / "out")


def test_cli_takes_either_data_or_images(run, capsys):
  root, task = run
  with pytest.raises(SystemExit):
    cli.main(["predict", "--run", str(root / "run"), "--out", "x"])
  with pytest.raises(SystemExit):
    cli.main(["predict", "--run", str(root / "run"), "--data", str(task),
              "--images", str(task), "--out", "x"])
  assert "one of the arguments --data --images is required" in (
      capsys.readouterr().err)
  assert cli.main(["predict", "--run", str(root / "run"), "--images",
                   str(task), "--cache-dir", str(root / "cache"), "--out",
                   "x"]) == 2
  assert "--cache-dir is the preprocessing cache of --data" in (
      capsys.readouterr().err)


@pytest.mark.parametrize("image, options, message", [
    (np.zeros((4, 4)), {}, r"image must be a real \(X, Y, Z\)"),
    (np.zeros((4, 4, 4), np.complex64), {}, "dtype complex64"),
    (np.full((4, 4, 4), np.nan), {}, "image: the image holds NaN"),
    (np.zeros((4, 4, 4, 3)), {}, "image: has 3 channel"),
    (np.zeros((4, 4, 4)), {"keep_largest": 0}, "keep_largest"),
])
def test_segmenter_names_bad_input(run, image, options, message):
  root, _ = run
  segmenter = topojax.Segmenter.from_run(root / "run")
  with pytest.raises(ValueError, match=message):
    segmenter(image, **options)


def test_forward_takes_the_training_shape_only(run):
  root, _ = run
  segmenter = topojax.Segmenter.from_run(root / "run")
  assert segmenter.forward(np.zeros((1, *CONFIG.shape, 1))).shape == (
      1, *CONFIG.shape, 1)
  with pytest.raises(ValueError, match=r"= \(N, 16, 16, 16, 1\)"):
    segmenter.forward(np.zeros((1, 8, 8, 8, 1)))


def test_restoring_logs_no_warnings(run, caplog):
  root, _ = run
  with caplog.at_level(logging.WARNING):
    topojax.Segmenter.from_run(root / "run")
    predict.restore_best(root / "run" / "phase1", CONFIG, in_channels=1,
                         out_channels=1)
  assert [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING] == []


# --------------------------------------------------------------------------
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


def test_run_records_its_modalities(multimodal):
  root, _ = multimodal
  spec = json.loads((root / "run" / "phase1" / "model.json").read_text())
  assert spec == {"in_channels": 2, "out_channels": 1,
                  "modalities": ["FLAIR", "T1"], "modality_indices": [2, 0],
                  "task_modalities": list(MODALITIES),
                  "label_names": ["background", "ball"]}


def test_multimodal_images_in_run_order_or_with_every_modality(
    multimodal, tmp_path, capsys):
  root, task = multimodal
  segmenter = topojax.Segmenter.from_run(root / "run")
  assert segmenter.modalities == ("FLAIR", "T1")
  path = task / "imagesTr" / "case_0.nii.gz"
  every = nib.load(path).get_fdata(dtype=np.float32)
  mask, probs = segmenter(every, return_probabilities=True)
  run_order = every[..., [2, 0]]
  np.testing.assert_array_equal(segmenter(run_order), mask)
  np.testing.assert_array_equal(segmenter(path), mask)
  # Another order is another input: the selection really is applied.
  _, other = segmenter(every[..., [0, 2]], return_probabilities=True)
  assert not np.allclose(other, probs)

  _save(tmp_path / "two.nii.gz", run_order, nib.load(path).affine)
  _save(tmp_path / "three.nii.gz", every, nib.load(path).affine)
  assert cli.main(["predict", "--run", str(root / "run"), "--images",
                   str(tmp_path / "two.nii.gz"), str(path), "--out",
                   str(tmp_path / "out")]) == 0
  for name in ("two", "case_0"):
    written = nib.load(tmp_path / "out" / f"{name}.nii.gz")
    assert written.shape == every.shape[:3]
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)

  _save(tmp_path / "t1.nii.gz", every[..., 0], nib.load(path).affine)
  assert cli.main(["predict", "--run", str(root / "run"), "--images",
                   str(tmp_path / "t1.nii.gz"), "--out",
                   str(tmp_path / "out1")]) == 2
  err = capsys.readouterr().err
  assert "t1.nii.gz: has 1 channel(s)" in err and "FLAIR, T1" in err


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
