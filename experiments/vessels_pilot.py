"""A pilot of the vessels task: does Dice fine-tuning break the trees?

    python -m experiments.vessels_pilot --out experiments/out/vessels_pilot
    python -m experiments.vessels_pilot --shape 96 --overlap 0.5 --out ...
    python -m experiments.vessels_pilot --quick --out /tmp/pilot  # smoke run

The comparison's protocol for one task and one setting, nothing tuned: the
vessels task (``topojax.synthetic.TASKS["vessels"]``) at ``--shape`` with
the comparison's 108 cases and split, the network and epochs of
``configs/compare_losses.json`` on patches of its ``shape``
(``loss_protocol.task_config``), phase 1 Dice and phase 2 Dice ("Dice
fine-tuning") on ``--seed`` (1), both predicted on the test cases by sliding
windows. Printed and written to ``--out/pilot.json``: per test case the
extra tree pieces (breaks), missed and spurious components of both phases
(the issue asks Dice fine-tuning to leave at least 0.5 breaks per case);
what an epoch costs, the training steps and the sliding-window validation
apart; one validation of the fine-tuned model timed at window overlaps 0.5
and 0; and from these the vessels' estimated minutes in the full
comparison (``study_minutes``). A pilot, not the comparison's verdict; it
resumes where it stopped (the runs keep their checkpoints and test
metrics) when run again on ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time

from experiments import compare_losses
from experiments import loss_protocol as protocol
from experiments import loss_runs
from experiments import reproduce
from topojax import evaluate
from topojax import train
from topojax import windows
from topojax.train import epoch

KEYS = ("dice", "cldice", "betti0_error", "breaks", "missed", "spurious")


def epoch_costs(phase_dir: pathlib.Path, config: train.TrainConfig,
                num_train: int) -> dict[str, float]:
  """Median seconds per epoch after the first (which compiles): training
  steps and validation apart, from the phase's ``log.jsonl`` (``time_s``
  holds both; ``cases_per_s`` the steps' throughput)."""
  lines = train.read_log(phase_dir / "log.jsonl")
  lines = lines[1:] if len(lines) > 1 else lines
  steps = epoch.num_steps(config, num_train)
  training = [steps * config.batch_size / l["cases_per_s"] for l in lines]
  total = [l["time_s"] for l in lines]
  return {"epoch_s": statistics.median(total),
          "train_s": statistics.median(training),
          "validate_s": statistics.median(t - s
                                          for t, s in zip(total, training)),
          "steps": steps}


def validation_costs(run_dir: pathlib.Path, dataset, rows,
                     config: train.TrainConfig, overlaps=(0.5, 0.0)
                     ) -> dict[str, dict[str, float]]:
  """Seconds and validation Dice of one sliding-window validation (as every
  epoch of a run on patches ends with) of a run's best model over the cases
  ``rows``, per window overlap: what a cheaper validation would cost and
  how far its Dice moves."""
  from topojax import predict
  from topojax.train import steps
  from topojax.train import validation

  segmenter = predict.Segmenter.from_run(run_dir)
  forward = steps.make_forward(segmenter.model_def)
  costs = {}
  for overlap in overlaps:
    changed = dataclasses.replace(config, validation_overlap=overlap)
    # Once to compile, once timed.
    for _ in range(2):
      began = time.perf_counter()
      scores = validation.validate_by_windows(
          forward, segmenter.model_state, dataset.images, dataset.labels,
          rows, config=changed)
    costs[f"{overlap:g}"] = {"seconds": time.perf_counter() - began,
                             "val_dice": scores["val_dice"],
                             "windows_per_case": len(windows.window_starts(
                                 dataset.case_shapes[rows[0]],
                                 config.patch_size, (overlap,) * 3))}
  return costs


def study_minutes(config: train.TrainConfig, *, train_s: float,
                  validate_s: float, test_s: float, num_val: int,
                  num_test: int, weights_per_loss: float = 4.0
                  ) -> dict[str, float]:
  """Estimated minutes of the vessels task in the full comparison, from a
  pilot's costs: ``train_s`` and ``validate_s`` per epoch, ``test_s`` to
  predict and evaluate the ``num_test`` test cases. The λ search trains
  phase 1, Dice fine-tuning and ``weights_per_loss`` λ per topological
  loss (3 to 5: ``loss_protocol.MAX_GRID``) and evaluates each on the
  ``num_val`` validation cases; each evaluation seed trains phase 1 and
  every setting and evaluates them on the test cases."""
  e1, e2 = config.phase1.epochs, config.phase2.epochs
  runs = len(protocol.TOPOLOGY_LOSSES) * weights_per_loss
  epochs = (e1 + e2 * (1 + runs)
            + len(protocol.EVAL_SEEDS) * (e1 + e2 * len(protocol.VARIANTS)))
  evaluations = ((1 + runs) * num_val / num_test
                 + len(protocol.EVAL_SEEDS) * (1 + len(protocol.VARIANTS)))
  parts = {"epochs": epochs, "training_steps": epochs * train_s / 60,
           "validation": epochs * validate_s / 60,
           "test_and_tuning_evaluation": evaluations * test_s / 60}
  parts["total"] = sum(v for k, v in parts.items() if k != "epochs")
  return parts


