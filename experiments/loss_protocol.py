"""The loss comparison's protocol: what is fixed before the run, and its rules.

Pure: the settings, the split's sizes, and the two rules of the λ search of
``experiments.compare_losses`` (its docstring and experiments/README.md
state them in words) — which λ to keep from a grid (``choose_weight``) and
which λ to try next when the kept one sits on an edge of the grid
(``next_weight``). The runs that feed them are ``experiments.loss_runs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses

from topojax import data
from topojax import synthetic
from topojax import train

TASKS = ("components", "loops", "branches", "vessels")
# Tasks whose volumes are larger than the network's input: generated at
# their own shape, trained on patches of the config's ``shape`` and
# validated and predicted by sliding windows (nnU-Net's protocol,
# ``task_config``); the others are resized to the config's ``shape`` and
# trained whole (the paper's).
PATCH_TASKS = ("vessels",)
VESSEL_SHAPE = (64, 64, 64)
# Per training case and epoch: the vessels' epochs take as many steps as
# the whole-volume tasks' take times this.
PATCHES_PER_CASE = 2
# The window overlap of the patch tasks' per-epoch validation (task_config).
VALIDATION_OVERLAP = 0.0
# 36 train, 24 validation, 48 test (split_counts): enough validation cases
# on the tuning seed for the λ rule to see a topology error at all.
NUM_CASES = 108
TUNING_SEED = 0
EVAL_SEEDS = (1, 2, 3, 4, 5)
# Every loss of the table but Dice alone, which is the baseline.
TOPOLOGY_LOSSES = tuple(name for name, entry in train.LOSS_TABLE.items()
                        if entry.function is not None)
# Phase-2 settings: directory → loss (topojax.train.LOSS_TABLE).
VARIANTS = {"dice_ft": "dice", **{loss: loss for loss in TOPOLOGY_LOSSES}}
GRID = (0.1, 1.0, 10.0)  # The first λ / λ0 tried.
# The grid grows by a decade past the edge the kept λ sits on, at most
# twice: five values at most.
MAX_GRID = len(GRID) + 2
DICE_MARGIN = 0.01


def split_counts(num_cases: int) -> tuple[int, int]:
  """``(num_val, num_test)``: 2/9 for validation, 4/9 for testing, so that
  108 cases give 36 / 24 / 48: 24 validation cases for the λ rule and 48
  test cases for the paired tests."""
  return max(1, round(num_cases * 2 / 9)), max(1, round(num_cases * 4 / 9))


def default_tasks(quick: bool) -> tuple[str, ...]:
  """The tasks a comparison runs unless told: all of ``TASKS``; a
  ``--quick`` smoke run leaves out ``PATCH_TASKS``, whose sliding windows
  over whole volumes cost minutes even for 2 + 2 epochs."""
  return tuple(t for t in TASKS if not (quick and t in PATCH_TASKS))


def task_config(config: train.TrainConfig, task: str, *,
                shape=VESSEL_SHAPE) -> train.TrainConfig:
  """The config a task trains with: ``config`` itself for a whole-volume
  task; for one of ``PATCH_TASKS``, the cases in their own ``shape`` (no
  resizing) and patches of ``config.shape`` (``PATCHES_PER_CASE`` per case
  and epoch, a third of each batch on foreground), the test and tuning
  cases predicted by windows overlapping by ``config.overlap``, and the
  per-epoch validation by windows without overlap
  (``VALIDATION_OVERLAP``).

  Why no overlap there: validation only ranks a run's epochs, and at
  overlap 0 a 64³ case is 8 windows of 32³ instead of 27 at 0.5, a third
  of the validation's time, which is most of a vessels epoch
  (experiments/README.md, "The vessels task: a pilot"); the pilot's
  validation Dice moved by 0.01–0.02 alike for every model, and epoch by
  epoch the two overlaps ranked one run's epochs alike but for two epochs
  tied at 0.5 (the README). The predictions that are scored keep
  ``config.overlap``, where a seam could break a thin tube."""
  if task not in PATCH_TASKS:
    return config
  if config.shape is None or any(p > s for p, s in zip(config.shape, shape)):
    raise ValueError(f"config: shape {config.shape} must be a patch that "
                     f"fits the {task} task's volumes of {tuple(shape)}")
  return dataclasses.replace(config, shape=None, patch_size=config.shape,
                             patches_per_case=PATCHES_PER_CASE,
                             validation_overlap=VALIDATION_OVERLAP)


def task_synth(task: str, config: train.TrainConfig, *, num_cases: int,
               shape=VESSEL_SHAPE) -> synthetic.SynthConfig:
  """The synthetic task ``task`` as the comparison generates it: at
  ``shape`` for one of ``PATCH_TASKS``, else at ``config.shape``."""
  return dataclasses.replace(
      synthetic.TASKS[task], num_cases=num_cases,
      shape=tuple(shape) if task in PATCH_TASKS else config.shape)


def task_data(task_dir, synth: synthetic.SynthConfig,
              config: train.TrainConfig, *, num_cases: int, cache_dir=None,
              progress: bool = True):
  """``(dataset, split)`` of a synthetic task, generated in ``task_dir``
  unless it is there, and split by ``split_counts`` and
  ``config.split_seed``."""
  if not (task_dir / "dataset.json").is_file():
    # What is there is a stopped generation: the callers refuse a used
    # output folder unless resumed.
    synthetic.generate_task(task_dir, synth, overwrite=True,
                            progress=progress)
  dataset = data.load_dataset(task_dir, config.preprocess_config(),
                              cache_dir=cache_dir, progress=progress)
  num_val, num_test = split_counts(num_cases)
  split = data.make_split([c.case_id for c in dataset.task.cases],
                          num_val=num_val, num_test=num_test,
                          seed=config.split_seed)
  return dataset, split


def weighted(config: train.TrainConfig, weight: float) -> train.TrainConfig:
  """The config that trains ``L_dice + weight · L_topo`` (as ``L_topo +
  L_dice / weight``, the same Adam steps)."""
  return dataclasses.replace(config, dice_weight=1.0 / weight)


def _keeping(grid: Mapping[float, Mapping], baseline: Mapping
             ) -> dict[float, Mapping]:
  """The λ whose validation Dice is within ``DICE_MARGIN`` of the
  baseline's."""
  return {w: r for w, r in grid.items()
          if r["dice"] >= baseline["dice"] - DICE_MARGIN}


