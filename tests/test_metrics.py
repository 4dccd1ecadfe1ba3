"""Tests for topojax/metrics.py: hand-made volumes, brute force, skimage."""

import math

import numpy as np
import pytest
from scipy.spatial import distance
from skimage import measure
from skimage import morphology

from topojax import metrics
from topojax.skeleton import skeletonize


def _box(shape, *boxes):
  """A bool volume with the given index boxes set."""
  mask = np.zeros(shape, bool)
  for box in boxes:
    mask[box] = True
  return mask


def _random_masks(seed, shape=(9, 10, 11), density=0.35):
  rng = np.random.default_rng(seed)
  return rng.random(shape) < density, rng.random(shape) < density


def _torus(major=6.0, minor=2.5):
  x, y, z = np.mgrid[-10:11, -10:11, -4:5].astype(float)
  return (np.hypot(x, y) - major) ** 2 + z ** 2 <= minor ** 2


def _hollow_sphere(inner=3.0, outer=6.0):
  x, y, z = np.mgrid[-7:8, -7:8, -7:8]
  radius = np.sqrt(x ** 2 + y ** 2 + z ** 2)
  return (radius >= inner) & (radius <= outer)


CUBE = _box((7, 7, 7), np.s_[1:6, 1:6, 1:6])
# A 5x5x5 cube with its inner 3x3x3 removed: one cavity.
SHELL = CUBE & ~_box((7, 7, 7), np.s_[2:5, 2:5, 2:5])
# The same shell with a hole through one wall: the cavity opens.
PIERCED_SHELL = SHELL & ~_box((7, 7, 7), np.s_[3, 3, 1])
# A block with a one-voxel shaft: a square ring.
RING = _box((7, 7, 5), np.s_[1:6, 1:6, 1:4]) & ~_box((7, 7, 5), np.s_[3, 3, :])
DOUBLE_RING = (_box((13, 7, 5), np.s_[1:12, 1:6, 1:4])
               & ~_box((13, 7, 5), np.s_[3, 3, :], np.s_[9, 3, :]))
TWO_CUBES = _box((10, 5, 5), np.s_[1:4, 1:4, 1:4], np.s_[6:9, 1:4, 1:4])
# Eight voxels in one plane, each touching the next only along an edge: a
# ring for the closed-cube union (26-connectivity), with a hole in the middle.
DIAGONAL_RING = _box((5, 5, 1), *[np.s_[i, j, 0] for i, j in (
    (2, 0), (1, 1), (0, 2), (1, 3), (2, 4), (3, 3), (4, 2), (3, 1))])
# Two voxels that share one corner: one 26-connected component.
CORNER_PAIR = _box((3, 3, 3), np.s_[0, 0, 0], np.s_[1, 1, 1])


@pytest.mark.parametrize("mask, betti", [
    (CUBE, (1, 0, 0)),
    (SHELL, (1, 0, 1)),
    (PIERCED_SHELL, (1, 0, 0)),
    (RING, (1, 1, 0)),
    (DOUBLE_RING, (1, 2, 0)),
    (TWO_CUBES, (2, 0, 0)),
    (DIAGONAL_RING, (1, 1, 0)),
    (CORNER_PAIR, (1, 0, 0)),
    (_torus(), (1, 1, 0)),
    (_hollow_sphere(), (1, 0, 1)),
    (np.zeros((4, 4, 4), bool), (0, 0, 0)),
    (np.ones((4, 4, 4), bool), (1, 0, 0)),
], ids=["cube", "shell", "pierced-shell", "ring", "double-ring", "two-cubes",
        "diagonal-ring", "corner-pair", "torus", "hollow-sphere", "empty",
        "full"])
def test_betti_numbers_of_known_shapes(mask, betti):
  assert metrics.betti_numbers(mask) == betti
  assert metrics.euler_characteristic(mask) == betti[0] - betti[1] + betti[2]