def pilot(*, out, config_path=compare_losses.DEFAULT_CONFIG,
          shape=protocol.VESSEL_SHAPE, overlap=None,
          patches_per_case=None, num_cases=protocol.NUM_CASES, seed=1,
          quick=False, cache_dir=None, progress=True) -> dict:
  """Phase 1 and Dice fine-tuning on the vessels task; ``pilot.json``."""
  load = os.getloadavg()[0]
  out = pathlib.Path(out)
  config = train.load_config(config_path)
  if quick:
    config = reproduce.quick_config(config)
  config = protocol.task_config(config, "vessels", shape=shape)
  changes = {k: v for k, v in (("overlap", overlap),
                               ("patches_per_case", patches_per_case))
             if v is not None}
  config = dataclasses.replace(config, seed=seed, **changes)
  synth = protocol.task_synth("vessels", config, num_cases=num_cases,
                              shape=shape)
  task_dir = out / "data" / "Task00_Vessels"
  began = time.perf_counter()
  dataset, split = protocol.task_data(task_dir, synth, config,
                                      num_cases=num_cases,
                                      cache_dir=cache_dir, progress=progress)
  prepared = time.perf_counter() - began
  phase1 = out / "phase1"
  timed = {}
  began = time.perf_counter()
  train.train_phase(config, dataset, split, phase1, phase=1, progress=False)
  timed["phase1_s"] = time.perf_counter() - began
  began = time.perf_counter()
  loss_runs.train_setting(config, dataset, split, out / "dice_ft", "dice",
                          phase1, progress=progress, line="dice_ft")
  timed["dice_ft_s"] = time.perf_counter() - began
  results = {"load_at_start": load, "shape": list(synth.shape),
             "config": config.to_json(),
             "split": [len(split.train), len(split.val), len(split.test)],
             "data_s": prepared, "runs": {}}
  saved = out / "pilot.json"
  earlier = (json.loads(saved.read_text())["runs"] if saved.is_file()
             else {})
  for name, run_dir in (("phase1", phase1), ("dice_ft", out / "dice_ft")):
    # A resumed pilot keeps the times of the work it does not redo.
    evaluated = (run_dir / "cases.json").is_file()
    began = time.perf_counter()
    cases = loss_runs.evaluate_run(run_dir, task_dir, split.test,
                                   cache_dir=cache_dir)
    test_s = time.perf_counter() - began
    results["runs"][name] = {
        "phase_s": earlier.get(name, {}).get("phase_s", timed[f"{name}_s"]),
        "test_s": (earlier[name]["test_s"] if evaluated and name in earlier
                   else test_s),
        "epochs": epoch_costs(run_dir, config, len(split.train)),
        "mean": {k: loss_runs.case_mean(cases, k) for k in KEYS},
        "cases": [{"case": c["case"], **{k: c[k] for k in KEYS}}
                  for c in cases]}
  run = results["runs"]["dice_ft"]
  results["validation"] = validation_costs(
      out / "dice_ft", dataset, dataset.indices(split.val), config)
  results["study_minutes"] = {
      f"overlap {key}": study_minutes(
          config, train_s=run["epochs"]["train_s"],
          validate_s=cost["seconds"], test_s=run["test_s"],
          num_val=len(split.val), num_test=len(split.test))
      for key, cost in results["validation"].items()}
  saved.write_text(json.dumps(evaluate.json_ready(results), indent=1))
  if progress:
    for name, run in results["runs"].items():
      means = ", ".join(f"{k} {v:.3f}" for k, v in run["mean"].items())
      cost = run["epochs"]
      print(f"{name}: {means}; epoch {cost['epoch_s']:.1f} s (steps "
            f"{cost['train_s']:.1f} s, validation {cost['validate_s']:.1f} "
            f"s), test prediction {run['test_s']:.0f} s")
    for key, cost in results["validation"].items():
      minutes = results["study_minutes"][f"overlap {key}"]
      print(f"validation at overlap {key}: {cost['seconds']:.1f} s, "
            f"Dice {cost['val_dice']:.3f}; the vessels study: "
            + ", ".join(f"{k} {v:.0f}" for k, v in minutes.items()))
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.vessels_pilot",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--config", default=str(compare_losses.DEFAULT_CONFIG),
                      help="TrainConfig JSON (default: configs/"
                      "compare_losses.json); its shape is the patch")
  parser.add_argument("--shape", type=int, default=protocol.VESSEL_SHAPE[0],
                      help="side of the volumes in voxels (default "
                      f"{protocol.VESSEL_SHAPE[0]})")
  parser.add_argument("--overlap", type=float,
                      help="sliding-window overlap of the predictions "
                      "(default the protocol's; the per-epoch validation "
                      "keeps the protocol's validation_overlap)")
  parser.add_argument("--patches-per-case", type=int,
                      help="patches per training case and epoch (default "
                      "the protocol's)")
  parser.add_argument("--num-cases", type=int, default=protocol.NUM_CASES)
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--quick", action="store_true",
                      help="2 + 2 epochs: a smoke run")
  parser.add_argument("--cache-dir")
  args = parser.parse_args(argv)
  try:
    pilot(out=args.out, config_path=args.config, shape=(args.shape,) * 3,
          overlap=args.overlap, patches_per_case=args.patches_per_case, num_cases=args.num_cases,
          seed=args.seed, quick=args.quick, cache_dir=args.cache_dir)
  except (ValueError, FileNotFoundError, FileExistsError) as err:
    print(f"vessels_pilot: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
