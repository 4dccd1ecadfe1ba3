"""The training loop: a phase's epochs and early stopping, a run's phases.

As in the Flax examples, an epoch is a pass of the compiled train step over
the training cases, or patches of them (``epoch.train_epoch``), then
``validation.validate`` (or ``validate_by_windows``, whole cases predicted
by sliding windows, for a run on patches); its line goes to ``log.jsonl``
and its state to ``checkpoints/``. SIGTERM and SIGINT stop it after the step
in flight, saving the state with its place in the epoch (``preemption``). A
phase (``train_phase``) keeps its epoch of best validation Dice, and stops
early when that has not improved for ``patience`` epochs; only the
validation cases decide, the test cases are never read here. ``train``
preprocesses a task, splits it and trains the phases asked for, phase 2 from
phase 1's best checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
import tqdm

from topojax import checkpoint
from topojax import data
from topojax.train import config as config_lib
from topojax.train import curves
from topojax.train import epoch as epoch_lib
from topojax.train import preemption
from topojax.train import runs
from topojax.train import steps
from topojax.train import validation


def _out_of_patience(epoch: int, best: int,
                     phase: config_lib.PhaseConfig) -> bool:
  """Whether patience ran out after ``epoch``, the best being ``best``."""
  return (phase.patience is not None and epoch - best >= phase.patience
          and epoch < phase.epochs)


# --------------------------------------------------------------------------
# One phase.


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class _Phase:
  """One phase to train, its arguments checked (``_check_phase``).

  Attributes:
    config: the run's configuration.
    dataset: the preprocessed task.
    split: the case ids to train and validate on.
    number: 1 or 2.
    settings: ``config.phase1`` or ``config.phase2``.
    loss: the loss trained with, the phase's or the one given instead.
    init: the absolute phase-1 folder phase 2 starts from; ``None`` in
      phase 1.
    train_rows: ``(n,)`` int64, the rows of ``dataset`` of the training
      cases.
    val_rows: the same of the validation cases.
    run_dir: the phase's folder, absolute.
    progress: whether this process reports (process 0 only).
  """
  config: config_lib.TrainConfig
  dataset: data.Dataset
  split: data.Split
  number: int
  settings: config_lib.PhaseConfig
  loss: str
  init: pathlib.Path | None
  train_rows: np.ndarray
  val_rows: np.ndarray
  run_dir: pathlib.Path
  progress: bool


def _check_phase(config: config_lib.TrainConfig, dataset: data.Dataset,
                 split: data.Split, run_dir: str | os.PathLike, *,
                 phase: int, loss: str | None,
                 init: str | os.PathLike | None, progress: bool) -> _Phase:
  """``train_phase``'s arguments, checked before any file is written.

  Raises:
    ValueError, FileNotFoundError: as ``train_phase``.
  """
  if phase not in runs.PHASE_DIRS:
    raise ValueError(f"phase must be 1 or 2, got {phase!r}")
  settings = config.phase1 if phase == 1 else config.phase2
  loss = settings.loss if loss is None else loss
  config_lib.check_loss_name(loss, "loss")
  if (init is None) != (phase == 1):
    raise ValueError("phase 2 starts from a phase-1 folder (init) and phase 1 "
                     f"from scratch; got phase={phase} and init={init!r}")
  init = None if init is None else pathlib.Path(init).absolute()
  if init is not None:
    runs.check_init(init, config)
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f"batch_size {config.batch_size} must be a multiple of "
                     f"the {devices} devices it is split over")
  train_rows = dataset.indices(split.train)
  val_rows = dataset.indices(split.val)
  if len(train_rows) < config.batch_size or not len(val_rows):
    raise ValueError(
        f"the split has {len(train_rows)} training and {len(val_rows)} "
        f"validation cases; need at least batch_size={config.batch_size} and "
        "1")
  return _Phase(config=config, dataset=dataset, split=split, number=phase,
                settings=settings, loss=loss, init=init,
                train_rows=train_rows, val_rows=val_rows,
                run_dir=pathlib.Path(run_dir).absolute(),
                progress=progress and jax.process_index() == 0)


def _start(job: _Phase, mesh: jax.sharding.Mesh):
  """The state the phase trains from, and its checkpoint manager.

  Returns:
    ``(model_def, state, manager, epoch, place)``: the model's
    ``nnx.GraphDef``; the state of the latest checkpoint that reads (an
    epoch stopped part-way first), or a new one (from ``init``'s best model
    in phase 2); the open manager of ``checkpoints/``; the last finished
    epoch, 0 for a new phase; the place reached in the next epoch.
  """
  model_def, state = steps.init_state(
      job.config, in_channels=job.dataset.in_channels,
      out_channels=job.dataset.out_channels, mesh=mesh)
  manager = checkpoint.open_manager(job.run_dir / "checkpoints")
  state, epoch, place = runs.restore_state(
      manager, state, config=job.config, split=job.split, init=job.init,
      interrupted=job.run_dir / runs.INTERRUPTED_DIR)
  return model_def, state, manager, epoch, epoch_lib.Place(**place)


def _report_start(job: _Phase, state, start: int,
                  place: epoch_lib.Place) -> None:
  """Prints what the phase trains, on what, and from which epoch."""
  num_params = sum(p.size for p in jax.tree.leaves(
      nnx.filter_state(state["model"], nnx.Param)))
  patch = job.config.patch_size
  print(f"phase {job.number} ({job.loss}, lr {job.settings.learning_rate:g}) "
        f"in {job.run_dir}: U-Net with {num_params:,} parameters, "
        f"{len(job.train_rows)} training and {len(job.val_rows)} validation "
        f"cases, batch {job.config.batch_size} over {jax.device_count()} "
        "device(s)"
        + (f", patches {'×'.join(map(str, patch))}" if patch else "")
        + (f"; resuming after epoch {start}" if start else "")
        + (f", batch {place.batches}" if place.batches else ""))


def _make_steps(job: _Phase, model_def: nnx.GraphDef,
                mesh: jax.sharding.Mesh):
  """The phase's ``(train_step, eval_step)``, cached per network and loss."""
  config = job.config
  train_step = steps.make_train_step(
      model_def, mesh, loss=job.loss, kernel_sizes=config.kernel_sizes,
      normalize=config.normalize)
  if config.patch_size is not None:
    return train_step, steps.make_forward(model_def)
  eval_step = steps.make_eval_step(model_def, mesh,
                                   kernel_sizes=config.kernel_sizes)
  return train_step, eval_step


