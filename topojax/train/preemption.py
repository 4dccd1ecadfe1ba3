"""Stopping training cleanly on SIGTERM or SIGINT (preemption, Ctrl-C).

A cluster scheduler (SLURM, Kubernetes) stops a job with SIGTERM and a grace
period; a user stops one with Ctrl-C (SIGINT). While ``topojax.train`` runs,
``catch_signals`` replaces the handlers of both: the first signal only
raises a flag, the step in flight finishes, and the loop saves its state
(mid-epoch, with its place in the epoch) and raises ``Preempted``. A second
signal of the same kind does what it did before training (Ctrl-C twice
raises ``KeyboardInterrupt`` at once). The handlers before training are put
back when it ends, however it ends, so a Python session that trains is left
as it was.

With several processes, each checks the flags of all after every step
(``StopSignals.agreed``, one all-gather of one int per process), so every
process stops after the same step even when only one received the signal.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np

# Exit status of a process stopped by a signal, as the shell reports it.
EXIT_BASE = 128
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped by a signal after saving its state; resume to go on.

  Attributes:
    signum: the signal, ``signal.SIGTERM`` or ``signal.SIGINT``.
    exit_status: ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), what a
      command line exits with.
  """

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.exit_status = EXIT_BASE + signum


class StopSignals:
  """The first SIGTERM or SIGINT received while training, if any.

  Attributes:
    signum: that signal, 0 until one comes.
  """

  def __init__(self):
    self.signum = 0
    self._previous: dict[int, object] = {}

  def _handle(self, signum, frame) -> None:
    if not self.signum:
      self.signum = signum
      return
    # A second signal: do now what it did before training.
    previous = self._previous.get(signum, signal.SIG_DFL)
    if callable(previous):
      previous(signum, frame)
    else:
      signal.signal(signum, previous)
      os.kill(os.getpid(), signum)

  def agreed(self) -> int:
    """The signal every process stops for, 0 for none; all processes call it.

    Each process's flag is gathered (one ``int32`` per process); the highest
    signal number wins, so that every process exits alike.
    """
    if jax.process_count() == 1:
      return self.signum
    flags = multihost_utils.process_allgather(np.int32(self.signum))
    return int(np.max(flags))


_active: list[StopSignals] = []


@contextlib.contextmanager
def catch_signals() -> Iterator[StopSignals]:
  """Catches SIGTERM and SIGINT inside the ``with`` block.

  Nested blocks share the outer block's ``StopSignals``, so that a signal
  between two phases is still seen by the next. Outside Python's main
  thread no handler can be set: the flag is then never raised.
  """
  if _active:
    yield _active[-1]
    return
  stop = StopSignals()
  if threading.current_thread() is threading.main_thread():
    for signum in _SIGNALS:
      previous = signal.signal(signum, stop._handle)
      # None: a handler set outside Python, which cannot be put back.
      stop._previous[signum] = (signal.SIG_DFL if previous is None
                                else previous)
  _active.append(stop)
  try:
    yield stop
  finally:
    _active.pop()
    for signum, previous in stop._previous.items():
      signal.signal(signum, previous)
