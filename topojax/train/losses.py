"""The losses training can use, in one table.

``LOSS_TABLE`` maps each name a phase may train with (``PhaseConfig.loss``,
``topojax train --phase2-loss``) to a ``TrainingLoss``: the topological loss
function and the settings it takes from the ``TrainConfig``, the target it
needs prepared once per case on the host, and what a user must know of it.
Training (``steps.make_loss``, ``steps.training_targets``), the config's
checks, the command line, ``experiments/compare_losses.py`` and
``benchmarks/loss.py`` read it; a new loss is one more row here.

A phase trains ``"dice"`` alone, or ``L_topo + λ·L_dice`` for every other
name (``losses.with_dice_loss``, λ = ``TrainConfig.dice_weight``).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

from topojax import losses


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingLoss:
  """One row of the table.

  Attributes:
    label: the loss's name in tables and figures.
    description: one line for a user choosing a loss.
    function: the topological loss of probabilities and labels
      (``function(probs, labels, **keywords)``, channels-last); ``None`` for
      the Dice loss alone.
    options: fixed keyword arguments of ``function``.
    settings: ``TrainConfig`` fields passed to ``function`` as keywords of
      the same name.
    prepare: per case, on the host, before training: ``prepare(labels)``
      of a ``(1, X, Y, Z, C)`` label gives an array of its shape, passed to
      ``function`` as ``skeleton``; ``None`` when the labels suffice.
    host_callback: each step runs host code (``jax.pure_callback``): the
      step waits for the host, and the host's cores bound its speed.
    reverse_only: differentiable with ``jax.grad`` / ``jax.vjp`` only, not
      with ``jax.jvp`` (a ``jax.custom_vjp`` inside).
  """
  label: str
  description: str
  function: Callable[..., Any] | None
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  settings: tuple[str, ...] = ()
  prepare: Callable[[Any], Any] | None = None
  host_callback: bool = False
  reverse_only: bool = False

  def topology(self, **settings) -> Callable[..., Any]:
    """``function`` with its options and the ``settings`` it takes bound
    (the others are ignored), e.g. ``topology(kernel_sizes=(4, 5))``."""
    return functools.partial(self.function, **self.options,
                             **{name: settings[name] for name in self.settings})


LOSS_TABLE = {
    "dice": TrainingLoss(
        label="Dice", function=None,
        description="the soft Dice loss alone (phase 1; the Dice "
        "fine-tuning baseline)"),
    "ppl": TrainingLoss(
        label="PPL", function=losses.projected_pooling_loss,
        settings=("kernel_sizes",), reverse_only=True,
        description="Projected Pooling Loss (Fu et al. 2023) at the "
        "published scale, in pooled cells"),
    "ppl_norm": TrainingLoss(
        label="PPL-norm", function=losses.projected_pooling_loss,
        options={"normalize": True}, settings=("kernel_sizes",),
        reverse_only=True,
        description="the Projected Pooling Loss per pooled cell"),
    "cldice": TrainingLoss(
        label="clDice", function=losses.cldice_loss, reverse_only=True,
        description="clDice (Shit et al. 2021): soft skeletons' topological "
        "precision and sensitivity"),
    "hutopo": TrainingLoss(
        label="PH (Hu)", function=losses.hutopo_loss, host_callback=True,
        description="persistent-homology loss of Hu et al. (2019): "
        "diagrams matched on the host"),
    "betti_matching": TrainingLoss(
        label="Betti matching", function=losses.betti_matching_loss,
        host_callback=True,
        description="Betti matching (Stucki et al. 2023): barcodes matched "
        "on the host"),
    "skeleton_recall": TrainingLoss(
        label="Skeleton Recall", function=losses.skeleton_recall_loss,
        prepare=losses.tubed_skeleton,
        description="Skeleton Recall (Kirchhoff et al. 2024): recall of tubes "
        "around the label's skeleton, made once per case"),
    "cbdice": TrainingLoss(
        label="cbDice", function=losses.cbdice_loss, host_callback=True,
        description="cbDice (Shi et al. 2024): clDice weighted by vessel "
        "radius, distance transforms on the host"),
}
# Fu et al.'s loss: TrainConfig's default phase 2.
PAPER_LOSS = "ppl"
# The name the PPL had before the family grew: "ppl", or "ppl_norm" with
# TrainConfig.normalize.
LEGACY_NAMES = {"topo_dice": ("ppl", "ppl_norm")}


def check_loss_name(name: str, argument: str) -> None:
  """Raises a ``ValueError`` naming ``argument`` unless ``name`` is in
  ``LOSS_TABLE`` or ``LEGACY_NAMES``."""
  if name not in LOSS_TABLE and name not in LEGACY_NAMES:
    raise ValueError(f"{argument} must be one of {tuple(LOSS_TABLE)}, got "
                     f"{name!r}")


def resolve_loss(name: str, *, normalize: bool = False) -> str:
  """The name in ``LOSS_TABLE`` that ``name`` trains with (a legacy name
  resolves to its first form, or its second with ``normalize``)."""
  check_loss_name(name, "loss")
  if name in LEGACY_NAMES:
    return LEGACY_NAMES[name][int(bool(normalize))]
  return name
