"""Tests for topojax/conv.py: oneDNN's 3D convolutions against XLA's."""

import logging
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topojax import conv

_DIMENSIONS = ("NDHWC", "DHWIO", "NDHWC")


@pytest.fixture(autouse=True)
def native():
  if jax.default_backend() != "cpu":
    pytest.skip("oneDNN convolutions run on the CPU backend only")
  reason = conv._native()
  if reason is not None:
    pytest.skip(f"oneDNN convolutions unavailable: {reason}")


def _random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _lax(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=_DIMENSIONS)


# (input, kernel, strides, padding): odd sides and channel counts, strides
# that do and do not divide, asymmetric and 'SAME' padding, 1×1×1 kernels.
CASES = [
    ((2, 7, 6, 5, 3), (3, 3, 3, 3, 5), (1, 1, 1), "SAME"),
    ((1, 9, 8, 7, 2), (3, 2, 5, 2, 4), (2, 1, 3), ((1, 2), (0, 1), (2, 0))),
    ((2, 8, 8, 8, 1), (3, 3, 3, 1, 8), (1, 1, 1), "VALID"),
    ((3, 5, 6, 7, 6), (1, 1, 1, 6, 1), (1, 1, 1), "SAME"),
    ((1, 7, 6, 5, 4), (2, 2, 2, 4, 3), (2, 2, 2), "VALID"),
    ((1, 10, 9, 8, 17), (5, 3, 3, 17, 9), (3, 2, 1), "SAME"),
    # Stride 1 with whole vectors of output channels: the kernel gradient is
    # the direct AVX2 loop; tiles of 32 + 8 and 16 + 8 channels, input
    # channels in partial tiles, padding wider than the kernel (taps that
    # see no input), more and fewer planes than its groups.
    ((2, 10, 6, 7, 13), (3, 3, 3, 13, 40), (1, 1, 1), ((3, 0), (1, 1), (0, 2))),
    ((3, 5, 4, 9, 5), (2, 3, 4, 5, 24), (1, 1, 1), "SAME"),
    ((1, 4, 5, 6, 16), (1, 1, 1, 16, 16), (1, 1, 1), "VALID"),
]


@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", CASES)
def test_values_and_gradients_equal_xla_in_float64(x_shape, kernel_shape,
                                                   strides, padding):
  x, kernel = _random(x_shape, 0), _random(kernel_shape, 1)
  got, vjp = jax.vjp(
      jax.jit(lambda x, k: conv.conv3d(x, k, strides, padding)), x, kernel)
  cotangent = _random(got.shape, 2)
  got_grads = vjp(cotangent)
  with jax.enable_x64(True):
    expected, vjp64 = jax.vjp(lambda x, k: _lax(x, k, strides, padding),
                              x.astype(np.float64), kernel.astype(np.float64))
    expected_grads = vjp64(cotangent.astype(np.float64))
    expected, expected_grads = jax.device_get((expected, expected_grads))
  assert got.shape == expected.shape and got.dtype == np.float32
  # float32 rounding of sums of a few hundred products of unit normals.
  for g, e in zip((got, *got_grads), (expected, *expected_grads)):
    np.testing.assert_allclose(g, e, rtol=0, atol=2e-6 * np.abs(e).max())


# (input, kernel, strides) of a transposed convolution: the U-Net's 2×2×2
# stride-2 up-convolution, and overlapping windows with uneven strides.
TRANSPOSE_CASES = [
    ((2, 3, 4, 2, 5), (2, 2, 2, 3, 5), (2, 2, 2)),
    ((1, 3, 2, 4, 4), (3, 2, 3, 2, 4), (2, 1, 3)),
]


