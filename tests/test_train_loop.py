"""Tests for topojax/train/loop.py: a tiny two-phase run, resume, every loss,
data parallel on 4 devices and on 2 processes."""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from topojax import checkpoint
from topojax import train
from topojax.train import epoch as epoch_lib
from topojax.train import steps
from topojax.train import validation

import train_fixtures  # tests/ is on sys.path under pytest

ROOT = train_fixtures.ROOT
CONFIG = train_fixtures.CONFIG


class Crash(Exception):
  """Stands for the process dying."""


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return train_fixtures.make_task(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


# Runs `topojax train` on 4 devices: phase 1, then phase 2 with each loss, in
# one Python process so that JAX and the evaluation step load once.
_FOUR_DEVICE_SCRIPT = """
import sys
from topojax import cli
common, out, losses = sys.argv[1:-2], sys.argv[-2], sys.argv[-1].split(",")
status = cli.main(["train", *common, "--out", out + "/run", "--phase", "1"])
for loss in losses:
  status = status or cli.main([
      "train", *common, "--out", out + "/" + loss, "--phase", "2",
      "--phase2-loss", loss, "--init", out + "/run/phase1"])
sys.exit(status)
"""


class Processes:
  """Subprocesses whose output goes to files (a pipe could fill and block)."""

  def __init__(self, commands, *, out, env):
    self.logs = [out / f"process{i}.log" for i in range(len(commands))]
    self.processes = []
    for command, log in zip(commands, self.logs):
      with log.open("w") as f:
        self.processes.append(subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT))

  def wait(self, timeout=600):
    deadline = time.monotonic() + timeout
    for process in self.processes:
      process.wait(timeout=max(deadline - time.monotonic(), 1))
    for process, log in zip(self.processes, self.logs):
      assert process.returncode == 0, log.read_text()[-3000:]

  def kill(self):
    for process in self.processes:
      if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    for process in self.processes:
      process.wait()

  def output(self, i):
    return self.logs[i].read_text()


def _cpu_env(**variables):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return {**env, "JAX_PLATFORMS": "cpu", **variables}


def _train_args(config_path, task, cache):
  return ["--config", str(config_path), "--data", str(task), "--cache-dir",
          str(cache)]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "config.json"
  path.write_text(json.dumps(CONFIG.to_json()))
  return path


@pytest.fixture(scope="module")
def four_devices(task, cache, config_path, tmp_path_factory):
  """``topojax train`` on 4 CPU devices, in a subprocess: phase 1, then phase
  2 with every loss from it, in ``out/run`` and ``out/<loss>``.

  Started before the in-process run so that they compile at the same time.
  """
  out = tmp_path_factory.mktemp("four_devices")
  processes = Processes(
      [[sys.executable, "-c", _FOUR_DEVICE_SCRIPT,
        *_train_args(config_path, task, cache), str(out),
        ",".join(train.LOSSES)]], out=out,
      env=_cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COMPILATION_CACHE_DIR=str(out / "xla")))
  yield out, processes
  processes.kill()


