"""Tests for experiments/: the reproduction's and the loss comparison's quick
modes, and their figures."""

import dataclasses
import json
import math

import numpy as np
import pytest

from experiments import compare_losses
from experiments import figures
from experiments import loss_protocol
from experiments import loss_runs
from experiments import loss_tables
from experiments import paired
from experiments import reproduce
from topojax import data
from topojax import evaluate
from topojax import losses
from topojax import synthetic
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
      config_path=config, out=root / "out", quick=True, num_cases=10,
      tasks=("loops",), cache_dir=root / "cache", progress=False)
  return root, results


def test_comparison_quick_mode_writes_every_loss(quick_comparison):
  root, results = quick_comparison
  out = root / "out"
  assert set(results["tasks"]) == {"loops"}
  names = ["Dice 2", "Dice 2+2", "PPL 2+2", "PPL-norm 2+2", "clDice 2+2",
           "PH (Hu) 2+2", "Betti matching 2+2", "Skeleton Recall 2+2",
           "cbDice 2+2"]
  text = (out / "table.md").read_text()
  result = results["tasks"]["loops"]
  assert "## Task 'loops'" in text
  assert list(result["table"]) == names
  for name in names[1:]:
    row = result["table"][name]
    assert row["loss_ms"]["mean"] > 0
    assert row["seconds_per_epoch"]["mean"] > 0
    assert 0 <= row["dice"]["mean"] <= 1
    assert 0 <= row["cldice"]["mean"] <= 1
    assert row["betti1_error"]["mean"] >= 0
  assert list(result["paired"]) == names[2:]
  specs = {d: json.loads((out / "loops" / "seed1" / d / "config.json")
                         .read_text())
           for d in compare_losses.VARIANTS}
  assert {d: s["loss"] for d, s in specs.items()} == compare_losses.VARIANTS
  # Equal terms: the settings differ in their loss and λ alone.
  for d, spec in specs.items():
    weight = result["weights"].get(d)
    assert spec["config"]["dice_weight"] == (1.0 if weight is None
                                             else 1.0 / weight)
  assert len({json.dumps({**s["config"], "dice_weight": None})
              for s in specs.values()}) == 1
  # λ was kept on the tuning seed's validation cases, never the test cases.
  split = result["split"]
  tuned = json.loads((out / "loops" / "tuning" / "ppl_lambda"
                      f"{result['weights']['ppl']:g}" / "cases.json")
                     .read_text())
  assert [r["case"] for r in tuned] == list(split["val"])
  evaluated = json.loads((out / "loops" / "seed1" / "ppl" / "cases.json")
                         .read_text())
  assert [r["case"] for r in evaluated] == list(split["test"])
  for loss, tuning in result["tuning"]["losses"].items():
    assert tuning["chosen"] == tuning["scale"]  # --quick: λ0 alone.
    assert tuning["added"] == 0 and not tuning["capped"]
  # The components |Δβ0| mixes are paired like every other metric: the
  # recorded mean difference is the per-case one of results.json.
  saved_seed = json.loads((out / "results.json").read_text())["tasks"][
      "loops"]["per_seed"]["1"]
  for key in ("breaks", "missed", "spurious"):
    assert key in evaluated[0]
    baseline = [r[key] for r in saved_seed["Dice 2+2"]["cases"]]
    for name in names[2:]:
      diff = np.subtract([r[key] for r in saved_seed[name]["cases"]],
                         baseline)
      recorded = result["paired"][name][key]
      assert recorded["mean"] == pytest.approx(diff.mean(), abs=1e-12)
      assert recorded["low"] <= recorded["mean"] <= recorded["high"]
      assert recorded["verdict"] in ("better", "worse", "no evidence")
    assert result["table"]["Dice 2+2"][key]["mean"] >= 0
  assert "| Setting |" in text and " breaks |" in text
  assert "| PH (Hu) 2+2 |" in text and "| cbDice 2+2 |" in text
  for name in ("topology_vs_time.png", "loops_projections.png",
               "intervals.png", "curves.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((out / "results.json").read_text())
  assert saved["tasks"]["loops"]["synthetic"]["kinds"] == ["ring"]


def test_comparison_resumes_without_retraining(quick_comparison):
  root, results = quick_comparison
  log = root / "out" / "loops" / "seed1" / "cldice" / "log.jsonl"
  before = log.read_text()
  again = compare_losses.compare(
      config_path=root / "tiny.json", out=root / "out", quick=True,
      num_cases=10, tasks=("loops",), cache_dir=root / "cache",
      progress=False, resume=True)
  assert log.read_text() == before
  assert again["tasks"]["loops"]["paired"] == results["tasks"]["loops"][
      "paired"]


def test_a_comparison_in_parts_reads_finished_tasks(quick_comparison,
                                                    tmp_path, monkeypatch):
  # A later session: only the task's part and its figure copied back.
  root, results = quick_comparison
  out = tmp_path / "out"
  (out / "loops").mkdir(parents=True)
  for name in ("loops/task.json", "loops_projections.png"):
    (out / name).write_bytes((root / "out" / name).read_bytes())
  part = json.loads((out / "loops" / "task.json").read_text())
  assert part["task"] == "loops" and part["date"] and "commit" in part
  assert part["minutes"] == results["minutes"]["loops"]

  def no_training(*args, **kwargs):
    raise AssertionError("a kept task was trained again")

  monkeypatch.setattr(train, "train_phase", no_training)
  monkeypatch.setattr(loss_runs, "tune", no_training)
  monkeypatch.setattr(loss_runs, "evaluate_seed", no_training)
  options = dict(config_path=root / "tiny.json", quick=True, num_cases=10,
                 tasks=("loops",), cache_dir=root / "cache", progress=False)
  again = compare_losses.compare(out=out, resume=True, **options)
  saved, first = (json.loads((folder / "results.json").read_text())
                  for folder in (out, root / "out"))
  assert saved["tasks"] == first["tasks"]
  assert again["minutes"]["loops"] == results["minutes"]["loops"]
  assert again["training_minutes"] == results["training_minutes"]
  assert not (out / "loops" / "seed1").exists()
  table = (out / "table.md").read_text().splitlines()
  start = table.index(next(l for l in table if l.startswith("## Task")))
  assert table[start:] == (root / "out" / "table.md").read_text(
      ).splitlines()[start:]
  # Without its figure or the runs to draw it, the part is refused.
  (out / "loops_projections.png").unlink()
  with pytest.raises(FileNotFoundError, match="loops_projections.png"):
    compare_losses.compare(out=out, resume=True, **options)
  # So is a part of another comparison.
  with pytest.raises(ValueError, match="seeds differ"):
    compare_losses.compare(out=out, resume=True, seeds=(2,), **options)


def test_betti_matching_error_is_the_validation_mean_and_kept(
    quick_comparison):
  # The λ rule's tie-break, on a tuning run of the quick comparison.
  root, results = quick_comparison
  result = results["tasks"]["loops"]
  config = reproduce.quick_config(train.load_config(root / "tiny.json"))
  dataset = data.load_dataset(
      root / "out" / "loops" / "data" / "Task00_Loops",
      config.preprocess_config(), cache_dir=root / "cache", progress=False)
  split = data.Split(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in result["split"].items()})
  run_dir = (root / "out" / "loops" / "tuning"
             / f"ppl_lambda{result['weights']['ppl']:g}")
  error = loss_runs.betti_matching_error(config, dataset, split, run_dir)
  _, labels, probs = reproduce.probabilities_on_test_cases(
      config, dataset, dataclasses.replace(split, test=split.val),
      run_dir.parent, {run_dir.name: "run"})
  # The mean over the validation cases, one case at a time.
  each = [float(losses.betti_matching_loss(p[None, ..., None],
                                           l[None, ..., None]))
          for p, l in zip(probs["run"], labels.astype(np.float32))]
  assert len(each) == len(split.val) and math.isfinite(error)
  assert error == pytest.approx(np.mean(each), rel=1e-5, abs=1e-7)
  kept = json.loads((run_dir / "bm_error.json").read_text())
  assert kept == {"bm_error": error, "cases": list(split.val)}
  assert loss_runs.betti_matching_error(config, dataset, split,
                                        run_dir) == error


