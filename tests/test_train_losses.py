"""Tests for topojax/train/losses.py: the one table of training losses."""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topojax import cli
from topojax import train
from topojax.train import losses as loss_table
from topojax.train import steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = loss_table.LOSS_TABLE


def _labels(num_cases=2, channels=1, shape=(8, 8, 8)):
  """Bars a few voxels thick, so that skeletons and tubes are not empty."""
  labels = np.zeros((num_cases, *shape, channels), np.float32)
  labels[:, 2:6, 1:7, 3:6, -1] = 1
  if channels > 1:
    labels[..., 0] = 1 - labels[..., -1]
  return labels


@pytest.mark.parametrize("name", list(TABLE))
def test_every_entry_gives_the_train_step_a_gradient(name):
  # The loss and targets exactly as the train step reads them; every entry
  # trains whole phases on 1 and 4 devices in tests/test_train_loop.py.
  labels = _labels()
  targets = steps.training_targets(name, labels, rows=[0, 1])
  logits = np.random.default_rng(0).normal(size=labels.shape) * 2
  loss = steps.make_loss(name, dice_weight=1.0, kernel_sizes=(2, 4))
  value, grad = jax.jit(jax.value_and_grad(loss))(
      logits.astype(np.float32), targets)
  assert np.isfinite(float(value)) and float(value) > 0
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_names_agree_with_the_config_cli_and_comparison():
  assert train.LOSSES == tuple(TABLE)
  assert train.config.LOSSES == tuple(TABLE)
  train_parser = cli.build_parser()._subparsers._group_actions[0].choices[
      "train"]
  action, = [a for a in train_parser._actions
             if "--phase2-loss" in a.option_strings]
  assert list(action.choices) == [*TABLE, *loss_table.LEGACY_NAMES]
  assert "cbdice" in action.choices and "tversky" not in action.choices
  common = ["train", "--config", "c.json", "--data", "d", "--out", "o"]
  parsed = cli.build_parser().parse_args([*common, "--phase2-loss", "cbdice"])
  assert parsed.phase2_loss == "cbdice"
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args([*common, "--phase2-loss", "tversky"])
  from experiments import compare_losses
  from experiments import reproduce
  assert set(compare_losses.VARIANTS.values()) == set(TABLE)
  for name, entry in TABLE.items():
    if entry.function is not None:
      assert reproduce.LABELS[name] == entry.label


def test_legacy_names_resolve_and_unknown_names_are_refused():
  for old, (plain, normalized) in loss_table.LEGACY_NAMES.items():
    assert train.resolve_loss(old) == plain
    assert train.resolve_loss(old, normalize=True) == normalized
    assert {plain, normalized} <= set(TABLE)
  assert train.resolve_loss("cbdice", normalize=True) == "cbdice"
  with pytest.raises(ValueError, match="phase2_loss must be one of"):
    loss_table.check_loss_name("tversky", "phase2_loss")
  with pytest.raises(ValueError, match="loss must be one of"):
    train.PhaseConfig(loss="tversky", epochs=1, learning_rate=1.0)
  assert train.PhaseConfig(loss="cbdice", epochs=1, learning_rate=1.0)
  paper = train.TrainConfig(shape=(32, 32, 32))
  assert paper.phase2.loss == loss_table.PAPER_LOSS in TABLE


def _topology_and_target(entry, labels):
  topology = entry.topology(kernel_sizes=(2, 4))
  if entry.prepare is None:
    return topology
  prepared = entry.prepare(labels)
  assert prepared.shape == labels.shape
  return lambda probs, target: topology(probs, target, skeleton=prepared)


@pytest.mark.parametrize("name", [n for n in TABLE if TABLE[n].function])
def test_what_a_user_must_know_is_true(name):
  entry = TABLE[name]
  assert entry.label and entry.description
  labels = _labels()
  probs = np.clip(labels * 0.8 + 0.1, 0, 1)
  loss = _topology_and_target(entry, labels)
  jaxpr = str(jax.make_jaxpr(lambda p: loss(p, labels))(probs))
  assert ("pure_callback" in jaxpr) == entry.host_callback
  grad = jax.grad(lambda p: loss(p, labels))(probs)
  assert np.isfinite(grad).all()
  forward = lambda: jax.jvp(lambda p: loss(p, labels), (probs,),  # noqa: E731
                            (jnp.ones_like(probs),))
  if entry.reverse_only:
    with pytest.raises(TypeError, match="custom_vjp"):
      forward()
  else:
    _, derivative = forward()
    np.testing.assert_allclose(derivative, grad.sum(), rtol=1e-4, atol=1e-6)


def test_training_targets_append_what_a_loss_prepares():
  labels = _labels(num_cases=3, channels=2)
  for name, entry in TABLE.items():
    targets = steps.training_targets(name, labels, rows=[0, 2])
    if entry.prepare is None:
      assert targets is labels
      continue
    assert targets.shape == (*labels.shape[:-1], 4)
    np.testing.assert_array_equal(targets[..., :2], labels)
    np.testing.assert_array_equal(targets[0, ..., 2:],
                                  entry.prepare(labels[:1])[0])
    assert not targets[1, ..., 2:].any()  # Not a training row.


def test_table_rows_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    TABLE["cbdice"].label = "other"


# Where a loss's name may be written outside the table and the losses'
# own modules, and why. "dice" is the Dice baseline and a metric, "cldice"
# a metric too: their names are not searched for.
ALLOWED = {
    # The paper's Table 2 reproduced: its settings are the PPL's.
    ("experiments/reproduce.py", 'VARIANTS = {"dice_ft": "dice", "ppl": '
     '"ppl", "ppl_norm": "ppl_norm"}'),
}
# The benchmarks of the paper's training step and of the losses beside
# their references and PyTorch peers compare named losses by design; the
# loss benchmark times every table entry (tests/test_benchmarks.py).
SKIPPED = {"benchmarks/train_step.py", "benchmarks/loss.py"}


def test_no_module_but_the_table_names_a_loss():
  names = [n for n in (*TABLE, *loss_table.LEGACY_NAMES)
           if n not in ("dice", "cldice")]
  pattern = re.compile(r"""["'](%s)["']""" % "|".join(names))
  found = []
  for folder in ("topojax", "experiments", "benchmarks"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      relative = path.relative_to(ROOT).as_posix()
      if (relative == "topojax/train/losses.py"
          or relative.startswith("topojax/losses/") or relative in SKIPPED):
        continue
      for line in path.read_text().splitlines():
        if pattern.search(line) and (relative, line.strip()) not in ALLOWED:
          found.append(f"{relative}: {line.strip()}")
  assert not found, "\n".join(found)
