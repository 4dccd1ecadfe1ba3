"""Faults give one line and lose nothing: damaged checkpoints, a damaged
cache, preemption (SIGTERM, SIGINT) with one and two processes, a full disk,
and the one-line errors of every ``topojax`` command.

Every run is phase 1 of the tiny configuration of the training tests, and
every interrupted run, resumed, must end bit for bit where the uninterrupted
one ends.
"""

import errno
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from topojax import checkpoint
from topojax import cli
from topojax import predict
from topojax import train
from topojax.train import preemption
from topojax.train import steps

import train_fixtures  # tests/ is on sys.path under pytest

ROOT = train_fixtures.ROOT
CONFIG = train_fixtures.CONFIG
EPOCHS = CONFIG.phase1.epochs
BATCHES = 2  # per epoch: 8 training cases, batch 4

# `topojax train` whose train step sends SIGTERM to process 0 after its
# STEP-th step: argv is STEP, then the command's arguments.
_SIGNAL_SCRIPT = """
import contextlib, signal, sys
sys.path.insert(0, "tests")
from test_faults import _signal_after
from topojax import cli
after, argv = int(sys.argv[1]), sys.argv[2:]
first = ("--process-id" not in argv
         or argv[argv.index("--process-id") + 1] == "0")
with (_signal_after(after, signal.SIGTERM) if after and first
      else contextlib.nullcontext()):
  sys.exit(cli.main(argv))
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return train_fixtures.make_task(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "config.json"
  path.write_text(json.dumps(CONFIG.to_json()))
  return path


def _train_argv(config_path, task, cache, out, *flags):
  return ["train", "--config", str(config_path), "--data", str(task),
          "--cache-dir", str(cache), "--out", str(out), "--phase", "1",
          *flags]


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


class TwoProcesses:
  """``topojax train`` as 2 processes of 1 CPU device each, on 127.0.0.1."""

  def __init__(self, argv, *, out, stop_after=0):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    self.logs = [out / f"process{i}.log" for i in range(2)]
    self.processes = []
    for i, log in enumerate(self.logs):
      command = [*argv, "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(i)]
      with log.open("w") as f:
        self.processes.append(subprocess.Popen(
            [sys.executable, "-c", _SIGNAL_SCRIPT, str(stop_after), *command],
            env={**_env(),
                 "JAX_COMPILATION_CACHE_DIR": str(out.parent / "xla")},
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT))

  def wait(self, timeout=300):
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(deadline - time.monotonic(), 1))
            for p in self.processes]

  def output(self, i):
    return self.logs[i].read_text()

  def kill(self):
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def two_process_runs(task, cache, config_path, tmp_path_factory):
  """Two 2-process runs started at once: uninterrupted, and stopped by a
  SIGTERM to process 0 alone after step 3 (epoch 2, batch 1)."""
  root = tmp_path_factory.mktemp("two_processes")
  runs = {name: TwoProcesses(_train_argv(config_path, task, cache,
                                         root / name / "run"),
                             out=root / name, stop_after=after)
          for name, after in (("whole", 0), ("stopped", 3))}
  yield root, runs
  for run in runs.values():
    run.kill()


@pytest.fixture(scope="module")
def reference(task, cache, two_process_runs, tmp_path_factory):
  """Phase 1, uninterrupted, in this process."""
  out = tmp_path_factory.mktemp("reference") / "run"
  train.train(CONFIG, task, out, phases=(1,), cache_dir=cache,
              progress=False)
  return out / "phase1"


def _saved(phase_dir, epoch, item):
  """A checkpoint item as NumPy arrays, read without a template."""
  path = (phase_dir / "checkpoints" / str(epoch) / item).absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, restore_args=as_numpy)


def _strip_timing(phase_dir):
  lines = [json.loads(line) for line in
           (phase_dir / "log.jsonl").read_text().splitlines()]
  return [{k: v for k, v in line.items() if k not in ("time_s",
                                                       "cases_per_s")}
          for line in lines]


def _assert_identical(phase_dir, reference):
  """The run in ``phase_dir`` ended bit for bit as ``reference``."""
  assert _strip_timing(phase_dir) == _strip_timing(reference)
  for item in ("model", "optimizer"):
    ours = jax.tree.leaves(_saved(phase_dir, EPOCHS, item))
    theirs = jax.tree.leaves(_saved(reference, EPOCHS, item))
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
      np.testing.assert_array_equal(a, b)
  summary = json.loads((phase_dir / "summary.json").read_text())
  expected = json.loads((reference / "summary.json").read_text())
  for key in ("best_epoch", "best_val_dice", "epochs_run"):
    assert summary[key] == expected[key]


def _damage(step_dir, how="truncate"):
  """Cuts short, or flips a byte of, the largest array file of a step."""
  path = max((step_dir / "model").rglob("d/*"), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  if how == "truncate":
    data = data[:len(data) // 2]
  else:
    data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _resumable_copy(reference, tmp_path):
  """A copy of the reference run, as if stopped after its last epoch."""
  run = tmp_path / "run"
  shutil.copytree(reference.parent, run)
  (run / "phase1" / "summary.json").unlink()
  return run


def _seen(text):
  """The lines a terminal shows of ``text``, progress bars left out."""
  lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
  return [line for line in lines if line.strip() and "%|" not in line]


def _one_line(text):
  lines = _seen(text)
  assert len(lines) == 1, text
  return lines[0]


# --------------------------------------------------------------------------
# 1. Checkpoints that are checked.


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_step_fails_in_one_line_naming_it(tmp_path, how):
  manager = checkpoint.open_manager(tmp_path)
  weights = np.random.default_rng(0).normal(size=4096).astype(np.float32)
  for epoch in (1, 2):
    checkpoint.save(manager, epoch, model={"w": weights + epoch},
                    optimizer={"count": np.int32(epoch)},
                    meta={"val_dice": 0.5})
  manager.close()
  _damage(tmp_path / "2", how)
  with checkpoint.open_manager(tmp_path, read_only=True) as reader:
    # A flipped bit reads without complaint from orbax: only the checksum
    # sees it.
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"checkpoint {tmp_path}/2 (cannot be read|is "
                       "damaged)") as raised:
      checkpoint.restore(reader, 2, model={"w": weights})
    assert "\n" not in str(raised.value)
    np.testing.assert_array_equal(checkpoint.restore(
        reader, 1, model={"w": weights})["model"]["w"], weights + 1)


def test_keeps_the_two_latest_steps_and_the_best(tmp_path):
  manager = checkpoint.open_manager(tmp_path)
  for epoch, dice in enumerate([0.9, 0.1, 0.2, 0.3], 1):
    checkpoint.save(manager, epoch, model={"w": np.zeros(2, np.float32)},
                    optimizer={"c": np.int32(0)}, meta={"val_dice": dice})
  assert manager.all_steps() == [1, 3, 4]
  manager.close()


def test_resume_falls_back_to_the_newest_step_that_reads(
    reference, task, cache, config_path, tmp_path, capsys):
  run = _resumable_copy(reference, tmp_path)
  assert checkpoint.KEEP_LATEST == 2
  steps_kept = sorted(int(p.name) for p in
                      (run / "phase1" / "checkpoints").iterdir())
  assert EPOCHS - 1 in steps_kept and EPOCHS in steps_kept
  _damage(run / "phase1" / "checkpoints" / str(EPOCHS), "flip")
  status = cli.main(_train_argv(config_path, task, cache, run, "--resume"))
  assert status == 0
  err = capsys.readouterr().err
  warning = _one_line(err)
  assert warning.startswith(
      f"topojax: warning: checkpoint {run}/phase1/checkpoints/{EPOCHS} is "
      "damaged")
  assert "skipped" in warning
  # The last epoch was trained again, as it was the first time.
  _assert_identical(run / "phase1", reference)


def test_resume_with_no_readable_step_says_so(reference, task, cache,
                                              config_path, tmp_path, capsys):
  run = _resumable_copy(reference, tmp_path)
  for step in (run / "phase1" / "checkpoints").iterdir():
    _damage(step)
  status = cli.main(_train_argv(config_path, task, cache, run, "--resume"))
  assert status != 0
  lines = _seen(capsys.readouterr().err)
  assert lines[-1].startswith("topojax train: error: no checkpoint in ")
  assert "--overwrite" in lines[-1]
  # One warning per step skipped, and the error.
  assert len(lines) == len(list((run / "phase1" / "checkpoints").iterdir())) + 1


def test_predict_and_segmenter_fail_in_one_line_on_a_damaged_best(
    reference, task, cache, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(reference.parent, run)
  best = json.loads((run / "phase1" / "summary.json").read_text())[
      "best_epoch"]
  step_dir = run / "phase1" / "checkpoints" / str(best)
  _damage(step_dir)
  with pytest.raises(checkpoint.CheckpointError, match=str(step_dir)):
    predict.Segmenter.from_run(run)
  # What a user sees: one line on stderr, no orbax or TensorStore output.
  result = subprocess.run(
      [sys.executable, "-m", "topojax.cli", "predict", "--run", str(run),
       "--data", str(task), "--cache-dir", str(cache), "--out",
       str(tmp_path / "pred")], env=_env(), cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert result.returncode != 0
  line = _one_line(result.stderr)
  assert line.startswith(f"topojax predict: error: checkpoint {step_dir} "
                         "cannot be read: ")


# --------------------------------------------------------------------------
# 2. A cache that heals, seen from the command line.


def test_train_rebuilds_a_truncated_cache_entry(reference, task, cache,
                                                config_path, tmp_path,
                                                capsys):
  own_cache = tmp_path / "cache"
  shutil.copytree(cache, own_cache)
  (entry,) = [p for p in own_cache.iterdir() if p.name.startswith("Task00")]
  images = entry / "images.npy"
  size = images.stat().st_size
  os.truncate(images, size - 1000)
  status = cli.main(_train_argv(config_path, task, own_cache,
                                tmp_path / "run"))
  assert status == 0
  assert _one_line(capsys.readouterr().err) == (
      f"topojax: warning: cache entry {entry} is damaged (images.npy has "
      f"{size - 1000} bytes, {size} expected); rebuilding it")
  assert images.read_bytes() == (cache / entry.name / "images.npy"
                                 ).read_bytes()
  _assert_identical(tmp_path / "run" / "phase1", reference)


# --------------------------------------------------------------------------
# 3. Preemption.


def _signal_after(count, signum):
  """``steps.make_train_step`` whose step sends ``signum`` after ``count``."""
  real = steps.make_train_step

  def make(*args, **kwargs):
    step, done = real(*args, **kwargs), [0]

    def counted(*args):
      out = step(*args)
      done[0] += 1
      if done[0] == count:
        os.kill(os.getpid(), signum)
      return out

    counted._cache_size = step._cache_size
    return counted

  return mock.patch.object(steps, "make_train_step", make)


@pytest.mark.parametrize("signum, after, status, mid_epoch", [
    # Mid-epoch: epoch 2 after its first batch.
    (signal.SIGTERM, BATCHES + 1, 143, True),
    # After epoch 2's last batch, while it is validated and saved: epoch 3
    # does not begin.
    (signal.SIGINT, 2 * BATCHES, 130, False),
])
def test_a_signal_saves_and_resume_ends_bit_identical(
    reference, task, cache, config_path, tmp_path, capsys, signum, after,
    status, mid_epoch):
  run = tmp_path / "run"
  argv = _train_argv(config_path, task, cache, run, "--overwrite")
  handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  with _signal_after(after, signum):
    assert cli.main(argv) == status
  # Library use must leave the handlers as they were.
  assert [signal.getsignal(s)
          for s in (signal.SIGTERM, signal.SIGINT)] == handlers
  stopped, resume = _seen(capsys.readouterr().err)
  name = signal.Signals(signum).name
  if mid_epoch:
    assert stopped == (f"topojax train: stopped by {name} in phase 1, epoch "
                       f"2 after batch 1 of {BATCHES}; saved in "
                       f"{run}/phase1/interrupted")
  else:
    assert stopped == (f"topojax train: stopped by {name} in phase 1 before "
                       f"epoch 3; what it resumes from is saved in "
                       f"{run}/phase1")
    with checkpoint.open_manager(run / "phase1" / "checkpoints",
                                 read_only=True) as reader:
      assert reader.latest_step() == 2
  assert (run / "phase1" / "interrupted").is_dir() == mid_epoch
  command = shlex.split(resume.removeprefix("resume with: "))
  assert command[0] == "topojax" and command[-1] == "--resume"
  assert "--overwrite" not in command
  assert not (run / "phase1" / "summary.json").exists()

  assert cli.main(command[1:]) == 0
  assert "resuming after epoch" in capsys.readouterr().out
  assert not (run / "phase1" / "interrupted").exists()
  _assert_identical(run / "phase1", reference)


def test_the_first_signal_raises_a_flag_and_a_second_one_stops_at_once():
  # Python's own Ctrl-C handler before training, whatever pytest set.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with preemption.catch_signals() as stop:
      with preemption.catch_signals() as inner:  # Shared, set once.
        assert inner is stop
      assert stop.agreed() == 0
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.agreed() == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


def test_two_processes_stop_at_the_same_step_and_resume_bit_identical(
    two_process_runs, task, cache, config_path):
  root, runs = two_process_runs
  # Only process 0 got the signal; both stopped after the same step.
  assert runs["stopped"].wait() == [143, 143], runs["stopped"].output(1)
  assert runs["whole"].wait() == [0, 0], runs["whole"].output(0)[-3000:]
  stopped = root / "stopped" / "run" / "phase1"
  assert "stopped by SIGTERM in phase 1, epoch 2 after batch 1 of 2" in (
      runs["stopped"].output(0))
  assert "resume with: topojax train" in runs["stopped"].output(0)
  assert "stopped by" not in runs["stopped"].output(1)  # process 0 reports
  meta = json.loads((stopped / "interrupted" / "meta" / "metadata")
                    .read_text())
  assert (meta["epoch"], meta["batches"]) == (2, 1)

  resumed = TwoProcesses(
      _train_argv(config_path, task, cache, stopped.parent, "--resume"),
      out=root / "resumed")
  assert resumed.wait() == [0, 0], resumed.output(0)[-3000:]
  assert "resuming after epoch 1, batch 1" in resumed.output(0)
  _assert_identical(stopped, root / "whole" / "run" / "phase1")


# --------------------------------------------------------------------------
# 4. A full disk.


def test_a_full_disk_stops_in_one_line_and_resume_works_later(
    reference, task, cache, config_path, tmp_path, capsys):
  run = tmp_path / "run"
  real = ocp.StandardCheckpointHandler.async_save

  async def disk_full_at_epoch_2(self, directory, *args, **kwargs):
    if pathlib.Path(directory).parent.name.startswith("2.orbax-checkpoint"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await real(self, directory, *args, **kwargs)

  with mock.patch.object(ocp.StandardCheckpointHandler, "async_save",
                         disk_full_at_epoch_2):
    status = cli.main(_train_argv(config_path, task, cache, run))
  assert status == 1
  line = _one_line(capsys.readouterr().err)
  assert line.startswith(
      f"topojax train: error: [Errno {errno.ENOSPC}] checkpoint "
      f"{run}/phase1/checkpoints/2 could not be written")
  assert "--resume" in line
  # Epoch 1 is intact and verifies.
  with checkpoint.open_manager(run / "phase1" / "checkpoints",
                               read_only=True) as reader:
    assert reader.all_steps() == [1]
    model = _saved(run / "phase1", 1, "model")
    checkpoint.restore(reader, 1, model=model)

  assert cli.main(_train_argv(config_path, task, cache, run,
                              "--resume")) == 0
  _assert_identical(run / "phase1", reference)


# --------------------------------------------------------------------------
# 5. One line per expected error, the traceback with --debug.


@pytest.mark.parametrize("argv", [
    ["train", "--config", "missing.json", "--data", ".", "--out", "x"],
    ["predict", "--run", "nowhere", "--images", "a.nii.gz", "--out", "x"],
    ["evaluate", "--pred", "nowhere", "--labels", "nowhere"],
    ["prepare", "nowhere", "--shape", "8", "8", "8"],
    ["synth", "{out}", "--shape", "0", "8", "8"],
    ["demo", "--out", "{out}/exists.png"],
])
def test_every_command_prints_one_line_and_debug_the_traceback(
    argv, tmp_path, capsys, monkeypatch):
  argv = [arg.format(out=tmp_path) for arg in argv]
  (tmp_path / "exists.png").write_bytes(b"")
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("TOPOJAX_DEBUG", raising=False)
  assert cli.main(argv) != 0
  line = _one_line(capsys.readouterr().err)
  assert line.startswith(f"topojax {argv[0]}: error: ")
  with pytest.raises((ValueError, OSError)):
    cli.main(["--debug", *argv])
  with pytest.raises((ValueError, OSError)):
    cli.main([*argv, "--debug"])
  monkeypatch.setenv("TOPOJAX_DEBUG", "1")
  with pytest.raises((ValueError, OSError)):
    cli.main(argv)
