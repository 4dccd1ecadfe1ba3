"""Inputs and checks shared by the loss tests (tests/ is on sys.path)."""

import numpy as np
import pytest


def logits_and_target(shape, channels, *, seed):
  """Random logits ``(*shape, channels)``, a label and the probabilities.

  One channel: a binary label with 30% foreground and sigmoid
  probabilities; several: a one-hot label and softmax probabilities.
  """
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(*shape, channels)) * 3
  if channels == 1:
    target = (rng.random(logits.shape) < 0.3).astype(np.float64)
    probs = 1 / (1 + np.exp(-logits))
  else:
    target = np.eye(channels)[rng.integers(0, channels, logits.shape[:-1])]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return logits, target, probs


# Arguments that the losses of the family refuse, each with its error's words:
# every loss (BAD_INPUTS), those with soft-skeleton iterations, and those that
# take a precomputed label skeleton.
BAD_INPUTS = {
    "rank 3": (dict(pred=(4, 16, 1)), "rank 3"),
    "shape mismatch": (dict(target=(1, 8, 8, 7, 1)), "same shape"),
    "integer pred": (dict(pred_dtype=np.int32), "pred must be a floating"),
    "empty batch": (dict(pred=(0, 8, 8, 8, 1)), "at least one sample"),
    "negative smooth": (dict(smooth=-1.0), "smooth"),
    "nan smooth": (dict(smooth=float("nan")), "smooth"),
    "start_channel too large": (dict(start_channel=1), "start_channel"),
}
BAD_ITERATIONS = {
    "negative iterations": (dict(iterations=-1), "iterations"),
    "fractional iterations": (dict(iterations=2.5), "iterations"),
}
BAD_SKELETONS = {
    "skeleton shape": (dict(skeleton=np.zeros((1, 8, 8, 8, 2))),
                       "pred and skeleton must have the same shape"),
    "skeleton of strings": (dict(skeleton=[["a"]]), "skeleton must hold"),
}


def assert_refused_before_tracing(loss, jitted, spec, message):
  """``loss`` raises a ``ValueError`` matching ``message`` and compiles nothing.

  ``spec``: keyword arguments of ``loss``, plus ``pred`` and ``target``
  shapes (default ``(1, 8, 8, 8, 1)``, the same) and ``pred_dtype``;
  ``jitted``: the jit-compiled function behind ``loss``, whose cache must not
  grow.
  """
  spec = dict(spec)
  pred = np.zeros(spec.pop("pred", (1, 8, 8, 8, 1)),
                  spec.pop("pred_dtype", np.float32))
  target = np.zeros(spec.pop("target", pred.shape), np.float32)
  compiled_before = jitted._cache_size()
  with pytest.raises(ValueError, match=message):
    loss(pred, target, **spec)
  assert jitted._cache_size() == compiled_before