@pytest.mark.parametrize("grid, chosen", [
    # The lowest topology error among the λ that keep Dice within 0.01.
    ({0.1: (0.90, 2.0), 1.0: (0.895, 1.0), 10.0: (0.85, 0.1)}, 1.0),
    # No λ keeps Dice: the one that harms it least.
    ({0.1: (0.80, 2.0), 1.0: (0.85, 1.0), 10.0: (0.70, 0.0)}, 1.0),
    # One λ keeps Dice: nothing to break a tie between.
    ({0.1: (0.80, 0.0), 1.0: (0.90, 0.0), 10.0: (0.70, 0.0)}, 1.0),
])
def test_choose_weight_follows_the_written_rule(grid, chosen):
  baseline = {"dice": 0.90, "betti_error": 3.0}
  grid = {w: {"dice": d, "betti_error": b} for w, (d, b) in grid.items()}
  assert loss_protocol.tied_weights(grid, baseline) == []
  assert loss_protocol.choose_weight(grid, baseline) == chosen


@pytest.mark.parametrize("bm_errors, chosen", [
    # Tied in Σ|Δβ| (Dice fine-tuning left none on validation): the lowest
    # Betti matching error of the probability maps, whatever the Dice.
    ({0.1: 0.30, 1.0: 0.20, 10.0: 0.25}, 1.0),
    ({0.1: 0.10, 1.0: 0.20, 10.0: 0.25}, 0.1),
    # Tied there too: the higher Dice.
    ({0.1: 0.20, 1.0: 0.20, 10.0: 0.25}, 1.0),
])
def test_ties_in_topology_error_go_to_the_betti_matching_error(bm_errors,
                                                                chosen):
  baseline = {"dice": 0.90, "betti_error": 0.0}
  grid = {0.1: {"dice": 0.90, "betti_error": 0.0},
          1.0: {"dice": 0.905, "betti_error": 0.0},
          10.0: {"dice": 0.895, "betti_error": 0.0},
          100.0: {"dice": 0.70, "betti_error": 0.0}}  # Loses Dice.
  assert loss_protocol.tied_weights(grid, baseline) == [0.1, 1.0, 10.0]
  with pytest.raises(ValueError, match="bm_error"):
    loss_protocol.choose_weight(grid, baseline)
  for w, e in bm_errors.items():
    grid[w]["bm_error"] = e
  assert loss_protocol.choose_weight(grid, baseline) == chosen


