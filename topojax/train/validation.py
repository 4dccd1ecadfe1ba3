"""Validation: mean Dice and PPL of a model over the validation cases.

The numbers a phase keeps its best epoch by (``val_dice``, ranked by
``topojax.checkpoint``) and logs beside it (``val_topo``). Only the cases
asked for are read: ``topojax.train`` passes the validation cases, never the
test cases. ``validate`` runs the evaluation step on batches of whole
volumes (the paper's protocol); ``validate_by_windows`` predicts each whole
case by sliding windows, as a run trained on patches is used.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from topojax import data
from topojax import losses
from topojax import metrics
from topojax import windows
from topojax.train import config as config_lib
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
    dice.extend(_dice(mask, label) for mask, label in zip(masks, label_batch))
  return {"val_dice": float(np.mean(dice)), "val_topo": float(np.mean(topo))}


def _dice(mask: np.ndarray, label: np.ndarray) -> float:
  """Mean Dice over the foreground channels of ``(X, Y, Z, C)`` masks."""
  first = 0 if label.shape[-1] == 1 else 1
  return float(np.mean([metrics.dice(mask[..., c], label[..., c] > 0.5)
                        for c in range(first, label.shape[-1])]))


def validate_by_windows(forward, model_state, images, labels,
                        indices: Sequence[int], *,
                        config: config_lib.TrainConfig,
                        progress: bool = False) -> dict[str, float]:
  """``validate`` of a run trained on patches: whole cases, window by window.

  Each case, of any shape, is predicted by ``topojax.sliding_window``
  (``config.patch_size``, ``config.validation_overlap`` or, when that is
  ``None``, ``config.overlap``, Gaussian blending,
  ``config.batch_size`` windows per call) on this process's first device,
  so the numbers do not depend on how many devices or processes train; the
  mask is the thresholded (or arg-max) blend of the probabilities, and the
  PPL is taken on the whole case.

  Args:
    forward: from ``steps.make_forward``.
    model_state: the model's ``nnx.State``, replicated over the mesh.
    images: every case of the dataset, ``(X_i, Y_i, Z_i, C_in)`` each.
    labels: their labels, ``(X_i, Y_i, Z_i, C_out)``.
    indices: the rows to validate on.
    config: the run's configuration.
    progress: a progress bar over the cases (large volumes take a while).

  Returns:
    ``{"val_dice": ..., "val_topo": ...}``.
  """
  # Every process holds the whole replicated state; its first shard is it.
  local_state = jax.tree.map(lambda array: array.addressable_data(0),
                             model_state)
  predict = functools.partial(forward, local_state)
  overlap = (config.overlap if config.validation_overlap is None
             else config.validation_overlap)
  dice, topo = [], []
  for row in tqdm.tqdm(indices, desc="validating", unit="case", leave=False,
                       disable=not progress):
    label = np.asarray(labels[row], np.float32)
    probabilities = windows.sliding_window(
        predict, np.asarray(images[row], np.float32)[None],
        patch_size=config.patch_size, overlap=overlap,
        batch_size=config.batch_size)
    topo.append(float(_whole_case_ppl(probabilities, jnp.asarray(label[None]),
                                      kernel_sizes=config.kernel_sizes)))
    probabilities = np.asarray(probabilities[0])
    if label.shape[-1] == 1:
      mask = probabilities > 0.5
    else:
      mask = np.eye(label.shape[-1], dtype=bool)[probabilities.argmax(-1)]
    dice.append(_dice(mask, label))
  return {"val_dice": float(np.mean(dice)), "val_topo": float(np.mean(topo))}


@functools.partial(jax.jit, static_argnames="kernel_sizes")
def _whole_case_ppl(probabilities, label, *, kernel_sizes):
  """The PPL of one whole case, zero-padded where a side is below a kernel.

  The padding differs nowhere between the two; it only enters the mean, and
  only for a case smaller than the largest kernel, which a whole-volume run
  could not have been given at all.
  """
  short = [max(max(kernel_sizes) - side, 0)
           for side in probabilities.shape[1:4]]
  padding = [(0, 0)] + [(0, s) for s in short] + [(0, 0)]
  return losses.projected_pooling_loss(
      jnp.pad(probabilities, padding), jnp.pad(label, padding),
      kernel_sizes=kernel_sizes)
