"""Training checkpoints with orbax: the latest epochs and the best, checked.

A run's ``checkpoints/`` folder is an ``orbax.checkpoint.CheckpointManager``
directory with one sub-folder per saved epoch; at most three are kept, the
two latest (to resume, one to fall back to if the other is damaged) and the
one with the highest validation Dice (to evaluate and to start fine-tuning
from). Each holds three items:

* ``model``: the network's variables (parameters and, with batch
  normalisation, running statistics), ``nnx.to_pure_dict`` of ``nnx.state``;
* ``optimizer``: the optimiser's step count and optax state;
* ``meta``: JSON with the epoch, the seed, the training case ids, the
  validation metrics and a CRC-32 of every array of ``model`` and
  ``optimizer`` (``checksums``). The order of the training batches (and
  their random flips) is drawn from ``(seed, epoch)`` by
  ``topojax.data.iterate_batches`` and no other random number is used while
  training, so these fix every random choice of the epochs still to come.

Reading a step checks every array it reads against its checksum: a file cut
short or a flipped bit (which orbax's OCDBT files would otherwise hand back
silently) raises ``CheckpointError``, one line naming the step.

A crash while writing never damages the checkpoints already there: orbax
writes a new epoch into ``<epoch>.orbax-checkpoint-tmp-*`` and renames the
finished folder to ``<epoch>`` (an atomic ``rename`` on a local file system),
and only then deletes checkpoints no longer kept. A folder left behind by a
crash (or a full disk) has the temporary name, is ignored when listing
epochs, and is deleted the next time the directory is opened.

A training run stopped mid-epoch (preemption) saves its state with
``save_interrupted`` into one folder beside ``checkpoints/``, read back by
``restore_interrupted``: the same three items, ``meta`` also holding the
place in the epoch.

A folder opened only to restore from (another run's best model, a
prediction) is read with ``ReadOnlyCheckpoints``, a plain
``ocp.Checkpointer`` over its epoch folders: a ``CheckpointManager`` is made
for writing, and opened read-only it warns on every opening that it will not
write.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import errno
import logging
import os
import pathlib
import sys
from typing import Any
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# The metric checkpoints are ranked by; higher is better.
BEST_METRIC = "val_dice"
# Latest epochs kept besides the best: the newest, and one to fall back to.
KEEP_LATEST = 2


class CheckpointError(ValueError):
  """A saved step that cannot be read, or whose arrays fail their checksums."""


def _best_value(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def checksums(tree: Any) -> dict[str, int]:
  """CRC-32 of each array of a pytree, by its path (``"a/0/b"``).

  The path names keys, indices and attributes alike, so the nested dicts
  orbax restores without a template have the paths of the ``nnx.State``
  they were saved from.
  Arrays are read to the host; the replicated arrays of a multi-process run
  are read from this process's copy.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): zlib.crc32(
      np.ascontiguousarray(np.asarray(leaf)).view(np.uint8))
          for path, leaf in leaves}


def _path_name(path) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "idx", getattr(
      key, "name", key)))) for key in path)


@contextlib.contextmanager
def _quiet_orbax():
  """Silences orbax's own log lines while a failure may be translated.

  A damaged step makes orbax log each failing array before raising; the
  ``CheckpointError`` raised instead says it in one line.
  """
  # orbax logs through absl; its reads run on asyncio loops, whose logger
  # reports the reads still pending when one fails.
  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _orbax_leftover(value: BaseException | None, where: Any) -> bool:
  """Whether an error reported outside any call is a failed read's leftover.

  A read orbax abandons when another of the same step fails reports its own
  copy of the error when collected (``where`` is its coroutine); TensorStore
  completing it afterwards meets the closed event loop ("Event loop is
  closed").
  """
  code = getattr(where, "cr_code", None)
  if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
    return True
  return (isinstance(value, RuntimeError)
          and str(value) == "Event loop is closed")


