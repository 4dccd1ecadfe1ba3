r"""The Dice loss, and any topological loss plus λ times it.

Fu et al. (SPIE MI 2023, §2.2) fine-tune with :math:`L = L_{topo} + \lambda
L_{dice}`: the topological term alone says nothing about where the object is,
only about its shape, so the Dice term keeps the voxels in place. The same
combination serves every topological loss of this package (the projected
pooling loss, clDice, the persistent-homology loss), so that they can be
compared on equal terms.

Networks output logits, channels-last ``(N, X, Y, Z, C)`` or ``(N, X, Y, C)``:
one channel is a sigmoid foreground, several are softmax classes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from topojax.losses import _checks


def probabilities(logits: jax.Array) -> jax.Array:
  """``sigmoid(logits)`` for one channel, ``softmax`` over several."""
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


def dice_loss(logits: jax.typing.ArrayLike,
              target: jax.typing.ArrayLike) -> jax.Array:
  """The soft Dice loss of logits, averaged over classes and samples.

  ``optax.losses.dice_loss`` per sample (sigmoid for one channel, softmax
  over several; every channel, background included, as optax does), then the
  mean over the batch.

  Args:
    logits: ``(N, ..., C)``.
    target: binary or one-hot, the same shape; any numeric dtype.

  Returns:
    A scalar in [0, 1].
  """
  logits, target = jnp.asarray(logits), jnp.asarray(target)
  return jnp.mean(optax.losses.dice_loss(logits, target.astype(logits.dtype)))


def with_dice_loss(
    topology_loss: Callable[..., jax.Array], *,
    dice_weight: float = 1.0,
) -> Callable[..., jax.Array]:
  r"""``loss(logits, target)`` = ``topology_loss(probs, target)`` + λ·Dice.

  .. math::
    L = L_{topo}(\mathrm{probabilities}(\mathrm{logits}), G)
        + \lambda\, L_{dice}(\mathrm{logits}, G)

  Args:
    topology_loss: a loss of probabilities and target, e.g.
      ``topojax.cldice_loss`` or
      ``functools.partial(topojax.projected_pooling_loss, normalize=True)``.
    dice_weight: :math:`\lambda` (1 in Fu et al.); 0 leaves the topological
      term alone.

  Returns:
    ``loss(logits, target, *, dice_weight=dice_weight, **kwargs)``: logits
    and target channels-last, same shape; a scalar. ``dice_weight`` given
    here replaces λ for this call and may be an array, traced too (a train
    step that takes λ as an argument compiles once for every λ); ``kwargs``
    go to ``topology_loss`` (``skeleton=`` of
    ``topojax.skeleton_recall_loss``). Bad arguments raise ``ValueError``
    when it is called, before tracing.

  Example::

    loss = topojax.with_dice_loss(topojax.cldice_loss, dice_weight=1.0)
    grads = jax.grad(lambda logits: loss(logits, labels))(logits)
  """
  if not callable(topology_loss):
    raise ValueError(f"topology_loss must be a loss function of "
                     f"(probabilities, target), got {topology_loss!r}")
  default_weight = _checks.dice_weight(dice_weight)

  def loss(logits, target, *, dice_weight=default_weight, **topology_kwargs):
    dice_weight = _checks.dice_weight(dice_weight)
    logits = _checks.as_array(logits, "logits")
    target = _checks.as_array(target, "target")
    _checks.check_same_shape(logits, target, ("logits", "target"))
    logits, target = jnp.asarray(logits), jnp.asarray(target)
    return (topology_loss(probabilities(logits), target, **topology_kwargs)
            + dice_weight * dice_loss(logits, target))

  return loss
