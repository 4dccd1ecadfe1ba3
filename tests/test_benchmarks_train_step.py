"""Smoke tests of benchmarks/train_step.py and benchmarks/step_profile.py."""

import subprocess
import sys

import pytest

from benchmarks import train_step  # The repository root is on pytest's path.

pytest.importorskip("torch", reason="the benchmarks time PyTorch's step too")


def test_quick_comparison_times_every_implementation(capsys):
  train_step.main(["--quick"])
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("| 1 |"))
  # Round, three step times and two ratios, all positive.
  values = [float(v) for v in row.strip("| ").split(" | ")]
  assert len(values) == 6 and min(values) > 0


def test_quick_profile_lists_both_frameworks():
  out = subprocess.run([sys.executable, "benchmarks/step_profile.py",
                        "--quick"], capture_output=True, text=True,
                       check=True).stdout
  assert "**topojax**" in out and "**PyTorch**" in out
  assert "aten::" in out
