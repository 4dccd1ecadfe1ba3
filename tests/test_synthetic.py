"""Tests for topojax/synthetic/: known topology, determinism, MSD layout."""

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from skimage import morphology

from topojax import cli
from topojax import synthetic
from topojax.synthetic import vessels


def _components(mask):
  """Number of 26-connected components, by scikit-image (not the generator's
  scipy), so the check is independent of the code under test."""
  return int(measure.label(mask, connectivity=3).max())


@pytest.mark.parametrize("kinds, num_objects", [
    (("ellipsoid",), (1, 1)),
    (("blob",), (2, 2)),
    (("torus",), (1, 2)),
    # Every kind that fits 32³ (vessels need 64³: their own tests below).
    (tuple(k for k in synthetic.KINDS if k != "vessel"), (1, 3)),
])
def test_label_has_the_recorded_number_of_components(kinds, num_objects):
  config = synthetic.SynthConfig(shape=(32, 32, 32), kinds=kinds,
                                 num_objects=num_objects)
  for index in range(4):
    image, label, count = synthetic.make_case(config, index)
    assert image.shape == label.shape == (32, 32, 32)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1}
    assert num_objects[0] <= count <= num_objects[1]
    assert _components(label) == count


def test_torus_has_one_tunnel():
  # Euler characteristic = components - tunnels + cavities: 0 for one torus.
  config = synthetic.SynthConfig(shape=(40, 40, 40), kinds=("torus",))
  for index in range(3):
    _, label, _ = synthetic.make_case(config, index)
    assert _components(label) == 1
    assert measure.euler_number(label, connectivity=3) == 0


def test_distractors_are_bright_but_unlabelled():
  config = synthetic.SynthConfig(shape=(40, 40, 40), num_distractors=(3, 3),
                                 noise=0.0, bias=0.0)
  for index in range(3):
    image, label, _ = synthetic.make_case(config, index)
    # Background is 0.2, distractors at least 0.6 before the blur.
    bright = image > 0.5
    near_label = ndimage.binary_dilation(label, iterations=2)
    assert _components(bright & ~near_label) == 3
    assert _components(bright & near_label) == 1


def test_noise_and_bias_levels():
  config = synthetic.SynthConfig(shape=(40, 40, 40), noise=0.5, bias=0.0,
                                 num_distractors=(0, 0))
  image, label, _ = synthetic.make_case(config, 0)
  far = ~ndimage.binary_dilation(label, iterations=4)
  assert np.std(image[far]) == pytest.approx(0.5, rel=0.05)
  assert np.mean(image[far]) == pytest.approx(0.2, abs=0.02)

  config = synthetic.SynthConfig(shape=(40, 40, 40), noise=0.0, bias=0.3,
                                 num_distractors=(0, 0))
  image, label, _ = synthetic.make_case(config, 0)
  far = ~ndimage.binary_dilation(label, iterations=4)
  # Background 0.2 scaled by a factor in [0.7, 1.3], and not constant.
  low, high = image[far].min(), image[far].max()
  assert 0.2 * 0.7 - 1e-6 <= low < high <= 0.2 * 1.3 + 1e-6


def test_cases_are_deterministic_per_seed_and_index():
  config = synthetic.SynthConfig(shape=(24, 24, 24))
  first = synthetic.make_case(config, 3)
  again = synthetic.make_case(synthetic.SynthConfig(shape=(24, 24, 24),
                                                    num_cases=5), 3)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  other = synthetic.make_case(synthetic.SynthConfig(shape=(24, 24, 24),
                                                    seed=1), 3)
  assert not np.array_equal(first[0], other[0])