def test_betti_numbers_add_over_nested_components():
  # A hollow sphere with a two-cube island inside its cavity: components
  # 1 + 2, the cavity stays one (the island does not split it).
  mask = _hollow_sphere(inner=5, outer=7)
  mask[5:7, 7, 7] = True
  mask[9, 7, 7] = True
  assert metrics.betti_numbers(mask) == (3, 0, 1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("density", [0.2, 0.5, 0.7])
def test_topology_matches_skimage(seed, density):
  measure = pytest.importorskip("skimage.measure")
  mask, _ = _random_masks(seed, density=density)
  b0 = measure.label(mask, connectivity=3).max()
  padded_background = np.pad(~mask, 1, constant_values=True)
  b2 = measure.label(padded_background, connectivity=1).max() - 1
  chi = measure.euler_number(mask, connectivity=3)
  assert metrics.count_components(mask) == b0
  assert metrics.euler_characteristic(mask) == chi
  assert metrics.betti_numbers(mask) == (b0, b0 + b2 - chi, b2)


@pytest.mark.parametrize("seed", range(4))
def test_connected_component_errors_match_skimage(seed):
  measure = pytest.importorskip("skimage.measure")
  pred, gt = _random_masks(seed, density=0.15)
  gt[:, :, 3] = False  # a slice empty in one mask only
  pred[:, :, 3] = False
  gt[:, :, 5] = False  # and one slice empty in both
  count = lambda m, c: measure.label(m, connectivity=c).max()
  assert metrics.connected_component_error_3d(pred, gt) == abs(
      count(pred, 3) - count(gt, 3))
  errors = [abs(count(pred[..., z], 2) - count(gt[..., z], 2))
            for z in range(pred.shape[2])
            if pred[..., z].any() or gt[..., z].any()]
  assert metrics.connected_component_error_2d(pred, gt) == pytest.approx(
      np.mean(errors))


def test_connected_component_error_2d_by_hand():
  shape = (12, 12, 5)
  square = lambda x, y, z: np.s_[x:x + 2, y:y + 2, z]
  gt = _box(shape, square(0, 0, 0),
            # Touching at one corner: one component in 8-connectivity.
            square(0, 0, 1), square(2, 2, 1),
            square(5, 5, 2))
  pred = _box(shape, square(0, 0, 0), square(4, 0, 0), square(0, 4, 0),
              square(8, 8, 0),
              square(5, 5, 1),
              square(3, 3, 3))
  # Slices 0..3 qualify: errors |4-1|, |1-1|, |0-1|, |1-0|; slice 4 is empty.
  assert metrics.connected_component_error_2d(pred, gt) == 5 / 4
  # In 3D, gt's squares of slices 0 and 1 join; pred's six squares do not.
  assert metrics.count_components(gt) == 2
  assert metrics.count_components(pred) == 6


def test_cce_of_two_cubes_against_one():
  one_cube = _box(TWO_CUBES.shape, np.s_[1:4, 1:4, 1:4])
  assert metrics.connected_component_error_3d(TWO_CUBES, one_cube) == 1
  assert metrics.connected_component_error_3d(one_cube, TWO_CUBES) == 1


def test_overlap_metrics_by_hand():
  gt = _box((6, 6, 6), np.s_[0:4, 0:4, 0:2])      # 32 voxels
  pred = _box((6, 6, 6), np.s_[0:4, 0:4, 0:4])    # 64 voxels, all of gt
  assert metrics.dice(pred, gt) == pytest.approx(2 * 32 / 96)
  assert metrics.precision(pred, gt) == pytest.approx(0.5)
  assert metrics.recall(pred, gt) == 1.0
  assert metrics.volume_error_rate(pred, gt) == pytest.approx(1.0)
  assert metrics.volume_error_rate(gt, pred) == pytest.approx(-0.5)


def test_metrics_accept_zero_one_integers_like_bools():
  pred, gt = _random_masks(0)
  as_int = pred.astype(np.uint8), gt.astype(np.int64)
  assert metrics.dice(*as_int) == metrics.dice(pred, gt)
  assert metrics.betti_numbers(as_int[0]) == metrics.betti_numbers(pred)


EMPTY = np.zeros((5, 5, 5), bool)
SOME = _box((5, 5, 5), np.s_[1:3, 1:3, 1:3])


@pytest.mark.parametrize("pred, gt, expected", [
    (EMPTY, EMPTY, {"dice": 1.0, "cldice": 1.0, "precision": 1.0,
                    "recall": 1.0, "ver": 0.0, "hd95": 0.0, "cce_2d": 0.0,
                    "cce_3d": 0}),
    (EMPTY, SOME, {"dice": 0.0, "cldice": 0.0, "precision": 0.0,
                   "recall": 0.0, "ver": -1.0, "hd95": math.inf,
                   "cce_2d": 1.0, "cce_3d": 1}),
    (SOME, EMPTY, {"dice": 0.0, "cldice": 0.0, "precision": 0.0,
                   "recall": 0.0, "ver": math.inf, "hd95": math.inf,
                   "cce_2d": 1.0, "cce_3d": 1}),
], ids=["both-empty", "pred-empty", "gt-empty"])
def test_empty_mask_answers(pred, gt, expected):
  found = {
      "dice": metrics.dice(pred, gt),
      "cldice": metrics.cldice(pred, gt),
      "precision": metrics.precision(pred, gt),
      "recall": metrics.recall(pred, gt),
      "ver": metrics.volume_error_rate(pred, gt),
      "hd95": metrics.hausdorff_distance_95(pred, gt, spacing=(1, 2, 3)),
      "cce_2d": metrics.connected_component_error_2d(pred, gt),
      "cce_3d": metrics.connected_component_error_3d(pred, gt),
  }
  assert found == expected


# clDice (Shit et al. 2021). The hand computations rest on the skeletons
# (topojax.skeletonize, Lee's thinning in 2D and 3D), which each test first
# checks against the voxels it names:
# * a 3D tube of 3 x 3 voxels along X, x = 1..20, thins to its centre line,
#   all 20 voxels (Lee keeps the line's ends);
# * a one-voxel-wide 2D line is its own skeleton (no pixel of it is simple:
#   an inner one joins two pieces, an end is a line's end).
TUBE = _box((22, 15, 7), np.s_[1:21, 2:5, 2:5])
TUBE_AXIS = _box((22, 15, 7), np.s_[1:21, 3, 3])
LINE = _box((22, 12), np.s_[1:21, 3])


def _tprec_tsens(pred, gt):
  """Tprec and Tsens from the skeletons, for the tests' checks."""
  s_pred, s_gt = skeletonize(pred), skeletonize(gt)
  return (s_pred & gt).sum() / s_pred.sum(), (s_gt & pred).sum() / s_gt.sum()


def test_cldice_skeletons_are_the_hand_made_ones():
  np.testing.assert_array_equal(skeletonize(TUBE), TUBE_AXIS)
  np.testing.assert_array_equal(skeletonize(LINE), LINE)


@pytest.mark.parametrize("mask", [TUBE, LINE], ids=["3d", "2d"])
def test_cldice_of_an_exact_prediction_is_one(mask):
  assert metrics.cldice(mask, mask) == 1.0


def test_cldice_of_a_thin_prediction_of_a_thick_tube_is_one():
  # The centre line alone: Dice 2 * 20 / (20 + 180), yet every centre line
  # is covered and every predicted voxel lies in the tube.
  assert metrics.dice(TUBE_AXIS, TUBE) == pytest.approx(0.2)
  assert metrics.cldice(TUBE_AXIS, TUBE) == 1.0


@pytest.mark.parametrize("gt, half", [
    (TUBE, _box(TUBE.shape, np.s_[1:11, 2:5, 2:5])),
    (LINE, _box(LINE.shape, np.s_[1:11, 3])),
], ids=["3d", "2d"])
def test_cldice_of_half_a_tube(gt, half):
  # Half the tube, x = 1..10: it covers 10 of the label's 20 skeleton voxels
  # (Tsens 0.5), and its own skeleton lies in the label (Tprec 1), so
  # clDice = 2 * 1 * 0.5 / 1.5 = 2/3.
  assert _tprec_tsens(half, gt) == pytest.approx((1.0, 0.5))
  assert metrics.cldice(half, gt) == pytest.approx(2 / 3)
  # Swapped, the half is the label: Tprec 0.5, Tsens 1, the same clDice.
  assert metrics.cldice(gt, half) == pytest.approx(2 / 3)


def test_cldice_of_a_spurious_branch_3d():
  # A 3 x 8 x 3 branch sticks out of the tube at x = 9..11, y = 5..12. Lee's
  # skeleton of the T: the centre line minus its voxel at the junction (19
  # voxels, all in the label) and the branch's centre line x = 10, z = 3,
  # y = 4..11 (8 voxels, of which y = 4 lies in the tube). Tprec = 20/27,
  # Tsens = 1 (the prediction contains the label).
  pred = TUBE | _box(TUBE.shape, np.s_[9:12, 5:13, 2:5])
  skeleton = skeletonize(pred)
  np.testing.assert_array_equal(
      skeleton, (TUBE_AXIS & ~_box(TUBE.shape, np.s_[10, 3, 3]))
      | _box(TUBE.shape, np.s_[10, 4:12, 3]))
  t_prec = 20 / 27
  assert _tprec_tsens(pred, TUBE) == pytest.approx((t_prec, 1.0))
  assert metrics.cldice(pred, TUBE) == pytest.approx(
      2 * t_prec / (t_prec + 1))


def test_cldice_of_a_spurious_branch_2d():
  # A one-pixel branch x = 10, y = 4..9 on the 20-pixel line: the skeleton
  # is the T less its junction pixel (simple: its three neighbours touch at
  # corners, as in 3D above), 25 pixels of which 19 lie in the label.
  pred = LINE | _box(LINE.shape, np.s_[10, 4:10])
  np.testing.assert_array_equal(
      skeletonize(pred), pred & ~_box(LINE.shape, np.s_[10, 3]))
  assert metrics.cldice(pred, LINE) == pytest.approx(
      2 * (19 / 25) / (19 / 25 + 1))


def test_cldice_of_a_broken_tube_is_below_one_but_not_by_dice():
  # One missing cross-section at x = 10 cuts the tube in two: 9 of its 180
  # voxels gone (Dice 0.975), one of its 20 skeleton voxels uncovered and
  # each piece's own skeleton inside the label.
  broken = TUBE & ~_box(TUBE.shape, np.s_[10, :, :])
  t_prec, t_sens = _tprec_tsens(broken, TUBE)
  assert t_prec == 1.0 and t_sens == pytest.approx(19 / 20)
  assert metrics.cldice(broken, TUBE) == pytest.approx(
      2 * t_sens / (1 + t_sens))


@pytest.mark.parametrize("side", [2, 4])
def test_cldice_of_a_cube_that_scikit_image_thins_away(side):
  # scikit-image's Lee thinning removes a 2x2x2 or 4x4x4 cube entirely (its
  # issue 3757), so clDice on its skeletons would score the exact prediction
  # of a cube 0 (Tprec and Tsens both 0 / 0). topojax's skeleton keeps the
  # cube's one component.
  cube = _box((side + 2,) * 3, (np.s_[1:side + 1],) * 3)
  assert not morphology.skeletonize(cube).any()
  kept = skeletonize(cube)
  assert kept.any() and cube[kept].all()
  assert metrics.cldice(cube, cube) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_cldice_of_a_mask_against_itself_is_one(seed):
  # Random blobs, bars of even cross-section: every component has a
  # skeleton, which lies in the mask, so Tprec = Tsens = 1 exactly.
  rng = np.random.default_rng(seed)
  mask = _box((20, 18, 16), np.s_[2:6, 2:6, 1:15],
              np.s_[10:18, 8:16, 3:13])
  mask |= rng.random(mask.shape) < 0.2
  assert metrics.cldice(mask, mask) == 1.0
  assert metrics.cldice(mask[..., 5], mask[..., 5]) == 1.0


def test_cldice_when_neither_skeleton_meets_the_other_mask():
  apart = _box(TUBE.shape, np.s_[1:21, 10:13, 2:5])
  assert metrics.cldice(apart, TUBE) == 0.0


def _brute_force_hd95(pred, gt, spacing):
  """Pairwise distances between surface voxels found by neighbour tests."""
  def surface(mask):
    padded = np.pad(mask, 1)
    core = (slice(1, -1),) * 3
    interior = mask.copy()
    for axis in range(3):
      for step in (-1, 1):
        interior &= np.roll(padded, step, axis)[core]
    return mask & ~interior
  points = [np.argwhere(surface(m)) * np.asarray(spacing) for m in (pred, gt)]
  pairwise = distance.cdist(*points)
  return np.percentile(
      np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)]), 95)


