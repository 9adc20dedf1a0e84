"""The SavedModel format: the stripped model with a serving signature.

One writer of `opq_tf.tf_keras.exporting.export` (saved_model/): the stripped
model's compressed kernels are plain FP32 values `mask * step * code`, so any
TensorFlow runtime serves it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

from opq_tf.tf_keras._keras import keras, tf

DIRECTORY = "saved_model"


def _default_signature(model: keras.Model) -> list[tf.TensorSpec]:
  """One float32 batch per model input, named "inputs" if there is one."""
  if len(model.inputs) == 1:
    names = ["inputs"]
  else:
    names = list(model.input_names)
  return [
      tf.TensorSpec((None, *tensor.shape[1:]), tf.float32, name=name)
      for name, tensor in zip(names, model.inputs)
  ]


def serving_function(model: keras.Model, serving_fn, input_signature):
  """The concrete serving_default function of the SavedModel."""
  if input_signature is None:
    input_signature = _default_signature(model)
  input_signature = list(input_signature)
  if serving_fn is None:

    def serving_fn(model, *inputs):
      outputs = model(inputs[0] if len(inputs) == 1 else list(inputs),
                      training=False)
      if isinstance(outputs, (list, tuple)):
        return dict(zip(model.output_names, outputs))
      return {"outputs": outputs}

  elif not callable(serving_fn):
    raise TypeError(
        f"serving_fn must be callable as serving_fn(model, *inputs), got "
        f"{type(serving_fn).__name__}.")

  def serve(*inputs):
    outputs = serving_fn(model, *inputs)
    if not isinstance(outputs, dict):
      outputs = {"outputs": outputs}
    return outputs

  try:
    return tf.function(serve, input_signature=input_signature,
                       autograph=False).get_concrete_function()
  except Exception as error:
    raise ValueError(
        f"serving_fn could not be traced into a serving signature ({error}); "
        "it must map (model, *inputs matching input_signature) to a tensor or "
        "a dict of tensors using TensorFlow ops.") from error


def write(stripped: keras.Model, directory: str, concrete) -> str:
  """Writes stripped/ as `directory`/saved_model; returns the folder name."""
  tf.saved_model.save(stripped, os.path.join(directory, DIRECTORY),
                      signatures={"serving_default": concrete})
  return DIRECTORY
