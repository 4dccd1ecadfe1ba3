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

Gradient: the published PyTorch implementation sends each max's gradient to
one element, the first maximum of its window in row-major order; ``jnp.max``
would split it among tied maxima instead, and ties are the rule for saturated
predictions. Two formulations give that gradient:

* the default, fast one. Each projection is computed once, for all kernel
  sizes, as a tree of elementwise maxima; a ``jax.custom_vjp`` records, in
  one more pass, the voxel that won each projected cell (the lowest index
  along the projected axis among the maxima) and its backward writes the
  dense gradient in a single pass. Pooling with stride equal to the kernel
  size (the paper's setting) runs on non-overlapping tiles and sends each
  tile's gradient to its first maximum in row-major order; other strides use
  ``reduce_window`` and its gradient. Reverse-mode only: ``jax.grad`` and
  ``jax.vjp`` work, ``jax.jvp`` does not;
* the reference one (``_reference_loss``, for tests and benchmarks), where
  every max is a ``jax.lax.reduce_window``, whose gradient picks the same
  voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from topojax.losses import _checks
from topojax.losses import _fusion
from topojax.losses import dice

DEFAULT_KERNEL_SIZES = (4, 5, 8, 10, 20)

# Spatial axes (0-based among the spatial dims X, Y, Z) that each plane keeps;
# the third one is reduced by the projection.
PLANES = {
    "axial": (0, 1),
    "sagittal": (1, 2),
    "coronal": (0, 2),
}
_AXIS_NAMES = "XYZ"
# The axis of an (N, X, Y, Z, C) volume that each projection reduces, in the
# order of PLANES.
_PROJECTED_AXES = (3, 1, 2)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("sums",),
    meta_fields=("kernel_sizes", "strides", "start_channel", "spatial_shape",
                 "num_channels"))
@dataclasses.dataclass(frozen=True)
class TargetFeatures:
  """The label side of the loss, computed once by :func:`pooled_target_features`.

  A pytree: ``sums`` is its only leaf, so a batch of features passes through
  ``jax.jit`` and ``jax.vmap``, and per-case features stack with
  ``jax.tree.map(lambda *s: jnp.concatenate(s), *features)``.

  Attributes:
    sums: ``(N, K, P, C')`` sums of the pooled target planes, in pooled cells,
      for each sample, kernel size (in ``kernel_sizes`` order), plane (axial,
      sagittal, coronal; one plane for 2D) and channel from
      ``start_channel`` on.
    kernel_sizes: the kernel sizes they were pooled with.
    strides: the strides they were pooled with.
    start_channel: the first channel they hold.
    spatial_shape: ``(X, Y, Z)`` or ``(X, Y)`` of the label.
    num_channels: ``C`` of the label.
  """
  sums: jax.Array
  kernel_sizes: tuple[int, ...]
  strides: tuple[int, ...]
  start_channel: int
  spatial_shape: tuple[int, ...]
  num_channels: int


def _check_config(name, shape, kernel_sizes, strides, start_channel):
  """Validates a shape against the pooling configuration, before tracing."""
  _checks.check_layout(name, shape)
  try:
    kernel_sizes = tuple(kernel_sizes)
    strides = kernel_sizes if strides is None else tuple(strides)
  except TypeError:
    raise ValueError(
        f"kernel_sizes and strides must be sequences of positive integers, "
        f"got kernel_sizes={kernel_sizes!r} and strides={strides!r}") from None
  if not kernel_sizes:
    raise ValueError("kernel_sizes must name at least one kernel size")
  # A float such as 2.5 is refused rather than truncated to a smaller window.
  kernel_sizes = tuple(_checks.positive_int(k, f"each of kernel_sizes "
                                            f"{kernel_sizes}")
                       for k in kernel_sizes)
  strides = tuple(_checks.positive_int(s, f"each of strides {strides}")
                  for s in strides)
  if len(strides) != len(kernel_sizes):
    raise ValueError(
        f"kernel_sizes and strides must have the same length, got "
        f"{len(kernel_sizes)} kernel sizes {kernel_sizes} and {len(strides)} "
        f"strides {strides}")

  spatial = shape[1:-1]
  planes = PLANES if len(spatial) == 3 else {"plane": (0, 1)}
  for plane, axes in planes.items():
    sides = tuple(spatial[a] for a in axes)
    too_big = [k for k in kernel_sizes if k > min(sides)]
    if too_big:
      axes_name = "×".join(_AXIS_NAMES[a] for a in axes)
      raise ValueError(
          f"kernel size {too_big[0]} in kernel_sizes is larger than the "
          f"{plane} plane ({axes_name} = {'×'.join(map(str, sides))}) of "
          f"input shape {shape}; every kernel must fit in every plane")
  return kernel_sizes, strides, _checks.start_channel_of(start_channel,
                                                         shape[-1])


