"""Tests for topojax/unet.py."""

import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from topojax import conv
from topojax import unet


def _build(**kwargs):
  """A UNet initialised in one compiled function, as topojax.train does.

  Eager initialisation compiles every initialiser of every shape on its own,
  tens of seconds on a CPU.
  """
  make = lambda: unet.UNet(**kwargs, rngs=nnx.Rngs(0))
  state = jax.jit(lambda: nnx.state(make()),
                  compiler_options={"xla_backend_optimization_level": 0})()
  return nnx.merge(nnx.graphdef(nnx.eval_shape(make)), state)


def _abstract(**kwargs):
  """Shapes only: no weights are computed."""
  return nnx.eval_shape(lambda: unet.UNet(**kwargs, rngs=nnx.Rngs(0)))


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     dtype=jnp.float32)


@pytest.mark.parametrize("kernel_shape", [(3, 3, 3, 2, 5), (5, 3, 1, 3, 2),
                                          (1, 3, 3, 4, 4)])
def test_conv3d_by_planes_matches_the_3d_convolution(kernel_shape):
  x = _random((2, 7, 6, 5, kernel_shape[3]))
  kernel = _random(kernel_shape, seed=1)
  expected = jax.lax.conv_general_dilated(
      x, kernel, (1, 1, 1), "SAME",
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  np.testing.assert_allclose(unet.conv3d_by_planes(x, kernel), expected,
                             rtol=1e-5, atol=1e-5)


def test_conv3d_by_planes_rejects_an_even_x_side():
  with pytest.raises(ValueError, match="odd X side"):
    unet.conv3d_by_planes(_random((1, 4, 4, 4, 1)), _random((2, 3, 3, 1, 1)))


def test_conv3d_by_planes_gradient_matches_the_3d_convolution():
  x = _random((1, 6, 5, 4, 3))
  kernel = _random((3, 3, 3, 3, 2), seed=1)

  def loss(conv):
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

  def lax_conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

  got = jax.grad(loss(unet.conv3d_by_planes), argnums=(0, 1))(x, kernel)
  expected = jax.grad(loss(lax_conv), argnums=(0, 1))(x, kernel)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_up_conv_is_a_stride_2_transposed_convolution():
  layer = unet.UpConv(3, 2, rngs=nnx.Rngs(0))
  x = _random((2, 2, 3, 2, 3))
  weights = np.asarray(layer.linear.kernel[...]).reshape(3, 2, 2, 2, 2)
  bias = np.asarray(layer.linear.bias[...]).reshape(2, 2, 2, 2)
  # Definition: output voxel 2p + o is input voxel p times kernel tap o.
  expected = np.zeros((2, 4, 6, 4, 2), np.float32)
  for o in np.ndindex(2, 2, 2):
    tap = np.einsum("nxyzc,cd->nxyzd", np.asarray(x), weights[:, o[0], o[1],
                                                              o[2]])
    expected[:, o[0]::2, o[1]::2, o[2]::2] = tap + bias[o]
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_up_conv_equals_flax_conv_transpose_with_the_same_weights():
  layer = unet.UpConv(3, 2, rngs=nnx.Rngs(0))
  stock = nnx.ConvTranspose(3, 2, (2, 2, 2), (2, 2, 2), rngs=nnx.Rngs(1))
  kernel = np.asarray(layer.linear.kernel[...]).reshape(3, 2, 2, 2, 2)
  # nnx.ConvTranspose (transpose_kernel=False) applies its kernel flipped in
  # space: tap o of ours is tap 1 - o of its.
  stock.kernel[...] = jnp.asarray(
      np.flip(np.moveaxis(kernel, 0, 3), (0, 1, 2)).copy())
  stock.bias[...] = _random((2,), seed=2)
  # Flax's bias is per output channel: ours repeats it at each of the 8 taps.
  layer.linear.bias[...] = jnp.tile(stock.bias[...], 8)
  x = _random((1, 3, 2, 2, 3))
  np.testing.assert_allclose(layer(x), stock(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", unet.NORMS)
@pytest.mark.parametrize("out_channels", [1, 3])
def test_unet_output_shape(norm, out_channels):
  model = _abstract(in_channels=2, out_channels=out_channels,
                    base_channels=4, depth=3, norm=norm)
  logits = nnx.eval_shape(lambda m, x: m(x), model,
                          jax.ShapeDtypeStruct((2, 8, 12, 4, 2), jnp.float32))
  assert logits.shape == (2, 8, 12, 4, out_channels)


def _expected_parameters(c_in, c_out, base, depth, norm_params_per_channel):
  """Counts the weights of the architecture from its description."""
  def conv(a, b, k=3, bias=False):
    return k ** 3 * a * b + (b if bias else 0)

  # 3×3×3 convolutions without bias (a normalisation follows each).
  widths = [base * 2 ** l for l in range(depth)]
  total = 0
  for a, b in zip([c_in] + widths[:-1], widths):  # encoder blocks
    total += conv(a, b) + conv(b, b) + 2 * norm_params_per_channel * b
  for l in range(depth - 1):
    total += widths[l + 1] * 8 * widths[l] + 8 * widths[l]  # up-convolution
    total += conv(2 * widths[l], widths[l]) + conv(widths[l], widths[l])
    total += 2 * norm_params_per_channel * widths[l]
  return total + conv(widths[0], c_out, k=1, bias=True)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_count_parameters(depth):
  model = _abstract(in_channels=1, out_channels=2, base_channels=8,
                    depth=depth, norm="group")
  # GroupNorm: a scale and a bias per channel.
  assert unet.count_parameters(model) == _expected_parameters(1, 2, 8, depth,
                                                              2)


def test_batch_norm_statistics_are_not_parameters():
  model = _abstract(in_channels=1, out_channels=1, base_channels=4, depth=2,
                    norm="batch")
  assert unet.count_parameters(model) == _expected_parameters(1, 1, 4, 2, 2)


def test_group_norm_uses_up_to_8_groups_dividing_the_width():
  model = _abstract(in_channels=1, out_channels=1, base_channels=12, depth=2)
  assert model.encoder[0].norm1.num_groups == math.gcd(12, 8) == 4
  assert model.encoder[1].norm1.num_groups == 8


@pytest.mark.parametrize("shape, num_groups", [
    ((2, 6, 5, 4, 16), 8), ((1, 4, 4, 4, 3), 3), ((3, 8, 8, 8, 8), 4),
    ((1, 3, 5, 7, 6), 1)])
def test_group_norm_is_flax_group_norm(shape, num_groups):
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(3 * rng.normal(size=shape) + 1, jnp.float32)
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours = unet.GroupNorm(shape[-1], num_groups=num_groups, rngs=nnx.Rngs(0))
  flax = nnx.GroupNorm(shape[-1], num_groups=num_groups, rngs=nnx.Rngs(0))
  # The same parameters, drawn from the same keys.
  for a, b in zip(jax.tree.leaves(nnx.state(ours)),
                  jax.tree.leaves(nnx.state(flax))):
    np.testing.assert_array_equal(a, b)
  for norm in (ours, flax):
    norm.scale[...] = jnp.arange(1, shape[-1] + 1, dtype=jnp.float32) / 4
    norm.bias[...] = jnp.linspace(-1, 1, shape[-1], dtype=jnp.float32)

  def loss(norm, x):
    return jnp.sum(weights * jax.nn.relu(norm(x)))

  (value, grads), (flax_value, flax_grads) = (
      nnx.value_and_grad(loss, argnums=(0, 1))(norm, x)
      for norm in (ours, flax))
  np.testing.assert_allclose(ours(x), flax(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, flax_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_group_norm_rejects_groups_not_dividing_the_channels():
  with pytest.raises(ValueError, match="num_groups .3. must divide channels"):
    unet.GroupNorm(8, num_groups=3, rngs=nnx.Rngs(0))


def test_cpu_planes_and_3d_convolution_give_the_same_network():
  model = _build(in_channels=1, out_channels=1, base_channels=4, depth=2)
  x = _random((1, 8, 8, 8, 1))
  forward = lambda m, x: m(x)
  # Without the oneDNN convolutions, the CPU takes the planes.
  with mock.patch.object(conv, "available", return_value=False), \
      mock.patch.object(unet, "conv3d_by_planes",
                        wraps=unet.conv3d_by_planes) as planes:
    on_cpu = nnx.jit(forward)(model, x)
  # 2 convolutions in each of the 2 encoder blocks and 1 decoder block.
  assert planes.call_count == 6
  with mock.patch.object(jax, "default_backend", return_value="gpu"):
    elsewhere = nnx.jit(forward)(model, x)
  assert np.isfinite(np.asarray(on_cpu)).all()
  np.testing.assert_allclose(on_cpu, elsewhere, rtol=1e-4, atol=1e-5)


def test_onednn_and_xla_convolutions_give_the_same_network():
  if jax.default_backend() != "cpu" or conv._native() is not None:
    pytest.skip(f"oneDNN convolutions unavailable: {conv._native()}")
  model = _build(in_channels=2, out_channels=3, base_channels=4, depth=3)
  x = _random((2, 8, 12, 4, 2))
  loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
  with mock.patch.object(conv, "conv3d", wraps=conv.conv3d) as native:
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model, x)
  # Every convolution of the 3 encoder and 2 decoder blocks, and the head.
  assert native.call_count == 11
  with mock.patch.object(jax, "default_backend", return_value="gpu"):
    xla_value, xla_grads = nnx.jit(nnx.value_and_grad(loss))(model, x)
  np.testing.assert_allclose(value, xla_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("shape, depth", [((8, 8, 6), 3), ((8, 8, 7), 2),
                                          ((12, 8), 2)])
def test_check_spatial_shape_rejects_sides_not_divisible(shape, depth):
  with pytest.raises(ValueError, match=r"multiple of 2\^\(depth-1\)"):
    unet.check_spatial_shape(shape, depth)


def test_unet_rejects_bad_input_before_tracing():
  model = _abstract(in_channels=1, out_channels=1, base_channels=4, depth=3)
  with pytest.raises(ValueError, match=r"multiple of 2\^\(depth-1\) = 4"):
    model(_random((1, 8, 8, 6, 1)))
  with pytest.raises(ValueError, match=r"\(N, X, Y, Z, 1\)"):
    model(_random((1, 8, 8, 8, 2)))


@pytest.mark.parametrize("kwargs, match", [
    ({"norm": "layer"}, "norm must be one of"),
    ({"depth": 0}, "depth must be an int >= 1"),
    ({"base_channels": 2.0}, "base_channels must be an int"),
])
def test_unet_rejects_bad_configuration(kwargs, match):
  options = {"in_channels": 1, "out_channels": 1, **kwargs}
  with pytest.raises(ValueError, match=match):
    unet.UNet(**options, rngs=nnx.Rngs(0))


def test_probabilities():
  logits = _random((2, 3, 3, 3, 1))
  np.testing.assert_allclose(unet.probabilities(logits),
                             1 / (1 + np.exp(-np.asarray(logits))), rtol=1e-6)
  probs = unet.probabilities(_random((2, 3, 3, 3, 4)))
  np.testing.assert_allclose(np.sum(probs, axis=-1), 1, rtol=1e-6)
