"""Validation: mean Dice and PPL of a model over the validation cases.

The numbers a phase keeps its best epoch by (``val_dice``, ranked by
``topojax.checkpoint``) and logs beside it (``val_topo``). Only the cases
asked for are read: ``topojax.train`` passes the validation cases, never the
test cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from topojax import data
from topojax import metrics
from topojax.train import steps


def validate(eval_step, model_state, images, labels, indices: Sequence[int],
             *, batch_size: int, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Mean validation Dice and PPL over the cases ``indices``.

  Dice is ``topojax.metrics.dice`` of each foreground class (channel 0 of a
  binary output, channels 1.. of a one-hot one), averaged over classes and
  then over cases.

  Args:
    eval_step: from ``steps.make_eval_step``.
    model_state: the model's ``nnx.State``, replicated over ``mesh``.
    images: ``(M, X, Y, Z, C_in)``, every case of the dataset (host
      arrays, e.g. ``data.Dataset.images``).
    labels: ``(M, X, Y, Z, C_out)``, their labels.
    indices: the rows of ``images`` to validate on.
    batch_size: cases per step, a multiple of the device count; the last
      batch is padded with zero cases, which are not counted.
    mesh: from ``steps.data_mesh``.

  Returns:
    ``{"val_dice": ..., "val_topo": ...}``.
  """
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  dice, topo = [], []
  for image_batch, label_batch in data.iterate_batches(
      images, labels, indices, batch_size=batch_size, seed=0, epoch=0,
      shuffle=False, drop_remainder=False):
    count = image_batch.shape[0]
    masks, batch_topo = eval_step(
        model_state,
        steps.to_global(steps.pad_batch(image_batch, batch_size), sharding),
        steps.to_global(steps.pad_batch(label_batch, batch_size), sharding))
    masks = multihost_utils.process_allgather(masks, tiled=True)[:count]
    topo.extend(multihost_utils.process_allgather(batch_topo,
                                                  tiled=True)[:count])
    first = 0 if label_batch.shape[-1] == 1 else 1
    for mask, label in zip(masks, label_batch):
      dice.append(np.mean([metrics.dice(mask[..., c], label[..., c] > 0.5)
                           for c in range(first, label.shape[-1])]))
  return {"val_dice": float(np.mean(dice)), "val_topo": float(np.mean(topo))}
