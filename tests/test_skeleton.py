"""Tests for topojax/skeleton.py: topology, thinness, scikit-image, speed-free.

Every skeleton is checked for the properties of the issue: inside the mask,
one voxel thin, the mask's Betti numbers (computed here, independently of
the code under test and of topojax.metrics), and equal to scikit-image's
Lee thinning wherever the added Euler re-check never refuses a deletion.
"""

import dataclasses
import itertools
import threading

import numpy as np
import pytest
from scipy import ndimage
from skimage import morphology

from topojax import skeleton
from topojax import synthetic


# --- Independent checks -------------------------------------------------------


def _euler_characteristic(mask):
  """χ of the union of the closed voxels: a cell (vertex, edge, face, cube)
  is in the complex when a voxel around it is; counted with a 2-wide
  maximum filter along the axes where the cell is flat."""
  padded = np.pad(mask, 1).astype(np.uint8)
  chi = 0
  for extent in itertools.product((0, 1), repeat=mask.ndim):
    # Along an axis where the cell has extent it belongs to one voxel (size
    # 1); where it is flat, to the two voxels on either side (size 2).
    cells = ndimage.maximum_filter(padded, size=[2 - e for e in extent],
                                   mode="constant", origin=0)
    chi += (-1) ** sum(extent) * int(cells.sum())
  return chi


def _betti(mask):
  """(β0, β1, β2): 26-connected (8 in 2D) components; in 3D the
  background's face-connected components not joined to the outside (in 2D
  those are the holes, β1); β1 from χ = β0 - β1 + β2."""
  b0 = ndimage.label(mask, np.ones((3,) * mask.ndim))[1]
  enclosed = ndimage.label(np.pad(~mask, 1, constant_values=True))[1] - 1
  chi = _euler_characteristic(mask)
  if mask.ndim == 2:
    assert enclosed == b0 - chi  # Two counts of the holes agree.
    return b0, enclosed, 0
  return b0, b0 + enclosed - chi, enclosed


def _is_thin(thin):
  """No full 2×2 (2D) or 2×2×2 block of skeleton voxels."""
  return not ndimage.binary_erosion(
      thin, np.ones((2,) * thin.ndim), border_value=0).any()


def _ridge_share(mask, thin):
  """The share of skeleton voxels at a maximum of the distance to the
  background along some axis (ties allowed): on the medial line."""
  depth = ndimage.distance_transform_edt(np.pad(mask, 1))
  on_ridge = np.zeros(depth.shape, bool)
  for axis in range(mask.ndim):
    on_ridge |= ((depth >= np.roll(depth, 1, axis))
                 & (depth >= np.roll(depth, -1, axis)))
  return on_ridge[(slice(1, -1),) * mask.ndim][thin].mean()


def _check_properties(mask, thin):
  assert thin.dtype == np.bool_ and thin.shape == mask.shape
  assert not (thin & ~mask).any()
  assert _is_thin(thin)
  assert _betti(thin) == _betti(mask)


def test_the_independent_betti_numbers_are_right():
  g = np.indices((21, 21, 21)) - 10
  ball = (g ** 2).sum(0) <= 36
  torus = ((np.hypot(g[0], g[1]) - 6) ** 2 + g[2] ** 2) <= 4
  assert _betti(ball) == (1, 0, 0)
  assert _betti(ball & ~((g ** 2).sum(0) <= 9)) == (1, 0, 1)
  assert _betti(torus) == (1, 1, 0)
  corner = np.zeros(ball.shape, bool)
  corner[:2, :2, :2] = True
  assert _betti(torus | corner) == (2, 1, 0)
  disc = (g[0, ..., 0] ** 2 + g[1, ..., 0] ** 2) <= 36
  assert _betti(disc & ~(g[0, ..., 0] ** 2 + g[1, ..., 0] ** 2 <= 9)) == (
      1, 1, 0)


# --- Random shapes ------------------------------------------------------------

KINDS_3D = ("box", "ball", "tube", "ring", "shell")
KINDS_2D = ("box", "disc", "tube", "ring")
SHAPE_3D, SHAPE_2D = (26, 26, 26), (40, 40)
PER_KIND = 40