def _cache_sizes(*functions) -> list[int]:
  """How many times each jitted function has compiled so far."""
  # A jitted function's cache holds one executable per compilation.
  return [f._cache_size() for f in functions]


def _signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def _save_interrupted(job: _Phase, state, *, epoch: int,
                      place: epoch_lib.Place,
                      signum: int) -> preemption.Preempted:
  """Saves an epoch stopped part-way; the ``Preempted`` to raise."""
  path = job.run_dir / runs.INTERRUPTED_DIR
  checkpoint.save_interrupted(
      path, model=state["model"], optimizer=state["opt_state"],
      meta={"epoch": epoch, "phase": job.number, "seed": job.config.seed,
            "train_cases": list(job.split.train),
            **dataclasses.asdict(place)})
  num_steps = epoch_lib.num_steps(job.config, len(job.train_rows))
  return preemption.Preempted(signum, (
      f"stopped by {_signal_name(signum)} in phase {job.number}, epoch "
      f"{epoch} after batch {place.batches} of {num_steps}; saved in {path}"))


def _run_epoch(job: _Phase, train_step, eval_step, state, manager,
               log: list[dict[str, Any]], *, epoch: int,
               place: epoch_lib.Place, targets, foreground,
               mesh: jax.sharding.Mesh, stop: preemption.StopSignals):
  """Trains and validates epoch ``epoch``, logs it and saves its checkpoint.

  Its line is appended to ``log`` and to ``log.jsonl``; the epoch begins at
  ``place`` (an epoch stopped part-way) and its checkpoint replaces that.

  Returns:
    ``(state, best)``: the state after the epoch, and the best epoch so far.

  Raises:
    preemption.Preempted: a signal stopped the epoch part-way; its state
      was saved.
  """
  desc = f"phase {job.number} epoch {epoch}/{job.settings.epochs}"
  state, place = epoch_lib.train_epoch(
      train_step, state, job.dataset.images, targets, job.train_rows,
      config=job.config, learning_rate=job.settings.learning_rate,
      epoch=epoch, mesh=mesh, desc=desc,
      progress=job.progress, stop=stop, start=place, foreground=foreground)
  num_steps = epoch_lib.num_steps(job.config, len(job.train_rows))
  if place.batches < num_steps:
    raise _save_interrupted(job, state, epoch=epoch, place=place,
                            signum=stop.agreed())
  began = time.perf_counter() - place.seconds
  cases_per_s = num_steps * job.config.batch_size / place.seconds
  train_loss = place.loss_sum / num_steps
  if job.config.patch_size is None:
    scores = validation.validate(
        eval_step, state["model"], job.dataset.images, job.dataset.labels,
        job.val_rows, batch_size=job.config.batch_size, mesh=mesh)
  else:
    scores = validation.validate_by_windows(
        eval_step, state["model"], job.dataset.images, job.dataset.labels,
        job.val_rows, config=job.config, progress=job.progress)
  line = {"phase": job.number, "epoch": epoch, "train_loss": train_loss,
          **scores, "lr": job.settings.learning_rate,
          "time_s": time.perf_counter() - began, "cases_per_s": cases_per_s}
  log.append(line)
  runs.append_log(job.run_dir / "log.jsonl", line)
  checkpoint.save(manager, epoch, model=state["model"],
                  optimizer=state["opt_state"],
                  meta={"epoch": epoch, "phase": job.number,
                        "seed": job.config.seed,
                        "train_cases": list(job.split.train), **scores})
  runs.discard_interrupted(job.run_dir)
  best = manager.best_step()
  if job.progress:
    tqdm.tqdm.write(
        f"{desc}: train loss {train_loss:.4f}, val Dice "
        f"{scores['val_dice']:.4f}, val topo {scores['val_topo']:.2f}, "
        f"{line['time_s']:.1f} s ({cases_per_s:.2f} cases/s); best epoch "
        f"{best}")
  return state, best


