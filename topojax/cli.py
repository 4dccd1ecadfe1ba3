"""The `topojax` command line.

Each subcommand imports its module only when it runs, so `topojax synth` or
`topojax evaluate` start without loading JAX.

Errors the user can act on (bad input, a missing or damaged file, a full
disk) print one line, ``topojax <command>: error: ...``, and exit non-zero;
``--debug`` (or ``TOPOJAX_DEBUG=1``) shows the traceback instead. A
training run stopped by SIGTERM or SIGINT exits 143 or 130 after saving its
state and printing the command that resumes it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

# Errors that are the user's or the machine's to fix, not a bug: one line.
_EXPECTED = (ValueError, OSError)
_USAGE_STATUS = 2  # Bad input, as argparse exits.
_FAILURE_STATUS = 1  # The machine (a full disk, a damaged file).
SYNTH_KINDS = ("blob", "ellipsoid", "torus", "ring", "branch", "vessel")


def _add_demo_arguments(subparsers) -> None:
  """The ``demo`` subcommand: the loss explained on a generated volume."""
  demo = subparsers.add_parser(
      "demo", help="compute and explain the loss on a generated example volume")
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--out", default=None,
                    help="optional PNG path for the projections figure")
  demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
  from topojax import demo

  demo.run(seed=args.seed, out=args.out)
  return 0


def _add_synth_arguments(subparsers) -> None:
  """The ``synth`` subcommand: a synthetic task of known topology."""
  synth = subparsers.add_parser(
      "synth", help="write a synthetic MSD-layout task with known topology")
  synth.add_argument("out_dir", help="task folder to create")
  synth.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                     help="volume shape in voxels (default 32 32 32)")
  synth.add_argument("--num-cases", type=int, help="default 60")
  # topojax.synthetic.KINDS, spelt out so that the CLI starts without
  # importing the generator (tests/test_synthetic.py checks they agree).
  synth.add_argument("--kinds", nargs="+", choices=SYNTH_KINDS,
                     help="labelled object shapes (default ellipsoid); a ring "
                     "is a thin torus with a narrow neck, a vessel a tree "
                     "with stenoses and sub-voxel tips (at least 64 voxels a "
                     "side)")
  synth.add_argument("--num-objects", type=int, nargs=2,
                     metavar=("MIN", "MAX"),
                     help="labelled objects per case (default 1 1)")
  synth.add_argument("--num-distractors", type=int, nargs=2,
                     metavar=("MIN", "MAX"),
                     help="unlabelled bright blobs per case (default 2 4)")
  synth.add_argument("--distractor-intensity", type=float, nargs=2,
                     metavar=("MIN", "MAX"),
                     help="distractor intensity, objects being 1 (default "
                     "0.8 1)")
  synth.add_argument("--noise", type=float,
                     help="noise standard deviation (default 0.35)")
  synth.add_argument("--bias", type=float,
                     help="bias field amplitude (default 0.3)")
  synth.add_argument("--spacing", type=float, nargs=3,
                     metavar=("X", "Y", "Z"),
                     help="voxel size in mm (default 1 1 1.5)")
  synth.add_argument("--seed", type=int, help="default 0")
  synth.add_argument("--overwrite", action="store_true",
                     help="write into an existing, non-empty folder")
  synth.set_defaults(run=_synth)


def _synth(args: argparse.Namespace) -> int:
  from topojax import synthetic

  options = {"shape": args.shape, "num_cases": args.num_cases,
             "kinds": args.kinds, "num_objects": args.num_objects,
             "num_distractors": args.num_distractors,
             "distractor_intensity": args.distractor_intensity,
             "noise": args.noise, "bias": args.bias, "spacing": args.spacing,
             "seed": args.seed}
  # Unset options keep SynthConfig's defaults, which live in one place.
  config = synthetic.SynthConfig(
      **{k: v for k, v in options.items() if v is not None})
  root = synthetic.generate_task(args.out_dir, config,
                                 overwrite=args.overwrite)
  preview = synthetic.save_preview(root, root / "preview.png",
                                   overwrite=args.overwrite)
  print(f"wrote {config.num_cases} cases of shape {config.shape} to {root} "
        f"(preview: {preview})")
  return 0


def _add_prepare_arguments(subparsers) -> None:
  """The ``prepare`` subcommand: an MSD task into the cache, timed."""
  prepare = subparsers.add_parser(
      "prepare", help="preprocess an MSD task into the cache and report the "
      "loading speed")
  prepare.add_argument("task_dir", help="MSD task folder with dataset.json")
  prepare.add_argument("--shape", nargs="+", type=_shape_value,
                       metavar="X Y Z|none",
                       help="resize target, or 'none' to keep each case's "
                       "own shape; defaults to the paper's shape for "
                       "Task09_Spleen, Task02_Heart and Task04_Hippocampus")
  prepare.add_argument("--spacing", type=float, nargs=3,
                       metavar=("X", "Y", "Z"),
                       help="resample every case to this voxel size in mm, "
                       "each in its own shape (nnU-Net's protocol)")
  prepare.add_argument("--modalities", nargs="+",
                       help="modality names or indices to keep (default all)")
  prepare.add_argument("--label-mode", choices=("binary", "onehot"),
                       default="binary")
  prepare.add_argument("--cache-dir", default=None,
                       help="cache folder (default ~/.cache/topojax)")
  prepare.set_defaults(run=_prepare)


def _prepare(args: argparse.Namespace) -> int:
  import pathlib
  import time

  import numpy as np

  from topojax import data

  shape = _shape_option(args.shape, "--shape")
  if args.shape is None and args.spacing is None:
    protocol = data.PAPER_TASKS.get(pathlib.Path(args.task_dir).resolve().name)
    if protocol is None:
      raise ValueError(f"--shape or --spacing is required for "
                       f"{args.task_dir}: it is not one of the paper's tasks "
                       f"{sorted(data.PAPER_TASKS)}")
    shape = protocol.shape
  modalities = None if args.modalities is None else tuple(
      int(m) if m.isdigit() else m for m in args.modalities)
  config = data.PreprocessConfig(shape=shape, modalities=modalities,
                                 label_mode=args.label_mode,
                                 spacing=args.spacing)
  start = time.perf_counter()
  dataset = data.load_dataset(args.task_dir, config, cache_dir=args.cache_dir)
  # Opening memory maps costs nothing; the timing includes one read of every
  # case, as an epoch would do.
  for i in range(len(dataset.case_ids)):
    np.array(dataset.images[i]), np.array(dataset.labels[i])
  seconds = time.perf_counter() - start
  source = "cache hit" if dataset.from_cache else "decoded NIfTI"
  if config.shape is None:
    sides = np.array(dataset.case_shapes)
    shapes = (f"images of {dataset.in_channels} channel(s) from "
              f"{tuple(sides.min(0).tolist())} to "
              f"{tuple(sides.max(0).tolist())} voxels, labels of "
              f"{dataset.out_channels}")
  else:
    shapes = (f"images {dataset.images.shape}, labels "
              f"{dataset.labels.shape}")
  print(f"{len(dataset.case_ids)} cases -> {shapes}, "
        f"loaded and read in {seconds:.2f} s "
        f"({len(dataset.case_ids) / seconds:.2f} cases/s, {source}); "
        f"cache: {dataset.cache_path}")
  return 0


def _add_evaluate_arguments(subparsers) -> None:
  """The ``evaluate`` subcommand: Table-2 metrics of prediction folders."""
  evaluate = subparsers.add_parser(
      "evaluate", help="Table-2 metrics of NIfTI predictions against labels, "
      "several runs side by side")
  evaluate.add_argument(
      "--pred", action="append", required=True, metavar="[NAME=]DIR",
      help="a run's prediction folder, optionally named (no '=' in NAME) "
      "for its table row, e.g. 'PPL 150+150=runs/ppl/pred'; repeat for more "
      "runs")
  evaluate.add_argument("--labels", required=True, metavar="LABEL_DIR",
                        help="ground-truth folder, e.g. Task09_Spleen/labelsTr")
  cases = evaluate.add_mutually_exclusive_group()
  cases.add_argument("--cases", nargs="+", metavar="CASE",
                     help="case ids to evaluate (default: every label)")
  cases.add_argument("--split", metavar="SPLIT_JSON",
                     help="evaluate the test cases of a run's split.json")
  evaluate.add_argument("--classes", type=int, nargs="+", default=[1],
                        help="label values to evaluate (default 1: binary)")
  evaluate.add_argument("--keep-largest", type=int, metavar="N",
                        help="keep the N largest components of each class of "
                        "the predictions before measuring")
  evaluate.add_argument("--out", metavar="DIR",
                        help="write cases.csv, summary.json, table.md and "
                        "cases.png there")
  evaluate.add_argument("--overwrite", action="store_true",
                        help="replace report files already in --out")
  evaluate.set_defaults(run=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
  import pathlib

  from topojax import data
  from topojax import evaluate

  if args.out is not None and not args.overwrite:
    # Here rather than in evaluate_runs, to name the options the user typed.
    existing = [name for name in evaluate.REPORT_FILES
                if (pathlib.Path(args.out) / name).exists()]
    if existing:
      raise FileExistsError(f"--out {args.out} already holds report files "
                            f"{existing}; pass --overwrite to replace them")
  pred_dirs = {}
  for spec in args.pred:
    name, equals, folder = spec.partition("=")
    if not equals:
      folder = name
    if name in pred_dirs:
      raise ValueError(f"--pred: two runs are named {name!r}")
    pred_dirs[name] = folder
  case_ids = (data.Split.load(args.split).test if args.split is not None
              else args.cases)
  results = evaluate.evaluate_runs(
      pred_dirs, args.labels, case_ids=case_ids, classes=args.classes,
      keep_largest=args.keep_largest, out_dir=args.out,
      overwrite=args.overwrite)
  print(evaluate.markdown_table(
      {run: summary for run, (_, summary) in results.items()}), end="")
  if args.out is not None:
    print(f"report written to {args.out}")
  return 0


class _LossNames:
  """The loss names of ``topojax.train.LOSS_TABLE`` and the older ones, as
  ``--phase2-loss`` choices: read only when argparse checks a value or
  prints the help, as the table loads JAX."""

  def _names(self):
    from topojax.train import losses

    return (*losses.LOSS_TABLE, *losses.LEGACY_NAMES)

  def __contains__(self, name):
    return name in self._names()

  def __iter__(self):
    return iter(self._names())


def _shape_value(text: str) -> int | None:
  """One word of ``--shape``: a positive int, or ``none``."""
  if text.lower() == "none":
    return None
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected three ints X Y Z or 'none', got {text!r}") from None


def _shape_option(values, flag: str):
  """``--shape``'s words as a shape, ``None`` for 'none' (or no flag)."""
  if values is None or values == [None]:
    return None
  if len(values) != 3 or None in values:
    raise ValueError(f"{flag} takes three ints X Y Z or 'none', got "
                     f"{' '.join('none' if v is None else str(v) for v in values)}")
  return tuple(values)


