"""Tests for experiments/: the reproduction's quick mode and its figures."""

import json

import numpy as np
import pytest

from experiments import figures
from experiments import reproduce
from topojax import evaluate
from topojax import train

TINY = train.TrainConfig(
    shape=(16, 16, 16), base_channels=4, depth=2, batch_size=4,
    kernel_sizes=(2, 4),
    phase1=train.PhaseConfig(loss="dice", epochs=5, learning_rate=1e-2),
    phase2=train.PhaseConfig(loss="topo_dice", epochs=5, learning_rate=1e-3))


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
  assert specs["dice_ft"]["loss"] == "dice"
  assert specs["ppl"]["loss"] == specs["ppl_norm"]["loss"] == "topo_dice"
  assert not specs["ppl"]["config"]["normalize"]
  assert specs["ppl_norm"]["config"]["normalize"]
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
