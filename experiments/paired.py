"""Paired statistics of a setting against a baseline on the same test cases.

Every setting of ``experiments.compare_losses`` segments the same test cases
once per evaluation seed, so a setting and its baseline pair up case by case.
The unit of evidence is the test case: seeds are repeated draws of training
noise on the same cases, not new cases, so each case's difference is first
averaged over the seeds and the cases are then resampled and ranked. Pooling
the (seed, case) pairs as if independent would shrink the interval by up to
√seeds without a new case behind it.

Per setting and metric:

* the mean over cases of the seed-averaged difference, setting − baseline;
* its 95 % percentile-bootstrap interval over cases (``scipy.stats.bootstrap``);
* the Wilcoxon signed-rank p-value of those differences
  (``scipy.stats.wilcoxon``, Pratt's treatment of zero differences, which
  keeps them in the ranking; exact or normal as scipy chooses), and the
  Benjamini–Hochberg q-value over all tests of one task
  (``scipy.stats.false_discovery_control``);
* a verdict: "better" or "worse" when the interval excludes 0 and q < 0.05,
  else "no evidence".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats

# Metric key → (column title, True if lower is better). Σ|Δβ| is the sum of
# the three Betti errors of a case, the topology error the λ rule ranks by;
# breaks, missed and spurious components are what |Δβ0| mixes
# (`topojax.component_errors`).
METRICS = {
    "dice": ("Dice", False),
    "cldice": ("clDice", False),
    "hd95_mm": ("95HD (mm)", True),
    "betti0_error": (r"\|Δβ0\|", True),
    "betti1_error": (r"\|Δβ1\|", True),
    "betti2_error": (r"\|Δβ2\|", True),
    "betti_error": (r"Σ\|Δβ\|", True),
    "breaks": ("breaks", True),
    "missed": ("missed", True),
    "spurious": ("spurious", True),
}
CONFIDENCE = 0.95
ALPHA = 0.05
RESAMPLES = 10_000


def case_differences(setting: np.ndarray, baseline: np.ndarray) -> np.ndarray:
  """Each case's difference ``setting − baseline``, averaged over seeds.

  Args:
    setting, baseline: ``(seeds, cases)`` per-case values of one metric, the
      same cases in the same order; non-finite values (a 95HD of an empty
      mask) drop their case from every seed.

  Returns:
    ``(kept_cases,)`` float64.
  """
  setting = np.asarray(setting, np.float64)
  baseline = np.asarray(baseline, np.float64)
  if setting.shape != baseline.shape or setting.ndim != 2:
    raise ValueError(f"setting {setting.shape} and baseline {baseline.shape} "
                     "must both be (seeds, cases)")
  finite = np.isfinite(setting).all(0) & np.isfinite(baseline).all(0)
  return (setting - baseline)[:, finite].mean(0)


def compare(setting: np.ndarray, baseline: np.ndarray, *, seed: int = 0
            ) -> dict[str, float]:
  """Mean difference, bootstrap interval and Wilcoxon p of one metric.

  Args:
    setting, baseline: ``(seeds, cases)``, as ``case_differences``.
    seed: of the bootstrap's resampling.

  Returns:
    ``{"mean", "low", "high", "p", "cases"}``; a metric that never differs
    (every difference 0) has the interval [0, 0] and p = 1.
  """
  diff = case_differences(setting, baseline)
  if diff.size == 0:
    return {"mean": np.nan, "low": np.nan, "high": np.nan, "p": np.nan,
            "cases": 0}
  mean = float(diff.mean())
  if np.all(diff == diff[0]):
    # A constant sample has a degenerate bootstrap and no ranks to test.
    return {"mean": mean, "low": mean, "high": mean,
            "p": 1.0 if mean == 0 else 0.0, "cases": int(diff.size)}
  interval = stats.bootstrap(
      (diff,), np.mean, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
      method="percentile", rng=np.random.default_rng(seed)).confidence_interval
  p = float(stats.wilcoxon(diff, zero_method="pratt").pvalue)
  return {"mean": mean, "low": float(interval.low),
          "high": float(interval.high), "p": p, "cases": int(diff.size)}


def verdict(result: Mapping[str, float], *, lower_is_better: bool) -> str:
  """"better", "worse" or "no evidence", from the interval and ``q``."""
  if not result["q"] < ALPHA:
    return "no evidence"
  if result["high"] < 0:
    return "better" if lower_is_better else "worse"
  if result["low"] > 0:
    return "worse" if lower_is_better else "better"
  return "no evidence"


def compare_settings(per_case: Mapping[str, Mapping[str, np.ndarray]], *,
                     baseline: str) -> dict[str, dict[str, dict]]:
  """Every setting against ``baseline`` on every metric of ``METRICS``.

  Args:
    per_case: setting name → metric key → ``(seeds, cases)`` values.
    baseline: the setting compared against (Dice fine-tuning).

  Returns:
    Setting name (all but ``baseline``) → metric key → ``compare``'s dict
    with ``q`` (Benjamini–Hochberg over every test in the result) and
    ``verdict`` added.
  """
  results = {
      name: {key: compare(values[key], per_case[baseline][key])
             for key in METRICS}
      for name, values in per_case.items() if name != baseline}
  tests = [r for row in results.values() for r in row.values()
           if np.isfinite(r["p"])]
  for r, q in zip(tests, stats.false_discovery_control(
      [r["p"] for r in tests]) if tests else []):
    r["q"] = float(q)
  for row in results.values():
    for key, r in row.items():
      r.setdefault("q", np.nan)
      r["verdict"] = verdict(r, lower_is_better=METRICS[key][1])
  return results
