"""Tests for topojax/losses/_host.py: order, fallbacks, errors."""

import threading
import time

import pytest

from topojax.losses import _host


def test_available_cores_is_a_positive_int():
  cores = _host.available_cores()
  assert isinstance(cores, int) and cores >= 1


@pytest.mark.parametrize("num_workers", [1, 2, 3, 8])
def test_results_come_back_in_item_order(num_workers):
  # Later items finish first: the order must still be the items'.
  items = [(k, 0.002 * (5 - k)) for k in range(6)]

  def slow_square(k, delay):
    time.sleep(delay)
    return k * k

  assert _host.map_items(slow_square, items, num_workers=num_workers) == [
      k * k for k in range(6)]


def test_items_run_concurrently_on_threads():
  barrier = threading.Barrier(2, timeout=10)
  # Both items wait for each other: this only returns if they overlap.
  assert _host.map_items(lambda k: barrier.wait() is not None and k,
                         [(1,), (2,)], num_workers=2) == [1, 2]


def test_one_worker_or_one_item_runs_in_the_calling_thread():
  caller = threading.get_ident()
  where = lambda: threading.get_ident()
  assert _host.map_items(where, [(), ()], num_workers=1) == [caller] * 2
  assert _host.map_items(where, [()], num_workers=4) == [caller]
  assert _host.map_items(where, [], num_workers=4) == []


def test_an_error_in_an_item_is_raised():
  def fail_on_two(k):
    if k == 2:
      raise RuntimeError("item two")
    return k

  with pytest.raises(RuntimeError, match="item two"):
    _host.map_items(fail_on_two, [(k,) for k in range(4)], num_workers=2)
