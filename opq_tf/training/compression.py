"""OPQ compress + finetune of FP32 weights, and the export of the result.

    data_dir = data.prepare_data(config, workdir, strategy)
    report = compression.compress_and_finetune(config, workdir, strategy,
                                               data_dir)

`compress_and_finetune`: load FP32 weights -> evaluate -> allocate (or reuse
workdir/plan.json, planning.load_or_allocate) -> opq_tf.apply -> evaluate ->
calibrate (BatchNorm statistics, optionally reconstruction) -> evaluate ->
finetune (loop.fit) -> evaluate -> export -> the final report
(report.final_report, <workdir>/final_report.json).

Export: <workdir>/export/saved_model is the stripped model (opq_tf.strip)
with the JPEG serving signature of opq_tf.training.serving; report.json and
model.opq beside it (and model.tflite with config.litert) come from
opq_tf.tf_keras.exporting.export. With LiteRT, the .tflite's accuracy is
measured against the stripped Keras model and recorded in the report.
report.json records what the export was made from (the finetuning step and
the export options, `made_from`): a rerun that differs in either (more
epochs, --config.litert=True) exports again and replaces it whole; an
unchanged rerun reuses it.

Multi-worker: every worker evaluates, calibrates, finetunes and exports (all
collectives: reading BatchNorm's sync-on-read statistics is one), but only
the chief writes the workdir; the others export to a temporary directory
that they delete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import ml_collections
import numpy as np

from opq_tf.core import allocation
from opq_tf.core import files
from opq_tf.tf_keras import calibration
from opq_tf.tf_keras import exporting
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf
from opq_tf.training import distribute
from opq_tf.training import imagenet_input
from opq_tf.training import layout
from opq_tf.training import loop
from opq_tf.training import models
from opq_tf.training import planning
from opq_tf.training import pretrained
from opq_tf.training import report as report_lib
from opq_tf.training import serving

# Validation images the .tflite is compared on, and training images its int8
# activations are calibrated on.
_LITERT_EVAL_BATCHES, _LITERT_EVAL_BATCH = 5, 100
_REPRESENTATIVE_IMAGES = 100


# --------------------------------------------------------------------------
# Calibration before finetuning.


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
               workdir: str, data_dir: str
               ) -> tuple[float, Optional[calibration.CalibrationReport]]:
  """opq_tf.calibrate before finetuning; returns (seconds, CalibrationReport),
  (0, None) if skipped.

  Skipped when config.calibration_images is 0, and on a resumed run that has
  a finetuning checkpoint: that checkpoint already holds the calibrated (and
  since trained) BatchNorm statistics and kernels.
  """
  checkpoints = layout.checkpoint_dir(workdir, "finetune")
  if (not config.calibration_images
      or tf.train.latest_checkpoint(checkpoints) is not None):
    return 0.0, None
  started = time.time()
  report = calibration.calibrate(
      qmodel, _calibration_images(config, data_dir, config.calibration_images),
      batchnorm=True, reconstruct=config.calibrate_reconstruct,
      max_images=config.calibration_images)
  return time.time() - started, report


def _calibration_summary(report: Optional[calibration.CalibrationReport]
                         ) -> dict[str, Any]:
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


def _representative_data(config: ml_collections.ConfigDict, data_dir: str
                         ) -> Optional[Callable[[], Iterator[list]]]:
  """LiteRT's representative dataset: one-image batches of training images."""
  if not (config.litert and config.litert_int8_activations):
    return None

  def images():
    for batch in _calibration_images(config, data_dir, _REPRESENTATIVE_IMAGES):
      for image in batch:
        yield [image[None]]

  return images


def _litert_accuracy(qmodel: keras.Model, config: ml_collections.ConfigDict,
                     data_dir: str, export_dir: str) -> dict[str, Any]:
  """model.tflite against the stripped Keras model on validation images.

  With int8 activations, a float-activation .tflite of the same model is
  written too and reported beside it, so the cost of quantizing the
  activations reads off one table. The model is stripped once, for both
  comparisons and that conversion. Every worker runs this (stripping reads
  BatchNorm's sync-on-read statistics, a collective across workers).
  """
  # Imported on use, as exporting does: it loads the LiteRT runtime.
  from opq_tf.tf_keras import litert  # pylint: disable=g-import-not-at-top

  dataset = imagenet_input.make_dataset_fn(
      split="validation", data_dir=data_dir, image_size=config.image_size,
      global_batch_size=_LITERT_EVAL_BATCH, train=False,
      num_classes=config.num_classes)(None).take(_LITERT_EVAL_BATCHES)
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
      litert.write(wrapping.compressed_kernels(qmodel), stripped, float_path)
      result["float_activations"] = litert.compare(float_path, stripped,
                                                   images, labels)
  return result


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


