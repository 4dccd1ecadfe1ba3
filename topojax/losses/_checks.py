"""Argument checks shared by the losses, run on shapes and dtypes only.

Every loss calls these before it traces anything, so a user reads one
``ValueError`` naming the argument instead of an XLA error; they work on
tracers too, so the same checks guard calls inside ``jax.jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_array(value, name: str):
  """``value`` itself if it is an array (or tracer), else ``np.asarray(value)``.

  Nested lists and scalars are accepted as ``jnp.asarray`` accepts them;
  anything that does not make a numeric array is refused by name.
  """
  if isinstance(value, (jax.Array, np.ndarray)):
    return value
  try:
    array = np.asarray(value)
  except (TypeError, ValueError) as err:
    raise ValueError(
        f"{name} must be an array or a nested sequence of numbers of one "
        f"rectangular shape, got {type(value).__name__} ({err})") from None
  if not (np.issubdtype(array.dtype, np.number)
          or np.issubdtype(array.dtype, np.bool_)):
    raise ValueError(f"{name} must hold numbers, got an array of dtype "
                     f"{array.dtype} from {type(value).__name__}")
  return array


def check_layout(name: str, shape: tuple[int, ...]) -> None:
  """Channels-last ``(N, X, Y, C)`` or ``(N, X, Y, Z, C)``, nothing empty."""
  if len(shape) not in (4, 5):
    raise ValueError(
        f"{name} must be channels-last (N, X, Y, C) or (N, X, Y, Z, C), got "
        f"rank {len(shape)} with shape {shape}")
  if shape[0] == 0:
    # Every loss averages over samples: an empty batch would give NaN.
    raise ValueError(f"{name} must hold at least one sample, got shape "
                     f"{shape}")
  if min(shape[1:]) == 0:
    raise ValueError(f"{name} has an empty spatial or channel axis: shape "
                     f"{shape}")


def check_same_shape(first, second, names: tuple[str, str]) -> None:
  """Raises unless ``first`` and ``second`` have one shape; ``names`` say
  which arguments they are."""
  if np.shape(first) != np.shape(second):
    raise ValueError(
        f"{names[0]} and {names[1]} must have the same shape, got "
        f"{names[0]} {np.shape(first)} and {names[1]} {np.shape(second)}")


def check_pair(pred, target) -> None:
  """``pred`` floating and of ``target``'s shape; both laid out as losses expect."""
  check_layout("pred", tuple(np.shape(pred)))
  check_same_shape(pred, target, ("pred", "target"))
  check_floating(pred)


def check_floating(pred) -> None:
  dtype = jnp.result_type(pred)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"pred must be a floating-point array of probabilities, "
                     f"got dtype {dtype}")


def dice_weight(value):
  """λ of ``topology + λ·Dice`` as a float, checked ``>= 0``; a traced
  weight (an argument of a compiled step) is passed through unchecked, its
  caller having checked the value it traced."""
  try:
    weight = float(value)
  except jax.errors.ConcretizationTypeError:
    return value
  except (TypeError, ValueError):
    raise ValueError(f"dice_weight must be a number >= 0, got "
                     f"{value!r}") from None
  if not weight >= 0:
    raise ValueError(f"dice_weight must be >= 0, got {weight}")
  return weight


def positive_int(value, name: str) -> int:
  """``value`` as an int if it is a positive integer (not a bool, not 2.5)."""
  if (isinstance(value, (bool, np.bool_))
      or not isinstance(value, (int, np.integer)) or value < 1):
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def start_channel_of(start_channel, num_channels: int) -> int:
  """The first channel a loss reads.

  ``None`` means 0 for a single channel (a sigmoid foreground) and 1 for
  several, whose channel 0 is the background of a softmax / one-hot output
  and carries no topology.
  """
  if start_channel is None:
    return 0 if num_channels == 1 else 1
  if (isinstance(start_channel, (bool, np.bool_))
      or not isinstance(start_channel, (int, np.integer))
      or not 0 <= start_channel < num_channels):
    raise ValueError(
        f"start_channel must be an int in [0, {num_channels}) for "
        f"{num_channels} channels, or None, got {start_channel!r}")
  return int(start_channel)


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half precision and integers, else the floating dtype.

  Losses sum over whole volumes: half precision would round those sums.
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(dtype, jnp.float32)