def test_generate_task_writes_msd_layout(tmp_path):
  config = synthetic.SynthConfig(shape=(16, 20, 12), num_cases=3,
                                 spacing=(0.8, 0.8, 2.0), seed=4)
  root = synthetic.generate_task(tmp_path / "Task00_Synthetic", config,
                                 progress=False)
  spec = json.loads((root / "dataset.json").read_text())
  assert spec["numTraining"] == 3 and spec["labels"]["1"] == "object"
  assert [e["image"] for e in spec["training"]] == [
      f"./imagesTr/synth_{i:03d}.nii.gz" for i in range(3)]
  for index, entry in enumerate(spec["training"]):
    image = nib.load(root / entry["image"])
    label = nib.load(root / entry["label"])
    assert image.shape == label.shape == (16, 20, 12)
    assert image.get_data_dtype() == np.float32
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.header.get_zooms(), (0.8, 0.8, 2.0))
    # A real affine: anisotropic and rotated, not the identity.
    np.testing.assert_allclose(image.affine, synthetic.affine(config),
                               atol=1e-5)
    np.testing.assert_allclose(label.affine, image.affine)
    assert not np.allclose(image.affine[:3, :3], np.diag([0.8, 0.8, 2.0]))
    assert image.header["qform_code"] == image.header["sform_code"] == 1
    expected_image, expected_label, count = synthetic.make_case(config, index)
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32),
                                  expected_image)
    np.testing.assert_array_equal(np.asarray(label.dataobj), expected_label)
    assert entry["num_objects"] == count


def test_generate_task_never_overwrites_silently(tmp_path):
  config = synthetic.SynthConfig(shape=(12, 12, 12), num_cases=1)
  root = synthetic.generate_task(tmp_path / "task", config, progress=False)
  with pytest.raises(FileExistsError, match="not empty"):
    synthetic.generate_task(root, config, progress=False)
  synthetic.generate_task(root, config, overwrite=True, progress=False)
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="is a file"):
    synthetic.generate_task(tmp_path / "file", config, overwrite=True,
                            progress=False)


@pytest.mark.parametrize("kwargs", [
    dict(shape=(4, 32, 32)),
    dict(shape=(32, 32)),
    dict(num_cases=0),
    dict(kinds=("cube",)),
    dict(kinds=()),
    dict(kinds=("vessel",), shape=(48, 64, 64)),
    dict(num_objects=(0, 1)),
    dict(num_objects=(2, 1)),
    dict(num_distractors=(-1, 2)),
    dict(distractor_intensity=(0.9, 0.5)),
    dict(noise=-0.1),
    dict(bias=1.0),
    dict(spacing=(1.0, 0.0, 1.0)),
    dict(seed=-1),
])
def test_bad_config(kwargs):
  with pytest.raises(ValueError):
    synthetic.SynthConfig(**kwargs)


def test_too_many_objects_for_the_volume():
  config = synthetic.SynthConfig(shape=(10, 10, 10), num_objects=(8, 8))
  with pytest.raises(ValueError, match="could not fit 8"):
    synthetic.make_case(config, 0)


def test_cli_synth_and_preview(tmp_path, capsys):
  out = tmp_path / "task"
  argv = ["synth", str(out), "--shape", "16", "16", "16", "--num-cases", "2",
          "--kinds", "torus", "blob", "--seed", "3"]
  assert cli.main(argv) == 0
  spec = json.loads((out / "dataset.json").read_text())
  assert spec["synthetic"]["kinds"] == ["torus", "blob"]
  assert spec["synthetic"]["shape"] == [16, 16, 16]
  assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "wrote 2 cases" in capsys.readouterr().out
  assert cli.main(argv) == 2
  assert "not empty" in capsys.readouterr().err
  assert cli.main(argv + ["--overwrite"]) == 0


def test_cli_synth_makes_rings(tmp_path):
  # The "loops" task of experiments/compare_losses.py, from the command line.
  out = tmp_path / "task"
  assert cli.main(["synth", str(out), "--num-cases", "1", "--kinds", "ring",
                   "--num-distractors", "0", "0"]) == 0
  assert json.loads((out / "dataset.json").read_text())["synthetic"][
      "kinds"] == ["ring"]
  label = nib.load(out / "labelsTr" / "synth_000.nii.gz").get_fdata() > 0
  # One solid ring: one component, one tunnel, Euler characteristic 0.
  assert ndimage.label(label, np.ones((3, 3, 3)))[1] == 1
  assert measure.euler_number(label, connectivity=3) == 0