@pytest.mark.parametrize("x_shape, kernel_shape, strides", TRANSPOSE_CASES)
def test_transpose_is_the_input_gradient_of_a_valid_convolution(
    x_shape, kernel_shape, strides):
  x, kernel = _random(x_shape, 0), _random(kernel_shape, 1)
  got, vjp = jax.vjp(jax.jit(
      lambda x, k: conv.conv3d_transpose(x, k, strides)), x, kernel)
  cotangent = _random(got.shape, 2)
  got_grads = vjp(cotangent)

  def transpose(x, kernel):
    # The definition: the transpose of y -> conv(y, kernel), as JAX's VJP.
    y = jnp.zeros(got.shape, x.dtype)
    return jax.vjp(lambda y: _lax(y, kernel, strides, "VALID"), y)[1](x)[0]

  with jax.enable_x64(True):
    expected, vjp64 = jax.vjp(transpose, x.astype(np.float64),
                              kernel.astype(np.float64))
    expected_grads = vjp64(cotangent.astype(np.float64))
    expected, expected_grads = jax.device_get((expected, expected_grads))
  assert got.shape == expected.shape and got.dtype == np.float32
  for g, e in zip((got, *got_grads), (expected, *expected_grads)):
    np.testing.assert_allclose(g, e, rtol=0, atol=2e-6 * np.abs(e).max())


def test_an_empty_output_has_a_zero_kernel_gradient():
  # A 'VALID' kernel longer than the input: no output voxel, nothing summed.
  x, kernel = _random((2, 2, 5, 5, 3), 0), _random((3, 3, 3, 3, 8), 1)
  out, vjp = jax.vjp(lambda x, k: conv.conv3d(x, k, padding="VALID"), x,
                     kernel)
  assert out.shape == (2, 0, 3, 3, 8)
  x_grad, kernel_grad = jax.device_get(vjp(out))
  np.testing.assert_array_equal(kernel_grad, np.zeros_like(kernel))
  np.testing.assert_array_equal(x_grad, np.zeros_like(x))


def test_repeated_calls_give_the_same_bits():
  x, kernel = _random((2, 12, 10, 8, 8), 0), _random((3, 3, 3, 8, 8), 1)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv.conv3d(x, k))),
                          argnums=(0, 1)))
  first = jax.device_get(grad(x, kernel))
  for _ in range(3):
    for a, b in zip(first, jax.device_get(grad(x, kernel))):
      np.testing.assert_array_equal(a, b)


def test_kernel_gradient_of_a_batch_is_the_sum_over_its_halves():
  # What a batch split over two devices computes: the two halves' kernel
  # gradients, summed. Long float32 sums over the whole batch differ from
  # it by ~1e-3 relative; per-sample terms summed pairwise give its bits.
  x, dy = _random((4, 16, 16, 16, 8), 0), _random((4, 16, 16, 16, 8), 1)
  kernel = _random((3, 3, 3, 8, 8), 2)
  kernel_grad = jax.jit(lambda x, dy: jax.vjp(
      lambda k: conv.conv3d(x, k), kernel)[1](dy)[0])
  whole = np.asarray(kernel_grad(x, dy))
  halves = np.asarray(kernel_grad(x[:2], dy[:2])) + np.asarray(
      kernel_grad(x[2:], dy[2:]))
  np.testing.assert_array_equal(whole, halves)


_KERNEL_GRADIENT_BYTES = """
import sys
import jax
import numpy as np
from topojax import conv
conv.available()
rng = np.random.default_rng(0)
x = rng.normal(size=(3, 10, 9, 8, 16)).astype(np.float32)
dy = rng.normal(size=(3, 10, 9, 8, 8)).astype(np.float32)
grad = jax.jit(lambda x, dy: conv._call(
    "kernel", (3, 3, 3, 16, 8), x, dy, (1, 1, 1), ((1, 1),) * 3))(x, dy)
sys.stdout.write(np.asarray(grad).tobytes().hex())
"""


def test_kernel_gradient_bits_do_not_depend_on_the_thread_count():
  # The direct loop's groups and their pairwise sum are fixed by the shapes.
  outputs = {
      threads: subprocess.run(
          [sys.executable, "-c", _KERNEL_GRADIENT_BYTES],
          env={**os.environ, "JAX_PLATFORMS": "cpu",
               "OMP_NUM_THREADS": str(threads)},
          capture_output=True, text=True, check=True, timeout=300).stdout
      for threads in (1, 2, 3)}
  assert len(outputs[1]) == 2 * 4 * 27 * 16 * 8
  assert outputs[1] == outputs[2] == outputs[3]


