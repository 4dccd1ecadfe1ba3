"""Tests for topojax/data.py: MSD reading, preprocessing, cache, splits,
batches, writing predictions, and every bad input."""

import gzip
import json
import os
import pathlib
import threading

import nibabel as nib
import numpy as np
import pytest

from topojax import cli
from topojax import data
from topojax import synthetic

SYNTH = synthetic.SynthConfig(shape=(20, 18, 16), num_cases=10,
                              spacing=(0.7, 0.9, 2.5), seed=7)


def _affine(spacing=(0.8, 1.2, 3.0), origin=(-10.0, 4.0, 7.5)):
  matrix = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
  matrix[:3, 3] = origin
  matrix[0, 1] = 0.1  # Sheared on purpose: nothing may assume a diagonal.
  return matrix


def _write_task(root, cases, *, modality=("CT",),
                labels=("background", "organ"), affine=None):
  """An MSD folder from ``{case_id: (image, label)}`` arrays."""
  root = pathlib.Path(root)
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  affine = _affine() if affine is None else affine
  training = []
  for case_id, (image, label) in cases.items():
    name = f"{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
    training.append({"image": f"./imagesTr/{name}",
                     "label": f"./labelsTr/{name}"})
  spec = {"name": root.name,
          "modality": {str(i): m for i, m in enumerate(modality)},
          "labels": {str(i): n for i, n in enumerate(labels)},
          "training": training, "test": []}
  (root / "dataset.json").write_text(json.dumps(spec))
  return root


def _ramp_case(shape=(9, 11, 7), seed=0):
  """Two modalities: a ramp along X and a constant; labels 0, 1, 2."""
  x = np.arange(shape[0], dtype=np.float32)[:, None, None]
  ramp = np.broadcast_to(3.0 * x - 5.0, shape)
  image = np.stack([ramp, np.full(shape, 4.0, np.float32)], axis=-1)
  label = np.random.default_rng(seed).integers(0, 3, size=shape)
  return image.astype(np.float32), label.astype(np.uint8)


@pytest.fixture(scope="module")
def synth_task(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth") / "Task00_Synthetic"
  return synthetic.generate_task(root, SYNTH, progress=False)


@pytest.fixture
def cache_dir(tmp_path):
  return tmp_path / "cache"


def _entries(cache_dir):
  return sorted(cache_dir.iterdir()) if cache_dir.exists() else []


# --------------------------------------------------------------------------
# Reading and preprocessing.


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


@pytest.mark.parametrize("size_in, size_out", [
    (35, 64), (51, 64), (512, 160), (97, 128), (3, 48), (160, 160), (7, 4)])
def test_resize_gives_the_exact_shape_and_interpolates_linearly(size_in,
                                                                size_out):
  ramp = np.broadcast_to(
      np.arange(size_in, dtype=np.float32)[:, None, None], (size_in, 3, 2))
  out = data.resize(np.ascontiguousarray(ramp), (size_out, 5, 2), order=1)
  assert out.shape == (size_out, 5, 2) and out.dtype == np.float32
  # Corners aligned: output voxel i samples input position i (n-1)/(m-1),
  # where a linear ramp is known exactly.
  expected = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  np.testing.assert_allclose(out[:, 2, 1], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("order", [0, 1])
def test_resize_ignores_memory_order(order):
  # NIfTI arrays arrive in Fortran order; the result must not depend on it.
  volume = np.random.default_rng(1).random((13, 9, 6)).astype(np.float32)
  expected = data.resize(volume, (7, 12, 5), order=order)
  assert volume.flags.c_contiguous
  np.testing.assert_array_equal(
      data.resize(np.asfortranarray(volume), (7, 12, 5), order=order),
      expected)


def test_nearest_resize_round_trip_is_exact():
  labels = np.random.default_rng(0).integers(0, 4, (5, 6, 4)).astype(np.uint8)
  # 2n - 1 voxels: every original voxel centre is an output voxel centre.
  up = data.resize(labels, (9, 11, 7), order=0)
  assert set(np.unique(up)) <= set(np.unique(labels))
  np.testing.assert_array_equal(up[::2, ::2, ::2], labels)
  np.testing.assert_array_equal(data.resize(up, (5, 6, 4), order=0), labels)


def test_preprocess_normalises_and_encodes_labels():
  image, label = _ramp_case()
  config = data.PreprocessConfig(shape=(17, 21, 13), label_mode="onehot")
  out_image, out_label = data.preprocess(image, label, config, num_labels=3)
  assert out_image.shape == (17, 21, 13, 2) and out_image.dtype == np.float32
  # The ramp min-max normalised is i / 16 along X; the constant becomes 0.
  np.testing.assert_allclose(out_image[:, 3, 4, 0], np.arange(17) / 16,
                             atol=1e-6)
  assert np.all(out_image[..., 1] == 0)
  assert out_label.shape == (17, 21, 13, 3) and out_label.dtype == np.float32
  np.testing.assert_array_equal(out_label.sum(-1), 1)
  np.testing.assert_array_equal(np.argmax(out_label[::2, ::2, ::2], -1), label)

  binary = data.PreprocessConfig(shape=(17, 21, 13))
  _, out_label = data.preprocess(image, label, binary, num_labels=3)
  assert out_label.shape == (17, 21, 13, 1)
  np.testing.assert_array_equal(out_label[::2, ::2, ::2, 0], label > 0)


def test_multimodal_selection_by_name_and_index(tmp_path, cache_dir):
  root = _write_task(tmp_path / "Task01_Multi",
                     {f"case_{i}": _ramp_case(seed=i) for i in range(3)},
                     modality=("FLAIR", "T1w"),
                     labels=("background", "edema", "tumour"))
  task = data.read_task(root)
  image, _, _ = data.load_case(task, "case_1", modalities=("T1w", 0))
  np.testing.assert_array_equal(image[..., 0], 4.0)
  np.testing.assert_array_equal(image[..., 1], _ramp_case()[0][..., 0])
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
                                  _ramp_case(seed=i)[1])


# --------------------------------------------------------------------------
# The dataset and its cache.


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

  monkeypatch.setattr(data, "_open_nifti", no_decoding)
  monkeypatch.setattr(data, "_decode", no_decoding)
  warm = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                           progress=False)
  assert warm.from_cache and warm.cache_path == cold.cache_path
  np.testing.assert_array_equal(warm.images, cold.images)
  np.testing.assert_array_equal(warm.labels, cold.labels)
  np.testing.assert_array_equal(warm.meta[3].affine, cold.meta[3].affine)
  assert warm.meta[3].original_shape == (20, 18, 16)
  assert _entries(cache_dir) == [cold.cache_path]


