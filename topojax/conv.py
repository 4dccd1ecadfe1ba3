"""3D convolutions on the CPU through oneDNN, inside compiled JAX code.

XLA's CPU backend computes a 3D convolution, and above all its gradient,
several times slower than oneDNN, the library behind PyTorch's CPU
convolutions (``benchmarks/RESULTS.md``). ``conv3d`` calls oneDNN from inside
a jit-compiled step through XLA's FFI: a ``jax.custom_vjp`` whose forward,
input gradient and kernel gradient are each one custom call on the
channels-last arrays, without layout copies. ``conv3d_transpose``, its
transpose (the U-Net's up-convolution), reuses the same three calls.

The kernel gradient of a stride-1 convolution whose output channels fill
whole AVX2 vectors (multiples of 8) is not oneDNN's: on AVX2 oneDNN has only
im2col + GEMM for it, at a third of the speed of the direct outer-product
loop in ``_onednn_conv.cc``, which sums in an order fixed by the shapes
alone (the same bits whatever the thread count).

The native part (``topojax/_onednn_conv.cc``) is built by ``pip install``
against the ``onednn-cpu-gomp`` wheel. Where it is missing (no compiler at
install, another OS or CPU), or with ``TOPOJAX_ONEDNN=0`` in the environment,
``available()`` is False, topojax says so once in a logged warning and
computes every convolution with XLA.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import pathlib

import jax
import jax.custom_batching
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

_LOG = logging.getLogger("topojax")
_TARGETS = {"forward": "TopojaxConv3dForward",
            "input": "TopojaxConv3dBackwardInput",
            "kernel": "TopojaxConv3dBackwardKernel"}
_DIMENSIONS = ("NDHWC", "DHWIO", "NDHWC")


def _load_onednn() -> None:
  """Loads ``onednn-cpu-gomp``'s ``libdnnl.so.3`` where pip installed it, so
  that our library, which names it, finds it already loaded."""
  dist = importlib.metadata.distribution("onednn-cpu-gomp")
  for file in dist.files or ():
    if file.name == "libdnnl.so.3":
      ctypes.CDLL(str(dist.locate_file(file)), mode=ctypes.RTLD_GLOBAL)
      return
  raise OSError("onednn-cpu-gomp holds no libdnnl.so.3")


@functools.cache
def _native() -> str | None:
  """Registers the FFI targets; the reason they are unavailable, or None."""
  if os.environ.get("TOPOJAX_ONEDNN") == "0":
    return "switched off by TOPOJAX_ONEDNN=0"
  package = pathlib.Path(__file__).parent
  found = sorted(package.glob("_onednn_conv*.so"))
  if not found:
    # Often a source checkout on sys.path before an installed copy.
    return (f"no native library in {package}: `pip install .` builds it "
            "into the installed package, `pip install -e .` into a source "
            "checkout")
  try:
    _load_onednn()
    library = ctypes.CDLL(str(found[0]))
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(
          f"topojax_conv3d_{name}", jax.ffi.pycapsule(getattr(library, symbol)),
          platform="cpu")
  except (OSError, AttributeError,
          importlib.metadata.PackageNotFoundError) as error:
    return f"it does not load ({error})"
  return None


@functools.cache
def available() -> bool:
  """Whether ``conv3d`` runs on oneDNN; warns once (logged) when not."""
  reason = _native()
  if reason is not None:
    _LOG.warning("topojax: oneDNN convolutions unavailable (%s); 3D "
                 "convolutions on the CPU use XLA's", reason)
  return reason is None


def supported(lhs: jax.Array, rhs: jax.Array, window_strides, padding, *,
              lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, batch_group_count=1, **others) -> bool:
  """Whether ``jax.lax.conv_general_dilated`` with these arguments is a
  ``conv3d``: float32, channels-last 3D, undilated, ungrouped, 'SAME',
  'VALID' or non-negative explicit padding, no precision or output type
  asked for, on the CPU backend with the native part loaded."""
  return (lhs.ndim == 5 and lhs.dtype == np.float32
          and rhs.dtype == np.float32
          and dimension_numbers == jax.lax.conv_dimension_numbers(
              lhs.shape, rhs.shape, _DIMENSIONS)
          and all(d == 1 for d in (lhs_dilation or (1,)))
          and all(d == 1 for d in (rhs_dilation or (1,)))
          and feature_group_count == 1 and batch_group_count == 1
          and all(v is None for v in others.values())
          and (isinstance(padding, str) or (
              len(padding) == 3 and all(lo >= 0 and hi >= 0
                                        for lo, hi in padding)))
          and jax.default_backend() == "cpu" and available())


def _explicit_padding(padding, in_shape, kernel_shape, strides):
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(in_shape, kernel_shape, strides,
                                         padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv3d(x: jax.Array, kernel: jax.Array, strides=(1, 1, 1),
           padding="SAME") -> jax.Array:
  """A 3D convolution (cross-correlation, as ``jax.lax.conv``), by oneDNN.

  Call it only where ``supported`` holds (the CPU backend, float32).

  Args:
    x: ``(N, X, Y, Z, C_in)`` float32.
    kernel: ``(kx, ky, kz, C_in, C_out)`` float32.
    strides: three positive ints.
    padding: ``"SAME"``, ``"VALID"`` or three ``(low, high)`` pairs of
      non-negative voxel counts.

  Returns:
    ``(N, X', Y', Z', C_out)``, equal to ``jax.lax.conv_general_dilated``
    with the same arguments and channels-last dimension numbers, up to
    float32 rounding.
  """
  if not available():
    raise RuntimeError(f"oneDNN convolutions unavailable: {_native()}")
  _check_channels(x, kernel, kernel_axis=3)
  strides = tuple(int(s) for s in strides)
  pads = _explicit_padding(padding, x.shape[1:4], kernel.shape[:3], strides)
  if any(lo < 0 or hi < 0 for lo, hi in pads):
    raise ValueError(f"padding must be non-negative, got {padding}")
  return _conv(x, kernel, strides, pads)


def _check_channels(x, kernel, *, kernel_axis: int) -> None:
  if x.ndim != 5 or kernel.ndim != 5 or x.shape[-1] != kernel.shape[
      kernel_axis]:
    raise ValueError(
        f"x must be (N, X, Y, Z, C) and kernel 5D with C on its axis "
        f"{kernel_axis}, got x {x.shape} and kernel {kernel.shape}")


def _attributes(strides, pads):
  return {"strides": np.array(strides, np.int64),
          "padding_low": np.array([lo for lo, _ in pads], np.int64),
          "padding_high": np.array([hi for _, hi in pads], np.int64)}


def _call(target, result_shape, a, b, strides, pads):
  return jax.ffi.ffi_call(
      f"topojax_conv3d_{target}",
      jax.ShapeDtypeStruct(result_shape, np.float32),
      vmap_method="sequential")(a, b, **_attributes(strides, pads))


def _per_shard(target, rule, **factors):
  """``_call`` of ``target`` that XLA's partitioner runs once per batch
  shard: with the batch split over devices (the train step's data
  parallelism), each device convolves its own cases, instead of gathering
  the batch. Only the batch axis may be split; the kernel gradient, a sum
  over the batch, is summed over the devices too."""
  @functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
  def call(a, b, result_shape, strides, pads):
    return _call(target, result_shape, a, b, strides, pads)

  def partition(result_shape, strides, pads, mesh, arg_shapes, result):
    del result
    spec = arg_shapes[0].sharding.spec
    axes = spec[0] if spec else None
    batch = NamedSharding(mesh, P(axes))
    whole = NamedSharding(mesh, P())
    if target == "kernel":
      def sum_over_devices(a, b):
        partial = _call(target, result_shape, a, b, strides, pads)
        return jax.lax.psum(partial, axes) if axes else partial
      return mesh, sum_over_devices, whole, (batch, batch)
    def per_device(a, b):
      return _call(target, (a.shape[0], *result_shape[1:]), a, b, strides,
                   pads)
    return mesh, per_device, batch, (batch, whole)

  # Every factor but the batch n stays whole on each device (Shardy wants
  # them in the order they first appear).
  whole = [f for f in dict.fromkeys(rule) if f.isalpha() and f != "n"]
  call.def_partition(partition=partition, sharding_rule=rule,
                     need_replication_factors=tuple(whole), **factors)
  return call


# Factors: n batch, (a, b, c) input sides, (d, e, f) kernel sides, i and o
# input and output channels, (p, q, r) output sides.
_FORWARD = _per_shard("forward", "n a b c i, d e f i o -> n p q r o")
_INPUT = _per_shard("input", "n p q r o, d e f i o -> n a b c i")
_KERNEL = _per_shard("kernel", "n a b c i, n p q r o -> d e f i o",
                     reduction_factors=("n",))


def _mapped(call, result_shape, strides, pads):
  """``call(a, b, result_shape, strides, pads)`` as a function of ``(a, b)``
  that ``jax.vmap`` runs once per mapped element (the partitioner's custom
  call has no batching rule of its own)."""
  @jax.custom_batching.custom_vmap
  def run(a, b):
    return call(a, b, result_shape, strides, pads)

  @run.def_vmap
  def _(axis_size, in_batched, a, b):
    a, b = (v if batched else jax.numpy.broadcast_to(v, (axis_size, *v.shape))
            for v, batched in zip((a, b), in_batched))
    return jax.lax.map(lambda ab: run(*ab), (a, b)), True

  return run


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
  out = [(size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in
         zip(x.shape[1:4], kernel.shape[:3], strides, pads)]
  return _mapped(_FORWARD, (x.shape[0], *out, kernel.shape[-1]), strides,
                 pads)(x, kernel)


def _conv_forward(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_backward(strides, pads, saved, grad):
  x, kernel = saved
  return (_mapped(_INPUT, x.shape, strides, pads)(grad, kernel),
          _mapped(_KERNEL, kernel.shape, strides, pads)(x, grad))


_conv.defvjp(_conv_forward, _conv_backward)


def conv3d_transpose(x: jax.Array, kernel: jax.Array,
                     strides=(2, 2, 2)) -> jax.Array:
  """The transpose of a 'VALID' ``conv3d``, by oneDNN: an up-convolution.

  ``conv3d(·, kernel, strides, "VALID")`` maps ``(N, S_x, S_y, S_z, C_out)``
  to ``x``'s shape; this is its transpose (its input gradient), so that
  ``S = strides · (X - 1) + k`` on each side. With ``kernel`` sides equal to
  ``strides`` the windows do not overlap: output voxel ``s·p + o`` is input
  voxel ``p`` times tap ``o`` (the U-Net's ``2×2×2`` stride-2
  up-convolution). Call it only where ``supported`` holds for ``conv3d``.

  Args:
    x: ``(N, X, Y, Z, C_in)`` float32.
    kernel: ``(kx, ky, kz, C_out, C_in)`` float32, the kernel of the
      convolution it transposes (``DHWIO`` from the output's side).
    strides: three positive ints.

  Returns:
    ``(N, S_x, S_y, S_z, C_out)``.
  """
  if not available():
    raise RuntimeError(f"oneDNN convolutions unavailable: {_native()}")
  _check_channels(x, kernel, kernel_axis=4)
  return _transpose(x, kernel, tuple(int(s) for s in strides))


_VALID = ((0, 0),) * 3


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _transpose(x, kernel, strides):
  out = [s * (size - 1) + k for size, k, s in
         zip(x.shape[1:4], kernel.shape[:3], strides)]
  return _mapped(_INPUT, (x.shape[0], *out, kernel.shape[3]), strides,
                 _VALID)(x, kernel)


def _transpose_forward(x, kernel, strides):
  return _transpose(x, kernel, strides), (x, kernel)


def _transpose_backward(strides, saved, grad):
  # The transposed convolution's gradients are the convolution's forward
  # (for x) and its kernel gradient with the roles of input and output
  # swapped.
  x, kernel = saved
  return (_mapped(_FORWARD, x.shape, strides, _VALID)(grad, kernel),
          _mapped(_KERNEL, kernel.shape, strides, _VALID)(grad, x))


_transpose.defvjp(_transpose_forward, _transpose_backward)
