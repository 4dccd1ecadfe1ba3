"""The loss comparison's tables and figures, from its results.

``table.md`` (per task: the λ search, mean ± sd over seeds, the paired
differences), ``results.json`` and the figures of ``experiments.figures``;
nothing here trains.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from experiments import loss_runs
from experiments import paired
from experiments import reproduce
from topojax import evaluate
from topojax import metrics

COLUMNS = (("dice", "Dice"), ("cldice", "clDice"), ("hd95_mm", "95HD (mm)"),
           ("betti0_error", r"\|Δβ0\|"), ("betti1_error", r"\|Δβ1\|"),
           ("betti2_error", r"\|Δβ2\|"), ("breaks", "breaks"),
           ("missed", "missed"), ("spurious", "spurious"),
           ("seconds_per_epoch", "phase-2 s/epoch"),
           ("loss_ms", "loss ms/step"))
# The intervals figure's columns: voxels, centre lines, then the topology
# errors, |Δβ0| taken apart into what it mixes.
INTERVAL_KEYS = ("dice", "cldice", "betti_error", "breaks", "missed",
                 "spurious", "betti1_error")


def summarise(per_seed: dict[int, dict], names: dict[str, str]) -> dict:
  """Mean ± sd over seeds of each seed's case means, per setting."""
  table = {}
  for directory, name in names.items():
    row = {}
    for key, _ in COLUMNS:
      values = [(runs[directory].get(key, math.nan)
                 if key in ("seconds_per_epoch", "loss_ms")
                 else loss_runs.case_mean(runs[directory]["cases"], key))
                for runs in per_seed.values()]
      row[key] = reproduce.over_seeds(values)
    table[name] = row
  return table


def per_case_arrays(per_seed: dict[int, dict], names: dict[str, str]
                    ) -> dict[str, dict[str, np.ndarray]]:
  """Setting name → metric → ``(seeds, cases)``, cases in test order."""
  return {name: {key: np.array([[r[key] for r in runs[d]["cases"]]
                                for runs in per_seed.values()], float)
                 for key in paired.METRICS}
          for d, name in names.items()}


def tuning_markdown(tuning: dict, baseline_name: str) -> str:
  """The λ search of one task: every λ tried, the kept one in bold."""
  base = tuning["baseline"]
  lines = [f"λ search on seed {tuning['seed']}'s validation cases "
           f"({baseline_name}: Dice {base['dice']:.3f}, Σ\\|Δβ\\| "
           f"{base['betti_error']:.3f}); cells: validation Dice / Σ\\|Δβ\\| "
           "(/ Betti matching error of the probabilities, where Σ\\|Δβ\\| "
           "tied), the kept λ in bold.", "",
           "| Loss | λ0 | λ: Dice / Σ\\|Δβ\\| | kept λ |", "|---|---|---|---|"]
  notes = []
  for loss, r in tuning["losses"].items():
    cells = []
    for g in r["grid"]:
      cell = f"{g['lambda']:g}: {g['dice']:.3f} / {g['betti_error']:.3f}"
      if g.get("bm_error") is not None:
        cell += f" / {g['bm_error']:.4f}"
      cells.append(f"**{cell}**" if g["lambda"] == r["chosen"] else cell)
    kept = f"{r['chosen']:g}"
    if r.get("capped"):
      kept += " (edge, cap reached)"
      notes.append(reproduce.LABELS[loss])
    lines.append(f"| {reproduce.LABELS[loss]} | {r['scale']:g} | "
                 + "; ".join(cells) + f" | {kept} |")
  if notes:
    lines += ["", f"Kept λ still on an edge after the grid grew to "
              f"{tuning['max_values']} values, the cap: {', '.join(notes)}; "
              "their best λ may lie outside the grid."]
  return "\n".join(lines) + "\n"


