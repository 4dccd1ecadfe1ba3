"""Training checkpoints with orbax: the latest epoch and the best by validation.

A run's ``checkpoints/`` folder is an ``orbax.checkpoint.CheckpointManager``
directory with one sub-folder per saved epoch; at most two are kept, the
latest (to resume) and the one with the highest validation Dice (to evaluate
and to start fine-tuning from). Each holds three items:

* ``model``: the network's variables (parameters and, with batch
  normalisation, running statistics), ``nnx.to_pure_dict`` of ``nnx.state``;
* ``optimizer``: the optimiser's step count and optax state;
* ``meta``: JSON with the epoch, the seed, the training case ids and the
  validation metrics. The order of the training batches (and their random
  flips) is drawn from ``(seed, epoch)`` by ``topojax.data.iterate_batches``
  and no other random number is used while training, so these fix every
  random choice of the epochs still to come.

A crash while writing never damages the checkpoints already there: orbax
writes a new epoch into ``<epoch>.orbax-checkpoint-tmp-*`` and renames the
finished folder to ``<epoch>`` (an atomic ``rename`` on a local file system),
and only then deletes checkpoints no longer kept. A folder left behind by a
crash has the temporary name, is ignored when listing epochs, and is deleted
the next time the directory is opened.

A folder opened only to restore from (another run's best model, a
prediction) is read with ``ReadOnlyCheckpoints``, a plain
``ocp.Checkpointer`` over its epoch folders: a ``CheckpointManager`` is made
for writing, and opened read-only it warns on every opening that it will not
write.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# The metric checkpoints are ranked by; higher is better.
BEST_METRIC = "val_dice"


def _best_value(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def open_manager(directory: str | os.PathLike, *, read_only: bool = False
                 ) -> ocp.CheckpointManager | ReadOnlyCheckpoints:
  """The checkpoint manager of a run's ``checkpoints/`` folder.

  Args:
    directory: the folder; created unless ``read_only``.
    read_only: open an existing folder to restore from (e.g. another run's).

  Returns:
    A manager that keeps the latest checkpoint and the best by
    ``BEST_METRIC``, writing synchronously; with ``read_only``, a
    ``ReadOnlyCheckpoints`` of the folder, which ``restore`` reads alike.

  Raises:
    FileNotFoundError: ``read_only`` and no such folder.
  """
  directory = pathlib.Path(directory).absolute()
  if read_only:
    return ReadOnlyCheckpoints(directory)
  keep = checkpoint_managers.AnyPreservationPolicy(policies=[
      checkpoint_managers.LatestN(n=1),
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
    """
    steps = self.all_steps()
    if not steps:
      return None
    return max(steps, key=lambda step: (_best_value(self.meta(step)), step))

  def meta(self, step: int) -> dict[str, Any]:
    """The ``meta`` item of epoch ``step`` (``save``'s ``meta``)."""
    return self.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def model_metadata(self, step: int) -> Any:
    """Shapes and dtypes of epoch ``step``'s model arrays, none read.

    Returns:
      A pytree like the saved model whose leaves have ``shape`` and
      ``dtype``.
    """
    metadata = ocp.StandardCheckpointHandler().metadata(
        self.directory / str(step) / "model")
    return metadata.tree

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


def save(manager: ocp.CheckpointManager, epoch: int, *, model: Any,
         optimizer: Any, meta: dict[str, Any]) -> None:
  """Writes epoch ``epoch``; ``meta[BEST_METRIC]`` ranks it.

  Args:
    manager: from ``open_manager``.
    epoch: the epoch just finished, 1-based; the checkpoint's step.
    model: pytree of arrays (``nnx.to_pure_dict(nnx.state(model))``).
    optimizer: pytree of arrays, likewise.
    meta: JSON-serialisable; must hold ``BEST_METRIC``.
  """
  manager.save(epoch, args=ocp.args.Composite(
      model=ocp.args.StandardSave(model),
      optimizer=ocp.args.StandardSave(optimizer),
      meta=ocp.args.JsonSave(meta)),
               metrics={BEST_METRIC: float(meta[BEST_METRIC])})


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
    ``{"model": ..., "meta": ...}``, plus ``"optimizer"`` when asked for.
  """
  items = {"model": ocp.args.StandardRestore(model),
           "meta": ocp.args.JsonRestore()}
  if optimizer is not None:
    items["optimizer"] = ocp.args.StandardRestore(optimizer)
  return dict(manager.restore(epoch, args=ocp.args.Composite(**items)))
