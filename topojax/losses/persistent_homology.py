"""A persistent-homology loss: Hu et al. (NeurIPS 2019), as topolosses has it.

Hu, Li, Samaras, Chen, "Topology-Preserving Deep Image Segmentation",
NeurIPS 2019, §3; computed as ``topolosses`` 0.2.0's
``HutopoLoss(use_base_loss=False, alpha=1)`` computes it.

Thresholding a probability map at every level from 1 down to 0 (a superlevel
filtration) makes components, tunnels and cavities appear and disappear;
each is a point (birth, death) of a persistence diagram, and a long-lived
one is a real structure, a short-lived one noise. The loss matches the
diagram of the prediction to the diagram of the label and pulls matched
points together and unmatched points to the diagonal (so that the feature
vanishes), through the two voxels whose values are each point's birth and
death:

1. per sample, channel and homology dimension (0 components, 1 tunnels,
   2 cavities in 3D), the cubical persistence of :math:`f = 1 - p`
   (sublevel sets of ``f`` are superlevel sets of ``p``; voxels are the
   vertices of the cubical complex, so the foreground is 6-connected in 3D
   and 4-connected in 2D), with the voxel that gives each point its birth
   and the one that gives its death. ``cripser`` (CubicalRipser, Kaji et
   al.) computes it: it reports those voxels, it is a maintained C++
   library with Python wheels, and its diagrams are those of the Betti-
   matching code that ``topolosses`` calls (checked in the tests);
2. the optimal 2-Wasserstein matching between the two diagrams (order 2,
   Euclidean ground metric), from ``gudhi.wasserstein`` (on POT), the
   function ``topolosses`` calls, so ties in the matching break alike;
3. the cost: a matched pair costs
   :math:`(b_P - b_G)^2 + (d_P - d_G)^2`, an unmatched point
   :math:`(b - d)^2 / 2`, its squared distance to the diagonal; summed over
   the points and dimensions, then averaged over samples and channels.

Like ``topolosses``, the essential classes (those that never die, such as
the last component of every non-empty filtration) are left out, so the loss
alone cannot tell one object from none: it is meant to be added to a Dice
term (:func:`topojax.with_dice_loss`).

Steps 1 and 2 run on the host through ``jax.pure_callback``, on
``num_workers`` threads (both libraries release the GIL), and return, per
sample and channel, the voxel indices of every matched or unmatched point;
step 3 is a gather in JAX, so the gradient flows into exactly those voxels
and the loss works under ``jax.jit``, ``jax.grad``, ``jax.jvp`` and
``jax.vmap``. Under a data-parallel ``jax.jit`` the callback sees the
whole batch on one device; inside ``jax.shard_map`` (as in
``topojax.train``) each device computes the diagrams of its own samples.
Where the prediction has tied values, which voxel gives a birth or death
is the library's choice, so gradients match ``topolosses`` exactly only
for tie-free predictions (the values still agree).

Shapes are channels-last: 3D ``(N, X, Y, Z, C)``, 2D ``(N, X, Y, C)``.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from topojax.losses import _checks
from topojax.losses import _host

# Row kinds of the matching table returned by the host.
_PADDING, _MATCHED, _PRED_TO_DIAGONAL, _TARGET_TO_DIAGONAL = 0, 1, 2, 3
# cripser reports an essential class's death as DBL_MAX.
_ESSENTIAL = 1e300


def _persistence_pairs(f: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """The finite persistence pairs of the sublevel filtration of ``f``.

  Args:
    f: a 2D ``(X, Y)`` or 3D ``(X, Y, Z)`` array; voxels are the vertices
      of the cubical complex (CubicalRipser's V-construction).

  Returns:
    One ``(values, voxels)`` per homology dimension ``0 .. f.ndim - 1``:
    ``values`` ``(P, 2)`` float64 births and deaths, ``voxels`` ``(P, 2)``
    int64 flat (C-order) indices into ``f`` of the voxels whose values they
    are. Essential classes (infinite death) are left out.
  """
  import cripser  # A host library: loaded when a diagram is first needed.

  f = np.ascontiguousarray(f, dtype=np.float64)
  rank = f.ndim
  table = cripser.computePH(f, maxdim=rank - 1)
  table = table[table[:, 2] < _ESSENTIAL]
  # Columns: dim, birth, death, birth voxel (x, y, z), death voxel (x, y, z);
  # z is 0 for a 2D array.
  births = np.ravel_multi_index(
      tuple(table[:, 3 + a].astype(np.int64) for a in range(rank)), f.shape)
  deaths = np.ravel_multi_index(
      tuple(table[:, 6 + a].astype(np.int64) for a in range(rank)), f.shape)
  out = []
  for dim in range(rank):
    rows = table[:, 0] == dim
    out.append((table[rows, 1:3], np.stack([births[rows], deaths[rows]], 1)))
  return out


def _match(pred_values: np.ndarray, target_values: np.ndarray) -> np.ndarray:
  """``(M, 2)`` index pairs of the optimal matching; -1 is the diagonal."""
  from gudhi import wasserstein

  if not len(pred_values) and not len(target_values):
    return np.zeros((0, 2), np.int64)
  # gudhi 3.13 trips a NumPy 2 deprecation of its own; _host_matchings
  # silences it once around all items (catch_warnings is not thread-safe).
  _, matching = wasserstein.wasserstein_distance(
      pred_values, target_values, matching=True, order=2, internal_p=2,
      keep_essential_parts=False)
  return np.asarray(matching, np.int64).reshape(-1, 2)


def _matching_table(pred_pairs, target_pairs, out) -> None:
  """One sample and channel's matching, as voxel indices, written to ``out``.

  Args:
    pred_pairs, target_pairs: :func:`_persistence_pairs` of the prediction
      and the target.
    out: ``(pred_voxels, target_voxels, kind)``, zeroed: ``(rows, 2)`` int32
      birth and death voxels of the prediction's and the target's point of
      each row (left 0 where the row has none), ``(rows,)`` int8 row kinds.
  """
  pred_voxels, target_voxels, kind = out
  rows = len(kind)
  used = 0
  for (p_values, p_voxels), (t_values, t_voxels) in zip(pred_pairs,
                                                        target_pairs):
    matching = _match(p_values, t_values)
    count = len(matching)
    if used + count > rows:
      raise RuntimeError(
          f"hutopo_loss: {used + count} matched and unmatched persistence "
          f"pairs in one sample and channel, more than its {rows} voxels; "
          "the prediction is noisier than white noise (about 0.4 pairs per "
          "voxel)")
    i, j = matching[:, 0], matching[:, 1]
    here = slice(used, used + count)
    kind[here] = np.where(
        (i >= 0) & (j >= 0), _MATCHED,
        np.where(i >= 0, _PRED_TO_DIAGONAL, _TARGET_TO_DIAGONAL))
    pred_voxels[here][i >= 0] = p_voxels[i[i >= 0]]
    target_voxels[here][j >= 0] = t_voxels[j[j >= 0]]
    used += count


def _host_matchings(f_pred: np.ndarray, f_target: np.ndarray, *,
                    spatial_rank: int, num_workers: int):
  """:func:`_matching_table` of every ``(..., *spatial)`` item, stacked.

  The leading axes are samples and channels, and, under ``jax.vmap``, the
  mapped axes in front of them. The work runs on up to ``num_workers``
  threads, in two rounds: the diagrams of every prediction and target (two
  tasks per item, so that even one sample and channel uses two cores), then
  the matchings. cripser's ``computePH`` and POT's network simplex (behind
  ``gudhi.wasserstein``) release the GIL, so threads use the cores without
  the start-up and copying of worker processes; results come back in task
  order and each item writes its own rows, so any ``num_workers`` gives the
  serial answer bit for bit.
  """
  import cripser  # noqa: F401  Imported once here, not raced by the workers.
  from gudhi import wasserstein  # noqa: F401

  f_pred, f_target = np.asarray(f_pred), np.asarray(f_target)
  spatial = f_pred.shape[-spatial_rank:]
  lead = f_pred.shape[:-spatial_rank]
  rows = int(np.prod(spatial))
  count = int(np.prod(lead))
  filtrations = [(f,) for pair in zip(f_pred.reshape(-1, *spatial),
                                      f_target.reshape(-1, *spatial))
                 for f in pair]
  pred_voxels = np.zeros((count, rows, 2), np.int32)
  target_voxels = np.zeros((count, rows, 2), np.int32)
  kind = np.zeros((count, rows), np.int8)
  with warnings.catch_warnings():
    # See _match; set here, in the calling thread, for all the workers.
    warnings.filterwarnings("ignore", "__array_wrap__",
                            category=DeprecationWarning)
    pairs = _host.map_items(_persistence_pairs, filtrations,
                            num_workers=num_workers)
    _host.map_items(
        _matching_table,
        [(pairs[2 * k], pairs[2 * k + 1],
          (pred_voxels[k], target_voxels[k], kind[k])) for k in range(count)],
        num_workers=num_workers)
  return (pred_voxels.reshape(*lead, rows, 2),
          target_voxels.reshape(*lead, rows, 2), kind.reshape(*lead, rows))


@functools.partial(jax.jit, static_argnames=("start_channel", "num_workers"))
def _hutopo_loss(pred, target, *, start_channel, num_workers):
  dtype = _checks.compute_dtype(pred.dtype)
  # (N, C', *spatial): each sample and channel is one filtration.
  f_pred = jnp.moveaxis(1 - pred[..., start_channel:].astype(dtype), -1, 1)
  f_target = jnp.moveaxis(1 - target[..., start_channel:].astype(dtype), -1,
                          1)
  pred_points, target_points, kind = _host.gathered_pairs(
      functools.partial(_host_matchings, spatial_rank=pred.ndim - 2,
                        num_workers=num_workers),
      f_pred, f_target, lead_ndim=2)
  matched = jnp.sum((pred_points - target_points)**2, axis=-1)
  to_diagonal = lambda points: (points[..., 0] - points[..., 1])**2 / 2
  cost = jnp.select(
      [kind == _MATCHED, kind == _PRED_TO_DIAGONAL,
       kind == _TARGET_TO_DIAGONAL],
      [matched, to_diagonal(pred_points), to_diagonal(target_points)], 0)
  loss = jnp.mean(jnp.sum(cost, axis=-1))
  # The host cannot order NaN; the loss says so instead of guessing.
  return jnp.where(jnp.isnan(f_pred).any(), jnp.nan, loss)


def hutopo_loss(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    start_channel: int | None = None,
    num_workers: int | None = None,
) -> jax.Array:
  r"""The persistent-homology loss of Hu et al. (NeurIPS 2019).

  With :math:`D_P^k`, :math:`D_G^k` the finite persistence diagrams of
  dimension :math:`k` of the superlevel filtrations of prediction and target
  and :math:`\gamma^k` their optimal 2-Wasserstein matching:

  .. math::
    L = \frac{1}{N C'} \sum_{n, c} \sum_k \Big(
        \sum_{(p, g) \in \gamma^k} \lVert p - g \rVert^2
        + \sum_{p \text{ unmatched}} \tfrac{(b_p - d_p)^2}{2}
        + \sum_{g \text{ unmatched}} \tfrac{(b_g - d_g)^2}{2} \Big)

  in squared probability units; equal to ``topolosses``' ``HutopoLoss(
  use_base_loss=False, alpha=1)`` (see the module docstring for how and
  where it differs). The gradient reaches only the voxels that give a birth
  or a death, as in the paper.

  Cost: the diagrams and the matching run on the host and grow faster than
  the volume, with the number of critical points of the prediction:
  measured on this project's 2-core CPU (``python -m benchmarks.loss``,
  ``benchmarks/RESULTS.md``, before the host work ran in parallel), forward
  + backward of one blurred, noisy prediction took 51 ms at 32³, 0.58 s at
  64³, 2.0 s at 96³ and 6.2 s at 128³ (the projected pooling loss: 0.7,
  2.8, 4.2 and 10.5 ms), one sample and channel after another. The
  diagrams of every prediction and target, then the matchings, now run on
  ``num_workers`` threads: measured side by side against the serial code
  with both cores nearly free (CPU pressure about 3 %), forward +
  backward of a 4×32³ batch took 53 ms instead of 93 ms (1.76×) and of a
  2×96³ batch 1.29 s instead of 2.43 s (1.88×); ``benchmarks/RESULTS.md``
  is to be remeasured. On a machine whose cores are busy with other work
  the gain shrinks to nothing. The white-noise prediction of an untrained
  network is slower still.

  Args:
    pred: probabilities in [0, 1], channels-last ``(N, X, Y, Z, C)`` or
      ``(N, X, Y, C)``; any floating dtype (half precision is computed in
      float32). NaN anywhere gives a NaN loss.
    target: ground truth of the same shape, binary or one-hot (or soft);
      any numeric or boolean dtype.
    start_channel: first channel that enters the loss. ``None`` means 0 for
      a single channel and 1 otherwise (skip the background of a softmax /
      one-hot output).
    num_workers: host threads that compute the samples × channels
      diagrams and matchings concurrently; ``None`` means every core this
      process may use. Any value gives the same loss and gradient, bit for
      bit.

  Returns:
    A non-negative scalar, float32 for half precision ``pred`` and
    ``pred.dtype`` otherwise.

  Raises:
    ValueError: before tracing, for a rank other than 4 or 5, an empty axis,
      mismatched shapes, non-floating ``pred``, ``start_channel`` outside
      ``[0, C)`` or ``num_workers`` not a positive int or ``None``.
  """
  pred = _checks.as_array(pred, "pred")
  target = _checks.as_array(target, "target")
  _checks.check_pair(pred, target)
  start_channel = _checks.start_channel_of(start_channel, np.shape(pred)[-1])
  num_workers = _host.worker_count(num_workers)
  return _hutopo_loss(jnp.asarray(pred), jnp.asarray(target),
                      start_channel=start_channel, num_workers=num_workers)