def paired_markdown(comparisons: dict, baseline_name: str) -> str:
  """Every setting's paired differences from the baseline, with verdicts."""
  titles = [title for title, _ in paired.METRICS.values()]
  lines = [f"Paired against {baseline_name}: mean over test cases of the "
           "difference (averaged over seeds) [95 % bootstrap interval], "
           "Wilcoxon q (Benjamini–Hochberg), verdict.", "",
           "| Setting | " + " | ".join(titles) + " |",
           "|---" * (len(titles) + 1) + "|"]
  for name, row in comparisons.items():
    cells = []
    for key in paired.METRICS:
      r = row[key]
      word = {"better": "**better**", "worse": "**worse**"}.get(
          r["verdict"], "–")
      cells.append(f"{r['mean']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] "
                   f"q {r['q']:.2g} {word}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def projections(config, dataset, split, seed_dir, names, path, task):
  """``<task>_projections.png``: the test case where the settings' Betti
  numbers disagree most, label and every setting."""
  from experiments import figures

  _, labels, probs = reproduce.probabilities_on_test_cases(
      config, dataset, split, seed_dir, names)
  labels = labels > 0.5
  masks = {name: p > 0.5 for name, p in probs.items()}
  errors = np.array([[np.abs(np.subtract(metrics.betti_numbers(m[i]),
                                         metrics.betti_numbers(labels[i])))
                      .sum() for i in range(len(labels))]
                     for m in masks.values()])
  case = int(np.argmax(np.ptp(errors, axis=0) + errors.sum(axis=0) * 1e-3))
  figures.projections_figure(
      labels[case],
      {f"{name}\nβ = {metrics.betti_numbers(m[case])}": m[case]
       for name, m in masks.items()},
      path, title=f"{task}: {split.test[case]} (label β = "
      f"{metrics.betti_numbers(labels[case])}), seed {config.seed},")


def write(results, names, config, out: pathlib.Path, *, progress) -> None:
  """``table.md``, ``results.json``, ``topology_vs_time.png``,
  ``intervals.png`` and ``curves.png`` in ``out``."""
  from experiments import figures

  minutes = results["minutes"]
  e1, e2 = config.phase1.epochs, config.phase2.epochs
  text = [f"# Topology losses compared: {len(results['seeds'])} evaluation "
          f"seed(s), a network on {'×'.join(map(str, config.shape))} "
          f"voxels (whole volumes, or patches where a task says so), "
          f"{e1} + {e2} epochs; "
          f"{minutes['total']:.1f} min", "",
          f"Command: `{results['command']}`; machine: {results['machine']}; "
          f"load {results['load_at_start']:.2f} at the start.", ""]
  for task, result in results["tasks"].items():
    split = result["split"]
    text += [f"## Task {task!r}: {len(split['train'])} train, "
             f"{len(split['val'])} validation, {len(split['test'])} test "
             f"cases ({minutes[task]['tuning']:.1f} min tuning, "
             f"{minutes[task]['evaluation']:.1f} min evaluation)", "",
             *_part_line(results.get("parts", {}).get(task)),
             *_protocol_line(result),
             tuning_markdown(result["tuning"], names["dice_ft"]),
             reproduce.markdown(result["table"], seeds=results["seeds"],
                                columns=COLUMNS, header="").lstrip(),
             paired_markdown(result["paired"], names["dice_ft"])]
  text.append(
      "Phase-2 s/epoch: median over the epochs after the first of each "
      "seed's run (the first compiles). Loss ms/step: forward + backward of "
      "the phase-2 loss alone, on one training batch of phase 1's logits. "
      "Every topological loss is trained as L_dice + λ·L_topo, λ from the "
      "search above. Breaks: predicted pieces beyond one per label "
      "component; missed: label components no prediction touches; "
      "spurious: predicted components touching no label "
      "(`topojax.component_errors`).")
  (out / "table.md").write_text("\n".join(text) + "\n")
  (out / "results.json").write_text(
      json.dumps(evaluate.json_ready(results), indent=1, allow_nan=False))
  figures.topology_time_figure(
      {task: {name: {"seconds": _scaled(row["seconds_per_epoch"], e2),
                     "betti0_error": row["betti0_error"],
                     "betti1_error": row["betti1_error"]}
              for name, row in result["table"].items()
              if name != names["phase1"]}
       for task, result in results["tasks"].items()},
      out / "topology_vs_time.png")
  figures.intervals_figure(
      {task: result["paired"] for task, result in results["tasks"].items()},
      out / "intervals.png", baseline=names["dice_ft"], keys=INTERVAL_KEYS)
  figures.validation_curves_figure(
      {task: {names[d]: np.array([runs[names[d]]["curve"] for runs in
                                  result["per_seed"].values()])
              for d in names}
       for task, result in results["tasks"].items()},
      out / "curves.png", phase1=names["phase1"])
  if progress:
    print("\n".join(text))
    print(f"written to {out}: table.md, results.json, intervals.png, "
          "curves.png, topology_vs_time.png, "
          + ", ".join(f"{t}_projections.png" for t in results["tasks"]))


def _part_line(part: dict | None) -> list[str]:
  """Where and when a task ran (``compare_losses``' parts may come from
  other sessions): the lines to put under its heading."""
  if part is None:
    return []
  commit = (part["commit"] or "unknown")[:12] + (
      "-dirty" if (part["commit"] or "").endswith("-dirty") else "")
  return [f"Run {part['date']} on commit {commit}, {part['machine']}, load "
          f"{part['load_at_start']:.2f} at its start.", ""]


def _protocol_line(result: dict) -> list[str]:
  """For a task trained on patches (its own ``"config"``), how: the lines
  to put under its heading; none for a whole-volume task."""
  config = result.get("config")
  if config is None:
    return []
  volume, patch = ("×".join(map(str, shape)) for shape in (
      result["synthetic"]["shape"], config["patch_size"]))
  validation = config.get("validation_overlap")
  validation = config["overlap"] if validation is None else validation
  return [f"Volumes of {volume} voxels, trained on {patch} patches "
          f"({config['patches_per_case']} per case and epoch), validated "
          "and predicted whole by sliding windows (Gaussian blending; "
          f"windows overlapping by {validation:g} in the per-epoch "
          f"validation, {config['overlap']:g} in prediction).", ""]


def _scaled(stat: dict[str, float], factor: float) -> dict[str, float]:
  return {"mean": stat["mean"] * factor, "std": stat["std"] * factor}