@pytest.mark.parametrize("seed", range(5))
def test_hd95_matches_brute_force_on_dense_random_masks(seed):
  pred, gt = _random_masks(seed)
  spacing = (0.7, 1.3, 2.9)
  assert metrics.hausdorff_distance_95(pred, gt, spacing=spacing) == (
      pytest.approx(_brute_force_hd95(pred, gt, spacing), rel=1e-12))


@pytest.mark.parametrize("seed", range(5))
def test_hd95_matches_brute_force_on_sparse_random_masks(seed):
  # Small blobs in a large volume: few surface voxels for the volume.
  rng = np.random.default_rng(seed)
  pred, gt = np.zeros((2, 40, 40, 40), bool)
  for mask in (pred, gt):
    for corner in rng.integers(0, 34, size=(2, 3)):
      mask[tuple(np.s_[c:c + 6] for c in corner)] = rng.random((6, 6, 6)) < 0.6
  spacing = (0.8, 0.8, 2.5)
  assert metrics.hausdorff_distance_95(pred, gt, spacing=spacing) == (
      pytest.approx(_brute_force_hd95(pred, gt, spacing), rel=1e-12))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_shifted_slab_uses_each_axis_spacing(axis):
  # Slabs one voxel thick, 3 voxels apart: every surface distance is exactly
  # 3 spacings along the shift axis.
  shape, spacing = [12, 12, 12], (0.5, 1.25, 3.0)
  first, second = [slice(2, 10)] * 3, [slice(2, 10)] * 3
  first[axis], second[axis] = slice(4, 5), slice(7, 8)
  pred, gt = _box(shape, tuple(first)), _box(shape, tuple(second))
  assert metrics.hausdorff_distance_95(pred, gt, spacing=spacing) == (
      pytest.approx(3 * spacing[axis]))