def _drop_abandoned_reads() -> None:
  """Silences what a failed read leaves behind, from now on.

  The leftovers (``_orbax_leftover``) print tracebacks with TensorStore
  specs, on the unraisable or the uncaught-exception hook, whenever they
  run, which may be long after the ``CheckpointError`` said it all in one
  line. Only those are filtered out; anything else is reported as before.
  """
  if getattr(sys.unraisablehook, "_drops_orbax_leftovers", False):
    return
  unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook

  def on_unraisable(unraisable):
    if not _orbax_leftover(unraisable.exc_value, unraisable.object):
      unraisable_hook(unraisable)

  def on_uncaught(kind, value, trace):
    if not _orbax_leftover(value, None):
      except_hook(kind, value, trace)

  on_unraisable._drops_orbax_leftovers = True
  sys.unraisablehook, sys.excepthook = on_unraisable, on_uncaught


def _first_line(err: BaseException) -> str:
  """The cause of an orbax/TensorStore error, without its TensorStore spec."""
  while err.__cause__ is not None and type(err) is Exception:
    err = err.__cause__  # orbax wraps TensorStore's error in a bare one.
  lines = [line for line in str(err).splitlines() if line.strip()]
  return lines[0] if lines else type(err).__name__


def open_manager(directory: str | os.PathLike, *, read_only: bool = False
                 ) -> ocp.CheckpointManager | ReadOnlyCheckpoints:
  """The checkpoint manager of a run's ``checkpoints/`` folder.

  Args:
    directory: the folder; created unless ``read_only``.
    read_only: open an existing folder to restore from (e.g. another run's).

  Returns:
    A manager that keeps the ``KEEP_LATEST`` latest checkpoints and the best
    by ``BEST_METRIC``, writing synchronously; with ``read_only``, a
    ``ReadOnlyCheckpoints`` of the folder, which ``restore`` reads alike.

  Raises:
    FileNotFoundError: ``read_only`` and no such folder.
  """
  directory = pathlib.Path(directory).absolute()
  if read_only:
    return ReadOnlyCheckpoints(directory)
  keep = checkpoint_managers.AnyPreservationPolicy(policies=[
      checkpoint_managers.LatestN(n=KEEP_LATEST),
      checkpoint_managers.BestN(get_metric_fn=_best_value, reverse=False,
                                n=1),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_value, best_mode="max", preservation_policy=keep,
      # Synchronous: save() returns with the epoch on disk, so the log line
      # written next never points at a checkpoint still in flight.
      enable_async_checkpointing=False, cleanup_tmp_directories=True,
      create=True)
  return ocp.CheckpointManager(directory, options=options)


def _item_handlers() -> ocp.CompositeCheckpointHandler:
  """Readers of the items ``save`` writes into each epoch folder."""
  return ocp.CompositeCheckpointHandler(
      model=ocp.StandardCheckpointHandler(),
      optimizer=ocp.StandardCheckpointHandler(),
      meta=ocp.JsonCheckpointHandler())


class ReadOnlyCheckpoints:
  """The saved epochs of a ``checkpoints/`` folder, to restore from only.

  Answers ``all_steps``, ``latest_step``, ``best_step`` and ``restore`` as a
  ``CheckpointManager`` over the same folder would, and never writes or
  deletes anything. Only finished epochs are seen: orbax writes an epoch
  under a temporary name and renames it to the epoch number when complete.

  Attributes:
    directory: the folder, absolute.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory).absolute()
    if not self.directory.is_dir():
      raise FileNotFoundError(f"checkpoint folder {self.directory} not found")
    self._checkpointer = ocp.Checkpointer(_item_handlers())

  def all_steps(self) -> list[int]:
    """The finished epochs, ascending."""
    return sorted(int(path.name) for path in self.directory.iterdir()
                  if path.name.isdigit() and path.is_dir())

  def latest_step(self) -> int | None:
    """The last finished epoch; ``None`` when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The epoch of highest ``BEST_METRIC``; ``None`` when there is none.

    Ranked as ``open_manager``'s manager ranks them: of equal values, the
    later epoch.

    Raises:
      CheckpointError: a step whose ``meta`` cannot be read.
    """
    steps = self.all_steps()
    if not steps:
      return None
    return max(steps, key=lambda step: (_best_value(self.meta(step)), step))

  def meta(self, step: int) -> dict[str, Any]:
    """The ``meta`` item of epoch ``step`` (``save``'s ``meta``)."""
    return _read(self.directory / str(step),
                 lambda args: self.restore(step, args=args),
                 {"meta": ocp.args.JsonRestore()})["meta"]

  def model_metadata(self, step: int) -> Any:
    """Shapes and dtypes of epoch ``step``'s model arrays, none read.

    Returns:
      A pytree like the saved model whose leaves have ``shape`` and
      ``dtype``.
    """
    path = self.directory / str(step) / "model"
    try:
      with _quiet_orbax():
        return ocp.StandardCheckpointHandler().metadata(path).tree
    except Exception as err:  # orbax raises many kinds.
      _drop_abandoned_reads()
      raise CheckpointError(f"checkpoint {path.parent} cannot be read: "
                            f"{_first_line(err)}") from err

  def restore(self, step: int, *, args: ocp.args.Composite) -> Any:
    """Reads the items ``args`` asks for from epoch ``step``."""
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"no finished epoch {step} in {self.directory} (found "
          f"{self.all_steps()})")
    return self._checkpointer.restore(self.directory / str(step), args=args)

  def close(self) -> None:
    self._checkpointer.close()

  def __enter__(self) -> ReadOnlyCheckpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _save_args(model: Any, optimizer: Any,
               meta: dict[str, Any]) -> ocp.args.Composite:
  """The items of a step, ``meta`` with the checksums of the arrays.

  The arrays are written from the host: orbax saves a tree of NumPy arrays
  in under half the time of the same tree of replicated ``jax.Array``s
  (a ``save`` of the main job's U-Net and its Adam state: 0.12 against
  0.23 s, most of it CPU time, once per epoch), and ``restore`` reads them
  into its templates' shardings all the same.
  """
  model, optimizer = jax.device_get((model, optimizer))
  meta = {**meta, "checksums": {"model": checksums(model),
                                "optimizer": checksums(optimizer)}}
  return ocp.args.Composite(
      model=ocp.args.StandardSave(model),
      optimizer=ocp.args.StandardSave(optimizer),
      meta=ocp.args.JsonSave(meta))


@contextlib.contextmanager
def _writing(path: pathlib.Path):
  """Turns a failed write (a full disk) into one ``OSError`` naming ``path``."""
  try:
    with _quiet_orbax():
      yield
  except OSError as err:
    raise OSError(err.errno, f"checkpoint {path} could not be written "
                  f"({err.strerror or err}); the checkpoints saved before it "
                  "are intact: free space, then resume with --resume"
                  ) from err
  except ValueError as err:
    # TensorStore reports a failed write as a ValueError naming the cause.
    if "No space left" not in str(err):
      raise
    raise OSError(errno.ENOSPC, f"checkpoint {path} could not be written "
                  f"(no space left on device); the checkpoints saved before "
                  "it are intact: free space, then resume with --resume"
                  ) from err


def save(manager: ocp.CheckpointManager, epoch: int, *, model: Any,
         optimizer: Any, meta: dict[str, Any]) -> None:
  """Writes epoch ``epoch``; ``meta[BEST_METRIC]`` ranks it.

  Args:
    manager: from ``open_manager``.
    epoch: the epoch just finished, 1-based; the checkpoint's step.
    model: pytree of arrays (``nnx.to_pure_dict(nnx.state(model))``).
    optimizer: pytree of arrays, likewise.
    meta: JSON-serialisable; must hold ``BEST_METRIC``. Saved with the
      arrays' ``checksums`` added.

  Raises:
    OSError: the step could not be written (e.g. ``errno.ENOSPC``); the
      steps saved before are untouched.
  """
  with _writing(pathlib.Path(manager.directory) / str(epoch)):
    manager.save(epoch, args=_save_args(model, optimizer, meta),
                 metrics={BEST_METRIC: float(meta[BEST_METRIC])})


def _read(where: pathlib.Path, read: Callable[[ocp.args.Composite], Any],
          items: dict[str, Any]) -> dict[str, Any]:
  """``read(args)`` of ``items`` from the step at ``where``, checked.

  Raises:
    CheckpointError: the step cannot be read, or an array read differs
      from its checksum.
  """
  try:
    with _quiet_orbax():
      restored = dict(read(ocp.args.Composite(**items)))
  except FileNotFoundError:
    raise
  except Exception as err:  # orbax and TensorStore raise many kinds.
    _drop_abandoned_reads()
    raise CheckpointError(f"checkpoint {where} cannot be read: "
                          f"{_first_line(err)}") from err
  saved = restored.get("meta", {}).get("checksums")
  # Steps written before checksums existed are read unchecked.
  for item in ("model", "optimizer"):
    if saved is None or item not in restored:
      continue
    found = checksums(restored[item])
    bad = sorted(key for key in found.keys() | saved[item].keys()
                 if found.get(key) != saved[item].get(key))
    if bad:
      raise CheckpointError(
          f"checkpoint {where} is damaged: {len(bad)} array(s) of its "
          f"{item} differ from their checksums (first: {item}/{bad[0]})")
  return restored


def restore(manager: ocp.CheckpointManager | ReadOnlyCheckpoints, epoch: int,
            *, model: Any, optimizer: Any | None = None) -> dict[str, Any]:
  """Reads epoch ``epoch`` into arrays shaped and sharded like the templates.

  Args:
    manager: from ``open_manager``.
    epoch: a saved step (``manager.latest_step()``, ``best_step()``).
    model: template pytree of arrays; the result has its shardings.
    optimizer: template for the optimiser, or ``None`` to skip it (starting
      a new phase from a trained model).

  Returns:
    ``{"model": ..., "meta": ...}``, plus ``"optimizer"`` when asked for;
    every array checked against its checksum.

  Raises:
    CheckpointError: the step cannot be read or fails its checksums.
  """
  items = {"model": ocp.args.StandardRestore(model),
           "meta": ocp.args.JsonRestore()}
  if optimizer is not None:
    items["optimizer"] = ocp.args.StandardRestore(optimizer)
  return _read(pathlib.Path(manager.directory) / str(epoch),
               lambda args: manager.restore(epoch, args=args), items)


# --------------------------------------------------------------------------
# The state of an epoch stopped part-way (preemption).


def save_interrupted(path: str | os.PathLike, *, model: Any, optimizer: Any,
                     meta: dict[str, Any]) -> None:
  """Writes a state stopped mid-epoch to the folder ``path``, replacing one.

  Written aside and renamed by orbax, as a step is; every process calls it.

  Args:
    path: the folder (e.g. ``<phase>/interrupted``).
    model, optimizer: as ``save``.
    meta: JSON-serialisable: the epoch and the place in it.

  Raises:
    OSError: it could not be written (e.g. ``errno.ENOSPC``).
  """
  path = pathlib.Path(path).absolute()
  with _writing(path), ocp.Checkpointer(_item_handlers()) as checkpointer:
    checkpointer.save(path, args=_save_args(model, optimizer, meta),
                      force=True)


def restore_interrupted(path: str | os.PathLike, *, model: Any,
                        optimizer: Any) -> dict[str, Any]:
  """Reads what ``save_interrupted`` wrote, as ``restore`` reads a step.

  Raises:
    CheckpointError: it cannot be read or fails its checksums.
  """
  path = pathlib.Path(path).absolute()
  with ocp.Checkpointer(_item_handlers()) as checkpointer:
    return _read(path, lambda args: checkpointer.restore(path, args=args), {
        "model": ocp.args.StandardRestore(model),
        "optimizer": ocp.args.StandardRestore(optimizer),
        "meta": ocp.args.JsonRestore()})