def tied_weights(grid: Mapping[float, Mapping], baseline: Mapping
                 ) -> list[float]:
  """The λ that keep Dice and tie at the lowest validation Σ|Δβ|, when
  more than one does (the tie-break then needs their ``"bm_error"``);
  else ``[]``. Dice fine-tuning without topology error on the validation
  cases makes every λ that keeps Dice tie at 0."""
  keeping = _keeping(grid, baseline)
  if len(keeping) < 2:
    return []
  best = min(r["betti_error"] for r in keeping.values())
  tied = sorted(w for w, r in keeping.items() if r["betti_error"] == best)
  return tied if len(tied) > 1 else []


def choose_weight(grid: Mapping[float, Mapping], baseline: Mapping) -> float:
  """The λ the pre-written rule keeps (experiments/README.md).

  Among the λ whose mean validation Dice is at least the baseline's minus
  ``DICE_MARGIN``: the lowest mean validation Σ|Δβ|; among λ tied there,
  the lowest mean validation Betti matching error of the probability maps;
  then the higher Dice. If no λ keeps Dice, the one of highest Dice.

  Args:
    grid: λ → ``{"dice", "betti_error"}`` (means over validation cases),
      with ``"bm_error"`` for every λ of ``tied_weights``.
    baseline: ``{"dice", ...}`` of Dice fine-tuning.

  Raises:
    ValueError: a tied λ has no ``"bm_error"``.
  """
  keeping = _keeping(grid, baseline)
  if not keeping:
    return max(grid, key=lambda w: grid[w]["dice"])
  tied = tied_weights(grid, baseline)
  missing = [w for w in tied if grid[w].get("bm_error") is None]
  if missing:
    raise ValueError(f"grid: λ {missing} tie in Σ|Δβ| and need their "
                     "validation Betti matching error (bm_error)")
  return min(keeping, key=lambda w: (
      keeping[w]["betti_error"],
      keeping[w]["bm_error"] if w in tied else 0.0, -keeping[w]["dice"]))


def next_weight(weights: Sequence[float], chosen: float, *,
                max_values: int = MAX_GRID) -> float | None:
  """The λ to try next: a decade past the edge of ``weights`` the kept λ
  sits on, or ``None`` when it is inside the grid, the grid has one value
  (no edge to extend), or ``max_values`` are spent.

  Args:
    weights: the λ tried so far, any order.
    chosen: the kept λ, one of ``weights``.
    max_values: the cap on the grid's size.
  """
  if chosen not in weights:
    raise ValueError(f"chosen λ {chosen} is not one of {sorted(weights)}")
  if len(weights) < 2 or len(weights) >= max_values:
    return None
  if chosen == min(weights):
    return min(weights) / 10
  if chosen == max(weights):
    return max(weights) * 10
  return None


def at_capped_edge(weights: Sequence[float], chosen: float, *,
                   max_values: int = MAX_GRID) -> bool:
  """Whether the kept λ still sits on an edge of a grid that may not grow:
  the best λ may lie outside it, and the table says so. A grid of one value
  (``--quick``) has no edge."""
  return (1 < len(weights) >= max_values
          and chosen in (min(weights), max(weights)))