@pytest.mark.parametrize("change", ["shape", "label_mode", "modalities",
                                    "touch"])
def test_changed_setting_invalidates_the_cache(tmp_path, cache_dir, change):
  root = _write_task(tmp_path / "Task01_Multi",
                     {f"case_{i}": _ramp_case(seed=i) for i in range(2)},
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
  assert len(_entries(cache_dir)) == 2


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

  monkeypatch.setattr(data, "preprocess", failing)
  with pytest.raises(KeyboardInterrupt):
    data.load_dataset(synth_task, config, cache_dir=cache_dir, progress=False)
  assert _entries(cache_dir) == []
  monkeypatch.setattr(data, "preprocess", preprocess)
  dataset = data.load_dataset(synth_task, config, cache_dir=cache_dir,
                              progress=False)
  assert not dataset.from_cache and len(_entries(cache_dir)) == 1


def test_cli_prepare(synth_task, cache_dir, capsys):
  argv = ["prepare", str(synth_task), "--shape", "10", "9", "8",
          "--cache-dir", str(cache_dir)]
  assert cli.main(argv) == 0
  assert "decoded NIfTI" in capsys.readouterr().out
  assert cli.main(argv) == 0
  assert "cache hit" in capsys.readouterr().out
  assert cli.main(argv[:2]) == 2
  assert "--shape is required" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Splits.


def test_make_split_is_deterministic_and_disjoint():
  ids = [f"case_{i:02d}" for i in range(41)]
  split = data.make_split(ids, num_val=7, num_test=9, seed=3)
  assert (len(split.train), len(split.val), len(split.test)) == (25, 7, 9)
  assert sorted(split.train + split.val + split.test) == ids
  shuffled = list(np.random.default_rng(0).permutation(ids))
  assert data.make_split(shuffled, num_val=7, num_test=9, seed=3) == split
  assert data.make_split(ids, num_val=7, num_test=9, seed=4) != split
  # The test set does not move when the validation size changes.
  assert data.make_split(ids, num_val=3, num_test=9, seed=3).test == split.test


@pytest.mark.parametrize("folder, num_cases, counts", [
    ("Task09_Spleen", 41, (25, 7, 9)),
    ("Task02_Heart", 20, (12, 4, 4)),
    ("Task04_Hippocampus", 260, (166, 42, 52)),
    ("Task09_Spleen", 30, (18, 6, 6)),  # Not the full task: 20 % / 20 %.
    ("Task00_Synthetic", 60, (36, 12, 12)),
])
def test_default_split_counts(tmp_path, folder, num_cases, counts):
  cases = tuple(data.Case(f"c{i}", tmp_path, tmp_path)
                for i in range(num_cases))
  task = data.Task(root=tmp_path / folder, name=folder, modalities=("CT",),
                   label_names=("background", "organ"), cases=cases)
  split = data.default_split(task, seed=0)
  assert (len(split.train), len(split.val), len(split.test)) == counts


def test_split_save_and_load(tmp_path):
  split = data.make_split([f"c{i}" for i in range(10)], num_val=2,
                          num_test=3, seed=1)
  path = tmp_path / "run" / "split.json"
  split.save(path)
  assert data.Split.load(path) == split
  with pytest.raises(FileExistsError, match="split.json"):
    split.save(path)
  split.save(path, overwrite=True)
  path.write_text('{"train": ["a"], "val": []}')
  with pytest.raises(ValueError, match="split.json"):
    data.Split.load(path)
  path.write_text('{"train": ["a"], "val": ["a"], "test": [], "seed": 0}')
  with pytest.raises(ValueError, match="twice"):
    data.Split.load(path)
  with pytest.raises(FileNotFoundError):
    data.Split.load(tmp_path / "missing.json")


@pytest.mark.parametrize("num_val, num_test", [(5, 5), (-1, 2), (0, 10)])
def test_make_split_bad_counts(num_val, num_test):
  with pytest.raises(ValueError, match="num_val"):
    data.make_split([f"c{i}" for i in range(10)], num_val=num_val,
                    num_test=num_test, seed=0)


# --------------------------------------------------------------------------
# Batches.


def _numbered(num_cases=10, shape=(4, 5, 3)):
  """Images whose every voxel holds the case number plus a spatial code, so a
  batch says which case it holds and how it was flipped."""
  x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
  code = (x * 100 + y * 10 + z).astype(np.float32)[..., None]
  images = np.stack([code + 1000 * i for i in range(num_cases)])
  return images, images.copy()


def test_batches_cover_each_case_once_per_epoch():
  images, labels = _numbered()
  indices = [0, 2, 3, 5, 6, 7, 9]
  batches = list(data.iterate_batches(images, labels, indices, batch_size=2,
                                      seed=0, epoch=0))
  assert len(batches) == 3  # The last, partial batch is dropped.
  for image_batch, label_batch in batches:
    assert image_batch.shape == (2, 4, 5, 3, 1)
    assert image_batch.dtype == label_batch.dtype == np.float32
  seen = [int(b[0][j, 0, 0, 0, 0]) // 1000 for b in batches for j in range(2)]
  assert len(set(seen)) == 6 and set(seen) <= set(indices)

  kept = list(data.iterate_batches(images, labels, indices, batch_size=2,
                                   seed=0, epoch=0, shuffle=False,
                                   drop_remainder=False))
  assert [b[0].shape[0] for b in kept] == [2, 2, 2, 1]
  order = [int(v) // 1000 for b in kept for v in b[0][:, 0, 0, 0, 0]]
  assert order == indices


def test_shuffle_depends_on_seed_and_epoch_only():
  images, labels = _numbered(num_cases=20)

  def order(seed, epoch):
    return [int(v) // 1000 for b, _ in data.iterate_batches(
        images, labels, range(20), batch_size=4, seed=seed, epoch=epoch,
        flip_axes=(0, 1, 2)) for v in b[:, 0, 0, 0, 0]]

  assert order(1, 5) == order(1, 5)
  assert order(1, 5) != order(1, 6)
  assert order(1, 5) != order(2, 5)
  assert sorted(order(1, 5)) == list(range(20))


def test_flips_apply_to_image_and_label_together():
  images, labels = _numbered(num_cases=40)
  labels = labels * 2  # Different from the image, flipped the same way.
  flipped = {(): 0, (0,): 0, (2,): 0, (0, 2): 0}
  for image_batch, label_batch in data.iterate_batches(
      images, labels, range(40), batch_size=8, seed=0, epoch=0,
      flip_axes=(0, 2)):
    np.testing.assert_array_equal(label_batch, 2 * image_batch)
    for sample in image_batch:
      original = images[int(sample[0, 0, 0, 0]) // 1000]
      matches = [axes for axes in flipped
                 if np.array_equal(sample, np.flip(original, axes))]
      assert len(matches) == 1
      flipped[matches[0]] += 1
  # Each of the four combinations has probability 1/4 over 40 cases.
  assert all(count >= 3 for count in flipped.values()), flipped


def test_background_errors_reach_the_consumer_and_threads_stop():
  images, labels = _numbered()

  class Broken:
    shape = images.shape

    def __getitem__(self, index):
      if index == 7:
        raise OSError("disk gone")
      return images[index]

  before = threading.active_count()
  with pytest.raises(OSError, match="disk gone"):
    list(data.iterate_batches(Broken(), labels, range(10), batch_size=1,
                              seed=0, epoch=0, shuffle=False))
  batches = data.iterate_batches(images, labels, range(10), batch_size=1,
                                 seed=0, epoch=0)
  next(batches)
  batches.close()  # A consumer that stops early.
  assert threading.active_count() == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=11), "batch_size=11 exceeds"),
    (dict(indices=[0, 10]), "indices"),
    (dict(flip_axes=(3,)), "flip_axes"),
    (dict(flip_axes=(1, 1)), "flip_axes"),
    (dict(seed=-1), "seed"),
    (dict(labels=np.zeros((10, 4, 5, 2, 1))), "differ"),
    (dict(images=np.zeros((10, 4, 5, 3))), "num_cases, X, Y, Z, C"),
])
def test_bad_batch_arguments(kwargs, match):
  images, labels = _numbered()
  arguments = dict(images=images, labels=labels, indices=range(10),
                   batch_size=2, seed=0, epoch=0)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=match):
    data.iterate_batches(**arguments)


