"""Reading a finished run: its phase folder, configuration, model and weights.

A phase folder (``<run>/phase1`` or ``<run>/phase2``, as ``topojax.train``
writes it) holds ``summary.json`` once finished, ``config.json``, the model
description ``model.json`` and the checkpoints of its epochs, the best of
which is the one predicted with.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax

from topojax import checkpoint
from topojax import train

MODEL_FILE = "model.json"


def phase_dir(run_dir: str | os.PathLike) -> pathlib.Path:
  """The phase folder to predict with: ``run_dir`` itself, or its last phase.

  Raises:
    FileNotFoundError: no finished phase (``summary.json``) there.
  """
  run_dir = pathlib.Path(run_dir)
  for candidate in (run_dir, run_dir / train.PHASE_DIRS[2],
                    run_dir / train.PHASE_DIRS[1]):
    if (candidate / "summary.json").is_file():
      return candidate
  raise FileNotFoundError(
      f"--run {run_dir}: no finished training phase there (expected "
      f"summary.json in it or in its {train.PHASE_DIRS[2]}/ or "
      f"{train.PHASE_DIRS[1]}/ folder)")


def _read_config(phase: pathlib.Path) -> train.TrainConfig:
  return train.TrainConfig(
      **json.loads((phase / "config.json").read_text())["config"])


def _best_epoch(manager: checkpoint.ReadOnlyCheckpoints) -> int:
  best = manager.best_step()
  if best is None:
    raise FileNotFoundError(f"{manager.directory}: no finished epoch to "
                            "restore")
  return best


def _restore(phase: pathlib.Path, config: train.TrainConfig, *,
             in_channels: int, out_channels: int,
             sharding: jax.sharding.Sharding):
  """``(model_def, model_state)`` of the best epoch, placed by ``sharding``."""
  # Restoring needs the shapes only: an abstract model is the template, and
  # no initialisation is computed (or compiled) just to be overwritten.
  model_def, template = train.abstract_model(
      config, in_channels=in_channels, out_channels=out_channels)
  template = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                        sharding=sharding), template)
  with checkpoint.open_manager(phase / "checkpoints",
                               read_only=True) as manager:
    restored = checkpoint.restore(manager, _best_epoch(manager),
                                  model=template)
  return model_def, restored["model"]


def restore_best(phase: pathlib.Path, config: train.TrainConfig, *,
                 in_channels: int, out_channels: int):
  """``(model_def, model_state)`` of a finished phase's best checkpoint.

  The arrays are replicated over ``train.data_mesh()``, for ``segment``.

  Raises:
    checkpoint.CheckpointError: the best checkpoint cannot be read or fails
      its checksums.
  """
  return _restore(phase, config, in_channels=in_channels,
                  out_channels=out_channels,
                  sharding=jax.NamedSharding(train.data_mesh(), jax.P()))


def _model_io(phase: pathlib.Path) -> dict[str, Any]:
  """The phase's ``model.json``, or the channel counts of its checkpoint."""
  path = phase / MODEL_FILE
  if not path.is_file():
    return _checkpoint_io(phase)
  try:
    spec = json.loads(path.read_text())
    return {"in_channels": int(spec["in_channels"]),
            "out_channels": int(spec["out_channels"]),
            "modalities": tuple(spec["modalities"]),
            "task_modalities": tuple(spec["task_modalities"]),
            "modality_indices": tuple(spec["modality_indices"]),
            "label_names": tuple(spec["label_names"])}
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{path}: not the model description topojax.train "
                     f"writes ({type(err).__name__}: {err})") from None


def _checkpoint_io(phase: pathlib.Path) -> dict[str, Any]:
  """``_model_io`` of a run from before ``model.json``: channel counts only.

  The arrays' shapes in the best checkpoint's metadata tell them; no array
  is read.
  """
  with checkpoint.open_manager(phase / "checkpoints",
                               read_only=True) as manager:
    leaves = jax.tree_util.tree_flatten_with_path(
        manager.model_metadata(_best_epoch(manager)))[0]
  shapes = {tuple(str(getattr(k, "key", getattr(k, "idx", k)))
                  for k in key_path): leaf.shape
            for key_path, leaf in leaves}

  def kernel(*prefix):
    for key, shape in shapes.items():
      if key[:len(prefix)] == prefix:
        return shape
    raise ValueError(f"{phase}: no {MODEL_FILE}, and its checkpoint has no "
                     f"{'/'.join(prefix)} array to read the channels from")

  # unet.UNet: the first convolution's kernel is (3, 3, 3, C_in, width), the
  # head's (1, 1, 1, width, C_out).
  return {"in_channels": int(kernel("encoder", "0", "conv1", "kernel")[-2]),
          "out_channels": int(kernel("head", "kernel")[-1]),
          "modalities": None, "task_modalities": None,
          "modality_indices": None, "label_names": None}
