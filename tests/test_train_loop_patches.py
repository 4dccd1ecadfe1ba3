"""Tests for topojax/train/loop.py on patches (nnU-Net's protocol): cases of
their own shapes at a target spacing, trained on patches, validated and
predicted by sliding windows, resumed bit for bit, on 1 and 4 devices."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from unittest import mock

import jax
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import pytest

from topojax import data
from topojax import predict
from topojax import synthetic
from topojax import train
from topojax.train import steps

import data_fixtures  # tests/ is on sys.path under pytest

# Voxels 0.8 × 1.2 × 3.0 mm (data_fixtures.sheared_affine) resampled to
# 1.6 × 1.2 × 1.5 mm: X halves, Z doubles. 10 cases: 6 train, 2 validation,
# 2 test (default_split), each cropped to a shape of its own. An epoch: 2
# patches of each training case, 6 steps.
SPACING = (1.6, 1.2, 1.5)
PATCH = (16, 16, 16)
CONFIG = train.TrainConfig(
    shape=None, patch_size=PATCH, spacing=SPACING, patches_per_case=2,
    base_channels=4, depth=2, batch_size=2, flip_axes=(0,),
    kernel_sizes=(2, 4),
    phase1=train.PhaseConfig(loss="dice", epochs=2, learning_rate=1e-2),
    # Its tubes come from each whole label, cropped with the patches.
    phase2=train.PhaseConfig(loss="skeleton_recall", epochs=1,
                             learning_rate=1e-3))
# (X, Y, Z) of each case in its files; case 3's X becomes 10 < 16 voxels.
SHAPES = [(40, 24, 10), (36, 22, 9), (32, 24, 8), (20, 20, 10), (38, 18, 9),
          (40, 24, 10), (34, 21, 8), (30, 24, 10), (40, 16, 9), (28, 24, 7)]


class Crash(Exception):
  """Stands for the process dying."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  synth = synthetic.SynthConfig(shape=(40, 24, 10), num_cases=len(SHAPES),
                                kinds=("branch",), num_distractors=(0, 1),
                                seed=3)
  cases = {}
  for i, shape in enumerate(SHAPES):
    image, label, _ = synthetic.make_case(synth, i)
    crop = tuple(slice(0, s) for s in shape)
    cases[f"case_{i:02d}"] = (image[crop], label[crop])
  return data_fixtures.write_task(
      tmp_path_factory.mktemp("data") / "Task00_Patches", cases)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(task, cache, tmp_path_factory):
  out = tmp_path_factory.mktemp("runs") / "run"
  return out, train.train(CONFIG, task, out, cache_dir=cache, progress=False)


def _log(phase_dir):
  timing = ("time_s", "cases_per_s")
  return [{k: v for k, v in json.loads(line).items() if k not in timing}
          for line in (phase_dir / "log.jsonl").read_text().splitlines()]


def _saved(phase_dir, epoch, item):
  path = (phase_dir / "checkpoints" / str(epoch) / item).absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return jax.tree.leaves(checkpointer.restore(path, restore_args=as_numpy))


def _assert_identical(phase_dir, reference, epoch):
  for item in ("model", "optimizer"):
    ours, theirs = _saved(phase_dir, epoch, item), _saved(reference, epoch,
                                                          item)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
      np.testing.assert_array_equal(a, b)
  assert _log(phase_dir) == _log(reference)


def test_cases_are_cached_in_their_own_shapes_at_the_spacing(task, cache,
                                                             run):
  dataset = data.load_dataset(task, CONFIG.preprocess_config(),
                              cache_dir=cache, progress=False)
  assert dataset.from_cache
  assert isinstance(dataset.images, data.CaseArrays)
  expected = [(round(x * 0.8 / 1.6), y, round(z * 3.0 / 1.5))
              for x, y, z in SHAPES]
  assert list(dataset.case_shapes) == expected
  assert dataset.case_shapes[3][0] < PATCH[0]  # padded into its patches
  for row in (0, 3):
    label = np.asarray(dataset.labels[row])
    assert label.shape == (*expected[row], 1)
    assert set(np.unique(label)) <= {0.0, 1.0} and label.any()


