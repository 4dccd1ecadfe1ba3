"""Tests for topojax/losses/dice.py: the Dice term and L_topo + λ·L_dice."""

import functools

import jax
import numpy as np
import pytest

from topojax import losses

torch = pytest.importorskip("torch", reason="the references need PyTorch")
import loss_inputs  # noqa: E402  (tests/ is on sys.path under pytest)
import torch_reference  # noqa: E402


def _logits_and_target(channels, seed=0):
  return loss_inputs.logits_and_target((2, 12, 10, 11), channels, seed=seed)


@pytest.mark.parametrize("channels", [1, 3])
def test_dice_loss_is_the_soft_dice_of_probabilities(channels):
  logits, target, probs = _logits_and_target(channels)
  with jax.enable_x64(True):
    value = losses.dice_loss(logits, target)
  np.testing.assert_allclose(
      float(value), torch_reference.numpy_dice_loss(probs, target),
      rtol=1e-12)


TOPOLOGY_LOSSES = {
    "ppl": functools.partial(losses.projected_pooling_loss,
                             kernel_sizes=(2, 5)),
    "ppl_norm": functools.partial(losses.projected_pooling_loss,
                                  kernel_sizes=(2, 5), normalize=True),
    "cldice": losses.cldice_loss,
    "hutopo": losses.hutopo_loss,
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(TOPOLOGY_LOSSES))
def test_with_dice_loss_adds_weighted_dice(name, channels):
  logits, target, probs = _logits_and_target(channels, seed=len(name))
  topology_loss = TOPOLOGY_LOSSES[name]
  loss = losses.with_dice_loss(topology_loss, dice_weight=0.25)
  with jax.enable_x64(True):
    value, grad = jax.value_and_grad(loss)(logits, target)
    value, grad = float(value), np.asarray(grad)
    expected = float(topology_loss(probs, target)) + (
        0.25 * torch_reference.numpy_dice_loss(probs, target))
  np.testing.assert_allclose(value, expected, rtol=1e-10)
  assert np.isfinite(grad).all() and np.any(grad != 0)


def test_topo_dice_loss_is_with_dice_loss_of_ppl():
  logits, target, _ = _logits_and_target(1, seed=4)
  logits = logits.astype(np.float32)
  np.testing.assert_allclose(
      losses.topo_dice_loss(logits, target, kernel_sizes=(2, 5),
                            dice_weight=0.5),
      losses.with_dice_loss(TOPOLOGY_LOSSES["ppl"], dice_weight=0.5)(
          logits, target), rtol=1e-6)


def test_with_dice_loss_weight_at_call_time_traced_or_not():
  logits, target, probs = _logits_and_target(1, seed=7)
  logits = logits.astype(np.float32)
  loss = losses.with_dice_loss(losses.cldice_loss, dice_weight=0.25)
  # One compilation for every λ: the weight is an argument of the jit.
  traced = jax.jit(lambda w: loss(logits, target, dice_weight=w))
  for weight in (0.0, 0.25, 3.0):
    expected = float(losses.cldice_loss(probs.astype(np.float32), target)) + (
        weight * torch_reference.numpy_dice_loss(probs, target))
    np.testing.assert_allclose(traced(weight), expected, rtol=1e-5)
    np.testing.assert_allclose(loss(logits, target, dice_weight=weight),
                               expected, rtol=1e-5)
  assert traced._cache_size() == 1
  np.testing.assert_allclose(loss(logits, target),
                             loss(logits, target, dice_weight=0.25))
  with pytest.raises(ValueError, match="dice_weight must be >= 0"):
    loss(logits, target, dice_weight=-0.5)
  with pytest.raises(ValueError, match="dice_weight must be a number"):
    loss(logits, target, dice_weight="heavy")


def test_with_dice_loss_passes_keywords_to_the_topology_loss():
  logits, target, probs = _logits_and_target(1, seed=8)
  skeleton = np.asarray(losses.tubed_skeleton(target), np.float32)
  loss = losses.with_dice_loss(losses.skeleton_recall_loss, dice_weight=0.5)
  with jax.enable_x64(True):
    expected = float(losses.skeleton_recall_loss(
        probs, target, skeleton=skeleton)) + (
            0.5 * torch_reference.numpy_dice_loss(probs, target))
    np.testing.assert_allclose(loss(logits, target, skeleton=skeleton),
                               expected, rtol=1e-10)


def test_with_dice_loss_bad_arguments():
  with pytest.raises(ValueError, match="topology_loss must be a loss"):
    losses.with_dice_loss("cldice")
  with pytest.raises(ValueError, match="dice_weight must be >= 0"):
    losses.with_dice_loss(losses.cldice_loss, dice_weight=-1)
  loss = losses.with_dice_loss(losses.cldice_loss)
  with pytest.raises(ValueError, match="logits and target must have the same"):
    loss(np.zeros((1, 8, 8, 8, 1)), np.zeros((1, 8, 8, 7, 1)))
