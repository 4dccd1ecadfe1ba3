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
