"""``predict_run``: a run's test cases, written as NIfTI masks.

This is ``topojax predict --data``. The cases are read from the task's
preprocessing cache, the arrays training saw, and written as
``<case_id>.nii.gz`` in their original image space, as ``topojax evaluate``
expects.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import pathlib

from topojax import data
from topojax.predict import images
from topojax.predict import runs
from topojax.predict import segmenter as segmenter_lib


def predict_run(run_dir: str | os.PathLike, task_dir: str | os.PathLike,
                out_dir: str | os.PathLike, *,
                keep_largest: int | None = None, overwrite: bool = False,
                cache_dir: str | os.PathLike | None = None,
                case_ids: Sequence[str] | None = None) -> list[pathlib.Path]:
  """Writes the run's test-set predictions as NIfTI masks.

  The cases come from the task's preprocessing cache (the arrays training
  saw) and are segmented by the run's ``Segmenter``.

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
  segmenter_lib._check_keep_largest(keep_largest)
  phase = runs.phase_dir(run_dir)
  config = runs._read_config(phase)
  split = data.Split.load(phase / "split.json")
  case_ids = split.test if case_ids is None else tuple(case_ids)
  out_dir = pathlib.Path(out_dir)
  paths = [out_dir / f"{case_id}.nii.gz" for case_id in case_ids]
  images._refuse_existing(paths, out_dir, overwrite=overwrite)
  dataset = data.load_dataset(task_dir, config.preprocess_config(),
                              cache_dir=cache_dir, progress=False)
  rows = dataset.indices(case_ids)
  segmenter = segmenter_lib.Segmenter.from_run(phase)
  channels = (dataset.in_channels, dataset.out_channels)
  if channels != (segmenter.in_channels, segmenter.out_channels):
    raise ValueError(
        f"--data {task_dir} gives {channels[0]} input and {channels[1]} "
        f"output channel(s) but the run {phase} has {segmenter.in_channels} "
        f"and {segmenter.out_channels}: it was trained on another task")
  out_dir.mkdir(parents=True, exist_ok=True)
  for path, row in zip(paths, rows):
    # One case at a time, like any other image: one compiled forward pass.
    probabilities = segmenter.forward(dataset.images[row][None])[0]
    mask, _ = segmenter_lib._in_image_grid(
        config, probabilities, dataset.meta[row].original_shape,
        keep_largest)
    data.write_prediction(mask, dataset.meta[row], path, overwrite=overwrite)
  return paths