def export(qmodel: keras.Model, plan: allocation.CompressionPlan,
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
  report_path = os.path.join(export_dir, exporting.REPORT_FILE)
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
    export_report = _write_export(qmodel, plan, config, data_dir, target)
    export_report["made_from"] = source
    files.write_json(os.path.join(target, exporting.REPORT_FILE),
                     export_report)
    if chief:
      _replace_dir(target, export_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return export_report


def _write_export(qmodel: keras.Model, plan: allocation.CompressionPlan,
                  config: ml_collections.ConfigDict, data_dir: str,
                  target: str) -> dict[str, Any]:
  """opq_tf's export of `qmodel` to the new directory `target`, with the
  .tflite's accuracy in the report when config.litert."""
  export_report = exporting.export(
      qmodel, target, plan=plan, serving_fn=serving.serving_fn(config.image_size),
      input_signature=serving.SERVING_SIGNATURE, litert=config.litert,
      litert_int8_activations=config.litert_int8_activations,
      litert_weights=config.litert_weights,
      representative_data=_representative_data(config, data_dir))
  if config.litert:
    export_report["litert"]["accuracy"] = _litert_accuracy(
        qmodel, config, data_dir, target)
  return export_report


# --------------------------------------------------------------------------
# The phase.


def compress_and_finetune(config: ml_collections.ConfigDict, workdir: str,
                          strategy: tf.distribute.Strategy,
                          data_dir: str) -> dict[str, Any]:
  """OPQ: FP32 weights -> plan -> apply -> finetune -> evaluate -> export.

  The FP32 weights and whether the plan is reused follow
  `layout.starting_point`: the plan is computed once from the FP32 weights
  and saved as <workdir>/plan.json; a resumed run reads it back (it is never
  recomputed, least of all from finetuned weights), and the masks and steps
  come back from the finetuning checkpoint. The accuracies before finetuning
  are cached in <workdir>/evaluations.json, so a resumed run does not
  measure them again.

  Args:
    config: a valid config (checks.validate).
    workdir: the run's directory.
    strategy: the strategy to train under.
    data_dir: the prepared TFDS data_dir (data.prepare_data).

  Returns:
    The final report (also printed and written to <workdir>/final_report.json).
  """
  started = time.time()
  chief = distribute.is_chief(strategy)
  fp32_weights = layout.starting_point(config, workdir).fp32_weights
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = models.build_for_config(config)
  pretrained.load(model, fp32_weights)
  evaluations_path = os.path.join(workdir, layout.EVALUATIONS)
  evaluations = layout.read_json(evaluations_path)
  # Every worker must decide alike whether to evaluate (a collective), so all
  # read the cache before the chief can write it.
  distribute.barrier(strategy)

  def evaluate_once(name: str, evaluated: keras.Model, **extra: Any) -> None:
    """Measures evaluations[name] (stored with `extra`) unless cached."""
    if name not in evaluations:
      evaluations[name] = loop.evaluate(evaluated, config, strategy, data_dir)
      evaluations.update(extra)
      if chief:
        layout.write_json(evaluations_path, evaluations)

  evaluate_once("fp32", model)
  allocate_started = time.time()
  plan = planning.load_or_allocate(model, config, workdir, chief)
  with strategy.scope():
    qmodel = wrapping.apply(model, plan,
                            quantize_activations=config.quantize_activations)
  allocate_seconds = time.time() - allocate_started
  print(plan.table(), flush=True)
  evaluate_once("compressed_before_finetune", qmodel)
  calibrate_seconds, calibration_report = _calibrate(qmodel, config, workdir,
                                                    data_dir)
  if config.calibration_images:
    evaluate_once("calibrated", qmodel,
                  calibration=_calibration_summary(calibration_report))

  finetune = loop.fit(qmodel, config, strategy, data_dir, workdir,
                      phase="finetune", epochs=config.num_epochs,
                      learning_rate=config.learning_rate,
                      warmup_epochs=config.warmup_epochs)
  after = loop.evaluate(qmodel, config, strategy, data_dir)

  export_dir = os.path.join(workdir, layout.EXPORT_DIR)
  export_started = time.time()
  final_report_path = os.path.join(workdir, layout.FINAL_REPORT)
  if chief and os.path.exists(final_report_path):
    # It describes the export about to be checked (and maybe replaced).
    os.remove(final_report_path)
  export_report = export(qmodel, plan, config, data_dir, export_dir, chief,
                         step=finetune["steps"])
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
  if chief:
    layout.write_json(final_report_path, report)
    print(report_lib.format_report(report), flush=True)
  return report
