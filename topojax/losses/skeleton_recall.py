r"""Skeleton Recall: the loss of Kirchhoff et al. (ECCV 2024).

Kirchhoff, Rokuss, Roy, Kovacs, Ulrich, Wald, Zenk, Vollmuth, Kleesiek,
Isensee, Maier-Hein, "Skeleton Recall Loss for Connectivity Conserving and
Resource Efficient Segmentation of Thin Tubular Structures", ECCV 2024 (arXiv
2404.03010), §3, and the authors' nnU-Net code (``SkeletonTransform`` and
``SoftSkeletonRecallLoss`` in MIC-DKFZ/Skeleton-Recall).

A thin structure breaks when a few voxels along its centreline are missed,
which barely moves a Dice score. Skeleton Recall asks the prediction to cover
the label's centreline: the skeleton of the label is computed once, on the
host, with an ordinary (non-differentiable) thinning, thickened to a narrow
tube, and the loss is one minus the soft recall of the prediction on that
tube. Unlike clDice (:mod:`~topojax.losses.cldice`) nothing is skeletonised
on the accelerator, so the loss costs one product and two sums per voxel.

The tube, :func:`tubed_skeleton`, as the authors build it:

1. binarise the label: the foreground is the union of the classes (the
   channels from ``start_channel`` on);
2. skeletonise it: the authors call ``skimage.morphology.skeletonize``
   (Zhang–Suen's thinning in 2D, Lee's in 3D); topojax takes its own
   :func:`topojax.skeletonize`, Lee's thinning in 2D and 3D, which equals
   scikit-image's Lee thinning except where that one deletes a part two
   voxels thick whole (a vessel of even width loses its centreline, and the
   loss its tube there; scikit-image issue 3757). This is the one import of
   the losses from the rest of topojax: the thinning is NumPy and numba;
3. dilate the skeleton twice by the face-connected cross (4-neighbourhood in
   2D, 6 in 3D): the tube is every voxel within city-block distance 2 of the
   skeleton;
4. keep the tube only inside the label, each voxel in its own class: channel
   ``c`` of the result is ``tube ∧ label_c``.

The loss, :func:`skeleton_recall_loss`, for each sample and channel with
:math:`P` the prediction and :math:`T` the tube:

.. math::
  L = 1 - \frac{\sum P\,T + s}{\max(\sum T + s,\ 10^{-8})}

averaged over samples and channels. The authors return the negated recall,
:math:`-\mathrm{recall}`; ``1 -`` shifts it by a constant (same gradient) so
that it lies in [0, 1] like the other losses here. Their trainer uses
:math:`s = 10^{-5}` and adds the term with weight 1 to nnU-Net's Dice +
cross-entropy.

Shapes are channels-last: 3D ``(N, X, Y, Z, C)``, 2D ``(N, X, Y, C)``.

Cost: the loss is a fused elementwise product and two reductions, linear in
the voxels, with no extra memory beyond the tube (one byte per voxel as a
boolean). The tube costs one thinning per sample on the host, on one core
hundredths of a second for a thin vessel tree in a 128³ label and tenths for
blobs filling a third of it (``python -m benchmarks.skeleton``), so compute
it when the labels are loaded, not inside the training step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from topojax.losses import _checks

# The authors' tube: two dilations by the face-connected cross.
DEFAULT_TUBE_RADIUS = 2
# The authors' clip of the recall's denominator, so smooth = 0 stays finite.
_MIN_DENOMINATOR = 1e-8


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def _tube(mask: np.ndarray, radius: int) -> np.ndarray:
  """The skeleton of a boolean ``(X, Y[, Z])`` mask dilated ``radius`` times
  by the face-connected cross; not yet restricted to the mask."""
  # Imported here: numba and scipy.ndimage add tenths of a second to
  # `import topojax.losses`, and only the host-side tube needs them.
  # pylint: disable=import-outside-toplevel
  from scipy import ndimage
  from topojax import skeleton as thinning
  tube = np.zeros(mask.shape, bool)
  nonzero = np.nonzero(mask)
  if not nonzero[0].size:
    return tube  # skeletonize of nothing is nothing; skip the work.
  # Thinning and dilation are run on the foreground's bounding box only: the
  # outside of the box is background to the thinning, so the skeleton is the
  # same, and the tube is later cut to the mask, which lies inside the box.
  box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nonzero)
  skeleton = thinning.skeletonize(mask[box])
  if radius:
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    skeleton = ndimage.binary_dilation(skeleton, cross, iterations=radius)
  tube[box] = skeleton
  return tube


def _check_radius(radius) -> int:
  if (isinstance(radius, (bool, np.bool_))
      or not isinstance(radius, (int, np.integer)) or radius < 0):
    raise ValueError(f"radius must be a non-negative int, got {radius!r}")
  return int(radius)


def tubed_skeleton(
    label: jax.typing.ArrayLike,
    *,
    radius: int = DEFAULT_TUBE_RADIUS,
    start_channel: int | None = None,
    per_channel: bool = False,
) -> np.ndarray:
  """The tubed skeleton of a label (Kirchhoff et al. 2024, §3), on the host.

  For each sample: the skeleton of the foreground, dilated ``radius`` times by
  the face-connected cross and cut to the label, each tube voxel in the
  channel of its class (see the module docstring). This is the ``skeleton``
  that :func:`skeleton_recall_loss` reads; compute it once per case.

  Args:
    label: ground truth, channels-last ``(N, X, Y, Z, C)`` or
      ``(N, X, Y, C)``, binary (``C == 1``) or one-hot; a voxel belongs to
      channel ``c`` where ``label[..., c] > 0.5``. Always batched: an
      un-batched 3D label ``(X, Y, Z, C)`` would read as a 2D batch, so pass
      ``label[None]``. Any numeric or boolean dtype; a NumPy array or a
      concrete JAX array (not a tracer: this runs on the host).
    radius: dilations of the skeleton by the face-connected cross: the tube
      holds the voxels within city-block distance ``radius`` of the skeleton.
      The authors use 2; 0 gives the bare skeleton.
    start_channel: first channel of the foreground classes; the channels
      before it (the background of a one-hot label) are left empty. ``None``
      means 0 for a single channel and 1 otherwise, as in the losses.
    per_channel: skeletonise each channel on its own instead of the union of
      the classes. The authors skeletonise the union (the default), so where
      two classes touch one centreline runs through both; ``True`` gives each
      class its own centreline (for overlapping, multi-label channels).

  Returns:
    A boolean NumPy array of ``label``'s shape, true on the tube; contained
    in the label (``tube[..., c]`` implies ``label[..., c] > 0.5``).

  Raises:
    ValueError: for a traced ``label``, a rank other than 4 or 5, an empty
      axis, a non-numeric dtype, a negative or non-integer ``radius``, or
      ``start_channel`` outside ``[0, C)``.
  """
  if _is_traced(label):
    raise ValueError(
        "label must be a concrete array: tubed_skeleton runs on the host "
        "(NumPy and numba), so call it outside jax.jit / jax.vmap, "
        "once per case")
  label = np.asarray(_checks.as_array(label, "label"))
  _checks.check_layout("label", label.shape)
  radius = _check_radius(radius)
  start_channel = _checks.start_channel_of(start_channel, label.shape[-1])
  classes = label > 0.5
  tubes = np.zeros(label.shape, bool)
  for n in range(label.shape[0]):
    if per_channel:
      for c in range(start_channel, label.shape[-1]):
        tubes[n, ..., c] = _tube(classes[n, ..., c], radius)
    else:
      union = np.any(classes[n, ..., start_channel:], axis=-1)
      tubes[n, ..., start_channel:] = _tube(union, radius)[..., None]
  # Cut to the label, each voxel to its class (the authors multiply the tube
  # by the label map).
  return tubes & classes


@functools.partial(jax.jit,
                   static_argnames=("smooth", "start_channel", "batch_dice"))
def _skeleton_recall_loss(pred, skeleton, *, smooth, start_channel,
                          batch_dice):
  dtype = _checks.compute_dtype(pred.dtype)
  pred = pred[..., start_channel:].astype(dtype)
  # The tube is part of the label: no gradient flows into it.
  skeleton = jax.lax.stop_gradient(skeleton[..., start_channel:].astype(dtype))
  axes = tuple(range(0 if batch_dice else 1, pred.ndim - 1))
  covered = jnp.sum(pred * skeleton, axis=axes)
  # XLA rewrites a product with a cast boolean as a select, which would drop
  # a NaN of pred off the tube; adding 0·Σpred (fused into the same pass)
  # keeps NaN in → NaN out, as in PyTorch, and changes nothing else.
  covered = covered + 0 * jnp.sum(pred, axis=axes)
  total = jnp.sum(skeleton, axis=axes)
  recall = (covered + smooth) / jnp.maximum(total + smooth, _MIN_DENOMINATOR)
  return jnp.mean(1 - recall)


def skeleton_recall_loss(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    skeleton: jax.typing.ArrayLike | None = None,
    smooth: float = 1e-5,
    start_channel: int | None = None,
    batch_dice: bool = False,
) -> jax.Array:
  r"""The Skeleton Recall loss of Kirchhoff et al. (ECCV 2024), §3.

  For each sample and channel from ``start_channel`` on, with :math:`P` the
  prediction, :math:`T` the tubed skeleton of the target and sums over the
  voxels:

  .. math::
    L = 1 - \frac{\sum P\,T + s}{\max(\sum T + s,\ 10^{-8})}

  averaged over samples and channels: one plus the authors'
  ``SoftSkeletonRecallLoss`` (which returns minus the recall). Add the Dice
  term with :func:`topojax.with_dice_loss`.

  A label with no foreground in a channel has an empty tube, and its term is
  :math:`1 - s / \max(s, 10^{-8})`: 0 for the default ``smooth`` (nothing to
  recall, nothing missed), and 1 for ``smooth = 0``; finite either way.

  Args:
    pred: probabilities in [0, 1] (sigmoid or softmax output, not logits),
      channels-last ``(N, X, Y, Z, C)`` or ``(N, X, Y, C)``; any floating
      dtype (half precision is computed in float32). NaN in a sample and
      channel gives a NaN loss.
    target: ground truth of the same shape, binary or one-hot. Read only when
      ``skeleton`` is ``None``, and then it must be concrete (not traced).
    skeleton: ``tubed_skeleton(target)``, precomputed on the host (boolean
      or numeric, ``pred``'s shape). ``None`` computes it here from
      ``target`` as ``tubed_skeleton(target, start_channel=start_channel)``,
      on the host at every call, which cannot happen under ``jax.jit`` /
      ``jax.vmap`` of ``target``; pass it there.
    smooth: :math:`s`, added to numerator and denominator (the authors'
      trainer uses ``1e-5``).
    start_channel: first channel that enters the loss. ``None`` means 0 for
      a single channel and 1 otherwise (skip the background of a softmax /
      one-hot output; the authors refuse to include it).
    batch_dice: sum over the batch as well before the ratio, one recall per
      channel, as nnU-Net's ``batch_dice`` (which its planner sets per
      configuration); the default is one recall per sample and channel.

  Returns:
    A scalar in [0, 1] for ``pred`` in [0, 1], float32 for half precision
    ``pred`` and ``pred.dtype`` otherwise.

  Raises:
    ValueError: before tracing, for a rank other than 4 or 5, an empty axis,
      mismatched shapes of ``pred``, ``target`` and ``skeleton``,
      non-floating ``pred``, a negative or non-finite ``smooth``,
      ``start_channel`` outside ``[0, C)``, or a traced ``target`` with no
      ``skeleton``.
  """
  pred = _checks.as_array(pred, "pred")
  target = _checks.as_array(target, "target")
  _checks.check_pair(pred, target)
  smooth = float(smooth)
  if not 0 <= smooth < np.inf:
    raise ValueError(f"smooth must be finite and >= 0, got {smooth}")
  start_channel = _checks.start_channel_of(start_channel, np.shape(pred)[-1])
  if skeleton is None:
    if _is_traced(target):
      raise ValueError(
          "skeleton is required when target is traced (inside jax.jit, "
          "jax.vmap or jax.grad of target): the tube is computed on the host, "
          "so precompute it outside with skeleton=tubed_skeleton(target) and "
          "pass it in")
    skeleton = tubed_skeleton(target, start_channel=start_channel)
  else:
    skeleton = _checks.as_array(skeleton, "skeleton")
    _checks.check_same_shape(pred, skeleton, ("pred", "skeleton"))
  return _skeleton_recall_loss(
      jnp.asarray(pred), jnp.asarray(skeleton), smooth=smooth,
      start_channel=start_channel, batch_dice=bool(batch_dice))
