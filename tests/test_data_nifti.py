"""Tests for topojax/data/nifti.py: decoding cases from NIfTI and every bad
image or label file."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from topojax import data
from topojax import synthetic

# tests/ is on sys.path under pytest.
from data_fixtures import SYNTH
from data_fixtures import sheared_affine
from data_fixtures import cache_dir  # noqa: F401  (a fixture)
from data_fixtures import check_bad_task
from data_fixtures import synth_task  # noqa: F401  (a fixture)


def test_read_task_and_load_case(synth_task):
  task = data.read_task(synth_task)
  assert [c.case_id for c in task.cases] == [
      f"synth_{i:03d}" for i in range(10)]
  assert task.modalities == ("synthetic",)
  assert task.label_names == ("background", "object")
  image, label, meta = data.load_case(task, "synth_002")
  expected_image, expected_label, _ = synthetic.make_case(SYNTH, 2)
  np.testing.assert_array_equal(image[..., 0], expected_image)
  np.testing.assert_array_equal(label, expected_label)
  assert image.shape == (20, 18, 16, 1) and image.dtype == np.float32
  assert label.dtype == np.uint8
  assert meta.original_shape == (20, 18, 16)
  np.testing.assert_allclose(meta.spacing, SYNTH.spacing, rtol=1e-6)
  np.testing.assert_allclose(meta.affine, synthetic.affine(SYNTH), atol=1e-5)


# --------------------------------------------------------------------------
# Bad input: each names the file and what was wrong, before anything is
# written to the cache.


def _truncate(path):
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2])


def _not_nifti(path):
  with gzip.open(path, "wb") as f:
    f.write(b"these are not the voxels you are looking for" * 20)


def _replace(path, array):
  nib.save(nib.Nifti1Image(array, sheared_affine()), path)


BAD_TASKS = {
    "truncated image": (
        lambda root: _truncate(root / "imagesTr/case_1.nii.gz"),
        ValueError, "imagesTr/case_1.nii.gz: cannot read as NIfTI"),
    "truncated label": (
        lambda root: _truncate(root / "labelsTr/case_0.nii.gz"),
        ValueError, "labelsTr/case_0.nii.gz: cannot read as NIfTI"),
    "not NIfTI": (
        lambda root: _not_nifti(root / "imagesTr/case_0.nii.gz"),
        ValueError, "imagesTr/case_0.nii.gz: cannot read as NIfTI"),
    "shape mismatch": (
        lambda root: _replace(root / "labelsTr/case_1.nii.gz",
                              np.zeros((6, 7, 4), np.uint8)),
        ValueError, r"case_1.nii.gz: label shape \(6, 7, 4\) differs"),
    "unexpected label value": (
        lambda root: _replace(root / "labelsTr/case_1.nii.gz",
                              np.full((6, 7, 5), 3, np.uint8)),
        ValueError, r"labelsTr/case_1.nii.gz: unexpected label values \[3\]"),
    "fractional label": (
        lambda root: _replace(root / "labelsTr/case_0.nii.gz",
                              np.full((6, 7, 5), 0.5, np.float32)),
        ValueError, r"labelsTr/case_0.nii.gz: unexpected label values \[0.5\]"),
    "negative label": (
        lambda root: _replace(root / "labelsTr/case_0.nii.gz",
                              np.full((6, 7, 5), -1, np.int16)),
        ValueError, r"unexpected label values \[-1\]"),
    "2D image": (
        lambda root: _replace(root / "imagesTr/case_0.nii.gz",
                              np.zeros((6, 7), np.float32)),
        ValueError, r"imagesTr/case_0.nii.gz: expected a 3D .* got shape "
        r"\(6, 7\)"),
    "5D image": (
        lambda root: _replace(root / "imagesTr/case_0.nii.gz",
                              np.zeros((6, 7, 5, 1, 2), np.float32)),
        ValueError, "imagesTr/case_0.nii.gz: expected a 3D"),
    "4D image, wrong channel count": (
        lambda root: _replace(root / "imagesTr/case_0.nii.gz",
                              np.zeros((6, 7, 5, 2), np.float32)),
        ValueError, r"case_0.nii.gz: has 2 channel\(s\) but"),
    "4D label": (
        lambda root: _replace(root / "labelsTr/case_0.nii.gz",
                              np.zeros((6, 7, 5, 1), np.uint8)),
        ValueError, r"labelsTr/case_0.nii.gz: expected a 3D \(X, Y, Z\) label"),
    "NaN in image": (
        lambda root: _replace(root / "imagesTr/case_1.nii.gz",
                              np.full((6, 7, 5), np.nan, np.float32)),
        ValueError, "imagesTr/case_1.nii.gz: the image holds NaN"),
}


@pytest.mark.parametrize("name", list(BAD_TASKS))
def test_bad_task(tmp_path, cache_dir, name):
  check_bad_task(tmp_path, cache_dir, BAD_TASKS[name])