def _add_train_arguments(subparsers) -> None:
  """The ``train`` subcommand: the two training phases of one run."""
  train = subparsers.add_parser(
      "train", help="train the 3D U-Net: Dice pre-training (phase 1), then "
      "PPL + Dice fine-tuning (phase 2)",
      description="Train the 3D U-Net as in Fu et al. 2023: Dice pre-training "
      "(phase 1), then PPL + Dice fine-tuning from its best epoch (phase 2). "
      "Compiled XLA programs are cached in ~/.cache/topojax/xla (or "
      "$JAX_COMPILATION_CACHE_DIR), so later runs of the same network start "
      "at once.")
  train.add_argument("--config", required=True,
                     help="JSON TrainConfig, e.g. "
                     "experiments/configs/synthetic.json")
  train.add_argument("--data", required=True, metavar="TASK_DIR",
                     help="MSD task folder with dataset.json")
  train.add_argument("--out", required=True, metavar="RUN_DIR",
                     help="run folder; phases go to RUN_DIR/phase1 and "
                     "RUN_DIR/phase2")
  train.add_argument("--phase", choices=("1", "2", "both"), default="both",
                     help="phases to train (default both)")
  train.add_argument("--init", metavar="PHASE1_DIR",
                     help="with --phase 2: the finished phase-1 folder to "
                     "fine-tune (default RUN_DIR/phase1)")
  train.add_argument("--phase2-loss", choices=_LossNames(), metavar="LOSS",
                     help="override the config's phase-2 loss: 'dice' (the "
                     "paper's Dice 150+150 baseline), or a topological loss "
                     "+ dice_weight * Dice; one of %(choices)s "
                     "(topojax.train.LOSS_TABLE describes each)")
  train.add_argument("--seed", type=int,
                     help="override the config's training seed (weights and "
                     "batch order; the split keeps split_seed)")
  train.add_argument("--resume", action="store_true",
                     help="continue the phases in RUN_DIR from their latest "
                     "checkpoints")
  train.add_argument("--overwrite", action="store_true",
                     help="delete the previous run of these phases in RUN_DIR "
                     "and start again")
  train.add_argument("--cache-dir", default=None,
                     help="preprocessing cache (default ~/.cache/topojax)")
  patches = train.add_argument_group(
      "patches", "override the config's protocol: train on patches of the "
      "cases and validate by sliding windows, as nnU-Net does")
  patches.add_argument("--patch-size", type=int, nargs=3,
                       metavar=("X", "Y", "Z"),
                       help="training patch and prediction window, voxels")
  patches.add_argument("--shape", nargs="+", type=_shape_value,
                       metavar="X Y Z|none",
                       help="resize every case to this shape, or 'none' to "
                       "keep each case's own")
  patches.add_argument("--spacing", type=float, nargs=3,
                       metavar=("X", "Y", "Z"),
                       help="resample every case to this voxel size in mm "
                       "(with --shape none)")
  patches.add_argument("--foreground-fraction", type=float, metavar="F",
                       help="share of each batch of patches centred on "
                       "foreground (default 1/3)")
  _add_cluster_arguments(train)
  train.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
  import dataclasses
  import os
  import pathlib

  import jax

  processes = _processes(args)
  if processes is not None or args.distributed:
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      # The CPU backend needs a collectives library across processes; GPU
      # and TPU ignore this setting.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Before anything else touches JAX. Without arguments JAX finds the other
    # processes in the cluster's environment (SLURM, Open MPI, Kubernetes,
    # Cloud TPU, ...).
    jax.distributed.initialize(**(processes or {}))
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Later runs of the same network skip XLA's compilation (seconds to a
    # minute on CPU).
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    jax.config.update("jax_compilation_cache_dir",
                      str(pathlib.Path(base) / "topojax" / "xla"))

  from topojax import train

  config = train.load_config(args.config)
  overrides = {
      name: value for name, value in (
          ("seed", args.seed), ("patch_size", args.patch_size),
          ("spacing", args.spacing),
          ("foreground_fraction", args.foreground_fraction))
      if value is not None}
  if args.shape is not None:
    overrides["shape"] = _shape_option(args.shape, "--shape")
  if overrides:
    try:
      config = dataclasses.replace(config, **overrides)
    except ValueError as err:
      raise ValueError(f"--config {args.config} with the flags given: {err}"
                       ) from None
  phases = {"1": (1,), "2": (2,), "both": (1, 2)}[args.phase]
  try:
    results = train.train(config, args.data, args.out, phases=phases,
                          init=args.init, phase2_loss=args.phase2_loss,
                          resume=args.resume, overwrite=args.overwrite,
                          cache_dir=args.cache_dir)
  except train.Preempted as stopped:
    if jax.process_index() == 0:
      print(f"topojax train: {stopped}\nresume with: "
            f"{_resume_command(args.argv)}", file=sys.stderr, flush=True)
    return stopped.exit_status
  if jax.process_index() == 0:
    for phase, result in results.items():
      print(f"phase {phase}: best epoch {result.best_epoch} of "
            f"{result.epochs_run} (val Dice {result.best_val_dice:.4f}) in "
            f"{result.run_dir}")
  return 0


