"""`export`: .keras + packed file + report.json (+ SavedModel); `load_packed`.

    report = opq_tf.export(qmodel, "out/", plan=plan)
    # out/model.keras    the stripped plain Keras 3 model (any backend)
    # out/model.opq      entropy-coded masks/codes + steps + raw FP32 rest
    # out/report.json    plan + realised sizes and ratios (opq_tf/core/report.py)
    # out/saved_model/   TensorFlow backend: keras' tf_saved_model export
    model = opq_tf.load_packed("out/model.opq", build_model)

The packed file is the core's format (opq_tf/core/packing.py), written from
the same `CompressedKernel`s and weight keys as the tf_keras frontend's, so
the same weights give the same file, byte for byte, from either frontend.
It holds no architecture: `load_packed` takes a built model (or a function
returning one) and fills its weights by key, so they equal
`strip(qmodel)`'s bit for bit.

Formats: "keras", "packed" (always: report.json's sizes are measured on it),
"saved_model" (keras' own `Model.export`; it needs TensorFlow, which it
imports, also on the JAX backend through jax2tf) and, on the TensorFlow
backend, "litert": keras' LiteRT conversion of the stripped model, whose
compressed kernels `opq_tf.litert_codes` (the writer the tf_keras frontend
shares) then replaces by the OPQ codes, int8 or int4, as tf_keras does. The
default is ("keras", "packed"), plus "saved_model" on the TensorFlow
backend; on JAX nothing the default writes imports TensorFlow.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np

from opq_tf.core import files
from opq_tf.core import packing
from opq_tf.core import report as report_lib
from opq_tf.keras3 import layers as layers_lib
from opq_tf.keras3._keras import keras, tensorflow_not_probed
from opq_tf.core.reconstruction import check_finite
from opq_tf.keras3.wrapping import compressed_kernels, strip

KERAS_FILE = "model.keras"
PACKED_FILE = "model.opq"
REPORT_FILE = report_lib.FILE
SAVED_MODEL_DIR = "saved_model"
LITERT_FILE = "model.tflite"
FORMATS = ("keras", "saved_model", "packed", "litert")

named_weights = layers_lib.named_weights
# Kind -> the LiteRT op keras' conversion computes its kernel with (a
# "depthwise_kernel" weight: DEPTHWISE_CONV_2D); other kinds are refused.
_LITERT_OPS = {"Conv1D": "conv_2d", "Conv2D": "conv_2d",
               "SeparableConv2D": "conv_2d", "Dense": "fully_connected",
               "EinsumDense": "fully_connected",
               "DepthwiseConv2D": "depthwise_conv_2d"}


def _check_target(directory: str) -> None:
  if os.path.isfile(directory):
    raise ValueError(
        f"Export target {directory!r} is a file; choose a new directory.")
  if os.path.isdir(directory) and os.listdir(directory):
    raise ValueError(
        f"Export directory {directory!r} is not empty (it holds "
        f"{sorted(os.listdir(directory))[:5]}); choose a new directory or "
        "remove it first (export never overwrites).")


def _check_formats(formats: Optional[Sequence[str]]) -> tuple[str, ...]:
  if formats is None:
    formats = ("keras", "packed") + (
        ("saved_model",) if keras.backend.backend() == "tensorflow" else ())
  if isinstance(formats, str):
    formats = (formats,)
  unknown = [name for name in formats if name not in FORMATS]
  if unknown:
    raise ValueError(f"Unknown export formats {unknown}; choose from {FORMATS}.")
  if "packed" not in formats:
    raise ValueError(
        f"formats={tuple(formats)} leaves out 'packed', on which report.json's "
        "sizes are measured; add it, e.g. formats=('keras', 'packed').")
  return tuple(name for name in FORMATS if name in formats)


def _packed_kernels(kernels, stripped: keras.Model, names_by_id: dict):
  """PackedKernel per compressed kernel, checked against the stripped weights.

  The check that the codes reproduce strip(model)'s kernel exactly is what
  makes the packed file rebuild it bit for bit.
  """
  sites = layers_lib.kernel_sites(stripped)
  packed = []
  for kernel in kernels:
    variable = sites[kernel.key].variable
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


def _write_litert(kernels, stripped: keras.Model, path: str,
                  input_signature: Any, weights: str) -> dict:
  """model.tflite: keras' conversion with the codes as integer weights."""
  from opq_tf import litert_codes  # pylint: disable=g-import-not-at-top

  converted = path + ".float.tflite"
  try:
    stripped.export(converted, format="litert", verbose=False,
                    input_signature=input_signature)
    with open(converted, "rb") as f:
      float_content = f.read()
  finally:
    if os.path.exists(converted):
      os.remove(converted)
  ops = {kernel.key: ("depthwise_conv_2d" if kernel.weight == "depthwise_kernel"
                      else _LITERT_OPS.get(kernel.kind)) for kernel in kernels}
  content, facts = litert_codes.rewrite(float_content, kernels, ops,
                                        weights=weights)
  litert_codes.save(path, content)
  return {
      "file": LITERT_FILE,
      "bytes": len(content),
      "gzip_bytes": len(gzip.compress(content, 9)),
      "activations": "float32",
      "compute": "float",
      "conversion": (
          "keras Model.export(format='litert'); each compressed kernel's "
          f"tensor rewritten as OPQ codes ({weights}), zero point 0, scale = "
          "step x the factor the converter folded in; DEQUANTIZE into float "
          "ops; int8 kernels in CSR + DENSIFY where smaller"),
      **facts,
  }