def test_vmap_over_a_leading_axis():
  x, kernel = _random((3, 1, 5, 4, 6, 2), 0), _random((3, 3, 3, 2, 3), 1)
  got = jax.vmap(lambda x: conv.conv3d(x, kernel))(x)
  expected = jnp.stack([_lax(xi, kernel, (1, 1, 1), "SAME") for xi in x])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, ok", [
    ({}, True),
    ({"rhs_dilation": (2, 1, 1)}, False),
    ({"feature_group_count": 2}, False),
    ({"precision": jax.lax.Precision.HIGHEST}, False),
])
def test_supported_only_for_what_conv3d_computes(kwargs, ok):
  x, kernel = jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((3, 3, 3, 2 // kwargs.get(
      "feature_group_count", 1), 2))
  numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _DIMENSIONS)
  assert conv.supported(x, kernel, (1, 1, 1), "SAME",
                        dimension_numbers=numbers, **kwargs) == ok
  assert not conv.supported(x.astype(jnp.bfloat16), kernel, (1, 1, 1),
                            "SAME", dimension_numbers=numbers)


def test_negative_padding_is_refused():
  with pytest.raises(ValueError, match="padding must be non-negative"):
    conv.conv3d(jnp.zeros((1, 4, 4, 4, 1)), jnp.zeros((3, 3, 3, 1, 1)),
                padding=((-1, 0), (0, 0), (0, 0)))


@pytest.mark.parametrize("function, kernel_shape", [
    (conv.conv3d, (3, 3, 3, 2, 1)),
    (conv.conv3d_transpose, (2, 2, 2, 1, 2)),
])
def test_mismatched_channels_are_refused(function, kernel_shape):
  with pytest.raises(ValueError, match="x must be .* got x"):
    function(jnp.zeros((1, 4, 4, 4, 3)), jnp.zeros(kernel_shape))


def test_a_checkout_without_the_library_names_its_folder(monkeypatch):
  # E.g. `pip install .`, then `python -m experiments...` in the checkout.
  monkeypatch.delenv("TOPOJAX_ONEDNN", raising=False)
  with mock.patch.object(pathlib.Path, "glob", return_value=iter(())):
    reason = conv._native.__wrapped__()
  assert str(pathlib.Path(conv.__file__).parent) in reason
  assert "pip install -e ." in reason


def test_unavailable_says_so_once(caplog):
  conv.available.cache_clear()
  try:
    with mock.patch.object(conv, "_native", return_value="not built"), \
        caplog.at_level(logging.WARNING, logger="topojax"):
      assert not conv.available() and not conv.available()
  finally:
    conv.available.cache_clear()
  assert caplog.messages == [
      "topojax: oneDNN convolutions unavailable (not built); 3D "
      "convolutions on the CPU use XLA's"]
  assert conv.available()