@pytest.mark.parametrize("weights, chosen, expected", [
    ((0.1, 1.0, 10.0), 1.0, None),  # Inside the grid: done.
    ((0.1, 1.0, 10.0), 10.0, 100.0),  # Top edge: a decade up.
    ((0.1, 1.0, 10.0), 0.1, 0.01),  # Bottom edge: a decade down.
    ((0.1, 1.0, 10.0, 100.0), 100.0, 1000.0),  # Still at the top: again.
    ((0.01, 0.1, 1.0, 10.0), 0.1, None),  # Moved inside after growing.
    ((0.01, 0.1, 1.0, 10.0, 100.0), 100.0, None),  # Five: the cap.
    ((1.0,), 1.0, None),  # One value (--quick): no edge to extend.
])
def test_next_weight_grows_the_grid_past_its_edge(weights, chosen, expected):
  found = loss_protocol.next_weight(weights, chosen)
  assert found == (None if expected is None else pytest.approx(expected))


def test_the_grid_grows_at_most_twice():
  # A loss whose validation error keeps falling with λ: the search climbs
  # from the first grid until the cap, and says the edge was reached.
  baseline = {"dice": 0.9, "betti_error": 1.0}
  weights, chosen = [0.1, 1.0, 10.0], None
  while True:
    grid = {w: {"dice": 0.9, "betti_error": 1.0 / w} for w in weights}
    chosen = loss_protocol.choose_weight(grid, baseline)
    added = loss_protocol.next_weight(weights, chosen)
    if added is None:
      break
    weights.append(added)
  assert len(weights) == loss_protocol.MAX_GRID == 5
  assert chosen == pytest.approx(1000.0)
  assert loss_protocol.at_capped_edge(weights, chosen)
  assert not loss_protocol.at_capped_edge(weights, 10.0)
  assert not loss_protocol.at_capped_edge([0.1, 1.0, 10.0], 10.0)
  assert not loss_protocol.at_capped_edge([1.0], 1.0, max_values=1)


