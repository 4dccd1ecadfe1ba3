"""Tests for experiments/: the reproduction's and the loss comparison's quick
modes, and their figures."""

import json

import numpy as np
import pytest

from experiments import compare_losses
from experiments import figures
from experiments import reproduce
from topojax import evaluate
from topojax import train

TINY = train.TrainConfig(
    shape=(16, 16, 16), base_channels=4, depth=2, batch_size=4,
    kernel_sizes=(2, 4),
    phase1=train.PhaseConfig(loss="dice", epochs=5, learning_rate=1e-2),
    phase2=train.PhaseConfig(loss="ppl", epochs=5, learning_rate=1e-3))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("reproduce")
  config = root / "tiny.json"
  config.write_text(json.dumps(TINY.to_json()))
  results = reproduce.reproduce(config_path=config, out=root / "out",
                                quick=True, cache_dir=root / "cache",
                                progress=False)
  return root, config, results


def test_quick_mode_writes_table_json_and_figures(quick_run):
  root, _, results = quick_run
  out = root / "out"
  table = (out / "table.md").read_text().splitlines()
  header = next(line for line in table if line.startswith("| Setting"))
  for _, title in evaluate.TABLE_COLUMNS:
    assert title in header
  rows = [line for line in table if line.startswith("| ")][1:]
  # Quick mode: 2 + 2 epochs whatever the config says, one seed.
  assert [r.split(" | ")[0] for r in rows] == [
      "| Dice 2", "| Dice 2+2", "| PPL 2+2", "| PPL-norm 2+2"]
  for row in rows:
    assert row.count("|") == len(evaluate.TABLE_COLUMNS) + 2
  assert results["seeds"] == [0]
  saved = json.loads((out / "results.json").read_text())
  assert set(saved["table"]) == {"Dice 2", "Dice 2+2", "PPL 2+2",
                                 "PPL-norm 2+2"}
  for name in ("method.png", "qualitative.png", "curves.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_setting_predicted_the_same_test_cases(quick_run):
  root, _, results = quick_run
  test_ids = results["split"]["test"]
  for setting in ("phase1", "dice_ft", "ppl", "ppl_norm"):
    pred = root / "out" / "seed0" / setting / "pred"
    assert sorted(p.name for p in pred.iterdir()) == sorted(
        f"{c}.nii.gz" for c in test_ids)


def test_phase2_variants_differ_only_in_loss(quick_run):
  root, _, _ = quick_run
  specs = {v: json.loads((root / "out" / "seed0" / v / "config.json")
                         .read_text()) for v in ("dice_ft", "ppl", "ppl_norm")}
  assert {v: s["loss"] for v, s in specs.items()} == {
      "dice_ft": "dice", "ppl": "ppl", "ppl_norm": "ppl_norm"}
  assert len({json.dumps(s["config"]) for s in specs.values()}) == 1
  phase1 = str(root / "out" / "seed0" / "phase1")
  assert {s["init"] for s in specs.values()} == {phase1}


def test_refuses_a_used_folder_and_resumes_without_training(quick_run):
  root, config, results = quick_run
  with pytest.raises(FileExistsError, match="--resume"):
    reproduce.reproduce(config_path=config, out=root / "out", quick=True,
                        cache_dir=root / "cache", progress=False)
  again = reproduce.reproduce(config_path=config, out=root / "out",
                              quick=True, resume=True,
                              cache_dir=root / "cache", progress=False)
  assert again["table"] == results["table"]


def test_aggregate_is_mean_and_std_over_seeds():
  def summary(dice, r):
    stats = {key: {"mean": dice} for key, _ in evaluate.TABLE_COLUMNS}
    return {1: {"metrics": stats, "pearson_r": r}}
  per_seed = {0: {"phase1": summary(0.5, 1.0)},
              1: {"phase1": summary(0.7, float("nan"))}}
  table = reproduce.aggregate(per_seed, {"phase1": "Dice 1"})
  assert table["Dice 1"]["dice"]["mean"] == pytest.approx(0.6)
  assert table["Dice 1"]["dice"]["std"] == pytest.approx(0.1)
  assert table["Dice 1"]["pearson_r"] == {"mean": 1.0, "std": 0.0, "seeds": 1}


def test_method_figure(tmp_path):
  rng = np.random.default_rng(0)
  label = np.zeros((24, 24, 20), bool)
  label[6:18, 6:18, 5:15] = True
  figures.method_figure(rng.random(label.shape), label, tmp_path / "m.png",
                        kernel_sizes=(4, 8))
  assert (tmp_path / "m.png").stat().st_size > 0


@pytest.fixture(scope="module")
def quick_comparison(tmp_path_factory):
  root = tmp_path_factory.mktemp("compare")
  config = root / "tiny.json"
  # The reproduction's network and shape: its compiled steps are reused. One
  # task: the other runs the same code on other data.
  config.write_text(json.dumps(TINY.to_json()))
  results = compare_losses.compare(
      config_path=config, out=root / "out", quick=True, num_cases=8,
      tasks=("loops",), cache_dir=root / "cache", progress=False)
  return root, results


def test_comparison_quick_mode_writes_every_loss(quick_comparison):
  root, results = quick_comparison
  out = root / "out"
  assert set(results["tasks"]) == {"loops"}
  names = ["Dice 2", "Dice 2+2", "PPL 2+2", "PPL-norm 2+2", "clDice 2+2",
           "PH (Hu) 2+2"]
  text = (out / "table.md").read_text()
  for task, result in results["tasks"].items():
    assert f"## Task {task!r}" in text
    assert list(result["table"]) == names
    for name in names[1:]:
      row = result["table"][name]
      assert row["loss_ms"]["mean"] > 0
      assert row["seconds_per_epoch"]["mean"] > 0
      assert 0 <= row["dice"]["mean"] <= 1
      assert row["betti1_error"]["mean"] >= 0
    specs = {d: json.loads((out / task / "seed0" / d / "config.json")
                           .read_text())
             for d in compare_losses.VARIANTS}
    assert {d: s["loss"] for d, s in specs.items()} == compare_losses.VARIANTS
    # Equal terms: one configuration (epochs, learning rate, λ) for all.
    assert len({json.dumps(s["config"]) for s in specs.values()}) == 1
  assert "| PH (Hu) 2+2 |" in text
  for name in ("topology_vs_time.png", "loops_projections.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((out / "results.json").read_text())
  assert saved["tasks"]["loops"]["synthetic"]["kinds"] == ["ring"]


def test_comparison_refuses_unknown_tasks_and_used_folders(quick_comparison):
  root, _ = quick_comparison
  with pytest.raises(ValueError, match="--tasks must name some of"):
    compare_losses.compare(tasks=("spirals",), out=root / "other")
  with pytest.raises(FileExistsError, match="--resume"):
    compare_losses.compare(tasks=("loops",), out=root / "out", quick=True)
