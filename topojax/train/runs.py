"""A run's folders and files: what each phase writes, checks and resumes from.

A run folder holds one sub-folder per phase, ``phase1/`` and ``phase2/``,
each with:

* ``config.json``: the configuration, phase, loss and initial checkpoint;
* ``split.json``: the train/validation/test case ids (phase 2 copies phase
  1's, so both phases and later evaluation see the same test cases);
* ``model.json``: the network's input channels (modality names, in order)
  and output channels (the task's labels), for ``topojax.predict``;
* ``checkpoints/``: the two latest and the best epoch
  (``topojax.checkpoint``); ``interrupted/``: the state of an epoch stopped
  part-way by a signal, until that epoch is saved whole;
* ``log.jsonl``: one line per epoch: train loss, validation Dice, validation
  topological loss, learning rate, time, throughput;
* ``curves.png``: those curves; ``summary.json``: written when the phase ends.

Several processes (one per host, or several on one machine): call
``jax.distributed.initialize(...)`` in every process before anything else
touches JAX (``topojax train --coordinator HOST:PORT --num-processes N
--process-id I`` does, or ``--distributed`` where JAX finds the cluster
itself), give every process the same command, data and run folder (a shared
file system). Process 0 alone writes the run's files (configuration, split,
log, curves, summary) and prints; the others wait for it where they read one
(``wait_for_all_processes``). orbax writes the checkpoints: replicated arrays
once, its metadata from process 0. Files are written aside and renamed
(``write_text``), so a crash, or another process reading, never meets half a
file.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib
import shutil
import sys
from typing import Any

import jax
from jax.experimental import multihost_utils

from topojax import checkpoint
from topojax import data
from topojax.train import config as config_lib

PHASE_DIRS = {1: "phase1", 2: "phase2"}
# The state of an epoch stopped part-way (preemption), beside checkpoints/.
INTERRUPTED_DIR = "interrupted"
# Every file and folder a phase writes: what an overwrite deletes.
_RUN_FILES = ("config.json", "split.json", "model.json", "log.jsonl",
              "curves.png", "summary.json", "checkpoints", INTERRUPTED_DIR)
# Fields that must agree between phase 1 and the phase 2 built on it.
_SHARED_FIELDS = ("shape", "spacing", "modalities", "label_mode",
                  "split_seed", "base_channels", "depth", "norm")


@dataclasses.dataclass(frozen=True)
class PhaseResult:
  """How a phase ended (its ``summary.json``).

  Attributes:
    run_dir: the phase's folder.
    best_epoch: the epoch with the highest validation Dice, kept in
      ``checkpoints/``.
    best_val_dice: its mean validation Dice.
    epochs_run: epochs trained in total (all sessions of a resumed run).
    stopped_early: whether patience ran out before ``epochs``.
    train_step_compilations: compilations of the train step during the
      last session: 1 means none after the first batch, 0 that an earlier
      phase in the same process had compiled it.
    eval_step_compilations: the same for the evaluation step.
  """
  run_dir: str
  best_epoch: int
  best_val_dice: float
  epochs_run: int
  stopped_early: bool
  train_step_compilations: int
  eval_step_compilations: int


# --------------------------------------------------------------------------
# Files, written by process 0.


def write_text(path: pathlib.Path, text: str) -> None:
  """Writes aside and renames, so a crash never leaves half a file."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_json(path: pathlib.Path, value: Any) -> None:
  write_text(path, json.dumps(value, indent=1))


def read_log(path: pathlib.Path) -> list[dict[str, Any]]:
  """The lines of a phase's ``log.jsonl``; none if it does not exist."""
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def truncate_log(path: pathlib.Path, epoch: int) -> list[dict[str, Any]]:
  """The lines of ``log.jsonl`` up to ``epoch``; later ones are dropped.

  Epochs logged after the last checkpoint (a crash between the two writes)
  are trained again, so their lines go from the file too (process 0).
  """
  log = [line for line in read_log(path) if line["epoch"] <= epoch]
  if jax.process_index() == 0:
    # Replaced whole, so another process reading it never sees half of it.
    write_text(path, "".join(json.dumps(line) + "\n" for line in log))
  return log


def append_log(path: pathlib.Path, line: dict[str, Any]) -> None:
  """Appends one epoch's line to ``log.jsonl`` (process 0)."""
  if jax.process_index() == 0:
    with path.open("a") as f:
      f.write(json.dumps(line) + "\n")


