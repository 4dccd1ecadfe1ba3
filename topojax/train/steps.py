"""The model, the loss, the optimiser and the compiled steps of training.

Following the Flax examples, a phase is a ``train_step`` and an
``eval_step`` applied to batches (``topojax.train.loop`` runs them):

* ``create_model``, ``init_state``: the U-Net of a ``TrainConfig`` and its
  Adam state, made on the devices;
* ``make_loss``, ``make_optimizer``: the training loss by name (a row of
  ``topojax.train.LOSS_TABLE``) and the paper's Adam; ``training_targets``,
  the labels as the train step of a loss reads them;
* ``make_train_step``, ``make_eval_step``: the jit-compiled steps;
  ``make_forward``, the forward pass on one device (sliding windows,
  prediction);
* ``data_mesh``, ``to_global``, ``pad_batch``: the devices, and host
  batches made into arrays split over them.

Compiled steps: each phase jit-compiles one train step and one evaluation
step. Both see whole volumes at the fixed preprocessing shape, or, where the
run trains on patches, the train step sees batches of patches and the
evaluation step is ``make_forward``, the forward pass, here of the
validation's sliding windows, compiled for the patch size whatever the
cases' shapes. Batches always have ``batch_size`` cases (the last partial
training batch is dropped, the last validation batch is padded by
``pad_batch``), so neither step recompiles after the first batch;
``summary.json`` records the number of compilations of each. The step
factories are cached, so phases of the same network trained in one process
(several seeds, a resumed run) compile once; across processes, JAX's
persistent compilation cache does the same (``topojax train`` turns it on).
On the CPU backend the train and evaluation steps are compiled at LLVM's
level 1, and glibc keeps freed memory (``_jit_options``).

Data parallelism: every batch is split along its first axis over all devices
of a 1D ``jax.sharding.Mesh`` (axis ``"data"``); parameters and optimiser
state are replicated, and XLA inserts the gradient all-reduce. The loss is
taken per device and averaged (``jax.shard_map``), so a host-side loss such
as the persistent-homology one runs on every device's own cases. The same
code runs on one CPU, one or several GPUs, or a TPU slice. To test several
devices on one CPU, start Python with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``. With several
processes, each loads the same global batch and feeds its own
``batch_size / process_count`` rows (``to_global``); ``batch_size`` must be
a multiple of the total device count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from topojax import allocator
from topojax import losses
from topojax.losses import _checks as losses_checks
from topojax import unet
from topojax.train import config as config_lib
from topojax.train import losses as loss_table


def create_model(config: config_lib.TrainConfig, *, in_channels: int,
                 out_channels: int, seed: int | jax.Array | None = None
                 ) -> unet.UNet:
  """The U-Net of ``config``, initialised from ``seed`` (an int or a key;
  ``config.seed`` by default)."""
  return unet.UNet(in_channels=in_channels, out_channels=out_channels,
                   base_channels=config.base_channels, depth=config.depth,
                   norm=config.norm, rngs=nnx.Rngs(
                       params=config.seed if seed is None else seed))


def make_loss(name: str, *, dice_weight: float, kernel_sizes: Sequence[int],
              normalize: bool = False
              ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``loss(logits, targets) -> scalar`` for ``name`` in ``LOSSES``.

  The row of ``topojax.train.LOSS_TABLE``: the Dice loss alone
  (``topojax.losses.dice_loss``, sigmoid for one channel, softmax
  otherwise, averaged over the batch) where it has no function, else its
  topological loss of the probabilities, with the settings it takes
  (``kernel_sizes``), plus ``dice_weight`` times that Dice term
  (``topojax.losses.with_dice_loss``). ``targets`` are the labels, followed
  by the row's prepared channels when it has a ``prepare``
  (``training_targets``). ``normalize`` only resolves older names
  (``config.resolve_loss``).
  """
  dice_weight = losses_checks.dice_weight(dice_weight)
  loss = _weighted_loss(name, kernel_sizes=tuple(kernel_sizes),
                        normalize=normalize)
  return lambda logits, targets: loss(logits, targets, dice_weight)


def _weighted_loss(name: str, *, kernel_sizes: tuple[int, ...],
                   normalize: bool):
  """``make_loss``'s loss as ``loss(logits, targets, dice_weight)``, the
  weight possibly traced: the train step takes it as an argument, so that
  one compilation serves every λ of a loss."""
  entry = loss_table.LOSS_TABLE[config_lib.resolve_loss(
      name, normalize=normalize)]
  if entry.function is None:
    return lambda logits, targets, dice_weight: losses.dice_loss(
        logits, targets)
  weighted = losses.with_dice_loss(entry.topology(kernel_sizes=kernel_sizes))

  def loss(logits, targets, dice_weight):
    if entry.prepare is None:
      return weighted(logits, targets, dice_weight=dice_weight)
    # The labels' C channels, then the C channels prepared from them, so
    # that a step pays only for the loss itself.
    targets, prepared = jnp.split(targets, 2, axis=-1)
    return weighted(logits, targets, dice_weight=dice_weight,
                    skeleton=prepared)

  return loss