def _check_arguments(pred, target, kernel_sizes, strides, start_channel):
  """Validates everything from shapes and dtypes, before any tracing.

  Returns:
    ``(pred, target, kernel_sizes, strides, start_channel)``, array-likes
    made arrays.
  """
  pred = _checks.as_array(pred, "pred")
  if isinstance(target, TargetFeatures):
    config = _check_config("pred", tuple(np.shape(pred)), kernel_sizes,
                           strides, start_channel)
    _checks.check_floating(pred)
    _check_features(target, tuple(np.shape(pred)), *config)
  else:
    target = _checks.as_array(target, "target")
    _checks.check_pair(pred, target)
    config = _check_config("pred", tuple(np.shape(pred)), kernel_sizes,
                           strides, start_channel)
  return (pred, target, *config)


def _check_features(features, pred_shape, kernel_sizes, strides,
                    start_channel):
  """Checks that precomputed features were made for this input and config."""
  made = dict(kernel_sizes=features.kernel_sizes, strides=features.strides,
              start_channel=features.start_channel,
              spatial_shape=features.spatial_shape,
              num_channels=features.num_channels)
  wanted = dict(kernel_sizes=kernel_sizes, strides=strides,
                start_channel=start_channel, spatial_shape=pred_shape[1:-1],
                num_channels=pred_shape[-1])
  for key, value in wanted.items():
    if made[key] != value:
      raise ValueError(
          f"target features were computed with {key}={made[key]}, but this "
          f"call has {key}={value} (pred shape {pred_shape}); recompute them "
          "with pooled_target_features using the loss's arguments")
  num_planes = 3 if len(pred_shape) == 5 else 1
  expected = (pred_shape[0], len(kernel_sizes), num_planes,
              pred_shape[-1] - start_channel)
  if tuple(np.shape(features.sums)) != expected:
    raise ValueError(
        f"target features sums must have shape (N, K, P, C') = {expected} "
        f"for pred shape {pred_shape}, got {np.shape(features.sums)}")


# --- Projections ---------------------------------------------------------------


def _halving_max(x: jax.Array, axis: int) -> jax.Array:
  """Max over ``axis`` as elementwise maxima of halves, removing ``axis``.

  XLA:CPU fuses the tree into passes that stream over the volume, where a
  ``jnp.max`` over the outermost spatial axis strides through memory and runs
  about ten times slower. For an odd length the halves overlap by one
  element, which a max does not mind.
  """
  while x.shape[axis] > 1:
    n, half = x.shape[axis], (x.shape[axis] + 1) // 2
    x = jnp.maximum(jax.lax.slice_in_dim(x, 0, half, axis=axis),
                    jax.lax.slice_in_dim(x, n - half, n, axis=axis))
  return jnp.squeeze(x, axis)


def _first_argmax(x: jax.Array, maxima: jax.Array, axis: int) -> jax.Array:
  """Lowest index along ``axis`` where ``x`` equals ``maxima``, int32.

  One more streaming pass; ``jnp.argmax`` (a variadic reduction) costs five
  to ten times as much on CPU. The last two candidates are left to a
  reduction, whose result XLA keeps in memory, so that the dense backward
  pass reads the index plane instead of finishing the tree for every voxel.
  Where no element equals the maximum (a NaN), the index is the axis length,
  which matches nothing.
  """
  n = x.shape[axis]
  half = (n + 1) // 2
  maxima = jnp.expand_dims(maxima, axis)

  def candidates(start):
    # Comparing after slicing keeps XLA from materialising a volume of
    # candidate indices before the tree.
    part = jax.lax.slice_in_dim(x, start, start + half, axis=axis)
    index = jax.lax.broadcasted_iota(jnp.int32, part.shape, axis) + start
    return jnp.where(part == maxima, index, n)

  index = jnp.minimum(candidates(0), candidates(n - half))
  while index.shape[axis] > 2:
    m, h = index.shape[axis], (index.shape[axis] + 1) // 2
    index = jnp.minimum(jax.lax.slice_in_dim(index, 0, h, axis=axis),
                        jax.lax.slice_in_dim(index, m - h, m, axis=axis))
  return jnp.min(index, axis=axis)


