"""Training under tf.distribute: FP32 (pre)training, OPQ compress + finetune.

    strategy = distribute.make_strategy("mirrored")
    checks.validate(config, strategy, workdir)            # the binary does this
    training.train_and_evaluate(config, workdir, strategy)

`train_and_evaluate` = `imagenet_manual.prepare_data` -> `train_fp32` (unless
`starting_point` says the FP32 weights exist) -> `compress_and_finetune`:

  load FP32 weights -> evaluate -> allocate (or reuse workdir/plan.json) ->
  opq_tf.apply -> evaluate -> finetune (`fit`) -> evaluate -> opq_tf.export.

The workdir after a full run:

    <workdir>/manual/              digits ILSVRC tars (embedded default only)
    <workdir>/tfds/                TFDS imagenet2012 records (idem)
    <workdir>/fp32/weights.h5, metrics.json     FP32 weights (train_fp32)
    <workdir>/fp32/checkpoints/    FP32 training checkpoints
    <workdir>/plan.json            the compression plan, computed once
    <workdir>/evaluations.json     accuracies before finetuning (cached)
    <workdir>/finetune/checkpoints/
    <workdir>/tensorboard/{fp32,finetune}/
    <workdir>/export/saved_model/  stripped model; serving_default takes JPEGs
    <workdir>/export/report.json, model.opq
    <workdir>/final_report.json

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
checkpoint is restored and training resumes mid-epoch: the epoch's dataset is
rebuilt with the same seed (`config.seed + epoch`) and the steps already done
are skipped, so a resumed run sees the batches an uninterrupted run would.
What a run starts from, and what it never recomputes, is `starting_point`.

Summaries go to <workdir>/tensorboard/<phase> (train/loss, train/accuracy,
train/learning_rate every log_every_steps; epoch/loss, epoch/accuracy and, when
finetuning, compression/sparsity: the fraction of zero compressed weights) in
TensorBoard's scalar format, written with tf.summary.write so that the
tensorboard package is not needed.

Export: <workdir>/export/saved_model is the stripped model (opq_tf.strip) with
one signature, serving_default(jpegs: tf.string [batch] of encoded JPEGs) ->
{logits [batch, classes], probabilities, classes int32 [batch]}; images are
decoded, centre-cropped and resized as in evaluation
(imagenet_input.preprocess_for_eval). report.json and model.opq beside it
come from opq_tf.export.

Multi-worker: only the chief writes to the workdir; other workers write their
(collective) checkpoints, weights and export to temporary directories that
they delete (under MultiWorkerMirroredStrategy reading BatchNorm's sync-on-read
statistics is a collective, so every worker must take part), and skip
summaries and JSON files.
"""

from __future__ import annotations

import dataclasses
import json
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

from opq_tf.core import allocation
from opq_tf.tf_keras import calibration
from opq_tf.training import distribute
from opq_tf.tf_keras import exporting
from opq_tf.core import files
from opq_tf.training import imagenet_input
from opq_tf.training import imagenet_manual
from opq_tf.tf_keras import layers
from opq_tf.tf_keras import litert
from opq_tf.training import models
from opq_tf.training import pretrained
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf

PLAN_FILE = "plan.json"
# Legacy (by layer name) HDF5; a name ending in .weights.h5 would select
# Keras' v3 format, which matches weights by model structure instead.
FP32_WEIGHTS = os.path.join("fp32", "weights.h5")
FP32_METRICS = os.path.join("fp32", "metrics.json")
FINAL_REPORT = "final_report.json"
EXPORT_DIR = "export"
_EVALUATIONS = "evaluations.json"
# The weights weight decay acts on (layers.weight_key's last part).


# --------------------------------------------------------------------------
# Where a run starts.


@dataclasses.dataclass(frozen=True)
class Start:
  """What `starting_point` found: which rule, and the FP32 weights to compress.

  `fp32_weights` is None when they do not exist yet (rule 4: train them).
  """

  rule: str
  fp32_weights: Optional[str]

  @property
  def trains_fp32(self) -> bool:
    return self.rule == "train"