def test_the_search_grows_the_grid_and_breaks_ties(tmp_path, monkeypatch):
  """``loss_runs.tune``'s loop with training and evaluation replaced by
  validation results made up per λ, so that each branch of the rule runs."""
  def made_up(loss, weight):
    if loss == "ppl":  # Fewer errors the larger λ: climbs to the cap.
      return 0.9, 1.0 / weight
    if loss == "cldice":  # Best at 0.1: one decade down, then inside.
      return 0.9, abs(math.log10(weight) + 1)
    return 0.9, 0.0  # No error at any λ: a tie for the Betti matching error.

  trained = []

  def train_setting(config, dataset, split, run_dir, loss, phase1, **_):
    trained.append(run_dir.name)

  def evaluate_run(run_dir, task_dir, case_ids, *, cache_dir):
    loss, _, weight = run_dir.name.partition("_lambda")
    dice, error = (0.9, 0.0) if not weight else made_up(loss, float(weight))
    return [{"case": c, "dice": dice, "betti_error": error}
            for c in case_ids]

  def betti_matching_error(config, dataset, split, run_dir):
    # Lowest at λ = 1 (λ0).
    return 0.1 + abs(math.log10(float(run_dir.name.partition("_lambda")[2])))

  monkeypatch.setattr(loss_runs.train, "train_phase", lambda *a, **k: None)
  monkeypatch.setattr(loss_runs, "loss_scales", lambda *a: {
      loss: {"scale": 1.0, "grad_norm": 1.0, "dice_grad_norm": 1.0}
      for loss in loss_protocol.TOPOLOGY_LOSSES})
  monkeypatch.setattr(loss_runs, "train_setting", train_setting)
  monkeypatch.setattr(loss_runs, "evaluate_run", evaluate_run)
  monkeypatch.setattr(loss_runs, "betti_matching_error", betti_matching_error)
  split = data.Split(train=("a",), val=("b", "c"), test=("d",), seed=0)
  (tmp_path / "tuning").mkdir()  # Phase 1's training would make it.
  tuning = loss_runs.tune(TINY, None, split, tmp_path / "task",
                          tmp_path / "tuning", grid=loss_protocol.GRID,
                          max_values=loss_protocol.MAX_GRID, cache_dir=None,
                          progress=False)
  losses_ = tuning["losses"]
  ppl = losses_["ppl"]
  assert [g["lambda"] for g in ppl["grid"]] == pytest.approx(
      [0.1, 1, 10, 100, 1000])
  assert (ppl["chosen"], ppl["added"], ppl["capped"]) == (
      pytest.approx(1000), 2, True)
  cldice = losses_["cldice"]
  assert [g["lambda"] for g in cldice["grid"]] == pytest.approx(
      [0.01, 0.1, 1, 10])
  assert (cldice["chosen"], cldice["added"], cldice["capped"]) == (
      pytest.approx(0.1), 1, False)
  tied = losses_["betti_matching"]
  assert tied["chosen"] == 1.0 and tied["added"] == 0
  assert [g["bm_error"] for g in tied["grid"]] == pytest.approx(
      [1.1, 0.1, 1.1])
  # Each λ trained once, the baseline first.
  assert trained[0] == "dice_ft" and len(trained) == len(set(trained))
  assert "ppl_lambda1000" in trained and "cldice_lambda0.01" in trained
  text = loss_tables.tuning_markdown(tuning, "Dice 2+2")
  assert "| 1000 (edge, cap reached) |" in text
  assert "the cap: PPL;" in text and "may lie outside the grid" in text
  again = loss_runs.tune(TINY, None, split, tmp_path / "task",
                         tmp_path / "tuning", grid=loss_protocol.GRID,
                         max_values=loss_protocol.MAX_GRID, cache_dir=None,
                         progress=False)
  assert again["resumed"] and again["losses"]["ppl"]["chosen"] == 1000


