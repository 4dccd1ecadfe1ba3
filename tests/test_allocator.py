"""Tests for topojax/allocator.py: freed blocks kept for the next step."""

import mmap
import os
import platform
import subprocess
import sys

import pytest

from topojax import allocator

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator only")

# A block above the 32 MiB that glibc's own mmap threshold rises to.
_BLOCK_BYTES = 64 << 20
_BLOCK_PAGES = _BLOCK_BYTES // mmap.PAGESIZE

# Page faults of three rounds of malloc, touch and free of the block, after
# ``setup``.
_ROUNDS = """
import ctypes, resource
{setup}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = {size}
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

_FORWARD_FACTORY = """
from topojax import train
from topojax.train import steps
model_def, _ = train.abstract_model(
    train.TrainConfig(shape=(8, 8, 8), base_channels=2, depth=2,
                      kernel_sizes=(2, 4)),
    in_channels=1, out_channels=1)
steps.make_forward(model_def)
"""


def _faults(setup: str, **env) -> list[int]:
  out = subprocess.run(
      [sys.executable, "-c", _ROUNDS.format(setup=setup, size=_BLOCK_BYTES)],
      env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
      capture_output=True, text=True, check=True, timeout=300)
  return [int(line) for line in out.stdout.split()]


@glibc
@pytest.mark.parametrize("setup", [
    "from topojax import allocator; assert allocator.keep_freed_memory()",
    _FORWARD_FACTORY,  # what training and prediction do on the CPU
])
def test_a_freed_block_is_reused_without_page_faults(setup):
  first, *later = _faults(setup)
  assert first > _BLOCK_PAGES // 2
  assert max(later) < _BLOCK_PAGES // 100


@glibc
def test_glibc_defaults_fault_the_block_in_every_round():
  # The cost the setting removes: without it, every round faults anew.
  assert min(_faults("")) > _BLOCK_PAGES // 2


@glibc
def test_the_users_own_thresholds_stand():
  setup = ("from topojax import allocator; "
           "assert not allocator.keep_freed_memory()")
  assert (min(_faults(setup, MALLOC_MMAP_THRESHOLD_="131072"))
          > _BLOCK_PAGES // 2)


@pytest.mark.parametrize("env", [
    {"MALLOC_MMAP_THRESHOLD_": "131072"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
    {"MALLOC_TOP_PAD_": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_nothing_is_set_over_a_users_setting(monkeypatch, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert allocator.keep_freed_memory.__wrapped__() is False


def test_nothing_is_set_without_glibc(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
  assert allocator.keep_freed_memory.__wrapped__() is False
