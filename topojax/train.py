"""Two-phase training of the 3D U-Net, as in Fu et al. (SPIE MI 2023, §3.1).

Phase 1 pre-trains with the Dice loss (Adam, learning rate 1e-3); phase 2
starts from phase 1's best checkpoint and fine-tunes with ``L_topo + λ L_dice``
(Adam, 1e-4), or with the Dice loss alone for the paper's "Dice 150+150"
baseline. Each phase keeps its epoch of best validation Dice, and stops early
when that has not improved for ``patience`` epochs; only the validation cases
decide, the test cases are never read here.

Configuration is a JSON file per task (``experiments/configs/``) holding a
``TrainConfig``; ``load_config`` reads it.

A run folder holds one sub-folder per phase, ``phase1/`` and ``phase2/``,
each with:

* ``config.json``: the configuration, phase, loss and initial checkpoint;
* ``split.json``: the train/validation/test case ids (phase 2 copies phase
  1's, so both phases and later evaluation see the same test cases);
* ``model.json``: the network's input channels (modality names, in order)
  and output channels (the task's labels), for ``topojax.predict``;
* ``checkpoints/``: the latest and the best epoch (``topojax.checkpoint``);
* ``log.jsonl``: one line per epoch: train loss, validation Dice, validation
  topological loss, learning rate, time, throughput;
* ``curves.png``: those curves; ``summary.json``: written when the phase ends.

Compiled steps: each phase jit-compiles one train step and one evaluation
step; both see whole volumes at the fixed preprocessing shape (no sliding
window is needed). Batches always have ``batch_size`` cases (the last partial training
batch is dropped, the last validation batch is padded), so neither step
recompiles after the first batch; ``summary.json`` records the number of
compilations of each. The step factories are cached, so phases of the same
network trained in one process (several seeds, a resumed run) compile once;
across processes, JAX's persistent compilation cache does the same
(``topojax train`` turns it on).

Data parallelism: every batch is split along its first axis over all devices
of a 1D ``jax.sharding.Mesh`` (axis ``"data"``); parameters and optimiser
state are replicated, and XLA inserts the gradient all-reduce. The loss is
taken per device and averaged (``jax.shard_map``), so a host-side loss such
as the persistent-homology one runs on every device's own cases. The same
code runs on one CPU, one or several GPUs, or a TPU slice. To test several
devices on one CPU, start Python with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.

Several processes (one per host, or several on one machine): call
``jax.distributed.initialize(...)`` in every process before anything else
touches JAX (``topojax train --coordinator HOST:PORT --num-processes N
--process-id I`` does, or ``--distributed`` where JAX finds the cluster
itself), give every process the same command, data and run folder (a shared
file system). Each process loads the same global batch and feeds its own
``batch_size / process_count`` rows. Process 0 alone writes the run's files
(configuration, split, log, curves, summary) and prints; the others wait for
it where they read one. orbax writes the checkpoints: replicated arrays once,
its metadata from process 0. ``batch_size`` must be a multiple of the total
device count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
import tqdm

from topojax import checkpoint
from topojax import data
from topojax import losses
from topojax import metrics
from topojax import unet

# Losses a phase can train with: Dice alone, or a topological loss + λ·Dice.
LOSSES = ("dice", "ppl", "ppl_norm", "cldice", "hutopo")
# The name "ppl" had before the family grew; with TrainConfig.normalize it
# still selects the normalised form.
_LEGACY_PPL = "topo_dice"
PHASE_DIRS = {1: "phase1", 2: "phase2"}
_RUN_FILES = ("config.json", "split.json", "model.json", "log.jsonl",
              "curves.png", "summary.json", "checkpoints")


def _check_loss_name(name: str, argument: str) -> None:
  if name not in LOSSES and name != _LEGACY_PPL:
    raise ValueError(f"{argument} must be one of {LOSSES}, got {name!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhaseConfig:
  """One training phase.

  Attributes:
    loss: ``"dice"`` (``losses.dice_loss``) or a topological loss
      ``L_topo`` trained as ``L_topo + λ·L_dice``
      (``losses.with_dice_loss``, λ = ``TrainConfig.dice_weight``):
      ``"ppl"``, the Projected Pooling Loss at the published scale;
      ``"ppl_norm"``, the same per pooled cell; ``"cldice"``, clDice;
      ``"hutopo"``, the persistent-homology loss of Hu et al. The older
      name ``"topo_dice"`` means ``"ppl"``, or ``"ppl_norm"`` when
      ``TrainConfig.normalize`` is set.
    epochs: passes over the training cases at most.
    learning_rate: Adam's step size, constant.
    patience: stop after this many epochs without a better validation Dice;
      ``None`` runs every epoch (the best epoch is still the one kept).
  """
  loss: str
  epochs: int
  learning_rate: float
  patience: int | None = None

  def __post_init__(self):
    _check_loss_name(self.loss, "loss")
    if not isinstance(self.epochs, int) or self.epochs < 1:
      raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
    if not self.learning_rate > 0:
      raise ValueError(
          f"learning_rate must be positive, got {self.learning_rate!r}")
    if self.patience is not None and (not isinstance(self.patience, int)
                                      or self.patience < 1):
      raise ValueError(
          f"patience must be a positive int or null, got {self.patience!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Everything that defines a training run, as stored in a config file.

  Attributes:
    shape: ``(X, Y, Z)`` every case is resized to, in voxels; each side a
      multiple of ``2^(depth - 1)``.
    modalities: image channels to keep (``data.PreprocessConfig``).
    label_mode: ``"binary"`` (sigmoid output) or ``"onehot"`` (softmax).
    flip_axes: spatial axes randomly flipped during training (0 = X).
    split_seed: seed of the train/validation/test split; fixed per task, so
      every training seed sees the same test cases.
    seed: seed of the initial weights and of the batch order.
    base_channels: U-Net width at full resolution.
    depth: U-Net resolution levels.
    norm: ``"batch"``, ``"group"`` or ``"instance"``.
    batch_size: cases per step, a multiple of the device count.
    dice_weight: λ in ``L_topo + λ L_dice``, for every topological loss.
    normalize: makes the loss ``"topo_dice"`` (the older name of ``"ppl"``)
      the normalised ``"ppl_norm"``; other names ignore it.
    kernel_sizes: PPL pooling kernel sizes, in voxels; also used for the
      validation topological loss (the PPL whatever the phase's loss).
    phase1: pre-training.
    phase2: fine-tuning from phase 1's best checkpoint.
    description: free text, e.g. where the values come from.
  """
  shape: tuple[int, int, int]
  modalities: tuple[int | str, ...] | None = None
  label_mode: str = "binary"
  flip_axes: tuple[int, ...] = ()
  split_seed: int = 0
  seed: int = 0
  base_channels: int = 16
  depth: int = 4
  norm: str = "group"
  batch_size: int = 2
  dice_weight: float = 1.0
  normalize: bool = False
  kernel_sizes: tuple[int, ...] = losses.DEFAULT_KERNEL_SIZES
  phase1: PhaseConfig = PhaseConfig(loss="dice", epochs=150,
                                    learning_rate=1e-3)
  phase2: PhaseConfig = PhaseConfig(loss="ppl", epochs=150,
                                    learning_rate=1e-4)
  description: str = ""

  def __post_init__(self):
    for name in ("shape", "flip_axes", "kernel_sizes"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.modalities is not None:
      object.__setattr__(self, "modalities", tuple(self.modalities))
    for name in ("phase1", "phase2"):
      value = getattr(self, name)
      if isinstance(value, dict):
        object.__setattr__(self, name, PhaseConfig(**value))
    # The data module checks shape, modalities and label_mode.
    self.preprocess_config()
    unet.check_spatial_shape(self.shape, self.depth)
    if self.norm not in unet.NORMS:
      raise ValueError(f"norm must be one of {unet.NORMS}, got {self.norm!r}")
    for name in ("base_channels", "depth", "batch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.seed < 0 or self.split_seed < 0:
      raise ValueError(f"seed and split_seed must be non-negative, got "
                       f"{self.seed} and {self.split_seed}")
    if self.dice_weight < 0:
      raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")
    if not isinstance(self.normalize, bool):
      raise ValueError(f"normalize must be true or false, got "
                       f"{self.normalize!r}")
    if (not self.kernel_sizes or min(self.kernel_sizes) < 1
        or max(self.kernel_sizes) > min(self.shape)):
      raise ValueError(
          f"kernel_sizes {self.kernel_sizes} must be positive, non-empty and "
          f"fit in every projected plane of shape {self.shape}")

  def preprocess_config(self) -> data.PreprocessConfig:
    return data.PreprocessConfig(shape=self.shape, modalities=self.modalities,
                                 label_mode=self.label_mode)

  def to_json(self) -> dict[str, Any]:
    """The fields as JSON values (tuples become lists), as in config files."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


def load_config(path: str | os.PathLike) -> TrainConfig:
  """Reads a ``TrainConfig`` from a JSON file.

  Keys are ``TrainConfig``'s fields; ``phase1`` and ``phase2`` are objects
  with ``PhaseConfig``'s fields. Missing keys keep their defaults.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not JSON, an unknown key, or an invalid value.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} not found")
  try:
    spec = json.loads(path.read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not valid JSON ({err})") from None
  if not isinstance(spec, dict):
    raise ValueError(f"{path}: expected a JSON object of TrainConfig fields")
  for fields, where in ((spec, ""), (spec.get("phase1"), "phase1."),
                        (spec.get("phase2"), "phase2.")):
    if fields is None:
      continue
    if not isinstance(fields, dict):
      raise ValueError(f"{path}: {where.rstrip('.')} must be an object")
    known = {f.name for f in dataclasses.fields(
        TrainConfig if not where else PhaseConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"{path}: unknown keys {[where + k for k in unknown]}; "
                       f"expected some of {sorted(known)}")
  try:
    return TrainConfig(**spec)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{path}: {err}") from None


@dataclasses.dataclass(frozen=True)
class PhaseResult:
  """How a phase ended (its ``summary.json``).

  Attributes:
    run_dir: the phase's folder.
    best_epoch: the epoch with the highest validation Dice, kept in
      ``checkpoints/``.
    best_val_dice: its mean validation Dice.
    epochs_run: epochs trained in total (all sessions of a resumed run).
    stopped_early: whether patience ran out before ``epochs``.
    train_step_compilations: compilations of the train step during the
      last session: 1 means none after the first batch, 0 that an earlier
      phase in the same process had compiled it.
    eval_step_compilations: the same for the evaluation step.
  """
  run_dir: str
  best_epoch: int
  best_val_dice: float
  epochs_run: int
  stopped_early: bool
  train_step_compilations: int
  eval_step_compilations: int


# --------------------------------------------------------------------------
# Model, loss, optimiser and the compiled steps.


def create_model(config: TrainConfig, *, in_channels: int,
                 out_channels: int, seed: int | jax.Array | None = None
                 ) -> unet.UNet:
  """The U-Net of ``config``, initialised from ``seed`` (an int or a key;
  ``config.seed`` by default)."""
  return unet.UNet(in_channels=in_channels, out_channels=out_channels,
                   base_channels=config.base_channels, depth=config.depth,
                   norm=config.norm, rngs=nnx.Rngs(
                       params=config.seed if seed is None else seed))


def resolve_loss(name: str, *, normalize: bool = False) -> str:
  """The name in ``LOSSES`` that ``name`` trains with (``"topo_dice"`` is
  ``"ppl"``, or ``"ppl_norm"`` with ``normalize``)."""
  _check_loss_name(name, "loss")
  if name == _LEGACY_PPL:
    return "ppl_norm" if normalize else "ppl"
  return name


def make_loss(name: str, *, dice_weight: float, kernel_sizes: Sequence[int],
              normalize: bool = False
              ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``loss(logits, labels) -> scalar`` for ``name`` in ``LOSSES``.

  ``"dice"`` is ``losses.dice_loss`` (sigmoid for one channel, softmax
  otherwise, averaged over the batch); every other name is its topological
  loss of the probabilities plus ``dice_weight`` times that Dice term
  (``losses.with_dice_loss``). The PPL uses ``kernel_sizes``; ``normalize``
  only resolves the older name ``"topo_dice"`` (``resolve_loss``).
  """
  name = resolve_loss(name, normalize=normalize)
  if name == "dice":
    return losses.dice_loss
  topology_loss = {
      "ppl": functools.partial(losses.projected_pooling_loss,
                               kernel_sizes=tuple(kernel_sizes)),
      "ppl_norm": functools.partial(losses.projected_pooling_loss,
                                    kernel_sizes=tuple(kernel_sizes),
                                    normalize=True),
      "cldice": losses.cldice_loss,
      "hutopo": losses.hutopo_loss,
  }[name]
  return losses.with_dice_loss(topology_loss, dice_weight=dice_weight)


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
  """The paper's optimiser: Adam with a constant learning rate (§3.1)."""
  return optax.adam(learning_rate)


def data_mesh() -> jax.sharding.Mesh:
  """A 1D mesh named ``"data"`` over every device of every process."""
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def init_state(config: TrainConfig, *, in_channels: int, out_channels: int,
               learning_rate: float, mesh: jax.sharding.Mesh):
  """A new model and its Adam state, initialised on the devices, replicated.

  Returns:
    ``(model_def, state)``: the model's ``nnx.GraphDef`` and the training
    state ``{"model": nnx.State, "opt_state": optax state}``.
  """
  model_def = nnx.graphdef(nnx.eval_shape(lambda: create_model(
      config, in_channels=in_channels, out_channels=out_channels)))
  init = _initializer(dataclasses.replace(config, seed=0),
                      in_channels=in_channels, out_channels=out_channels,
                      learning_rate=learning_rate, mesh=mesh)
  return model_def, init(config.seed)


@functools.lru_cache(maxsize=16)
def _initializer(config: TrainConfig, *, in_channels: int, out_channels: int,
                 learning_rate: float, mesh: jax.sharding.Mesh):
  """``init(seed) -> state``, compiled once per network (not per seed).

  Unoptimised: XLA's CPU backend spends seconds optimising random-number
  code that runs once (tiny test network, 2 cores: 22 s eagerly, 14 s
  compiled with the default optimisation, 2 s without).
  """
  def init(seed):
    # The key nnx.Rngs makes of an int seed, made of a traced one.
    model = create_model(config, in_channels=in_channels,
                         out_channels=out_channels,
                         seed=jax.random.key(seed))
    params = nnx.state(model, nnx.Param)
    return {"model": nnx.state(model),
            "opt_state": make_optimizer(learning_rate).init(params)}

  return jax.jit(init, out_shardings=jax.NamedSharding(mesh, jax.P()),
                 compiler_options={"xla_backend_optimization_level": 0})


# The step factories are cached: phases of the same network, loss and
# learning rate in one process share one jitted function, and so compile once.
@functools.lru_cache(maxsize=16)
def make_train_step(model_def: nnx.GraphDef, mesh: jax.sharding.Mesh, *,
                    loss: str, learning_rate: float, dice_weight: float,
                    kernel_sizes: tuple[int, ...], normalize: bool = False):
  """The jit-compiled training step: one Adam step on one batch.

  Args:
    model_def: the model's ``nnx.GraphDef`` (from ``init_state``).
    mesh: from ``data_mesh``.
    loss: a name in ``LOSSES`` (``make_loss``).
    learning_rate: Adam's step size.
    dice_weight: λ of the topological losses.
    kernel_sizes: PPL kernel sizes.
    normalize: resolves ``"topo_dice"`` (``resolve_loss``).

  Returns:
    ``step(state, images, labels) -> (state, loss)``: ``state`` as from
    ``init_state`` (replicated, donated); ``images`` and ``labels``
    ``(N, X, Y, Z, C)`` sharded over ``"data"``; ``loss`` the batch's loss.
  """
  replicated = jax.NamedSharding(mesh, jax.P())
  batch = jax.NamedSharding(mesh, jax.P("data"))
  per_shard_loss = make_loss(loss, dice_weight=dice_weight,
                             kernel_sizes=kernel_sizes, normalize=normalize)
  # Each device takes the loss of its own cases and the mean goes round:
  # every loss here is a mean over cases and the shards are equal, so this is
  # the batch's loss, and a persistent-homology loss computes its diagrams
  # on the host of each device instead of gathering the batch on one.
  loss_fn = jax.shard_map(
      lambda logits, labels: jax.lax.pmean(per_shard_loss(logits, labels),
                                           "data"),
      mesh=mesh, in_specs=(jax.P("data"), jax.P("data")), out_specs=jax.P())
  tx = make_optimizer(learning_rate)

  def step(state, images, labels):
    model = nnx.merge(model_def, state["model"])
    model.train()
    value, grads = nnx.value_and_grad(
        lambda m: loss_fn(m(images), labels))(model)
    params = nnx.state(model, nnx.Param)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    nnx.update(model, optax.apply_updates(params, updates))
    return {"model": nnx.state(model), "opt_state": opt_state}, value

  return jax.jit(step, in_shardings=(replicated, batch, batch),
                 out_shardings=(replicated, replicated), donate_argnums=0)


@functools.lru_cache(maxsize=16)
def make_eval_step(model_def: nnx.GraphDef, mesh: jax.sharding.Mesh, *,
                   kernel_sizes: tuple[int, ...]):
  """The jit-compiled validation step: masks and per-case PPL.

  Returns:
    ``step(model_state, images, labels) -> (masks, topo)``: ``masks`` bool
    ``(N, X, Y, Z, C)``, the thresholded sigmoid (one channel) or the arg-max
    one-hot (several); ``topo`` ``(N,)``, ``projected_pooling_loss`` of each
    case's probabilities against its labels with ``kernel_sizes``.
  """
  replicated = jax.NamedSharding(mesh, jax.P())
  batch = jax.NamedSharding(mesh, jax.P("data"))

  def step(model_state, images, labels):
    model = nnx.merge(model_def, model_state)
    model.eval()
    logits = model(images)
    if logits.shape[-1] == 1:
      masks = logits > 0  # sigmoid(logits) > 0.5
    else:
      masks = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1],
                             dtype=jnp.bool_)
    topo = jax.vmap(lambda p, t: losses.projected_pooling_loss(
        p[None], t[None], kernel_sizes=kernel_sizes))(
            unet.probabilities(logits), labels)
    return masks, topo

  return jax.jit(step, in_shardings=(replicated, batch, batch),
                 out_shardings=(batch, batch))


def _to_global(batch: np.ndarray, sharding: jax.sharding.Sharding
               ) -> jax.Array:
  """A global batch array from this process's share of the host batch."""
  rows = batch.shape[0] // jax.process_count()
  start = jax.process_index() * rows
  return jax.make_array_from_process_local_data(
      sharding, batch[start:start + rows], batch.shape)


def _pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
  """Zero cases appended up to ``size`` rows, so the shape never changes."""
  missing = size - batch.shape[0]
  if not missing:
    return batch
  return np.concatenate([batch, np.zeros((missing, *batch.shape[1:]),
                                         batch.dtype)])


def validate(eval_step, model_state, images, labels, indices: Sequence[int],
             *, batch_size: int, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Mean validation Dice and PPL over the cases ``indices``.

  Dice is ``topojax.metrics.dice`` of each foreground class (channel 0 of a
  binary output, channels 1.. of a one-hot one), averaged over classes and
  then over cases.

  Returns:
    ``{"val_dice": ..., "val_topo": ...}``.
  """
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  dice, topo = [], []
  for image_batch, label_batch in data.iterate_batches(
      images, labels, indices, batch_size=batch_size, seed=0, epoch=0,
      shuffle=False, drop_remainder=False):
    count = image_batch.shape[0]
    masks, batch_topo = eval_step(
        model_state, _to_global(_pad_batch(image_batch, batch_size), sharding),
        _to_global(_pad_batch(label_batch, batch_size), sharding))
    masks = multihost_utils.process_allgather(masks, tiled=True)[:count]
    topo.extend(multihost_utils.process_allgather(batch_topo,
                                                  tiled=True)[:count])
    first = 0 if label_batch.shape[-1] == 1 else 1
    for mask, label in zip(masks, label_batch):
      dice.append(np.mean([metrics.dice(mask[..., c], label[..., c] > 0.5)
                           for c in range(first, label.shape[-1])]))
  return {"val_dice": float(np.mean(dice)), "val_topo": float(np.mean(topo))}


# --------------------------------------------------------------------------
# One phase.


def read_log(path: pathlib.Path) -> list[dict[str, Any]]:
  """The lines of a phase's ``log.jsonl``; none if it does not exist."""
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def _write_text(path: pathlib.Path, text: str) -> None:
  """Writes aside and renames, so a crash never leaves half a file."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _write_json(path: pathlib.Path, value: Any) -> None:
  _write_text(path, json.dumps(value, indent=1))


def _run_spec(config: TrainConfig, phase: int, loss: str,
              init: pathlib.Path | None) -> dict[str, Any]:
  return {"config": config.to_json(), "phase": phase, "loss": loss,
          "init": None if init is None else str(init)}


# Fields that must agree between phase 1 and the phase 2 built on it.
_SHARED_FIELDS = ("shape", "modalities", "label_mode", "split_seed",
                  "base_channels", "depth", "norm")


def _check_init(init: pathlib.Path, config: TrainConfig) -> None:
  """Phase 1 in ``init`` has finished and matches ``config``'s model/data."""
  summary = init / "summary.json"
  if not summary.is_file():
    raise FileNotFoundError(
        f"{summary} not found: phase 1 in {init} has not finished (resume it "
        "first) or init is not a phase-1 folder")
  saved = json.loads((init / "config.json").read_text())["config"]
  current = config.to_json()
  different = [f for f in _SHARED_FIELDS if saved[f] != current[f]]
  if different:
    changes = ", ".join(f"{f}: {saved[f]!r} there, {current[f]!r} here"
                        for f in different)
    raise ValueError(f"init {init} was trained with other data or another "
                     f"model ({changes})")


def _wait_for_all_processes(name: str) -> None:
  """Returns when every process has called it with ``name``.

  In a multi-process run, files are written by process 0 alone; a process
  that reads one waits here after the write.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _open_phase_dir(run_dir: pathlib.Path, spec: dict[str, Any],
                    split: data.Split) -> PhaseResult | None:
  """Writes or checks ``config.json`` and ``split.json`` of a phase folder.

  Returns:
    The ``PhaseResult`` of a finished phase, else ``None``.
  """
  spec_path, split_path = run_dir / "config.json", run_dir / "split.json"
  # Every process checks what is there, so all raise alike; only the first
  # writes what is missing (files appear whole: written aside, renamed).
  if spec_path.is_file() and json.loads(spec_path.read_text()) != spec:
    raise ValueError(f"{run_dir} holds a run with another configuration "
                     f"(see {spec_path}); resume it with that configuration "
                     "or use another folder")
  if split_path.is_file() and data.Split.load(split_path) != split:
    raise ValueError(f"{split_path} differs from the split given")
  if jax.process_index() == 0:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not spec_path.is_file():
      _write_json(spec_path, spec)
    if not split_path.is_file():
      split.save(split_path)
  _wait_for_all_processes(f"opened {run_dir}")
  summary = run_dir / "summary.json"
  if summary.is_file():
    return PhaseResult(**json.loads(summary.read_text()))
  return None


def _restore(manager, state: dict[str, Any], *, config: TrainConfig,
             split: data.Split, init: pathlib.Path | None
             ) -> tuple[dict[str, Any], int]:
  """The state to start from: the latest epoch, or a new phase's start.

  Returns:
    ``(state, epoch)``: ``epoch`` is the last finished one, 0 for a new
    phase, which starts from ``init``'s best model when given.
  """
  epoch = manager.latest_step()
  if epoch is not None:
    restored = checkpoint.restore(manager, epoch, model=state["model"],
                                  optimizer=state["opt_state"])
    meta = restored["meta"]
    if (meta["seed"] != config.seed
        or tuple(meta["train_cases"]) != split.train):
      raise ValueError(f"checkpoint {epoch} in {manager.directory} was "
                       "trained with another seed or other training cases")
    return {"model": restored["model"],
            "opt_state": restored["optimizer"]}, epoch
  if init is not None:
    with checkpoint.open_manager(init / "checkpoints",
                                 read_only=True) as init_manager:
      restored = checkpoint.restore(init_manager, init_manager.best_step(),
                                    model=state["model"])
    state = {**state, "model": restored["model"]}
  return state, 0


def _out_of_patience(epoch: int, best: int, phase: PhaseConfig) -> bool:
  """Whether patience ran out after ``epoch``, the best being ``best``."""
  return (phase.patience is not None and epoch - best >= phase.patience
          and epoch < phase.epochs)


def _train_epoch(train_step, state, dataset: data.Dataset, rows, *,
                 config: TrainConfig, epoch: int, mesh: jax.sharding.Mesh,
                 desc: str, progress: bool):
  """One pass over the training rows in ``(config.seed, epoch)`` order.

  Returns:
    ``(state, mean_loss, cases_per_s)``.
  """
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  steps = len(rows) // config.batch_size
  began = time.perf_counter()
  total = 0.0
  bar = tqdm.tqdm(
      data.iterate_batches(dataset.images, dataset.labels, rows,
                           batch_size=config.batch_size, seed=config.seed,
                           epoch=epoch, flip_axes=config.flip_axes),
      total=steps, desc=desc, unit="batch", leave=False,
      disable=not progress)
  for count, (images, labels) in enumerate(bar, 1):
    state, loss = train_step(state, _to_global(images, sharding),
                             _to_global(labels, sharding))
    total += float(loss)
    seconds = time.perf_counter() - began
    bar.set_postfix(loss=f"{total / count:.4f}",
                    cases_per_s=f"{count * config.batch_size / seconds:.2f}")
  seconds = time.perf_counter() - began
  return state, total / steps, steps * config.batch_size / seconds


def train_phase(config: TrainConfig, dataset: data.Dataset, split: data.Split,
                run_dir: str | os.PathLike, *, phase: int,
                loss: str | None = None, init: str | os.PathLike | None = None,
                progress: bool = True) -> PhaseResult:
  """Trains one phase in ``run_dir``, resuming from its latest checkpoint.

  The phase resumes whenever ``run_dir/checkpoints`` holds an epoch, and
  replays exactly what an uninterrupted run would have done: the batches are
  drawn from ``(config.seed, epoch)``. A finished phase (``summary.json``) is
  not trained again.

  Args:
    config: the run's configuration.
    dataset: from ``data.load_dataset(..., config.preprocess_config())``.
    split: the case ids to train and validate on.
    run_dir: this phase's folder (created).
    phase: 1 or 2; selects ``config.phase1`` or ``config.phase2``.
    loss: overrides the phase's loss (e.g. ``"dice"`` for the paper's
      "Dice 150+150" baseline).
    init: a finished phase-1 folder whose best checkpoint gives the initial
      weights; required for phase 2, refused for phase 1.
    progress: show a progress bar per epoch and a line per epoch (from
      process 0 only, in a multi-process run).

  Returns:
    The ``PhaseResult``, also written to ``run_dir/summary.json``.

  Raises:
    ValueError: a ``batch_size`` that is not a multiple of the device count
      or larger than the training set, ``run_dir`` holding another
      configuration, or ``init`` trained on other data or another model.
    FileNotFoundError: ``init`` is not a finished phase-1 folder.
  """
  if phase not in PHASE_DIRS:
    raise ValueError(f"phase must be 1 or 2, got {phase!r}")
  progress = progress and jax.process_index() == 0
  phase_config = config.phase1 if phase == 1 else config.phase2
  loss = phase_config.loss if loss is None else loss
  _check_loss_name(loss, "loss")
  if (init is None) != (phase == 1):
    raise ValueError("phase 2 starts from a phase-1 folder (init) and phase 1 "
                     f"from scratch; got phase={phase} and init={init!r}")
  init = None if init is None else pathlib.Path(init).absolute()
  if init is not None:
    _check_init(init, config)
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f"batch_size {config.batch_size} must be a multiple of "
                     f"the {devices} devices it is split over")
  train_rows = dataset.indices(split.train)
  val_rows = dataset.indices(split.val)
  if len(train_rows) < config.batch_size or not len(val_rows):
    raise ValueError(
        f"the split has {len(train_rows)} training and {len(val_rows)} "
        f"validation cases; need at least batch_size={config.batch_size} and "
        "1")
  run_dir = pathlib.Path(run_dir).absolute()
  finished = _open_phase_dir(run_dir, _run_spec(config, phase, loss, init),
                             split)
  if jax.process_index() == 0:
    # What topojax.predict needs to segment new images without the task
    # folder: the input channels' modalities in order, and the labels.
    _write_json(run_dir / "model.json", {
        "in_channels": int(dataset.images.shape[-1]),
        "out_channels": int(dataset.labels.shape[-1]),
        "modalities": [dataset.task.modalities[i]
                       for i in dataset.modality_indices],
        "modality_indices": list(dataset.modality_indices),
        "task_modalities": list(dataset.task.modalities),
        "label_names": list(dataset.task.label_names)})
  if finished is not None:
    return finished

  mesh = data_mesh()
  model_def, state = init_state(
      config, in_channels=dataset.images.shape[-1],
      out_channels=dataset.labels.shape[-1],
      learning_rate=phase_config.learning_rate, mesh=mesh)
  manager = checkpoint.open_manager(run_dir / "checkpoints")
  state, start = _restore(manager, state, config=config, split=split,
                          init=init)
  # Epochs logged after the last checkpoint (a crash between the two writes)
  # are trained again.
  log = [line for line in read_log(run_dir / "log.jsonl")
         if line["epoch"] <= start]
  if jax.process_index() == 0:
    # Replaced whole, so another process reading it never sees half of it.
    _write_text(run_dir / "log.jsonl",
                "".join(json.dumps(line) + "\n" for line in log))
  if progress:
    num_params = sum(p.size for p in jax.tree.leaves(
        nnx.filter_state(state["model"], nnx.Param)))
    print(f"phase {phase} ({loss}, lr {phase_config.learning_rate:g}) in "
          f"{run_dir}: U-Net with {num_params:,} parameters, "
          f"{len(train_rows)} training and {len(val_rows)} validation cases, "
          f"batch {config.batch_size} over {devices} device(s)"
          + (f"; resuming after epoch {start}" if start else ""))

  train_step = make_train_step(
      model_def, mesh, loss=loss, learning_rate=phase_config.learning_rate,
      dice_weight=config.dice_weight, kernel_sizes=config.kernel_sizes,
      normalize=config.normalize)
  eval_step = make_eval_step(model_def, mesh, kernel_sizes=config.kernel_sizes)
  compiled_before = train_step._cache_size(), eval_step._cache_size()
  epoch = start
  # Checked on resuming too: a crash may come after patience ran out.
  stopped_early = start > 0 and _out_of_patience(
      epoch, manager.best_step(), phase_config)
  while not stopped_early and epoch < phase_config.epochs:
    epoch += 1
    began = time.perf_counter()
    desc = f"phase {phase} epoch {epoch}/{phase_config.epochs}"
    state, train_loss, cases_per_s = _train_epoch(
        train_step, state, dataset, train_rows, config=config, epoch=epoch,
        mesh=mesh, desc=desc, progress=progress)
    scores = validate(eval_step, state["model"], dataset.images,
                      dataset.labels, val_rows, batch_size=config.batch_size,
                      mesh=mesh)
    line = {"phase": phase, "epoch": epoch, "train_loss": train_loss,
            **scores, "lr": phase_config.learning_rate,
            "time_s": time.perf_counter() - began, "cases_per_s": cases_per_s}
    log.append(line)
    if jax.process_index() == 0:
      with (run_dir / "log.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")
    checkpoint.save(manager, epoch, model=state["model"],
                    optimizer=state["opt_state"],
                    meta={"epoch": epoch, "phase": phase, "seed": config.seed,
                          "train_cases": list(split.train), **scores})
    best = manager.best_step()
    if progress:
      tqdm.tqdm.write(
          f"{desc}: train loss {train_loss:.4f}, val Dice "
          f"{scores['val_dice']:.4f}, val topo {scores['val_topo']:.2f}, "
          f"{line['time_s']:.1f} s ({cases_per_s:.2f} cases/s); best epoch "
          f"{best}")
    stopped_early = _out_of_patience(epoch, best, phase_config)

  best = manager.best_step()
  manager.close()
  result = PhaseResult(
      run_dir=str(run_dir), best_epoch=best,
      best_val_dice=next(l["val_dice"] for l in log if l["epoch"] == best),
      epochs_run=epoch, stopped_early=stopped_early,
      train_step_compilations=train_step._cache_size() - compiled_before[0],
      eval_step_compilations=eval_step._cache_size() - compiled_before[1])
  if jax.process_index() == 0:
    plot_curves(log, run_dir / "curves.png", best_epoch=best,
                title=f"{run_dir}: phase {phase}, {loss} loss")
    _write_json(run_dir / "summary.json", dataclasses.asdict(result))
  # A phase 2 started next reads this phase's summary.json.
  _wait_for_all_processes(f"finished {run_dir}")
  return result


def plot_curves(log: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                best_epoch: int | None = None, title: str = ""
                ) -> pathlib.Path:
  """Draws train loss, validation Dice and validation PPL per epoch as a PNG.

  Args:
    log: the lines of ``log.jsonl``.
    path: the PNG, replaced if it exists (it is the run's own file).
    best_epoch: marked with a dashed line.
    title: above the three panels.
  """
  # Imported here: only the end of a phase draws, and matplotlib is slow to
  # import.
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  epochs = [line["epoch"] for line in log]
  panels = (("train_loss", "train loss"), ("val_dice", "validation Dice"),
            ("val_topo", "validation PPL (pooled cells)"))
  figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for ax, (key, name) in zip(axes, panels):
    ax.plot(epochs, [line[key] for line in log], marker=".")
    if best_epoch is not None:
      ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1,
                 label=f"best epoch {best_epoch}")
      ax.legend(fontsize=8)
    ax.set_title(name)
    ax.set_xlabel("epoch")
  figure.suptitle(title)
  figure.tight_layout()
  path = pathlib.Path(path)
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


# --------------------------------------------------------------------------
# A whole run.


def _prepare_phase_dirs(run_dir: pathlib.Path, phases: Sequence[int], *,
                        resume: bool, overwrite: bool) -> None:
  """Refuses used phase folders unless resuming, or clears this module's files.

  Only the folders of the phases to train are looked at, and only the files
  this module writes are deleted: a user's files in ``run_dir`` stay.
  """
  if run_dir.exists() and not run_dir.is_dir():
    raise FileExistsError(f"run_dir {run_dir} exists and is a file")
  for phase in phases:
    target = run_dir / PHASE_DIRS[phase]
    if resume or not target.is_dir() or not any(target.iterdir()):
      continue
    if not overwrite:
      raise FileExistsError(
          f"{target} is not empty; pass resume=True (--resume) to continue "
          "its run or overwrite=True (--overwrite) to start it again")
    if jax.process_index() != 0:
      continue
    for item in _RUN_FILES:
      path = target / item
      if path.is_dir():
        shutil.rmtree(path)
      else:
        path.unlink(missing_ok=True)
  _wait_for_all_processes(f"prepared {run_dir}")


def train(config: TrainConfig, task_dir: str | os.PathLike,
          run_dir: str | os.PathLike, *, phases: Sequence[int] = (1, 2),
          init: str | os.PathLike | None = None,
          phase2_loss: str | None = None, resume: bool = False,
          overwrite: bool = False, cache_dir: str | os.PathLike | None = None,
          progress: bool = True) -> dict[int, PhaseResult]:
  """Preprocesses the task, splits it and trains the phases asked for.

  Args:
    config: the run's configuration.
    task_dir: an MSD task folder.
    run_dir: the run folder; phases go to ``run_dir/phase1`` and
      ``run_dir/phase2``.
    phases: ``(1, 2)``, ``(1,)`` or ``(2,)``.
    init: for ``phases=(2,)``, the finished phase-1 folder to start from
      (default ``run_dir/phase1``); its split is used.
    phase2_loss: overrides ``config.phase2.loss`` (``"dice"`` gives the
      paper's "Dice 150+150" baseline).
    resume: continue the phases in ``run_dir`` from their latest
      checkpoints (a phase not started yet starts).
    overwrite: delete this module's files in the phase folders to train and
      start them again.
    cache_dir: preprocessing cache (``data.load_dataset``).
    progress: progress bars and per-epoch lines.

  Returns:
    ``{phase: PhaseResult}``.

  Raises:
    FileExistsError: the folder of a phase to train is not empty and neither
      ``resume`` nor ``overwrite`` is set.
    FileNotFoundError, ValueError: as ``data.load_dataset`` and
      ``train_phase``, before any training.
  """
  phases = tuple(phases)
  if phases not in ((1, 2), (1,), (2,)):
    raise ValueError(f"phases must be (1, 2), (1,) or (2,), got {phases}")
  if phase2_loss is not None:
    _check_loss_name(phase2_loss, "phase2_loss")
  if phase2_loss is not None and 2 not in phases:
    raise ValueError(f"phase2_loss is for phase 2, not in phases={phases}")
  if init is not None and phases != (2,):
    raise ValueError(f"init is for phases=(2,) only; phase 2 of phases="
                     f"{phases} starts from its own phase 1")
  run_dir = pathlib.Path(run_dir)
  init = pathlib.Path(init if init is not None else run_dir / PHASE_DIRS[1])
  if phases == (2,):
    _check_init(init, config)
  _prepare_phase_dirs(run_dir, phases, resume=resume, overwrite=overwrite)
  dataset = data.load_dataset(task_dir, config.preprocess_config(),
                              cache_dir=cache_dir, progress=progress)
  if phases[0] == 1:
    split = data.default_split(dataset.task, seed=config.split_seed)
  else:
    split = data.Split.load(init / "split.json")
  results = {}
  for phase in phases:
    results[phase] = train_phase(
        config, dataset, split, run_dir / PHASE_DIRS[phase], phase=phase,
        loss=phase2_loss if phase == 2 else None,
        init=init if phase == 2 else None, progress=progress)
  return results

