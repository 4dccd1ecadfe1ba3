"""Host-side work of the persistent-homology losses, one item per worker.

A persistent-homology loss computes, per sample and channel, diagrams and a
matching on the host; the items are independent, so they run concurrently
on ``num_workers`` threads. ``map_items`` returns results in the order of the
items whatever the number of workers, so the parallel path gives exactly
the serial path's answer.

Threads suffice when the work happens in native code that releases the GIL:
measured on this project's 2-core CPU, two items on two threads take 0.53
to 0.60 of the serial time, with 1.8 to 1.9 cores busy, for cripser's
``computePH`` (64³), POT's ``ot.emd`` (1500 × 1500) and gudhi's
``wasserstein_distance`` (1500 and 1200 points); so does a numba ``nogil``
kernel. Threads share the arrays instead of copying them to worker
processes, and start in microseconds. Note that ``warnings.catch_warnings``
is not thread-safe: enter it around ``map_items``, not inside ``fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import concurrent.futures
import os
from typing import Any


def available_cores() -> int:
  """Cores this process may run on (its CPU affinity where the OS says)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def map_items(fn: Callable[..., Any], items: Sequence[tuple], *,
              num_workers: int) -> list[Any]:
  """``[fn(*item) for item in items]``, on up to ``num_workers`` threads."""
  if num_workers <= 1 or len(items) <= 1:
    return [fn(*item) for item in items]
  workers = min(num_workers, len(items))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda item: fn(*item), items))
