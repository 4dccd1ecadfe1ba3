"""Smoke test of benchmarks/sliding_window.py: one small volume, one round."""

import json

import pytest

pytest.importorskip("torch", reason="the benchmark times MONAI in PyTorch")
pytest.importorskip("monai", reason="the benchmark times MONAI's window")

from benchmarks import sliding_window as bench  # noqa: E402


def test_quick_run_times_both_and_writes_its_table(tmp_path):
  assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
  rows = json.loads((tmp_path / "sliding_window.json").read_text())["rows"]
  assert [r["size"] for r in rows] == list(bench.QUICK_SIZES)
  # 40³ in 32³ windows at overlap 0.5: starts 0 and 8 per axis.
  assert rows[0]["windows"] == 8
  assert all(s > 0 for k, s in rows[0].items() if k.endswith("(s)"))
  assert "| 40³ | 8 |" in (tmp_path / "sliding_window.md").read_text()
  with pytest.raises(FileExistsError, match="--overwrite"):
    bench.main(["--quick", "--out", str(tmp_path)])


def test_memory_of_a_small_volume_is_measured_in_a_fresh_process():
  memory = bench.measure_memory(shape=(40, 40, 40), patch=16)
  assert memory["peak_bytes"] >= memory["before_bytes"] > 0
  assert memory["volume_bytes"] == 40**3 * 4
