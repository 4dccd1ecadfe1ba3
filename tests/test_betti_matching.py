"""Tests for topojax/losses/betti_matching.py: the kernel, parity, the loss."""

import functools
import importlib.machinery
import importlib.util
import itertools
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topojax.losses import betti_matching as bm

import loss_inputs  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = pathlib.Path(__file__).resolve().parents[1]


_PEER_NAME = "topolosses.losses.betti_matching.src.betti_matching"


@functools.cache
def _peer_kernel():
  """topolosses' compiled Betti-Matching-3D module, loaded by file, or None.

  Importing it through its package would import torch and torchvision
  (``topolosses.losses``' ``__init__``); the extension needs neither. It is
  registered under its own name, so that ``BettiMatchingLoss`` (imported
  later by ``torch_reference``) reuses it: pybind11 refuses to load one
  extension twice.
  """
  if _PEER_NAME in sys.modules:
    return sys.modules[_PEER_NAME]
  spec = importlib.util.find_spec("topolosses")
  if spec is None:
    return None
  folder = (pathlib.Path(spec.origin).parent / "losses" / "betti_matching"
            / "src")
  found = sorted(folder.glob("betti_matching*.so"))
  if not found:
    return None
  loader = importlib.machinery.ExtensionFileLoader(_PEER_NAME, str(found[0]))
  module = importlib.util.module_from_spec(
      importlib.util.spec_from_loader(_PEER_NAME, loader))
  loader.exec_module(module)
  sys.modules[_PEER_NAME] = module
  return module


def _require_peer():
  peer = _peer_kernel()
  if peer is None:
    pytest.skip("topolosses is not installed (pip install -e '.[test]')")
  return peer


def _ours_by_dimension(f_pred, f_target):
  """Per dimension: matched voxel quadruples, unmatched pred and target
  voxel pairs, each sorted (multisets)."""
  pairs_p, pairs_t, matches = bm.betti_matching_pairs(f_pred, f_target)
  out = []
  for dim in range(f_pred.ndim):
    rows = [(a, b) for a, b in matches if pairs_p[a, 0] == dim]
    assert all(pairs_t[b, 0] == dim for _, b in rows)
    matched = [(*pairs_p[a, 1:], *pairs_t[b, 1:]) for a, b in rows]
    used_p = {a for a, _ in rows}
    used_t = {b for _, b in rows}
    out.append((
        matched,
        [tuple(pairs_p[i, 1:]) for i in range(len(pairs_p))
         if pairs_p[i, 0] == dim and i not in used_p],
        [tuple(pairs_t[i, 1:]) for i in range(len(pairs_t))
         if pairs_t[i, 0] == dim and i not in used_t]))
  return [tuple(sorted(tuple(map(int, t)) for t in s) for s in sets)
          for sets in out]


def _peer_by_dimension(peer, f_pred, f_target):
  result = peer.compute_matching([np.ascontiguousarray(f_pred, np.float64)],
                                 [np.ascontiguousarray(f_target,
                                                       np.float64)])[0]
  shape = f_pred.shape

  def flat(coordinates):
    coordinates = np.asarray(coordinates).reshape(-1, len(shape))
    return np.ravel_multi_index(tuple(coordinates.T), shape)

  out = []
  for dim in range(len(shape)):
    out.append((
        zip(*(flat(c) for c in (
            result.input1_matched_birth_coordinates[dim],
            result.input1_matched_death_coordinates[dim],
            result.input2_matched_birth_coordinates[dim],
            result.input2_matched_death_coordinates[dim]))),
        zip(flat(result.input1_unmatched_birth_coordinates[dim]),
            flat(result.input1_unmatched_death_coordinates[dim])),
        zip(flat(result.input2_unmatched_birth_coordinates[dim]),
            flat(result.input2_unmatched_death_coordinates[dim]))))
  return [tuple(sorted(tuple(map(int, t)) for t in s) for s in sets)
          for sets in out]