def _train_epochs(job: _Phase, train_step, eval_step, state, manager,
                  log: list[dict[str, Any]], *, start: int,
                  place: epoch_lib.Place, targets, foreground,
                  mesh: jax.sharding.Mesh,
                  stop: preemption.StopSignals) -> tuple[int, bool]:
  """Trains the epochs after ``start`` until the last or patience runs out.

  Epoch ``start + 1`` begins at ``place``.

  Returns:
    ``(epoch, stopped_early)``: the last epoch trained (``start`` if none),
    and whether patience ran out.

  Raises:
    preemption.Preempted: a signal came; the state was saved first.
  """
  epoch = start
  # Checked on resuming too: a crash may come after patience ran out.
  stopped_early = start > 0 and _out_of_patience(
      epoch, manager.best_step(), job.settings)
  while not stopped_early and epoch < job.settings.epochs:
    # A signal during validation, a save or before the phase: stop here.
    signum = stop.agreed()
    if signum:
      raise preemption.Preempted(signum, (
          f"stopped by {_signal_name(signum)} in phase {job.number} before "
          f"epoch {epoch + 1}; what it resumes from is saved in "
          f"{job.run_dir}"))
    epoch += 1
    state, best = _run_epoch(job, train_step, eval_step, state, manager, log,
                             epoch=epoch, place=place, targets=targets,
                             foreground=foreground, mesh=mesh, stop=stop)
    place = epoch_lib.Place()
    stopped_early = _out_of_patience(epoch, best, job.settings)
  return epoch, stopped_early


