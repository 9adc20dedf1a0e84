"""Training under tf.distribute: FP32 (pre)training, OPQ compress + finetune.

    strategy = training.make_strategy("mirrored")
    training.validate(config, strategy, workdir)          # before anything
    training.train_and_evaluate(config, workdir, strategy)

`train_and_evaluate` = `prepare_data` -> `train_fp32` (skipped when
config.pretrained names FP32 weights) -> `compress_and_finetune`:

  load FP32 weights -> evaluate -> allocate (or reuse workdir/plan.json) ->
  opq_tf.apply -> evaluate -> finetune -> evaluate -> opq_tf.export.

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

Training loop. One `tf.function` step runs `strategy.run` of the replica step on
the next element of a distributed iterator; with config.jit_compile the
forward/backward pass is its own XLA-compiled tf.function (the gradient
all-reduce stays outside it, and so must any cross-replica sync such as
synchronized BatchNorm: small_resnet compiles only on one replica). The loss of each
replica is its examples' summed cross-entropy over the GLOBAL batch
(`tf.nn.compute_average_loss`), so summing the replicas' gradients (what the
optimizer's all-reduce does) gives the gradient of the global-batch mean.

Weight decay is coupled L2 on the conv/dense kernels only (not on biases or
BatchNorm): loss += wd/2 * Σ||W||², i.e. grad += wd * W, PyTorch's SGD
`weight_decay` (which the paper's recipe comes from) restricted to kernels;
it is divided by the number of replicas (`tf.nn.scale_regularization_loss`)
so the summed gradient counts it once. For a compressed model the decay acts on
the latent FP32 kernels; pruned positions stay zero in the forward pass.

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

from opq_tf import allocation
from opq_tf import wrapping
from opq_tf import exporting
from opq_tf import imagenet_input
from opq_tf import models
from opq_tf._keras import keras, tf

STRATEGIES = ("mirrored", "multi_worker", "one_device")
PLAN_FILE = "plan.json"
# Legacy (by layer name) HDF5; a name ending in .weights.h5 would select
# Keras' v3 format, which matches weights by model structure instead.
FP32_WEIGHTS = os.path.join("fp32", "weights.h5")
FINAL_REPORT = "final_report.json"
EXPORT_DIR = "export"
_EVALUATIONS = "evaluations.json"
# Record files per split for the digits stand-in, so that up to this many
# workers each get a file to read (file-level sharding).
_DIGITS_NUM_SHARDS = 4


# --------------------------------------------------------------------------
# Strategy.


def make_strategy(name: str = "mirrored", cpu_devices: int = 0
                  ) -> tf.distribute.Strategy:
  """Returns the tf.distribute strategy to train under.

  Args:
    name: "mirrored" (all local GPUs; without GPUs, all logical CPU devices),
      "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes from the
      TF_CONFIG environment variable), or "one_device" (GPU 0, else CPU 0).
    cpu_devices: if > 0, split the host CPU into this many logical devices
      first (so "mirrored" runs that many replicas on a machine without GPUs;
      handy to test distribution). Must be called before TensorFlow starts
      its runtime, i.e. before any other TF op.

  Raises:
    ValueError: unknown name, or cpu_devices after the runtime has started.
  """
  if name not in STRATEGIES:
    raise ValueError(
        f"Unknown strategy {name!r}; use one of {STRATEGIES} (--strategy=...).")
  if isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or (
      cpu_devices < 0):
    raise ValueError(f"cpu_devices must be an integer >= 0, got {cpu_devices!r}.")
  if cpu_devices:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    except RuntimeError as error:
      if len(tf.config.list_logical_devices("CPU")) != cpu_devices:
        raise ValueError(
            f"Cannot split the CPU into {cpu_devices} devices: TensorFlow has "
            "already started; call make_strategy first.") from error
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if gpus:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.MirroredStrategy(
      [device.name for device in tf.config.list_logical_devices("CPU")])


def _task(strategy: tf.distribute.Strategy) -> tuple[Optional[str], int]:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return None, 0
  return resolver.task_type, int(resolver.task_id or 0)


def _num_workers(strategy: tf.distribute.Strategy) -> int:
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return 1
  spec = resolver.cluster_spec().as_dict()
  return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the one process that writes the workdir."""
  task_type, task_id = _task(strategy)
  if task_type in (None, "chief"):
    return True
  resolver = strategy.cluster_resolver
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief


