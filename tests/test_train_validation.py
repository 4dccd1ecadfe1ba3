"""Tests for topojax/train/validation.py: the validation Dice and PPL."""

import jax.numpy as jnp
import numpy as np

from topojax import train


def test_validate_averages_over_cases_and_leaves_padding_out():
  rng = np.random.default_rng(0)
  labels = (rng.random((5, 4, 4, 4, 1)) > 0.5).astype(np.float32)
  images = rng.random((5, 4, 4, 4, 1)).astype(np.float32) + 1

  def eval_step(model_state, images, labels):
    # A perfect model whose "PPL" is the mean intensity: padded (zero) cases
    # would pull the mean down if they were counted.
    return labels > 0.5, jnp.mean(images, axis=(1, 2, 3, 4))

  # Rows 0, 2, 4 in batches of 2: the last batch is padded with a zero case.
  scores = train.validate(eval_step, None, images, labels, [0, 2, 4],
                          batch_size=2, mesh=train.data_mesh())
  assert scores["val_dice"] == 1.0
  np.testing.assert_allclose(scores["val_topo"],
                             images[[0, 2, 4]].mean(), rtol=1e-6)