def test_split_counts_give_24_validation_cases():
  num_val, num_test = loss_protocol.split_counts(loss_protocol.NUM_CASES)
  assert (loss_protocol.NUM_CASES - num_val - num_test, num_val,
          num_test) == (36, 24, 48)
  assert num_val >= 24


def test_comparison_refuses_unknown_tasks_and_used_folders(quick_comparison):
  root, _ = quick_comparison
  with pytest.raises(ValueError, match="--tasks must name some of"):
    compare_losses.compare(tasks=("spirals",), out=root / "other")
  with pytest.raises(FileExistsError, match="--resume"):
    compare_losses.compare(tasks=("loops",), out=root / "out", quick=True)


@pytest.mark.parametrize("task", loss_protocol.TASKS)
def test_only_patch_tasks_leave_the_whole_volume_protocol(task):
  config = loss_protocol.task_config(TINY, task)
  synth = loss_protocol.task_synth(task, TINY, num_cases=12)
  assert synth.num_cases == 12
  if task not in loss_protocol.PATCH_TASKS:
    # The whole-volume tasks as before: resized to the config's shape.
    assert config is TINY and synth.shape == TINY.shape
    return
  assert synth.shape == loss_protocol.VESSEL_SHAPE
  assert (config.shape, config.patch_size) == (None, TINY.shape)
  assert config.patches_per_case == loss_protocol.PATCHES_PER_CASE
  # Validation ranks epochs without window overlap; prediction keeps it.
  assert config.validation_overlap == loss_protocol.VALIDATION_OVERLAP == 0
  assert config.overlap == TINY.overlap
  assert dataclasses.replace(
      config, shape=TINY.shape, patch_size=None,
      patches_per_case=TINY.patches_per_case,
      validation_overlap=None) == TINY
  with pytest.raises(ValueError, match="must be a patch that fits"):
    loss_protocol.task_config(TINY, task, shape=(8, 64, 64))


