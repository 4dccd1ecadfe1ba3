"""One pass of the train step over a phase's training batches (or patches).

An epoch can stop after any step (a signal, agreed by every process) and go
on later from there: its ``Place`` (batches done, their summed loss,
seconds) is saved with the state, and the batches of ``(seed, epoch)`` are
drawn again with those already trained dropped, so the rest of the epoch is
the one an uninterrupted run trains.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import itertools
import time

import jax
import numpy as np
import tqdm

from topojax import data
from topojax.train import config as config_lib
from topojax.train import preemption
from topojax.train import steps


@dataclasses.dataclass(frozen=True)
class Place:
  """How far an epoch got: batches trained, their summed loss, seconds."""
  batches: int = 0
  loss_sum: float = 0.0
  seconds: float = 0.0


def num_steps(config: config_lib.TrainConfig, num_rows: int) -> int:
  """Train steps in an epoch over ``num_rows`` training cases.

  A last partial batch is dropped; a run on patches draws
  ``config.patches_per_case`` patches of every case.
  """
  if config.patch_size is not None:
    num_rows *= config.patches_per_case
  return num_rows // config.batch_size


def train_epoch(train_step, state, images, targets, rows, *,
                config: config_lib.TrainConfig, learning_rate: float,
                epoch: int,
                mesh: jax.sharding.Mesh, desc: str, progress: bool,
                stop: preemption.StopSignals, start: Place,
                foreground: Sequence[np.ndarray] | None = None):
  """A pass over the training rows in ``(config.seed, epoch)`` order.

  ``images`` are the dataset's, ``targets`` its labels as the train step
  reads them (``steps.training_targets``); the steps take
  ``learning_rate`` and ``config.dice_weight``. A run with a ``patch_size``
  trains on ``config.patches_per_case`` patches of each training case
  (``data.iterate_patches``),
  centred on one of its ``foreground`` voxels (``data.foreground_voxels``,
  per row) for ``config.foreground_fraction`` of each batch; the others on
  whole cases. The pass begins after
  ``start.batches`` batches (an epoch stopped part-way), and ends early after
  the step in flight when every process agrees that a signal came
  (``stop.agreed``).

  Returns:
    ``(state, place)``: ``place.batches`` is the epoch's number of batches
    unless it stopped early.
  """
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  steps_in_epoch = num_steps(config, len(rows))
  began = time.perf_counter() - start.seconds
  total = start.loss_sum
  if config.patch_size is None:
    batches = data.iterate_batches(images, targets, rows,
                                   batch_size=config.batch_size,
                                   seed=config.seed, epoch=epoch,
                                   flip_axes=config.flip_axes)
  else:
    batches = data.iterate_patches(
        (images, targets), foreground,
        np.repeat(rows, config.patches_per_case),
        patch_size=config.patch_size,
        batch_size=config.batch_size,
        foreground_fraction=config.foreground_fraction, seed=config.seed,
        epoch=epoch, flip_axes=config.flip_axes)
  # The batches already trained are drawn again and dropped: their random
  # draws come first in the epoch's stream.
  batches = itertools.islice(batches, start.batches, None)
  bar = tqdm.tqdm(batches, total=steps_in_epoch, initial=start.batches, desc=desc,
                  unit="batch", leave=False, disable=not progress)
  count = start.batches
  for count, (images, labels) in enumerate(bar, start.batches + 1):
    state, loss = train_step(state, steps.to_global(images, sharding),
                             steps.to_global(labels, sharding),
                             learning_rate, config.dice_weight)
    total += float(loss)
    seconds = time.perf_counter() - began
    bar.set_postfix(loss=f"{total / count:.4f}",
                    cases_per_s=f"{count * config.batch_size / seconds:.2f}")
    if count < steps_in_epoch and stop.agreed():
      break
  bar.close()
  return state, Place(count, total, time.perf_counter() - began)