def _resume_command(argv: list[str]) -> str:
  """The ``topojax`` command line that resumes the run ``argv`` started."""
  # --overwrite would delete the state just saved.
  argv = [arg for arg in argv if arg != "--overwrite"]
  if "--resume" not in argv:
    argv.append("--resume")
  return shlex.join(["topojax", *argv])


def _add_cluster_arguments(train_parser: argparse.ArgumentParser) -> None:
  """``train``'s flags for several processes, checked by ``_processes``."""
  cluster = train_parser.add_argument_group(
      "several processes",
      "One process per host (or several on one machine), all with the same "
      "arguments but --process-id, the same data and a shared RUN_DIR; "
      "batches are split over every device of every process, process 0 "
      "writes the run's files and prints.")
  cluster.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first, "
                       "letting JAX find the processes in the cluster's "
                       "environment (SLURM, Open MPI, Cloud TPU, ...)")
  cluster.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0, where the others "
                       "connect (e.g. the first host of a SLURM job and a "
                       "free port)")
  cluster.add_argument("--num-processes", type=int, metavar="N",
                       help="how many processes take part")
  cluster.add_argument("--process-id", type=int, metavar="I",
                       help="this process's rank, 0 to N-1")


def _processes(args: argparse.Namespace) -> dict | None:
  """``jax.distributed.initialize`` arguments from the flags, checked."""
  given = [args.coordinator, args.num_processes, args.process_id]
  if all(value is None for value in given):
    return None
  if any(value is None for value in given):
    raise ValueError("--coordinator, --num-processes and --process-id go "
                     "together: give all three (or none, with --distributed, "
                     "to let JAX find the cluster)")
  host, colon, port = args.coordinator.rpartition(":")
  if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator must be HOST:PORT, e.g. 10.0.0.1:1234, "
                     f"got {args.coordinator!r}")
  if args.num_processes < 1:
    raise ValueError(f"--num-processes must be at least 1, got "
                     f"{args.num_processes}")
  if not 0 <= args.process_id < args.num_processes:
    raise ValueError(f"--process-id must be in [0, {args.num_processes}), "
                     f"got {args.process_id}")
  return {"coordinator_address": args.coordinator,
          "num_processes": args.num_processes, "process_id": args.process_id}