def test_hd95_of_shifted_cube_is_bounded_by_the_shift():
  spacing = (0.8, 0.8, 2.5)
  pred = _box((12, 12, 16), np.s_[3:9, 3:9, 3:9])
  gt = np.roll(pred, 2, axis=2)
  hd95 = metrics.hausdorff_distance_95(pred, gt, spacing=spacing)
  assert hd95 == pytest.approx(_brute_force_hd95(pred, gt, spacing))
  # Every surface voxel, shifted, lands on the other surface.
  assert 0 < hd95 <= 2 * 2.5


def test_hd95_counts_the_array_border_as_outside():
  # A 3x3x3 block filling the array: its 26 outer voxels are surface (at
  # 1, sqrt 2 and sqrt 3 from the centre, 6, 12 and 8 of them); the centre
  # voxel alone, the other mask, is 1 away from them. Of the 27 pooled
  # distances, ranks 25 and 26 (0-based 24.7 lies between) are sqrt 3.
  pred = np.ones((3, 3, 3), bool)
  gt = _box(pred.shape, np.s_[1, 1, 1])
  assert metrics.hausdorff_distance_95(pred, gt, spacing=(1, 1, 1)) == (
      pytest.approx(math.sqrt(3)))


def test_hd95_takes_the_percentile_of_both_directions_pooled():
  # A 10-voxel line, and the same line plus one voxel 4 slices away: of the
  # 21 pooled distances one is 4 * 2.5 mm, so the 95th percentile is 0. The
  # larger directed percentile (MONAI's convention) would be 5 mm.
  pred = _box((10, 3, 6), np.s_[:, 1, 1])
  gt = pred | _box(pred.shape, np.s_[0, 1, 5])
  assert metrics.hausdorff_distance_95(pred, gt, spacing=(1, 1, 2.5)) == 0.0