def test_comparison_gives_vessels_the_patch_protocol(tmp_path, monkeypatch):
  """``compare``'s wiring, with the runs replaced by made-up results: the
  vessels task is generated at its own shape and trained on patches, the
  other tasks as before."""
  seen = {}

  def tune(config, dataset, split, task_dir, tune_dir, **_):
    seen[task_dir.name] = (config, dataset.case_shapes[0])
    return {"seed": 0, "max_values": 1,
            "baseline": {"dice": 0.5, "betti_error": 1.0},
            "losses": {loss: {"scale": 1.0, "chosen": 1.0, "capped": False,
                              "grid": [{"lambda": 1.0, "dice": 0.5,
                                        "betti_error": 1.0}]}
                       for loss in loss_protocol.TOPOLOGY_LOSSES}}

  def evaluate_seed(config, dataset, split, task_dir, seed_dir, **_):
    assert seen[task_dir.name][0] == dataclasses.replace(config, seed=0)
    rng = np.random.default_rng(config.seed)
    keys = set(paired.METRICS) | {k for k, _ in loss_tables.COLUMNS}
    return {d: {"cases": [{"case": c, **{k: float(rng.random())
                                         for k in keys}}
                          for c in split.test],
                "curve": [0.5, 0.6], "seconds_per_epoch": 1.0,
                "loss_ms": 1.0}
            for d in ("phase1", *compare_losses.VARIANTS)}

  monkeypatch.setattr(loss_runs, "tune", tune)
  monkeypatch.setattr(loss_runs, "evaluate_seed", evaluate_seed)
  monkeypatch.setattr(loss_tables, "projections",
                      lambda config, *a: seen.__setitem__(a[-1], config))
  config = tmp_path / "tiny.json"
  config.write_text(json.dumps(TINY.to_json()))
  results = compare_losses.compare(
      config_path=config, out=tmp_path / "out", quick=True, num_cases=7,
      tasks=("loops", "vessels"), cache_dir=tmp_path / "cache",
      progress=False)
  quick = reproduce.quick_config(TINY)
  loops, loops_shape = seen["Task00_Loops"]
  assert loops == quick and loops_shape == TINY.shape
  assert "config" not in results["tasks"]["loops"]
  vessels, vessels_shape = seen["Task00_Vessels"]
  assert vessels_shape == loss_protocol.VESSEL_SHAPE
  assert vessels == loss_protocol.task_config(quick, "vessels")
  assert (vessels.shape, vessels.patch_size) == (None, TINY.shape)
  assert seen["vessels"] == dataclasses.replace(vessels, seed=1)
  assert seen["loops"] == dataclasses.replace(quick, seed=1)
  result = results["tasks"]["vessels"]
  assert result["config"]["patch_size"] == list(TINY.shape)
  assert tuple(result["synthetic"]["shape"]) == loss_protocol.VESSEL_SHAPE
  assert tuple(result["synthetic"]["kinds"]) == ("vessel",)
  text = (tmp_path / "out" / "table.md").read_text()
  assert "## Task 'vessels'" in text
  assert "a network on 16×16×16 voxels (whole volumes, or patches" in text
  assert ("Volumes of 64×64×64 voxels, trained on 16×16×16 patches (2 per "
          "case and epoch)") in text
  assert text.count("Volumes of") == 1  # Not under the loops task.


def test_quick_comparisons_leave_out_the_vessels_by_default():
  assert loss_protocol.default_tasks(quick=False) == (
      "components", "loops", "branches", "vessels")
  assert loss_protocol.default_tasks(quick=True) == (
      "components", "loops", "branches")


@pytest.fixture(scope="module")
def vessel_run(tmp_path_factory):
  """Phase 1 of a run on patches of a few vessel cases, 2 epochs."""
  root = tmp_path_factory.mktemp("vessels")
  config = reproduce.quick_config(loss_protocol.task_config(TINY, "vessels"))
  task_dir = synthetic.generate_task(
      root / "Task00_Vessels",
      loss_protocol.task_synth("vessels", config, num_cases=7),
      progress=False)
  dataset = data.load_dataset(task_dir, config.preprocess_config(),
                              cache_dir=root / "cache", progress=False)
  split = data.make_split(dataset.case_ids, num_val=1, num_test=2, seed=0)
  train.train_phase(config, dataset, split, root / "seed1" / "phase1",
                    phase=1, progress=False)
  return root / "seed1", config, dataset, split


def test_patch_run_probabilities_come_from_sliding_windows(vessel_run):
  # What the λ tie-break and the projections read of a run on patches: the
  # whole cases predicted window by window, as topojax.Segmenter does it,
  # never resized to the patch.
  from topojax import predict

  seed_dir, config, dataset, split = vessel_run
  images, labels, probs = reproduce.probabilities_on_test_cases(
      config, dataset, split, seed_dir, {"phase1": "run"})
  assert probs["run"].shape == labels.shape == (
      len(split.test), *loss_protocol.VESSEL_SHAPE)
  expected = predict.Segmenter.from_run(seed_dir / "phase1").forward(images)
  np.testing.assert_allclose(probs["run"], expected[..., -1], atol=1e-6)
  error = loss_runs.betti_matching_error(config, dataset, split,
                                         seed_dir / "phase1")
  assert math.isfinite(error) and error >= 0