def training_targets(loss: str, labels, rows: Sequence[int], *,
                     normalize: bool = False):
  """What the train step of ``loss`` reads as labels, for the cases ``rows``.

  The labels themselves, unless the loss's row of
  ``topojax.train.LOSS_TABLE`` has a ``prepare``: then the labels with what
  it prepares from them (Skeleton Recall's tubed skeletons) as ``C`` more
  channels, computed once here, on the host, for the cases ``rows`` (the
  training cases; the others' are left zero, as no step reads them), each
  on its whole label. Being channels of the label, they are flipped with it
  by the batches, and cropped with it by the patches: a patch's own skeleton
  would be wrong at its borders.

  Args:
    loss: a name in ``LOSSES``.
    labels: ``(num_cases, X, Y, Z, C)`` float32 in {0, 1}, or per-case
      ``(X_i, Y_i, Z_i, C)`` arrays (``data.Dataset.labels``).
    rows: the cases the train step reads.
    normalize: resolves older names (``config.resolve_loss``).

  Returns:
    ``labels``, or the same cases with ``2 C`` channels: one
    ``(num_cases, X, Y, Z, 2 C)`` float32 array, or a list of per-case ones.
  """
  entry = loss_table.LOSS_TABLE[config_lib.resolve_loss(
      loss, normalize=normalize)]
  if entry.prepare is None:
    return labels
  rows = {int(row) for row in rows}
  cases = []
  for row in range(len(labels)):
    label = np.asarray(labels[row])
    prepared = (entry.prepare(label[None])[0] if row in rows
                else np.zeros_like(label))
    cases.append(np.concatenate([label, prepared], axis=-1))
  return np.stack(cases) if isinstance(labels, np.ndarray) else cases


def make_optimizer(learning_rate: float) -> optax.GradientTransformation:
  """The paper's optimiser: Adam with a constant learning rate (§3.1)."""
  return optax.adam(learning_rate)


def data_mesh() -> jax.sharding.Mesh:
  """A 1D mesh named ``"data"`` over every device of every process."""
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


def init_state(config: config_lib.TrainConfig, *, in_channels: int,
               out_channels: int, mesh: jax.sharding.Mesh):
  """A new model and its Adam state, initialised on the devices, replicated.

  Adam's state does not depend on the learning rate, which the train step
  takes as an argument.

  Returns:
    ``(model_def, state)``: the model's ``nnx.GraphDef`` and the training
    state ``{"model": nnx.State, "opt_state": optax state}``.
  """
  model_def, _ = abstract_model(config, in_channels=in_channels,
                                out_channels=out_channels)
  init = _initializer(dataclasses.replace(config, seed=0),
                      in_channels=in_channels, out_channels=out_channels,
                      mesh=mesh)
  return model_def, init(config.seed)


def abstract_model(config: config_lib.TrainConfig, *, in_channels: int,
                   out_channels: int):
  """``(model_def, state)`` of ``config``'s U-Net, abstract: the state's
  leaves are ``jax.ShapeDtypeStruct``s, and nothing is computed.

  The same for every seed, and built once per network: Flax builds the
  abstract model in about 0.1 s, which every phase and every restore of a
  run would otherwise pay again.
  """
  return _abstract_model(dataclasses.replace(config, seed=0),
                         in_channels=in_channels, out_channels=out_channels)


@functools.lru_cache(maxsize=16)
def _abstract_model(config, *, in_channels, out_channels):
  return nnx.split(nnx.eval_shape(lambda: create_model(
      config, in_channels=in_channels, out_channels=out_channels)))


@functools.lru_cache(maxsize=16)
def _initializer(config: config_lib.TrainConfig, *, in_channels: int,
                 out_channels: int, mesh: jax.sharding.Mesh):
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
            "opt_state": make_optimizer(0.0).init(params)}

  return jax.jit(init, out_shardings=jax.NamedSharding(mesh, jax.P()),
                 compiler_options={"xla_backend_optimization_level": 0})


def _jit_options(platform: str) -> dict[str, Any]:
  """``jax.jit``'s options for a step compiled for ``platform``.

  On the CPU, LLVM optimises at level 1 instead of XLA's default 3: the
  convolutions are oneDNN's, and the rest of a step runs as fast with the
  same bits (checked at the main job's size and at 2 × 64×64×48, base 16)
  for 0.5-0.9 s less compilation per step. And glibc keeps freed memory
  (``topojax.allocator``): XLA's CPU runtime mallocs and frees a step's
  buffers at every call.
  """
  if platform != "cpu":
    return {}
  allocator.keep_freed_memory()
  return {"compiler_options": {"xla_backend_optimization_level": 1}}


