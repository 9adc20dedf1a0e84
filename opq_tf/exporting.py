"""`export`: SavedModel + report.json + packed file; `load_packed`: rebuild.

    report = opq_tf.export(qmodel, "out/")
    # out/saved_model/   SavedModel of opq_tf.strip(qmodel), serving_default
    # out/report.json    plan + realised sizes and ratios
    # out/model.opq      entropy-coded masks/codes + steps + raw FP32 rest
    model = opq_tf.load_packed("out/model.opq", build_model)

The packed file holds no architecture: `load_packed` gets it from the caller
(a function building a fresh plain model, or a Keras model JSON/config) and
fills the weights by name, so the rebuilt weights equal strip(qmodel)'s bit for
bit.

Weights are named by `opq_tf.layers.weight_key` (e.g. "conv1/kernel",
"bn/moving_mean"), the same key as the compressed kernels.

Size figures in report.json, all over the whole model unless stated:
- weight_bits_ratio = 32·Σn_i / Σ_i(kept_i·B_i + 32·steps_i), over compressed
  kernels (steps_i = 1, or the output channels at "channel" granularity).
- model_ratio = 4·(all parameters) / (bytes of model.opq on disk).
- entropy_bound_bytes = (Σ_i n_i·H_i + 32·(steps) + 32·(FP32 rest
  parameters)) / 8: the stored steps are part of what must be written,
  H_i the empirical entropy of kernel i's symbols (0 = pruned, c + K + 1 = code c).
- packed_over_bound = packed_bytes / entropy_bound_bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np

from opq_tf import files
from opq_tf import grid
from opq_tf import layers as layers_lib
from opq_tf import packing
from opq_tf._keras import keras, tf
from opq_tf.wrapping import compressed_kernels, strip

SAVED_MODEL_DIR = "saved_model"
REPORT_FILE = "report.json"
PACKED_FILE = "model.opq"


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


def _check_target(directory: str) -> None:
  if os.path.isfile(directory):
    raise ValueError(
        f"Export target {directory!r} is a file; choose a new directory.")
  if os.path.isdir(directory) and os.listdir(directory):
    raise ValueError(
        f"Export directory {directory!r} is not empty (it holds "
        f"{sorted(os.listdir(directory))[:5]}); choose a new directory or "
        "remove it first (export never overwrites).")


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


def _serving_function(model: keras.Model, serving_fn, input_signature):
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


def _packed_kernels(kernels, stripped: keras.Model, names_by_id: dict):
  """PackedKernel per compressed kernel, checked against the stripped weights.

  The codes are the wrapped model's own (mask * clip(round(w / step))); the
  check that they reproduce strip(model)'s kernel exactly is what makes the
  packed file rebuild it bit for bit.
  """
  by_name = {layer.name: layer for layer in layers_lib.iter_layers(stripped)}
  packed = []
  for kernel in kernels:
    variable = getattr(by_name[kernel.layer_name], kernel.weight)
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


def _report(model: keras.Model, kernels, packed, rest: dict,
            stats: packing.PackStats) -> dict:
  """report.json contents: plan, totals and per-kernel realised figures."""
  kernel_reports = []
  total_weights = kept_weights = entropy_bits = 0.0
  for kernel, packed_kernel in zip(kernels, packed):
    counts = stats.kernel_counts[packed_kernel.name]
    entropy = packing.entropy_from_counts(counts)
    size = int(counts.sum())
    kept = int(kernel.mask.sum())
    total_weights += size
    kept_weights += kept
    entropy_bits += size * entropy
    kernel_reports.append({
        "key": kernel.key,
        "weight_name": packed_kernel.name,
        "kind": kernel.kind,
        "shape": list(kernel.mask.shape),
        "size": size,
        "kept": kept,
        "pruning_rate": 1.0 - kept / size,
        "bits": kernel.bits,
        "step": kernel.step.tolist(),
        "steps": int(kernel.step.size),
        "threshold": kernel.threshold,
        "entropy_bits_per_weight": entropy,
        "coded_bytes": stats.kernel_coded_bits[packed_kernel.name] / 8,
    })
  rest_parameters = int(sum(np.size(v) for v in rest.values()))
  all_parameters = int(total_weights) + rest_parameters
  steps = sum(r["steps"] for r in kernel_reports)
  entropy_bound_bytes = (entropy_bits + 32 * steps + 32 * rest_parameters) / 8
  plan = getattr(model, "opq_plan", None)
  return {
      "weight_bits_ratio": grid.weight_bits_ratio(
          [r["size"] for r in kernel_reports], [r["kept"] for r in kernel_reports],
          [r["bits"] for r in kernel_reports],
          [r["steps"] for r in kernel_reports]),
      "model_ratio": 4 * all_parameters / stats.file_bytes,
      "fp32_model_bytes": 4 * all_parameters,
      "packed_bytes": stats.file_bytes,
      "entropy_bound_bytes": entropy_bound_bytes,
      "packed_over_bound": stats.file_bytes / entropy_bound_bytes,
      "packed_parts_bytes": {
          "header": stats.header_bytes,
          "coded": stats.coded_bytes,
          "fp32_rest": stats.rest_bytes,
      },
      "parameters": all_parameters,
      "compressed_weights": int(total_weights),
      "kept_weights": int(kept_weights),
      "realised_pruning_rate": 1.0 - kept_weights / total_weights,
      "fp32_rest_parameters": rest_parameters,
      "kernels": kernel_reports,
      "plan": json.loads(plan.to_json()) if plan is not None else None,
      "files": {"saved_model": SAVED_MODEL_DIR, "packed": PACKED_FILE},
  }


def export(
    model: keras.Model,
    directory: Union[str, os.PathLike],
    *,
    serving_fn: Optional[Callable[..., Any]] = None,
    input_signature: Optional[Sequence[tf.TensorSpec]] = None,
    litert: bool = False,
    litert_int8_activations: bool = False,
    representative_data: Optional[Callable[[], Any]] = None,
) -> dict:
  """Writes `directory` with saved_model/, report.json, model.opq (+ .tflite).

  Everything is written under a temporary sibling and renamed at the end, so
  an error leaves no partial directory.

  Args:
    model: a model returned by `opq_tf.apply` (possibly finetuned).
    directory: a new (or empty) directory.
    serving_fn: called as `serving_fn(stripped_model, *inputs)` inside a
      tf.function with `input_signature`; returns a tensor or a dict of named
      tensors. E.g. JPEG bytes in, probabilities out:
      `lambda model, jpegs: model(tf.map_fn(decode, jpegs, ...))` with
      `input_signature=[tf.TensorSpec([None], tf.string, name="jpegs")]`.
      Default: the model itself, outputs named "outputs".
    input_signature: the serving inputs; default one float32 batch
      `(None, *input shape)` per model input, named "inputs" for a
      single-input model.
    litert: also write model.tflite (`opq_tf.litert.convert`), whose int8
      weights are exactly the OPQ codes; report.json gains its facts under
      "litert".
    litert_int8_activations: quantize the .tflite's activations to int8 too
      (needs `representative_data`, a function yielding [one-image batch]).
    representative_data: see litert_int8_activations.

  Returns:
    The report (also written to report.json).

  Raises:
    ValueError: the model was never applied, the directory is not empty, or
      serving_fn cannot be traced.
  """
  directory = os.path.abspath(os.fspath(directory))
  _check_target(directory)
  kernels = compressed_kernels(model)
  stripped = strip(model)
  concrete = _serving_function(stripped, serving_fn, input_signature)

  names = named_weights(stripped)
  names_by_id = {id(variable): name for name, variable in names.items()}
  packed = _packed_kernels(kernels, stripped, names_by_id)
  packed_names = {kernel.name for kernel in packed}
  rest = {name: np.asarray(variable.numpy(), np.float32)
          for name, variable in names.items() if name not in packed_names}

  created = []  # Parents this export creates, removed again on failure.
  ancestor = os.path.dirname(directory)
  while not os.path.exists(ancestor):
    created.append(ancestor)
    ancestor = os.path.dirname(ancestor)
  try:
    with files.atomic_path(directory) as temp:
      os.mkdir(temp)
      tf.saved_model.save(stripped, os.path.join(temp, SAVED_MODEL_DIR),
                          signatures={"serving_default": concrete})
      stats = packing.write_packed(os.path.join(temp, PACKED_FILE), packed,
                                   rest)
      report = _report(model, kernels, packed, rest, stats)
      if litert:
        # Imported on use: it loads the LiteRT runtime and flatbuffer schema.
        from opq_tf import litert as litert_lib  # pylint: disable=g-import-not-at-top

        report["litert"] = litert_lib.convert(
            model, os.path.join(temp, litert_lib.LITERT_FILE),
            int8_activations=litert_int8_activations,
            representative_data=representative_data)
        report["files"]["litert"] = litert_lib.LITERT_FILE
      files.write_json(os.path.join(temp, REPORT_FILE), report)
      _check_target(directory)
      if os.path.isdir(directory):
        os.rmdir(directory)
  except BaseException:
    for path in created:
      try:
        os.rmdir(path)
      except OSError:
        break
    raise
  return report


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
    raise ValueError(f"Model {model.name!r} cannot load it: {error}") from error
  values = {kernel.name: kernel.values() for kernel in kernels}
  values.update(rest)
  for name, variable in variables.items():
    variable.assign(values[name].astype(variable.dtype.as_numpy_dtype))
  return model