def starting_point(config: ml_collections.ConfigDict, workdir: str) -> Start:
  """Where a run on `workdir` starts from; the first rule that holds wins.

  1. "plan": <workdir>/plan.json exists, so compression has begun. The plan is
     read back and never recomputed (not from other weights, not for a changed
     config: checks.validate refuses that); finetuning resumes from the latest
     <workdir>/finetune/checkpoints, whose masks and steps win over anything
     the FP32 weights would give. No FP32 training. The FP32 weights
     (config.pretrained, else <workdir>/fp32/weights.h5) only rebuild the
     model before the checkpoint is restored.
  2. "pretrained": config.pretrained names FP32 weights (a file, checkpoint,
     SavedModel or "imagenet"): they are compressed; no FP32 training.
  3. "fp32_weights": <workdir>/fp32/weights.h5 exists, left by a finished
     FP32 run (trainers/train.py, or an earlier run_default): compressed as
     they are; no FP32 training.
  4. "train": nothing to compress yet: train FP32 first, resuming from the
     latest <workdir>/fp32/checkpoints if a killed run left some, then
     compress the result (rule 3 from then on).
  """
  workdir_weights = os.path.join(workdir, FP32_WEIGHTS)
  weights = config.pretrained or (
      workdir_weights if os.path.exists(workdir_weights) else None)
  if os.path.exists(os.path.join(workdir, PLAN_FILE)):
    return Start("plan", weights)
  if config.pretrained:
    return Start("pretrained", config.pretrained)
  if weights:
    return Start("fp32_weights", weights)
  return Start("train", None)


# --------------------------------------------------------------------------
# Small helpers: JSON, schedule, data, summaries.


def _write_json(path: str, data: dict) -> None:
  """Atomic JSON; NumPy scalars become plain numbers."""
  files.write_json(path, json.loads(json.dumps(data, default=float)))


def _read_json(path: str) -> dict:
  """The JSON at `path`, or {} if there is none (nothing cached yet)."""
  return files.read_json(path) if os.path.exists(path) else {}


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


def _steps_per_epoch(config, data_dir: str) -> int:
  if config.steps_per_epoch:
    return config.steps_per_epoch
  steps = imagenet_input.num_examples(data_dir, "train") // config.global_batch_size
  if steps < 1:
    raise ValueError(
        f"The train split has fewer examples than one global batch "
        f"({config.global_batch_size}); lower --config.global_batch_size.")
  return steps


def _train_dataset_fn(config, data_dir: str, epoch: int, skip_steps: int):
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


def _scalar(tag: str, value: float) -> None:
  """tf.summary.scalar without the tensorboard package (same event format)."""
  tf.summary.write(tag, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA)


# --------------------------------------------------------------------------
# Steps and evaluation.


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
  trainable = model.trainable_variables

  def forward_backward(images, labels):
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      cross_entropy = tf.nn.compute_average_loss(
          keras.losses.sparse_categorical_crossentropy(
              labels, logits, from_logits=True),
          global_batch_size=global_batch_size)
      loss = cross_entropy
      if weight_decay:
        loss += tf.nn.scale_regularization_loss(kernel_l2(model, weight_decay))
    correct = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1),
                                    tf.float32))
    return cross_entropy, correct, tape.gradient(loss, trainable)

  if jit_compile:  # XLA cannot hold a cross-replica sync (merge_call).
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def replica_step(images, labels):
    cross_entropy, correct, gradients = forward_backward(images, labels)
    optimizer.apply_gradients(zip(gradients, trainable))
    return tf.stack([cross_entropy, correct])

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


# --------------------------------------------------------------------------
# The training loop.


