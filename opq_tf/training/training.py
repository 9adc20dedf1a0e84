"""The whole job under tf.distribute: data, FP32 training, OPQ.

    strategy = distribute.make_strategy("mirrored")
    checks.validate(config, strategy, workdir,            # the binary does this
                    default_config=default.get_config())
    training.train_and_evaluate(config, workdir, strategy)

`train_and_evaluate` = `data.prepare_data` (once; the data_dir is passed
down) -> `train_fp32` (unless `layout.starting_point` says the FP32 weights
exist) -> `compression.compress_and_finetune`. The parts, each a module of
opq_tf.training:

    layout        the workdir's files and where a run starts (starting_point)
    data          where a config's data lives; prepare_data
    loop          make_train_step / make_eval_step, kernel_l2, fit, evaluate
    planning      config -> allocate's options; plan.json computed once
    compression   compress_and_finetune: calibrate, finetune, export
    serving       the export's serving signature (JPEG bytes in)
    report        the final report and its printed lines
    checks        every check of the input, before any of this runs

Keras 3 models (config.frontend = "keras3", on TensorFlow or JAX) take the
same job in opq_tf.training.keras3_training, which both functions hand them to.

Multi-worker: only the chief writes to the workdir; other workers write their
(collective) checkpoints, weights and export to temporary directories that
they delete (under MultiWorkerMirroredStrategy reading BatchNorm's sync-on-read
statistics is a collective, so every worker must take part), and skip
summaries and JSON files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from absl import logging
import ml_collections

from opq_tf.tf_keras._keras import keras, tf
from opq_tf.training import compression
from opq_tf.training import data
from opq_tf.training import distribute
from opq_tf.training import layout
from opq_tf.training import loop
from opq_tf.training import models
from opq_tf.training import pretrained


def _is_keras3(config: ml_collections.ConfigDict) -> bool:
  return config.get("frontend", "tf_keras") == "keras3"


def _keras3_training():
  """keras3_training, imported on first use: a tf_keras run needs no Keras 3."""
  from opq_tf.training import keras3_training  # pylint: disable=g-import-not-at-top
  return keras3_training


def train_fp32(config: ml_collections.ConfigDict, workdir: str,
               strategy: tf.distribute.Strategy, data_dir: str
               ) -> dict[str, Any]:
  """Trains the FP32 model (from config.pretrained if set, else from scratch).

  Writes <workdir>/fp32/weights.h5 (atomically, at the end) and
  <workdir>/fp32/metrics.json; a workdir that already has both is not
  retrained.

  Args:
    config: a valid config (checks.validate).
    workdir: the run's directory.
    strategy: the strategy to train under.
    data_dir: the prepared TFDS data_dir (data.prepare_data).

  Returns:
    {"accuracy": loop.evaluate(...), "training": loop.fit(...) figures}.
  """
  if _is_keras3(config):
    return _keras3_training().train_fp32(config, workdir, strategy, data_dir)
  weights_path = os.path.join(workdir, layout.FP32_WEIGHTS)
  metrics_path = os.path.join(workdir, layout.FP32_METRICS)
  if os.path.exists(weights_path) and os.path.exists(metrics_path):
    logging.info("FP32 weights %s exist; not retraining.", weights_path)
    return layout.read_json(metrics_path)
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = models.build_for_config(config)
  if config.pretrained:
    pretrained.load(model, config.pretrained)
  training = loop.fit(model, config, strategy, data_dir, workdir, phase="fp32",
                      epochs=config.fp32_epochs,
                      learning_rate=config.fp32_learning_rate,
                      warmup_epochs=config.fp32_warmup_epochs)
  metrics = {"accuracy": loop.evaluate(model, config, strategy, data_dir),
             "training": training}
  logging.info("FP32 %s: %s", config.model, metrics["accuracy"])
  # Every worker saves: reading BatchNorm's sync-on-read statistics is a
  # collective under MultiWorkerMirroredStrategy. Only the chief's file stays.
  if distribute.is_chief(strategy):
    pretrained.save(model, weights_path)
    layout.write_json(metrics_path, metrics)
  else:
    temp_dir = tempfile.mkdtemp()
    pretrained.save(model, os.path.join(temp_dir, "weights.h5"))
    shutil.rmtree(temp_dir, ignore_errors=True)
  distribute.barrier(strategy)  # The weights exist for every worker from here.
  return metrics


def compress_and_finetune(config: ml_collections.ConfigDict, workdir: str,
                          strategy: tf.distribute.Strategy, data_dir: str
                          ) -> dict[str, Any]:
  """compression.compress_and_finetune, or keras3_training's for keras3."""
  if _is_keras3(config):
    return _keras3_training().compress_and_finetune(config, workdir, strategy,
                                                    data_dir)
  return compression.compress_and_finetune(config, workdir, strategy, data_dir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: tf.distribute.Strategy) -> dict[str, Any]:
  """The whole job: data -> FP32 training (if `starting_point` says) -> OPQ.

  The config is assumed valid (checks.validate, which the trainers run).

  Returns:
    The final report of compress_and_finetune, plus "wall_seconds".
  """
  if _is_keras3(config):
    return _keras3_training().train_and_evaluate(config, workdir, strategy)
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  data_dir = data.prepare_data(config, workdir, strategy)
  if layout.starting_point(config, workdir).trains_fp32:
    train_fp32(config, workdir, strategy, data_dir)
  report = compression.compress_and_finetune(config, workdir, strategy,
                                             data_dir)
  report["wall_seconds"] = time.time() - started
  if distribute.is_chief(strategy):
    layout.write_json(os.path.join(workdir, layout.FINAL_REPORT), report)
  return report