def test_a_patch_run_trains_both_phases_and_compiles_once(run):
  out, results = run
  for phase, epochs in ((1, 2), (2, 1)):
    log = _log(out / f"phase{phase}")
    assert [line["epoch"] for line in log] == list(range(1, epochs + 1))
    assert all(0 <= l["val_dice"] <= 1 and l["val_topo"] >= 0 for l in log)
    assert results[phase].train_step_compilations == 1
  # One window forward for validation, whatever the cases' shapes; phase 2
  # reuses it.
  assert results[1].eval_step_compilations == 1
  assert results[2].eval_step_compilations == 0


def test_resume_after_a_crash_is_bit_identical(run, task, cache, tmp_path):
  out, _ = run
  real_save = train.loop.checkpoint.save

  def save_then_die(manager, epoch, **kwargs):
    real_save(manager, epoch, **kwargs)
    raise Crash

  with mock.patch.object(train.loop.checkpoint, "save", save_then_die):
    with pytest.raises(Crash):
      train.train(CONFIG, task, tmp_path, cache_dir=cache, progress=False)
  train.train(CONFIG, task, tmp_path, resume=True, cache_dir=cache,
              progress=False)
  _assert_identical(tmp_path / "phase1", out / "phase1", 2)
  _assert_identical(tmp_path / "phase2", out / "phase2", 1)


def test_a_signal_mid_epoch_saves_and_resume_is_bit_identical(
    run, task, cache, tmp_path):
  out, _ = run
  real = steps.make_train_step

  def make(*args, **kwargs):
    step, done = real(*args, **kwargs), [0]

    def counted(*args):
      result = step(*args)
      done[0] += 1
      if done[0] == 8:  # epoch 2 of phase 1, after its second batch
        os.kill(os.getpid(), signal.SIGTERM)
      return result

    counted._cache_size = step._cache_size
    return counted

  with mock.patch.object(steps, "make_train_step", make):
    with pytest.raises(train.Preempted, match="epoch 2 after batch 2 of 6"):
      train.train(CONFIG, task, tmp_path, phases=(1,), cache_dir=cache,
                  progress=False)
  assert (tmp_path / "phase1" / "interrupted").is_dir()
  train.train(CONFIG, task, tmp_path, phases=(1,), resume=True,
              cache_dir=cache, progress=False)
  _assert_identical(tmp_path / "phase1", out / "phase1", 2)


def test_predict_writes_every_case_in_its_own_shape_and_affine(
    run, task, cache, tmp_path):
  out, _ = run
  split = data.Split.load(out / "phase2" / "split.json")
  paths = predict.predict_run(out, task, tmp_path / "data", cache_dir=cache)
  assert [p.name for p in paths] == [f"{c}.nii.gz" for c in split.test]
  segmenter = predict.Segmenter.from_run(out)
  for path in paths:
    image_path = task / "imagesTr" / path.name
    image, mask = nib.load(image_path), nib.load(path)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine)
    # The same mask from the image file, preprocessed again.
    np.testing.assert_array_equal(np.asarray(mask.dataobj),
                                  segmenter(image_path))
  written = predict.predict_images(out, [task / "imagesTr" / p.name
                                         for p in paths], tmp_path / "images")
  for path, other in zip(paths, written):
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj),
                                  np.asarray(nib.load(other).dataobj))


