"""Reproduce the paper's protocol end to end (Fu et al. 2023, §3; Table 2).

    python -m experiments.reproduce                      # synthetic task, 3 seeds
    python -m experiments.reproduce --quick              # one seed, 2+2 epochs
    python -m experiments.reproduce --config experiments/configs/spleen.json \
        --data /data/Task09_Spleen --seeds 0 1 2

For each seed: phase 1 pre-trains with Dice; from its best checkpoint, phase 2
fine-tunes three ways — Dice only (the paper's "Dice 150+150"), the published
PPL + λ Dice ("Ours 150+150"), and PPL normalised per pooled cell + λ Dice —
then every setting, phase 1 alone included ("Dice 150"), segments the held-out
test cases, which are evaluated once, with the paper's metrics.

Written to ``--out`` (default ``experiments/out/<config name>``):

* ``table.md``: Table 2, mean ± standard deviation over seeds of each seed's
  mean over test cases; ``results.json``: the numbers behind it, per seed;
* ``method.png`` (projections and pooled maps), ``qualitative.png`` (one test
  slice, every setting), ``curves.png`` (both phases' training curves);
* ``seed<k>/<setting>/``: each run's checkpoints and logs, ``pred/`` (NIfTI
  masks in image space) and ``report/`` (per-case metrics).

Without ``--data`` the built-in synthetic task is generated (seconds) in
``<out>/data`` when absent. An interrupted reproduction continues where it
stopped with ``--resume``: finished phases are skipped, an unfinished one
resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import sys
import time

import numpy as np

from topojax import data
from topojax import evaluate
from topojax import metrics
from topojax import predict
from topojax import synthetic
from topojax import train
from topojax import windows

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "synthetic.json"

# Phase-2 variants of the paper's Table 2: setting directory → loss
# (``topojax.train.LOSSES``).
VARIANTS = {"dice_ft": "dice", "ppl": "ppl", "ppl_norm": "ppl_norm"}
# Row names of the settings, before their epochs.
LABELS = {"phase1": "Dice", "dice_ft": "Dice",
          **{name: entry.label for name, entry in train.LOSS_TABLE.items()
             if entry.function is not None}}


def setting_names(config: train.TrainConfig,
                  variants: dict[str, str] = VARIANTS) -> dict[str, str]:
  """Row names with this config's epochs, keyed by setting directory."""
  e1, e2 = config.phase1.epochs, config.phase2.epochs
  return {"phase1": f"Dice {e1}",
          **{d: f"{LABELS[d]} {e1}+{e2}" for d in variants}}


def quick_config(config: train.TrainConfig) -> train.TrainConfig:
  """A couple of epochs of each phase, for a smoke run."""
  return dataclasses.replace(
      config, phase1=dataclasses.replace(config.phase1, epochs=2,
                                         patience=None),
      phase2=dataclasses.replace(config.phase2, epochs=2, patience=None))


def run_seed(config: train.TrainConfig, dataset: data.Dataset,
             split: data.Split, task_dir: pathlib.Path, out: pathlib.Path, *,
             variants: dict[str, str] = VARIANTS, cache_dir,
             progress: bool) -> dict[str, dict]:
  """Trains, predicts and evaluates every setting of one seed.

  Phase 1 once, then each of ``variants`` (directory → phase-2 loss) from
  its best checkpoint, with the same epochs and learning rate.

  Returns:
    Setting directory → the binary-class summary of ``evaluate.evaluate_runs``.
  """
  phase1 = out / "phase1"
  train.train_phase(config, dataset, split, phase1, phase=1,
                    progress=progress)
  runs = {"phase1": phase1}
  for name, loss in variants.items():
    runs[name] = out / name
    train.train_phase(config, dataset, split, runs[name], phase=2, loss=loss,
                      init=phase1, progress=progress)
  summaries = {}
  for name, run_dir in runs.items():
    pred_dir = run_dir / "pred"
    predict.predict_run(run_dir, task_dir, pred_dir, cache_dir=cache_dir,
                        overwrite=True)
    results = evaluate.evaluate_runs(
        {name: pred_dir}, task_dir / "labelsTr", case_ids=split.test,
        out_dir=run_dir / "report", overwrite=True)
    summaries[name] = results[name][1]
  return summaries


def over_seeds(values) -> dict[str, float]:
  """``{"mean", "std", "seeds"}`` of the finite values among ``values``."""
  finite = np.array([v for v in values if math.isfinite(v)])
  return {"mean": float(finite.mean()) if finite.size else math.nan,
          "std": float(finite.std()) if finite.size else math.nan,
          "seeds": int(finite.size)}