# --------------------------------------------------------------------------
# Writing predictions.


@pytest.fixture
def ramp_dataset(tmp_path, cache_dir):
  root = _write_task(tmp_path / "Task01_Multi",
                     {f"case_{i}": _ramp_case(seed=i) for i in range(2)},
                     modality=("FLAIR", "T1w"),
                     labels=("background", "edema", "tumour"))
  config = data.PreprocessConfig(shape=(17, 21, 13), label_mode="onehot")
  return data.load_dataset(root, config, cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize("form", ["onehot", "labels", "probabilities"])
def test_write_prediction_in_original_space(ramp_dataset, tmp_path, form):
  meta = ramp_dataset.meta[1]
  onehot = np.asarray(ramp_dataset.labels[1])
  expected = _ramp_case(seed=1)[1]
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


# --------------------------------------------------------------------------
# Bad input: each names the file and what was wrong, before anything is
# written to the cache.


def _good_task(root):
  return _write_task(root, {f"case_{i}": (np.random.default_rng(i).random(
      (6, 7, 5), dtype=np.float32), np.zeros((6, 7, 5), np.uint8))
                            for i in range(2)})


def _truncate(path):
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2])


def _not_nifti(path):
  with gzip.open(path, "wb") as f:
    f.write(b"these are not the voxels you are looking for" * 20)


