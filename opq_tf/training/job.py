"""The job, one for both frontends: FP32 training, then OPQ and its export.

    frontend = compression.FRONTEND          # or keras3_training.FRONTEND
    metrics = job.train_fp32(frontend, config, workdir, strategy, data_dir)
    report = job.compress_and_finetune(frontend, config, workdir, strategy,
                                       data_dir)

`compress_and_finetune`: load FP32 weights -> evaluate -> allocate (or reuse
workdir/plan.json, planning.load_or_allocate) -> opq_tf.apply -> evaluate ->
calibrate (BatchNorm statistics, optionally reconstruction) -> evaluate ->
finetune -> evaluate -> export -> the final report (report.final_report,
<workdir>/final_report.json). The accuracies before finetuning are cached in
<workdir>/evaluations.json, so a resumed run does not measure them again.

What a frontend does its own way is a `Frontend`: its models, its loop
(fit, evaluate, checkpoints) and its export writer. Everything else (the
workdir's layout, the start rule, the plan, the export's staging and its
"made_from" rule, the report) exists once, here and in the modules it
calls, so a rule added for one frontend holds for the other.

Export: report.json records what the export was made from (the finetuning
step and the export options, `made_from`): a rerun that differs in either
(more epochs, --config.litert=True) exports again and replaces it whole; an
unchanged rerun reuses it. final_report.json is removed before the export is
checked, so no final report ever describes an export that is not there.

Multi-process: every process evaluates, calibrates, finetunes and exports
(under MultiWorkerMirroredStrategy reading BatchNorm's sync-on-read
statistics is a collective, so every worker must take part), but only the
chief writes the workdir; the others write to temporary directories that
they delete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

from absl import logging
import ml_collections
import numpy as np

import opq_tf
from opq_tf.core import allocation
from opq_tf.core import files
from opq_tf.core import reconstruction
from opq_tf.training import data
from opq_tf.training import distribute
from opq_tf.training import imagenet_input
from opq_tf.training import layout
from opq_tf.training import planning
from opq_tf.training import report as report_lib

REPORT_FILE = report_lib.REPORT_FILE
_LITERT_BATCHES, _LITERT_BATCH = 5, 100  # validation images a .tflite is
                                         # compared on


@dataclasses.dataclass(frozen=True)
class Frontend:
  """What the job does its own way per frontend.

  Attributes:
    name: "tf_keras" or "keras3" (config.frontend).
    backend: the Keras backend the job runs on (a function: it is read when
      the job runs, after the trainer chose it).
    build: the config's FP32 model, its initial weights drawn from
      config.seed (called under the strategy's scope).
    load_weights: (model, path) fills the model from a weights file (or
      config.pretrained's source).
    save_weights: (model, path) writes the weights file `load_weights` reads.
    fit: trains as `loop.fit` does (checkpoints and resume included).
    evaluate: `loop.evaluate`'s accuracies on the validation split.
    latest_checkpoint: the newest checkpoint in a directory, or None.
    write_export: (qmodel, plan, config, data_dir, target) writes the export
      to the new directory `target`; returns its report.
  """

  name: str
  backend: Callable[[], str]
  build: Callable[[ml_collections.ConfigDict], Any]
  load_weights: Callable[[Any, str], None]
  save_weights: Callable[[Any, str], None]
  fit: Callable[..., dict[str, Any]]
  evaluate: Callable[[Any, ml_collections.ConfigDict, Any, str],
                     dict[str, Any]]
  latest_checkpoint: Callable[[str], Optional[str]]
  write_export: Callable[..., dict[str, Any]]


# --------------------------------------------------------------------------
# FP32 training.


def train_fp32(frontend: Frontend, config: ml_collections.ConfigDict,
               workdir: str, strategy: Any, data_dir: str) -> dict[str, Any]:
  """Trains the FP32 model (from config.pretrained if set, else from scratch).

  Writes <workdir>/fp32/weights.h5 (atomically, at the end) and
  <workdir>/fp32/metrics.json; a workdir that already has both is not
  retrained.

  Returns:
    {"accuracy": evaluate(...), "training": fit(...)'s figures}.
  """
  weights_path = os.path.join(workdir, layout.FP32_WEIGHTS)
  metrics_path = os.path.join(workdir, layout.FP32_METRICS)
  if os.path.exists(weights_path) and os.path.exists(metrics_path):
    logging.info("FP32 weights %s exist; not retraining.", weights_path)
    return layout.read_json(metrics_path)
  model = _build(frontend, config, strategy)
  if config.pretrained:
    frontend.load_weights(model, config.pretrained)
  training = frontend.fit(model, config, strategy, data_dir, workdir,
                          phase="fp32", epochs=config.fp32_epochs,
                          learning_rate=config.fp32_learning_rate,
                          warmup_epochs=config.fp32_warmup_epochs)
  metrics = {"accuracy": frontend.evaluate(model, config, strategy, data_dir),
             "training": training}
  logging.info("FP32 %s: %s", config.model, metrics["accuracy"])
  # Every worker saves: reading BatchNorm's sync-on-read statistics is a
  # collective under MultiWorkerMirroredStrategy. Only the chief's file stays.
  if distribute.is_chief(strategy):
    frontend.save_weights(model, weights_path)
    layout.write_json(metrics_path, metrics)
  else:
    temp_dir = tempfile.mkdtemp()
    frontend.save_weights(model, os.path.join(temp_dir, "weights.h5"))
    shutil.rmtree(temp_dir, ignore_errors=True)
  distribute.barrier(strategy)  # The weights exist for every worker from here.
  return metrics


def _build(frontend: Frontend, config: ml_collections.ConfigDict,
           strategy: Any) -> Any:
  with strategy.scope():
    return frontend.build(config)


# --------------------------------------------------------------------------
# Calibration before finetuning.


def calibration_images(config: ml_collections.ConfigDict, data_dir: str,
                       count: int) -> Any:
  """The first `count` training images, evaluation-preprocessed (no labels):
  a tf.data.Dataset of batches.

  One pass in file order (TFDS shuffles examples across its record files when
  it prepares them), the same images on every worker and every rerun.
  """
  batch = min(count, reconstruction.DEFAULT_BATCH_SIZE)
  dataset_fn = imagenet_input.make_dataset_fn(
      split="train", data_dir=data_dir, image_size=config.image_size,
      global_batch_size=batch, train=False, num_classes=config.num_classes)
  return dataset_fn(None).map(lambda images, labels: images).take(
      -(-count // batch))


def _calibrate(frontend: Frontend, qmodel: Any,
               config: ml_collections.ConfigDict, workdir: str, data_dir: str
               ) -> tuple[float, Optional[Any]]:
  """opq_tf.calibrate before finetuning; returns (seconds, its report), or
  (0, None) if skipped.

  Skipped when config.calibration_images is 0, and on a resumed run that has
  a finetuning checkpoint: that checkpoint already holds the calibrated (and
  since trained) BatchNorm statistics and kernels.
  """
  if not config.calibration_images or frontend.latest_checkpoint(
      layout.checkpoint_dir(workdir, "finetune")) is not None:
    return 0.0, None
  started = time.time()
  report = opq_tf.calibrate(
      qmodel, calibration_images(config, data_dir, config.calibration_images),
      batchnorm=True, reconstruct=config.calibrate_reconstruct,
      max_images=config.calibration_images)
  return time.time() - started, report


def _calibration_summary(report: Optional[Any]) -> dict[str, Any]:
  """How many kernels calibrate reconstructed and whose biases it corrected
  (nothing when this process skipped calibration on a resumed run)."""
  if report is None:
    return {}
  rows = report.kernels.values()
  return {"batchnorm_layers": len(report.batchnorm_layers),
          "kernels_reconstructed": sum(r.method == "reconstructed" for r in rows),
          "biases_corrected": sum(r.bias_corrected for r in rows)}


# --------------------------------------------------------------------------
# Export.


def litert_images(config: ml_collections.ConfigDict, data_dir: str
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels): the validation images a .tflite is compared on with
  the Keras model it was written from (`litert_codes.compare`)."""
  dataset = imagenet_input.make_dataset_fn(
      split="validation", data_dir=data_dir, image_size=config.image_size,
      global_batch_size=_LITERT_BATCH, train=False,
      num_classes=config.num_classes)(None).take(_LITERT_BATCHES)
  images, labels = (np.concatenate(parts) for parts in zip(*[
      (batch_images.numpy(), batch_labels.numpy())
      for batch_images, batch_labels in dataset]))
  return images, labels


def made_from(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
  """What an export is made from: the finetuning checkpoint's step (the
  weights) and the config's export options. report.json records it under
  "made_from", and a rerun exports again when it differs."""
  return {"checkpoint_step": int(step),
          "options": {"litert": config.litert,
                      "litert_int8_activations": config.litert_int8_activations,
                      "litert_weights": config.litert_weights}}


def _replace_dir(new: str, directory: str) -> None:
  """Puts the finished directory `new` at `directory`, moving an old one aside
  first (renames only: a kill between them leaves no `directory`, which the
  next run exports again, never a mix of old and new files)."""
  if os.path.lexists(directory):
    os.rename(directory, os.path.join(os.path.dirname(new), "replaced"))
  os.rename(new, directory)


def export(frontend: Frontend, qmodel: Any, plan: allocation.CompressionPlan,
           config: ml_collections.ConfigDict, data_dir: str, export_dir: str,
           chief: bool, step: int) -> dict[str, Any]:
  """Exports the finetuned model at `step` to `export_dir`; returns its report.

  An existing export made from the same step and options (report.json's
  "made_from"; a rerun of a finished run) is read back instead; any other is
  replaced once the new one is complete. The export is staged in a hidden
  sibling named as atomic_path's temporaries, so a killed export's leftovers
  are removed by the next. A non-chief worker exports to a temporary
  directory that it deletes (see the module docstring).
  """
  source = made_from(config, step)
  report_path = os.path.join(export_dir, REPORT_FILE)
  if os.path.exists(report_path):
    existing = layout.read_json(report_path)
    if existing.get("made_from") == source:
      return existing
    logging.info("Exporting again: %s was made from %s, this run has %s.",
                 export_dir, existing.get("made_from"), source)
  if chief:
    files.remove_leftovers(export_dir)
    staging = tempfile.mkdtemp(dir=os.path.dirname(export_dir), prefix=(
        f".{os.path.basename(export_dir)}.tmp-{os.getpid()}-"))
  else:
    staging = tempfile.mkdtemp()
  target = os.path.join(staging, "export")
  try:
    export_report = frontend.write_export(qmodel, plan, config, data_dir,
                                          target)
    export_report["made_from"] = source
    files.write_json(os.path.join(target, REPORT_FILE), export_report)
    if chief:
      _replace_dir(target, export_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return export_report


# --------------------------------------------------------------------------
# The OPQ phase.


def compress_and_finetune(frontend: Frontend,
                          config: ml_collections.ConfigDict, workdir: str,
                          strategy: Any, data_dir: str) -> dict[str, Any]:
  """OPQ: FP32 weights -> plan -> apply -> finetune -> evaluate -> export.

  The FP32 weights and whether the plan is reused follow
  `layout.starting_point`: the plan is computed once from the FP32 weights
  and saved as <workdir>/plan.json; a resumed run reads it back (it is never
  recomputed, least of all from finetuned weights), and the masks and steps
  come back from the finetuning checkpoint.

  Returns:
    The final report (also printed and written to <workdir>/final_report.json).
  """
  started = time.time()
  chief = distribute.is_chief(strategy)
  fp32_weights = layout.starting_point(config, workdir).fp32_weights
  model = _build(frontend, config, strategy)
  frontend.load_weights(model, fp32_weights)
  evaluations_path = os.path.join(workdir, layout.EVALUATIONS)
  evaluations = layout.read_json(evaluations_path)
  # Every worker must decide alike whether to evaluate (a collective), so all
  # read the cache before the chief can write it.
  distribute.barrier(strategy)

  def evaluate_once(name: str, evaluated: Any, **extra: Any) -> None:
    """Measures evaluations[name] (stored with `extra`) unless cached."""
    if name not in evaluations:
      evaluations[name] = frontend.evaluate(evaluated, config, strategy,
                                            data_dir)
      evaluations.update(extra)
      if chief:
        layout.write_json(evaluations_path, evaluations)

  evaluate_once("fp32", model)
  allocate_started = time.time()
  plan = planning.load_or_allocate(model, config, workdir, chief)
  apply_options = ({"quantize_activations": True}
                   if config.quantize_activations else {})  # tf_keras only
  with strategy.scope():
    qmodel = opq_tf.apply(model, plan, **apply_options)
  allocate_seconds = time.time() - allocate_started
  print(plan.table(), flush=True)
  evaluate_once("compressed_before_finetune", qmodel)
  calibrate_seconds, calibration_report = _calibrate(frontend, qmodel, config,
                                                     workdir, data_dir)
  if config.calibration_images:
    evaluate_once("calibrated", qmodel,
                  calibration=_calibration_summary(calibration_report))

  finetune = frontend.fit(qmodel, config, strategy, data_dir, workdir,
                          phase="finetune", epochs=config.num_epochs,
                          learning_rate=config.learning_rate,
                          warmup_epochs=config.warmup_epochs)
  after = frontend.evaluate(qmodel, config, strategy, data_dir)

  export_dir = os.path.join(workdir, layout.EXPORT_DIR)
  export_started = time.time()
  final_report_path = os.path.join(workdir, layout.FINAL_REPORT)
  if chief and os.path.exists(final_report_path):
    # It describes the export about to be checked (and maybe replaced).
    os.remove(final_report_path)
  export_report = export(frontend, qmodel, plan, config, data_dir, export_dir,
                         chief, step=finetune["steps"])
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
      export_dir=export_dir, frontend=frontend.name,
      backend=frontend.backend())
  if chief:
    layout.write_json(final_report_path, report)
    print(report_lib.format_report(report), flush=True)
  return report


def train_and_evaluate(frontend: Frontend, config: ml_collections.ConfigDict,
                       workdir: str, strategy: Any) -> dict[str, Any]:
  """The whole job: data -> FP32 training (if `starting_point` says) -> OPQ.

  Returns:
    The final report of compress_and_finetune, plus "wall_seconds".
  """
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  data_dir = data.prepare_data(config, workdir, strategy)
  if layout.starting_point(config, workdir).trains_fp32:
    train_fp32(frontend, config, workdir, strategy, data_dir)
  report = compress_and_finetune(frontend, config, workdir, strategy, data_dir)
  report["wall_seconds"] = time.time() - started
  if distribute.is_chief(strategy):
    layout.write_json(os.path.join(workdir, layout.FINAL_REPORT), report)
  return report
