"""Which topology loss, and is the cheap one good enough? All on equal terms.

    python -m experiments.compare_losses             # 3 tasks, λ grid, 5 seeds
    python -m experiments.compare_losses --quick     # 2 + 2 epochs, 1 λ, 1 seed
    python -m experiments.compare_losses --resume    # continue a stopped run

The protocol, fixed before the run:

* Tasks: the built-in synthetic tasks (``topojax.synthetic.TASKS``):
  "components" (an ellipsoid among bright unlabelled blobs: Dice keeps
  spurious components), "loops" (a ring with a narrow neck: Dice breaks it)
  and "branches" (thin branching tubes among unlabelled fragments). 96 cases
  each: 36 train, 12 validation, 48 test (``split_counts``).
* Settings: phase 1 pre-trains the U-Net of ``configs/compare_losses.json``
  with Dice; from its best checkpoint phase 2 fine-tunes with the same epochs
  and learning rate once per setting: Dice alone, and Dice plus λ times each
  topological loss of ``topojax.train.LOSS_TABLE`` (the PPL at the published
  scale, PPL-norm, clDice, the PH loss of Hu et al., Betti matching,
  Skeleton Recall and cbDice). ``L_dice + λ L_topo`` is trained as
  ``L_topo + (1/λ) L_dice`` (``TrainConfig.dice_weight = 1/λ``): Adam's
  update does not change when the loss is scaled, up to its ε.
* Fair λ, per task and loss, on a tuning seed (0) that is no evaluation
  seed: the loss's scale λ0 is the power of ten nearest to
  ‖∇L_dice‖ / ‖∇L_topo‖, the gradients with respect to the logits of phase
  1's best model on the training cases; phase 2 runs with λ0/10, λ0 and
  10 λ0, and the rule (``choose_weight``) keeps, among the λ whose mean
  validation Dice is at least the Dice fine-tuning's minus 0.01, the one of
  lowest mean validation Σ|Δβ| (|Δβ0| + |Δβ1| + |Δβ2| per case), ties to
  the higher Dice; if no λ keeps Dice, the one of highest Dice.
* Evaluation: seeds 1–5, each with its own phase 1 and all settings
  at the chosen λ, every test case segmented once by each setting's best
  checkpoint (validation Dice); paired statistics against Dice fine-tuning
  (``experiments.paired``).

Written to ``--out`` (default ``experiments/out/compare_losses``):

* ``table.md``: per task the λ grid, the mean ± sd over seeds of every
  metric with the phase-2 seconds per epoch and the loss's milliseconds per
  step, and the paired differences with their verdicts; ``results.json``:
  the numbers behind it, per case;
* ``intervals.png``: the paired differences' 95 % intervals per task;
  ``curves.png``: phase-2 validation Dice per epoch; ``topology_vs_time.png``;
  ``<task>_projections.png``: one test case of the first evaluation seed;
* ``<task>/data/``, the task; ``<task>/tuning/`` and ``<task>/seed<k>/``,
  the runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

from experiments import paired
from experiments import reproduce
from topojax import data
from topojax import evaluate
from topojax import metrics
from topojax import predict
from topojax import synthetic
from topojax import train

DEFAULT_CONFIG = reproduce.ROOT / "configs" / "compare_losses.json"
DEFAULT_OUT = reproduce.ROOT / "out" / "compare_losses"
TASKS = ("components", "loops", "branches")
NUM_CASES = 96
TUNING_SEED = 0
EVAL_SEEDS = (1, 2, 3, 4, 5)
# Every loss of the table but Dice alone, which is the baseline.
TOPOLOGY_LOSSES = tuple(name for name, entry in train.LOSS_TABLE.items()
                        if entry.function is not None)
# Phase-2 settings: directory → loss (topojax.train.LOSS_TABLE).
VARIANTS = {"dice_ft": "dice", **{loss: loss for loss in TOPOLOGY_LOSSES}}
GRID = (0.1, 1.0, 10.0)  # λ / λ0.
DICE_MARGIN = 0.01
COLUMNS = (("dice", "Dice"), ("cldice", "clDice"), ("hd95_mm", "95HD (mm)"),
           ("betti0_error", r"\|Δβ0\|"), ("betti1_error", r"\|Δβ1\|"),
           ("betti2_error", r"\|Δβ2\|"),
           ("seconds_per_epoch", "phase-2 s/epoch"),
           ("loss_ms", "loss ms/step"))


def split_counts(num_cases: int) -> tuple[int, int]:
  """``(num_val, num_test)``: an eighth for validation, half for testing, so
  that 96 cases give 36 / 12 / 48 and the paired tests have 48 cases."""
  return max(1, round(num_cases / 8)), num_cases // 2


def weighted(config: train.TrainConfig, weight: float) -> train.TrainConfig:
  """The config that trains ``L_dice + weight · L_topo`` (as ``L_topo +
  L_dice / weight``, the same Adam steps)."""
  return dataclasses.replace(config, dice_weight=1.0 / weight)


def epoch_seconds(phase_dir: pathlib.Path) -> float:
  """Median wall time of a phase's epochs after the first, in s.

  The first epoch of a phase compiles its training step, the others do not.
  """
  times = [line["time_s"] for line in train.read_log(phase_dir / "log.jsonl")]
  return statistics.median(times[1:] if len(times) > 1 else times)


def _phase1_logits(config, dataset, rows, phase1):
  """Logits of phase 1's best model on the cases ``rows`` and the targets
  of every loss (``train.steps.training_targets``), per batch."""
  import jax
  from flax import nnx

  model_def, state = predict.restore_best(
      phase1, config, in_channels=dataset.images.shape[-1],
      out_channels=dataset.labels.shape[-1])
  model = nnx.merge(model_def, state)
  model.eval()
  targets = {loss: train.steps.training_targets(loss, dataset.labels, rows)
             for loss in VARIANTS.values()}
  for first in range(0, len(rows), config.batch_size):
    batch = list(rows[first:first + config.batch_size])
    logits = jax.block_until_ready(model(dataset.images[batch]))
    yield logits, {loss: t[batch] for loss, t in targets.items()}


@functools.lru_cache(maxsize=None)
def _loss_step(loss: str, dice_weight: float, kernel_sizes: tuple[int, ...]):
  """The jit-compiled value and gradient of a loss; one per configuration,
  so that every task and seed reuses its compilation."""
  import jax

  return jax.jit(jax.value_and_grad(train.make_loss(
      loss, dice_weight=dice_weight, kernel_sizes=kernel_sizes)))


def loss_scales(config, dataset, split, phase1) -> dict[str, dict]:
  """Each topological loss's λ0: the power of ten nearest to
  ‖∇L_dice‖ / ‖∇L_topo‖ over the training cases (logit gradients of phase
  1's best model), and the two norms. A loss without gradient there gets 1.
  """
  squares = {loss: 0.0 for loss in VARIANTS.values()}
  for logits, targets in _phase1_logits(config, dataset,
                                        dataset.indices(split.train), phase1):
    for loss in squares:
      # dice_weight 0: the topological term alone.
      _, grad = _loss_step(loss, 0.0 if loss != "dice" else 1.0,
                           config.kernel_sizes)(logits, targets[loss])
      squares[loss] += float(np.sum(np.square(np.asarray(grad, np.float64))))
  dice_norm = math.sqrt(squares.pop("dice"))
  scales = {}
  for loss, square in squares.items():
    norm = math.sqrt(square)
    scale = (10.0 ** round(math.log10(dice_norm / norm)) if norm > 0
             else 1.0)
    scales[loss] = {"scale": scale, "grad_norm": norm,
                    "dice_grad_norm": dice_norm}
  return scales


def time_losses(config, dataset, split, phase1, *, weights: dict[str, float],
                repeats: int = 5) -> dict[str, float]:
  """Milliseconds of each phase-2 loss's forward and backward, per step, on
  the logits of phase 1's best model for the first training batch (so a
  persistent-homology loss sees a real prediction's critical points).

  Returns:
    Setting directory → median over ``repeats`` calls, after one that
    compiles.
  """
  import jax

  logits, targets = next(_phase1_logits(
      config, dataset, dataset.indices(split.train)[:config.batch_size],
      phase1))
  timings = {}
  for setting, loss in VARIANTS.items():
    step = _loss_step(loss, 1.0 / weights.get(setting, 1.0),
                      config.kernel_sizes)
    jax.block_until_ready(step(logits, targets[loss]))
    times = []
    for _ in range(repeats):
      began = time.perf_counter()
      jax.block_until_ready(step(logits, targets[loss]))
      times.append(time.perf_counter() - began)
    timings[setting] = 1e3 * statistics.median(times)
  return timings


def evaluate_run(run_dir: pathlib.Path, task_dir: pathlib.Path,
                 case_ids, *, cache_dir) -> list[dict]:
  """Per-case metrics of a run's best checkpoint on ``case_ids``, with
  ``betti_error`` = Σ|Δβi|; kept in ``run_dir/cases.json`` for a resume."""
  saved = run_dir / "cases.json"
  if saved.is_file():
    return json.loads(saved.read_text())
  pred_dir = run_dir / "pred"
  predict.predict_run(run_dir, task_dir, pred_dir, cache_dir=cache_dir,
                      overwrite=True, case_ids=case_ids)
  (rows, _), = evaluate.evaluate_runs(
      {run_dir.name: pred_dir}, task_dir / "labelsTr", case_ids=case_ids,
      out_dir=run_dir / "report", overwrite=True).values()
  # Every metric of paired.METRICS but the sum, which is derived here.
  keys = [k for k in paired.METRICS if k != "betti_error"] + ["cce_3d"]
  rows = [{"case": r["case"], **{k: float(r[k]) for k in keys},
           "betti_error": float(r["betti0_error"] + r["betti1_error"]
                                + r["betti2_error"])} for r in rows]
  saved.write_text(json.dumps(evaluate.json_ready(rows)))
  return rows


def _case_mean(rows: list[dict], key: str) -> float:
  values = np.array([r[key] for r in rows], float)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def choose_weight(grid: dict[float, dict], baseline: dict) -> float:
  """The λ the pre-written rule keeps (module docstring).

  Args:
    grid: λ → ``{"dice", "betti_error"}``, means over validation cases.
    baseline: the same for Dice fine-tuning.
  """
  keeping = {w: r for w, r in grid.items()
             if r["dice"] >= baseline["dice"] - DICE_MARGIN}
  if not keeping:
    return max(grid, key=lambda w: grid[w]["dice"])
  return min(keeping, key=lambda w: (keeping[w]["betti_error"],
                                     -keeping[w]["dice"]))


def _train(config, dataset, split, run_dir, loss, phase1, progress, line):
  began = time.perf_counter()
  train.train_phase(config, dataset, split, run_dir, phase=2, loss=loss,
                    init=phase1, progress=False)
  if progress:
    print(f"{line}: {time.perf_counter() - began:.0f} s", flush=True)


def tune(config, dataset, split, task_dir, tune_dir, *, grid, cache_dir,
         progress) -> dict:
  """The λ grid of every topological loss on the tuning seed's validation
  cases, and the λ the rule keeps; ``tune_dir/tuning.json``."""
  saved = tune_dir / "tuning.json"
  if saved.is_file():
    return {**json.loads(saved.read_text()), "resumed": True}
  config = dataclasses.replace(config, seed=TUNING_SEED)
  phase1 = tune_dir / "phase1"
  train.train_phase(config, dataset, split, phase1, phase=1, progress=False)
  scales = loss_scales(config, dataset, split, phase1)

  def validation(run_dir):
    rows = evaluate_run(run_dir, task_dir, split.val, cache_dir=cache_dir)
    return {key: _case_mean(rows, key) for key in ("dice", "betti_error")}

  _train(config, dataset, split, tune_dir / "dice_ft", "dice", phase1,
         progress, f"  tuning: dice_ft")
  baseline = validation(tune_dir / "dice_ft")
  result = {"seed": TUNING_SEED, "baseline": baseline, "losses": {}}
  for loss in TOPOLOGY_LOSSES:
    scale = scales[loss]["scale"]
    runs = {}
    for factor in grid:
      weight = scale * factor
      run_dir = tune_dir / f"{loss}_lambda{weight:g}"
      _train(weighted(config, weight), dataset, split, run_dir, loss, phase1,
             progress, f"  tuning: {loss}, λ = {weight:g}")
      runs[weight] = validation(run_dir)
    result["losses"][loss] = {
        **scales[loss], "grid": [{"lambda": w, **r} for w, r in runs.items()],
        "chosen": choose_weight(runs, baseline)}
  saved.write_text(json.dumps(evaluate.json_ready(result), indent=1))
  return result


def evaluate_seed(config, dataset, split, task_dir, seed_dir, *, weights,
                  cache_dir, progress) -> dict[str, dict]:
  """One evaluation seed: phase 1, every setting at ``weights``, each
  evaluated on the test cases; setting directory → ``{"cases", "curve",
  "seconds_per_epoch", "loss_ms"}``."""
  phase1 = seed_dir / "phase1"
  train.train_phase(config, dataset, split, phase1, phase=1, progress=False)
  loss_ms = time_losses(config, dataset, split, phase1, weights=weights)
  out = {"phase1": {"cases": evaluate_run(phase1, task_dir, split.test,
                                          cache_dir=cache_dir),
                    "curve": [l["val_dice"] for l in train.read_log(
                        phase1 / "log.jsonl")]}}
  for setting, loss in VARIANTS.items():
    run_dir = seed_dir / setting
    weight = weights.get(setting)
    _train(config if weight is None else weighted(config, weight), dataset,
           split, run_dir, loss, phase1, progress,
           f"  seed {config.seed}: {setting}"
           + ("" if weight is None else f", λ = {weight:g}"))
    out[setting] = {
        "cases": evaluate_run(run_dir, task_dir, split.test,
                              cache_dir=cache_dir),
        "curve": [l["val_dice"] for l in train.read_log(run_dir / "log.jsonl")],
        "seconds_per_epoch": epoch_seconds(run_dir),
        "loss_ms": loss_ms[setting]}
  return out


def summarise(per_seed: dict[int, dict], names: dict[str, str]) -> dict:
  """Mean ± sd over seeds of each seed's case means, per setting."""
  table = {}
  for directory, name in names.items():
    row = {}
    for key, _ in COLUMNS:
      values = [(runs[directory].get(key, math.nan)
                 if key in ("seconds_per_epoch", "loss_ms")
                 else _case_mean(runs[directory]["cases"], key))
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


def compare(*, config_path=DEFAULT_CONFIG, tasks=TASKS, seeds=None,
            out=DEFAULT_OUT, quick=False, resume=False, num_cases=NUM_CASES,
            cache_dir=None, progress=True, command=None) -> dict:
  """The whole comparison; returns what ``results.json`` holds.

  ``seeds`` (evaluation seeds) default to ``EVAL_SEEDS``, or (1,) with
  ``quick``, which also runs 2 + 2 epochs and the grid's middle λ alone.
  ``command`` is recorded in the results, as given.
  """
  started = time.perf_counter()
  load = os.getloadavg()[0]
  if seeds is None:
    seeds = (1,) if quick else EVAL_SEEDS
  if not seeds or TUNING_SEED in seeds:
    raise ValueError(f"--seeds: give at least one seed, none of them the "
                     f"tuning seed {TUNING_SEED}; got {list(seeds)}")
  unknown = sorted(set(tasks) - set(synthetic.TASKS))
  if unknown or not tasks:
    raise ValueError(f"--tasks must name some of {sorted(synthetic.TASKS)}, "
                     f"got {list(tasks)}")
  config = train.load_config(config_path)
  if quick:
    config = reproduce.quick_config(config)
  grid = (1.0,) if quick else GRID
  out = pathlib.Path(out)
  reproduce.refuse_used_out(out, resume=resume, run="comparison")
  names = reproduce.setting_names(config, VARIANTS)
  results = {"command": command, "machine": _machine(), "load_at_start": load,
             "config": config.to_json(), "tuning_seed": TUNING_SEED,
             "seeds": list(seeds), "grid": list(grid), "tasks": {},
             "minutes": {}}
  for task in tasks:
    task_began = time.perf_counter()
    task_out = out / task
    task_dir = task_out / "data" / f"Task00_{task.capitalize()}"
    synth = dataclasses.replace(synthetic.TASKS[task], shape=config.shape,
                                num_cases=num_cases)
    if not (task_dir / "dataset.json").is_file():
      synthetic.generate_task(task_dir, synth, overwrite=resume,
                              progress=progress)
    dataset = data.load_dataset(task_dir, config.preprocess_config(),
                                cache_dir=cache_dir, progress=progress)
    num_val, num_test = split_counts(num_cases)
    split = data.make_split([c.case_id for c in dataset.task.cases],
                            num_val=num_val, num_test=num_test,
                            seed=config.split_seed)
    if progress:
      print(f"=== task {task}: λ grid on seed {TUNING_SEED} ===", flush=True)
    tuning = tune(config, dataset, split, task_dir, task_out / "tuning",
                  grid=grid, cache_dir=cache_dir, progress=progress)
    tuned_at = time.perf_counter()
    weights = {loss: r["chosen"] for loss, r in tuning["losses"].items()}
    per_seed = {}
    for seed in seeds:
      if progress:
        print(f"=== task {task}, seed {seed} ===", flush=True)
      per_seed[seed] = evaluate_seed(
          dataclasses.replace(config, seed=seed), dataset, split, task_dir,
          task_out / f"seed{seed}", weights=weights, cache_dir=cache_dir,
          progress=progress)
    arrays = per_case_arrays(per_seed, names)
    results["tasks"][task] = {
        "synthetic": dataclasses.asdict(synth),
        "split": dataclasses.asdict(split), "tuning": tuning,
        "weights": weights, "table": summarise(per_seed, names),
        "paired": paired.compare_settings(
            {n: a for n, a in arrays.items() if n != names["phase1"]},
            baseline=names["dice_ft"]),
        "per_seed": {str(s): {names[d]: v for d, v in runs.items()}
                     for s, runs in per_seed.items()}}
    _projections(dataclasses.replace(config, seed=seeds[0]), dataset, split,
                 task_out / f"seed{seeds[0]}", names,
                 out / f"{task}_projections.png", task)
    results["minutes"][task] = {
        "tuning": (tuned_at - task_began) / 60,
        "evaluation": (time.perf_counter() - tuned_at) / 60}
  results["minutes"]["total"] = (time.perf_counter() - started) / 60
  results["training_minutes"] = _training_minutes(out, tasks)
  _write(results, names, config, out, progress=progress)
  return results


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def _training_minutes(out: pathlib.Path, tasks) -> dict[str, dict]:
  """Minutes of training epochs in every log, per task and part: counted
  from the logs, so a resumed run counts the work of all its sessions."""
  def logged(root: pathlib.Path) -> float:
    return sum(line["time_s"] for log in root.glob("**/log.jsonl")
               for line in train.read_log(log)) / 60

  minutes = {}
  for task in tasks:
    tuning = logged(out / task / "tuning")
    minutes[task] = {"tuning": tuning,
                     "evaluation": logged(out / task) - tuning}
  return minutes


def _projections(config, dataset, split, seed_dir, names, path, task):
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


def tuning_markdown(tuning: dict, baseline_name: str) -> str:
  base = tuning["baseline"]
  lines = [f"λ grid on seed {tuning['seed']}'s validation cases "
           f"({baseline_name}: Dice {base['dice']:.3f}, Σ\\|Δβ\\| "
           f"{base['betti_error']:.3f}); cells: validation Dice / Σ\\|Δβ\\|, "
           "the kept λ in bold.", "",
           "| Loss | λ0 | λ: Dice / Σ\\|Δβ\\| | kept λ |", "|---|---|---|---|"]
  for loss, r in tuning["losses"].items():
    cells = []
    for g in r["grid"]:
      cell = f"{g['lambda']:g}: {g['dice']:.3f} / {g['betti_error']:.3f}"
      cells.append(f"**{cell}**" if g["lambda"] == r["chosen"] else cell)
    lines.append(f"| {reproduce.LABELS[loss]} | {r['scale']:g} | "
                 + "; ".join(cells) + f" | {r['chosen']:g} |")
  return "\n".join(lines) + "\n"


def paired_markdown(comparisons: dict, baseline_name: str) -> str:
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


def _write(results, names, config, out, *, progress):
  from experiments import figures

  minutes = results["minutes"]
  e1, e2 = config.phase1.epochs, config.phase2.epochs
  text = [f"# Topology losses compared: {len(results['seeds'])} evaluation "
          f"seed(s), {config.shape} voxels, {e1} + {e2} epochs; "
          f"{minutes['total']:.1f} min", "",
          f"Command: `{results['command']}`; machine: {results['machine']}; "
          f"load {results['load_at_start']:.2f} at the start.", ""]
  for task, result in results["tasks"].items():
    split = result["split"]
    text += [f"## Task {task!r}: {len(split['train'])} train, "
             f"{len(split['val'])} validation, {len(split['test'])} test "
             f"cases ({minutes[task]['tuning']:.1f} min tuning, "
             f"{minutes[task]['evaluation']:.1f} min evaluation)", "",
             tuning_markdown(result["tuning"], names["dice_ft"]),
             reproduce.markdown(result["table"], seeds=results["seeds"],
                                columns=COLUMNS, header="").lstrip(),
             paired_markdown(result["paired"], names["dice_ft"])]
  text.append(
      "Phase-2 s/epoch: median over the epochs after the first of each "
      "seed's run (the first compiles). Loss ms/step: forward + backward of "
      "the phase-2 loss alone, on one training batch of phase 1's logits. "
      "Every topological loss is trained as L_dice + λ·L_topo, λ from the "
      "grid above.")
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
      out / "intervals.png", baseline=names["dice_ft"])
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


def _scaled(stat: dict[str, float], factor: float) -> dict[str, float]:
  return {"mean": stat["mean"] * factor, "std": stat["std"] * factor}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.compare_losses",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                      help="TrainConfig JSON (default: configs/"
                      "compare_losses.json)")
  parser.add_argument("--tasks", nargs="+", default=list(TASKS),
                      choices=sorted(synthetic.TASKS),
                      help="built-in synthetic tasks (default: all three)")
  parser.add_argument("--seeds", type=int, nargs="+",
                      help="evaluation seeds (default 1 2 3 4 5; 1 with "
                      f"--quick); seed {TUNING_SEED} tunes λ")
  parser.add_argument("--num-cases", type=int, default=NUM_CASES,
                      help=f"cases per task (default {NUM_CASES})")
  parser.add_argument("--out", default=str(DEFAULT_OUT),
                      help="output folder (default experiments/out/"
                      "compare_losses)")
  parser.add_argument("--quick", action="store_true",
                      help="2 + 2 epochs, λ = λ0 only, one seed: a smoke run")
  parser.add_argument("--resume", action="store_true",
                      help="continue a stopped comparison in --out")
  parser.add_argument("--cache-dir", help="preprocessing cache (default "
                      "~/.cache/topojax)")
  args = parser.parse_args(argv)
  # 162 phase-2 runs compile a handful of distinct steps: the persistent
  # cache compiles each (loss, λ) once instead of once per run.
  import jax
  jax.config.update("jax_compilation_cache_dir",
                    str(pathlib.Path(args.out) / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    compare(config_path=args.config, tasks=tuple(args.tasks),
            seeds=args.seeds, out=args.out, quick=args.quick,
            resume=args.resume, num_cases=args.num_cases,
            cache_dir=args.cache_dir,
            command=" ".join(["python -m experiments.compare_losses",
                              *(argv if argv is not None else sys.argv[1:])]))
  except (ValueError, FileNotFoundError, FileExistsError) as err:
    print(f"compare_losses: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