def _replace(path, array):
  nib.save(nib.Nifti1Image(array, _affine()), path)


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
  corrupt, error, match = BAD_TASKS[name]
  root = _good_task(tmp_path / "Task05_Bad")
  corrupt(root)
  config = data.PreprocessConfig(shape=(4, 4, 4))
  with pytest.raises(error, match=match):
    data.load_dataset(root, config, cache_dir=cache_dir, progress=False)
  assert not any(p.name.endswith(".tmp") or p.is_dir()
                 for p in _entries(cache_dir))


def test_missing_task_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match="task_dir .*nowhere"):
    data.read_task(tmp_path / "nowhere")


@pytest.mark.parametrize("modalities, match", [
    (("T2",), "modality 'T2' is not in"),
    ((2,), "modality 2 is neither"),
])
def test_unknown_modality(tmp_path, cache_dir, modalities, match):
  root = _good_task(tmp_path / "Task05")
  config = data.PreprocessConfig(shape=(4, 4, 4), modalities=modalities)
  with pytest.raises(ValueError, match=match):
    data.load_dataset(root, config, cache_dir=cache_dir, progress=False)
  assert _entries(cache_dir) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(4, 4)), "shape"),
    (dict(shape=(4, 0, 4)), "shape"),
    (dict(shape=(4, 4, 4.5)), "shape"),
    (dict(shape=(4, 4, 4), label_mode="multi"), "label_mode"),
    (dict(shape=(4, 4, 4), modalities=()), "modalities"),
])
def test_bad_preprocess_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.PreprocessConfig(**kwargs)
