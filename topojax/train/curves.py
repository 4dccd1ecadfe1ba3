"""Training curves: a phase's log drawn as a PNG (``curves.png``)."""

from __future__ import annotations

from collections.abc import Sequence
import os
import pathlib
from typing import Any


def plot_curves(log: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                best_epoch: int | None = None, title: str = ""
                ) -> pathlib.Path:
  """Draws train loss, validation Dice and validation PPL per epoch as a PNG.

  Args:
    log: the lines of ``log.jsonl``.
    path: the PNG, replaced if it exists (it is the run's own file).
    best_epoch: marked with a dashed line.
    title: above the three panels.

  Returns:
    ``path``, as a ``pathlib.Path``.
  """
  # Imported here: only the end of a phase draws, and matplotlib is slow to
  # import. A Figure without pyplot: no global backend to set, Agg renders
  # the PNG.
  from matplotlib.figure import Figure

  epochs = [line["epoch"] for line in log]
  panels = (("train_loss", "train loss"), ("val_dice", "validation Dice"),
            ("val_topo", "validation PPL (pooled cells)"))
  figure = Figure(figsize=(12, 3.4))
  axes = figure.subplots(1, 3)
  for ax, (key, name) in zip(axes, panels):
    ax.plot(epochs, [line[key] for line in log], marker=".")
    if best_epoch is not None:
      ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1,
                 label=f"best epoch {best_epoch}")
      ax.legend(fontsize=8)
    ax.set_title(name)
    ax.set_xlabel("epoch")
  figure.suptitle(title)
  # Fixed margins, where tight_layout's extra drawing took 0.26 against
  # 0.15 s a figure (one per phase trained).
  figure.subplots_adjust(left=0.05, right=0.99, bottom=0.15, top=0.82,
                         wspace=0.22)
  path = pathlib.Path(path)
  figure.savefig(path, dpi=100)
  return path