def _random_shape(kind, rng, shape):
  """A union of 1–3 random shapes of one kind, widths even and odd, centres
  on voxels and between them."""
  grid = np.indices(shape).astype(float)
  mask = np.zeros(shape, bool)
  for _ in range(rng.integers(1, 4)):
    centre = (rng.integers(6, np.array(shape) - 6)
              + rng.choice([0, 0.5], size=len(shape)))
    u = grid - centre.reshape(-1, *(1,) * len(shape))
    radius = rng.uniform(1.0, 6.5)
    if kind == "box":
      half = rng.integers(1, 11, size=len(shape)) / 2
      mask |= np.all(np.abs(u) < half.reshape(-1, *(1,) * len(shape)),
                     axis=0)
    elif kind in ("ball", "disc"):
      mask |= (u ** 2).sum(0) <= radius ** 2
    elif kind == "shell":
      outer = rng.uniform(3.5, 8)
      mask |= np.abs(np.sqrt((u ** 2).sum(0)) - outer) <= rng.uniform(0.5, 2)
    elif kind == "tube":
      direction = rng.normal(size=len(shape))
      direction /= np.linalg.norm(direction)
      along = np.tensordot(direction, u, 1)
      across = (u ** 2).sum(0) - along ** 2
      length = rng.uniform(4, 12)
      mask |= (np.abs(along) <= length) & (across <= (radius / 2) ** 2 + 0.3)
    else:  # ring: a torus (3D) or annulus (2D) around a random axis.
      major, minor = rng.uniform(3.5, 8), rng.uniform(0.6, 2.5)
      if len(shape) == 2:
        mask |= np.abs(np.sqrt((u ** 2).sum(0)) - major) <= minor
      else:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        height = np.tensordot(axis, u, 1)
        planar = np.sqrt(np.maximum((u ** 2).sum(0) - height ** 2, 0))
        mask |= (planar - major) ** 2 + height ** 2 <= minor ** 2
  return mask


def _random_shapes(kinds, shape, seed):
  rng = np.random.default_rng(seed)
  for kind in kinds:
    for _ in range(PER_KIND):
      yield kind, _random_shape(kind, rng, shape)


@pytest.mark.parametrize("kinds, shape, seed", [
    (KINDS_3D, SHAPE_3D, 0), (KINDS_2D, SHAPE_2D, 1)], ids=["3d", "2d"])
def test_random_shapes(kinds, shape, seed):
  """Every property on every shape; counts of shapes equal to scikit-image
  and of shapes where the Euler re-check fired (printed with -s)."""
  equal, fired = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0)
  ridge = {"equal": [], "fired": []}
  for kind, mask in _random_shapes(kinds, shape, seed):
    thin, vetoes = skeleton._thin_mask(mask)
    _check_properties(mask, thin)
    scikit = morphology.skeletonize(mask, method="lee")
    # Without the added test the kernel is scikit-image's thinning exactly.
    plain, _ = skeleton._thin_mask(mask, recheck=skeleton._CONNECTIVITY_ONLY)
    np.testing.assert_array_equal(plain, scikit)
    if vetoes:
      fired[kind] += 1
      # scikit-image deleted a voxel that changes the Euler characteristic.
      assert _betti(scikit) != _betti(mask)
      if thin.any():
        ridge["fired"].append(_ridge_share(mask, thin))
    else:
      np.testing.assert_array_equal(thin, scikit)
      equal[kind] += 1
      if thin.any():
        ridge["equal"].append(_ridge_share(mask, thin))
  print(f"\n{len(shape)}D shapes per kind: {PER_KIND}; equal to "
        f"scikit-image: {equal}; Euler re-check fired: {fired}")
  assert sum(equal.values()) + sum(fired.values()) == PER_KIND * len(kinds)
  assert sum(equal.values()) > 0
  if len(shape) == 3:
    assert sum(fired.values()) > 0
    # Where it fired, the skeleton lies on ridges of the distance to the
    # background as often as scikit-image's own skeletons do.
    assert np.mean(ridge["fired"]) >= np.mean(ridge["equal"]) - 0.02


def test_components_are_thinned_independently():
  # A component where the re-check fires (an even bar) beside one where it
  # does not (an odd bar): the odd one keeps scikit-image's skeleton.
  mask = np.zeros((20, 12, 30), bool)
  mask[2:6, 2:6, 2:28] = True
  mask[10:15, 3:8, 2:28] = True
  thin, vetoes = skeleton._thin_mask(mask)
  assert vetoes > 0
  odd = np.zeros_like(mask)
  odd[9:, ...] = True
  np.testing.assert_array_equal(
      thin & odd, morphology.skeletonize(mask & odd, method="lee"))
  _check_properties(mask, thin)


# --- The shapes that scikit-image thins away ----------------------------------


def _depth(mask):
  return ndimage.distance_transform_edt(np.pad(mask, 1))[
      (slice(1, -1),) * mask.ndim]


def test_solid_box():
  mask = np.zeros((20, 18, 16), bool)
  mask[4:16, 4:14, 4:12] = True  # 12 × 10 × 8.
  thin = skeleton.skeletonize(mask)
  _check_properties(mask, thin)
  # Central: at the box's largest depth.
  assert thin.any() and _depth(mask)[thin].min() >= _depth(mask).max() - 0.5


@pytest.mark.parametrize("side", [2, 4, 6, 8])
def test_bars_of_even_cross_section_keep_their_centre_line(side):
  length = 30
  mask = np.zeros((side + 4, side + 4, length + 4), bool)
  mask[2:2 + side, 2:2 + side, 2:2 + length] = True
  thin = skeleton.skeletonize(mask)
  _check_properties(mask, thin)
  x, y, z = np.nonzero(thin)
  # A straight line along the bar, in its central 2 × 2 columns, one voxel
  # per slice and unbroken, reaching within side/2 + 1 of each end.
  middle = (side + 4) // 2
  assert set(x) <= {middle - 1, middle} and len(set(x)) == 1
  assert set(y) <= {middle - 1, middle} and len(set(y)) == 1
  np.testing.assert_array_equal(z, np.arange(z.min(), z.max() + 1))
  assert z.size >= length - side - 2