def _two_processes(out, config_path, task, cache, xla, *flags):
  """``topojax train`` as 2 processes of 1 CPU device each, on 127.0.0.1."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out.mkdir(parents=True, exist_ok=True)
  return Processes(
      [[sys.executable, "-m", "topojax.cli", "train",
        *_train_args(config_path, task, cache), "--out", str(out / "run"),
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
        "--process-id", str(i), *flags] for i in range(2)],
      out=out, env=_cpu_env(JAX_COMPILATION_CACHE_DIR=str(xla)))


@pytest.fixture(scope="module")
def two_processes(task, cache, config_path, tmp_path_factory):
  """Both phases trained by 2 processes, killed after phase 1's first epoch
  and resumed; and, for reference, by one process on 2 devices, the same
  split of the batch. Started with the in-process run."""
  root = tmp_path_factory.mktemp("two_processes")
  processes = _two_processes(root, config_path, task, cache, root / "xla")
  two_devices = root / "two_devices"
  two_devices.mkdir()
  reference = Processes(
      [[sys.executable, "-m", "topojax.cli", "train",
        *_train_args(config_path, task, cache), "--out",
        str(two_devices / "run")]], out=two_devices,
      env=_cpu_env(XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COMPILATION_CACHE_DIR=str(two_devices / "xla")))
  first = root / "run" / "phase1" / "checkpoints" / "1"

  def kill_after_the_first_epoch():
    deadline = time.monotonic() + 600
    while (not first.is_dir() and time.monotonic() < deadline
           and all(p.poll() is None for p in processes.processes)):
      time.sleep(0.01)
    processes.kill()  # Both, at once, with epochs 2 and 3 of phase 1 to go.

  killer = threading.Thread(target=kill_after_the_first_epoch, daemon=True)
  killer.start()
  yield root, processes, first, killer, reference
  processes.kill()
  reference.kill()


@pytest.fixture(scope="module")
def run(task, cache, four_devices, two_processes, tmp_path_factory):
  """Both phases, uninterrupted; restores recorded."""
  out = tmp_path_factory.mktemp("runs") / "run"
  # Other test modules may have compiled the same network's steps in this
  # process; start from fresh step functions so compilations can be counted.
  train.make_train_step.cache_clear()
  train.make_eval_step.cache_clear()
  with mock.patch.object(checkpoint, "restore",
                         wraps=checkpoint.restore) as restore:
    results = train.train(CONFIG, task, out, cache_dir=cache, progress=False)
  return out, results, restore.call_args_list


def _log(phase_dir):
  return [json.loads(line)
          for line in (phase_dir / "log.jsonl").read_text().splitlines()]


def _saved(phase_dir, epoch, item="model"):
  """A checkpoint item as NumPy arrays, read without a template."""
  path = (phase_dir / "checkpoints" / str(epoch) / item).absolute()
  checkpointer = ocp.PyTreeCheckpointer()
  # As host arrays: the checkpoint may come from another device count.
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, restore_args=as_numpy)


def _epochs(phase_dir):
  return sorted(int(p.name) for p in (phase_dir / "checkpoints").iterdir()
                if p.name.isdigit())


def test_two_phase_run_writes_its_files(run):
  out, results, _ = run
  for phase, epochs in ((1, 3), (2, 2)):
    phase_dir = out / f"phase{phase}"
    for name in ("config.json", "split.json", "summary.json"):
      assert (phase_dir / name).is_file()
    assert (phase_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = _log(phase_dir)
    assert [line["epoch"] for line in log] == list(range(1, epochs + 1))
    for line in log:
      assert line["phase"] == phase
      assert np.isfinite(line["train_loss"])
      assert 0 <= line["val_dice"] <= 1 and line["val_topo"] >= 0
      assert line["time_s"] > 0 and line["cases_per_s"] > 0
    lr = (CONFIG.phase1 if phase == 1 else CONFIG.phase2).learning_rate
    assert {line["lr"] for line in log} == {lr}
    result = results[phase]
    assert result.epochs_run == epochs and not result.stopped_early
    assert json.loads((phase_dir / "summary.json").read_text()) == {
        **result.__dict__}


def test_keeps_the_two_latest_and_the_best_checkpoint(run):
  out, results, _ = run
  for phase in (1, 2):
    log = _log(out / f"phase{phase}")
    dice = [line["val_dice"] for line in log]
    # Orbax ranks ties by recency: the best is the last epoch with the max.
    best = max(e for e, d in enumerate(dice, 1) if d == max(dice))
    assert results[phase].best_epoch == best
    assert results[phase].best_val_dice == max(dice)
    assert _epochs(out / f"phase{phase}") == sorted(
        {best, len(log) - 1, len(log)})


def test_steps_compile_once(run):
  _, results, _ = run
  assert results[1].train_step_compilations == 1
  assert results[1].eval_step_compilations == 1
  assert results[2].train_step_compilations == 1  # another loss
  # Phase 2 evaluates the same network on the same shapes.
  assert results[2].eval_step_compilations == 0


def test_phase2_starts_from_the_best_phase1_checkpoint(run):
  out, results, restores = run
  (call,) = restores  # Nothing else was restored in a fresh run.
  manager, epoch = call.args
  assert pathlib.Path(manager.directory) == out / "phase1" / "checkpoints"
  assert epoch == results[1].best_epoch
  assert "optimizer" not in call.kwargs  # Adam starts afresh.


def test_phases_share_a_split_that_keeps_test_cases_out(run, task, cache):
  out, _, _ = run
  split = json.loads((out / "phase1" / "split.json").read_text())
  assert json.loads((out / "phase2" / "split.json").read_text()) == split
  assert (len(split["train"]), len(split["val"]), len(split["test"])) == (
      8, 2, 2)
  assert not set(split["test"]) & set(split["train"] + split["val"])


def test_resume_after_a_crash_matches_the_uninterrupted_run(
    run, task, cache, tmp_path):
  out, _, _ = run
  real_save = checkpoint.save

  def save_then_die(manager, epoch, **kwargs):
    real_save(manager, epoch, **kwargs)
    if epoch == 2:
      raise Crash

  with mock.patch.object(checkpoint, "save", save_then_die):
    with pytest.raises(Crash):
      train.train(CONFIG, task, tmp_path, phases=(1,), cache_dir=cache,
                  progress=False)
  phase_dir = tmp_path / "phase1"
  assert _epochs(phase_dir) == [2] or _epochs(phase_dir) == [1, 2]
  # A write of epoch 3 cut short: orbax's temporary folder, half filled.
  stray = phase_dir / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
  (stray / "model").mkdir(parents=True)
  (stray / "model" / "_METADATA").write_text("{trunc")

  with pytest.raises(FileExistsError, match="--resume"):
    train.train(CONFIG, task, tmp_path, phases=(1,), cache_dir=cache,
                progress=False)
  result = train.train(CONFIG, task, tmp_path, phases=(1,), resume=True,
                       cache_dir=cache, progress=False)[1]

  assert not stray.exists()
  assert result.epochs_run == 3
  for item in ("model", "optimizer"):
    resumed = jax.tree.leaves(_saved(phase_dir, 3, item))
    uninterrupted = jax.tree.leaves(_saved(out / "phase1", 3, item))
    assert len(resumed) == len(uninterrupted) > 0
    for a, b in zip(resumed, uninterrupted):
      np.testing.assert_array_equal(a, b)
  timing = ("time_s", "cases_per_s")
  strip = lambda log: [{k: v for k, v in l.items() if k not in timing}
                       for l in log]
  assert strip(_log(phase_dir)) == strip(_log(out / "phase1"))


def test_patience_stops_early_also_after_a_crash(run, task, cache, tmp_path):
  patient = dataclasses.replace(CONFIG, phase1=dataclasses.replace(
      CONFIG.phase1, patience=1))
  falling = iter([0.5, 0.4, 0.3])
  with mock.patch.object(validation, "validate", side_effect=lambda *a, **k: {
      "val_dice": next(falling), "val_topo": 1.0}):
    result = train.train(patient, task, tmp_path, phases=(1,),
                         cache_dir=cache, progress=False)[1]
  # Epoch 2 is one epoch without improvement: patience 1 is out.
  assert (result.epochs_run, result.best_epoch, result.stopped_early) == (
      2, 1, True)
  assert _epochs(tmp_path / "phase1") == [1, 2]
  # Died before writing the summary: resuming must not train epoch 3.
  (tmp_path / "phase1" / "summary.json").unlink()
  with mock.patch.object(validation, "validate", side_effect=AssertionError):
    resumed = train.train(patient, task, tmp_path, phases=(1,), resume=True,
                          cache_dir=cache, progress=False)[1]
  assert resumed.epochs_run == 2 and resumed.stopped_early


def test_resume_refuses_another_configuration(run, task, cache):
  out, _, _ = run
  other = dataclasses.replace(CONFIG, phase1=train.PhaseConfig(
      loss="dice", epochs=3, learning_rate=1e-3))
  with pytest.raises(ValueError, match="another configuration"):
    train.train(other, task, out, phases=(1,), resume=True, cache_dir=cache,
                progress=False)


def test_overwrite_starts_again_and_keeps_other_files(run, task, cache,
                                                      tmp_path):
  out, _, _ = run
  mine = tmp_path / "notes.txt"
  mine.write_text("keep me")
  (tmp_path / "phase1").mkdir()
  (tmp_path / "phase1" / "log.jsonl").write_text('{"epoch": 7}\n')
  train.train(CONFIG, task, tmp_path, phases=(1,), overwrite=True,
              cache_dir=cache, progress=False)
  assert mine.read_text() == "keep me"
  assert _log(tmp_path / "phase1") == [
      {**line, "time_s": mock.ANY, "cases_per_s": mock.ANY}
      for line in _log(out / "phase1")]
  # Phase 2 goes next to it, from it, without --resume or --overwrite.
  result = train.train(CONFIG, task, tmp_path, phases=(2,), cache_dir=cache,
                       progress=False)[2]
  assert result.best_val_dice == run[1][2].best_val_dice


def test_phase2_loss_override_gives_the_dice_baseline(run, task, cache,
                                                      tmp_path):
  out, _, _ = run

  class Stop(Exception):
    pass

  with mock.patch.object(steps, "make_train_step",
                         wraps=steps.make_train_step) as make_step, \
      mock.patch.object(epoch_lib, "train_epoch",
                        side_effect=Stop) as train_epoch:
    with pytest.raises(Stop):
      train.train(CONFIG, task, tmp_path, phases=(2,), init=out / "phase1",
                  phase2_loss="dice", cache_dir=cache, progress=False)
  assert make_step.call_args.kwargs["loss"] == "dice"
  assert train_epoch.call_args.kwargs["learning_rate"] == (
      CONFIG.phase2.learning_rate)
  spec = json.loads((tmp_path / "phase2" / "config.json").read_text())
  assert (spec["phase"], spec["loss"]) == (2, "dice")
  assert spec["init"] == str(out / "phase1")


def test_phase2_init_must_be_a_matching_finished_phase1(run, task, cache,
                                                        tmp_path):
  out, _, _ = run
  with pytest.raises(FileNotFoundError, match="has not finished"):
    train.train(CONFIG, task, tmp_path / "a", phases=(2,), init=tmp_path,
                cache_dir=cache, progress=False)
  deeper = dataclasses.replace(CONFIG, base_channels=8)
  with pytest.raises(ValueError, match="base_channels: 4 there, 8 here"):
    train.train(deeper, task, tmp_path / "b", phases=(2,),
                init=out / "phase1", cache_dir=cache, progress=False)


def test_batch_size_must_divide_the_device_count(task, cache, tmp_path):
  with mock.patch.object(jax, "device_count", return_value=3):
    with pytest.raises(ValueError, match="multiple of the 3 devices"):
      train.train(CONFIG, task, tmp_path, cache_dir=cache, progress=False)


def _assert_logs_close(a, b, rtol):
  assert len(a) == len(b) > 0
  for line_a, line_b in zip(a, b):
    for key in ("train_loss", "val_dice", "val_topo"):
      np.testing.assert_allclose(line_a[key], line_b[key], rtol=rtol)


def _assert_checkpoints_close(a, b, *, rtol, atol):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def fine_tuned(run, task, cache, tmp_path_factory):
  """Phase 2 from the run's phase 1 with every loss, uninterrupted."""
  out, _, _ = run
  root = tmp_path_factory.mktemp("fine_tuned")
  results = {}
  for loss in train.LOSSES:
    results[loss] = train.train(CONFIG, task, root / loss, phases=(2,),
                                init=out / "phase1", phase2_loss=loss,
                                cache_dir=cache, progress=False)[2]
  return results


