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


def open_manager(directory: str | os.PathLike, *,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """The checkpoint manager of a run's ``checkpoints/`` folder.

  Args:
    directory: the folder; created unless ``read_only``.
    read_only: open an existing folder to restore from (e.g. another run's).

  Returns:
    A manager that keeps the latest checkpoint and the best by
    ``BEST_METRIC``, writing synchronously.
  """
  directory = pathlib.Path(directory).absolute()
  if read_only and not directory.is_dir():
    raise FileNotFoundError(f"checkpoint folder {directory} not found")
  keep = checkpoint_managers.AnyPreservationPolicy(policies=[
      checkpoint_managers.LatestN(n=1),
      checkpoint_managers.BestN(get_metric_fn=_best_value, reverse=False,
                                n=1),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_value, best_mode="max", preservation_policy=keep,
      # Synchronous: save() returns with the epoch on disk, so the log line
      # written next never points at a checkpoint still in flight.
      enable_async_checkpointing=False,
      cleanup_tmp_directories=not read_only, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(directory, options=options)


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


def restore(manager: ocp.CheckpointManager, epoch: int, *, model: Any,
            optimizer: Any | None = None) -> dict[str, Any]:
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