def test_segmenter_needs_the_spacing_of_an_array(run, task):
  out, _ = run
  segmenter = predict.Segmenter.from_run(out)
  image_path = task / "imagesTr" / "case_03.nii.gz"
  volume = np.asarray(nib.load(image_path).dataobj)
  with pytest.raises(ValueError, match="spacing"):
    segmenter(volume)
  with pytest.raises(ValueError, match="spacing"):
    segmenter(volume, spacing=(0.8, 0, 3.0))
  spacing = nib.load(image_path).header.get_zooms()[:3]
  mask, probabilities = segmenter(volume, spacing=spacing,
                                  return_probabilities=True)
  np.testing.assert_array_equal(mask, segmenter(image_path))
  assert probabilities.shape == (*volume.shape, 1)
  # nnU-Net's export: labels from the probabilities resampled to the image.
  np.testing.assert_array_equal(mask, probabilities[..., 0] > 0.5)


def test_phase2_refuses_a_phase1_at_another_spacing(run, task, cache,
                                                   tmp_path):
  out, _ = run
  other = dataclasses.replace(CONFIG, spacing=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="spacing"):
    train.train(other, task, tmp_path, phases=(2,), init=out / "phase1",
                cache_dir=cache, progress=False)


def test_train_flags_set_the_patch_protocol(tmp_path, capsys):
  from topojax import cli

  path = tmp_path / "config.json"
  path.write_text(json.dumps(dataclasses.replace(
      CONFIG, shape=(32, 32, 16), spacing=None, patch_size=None).to_json()))
  argv = ["train", "--config", str(path), "--data", "unused", "--out",
          str(tmp_path / "run")]
  with mock.patch.object(train, "train", return_value={}) as trained:
    assert cli.main([*argv, "--shape", "none", "--patch-size", "16", "16",
                     "8", "--spacing", "1", "1", "2.5",
                     "--foreground-fraction", "0.5"]) == 0
    config = trained.call_args.args[0]
    assert (config.shape, config.patch_size, config.spacing,
            config.foreground_fraction) == (None, (16, 16, 8),
                                            (1.0, 1.0, 2.5), 0.5)
    assert cli.main([*argv, "--patch-size", "16", "16", "16"]) == 0
    assert trained.call_args.args[0].shape == (32, 32, 16)
  for flags, match in [
      (["--patch-size", "16", "16", "9"], "patch_size: spatial shape"),
      (["--patch-size", "64", "16", "16"], "larger than the shape"),
      (["--spacing", "1", "0", "1", "--shape", "none", "--patch-size", "16",
        "16", "16"], "spacing must be three positive"),
      (["--shape", "16", "16"], "--shape takes three ints"),
  ]:
    assert cli.main([*argv, *flags]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("topojax train: error: ") and match in line


_FOUR_DEVICES = """
import json, sys
from topojax import train
config = train.TrainConfig(**json.loads(sys.argv[1]))
train.train(config, sys.argv[2], sys.argv[3], phases=(1,),
            cache_dir=sys.argv[4], progress=False)
"""


def test_four_devices_train_and_validate_as_one(task, cache, tmp_path):
  # 4 patches a step, one per device; validation on the first device.
  config = dataclasses.replace(CONFIG, batch_size=4)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  process = subprocess.run(
      [sys.executable, "-c", _FOUR_DEVICES, json.dumps(config.to_json()),
       str(task), str(tmp_path / "four"), str(cache)],
      env={**env, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
      capture_output=True, text=True, timeout=600, check=False)
  assert process.returncode == 0, process.stderr[-3000:]
  train.train(config, task, tmp_path / "one", phases=(1,), cache_dir=cache,
              progress=False)
  four, one = _log(tmp_path / "four" / "phase1"), _log(tmp_path / "one" /
                                                        "phase1")
  assert len(four) == len(one) == CONFIG.phase1.epochs
  # Same maths, gradients summed in another order: float32 rounding only.
  # (The tiny task's Dice can sit near 0.002, where a rounding of 3e-6 is
  # 1e-3 of it: hence the absolute floor.)
  for a, b in zip(four, one):
    for key in ("train_loss", "val_dice", "val_topo"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-5,
                                 err_msg=key)