def _compressed_sparsity(model: keras.Model) -> float:
  """Fraction of zeros in the compressed kernels (pruned, or rounded to 0)."""
  kernels = wrapping.compressed_kernels(model)
  zeros = sum(int(np.count_nonzero(k.compressed == 0)) for k in kernels)
  return zeros / sum(k.kernel.size for k in kernels)


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
  steps_per_epoch = _steps_per_epoch(config, data_dir)
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
  checkpoint_dir = os.path.join(workdir, phase, "checkpoints")
  write_dir = checkpoint_dir if chief else tempfile.mkdtemp(
      prefix=f"opq_{phase}_worker{distribute.task(strategy)[1]}_")
  manager = tf.train.CheckpointManager(
      checkpoint, write_dir, max_to_keep=config.checkpoints_to_keep,
      checkpoint_name="ckpt")
  latest = tf.train.latest_checkpoint(checkpoint_dir)
  if latest:
    checkpoint.restore(latest).assert_existing_objects_matched()
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
        _train_dataset_fn(config, data_dir, epoch, skip)))
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
          _scalar("train/loss", loss)
          _scalar("train/accuracy", correct / global_batch)
          _scalar("train/learning_rate", lr)
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
      _scalar("epoch/loss", last["train_loss"])
      _scalar("epoch/accuracy", last["train_accuracy"])
      if compressed:
        _scalar("compression/sparsity", _compressed_sparsity(model))
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


# --------------------------------------------------------------------------
# The phases.


def _build(config: ml_collections.ConfigDict,
           strategy: tf.distribute.Strategy) -> keras.Model:
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    return models.build(config.model, config.num_classes, config.image_size,
                        model_options=config.model_options,
                        preprocessing=config.preprocessing)


def train_fp32(config: ml_collections.ConfigDict, workdir: str,
               strategy: tf.distribute.Strategy) -> dict:
  """Trains the FP32 model (from config.pretrained if set, else from scratch).

  Writes <workdir>/fp32/weights.h5 (atomically, at the end) and
  <workdir>/fp32/metrics.json; a workdir that already has both is not
  retrained.

  Returns:
    {"accuracy": evaluate(...), "training": fit(...) figures}.
  """
  weights_path = os.path.join(workdir, FP32_WEIGHTS)
  metrics_path = os.path.join(workdir, FP32_METRICS)
  if os.path.exists(weights_path) and os.path.exists(metrics_path):
    logging.info("FP32 weights %s exist; not retraining.", weights_path)
    return _read_json(metrics_path)
  data_dir = imagenet_manual.prepare_data(config, workdir, strategy)
  model = _build(config, strategy)
  if config.pretrained:
    pretrained.load(model, config.pretrained)
  training = fit(model, config, strategy, data_dir, workdir, phase="fp32",
                 epochs=config.fp32_epochs,
                 learning_rate=config.fp32_learning_rate,
                 warmup_epochs=config.fp32_warmup_epochs)
  metrics = {"accuracy": evaluate(model, config, strategy, data_dir),
             "training": training}
  logging.info("FP32 %s: %s", config.model, metrics["accuracy"])
  # Every worker saves: reading BatchNorm's sync-on-read statistics is a
  # collective under MultiWorkerMirroredStrategy. Only the chief's file stays.
  if distribute.is_chief(strategy):
    pretrained.save(model, weights_path)
    _write_json(metrics_path, metrics)
  else:
    temp_dir = tempfile.mkdtemp()
    pretrained.save(model, os.path.join(temp_dir, "weights.h5"))
    shutil.rmtree(temp_dir, ignore_errors=True)
  distribute.barrier(strategy)  # The weights exist for every worker from here.
  return metrics


def _load_or_allocate_plan(model: keras.Model,
                           config: ml_collections.ConfigDict, workdir: str,
                           chief: bool) -> allocation.CompressionPlan:
  """The workdir's plan.json if there is one, else a new plan (saved)."""
  path = os.path.join(workdir, PLAN_FILE)
  if os.path.exists(path):
    logging.info("Reusing the compression plan %s", path)
    with open(path) as f:
      return allocation.CompressionPlan.from_json(f.read())
  plan = allocation.allocate(layers.compressible_kernels(model), config.pruning_rate, config.bits,
                             method=config.method, objective=config.objective,
                             step_granularity=config.step_granularity,
                             step_stats=config.step_stats)
  if chief:
    files.atomic_write(path, plan.to_json())
  return plan


