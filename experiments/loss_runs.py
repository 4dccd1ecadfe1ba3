"""The loss comparison's runs: λ scales, the λ search, evaluation seeds.

Every function here trains or evaluates, and keeps what it did on disk
(``cases.json``, ``bm_error.json``, ``tuning.json``, the runs' own
checkpoints and logs), so that ``compare_losses --resume`` continues a
stopped comparison without repeating work. The rules the runs follow are
``experiments.loss_protocol``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import statistics
import time

import numpy as np

from experiments import loss_protocol as protocol
from experiments import paired
from experiments import reproduce
from topojax import data
from topojax import evaluate
from topojax import predict
from topojax import train


def epoch_seconds(phase_dir: pathlib.Path) -> float:
  """Median wall time of a phase's epochs after the first, in s.

  The first epoch of a phase compiles its training step, the others do not.
  """
  times = [line["time_s"] for line in train.read_log(phase_dir / "log.jsonl")]
  return statistics.median(times[1:] if len(times) > 1 else times)


def _phase1_logits(config, dataset, rows, phase1):
  """Logits of phase 1's best model on what the train step sees of the
  cases ``rows`` (``_training_batches``) and the targets of every loss
  (``train.steps.training_targets``), per batch."""
  import jax
  from flax import nnx

  model_def, state = predict.restore_best(
      phase1, config, in_channels=dataset.in_channels,
      out_channels=dataset.out_channels)
  model = nnx.merge(model_def, state)
  model.eval()
  for images, targets in _training_batches(config, dataset, rows):
    yield jax.block_until_ready(model(images)), targets


def _training_batches(config, dataset, rows):
  """``(images, {loss: targets})`` batches of the cases ``rows`` as the
  train step reads them: whole cases, in order, or for a run on patches
  one patch of each case, as its first epoch draws them
  (``data.iterate_patches``, seed ``config.seed``; a loss's targets
  cropped with the image, as training crops them)."""
  targets = {loss: train.steps.training_targets(loss, dataset.labels, rows)
             for loss in protocol.VARIANTS.values()}
  if config.patch_size is None:
    for first in range(0, len(rows), config.batch_size):
      batch = list(rows[first:first + config.batch_size])
      yield (dataset.images[batch],
             {loss: t[batch] for loss, t in targets.items()})
    return
  foreground = data.case_foreground(dataset.labels, rows)
  losses = list(targets)
  for images, *cropped in data.iterate_patches(
      (dataset.images, *targets.values()), foreground, rows,
      patch_size=config.patch_size, batch_size=config.batch_size,
      foreground_fraction=config.foreground_fraction, seed=config.seed,
      epoch=0):
    yield images, dict(zip(losses, cropped))


@functools.lru_cache(maxsize=None)
def _loss_step(loss: str, dice_weight: float, kernel_sizes: tuple[int, ...]):
  """The jit-compiled value and gradient of a loss; one per configuration,
  so that every task and seed reuses its compilation."""
  import jax

  return jax.jit(jax.value_and_grad(train.make_loss(
      loss, dice_weight=dice_weight, kernel_sizes=kernel_sizes)))


def loss_scales(config, dataset, split, phase1) -> dict[str, dict]:
  """Each topological loss's λ0: the power of ten nearest to
  ‖∇L_dice‖ / ‖∇L_topo‖ over the training cases, or one patch of each for
  a run on patches (logit gradients of phase 1's best model), and the two
  norms. A loss without gradient there gets 1.
  """
  squares = {loss: 0.0 for loss in protocol.VARIANTS.values()}
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
  for setting, loss in protocol.VARIANTS.items():
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


def betti_matching_error(config, dataset, split, run_dir: pathlib.Path
                         ) -> float:
  """Mean over the validation cases of the Betti matching loss between a
  run's foreground probabilities and the label (`topojax.
  betti_matching_loss`, superlevel filtration, every dimension): the λ
  rule's tie-break, a topology error that still separates runs whose
  thresholded masks have the same Betti numbers. Kept in
  ``run_dir/bm_error.json``."""
  from topojax import losses

  saved = run_dir / "bm_error.json"
  if saved.is_file():
    return json.loads(saved.read_text())["bm_error"]
  # probabilities_on_test_cases segments a split's test cases: here the
  # validation cases stand in for them.
  _, labels, probs = reproduce.probabilities_on_test_cases(
      config, dataset, dataclasses.replace(split, test=split.val),
      run_dir.parent, {run_dir.name: run_dir.name})
  # One call averages over the cases (the batch axis).
  error = float(losses.betti_matching_loss(
      probs[run_dir.name][..., None].astype(np.float32),
      labels[..., None].astype(np.float32)))
  saved.write_text(json.dumps({"bm_error": error, "cases": list(split.val)}))
  return error


def case_mean(rows: list[dict], key: str) -> float:
  """Mean of a metric over cases, its non-finite values left out."""
  values = np.array([r[key] for r in rows], float)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def train_setting(config, dataset, split, run_dir, loss, phase1, *,
                  progress, line) -> None:
  """Phase 2 of one setting from ``phase1``, its time printed."""
  began = time.perf_counter()
  train.train_phase(config, dataset, split, run_dir, phase=2, loss=loss,
                    init=phase1, progress=False)
  if progress:
    print(f"{line}: {time.perf_counter() - began:.0f} s", flush=True)


def tune(config, dataset, split, task_dir, tune_dir, *, grid, max_values,
         cache_dir, progress) -> dict:
  """The λ search of every topological loss on the tuning seed's
  validation cases (``loss_protocol``'s rules); ``tune_dir/tuning.json``.

  Args:
    grid: the first λ / λ0 to try.
    max_values: the most λ one loss may try; the grid grows a decade past
      the kept λ's edge while it sits on one and fewer are tried.
  """
  saved = tune_dir / "tuning.json"
  if saved.is_file():
    return {**json.loads(saved.read_text()), "resumed": True}
  config = dataclasses.replace(config, seed=protocol.TUNING_SEED)
  phase1 = tune_dir / "phase1"
  train.train_phase(config, dataset, split, phase1, phase=1, progress=False)
  scales = loss_scales(config, dataset, split, phase1)

  def validation(run_dir):
    rows = evaluate_run(run_dir, task_dir, split.val, cache_dir=cache_dir)
    return {key: case_mean(rows, key) for key in ("dice", "betti_error")}

  train_setting(config, dataset, split, tune_dir / "dice_ft", "dice", phase1,
                progress=progress, line="  tuning: dice_ft")
  baseline = validation(tune_dir / "dice_ft")
  result = {"seed": protocol.TUNING_SEED, "baseline": baseline,
            "max_values": max_values, "losses": {}}
  for loss in protocol.TOPOLOGY_LOSSES:
    scale = scales[loss]["scale"]
    runs, run_dirs = {}, {}
    pending = [scale * factor for factor in grid]
    while pending:
      for weight in pending:
        run_dirs[weight] = tune_dir / f"{loss}_lambda{weight:g}"
        train_setting(protocol.weighted(config, weight), dataset, split,
                      run_dirs[weight], loss, phase1, progress=progress,
                      line=f"  tuning: {loss}, λ = {weight:g}")
        runs[weight] = validation(run_dirs[weight])
      for weight in protocol.tied_weights(runs, baseline):
        if "bm_error" not in runs[weight]:
          runs[weight]["bm_error"] = betti_matching_error(
              config, dataset, split, run_dirs[weight])
      chosen = protocol.choose_weight(runs, baseline)
      added = protocol.next_weight(list(runs), chosen, max_values=max_values)
      pending = [] if added is None else [added]
    result["losses"][loss] = {
        **scales[loss],
        "grid": [{"lambda": w, **runs[w]} for w in sorted(runs)],
        "chosen": chosen, "added": len(runs) - len(grid),
        "capped": protocol.at_capped_edge(list(runs), chosen,
                                          max_values=max_values)}
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
  for setting, loss in protocol.VARIANTS.items():
    run_dir = seed_dir / setting
    weight = weights.get(setting)
    train_setting(
        config if weight is None else protocol.weighted(config, weight),
        dataset, split, run_dir, loss, phase1, progress=progress,
        line=f"  seed {config.seed}: {setting}"
        + ("" if weight is None else f", λ = {weight:g}"))
    out[setting] = {
        "cases": evaluate_run(run_dir, task_dir, split.test,
                              cache_dir=cache_dir),
        "curve": [l["val_dice"] for l in train.read_log(run_dir / "log.jsonl")],
        "seconds_per_epoch": epoch_seconds(run_dir),
        "loss_ms": loss_ms[setting]}
  return out