def test_loss_scales_of_a_patch_run_see_training_patches(vessel_run):
  seed_dir, config, dataset, split = vessel_run
  rows = dataset.indices(split.train)
  batches = list(loss_runs._training_batches(config, dataset, rows))
  assert len(batches) == len(rows) // config.batch_size
  images, targets = batches[0]
  assert images.shape == (config.batch_size, *TINY.shape, 1)
  assert set(targets) == set(compare_losses.VARIANTS.values())
  # Skeleton Recall's tubed skeleton travels with the label as a channel.
  assert targets["skeleton_recall"].shape[-1] == 2
  np.testing.assert_array_equal(targets["skeleton_recall"][..., :1],
                                targets["dice"])
  scales = loss_runs.loss_scales(config, dataset, split, seed_dir / "phase1")
  assert set(scales) == set(loss_protocol.TOPOLOGY_LOSSES)
  for loss, scale in scales.items():
    assert scale["dice_grad_norm"] > 0, loss
    assert math.log10(scale["scale"]) == round(math.log10(scale["scale"]))


def test_vessels_pilot_quick_mode_records_breaks_and_costs(tmp_path):
  from experiments import vessels_pilot

  config = tmp_path / "tiny.json"
  config.write_text(json.dumps(TINY.to_json()))
  results = vessels_pilot.pilot(out=tmp_path / "pilot", config_path=config,
                                num_cases=10, quick=True,
                                cache_dir=tmp_path / "cache", progress=False)
  assert json.loads((tmp_path / "pilot" / "pilot.json").read_text()) == (
      json.loads(json.dumps(evaluate.json_ready(results))))
  num_test = loss_protocol.split_counts(10)[1]
  for run in results["runs"].values():
    assert len(run["cases"]) == num_test
    assert run["mean"]["breaks"] == pytest.approx(
        np.mean([c["breaks"] for c in run["cases"]]))
    assert 0 < run["epochs"]["train_s"] < run["epochs"]["epoch_s"]
  # Overlap 0 tiles a 64³ volume with (64 / 16)³ windows of 16³; overlap
  # 0.5 starts one every 8 voxels: 7 per axis.
  assert results["validation"]["0"]["windows_per_case"] == 4 ** 3
  assert results["validation"]["0.5"]["windows_per_case"] == 7 ** 3


def test_study_minutes_count_every_epoch_of_the_protocol():
  from experiments import vessels_pilot

  config = train.load_config(compare_losses.DEFAULT_CONFIG)  # 8 + 4 epochs.
  minutes = vessels_pilot.study_minutes(
      config, train_s=6.0, validate_s=12.0, test_s=30.0, num_val=24,
      num_test=48, weights_per_loss=3)
  # λ search: phase 1, Dice fine-tuning, 7 losses × 3 λ; 5 seeds × (phase
  # 1 + 8 settings).
  epochs = 8 + 4 * (1 + 21) + 5 * (8 + 8 * 4)
  assert minutes["epochs"] == epochs == 296
  assert minutes["training_steps"] == pytest.approx(epochs * 6 / 60)
  assert minutes["validation"] == pytest.approx(epochs * 12 / 60)
  # 22 runs on 24 validation cases, 45 on 48 test cases.
  assert minutes["test_and_tuning_evaluation"] == pytest.approx(
      (22 / 2 + 45) * 30 / 60)
  assert minutes["total"] == pytest.approx(
      sum(minutes[k] for k in ("training_steps", "validation",
                               "test_and_tuning_evaluation")))
