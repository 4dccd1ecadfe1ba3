"""Participant-level train/validation/test splits of a task's cases.

One MSD case is one participant, so splitting case ids splits participants.
A split is drawn from a seed (``make_split``, or ``default_split`` with the
paper's counts) and saved next to a run (``Split.save``, ``Split.load``).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib

import numpy as np

from topojax.data.msd import PAPER_TASKS
from topojax.data.msd import Task


@dataclasses.dataclass(frozen=True)
class Split:
  """A participant-level train/validation/test split of case ids.

  Attributes:
    train: case ids to train on.
    val: case ids for early stopping and model selection.
    test: case ids evaluated once, at the end.
    seed: the seed it was drawn from.
  """
  train: tuple[str, ...]
  val: tuple[str, ...]
  test: tuple[str, ...]
  seed: int

  def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes the split as JSON (e.g. ``<run>/split.json``)."""
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True to replace "
                            "it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps(dataclasses.asdict(self), indent=1))

  @classmethod
  def load(cls, path: str | os.PathLike) -> Split:
    """Reads a split written by ``save``."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"split file {path} not found")
    try:
      spec = json.loads(path.read_text())
      split = cls(train=tuple(spec["train"]), val=tuple(spec["val"]),
                  test=tuple(spec["test"]), seed=int(spec["seed"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
      raise ValueError(f"{path}: not a split file with 'train', 'val', 'test' "
                       f"and 'seed' ({type(err).__name__}: {err})") from None
    ids = split.train + split.val + split.test
    if len(set(ids)) != len(ids):
      raise ValueError(f"{path}: a case id appears twice in the split")
    return split


def _write_atomically(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def make_split(case_ids: Sequence[str], *, num_val: int, num_test: int,
               seed: int) -> Split:
  """Draws a deterministic split; the cases left over are for training.

  The ids are sorted before shuffling, so the split depends on the seed and
  the set of ids only, not on their order in ``dataset.json``. The test set
  is drawn first: changing ``num_val`` leaves it unchanged.

  Args:
    case_ids: all case ids, one per participant.
    num_val: validation cases.
    num_test: test cases.
    seed: non-negative seed.

  Returns:
    The ``Split``, each part sorted.
  """
  ids = sorted(case_ids)
  if len(set(ids)) != len(ids):
    raise ValueError("case_ids must be unique")
  if num_val < 0 or num_test < 0 or num_val + num_test >= len(ids):
    raise ValueError(
        f"num_val={num_val} and num_test={num_test} must be non-negative and "
        f"leave at least one of the {len(ids)} cases for training")
  order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
  return Split(train=tuple(sorted(order[num_test + num_val:])),
               val=tuple(sorted(order[num_test:num_test + num_val])),
               test=tuple(sorted(order[:num_test])), seed=int(seed))


def default_split(task: Task, *, seed: int) -> Split:
  """The paper's split counts for its tasks, else 20 % validation, 20 % test.

  The paper's counts (``PAPER_TASKS``, DESIGN.md §3) apply when the folder
  has a paper task's name and that task's full number of cases.
  """
  ids = [case.case_id for case in task.cases]
  protocol = PAPER_TASKS.get(task.root.name)
  if protocol is not None and len(ids) == (
      protocol.num_train + protocol.num_val + protocol.num_test):
    return make_split(ids, num_val=protocol.num_val,
                      num_test=protocol.num_test, seed=seed)
  fifth = round(0.2 * len(ids))
  return make_split(ids, num_val=fifth, num_test=fifth, seed=seed)
