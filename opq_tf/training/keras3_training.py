"""The whole job for Keras 3 models (config.frontend = "keras3").

    strategy = keras3_distribute.make_strategy(config, "mirrored")
    checks.validate(config, strategy, workdir, default_config=...)
    keras3_training.train_and_evaluate(config, workdir, strategy)

`training.train_and_evaluate` (and `train_fp32`) hand a keras3 config here.
The job and the workdir are the tf_keras job's (opq_tf.training.training and
.compression; their docstrings have the why): data.prepare_data -> FP32
training (if layout.starting_point says) -> plan (planning.load_or_allocate,
plan.json computed once) -> opq_tf.apply -> calibrate -> finetune -> export
-> final report. What differs: the models (keras3_models), the loop
(keras3_loop: TensorFlow strategies or JAX DataParallel; checkpoints in one
.npz per save) and the export (opq_tf.export of the Keras 3 frontend:
model.keras, model.opq and report.json, plus a SavedModel on the TensorFlow
backend, serving float images). The plan, the layout of the workdir, the
data, the report and the start rule are shared with the tf_keras job.

Multi-process: every process computes everything (the verbs run on its
host-local copy of the weights), only the chief writes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Optional

from absl import logging
import ml_collections

import opq_tf
from opq_tf.keras3 import exporting
from opq_tf.keras3._keras import keras
from opq_tf.training import compression
from opq_tf.training import data
from opq_tf.training import distribute
from opq_tf.training import keras3_loop
from opq_tf.training import keras3_models
from opq_tf.training import layout
from opq_tf.training import models
from opq_tf.training import planning
from opq_tf.training import report as report_lib


def train_fp32(config: ml_collections.ConfigDict, workdir: str, strategy: Any,
               data_dir: str) -> dict[str, Any]:
  """training.train_fp32 for a Keras 3 model: <workdir>/fp32/weights.h5
  (Keras 3's weights file) and metrics.json; not retrained if both exist."""
  weights_path = os.path.join(workdir, layout.FP32_WEIGHTS)
  metrics_path = os.path.join(workdir, layout.FP32_METRICS)
  if os.path.exists(weights_path) and os.path.exists(metrics_path):
    logging.info("FP32 weights %s exist; not retraining.", weights_path)
    return layout.read_json(metrics_path)
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = keras3_models.build_for_config(config)
  if config.pretrained:
    keras3_models.load_weights(model, config.pretrained)
  training = keras3_loop.fit(
      model, config, strategy, data_dir, workdir, phase="fp32",
      epochs=config.fp32_epochs, learning_rate=config.fp32_learning_rate,
      warmup_epochs=config.fp32_warmup_epochs)
  metrics = {"accuracy": keras3_loop.evaluate(model, config, strategy,
                                              data_dir),
             "training": training}
  logging.info("FP32 %s: %s", config.model, metrics["accuracy"])
  if distribute.is_chief(strategy):
    keras3_models.save_weights(model, weights_path)
    layout.write_json(metrics_path, metrics)
  distribute.barrier(strategy)  # The weights exist for every process from here.
  return metrics


def _calibrate(qmodel: keras.Model, config: ml_collections.ConfigDict,
               workdir: str, data_dir: str) -> tuple[float, Optional[Any]]:
  """opq_tf.calibrate before finetuning, unless config.calibration_images is
  0 or a finetuning checkpoint (which holds the calibrated state) exists."""
  if not config.calibration_images or keras3_loop.latest_checkpoint(
      layout.checkpoint_dir(workdir, "finetune")):
    return 0.0, None
  started = time.time()
  images = compression._calibration_images(  # pylint: disable=protected-access
      config, data_dir, config.calibration_images)
  report = opq_tf.calibrate(qmodel, images, batchnorm=True,
                            reconstruct=config.calibrate_reconstruct,
                            max_images=config.calibration_images)
  return time.time() - started, report


def export(qmodel: keras.Model, plan: Any, export_dir: str, chief: bool
           ) -> dict[str, Any]:
  """opq_tf.export once (report.json read back on a rerun); a non-chief
  process exports to a temporary directory that it deletes."""
  report_path = os.path.join(export_dir, exporting.REPORT_FILE)
  if os.path.exists(report_path):
    return layout.read_json(report_path)
  target = export_dir if chief else os.path.join(tempfile.mkdtemp(), "export")
  export_report = opq_tf.export(qmodel, target, plan=plan)
  if not chief:
    shutil.rmtree(os.path.dirname(target), ignore_errors=True)
  return export_report


def _export_paths(export_dir: str, export_report: dict[str, Any]
                  ) -> dict[str, str]:
  """The final report's "export": every file the export wrote."""
  written = dict(export_report.get("files", {}))
  written.setdefault("packed", exporting.PACKED_FILE)
  paths = {name: os.path.join(export_dir, path) for name, path in written.items()}
  paths["report"] = os.path.join(export_dir, exporting.REPORT_FILE)
  return paths


def compress_and_finetune(config: ml_collections.ConfigDict, workdir: str,
                          strategy: Any, data_dir: str) -> dict[str, Any]:
  """compression.compress_and_finetune for a Keras 3 model: FP32 weights ->
  plan -> apply -> calibrate -> finetune -> evaluate -> export -> report."""
  started = time.time()
  chief = distribute.is_chief(strategy)
  fp32_weights = layout.starting_point(config, workdir).fp32_weights
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = keras3_models.build_for_config(config)
  keras3_models.load_weights(model, fp32_weights)
  evaluations_path = os.path.join(workdir, layout.EVALUATIONS)
  evaluations = layout.read_json(evaluations_path)
  distribute.barrier(strategy)  # All read the cache before the chief writes.

  def evaluate_once(name: str, evaluated: keras.Model, **extra: Any) -> None:
    if name not in evaluations:
      evaluations[name] = keras3_loop.evaluate(evaluated, config, strategy,
                                               data_dir)
      evaluations.update(extra)
      if chief:
        layout.write_json(evaluations_path, evaluations)

  evaluate_once("fp32", model)
  allocate_started = time.time()
  plan = planning.load_or_allocate(model, config, workdir, chief)
  with strategy.scope():
    qmodel = opq_tf.apply(model, plan)
  allocate_seconds = time.time() - allocate_started
  print(plan.table(), flush=True)
  evaluate_once("compressed_before_finetune", qmodel)
  calibrate_seconds, calibration_report = _calibrate(qmodel, config, workdir,
                                                    data_dir)
  if config.calibration_images:
    evaluate_once("calibrated", qmodel,
                  calibration=compression._calibration_summary(  # pylint: disable=protected-access
                      calibration_report))

  finetune = keras3_loop.fit(qmodel, config, strategy, data_dir, workdir,
                             phase="finetune", epochs=config.num_epochs,
                             learning_rate=config.learning_rate,
                             warmup_epochs=config.warmup_epochs)
  after = keras3_loop.evaluate(qmodel, config, strategy, data_dir)

  export_dir = os.path.join(workdir, layout.EXPORT_DIR)
  export_started = time.time()
  export_report = export(qmodel, plan, export_dir, chief)
  export_seconds = time.time() - export_started

  report = report_lib.final_report(
      config, strategy, fp32_weights=fp32_weights, evaluations=evaluations,
      after=after, plan=plan, export_report=export_report, finetune=finetune,
      fp32_training=layout.read_json(
          os.path.join(workdir, layout.FP32_METRICS)).get("training"),
      seconds={"allocate_and_apply": allocate_seconds,
               "calibrate": calibrate_seconds,
               "finetune": finetune["seconds"], "export": export_seconds,
               "compress_and_finetune_total": time.time() - started},
      export_dir=export_dir)
  report["frontend"] = "keras3"
  report["backend"] = keras.backend.backend()
  report["export"] = _export_paths(export_dir, export_report)
  if chief:
    layout.write_json(os.path.join(workdir, layout.FINAL_REPORT), report)
    print(report_lib.format_report(report), flush=True)
  return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: Any) -> dict[str, Any]:
  """training.train_and_evaluate for a Keras 3 model."""
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  data_dir = data.prepare_data(config, workdir, strategy)
  if layout.starting_point(config, workdir).trains_fp32:
    train_fp32(config, workdir, strategy, data_dir)
  report = compress_and_finetune(config, workdir, strategy, data_dir)
  report["wall_seconds"] = time.time() - started
  if distribute.is_chief(strategy):
    layout.write_json(os.path.join(workdir, layout.FINAL_REPORT), report)
  return report


def check(config: ml_collections.ConfigDict) -> None:
  """What checks.validate checks of a keras3 config beyond the shared fields:
  the options this frontend lacks, and that the model builds and the
  pretrained weights load into it.

  Raises:
    ValueError: naming the field and the fix.
  """
  for field, why in (
      ("litert", "the Keras 3 LiteRT export stores FP32 weights, not the "
       "OPQ codes"),
      ("quantize_activations", "activation quantization is tfmot's")):
    if config[field]:
      raise ValueError(
          f"config.{field}=True is only in the tf_keras frontend ({why}); set "
          f"--config.{field}=False or --config.frontend=tf_keras.")
  if config.pretrained == "imagenet":
    raise ValueError(
        "config.pretrained='imagenet' is only in the tf_keras frontend; on "
        "keras3 pass a weights file (.keras, .weights.h5 or .h5).")
  if config.pretrained:
    keras3_models.load_weights(keras3_models.build_for_config(config),
                               config.pretrained)
  elif config.model not in models.NAMES:  # the options suit the constructor
    keras3_models.build_for_config(config)