@pytest.mark.parametrize("loss", train.LOSSES)
def test_every_loss_fine_tunes_and_resumes(fine_tuned, run, task, cache,
                                           tmp_path, loss):
  out, _, _ = run
  uninterrupted = pathlib.Path(fine_tuned[loss].run_dir)
  assert fine_tuned[loss].epochs_run == CONFIG.phase2.epochs
  assert np.isfinite([l["train_loss"] for l in _log(uninterrupted)]).all()
  real_save = checkpoint.save

  def save_then_die(manager, epoch, **kwargs):
    real_save(manager, epoch, **kwargs)
    raise Crash

  kwargs = dict(phases=(2,), init=out / "phase1", phase2_loss=loss,
                cache_dir=cache, progress=False)
  with mock.patch.object(checkpoint, "save", save_then_die):
    with pytest.raises(Crash):
      train.train(CONFIG, task, tmp_path, **kwargs)
  assert _epochs(tmp_path / "phase2") == [1]
  result = train.train(CONFIG, task, tmp_path, resume=True, **kwargs)[2]
  assert result.train_step_compilations == 0  # The first try compiled it.
  epoch = fine_tuned[loss].best_epoch
  for item in ("model", "optimizer"):
    for a, b in zip(jax.tree.leaves(_saved(tmp_path / "phase2", epoch, item)),
                    jax.tree.leaves(_saved(uninterrupted, epoch, item))):
      np.testing.assert_array_equal(a, b)


