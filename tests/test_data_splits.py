"""Tests for topojax/data/splits.py: participant-level splits."""

import numpy as np
import pytest

from topojax import data


def test_make_split_is_deterministic_and_disjoint():
  ids = [f"case_{i:02d}" for i in range(41)]
  split = data.make_split(ids, num_val=7, num_test=9, seed=3)
  assert (len(split.train), len(split.val), len(split.test)) == (25, 7, 9)
  assert sorted(split.train + split.val + split.test) == ids
  shuffled = list(np.random.default_rng(0).permutation(ids))
  assert data.make_split(shuffled, num_val=7, num_test=9, seed=3) == split
  assert data.make_split(ids, num_val=7, num_test=9, seed=4) != split
  # The test set does not move when the validation size changes.
  assert data.make_split(ids, num_val=3, num_test=9, seed=3).test == split.test


@pytest.mark.parametrize("folder, num_cases, counts", [
    ("Task09_Spleen", 41, (25, 7, 9)),
    ("Task02_Heart", 20, (12, 4, 4)),
    ("Task04_Hippocampus", 260, (166, 42, 52)),
    ("Task09_Spleen", 30, (18, 6, 6)),  # Not the full task: 20 % / 20 %.
    ("Task00_Synthetic", 60, (36, 12, 12)),
])
def test_default_split_counts(tmp_path, folder, num_cases, counts):
  cases = tuple(data.Case(f"c{i}", tmp_path, tmp_path)
                for i in range(num_cases))
  task = data.Task(root=tmp_path / folder, name=folder, modalities=("CT",),
                   label_names=("background", "organ"), cases=cases)
  split = data.default_split(task, seed=0)
  assert (len(split.train), len(split.val), len(split.test)) == counts


def test_split_save_and_load(tmp_path):
  split = data.make_split([f"c{i}" for i in range(10)], num_val=2,
                          num_test=3, seed=1)
  path = tmp_path / "run" / "split.json"
  split.save(path)
  assert data.Split.load(path) == split
  with pytest.raises(FileExistsError, match="split.json"):
    split.save(path)
  split.save(path, overwrite=True)
  path.write_text('{"train": ["a"], "val": []}')
  with pytest.raises(ValueError, match="split.json"):
    data.Split.load(path)
  path.write_text('{"train": ["a"], "val": ["a"], "test": [], "seed": 0}')
  with pytest.raises(ValueError, match="twice"):
    data.Split.load(path)
  with pytest.raises(FileNotFoundError):
    data.Split.load(tmp_path / "missing.json")


@pytest.mark.parametrize("num_val, num_test", [(5, 5), (-1, 2), (0, 10)])
def test_make_split_bad_counts(num_val, num_test):
  with pytest.raises(ValueError, match="num_val"):
    data.make_split([f"c{i}" for i in range(10)], num_val=num_val,
                    num_test=num_test, seed=0)