@jax.custom_vjp
def _project_to_winners(volume):
  # Each plane is read by the pooling at every kernel size, the concatenation
  # with the label's plane and the argmax pass; stored once, XLA stops
  # recomputing the last levels of the halving tree in each of them
  # (forward + backward 1.3-1.4 times faster at 2 x 160x160x128).
  return tuple(_fusion.stored(_halving_max(volume, axis))
               for axis in _PROJECTED_AXES)


def _project_to_winners_fwd(volume):
  planes = _project_to_winners(volume)
  winners = tuple(_first_argmax(volume, plane, axis)
                  for plane, axis in zip(planes, _PROJECTED_AXES))
  return planes, winners


def _project_to_winners_bwd(winners, plane_grads):
  # dV[x, y, z] = [z == iA[x, y]]·gA[x, y] + [x == iS[y, z]]·gS[y, z]
  #             + [y == iC[x, z]]·gC[x, z]: one elementwise pass that writes
  # the dense gradient once, instead of one scatter per projection.
  n, x, y, c = winners[0].shape
  shape = (n, x, y, winners[1].shape[2], c)
  grad = None
  for winner, plane_grad, axis in zip(winners, plane_grads, _PROJECTED_AXES):
    position = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    term = jnp.where(position == jnp.expand_dims(winner, axis),
                     jnp.expand_dims(plane_grad, axis), 0)
    grad = term if grad is None else grad + term
  return (grad,)


_project_to_winners.defvjp(_project_to_winners_fwd, _project_to_winners_bwd)


@jax.jit
def project(volume: jax.Array) -> dict[str, jax.Array]:
  """The three max-intensity projections of a volume (paper, §2.1).

  Each plane's gradient goes to the first maximum along the projected axis
  (the lowest index), as in the published code. Reverse-mode differentiable
  only (``jax.grad``, not ``jax.jvp``).

  Args:
    volume: ``(N, X, Y, Z, C)``.

  Returns:
    ``{"axial": (N, X, Y, C), "sagittal": (N, Y, Z, C), "coronal": (N, X, Z, C)}``.
  """
  return dict(zip(PLANES, _project_to_winners(volume)))


def _reference_planes(volume: jax.Array) -> list[jax.Array]:
  """Projections as ``reduce_window`` maxima, in the order of ``PLANES``."""
  planes = []
  for axis in _PROJECTED_AXES:
    window = [1] * volume.ndim
    window[axis] = volume.shape[axis]
    projected = jax.lax.reduce_window(
        volume, -jnp.inf, jax.lax.max, tuple(window), (1,) * volume.ndim,
        "VALID")
    planes.append(jnp.squeeze(projected, axis))
  return planes


# --- Pooling -----------------------------------------------------------------