def test_pearson_r_by_hand():
  assert metrics.pearson_r([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
  assert metrics.pearson_r([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)


@pytest.mark.parametrize("x, y", [([], []), ([5.0], [3.0]),
                                  ([1, 1, 1], [1, 2, 3])])
def test_pearson_r_is_nan_when_undefined(x, y):
  assert math.isnan(metrics.pearson_r(x, y))


def test_case_metrics_agree_with_the_single_metrics_uncropped():
  # Content in a corner of a larger volume: the bounding-box crop must not
  # change any value, including surfaces on the volume's border.
  pred, gt = np.zeros((2, 30, 25, 20), bool)
  small_pred, small_gt = _random_masks(3, shape=(8, 9, 10))
  pred[:8, :9, 10:], gt[:8, :9, 10:] = small_pred, small_gt
  spacing = (0.9, 1.1, 2.0)
  found = metrics.case_metrics(pred, gt, spacing=spacing)
  betti = [abs(p - g) for p, g in zip(metrics.betti_numbers(pred),
                                      metrics.betti_numbers(gt))]
  ver = metrics.volume_error_rate(pred, gt)
  voxel = 0.9 * 1.1 * 2.0
  assert found == pytest.approx({
      "dice": metrics.dice(pred, gt),
      "cldice": metrics.cldice(pred, gt),
      "hd95_mm": metrics.hausdorff_distance_95(pred, gt, spacing=spacing),
      "precision": metrics.precision(pred, gt),
      "recall": metrics.recall(pred, gt),
      "ver": ver,
      "aver": abs(ver),
      "cce_2d": metrics.connected_component_error_2d(pred, gt),
      "cce_3d": metrics.connected_component_error_3d(pred, gt),
      "betti0_error": betti[0],
      "betti1_error": betti[1],
      "betti2_error": betti[2],
      **dict(zip(("breaks", "missed", "spurious"),
                 metrics.component_errors(pred, gt))),
      "volume_pred_mm3": small_pred.sum() * voxel,
      "volume_gt_mm3": small_gt.sum() * voxel,
  })


def test_case_metrics_of_two_empty_masks():
  found = metrics.case_metrics(EMPTY, EMPTY, spacing=(1, 1, 1))
  assert found["dice"] == 1.0 and found["hd95_mm"] == 0.0
  assert found["cldice"] == 1.0
  assert found["volume_pred_mm3"] == found["volume_gt_mm3"] == 0.0


# Breaks, missed and spurious components, on volumes where the counts are
# known by construction. Two "trees": straight tubes along x at y = 2 and 8.
TUBES = _box((16, 11, 5), np.s_[1:15, 1:4, 1:4], np.s_[1:15, 7:10, 1:4])


def _cut(mask, *xs):
  """``mask`` with the planes ``x`` removed: each cut adds a piece."""
  mask = mask.copy()
  mask[list(xs)] = False
  return mask


@pytest.mark.parametrize("pred, expected", [
    (TUBES, (0, 0, 0)),
    # The first tube cut twice: 3 pieces, 2 breaks.
    (_cut(TUBES, 5, 10) | _box(TUBES.shape, np.s_[:, 7:10, 1:4]),
     (2, 0, 0)),
    # Both tubes cut once: one break each.
    (_cut(TUBES, 7), (2, 0, 0)),
    # An island away from both tubes: spurious, not a break.
    (TUBES | _box(TUBES.shape, np.s_[6:8, 5, 0]), (0, 0, 1)),
    # The second tree lost entirely: missed, not a break.
    (TUBES & _box(TUBES.shape, np.s_[:, :5, :]), (0, 1, 0)),
    # A bridge joining the two trees: one piece of each, neither break nor
    # spurious (a merge, which |Δβ0| sees instead).
    (TUBES | _box(TUBES.shape, np.s_[7, 4:7, 2]), (0, 0, 0)),
    # A thinner prediction inside the label still overlaps it: one piece.
    (_box(TUBES.shape, np.s_[1:15, 2, 2], np.s_[1:15, 8, 2]), (0, 0, 0)),
    # Nothing predicted: both trees missed.
    (np.zeros(TUBES.shape, bool), (0, 2, 0)),
])
def test_component_errors_by_construction(pred, expected):
  assert metrics.component_errors(pred, TUBES) == expected


def test_component_errors_use_full_connectivity():
  # Two voxels touching at a corner are one 26-connected piece.
  gt = _box((4, 4, 4), np.s_[0:3, 0:3, 0:3])
  pred = _box((4, 4, 4), np.s_[0, 0, 0], np.s_[1, 1, 1])
  assert metrics.component_errors(pred, gt) == (0, 0, 0)
  pred = _box((4, 4, 4), np.s_[0, 0, 0], np.s_[2, 2, 2])
  assert metrics.component_errors(pred, gt) == (1, 0, 0)


# Sparse masks have few bridges or none, denser ones some: both cases occur.
@pytest.mark.parametrize("density", [0.03, 0.08])
@pytest.mark.parametrize("seed", range(4))
def test_component_errors_account_for_beta0(seed, density):
  pred, gt = _random_masks(seed, shape=(12, 12, 12), density=density)
  breaks, missed, spurious = metrics.component_errors(pred, gt)
  assert metrics.component_errors(gt, gt) == (0, 0, 0)
  # Label component count by scikit-image, independent of the code above.
  gt_labels = measure.label(gt, connectivity=3)
  pred_labels = measure.label(pred, connectivity=3)
  bridges = sum(np.unique(gt_labels[(pred_labels == p) & gt]).size > 1
                for p in range(1, pred_labels.max() + 1))
  change = pred_labels.max() - gt_labels.max()
  # Every predicted piece is spurious or a piece of some tree; a bridge is
  # a piece of several, so it makes β0(P) smaller than the sum.
  if bridges == 0:
    assert change == breaks + spurious - missed
  else:
    assert change < breaks + spurious - missed


def test_component_errors_without_bridges_give_beta0_error():
  # A cut tube, an island and a lost tree: |Δβ0| = |2 + 1 - 1| = 2.
  pred = _cut(TUBES & _box(TUBES.shape, np.s_[:, :5, :]), 4, 9)
  pred |= _box(TUBES.shape, np.s_[12, 5, 0])
  assert metrics.component_errors(pred, TUBES) == (2, 1, 1)
  assert metrics.connected_component_error_3d(pred, TUBES) == 2


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.dice(np.full((3, 3, 3), 2), EMPTY[:3, :3, :3]),
     "pred must be a binary mask"),
    (lambda: metrics.recall(EMPTY, np.full((5, 5, 5), 0.5)),
     "gt must be a binary mask"),
    (lambda: metrics.dice(EMPTY, EMPTY[:4]), "same shape"),
    (lambda: metrics.hausdorff_distance_95(SOME, SOME, spacing=(1, 1)),
     "spacing must be 3 positive"),
    (lambda: metrics.hausdorff_distance_95(SOME, SOME, spacing=(1, 0, 1)),
     "spacing must be 3 positive"),
    (lambda: metrics.betti_numbers(np.ones((4, 4), bool)), "3D mask"),
    (lambda: metrics.connected_component_error_2d(EMPTY[0], EMPTY[0]),
     "3D mask"),
    (lambda: metrics.pearson_r([1, 2], [1, 2, 3]), "one value per case"),
    (lambda: metrics.cldice(np.ones(4, bool), np.ones(4, bool)),
     "2D .* or 3D"),
    (lambda: metrics.cldice(SOME, SOME[:4]), "same shape"),
    (lambda: metrics.component_errors(SOME, SOME[:4]), "same shape"),
    (lambda: metrics.component_errors(SOME * 2, SOME), "pred must be a binary"),
])
def test_bad_input_is_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()
