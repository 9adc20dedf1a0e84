"""LiteRT (.tflite) export of a tf_keras model whose weights are the OPQ codes.

    info = litert.convert(qmodel, "out/model.tflite")        # float activations
    info = litert.convert(qmodel, "out/model.tflite", weights="int2")
    weights = litert.read_weights("out/model.tflite")        # key -> StoredWeight
    litert.compare("out/model.tflite", opq_tf.strip(qmodel), images)

TensorFlow's converter turns the stripped float model into a .tflite (graph
lowering, BatchNormalization folding, fusions); `opq_tf.litert_codes`, the
writer both frontends share, then replaces every compressed Conv2D /
DepthwiseConv2D / Dense weight by the OPQ codes (int8, or int4 for B <= 4
and int2 for B <= 2 where LiteRT runs them), zero point 0, scale = step x the factor the converter
folded in. This module is the tf_keras side: the converter calls, the layer
table's LiteRT op per kernel, and the facts report.json records.

With float activations (default compute="float") each kernel feeds a
DEQUANTIZE op and the convs stay float: the logits are Keras' to float
rounding, and XNNPACK (LiteRT's default CPU delegate) runs the file. Int8
kernels whose compressed-sparse-row (CSR) form is smaller are stored sparse
behind a DENSIFY op, as the converter's EXPERIMENTAL_SPARSITY does.
compute="hybrid" makes them LiteRT's dynamic-range kernels instead (integer
weights, activations quantized on the fly), what the converter's
Optimize.DEFAULT writes. With `int8_activations=True` the converter's full
integer model (calibrated on `representative_data`) gets the same weight
rewrite, and each bias is requantized to input_scale * scale_c.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

from opq_tf import litert_codes
from opq_tf.litert_codes import (StoredWeight, compare, interpreter,  # noqa: F401
                                 predict, read_weights)
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf

LITERT_FILE = "model.tflite"
BITS_NOTE = (
    "Codes of B <= 4 bits are stored in int4 with litert weights 'int4', "
    "B <= 2 also in int2 with 'int2' (each where its op runs it; 'auto': per "
    "op type by measured latency), others in int8 (one byte per weight, "
    "pruned ones possibly in CSR form); 'stored' says per kernel; model.opq "
    "(entropy-coded) stays the smallest artefact.")
COMPUTES = ("float", "hybrid")


def _kernels(qmodel) -> list:
  """The wrapped model's compressed kernels (raises if OPQ was never applied)."""
  if not isinstance(qmodel, keras.Model):
    raise TypeError(
        f"litert.convert needs the tf_keras model returned by opq_tf.apply, "
        f"got {type(qmodel).__name__}.")
  return wrapping.compressed_kernels(qmodel)


def _ops(kernels: list) -> dict:
  """Kernel key -> its LiteRT op, from the layer table (refuses None)."""
  ops = {}
  for entry in kernels:
    op = layers_lib.rule(entry.kind, entry.weight).litert
    if op is None:
      raise ValueError(
          f"{entry.key}: layer kind {entry.kind} names no LiteRT op in the "
          "layer table, so its codes cannot be placed in the .tflite; "
          "register it with opq_tf.register_layer(..., like=<the built-in "
          "kind it computes>) or export without LiteRT.")
    ops[entry.key] = op
  return ops


def _converter_bytes(model: keras.Model, configure: Callable[[Any], None]) -> bytes:
  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  configure(converter)
  try:
    return converter.convert()
  except Exception as error:  # The converter raises several unrelated types.
    raise ValueError(
        f"TensorFlow's TFLite converter cannot convert model {model.name!r}: "
        f"{str(error).strip().splitlines()[-1] if str(error).strip() else error}"
        ". Replace the layer it names by built-in TensorFlow ops (or drop it "
        "from the exported model), or export without LiteRT.") from error


def float_tflite(model: keras.Model, *, optimizations: Iterable = ()) -> bytes:
  """Plain TFLiteConverter output for `model` (benchmark baselines)."""

  def configure(converter):
    converter.optimizations = list(optimizations)

  return _converter_bytes(model, configure)


def convert(qmodel: keras.Model, path: Union[str, os.PathLike],
            **options: Any) -> dict:
  """Writes `path` (.tflite) for a wrapped model; see `write` for `options`."""
  return write(_kernels(qmodel), wrapping.strip(qmodel), path, **options)


