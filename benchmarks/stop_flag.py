"""The per-step cost of agreeing on the stop flag across processes.

``topojax.train`` checks after every step whether any process received
SIGTERM/SIGINT (``preemption.StopSignals.agreed``: one all-gather of one
int32 per process). This starts ``--processes`` CPU processes on this
machine, as ``topojax train --coordinator`` would, and times that call.

Usage::

    python -m benchmarks.stop_flag               # 2 processes, 500 calls
    python -m benchmarks.stop_flag --calls 2000
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

_WORKER = """
import statistics, sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
from topojax.train import preemption
stop, calls = preemption.StopSignals(), int(sys.argv[4])
stop.agreed()  # compiles the all-gather
times = []
for _ in range(calls):
  began = time.perf_counter()
  stop.agreed()
  times.append(time.perf_counter() - began)
if jax.process_index() == 0:
  print(f"{jax.process_count()} processes, {calls} calls: median "
        f"{statistics.median(times) * 1e3:.3f} ms, 90th percentile "
        f"{sorted(times)[int(0.9 * calls)] * 1e3:.3f} ms per step")
"""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--calls", type=int, default=500)
  args = parser.parse_args(argv)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  workers = [subprocess.Popen(
      [sys.executable, "-c", _WORKER, f"127.0.0.1:{port}",
       str(args.processes), str(i), str(args.calls)], env=env)
             for i in range(args.processes)]
  return max(worker.wait() for worker in workers)


if __name__ == "__main__":
  raise SystemExit(main())
