"""Smoke test of benchmarks/loss.py: one small input, no persistent homology."""

import json

import pytest

from benchmarks import loss as bench  # The repository root is on pytest's path.

pytest.importorskip("torch", reason="the benchmark times the PyTorch reference")


def test_quick_run_times_every_method_and_writes_its_outputs(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n\n## Training step\n\nkept\n")
  assert bench.main(["--quick", "--repeats", "1", "--out", str(tmp_path),
                     "--results", str(results)]) == 0

  report = json.loads((tmp_path / "loss.json").read_text())
  timed = {r["method"]: r for r in report["records"]}
  # Every loss of the training table but the persistent-homology ones
  # (not in --quick), with the other paths and peers.
  expected = {*bench.TOPOJAX.values(), bench.FEATURES, bench.REFERENCE,
              bench.TORCH, bench.CLDICE_OLD, bench.CLDICE_TORCH,
              bench.CBDICE_TORCH, bench.FLOOR} - {bench.PH, bench.BETTI_JAX}
  assert set(timed) == expected
  assert {bench.CBDICE, bench.SKELETON, "topojax PPL-norm"} <= set(timed)
  for record in timed.values():
    assert record["shape"] == [1, *bench.QUICK_SIZES[0], 1]
    assert record["forward_backward"]["median_s"] > 0
  assert report["environment"]["jax_backend"]
  assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")

  text = results.read_text()
  assert "## Training step\n\nkept\n" in text
  assert text.count(bench.SECTION_START) == 1
  assert "| (1, 24, 24, 24, 1) |" in text


def test_one_loss_is_timed_with_its_peers_alone(tmp_path, monkeypatch):
  monkeypatch.setattr(bench, "SIZES", bench.QUICK_SIZES)
  monkeypatch.setattr(bench, "BATCHES", bench.QUICK_BATCHES)
  assert bench.main(["--losses", "cbdice", "--repeats", "1", "--out",
                     str(tmp_path)]) == 0
  report = json.loads((tmp_path / "loss.json").read_text())
  assert {r["method"] for r in report["records"]} == {
      bench.CBDICE, bench.CBDICE_TORCH, bench.FLOOR}
  assert report["summary"]["cbdice_torch_over_cbdice"]


def test_refuses_to_overwrite_outputs_before_timing_anything(tmp_path):
  (tmp_path / "loss.json").write_text("{}")
  with pytest.raises(FileExistsError, match="--overwrite"):
    bench.main(["--quick", "--out", str(tmp_path)])
  assert (tmp_path / "loss.json").read_text() == "{}"


def test_update_results_replaces_only_its_own_section(tmp_path):
  path = tmp_path / "RESULTS.md"
  bench.update_results(path, f"{bench.SECTION_START}\nold\n{bench.SECTION_END}\n")
  path.write_text(path.read_text() + "\n## Training step\n\nkept\n")
  bench.update_results(path, f"{bench.SECTION_START}\nnew\n{bench.SECTION_END}\n")
  text = path.read_text()
  assert "old" not in text and "new" in text
  assert text.endswith("## Training step\n\nkept\n")


def test_cldice_memory_is_read_from_the_compiled_steps():
  records = bench.cldice_memory(((16, 16, 16),))
  total = {r["method"]: r["total_bytes"] for r in records}
  assert set(total) == {bench.CLDICE, bench.CLDICE_OLD}
  # Both hold at least their two 16³ float32 inputs and the gradient.
  assert min(total.values()) >= 3 * 16**3 * 4
  # The custom VJP keeps one-byte winner codes, not XLA's pooled copies.
  assert total[bench.CLDICE] < total[bench.CLDICE_OLD]


def test_skeleton_quick_run_times_both_thinnings_and_writes_its_outputs(
    tmp_path):
  from benchmarks import skeleton as skeleton_bench
  assert skeleton_bench.main(["--quick", "--repeats", "1", "--out",
                              str(tmp_path)]) == 0
  report = json.loads((tmp_path / "skeleton.json").read_text())
  assert {r["kind"] for r in report["records"]} == set(skeleton_bench.KINDS)
  for record in report["records"]:
    assert record["size"] == skeleton_bench.QUICK_SIZES[0]
    assert record["topojax"]["median_s"] > 0
    assert record["scikit-image"]["median_s"] > 0
  assert report["threads"][0]["workers"] == 1
  assert "| blobs | 24³ |" in (tmp_path / "skeleton.md").read_text()
  assert (tmp_path / "skeleton.png").read_bytes().startswith(b"\x89PNG")
  with pytest.raises(FileExistsError, match="--overwrite"):
    skeleton_bench.main(["--quick", "--out", str(tmp_path)])


def test_soak_quick_records_memory_and_compilations_per_loss(tmp_path):
  from benchmarks import soak

  assert {"hutopo", "betti_matching"} <= set(soak.HOST_SIDE_LOSSES)
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n\n## Other\n\nkept\n")
  assert soak.main(["--quick", "--losses", "hutopo", "--results",
                    str(results)]) == 0
  text = results.read_text()
  assert "## Other\n\nkept\n" in text
  assert text.count(soak.SECTION_START) == text.count(soak.SECTION_END) == 1
  (row,) = [line for line in text.splitlines() if line.startswith("| hutopo")]
  cells = [cell.strip() for cell in row.strip("|").split("|")]
  assert cells[1] == "4"  # steps
  assert all(float(cells[i].split()[0]) > 0 for i in (3, 4, 5))  # RSS, MB
  assert cells[-1] == "1 / 1 / 1"  # compiled once, never again