def write(
    kernels: list,
    stripped: keras.Model,
    path: Union[str, os.PathLike],
    *,
    int8_activations: bool = False,
    representative_data: Optional[Callable[[], Iterable[Any]]] = None,
    sparse: Optional[bool] = None,
    compute: str = "float",
    weights: str = "int8",
) -> dict:
  """Writes `path` (.tflite) with the OPQ codes as integer weights; returns facts.

  One writer of `opq_tf.tf_keras.exporting.export`, which strips the model
  once for every format.

  Args:
    kernels: the wrapped model's `CompressedKernel`s.
    stripped: `opq_tf.strip` of the wrapped model.
    path: the .tflite file to create; it must not exist.
    int8_activations: also quantize activations to int8 (full integer model,
      float input and output), calibrated on `representative_data`.
    representative_data: a zero-argument callable yielding lists of input
      batches, as `TFLiteConverter.representative_dataset` wants (a few
      hundred training images); required with `int8_activations`.
    sparse: store a kernel in int8 CSR form behind DENSIFY where that is
      smaller than its dense form, int8 or (asked) int4 / int2 (float
      activations only). Default: with compute="float" only.
      LiteRT 2.3's default XNNPACK delegate fails to prepare a hybrid conv fed
      by DENSIFY (the converter's own EXPERIMENTAL_SPARSITY output fails the
      same way), so a sparse hybrid file runs only with XNNPACK off
      (`interpreter(path, xnnpack=False)`).
    compute: with float activations, "float": each kernel feeds a DEQUANTIZE
      op and the convs run in float (XNNPACK unpacks the weights once at
      load; the logits are Keras'); "hybrid": LiteRT's dynamic-range kernels
      (integer weights, activations quantized on the fly), as the converter's
      Optimize.DEFAULT writes them.
    weights: the narrowest stored type: "int8"; "int4": kernels of B <= 4
      stored as int4 codes (two a byte) where LiteRT runs their op with
      int4 filters, the others int8; "int2": also kernels of B <= 2 as int2
      codes (four a byte) where their op runs int2 filters, so each kernel
      (of a mixed plan too) gets the smallest type that holds its codes;
      "auto": "int2"'s choice per op type where the interpreter measured it
      no slower than int8 (the facts give the latencies and the choice).
      The facts' "stored" says per kernel what was stored and why.

  Returns:
    What report.json records under "litert": file name, bytes, gzip bytes,
    activations, conversion method, kernel counts per stored type, per
    kernel what was stored and why ("stored"), and the bits note.

  Raises:
    ValueError: the model was never applied, `path` exists, the converter
      fails, `int8_activations` without `representative_data`, or the
      rewritten file does not run in the LiteRT interpreter (nothing is
      written then).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    raise ValueError(f"LiteRT target {path!r} exists; choose a new path or "
                     "remove it first (export never overwrites).")
  if compute not in COMPUTES:
    raise ValueError(f"compute={compute!r}; use one of {COMPUTES}.")
  if weights not in litert_codes.WEIGHTS:
    raise ValueError(f"litert weights={weights!r}; use one of "
                     f"{litert_codes.WEIGHTS}.")
  if sparse is None:
    sparse = compute == "float" and not int8_activations
  elif sparse and int8_activations:
    raise ValueError("sparse=True needs float activations; the integer "
                     "kernels have no sparse path here.")
  if int8_activations and representative_data is None:
    raise ValueError(
        "int8_activations needs representative_data: a function yielding "
        "[batch] lists of training images to calibrate activation ranges.")
  ops = _ops(kernels)
  float_content = float_tflite(stripped)
  integer_content = None
  if int8_activations:

    def configure(converter):
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = representative_data
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

    integer_content = _converter_bytes(stripped, configure)
  content, stats = litert_codes.rewrite(
      float_content, kernels, ops,
      compute="int8" if int8_activations else compute, sparse=sparse,
      weights=weights, integer_content=integer_content)
  sparse_hybrid = bool(stats["kernels_sparse"]) and compute == "hybrid"
  litert_codes.save(path, content, xnnpack_runs=not sparse_hybrid)
  return {
      "file": os.path.basename(path),
      "bytes": len(content),
      "gzip_bytes": len(gzip.compress(content, 9)),
      "activations": "int8" if int8_activations else "float32",
      "conversion": (
          f"tf.lite.TFLiteConverter (TensorFlow {tf.__version__}, "
          + ("full integer, representative dataset" if int8_activations
             else "float") +
          "); each compressed kernel's tensor rewritten as OPQ codes ("
          + {"int8": "int8", "int4": "int4 where B <= 4 and the op runs it",
             "int2": "int2 where B <= 2, int4 where B <= 4, each where the "
                     "op runs it",
             "auto": "int2 / int4 per op type where measured no slower"
             }[weights] +
          "), zero point 0, scale = step x the BatchNormalization factor the "
          "converter folded into it (1 when none)"
          + ("" if int8_activations else
             "; DEQUANTIZE into float ops" if compute == "float" else
             "; hybrid (dynamic-range) kernels")
          + ("; int8 kernels in CSR + DENSIFY where smaller" if sparse else "")),
      "compute": "int8" if int8_activations else compute,
      "sparse": bool(sparse),
      **stats,
      **({"sparse_note": "runs only with XNNPACK off in LiteRT 2.3"}
         if sparse_hybrid else {}),
      "bits": sorted({int(entry.bits) for entry in kernels}),
      "bits_note": BITS_NOTE,
  }