# The step factories are cached: phases of the same network and loss in one
# process share one jitted function, and so compile once.
@functools.lru_cache(maxsize=16)
def make_train_step(model_def: nnx.GraphDef, mesh: jax.sharding.Mesh, *,
                    loss: str, kernel_sizes: tuple[int, ...],
                    normalize: bool = False):
  """The jit-compiled training step: one Adam step on one batch.

  Args:
    model_def: the model's ``nnx.GraphDef`` (from ``init_state``).
    mesh: from ``data_mesh``.
    loss: a name in ``LOSSES`` (``make_loss``).
    kernel_sizes: PPL kernel sizes.
    normalize: resolves older names (``config.resolve_loss``).

  Returns:
    ``step(state, images, labels, learning_rate, dice_weight) -> (state,
    loss)``: ``state`` as from ``init_state`` (replicated, donated);
    ``images`` and ``labels`` ``(N, X, Y, Z, C)`` sharded over ``"data"``;
    ``learning_rate`` Adam's step size and ``dice_weight`` λ of the
    topological losses, scalars (arguments, not constants of the compiled
    step: a phase at another learning rate or λ reuses it); ``loss`` the
    batch's loss.
  """
  replicated = jax.NamedSharding(mesh, jax.P())
  batch = jax.NamedSharding(mesh, jax.P("data"))
  per_shard_loss = _weighted_loss(loss, kernel_sizes=tuple(kernel_sizes),
                                  normalize=normalize)
  # Each device takes the loss of its own cases and the mean goes round:
  # every loss here is a mean over cases and the shards are equal, so this is
  # the batch's loss, and a persistent-homology loss computes its diagrams
  # on the host of each device instead of gathering the batch on one.
  loss_fn = jax.shard_map(
      lambda logits, labels, dice_weight: jax.lax.pmean(
          per_shard_loss(logits, labels, dice_weight), "data"),
      mesh=mesh, in_specs=(jax.P("data"), jax.P("data"), jax.P()),
      out_specs=jax.P())

  def step(state, images, labels, learning_rate, dice_weight):
    model = nnx.merge(model_def, state["model"])
    model.train()
    value, grads = nnx.value_and_grad(
        lambda m: loss_fn(m(images), labels, dice_weight))(model)
    params = nnx.state(model, nnx.Param)
    # Adam of a traced rate: its update alone has the bits of a constant
    # rate's (checked), though XLA may fuse the rest of the step otherwise.
    updates, opt_state = make_optimizer(learning_rate).update(
        grads, state["opt_state"], params)
    nnx.update(model, optax.apply_updates(params, updates))
    return {"model": nnx.state(model), "opt_state": opt_state}, value

  return jax.jit(step, in_shardings=(replicated, batch, batch, replicated,
                                     replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 **_jit_options(mesh.devices.flat[0].platform))


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
                 out_shardings=(batch, batch),
                 **_jit_options(mesh.devices.flat[0].platform))


@functools.lru_cache(maxsize=16)
def make_forward(model_def: nnx.GraphDef):
  """The jit-compiled forward pass: probabilities of a batch, on one device.

  Sliding-window validation calls it with its windows; prediction with
  whole volumes or windows.

  Returns:
    ``forward(model_state, images) -> probabilities``: ``images``
    ``(B, X, Y, Z, C_in)`` and the state on one device, the probabilities
    ``(B, X, Y, Z, C_out)`` there.
  """
  def forward(model_state, windows):
    model = nnx.merge(model_def, model_state)
    model.eval()
    return unet.probabilities(model(windows))

  if jax.default_backend() == "cpu":
    # Not _jit_options: sliding windows call it inside their own jit, where
    # compiler options are refused.
    allocator.keep_freed_memory()
  return jax.jit(forward)


def to_global(batch: np.ndarray, sharding: jax.sharding.Sharding
              ) -> jax.Array:
  """A global batch array from this process's share of the host batch.

  Args:
    batch: ``(N, ...)``, the whole global batch, the same in every process;
      ``N`` a multiple of the process count.
    sharding: how the global array is laid out (``P("data")``: its first
      axis split over the devices).

  Returns:
    The ``(N, ...)`` global array, made of rows
    ``[i * N / P, (i + 1) * N / P)`` of process ``i`` of ``P``.
  """
  rows = batch.shape[0] // jax.process_count()
  start = jax.process_index() * rows
  return jax.make_array_from_process_local_data(
      sharding, batch[start:start + rows], batch.shape)


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
  """``batch`` ``(n, ...)`` with zero cases appended up to ``(size, ...)``.

  A last, partial batch gets the shape of the others, so a compiled step
  never recompiles for it.
  """
  missing = size - batch.shape[0]
  if not missing:
    return batch
  return np.concatenate([batch, np.zeros((missing, *batch.shape[1:]),
                                         batch.dtype)])

