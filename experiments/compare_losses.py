"""Which topology loss, and is the cheap one good enough? All on equal terms.

    python -m experiments.compare_losses             # 4 tasks, λ search, 5 seeds
    python -m experiments.compare_losses --quick     # 2 + 2 epochs, 1 λ, 1 seed,
                                                     # the 32³ tasks
    python -m experiments.compare_losses --resume    # continue a stopped run

The protocol, fixed before the run (``experiments.loss_protocol`` holds its
constants and rules, ``experiments.loss_runs`` the runs,
``experiments.loss_tables`` the tables and figures):

* Tasks: built-in synthetic tasks (``topojax.synthetic.TASKS``):
  "components" (an ellipsoid among bright unlabelled blobs: Dice keeps
  spurious components), "loops" (a ring with a narrow neck: Dice breaks it)
  and "branches" (thin branching tubes among unlabelled fragments), each
  resized to the config's ``shape`` and trained whole; and "vessels"
  (vessel trees with stenoses and tips thinner than a voxel: Dice breaks
  them) at ``loss_protocol.VESSEL_SHAPE``, larger than the network's input:
  trained on patches of the config's ``shape``, validated and predicted
  whole by sliding windows (``loss_protocol.task_config``). 108 cases each:
  36 train, 24 validation, 48 test (``split_counts``).
* Settings: phase 1 pre-trains the U-Net of ``configs/compare_losses.json``
  with Dice; from its best checkpoint phase 2 fine-tunes with the same epochs
  and learning rate once per setting: Dice alone, and Dice plus λ times each
  topological loss of ``topojax.train.LOSS_TABLE`` (the PPL at the published
  scale, PPL-norm, clDice, the PH loss of Hu et al., Betti matching,
  Skeleton Recall and cbDice). ``L_dice + λ L_topo`` is trained as
  ``L_topo + (1/λ) L_dice`` (``TrainConfig.dice_weight = 1/λ``): Adam's
  update does not change when the loss is scaled, up to its ε.
* Fair λ, per task and loss, on a tuning seed (0) that is no evaluation
  seed, on its 24 validation cases: the loss's scale λ0 is the power of ten
  nearest to ‖∇L_dice‖ / ‖∇L_topo‖, the gradients with respect to the
  logits of phase 1's best model on the training cases; phase 2 runs with
  λ0/10, λ0 and 10 λ0. The rule (``loss_protocol.choose_weight``) keeps,
  among the λ whose mean validation Dice is at least the Dice
  fine-tuning's minus 0.01, the one of lowest mean validation Σ|Δβ|
  (|Δβ0| + |Δβ1| + |Δβ2| per case); among λ tied there (as when Dice
  fine-tuning leaves no topology error on validation, so that every λ
  scores 0), the one of lowest mean validation Betti matching error of the
  probability maps (``loss_runs.betti_matching_error``); then the higher
  Dice; if no λ keeps Dice, the one of highest Dice. When the kept λ is the
  grid's smallest or largest, the grid grows a decade that way and the rule
  runs again (``loss_protocol.next_weight``), at most twice: five values at
  most; a kept λ still on an edge then is marked in the table.
* Evaluation: seeds 1–5, each with its own phase 1 and all settings
  at the chosen λ, every test case segmented once by each setting's best
  checkpoint (validation Dice); paired statistics against Dice fine-tuning
  (``experiments.paired``), the breaks, missed and spurious components
  (``topojax.component_errors``) among the metrics.

Written to ``--out`` (default ``experiments/out/compare_losses``):

* ``table.md``: per task the λ search, the mean ± sd over seeds of every
  metric with the phase-2 seconds per epoch and the loss's milliseconds per
  step, and the paired differences with their verdicts; ``results.json``:
  the numbers behind it, per case;
* ``intervals.png``: the paired differences' 95 % intervals per task;
  ``curves.png``: phase-2 validation Dice per epoch; ``topology_vs_time.png``;
  ``<task>_projections.png``: one test case of the first evaluation seed;
* ``<task>/data/``, the task; ``<task>/tuning/`` and ``<task>/seed<k>/``,
  the runs; ``<task>/task.json``, the task's part of ``results.json``
  (with its minutes, the load at its start, the commit and the date),
  written when the task is done.

In parts, across sessions or machines: ``--resume`` does not rerun a task
whose ``<task>/task.json`` is in ``--out``, it reads it; the table and
figures are made from every task's part. So a session may run some
``--tasks`` and keep ``<task>/task.json`` and ``<task>_projections.png``
of each (the runs need not be kept); a later session copies them back into
its ``--out`` and runs with ``--resume`` and the same options (a part
written with another config, seeds, grid or number of cases is refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from experiments import loss_protocol as protocol
from experiments import loss_runs
from experiments import loss_tables
from experiments import paired
from experiments import reproduce
from topojax import synthetic
from topojax import train

DEFAULT_CONFIG = reproduce.ROOT / "configs" / "compare_losses.json"
DEFAULT_OUT = reproduce.ROOT / "out" / "compare_losses"
# A finished task's part of the results, in out/<task>/.
PART_FILE = "task.json"
# The settings, as other modules and tests name them from here.
VARIANTS = protocol.VARIANTS


def compare(*, config_path=DEFAULT_CONFIG, tasks=None, seeds=None,
            out=DEFAULT_OUT, quick=False, resume=False,
            num_cases=protocol.NUM_CASES, cache_dir=None, progress=True,
            command=None) -> dict:
  """The whole comparison; returns what ``results.json`` holds.

  Each task done writes its part, ``out/<task>/task.json``; with
  ``resume`` a task whose part is there is read from it, not run.

  ``seeds`` (evaluation seeds) default to ``loss_protocol.EVAL_SEEDS``, or
  (1,) with ``quick``, which also runs 2 + 2 epochs and λ0 alone; ``tasks``
  to ``loss_protocol.default_tasks(quick)`` (with ``quick``, not the
  vessels).
  ``command`` is recorded in the results, as given.
  """
  started = time.perf_counter()
  load = os.getloadavg()[0]
  if seeds is None:
    seeds = (1,) if quick else protocol.EVAL_SEEDS
  if tasks is None:
    tasks = protocol.default_tasks(quick)
  if not seeds or protocol.TUNING_SEED in seeds:
    raise ValueError(f"--seeds: give at least one seed, none of them the "
                     f"tuning seed {protocol.TUNING_SEED}; got {list(seeds)}")
  unknown = sorted(set(tasks) - set(synthetic.TASKS))
  if unknown or not tasks:
    raise ValueError(f"--tasks must name some of {sorted(synthetic.TASKS)}, "
                     f"got {list(tasks)}")
  config = train.load_config(config_path)
  if quick:
    config = reproduce.quick_config(config)
  grid = (1.0,) if quick else protocol.GRID
  # --quick: λ0 alone, never extended.
  max_values = 1 if quick else protocol.MAX_GRID
  out = pathlib.Path(out)
  reproduce.refuse_used_out(out, resume=resume, run="comparison")
  names = reproduce.setting_names(config, VARIANTS)
  results = {"command": command, "machine": _machine(), "load_at_start": load,
             "config": config.to_json(), "tuning_seed": protocol.TUNING_SEED,
             "seeds": list(seeds), "grid": list(grid), "tasks": {},
             "minutes": {}}
  expected = {"config": config.to_json(), "seeds": list(seeds),
              "grid": list(grid), "max_values": max_values,
              "num_cases": num_cases}
  results["parts"], results["training_minutes"] = {}, {}
  for task in tasks:
    part_path = out / task / PART_FILE
    part = _read_part(part_path, expected) if resume else None
    if part is None:
      part = _run_task(task, config, names, out, seeds=seeds, grid=grid,
                       max_values=max_values, num_cases=num_cases,
                       cache_dir=cache_dir, progress=progress)
      part["run"] = expected
      # NaN stays NaN (Python's JSON reads it back), so that a kept part is
      # the result as it was computed; results.json writes it null.
      part_path.write_text(json.dumps(part, indent=1))
    elif not (out / f"{task}_projections.png").is_file():
      _redraw_projections(task, config, names, out, seeds=seeds,
                          num_cases=num_cases, cache_dir=cache_dir,
                          progress=progress)
    elif progress:
      print(f"=== task {task}: kept from {part_path} ({part['date']}) ===",
            flush=True)
    results["tasks"][task] = part["result"]
    results["minutes"][task] = part["minutes"]
    results["training_minutes"][task] = part["training_minutes"]
    results["parts"][task] = {key: part[key] for key in (
        "date", "commit", "machine", "load_at_start")}
  # The tasks' own minutes, whichever session ran them; this session's
  # wall time apart.
  results["minutes"]["total"] = sum(
      m["tuning"] + m["evaluation"] for m in results["minutes"].values())
  results["minutes"]["session"] = (time.perf_counter() - started) / 60
  loss_tables.write(results, names, config, out, progress=progress)
  return results


def _task_data(task, config, out, *, num_cases, cache_dir, progress):
  """``(synth, task_config, task_dir, dataset, split)`` of a task,
  generated in ``out/<task>/data`` unless it is there."""
  task_dir = out / task / "data" / f"Task00_{task.capitalize()}"
  synth = protocol.task_synth(task, config, num_cases=num_cases)
  task_config = protocol.task_config(config, task)
  dataset, split = protocol.task_data(
      task_dir, synth, task_config, num_cases=num_cases, cache_dir=cache_dir,
      progress=progress)
  return synth, task_config, task_dir, dataset, split


def _run_task(task, config, names, out, *, seeds, grid, max_values,
              num_cases, cache_dir, progress) -> dict:
  """One task's λ search, evaluation seeds and projections figure: its part
  of the results, as ``out/<task>/task.json`` keeps it."""
  # The code that runs it: read before, as the checkout may move on while
  # it runs.
  load, commit = os.getloadavg()[0], _commit()
  task_began = time.perf_counter()
  task_out = out / task
  synth, task_config, task_dir, dataset, split = _task_data(
      task, config, out, num_cases=num_cases, cache_dir=cache_dir,
      progress=progress)
  if progress:
    print(f"=== task {task}: λ search on seed {protocol.TUNING_SEED} ===",
          flush=True)
  tuning = loss_runs.tune(task_config, dataset, split, task_dir,
                          task_out / "tuning", grid=grid,
                          max_values=max_values, cache_dir=cache_dir,
                          progress=progress)
  tuned_at = time.perf_counter()
  weights = {loss: r["chosen"] for loss, r in tuning["losses"].items()}
  per_seed = {}
  for seed in seeds:
    if progress:
      print(f"=== task {task}, seed {seed} ===", flush=True)
    per_seed[seed] = loss_runs.evaluate_seed(
        dataclasses.replace(task_config, seed=seed), dataset, split,
        task_dir, task_out / f"seed{seed}", weights=weights,
        cache_dir=cache_dir, progress=progress)
  arrays = loss_tables.per_case_arrays(per_seed, names)
  result = {
      "synthetic": dataclasses.asdict(synth),
      **({"config": task_config.to_json()} if task_config != config
         else {}),
      "split": dataclasses.asdict(split), "tuning": tuning,
      "weights": weights, "table": loss_tables.summarise(per_seed, names),
      "paired": paired.compare_settings(
          {n: a for n, a in arrays.items() if n != names["phase1"]},
          baseline=names["dice_ft"]),
      "per_seed": {str(s): {names[d]: v for d, v in runs.items()}
                   for s, runs in per_seed.items()}}
  loss_tables.projections(
      dataclasses.replace(task_config, seed=seeds[0]), dataset, split,
      task_out / f"seed{seeds[0]}", names,
      out / f"{task}_projections.png", task)
  minutes = {"tuning": (tuned_at - task_began) / 60,
             "evaluation": (time.perf_counter() - tuned_at) / 60}
  return {"task": task, "result": result, "minutes": minutes,
          "training_minutes": _training_minutes(out, [task])[task],
          "load_at_start": load, "commit": commit,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "machine": _machine()}


def _read_part(path: pathlib.Path, expected: dict) -> dict | None:
  """A finished task's part (``_run_task``), or ``None`` if there is none.

  Raises:
    ValueError: the part is not valid JSON, or a run with another config,
      seeds, λ grid or number of cases wrote it.
  """
  if not path.is_file():
    return None
  try:
    part = json.loads(path.read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not valid JSON ({err})") from None
  differs = sorted(k for k in expected
                   if part.get("run", {}).get(k) != expected[k])
  if differs:
    raise ValueError(f"{path} was written by another comparison (its "
                     f"{', '.join(differs)} differ); remove it to rerun "
                     "the task, or resume with that run's options")
  return part


def _redraw_projections(task, config, names, out, *, seeds, num_cases,
                        cache_dir, progress) -> None:
  """``<task>_projections.png`` of a kept task again, from the checkpoints
  of its first evaluation seed.

  Raises:
    FileNotFoundError: they are not in ``out`` either.
  """
  seed_dir = out / task / f"seed{seeds[0]}"
  figure = out / f"{task}_projections.png"
  if not all((seed_dir / d / "summary.json").is_file() for d in names):
    raise FileNotFoundError(
        f"{figure} is missing and so are the runs of {seed_dir} to draw it "
        f"again: copy it back beside {out / task / PART_FILE}")
  _, task_config, _, dataset, split = _task_data(
      task, config, out, num_cases=num_cases, cache_dir=cache_dir,
      progress=progress)
  loss_tables.projections(dataclasses.replace(task_config, seed=seeds[0]),
                          dataset, split, seed_dir, names, figure, task)


def _commit() -> str | None:
  """The checked-out commit (``-dirty`` if tracked files changed), or
  ``None`` outside a git checkout."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=reproduce.ROOT,
                          capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
  try:
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("-dirty" if dirty else "")


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.compare_losses",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                      help="TrainConfig JSON (default: configs/"
                      "compare_losses.json)")
  parser.add_argument("--tasks", nargs="+", choices=sorted(synthetic.TASKS),
                      help="built-in synthetic tasks (default: "
                      f"{' '.join(protocol.TASKS)}; with --quick, "
                      f"{' '.join(protocol.default_tasks(True))})")
  parser.add_argument("--seeds", type=int, nargs="+",
                      help="evaluation seeds (default 1 2 3 4 5; 1 with "
                      f"--quick); seed {protocol.TUNING_SEED} tunes λ")
  parser.add_argument("--num-cases", type=int, default=protocol.NUM_CASES,
                      help=f"cases per task (default {protocol.NUM_CASES})")
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
  # One train step per loss serves all its λ and runs in a process; the
  # persistent cache keeps them for a resumed run's new process.
  import jax
  jax.config.update("jax_compilation_cache_dir",
                    str(pathlib.Path(args.out) / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    compare(config_path=args.config,
            tasks=None if args.tasks is None else tuple(args.tasks),
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
