"""The Projected Pooling Loss (PPL) and its combination with the Dice loss.

Fu et al., "Introducing Soft Topology Constraints in Deep Learning-based
Segmentation using Projected Pooling Loss", SPIE Medical Imaging 2023, §2.

A 3D prediction is projected onto the axial, sagittal and coronal planes by a
max over one spatial axis; each plane is described by 2D max pooling at several
kernel sizes; the loss is the absolute difference between the summed pooled
planes of the prediction and of the ground truth. Max pooling keeps a component
only as large as a window, so the sums count, roughly, how many windows each
component occupies at each scale: a spurious blob or a gap shows up there long
before it moves the Dice score.

Shapes are channels-last: 3D ``(N, X, Y, Z, C)``, 2D ``(N, X, Y, C)``, with the
axes named as in the paper:

=========  ==================  ===========
plane      max over            plane axes
=========  ==================  ===========
axial      ``Z``               ``(X, Y)``
sagittal   ``X``               ``(Y, Z)``
coronal    ``Y``               ``(X, Z)``
=========  ==================  ===========

Every max is a ``jax.lax.reduce_window``. Its gradient goes to one element per
window, the first maximum in row-major order, which is what the published
PyTorch implementation does; ``jnp.max`` would split the gradient among tied
maxima instead, and ties are the rule for saturated predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_KERNEL_SIZES = (4, 5, 8, 10, 20)

# Spatial axes (0-based among the spatial dims X, Y, Z) that each plane keeps;
# the third one is reduced by the projection.
PLANES = {
    "axial": (0, 1),
    "sagittal": (1, 2),
    "coronal": (0, 2),
}
_AXIS_NAMES = "XYZ"


def _check_arguments(pred, target, kernel_sizes, strides, start_channel):
  """Validates everything from shapes and dtypes, before any tracing."""
  pred_shape, target_shape = np.shape(pred), np.shape(target)
  if len(pred_shape) not in (4, 5):
    raise ValueError(
        "pred must be channels-last (N, X, Y, C) or (N, X, Y, Z, C), got rank "
        f"{len(pred_shape)} with shape {pred_shape}")
  if tuple(pred_shape) != tuple(target_shape):
    raise ValueError(
        f"pred and target must have the same shape, got pred {pred_shape} "
        f"and target {target_shape}")
  pred_dtype = jnp.result_type(pred)
  if not jnp.issubdtype(pred_dtype, jnp.floating):
    raise ValueError(
        f"pred must be a floating-point array of probabilities, got dtype "
        f"{pred_dtype}")

  kernel_sizes = tuple(int(k) for k in kernel_sizes)
  strides = kernel_sizes if strides is None else tuple(int(s) for s in strides)
  if not kernel_sizes:
    raise ValueError("kernel_sizes must name at least one kernel size")
  if len(strides) != len(kernel_sizes):
    raise ValueError(
        f"kernel_sizes and strides must have the same length, got "
        f"{len(kernel_sizes)} kernel sizes {kernel_sizes} and {len(strides)} "
        f"strides {strides}")
  if any(k <= 0 for k in kernel_sizes):
    raise ValueError(f"kernel_sizes must be positive, got {kernel_sizes}")
  if any(s <= 0 for s in strides):
    raise ValueError(f"strides must be positive, got {strides}")

  spatial = pred_shape[1:-1]
  planes = PLANES if len(spatial) == 3 else {"plane": (0, 1)}
  for name, axes in planes.items():
    sides = tuple(spatial[a] for a in axes)
    too_big = [k for k in kernel_sizes if k > min(sides)]
    if too_big:
      axes_name = "×".join(_AXIS_NAMES[a] for a in axes)
      raise ValueError(
          f"kernel size {too_big[0]} in kernel_sizes is larger than the "
          f"{name} plane ({axes_name} = {'×'.join(map(str, sides))}) of "
          f"input shape {pred_shape}; every kernel must fit in every plane")

  num_channels = pred_shape[-1]
  if start_channel is None:
    # A single channel is a sigmoid foreground; with several, channel 0 is the
    # background of a softmax / one-hot output and carries no topology.
    start_channel = 0 if num_channels == 1 else 1
  elif not 0 <= start_channel < num_channels:
    raise ValueError(
        f"start_channel must be in [0, {num_channels}) for {num_channels} "
        f"channels, got {start_channel}")
  return kernel_sizes, strides, int(start_channel)


def _max_over(x: jax.Array, spatial_axis: int) -> jax.Array:
  """Max projection along one spatial axis of ``(N, X, Y, Z, C)``, squeezed."""
  window = [1] * x.ndim
  window[1 + spatial_axis] = x.shape[1 + spatial_axis]
  projected = jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, tuple(window), (1,) * x.ndim, "VALID")
  return jnp.squeeze(projected, axis=1 + spatial_axis)


def project(volume: jax.Array) -> dict[str, jax.Array]:
  """The three max-intensity projections of a volume (paper, §2.1).

  Args:
    volume: ``(N, X, Y, Z, C)``.

  Returns:
    ``{"axial": (N, X, Y, C), "sagittal": (N, Y, Z, C), "coronal": (N, X, Z, C)}``.
  """
  return {
      "axial": _max_over(volume, 2),
      "sagittal": _max_over(volume, 0),
      "coronal": _max_over(volume, 1),
  }


def max_pool_2d(plane: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """``k×k`` max pooling with stride ``s×s`` and no padding, ``(N, H, W, C)``.

  A trailing remainder smaller than the window is dropped (VALID), as in
  PyTorch's default floor mode.
  """
  window = (1, kernel_size, kernel_size, 1)
  return jax.lax.reduce_window(
      plane, -jnp.inf, jax.lax.max, window, (1, stride, stride, 1), "VALID")


def _abs(x: jax.Array) -> jax.Array:
  """``|x|`` whose derivative at 0 is 0, like PyTorch's (``jnp.abs`` has 1).

  Pooled sums of prediction and target tie exactly whenever a saturated
  prediction occupies the same windows as the label.
  """
  return x * jax.lax.stop_gradient(jnp.sign(x))


def _pooled_sum(plane, kernel_size, stride, start_channel):
  """``(N, C')`` sums of the pooled plane, channels from ``start_channel``."""
  pooled = max_pool_2d(plane, kernel_size, stride)[..., start_channel:]
  return jnp.sum(pooled, axis=(1, 2))


@functools.partial(
    jax.jit, static_argnames=("kernel_sizes", "strides", "start_channel"))
def _projected_pooling_loss(pred, target, *, kernel_sizes, strides,
                            start_channel):
  # Half precision would round the sums of thousands of cells and the
  # gradient's accumulation over planes and kernels; the maxima themselves
  # are exact, so computing in float32 costs one copy and rounds only once.
  dtype = jnp.promote_types(pred.dtype, jnp.float32)
  pred, target = pred.astype(dtype), target.astype(dtype)
  if pred.ndim == 5:
    pred_planes = list(project(pred).values())
    target_planes = list(project(target).values())
  else:
    pred_planes, target_planes = [pred], [target]
  # Equal weights at every level, so the mean over (kernel, plane, sample,
  # channel) equals the paper's nested means.
  per_kernel = []
  for k, s in zip(kernel_sizes, strides):
    per_plane = [
        jnp.mean(_abs(_pooled_sum(p, k, s, start_channel)
                      - _pooled_sum(t, k, s, start_channel)))
        for p, t in zip(pred_planes, target_planes)
    ]
    per_kernel.append(jnp.mean(jnp.stack(per_plane)))
  return jnp.mean(jnp.stack(per_kernel))


def projected_pooling_loss(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES,
    strides: Sequence[int] | None = None,
    start_channel: int | None = None,
) -> jax.Array:
  r"""The Projected Pooling Loss of Fu et al. (2023), Eq. (1)–(3).

  For a 3D input, with :math:`P_v` and :math:`G_v` the projections of the
  prediction and of the target on plane :math:`v \in \{axial, sagittal,
  coronal\}` and :math:`\mathrm{pool}_k` the :math:`k \times k` max pooling:

  .. math::
    L = \frac{1}{|K|} \sum_{k \in K} \frac{1}{3} \sum_v \frac{1}{N C'}
        \sum_{n, c} \Big| \sum \mathrm{pool}_k(P_v)_{n,c}
                        - \sum \mathrm{pool}_k(G_v)_{n,c} \Big|

  where the inner sums run over the pooled plane and :math:`C'` counts the
  channels from ``start_channel`` on. A 2D input is its own single plane.

  The loss is not normalised by plane area: its unit is "pooled cells", so
  values in the tens or hundreds are normal (the authors' synthetic ball
  example gives 24.33).

  Args:
    pred: probabilities in [0, 1] (sigmoid or softmax output, not logits),
      channels-last ``(N, X, Y, Z, C)`` or ``(N, X, Y, C)``; any floating
      dtype. NaN anywhere in a sample's projection gives a NaN loss.
    target: ground truth of the same shape, binary or one-hot; any numeric
      or boolean dtype (cast to ``pred.dtype``).
    kernel_sizes: side ``k`` of each square pooling window, in voxels; each
      must fit in every projected plane.
    strides: pooling stride per kernel size; defaults to ``kernel_sizes``
      (non-overlapping windows).
    start_channel: first channel that enters the loss. ``None`` means 0 for
      a single channel (binary, sigmoid output) and 1 otherwise (skip the
      background channel of a one-hot / softmax output).

  Returns:
    A scalar, in float32 for half-precision ``pred`` (computed in float32,
    the gradient rounded to ``pred.dtype`` once) and in ``pred.dtype``
    otherwise.

  Raises:
    ValueError: before any tracing, for a rank other than 4 or 5, mismatched
      shapes, non-floating ``pred``, non-positive or mismatched
      ``kernel_sizes``/``strides``, a kernel larger than a projected plane, or
      ``start_channel`` outside ``[0, C)``.
  """
  kernel_sizes, strides, start_channel = _check_arguments(
      pred, target, kernel_sizes, strides, start_channel)
  return _projected_pooling_loss(
      jnp.asarray(pred), jnp.asarray(target), kernel_sizes=kernel_sizes,
      strides=strides, start_channel=start_channel)


def topo_dice_loss(
    logits: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    dice_weight: float = 1.0,
    kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES,
    strides: Sequence[int] | None = None,
    start_channel: int | None = None,
) -> jax.Array:
  r"""The paper's fine-tuning loss :math:`L = L_{topo} + \lambda L_{dice}` (§2.2).

  Takes logits. With one channel the probabilities are ``sigmoid(logits)``;
  with ``C > 1`` channels they are ``softmax(logits)`` over the channel axis.
  :math:`L_{topo}` is :func:`projected_pooling_loss` of those probabilities;
  :math:`L_{dice}` is ``optax.losses.dice_loss`` of the logits (which applies
  the same sigmoid/softmax), averaged over classes and then over the batch.

  Args:
    logits: network output, channels-last ``(N, X, Y, Z, C)`` or
      ``(N, X, Y, C)``.
    target: binary (``C == 1``) or one-hot ground truth of the same shape.
    dice_weight: :math:`\lambda`, the weight of the Dice term (1 in the paper).
    kernel_sizes: see :func:`projected_pooling_loss`.
    strides: see :func:`projected_pooling_loss`.
    start_channel: see :func:`projected_pooling_loss`.

  Returns:
    A scalar.
  """
  kernel_sizes, strides, start_channel = _check_arguments(
      logits, target, kernel_sizes, strides, start_channel)
  logits, target = jnp.asarray(logits), jnp.asarray(target)
  probs = (jax.nn.sigmoid(logits) if logits.shape[-1] == 1
           else jax.nn.softmax(logits, axis=-1))
  topo = _projected_pooling_loss(
      probs, target, kernel_sizes=kernel_sizes, strides=strides,
      start_channel=start_channel)
  dice = jnp.mean(optax.losses.dice_loss(logits, target.astype(logits.dtype)))
  return topo + dice_weight * dice
