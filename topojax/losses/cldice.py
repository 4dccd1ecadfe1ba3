r"""clDice: the centreline Dice loss of Shit et al. (CVPR 2021).

Shit, Paetzold, Sekuboyina, Ezhov, Unger, Zhylka, Pluim, Bauer, Menze,
"clDice - a Novel Topology-Preserving Loss Function for Tubular Structure
Segmentation", CVPR 2021, §3 and Algorithm 1.

The skeleton of a mask is what is left after repeatedly peeling its surface;
a soft skeleton does the same to probabilities with min and max pooling, so
it is differentiable. clDice compares each skeleton with the other mask:

* topological precision, the share of the predicted skeleton that lies in
  the label: :math:`T_{prec} = |S_P \cdot G| / |S_P|`;
* topological sensitivity, the share of the label's skeleton the
  prediction covers: :math:`T_{sens} = |S_G \cdot P| / |S_G|`;

and the loss is one minus their harmonic mean. A broken tube loses part of
the label's skeleton (sensitivity drops); a spurious branch adds predicted
skeleton outside the label (precision drops).

The soft skeleton follows the authors' published code (Algorithm 1):
erosion is the minimum of one 3-tap min pooling per spatial axis, dilation a
3×3(×3) max pooling, both with stride 1 and padded to keep the shape, and
:math:`\mathrm{skel} \mathrel{+}= \mathrm{relu}(\delta - \mathrm{skel}
\cdot \delta)` with :math:`\delta = \mathrm{relu}(x - \mathrm{open}(x))`
at each of ``iterations + 1`` erosion depths. Max pooling passes its
gradient to the first maximum of each window and a tie in the minimum of
the erosions splits it evenly, as in PyTorch, so the gradients match too.
The loss reduces as ``topolosses`` 0.2.0's ``CLDiceLoss`` with no base loss:
sums over the spatial axes per sample and channel, then the mean over
samples and channels.

Shapes are channels-last: 3D ``(N, X, Y, Z, C)``, 2D ``(N, X, Y, C)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from topojax.losses import _checks


def _pool(x: jax.Array, window: tuple[int, ...], *, minimum: bool
          ) -> jax.Array:
  """Stride-1 max (or min) pooling over the spatial axes, shape kept.

  Padding takes the reduction's identity (-inf for a max), so a border
  voxel's window holds only the voxels that exist, as PyTorch's padding
  does. A min pooling is ``-max(-x)``, as in the published code, so its
  gradient also goes to the first minimum.
  """
  full = (1, *window, 1)
  padding = tuple((w // 2, w // 2) for w in full)
  sign = -1 if minimum else 1
  pooled = jax.lax.reduce_window(sign * x, -jnp.inf, jax.lax.max, full,
                                 (1,) * x.ndim, padding)
  return sign * pooled


def _soft_erode(x: jax.Array) -> jax.Array:
  """The minimum over spatial axes of a 3-tap min pooling along each."""
  spatial = x.ndim - 2
  eroded = None
  for axis in range(spatial):
    window = tuple(3 if a == axis else 1 for a in range(spatial))
    along = _pool(x, window, minimum=True)
    # Nested as min(min(X, Y), Z): where they tie, the gradient splits the
    # same way as in the published code.
    eroded = along if eroded is None else jnp.minimum(eroded, along)
  return eroded


def _soft_dilate(x: jax.Array) -> jax.Array:
  return _pool(x, (3,) * (x.ndim - 2), minimum=False)


def _soft_open(x: jax.Array) -> jax.Array:
  return _soft_dilate(_soft_erode(x))


def _soft_skeleton(x: jax.Array, iterations: int) -> jax.Array:
  skeleton = jax.nn.relu(x - _soft_open(x))
  for _ in range(iterations):
    x = _soft_erode(x)
    delta = jax.nn.relu(x - _soft_open(x))
    # Adds only what the skeleton does not hold yet, so it stays in [0, 1].
    skeleton = skeleton + jax.nn.relu(delta - skeleton * delta)
  return skeleton


def _check_iterations(iterations) -> int:
  if (isinstance(iterations, (bool, np.bool_))
      or not isinstance(iterations, (int, np.integer)) or iterations < 0):
    raise ValueError(f"iterations must be a non-negative int, got "
                     f"{iterations!r}")
  return int(iterations)


@functools.partial(jax.jit, static_argnames="iterations")
def _skeleton(x, *, iterations):
  dtype = _checks.compute_dtype(x.dtype)
  return _soft_skeleton(x.astype(dtype), iterations).astype(x.dtype)


def soft_skeleton(x: jax.typing.ArrayLike, *, iterations: int = 3
                  ) -> jax.Array:
  """The soft skeleton of probabilities (Shit et al. 2021, Algorithm 1).

  Args:
    x: probabilities in [0, 1], channels-last ``(N, X, Y, Z, C)`` or
      ``(N, X, Y, C)``; each sample and channel is skeletonised on its own.
    iterations: erosions after the first opening; a structure thicker than
      about ``2·(iterations + 1)`` voxels keeps only its outer layers. The
      authors use 3 to 10 (3 here, as in ``topolosses``).

  Returns:
    The skeleton, ``x``'s shape and dtype, in [0, 1] for ``x`` in [0, 1]
    (computed in float32 for half precision).

  Raises:
    ValueError: before tracing, for a rank other than 4 or 5, an empty axis,
      a non-floating ``x`` or a negative or non-integer ``iterations``.
  """
  x = _checks.as_array(x, "x")
  _checks.check_layout("x", tuple(np.shape(x)))
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"x must be a floating-point array of probabilities, "
                     f"got dtype {jnp.result_type(x)}")
  return _skeleton(jnp.asarray(x), iterations=_check_iterations(iterations))


@functools.partial(jax.jit,
                   static_argnames=("iterations", "smooth", "start_channel"))
def _cldice_loss(pred, target, *, iterations, smooth, start_channel):
  dtype = _checks.compute_dtype(pred.dtype)
  pred = pred[..., start_channel:].astype(dtype)
  target = target[..., start_channel:].astype(dtype)
  spatial = tuple(range(1, pred.ndim - 1))
  pred_skeleton = _soft_skeleton(pred, iterations)
  target_skeleton = _soft_skeleton(target, iterations)
  precision = ((jnp.sum(pred_skeleton * target, axis=spatial) + smooth)
               / (jnp.sum(pred_skeleton, axis=spatial) + smooth))
  sensitivity = ((jnp.sum(target_skeleton * pred, axis=spatial) + smooth)
                 / (jnp.sum(target_skeleton, axis=spatial) + smooth))
  return jnp.mean(1 - 2 * precision * sensitivity
                  / (precision + sensitivity))


def cldice_loss(
    pred: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    *,
    iterations: int = 3,
    smooth: float = 1e-5,
    start_channel: int | None = None,
) -> jax.Array:
  r"""The clDice loss of Shit et al. (CVPR 2021), Eq. (1)–(2).

  For each sample and channel, with :math:`S_P`, :math:`S_G` the soft
  skeletons of prediction :math:`P` and target :math:`G` and sums over the
  voxels:

  .. math::
    T_{prec} = \frac{\sum S_P G + s}{\sum S_P + s}, \quad
    T_{sens} = \frac{\sum S_G P + s}{\sum S_G + s}, \quad
    L = 1 - \frac{2\, T_{prec} T_{sens}}{T_{prec} + T_{sens}}

  averaged over samples and channels from ``start_channel`` on. Equal to
  ``topolosses.CLDiceLoss(use_base_loss=False, alpha=1)`` (which takes 2D
  input only) and, in 3D, to the same reduction over the authors' 3D soft
  skeleton; see the module docstring. Add the Dice term with
  :func:`topojax.with_dice_loss`.

  Args:
    pred: probabilities in [0, 1] (sigmoid or softmax output, not logits),
      channels-last ``(N, X, Y, Z, C)`` or ``(N, X, Y, C)``; any floating
      dtype (half precision is computed in float32).
    target: ground truth of the same shape, binary or one-hot; any numeric or
      boolean dtype.
    iterations: erosions of the soft skeleton (see :func:`soft_skeleton`).
    smooth: :math:`s`, added to every numerator and denominator so that an
      empty skeleton gives a finite loss; 0 gives NaN for one.
    start_channel: first channel that enters the loss. ``None`` means 0 for
      a single channel and 1 otherwise (skip the background of a softmax /
      one-hot output).

  Returns:
    A scalar in [0, 1], float32 for half precision ``pred`` and
    ``pred.dtype`` otherwise.

  Raises:
    ValueError: before tracing, for a rank other than 4 or 5, an empty axis,
      mismatched shapes, non-floating ``pred``, a negative or non-integer
      ``iterations``, a negative or non-finite ``smooth``, or
      ``start_channel`` outside ``[0, C)``.
  """
  pred = _checks.as_array(pred, "pred")
  target = _checks.as_array(target, "target")
  _checks.check_pair(pred, target)
  iterations = _check_iterations(iterations)
  smooth = float(smooth)
  if not 0 <= smooth < np.inf:
    raise ValueError(f"smooth must be finite and >= 0, got {smooth}")
  start_channel = _checks.start_channel_of(start_channel, np.shape(pred)[-1])
  return _cldice_loss(jnp.asarray(pred), jnp.asarray(target),
                      iterations=iterations, smooth=smooth,
                      start_channel=start_channel)