def write_model_json(run_dir: pathlib.Path, dataset: data.Dataset) -> None:
  """Writes ``model.json`` (process 0).

  It holds what ``topojax.predict`` needs to segment new images without the
  task folder: the input channels' modalities in order, and the labels.
  """
  if jax.process_index() != 0:
    return
  write_json(run_dir / "model.json", {
      "in_channels": int(dataset.in_channels),
      "out_channels": int(dataset.out_channels),
      "modalities": [dataset.task.modalities[i]
                     for i in dataset.modality_indices],
      "modality_indices": list(dataset.modality_indices),
      "task_modalities": list(dataset.task.modalities),
      "label_names": list(dataset.task.label_names)})


def wait_for_all_processes(name: str) -> None:
  """Returns when every process has called it with ``name``.

  In a multi-process run, files are written by process 0 alone; a process
  that reads one waits here after the write.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------
# Phase folders: prepared, opened, checked, resumed.


def run_spec(config: config_lib.TrainConfig, phase: int, loss: str,
             init: pathlib.Path | None) -> dict[str, Any]:
  """What ``config.json`` of a phase folder holds."""
  return {"config": config.to_json(), "phase": phase, "loss": loss,
          "init": None if init is None else str(init)}


def check_init(init: pathlib.Path, config: config_lib.TrainConfig) -> None:
  """Phase 1 in ``init`` has finished and matches ``config``'s model/data."""
  summary = init / "summary.json"
  if not summary.is_file():
    raise FileNotFoundError(
        f"{summary} not found: phase 1 in {init} has not finished (resume it "
        "first) or init is not a phase-1 folder")
  saved = json.loads((init / "config.json").read_text())["config"]
  current = config.to_json()
  # A run from before there was a spacing had none (get gives None).
  different = [f for f in _SHARED_FIELDS if saved.get(f) != current[f]]
  if different:
    changes = ", ".join(f"{f}: {saved.get(f)!r} there, {current[f]!r} here"
                        for f in different)
    raise ValueError(f"init {init} was trained with other data or another "
                     f"model ({changes})")


def prepare_phase_dirs(run_dir: pathlib.Path, phases: Sequence[int], *,
                       resume: bool, overwrite: bool) -> None:
  """Refuses used phase folders unless resuming, or clears this package's files.

  Only the folders of the phases to train are looked at, and only the files
  a phase writes (``_RUN_FILES``) are deleted: a user's files in ``run_dir``
  stay.
  """
  if run_dir.exists() and not run_dir.is_dir():
    raise FileExistsError(f"run_dir {run_dir} exists and is a file")
  for phase in phases:
    target = run_dir / PHASE_DIRS[phase]
    if resume or not target.is_dir() or not any(target.iterdir()):
      continue
    if not overwrite:
      raise FileExistsError(
          f"{target} is not empty; pass resume=True (--resume) to continue "
          "its run or overwrite=True (--overwrite) to start it again")
    if jax.process_index() != 0:
      continue
    for item in _RUN_FILES:
      path = target / item
      if path.is_dir():
        shutil.rmtree(path)
      else:
        path.unlink(missing_ok=True)
  wait_for_all_processes(f"prepared {run_dir}")


def open_phase_dir(run_dir: pathlib.Path, spec: dict[str, Any],
                   split: data.Split) -> PhaseResult | None:
  """Writes or checks ``config.json`` and ``split.json`` of a phase folder.

  Returns:
    The ``PhaseResult`` of a finished phase, else ``None``.
  """
  spec_path, split_path = run_dir / "config.json", run_dir / "split.json"
  # Every process checks what is there, so all raise alike; only the first
  # writes what is missing (files appear whole: written aside, renamed).
  if spec_path.is_file() and json.loads(spec_path.read_text()) != spec:
    raise ValueError(f"{run_dir} holds a run with another configuration "
                     f"(see {spec_path}); resume it with that configuration "
                     "or use another folder")
  if split_path.is_file() and data.Split.load(split_path) != split:
    raise ValueError(f"{split_path} differs from the split given")
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not spec_path.is_file():
      write_json(spec_path, spec)
    if not split_path.is_file():
      split.save(split_path)
  wait_for_all_processes(f"opened {run_dir}")
  summary = run_dir / "summary.json"
  if summary.is_file():
    return PhaseResult(**json.loads(summary.read_text()))
  return None


def _warn(message: str) -> None:
  """One line on stderr, from process 0."""
  if jax.process_index() == 0:
    print(f"topojax: warning: {message}", file=sys.stderr, flush=True)


def discard_interrupted(run_dir: pathlib.Path) -> None:
  """Deletes ``INTERRUPTED_DIR`` once its epoch is saved whole (process 0)."""
  path = run_dir / INTERRUPTED_DIR
  if jax.process_index() == 0 and path.exists():
    shutil.rmtree(path)


