"""Tests for topojax/train/runs.py: the log, used run folders and the process
flags (the last two through ``topojax train``)."""

import json
import re

import pytest

from topojax import cli
from topojax.train import runs

import train_fixtures  # tests/ is on sys.path under pytest

CONFIG = train_fixtures.CONFIG


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return train_fixtures.make_task(tmp_path_factory)


def test_truncate_log_keeps_the_epochs_up_to_the_checkpoint(tmp_path):
  path = tmp_path / "log.jsonl"
  assert runs.truncate_log(path, 0) == [] and path.read_text() == ""
  path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))
  assert runs.truncate_log(path, 2) == [{"epoch": 1}, {"epoch": 2}]
  assert runs.read_log(path) == [{"epoch": 1}, {"epoch": 2}]


def test_cli_refuses_a_used_run_dir(task, tmp_path, capsys, monkeypatch):
  # Keeps the command from pointing JAX at the user's cache folder.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))
  config_path = tmp_path / "config.json"
  config_path.write_text(json.dumps(CONFIG.to_json()))
  (tmp_path / "run" / "phase1").mkdir(parents=True)
  (tmp_path / "run" / "phase1" / "log.jsonl").write_text("")
  code = cli.main(["train", "--config", str(config_path), "--data", str(task),
                   "--out", str(tmp_path / "run")])
  assert code == 2
  assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id",
      "0"], "must be HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be at least 1"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id must be in \[0, 2\)"),
])
def test_cli_checks_the_process_flags_before_starting(tmp_path, capsys, flags,
                                                      message):
  code = cli.main(["train", "--config", str(tmp_path / "none.json"),
                   "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                   *flags])
  err = capsys.readouterr().err
  assert code == 2 and re.search(message, err), err
  assert not (tmp_path / "run").exists()