def serving_fn(image_size: int):
  """The serving_default function of the export: JPEG bytes in, classes out.

  Input `jpegs`: tf.string [batch], each an encoded JPEG of any size; decoded,
  centre-cropped and resized by imagenet_input.preprocess_for_eval exactly as
  in evaluation. Outputs: `logits` float32 [batch, classes], `probabilities`
  (softmax), `classes` int32 [batch] (argmax).
  """

  def serve(model, jpegs):
    images = imagenet_input.preprocess_for_eval(jpegs, image_size)
    logits = model(images, training=False)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}

  return serve


SERVING_SIGNATURE = [tf.TensorSpec([None], tf.string, name="jpegs")]


def _calibration_images(config: ml_collections.ConfigDict, data_dir: str,
                        count: int) -> tf.data.Dataset:
  """The first `count` training images, evaluation-preprocessed (no labels).

  One pass in file order (TFDS shuffles examples across its record files when
  it prepares them), the same images on every worker and every rerun.
  """
  dataset_fn = imagenet_input.make_dataset_fn(
      split="train", data_dir=data_dir, image_size=config.image_size,
      global_batch_size=min(count, calibration.DEFAULT_BATCH_SIZE),
      train=False, num_classes=config.num_classes)
  return dataset_fn(None).map(lambda images, labels: images).take(
      -(-count // min(count, calibration.DEFAULT_BATCH_SIZE)))


def _calibrate(qmodel: keras.Model, config: ml_collections.ConfigDict,
               workdir: str, data_dir: str):
  """opq_tf.calibrate before finetuning; returns (seconds, CalibrationReport),
  (0, None) if skipped.

  Skipped when config.calibration_images is 0, and on a resumed run that has
  a finetuning checkpoint: that checkpoint already holds the calibrated (and
  since trained) BatchNorm statistics and kernels.
  """
  checkpoints = os.path.join(workdir, "finetune", "checkpoints")
  if (not config.calibration_images
      or tf.train.latest_checkpoint(checkpoints) is not None):
    return 0.0, None
  started = time.time()
  report = calibration.calibrate(
      qmodel, _calibration_images(config, data_dir, config.calibration_images),
      batchnorm=True, reconstruct=config.calibrate_reconstruct,
      max_images=config.calibration_images)
  return time.time() - started, report


def _calibration_summary(report) -> dict[str, Any]:
  """How many kernels calibrate reconstructed and whose biases it corrected
  (nothing when this process skipped calibration on a resumed run)."""
  if report is None:
    return {}
  rows = report.kernels.values()
  return {"batchnorm_layers": len(report.batchnorm_layers),
          "kernels_reconstructed": sum(r.method == "reconstructed" for r in rows),
          "biases_corrected": sum(r.bias_corrected for r in rows)}


def _representative_data(config: ml_collections.ConfigDict, data_dir: str):
  """LiteRT's representative dataset: one-image batches of training images."""
  if not (config.litert and config.litert_int8_activations):
    return None

  def images():
    for batch in _calibration_images(config, data_dir, 100):
      for image in batch:
        yield [image[None]]

  return images


def _litert_accuracy(qmodel: keras.Model, config: ml_collections.ConfigDict,
                     data_dir: str, export_dir: str) -> dict:
  """model.tflite against the stripped Keras model on validation images.

  With int8 activations, a float-activation .tflite of the same model is
  converted too and reported beside it, so the cost of quantizing the
  activations reads off one table. Every worker runs this (stripping reads
  BatchNorm's sync-on-read statistics, a collective across workers).
  """
  dataset = imagenet_input.make_dataset_fn(
      split="validation", data_dir=data_dir, image_size=config.image_size,
      global_batch_size=100, train=False,
      num_classes=config.num_classes)(None).take(5)
  images, labels = (np.concatenate(parts) for parts in zip(*[
      (batch_images.numpy(), batch_labels.numpy())
      for batch_images, batch_labels in dataset]))
  stripped = wrapping.strip(qmodel)
  exported = os.path.join(export_dir, litert.LITERT_FILE)
  activations = ("int8_activations" if config.litert_int8_activations
                 else "float_activations")
  result = {"images": int(len(labels)),
            activations: litert.compare(exported, stripped, images, labels)}
  if config.litert_int8_activations:
    with tempfile.TemporaryDirectory() as temp:
      float_path = os.path.join(temp, litert.LITERT_FILE)
      litert.convert(qmodel, float_path)
      result["float_activations"] = litert.compare(float_path, stripped,
                                                   images, labels)
  return result


def compress_and_finetune(config: ml_collections.ConfigDict, workdir: str,
                          strategy: tf.distribute.Strategy) -> dict:
  """OPQ: FP32 weights -> plan -> apply -> finetune -> evaluate -> export.

  The FP32 weights and whether the plan is reused follow `starting_point`:
  the plan is computed once from the FP32 weights and saved as
  <workdir>/plan.json; a resumed run reads it back (it is never recomputed,
  least of all from finetuned weights), and the masks and steps come back
  from the finetuning checkpoint.

  Returns:
    The final report (also printed and written to <workdir>/final_report.json).
  """
  started = time.time()
  chief = distribute.is_chief(strategy)
  data_dir = imagenet_manual.prepare_data(config, workdir, strategy)
  fp32_weights = starting_point(config, workdir).fp32_weights
  model = _build(config, strategy)
  pretrained.load(model, fp32_weights)
  evaluations_path = os.path.join(workdir, _EVALUATIONS)
  evaluations = _read_json(evaluations_path)
  # Every worker must decide alike whether to evaluate (a collective), so all
  # read the cache before the chief can write it.
  distribute.barrier(strategy)
  if "fp32" not in evaluations:
    evaluations["fp32"] = evaluate(model, config, strategy, data_dir)
    if chief:
      _write_json(evaluations_path, evaluations)

  allocate_started = time.time()
  plan = _load_or_allocate_plan(model, config, workdir, chief)
  with strategy.scope():
    qmodel = wrapping.apply(model, plan,
                            quantize_activations=config.quantize_activations)
  allocate_seconds = time.time() - allocate_started
  print(plan.table(), flush=True)
  if "compressed_before_finetune" not in evaluations:
    evaluations["compressed_before_finetune"] = evaluate(
        qmodel, config, strategy, data_dir)
    if chief:
      _write_json(evaluations_path, evaluations)
  calibrate_seconds, calibration_report = _calibrate(qmodel, config, workdir,
                                                    data_dir)
  if config.calibration_images and "calibrated" not in evaluations:
    evaluations["calibrated"] = evaluate(qmodel, config, strategy, data_dir)
    evaluations["calibration"] = _calibration_summary(calibration_report)
    if chief:
      _write_json(evaluations_path, evaluations)

  training = fit(qmodel, config, strategy, data_dir, workdir, phase="finetune",
                 epochs=config.num_epochs, learning_rate=config.learning_rate,
                 warmup_epochs=config.warmup_epochs)
  after = evaluate(qmodel, config, strategy, data_dir)

  # Every worker exports (see train_fp32); only the chief's export stays.
  export_dir = os.path.join(workdir, EXPORT_DIR)
  export_started = time.time()
  if os.path.exists(os.path.join(export_dir, exporting.REPORT_FILE)):
    export_report = _read_json(os.path.join(export_dir, exporting.REPORT_FILE))
  else:
    target = export_dir if chief else os.path.join(tempfile.mkdtemp(), "export")
    export_report = exporting.export(
        qmodel, target, plan=plan, serving_fn=serving_fn(config.image_size),
        input_signature=SERVING_SIGNATURE, litert=config.litert,
        litert_int8_activations=config.litert_int8_activations,
        representative_data=_representative_data(config, data_dir))
    if config.litert:
      export_report["litert"]["accuracy"] = _litert_accuracy(
          qmodel, config, data_dir, target)
    if not chief:
      shutil.rmtree(os.path.dirname(target), ignore_errors=True)
  export_seconds = time.time() - export_started

  fp32_metrics = _read_json(os.path.join(workdir, FP32_METRICS))
  report = {
      "model": config.model,
      "num_classes": config.num_classes,
      "image_size": config.image_size,
      "strategy": type(strategy).__name__,
      "replicas": strategy.num_replicas_in_sync,
      "pretrained": fp32_weights,
      "pruning_rate": config.pruning_rate,
      "bits": config.bits,
      "accuracy": {
          "fp32": evaluations["fp32"],
          "compressed_before_finetune": evaluations["compressed_before_finetune"],
          "calibrated_before_finetune": evaluations.get("calibrated"),
          "compressed_after_finetune": after,
      },
      "plan": {"realised_pruning_rate": plan.realised_pruning_rate,
               "weight_bits_ratio": plan.weight_bits_ratio,
               "kernels": len(plan.kernels)},
      "compression": {
          key: export_report[key] for key in (
              "weight_bits_ratio", "model_ratio", "fp32_model_bytes",
              "packed_bytes", "entropy_bound_bytes", "packed_over_bound",
              "realised_pruning_rate", "parameters", "compressed_weights",
              "kept_weights")},
      "finetune": training,
      "fp32_training": fp32_metrics.get("training"),
      "calibration": {"images": config.calibration_images,
                      "reconstruct": config.calibrate_reconstruct,
                      **evaluations.get("calibration", {})},
      "seconds": {"allocate_and_apply": allocate_seconds,
                  "calibrate": calibrate_seconds,
                  "finetune": training["seconds"], "export": export_seconds,
                  "compress_and_finetune_total": time.time() - started},
      "export": {"saved_model": os.path.join(export_dir, exporting.SAVED_MODEL_DIR),
                 "report": os.path.join(export_dir, exporting.REPORT_FILE),
                 "packed": os.path.join(export_dir, exporting.PACKED_FILE)},
  }
  if "litert" in export_report:
    report["litert"] = export_report["litert"]
  if chief:
    _write_json(os.path.join(workdir, FINAL_REPORT), report)
    print(format_report(report), flush=True)
  return report


def format_report(report: dict) -> str:
  """A few human lines of the final report."""
  lines = [f"OPQ {report['model']}: p={report['pruning_rate']}, "
           f"B={report['bits']}, {report['replicas']} replica(s)"]
  for name, accuracy in report["accuracy"].items():
    lines.append(f"  {name:28s} top-1 {accuracy['top1']:.4f}  "
                 f"top-5 {accuracy['top5']:.4f}  ({accuracy['examples']} images)")
  compression = report["compression"]
  if compression:
    lines.append(
        f"  weight-bits ratio {compression['weight_bits_ratio']:.2f}x, model "
        f"ratio {compression['model_ratio']:.2f}x ({compression['packed_bytes']} "
        f"bytes packed, {compression['packed_over_bound']:.3f} x entropy bound), "
        f"pruned {compression['realised_pruning_rate']:.2%}")
  finetune = report["finetune"]
  if finetune.get("images_per_second"):
    lines.append(f"  finetune {finetune['seconds']:.1f} s, "
                 f"{finetune['images_per_second']:.1f} images/s")
  lines.append(f"  total {report['seconds']['compress_and_finetune_total']:.1f} s;"
               f" export in {report['export']['saved_model']}")
  return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: tf.distribute.Strategy) -> dict:
  """The whole job: data -> FP32 training (if `starting_point` says) -> OPQ.

  The config is assumed valid (checks.validate, which the trainers run).

  Returns:
    The final report of compress_and_finetune, plus "wall_seconds".
  """
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  imagenet_manual.prepare_data(config, workdir, strategy)
  if starting_point(config, workdir).trains_fp32:
    train_fp32(config, workdir, strategy)
  report = compress_and_finetune(config, workdir, strategy)
  report["wall_seconds"] = time.time() - started
  if distribute.is_chief(strategy):
    _write_json(os.path.join(workdir, FINAL_REPORT), report)
  return report
