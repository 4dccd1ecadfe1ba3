r"""cbDice: the centreline boundary Dice loss of Shi et al. (MICCAI 2024).

Shi, Hu, Hou, Yang, Wang, Wang, Wu, Zeng, Zhang, "Centerline Boundary Dice
Loss for Vascular Segmentation", MICCAI 2024 (arXiv 2407.01517), §2, and the
authors' code (``SoftcbDiceLoss`` in PengchengShi1220/cbDice,
``loss/cbdice_loss.py``, with its defaults: the morphological soft skeleton of
clDice, 10 iterations, smooth 1, linear inverse weights).

clDice (:mod:`~topojax.losses.cldice`) counts every skeleton voxel alike, so
a thick vessel, whose skeleton is no longer than a thin one's, weighs no more
than it; but a Dice term is dominated by thick vessels, and the thin ones
break. cbDice weighs each skeleton voxel by the vessel's radius there, read
from the Euclidean distance transform of the binary mask, so that the
boundary of thick and thin vessels counts alike.

Per sample and channel, with :math:`P` the probabilities, :math:`L` the
binary label, :math:`\hat P = [P > 0.5]` the binarised prediction and sums
over the voxels:

1. skeletons, without gradient: :math:`S_L` the soft skeleton of :math:`L`
   (or a skeleton of it given as ``skeleton``), :math:`S_{\hat P}` the soft
   skeleton of :math:`\hat P` (Shit et al. 2021, Algorithm 1; topojax's
   :func:`~topojax.losses.cldice.soft_skeleton`, the same operator as the
   authors' ``SoftSkeletonize``); the prediction's soft skeleton is
   :math:`S_P = S_{\hat P} \cdot P` and its binary one
   :math:`B_P = [S_P > 0.5]`;
2. for each mask :math:`M \in \{L, \hat P\}` with binary skeleton
   :math:`B` (:math:`S_L`, :math:`B_P`): :math:`D` the Euclidean distance
   transform of :math:`M` (distance to the nearest background voxel, on the
   host), the radii on the skeleton :math:`R = B \cdot D`, their maximum
   :math:`r = \max(\max R, 1)` and :math:`m = \max(\min R, 1)` (the minimum
   runs over the whole volume, so :math:`m` is 1 unless the skeleton fills
   it), and the normalised maps

   .. math::
     \bar D = \min(D, r) / r, \quad \bar R = R / r, \quad
     I = B \cdot \left(\frac{r - R + m}{r}\right)^{d - 1}

   in :math:`d` = 2 or 3 dimensions: :math:`I` is 1 on the thinnest
   skeleton voxels and falls with the radius (the "linear inverse");
3. the weighted topological precision and sensitivity

   .. math::
     T_{prec} = \frac{\sum I_P S_P \cdot \bar D_L L + s}
                     {\sum I_P S_P \cdot w(\bar R_P P, \bar R_L L) + s},
     \quad
     T_{sens} = \frac{\sum I_L S_L \cdot \bar D_P P + s}
                     {\sum I_L S_L \cdot w(\bar R_L L, \bar R_P P) + s}

   where :math:`w(a, b)` is :math:`a` where :math:`a \ne 0` and
   :math:`b = 0`, else :math:`b`: a skeleton voxel is weighed by the other
   mask's normalised radius where that mask has a skeleton, by its own
   otherwise;
4. :math:`L = 1 - 2\,T_{prec} T_{sens} / (T_{prec} + T_{sens})`.

The gradient flows through :math:`P` only where it multiplies (the
:math:`P` factors of :math:`S_P`, :math:`\bar D_P P` and :math:`\bar R_P P`);
the skeletons, distances and weights are constants, as in the authors' code,
which computes them under ``torch.no_grad`` or from thresholded maps.

How it maps to the authors' code: they take logits of ``(N, C, ...)``
classes, merge the foreground classes by their maximum logit into one
sigmoid-like foreground probability and the label map into ``y_true > 0``,
sum over the whole batch before the two ratios (the normalisations
:math:`r`, :math:`m` are per sample), and return :math:`-2\,T_{prec}
T_{sens} / (T_{prec} + T_{sens})`. Here ``pred`` is that foreground
probability map, each sample and channel from ``start_channel`` on has its
own ratios, the loss is their mean, and ``1 +`` their value shifts it (same
gradient) into [0, 1] like the other losses of this package. For one sample
and one foreground channel the two agree exactly (tests,
``tests/torch_reference.py``). The authors' option ``t_skeletonize_flage``
replaces both soft skeletons by a topology-preserving thinning; here the
label's side of it is ``skeleton``, a binary skeleton computed once per case
on the host with :func:`topojax.skeletonize`, which, unlike scikit-image's
thinning, never deletes a vessel two voxels thick (the prediction's skeleton
stays the soft one, which needs no host work per step).

Shapes are channels-last: 3D ``(N, X, Y, Z, C)``, 2D ``(N, X, Y, C)``.

Cost: two distance transforms per sample and channel on the host, in
``scipy.ndimage.distance_transform_edt`` through one ``jax.pure_callback``
per call, each on the bounding box of its mask's foreground (the same
distances), serially: SciPy's transform holds the GIL (measured on this
project's 2-core CPU: four 96³ transforms take 0.62 s in turn and 0.70 s on
two threads), so worker threads would not help. The two soft skeletons run
on the device, with no gradient. Measured with ``python -m benchmarks.loss
--losses cbdice`` (float32, batch 1, forward + backward, the project's 2-core
CPU): 4.8 ms at 32³, 41 ms at 64³, 0.42 s at 128³, 11 to 14 times less than
the PyTorch transcription of the authors' code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from topojax.losses import _checks
from topojax.losses import cldice

# The authors' defaults: SoftcbDiceLoss(iter_=10, smooth=1.).
DEFAULT_ITERATIONS = 10


def _host_distances(masks: np.ndarray, *, spatial_ndim: int,
                    dtype) -> np.ndarray:
  """Euclidean distance transforms of ``(*lead, *spatial, K)`` boolean
  masks, each ``[..., k]`` volume on its own; float64 cast to ``dtype`` (the
  authors cast SciPy's float64 to their float32 the same way)."""
  # pylint: disable=import-outside-toplevel
  from scipy import ndimage  # 0.2 s to import; only this callback needs it.
  masks = np.asarray(masks)
  items = masks.reshape(-1, *masks.shape[-spatial_ndim - 1:])
  out = np.zeros(items.shape, dtype)
  for i in range(items.shape[0]):
    for k in range(items.shape[-1]):
      mask = items[i, ..., k]
      nonzero = np.nonzero(mask)
      if not nonzero[0].size:
        continue  # The transform of nothing is zero: skip the work.
      # The foreground's bounding box with one voxel of background around
      # it (where the volume has one): the same distances, since a voxel's
      # nearest background voxel outside the box is never nearer than the
      # box's border, at a fraction of the work for a small object.
      box = tuple(slice(max(int(j.min()) - 1, 0), int(j.max()) + 2)
                  for j in nonzero)
      out[(i, *box, k)] = ndimage.distance_transform_edt(mask[box])
  return out.reshape(masks.shape)


def _distances(masks: jax.Array, dtype) -> jax.Array:
  """:func:`_host_distances` of traced ``(N, *spatial, K)`` masks."""
  spatial_ndim = masks.ndim - 2
  return jax.pure_callback(
      functools.partial(_host_distances, spatial_ndim=spatial_ndim,
                        dtype=np.dtype(dtype)),
      jax.ShapeDtypeStruct(masks.shape, dtype), masks,
      vmap_method="broadcast_all")


def _normalised_maps(skeleton: jax.Array, distances: jax.Array):
  """Step 2 of the module docstring: ``(D̄, R̄, I)`` of one mask per sample
  and channel, from its binary ``skeleton`` (0 or 1) and ``distances``, both
  ``(N, *spatial, C)``."""
  spatial = tuple(range(1, skeleton.ndim - 1))
  radius = jnp.where(skeleton == 1, distances, 0)
  largest = jnp.maximum(jnp.max(radius, axis=spatial, keepdims=True), 1)
  smallest = jnp.maximum(jnp.min(radius, axis=spatial, keepdims=True), 1)
  inverse = (largest - radius + smallest) / largest
  if len(spatial) == 3:
    # The authors square the 3D weight: a vessel's cross-section grows as
    # the square of its radius.
    inverse = inverse**2
  inverse = jnp.where(skeleton == 0, 0, inverse)
  return jnp.minimum(distances, largest) / largest, radius / largest, inverse


def _either(own: jax.Array, other: jax.Array) -> jax.Array:
  """``own`` where it is non-zero and ``other`` is zero, else ``other``."""
  return jnp.where((own != 0) & (other == 0), own, other)


@functools.partial(jax.jit, static_argnames=("iterations", "smooth",
                                              "start_channel"))
def _cbdice_loss(pred, target, skeleton, *, iterations, smooth,
                 start_channel):
  dtype = _checks.compute_dtype(pred.dtype)
  pred = pred[..., start_channel:].astype(dtype)
  label = (target[..., start_channel:] > 0.5).astype(dtype)
  spatial = tuple(range(1, pred.ndim - 1))
  # Comparisons carry no gradient: the skeletons and weights are constants.
  hard = (pred > 0.5).astype(dtype)
  pred_skeleton = cldice.soft_skeleton(hard, iterations=iterations)
  if skeleton is None:
    label_skeleton = cldice.soft_skeleton(label, iterations=iterations)
  else:
    label_skeleton = (skeleton[..., start_channel:] > 0.5).astype(dtype)
  soft_pred_skeleton = pred_skeleton * pred
  binary_pred_skeleton = (soft_pred_skeleton > 0.5).astype(dtype)
  channels = label.shape[-1]
  distances = _distances(jnp.concatenate([label > 0, hard > 0], axis=-1),
                         dtype)
  label_distance, label_radius, label_inverse = _normalised_maps(
      label_skeleton, distances[..., :channels])
  pred_distance, pred_radius, pred_inverse = _normalised_maps(
      binary_pred_skeleton, distances[..., channels:])
  # The authors' names: q_vl, q_slvl, q_sl of the label; q_vp, q_spvp, q_sp
  # of the prediction.
  label_volume, label_radii = label_distance * label, label_radius * label
  label_weighted = label_inverse * label_skeleton
  pred_volume, pred_radii = pred_distance * pred, pred_radius * pred
  pred_weighted = pred_inverse * soft_pred_skeleton
  precision = ((jnp.sum(pred_weighted * label_volume, axis=spatial) + smooth)
               / (jnp.sum(pred_weighted * _either(pred_radii, label_radii),
                          axis=spatial) + smooth))
  sensitivity = ((jnp.sum(label_weighted * pred_volume, axis=spatial)
                  + smooth)
                 / (jnp.sum(label_weighted * _either(label_radii, pred_radii),
                            axis=spatial) + smooth))
  return jnp.mean(1 - 2 * precision * sensitivity
                  / (precision + sensitivity))


def cbdice_loss(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    skeleton: jax.typing.ArrayLike | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    smooth: float = 1.0,
    start_channel: int | None = None,
) -> jax.Array:
  r"""The cbDice loss of Shi et al. (MICCAI 2024), §2.

  For each sample and channel from ``start_channel`` on, one minus the
  harmonic mean of the radius-weighted topological precision and
  sensitivity (module docstring, steps 1 to 4):

  .. math::
    L = 1 - \frac{2\, T_{prec} T_{sens}}{T_{prec} + T_{sens}}

  averaged over samples and channels: one plus the authors'
  ``SoftcbDiceLoss`` (which returns minus the harmonic mean, summed over
  the batch before the ratios) for each sample and channel. Add the Dice
  term with :func:`topojax.with_dice_loss`.

  A label with no foreground in a channel gives a finite term: the
  sensitivity is ``s / s = 1`` and the precision ``s / (Σ… + s)``, so the
  term is 0 when the prediction is empty too and grows with the predicted
  skeleton otherwise (``smooth = 0`` gives NaN there).

  Args:
    pred: probabilities in [0, 1] (sigmoid or softmax output, not logits),
      channels-last ``(N, X, Y, Z, C)`` or ``(N, X, Y, C)``; any floating
      dtype (half precision is computed in float32). NaN in a sample and
      channel gives a NaN loss.
    target: ground truth of the same shape, binary or one-hot (a voxel is
      foreground where ``target > 0.5``); any numeric or boolean dtype.
    skeleton: optional binary skeleton of each channel of ``target``
      (``pred``'s shape, true or > 0.5 on the skeleton), computed once per
      case on the host (``topojax.skeletonize_batch``), in place of the
      label's soft skeleton:
      the label's side of the authors' ``t_skeletonize_flage``. ``None``
      (their default) takes the soft skeleton of the label.
    iterations: erosions of the soft skeletons (see
      :func:`~topojax.losses.cldice.soft_skeleton`); the authors use 10.
    smooth: :math:`s`, added to every numerator and denominator (1 in the
      authors' code).
    start_channel: first channel that enters the loss. ``None`` means 0 for
      a single channel and 1 otherwise (skip the background of a softmax /
      one-hot output).

  Returns:
    A scalar in [0, 1] for ``pred`` in [0, 1], float32 for half precision
    ``pred`` and ``pred.dtype`` otherwise. Differentiable in reverse mode
    (``jax.grad``, ``jax.vjp``); works under ``jax.jit`` and ``jax.vmap``.

  Raises:
    ValueError: before tracing, for a rank other than 4 or 5, an empty axis,
      mismatched shapes of ``pred``, ``target`` and ``skeleton``,
      non-floating ``pred``, a negative or non-integer ``iterations``, a
      negative or non-finite ``smooth``, or ``start_channel`` outside
      ``[0, C)``.
  """
  pred = _checks.as_array(pred, "pred")
  target = _checks.as_array(target, "target")
  _checks.check_pair(pred, target)
  if skeleton is not None:
    skeleton = _checks.as_array(skeleton, "skeleton")
    _checks.check_same_shape(pred, skeleton, ("pred", "skeleton"))
    skeleton = jnp.asarray(skeleton)
  # pylint: disable-next=protected-access
  iterations = cldice._check_iterations(iterations)
  smooth = float(smooth)
  if not 0 <= smooth < np.inf:
    raise ValueError(f"smooth must be finite and >= 0, got {smooth}")
  start_channel = _checks.start_channel_of(start_channel, np.shape(pred)[-1])
  return _cbdice_loss(jnp.asarray(pred), jnp.asarray(target), skeleton,
                      iterations=iterations, smooth=smooth,
                      start_channel=start_channel)
