"""A way to keep an intermediate array out of XLA:CPU's fusion.

XLA fuses cheap elementwise producers into every consumer. Where an array is
read many times, through shifted views (the pools of clDice's soft skeleton)
or by many reductions (the pooling of a projected plane at every kernel
size), that recomputes its whole producer chain inside each reader, and an
optimization barrier does not stop it on CPU. XLA does not duplicate a
``reduce_window``, so passing the array through an identity written as one
keeps it in memory, computed once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stored(x: jax.Array) -> jax.Array:
  """``x`` unchanged (floating or uint8), computed into memory once.

  A reduce_window max over windows ``{x[i], a hole}`` (base dilation 2,
  window and stride 2 along axis 1): the hole holds the identity of max
  (-inf, or 0 for uint8), so every output is its input, exactly; XLA keeps
  it because it cannot see that. It costs about one copy of ``x``.
  """
  ones = (1,) * x.ndim
  two = (1, 2) + (1,) * (x.ndim - 2)
  padding = ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2)
  identity = (jnp.array(0, x.dtype) if x.dtype == jnp.uint8
              else jnp.array(-jnp.inf, x.dtype))
  return jax.lax.reduce_window(x, identity, jax.lax.max, two, two, padding,
                               base_dilation=two, window_dilation=ones)