def max_pool_2d(plane: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """``k×k`` max pooling with stride ``s×s`` and no padding, ``(N, H, W, C)``.

  A trailing remainder smaller than the window is dropped (VALID), as in
  PyTorch's default floor mode.
  """
  window = (1, kernel_size, kernel_size, 1)
  return jax.lax.reduce_window(
      plane, -jnp.inf, jax.lax.max, window, (1, stride, stride, 1), "VALID")


def _tiles(plane, kernel_size):
  """``(N, H, W, C)`` cropped to whole tiles, as ``(N, H', k, W', k, C)``."""
  n, h, w, c = plane.shape
  rows, cols = h // kernel_size, w // kernel_size
  cropped = plane[:, :rows * kernel_size, :cols * kernel_size]
  return cropped.reshape(n, rows, kernel_size, cols, kernel_size, c)


def _pool_sum(plane, kernel_size, stride):
  """``(N, C)`` sums of the max-pooled plane."""
  if stride == kernel_size:
    pooled = jnp.max(_tiles(plane, kernel_size), axis=(2, 4))
  else:
    pooled = max_pool_2d(plane, kernel_size, stride)
  return jnp.sum(pooled, axis=(1, 2))


def _window_wins(plane, kernel_size, stride):
  """``(N, H, W, C)``: for each cell, how many pooling windows it wins.

  A window is won by its first maximum in row-major order, as with
  ``reduce_window``, whose gradient this is; cells in no window win none.
  """
  if stride != kernel_size:
    _, vjp = jax.vjp(lambda p: _pool_sum(p, kernel_size, stride), plane)
    n, _, _, c = plane.shape
    return vjp(jnp.ones((n, c), plane.dtype))[0]
  tiles = _tiles(plane, kernel_size)
  maxima = jnp.max(tiles, axis=(2, 4), keepdims=True)
  order = (jax.lax.broadcasted_iota(jnp.int32, tiles.shape, 2) * kernel_size
           + jax.lax.broadcasted_iota(jnp.int32, tiles.shape, 4))
  first = jnp.min(jnp.where(tiles == maxima, order, kernel_size**2),
                  axis=(2, 4), keepdims=True)
  wins = (order == first).astype(plane.dtype)
  n, h, w, c = plane.shape
  wins = wins.reshape(n, h - h % kernel_size, w - w % kernel_size, c)
  return jnp.pad(wins, ((0, 0), (0, h % kernel_size), (0, w % kernel_size),
                        (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pooled_sums(planes, kernel_sizes, strides):
  """``(N, K, P, C)`` sums of each plane pooled at each kernel size."""
  return jnp.stack([jnp.stack([_pool_sum(plane, k, s) for plane in planes], 1)
                    for k, s in zip(kernel_sizes, strides)], 1)


def _pooled_sums_fwd(planes, kernel_sizes, strides):
  return _pooled_sums(planes, kernel_sizes, strides), planes


def _pooled_sums_bwd(kernel_sizes, strides, planes, sums_grad):
  plane_grads = []
  for p, plane in enumerate(planes):
    wins = jnp.stack([_window_wins(plane, k, s)
                      for k, s in zip(kernel_sizes, strides)], axis=1)
    # Σ_k wins_k·g_k as a contraction, which XLA materialises: as a sum of
    # elementwise terms it would be fused into the dense pass over the volume
    # that follows and recomputed for every voxel.
    plane_grads.append(jnp.einsum(
        "nkhwc,nkc->nhwc", wins, sums_grad[:, :, p],
        precision=jax.lax.Precision.HIGHEST))
  return (tuple(plane_grads),)


_pooled_sums.defvjp(_pooled_sums_fwd, _pooled_sums_bwd)


def _reference_pooled_sums(planes, kernel_sizes, strides):
  """:func:`_pooled_sums` with ``reduce_window`` pooling and its gradient."""
  return jnp.stack([
      jnp.stack([jnp.sum(max_pool_2d(plane, k, s), axis=(1, 2))
                 for plane in planes], 1)
      for k, s in zip(kernel_sizes, strides)], 1)


def _num_cells(spatial_shape, kernel_sizes, strides):
  """``(K, P)`` number of pooled cells ``H'·W'`` per kernel size and plane."""
  planes = PLANES.values() if len(spatial_shape) == 3 else [(0, 1)]
  return np.array(
      [[np.prod([(spatial_shape[a] - k) // s + 1 for a in axes])
        for axes in planes] for k, s in zip(kernel_sizes, strides)],
      dtype=np.float64)


# --- The loss ------------------------------------------------------------------


def _abs(x: jax.Array) -> jax.Array:
  """``|x|`` whose derivative at 0 is 0, like PyTorch's (``jnp.abs`` has 1).

  Pooled sums of prediction and target tie exactly whenever a saturated
  prediction occupies the same windows as the label.
  """
  return x * jax.lax.stop_gradient(jnp.sign(x))


def _combine(pred_sums, target_sums, num_cells, normalize):
  """Eq. (3): mean over samples, channels, planes and kernels of |ΔΣ|."""
  terms = _abs(pred_sums - target_sums)
  if normalize:
    terms = terms / num_cells[:, :, None].astype(terms.dtype)
  # Equal weights at every level, so one mean over (N, K, P, C') equals the
  # paper's nested means.
  return jnp.mean(terms)


def _label_planes(target, start_channel, dtype):
  """Projections of a label, from ``start_channel`` on, cast to ``dtype``.

  Projected in the label's own dtype: a max commutes with the cast, and a
  ``uint8`` or boolean label is a quarter of the bytes to read.
  """
  target = target[..., start_channel:]
  if target.ndim == 4:
    return (target.astype(dtype),)
  # Stored (see _fusion.stored) after the cast, where the plane is floating.
  return tuple(_fusion.stored(_halving_max(target, axis).astype(dtype))
               for axis in _PROJECTED_AXES)


@functools.partial(
    jax.jit, static_argnames=("kernel_sizes", "strides", "start_channel",
                              "normalize"))
def _projected_pooling_loss(pred, target, *, kernel_sizes, strides,
                            start_channel, normalize):
  dtype = _checks.compute_dtype(pred.dtype)
  pred = pred.astype(dtype)
  planes = _project_to_winners(pred) if pred.ndim == 5 else (pred,)
  planes = tuple(plane[..., start_channel:] for plane in planes)
  if isinstance(target, TargetFeatures):
    pred_sums = _pooled_sums(planes, kernel_sizes, strides)
    target_sums = target.sums.astype(dtype)
  else:
    # Pooled as one batch, both sides are summed in the same order, so equal
    # inputs give exactly 0 (XLA may fuse two separate sums differently).
    target_planes = _label_planes(target, start_channel, dtype)
    pred_sums, target_sums = jnp.split(_pooled_sums(
        tuple(map(jnp.concatenate, zip(planes, target_planes))),
        kernel_sizes, strides), 2)
  num_cells = _num_cells(pred.shape[1:-1], kernel_sizes, strides)
  return _combine(pred_sums, target_sums, num_cells, normalize)


@functools.partial(
    jax.jit, static_argnames=("kernel_sizes", "strides", "start_channel",
                              "normalize"))
def _reference_loss(pred, target, *, kernel_sizes=DEFAULT_KERNEL_SIZES,
                    strides=DEFAULT_KERNEL_SIZES, start_channel=0,
                    normalize=False):
  """The loss with every max a ``reduce_window``: the exact formulation.

  Same arguments as :func:`projected_pooling_loss` (a label ``target``, no
  defaults resolved, no validation); kept for tests and benchmarks.
  """
  dtype = _checks.compute_dtype(pred.dtype)
  sums = []
  for volume in (pred.astype(dtype), target.astype(dtype)):
    planes = _reference_planes(volume) if volume.ndim == 5 else [volume]
    sums.append(_reference_pooled_sums(
        [plane[..., start_channel:] for plane in planes], kernel_sizes,
        strides))
  num_cells = _num_cells(pred.shape[1:-1], kernel_sizes, strides)
  return _combine(*sums, num_cells, normalize)


@functools.partial(
    jax.jit, static_argnames=("kernel_sizes", "strides", "start_channel"))
def _pooled_target_sums(target, *, kernel_sizes, strides, start_channel):
  planes = _label_planes(target, start_channel, _checks.compute_dtype(target.dtype))
  return _pooled_sums(planes, kernel_sizes, strides)


def pooled_target_features(
    target: jax.typing.ArrayLike,
    *,
    kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES,
    strides: Sequence[int] | None = None,
    start_channel: int | None = None,
) -> TargetFeatures:
  """The label side of :func:`projected_pooling_loss`, computed once.

  The label never changes during training, so its projections and pooled
  sums can be computed once (for example when the data are loaded) and passed
  to the loss as ``target`` in place of the label; the loss then reads only
  the prediction. The values and gradients are the same as with the label.

  Args:
    target: ground truth, channels-last ``(N, X, Y, Z, C)`` or ``(N, X, Y, C)``,
      binary or one-hot; any numeric or boolean dtype.
    kernel_sizes: as for :func:`projected_pooling_loss`; the loss checks that
      it is called with the same values.
    strides: as for :func:`projected_pooling_loss`.
    start_channel: as for :func:`projected_pooling_loss`.

  Returns:
    A :class:`TargetFeatures` whose ``sums`` are ``(N, K, P, C')``, in
    float32 (float64 for a float64 label).

  Raises:
    ValueError: for a rank other than 4 or 5, an empty batch, bad
      ``kernel_sizes`` / ``strides``, a kernel larger than a projected
      plane, or ``start_channel`` outside ``[0, C)``.
  """
  target = _checks.as_array(target, "target")
  shape = tuple(np.shape(target))
  kernel_sizes, strides, start_channel = _check_config(
      "target", shape, kernel_sizes, strides, start_channel)
  sums = _pooled_target_sums(
      jnp.asarray(target), kernel_sizes=kernel_sizes, strides=strides,
      start_channel=start_channel)
  return TargetFeatures(
      sums=sums, kernel_sizes=kernel_sizes, strides=strides,
      start_channel=start_channel, spatial_shape=shape[1:-1],
      num_channels=shape[-1])


def projected_pooling_loss(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike | TargetFeatures,
    *,
    kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES,
    strides: Sequence[int] | None = None,
    start_channel: int | None = None,
    normalize: bool = False,
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

  By default the loss is not normalised by plane area, as in the published
  code: its unit is "pooled cells", so values in the tens or hundreds are
  normal (the authors' synthetic ball example gives 24.33). With
  ``normalize=True`` each term :math:`|\cdot|` is divided by the number of
  cells :math:`H' W'` of its pooled plane, so each term, and the loss, is a
  fraction of the plane in [0, 1] for inputs in [0, 1].

  The gradient is the published code's: each max passes it to the first
  maximum of its window (see the module docstring for how the fast path
  finds it). Reverse-mode only: ``jax.grad`` works, ``jax.jvp`` does not.

  Args:
    pred: probabilities in [0, 1] (sigmoid or softmax output, not logits),
      channels-last ``(N, X, Y, Z, C)`` or ``(N, X, Y, C)``; any floating
      dtype. NaN anywhere in a sample's projection gives a NaN loss.
    target: ground truth of the same shape, binary or one-hot, any numeric
      or boolean dtype (cast to the compute dtype); or its
      :class:`TargetFeatures` from :func:`pooled_target_features`, made with
      the same ``kernel_sizes``, ``strides`` and ``start_channel``.
    kernel_sizes: side ``k`` of each square pooling window, in voxels; each
      must fit in every projected plane.
    strides: pooling stride per kernel size; defaults to ``kernel_sizes``
      (non-overlapping windows).
    start_channel: first channel that enters the loss. ``None`` means 0 for
      a single channel (binary, sigmoid output) and 1 otherwise (skip the
      background channel of a one-hot / softmax output).
    normalize: divide each term by its pooled plane's number of cells; the
      default ``False`` gives the published values.

  Returns:
    A scalar, in float32 for half-precision ``pred`` (computed in float32,
    the gradient rounded to ``pred.dtype`` once) and in ``pred.dtype``
    otherwise.

  Raises:
    ValueError: before any tracing, for a rank other than 4 or 5, an empty
      batch, mismatched shapes, non-floating ``pred``, ``kernel_sizes`` /
      ``strides`` that are not positive integers or differ in length, a
      kernel larger than a projected plane, ``start_channel`` outside
      ``[0, C)``, or target features made for another shape or
      configuration.
  """
  pred, target, kernel_sizes, strides, start_channel = _check_arguments(
      pred, target, kernel_sizes, strides, start_channel)
  if not isinstance(target, TargetFeatures):
    target = jnp.asarray(target)
  return _projected_pooling_loss(
      jnp.asarray(pred), target, kernel_sizes=kernel_sizes, strides=strides,
      start_channel=start_channel, normalize=bool(normalize))


def topo_dice_loss(
    logits: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    dice_weight: float = 1.0,
    kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES,
    strides: Sequence[int] | None = None,
    start_channel: int | None = None,
    normalize: bool = False,
    target_features: TargetFeatures | None = None,
) -> jax.Array:
  r"""The paper's fine-tuning loss :math:`L = L_{topo} + \lambda L_{dice}` (§2.2).

  :func:`topojax.losses.with_dice_loss` of :func:`projected_pooling_loss`,
  with one addition: the label side of :math:`L_{topo}` may be precomputed.
  Takes logits: the probabilities are ``sigmoid(logits)`` for one channel and
  ``softmax(logits)`` over the channels otherwise; :math:`L_{dice}` is
  :func:`topojax.losses.dice_loss` of the logits.

  Args:
    logits: network output, channels-last ``(N, X, Y, Z, C)`` or
      ``(N, X, Y, C)``.
    target: binary (``C == 1``) or one-hot ground truth of the same shape.
    dice_weight: :math:`\lambda`, the weight of the Dice term (1 in the paper).
    kernel_sizes: see :func:`projected_pooling_loss`.
    strides: see :func:`projected_pooling_loss`.
    start_channel: see :func:`projected_pooling_loss`.
    normalize: see :func:`projected_pooling_loss`.
    target_features: ``pooled_target_features(target, ...)``, computed once;
      when given, :math:`L_{topo}` uses it instead of projecting ``target``
      again (the Dice term still reads ``target``).

  Returns:
    A scalar.
  """
  topo_target = target if target_features is None else target_features
  logits, topo_target, kernel_sizes, strides, start_channel = (
      _check_arguments(logits, topo_target, kernel_sizes, strides,
                       start_channel))
  target = _checks.as_array(target, "target")
  _checks.check_same_shape(logits, target, ("logits", "target"))
  logits, target = jnp.asarray(logits), jnp.asarray(target)
  topo = _projected_pooling_loss(
      dice.probabilities(logits),
      target if target_features is None else target_features,
      kernel_sizes=kernel_sizes, strides=strides,
      start_channel=start_channel, normalize=bool(normalize))
  return topo + dice_weight * dice.dice_loss(logits, target)
