"""Tests for topojax/data/cache.py: ``load_dataset`` and its memory-mapped
cache."""

import errno
import os
from unittest import mock

import nibabel as nib
import numpy as np
import pytest

from topojax import cli
from topojax import data
from topojax.data import cache
from topojax.data import nifti

# tests/ is on sys.path under pytest.
from data_fixtures import SYNTH
from data_fixtures import cache_dir  # noqa: F401  (a fixture)
from data_fixtures import entries
from data_fixtures import ramp_case
from data_fixtures import synth_task  # noqa: F401  (a fixture)
from data_fixtures import write_task


def test_load_dataset_round_trip(synth_task, cache_dir):
  config = data.PreprocessConfig(shape=SYNTH.shape)
  dataset = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                              progress=False)
  assert not dataset.from_cache
  assert dataset.case_ids == tuple(f"synth_{i:03d}" for i in range(10))
  assert dataset.images.shape == (10, 20, 18, 16, 1)
  assert dataset.labels.shape == (10, 20, 18, 16, 1)
  assert dataset.images.dtype == dataset.labels.dtype == np.float32
  assert isinstance(dataset.images, np.memmap)
  for i in range(10):
    raw = nib.load(synth_task / f"imagesTr/synth_{i:03d}.nii.gz").get_fdata()
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(dataset.images[i, ..., 0], expected, atol=1e-6)
    label = nib.load(synth_task / f"labelsTr/synth_{i:03d}.nii.gz")
    np.testing.assert_array_equal(dataset.labels[i, ..., 0],
                                  np.asarray(label.dataobj))
    assert dataset.meta[i].case_id == dataset.case_ids[i]
    np.testing.assert_allclose(dataset.meta[i].affine, label.affine)
  np.testing.assert_array_equal(dataset.indices(["synth_004", "synth_000"]),
                                [4, 0])
  with pytest.raises(ValueError, match="synth_999"):
    dataset.indices(["synth_999"])


def test_cache_hit_reads_no_nifti(synth_task, cache_dir, monkeypatch):
  config = data.PreprocessConfig(shape=(12, 10, 8))
  cold = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                           progress=False)

  def no_decoding(*args, **kwargs):
    raise AssertionError("a cache hit decoded NIfTI")

  # Patched where load_dataset reaches them, in topojax.data.nifti.
  monkeypatch.setattr(nifti, "_open_nifti", no_decoding)
  monkeypatch.setattr(nifti, "_decode", no_decoding)
  warm = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                           progress=False)
  assert warm.from_cache and warm.cache_path == cold.cache_path
  np.testing.assert_array_equal(warm.images, cold.images)
  np.testing.assert_array_equal(warm.labels, cold.labels)
  np.testing.assert_array_equal(warm.meta[3].affine, cold.meta[3].affine)
  assert warm.meta[3].original_shape == (20, 18, 16)
  assert entries(cache_dir) == [cold.cache_path]


@pytest.mark.parametrize("change", ["shape", "label_mode", "modalities",
                                    "touch"])
def test_changed_setting_invalidates_the_cache(tmp_path, cache_dir, change):
  root = write_task(tmp_path / "Task01_Multi",
                    {f"case_{i}": ramp_case(seed=i) for i in range(2)},
                    modality=("FLAIR", "T1w"),
                    labels=("background", "edema", "tumour"))
  config = data.PreprocessConfig(shape=(9, 11, 7))
  first = data.load_dataset(root, config, cache_dir=cache_dir, progress=False)
  if change == "touch":
    label = root / "labelsTr/case_1.nii.gz"
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  else:
    value = {"shape": (9, 11, 8), "label_mode": "onehot",
             "modalities": ("T1w",)}[change]
    config = data.PreprocessConfig(**{"shape": config.shape, change: value})
  second = data.load_dataset(root, config, cache_dir=cache_dir,
                             progress=False)
  assert not second.from_cache
  assert second.cache_path != first.cache_path
  assert len(entries(cache_dir)) == 2


