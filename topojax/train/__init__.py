"""Two-phase training of the 3D U-Net, as in Fu et al. (SPIE MI 2023, §3.1).

Phase 1 pre-trains with the Dice loss (Adam, learning rate 1e-3); phase 2
starts from phase 1's best checkpoint and fine-tunes with ``L_topo + λ L_dice``
(Adam, 1e-4), or with the Dice loss alone for the paper's "Dice 150+150"
baseline. Each phase keeps its epoch of best validation Dice, and stops early
when that has not improved for ``patience`` epochs; only the validation cases
decide, the test cases are never read here.

One module per concern, each importing only those above it:

* :mod:`~topojax.train.losses`: ``LOSS_TABLE``, the losses a phase can
  train with, each with its settings, its per-case target preparation and
  what a user must know of it;
* :mod:`~topojax.train.config`: ``TrainConfig``, ``PhaseConfig``,
  ``load_config`` (a JSON file per task) and the loss names, ``LOSSES``;
* :mod:`~topojax.train.steps`: the model, loss and optimiser, the device
  mesh and the jit-compiled train and evaluation steps (data parallel);
* :mod:`~topojax.train.runs`: a run's folders and files (configuration,
  split, log, summary), barriers between processes, resuming from a
  checkpoint;
* :mod:`~topojax.train.validation`: ``validate``, the validation Dice and
  PPL that pick a phase's best epoch;
* :mod:`~topojax.train.curves`: the training curves, ``curves.png``;
* :mod:`~topojax.train.preemption`: stopping on SIGTERM/SIGINT after the
  step in flight, agreed across processes (``Preempted``);
* :mod:`~topojax.train.epoch`: one pass over the training batches, stoppable
  after any step and resumable from it;
* :mod:`~topojax.train.loop`: ``train_phase`` (epochs, checkpoints, early
  stopping) and ``train`` (a task's phases).
"""

from topojax.train.config import LOSSES
from topojax.train.config import PhaseConfig
from topojax.train.config import TrainConfig
from topojax.train.config import load_config
from topojax.train.config import resolve_loss
from topojax.train.curves import plot_curves
from topojax.train.losses import LOSS_TABLE
from topojax.train.losses import TrainingLoss
from topojax.train.loop import train
from topojax.train.loop import train_phase
from topojax.train.preemption import Preempted
from topojax.train.runs import PHASE_DIRS
from topojax.train.runs import PhaseResult
from topojax.train.runs import read_log
from topojax.train.steps import abstract_model
from topojax.train.steps import create_model
from topojax.train.steps import data_mesh
from topojax.train.steps import init_state
from topojax.train.steps import make_eval_step
from topojax.train.steps import make_loss
from topojax.train.steps import make_optimizer
from topojax.train.steps import make_train_step
from topojax.train.validation import validate

__all__ = (
    "LOSSES", "LOSS_TABLE", "PHASE_DIRS", "PhaseConfig", "PhaseResult",
    "Preempted", "TrainConfig", "TrainingLoss",
    "abstract_model", "create_model", "data_mesh", "init_state", "load_config",
    "make_eval_step", "make_loss", "make_optimizer", "make_train_step",
    "plot_curves", "read_log", "resolve_loss", "train", "train_phase",
    "validate",
)
