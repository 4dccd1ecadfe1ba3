"""glibc's allocator told to keep freed memory, for XLA's CPU step buffers.

A compiled step on XLA's CPU backend ``malloc``s its activations and
gradients when it starts and frees them when it ends. glibc serves large
blocks (above 128 KiB at first, a threshold it raises as such blocks are
freed, to 32 MiB at most) with fresh ``mmap`` pages, unmapped again on
``free``, and hands the free top of its heap back to the kernel above
128 KiB. Each step then faults its buffers' pages in anew, each one zeroed by
the kernel: 15.9 million page faults and 28 s of system time in the main
job (``experiments.reproduce``), whose steps are 0.1 s.

``keep_freed_memory`` sets both thresholds to 1 GiB, so freed blocks stay in
the process for the next step: the main job's step 108 → 97 ms, the whole
job 189 → 179 s, page faults 15.9 → 2.4 million, for a peak resident size
of 1.46 instead of 1.06 GB (``benchmarks/RESULTS.md``). The compiled steps
of training and prediction call it on the CPU backend
(``topojax.train.steps``); it changes no result.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

# The largest block served from the heap, and the free heap top kept.
KEPT_BYTES = 1 << 30
# mallopt's parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Where a user sets glibc's malloc thresholds themselves.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_TOP_PAD_")


@functools.cache
def keep_freed_memory() -> bool:
  """Has glibc keep freed blocks under ``KEPT_BYTES`` for reuse.

  Process-wide, once per process. Nothing is changed where the C library is
  not glibc, nor where the environment already sets glibc's malloc
  thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
  ``MALLOC_TOP_PAD_``, or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``):
  the user's choice stands.

  Returns:
    Whether glibc took the setting.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if (any(name in os.environ for name in _USER_SETTINGS)
      or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
    return False
  libc = ctypes.CDLL(None)
  # Setting either threshold also stops glibc's own raising of the mmap one.
  return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEPT_BYTES)
              and libc.mallopt(_M_TRIM_THRESHOLD, KEPT_BYTES))