def _images(shape, seed, target_kind):
  rng = np.random.default_rng(seed)
  f_pred = rng.random(shape)
  if target_kind == "binary":
    f_target = (rng.random(shape) < 0.4).astype(np.float64)
  elif target_kind == "levels":  # Ties in the prediction too.
    f_pred = np.round(f_pred * 5) / 5
    f_target = np.round(rng.random(shape) * 3) / 3
  else:
    f_target = rng.random(shape)
  return f_pred, f_target


KERNEL_SHAPES = [(6, 7), (13, 11), (24, 17), (5, 4, 6), (7, 8, 9),
                 (11, 6, 9), (1, 6, 5), (16, 15, 14)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("target_kind", ["random", "binary", "levels"])
def test_pairs_equal_those_of_betti_matching_3d(shape, target_kind):
  # Tied values (a binary label, quantised images) included: the kernel
  # orders tied cells as the C++ does, so even their voxels agree. Compared
  # as multisets: two intervals can share their voxels.
  peer = _require_peer()
  f_pred, f_target = _images(shape, len(shape) * 7 + shape[0], target_kind)
  ours = _ours_by_dimension(f_pred, f_target)
  theirs = _peer_by_dimension(peer, f_pred, f_target)
  assert ours == theirs
  assert any(sets[0] for sets in ours) or target_kind == "binary"


# ---------------------------------------------------------------------------
# An independent slow reference: the whole boundary matrix of each dimension,
# reduced column by column, and the induced matchings by their definition.


def _cells(shape):
  """Cells of the V-construction by dimension: ``(corner, extent)`` pairs."""
  nd = len(shape)
  cells = {k: [] for k in range(nd + 1)}
  for corner in itertools.product(*map(range, shape)):
    for extent in itertools.product((0, 1), repeat=nd):
      if all(c + e < s for c, e, s in zip(corner, extent, shape)):
        cells[sum(extent)].append((corner, extent))
  return cells


def _vertices(cell):
  corner, extent = cell
  return list(itertools.product(*[(c, c + 1) if e else (c,)
                                  for c, e in zip(corner, extent)]))


def _tie_key(cell):
  """Betti-Matching-3D's order of tied cells: (x, y, z, type), where an
  edge's type is its axis and a 3D square's its normal axis."""
  corner, extent = cell
  k, nd = sum(extent), len(extent)
  if k == 1:
    kind = extent.index(1)
  elif k == 2 and nd == 3:
    kind = extent.index(0)
  else:
    kind = 0
  return (*corner, kind)


def _boundary(cell):
  corner, extent = cell
  faces = []
  for axis in range(len(extent)):
    if extent[axis]:
      face = tuple(e - (a == axis) for a, e in enumerate(extent))
      faces.append((corner, face))
      faces.append((tuple(c + (a == axis) for a, c in enumerate(corner)),
                     face))
  return faces


def _pivots(columns, rows, key_columns, key_rows):
  """``{column: pivot row}`` of the reduced boundary matrix (over Z/2)."""
  rows = sorted(rows, key=key_rows)
  position = {cell: i for i, cell in enumerate(rows)}
  reduced = {}
  out = {}
  for column in sorted(columns, key=key_columns):
    entries = {position[face] for face in _boundary(column)}
    while entries:
      low = max(entries)
      if low not in reduced:
        reduced[low] = entries
        out[column] = rows[low]
        break
      entries ^= reduced[low]
  return out


def _parent_voxel(f, cell, top_3d):
  """The vertex giving the cell its value; on ties the largest flat index,
  but the smallest for 3D cubes (Betti-Matching-3D's choice)."""
  flat = sorted(_vertices(cell), key=lambda v: np.ravel_multi_index(
      v, f.shape), reverse=not top_3d)
  best = max(f[v] for v in flat)
  return next(v for v in flat if f[v] == best)


def reference_matching(f_pred, f_target):
  """Per dimension: matched voxel quadruples, unmatched pred and target pairs,
  and each image's barcode values, from the definitions."""
  f_comp = np.minimum(f_pred, f_target)
  images = (f_pred, f_target, f_comp)
  nd = f_pred.ndim
  cells = _cells(f_pred.shape)
  value = lambda f, cell: max(f[v] for v in _vertices(cell))
  key = lambda f: (lambda cell: (value(f, cell), _tie_key(cell)))
  flat = lambda v: int(np.ravel_multi_index(v, f_pred.shape))
  out = []
  for dim in range(nd):
    rows, columns = cells[dim], cells[dim + 1]
    # Finite intervals of positive length: pivot pairs of each filtration.
    pairs = []
    for f in images:
      pivots = _pivots(columns, rows, key(f), key(f))
      pairs.append({birth: death for death, birth in pivots.items()
                    if value(f, birth) != value(f, death)})
    # Image barcodes: the comparison's columns, an input's row order.
    image = [_pivots(columns, rows, key(f_comp), key(f)) for f in images[:2]]
    matched = []
    used = (set(), set())
    for birth_c, death_c in pairs[2].items():
      births = [image[i].get(death_c) for i in range(2)]
      if all(b in pairs[i] for i, b in enumerate(births)):
        voxels = []
        for i, b in enumerate(births):
          used[i].add(b)
          voxels += [_parent_voxel(images[i], b, False),
                     _parent_voxel(images[i], pairs[i][b],
                                   dim + 1 == 3)]
        matched.append(tuple(map(flat, voxels)))
    unmatched = [
        sorted((flat(_parent_voxel(images[i], b, False)),
                flat(_parent_voxel(images[i], d, dim + 1 == 3)))
               for b, d in pairs[i].items() if b not in used[i])
        for i in range(2)]
    barcodes = [sorted((value(f, b), value(f, d)) for b, d in pairs[i].items())
                for i, f in enumerate(images[:2])]
    out.append((matched, *unmatched, barcodes))
  return out


def _reference_loss_and_grad(pred, target, start_channel):
  """Loss and d loss / d pred (superlevel) from :func:`reference_matching`."""
  f_pred, f_target = 1 - pred, 1 - target
  grad = np.zeros_like(pred)
  total = 0.0
  items = [(n, c) for n in range(pred.shape[0])
           for c in range(start_channel, pred.shape[-1])]
  for n, c in items:
    fp, ft = f_pred[n, ..., c], f_target[n, ..., c]
    g = np.zeros(fp.size)
    vp, vt = fp.ravel(), ft.ravel()
    for matched, un_p, un_t, _ in reference_matching(fp, ft):
      for pb, pd, tb, td in matched:
        total += 2 * ((vp[pb] - vt[tb])**2 + (vp[pd] - vt[td])**2)
        g[pb] += 4 * (vp[pb] - vt[tb])
        g[pd] += 4 * (vp[pd] - vt[td])
      for b, d in un_p:
        total += (vp[b] - vp[d])**2
        g[b] += 2 * (vp[b] - vp[d])
        g[d] -= 2 * (vp[b] - vp[d])
      for b, d in un_t:
        total += (vt[b] - vt[d])**2
    grad[n, ..., c] = -g.reshape(fp.shape) / len(items)  # f = 1 - p.
  return total / len(items), grad


@pytest.mark.parametrize("shape", [(6, 7), (5, 4, 6)], ids=str)
@pytest.mark.parametrize("target_kind", ["random", "binary"])
def test_kernel_equals_the_definition_and_cripser(shape, target_kind):
  import cripser

  f_pred, f_target = _images(shape, 11, target_kind)
  reference = reference_matching(f_pred, f_target)
  ours = _ours_by_dimension(f_pred, f_target)
  assert [(sorted(r[0]), *r[1:3]) for r in reference] == ours
  assert any(r[0] for r in reference)  # Something is matched.
  for i, f in enumerate((f_pred, f_target)):
    table = cripser.computePH(f, maxdim=f.ndim - 1)
    table = table[(table[:, 2] < 1e300) & (table[:, 1] != table[:, 2])]
    for dim, r in enumerate(reference):
      assert sorted(map(tuple, table[table[:, 0] == dim][:, 1:3])) == r[3][i]


@pytest.mark.parametrize("shape", [(2, 6, 7, 1), (1, 5, 4, 6, 2)], ids=str)
def test_loss_and_gradient_equal_the_reference_float64(shape):
  rng = np.random.default_rng(5)
  pred = rng.random(shape)
  target = (rng.random(shape) < 0.4).astype(np.float64)
  start = 0 if shape[-1] == 1 else 1
  expected, expected_grad = _reference_loss_and_grad(pred, target, start)
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(bm.betti_matching_loss)(pred, target)
    assert value.dtype == jnp.float64
  np.testing.assert_allclose(float(value), expected, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-12 * np.abs(expected_grad).max())
  assert np.count_nonzero(expected_grad) > 0


# ---------------------------------------------------------------------------
# The loss against topolosses' BettiMatchingLoss.

LOSS_CASES = {
    # name: (channels-last shape, loss keyword arguments)
    "2d_1ch": ((2, 14, 13, 1), {}),
    "2d_3ch_odd": ((1, 11, 17, 3), {}),
    "2d_sublevel": ((2, 12, 9, 1), dict(filtration="sublevel")),
    "3d_1ch": ((2, 9, 8, 10, 1), {}),
    "3d_3ch": ((1, 7, 9, 6, 3), {}),
    "3d_noncubic": ((1, 13, 5, 8, 1), {}),
    "3d_bothlevels": ((1, 8, 7, 9, 1), dict(filtration="bothlevels")),
    "3d_push": ((1, 7, 8, 6, 2), dict(push_unmatched_to_1_0=True)),
}


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_loss_matches_topolosses_float32(name):
  torch = pytest.importorskip("torch", reason="the parity tests need PyTorch")
  import torch_reference

  peer_class = torch_reference.topolosses_class("BettiMatchingLoss")
  if peer_class is None:
    pytest.skip("topolosses is not installed (pip install -e '.[test]')")
  shape, kwargs = LOSS_CASES[name]
  rng = np.random.default_rng(len(name))
  pred = rng.random(shape).astype(np.float32)
  target = (rng.random(shape) < 0.4).astype(np.float32)
  peer = peer_class(
      use_base_loss=False, alpha=1.0,
      filtration_type=kwargs.get("filtration", "superlevel"),
      push_unmatched_to_1_0=kwargs.get("push_unmatched_to_1_0", False))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # "Single-channel ..."
    # It warns of its own channel slices, which it copies.
    warnings.filterwarnings("ignore", "WARNING! Non-contiguous",
                            RuntimeWarning)
    expected, expected_grad = torch_reference.value_and_grad(
        peer, pred, target, dtype=torch.float32)
  value, grad = jax.value_and_grad(functools.partial(
      bm.betti_matching_loss, **kwargs))(pred, target)
  # The same float32 values gathered at the same voxels; only the order of
  # the float32 sums differs.
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0,
                             atol=1e-5 * np.abs(expected_grad).max())
  assert np.count_nonzero(expected_grad) > 0


