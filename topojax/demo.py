"""`topojax demo`: the Projected Pooling Loss explained on a generated volume.

A ball label and a prediction that matches it except for one small spurious
blob: the Dice loss barely notices the blob, the PPL counts the pooled cells
it occupies in each plane at each kernel size.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from topojax import losses


def example_volumes(*, seed: int = 0, shape=(64, 64, 48), blob: bool = True):
  """A ball label and a soft prediction with one spurious blob.

  Returns:
    ``(pred, target)``, float32 ``(1, X, Y, Z, 1)``: the target is a ball of
    radius 14 voxels; the prediction is that ball with a soft edge (a
    sigmoid of the distance, 0.5 on the boundary) plus a ball of radius 3
    away from it (unless ``blob`` is False).
  """
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
  center = np.asarray(shape) / 2
  dist = np.linalg.norm(grid - center, axis=-1)
  target = (dist <= 14).astype(np.float32)
  blob_center = center + rng.choice([-1, 1], size=3) * np.array([22, 22, 14])
  blob = blob & (np.linalg.norm(grid - blob_center, axis=-1) <= 3)
  pred = np.maximum(1 / (1 + np.exp(2 * (dist - 14))), blob)
  return (pred[None, ..., None].astype(np.float32),
          target[None, ..., None])


def run(*, seed: int = 0, out: str | None = None) -> None:
  """Prints the loss, its breakdown by plane and kernel, and the Dice loss."""
  if out and os.path.exists(out):
    raise FileExistsError(f"--out {out} exists; choose another path")
  pred, target = example_volumes(seed=seed)
  kernel_sizes = losses.DEFAULT_KERNEL_SIZES
  print(f"prediction and label: {pred.shape[1:-1]} voxels, one channel; "
        "the prediction has one spurious blob of radius 3")
  total = losses.projected_pooling_loss(pred, target)
  pred_planes, target_planes = losses.project(pred), losses.project(target)
  print(f"\n{'kernel':>8}" + "".join(f"{name:>10}" for name in pred_planes))
  for k in kernel_sizes:
    row = []
    for name in pred_planes:
      p = jnp.sum(losses.max_pool_2d(pred_planes[name], k, k))
      t = jnp.sum(losses.max_pool_2d(target_planes[name], k, k))
      row.append(float(jnp.abs(p - t)))
    print(f"{k:>8}" + "".join(f"{v:>10.2f}" for v in row))
  print("\n|Σ pool(P) − Σ pool(G)| per plane, in pooled cells; the loss is "
        f"their mean: PPL = {float(total):.3f}")
  clean, _ = example_volumes(seed=seed, blob=False)
  ppl_clean = float(losses.projected_pooling_loss(clean, target))
  dice, dice_clean = _dice_loss(pred, target), _dice_loss(clean, target)
  print(f"the same prediction without the blob: PPL = {ppl_clean:.3f}")
  print(f"\nthe blob ({int((pred > 0.5).sum() - (clean > 0.5).sum())} voxels "
        f"next to {int(target.sum())} in the label) multiplies the PPL by "
        f"{float(total) / ppl_clean:.1f} and the Dice loss by "
        f"{dice / dice_clean:.2f} ({dice_clean:.4f} → {dice:.4f})")
  if out:
    _plot(pred_planes, target_planes, out)
    print(f"wrote {out}")


def _dice_loss(pred, target):
  logits = jax.scipy.special.logit(jnp.clip(pred, 1e-6, 1 - 1e-6))
  return float(jnp.mean(optax.losses.dice_loss(logits, target)))


def _plot(pred_planes, target_planes, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(9, 6), constrained_layout=True)
  for col, name in enumerate(pred_planes):
    for row, (label, planes) in enumerate(
        [("prediction", pred_planes), ("label", target_planes)]):
      axes[row, col].imshow(np.asarray(planes[name][0, ..., 0]).T,
                            origin="lower", cmap="gray", vmin=0, vmax=1)
      axes[row, col].set_title(f"{label}, {name}")
      axes[row, col].axis("off")
  fig.savefig(out, dpi=100)
  plt.close(fig)