def aggregate(per_seed: dict[int, dict[str, dict]], names: dict[str, str]
              ) -> dict[str, dict[str, dict[str, float]]]:
  """Mean and standard deviation over seeds of each seed's case mean.

  Returns:
    Setting name → metric key → ``{"mean", "std", "seeds"}``; ``seeds``
    counts the seeds with a finite value.
  """
  table = {}
  for directory, name in names.items():
    row = {}
    for key, _ in evaluate.TABLE_COLUMNS:
      values = []
      for summaries in per_seed.values():
        stats = next(iter(summaries[directory].values()))
        values.append(stats["pearson_r"] if key == "pearson_r"
                      else stats["metrics"][key]["mean"])
      row[key] = over_seeds(values)
    table[name] = row
  return table


def markdown(table, *, seeds, header: str,
             columns=evaluate.TABLE_COLUMNS) -> str:
  """The table as markdown: one row per setting, ``columns`` its cells."""
  titles = [title for _, title in columns]
  lines = [header, "", "| Setting | " + " | ".join(titles) + " |",
           "|---" * (len(titles) + 1) + "|"]
  for name, row in table.items():
    cells = []
    for key, _ in columns:
      stat = row[key]
      cell = ("n/a" if math.isnan(stat["mean"])
              else f"{stat['mean']:.3f} ± {stat['std']:.3f}")
      if 0 < stat["seeds"] < len(seeds):
        cell += f" ({stat['seeds']} seeds)"
      cells.append(cell)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", f"Mean ± standard deviation over seeds {list(seeds)} of each "
            "seed's mean over the test cases (Pearson's r: over the test "
            "cases of each seed). |Δβi|: Betti-number errors (components, "
            "tunnels, cavities)."]
  return "\n".join(lines) + "\n"


def probabilities_on_test_cases(config, dataset, split,
                                seed_dir: pathlib.Path,
                                names: dict[str, str]):
  """Every setting's foreground probabilities on the test cases of a seed.

  Returns:
    ``(images, labels, probs)``: the test images ``(N, X, Y, Z, C_in)``,
    their labels' last channel ``(N, X, Y, Z)``, and setting name → the
    best checkpoint's probabilities of that channel, ``(N, X, Y, Z)``.
  """
  rows = dataset.indices(split.test)
  images = np.stack([dataset.images[r] for r in rows])
  labels = np.stack([dataset.labels[r] for r in rows])[..., -1]
  probs = {}
  for directory, name in names.items():
    model_def, state = predict.restore_best(
        predict.phase_dir(seed_dir / directory), config,
        in_channels=images.shape[-1], out_channels=dataset.out_channels)
    probs[name] = _probabilities(config, model_def, state, images)[..., -1]
  return images, labels, probs


def _probabilities(config, model_def, state, images) -> np.ndarray:
  """``(N, X, Y, Z, C_out)`` probabilities of preprocessed cases: whole
  for a run trained on whole volumes, by sliding windows (as its
  ``predict`` does it, at ``config.overlap``) for a run trained on
  patches."""
  if config.patch_size is None:
    return np.stack(predict.segment(model_def, state, images,
                                    batch_size=config.batch_size))
  return np.asarray(windows.sliding_window(
      functools.partial(train.steps.make_forward(model_def), state), images,
      patch_size=config.patch_size, overlap=config.overlap,
      batch_size=config.batch_size))


def figures(config, dataset, split, out: pathlib.Path, seed_dir: pathlib.Path,
            names: dict[str, str]) -> None:
  """method.png, qualitative.png and curves.png from one seed's runs."""
  from experiments import figures as figs  # Loads matplotlib.

  images, labels, probs = probabilities_on_test_cases(
      config, dataset, split, seed_dir, names)
  masks = {name: p > 0.5 for name, p in probs.items()}
  # The test case where the settings disagree most in component count.
  spread = [np.ptp([metrics.count_components(m[i]) for m in masks.values()])
            for i in range(len(labels))]
  case = int(np.argmax(spread))
  figs.method_figure(probs[names["phase1"]][case], labels[case],
                     out / "method.png", kernel_sizes=config.kernel_sizes)
  figs.qualitative_figure(images[case, ..., 0], labels[case],
                          {n: m[case] for n, m in masks.items()},
                          out / "qualitative.png",
                          title=f"{split.test[case]}, seed {config.seed},")
  figs.curves_figure(
      train.read_log(seed_dir / "phase1" / "log.jsonl"),
      {names[d]: train.read_log(seed_dir / d / "log.jsonl")
       for d in names if d != "phase1"},
      out / "curves.png", title=f"seed {config.seed}")