# ---------------------------------------------------------------------------
# The loss as a JAX function.


def _case(shape, seed):
  rng = np.random.default_rng(seed)
  pred = rng.random(shape).astype(np.float32)
  target = (rng.random(shape) < 0.4).astype(np.float32)
  return pred, target


def test_serial_and_parallel_hosts_agree_bit_for_bit():
  pred, target = _case((3, 9, 8, 7, 2), seed=1)
  results = [jax.value_and_grad(functools.partial(
      bm.betti_matching_loss, start_channel=0, num_workers=workers))(
          pred, target) for workers in (1, 2)]
  (v1, g1), (v2, g2) = results
  assert float(v1) == float(v2)
  np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))


def test_jit_vmap_and_grad():
  pred, target = _case((2, 8, 9, 7, 1), seed=3)
  value = bm.betti_matching_loss(pred, target)
  np.testing.assert_allclose(jax.jit(bm.betti_matching_loss)(pred, target),
                             value, rtol=1e-6)
  per_sample = jax.vmap(lambda p, t: bm.betti_matching_loss(
      p[None], t[None]))(pred, target)
  np.testing.assert_allclose(per_sample.mean(), value, rtol=1e-6)
  grad = jax.jit(jax.grad(bm.betti_matching_loss))(pred, target)
  assert grad.shape == pred.shape and np.isfinite(grad).all()
  assert np.count_nonzero(grad) > 0
  assert bm.betti_matching_loss(jnp.asarray(pred, jnp.bfloat16),
                                target).dtype == jnp.float32