def _check_trained_alike(meta: dict[str, Any], where: str, *,
                         config: config_lib.TrainConfig,
                         split: data.Split) -> None:
  if meta["seed"] != config.seed or tuple(meta["train_cases"]) != split.train:
    raise ValueError(f"checkpoint {where} was trained with another seed or "
                     "other training cases")


def _restore_interrupted(path: pathlib.Path, latest: int, state, *,
                         config: config_lib.TrainConfig, split: data.Split):
  """The state of an epoch stopped part-way after epoch ``latest``, or ``None``.

  Returns ``(state, meta)``; ``None`` when there is none, when it is older
  than ``latest`` (its epoch was finished after all), or when it cannot be
  read (said in one line).
  """
  if not path.is_dir():
    return None
  try:
    restored = checkpoint.restore_interrupted(
        path, model=state["model"], optimizer=state["opt_state"])
  except checkpoint.CheckpointError as err:
    _warn(f"{err}; resuming from the last finished epoch instead")
    return None
  meta = restored["meta"]
  if meta["epoch"] != latest + 1:
    return None
  _check_trained_alike(meta, str(path), config=config, split=split)
  return {"model": restored["model"],
          "opt_state": restored["optimizer"]}, meta


def _restore_latest(manager, state: dict[str, Any], *,
                    config: config_lib.TrainConfig, split: data.Split):
  """``(state, epoch)`` of the newest step that reads; ``None`` if none saved.

  Each step that fails to read or verify is named on stderr and deleted,
  since the epochs after the one restored are trained again.

  Raises:
    checkpoint.CheckpointError: steps were saved and none reads.
  """
  skipped = []
  for epoch in sorted(manager.all_steps(), reverse=True):
    try:
      restored = checkpoint.restore(manager, epoch, model=state["model"],
                                    optimizer=state["opt_state"])
    except checkpoint.CheckpointError as err:
      _warn(f"{err}; skipped, and deleted if an earlier epoch reads")
      skipped.append(epoch)
      continue
    _check_trained_alike(restored["meta"], f"{epoch} in {manager.directory}",
                         config=config, split=split)
    for damaged in skipped:
      manager.delete(damaged)
    return {"model": restored["model"],
            "opt_state": restored["optimizer"]}, epoch
  if skipped:
    raise checkpoint.CheckpointError(
        f"no checkpoint in {manager.directory} can be read (epochs "
        f"{skipped}); start the phase again with --overwrite")
  return None


def restore_state(manager, state: dict[str, Any], *,
                  config: config_lib.TrainConfig, split: data.Split,
                  init: pathlib.Path | None, interrupted: pathlib.Path
                  ) -> tuple[dict[str, Any], int, dict[str, Any]]:
  """The state to start from: where training stopped, or a new phase's start.

  Tried in order: the epoch stopped part-way in ``interrupted`` when it
  follows the latest saved epoch, then the saved epochs newest first. Each
  is verified against its checksums; one that fails is named on stderr and
  the next is tried.

  Args:
    manager: the phase's ``checkpoint.open_manager``.
    state: a new state, ``{"model": ..., "opt_state": ...}``
      (``steps.init_state``): the template restored into, and the start of
      a new phase 1.
    config: the run's configuration; its seed must be the checkpoint's.
    split: the case ids; its training cases must be the checkpoint's.
    init: the phase-1 folder a new phase 2 starts from, or ``None``.
    interrupted: the folder of an epoch stopped part-way
      (``checkpoint.save_interrupted``).

  Returns:
    ``(state, epoch, place)``: ``epoch`` is the last finished one, 0 for a
    new phase, which starts from ``init``'s best model when given (and a new
    Adam state); ``place`` is where epoch ``epoch + 1`` stopped,
    ``{"batches": ..., "loss_sum": ..., "seconds": ...}``, or ``{}`` to
    start it afresh.

  Raises:
    ValueError: the checkpoint was trained with another seed or other
      training cases.
    checkpoint.CheckpointError: epochs were saved and none reads, or
      ``init``'s best epoch does not read.
  """
  latest = manager.latest_step() or 0
  found = _restore_interrupted(interrupted, latest, state, config=config,
                               split=split)
  if found is not None:
    state, meta = found
    return state, meta["epoch"] - 1, {
        key: meta[key] for key in ("batches", "loss_sum", "seconds")}
  found = _restore_latest(manager, state, config=config, split=split)
  if found is not None:
    return (*found, {})
  if init is not None:
    with checkpoint.open_manager(init / "checkpoints",
                                 read_only=True) as init_manager:
      restored = checkpoint.restore(init_manager, init_manager.best_step(),
                                    model=state["model"])
    state = {**state, "model": restored["model"]}
  return state, 0, {}