def _add_predict_arguments(subparsers) -> None:
  """The ``predict`` subcommand: a run's masks of its test cases or of
  any images."""
  predict = subparsers.add_parser(
      "predict", help="segment a run's test cases (--data) or any NIfTI "
      "images (--images); NIfTI masks in the original image space")
  predict.add_argument("--run", required=True, dest="run_dir",
                       metavar="RUN_DIR",
                       help="run folder (its last finished phase) or a "
                       "phase folder")
  inputs = predict.add_mutually_exclusive_group(required=True)
  inputs.add_argument("--data", metavar="TASK_DIR",
                      help="the MSD task folder the run was trained on: "
                      "segment the test cases of the run's split")
  inputs.add_argument("--images", nargs="+", metavar="PATH",
                      help="NIfTI files (.nii, .nii.gz) or folders of them: "
                      "3D, or 4D with the run's modalities in training order")
  predict.add_argument("--out", required=True, metavar="PRED_DIR",
                       help="folder for <case_id>.nii.gz (--data) or "
                       "<name>.nii.gz, name being the image file's (--images)")
  predict.add_argument("--keep-largest", type=int, metavar="N",
                       help="keep the N largest connected components of "
                       "each class")
  predict.add_argument("--overwrite", action="store_true",
                       help="replace predictions already in PRED_DIR")
  predict.add_argument("--cache-dir", default=None,
                       help="preprocessing cache of --data (default "
                       "~/.cache/topojax)")
  predict.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> int:
  from topojax import predict

  if args.images is not None:
    if args.cache_dir is not None:
      raise ValueError("--cache-dir is the preprocessing cache of --data; "
                       "--images reads the files themselves")
    paths = predict.predict_images(args.run_dir, args.images, args.out,
                                   keep_largest=args.keep_largest,
                                   overwrite=args.overwrite)
    print(f"{len(paths)} predictions written to {args.out}")
    return 0
  paths = predict.predict_run(args.run_dir, args.data, args.out,
                              keep_largest=args.keep_largest,
                              overwrite=args.overwrite,
                              cache_dir=args.cache_dir)
  print(f"{len(paths)} test-case predictions written to {args.out}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="topojax",
      description="Topology-aware 3D segmentation with the Projected Pooling Loss.",
  )
  debug_help = ("show the traceback of an error instead of one line (also "
                "TOPOJAX_DEBUG=1)")
  parser.add_argument("--debug", action="store_true", help=debug_help)
  sub = parser.add_subparsers(dest="command", required=True)
  _add_demo_arguments(sub)
  _add_synth_arguments(sub)
  _add_prepare_arguments(sub)
  _add_evaluate_arguments(sub)
  _add_train_arguments(sub)
  _add_predict_arguments(sub)
  for command in sub.choices.values():
    # Accepted after the subcommand too; SUPPRESS keeps the subcommand's
    # default from overriding the flag given before it.
    command.add_argument("--debug", action="store_true",
                         default=argparse.SUPPRESS, help=debug_help)
  return parser


def _debug(args: argparse.Namespace) -> bool:
  return args.debug or os.environ.get("TOPOJAX_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
  """Runs ``topojax`` with ``argv`` (default ``sys.argv[1:]``).

  Returns:
    The exit status: 0, 2 for bad input, 1 for another expected error (a
    damaged file, a full disk), 128 + the signal for training stopped by
    one; an unexpected error raises.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  args.argv = argv
  try:
    return args.run(args)
  except KeyboardInterrupt:
    if _debug(args):
      raise
    print(f"topojax {args.command}: interrupted", file=sys.stderr)
    return 130
  except _EXPECTED as err:
    if _debug(args):
      raise
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"topojax {args.command}: error: {message}", file=sys.stderr)
    usage = not isinstance(err, OSError) or isinstance(
        err, (FileNotFoundError, FileExistsError))
    return _USAGE_STATUS if usage else _FAILURE_STATUS


if __name__ == "__main__":
  sys.exit(main())
