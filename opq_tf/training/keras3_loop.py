"""The training loop for Keras 3 models, on TensorFlow or JAX.

    step = keras3_loop.make_train_step(model, optimizer, strategy,
                                       global_batch_size=64, weight_decay=1e-4)
    sums = step(images, labels)   # float32 [2]: cross-entropy, top-1 correct
    step.sync()                   # JAX: the trained values into model.variables
    figures = keras3_loop.fit(model, config, strategy, data_dir, workdir,
                              phase="finetune", epochs=8, learning_rate=0.02,
                              warmup_epochs=0.5)
    accuracy = keras3_loop.evaluate(model, config, strategy, data_dir)

The same loop as opq_tf.training.loop (its docstring has the why of each
choice), for a Keras 3 model and optimizer:

- TensorFlow: the step is `loop`'s: a tf.function running `strategy.run` over
  a tf.distribute strategy's replicas, the replica loss averaged over the
  global batch, the forward/backward pass XLA-compiled with jit_compile, and
  Keras 3's optimizer all-reducing the gradients. Evaluation is `loop.evaluate`
  itself (it only calls the model).
- JAX: one `jax.jit`-compiled pure function `(state, images, labels) ->
  (state, sums)` over `model.stateless_call` and `optimizer.stateless_apply`;
  under a `keras3_distribute.JaxDataParallel` the state is replicated and the
  batch split across the devices of every process with the layouts of
  `keras.distribution.DataParallel`, so XLA inserts the all-reduce of the
  global-batch mean and BatchNorm normalises with the global batch's
  statistics. The state lives in device arrays while training and is written
  back to the model's (host-local) variables by `sync` (before a checkpoint,
  an evaluation and at the end). JAX steps are always jit-compiled: an eager
  JAX step dispatches every op on its own. The input is the same tf.data
  pipeline, read with `as_numpy_iterator` (Flax's ImageNet example does the
  same); each process reads its share of the record files.

Weight decay (`kernel_l2`) is coupled L2 on the compressible kernels only
(`opq_tf.keras3.layers.kernel_sites`; the latent kernels of a compressed
model); the learning rate is `loop.WarmupCosine`'s linear warmup then cosine
decay, as Keras 3's CosineDecay with a warmup (`learning_rate_schedule`).

Checkpoints are one `.npz` per save under <workdir>/<phase>/checkpoints:
every model variable (masks and steps included), every optimizer variable,
the step and the epoch, written atomically (opq_tf.core.files), so the newest
file is always complete; the newest `checkpoints_to_keep` are kept. The
format is the same on both backends. A killed run resumes mid-epoch exactly
as `loop.fit` does (the epoch's pipeline rebuilt with its seed, the steps
done skipped). Summaries are `loop`'s TensorBoard scalars, written with
tf.summary on either backend. Only the chief writes; every process reads the
variables (under MultiWorkerMirroredStrategy that read is a collective).
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from typing import Any, Optional

from absl import logging
import ml_collections
import numpy as np

from opq_tf.core import files
from opq_tf.keras3 import layers as layers_lib
from opq_tf.keras3 import wrapping
from opq_tf.keras3._keras import keras, ops
from opq_tf.tf_keras._keras import tf
from opq_tf.training import distribute
from opq_tf.training import imagenet_input
from opq_tf.training import layout
from opq_tf.training import loop

_CHECKPOINT = re.compile(r"ckpt-(\d+)\.npz$")


def learning_rate_schedule(base_learning_rate: float, warmup_steps: int,
                           total_steps: int
                           ) -> keras.optimizers.schedules.LearningRateSchedule:
  """loop.WarmupCosine as Keras 3's CosineDecay: base·s/W, then cosine to 0."""
  warmup_steps = int(warmup_steps)
  decay_steps = max(int(total_steps) - warmup_steps, 1)
  if not warmup_steps:
    return keras.optimizers.schedules.CosineDecay(base_learning_rate,
                                                  decay_steps)
  return keras.optimizers.schedules.CosineDecay(
      0.0, decay_steps, warmup_target=base_learning_rate,
      warmup_steps=warmup_steps)


def decayed_kernels(model: keras.Model) -> list[Any]:
  """The trainable compressible kernels (the latent ones when compressed)."""
  trainable = {id(v) for v in model.trainable_variables}
  return [site.variable for site in layers_lib.kernel_sites(model).values()
          if id(site.variable) in trainable]