def refuse_used_out(out: pathlib.Path, *, resume: bool, run: str) -> None:
  """Raises unless ``out`` is new or empty, or ``resume`` continues the
  ``run`` in it: an earlier run's results are never mixed with a new one's."""
  if out.exists() and any(out.iterdir()) and not resume:
    raise FileExistsError(f"--out {out} is not empty; pass --resume to "
                          f"continue that {run}, or choose another folder")


def reproduce(*, config_path=DEFAULT_CONFIG, task_dir=None, seeds=None,
              out=None, quick=False, resume=False, cache_dir=None,
              progress=True) -> dict:
  """The whole protocol; returns what ``results.json`` holds.

  ``seeds`` defaults to (0, 1, 2), or (0,) with ``quick``.
  """
  started = time.perf_counter()
  if seeds is None:
    seeds = (0,) if quick else (0, 1, 2)
  config = train.load_config(config_path)
  if quick:
    config = quick_config(config)
  out = pathlib.Path(out if out is not None else
                     ROOT / "out" / pathlib.Path(config_path).stem)
  refuse_used_out(out, resume=resume, run="reproduction")
  if not seeds:
    raise ValueError("--seeds: give at least one seed")
  if task_dir is None:
    task_dir = out / "data" / "Task00_Synthetic"
    if not (task_dir / "dataset.json").is_file():
      synth = synthetic.SynthConfig(shape=config.shape)
      synthetic.generate_task(task_dir, synth, overwrite=resume,
                              progress=progress)
  task_dir = pathlib.Path(task_dir)
  out.mkdir(parents=True, exist_ok=True)
  dataset = data.load_dataset(task_dir, config.preprocess_config(),
                              cache_dir=cache_dir, progress=progress)
  split = data.default_split(dataset.task, seed=config.split_seed)
  names = setting_names(config)
  per_seed = {}
  for seed in seeds:
    seed_config = dataclasses.replace(config, seed=seed)
    if progress:
      print(f"=== seed {seed} ===", flush=True)
    per_seed[seed] = run_seed(seed_config, dataset, split, task_dir,
                              out / f"seed{seed}", cache_dir=cache_dir,
                              progress=progress)
  table = aggregate(per_seed, names)
  minutes = (time.perf_counter() - started) / 60
  header = (f"Table 2 on {task_dir.name}: {len(split.train)} train, "
            f"{len(split.val)} validation, {len(split.test)} test cases, "
            f"{config.shape} voxels; {len(seeds)} seed(s); "
            f"{minutes:.1f} min")
  text = markdown(table, seeds=seeds, header=header)
  (out / "table.md").write_text(text)
  results = {"config": config.to_json(), "task": str(task_dir),
             "split": dataclasses.asdict(split), "seeds": list(seeds),
             "minutes": minutes, "table": table,
             "per_seed": {str(s): {names[d]: v for d, v in summaries.items()}
                          for s, summaries in per_seed.items()}}
  (out / "results.json").write_text(
      json.dumps(evaluate.json_ready(results), indent=1, allow_nan=False))
  figures(dataclasses.replace(config, seed=seeds[0]), dataset, split, out,
          out / f"seed{seeds[0]}", names)
  if progress:
    print(text)
    print(f"written to {out}: table.md, results.json, method.png, "
          "qualitative.png, curves.png")
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.reproduce", description=__doc__.split(
          "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                      help="TrainConfig JSON (default: the synthetic task's)")
  parser.add_argument("--data", metavar="TASK_DIR",
                      help="MSD task folder (default: the synthetic task, "
                      "generated in OUT/data when absent)")
  parser.add_argument("--seeds", type=int, nargs="+",
                      help="training seeds (default 0 1 2; 0 with --quick)")
  parser.add_argument("--out", help="output folder (default "
                      "experiments/out/<config name>)")
  parser.add_argument("--quick", action="store_true",
                      help="2 + 2 epochs, one seed: a smoke run of the whole pipeline")
  parser.add_argument("--resume", action="store_true",
                      help="continue an interrupted reproduction in --out")
  parser.add_argument("--cache-dir", help="preprocessing cache (default "
                      "~/.cache/topojax)")
  args = parser.parse_args(argv)
  try:
    reproduce(config_path=args.config, task_dir=args.data, seeds=args.seeds,
              out=args.out, quick=args.quick, resume=args.resume,
              cache_dir=args.cache_dir)
  except (ValueError, FileNotFoundError, FileExistsError) as err:
    print(f"reproduce: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
