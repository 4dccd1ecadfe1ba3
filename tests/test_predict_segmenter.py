"""Tests for topojax/predict/segmenter.py: the Segmenter on arrays and files
of any shape."""

import nibabel as nib
import numpy as np
import pytest

import topojax
from topojax import cli

# tests/ is on sys.path under pytest.
from predict_fixtures import CONFIG
from predict_fixtures import ODD
from predict_fixtures import multimodal  # noqa: F401  (a fixture)
from predict_fixtures import odd  # noqa: F401  (a fixture)
from predict_fixtures import run  # noqa: F401  (a fixture)
from predict_fixtures import save_nifti


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

  save_nifti(tmp_path / "two.nii.gz", run_order, nib.load(path).affine)
  save_nifti(tmp_path / "three.nii.gz", every, nib.load(path).affine)
  assert cli.main(["predict", "--run", str(root / "run"), "--images",
                   str(tmp_path / "two.nii.gz"), str(path), "--out",
                   str(tmp_path / "out")]) == 0
  for name in ("two", "case_0"):
    written = nib.load(tmp_path / "out" / f"{name}.nii.gz")
    assert written.shape == every.shape[:3]
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)

  save_nifti(tmp_path / "t1.nii.gz", every[..., 0], nib.load(path).affine)
  assert cli.main(["predict", "--run", str(root / "run"), "--images",
                   str(tmp_path / "t1.nii.gz"), "--out",
                   str(tmp_path / "out1")]) == 2
  err = capsys.readouterr().err
  assert "t1.nii.gz: has 1 channel(s)" in err and "FLAIR, T1" in err