def export(
    model: keras.Model,
    directory: Union[str, os.PathLike],
    *,
    formats: Optional[Sequence[str]] = None,
    plan: Optional[Any] = None,
    input_signature: Any = None,
    litert: bool = False,
    litert_weights: str = "int8",
) -> dict:
  """Writes `directory` with report.json and each of `formats`.

  Everything is written under a temporary sibling and renamed at the end, so
  an error leaves no partial directory.

  Args:
    model: a model returned by `opq_tf.apply` (possibly finetuned).
    directory: a new (or empty) directory.
    formats: some of "keras" (model.keras, the stripped model), "packed"
      (always needed), "saved_model" (saved_model/, keras'
      `Model.export(format="tf_saved_model")`, serving its inputs) and
      "litert" (model.tflite, TensorFlow backend: keras' LiteRT conversion
      with the OPQ codes as its integer weights, as the tf_keras frontend
      writes them). Default: ("keras", "packed"), and "saved_model" on the
      TensorFlow backend.
    plan: the `CompressionPlan` the model was made with, recorded in
      report.json (the model holds every mask and step, not the request).
    input_signature: passed to keras' `Model.export` (default: the model's
      inputs with a free batch dimension).
    litert: the same as adding "litert" to `formats`.
    litert_weights: "int8", "int4" (B <= 4 kernels as int4 codes where
      LiteRT runs their op so), "int2" (also B <= 2 kernels as int2 codes:
      each kernel at its smallest type) or "auto" (per op type where
      measured no slower); the report says per kernel what and why.

  Returns:
    The report (also written to report.json).

  Raises:
    ValueError: the model was never applied, holds NaN or Inf, the
      directory is not empty, or a format is unknown.
  """
  directory = os.path.abspath(os.fspath(directory))
  formats = _check_formats(formats)
  if litert:
    formats = _check_formats(formats + ("litert",))
  if "litert" in formats:
    if keras.backend.backend() != "tensorflow":
      raise ValueError(
          "The LiteRT format needs the TensorFlow backend (its converter); "
          f"this is {keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow "
          "or leave 'litert' out of formats.")
    from opq_tf import litert_codes  # pylint: disable=g-import-not-at-top

    if litert_weights not in litert_codes.WEIGHTS:
      raise ValueError(f"litert_weights={litert_weights!r}; use one of "
                       f"{litert_codes.WEIGHTS}.")
  _check_target(directory)
  kernels = compressed_kernels(model)
  for kernel in kernels:  # A NaN latent weight is NaN even where pruned.
    check_finite(kernel.kernel, f"Kernel {kernel.key}")
    check_finite(kernel.step, f"The step of {kernel.key}")
  stripped = strip(model)

  names = named_weights(stripped)
  names_by_id = {id(variable): name for name, variable in names.items()}
  packed = _packed_kernels(kernels, stripped, names_by_id)
  packed_names = {kernel.name for kernel in packed}
  rest = {name: np.asarray(variable.numpy(), np.float32)
          for name, variable in names.items() if name not in packed_names}
  for name, value in rest.items():
    check_finite(value, f"Weight {name}")
  paths = {"keras": KERAS_FILE, "saved_model": SAVED_MODEL_DIR,
           "packed": PACKED_FILE, "litert": LITERT_FILE}
  written = {name: paths[name] for name in formats}

  created = []  # Parents this export creates, removed again on failure.
  ancestor = os.path.dirname(directory)
  while not os.path.exists(ancestor):
    created.append(ancestor)
    ancestor = os.path.dirname(ancestor)
  try:
    with files.atomic_path(directory) as temp:
      os.mkdir(temp)
      if "keras" in formats:
        with tensorflow_not_probed():
          stripped.save(os.path.join(temp, KERAS_FILE))
      if "saved_model" in formats:
        stripped.export(os.path.join(temp, SAVED_MODEL_DIR),
                        format="tf_saved_model", verbose=False,
                        input_signature=input_signature)
      litert_facts = (
          _write_litert(kernels, stripped, os.path.join(temp, LITERT_FILE),
                        input_signature, litert_weights)
          if "litert" in formats else None)
      stats = packing.write_packed(os.path.join(temp, PACKED_FILE), packed,
                                   rest)
      report = report_lib.build(kernels, packed, rest, stats, plan=plan,
                                files=written,
                                fp32=layers_lib.fp32_kernels(stripped))
      if litert_facts is not None:
        report["litert"] = litert_facts
      files.write_json(os.path.join(temp, REPORT_FILE), report)
      _check_target(directory)
      if os.path.isdir(directory):
        os.rmdir(directory)
  except BaseException as error:
    for path in created:
      try:
        os.rmdir(path)
      except OSError:
        break
    if isinstance(error, OSError):  # It names the hidden temporary: say
      raise OSError(                  # which target, and what to do.
          f"Cannot export to {directory!r}: {error.strerror or error}; "
          "choose a directory you can write to.") from error
    raise
  return report