def kernel_l2(kernels: list[Any], weight_decay: float):
  """wd/2 · Σ||W||² over `kernels`: the trainer's weight decay."""
  return 0.5 * float(weight_decay) * sum(ops.sum(ops.square(k)) for k in kernels)


def _backend() -> str:
  return keras.backend.backend()


class _TensorFlowStep:
  """loop.make_train_step for a Keras 3 model and optimizer."""

  def __init__(self, model, optimizer, strategy, global_batch_size: int,
               weight_decay: float, jit_compile: bool):
    strategy = strategy or tf.distribute.get_strategy()
    kernels = decayed_kernels(model)
    replica_step = loop.make_replica_step(
        model, optimizer, global_batch_size=global_batch_size,
        decay=((lambda: kernel_l2(kernels, weight_decay))
               if weight_decay and kernels else None),
        jit_compile=jit_compile)

    @tf.function
    def step(images, labels):
      sums = strategy.run(replica_step, args=(images, labels))
      return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    self._step = step

  def __call__(self, images, labels) -> np.ndarray:
    return self._step(images, labels).numpy()

  def sync(self) -> None:
    """The variables are the state on TensorFlow: nothing to write back."""


class _Layouts:
  """Host values <-> arrays laid out by a JaxDataParallel (or one device)."""

  def __init__(self, strategy):
    import jax  # pylint: disable=g-import-not-at-top
    self._jax = jax
    self.distribution = getattr(strategy, "distribution", None)
    self.processes = jax.process_count()
    self.process = jax.process_index()

  def replicated(self, variable) -> Any:
    """A variable's host value, replicated on every device of the mesh."""
    value = np.asarray(ops.convert_to_numpy(variable))
    if self.distribution is None:
      return self._jax.numpy.asarray(value)
    sharding = self.distribution.get_variable_layout(variable).backend_layout
    return self._jax.make_array_from_process_local_data(sharding, value,
                                                        value.shape)

  def batch(self, local: np.ndarray) -> Any:
    """This process's rows of a global batch -> the global batch array."""
    local = np.asarray(local)
    if self.distribution is None:
      return self._jax.numpy.asarray(local)
    shape = (local.shape[0] * self.processes,) + local.shape[1:]
    sharding = self.distribution.get_data_layout(shape).backend_layout
    return self._jax.make_array_from_process_local_data(sharding, local, shape)

  @staticmethod
  def host(array) -> np.ndarray:
    """A replicated array's value (this process's copy)."""
    shards = getattr(array, "addressable_shards", None)
    return np.asarray(shards[0].data if shards else array)


class _JaxStep:
  """One jitted step over model.stateless_call and optimizer.stateless_apply."""

  def __init__(self, model, optimizer, strategy, global_batch_size: int,
               weight_decay: float, jit_compile: bool):
    del global_batch_size, jit_compile  # the batch is global; always jitted
    import jax  # pylint: disable=g-import-not-at-top
    self._model, self._optimizer = model, optimizer
    self._layouts = _Layouts(strategy)
    if not optimizer.built:
      optimizer.build(model.trainable_variables)
    decayed = {id(v) for v in decayed_kernels(model)}
    is_decayed = [id(v) in decayed for v in model.trainable_variables]

    def loss_fn(trainable, non_trainable, images, labels):
      logits, non_trainable = model.stateless_call(
          trainable, non_trainable, images, training=True)
      cross_entropy = ops.mean(keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True))
      loss = cross_entropy
      if weight_decay and any(is_decayed):
        loss = loss + kernel_l2(
            [v for v, d in zip(trainable, is_decayed) if d], weight_decay)
      correct = ops.sum(ops.cast(ops.in_top_k(labels, logits, 1), "float32"))
      return loss, (cross_entropy, correct, non_trainable)

    gradient_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, images, labels):
      trainable, non_trainable, optimizer_state = state
      (_, (cross_entropy, correct, non_trainable)), gradients = gradient_fn(
          trainable, non_trainable, images, labels)
      trainable, optimizer_state = optimizer.stateless_apply(
          optimizer_state, gradients, trainable)
      return ((trainable, non_trainable, optimizer_state),
              ops.stack([cross_entropy, correct]))

    self._step = jax.jit(step, donate_argnums=0)
    self._state = None

  def _variables(self) -> tuple[list, list, list]:
    return (self._model.trainable_variables,
            self._model.non_trainable_variables, self._optimizer.variables)

  def __call__(self, images, labels) -> np.ndarray:
    if self._state is None:
      self._state = tuple([self._layouts.replicated(v) for v in group]
                          for group in self._variables())
    self._state, sums = self._step(self._state, self._layouts.batch(images),
                                   self._layouts.batch(labels))
    return self._layouts.host(sums)

  def sync(self) -> None:
    """Writes the trained state into the model's and optimizer's variables."""
    if self._state is None:
      return
    for group, values in zip(self._variables(), self._state):
      for variable, value in zip(group, values):
        variable.assign(self._layouts.host(value))


