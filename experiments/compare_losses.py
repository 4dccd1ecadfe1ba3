"""Which topology loss, and is the cheap one good enough? All on equal terms.

    python -m experiments.compare_losses             # 2 tasks, 3 seeds
    python -m experiments.compare_losses --quick     # 1 seed, 2 + 2 epochs
    python -m experiments.compare_losses --resume    # continue a stopped run

On each built-in synthetic task (``topojax.synthetic.TASKS``: "components",
an ellipsoid among bright unlabelled blobs, where Dice keeps spurious
components; "loops", a ring with a narrow neck, which Dice breaks), 60 cases
each, and for each seed, phase 1 pre-trains the U-Net of
``configs/compare_losses.json`` with Dice; from its best checkpoint, phase 2
fine-tunes five ways with the same epochs and learning rate: Dice alone, the
Projected Pooling Loss at the published scale and normalised per pooled
cell, clDice, and the persistent-homology loss of Hu et al., each
topological loss added to ``dice_weight`` (λ) times the Dice loss. Every
setting then segments the held-out test cases, evaluated once
(``reproduce.run_seed``).

Written to ``--out`` (default ``experiments/out/compare_losses``):

* ``table.md``: per task, mean ± standard deviation over seeds of Dice,
  95HD, 3D CCE and the Betti errors |Δβ0|, |Δβ1|, |Δβ2| (each seed's mean
  over the test cases), phase-2 seconds per epoch (median over epochs after
  the first, which compiles) and the loss's milliseconds per training step
  (forward and backward with respect to the logits of one training batch,
  timed alone); ``results.json``: the numbers behind it, per seed;
* ``topology_vs_time.png``: topology errors against phase-2 training time;
* ``<task>_projections.png``: one test case of seed 0, label and every
  setting, as maximum projections;
* ``<task>/data/``, the task; ``<task>/seed<k>/<setting>/``, each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import sys
import time

import numpy as np

from experiments import reproduce
from topojax import data
from topojax import evaluate
from topojax import metrics
from topojax import predict
from topojax import synthetic
from topojax import train

DEFAULT_CONFIG = reproduce.ROOT / "configs" / "compare_losses.json"
DEFAULT_OUT = reproduce.ROOT / "out" / "compare_losses"
TASKS = ("components", "loops")
NUM_CASES = 60
# Phase-2 settings: directory → loss (topojax.train.LOSSES).
VARIANTS = {"dice_ft": "dice", "ppl": "ppl", "ppl_norm": "ppl_norm",
            "cldice": "cldice", "hutopo": "hutopo"}
COLUMNS = (("dice", "Dice"), ("hd95_mm", "95HD (mm)"), ("cce_3d", "3D CCE"),
           ("betti0_error", r"\|Δβ0\|"), ("betti1_error", r"\|Δβ1\|"),
           ("betti2_error", r"\|Δβ2\|"),
           ("seconds_per_epoch", "phase-2 s/epoch"),
           ("loss_ms", "loss ms/step"))


def epoch_seconds(phase_dir: pathlib.Path) -> float:
  """Median wall time of a phase's epochs after the first, in s.

  The first epoch of a phase compiles its training step (tens of seconds on
  a CPU), which the others do not.
  """
  times = [line["time_s"] for line in train.read_log(phase_dir / "log.jsonl")]
  return statistics.median(times[1:] if len(times) > 1 else times)


def time_losses(config: train.TrainConfig, dataset: data.Dataset,
                split: data.Split, phase1: pathlib.Path, *,
                repeats: int = 5) -> dict[str, float]:
  """Milliseconds of each phase-2 loss's forward and backward, per step.

  On the logits phase 1's best model gives for the first training batch,
  so that a persistent-homology loss sees the critical points of a real
  prediction, not of noise.

  Returns:
    Setting directory → median milliseconds over ``repeats`` calls, after
    one that compiles.
  """
  import jax
  from flax import nnx

  rows = dataset.indices(split.train)[:config.batch_size]
  images = np.stack([dataset.images[r] for r in rows])
  labels = np.stack([dataset.labels[r] for r in rows])
  model_def, state = predict.restore_best(
      phase1, config, in_channels=images.shape[-1],
      out_channels=labels.shape[-1])
  model = nnx.merge(model_def, state)
  model.eval()
  logits = jax.block_until_ready(model(images))
  timings = {}
  for setting, loss in VARIANTS.items():
    step = _loss_step(loss, config.dice_weight, config.kernel_sizes)
    jax.block_until_ready(step(logits, labels))
    times = []
    for _ in range(repeats):
      began = time.perf_counter()
      jax.block_until_ready(step(logits, labels))
      times.append(time.perf_counter() - began)
    timings[setting] = 1e3 * statistics.median(times)
  return timings


@functools.lru_cache(maxsize=None)
def _loss_step(loss: str, dice_weight: float, kernel_sizes: tuple[int, ...]):
  """The jit-compiled value and gradient of a loss; one per configuration,
  so that every task and seed reuses its compilation."""
  import jax

  return jax.jit(jax.value_and_grad(train.make_loss(
      loss, dice_weight=dice_weight, kernel_sizes=kernel_sizes)))


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


def compare(*, config_path=DEFAULT_CONFIG, tasks=TASKS, seeds=None,
            out=DEFAULT_OUT, quick=False, resume=False, num_cases=NUM_CASES,
            cache_dir=None, progress=True) -> dict:
  """The whole comparison; returns what ``results.json`` holds.

  ``seeds`` defaults to (0, 1, 2), or (0,) with ``quick``.
  """
  started = time.perf_counter()
  if seeds is None:
    seeds = (0,) if quick else (0, 1, 2)
  if not seeds:
    raise ValueError("--seeds: give at least one seed")
  unknown = sorted(set(tasks) - set(synthetic.TASKS))
  if unknown or not tasks:
    raise ValueError(f"--tasks must name some of {sorted(synthetic.TASKS)}, "
                     f"got {list(tasks)}")
  config = train.load_config(config_path)
  if quick:
    config = reproduce.quick_config(config)
  out = pathlib.Path(out)
  reproduce.refuse_used_out(out, resume=resume, run="comparison")
  names = reproduce.setting_names(config, VARIANTS)
  results = {"config": config.to_json(), "seeds": list(seeds), "tasks": {}}
  for task in tasks:
    task_out = out / task
    task_dir = task_out / "data" / f"Task00_{task.capitalize()}"
    synth = dataclasses.replace(synthetic.TASKS[task], shape=config.shape,
                                num_cases=num_cases)
    if not (task_dir / "dataset.json").is_file():
      synthetic.generate_task(task_dir, synth, overwrite=resume,
                              progress=progress)
    dataset = data.load_dataset(task_dir, config.preprocess_config(),
                                cache_dir=cache_dir, progress=progress)
    split = data.default_split(dataset.task, seed=config.split_seed)
    per_seed, extra = {}, {}
    for seed in seeds:
      seed_config = dataclasses.replace(config, seed=seed)
      seed_dir = task_out / f"seed{seed}"
      if progress:
        print(f"=== task {task}, seed {seed} ===", flush=True)
      per_seed[seed] = reproduce.run_seed(
          seed_config, dataset, split, task_dir, seed_dir,
          variants=VARIANTS, cache_dir=cache_dir, progress=progress)
      loss_ms = time_losses(seed_config, dataset, split, seed_dir / "phase1")
      extra[seed] = {
          setting: {"seconds_per_epoch": epoch_seconds(seed_dir / setting),
                    "loss_ms": loss_ms[setting]}
          for setting in VARIANTS}
    table = reproduce.aggregate(per_seed, names)
    for setting, name in names.items():
      for key in ("seconds_per_epoch", "loss_ms"):
        table[name][key] = reproduce.over_seeds(
            [extra[s][setting][key] for s in seeds] if setting in VARIANTS
            else [])
    results["tasks"][task] = {
        "synthetic": dataclasses.asdict(synth),
        "split": dataclasses.asdict(split), "table": table,
        "per_seed": {str(s): {names[d]: {**v, **extra[s].get(d, {})}
                              for d, v in per_seed[s].items()}
                     for s in seeds}}
    _projections(dataclasses.replace(config, seed=seeds[0]), dataset, split,
                 task_out / f"seed{seeds[0]}", names,
                 out / f"{task}_projections.png", task)

  minutes = (time.perf_counter() - started) / 60
  results["minutes"] = minutes
  e2 = config.phase2.epochs
  text = [f"# Topology losses compared: {len(seeds)} seed(s), "
          f"{config.shape} voxels, {config.phase1.epochs} + {e2} epochs; "
          f"{minutes:.1f} min", ""]
  for task, result in results["tasks"].items():
    split = result["split"]
    text.append(reproduce.markdown(
        result["table"], seeds=seeds, columns=COLUMNS,
        header=f"## Task {task!r}: {len(split['train'])} train, "
        f"{len(split['val'])} validation, {len(split['test'])} test cases"))
  text.append(
      "Phase-2 s/epoch: median over the epochs after the first of each "
      "seed's run (the first compiles). Loss ms/step: forward + backward of "
      "the phase-2 loss alone, on one training batch of phase 1's logits. "
      f"Every topological loss is trained as L_topo + {config.dice_weight:g}"
      "·L_dice.")
  (out / "table.md").write_text("\n".join(text) + "\n")
  (out / "results.json").write_text(
      json.dumps(evaluate.json_ready(results), indent=1, allow_nan=False))

  from experiments import figures
  figures.topology_time_figure(
      {task: {name: {"seconds": _scaled(row["seconds_per_epoch"], e2),
                     "betti0_error": row["betti0_error"],
                     "betti1_error": row["betti1_error"]}
              for name, row in result["table"].items()
              if name != names["phase1"]}
       for task, result in results["tasks"].items()},
      out / "topology_vs_time.png")
  if progress:
    print("\n".join(text))
    print(f"written to {out}: table.md, results.json, topology_vs_time.png, "
          + ", ".join(f"{t}_projections.png" for t in tasks))
  return results


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
                      help="built-in synthetic tasks (default: both)")
  parser.add_argument("--seeds", type=int, nargs="+",
                      help="training seeds (default 0 1 2; 0 with --quick)")
  parser.add_argument("--num-cases", type=int, default=NUM_CASES,
                      help=f"cases per task (default {NUM_CASES})")
  parser.add_argument("--out", default=str(DEFAULT_OUT),
                      help="output folder (default experiments/out/"
                      "compare_losses)")
  parser.add_argument("--quick", action="store_true",
                      help="2 + 2 epochs, one seed: a smoke run")
  parser.add_argument("--resume", action="store_true",
                      help="continue a stopped comparison in --out")
  parser.add_argument("--cache-dir", help="preprocessing cache (default "
                      "~/.cache/topojax)")
  args = parser.parse_args(argv)
  try:
    compare(config_path=args.config, tasks=tuple(args.tasks),
            seeds=args.seeds, out=args.out, quick=args.quick,
            resume=args.resume, num_cases=args.num_cases,
            cache_dir=args.cache_dir)
  except (ValueError, FileNotFoundError, FileExistsError) as err:
    print(f"compare_losses: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