def test_interrupted_build_leaves_no_cache_entry(synth_task, cache_dir,
                                                 monkeypatch):
  config = data.PreprocessConfig(shape=(12, 10, 8))
  calls = []
  preprocess = data.preprocess

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return preprocess(*args, **kwargs)

  # Patched where load_dataset looks it up, in topojax.data.cache.
  monkeypatch.setattr(cache, "preprocess", failing)
  with pytest.raises(KeyboardInterrupt):
    data.load_dataset(synth_task, config, cache_dir=cache_dir, progress=False)
  assert entries(cache_dir) == []
  monkeypatch.setattr(cache, "preprocess", preprocess)
  dataset = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                              progress=False)
  assert not dataset.from_cache and len(entries(cache_dir)) == 1


def test_cli_prepare(synth_task, cache_dir, capsys):
  argv = ["prepare", str(synth_task), "--shape", "10", "9", "8",
          "--cache-dir", str(cache_dir)]
  assert cli.main(argv) == 0
  assert "decoded NIfTI" in capsys.readouterr().out
  assert cli.main(argv) == 0
  assert "cache hit" in capsys.readouterr().out
  assert cli.main(argv[:2]) == 2
  assert "--shape or --spacing is required" in capsys.readouterr().err


def _truncate(entry):
  path = entry / "images.npy"
  os.truncate(path, path.stat().st_size - 64)
  return "images.npy has"


def _flip_a_byte(entry):
  path = entry / "labels.npy"
  raw = bytearray(path.read_bytes())
  raw[-5] ^= 0x01  # A voxel's value, the header untouched: only the CRC sees it.
  path.write_bytes(bytes(raw))
  return "labels.npy fails its checksum"


def _reshape(entry):
  # Same bytes, another shape in the header.
  images = np.load(entry / "images.npy")
  np.save(entry / "images.npy", images.reshape(-1, *images.shape[2:]))
  return "images.npy holds"


def _lose_meta(entry):
  (entry / "meta.json").unlink()
  return "meta.json unreadable"


def _garble_meta(entry):
  (entry / "meta.json").write_text('{"case_ids": [')
  return "meta.json unreadable"


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _reshape,
                                    _lose_meta, _garble_meta])
def test_a_damaged_entry_is_rebuilt_with_one_warning(synth_task, cache_dir,
                                                     capsys, damage):
  config = data.PreprocessConfig(shape=(12, 10, 8))
  first = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                            progress=False)
  images, labels = np.array(first.images), np.array(first.labels)
  del first
  (entry,) = entries(cache_dir)
  reason = damage(entry)
  capsys.readouterr()
  healed = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                             progress=False)
  (warning,) = capsys.readouterr().err.splitlines()
  assert warning.startswith(f"topojax: warning: cache entry {entry} is "
                            f"damaged ({reason}")
  assert warning.endswith("; rebuilding it")
  assert not healed.from_cache and healed.cache_path == entry
  np.testing.assert_array_equal(healed.images, images)
  np.testing.assert_array_equal(healed.labels, labels)
  # Nothing set aside or half written is left behind.
  assert entries(cache_dir) == [entry]
  again = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                            progress=False)
  assert again.from_cache and capsys.readouterr().err == ""