def test_per_device_inside_shard_map():
  # As topojax.train's step uses it: each device its own cases, then pmean.
  devices = jax.devices("cpu")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  pred, target = _case((2 * len(devices), 7, 6, 8, 1), seed=6)
  loss = jax.shard_map(
      lambda p, t: jax.lax.pmean(bm.betti_matching_loss(p, t), "data"),
      mesh=mesh, in_specs=(jax.P("data"), jax.P("data")), out_specs=jax.P())
  value, grad = jax.jit(jax.value_and_grad(loss))(pred, target)
  expected, expected_grad = jax.value_and_grad(bm.betti_matching_loss)(
      pred, target)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)


def test_identical_masks_give_zero_and_an_empty_label_is_finite():
  ring = np.zeros((1, 12, 12, 1), np.float32)
  ring[0, 2:10, 2:10, 0] = 1
  ring[0, 4:8, 4:8, 0] = 0
  assert float(bm.betti_matching_loss(ring, ring)) == 0
  pred, _ = _case((1, 7, 8, 6, 1), seed=4)
  empty = np.zeros_like(pred)
  value, grad = jax.value_and_grad(bm.betti_matching_loss)(pred, empty)
  assert np.isfinite(float(value)) and float(value) > 0
  assert np.isfinite(grad).all()