def _betti(mask):
  """(β0, β1, β2) by scikit-image: components (26-connected), cavities
  (background components, 6-connected, that miss the padded border) and
  the Euler characteristic, independently of topojax.metrics."""
  b0 = _components(mask)
  background = measure.label(np.pad(~mask, 1), connectivity=1,
                             background=0).max()
  b2 = int(background) - 1
  return b0, b0 + b2 - int(measure.euler_number(mask, connectivity=3)), b2


def test_branches_are_thin_trees():
  config = synthetic.TASKS["branches"]
  for index in range(4):
    _, label, count = synthetic.make_case(config, index)
    label = label.astype(bool)
    assert count == 1
    # One connected tree: no loop closed where branches meet, no cavity.
    assert _betti(label) == (1, 0, 0)
    # Thin: no voxel deeper than the root's radius (1.9 voxels at 32³).
    assert ndimage.distance_transform_edt(label).max() <= 2.3
    # Branching over generations: the skeleton ends in at least 4 tips (the
    # root's end and those of 3 or more generations of splits).
    skeleton = morphology.skeletonize(label)
    neighbours = ndimage.convolve(skeleton.astype(int), np.ones((3, 3, 3)),
                                  mode="constant") - 1
    assert (skeleton & (neighbours == 1)).sum() >= 4


def test_branch_distractors_are_unlabelled_tube_fragments():
  config = dataclasses.replace(synthetic.TASKS["branches"], shape=(40, 40, 40),
                               num_distractors=(2, 2), noise=0.0, bias=0.0)
  for index in range(3):
    image, label, _ = synthetic.make_case(config, index)
    away = ~ndimage.binary_dilation(label, iterations=2)
    fragments = measure.label((image > 0.45) & away, connectivity=3)
    assert fragments.max() == 2
    for region in measure.regionprops(fragments):
      # Elongated: a tube, not a sphere.
      assert region.axis_major_length > 2 * region.axis_minor_length


def test_existing_tasks_are_what_the_committed_tables_used():
  # The committed comparison tables were made with these configs; a change
  # here (or in how their cases are drawn) changes every number.
  assert synthetic.TASKS["components"] == synthetic.SynthConfig()
  assert synthetic.TASKS["loops"] == synthetic.SynthConfig(
      kinds=("ring",), num_distractors=(0, 1))


def test_cli_synth_makes_branches(tmp_path):
  out = tmp_path / "task"
  assert cli.main(["synth", str(out), "--num-cases", "1", "--kinds",
                   "branch", "--num-distractors", "1", "1"]) == 0
  label = nib.load(out / "labelsTr" / "synth_000.nii.gz").get_fdata() > 0
  assert _betti(label) == (1, 0, 0)


# The vessels task: trees whose image drops at stenoses and fades in
# sub-voxel branches, whose label stays whole.
VESSELS_64 = dataclasses.replace(synthetic.TASKS["vessels"], shape=(64,) * 3)


@pytest.mark.parametrize("config, indices", [
    (VESSELS_64, range(3)),
    (synthetic.TASKS["vessels"], range(1)),
])
def test_vessel_trees_are_whole_in_the_label(config, indices):
  assert min(config.shape) >= 64
  for index in indices:
    image, label, count = synthetic.make_case(config, index)
    assert image.shape == label.shape == config.shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    # β0 of the label = number of trees, each a tree (no loop, no cavity).
    assert 1 <= count <= 2
    assert _betti(label.astype(bool)) == (count, 0, 0)


def _without_stenoses(monkeypatch, config, index):
  """The case drawn with the stenoses keeping all the contrast: the same
  draws from the generator, so the same case but for the stenoses."""
  with monkeypatch.context() as patch:
    patch.setattr(vessels, "_STENOSIS_CONTRAST", (1.0, 1.0))
    return synthetic.make_case(config, index)