def test_a_full_disk_fails_before_preprocessing(synth_task, cache_dir,
                                                monkeypatch):
  def full(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
  monkeypatch.setattr(cache, "preprocess", mock.Mock(
      side_effect=AssertionError("preprocessed on a full disk")))
  config = data.PreprocessConfig(shape=(12, 10, 8))
  with pytest.raises(OSError, match="No space left on device; free space or "
                     "choose another --cache-dir") as raised:
    data.load_dataset(synth_task, config, cache_dir=cache_dir,
                      progress=False)
  assert raised.value.errno == errno.ENOSPC
  assert str(cache_dir) in str(raised.value)
  assert entries(cache_dir) == []


# Cases of their own shapes (nnU-Net's protocol), the sheared affine's
# voxels: 0.8 × 1.204 × 3.0 mm (its shear lengthens Y's column).
_OWN_SHAPES = [(10, 11, 7), (12, 5, 3), (4, 8, 6)]


@pytest.fixture
def ragged_task(tmp_path):
  return write_task(tmp_path / "Task01_Ragged",
                    {f"case_{i}": ramp_case(shape, seed=i)
                     for i, shape in enumerate(_OWN_SHAPES)},
                    modality=("FLAIR", "T1w"),
                    labels=("background", "edema", "tumour"))


@pytest.mark.parametrize("spacing, grids", [
    (None, _OWN_SHAPES),
    # X: 0.8 / 1.6; Y: 1.204 / 0.6; Z: 3.0 / 1.0; rounded.
    ((1.6, 0.6, 1.0), [(5, 22, 21), (6, 10, 9), (2, 16, 18)]),
])
def test_cases_of_their_own_shapes_are_cached_each_in_its_grid(
    ragged_task, cache_dir, monkeypatch, spacing, grids):
  config = data.PreprocessConfig(shape=None, spacing=spacing,
                                 label_mode="onehot")
  cold = data.load_dataset(ragged_task, config, cache_dir=cache_dir,
                           progress=False)
  assert isinstance(cold.images, data.CaseArrays)
  assert cold.case_shapes == tuple(grids)
  assert (cold.in_channels, cold.out_channels) == (2, 3)
  task = data.read_task(ragged_task)
  for i, grid in enumerate(grids):
    image, label, meta = data.load_case(task, f"case_{i}")
    want_image, want_label = data.preprocess(
        image, label, config, num_labels=3, spacing=meta.spacing)
    assert cold.images[i].shape == (*grid, 2)
    np.testing.assert_array_equal(cold.images[i], want_image)
    np.testing.assert_array_equal(cold.labels[i], want_label)
  assert cold.images[-1].shape == (*grids[-1], 2)
  with pytest.raises(IndexError):
    cold.labels[len(grids)]

  monkeypatch.setattr(nifti, "_decode", mock.Mock(
      side_effect=AssertionError("a cache hit decoded NIfTI")))
  warm = data.load_dataset(ragged_task, config, cache_dir=cache_dir,
                           progress=False)
  assert warm.from_cache and warm.case_shapes == cold.case_shapes
  for i in range(len(grids)):
    np.testing.assert_array_equal(warm.labels[i], cold.labels[i])


def test_a_damaged_entry_of_own_shapes_is_rebuilt(ragged_task, cache_dir,
                                                  capsys):
  config = data.PreprocessConfig(shape=None, spacing=(1.6, 0.6, 1.0))
  first = data.load_dataset(ragged_task, config, cache_dir=cache_dir,
                            progress=False)
  labels = [np.array(label) for label in first.labels]
  del first
  (entry,) = entries(cache_dir)
  _flip_a_byte(entry)
  healed = data.load_dataset(ragged_task, config, cache_dir=cache_dir,
                             progress=False)
  assert "fails its checksum" in capsys.readouterr().err
  assert not healed.from_cache
  for label, want in zip(healed.labels, labels):
    np.testing.assert_array_equal(label, want)
  # Another spacing, or none, is another entry.
  data.load_dataset(ragged_task, data.PreprocessConfig(shape=None),
                    cache_dir=cache_dir, progress=False)
  assert len(entries(cache_dir)) == 2


def test_cli_prepare_at_a_spacing(ragged_task, cache_dir, capsys):
  argv = ["prepare", str(ragged_task), "--cache-dir", str(cache_dir)]
  assert cli.main([*argv, "--spacing", "1.6", "0.6", "1.0"]) == 0
  assert ("3 cases -> images of 2 channel(s) from (2, 10, 9) to (6, 22, 21) "
          "voxels, labels of 1") in capsys.readouterr().out
  assert cli.main([*argv, "--shape", "none"]) == 0
  assert "from (4, 5, 3) to (12, 11, 7) voxels" in capsys.readouterr().out
  assert cli.main([*argv, "--shape", "8", "8", "8", "--spacing", "1", "1",
                   "1"]) == 2
  assert "both set the grid" in capsys.readouterr().err
