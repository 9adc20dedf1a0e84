"""The job's Keras 3 frontend (config.frontend = "keras3").

    strategy = keras3_distribute.make_strategy(config, "mirrored")
    checks.validate(config, strategy, workdir, default_config=...)
    job.train_and_evaluate(keras3_training.FRONTEND, config, workdir, strategy)

`FRONTEND` is what opq_tf.training.job needs of the Keras 3 frontend: the
models (keras3_models), the loop (keras3_loop: TensorFlow strategies or JAX
DataParallel; checkpoints in one .npz per save) and the export writer below
(opq_tf.export of the Keras 3 frontend: model.keras, model.opq and
report.json, plus on the TensorFlow backend a SavedModel serving float
images and, with config.litert, model.tflite holding the OPQ codes). The
job itself (the plan, the workdir, the data, the start rule, the export's
"made_from" rule, the report) is the tf_keras job's.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

import opq_tf
from opq_tf.core import allocation
from opq_tf.keras3 import exporting
from opq_tf.keras3._keras import keras
from opq_tf.training import job
from opq_tf.training import keras3_distribute
from opq_tf.training import keras3_loop
from opq_tf.training import keras3_models
from opq_tf.training import models


def _write_export(qmodel: keras.Model, plan: allocation.CompressionPlan,
                  config: ml_collections.ConfigDict, data_dir: str,
                  target: str) -> dict[str, Any]:
  """opq_tf.export of `qmodel` to the new directory `target`, with the
  .tflite's accuracy (against the stripped model) when config.litert."""
  export_report = opq_tf.export(qmodel, target, plan=plan,
                                litert=config.litert,
                                litert_weights=config.litert_weights)
  if config.litert:
    from opq_tf import litert_codes  # pylint: disable=g-import-not-at-top

    images, labels = job.litert_images(config, data_dir)
    export_report["litert"]["accuracy"] = {
        "images": int(len(labels)),
        "float_activations": litert_codes.compare(
            os.path.join(target, exporting.LITERT_FILE), opq_tf.strip(qmodel),
            images, labels)}
  return export_report


def _build(config: ml_collections.ConfigDict) -> keras.Model:
  keras.utils.set_random_seed(config.seed)
  return keras3_models.build_for_config(config)


FRONTEND = job.Frontend(
    name="keras3", backend=keras.backend.backend, build=_build,
    load_weights=keras3_models.load_weights,
    save_weights=keras3_models.save_weights, fit=keras3_loop.fit,
    evaluate=keras3_loop.evaluate,
    latest_checkpoint=keras3_loop.latest_checkpoint,
    write_export=_write_export)


def check(config: ml_collections.ConfigDict) -> None:
  """What checks.validate checks of a keras3 config beyond the shared fields:
  the options this frontend lacks, and that the model builds and the
  pretrained weights load into it.

  Raises:
    ValueError: naming the field and the fix.
  """
  for field, why in (
      ("litert_int8_activations", "the Keras 3 LiteRT export keeps float "
       "activations"),
      ("quantize_activations", "activation quantization is tfmot's")):
    if config[field]:
      raise ValueError(
          f"config.{field}=True is only in the tf_keras frontend ({why}); set "
          f"--config.{field}=False or --config.frontend=tf_keras.")
  if config.litert and keras3_distribute.wanted_backend(config) != "tensorflow":
    raise ValueError(
        "config.litert=True needs the TensorFlow backend (LiteRT's converter); "
        f"this run is on {keras3_distribute.wanted_backend(config)!r}. Set "
        "--config.backend=tensorflow, or --config.litert=False and convert "
        "the exported model.keras on a machine with TensorFlow.")
  if config.pretrained == "imagenet":
    raise ValueError(
        "config.pretrained='imagenet' is only in the tf_keras frontend; on "
        "keras3 pass a weights file (.keras, .weights.h5 or .h5).")
  if config.pretrained:
    keras3_models.load_weights(keras3_models.build_for_config(config),
                               config.pretrained)
  elif config.model not in models.NAMES:  # the options suit the constructor
    keras3_models.build_for_config(config)