def _build(model_fn_or_model: Union[Callable[[], keras.Model], keras.Model]
           ) -> keras.Model:
  source = model_fn_or_model
  model = source if isinstance(source, keras.Model) else (
      source() if callable(source) else source)
  if not isinstance(model, keras.Model):
    raise TypeError(
        "load_packed needs a built Keras 3 model, or a zero-argument function "
        f"returning one; got {type(model).__name__}. Return the plain "
        "(un-wrapped) architecture that was exported.")
  if not model.built:
    raise ValueError(
        f"Model {model.name!r} is not built, so it has no weights to fill; "
        "give it an input shape (keras.Input).")
  return model


def load_packed(
    path: Union[str, os.PathLike],
    model_fn_or_model: Union[Callable[[], keras.Model], keras.Model],
) -> keras.Model:
  """Fills a plain model with the packed file's weights.

  Args:
    path: a model.opq written by `export` (by either frontend).
    model_fn_or_model: the architecture that was compressed, built, with the
      same layer names: a Keras 3 model or a zero-argument function returning
      one.

  Returns:
    The model, every weight set to its packed value (compressed kernels equal
    `opq_tf.strip(qmodel)`'s bit for bit; other weights are the FP32 values).

  Raises:
    ValueError: the file is corrupt, or the model's weights do not match the
      file's by name and shape.
  """
  model = _build(model_fn_or_model)
  variables = named_weights(model)
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
    variable.assign(values[name].astype(variable.dtype))
  return model
