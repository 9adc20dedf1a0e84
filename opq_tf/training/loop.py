"""The training loop under tf.distribute: the steps, evaluation and `fit`.

    train_step = loop.make_train_step(model, optimizer, strategy,
                                      global_batch_size=64, weight_decay=1e-4)
    figures = loop.fit(model, config, strategy, data_dir, workdir,
                       phase="finetune", epochs=8, learning_rate=0.02,
                       warmup_epochs=0.5)
    accuracy = loop.evaluate(model, config, strategy, data_dir)

Training step (`make_train_step`). One `tf.function` step runs `strategy.run`
of the replica step on the next element of a distributed iterator; with
jit_compile the forward/backward pass is its own XLA-compiled tf.function (the
gradient all-reduce stays outside it, and so must any cross-replica sync such
as synchronized BatchNorm: small_resnet compiles only on one replica). The
loss of each replica is its examples' summed cross-entropy over the GLOBAL
batch (`tf.nn.compute_average_loss`), so summing the replicas' gradients (what
the optimizer's all-reduce does) gives the gradient of the global-batch mean.

Weight decay (`kernel_l2`) is coupled L2 on the conv/dense kernels only (not
on biases or BatchNorm): loss += wd/2 * Σ||W||², i.e. grad += wd * W,
PyTorch's SGD `weight_decay` (which the paper's recipe comes from) restricted
to kernels; it is divided by the number of replicas
(`tf.nn.scale_regularization_loss`) so the summed gradient counts it once. For
a compressed model the decay acts on the latent FP32 kernels; pruned
positions stay zero in the forward pass.

Learning rate: linear warmup from 0 over `warmup_epochs`, then cosine decay to
0 at the last step (`WarmupCosine`).

Checkpoints (tf.train.CheckpointManager: model with masks and steps,
optimizer, step, epoch) every `steps_per_checkpoint` steps and at each epoch
end. TensorFlow writes the data files, then the index, and updates the
`checkpoint` state file last and atomically, so an interrupted save is never
listed and `latest_checkpoint` is always complete. On start the latest
readable checkpoint is restored (`restore_latest_readable`: one damaged
later is skipped with a warning) and training resumes mid-epoch: the
epoch's dataset is rebuilt with the same seed (`config.seed + epoch`) and
the steps already done are skipped, so a resumed run sees the batches an
uninterrupted run would.

Summaries go to <workdir>/tensorboard/<phase> (train/loss, train/accuracy,
train/learning_rate every log_every_steps; epoch/loss, epoch/accuracy and, when
finetuning, compression/sparsity: the fraction of zero compressed weights) in
TensorBoard's scalar format, written with tf.summary.write so that the
tensorboard package is not needed.

Multi-worker: only the chief writes checkpoints and summaries to the workdir;
the other workers save their (collective) checkpoints to a temporary
directory that they delete, and skip summaries.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from absl import logging
import ml_collections
import numpy as np

from opq_tf.tf_keras import layers
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf
from opq_tf.training import distribute
from opq_tf.training import imagenet_input
from opq_tf.training import layout


@keras.utils.register_keras_serializable(package="opq_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
  """lr(s) = base·s/W for s < W, then base·(1 + cos(π(s - W)/(T - W)))/2.

  W = warmup_steps, T = total_steps; lr reaches 0 at s = T. Cosine decay has no
  milestones to tune, and the warmup keeps the first momentum-free steps from
  knocking freshly quantized weights across grid points.
  """

  def __init__(self, base_learning_rate: float, warmup_steps: int,
               total_steps: int):
    super().__init__()
    self.base_learning_rate = float(base_learning_rate)
    self.warmup_steps = int(warmup_steps)
    self.total_steps = max(int(total_steps), 1)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    base = tf.constant(self.base_learning_rate, tf.float32)
    warmup = tf.constant(float(self.warmup_steps), tf.float32)
    decay_steps = tf.constant(float(max(self.total_steps - self.warmup_steps, 1)),
                              tf.float32)
    progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = base * 0.5 * (1.0 + tf.cos(math.pi * progress))
    warm = base * step / tf.maximum(warmup, 1.0)
    return tf.where(step < warmup, warm, cosine)

  def get_config(self):
    return {"base_learning_rate": self.base_learning_rate,
            "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def epoch_length(config: ml_collections.ConfigDict, data_dir: str) -> int:
  """config.steps_per_epoch, or (when it is 0) one pass over the train split."""
  if config.steps_per_epoch:
    return config.steps_per_epoch
  steps = imagenet_input.num_examples(data_dir, "train") // config.global_batch_size
  if steps < 1:
    raise ValueError(
        f"The train split has fewer examples than one global batch "
        f"({config.global_batch_size}); lower --config.global_batch_size.")
  return steps


def train_dataset_fn(config: ml_collections.ConfigDict, data_dir: str,
                      epoch: int, skip_steps: int) -> Callable[[Any], Any]:
  """Epoch `epoch`'s dataset_fn (seed config.seed + epoch), `skip_steps` skipped.

  Each pipeline yields per-replica batches that the strategy hands to its local
  replicas in turn, so one global step consumes local_replicas elements.
  """
  dataset_fn = imagenet_input.make_dataset_fn(
      split="train", data_dir=data_dir, image_size=config.image_size,
      global_batch_size=config.global_batch_size, train=True,
      num_classes=config.num_classes, seed=config.seed + epoch)

  def skipped_dataset_fn(input_context):
    local_replicas = (input_context.num_replicas_in_sync
                      // input_context.num_input_pipelines)
    return dataset_fn(input_context).skip(skip_steps * local_replicas)

  return skipped_dataset_fn


# TensorBoard's scalar-plugin metadata, so summaries need no tensorboard package.
_SCALAR_METADATA = tf.compat.v1.SummaryMetadata(
    plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=tf.compat.v1.SummaryMetadata.DESCRIPTOR.fields_by_name[
        "data_class"].enum_type.values_by_name["DATA_CLASS_SCALAR"].number)


def scalar(tag: str, value: float) -> None:
  """tf.summary.scalar without the tensorboard package (same event format)."""
  tf.summary.write(tag, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA)



def kernel_l2(model: keras.Model, weight_decay: float) -> tf.Tensor:
  """wd/2 · Σ||W||² over the trainable kernels: the trainer's weight decay.

  Its gradient is wd · W on every conv/dense kernel (PyTorch SGD's coupled
  weight_decay restricted to kernels); biases and BatchNorm are not decayed.
  Per replica, divide by the replica count (tf.nn.scale_regularization_loss)
  so that the all-reduced gradient counts it once, as `make_train_step` does.
  """
  kernels = layers.decayed_weights(model)
  if not weight_decay or not kernels:
    return tf.constant(0.0)
  return 0.5 * float(weight_decay) * tf.add_n(
      [tf.reduce_sum(tf.square(kernel)) for kernel in kernels])


def make_replica_step(model: Any, optimizer: Any, *, global_batch_size: int,
                      decay: Optional[Callable[[], tf.Tensor]],
                      jit_compile: bool
                      ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """One replica's share of a synchronous SGD step, for `strategy.run`.

  The same for a tf_keras and a Keras 3 model on TensorFlow (keras3_loop
  runs it too): the cross-entropy averaged over the global batch, plus
  `decay()` (the weight decay, scaled by the replica count), its gradient
  applied by `optimizer`. Returns replica_step(images, labels) -> float32
  [2]: the cross-entropy and the number of correct top-1 predictions.
  """
  trainable = model.trainable_variables

  def forward_backward(images, labels):
    with tf.GradientTape() as tape:
      logits = tf.cast(model(images, training=True), tf.float32)
      cross_entropy = tf.nn.compute_average_loss(
          tf.nn.sparse_softmax_cross_entropy_with_logits(
              tf.cast(labels, tf.int32), logits),
          global_batch_size=global_batch_size)
      loss = cross_entropy
      if decay is not None:
        loss += tf.nn.scale_regularization_loss(decay())
    correct = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1),
                                    tf.float32))
    return cross_entropy, correct, tape.gradient(loss, trainable)

  if jit_compile:  # XLA cannot hold a cross-replica sync (merge_call).
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def replica_step(images, labels):
    cross_entropy, correct, gradients = forward_backward(images, labels)
    optimizer.apply_gradients(zip(gradients, trainable))
    return tf.stack([cross_entropy, correct])

  return replica_step


def make_train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    strategy: tf.distribute.Strategy, *,
                    global_batch_size: int, weight_decay: float = 0.0,
                    jit_compile: bool = False
                    ) -> Callable[[Any], tf.Tensor]:
  """One synchronous SGD step over `strategy`'s replicas, as a tf.function.

  Args:
    model, optimizer: built under `strategy.scope()`.
    strategy: the strategy the step runs under.
    global_batch_size: the batch over all replicas, which the per-replica
      cross-entropy is averaged over (so summing gradients gives the mean).
    weight_decay: `kernel_l2`'s coefficient.
    jit_compile: XLA-compile the forward/backward pass (not the all-reduce).

  Returns:
    train_step(iterator) -> float32 [2]: the step's cross-entropy (mean over
    the global batch) and number of correct top-1 predictions, after applying
    the update. `iterator` yields (images, labels) per-replica batches, e.g.
    iter(strategy.distribute_datasets_from_function(...)).
  """
  replica_step = make_replica_step(
      model, optimizer, global_batch_size=global_batch_size,
      decay=(lambda: kernel_l2(model, weight_decay)) if weight_decay else None,
      jit_compile=jit_compile)

  @tf.function
  def train_step(iterator):
    images, labels = next(iterator)
    sums = strategy.run(replica_step, args=(images, labels))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

  return train_step


def make_eval_step(model: keras.Model, strategy: tf.distribute.Strategy
                   ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """eval_step(images, labels) -> float32 [4] sums over the replicas' batches:

  [cross-entropy, top-1 correct, top-5 correct (top-k, k = min(5, classes)),
  examples]; a partial last batch counts exactly its examples.
  """
  top_k = min(5, int(model.output_shape[-1]))

  def replica_step(images, labels):
    logits = model(images, training=False)
    loss = keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)
    top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)
    top5 = tf.cast(tf.math.in_top_k(labels, logits, top_k), tf.float32)
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.stack([tf.reduce_sum(loss), tf.reduce_sum(top1),
                     tf.reduce_sum(top5), count])

  @tf.function(reduce_retracing=True)
  def eval_step(images, labels):
    sums = strategy.run(replica_step, args=(images, labels))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

  return eval_step


def evaluate(model: keras.Model, config: ml_collections.ConfigDict,
             strategy: tf.distribute.Strategy, data_dir: str) -> dict:
  """Top-1 / top-5 accuracy and mean cross-entropy on the validation split.

  Every validation example counts once (the last batch may be partial).
  """
  dataset = strategy.distribute_datasets_from_function(
      imagenet_input.make_dataset_fn(
          split="validation", data_dir=data_dir, image_size=config.image_size,
          global_batch_size=config.eval_batch_size, train=False,
          num_classes=config.num_classes))
  eval_step = make_eval_step(model, strategy)
  totals = np.zeros(4, np.float64)
  for images, labels in dataset:
    totals += eval_step(images, labels).numpy()
  loss, top1, top5, count = totals
  return {"top1": float(top1 / count), "top5": float(top5 / count),
          "loss": float(loss / count), "examples": int(count)}


def _compressed_sparsity(model: keras.Model) -> float:
  """Fraction of zeros in the compressed kernels (pruned, or rounded to 0)."""
  kernels = wrapping.compressed_kernels(model)
  zeros = sum(int(np.count_nonzero(k.compressed == 0)) for k in kernels)
  return zeros / sum(k.kernel.size for k in kernels)


def restore_latest_readable(checkpoint: tf.train.Checkpoint,
                            checkpoint_dir: str) -> Optional[str]:
  """Restores the newest readable checkpoint listed in `checkpoint_dir`.

  A listed checkpoint is complete when written (see the module docstring),
  but a file can be damaged after that (a disk filling up, a copy cut short):
  such a one is skipped with a warning naming its files, and the previous one
  is restored, so one bad file costs the steps since the previous
  checkpoint rather than every rerun. (Keep at least two:
  config.checkpoints_to_keep >= 2.)

  Returns:
    The restored checkpoint's prefix, or None if none is listed.

  Raises:
    layout.WorkdirError: checkpoints are listed but none is readable.
  """
  state = tf.train.get_checkpoint_state(checkpoint_dir)
  if state is None:
    return None
  prefixes = list(state.all_model_checkpoint_paths)
  if state.model_checkpoint_path not in prefixes:
    prefixes.append(state.model_checkpoint_path)
  failures = []
  for prefix in reversed(prefixes):
    path = os.path.join(checkpoint_dir, prefix)  # join keeps an absolute one
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
      return path
    except (tf.errors.OpError, IndexError, ValueError, AssertionError) as error:
      named = ", ".join(sorted(glob.glob(glob.escape(path) + ".*"))) or path
      logging.warning("Checkpoint %s is unreadable (%s: %s); falling back to "
                      "the previous one.", named, type(error).__name__,
                      str(error).splitlines()[0] if str(error) else "")
      failures.append(named)
  raise layout.WorkdirError(
      f"No checkpoint under {checkpoint_dir} is readable ({'; '.join(failures)}"
      " are truncated, corrupt or of another model). Remove that directory to "
      "train this phase again from its start, or restore its files from a "
      "copy.")


def fit(model: keras.Model, config: ml_collections.ConfigDict,
        strategy: tf.distribute.Strategy, data_dir: str, workdir: str, *,
        phase: str, epochs: int, learning_rate: float, warmup_epochs: float
        ) -> dict:
  """Trains `model` (built in strategy.scope) for `epochs`, resuming if possible.

  Checkpoints go to <workdir>/<phase>/checkpoints (the chief's; other workers
  write theirs to a temporary directory), summaries to
  <workdir>/tensorboard/<phase>.

  Returns:
    {"steps", "epochs", "train_loss", "train_accuracy" (last epoch), "seconds",
     "images_per_second", "resumed_from_step"}.
  """
  chief = distribute.is_chief(strategy)
  steps_per_epoch = epoch_length(config, data_dir)
  total_steps = epochs * steps_per_epoch
  schedule = WarmupCosine(learning_rate, round(warmup_epochs * steps_per_epoch),
                          total_steps)
  with strategy.scope():
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum,
                                     jit_compile=config.jit_compile)
    optimizer.build(model.trainable_variables)
    # The step decides where to resume; the epoch is kept for readers. Under
    # a MirroredStrategy they are MirroredVariables, which int() refuses:
    # read them with .numpy().
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   step=step_var, epoch=epoch_var)
  checkpoint_dir = layout.checkpoint_dir(workdir, phase)
  write_dir = checkpoint_dir if chief else tempfile.mkdtemp(
      prefix=f"opq_{phase}_worker{distribute.task(strategy)[1]}_")
  manager = tf.train.CheckpointManager(
      checkpoint, write_dir, max_to_keep=config.checkpoints_to_keep,
      checkpoint_name="ckpt")
  latest = restore_latest_readable(checkpoint, checkpoint_dir)
  start_step = int(step_var.numpy())
  if latest:
    logging.info("%s: restored %s (step %d)", phase, latest, start_step)

  global_batch = config.global_batch_size
  train_step = make_train_step(
      model, optimizer, strategy, global_batch_size=global_batch,
      weight_decay=float(config.weight_decay), jit_compile=config.jit_compile)

  writer = (tf.summary.create_file_writer(os.path.join(workdir, "tensorboard", phase))
            if chief else tf.summary.create_noop_writer())
  compressed = wrapping.is_compressed(model)
  step = start_step
  loop_seconds, last = 0.0, {}
  for epoch in range(start_step // steps_per_epoch, epochs):
    skip = step - epoch * steps_per_epoch
    iterator = iter(strategy.distribute_datasets_from_function(
        train_dataset_fn(config, data_dir, epoch, skip)))
    progbar = (keras.utils.Progbar(steps_per_epoch, stateful_metrics=["lr"])
               if chief and sys.stdout.isatty() else None)
    epoch_loss = epoch_correct = 0.0
    epoch_steps = 0
    started = time.time()
    for _ in range(skip, steps_per_epoch):
      loss, correct = (float(value) for value in train_step(iterator).numpy())
      step += 1
      epoch_steps += 1
      epoch_loss += loss
      epoch_correct += correct
      log = step % config.log_every_steps == 0 or step == total_steps
      lr = float(schedule(step - 1)) if log or progbar else None
      if log:
        with writer.as_default(step=step):
          scalar("train/loss", loss)
          scalar("train/accuracy", correct / global_batch)
          scalar("train/learning_rate", lr)
        if progbar is None:
          logging.info("%s epoch %d/%d step %d/%d: loss %.4f accuracy %.4f lr %.5g",
                       phase, epoch + 1, epochs, step, total_steps, loss,
                       correct / global_batch, lr)
      if progbar is not None:
        progbar.update(step - epoch * steps_per_epoch,
                       [("loss", loss), ("accuracy", correct / global_batch),
                        ("lr", lr)])
      if step % config.steps_per_checkpoint == 0 and (
          step % steps_per_epoch != 0):
        step_var.assign(step)
        manager.save(checkpoint_number=step)
    loop_seconds += time.time() - started
    step_var.assign(step)
    epoch_var.assign(epoch + 1)
    manager.save(checkpoint_number=step)
    last = {"train_loss": epoch_loss / max(epoch_steps, 1),
            "train_accuracy": epoch_correct / max(epoch_steps * global_batch, 1)}
    with writer.as_default(step=step):
      scalar("epoch/loss", last["train_loss"])
      scalar("epoch/accuracy", last["train_accuracy"])
      if compressed:
        scalar("compression/sparsity", _compressed_sparsity(model))
    logging.info("%s epoch %d/%d done: loss %.4f accuracy %.4f (%.1f s)", phase,
                 epoch + 1, epochs, last["train_loss"], last["train_accuracy"],
                 time.time() - started)
  writer.flush()
  if not chief:
    shutil.rmtree(write_dir, ignore_errors=True)
  images = (step - start_step) * global_batch
  return {"steps": step, "epochs": epochs, "resumed_from_step": start_step,
          "seconds": loop_seconds,
          "images_per_second": images / loop_seconds if loop_seconds else None,
          **last}