def test_stenoses_drop_the_image_toward_the_background(monkeypatch):
  config = dataclasses.replace(VESSELS_64, noise=0.0, bias=0.0,
                               num_distractors=(0, 0))
  for index in range(3):
    image, label, count = synthetic.make_case(config, index)
    open_image, open_label, _ = _without_stenoses(monkeypatch, config, index)
    np.testing.assert_array_equal(label, open_label)
    drop = open_image - image
    assert drop.min() >= -1e-6  # A stenosis only darkens.
    # Each stenosis a separate dark stretch, 1-3 per tree.
    stretches = measure.label(drop > 0.05, connectivity=3)
    assert count <= stretches.max() <= 3 * count
    for region in measure.regionprops(stretches, intensity_image=drop):
      deepest = tuple(region.coords[np.argmax(drop[tuple(region.coords.T)])])
      # On the vessel, and most of its contrast (0.8 above the background
      # of 0.2) lost there, in spite of the blur.
      assert label[deepest]
      assert drop[deepest] > 0.3
      assert image[deepest] < open_image[deepest] - 0.3


def test_a_stenosis_keeps_its_share_of_the_contrast_on_the_centre_line():
  start, end = np.array([4.0, 10.0, 10.0]), np.array([28.0, 10.0, 10.0])
  # 2 voxels long, centred 12 voxels from the start (x = 16), 10 % kept.
  segments = [(start, end, 2.0)]
  label = vessels.tube_label((32, 20, 20), segments)
  contrast = vessels.tube_contrast((32, 20, 20), segments,
                                      [(0, 12.0, 2.0, 0.1)])
  line = contrast[:, 10, 10]
  np.testing.assert_allclose(line[15:18], 0.1, atol=1e-6)
  np.testing.assert_allclose(line[6:14], 1.0)
  np.testing.assert_allclose(line[19:27], 1.0)
  assert label[4:29, 10, 10].all()  # The label runs through it.


@pytest.mark.parametrize("end", [(28.0, 10.0, 10.0), (26.0, 20.0, 15.0)])
def test_sub_voxel_tubes_have_partial_volume_intensity(end):
  start, end, radius = np.array([4.0, 6.0, 8.0]), np.array(end), 0.35
  label = vessels.tube_label((32, 24, 24), [(start, end, radius)])
  contrast = vessels.tube_contrast((32, 24, 24), [(start, end, radius)])
  # The tube fills no voxel: intermediate intensities, whose sum is the
  # tube's volume (π r² L, the caps' half-balls π r³ 4/3 in all).
  length = np.linalg.norm(end - start)
  assert 0 < contrast.max() < 0.8
  assert contrast.sum() == pytest.approx(
      math.pi * radius ** 2 * length + 4 / 3 * math.pi * radius ** 3,
      rel=0.1)
  # The label is one 26-connected chain along the whole tube, every voxel
  # the centre line passes through included.
  assert _components(label) == 1
  for t in np.linspace(0, 1, 200):
    assert label[tuple(np.round(start + t * (end - start)).astype(int))]


def test_vessel_images_show_thin_branches_at_intermediate_intensity():
  config = dataclasses.replace(VESSELS_64, noise=0.0, bias=0.0,
                               num_distractors=(0, 0))
  image, label, _ = synthetic.make_case(config, 0)
  inside = image[label.astype(bool)]
  # Background 0.2, a voxel full of vessel about 1: the thick vessels reach
  # it, the sub-voxel branches stay well below.
  assert inside.max() > 0.9
  assert np.mean((inside > 0.22) & (inside < 0.6)) > 0.2


def test_vessel_cases_are_deterministic():
  first = synthetic.make_case(VESSELS_64, 2)
  again = synthetic.make_case(VESSELS_64, 2)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  other = synthetic.make_case(dataclasses.replace(VESSELS_64, seed=1), 2)
  assert not np.array_equal(first[1], other[1])


def test_the_cli_offers_every_kind():
  assert cli.SYNTH_KINDS == synthetic.KINDS
