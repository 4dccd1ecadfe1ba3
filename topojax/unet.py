"""The 3D U-Net of Çiçek et al. (MICCAI 2016), in Flax NNX, channels-last.

Fu et al. (SPIE Medical Imaging 2023, §3.1) train a standard 3D U-Net; this is
that network. Each resolution level holds two ``3×3×3`` convolutions, each
followed by a normalisation and a ReLU; the encoder halves the resolution with
``2×2×2`` max pooling and doubles the channels, the decoder doubles it with a
``2×2×2`` stride-2 up-convolution, concatenates the encoder's features of the
same level and halves the channels. A ``1×1×1`` convolution gives the logits.
Unlike Çiçek et al., both convolutions of a level have the same width
(``base_channels · 2^level``), as in most later 3D U-Nets, and the ``3×3×3``
convolutions have no bias, which the normalisation after them would cancel.

Inputs are ``(N, X, Y, Z, C_in)``; outputs are logits ``(N, X, Y, Z, C_out)``:
one channel read with a sigmoid (binary foreground), or ``C_out`` classes read
with a softmax (see ``probabilities``). Every spatial side must be a multiple
of ``2^(depth - 1)``.

Three layers are written for XLA's CPU backend, where Flax's stock ones are
slow (``benchmarks/RESULTS.md``):

* On CPU, the convolutions run on oneDNN through XLA's FFI (``conv.conv3d``)
  where topojax's native part is built; without it, a ``3×3×3`` convolution
  runs as three 2D ``3×3`` convolutions over the ``(Y, Z)`` planes, one per
  X offset, summed (``conv3d_by_planes``). Same function, different
  summation order; other backends keep XLA's 3D convolution.
* The up-convolution is a matrix product to ``8 · C_out`` channels followed by
  a depth-to-space reshape (``UpConv``), which is exactly a ``2×2×2``
  stride-2 transposed convolution; on CPU with the native part, oneDNN
  computes it as one (``conv.conv3d_transpose``) with the same weights.
* Max pooling is a reshape and a max over the ``2×2×2`` windows.
* GroupNorm takes its statistics as sums over the voxels of each channel,
  then over each group's channels (``GroupNorm``), where ``nnx.GroupNorm``
  reduces a 6D reshape.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
from flax import nnx

from topojax import conv

NORMS = ("batch", "group", "instance")

# GroupNorm uses the largest number of groups, at most 8, that divides the
# width: 8 at the usual widths (16 and up, two or more channels per group),
# fewer at the tiny widths of tests.
_MAX_GROUPS = 8


def check_spatial_shape(shape: Sequence[int], depth: int) -> None:
  """Raises ``ValueError`` unless every side is a multiple of ``2^(depth-1)``.

  Args:
    shape: spatial ``(X, Y, Z)`` in voxels.
    depth: resolution levels of the U-Net.
  """
  factor = 2 ** (depth - 1)
  if len(shape) != 3 or any(int(s) <= 0 or int(s) % factor for s in shape):
    raise ValueError(
        f"spatial shape {tuple(shape)} must be three sides that are each a "
        f"multiple of 2^(depth-1) = {factor} for a U-Net of depth {depth} "
        f"({depth - 1} poolings); resize the data (e.g. PreprocessConfig."
        "shape) or lower depth")


def conv3d_by_planes(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME', stride-1 3D convolution as a sum of 2D convolutions over (Y, Z).

  ``out[:, x] = sum_i conv2d(in[:, x + i - kx // 2], kernel[i])``: the X taps
  become separate 2D convolutions whose batch is ``N · X``. XLA's CPU backend
  runs these several times faster than its 3D convolution, forward and
  backward (``benchmarks/RESULTS.md``).

  Args:
    x: ``(N, X, Y, Z, C_in)``.
    kernel: ``(kx, ky, kz, C_in, C_out)``, odd sides.

  Returns:
    ``(N, X, Y, Z, C_out)``, equal to ``jax.lax.conv_general_dilated`` with
    'SAME' padding up to float rounding.
  """
  n, sx, sy, sz, _ = x.shape
  kx = kernel.shape[0]
  if kx % 2 == 0:
    raise ValueError(f"kernel must have an odd X side, got shape "
                     f"{kernel.shape}")
  padded = jnp.pad(x, ((0, 0), (kx // 2, kx // 2), (0, 0), (0, 0), (0, 0)))
  out = 0
  for i in range(kx):
    planes = padded[:, i:i + sx].reshape(n * sx, sy, sz, x.shape[-1])
    out = out + jax.lax.conv_general_dilated(
        planes, kernel[i], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out.reshape(n, sx, sy, sz, kernel.shape[-1])


def _conv_general_dilated(lhs, rhs, window_strides, padding, *,
                          lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1,
                          **kwargs):
  """``nnx.Conv``'s convolution, computed the fastest way the backend has.

  On the CPU backend, a channels-last float32 3D convolution runs on oneDNN
  (``conv.conv3d``) where the native part is built; otherwise, a stride-1,
  undilated, ungrouped 'SAME' one whose kernel has an odd X side above 1
  runs as ``conv3d_by_planes``. Everything else, and every convolution on
  other backends, goes to ``jax.lax.conv_general_dilated`` unchanged, as
  does any convolution that asks for a precision, output type or sharding.
  """
  options = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                 dimension_numbers=dimension_numbers,
                 feature_group_count=feature_group_count, **kwargs)
  if conv.supported(lhs, rhs, window_strides, padding, **options):
    return conv.conv3d(lhs, rhs, window_strides, padding)
  plain = (lhs.ndim == 5 and padding == "SAME" and rhs.shape[0] % 2 == 1
           and rhs.shape[0] > 1
           and dimension_numbers == jax.lax.conv_dimension_numbers(
               lhs.shape, rhs.shape, ("NDHWC", "DHWIO", "NDHWC"))
           and all(s == 1 for s in window_strides)
           and all(d == 1 for d in (lhs_dilation or (1,)))
           and all(d == 1 for d in (rhs_dilation or (1,)))
           and feature_group_count == 1
           and all(v is None for v in kwargs.values()))
  if plain and jax.default_backend() == "cpu":
    return conv3d_by_planes(lhs, rhs)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                      **options)


def _norm(kind: str, channels: int, rngs: nnx.Rngs) -> nnx.Module:
  if kind == "batch":
    return nnx.BatchNorm(channels, rngs=rngs)
  if kind == "group":
    return GroupNorm(channels, num_groups=math.gcd(channels, _MAX_GROUPS),
                     rngs=rngs)
  return nnx.InstanceNorm(channels, rngs=rngs)


class GroupNorm(nnx.Module):
  """Group normalisation (Wu and He, ECCV 2018): ``nnx.GroupNorm``'s maths,
  parameters and initialisation, with faster statistics on XLA's CPU.

  Each case's channels are split into ``num_groups`` groups; every group is
  normalised by its mean and variance over its voxels and channels, then
  each channel is scaled and shifted (``scale``, ``bias``). The statistics
  are sums over the voxels of ``(N, X·Y·Z, C)`` per channel, then over the
  channels of a group; ``nnx.GroupNorm`` reduces a
  ``(N, X, Y, Z, G, C / G)`` reshape over four axes, which XLA's CPU backend
  runs about twice as slowly, forward and backward, at 2 × 64×64×48 × 16
  channels (``benchmarks/RESULTS.md``). Results agree to float32 rounding;
  checkpoints of either load into the other.

  ``(N, X, Y, Z, C) -> (N, X, Y, Z, C)``.
  """

  def __init__(self, channels: int, *, num_groups: int,
               epsilon: float = 1e-6, rngs: nnx.Rngs):
    if channels % num_groups:
      raise ValueError(f"num_groups ({num_groups}) must divide channels "
                       f"({channels})")
    self.num_groups = num_groups
    self.epsilon = epsilon
    # Drawn as nnx.GroupNorm draws them, so that the layers after it get the
    # same initial weights.
    self.scale = nnx.Param(nnx.initializers.ones(rngs.params(), (channels,)))
    self.bias = nnx.Param(nnx.initializers.zeros(rngs.params(), (channels,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, channels = x.shape[0], x.shape[-1]
    per_group = channels // self.num_groups
    voxels = x.reshape(n, -1, channels)
    count = voxels.shape[1] * per_group

    def group_mean(values):
      return values.sum(axis=1).reshape(n, self.num_groups, per_group).sum(
          axis=-1) / count

    mean = group_mean(voxels)
    # Var = E[x²] − E[x]², as nnx.GroupNorm's fast variance.
    variance = jnp.maximum(group_mean(jnp.square(voxels)) - jnp.square(mean),
                           0)
    inverse = jnp.repeat(jax.lax.rsqrt(variance + self.epsilon), per_group,
                         axis=1)
    multiplier = inverse * self.scale[...]
    shift = self.bias[...] - jnp.repeat(mean, per_group, axis=1) * multiplier
    return (voxels * multiplier[:, None] + shift[:, None]).reshape(x.shape)


class ConvBlock(nnx.Module):
  """Two ``3×3×3`` convolutions, each followed by a normalisation and a ReLU.

  ``(N, X, Y, Z, in_channels) -> (N, X, Y, Z, out_channels)``.
  """

  def __init__(self, in_channels: int, out_channels: int, *, norm: str,
               rngs: nnx.Rngs):
    # No convolution bias: the normalisation after it subtracts the mean
    # anyway, so its gradient is rounding noise (which Adam would amplify).
    self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3, 3),
                          use_bias=False,
                          conv_general_dilated=_conv_general_dilated,
                          rngs=rngs)
    self.norm1 = _norm(norm, out_channels, rngs)
    self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3, 3),
                          use_bias=False,
                          conv_general_dilated=_conv_general_dilated,
                          rngs=rngs)
    self.norm2 = _norm(norm, out_channels, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.norm1(self.conv1(x)))
    return nnx.relu(self.norm2(self.conv2(x)))


class UpConv(nnx.Module):
  """``2×2×2`` stride-2 transposed convolution, as a matmul and a reshape.

  Output voxel ``(2x + a, 2y + b, 2z + c)`` is input voxel ``(x, y, z)`` times
  the kernel slice ``(a, b, c)``: the windows do not overlap, so the
  transposed convolution is one ``C_in -> 8 · C_out`` matrix product per voxel
  followed by depth-to-space, which XLA's CPU backend runs far faster than
  ``nnx.ConvTranspose`` (``benchmarks/RESULTS.md``). ``nnx.ConvTranspose``
  with the kernel flipped in space gives the same output. On CPU where the
  oneDNN convolutions are built, the same weights go to
  ``conv.conv3d_transpose`` instead, which writes the up-sampled voxels in
  place.

  ``(N, X, Y, Z, in_channels) -> (N, 2X, 2Y, 2Z, out_channels)``.
  """

  def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
    self.out_channels = out_channels
    self.linear = nnx.Linear(in_channels, 8 * out_channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, sx, sy, sz, c_in = x.shape
    kernel, bias = self.linear.kernel[...], self.linear.bias[...]
    if (x.dtype == kernel.dtype == jnp.float32
        and jax.default_backend() == "cpu" and conv.available()):
      # XLA would copy the matmul's output into place, and its gradient back
      # for the kernel gradient; oneDNN reads and writes them in place.
      taps = kernel.reshape(c_in, 2, 2, 2, self.out_channels)
      y = conv.conv3d_transpose(x, taps.transpose(1, 2, 3, 4, 0), (2, 2, 2))
      y = y.reshape(n, sx, 2, sy, 2, sz, 2, self.out_channels)
      y = y + bias.reshape(2, 2, 2, self.out_channels)[:, None, :, None, :]
      return y.reshape(n, 2 * sx, 2 * sy, 2 * sz, self.out_channels)
    y = self.linear(x).reshape(n, sx, sy, sz, 2, 2, 2, self.out_channels)
    y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(n, 2 * sx, 2 * sy, 2 * sz, self.out_channels)


def _max_pool(x: jax.Array) -> jax.Array:
  """``2×2×2`` max pooling with stride 2, ``(N, X, Y, Z, C)`` sides even.

  A reshape and a max: unlike ``nnx.max_pool``'s ``reduce_window``, whose
  gradient XLA's CPU backend computes slowly.
  """
  n, sx, sy, sz, c = x.shape
  windows = x.reshape(n, sx // 2, 2, sy // 2, 2, sz // 2, 2, c)
  return windows.max(axis=(2, 4, 6))


class UNet(nnx.Module):
  """3D U-Net (Çiçek et al. 2016) returning logits, channels-last.

  ``(N, X, Y, Z, in_channels) -> (N, X, Y, Z, out_channels)``; each spatial
  side must be a multiple of ``2^(depth - 1)``.
  """

  def __init__(self, *, in_channels: int, out_channels: int,
               base_channels: int = 16, depth: int = 4, norm: str = "group",
               rngs: nnx.Rngs):
    """Builds the network.

    Args:
      in_channels: image channels (modalities).
      out_channels: 1 for a binary foreground read with a sigmoid, or the
        number of classes (background included) read with a softmax.
      base_channels: width of the first level; level ``l`` has
        ``base_channels · 2^l`` channels.
      depth: resolution levels, including the bottleneck (Çiçek et al.
        use 4).
      norm: ``"batch"``, ``"group"`` (up to 8 groups) or ``"instance"``.
      rngs: parameter initialisation.
    """
    for name, value, low in (("in_channels", in_channels, 1),
                             ("out_channels", out_channels, 1),
                             ("base_channels", base_channels, 1),
                             ("depth", depth, 1)):
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    self.in_channels = in_channels
    self.depth = depth
    widths = [base_channels * 2 ** level for level in range(depth)]
    self.encoder = nnx.List([
        ConvBlock(c_in, c_out, norm=norm, rngs=rngs)
        for c_in, c_out in zip([in_channels] + widths[:-1], widths)])
    self.up = nnx.List([UpConv(widths[l + 1], widths[l], rngs=rngs)
                        for l in range(depth - 1)])
    self.decoder = nnx.List([ConvBlock(2 * widths[l], widths[l], norm=norm,
                                       rngs=rngs) for l in range(depth - 1)])
    self.head = nnx.Conv(widths[0], out_channels, (1, 1, 1),
                         conv_general_dilated=_conv_general_dilated,
                         rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 5 or x.shape[-1] != self.in_channels:
      raise ValueError(f"input must be (N, X, Y, Z, {self.in_channels}), got "
                       f"shape {x.shape}")
    check_spatial_shape(x.shape[1:4], self.depth)
    skips = []
    for level, block in enumerate(self.encoder):
      x = block(x)
      if level < self.depth - 1:
        skips.append(x)
        x = _max_pool(x)
    for level in reversed(range(self.depth - 1)):
      x = jnp.concatenate([self.up[level](x), skips[level]], axis=-1)
      x = self.decoder[level](x)
    return self.head(x)


def probabilities(logits: jax.Array) -> jax.Array:
  """Sigmoid of a single channel, softmax over channels otherwise.

  Args:
    logits: ``(..., C)`` network output.

  Returns:
    ``(..., C)`` probabilities in [0, 1].
  """
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


def count_parameters(model: nnx.Module) -> int:
  """Number of trainable scalars (``nnx.Param``) in ``model``."""
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
