"""Tests for topojax/predict/images.py: topojax predict --images, each mask
in its image's own space."""

import re

import nibabel as nib
import numpy as np
import pytest

from topojax import cli
from topojax import data
from topojax import predict

# tests/ is on sys.path under pytest.
from predict_fixtures import ODD
from predict_fixtures import odd  # noqa: F401  (a fixture)
from predict_fixtures import run  # noqa: F401  (a fixture)
from predict_fixtures import save_nifti


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
  return save_nifti(path, volume, np.diag([1.0, 1.0, 2.0, 1.0]))


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
    save_nifti(bad_path, np.zeros((5, 6)), np.eye(4))
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
