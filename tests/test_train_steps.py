"""Tests for topojax/train/steps.py: the training loss by name, the step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from topojax import losses
from topojax import train


def test_make_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
  labels = (rng.random((2, 8, 8, 8, 1)) > 0.5).astype(np.float32)
  probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
  overlap = (probs * labels).sum(axis=(1, 2, 3, 4))
  total = probs.sum(axis=(1, 2, 3, 4)) + labels.sum(axis=(1, 2, 3, 4))
  # Soft Dice with smoothing 1 (optax's default), averaged over the batch.
  expected = np.mean(1 - (overlap + 1) / (total / 2 + 1))
  dice = train.make_loss("dice", dice_weight=2.0, kernel_sizes=(2, 4))
  np.testing.assert_allclose(dice(logits, labels), expected, rtol=1e-5)
  topo = train.make_loss("topo_dice", dice_weight=2.0, kernel_sizes=(2, 4))
  ppl = losses.projected_pooling_loss(probs.astype(np.float32), labels,
                                      kernel_sizes=(2, 4))
  np.testing.assert_allclose(topo(logits, labels), ppl + 2 * expected,
                             rtol=1e-5)
  # Every topological loss is L_topo(probabilities) + λ·Dice.
  for name, topology_loss in (
      ("ppl", functools.partial(losses.projected_pooling_loss,
                                kernel_sizes=(2, 4))),
      ("ppl_norm", functools.partial(losses.projected_pooling_loss,
                                     kernel_sizes=(2, 4), normalize=True)),
      ("cldice", losses.cldice_loss), ("hutopo", losses.hutopo_loss),
      ("cbdice", losses.cbdice_loss)):
    loss = train.make_loss(name, dice_weight=2.0, kernel_sizes=(2, 4))
    np.testing.assert_allclose(
        loss(logits, labels),
        topology_loss(probs.astype(np.float32), labels) + 2 * expected,
        rtol=1e-5)
  normalized = train.make_loss("topo_dice", dice_weight=2.0,
                               kernel_sizes=(2, 4), normalize=True)
  np.testing.assert_allclose(
      normalized(logits, labels),
      train.make_loss("ppl_norm", dice_weight=2.0, kernel_sizes=(2, 4))(
          logits, labels), rtol=1e-6)
  with pytest.raises(ValueError, match="loss must be one of"):
    train.make_loss("tversky", dice_weight=1.0, kernel_sizes=(2,))
  with pytest.raises(ValueError, match="dice_weight must be >= 0"):
    train.make_loss("ppl", dice_weight=-1.0, kernel_sizes=(2,))


def _test_network(*, seed: int):
  """The mesh, the test U-Net and its state, and a batch of 2 × 8³ cases."""
  config = train.TrainConfig(shape=(8, 8, 8), base_channels=4, depth=2,
                             norm="group", batch_size=2, kernel_sizes=(4,))
  mesh = train.data_mesh()
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
  labels = (rng.random((2, 8, 8, 8, 1)) > 0.5).astype(np.float32)
  model_def, state = train.init_state(config, in_channels=1, out_channels=1,
                                      mesh=mesh)
  return mesh, model_def, state, images, labels


def test_one_compiled_step_serves_every_learning_rate_and_weight():
  mesh, model_def, state, images, labels = _test_network(seed=2)
  logits = nnx.merge(model_def, state["model"])(images)
  step = train.make_train_step.__wrapped__(model_def, mesh, loss="ppl",
                                           kernel_sizes=(4,))
  for learning_rate, dice_weight in ((0.0, 1.0), (0.0, 3.0), (1e-2, 0.5)):
    # The state is donated: each step gets a copy.
    new, value = step(jax.tree.map(jnp.copy, state), images, labels,
                      learning_rate, dice_weight)
    expected = train.make_loss("ppl", dice_weight=dice_weight,
                               kernel_sizes=(4,))(logits, labels)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(new["model"]), jax.tree.leaves(state["model"]))]
    assert any(moved) == (learning_rate > 0)
  assert step._cache_size() == 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
@pytest.mark.parametrize("loss", ["dice", "ppl"])
def test_the_cpu_step_at_llvm_level_1_has_the_bits_of_xlas_default(loss):
  mesh, model_def, state, images, labels = _test_network(seed=3)
  step = train.make_train_step.__wrapped__(model_def, mesh, loss=loss,
                                           kernel_sizes=(4,))
  default = step.lower(state, images, labels, 1e-2, 1.0).compile(
      {"xla_backend_optimization_level": 3})
  ends = []
  for run in (step, default):
    new = jax.tree.map(jnp.copy, state)  # donated
    for _ in range(3):
      new, value = run(new, images, labels, 1e-2, 1.0)
    ends.append([np.asarray(leaf) for leaf in jax.tree.leaves(new)]
                + [np.asarray(value)])
  for ours, xlas in zip(*ends):
    np.testing.assert_array_equal(ours, xlas)


def test_a_prepared_target_reaches_the_loss_as_its_skeleton():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 12, 12, 12, 1)).astype(np.float32)
  labels = np.zeros(logits.shape, np.float32)
  labels[:, 3:9, 2:10, 4:8] = 1
  targets = train.steps.training_targets("skeleton_recall", labels, [0, 1])
  tubes = losses.tubed_skeleton(labels)
  np.testing.assert_array_equal(targets, np.concatenate([labels, tubes], -1))
  loss = train.make_loss("skeleton_recall", dice_weight=0.5,
                         kernel_sizes=(2,))
  probs = 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(
      loss(logits, targets),
      losses.skeleton_recall_loss(probs, labels, skeleton=tubes)
      + 0.5 * losses.dice_loss(logits, labels), rtol=1e-5)


def test_training_targets_of_cases_of_their_own_shapes():
  # Each case's tubes from its whole label; cases no step reads stay zero.
  labels = []
  for shape in [(12, 10, 8), (6, 14, 9), (9, 9, 9)]:
    label = np.zeros((*shape, 1), np.float32)
    label[2:-2, 3:-3, 1:-1] = 1
    labels.append(label)
  targets = train.steps.training_targets("skeleton_recall", labels, [2, 0])
  assert isinstance(targets, list) and len(targets) == 3
  for row in (0, 2):
    np.testing.assert_array_equal(targets[row], np.concatenate(
        [labels[row], losses.tubed_skeleton(labels[row][None])[0]], -1))
  np.testing.assert_array_equal(targets[1][..., :1], labels[1])
  assert not targets[1][..., 1:].any()
  assert train.steps.training_targets("ppl", labels, [0]) is labels
