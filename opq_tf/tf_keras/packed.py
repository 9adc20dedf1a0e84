"""The packed format: model.opq, and `load_packed` that rebuilds from it.

One writer of `opq_tf.tf_keras.exporting.export`: entropy-coded masks and
codes, the steps and the raw FP32 rest (opq_tf/core/packing.py), named by
`layers.weight_key`. The file holds no architecture: `load_packed` gets it
from the caller (a function building a fresh plain model, a built model, or a
Keras model JSON/config) and fills the weights by name, so the rebuilt weights
equal strip(qmodel)'s bit for bit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any, Union

import numpy as np

from opq_tf.core import packing
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras._keras import keras

FILE = "model.opq"


def named_weights(model: keras.Model) -> dict[str, Any]:
  """Maps `layers.weight_key` -> variable for every weight of `model`, in order.

  Raises:
    ValueError: two weights get the same name.
  """
  named, seen = {}, set()
  for layer in layers_lib.iter_layers(model):
    keys = layers_lib.weight_keys(layer)
    for variable in layer.weights:
      if id(variable) in seen:
        continue
      seen.add(id(variable))
      name = keys.get(id(variable)) or layers_lib.weight_key(layer, variable)
      if name in named:
        raise ValueError(
            f"Two weights of model {model.name!r} are both named {name!r}; "
            "give its layers unique names so packed weights can be matched.")
      named[name] = variable
  for variable in model.weights:
    if id(variable) not in seen:
      seen.add(id(variable))
      named.setdefault(variable.name.rsplit(":", 1)[0], variable)
  return named


def packed_kernels(kernels, stripped: keras.Model, names_by_id: dict):
  """PackedKernel per compressed kernel, checked against the stripped weights.

  The codes are the wrapped model's own (mask * clip(round(w / step))); the
  check that they reproduce strip(model)'s kernel exactly is what makes the
  packed file rebuild it bit for bit.
  """
  by_name = {layer.name: layer for layer in layers_lib.iter_layers(stripped)}
  packed = []
  for kernel in kernels:
    name, _, attr = kernel.key.partition("/")
    variable = getattr(*layers_lib.owner_of(by_name[name], attr))
    packed_kernel = packing.PackedKernel(
        name=names_by_id[id(variable)], bits=kernel.bits, step=kernel.step,
        mask=kernel.mask, codes=kernel.codes)
    if not np.array_equal(packed_kernel.values(), variable.numpy()):
      raise ValueError(
          f"The stripped kernel {kernel.key!r} is not mask * step * code; the "
          "model's weights were changed outside OPQ after apply. Re-run "
          "opq_tf.apply (or finetune only through the wrapped model).")
    packed.append(packed_kernel)
  return packed


def write(kernels, stripped: keras.Model, directory: str):
  """Writes `directory`/model.opq; returns (packed kernels, rest, stats)."""
  names = named_weights(stripped)
  names_by_id = {id(variable): name for name, variable in names.items()}
  packed = packed_kernels(kernels, stripped, names_by_id)
  packed_names = {kernel.name for kernel in packed}
  rest = {name: np.asarray(variable.numpy(), np.float32)
          for name, variable in names.items() if name not in packed_names}
  for name, values in rest.items():
    if not np.all(np.isfinite(values)):
      raise ValueError(
          f"Weight {name!r} holds NaN or Inf, so the export would ship a "
          "broken model; restore the weights (e.g. an earlier checkpoint) or "
          "re-run calibration on finite images first.")
  stats = packing.write_packed(os.path.join(directory, FILE), packed, rest)
  return packed, rest, stats


def _build(model_fn_or_architecture) -> keras.Model:
  """A fresh plain model from a zero-arg callable, Keras JSON or config dict."""
  source = model_fn_or_architecture
  if isinstance(source, (str, bytes)):
    model = keras.models.model_from_json(source)
  elif isinstance(source, dict):
    if "class_name" in source:
      model = keras.models.model_from_json(json.dumps(source))
    elif "input_layers" in source:
      model = keras.Model.from_config(source)
    else:
      model = keras.Sequential.from_config(source)
  elif isinstance(source, keras.Model):
    model = source
  elif callable(source):
    model = source()
  else:
    raise TypeError(
        "load_packed needs a zero-argument function returning a fresh tf_keras "
        "model, or the architecture as model.to_json() text or a config dict; "
        f"got {type(source).__name__}.")
  if not isinstance(model, keras.Model):
    raise TypeError(
        f"The model function returned {type(model).__name__}, not a tf_keras "
        "Model; return the plain (un-wrapped) architecture that was exported.")
  if not model.built:
    raise ValueError(
        f"Model {model.name!r} is not built, so it has no weights to fill; "
        "give it an input shape (keras.Input or input_shape=...).")
  return model


def _automatic_names_hint(model: keras.Model) -> str:
  """Why names differ when a model function ran twice in one process.

  Keras numbers automatic layer names per process ("normalization",
  "normalization_1", ...), so a second build of the same architecture gets
  other names than the exported one had, and nothing matches.
  """
  numbered = sorted(layer.name for layer in layers_lib.iter_layers(model)
                    if re.fullmatch(r".+_\d+", layer.name))
  if not numbered:
    return ""
  return (f". The model's layers have automatic numbered names (e.g. "
          f"{numbered[0]!r}): Keras numbers them per process, so building the "
          "architecture again gives other names than the exported model had. "
          "Call keras.backend.clear_session() before building it, or give its "
          "layers explicit names")


def load_packed(
    path: Union[str, os.PathLike],
    model_fn_or_architecture: Union[Callable[[], keras.Model], str, dict],
) -> keras.Model:
  """Builds the architecture and fills it with the packed file's weights.

  Args:
    path: a model.opq written by `export`.
    model_fn_or_architecture: a zero-argument callable returning a fresh plain
      tf_keras model (the architecture that was compressed, with the same layer
      names), or that architecture as `model.to_json()` text / its dict.

  Returns:
    The model, every weight set to its packed value (compressed kernels equal
    `opq_tf.strip(qmodel)`'s bit for bit; other weights are the FP32 values).

  Raises:
    ValueError: the file is corrupt, or the model's weights do not match the
      file's by name and shape.
  """
  model = _build(model_fn_or_architecture)
  variables = named_weights(model)
  # Names and shapes are checked against the model before any symbol is
  # decoded, and the model's sizes bound what the file may declare.
  expected = {name: tuple(v.shape) for name, v in variables.items()}
  try:
    kernels, rest = packing.read_packed(
        path, expected_shapes=expected,
        max_elements=sum(int(np.prod(s)) for s in expected.values()))
  except ValueError as error:
    raise ValueError(f"Model {model.name!r} cannot load it: {error}"
                     f"{_automatic_names_hint(model)}") from error
  values = {kernel.name: kernel.values() for kernel in kernels}
  values.update(rest)
  for name, variable in variables.items():
    variable.assign(values[name].astype(variable.dtype.as_numpy_dtype))
  return model
