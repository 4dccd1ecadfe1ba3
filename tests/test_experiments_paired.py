"""Tests for experiments/paired.py, and of the committed comparison's
intervals and p-values against an independent statement of them."""

import json
import pathlib

import numpy as np
import pytest
from scipy import stats

from experiments import paired

RESULTS = (pathlib.Path(__file__).resolve().parents[1] / "experiments"
           / "results" / "compare_losses")


def test_case_differences_average_seeds_and_drop_non_finite_cases():
  setting = np.array([[1.0, 2.0, np.inf], [3.0, 2.0, 1.0]])
  baseline = np.array([[0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
  np.testing.assert_array_equal(paired.case_differences(setting, baseline),
                                [1.5, 0.5])
  with pytest.raises(ValueError, match=r"\(seeds, cases\)"):
    paired.case_differences(setting, baseline[:, :2])


def test_constant_differences_have_a_point_interval():
  zeros = paired.compare(np.ones((2, 5)), np.ones((2, 5)))
  assert (zeros["mean"], zeros["low"], zeros["high"], zeros["p"]) == (
      0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("shift, lower_is_better, expected", [
    (-1.0, True, "better"), (-1.0, False, "worse"),
    (1.0, True, "worse"), (1.0, False, "better"), (0.0, True, "no evidence"),
])
def test_verdicts_follow_interval_and_q(shift, lower_is_better, expected):
  rng = np.random.default_rng(0)
  baseline = rng.normal(size=(3, 40))
  setting = baseline + shift + 0.3 * rng.normal(size=(3, 40))
  key = "betti0_error" if lower_is_better else "dice"
  result = paired.compare_settings(
      {"base": {k: baseline for k in paired.METRICS},
       "other": {k: setting for k in paired.METRICS}}, baseline="base")
  assert result["other"][key]["verdict"] == expected
  r = result["other"][key]
  assert r["low"] <= r["mean"] <= r["high"]


def _committed():
  path = RESULTS / "results.json"
  results = json.loads(path.read_text()) if path.is_file() else {}
  if not any("paired" in t for t in results.get("tasks", {}).values()):
    pytest.skip("no committed comparison with paired statistics")
  return results


@pytest.mark.parametrize("key", ["betti_error", "breaks", "spurious",
                                 "missed"])
def test_committed_interval_and_p_value_recomputed_independently(key):
  """One setting of the committed run: its mean difference, bootstrap
  interval and Wilcoxon p from the per-case values in results.json, on the
  vessels task where the run has it."""
  results = _committed()
  task = next((t for t in ("vessels", "branches") if t in results["tasks"]),
              next(iter(results["tasks"])))
  result = results["tasks"][task]
  names = list(result["table"])
  baseline, setting = names[1], names[2]  # Dice fine-tuning, PPL.
  if key not in result["paired"][setting]:
    pytest.skip(f"the committed comparison predates the {key!r} column")
  seeds = list(result["per_seed"])
  cases = [row["case"] for row in result["per_seed"][seeds[0]][setting][
      "cases"]]
  assert cases == result["split"]["test"]
  # Per case: the difference of the two settings, averaged over the seeds.
  diff = []
  for i, case in enumerate(cases):
    total = 0.0
    for seed in seeds:
      runs = result["per_seed"][seed]
      assert runs[setting]["cases"][i]["case"] == case
      total += (runs[setting]["cases"][i][key]
                - runs[baseline]["cases"][i][key])
    diff.append(total / len(seeds))
  diff = np.array(diff)
  # Percentile bootstrap: resample the cases with replacement.
  rng = np.random.default_rng(12345)
  means = diff[rng.integers(0, diff.size, (20_000, diff.size))].mean(1)
  low, high = np.percentile(means, [2.5, 97.5])
  recorded = result["paired"][setting][key]
  assert recorded["mean"] == pytest.approx(diff.mean(), abs=1e-12)
  # Two bootstraps of 10 000 and 20 000 resamples agree to Monte-Carlo
  # error, a small fraction of the standard error (about 0.03 of it).
  se = diff.std(ddof=1) / np.sqrt(diff.size)
  assert recorded["low"] == pytest.approx(low, abs=0.15 * se + 1e-12)
  assert recorded["high"] == pytest.approx(high, abs=0.15 * se + 1e-12)
  if np.any(diff != diff[0]):
    p = stats.wilcoxon(diff, zero_method="pratt").pvalue
    assert recorded["p"] == pytest.approx(p, rel=1e-9)
  # The table shows the same numbers.
  text = (RESULTS / "table.md").read_text()
  section = text.split(f"## Task {task!r}")[1].split("## Task")[0]
  row = next(line for line in section.splitlines()
             if line.startswith(f"| {setting} |") and "[" in line)
  cell = row.split(" | ")[1 + list(paired.METRICS).index(key)]
  assert cell.startswith(f"{recorded['mean']:+.3f} [{recorded['low']:+.3f}, "
                         f"{recorded['high']:+.3f}]")
  assert recorded["verdict"] in cell or (
      recorded["verdict"] == "no evidence" and cell.endswith("–"))