def _finish(job: _Phase, manager, log: Sequence[dict[str, Any]], *,
            epoch: int, stopped_early: bool,
            compilations: Sequence[int]) -> runs.PhaseResult:
  """Closes the checkpoints; writes ``curves.png`` and ``summary.json``.

  Returns when every process is here, so that a phase 2 started next reads
  this phase's ``summary.json``.
  """
  best = manager.best_step()
  manager.close()
  result = runs.PhaseResult(
      run_dir=str(job.run_dir), best_epoch=best,
      best_val_dice=next(l["val_dice"] for l in log if l["epoch"] == best),
      epochs_run=epoch, stopped_early=stopped_early,
      train_step_compilations=compilations[0],
      eval_step_compilations=compilations[1])
  if jax.process_index() == 0:
    curves.plot_curves(
        log, job.run_dir / "curves.png", best_epoch=best,
        title=f"{job.run_dir}: phase {job.number}, {job.loss} loss")
    runs.write_json(job.run_dir / "summary.json", dataclasses.asdict(result))
  runs.wait_for_all_processes(f"finished {job.run_dir}")
  return result


def train_phase(config: config_lib.TrainConfig, dataset: data.Dataset,
                split: data.Split, run_dir: str | os.PathLike, *,
                phase: int, loss: str | None = None,
                init: str | os.PathLike | None = None,
                progress: bool = True) -> runs.PhaseResult:
  """Trains one phase in ``run_dir``, resuming from its latest checkpoint.

  The phase resumes whenever ``run_dir/checkpoints`` holds an epoch, and
  replays exactly what an uninterrupted run would have done: the batches are
  drawn from ``(config.seed, epoch)``. A finished phase (``summary.json``) is
  not trained again.

  SIGTERM or SIGINT (preemption, Ctrl-C) stops it after the step in flight:
  the state is saved with its place in the epoch (``interrupted/``, or the
  epoch's checkpoint between epochs), ``Preempted`` is raised, and resuming
  goes on bit for bit. The signal handlers are restored on return.

  Args:
    config: the run's configuration.
    dataset: from ``data.load_dataset(..., config.preprocess_config())``.
    split: the case ids to train and validate on.
    run_dir: this phase's folder (created).
    phase: 1 or 2; selects ``config.phase1`` or ``config.phase2``.
    loss: overrides the phase's loss (e.g. ``"dice"`` for the paper's
      "Dice 150+150" baseline).
    init: a finished phase-1 folder whose best checkpoint gives the initial
      weights; required for phase 2, refused for phase 1.
    progress: show a progress bar per epoch and a line per epoch (from
      process 0 only, in a multi-process run).

  Returns:
    The ``PhaseResult``, also written to ``run_dir/summary.json``.

  Raises:
    ValueError: a ``batch_size`` that is not a multiple of the device count
      or larger than the training set, ``run_dir`` holding another
      configuration, or ``init`` trained on other data or another model.
    FileNotFoundError: ``init`` is not a finished phase-1 folder.
    checkpoint.CheckpointError: no checkpoint of ``run_dir`` reads (each
      damaged one skipped is named on stderr).
    OSError: a checkpoint could not be written (a full disk); the earlier
      ones are intact.
    preemption.Preempted: a signal stopped training, its state saved.
  """
  job = _check_phase(config, dataset, split, run_dir, phase=phase, loss=loss,
                     init=init, progress=progress)
  with preemption.catch_signals() as stop:
    return _train_phase(job, stop)


def _train_phase(job: _Phase, stop: preemption.StopSignals
                 ) -> runs.PhaseResult:
  """``train_phase`` of a checked ``job``, signals caught in ``stop``."""
  config, dataset, split = job.config, job.dataset, job.split
  finished = runs.open_phase_dir(
      job.run_dir, runs.run_spec(config, job.number, job.loss, job.init), split)
  runs.write_model_json(job.run_dir, dataset)
  if finished is not None:
    return finished
  mesh = steps.data_mesh()
  model_def, state, manager, start, place = _start(job, mesh)
  log = runs.truncate_log(job.run_dir / "log.jsonl", start)
  if job.progress:
    _report_start(job, state, start, place)
  train_step, eval_step = _make_steps(job, model_def, mesh)
  targets = steps.training_targets(job.loss, dataset.labels, job.train_rows,
                                   normalize=config.normalize)
  foreground = (None if config.patch_size is None
                else data.case_foreground(dataset.labels, job.train_rows))
  before = _cache_sizes(train_step, eval_step)
  try:
    epoch, stopped_early = _train_epochs(
        job, train_step, eval_step, state, manager, log, start=start,
        place=place, targets=targets, foreground=foreground, mesh=mesh,
        stop=stop)
  except BaseException:
    manager.close()
    raise
  compilations = [after - was for after, was in zip(
      _cache_sizes(train_step, eval_step), before)]
  return _finish(job, manager, log, epoch=epoch, stopped_early=stopped_early,
                 compilations=compilations)


