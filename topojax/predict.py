"""Test-set predictions of a trained run, written as NIfTI in image space.

``predict_run(run_dir, task_dir, out_dir)`` reads a phase folder written by
``topojax.train`` (its ``config.json``, ``split.json`` and best checkpoint),
segments every test case of that split whole-volume at the training shape —
the paper's fixed-shape protocol (§3.1) — optionally keeps the largest
connected components, and writes one mask per case with
``topojax.data.write_prediction``: resampled to the original shape, with the
original affine and header, named ``<case_id>.nii.gz`` as
``topojax evaluate`` expects.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
import os
import pathlib

import jax
import numpy as np

from topojax import checkpoint
from topojax import data
from topojax import postprocess
from topojax import train
from topojax import unet


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


def restore_best(phase: pathlib.Path, config: train.TrainConfig, *,
                  in_channels: int, out_channels: int):
  """``(model_def, model_state)`` of a finished phase's best checkpoint."""
  model_def, state = train.init_state(
      config, in_channels=in_channels, out_channels=out_channels,
      learning_rate=config.phase1.learning_rate, mesh=train.data_mesh())
  with checkpoint.open_manager(phase / "checkpoints",
                               read_only=True) as manager:
    restored = checkpoint.restore(manager, manager.best_step(),
                                  model=state["model"])
  return model_def, restored["model"]


def segment(model_def, model_state, images: np.ndarray, *,
            batch_size: int) -> list[np.ndarray]:
  """Probabilities of each case, whole-volume.

  Args:
    model_def: the model's ``nnx.GraphDef``.
    model_state: its ``nnx.State``.
    images: ``(num_cases, X, Y, Z, C_in)`` at the training shape.
    batch_size: cases per forward pass.

  Returns:
    One float32 ``(X, Y, Z, C_out)`` probability volume per case.
  """
  forward = _forward(model_def)
  out = []
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size], np.float32)
    out.extend(np.asarray(forward(model_state, batch)))
  return out


@functools.lru_cache(maxsize=8)
def _forward(model_def):
  from flax import nnx

  @jax.jit
  def forward(model_state, images):
    model = nnx.merge(model_def, model_state)
    model.eval()
    return unet.probabilities(model(images))

  return forward


def predict_run(run_dir: str | os.PathLike, task_dir: str | os.PathLike,
                out_dir: str | os.PathLike, *,
                keep_largest: int | None = None, overwrite: bool = False,
                cache_dir: str | os.PathLike | None = None,
                case_ids: Sequence[str] | None = None) -> list[pathlib.Path]:
  """Writes the run's test-set predictions as NIfTI masks.

  Args:
    run_dir: a run folder (its last finished phase is used) or a phase folder.
    task_dir: the MSD task folder the run was trained on.
    out_dir: folder for ``<case_id>.nii.gz`` (created).
    keep_largest: keep this many largest connected components of each class
      (``topojax.postprocess``); ``None`` keeps everything.
    overwrite: replace prediction files already in ``out_dir``.
    cache_dir: preprocessing cache (``topojax.data.load_dataset``).
    case_ids: cases to predict; the run's test split by default.

  Returns:
    The paths written.

  Raises:
    FileExistsError: a prediction file exists and ``overwrite`` is False
      (checked for every case before any work).
  """
  if keep_largest is not None and keep_largest < 1:
    raise ValueError(f"keep_largest must be a positive int, got {keep_largest}")
  phase = phase_dir(run_dir)
  config = train.TrainConfig(
      **json.loads((phase / "config.json").read_text())["config"])
  split = data.Split.load(phase / "split.json")
  case_ids = split.test if case_ids is None else tuple(case_ids)
  out_dir = pathlib.Path(out_dir)
  paths = [out_dir / f"{case_id}.nii.gz" for case_id in case_ids]
  existing = [str(p) for p in paths if p.exists()]
  if existing and not overwrite:
    raise FileExistsError(
        f"--out {out_dir} already holds {len(existing)} of the predictions "
        f"(e.g. {existing[0]}); pass overwrite=True (--overwrite) to replace "
        "them")
  dataset = data.load_dataset(task_dir, config.preprocess_config(),
                              cache_dir=cache_dir, progress=False)
  rows = dataset.indices(case_ids)
  model_def, model_state = restore_best(
      phase, config, in_channels=dataset.images.shape[-1],
      out_channels=dataset.labels.shape[-1])
  probs = segment(model_def, model_state,
                  np.stack([dataset.images[r] for r in rows]),
                  batch_size=config.batch_size)
  out_dir.mkdir(parents=True, exist_ok=True)
  for path, row, prob in zip(paths, rows, probs):
    mask = data.as_label_map(prob)
    if keep_largest is not None:
      mask = postprocess.keep_largest_components(mask, n=keep_largest)
    data.write_prediction(mask, dataset.meta[row], path, overwrite=overwrite)
  return paths