def test_train_step_equals_the_xla_path():
  """Two Adam steps of a small U-Net, on oneDNN and on XLA's convolutions."""
  from topojax import train

  config = train.TrainConfig(shape=(8, 8, 8), base_channels=4, depth=2,
                             norm="group", batch_size=2, kernel_sizes=(4,))
  mesh = train.data_mesh()
  images = _random((2, 8, 8, 8, 1), 0)
  labels = (_random((2, 8, 8, 8, 1), 1) > 0.5).astype(np.float32)

  def two_steps():
    # A new step function per path: jit would reuse the first one's trace.
    model_def, state = train.init_state(config, in_channels=1,
                                        out_channels=1, mesh=mesh)
    step = train.make_train_step.__wrapped__(
        model_def, mesh, loss="dice", kernel_sizes=(4,))
    losses = []
    for _ in range(2):
      state, loss = step(state, images, labels, 1e-3, 1.0)
      losses.append(float(loss))
    return losses, jax.device_get(state["model"])

  with mock.patch.object(conv, "conv3d", wraps=conv.conv3d) as native, \
      mock.patch.object(conv, "conv3d_transpose",
                        wraps=conv.conv3d_transpose) as up:
    losses, model = two_steps()
  # 2 convolutions in each of 2 encoder blocks and 1 decoder block, the head;
  # one up-convolution.
  assert native.call_count == 7 and up.call_count == 1
  with mock.patch.object(conv, "available", return_value=False):
    xla_losses, xla_model = two_steps()
  np.testing.assert_allclose(losses, xla_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(xla_model)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# The start of the scripts that run on several host devices: a 1D mesh, a
# batch split over it and a whole (replicated) array.
_ON_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from topojax import conv
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
batch = jax.NamedSharding(mesh, jax.P("data"))
whole = jax.NamedSharding(mesh, jax.P())
rng = np.random.default_rng(0)
"""

_SHARDED = _ON_DEVICES + """
x = rng.normal(size=(4, 6, 5, 4, 3)).astype(np.float32)
kernel = rng.normal(size=(3, 3, 3, 3, 2)).astype(np.float32)
# Squares: terms of one sign, so that the value's error is float32's and not
# a cancellation's (a sum of sines near 0 read as 1e-5 relative error).
def loss(conv3d):
  return lambda x, k: jnp.sum(jnp.sin(conv3d(x, k)) ** 2)
lax = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
step = jax.jit(jax.value_and_grad(loss(conv.conv3d), argnums=(0, 1)),
               in_shardings=(batch, whole))
hlo = step.lower(x, kernel).compile().as_text()
calls = [l for l in hlo.splitlines() if "custom_call_target=\\"topojax" in l]
print(len(calls), all("f32[1,6,5,4," in l for l in calls))
got = step(jax.device_put(x, batch), jax.device_put(kernel, whole))
expected = jax.value_and_grad(loss(lax), argnums=(0, 1))(x, kernel)
print(max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(b).max())
          for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))))
"""


def test_a_batch_split_over_devices_is_convolved_per_device():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  out = subprocess.run([sys.executable, "-c", _SHARDED], env=env,
                       capture_output=True, text=True, check=True, timeout=300)
  count, per_device, error = out.stdout.split()
  # Forward, input and kernel gradient, each on one case of the four.
  assert count == "3" and per_device == "True"
  assert float(error) < 1e-5


_SPLIT_IN_TWO = _ON_DEVICES + """
x = rng.normal(size=(4, 8, 7, 6, 3)).astype(np.float32)
kernel = rng.normal(size=(3, 3, 3, 3, 5)).astype(np.float32)
up = rng.normal(size=(2, 2, 2, 3, 5)).astype(np.float32)
def grad(x, k, up):
  return jax.grad(lambda x, k, up: jnp.sum(jnp.sin(conv.conv3d_transpose(
      conv.conv3d(x, k), up, (2, 2, 2)))), argnums=(0, 1, 2))(x, k, up)
# Fetched first: np.array_equal would read a failed computation as False.
split = jax.device_get(
    jax.jit(grad, in_shardings=(batch, whole, whole))(x, kernel, up))
one = jax.device_get(
    jax.jit(grad, in_shardings=(whole, whole, whole))(x, kernel, up))
print(all(np.array_equal(a, b) for a, b in zip(split, one)))
"""


def test_a_batch_split_over_two_devices_gives_one_devices_bits():
  # What lets two processes of one device each reproduce one process of two
  # devices bit for bit (tests/test_train_loop.py): every case's values and
  # input gradient are computed alone, and the kernel gradient is the
  # pairwise sum of per-case terms, which the two devices' sum repeats;
  # for the up-convolution too.
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  out = subprocess.run([sys.executable, "-c", _SPLIT_IN_TWO], env=env,
                       capture_output=True, text=True, check=True, timeout=300)
  assert out.stdout.split() == ["True"]