# --------------------------------------------------------------------------
# A whole run.


def _check_phases(phases: Sequence[int], *, init, phase2_loss: str | None
                  ) -> tuple[int, ...]:
  """``phases`` as a tuple, checked with the arguments that depend on it."""
  phases = tuple(phases)
  if phases not in ((1, 2), (1,), (2,)):
    raise ValueError(f"phases must be (1, 2), (1,) or (2,), got {phases}")
  if phase2_loss is not None:
    config_lib.check_loss_name(phase2_loss, "phase2_loss")
  if phase2_loss is not None and 2 not in phases:
    raise ValueError(f"phase2_loss is for phase 2, not in phases={phases}")
  if init is not None and phases != (2,):
    raise ValueError(f"init is for phases=(2,) only; phase 2 of phases="
                     f"{phases} starts from its own phase 1")
  return phases


def train(config: config_lib.TrainConfig, task_dir: str | os.PathLike,
          run_dir: str | os.PathLike, *, phases: Sequence[int] = (1, 2),
          init: str | os.PathLike | None = None,
          phase2_loss: str | None = None, resume: bool = False,
          overwrite: bool = False, cache_dir: str | os.PathLike | None = None,
          progress: bool = True) -> dict[int, runs.PhaseResult]:
  """Preprocesses the task, splits it and trains the phases asked for.

  Args:
    config: the run's configuration.
    task_dir: an MSD task folder.
    run_dir: the run folder; phases go to ``run_dir/phase1`` and
      ``run_dir/phase2``.
    phases: ``(1, 2)``, ``(1,)`` or ``(2,)``.
    init: for ``phases=(2,)``, the finished phase-1 folder to start from
      (default ``run_dir/phase1``); its split is used.
    phase2_loss: overrides ``config.phase2.loss`` (``"dice"`` gives the
      paper's "Dice 150+150" baseline).
    resume: continue the phases in ``run_dir`` from their latest
      checkpoints (a phase not started yet starts).
    overwrite: delete this package's files in the phase folders to train
      and start them again.
    cache_dir: preprocessing cache (``data.load_dataset``).
    progress: progress bars and per-epoch lines.

  Returns:
    ``{phase: PhaseResult}``.

  Raises:
    FileExistsError: the folder of a phase to train is not empty and neither
      ``resume`` nor ``overwrite`` is set.
    FileNotFoundError, ValueError: as ``data.load_dataset`` and
      ``train_phase``, before any training.
    checkpoint.CheckpointError, OSError, preemption.Preempted: as
      ``train_phase``.
  """
  phases = _check_phases(phases, init=init, phase2_loss=phase2_loss)
  run_dir = pathlib.Path(run_dir)
  init = pathlib.Path(init if init is not None
                      else run_dir / runs.PHASE_DIRS[1])
  if phases == (2,):
    runs.check_init(init, config)
  runs.prepare_phase_dirs(run_dir, phases, resume=resume, overwrite=overwrite)
  with preemption.catch_signals():  # Also between the phases.
    dataset = data.load_dataset(task_dir, config.preprocess_config(),
                                cache_dir=cache_dir, progress=progress)
    if phases[0] == 1:
      split = data.default_split(dataset.task, seed=config.split_seed)
    else:
      split = data.Split.load(init / "split.json")
    return {phase: train_phase(config, dataset, split,
                               run_dir / runs.PHASE_DIRS[phase], phase=phase,
                               loss=phase2_loss if phase == 2 else None,
                               init=init if phase == 2 else None,
                               progress=progress)
            for phase in phases}