def make_train_step(model: keras.Model,
                    optimizer: keras.optimizers.Optimizer,
                    strategy: Any = None, *, global_batch_size: int,
                    weight_decay: float = 0.0, jit_compile: bool = True):
  """One synchronous SGD step of a Keras 3 model on the current backend.

  Args:
    model, optimizer: a built Keras 3 model (on TensorFlow: built in
      `strategy.scope()`) and its optimizer.
    strategy: TensorFlow: the tf.distribute strategy (None: the default
      one); JAX: a keras3_distribute.JaxDataParallel (None: one device).
    global_batch_size: the batch over all replicas (TensorFlow averages each
      replica's loss over it; on JAX the batch is one global array).
    weight_decay: `kernel_l2`'s coefficient.
    jit_compile: TensorFlow: XLA-compile the forward/backward pass. JAX
      steps are always jit-compiled.

  Returns:
    step(images, labels) -> float32 [2] NumPy: the step's cross-entropy (mean
    over the global batch) and its number of correct top-1 predictions, after
    the update. TensorFlow: images and labels are what a distributed dataset
    yields (or plain tensors); JAX: this process's rows of the global batch
    (NumPy). `step.sync()` writes the trained values into the model's and
    optimizer's variables (JAX; a no-op on TensorFlow).
  """
  step_class = _JaxStep if _backend() == "jax" else _TensorFlowStep
  return step_class(model, optimizer, strategy, global_batch_size,
                    float(weight_decay), jit_compile)


def _eval_sums(logits, labels, weights, top_k: int):
  """[cross-entropy, top-1, top-k, examples] summed over the weighted rows."""
  loss = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                      from_logits=True)
  top1 = ops.cast(ops.in_top_k(labels, logits, 1), "float32")
  topk = ops.cast(ops.in_top_k(labels, logits, top_k), "float32")
  return ops.stack([ops.sum(loss * weights), ops.sum(top1 * weights),
                    ops.sum(topk * weights), ops.sum(weights)])


# The last evaluated model and its jitted eval step: a run evaluates the
# same model up to three times in a row (compressed, calibrated, finetuned).
_last_eval_step: list[Any] = [None, None]


def _jax_eval_step(model: keras.Model):
  """(trainable, non_trainable, images, labels, weights) -> _eval_sums."""
  if _last_eval_step[0] is not model:
    import jax  # pylint: disable=g-import-not-at-top
    top_k = min(5, int(model.output_shape[-1]))

    def eval_fn(trainable, non_trainable, images, labels, weights):
      logits, _ = model.stateless_call(trainable, non_trainable, images,
                                       training=False)
      return _eval_sums(logits, labels, weights, top_k)

    _last_eval_step[:] = [model, jax.jit(eval_fn)]
  return _last_eval_step[1]


