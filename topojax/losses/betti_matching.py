r"""Betti matching (Stucki et al., ICML 2023; 3D 2024), as topolosses has it.

Stucki, Paetzold, Shit, Menze, Bauer, "Topologically Faithful Image
Segmentation via Induced Matching of Persistence Barcodes", ICML 2023; and
Stucki, Bürgin, Berger, Menze, Bauer, Paetzold, "Efficient Betti Matching
Enables Topology-Aware 3D Segmentation via Persistent Homology", 2024 (the
3D algorithm). Computed as ``topolosses`` 0.2.0's ``BettiMatchingLoss(
use_base_loss=False)`` computes it with its defaults.

Hu et al.'s loss (:mod:`~topojax.losses.persistent_homology`) matches the
prediction's persistence diagram to the label's by values alone, so a
component of the prediction can be matched to one far away in the label.
Betti matching matches features that sit at the same place: with
:math:`f_P`, :math:`f_G` the filtrations of prediction and label (sublevel
sets of :math:`f = 1 - p`, i.e. superlevel sets of :math:`p`; voxels are the
vertices of the cubical complex, so the foreground is 6-connected in 3D and
4-connected in 2D) and :math:`f_C = \min(f_P, f_G)` their comparison image,
every sublevel set of either is contained in the one of :math:`f_C`. These
inclusions induce matchings of barcodes (Bauer and Lesnick): an interval of
the prediction is matched to one of the comparison if the image of its
class (the image barcode) is born with it and dies with the comparison's
interval. A prediction interval and a label interval are *Betti-matched* if
they are matched to the same comparison interval. Per sample, channel and
homology dimension :math:`k` (0 components, 1 tunnels or loops, 2
cavities), with :math:`(b, d)` the values of :math:`f` at the voxels that
give an interval its birth and death:

.. math::
  L_k = 2 \sum_{(p, g) \text{ matched}}
        \big((b_p - b_g)^2 + (d_p - d_g)^2\big)
      + \sum_{p \text{ unmatched}} (b_p - d_p)^2
      + \sum_{g \text{ unmatched}} (b_g - d_g)^2,

summed over :math:`k` and averaged over samples and channels. With
``push_unmatched_to_1_0`` an unmatched interval instead costs
:math:`2((b - 1)^2 + d^2)`, pulling it to the corner of the diagram.
Essential classes (those that never die) are left out, as in ``topolosses``.

The host work (barcodes, image barcodes, matching) is topojax's own kernel
(:mod:`topojax.losses._betti_kernel`), compiled with numba: union-find for
dimension 0 and, on the dual complex, for the top dimension; a column
reduction with clearing and emergent pairs for dimension 1 in 3D; image
persistence for the induced matchings. It pairs tied cells in the order the
C++ of Betti-Matching-3D (what ``topolosses`` calls) does, so on a binary
label, all ties, the matching is the same (checked in the tests).

Why numba and not a C++ extension: measured on this project's 2-core CPU
(blurred, noisy predictions of a ball, ``make_inputs`` of
``benchmarks/loss.py``; one run, calls alternating), the numba kernel
already beats ``topolosses``' C++ (``betti_matching.compute_matching``, one
item): 2.7×, 2.2× and 2.2× faster at 32³, 64³ and 96³ (27 ms, 0.32 s and
1.5 s) with the C++ free to run its dimension-1 barcodes on both cores
(the machine was shared, load 1.5-2.3), 2.7×, 2.3× and 2.2× with both
pinned to one core; and it peaks at about 400 bytes per voxel against 1.3
kB. So the package keeps its setuptools build, needs no compiler at
install, and wheels stay pure Python; numba caches the compiled code on
disk (``cache=True``), so only the first call on a machine compiles (about
10 s), and it is imported on first use, so ``import topojax`` stays light.

The host work runs through one ``jax.pure_callback`` per call, which returns,
per sample and channel, the birth and death voxels of every matched and
unmatched interval; the cost is a gather in JAX, so the gradient flows into
exactly those voxels and the loss works under ``jax.jit``, ``jax.grad`` and
``jax.vmap``, and per device inside ``jax.shard_map`` (as in
``topojax.train``). Samples × channels are computed on ``num_workers``
threads (the kernel releases the GIL), with the serial result bit for bit.
Where the prediction has tied values, the voxel that gives a birth or death
is the one Betti-Matching-3D picks, so the gradients agree too.

Shapes are channels-last: 3D ``(N, X, Y, Z, C)``, 2D ``(N, X, Y, C)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from topojax.losses import _checks
from topojax.losses import _host

FILTRATIONS = ("superlevel", "sublevel", "bothlevels")
# Row kinds of the table returned by the host.
_PADDING, _MATCHED, _PRED_UNMATCHED, _TARGET_UNMATCHED = 0, 1, 2, 3


def betti_matching_pairs(f_pred: np.ndarray, f_target: np.ndarray):
  """The Betti matching of the sublevel filtrations of two images.

  Args:
    f_pred, f_target: 2D ``(X, Y)`` or 3D ``(X, Y, Z)`` arrays of one shape,
      without NaN; voxels are the vertices of the cubical complex.

  Returns:
    ``(pairs_pred, pairs_target, matches)``: ``(P, 3)`` int32 rows
    ``(dimension, birth voxel, death voxel)`` of every finite interval of
    positive length of each image, voxels as flat C-order indices; and
    ``(M, 2)`` int32 rows of matched indices into the two pair lists.
  """
  from topojax.losses import _betti_kernel  # numba: loaded on first use.

  f_pred = np.asarray(f_pred)
  rank = f_pred.ndim
  if rank not in (2, 3) or np.shape(f_target) != f_pred.shape:
    raise ValueError(f"f_pred and f_target must be 2D or 3D arrays of one "
                     f"shape, got {f_pred.shape} and {np.shape(f_target)}")
  shape = np.array(f_pred.shape + (1,) * (3 - rank), np.int64)
  f_pred = np.ascontiguousarray(f_pred, np.float64).ravel()
  f_target = np.ascontiguousarray(f_target, np.float64).ravel()
  f_comp = np.minimum(f_pred, f_target)
  # NumPy's quicksort (vectorised, GIL released) is far faster than numba's
  # sorts; the kernel orders ties itself.
  orders = np.stack([np.argsort(f, kind="quicksort")
                     for f in (f_pred, f_target, f_comp)])
  return _betti_kernel.match_item(f_pred, f_target, f_comp, orders, shape,
                                  rank)


def _matching_table(f_pred: np.ndarray, f_target: np.ndarray, rows: int):
  """One sample and channel's matching as voxel indices, padded to ``rows``.

  Returns:
    ``(pred_voxels, target_voxels, kind)``: ``(rows, 2)`` int32 birth and
    death voxels of the prediction's and the target's interval of each row
    (0 where the row has none), ``(rows,)`` int8 row kinds. Rows hold the
    matched pairs, then the prediction's unmatched intervals, then the
    target's.
  """
  pred_voxels = np.zeros((rows, 2), np.int32)
  target_voxels = np.zeros((rows, 2), np.int32)
  kind = np.zeros(rows, np.int8)
  if np.isnan(f_pred).any() or np.isnan(f_target).any():
    return pred_voxels, target_voxels, kind  # The loss is NaN anyway.
  pairs_pred, pairs_target, matches = betti_matching_pairs(f_pred, f_target)
  unmatched_pred = np.ones(len(pairs_pred), bool)
  unmatched_pred[matches[:, 0]] = False
  unmatched_target = np.ones(len(pairs_target), bool)
  unmatched_target[matches[:, 1]] = False
  counts = (len(matches), int(unmatched_pred.sum()),
            int(unmatched_target.sum()))
  if sum(counts) > rows:
    raise RuntimeError(
        f"betti_matching_loss: {sum(counts)} matched and unmatched intervals "
        f"in one sample and channel, more than its {rows} voxels; the "
        "prediction is noisier than white noise")
  m, u, v = counts
  pred_voxels[:m] = pairs_pred[matches[:, 0], 1:]
  target_voxels[:m] = pairs_target[matches[:, 1], 1:]
  pred_voxels[m:m + u] = pairs_pred[unmatched_pred, 1:]
  target_voxels[m + u:m + u + v] = pairs_target[unmatched_target, 1:]
  kind[:m] = _MATCHED
  kind[m:m + u] = _PRED_UNMATCHED
  kind[m + u:m + u + v] = _TARGET_UNMATCHED
  return pred_voxels, target_voxels, kind


def _host_tables(f_pred: np.ndarray, f_target: np.ndarray, *,
                 spatial_rank: int, num_workers: int):
  """:func:`_matching_table` of every ``(..., *spatial)`` item, stacked.

  The leading axes are filtrations, samples and channels, and, under
  ``jax.vmap``, the mapped axes in front of them. The kernel releases the
  GIL, so the items run on ``num_workers`` threads, in item order.
  """
  from topojax.losses import _betti_kernel  # noqa: F401  Loaded here, once.

  f_pred, f_target = np.asarray(f_pred), np.asarray(f_target)
  spatial = f_pred.shape[-spatial_rank:]
  lead = f_pred.shape[:-spatial_rank]
  rows = int(np.prod(spatial))
  items = list(zip(f_pred.reshape(-1, *spatial),
                   f_target.reshape(-1, *spatial)))
  tables = _host.map_items(functools.partial(_matching_table, rows=rows),
                           items, num_workers=num_workers)
  pred_voxels, target_voxels, kind = (np.stack(parts) for parts in
                                      zip(*tables))
  return (pred_voxels.reshape(*lead, rows, 2),
          target_voxels.reshape(*lead, rows, 2), kind.reshape(*lead, rows))


@functools.partial(jax.jit, static_argnames=(
    "start_channel", "filtration", "push_unmatched_to_1_0", "num_workers"))
def _betti_matching_loss(pred, target, *, start_channel, filtration,
                         push_unmatched_to_1_0, num_workers):
  dtype = _checks.compute_dtype(pred.dtype)
  # (N, C', *spatial): each sample and channel is one item.
  p = jnp.moveaxis(pred[..., start_channel:].astype(dtype), -1, 1)
  g = jnp.moveaxis(target[..., start_channel:].astype(dtype), -1, 1)
  # (L, N, C', *spatial), one L per filtration; sublevel sets of 1 - p are
  # the superlevel sets of p.
  if filtration == "superlevel":
    f_pred, f_target = (1 - p)[None], (1 - g)[None]
  elif filtration == "sublevel":
    f_pred, f_target = p[None], g[None]
  else:
    f_pred, f_target = jnp.stack([p, 1 - p]), jnp.stack([g, 1 - g])
  pred_points, target_points, kind = _host.gathered_pairs(
      functools.partial(_host_tables, spatial_rank=pred.ndim - 2,
                        num_workers=num_workers),
      f_pred, f_target, lead_ndim=3)
  matched = 2 * jnp.sum((pred_points - target_points)**2, axis=-1)
  if push_unmatched_to_1_0:
    unmatched = lambda pts: 2 * ((pts[..., 0] - 1)**2 + pts[..., 1]**2)
  else:
    unmatched = lambda pts: (pts[..., 0] - pts[..., 1])**2
  # topolosses drops unmatched prediction intervals of length 0 (its
  # barcode_length_threshold); the kernel reports none, so nothing to drop.
  cost = jnp.select(
      [kind == _MATCHED, kind == _PRED_UNMATCHED, kind == _TARGET_UNMATCHED],
      [matched, unmatched(pred_points), unmatched(target_points)], 0)
  loss = jnp.mean(jnp.sum(cost, axis=-1))
  # The host cannot order NaN; the loss says so instead of guessing.
  return jnp.where(jnp.isnan(f_pred).any() | jnp.isnan(f_target).any(),
                   jnp.nan, loss)


def betti_matching_loss(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    filtration: str = "superlevel",
    push_unmatched_to_1_0: bool = False,
    start_channel: int | None = None,
    num_workers: int | None = None,
) -> jax.Array:
  r"""The Betti matching loss of Stucki et al. (ICML 2023, 3D 2024).

  :math:`L = \frac{1}{N C'} \sum_{n, c} \sum_k L_k` with :math:`L_k` the
  cost of the module docstring, in squared probability units; equal to
  ``topolosses``' ``BettiMatchingLoss(use_base_loss=False)`` with the same
  ``filtration_type`` and ``push_unmatched_to_1_0`` (``topolosses``
  computes in float32 whatever the input; topojax in ``pred``'s precision).
  The gradient reaches only the voxels that give a matched or unmatched
  interval its birth or death.

  Cost: the kernel runs on the host, one sample and channel per thread, and
  grows faster than the volume, with the prediction's critical points:
  measured on this project's 2-core CPU, forward + backward for one
  blurred, noisy prediction of a ball took 28 ms at 32³, 0.33 s at 64³ and
  1.6 s at 96³, nearly all of it the host kernel (``topolosses``' kernel
  alone: 0.07, 0.7 and 3.4 s on that loaded machine); a batch costs the sum
  of its items over ``num_workers`` cores, and the host needs about 400
  bytes per voxel per thread. The white-noise prediction of an untrained network is slower.

  Args:
    pred: probabilities in [0, 1], channels-last ``(N, X, Y, Z, C)`` or
      ``(N, X, Y, C)``; any floating dtype (half precision is computed in
      float32). NaN anywhere gives a NaN loss.
    target: ground truth of the same shape, binary or one-hot (or soft);
      any numeric or boolean dtype. A label without foreground is fine.
    filtration: ``"superlevel"`` (features appear as the probability
      falls: components are foreground), ``"sublevel"`` (as it rises) or
      ``"bothlevels"`` (both, each a separate item of the mean).
    push_unmatched_to_1_0: unmatched intervals cost :math:`2((b - 1)^2 +
      d^2)` instead of :math:`(b - d)^2`.
    start_channel: first channel that enters the loss. ``None`` means 0 for
      a single channel and 1 otherwise (skip the background of a softmax /
      one-hot output).
    num_workers: host threads that compute the items concurrently; ``None``
      means every core this process may use. Any value gives the same loss
      and gradient, bit for bit.

  Returns:
    A non-negative scalar, float32 for half precision ``pred`` and
    ``pred.dtype`` otherwise.

  Raises:
    ValueError: before tracing, for a rank other than 4 or 5, an empty axis,
      mismatched shapes, non-floating ``pred``, ``start_channel`` outside
      ``[0, C)``, an unknown ``filtration``, a non-bool
      ``push_unmatched_to_1_0`` or ``num_workers`` not a positive int or
      ``None``.
  """
  pred = _checks.as_array(pred, "pred")
  target = _checks.as_array(target, "target")
  _checks.check_pair(pred, target)
  start_channel = _checks.start_channel_of(start_channel, np.shape(pred)[-1])
  if not isinstance(filtration, str) or filtration not in FILTRATIONS:
    raise ValueError(f"filtration must be one of {FILTRATIONS}, got "
                     f"{filtration!r}")
  if not isinstance(push_unmatched_to_1_0, (bool, np.bool_)):
    raise ValueError(f"push_unmatched_to_1_0 must be a bool, got "
                     f"{push_unmatched_to_1_0!r}")
  num_workers = _host.worker_count(num_workers)
  return _betti_matching_loss(
      jnp.asarray(pred), jnp.asarray(target), start_channel=start_channel,
      filtration=filtration,
      push_unmatched_to_1_0=bool(push_unmatched_to_1_0),
      num_workers=num_workers)
