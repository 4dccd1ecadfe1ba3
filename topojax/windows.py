"""Whole volumes predicted window by window, as MONAI and nnU-Net do it.

A network trained on patches sees a volume larger than its patch through
overlapping windows whose predictions are blended with an importance map
that trusts the centre of a window more than its edges. ``sliding_window``
places, pads and blends the windows exactly as MONAI's
``sliding_window_inference`` (``monai.inferers``) does, channels-last:

1. A volume smaller than the patch along an axis is zero-padded to the
   patch there, the lower half of the difference before, the rest after.
2. Along each axis the windows start every ``int(patch · (1 − overlap))``
   voxels (at least 1; one window when the patch spans the axis), and the
   last start is moved back so that the window ends at the volume's end.
   The windows are the full grid of those starts.
3. Each window's prediction is multiplied by the importance map and added
   into the output; the output is divided by the sum of the maps over the
   windows that cover each voxel, and the padding is cropped away.

The importance map is 1 everywhere (``blend="constant"``) or the product of
one Gaussian per axis centred on the window, ``exp(−d² / (2σ²))`` with
``σ = sigma_scale · patch`` (``blend="gaussian"``, nnU-Net's blending), with
every weight raised to at least ``max(min weight, 1e-3)`` so that no voxel is
divided by a vanishing sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

BLENDS = ("gaussian", "constant")

# MONAI's floor on the importance map: the Gaussian's tails at the window's
# corners (about 1e-10 in 3D at sigma_scale 0.125) would otherwise make the
# blend a ratio of two vanishing sums where only one window reaches.
_MIN_WEIGHT = 1e-3


def window_starts(image_shape: Sequence[int], patch_size: Sequence[int],
                  overlap: Sequence[float]) -> np.ndarray:
  """The first voxel of every window, ``(num_windows, num_axes)``, int.

  Args:
    image_shape: spatial shape, already at least ``patch_size`` per axis.
    patch_size: the window's spatial shape.
    overlap: per axis, the fraction of a window shared with the next.

  Returns:
    The full grid of per-axis starts, last axis fastest (MONAI's order).
  """
  per_axis = []
  for size, patch, share in zip(image_shape, patch_size, overlap):
    step = patch if patch == size else max(int(patch * (1 - share)), 1)
    count = max(math.ceil((size - patch) / step), 0) + 1
    per_axis.append([min(i * step, size - patch) for i in range(count)])
  grid = np.meshgrid(*per_axis, indexing="ij")
  return np.stack([axis.ravel() for axis in grid], axis=-1)


def importance_map(patch_size: Sequence[int], *, blend: str = "gaussian",
                   sigma_scale: float | Sequence[float] = 0.125
                   ) -> np.ndarray:
  """The weight of each voxel of a window, float32 of shape ``patch_size``.

  Args:
    patch_size: the window's spatial shape.
    blend: ``"gaussian"`` or ``"constant"`` (see the module docstring).
    sigma_scale: the Gaussian's σ per axis, as a fraction of the patch side.
  """
  if blend == "constant":
    return np.ones(tuple(patch_size), np.float32)
  scales = _per_axis(sigma_scale, len(patch_size), float)
  weights = np.ones((), np.float32)
  for axis, (patch, scale) in enumerate(zip(patch_size, scales)):
    # float32 throughout, as MONAI computes it.
    offset = np.arange(patch, dtype=np.float32) - np.float32((patch - 1) / 2)
    sigma = np.float32(patch * scale)
    line = np.exp(offset ** 2 / (np.float32(-2) * sigma ** 2))
    weights = weights[..., None] * line.reshape((1,) * axis + (patch,))
  return np.maximum(weights, max(weights.min(), _MIN_WEIGHT)).astype(
      np.float32)


def sliding_window(fn: Callable[[jax.Array], jax.Array], volume, *,
                   patch_size: Sequence[int], overlap: float = 0.5,
                   blend: str = "gaussian",
                   sigma_scale: float | Sequence[float] = 0.125,
                   batch_size: int = 4, progress: bool = False) -> jax.Array:
  """Predicts a whole volume from overlapping windows, blended.

  The windows of every case are cut ``batch_size`` at a time (the last
  batch is filled with repeats that weigh nothing), so ``fn`` always sees
  one shape: pass a ``jax.jit``-compiled function and it compiles once.
  Cutting the windows and blending them are compiled too, once per volume
  shape; the output, the weight sums and the (padded) volume are the memory
  it needs beyond ``fn``'s.

  Args:
    fn: maps windows ``(batch_size, *patch_size, C)`` to predictions
      ``(batch_size, *patch_size, K)`` (probabilities or logits).
    volume: ``(N, *spatial, C)``, channels-last, e.g. ``(N, X, Y, Z, C)``.
    patch_size: the window's spatial shape, one side per spatial axis.
    overlap: fraction of a window shared with its neighbour, in [0, 1);
      one value or one per axis.
    blend: ``"gaussian"`` (weights falling off from the window's centre) or
      ``"constant"`` (a plain mean of the windows).
    sigma_scale: the Gaussian's σ as a fraction of the patch side.
    batch_size: windows per call of ``fn``.
    progress: show a progress bar over the batches of windows.

  Returns:
    float32 ``(N, *spatial, K)``: at each voxel, the importance-weighted
    mean of the predictions of the windows that contain it.

  Raises:
    ValueError: naming the argument, for a ``volume`` that is not
      ``(N, *spatial, C)`` with ``len(patch_size)`` spatial axes, sides that
      are not positive integers, ``overlap`` outside [0, 1), an unknown
      ``blend``, ``sigma_scale`` ≤ 0, ``batch_size`` < 1, or an ``fn`` whose
      output is not ``(batch_size, *patch_size, K)``.
  """
  volume = jnp.asarray(volume)
  patch, overlap, scales = _check_arguments(
      fn, volume, patch_size=patch_size, overlap=overlap, blend=blend,
      sigma_scale=sigma_scale, batch_size=batch_size)
  num_cases, *spatial, channels = volume.shape
  short = [max(p - s, 0) for p, s in zip(patch, spatial)]
  before = tuple(d // 2 for d in short)
  if any(short):
    volume = jnp.pad(volume, [(0, 0)] + [(d // 2, d - d // 2) for d in short]
                     + [(0, 0)])
  padded = tuple(max(p, s) for p, s in zip(patch, spatial))

  starts = window_starts(padded, patch, overlap)
  weights = jnp.asarray(importance_map(patch, blend=blend,
                                       sigma_scale=scales))
  # Windows in MONAI's order, case by case; the tail of the last batch
  # repeats the first window with no weight.
  cases = np.repeat(np.arange(num_cases), len(starts))
  corners = np.tile(starts, (num_cases, 1))
  used = np.ones(len(cases), np.float32)
  fill = -len(cases) % batch_size
  cases = np.concatenate([cases, np.zeros(fill, cases.dtype)])
  corners = np.concatenate([corners, np.repeat(starts[:1], fill, axis=0)])
  used = np.concatenate([used, np.zeros(fill, np.float32)])

  windows = jax.ShapeDtypeStruct((batch_size, *patch, channels), volume.dtype)
  predicted = jax.eval_shape(fn, windows)
  expected = (batch_size, *patch)
  if (getattr(predicted, "ndim", 0) != len(expected) + 1
      or tuple(predicted.shape[:-1]) != expected):
    raise ValueError(
        f"fn must map windows {windows.shape} to predictions of shape "
        f"{expected + ('K',)}, got {getattr(predicted, 'shape', predicted)}")
  total = jnp.zeros((num_cases, *padded, predicted.shape[-1]), jnp.float32)

  batches = range(0, len(cases), batch_size)
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    batches = tqdm.tqdm(batches, desc="windows", unit="batch")
  for first in batches:
    part = slice(first, first + batch_size)
    batch_cases = jnp.asarray(cases[part])
    batch_corners = jnp.asarray(corners[part])
    batch = _cut(volume, batch_cases, batch_corners, patch)
    total = _add(total, fn(batch), weights, batch_cases, batch_corners,
                 jnp.asarray(used[part]))
  coverage = _coverage(weights, jnp.asarray(starts), padded)
  return _blend(total, coverage, before, tuple(spatial))


def _per_axis(value, num_axes: int, kind):
  if isinstance(value, (numbers.Number, np.generic)):
    return (kind(value),) * num_axes
  return tuple(kind(v) for v in value)


def _check_arguments(fn, volume, *, patch_size, overlap, blend, sigma_scale,
                     batch_size):
  if not callable(fn):
    raise ValueError(f"fn must be callable, got {type(fn).__name__}")
  try:
    patch = tuple(patch_size)
  except TypeError:
    raise ValueError(
        f"patch_size must be a sequence of positive ints, got {patch_size!r}"
    ) from None
  if not patch or not all(
      isinstance(p, (numbers.Integral, np.integer)) and not isinstance(p, bool)
      and p > 0 for p in patch):
    raise ValueError(
        f"patch_size must be a sequence of positive ints, got {patch_size!r}")
  patch = tuple(int(p) for p in patch)
  if volume.ndim != len(patch) + 2 or 0 in volume.shape:
    raise ValueError(
        f"volume must be (N, *spatial, C) with {len(patch)} spatial axes, "
        f"one per side of patch_size {patch}, got shape {volume.shape}")
  try:
    overlap = _per_axis(overlap, len(patch), float)
  except (TypeError, ValueError):
    raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}"
                     ) from None
  if len(overlap) != len(patch) or not all(0 <= o < 1 for o in overlap):
    raise ValueError(f"overlap must be in [0, 1) (one value, or one per "
                     f"spatial axis), got {overlap}")
  if blend not in BLENDS:
    raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
  try:
    scales = _per_axis(sigma_scale, len(patch), float)
  except (TypeError, ValueError):
    raise ValueError(f"sigma_scale must be a positive number, got "
                     f"{sigma_scale!r}") from None
  if len(scales) != len(patch) or not all(s > 0 for s in scales):
    raise ValueError(f"sigma_scale must be positive (one value, or one per "
                     f"spatial axis), got {sigma_scale!r}")
  if (not isinstance(batch_size, (numbers.Integral, np.integer))
      or isinstance(batch_size, bool) or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  return patch, overlap, scales


@functools.partial(jax.jit, static_argnums=3)
def _cut(volume, cases, corners, patch):
  """Windows ``(B, *patch, C)`` of ``volume`` at ``corners`` of ``cases``."""
  def one(case, corner):
    start = (case, *corner, 0)
    size = (1, *patch, volume.shape[-1])
    return jax.lax.dynamic_slice(volume, start, size)[0]
  return jax.vmap(one)(cases, corners)


@functools.partial(jax.jit, donate_argnums=0)
def _add(total, predictions, weights, cases, corners, used):
  """``total`` plus each weighted prediction at its window, in order."""
  predictions = predictions.astype(jnp.float32)

  def add_one(i, total):
    start = (cases[i], *corners[i], 0)
    size = (1, *predictions.shape[1:])
    window = jax.lax.dynamic_slice(total, start, size)
    update = (used[i] * weights[..., None]) * predictions[i]
    return jax.lax.dynamic_update_slice(total, window + update[None], start)

  return jax.lax.fori_loop(0, predictions.shape[0], add_one, total)


@functools.partial(jax.jit, static_argnums=2)
def _coverage(weights, starts, shape):
  """Sum of the importance maps of the windows covering each voxel."""
  def add_one(i, coverage):
    window = jax.lax.dynamic_slice(coverage, starts[i], weights.shape)
    return jax.lax.dynamic_update_slice(coverage, window + weights, starts[i])

  return jax.lax.fori_loop(0, starts.shape[0], add_one,
                           jnp.zeros(shape, jnp.float32))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _blend(total, coverage, before, spatial):
  blended = total / coverage[None, ..., None]
  crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
  return blended[(slice(None), *crop)]