def _barrier(strategy: tf.distribute.Strategy) -> None:
  """Waits until every worker gets here (a tiny all-reduce)."""
  if _num_workers(strategy) > 1:
    strategy.reduce(tf.distribute.ReduceOp.SUM,
                    strategy.run(lambda: tf.constant(1.0)), axis=None)


# --------------------------------------------------------------------------
# Config checks, all before any training or any write.

_PHASES = ("fp32", "compress", "all")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool) and math.isfinite(value))


# field -> (check, what it must be). Every field of configs/default.py.
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: v in models.NAMES, f"one of {models.NAMES}"),
    "num_classes": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "image_size": (lambda v: _is_int(v) and v >= 8, "an integer >= 8"),
    "data_dir": (lambda v: isinstance(v, str), "a path or ''"),
    "manual_dir": (lambda v: isinstance(v, str), "a path or ''"),
    "build_digits_manual_dir": (lambda v: isinstance(v, bool), "True or False"),
    "pretrained": (lambda v: isinstance(v, str), "a path, 'imagenet' or ''"),
    "global_batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "steps_per_epoch": (lambda v: _is_int(v) and v >= 0,
                        "an integer >= 0 (0 = one pass over the train split)"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "fp32_epochs": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "fp32_learning_rate": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "fp32_warmup_epochs": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "pruning_rate": (lambda v: _is_number(v) and 0 <= v < 1,
                     "a number in [0, 1), the fraction of weights pruned"),
    "bits": (lambda v: _is_int(v) and 2 <= v <= 8, "an integer in 2..8"),
    "allocation": (lambda v: v in allocation.STRATEGIES,
                   f"one of {allocation.STRATEGIES}"),
    "step_stats": (lambda v: v in allocation.STEP_STATS,
                   f"one of {allocation.STEP_STATS}"),
    "quantize_activations": (lambda v: isinstance(v, bool), "True or False"),
    "num_epochs": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "learning_rate": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "warmup_epochs": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "steps_per_checkpoint": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "checkpoints_to_keep": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "log_every_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "jit_compile": (lambda v: isinstance(v, bool), "True or False"),
}


def _check_fields(config: ml_collections.ConfigDict) -> None:
  unknown = sorted(set(config.keys()) - set(_FIELDS))
  if unknown:
    raise ValueError(
        f"Unknown config field(s) {unknown}; the fields are those of "
        f"configs/default.py: {sorted(_FIELDS)}.")
  missing = sorted(set(_FIELDS) - set(config.keys()))
  if missing:
    raise ValueError(
        f"Config is missing field(s) {missing}; start the config from "
        "configs/default.py's get_config().")
  for field, (check, must_be) in _FIELDS.items():
    value = config[field]
    if not check(value):
      raise ValueError(
          f"config.{field}={value!r} is invalid: it must be {must_be}. Fix it "
          f"in the config file or with --config.{field}=<value>.")
  least = models.MIN_IMAGE_SIZE[config.model]
  if config.image_size < least:
    raise ValueError(
        f"config.image_size={config.image_size} is too small for "
        f"{config.model}, which needs at least {least}; set "
        f"--config.image_size=<{least} or more>.")
  for warmup, epochs in (("fp32_warmup_epochs", "fp32_epochs"),
                         ("warmup_epochs", "num_epochs")):
    if config[epochs] and config[warmup] > config[epochs]:
      raise ValueError(
          f"config.{warmup}={config[warmup]} is longer than config.{epochs}="
          f"{config[epochs]}; shorten the warmup.")


def _check_workdir(workdir: str) -> None:
  """The workdir exists and is writable, or can be created; nothing is made."""
  if not workdir:
    raise ValueError("No workdir given; pass --workdir=<directory>.")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"workdir {workdir!r} is a file; pass a directory.")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(
        f"workdir {workdir!r} cannot be created: {existing!r} is a file. Pass "
        "another --workdir.")
  try:  # os.access says yes to root even on read-only file systems.
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    raise ValueError(
        f"workdir {workdir!r} is not writable ({existing!r}: "
        f"{error.strerror}); pass a --workdir you can write to.") from error