def _evaluate_jax(model: keras.Model, config: ml_collections.ConfigDict,
                  strategy: Any, data_dir: str) -> dict:
  """Every process reads the whole validation split and feeds its rows of
  each batch (padded to a full batch, pads weighted 0), so all run the same
  number of steps."""
  layouts = _Layouts(strategy)
  eval_step = _jax_eval_step(model)
  trainable = [layouts.replicated(v) for v in model.trainable_variables]
  non_trainable = [layouts.replicated(v) for v in model.non_trainable_variables]
  batch = config.eval_batch_size
  rows = slice(layouts.process * batch // layouts.processes,
               (layouts.process + 1) * batch // layouts.processes)
  dataset = imagenet_input.make_dataset_fn(
      split="validation", data_dir=data_dir, image_size=config.image_size,
      global_batch_size=batch, train=False,
      num_classes=config.num_classes)(None)
  totals = np.zeros(4, np.float64)
  for images, labels in dataset.as_numpy_iterator():
    weights = np.zeros(batch, np.float32)
    weights[:len(labels)] = 1.0
    pad = batch - len(labels)
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                              images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    totals += layouts.host(eval_step(
        trainable, non_trainable, layouts.batch(images[rows]),
        layouts.batch(labels[rows]), layouts.batch(weights[rows])))
  loss, top1, top5, count = totals
  return {"top1": float(top1 / count), "top5": float(top5 / count),
          "loss": float(loss / count), "examples": int(count)}


def evaluate(model: keras.Model, config: ml_collections.ConfigDict,
             strategy: Any, data_dir: str) -> dict:
  """Top-1 / top-5 accuracy and mean cross-entropy on the validation split,
  every example counted once (as loop.evaluate, which TensorFlow runs)."""
  if _backend() == "jax":
    return _evaluate_jax(model, config, strategy, data_dir)
  return loop.evaluate(model, config, strategy, data_dir)


# --------------------------------------------------------------------------
# Checkpoints.


def latest_checkpoint(directory: str) -> Optional[str]:
  """The newest complete checkpoint file in `directory`, or None."""
  found = [(int(match.group(1)), path)
           for path in glob.glob(os.path.join(directory, "ckpt-*.npz"))
           if (match := _CHECKPOINT.search(os.path.basename(path)))]
  return max(found)[1] if found else None


def _state_variables(model: keras.Model,
                     optimizer: keras.optimizers.Optimizer) -> list[Any]:
  return list(model.variables) + list(optimizer.variables)


def save_checkpoint(directory: str, step: int, epoch: int,
                    variables: list[Any], keep: int, write: bool) -> None:
  """Writes ckpt-<step>.npz (only if `write`: the chief); keeps the newest
  `keep`. Every process reads the variables (a collective on some)."""
  arrays = {f"v{index:05d}": np.asarray(ops.convert_to_numpy(variable))
            for index, variable in enumerate(variables)}
  if not write:
    return
  arrays["paths"] = np.array([variable.path for variable in variables])
  arrays["step"], arrays["epoch"] = np.int64(step), np.int64(epoch)
  with files.atomic_path(os.path.join(directory, f"ckpt-{step}.npz")) as temp:
    with open(temp, "wb") as f:
      np.savez(f, **arrays)
  stale = sorted(glob.glob(os.path.join(directory, "ckpt-*.npz")),
                 key=lambda p: int(_CHECKPOINT.search(p).group(1)))[:-keep]
  for path in stale:
    os.remove(path)


def restore_checkpoint(path: str, variables: list[Any]) -> tuple[int, int]:
  """Assigns a checkpoint to `variables`; returns its (step, epoch).

  Raises:
    ValueError: the checkpoint holds other variables (another model or plan).
  """
  with np.load(path) as saved:
    names = [str(name) for name in saved["paths"]]
    if len(names) != len(variables):
      raise ValueError(
          f"Checkpoint {path} holds {len(names)} variables but the model and "
          f"optimizer have {len(variables)}; it was written for another model. "
          "Use a fresh --workdir.")
    for index, variable in enumerate(variables):
      value = saved[f"v{index:05d}"]
      if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(
            f"Checkpoint {path} holds {names[index]} of shape {value.shape}, "
            f"but the model's {variable.path} is {tuple(variable.shape)}; it "
            "was written for another model. Use a fresh --workdir.")
      variable.assign(value)
    return int(saved["step"]), int(saved["epoch"])


# --------------------------------------------------------------------------
# fit.


def _compressed_sparsity(model: keras.Model) -> float:
  """Fraction of zeros in the compressed kernels (pruned, or rounded to 0)."""
  kernels = wrapping.compressed_kernels(model)
  zeros = sum(int(np.count_nonzero(k.compressed == 0)) for k in kernels)
  return zeros / sum(k.kernel.size for k in kernels)


def _train_batches(config: ml_collections.ConfigDict, strategy: Any,
                   data_dir: str, epoch: int, skip: int):
  """Epoch `epoch`'s batches with `skip` steps skipped: a distributed
  iterator (TensorFlow) or this process's share as NumPy (JAX)."""
  dataset_fn = loop.train_dataset_fn(config, data_dir, epoch, skip)
  if _backend() != "jax":
    return iter(strategy.distribute_datasets_from_function(dataset_fn))
  layouts = _Layouts(strategy)
  context = tf.distribute.InputContext(
      num_input_pipelines=layouts.processes,
      input_pipeline_id=layouts.process,
      num_replicas_in_sync=layouts.processes)
  return dataset_fn(context).as_numpy_iterator()


def fit(model: keras.Model, config: ml_collections.ConfigDict, strategy: Any,
        data_dir: str, workdir: str, *, phase: str, epochs: int,
        learning_rate: float, warmup_epochs: float) -> dict:
  """Trains `model` for `epochs`, resuming from its checkpoints if any.

  Returns:
    loop.fit's figures: {"steps", "epochs", "train_loss", "train_accuracy"
    (last epoch), "seconds", "images_per_second", "resumed_from_step"}.
  """
  chief = distribute.is_chief(strategy)
  steps_per_epoch = loop.epoch_length(config, data_dir)
  total_steps = epochs * steps_per_epoch
  schedule = learning_rate_schedule(
      learning_rate, round(warmup_epochs * steps_per_epoch), total_steps)
  with strategy.scope():
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum)
    optimizer.build(model.trainable_variables)
  variables = _state_variables(model, optimizer)
  checkpoint_dir = layout.checkpoint_dir(workdir, phase)
  latest = latest_checkpoint(checkpoint_dir)
  start_step = 0
  if latest:
    start_step, _ = restore_checkpoint(latest, variables)
    logging.info("%s: restored %s (step %d)", phase, latest, start_step)

  global_batch = config.global_batch_size
  train_step = make_train_step(
      model, optimizer, strategy, global_batch_size=global_batch,
      weight_decay=float(config.weight_decay), jit_compile=config.jit_compile)
  writer = (tf.summary.create_file_writer(os.path.join(workdir, "tensorboard",
                                                       phase))
            if chief else tf.summary.create_noop_writer())
  compressed = wrapping.is_compressed(model)

  def save(step: int, epoch: int) -> None:
    train_step.sync()
    save_checkpoint(checkpoint_dir, step, epoch, variables,
                    config.checkpoints_to_keep, write=chief)

  step = start_step
  loop_seconds, last = 0.0, {}
  for epoch in range(start_step // steps_per_epoch, epochs):
    skip = step - epoch * steps_per_epoch
    batches = _train_batches(config, strategy, data_dir, epoch, skip)
    progbar = (keras.utils.Progbar(steps_per_epoch, stateful_metrics=["lr"])
               if chief and sys.stdout.isatty() else None)
    epoch_loss = epoch_correct = 0.0
    epoch_steps = 0
    started = time.time()
    for _ in range(skip, steps_per_epoch):
      loss, correct = (float(value) for value in train_step(*next(batches)))
      step += 1
      epoch_steps += 1
      epoch_loss += loss
      epoch_correct += correct
      log = step % config.log_every_steps == 0 or step == total_steps
      lr = (float(ops.convert_to_numpy(schedule(step - 1)))
            if log or progbar else None)
      if log:
        with writer.as_default(step=step):
          loop.scalar("train/loss", loss)
          loop.scalar("train/accuracy", correct / global_batch)
          loop.scalar("train/learning_rate", lr)
        if progbar is None:
          logging.info("%s epoch %d/%d step %d/%d: loss %.4f accuracy %.4f "
                       "lr %.5g", phase, epoch + 1, epochs, step, total_steps,
                       loss, correct / global_batch, lr)
      if progbar is not None:
        progbar.update(step - epoch * steps_per_epoch,
                       [("loss", loss), ("accuracy", correct / global_batch),
                        ("lr", lr)])
      if step % config.steps_per_checkpoint == 0 and (
          step % steps_per_epoch != 0):
        save(step, epoch)
    loop_seconds += time.time() - started
    save(step, epoch + 1)
    last = {"train_loss": epoch_loss / max(epoch_steps, 1),
            "train_accuracy": epoch_correct / max(epoch_steps * global_batch, 1)}
    with writer.as_default(step=step):
      loop.scalar("epoch/loss", last["train_loss"])
      loop.scalar("epoch/accuracy", last["train_accuracy"])
      if compressed:
        loop.scalar("compression/sparsity", _compressed_sparsity(model))
    logging.info("%s epoch %d/%d done: loss %.4f accuracy %.4f (%.1f s)", phase,
                 epoch + 1, epochs, last["train_loss"], last["train_accuracy"],
                 time.time() - started)
  train_step.sync()
  writer.flush()
  images = (step - start_step) * global_batch
  return {"steps": step, "epochs": epochs, "resumed_from_step": start_step,
          "seconds": loop_seconds,
          "images_per_second": images / loop_seconds if loop_seconds else None,
          **last}