def test_data_parallel_on_4_devices_matches_one_device(run, four_devices,
                                                       fine_tuned):
  out, _, _ = run
  root, processes = four_devices
  processes.wait()
  assert "batch 4 over 4 device(s)" in processes.output(0)
  # Same maths, sums in another order: float32 rounding only.
  _assert_checkpoints_close(_saved(root / "run" / "phase1", 3),
                            _saved(out / "phase1", 3), rtol=1e-3, atol=1e-4)
  _assert_logs_close(_log(root / "run" / "phase1"), _log(out / "phase1"),
                     rtol=1e-4)
  # Every loss on 4 devices, each device its own cases (a host-side loss
  # included), against the same loss on one device.
  for loss, result in fine_tuned.items():
    _assert_logs_close(_log(root / loss / "phase2"),
                       _log(pathlib.Path(result.run_dir)), rtol=1e-3)


def test_two_processes_killed_mid_phase_resume_to_one_process_results(
    task, cache, config_path, two_processes):
  root, processes, first, killer, reference = two_processes
  killer.join()
  assert first.is_dir(), processes.output(0)[-3000:]
  assert not (root / "run" / "phase1" / "summary.json").exists()
  resumed = _two_processes(root, config_path, task, cache, root / "xla",
                           "--resume")
  resumed.wait()
  reference.wait()
  # Only process 0 reports.
  assert "resuming after epoch" in resumed.output(0)
  assert "batch 4 over 2 device(s)" in resumed.output(0)
  assert "phase 2: best epoch" in resumed.output(0)
  assert "phase 1 epoch" not in resumed.output(1)
  assert "best epoch" not in resumed.output(1)
  for phase in (1, 2):
    phase_dir = root / "run" / f"phase{phase}"
    one_process = root / "two_devices" / "run" / f"phase{phase}"
    # Against one process whose 2 devices split the batch the same way: the
    # same bits. (Against one device, the halves' gradients are summed in
    # another order, and a ReLU input within float32 rounding of zero can
    # turn that 1e-8 into 1e-3: benchmarks/RESULTS.md.)
    timing = ("time_s", "cases_per_s")
    strip = lambda log: [{k: v for k, v in l.items() if k not in timing}
                         for l in log]
    assert strip(_log(phase_dir)) == strip(_log(one_process))
    best = json.loads((phase_dir / "summary.json").read_text())["best_epoch"]
    assert best == json.loads(
        (one_process / "summary.json").read_text())["best_epoch"]
    for item in ("model", "optimizer"):
      for a, b in zip(jax.tree.leaves(_saved(phase_dir, best, item)),
                      jax.tree.leaves(_saved(one_process, best, item))):
        np.testing.assert_array_equal(a, b)
    # The state is replicated and saved from the host: process 0 writes it
    # once for both (checkpoint._save_args).
    item = phase_dir / "checkpoints" / str(best) / "model"
    assert {p.name for p in item.glob("ocdbt.process_*")} == {
        "ocdbt.process_0"}