def data_dirs(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  """(TFDS data_dir, ILSVRC manual_dir or '') this config reads from.

  An empty config.data_dir means <workdir>/tfds for the digits stand-in
  (build_digits_manual_dir) and TFDS's default (~/tensorflow_datasets or
  $TFDS_DATA_DIR) otherwise; an empty manual_dir means <workdir>/manual for the
  digits stand-in (built there) and "already prepared" otherwise.
  """
  digits = config.build_digits_manual_dir
  data_dir = config.data_dir or (
      os.path.join(workdir, "tfds") if digits else os.path.expanduser(
          os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))
  manual_dir = config.manual_dir or (
      os.path.join(workdir, "manual") if digits else "")
  return data_dir, manual_dir


def _is_prepared(data_dir: str) -> bool:
  try:
    imagenet_input.num_examples(data_dir, "train")
  except ValueError:
    return False
  return True


def _check_data(config, workdir: str, strategy) -> None:
  data_dir, manual_dir = data_dirs(config, workdir)
  if config.manual_dir:
    imagenet_input.check_manual_dir(config.manual_dir)
  elif not config.build_digits_manual_dir and not _is_prepared(data_dir):
    raise ValueError(
        f"TFDS imagenet2012 is not prepared under data_dir {data_dir!r} and no "
        "manual_dir was given: pass --manual_dir=<dir with the ILSVRC2012 tars> "
        "(prepared once into --data_dir), or --data_dir=<a prepared data_dir>.")
  elif manual_dir and os.path.exists(manual_dir):
    imagenet_input.check_manual_dir(manual_dir)
  if _is_prepared(data_dir):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder(imagenet_input.DATASET_NAME, data_dir=data_dir)
    workers = _num_workers(strategy)
    for split in ("train", "validation"):
      files = len(builder.info.splits[split].file_instructions)
      if files < workers:
        raise ValueError(
            f"The {split} split under {data_dir!r} has {files} record file(s) "
            f"but there are {workers} workers, each needing one; prepare into "
            "a fresh --data_dir (it is sharded for the number of workers).")


def _fp32_source(config, workdir: str) -> str:
  """Where compress_and_finetune reads the FP32 weights from."""
  return config.pretrained or os.path.join(workdir, FP32_WEIGHTS)


def _check_plan_file(config, workdir: str) -> None:
  path = os.path.join(workdir, PLAN_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      plan = allocation.CompressionPlan.from_json(f.read())
  except (ValueError, TypeError, KeyError) as error:
    raise ValueError(
        f"{path} is not a readable compression plan ({error}); use a fresh "
        "--workdir.") from error
  wanted = {"target_pruning_rate": float(config.pruning_rate),
            "bits": config.bits, "strategy": config.allocation,
            "step_stats": config.step_stats}
  found = {key: getattr(plan, key) for key in wanted}
  if found != wanted:
    raise ValueError(
        f"{path} was computed for {found}, but the config asks for {wanted}. "
        "The plan of a workdir is never recomputed; use a fresh --workdir "
        "(or restore the config values).")


def validate(config: ml_collections.ConfigDict, strategy: tf.distribute.Strategy,
             workdir: str, *, phase: str = "all") -> None:
  """Raises ValueError naming the problem and the fix for any bad input.

  Runs before any training and writes nothing. Checks every config field's
  type and range (pruning_rate in [0, 1), bits in 2..8, positive learning
  rates, ...), that the global and eval batches divide into the strategy's
  replicas, that the workdir is writable, the ILSVRC manual_dir (or a prepared
  data_dir), that the pre-trained weights load into the model (shapes), and
  that an existing workdir/plan.json matches the config.

  Args:
    config: a ConfigDict from configs/.
    strategy: the strategy the run will use.
    workdir: the run's directory.
    phase: "fp32" (train_fp32), "compress" (compress_and_finetune: FP32
      weights must exist) or "all" (train_and_evaluate).
  """
  if phase not in _PHASES:
    raise ValueError(f"Unknown phase {phase!r}; use one of {_PHASES}.")
  _check_fields(config)
  replicas = strategy.num_replicas_in_sync
  for field in ("global_batch_size", "eval_batch_size"):
    if config[field] % replicas:
      raise ValueError(
          f"config.{field}={config[field]} is not divisible by the "
          f"{replicas} replicas of the strategy; pass a multiple of {replicas}, "
          f"e.g. --config.{field}={max(1, config[field] // replicas) * replicas}.")
  if config.jit_compile and replicas > 1 and config.model == "small_resnet":
    raise ValueError(
        "config.jit_compile=True cannot compile small_resnet's synchronized "
        "BatchNorm (a cross-replica sync) with more than one replica; set "
        "--config.jit_compile=False or use one replica.")
  _check_workdir(workdir)
  _check_data(config, workdir, strategy)
  fp32_weights = os.path.join(workdir, FP32_WEIGHTS)
  if phase == "fp32" and config.fp32_epochs == 0:
    raise ValueError("config.fp32_epochs is 0: nothing to train; set "
                     "--config.fp32_epochs=<n>.")
  if not config.pretrained and not os.path.exists(fp32_weights) and (
      phase == "compress" or config.fp32_epochs == 0):
    raise ValueError(
        f"No FP32 weights to compress: {fp32_weights} does not exist, "
        "config.pretrained is empty" + (
            " and config.fp32_epochs is 0" if phase == "all" else "") +
        ". Pass --pretrained=<weights>, or train them first (trainers/train.py,"
        " or --config.fp32_epochs=<n>).")
  if config.pretrained == "imagenet":
    models.check_imagenet_weights(config.model, config.num_classes,
                                  config.image_size)
  elif config.pretrained:
    model = models.build(config.model, config.num_classes, config.image_size)
    models.load_pretrained(model, config.pretrained)
  if phase != "fp32":
    _check_plan_file(config, workdir)


# --------------------------------------------------------------------------
# Small helpers: atomic files, schedule, data.


def _write_json(path: str, data: dict) -> None:
  """Writes JSON atomically (temporary file in the same directory + rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temp = f"{path}.tmp-{os.getpid()}"
  with open(temp, "w") as f:
    json.dump(data, f, indent=1, default=float)
  os.replace(temp, path)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


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


def prepare_data(config: ml_collections.ConfigDict, workdir: str,
                 strategy: tf.distribute.Strategy) -> str:
  """Builds the digits manual_dir if asked, prepares TFDS; returns data_dir.

  Idempotent (TFDS's prepare is a no-op on a prepared data_dir). In a
  multi-worker run the chief prepares while the others wait.
  """
  data_dir, manual_dir = data_dirs(config, workdir)
  if _is_prepared(data_dir):
    return data_dir
  if is_chief(strategy):
    if config.build_digits_manual_dir and not config.manual_dir and not (
        os.path.exists(os.path.join(manual_dir, imagenet_input.VAL_TAR))):
      from opq_tf import digits_imagenet  # pylint: disable=g-import-not-at-top

      counts = digits_imagenet.build_manual_dir(manual_dir,
                                                image_size=config.image_size)
      logging.info("Built the digits manual_dir %s: %s", manual_dir, counts)
    num_shards = _DIGITS_NUM_SHARDS if config.build_digits_manual_dir else None
    imagenet_input.prepare(data_dir, manual_dir or None, num_shards=num_shards)
  _barrier(strategy)
  if not _is_prepared(data_dir):  # Workers without a shared file system.
    imagenet_input.prepare(data_dir, manual_dir or None)
  return data_dir


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


def _is_kernel(variable) -> bool:
  return variable.name.rsplit("/", 1)[-1].split(":")[0] in (
      "kernel", "depthwise_kernel", "pointwise_kernel")


# --------------------------------------------------------------------------
# Evaluation.


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
  top_k = min(5, config.num_classes)

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
  entries = wrapping.compressed_entries(model)
  zeros = sum(int(np.count_nonzero(e.compressed == 0)) for e in entries)
  return zeros / sum(e.kernel.size for e in entries)


def _fit(model: keras.Model, config, strategy, data_dir: str, workdir: str, *,
         phase: str, epochs: int, learning_rate: float, warmup_epochs: float
         ) -> dict:
  """Trains `model` (built in strategy.scope) for `epochs`, resuming if possible.

  Returns:
    {"steps", "epochs", "train_loss", "train_accuracy" (last epoch), "seconds",
     "images_per_second", "resumed_from_step"}.
  """
  chief = is_chief(strategy)
  steps_per_epoch = _steps_per_epoch(config, data_dir)
  total_steps = epochs * steps_per_epoch
  schedule = WarmupCosine(learning_rate, round(warmup_epochs * steps_per_epoch),
                          total_steps)
  trainable = model.trainable_variables
  kernels = [v for v in trainable if _is_kernel(v)]
  with strategy.scope():
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum,
                                     jit_compile=config.jit_compile)
    optimizer.build(trainable)
    # The step decides where to resume; the epoch is kept for readers.
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   step=step_var, epoch=epoch_var)
  checkpoint_dir = os.path.join(workdir, phase, "checkpoints")
  write_dir = checkpoint_dir if chief else tempfile.mkdtemp(
      prefix=f"opq_{phase}_worker{_task(strategy)[1]}_")
  manager = tf.train.CheckpointManager(
      checkpoint, write_dir, max_to_keep=config.checkpoints_to_keep,
      checkpoint_name="ckpt")
  latest = tf.train.latest_checkpoint(checkpoint_dir)
  if latest:
    checkpoint.restore(latest).assert_existing_objects_matched()
    logging.info("%s: restored %s (step %d)", phase, latest, int(step_var))
  start_step = int(step_var.numpy())

  global_batch = config.global_batch_size
  weight_decay = float(config.weight_decay)

  def forward_backward(images, labels):
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      cross_entropy = tf.nn.compute_average_loss(
          keras.losses.sparse_categorical_crossentropy(
              labels, logits, from_logits=True),
          global_batch_size=global_batch)
      loss = cross_entropy
      if weight_decay and kernels:
        l2 = tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])
        loss += tf.nn.scale_regularization_loss(0.5 * weight_decay * l2)
    correct = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1),
                                    tf.float32))
    return cross_entropy, correct, tape.gradient(loss, trainable)

  if config.jit_compile:  # XLA cannot hold a cross-replica sync (merge_call).
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

  writer = (tf.summary.create_file_writer(os.path.join(workdir, "tensorboard", phase))
            if chief else tf.summary.create_noop_writer())
  compressed = hasattr(model, "opq_plan")
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
      loss, correct = train_step(iterator).numpy()
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


def train_fp32(config: ml_collections.ConfigDict, workdir: str,
               strategy: tf.distribute.Strategy) -> dict:
  """Trains the FP32 model (from config.pretrained if set, else from scratch).

  Writes <workdir>/fp32/weights.h5 (atomically, at the end) and
  <workdir>/fp32/metrics.json; a workdir that already has both is not
  retrained.

  Returns:
    {"accuracy": evaluate(...), "training": _fit(...) figures}.
  """
  weights_path = os.path.join(workdir, FP32_WEIGHTS)
  metrics_path = os.path.join(workdir, "fp32", "metrics.json")
  if os.path.exists(weights_path) and os.path.exists(metrics_path):
    logging.info("FP32 weights %s exist; not retraining.", weights_path)
    return _read_json(metrics_path)
  data_dir = prepare_data(config, workdir, strategy)
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = models.build(config.model, config.num_classes, config.image_size)
  if config.pretrained:
    models.load_pretrained(model, config.pretrained)
  training = _fit(model, config, strategy, data_dir, workdir, phase="fp32",
                  epochs=config.fp32_epochs,
                  learning_rate=config.fp32_learning_rate,
                  warmup_epochs=config.fp32_warmup_epochs)
  metrics = {"accuracy": evaluate(model, config, strategy, data_dir),
             "training": training}
  logging.info("FP32 %s: %s", config.model, metrics["accuracy"])
  # Every worker saves: reading BatchNorm's sync-on-read statistics is a
  # collective under MultiWorkerMirroredStrategy. Only the chief's file stays.
  chief = is_chief(strategy)
  temp_dir = os.path.join(workdir, "fp32") if chief else tempfile.mkdtemp()
  temp = os.path.join(temp_dir, f"weights.tmp-{os.getpid()}.h5")
  model.save_weights(temp)
  if chief:
    os.replace(temp, weights_path)
    _write_json(metrics_path, metrics)
  else:
    shutil.rmtree(temp_dir, ignore_errors=True)
  _barrier(strategy)  # The weights exist for every worker from here on.
  return metrics


def _load_or_allocate_plan(model, config, workdir: str, chief: bool
                           ) -> allocation.CompressionPlan:
  """The workdir's plan.json if there is one, else a new plan (saved)."""
  path = os.path.join(workdir, PLAN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      logging.info("Reusing the compression plan %s", path)
      return allocation.CompressionPlan.from_json(f.read())
  plan = allocation.allocate(model, config.pruning_rate, config.bits,
                             strategy=config.allocation,
                             step_stats=config.step_stats)
  if chief:
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "w") as f:
      f.write(plan.to_json())
    os.replace(temp, path)
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


def compress_and_finetune(config: ml_collections.ConfigDict, workdir: str,
                          strategy: tf.distribute.Strategy) -> dict:
  """OPQ: FP32 weights -> plan -> apply -> finetune -> evaluate -> export.

  The FP32 weights come from config.pretrained or <workdir>/fp32. The plan is
  computed once from them and saved as <workdir>/plan.json; a resumed run
  reads it back (it is never recomputed, least of all from finetuned weights),
  and the masks and steps come back from the finetuning checkpoint.

  Returns:
    The final report (also printed and written to <workdir>/final_report.json).
  """
  started = time.time()
  chief = is_chief(strategy)
  data_dir = prepare_data(config, workdir, strategy)
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = models.build(config.model, config.num_classes, config.image_size)
  models.load_pretrained(model, _fp32_source(config, workdir))
  evaluations_path = os.path.join(workdir, _EVALUATIONS)
  evaluations = _read_json(evaluations_path)
  # Every worker must decide alike whether to evaluate (a collective), so all
  # read the cache before the chief can write it.
  _barrier(strategy)
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

  training = _fit(qmodel, config, strategy, data_dir, workdir, phase="finetune",
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
        qmodel, target, serving_fn=serving_fn(config.image_size),
        input_signature=SERVING_SIGNATURE)
    if not chief:
      shutil.rmtree(os.path.dirname(target), ignore_errors=True)
  export_seconds = time.time() - export_started

  fp32_metrics = _read_json(os.path.join(workdir, "fp32", "metrics.json"))
  report = {
      "model": config.model,
      "num_classes": config.num_classes,
      "image_size": config.image_size,
      "strategy": type(strategy).__name__,
      "replicas": strategy.num_replicas_in_sync,
      "pretrained": _fp32_source(config, workdir),
      "pruning_rate": config.pruning_rate,
      "bits": config.bits,
      "accuracy": {
          "fp32": evaluations["fp32"],
          "compressed_before_finetune": evaluations["compressed_before_finetune"],
          "compressed_after_finetune": after,
      },
      "plan": {"realised_pruning_rate": plan.realised_pruning_rate,
               "weight_bits_ratio": plan.weight_bits_ratio,
               "kernels": len(plan.layers)},
      "compression": {
          key: export_report[key] for key in (
              "weight_bits_ratio", "model_ratio", "fp32_model_bytes",
              "packed_bytes", "entropy_bound_bytes", "packed_over_bound",
              "realised_pruning_rate", "parameters", "compressed_weights",
              "kept_weights")},
      "finetune": training,
      "fp32_training": fp32_metrics.get("training"),
      "seconds": {"allocate_and_apply": allocate_seconds,
                  "finetune": training["seconds"], "export": export_seconds,
                  "compress_and_finetune_total": time.time() - started},
      "export": {"saved_model": os.path.join(export_dir, exporting.SAVED_MODEL_DIR),
                 "report": os.path.join(export_dir, exporting.REPORT_FILE),
                 "packed": os.path.join(export_dir, exporting.PACKED_FILE)},
  }
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
                       strategy: Optional[tf.distribute.Strategy] = None) -> dict:
  """The whole job: data -> FP32 training (unless pretrained) -> OPQ.

  Returns:
    The final report of compress_and_finetune, plus "fp32" (train_fp32's
    metrics, if it ran) and "wall_seconds".
  """
  started = time.time()
  strategy = strategy or make_strategy("mirrored")
  validate(config, strategy, workdir, phase="all")
  os.makedirs(workdir, exist_ok=True)
  prepare_data(config, workdir, strategy)
  if not config.pretrained:
    train_fp32(config, workdir, strategy)
  report = compress_and_finetune(config, workdir, strategy)
  report["wall_seconds"] = time.time() - started
  if is_chief(strategy):
    _write_json(os.path.join(workdir, FINAL_REPORT), report)
  return report