def test_nan_gives_nan():
  pred, target = _case((1, 6, 7, 1), seed=4)
  pred[0, 2, 3, 0] = np.nan
  assert np.isnan(float(bm.betti_matching_loss(pred, target)))


BAD_INPUTS = {
    "rank 3": (dict(pred=(4, 16, 1)), "rank 3"),
    "shape mismatch": (dict(target=(1, 8, 8, 7, 1)), "same shape"),
    "integer pred": (dict(pred_dtype=np.int32), "pred must be a floating"),
    "empty batch": (dict(pred=(0, 8, 8, 8, 1)), "at least one sample"),
    "start_channel too large": (dict(start_channel=2), "start_channel"),
    "unknown filtration": (dict(filtration="upper"), "filtration"),
    "push not a bool": (dict(push_unmatched_to_1_0=1),
                        "push_unmatched_to_1_0"),
    "num_workers zero": (dict(num_workers=0), "num_workers"),
    "num_workers float": (dict(num_workers=2.0), "num_workers"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_tracing(name):
  spec, message = BAD_INPUTS[name]
  loss_inputs.assert_refused_before_tracing(
      bm.betti_matching_loss, bm._betti_matching_loss, spec, message)


def test_runs_without_torch_or_topolosses():
  code = (
      "import sys\n"
      "import numpy as np\n"
      "import topojax\n"
      "rng = np.random.default_rng(0)\n"
      "pred = rng.random((1, 6, 7, 5, 1)).astype(np.float32)\n"
      "value = topojax.betti_matching_loss(pred, (pred > 0.5) * 1.0)\n"
      "assert np.isfinite(float(value)), value\n"
      "loaded = [m for m in sys.modules\n"
      "          if m.split('.')[0] in ('torch', 'topolosses')]\n"
      "assert not loaded, loaded\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr


def test_import_topojax_does_not_load_numba():
  code = ("import sys, topojax\n"
          "topojax.betti_matching_loss\n"
          "assert 'numba' not in sys.modules\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
