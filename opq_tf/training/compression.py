"""The job's tf_keras frontend: tfmot wrappers trained under tf.distribute.

    report = job.compress_and_finetune(compression.FRONTEND, config, workdir,
                                       strategy, data_dir)

`FRONTEND` is what opq_tf.training.job needs of the tf_keras frontend: the
models (opq_tf.training.models, weights through .pretrained), the loop
(opq_tf.training.loop: tf.distribute strategies, tf.train.Checkpoint) and
the export writer below.

Export: <workdir>/export/saved_model is the stripped model (opq_tf.strip)
with the JPEG serving signature of opq_tf.training.serving; report.json and
model.opq beside it (and model.tflite with config.litert) come from
opq_tf.tf_keras.exporting.export. With LiteRT, the .tflite's accuracy is
measured against the stripped Keras model and recorded in the report.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Iterator, Optional

import ml_collections

from opq_tf.core import allocation
from opq_tf.tf_keras import exporting
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf
from opq_tf.training import job
from opq_tf.training import loop
from opq_tf.training import models
from opq_tf.training import pretrained
from opq_tf.training import serving

_REPRESENTATIVE_IMAGES = 100  # training images int8 activations calibrate on


def _representative_data(config: ml_collections.ConfigDict, data_dir: str
                         ) -> Optional[Callable[[], Iterator[list]]]:
  """LiteRT's representative dataset: one-image batches of training images."""
  if not (config.litert and config.litert_int8_activations):
    return None

  def images():
    for batch in job.calibration_images(config, data_dir,
                                        _REPRESENTATIVE_IMAGES):
      for image in batch:
        yield [image[None]]

  return images


def _litert_accuracy(qmodel: keras.Model, config: ml_collections.ConfigDict,
                     data_dir: str, export_dir: str) -> dict[str, Any]:
  """job.litert_accuracy, and with int8 activations a float-activation
  .tflite of the same model beside it, so the cost of quantizing the
  activations reads off one table. The model is stripped once, for both
  comparisons and that conversion. Every worker runs this (stripping reads
  BatchNorm's sync-on-read statistics, a collective across workers).
  """
  # Imported on use, as exporting does: it loads the LiteRT runtime.
  from opq_tf.tf_keras import litert  # pylint: disable=g-import-not-at-top

  stripped = wrapping.strip(qmodel)
  activations = ("int8_activations" if config.litert_int8_activations
                 else "float_activations")
  images, labels = job.litert_images(config, data_dir)
  result = {"images": int(len(labels)),
            activations: litert.compare(
                os.path.join(export_dir, litert.LITERT_FILE), stripped,
                images, labels)}
  if config.litert_int8_activations:
    with tempfile.TemporaryDirectory() as temp:
      float_path = os.path.join(temp, litert.LITERT_FILE)
      litert.write(wrapping.compressed_kernels(qmodel), stripped, float_path)
      result["float_activations"] = litert.compare(float_path, stripped,
                                                   images, labels)
  return result


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


def _build(config: ml_collections.ConfigDict) -> keras.Model:
  keras.utils.set_random_seed(config.seed)
  return models.build_for_config(config)


FRONTEND = job.Frontend(
    name="tf_keras", backend=lambda: "tensorflow", build=_build,
    load_weights=pretrained.load, save_weights=pretrained.save, fit=loop.fit,
    evaluate=loop.evaluate, latest_checkpoint=tf.train.latest_checkpoint,
    write_export=_write_export)