@pytest.mark.parametrize("dims", [(4, 4, 4), (4, 6, 8), (6, 6, 6),
                                  (2, 2, 2), (12, 12, 12)])
def test_boxes_with_even_sides(dims):
  mask = np.zeros(tuple(d + 6 for d in dims), bool)
  mask[tuple(slice(3, 3 + d) for d in dims)] = True
  thin = skeleton.skeletonize(mask)
  _check_properties(mask, thin)
  assert _depth(mask)[thin].min() >= _depth(mask).max() - 1


@pytest.mark.parametrize("radius", [5.0, 6.5, 7.0, 7.5])
def test_balls_of_even_diameter(radius):
  g = np.indices((24, 24, 24)) - 11.5  # Centred between voxels.
  mask = (g ** 2).sum(0) <= radius ** 2
  thin = skeleton.skeletonize(mask)
  _check_properties(mask, thin)
  assert np.abs(g[:, thin]).max() <= 1.5


def test_2d_bar_and_the_4_directions():
  # 2D is Lee's thinning of a one-voxel-thick volume, as scikit-image's
  # method='lee': equal on every mask here (the re-check never fired in 2D).
  mask = np.zeros((30, 12), bool)
  mask[3:27, 4:8] = True
  np.testing.assert_array_equal(skeleton.skeletonize(mask),
                                morphology.skeletonize(mask, method="lee"))
  np.testing.assert_array_equal(skeleton.skeletonize(mask[None])[0],
                                skeleton.skeletonize(mask))


# --- Synthetic tasks ----------------------------------------------------------


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_synthetic_labels(task):
  config = dataclasses.replace(synthetic.TASKS[task], noise=0.0, bias=0.0)
  for index in range(8):
    label = synthetic.make_case(config, index)[1] > 0
    thin, vetoes = skeleton._thin_mask(label)
    _check_properties(label, thin)
    if not vetoes:
      np.testing.assert_array_equal(
          thin, morphology.skeletonize(label, method="lee"))


# --- Batches and arguments ----------------------------------------------------


def test_batch_on_threads_equals_one_call_each():
  rng = np.random.default_rng(3)
  masks = [_random_shape("ball", rng, SHAPE_3D),
           _random_shape("box", rng, (20, 22, 24)),
           _random_shape("ring", rng, SHAPE_2D).astype(np.uint8),
           np.zeros((5, 5), bool)]
  expected = [skeleton.skeletonize(m) for m in masks]
  for workers in (1, 2, None):
    found = skeleton.skeletonize_batch(masks, num_workers=workers)
    assert len(found) == len(masks)
    for f, e in zip(found, expected):
      np.testing.assert_array_equal(f, e)
  stacked = np.stack([masks[0], masks[0]])
  assert len(skeleton.skeletonize_batch(stacked, num_workers=2)) == 2


def test_kernel_releases_the_gil():
  # While a worker thread thins, this thread keeps running Python: the
  # kernel holds no GIL, so a batch's masks can be thinned in parallel.
  mask = np.zeros((64, 64, 64), bool)
  mask[4:60, 4:60, 4:60] = True
  skeleton.skeletonize(mask[:8])  # Compiled (or loaded) beforehand.
  done = threading.Event()
  worker = threading.Thread(
      target=lambda: (skeleton.skeletonize(mask), done.set()))
  spins = 0
  worker.start()
  while not done.is_set():
    spins += 1
  worker.join()
  assert spins > 1000


def test_empty_and_full_edge_cases():
  assert not skeleton.skeletonize(np.zeros((4, 5, 6), bool)).any()
  assert skeleton.skeletonize(np.zeros((0, 5), bool)).shape == (0, 5)
  # A mask touching the array's border: the outside is background.
  full = np.ones((7, 6, 5), bool)
  thin = skeleton.skeletonize(full)
  _check_properties(full, thin)
  assert thin.any()


@pytest.mark.parametrize("mask, message", [
    (np.zeros(5, bool), r"mask must be a 2D \(X, Y\) or 3D"),
    (np.zeros((2, 3, 4, 5), bool), r"mask must be a 2D \(X, Y\) or 3D"),
    (np.full((3, 3), 2), r"mask must be a binary mask"),
    (np.full((3, 3), 0.5), r"mask must be a binary mask"),
    (np.array([["a", "b"]]), r"mask must be a binary mask"),
])
def test_bad_mask(mask, message):
  with pytest.raises(ValueError, match=message):
    skeleton.skeletonize(mask)


def test_bad_batch_arguments():
  with pytest.raises(ValueError, match=r"masks\[1\] must be a binary mask"):
    skeleton.skeletonize_batch([np.zeros((3, 3)), np.full((3, 3), 3)])
  for workers in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="num_workers"):
      skeleton.skeletonize_batch([np.zeros((3, 3))], num_workers=workers)
