"""LiteRT (.tflite) export whose int8 weights are exactly the OPQ codes.

    info = litert.convert(qmodel, "out/model.tflite")        # float activations
    weights = litert.read_weights("out/model.tflite")        # key -> StoredWeight
    litert.compare("out/model.tflite", opq_tf.strip(qmodel), images)

TensorFlow's converter, asked for int8 weights, picks its own scale
(max|w_c| / 127 per channel), which is not the plan's step: the stored integers
would be rescaled codes, not the codes. So `convert` lets the converter do
everything else (graph lowering, BatchNormalization folding, fusions) on the
stripped float model and then rewrites the weight tensor of every compressed
Conv2D / DepthwiseConv2D / Dense in the flatbuffer:

    stored int8 = codes (OPQ's, in TFLite layout), zero point 0,
    scale_c     = step_c * f_c,

f_c being the per-output-channel factor the converter folded into the kernel
(gamma_c / sqrt(var_c + eps) of a following BatchNormalization; 1 when none,
so the scale is the step itself). Where f_c < 0 the channel stores -codes with
scale |step_c * f_c| (LiteRT wants positive scales). A compressed kernel is
found in the converted graph by its shape and its zero pattern, and accepted
only if the float tensor is exactly codes * step * f_c per channel.

With float activations (default compute="float") each int8 kernel feeds a
DEQUANTIZE op and the convs stay float: the logits are Keras' to float
rounding, and XNNPACK (LiteRT's default CPU delegate) runs the file. Kernels
whose compressed-sparse-row (CSR) form is smaller are stored sparse behind a
DENSIFY op, as the converter's EXPERIMENTAL_SPARSITY does. compute="hybrid"
makes them LiteRT's dynamic-range kernels instead (int8 weights, activations
quantized on the fly), what the converter's Optimize.DEFAULT writes. With
`int8_activations=True` the converter's full integer model (calibrated on
`representative_data`) gets the same weight rewrite, and each bias is
requantized to input_scale * scale_c.

LiteRT's converter writes no int4: codes of B <= 8 bits are stored in int8, so
the packed file (model.opq) stays the smallest artefact.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import numpy as np
from ai_edge_litert import interpreter as litert_interpreter
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from opq_tf.core import files
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf

LITERT_FILE = "model.tflite"
BITS_NOTE = (
    "LiteRT's converter writes no int4: codes of B <= 8 bits are stored in "
    "int8 (one byte per kept or pruned weight, pruned ones possibly in CSR "
    "form), so model.opq (entropy-coded) is the smallest artefact.")
METADATA_NAME = "opq_kernels"
COMPUTES = ("float", "hybrid")

_Op = schema.BuiltinOperator
_WEIGHT_OPS = (_Op.CONV_2D, _Op.DEPTHWISE_CONV_2D, _Op.FULLY_CONNECTED)
# Lowest op versions with per-channel int8 weights under float activations
# (hybrid kernels), as TensorFlow 2.21's dynamic-range conversion writes them.
_HYBRID_VERSION = {_Op.CONV_2D: 5, _Op.DEPTHWISE_CONV_2D: 6,
                   _Op.FULLY_CONNECTED: 12}
# DEQUANTIZE of int8: version 2; per-channel int8: version 5 (op_version.cc).
_DEQUANTIZE_VERSION = {False: 2, True: 5}
_FACTOR_TOLERANCE = 1e-5  # relative, of folded / (step * code) within a channel


@dataclasses.dataclass(frozen=True)
class StoredWeight:
  """One int8 weight tensor read back from a .tflite file (dense layout).

  `values` is in TFLite layout: Conv2D [out, H, W, in], DepthwiseConv2D
  [1, H, W, in * multiplier], FullyConnected [out, in]; the real weight is
  `values * scales[c]` along `quantized_dimension` (zero points are 0 here).
  """

  values: np.ndarray
  scales: np.ndarray
  zero_points: np.ndarray
  quantized_dimension: int
  op: str
  sparse: bool


@dataclasses.dataclass
class _Target:
  """A compressed kernel in TFLite layout: codes and per-channel steps."""

  key: str
  layer_name: str
  codes: np.ndarray  # int32, TFLite layout
  steps: np.ndarray  # float32, one per channel along `axis`
  axis: int


def _kernels(qmodel) -> list:
  """The wrapped model's compressed kernels (raises if OPQ was never applied)."""
  if not isinstance(qmodel, keras.Model):
    raise TypeError(
        f"litert.convert needs the tf_keras model returned by opq_tf.apply, "
        f"got {type(qmodel).__name__}.")
  return wrapping.compressed_kernels(qmodel)


def _check_kinds(kernels: list) -> None:
  """Refuses kinds of the layer table that name no LiteRT op."""
  for entry in kernels:
    if layers_lib.rule(entry.kind, entry.weight).litert is None:
      raise ValueError(
          f"{entry.key}: layer kind {entry.kind} names no LiteRT op in the "
          "layer table, so its codes cannot be placed in the .tflite; "
          "register it with opq_tf.register_layer(..., like=<the built-in "
          "kind it computes>) or export without LiteRT.")


def _target(entry, shape: tuple[int, ...]) -> Optional[_Target]:
  """`entry`'s codes and steps in the layout of a TFLite tensor of `shape`.

  Depthwise kernels [H, W, in, mult] become [1, H, W, in * mult] (channel
  axis 3, C order); every other kernel moves its output axis first ([out,
  ...], axis 0), reshaped to `shape` when that only adds unit axes (Conv1D).
  """
  codes = np.asarray(entry.codes)
  depthwise = (layers_lib.rule(entry.kind, entry.weight).litert
               == "depthwise_conv_2d")
  if depthwise:
    channel_shape = codes.shape[-2:]
    laid_out, axis = codes.reshape((1, *codes.shape[:-2], -1)), 3
  else:
    channel_shape = codes.shape[-1:]
    laid_out, axis = np.moveaxis(codes, -1, 0), 0
  def squeezed(dims):
    return [int(d) for d in dims if d != 1]

  if (len(shape) <= axis or laid_out.shape[axis] != shape[axis]
      or squeezed(laid_out.shape) != squeezed(shape)):
    return None
  steps = np.asarray(entry.step, np.float32)
  if steps.size != int(np.prod(channel_shape)):  # A scalar (per-kernel) step.
    steps = np.broadcast_to(steps.reshape(()), channel_shape)
  steps = steps.reshape(-1)
  return _Target(entry.key, entry.layer_name, laid_out.reshape(shape),
                 np.ascontiguousarray(steps), axis)


def _channel_factors(values: np.ndarray, target: _Target) -> Optional[np.ndarray]:
  """f_c with values == codes * step_c * f_c per channel, or None if not so."""
  codes = np.moveaxis(target.codes, target.axis, 0).reshape(
      target.steps.size, -1).astype(np.float64)
  folded = np.moveaxis(values, target.axis, 0).reshape(codes.shape).astype(
      np.float64)
  if not np.array_equal(codes != 0, folded != 0):
    return None
  factors = np.ones(codes.shape[0])
  for channel in range(codes.shape[0]):
    kept = codes[channel] != 0
    if not kept.any():
      continue
    ratios = folded[channel][kept] / (codes[channel][kept]
                                      * float(target.steps[channel]))
    factor = float(np.median(ratios))
    if np.max(np.abs(ratios - factor)) > _FACTOR_TOLERANCE * abs(factor):
      return None
    if abs(factor - 1.0) <= 1e-6:
      factor = 1.0
    factors[channel] = factor
  return factors


# ----------------------------------------------------------------------------
# Flatbuffer access.


def _load(content: bytes) -> schema.ModelT:
  return flatbuffer_utils.convert_bytearray_to_object(bytearray(content))


def _serialize(model: schema.ModelT) -> bytes:
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _builtin(model: schema.ModelT, operator) -> int:
  code = model.operatorCodes[operator.opcodeIndex]
  return max(code.builtinCode, code.deprecatedBuiltinCode)


_OP_NAMES = {value: name for name, value in vars(_Op).items()
             if isinstance(value, int)}
_NUMPY_TYPES = {schema.TensorType.FLOAT32: np.float32,
                schema.TensorType.INT8: np.int8,
                schema.TensorType.INT32: np.int32}


def _tensor_values(model: schema.ModelT, tensor) -> Optional[np.ndarray]:
  """A constant tensor's dense values, or None (no data / unknown type)."""
  data = model.buffers[tensor.buffer].data
  dtype = _NUMPY_TYPES.get(tensor.type)
  if data is None or dtype is None or len(data) == 0:
    return None
  flat = np.frombuffer(bytes(np.asarray(data, np.uint8)), dtype)
  shape = tuple(int(d) for d in tensor.shape)
  if tensor.sparsity is not None:
    return _densify(flat, shape, tensor.sparsity)
  return flat.reshape(shape)


def _weight_inputs(model: schema.ModelT):
  """Yields (op, builtin, weight tensor index, sparse) per conv / fc op.

  The weight is followed back through the DEQUANTIZE and DENSIFY ops that
  `convert` (or the converter) puts in front of it, to the stored constant.
  """
  graph = model.subgraphs[0]
  producer = {}
  for operator in graph.operators:
    if _builtin(model, operator) in (_Op.DENSIFY, _Op.DEQUANTIZE):
      producer[operator.outputs[0]] = operator
  for operator in graph.operators:
    builtin = _builtin(model, operator)
    if builtin in _WEIGHT_OPS and len(operator.inputs) > 1:
      index, sparse = operator.inputs[1], False
      while index in producer:
        sparse |= _builtin(model, producer[index]) == _Op.DENSIFY
        index = producer[index].inputs[0]
      yield operator, builtin, index, sparse


# ----------------------------------------------------------------------------
# Sparse (CSR on the last axis) weights, the layout the converter writes.


def _index_vector(values: np.ndarray):
  """The narrowest SparseIndexVector holding `values`: (type, vector)."""
  values = np.asarray(values)
  for limit, kind, vector_class, dtype in (
      (255, schema.SparseIndexVector.Uint8Vector, schema.Uint8VectorT, np.uint8),
      (65535, schema.SparseIndexVector.Uint16Vector, schema.Uint16VectorT,
       np.uint16),
      (2**31 - 1, schema.SparseIndexVector.Int32Vector, schema.Int32VectorT,
       np.int32)):
    if values.size == 0 or values.max() <= limit:
      vector = vector_class()
      vector.values = values.astype(dtype)
      return kind, vector
  raise ValueError("Sparse index out of int32 range.")


def _csr(values: np.ndarray):
  """(nonzero values, SparsityParametersT, bytes) of CSR on the last axis."""
  rows = values.reshape(-1, values.shape[-1])
  nonzero = rows != 0
  segments = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))])
  indices = np.nonzero(nonzero)[1]
  sparsity = schema.SparsityParametersT()
  sparsity.traversalOrder = list(range(values.ndim))
  sparsity.blockMap = []
  sparsity.dimMetadata = []
  for size in values.shape[:-1]:
    dense = schema.DimensionMetadataT()
    dense.format, dense.denseSize = schema.DimensionType.DENSE, int(size)
    sparsity.dimMetadata.append(dense)
  last = schema.DimensionMetadataT()
  last.format = schema.DimensionType.SPARSE_CSR
  last.arraySegmentsType, last.arraySegments = _index_vector(segments)
  last.arrayIndicesType, last.arrayIndices = _index_vector(indices)
  sparsity.dimMetadata.append(last)
  size = (rows[nonzero].nbytes + last.arraySegments.values.nbytes
          + last.arrayIndices.values.nbytes)
  return rows[nonzero], sparsity, size


def _densify(flat: np.ndarray, shape: tuple[int, ...], sparsity) -> np.ndarray:
  """Inverse of `_csr` (the only sparse layout the converter writes here)."""
  metadata = sparsity.dimMetadata
  if (list(sparsity.traversalOrder) != list(range(len(shape)))
      or (sparsity.blockMap is not None and len(sparsity.blockMap))
      or any(d.format != schema.DimensionType.DENSE for d in metadata[:-1])
      or metadata[-1].format != schema.DimensionType.SPARSE_CSR):
    raise ValueError("Only CSR on the last axis (the converter's layout) is "
                     "supported for sparse weights.")
  segments = np.asarray(metadata[-1].arraySegments.values, np.int64)
  indices = np.asarray(metadata[-1].arrayIndices.values, np.int64)
  rows = np.zeros((len(segments) - 1, shape[-1]), flat.dtype)
  row_of = np.repeat(np.arange(len(segments) - 1), np.diff(segments))
  rows[row_of, indices] = flat
  return rows.reshape(shape)


# ----------------------------------------------------------------------------
# Matching the converted graph's weights to the compressed kernels.


def _match(model: schema.ModelT, kernels: list, exact_floats: bool) -> dict:
  """Weight tensor index -> (target, factors or None) for every kernel.

  A tensor matches a kernel when its shape and zero pattern equal the codes'
  (and, for float tensors when `exact_floats`, it is codes * step * f_c per
  channel); among several, the one whose name mentions the layer wins.
  """
  graph = model.subgraphs[0]
  candidates = []
  for _, _, index, _ in _weight_inputs(model):
    tensor = graph.tensors[index]
    values = _tensor_values(model, tensor)
    if values is not None:
      candidates.append((index, tensor.name.decode(), values))
  matched, used = {}, set()
  missing = []
  for entry in kernels:
    found = []
    for index, name, values in candidates:
      if index in used:
        continue
      target = _target(entry, values.shape)
      if target is None or not np.array_equal(values != 0, target.codes != 0):
        continue
      factors = None
      if exact_floats:
        factors = _channel_factors(values, target)
        if factors is None:
          continue
      mentions = entry.layer_name in re.split(r"[/;:]", name)
      found.append((not mentions, index, target, factors))
    if not found:
      if not any(_shares(entry, matched[index][0]) for index in used):
        missing.append(entry.key)
      continue
    found.sort(key=lambda item: (item[0], item[1]))
    _, index, target, factors = found[0]
    used.add(index)
    matched[index] = (target, factors)
  if missing:
    raise ValueError(
        f"The converted graph has no weight tensor equal to the compressed "
        f"kernel(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} (as "
        "step * code, possibly times a folded BatchNormalization); the "
        "converter transformed them beyond that (e.g. merged two layers). "
        "Skip these layers in the plan (overrides={'layer': {'skip': True}}) "
        "or export without LiteRT.")
  return matched


def _shares(entry, target: _Target) -> bool:
  """Whether `entry` has exactly `target`'s codes (the converter stores equal
  constants once, e.g. two fully pruned kernels of one shape)."""
  other = _target(entry, target.codes.shape)
  return (other is not None and np.array_equal(other.codes, target.codes)
          and (not other.codes.any() or np.array_equal(other.steps,
                                                        target.steps)))


# ----------------------------------------------------------------------------
# Rewriting.


def _set_version(model: schema.ModelT, operator, version: int,
                 opcode: Optional[int] = None) -> None:
  code = model.operatorCodes[operator.opcodeIndex if opcode is None else opcode]
  code.version = max(code.version, version)


def _quantization(scales: np.ndarray, axis: int, *,
                  per_tensor_if_equal: bool = True
                  ) -> schema.QuantizationParametersT:
  """Zero points 0; one scale when all are equal (not for depthwise kernels,
  whose hybrid kernel wants per-channel scales)."""
  quantization = schema.QuantizationParametersT()
  if per_tensor_if_equal and axis == 0 and np.all(scales == scales[0]):
    scales = scales[:1]
  quantization.scale = np.asarray(scales, np.float32)
  quantization.zeroPoint = np.zeros(len(scales), np.int64)
  quantization.quantizedDimension = axis if len(scales) > 1 else 0
  return quantization


def _stored(target: _Target, factors: np.ndarray):
  """(int8 values, positive per-channel scales) for a kernel and its factors."""
  signs = np.where(factors < 0, -1, 1)
  shape = [1] * target.codes.ndim
  shape[target.axis] = -1
  values = (target.codes * signs.reshape(shape)).astype(np.int8)
  scales = (target.steps.astype(np.float64) * np.abs(factors)).astype(np.float32)
  return values, scales


def _insert_op(model: schema.ModelT, builtin: int, version: int,
               source_index: int, operator, dequantize: bool) -> int:
  """Puts `builtin` (DENSIFY or DEQUANTIZE of a constant) between
  the weight tensor `source_index` and `operator`; returns its output index."""
  graph = model.subgraphs[0]
  source = graph.tensors[source_index]
  output = schema.TensorT()
  output.shape = list(source.shape)
  output.name = source.name + (b"/dequantized" if dequantize else b"/densified")
  if dequantize:
    output.type = schema.TensorType.FLOAT32
  else:
    output.type, output.quantization = source.type, source.quantization
  output.buffer = len(model.buffers)
  model.buffers.append(schema.BufferT())
  graph.tensors.append(output)
  output_index = len(graph.tensors) - 1
  codes = [i for i, code in enumerate(model.operatorCodes)
           if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin]
  if codes:
    opcode = codes[0]
    _set_version(model, schema.OperatorT(), version, opcode)
  else:
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = version
    model.operatorCodes.append(code)
    opcode = len(model.operatorCodes) - 1
  inserted = schema.OperatorT()
  inserted.opcodeIndex = opcode
  inserted.inputs = [source_index]
  inserted.outputs = [output_index]
  graph.operators.insert(graph.operators.index(operator), inserted)
  inputs = list(operator.inputs)
  inputs[1] = output_index
  operator.inputs = inputs
  return output_index


def _rewrite_float(model: schema.ModelT, kernels: list, sparse: bool,
                   dequantize: bool) -> dict:
  """Float-activation model: compressed float kernels -> int8 OPQ codes.

  With `dequantize` each int8 kernel feeds a DEQUANTIZE op and the conv stays
  a float op (XNNPACK unpacks the int8 weights once at load; LiteRT's builtin
  kernels also cache a dense kernel's DEQUANTIZE, not one after DENSIFY);
  otherwise the conv becomes a hybrid kernel.
  """
  graph = model.subgraphs[0]
  matched = _match(model, kernels, exact_floats=True)
  stats = {"kernels_sparse": 0, "batchnorm_folded_kernels": 0,
           "negative_scale_channels": 0}
  replaced = {}  # Rewritten weight -> what its consumers read now.
  for operator, builtin, index, _ in list(_weight_inputs(model)):
    if index in replaced:  # A weight the converter shared between two ops.
      operator.inputs = [replaced[index] if position == 1 else tensor_index
                         for position, tensor_index in enumerate(operator.inputs)]
      if not dequantize:
        _set_version(model, operator, _HYBRID_VERSION[builtin])
      continue
    if index not in matched or index != operator.inputs[1]:
      continue
    target, factors = matched.pop(index)
    values, scales = _stored(target, factors)
    tensor = graph.tensors[index]
    tensor.type = schema.TensorType.INT8
    tensor.name = target.key.encode()
    tensor.quantization = _quantization(scales, target.axis)
    payload, stored_sparse = values, False
    if sparse:
      nonzero, sparsity, size = _csr(values)
      if size + 256 < values.nbytes:
        payload, stored_sparse = nonzero, True
        tensor.sparsity = sparsity
    model.buffers[tensor.buffer].data = np.frombuffer(
        payload.astype(np.int8).tobytes(), np.uint8)
    if stored_sparse:
      _insert_op(model, _Op.DENSIFY, 1, index, operator, dequantize=False)
      stats["kernels_sparse"] += 1
    if dequantize:
      per_channel = len(tensor.quantization.scale) > 1
      _insert_op(model, _Op.DEQUANTIZE, _DEQUANTIZE_VERSION[per_channel],
                 operator.inputs[1], operator, dequantize=True)
    else:
      _set_version(model, operator, _HYBRID_VERSION[builtin])
    replaced[index] = operator.inputs[1]
    stats["batchnorm_folded_kernels"] += int(np.any(factors != 1.0))
    stats["negative_scale_channels"] += int(np.sum(factors < 0))
  return stats


def _rewrite_integer(model: schema.ModelT, float_model: schema.ModelT,
                     kernels: list) -> dict:
  """Full-int8 model: converter's int8 kernels -> OPQ codes; biases rescaled.

  The factors f_c come from the float conversion (exact floats); the bias of
  each op, int32 at input_scale * old_scale_c, is requantized to
  input_scale * new_scale_c.
  """
  graph = model.subgraphs[0]
  exact = {target.key: factors for target, factors in
           _match(float_model, kernels, exact_floats=True).values()}
  matched = _match(model, kernels, exact_floats=False)
  stats = {"kernels_sparse": 0, "batchnorm_folded_kernels": 0,
           "negative_scale_channels": 0}
  rewritten = set()
  for operator, builtin, index, _ in list(_weight_inputs(model)):
    if index not in matched:
      continue
    target, _ = matched[index]
    factors = exact[target.key]
    values, scales = _stored(target, factors)
    tensor = graph.tensors[index]
    if tensor.type != schema.TensorType.INT8 or index in rewritten:
      raise ValueError(
          f"The integer conversion left {target.key!r} as a non-int8 or shared "
          "tensor; convert with float activations instead.")
    rewritten.add(index)
    old = np.asarray(tensor.quantization.scale, np.float64)
    old = np.broadcast_to(old, scales.shape)
    input_scale = float(graph.tensors[operator.inputs[0]].quantization.scale[0])
    tensor.name = target.key.encode()
    tensor.quantization = _quantization(scales, target.axis,
                                        per_tensor_if_equal=False)
    model.buffers[tensor.buffer].data = np.frombuffer(values.tobytes(), np.uint8)
    if len(operator.inputs) > 2 and operator.inputs[2] >= 0:
      _requantize_bias(model, operator, old, scales, input_scale)
    stats["batchnorm_folded_kernels"] += int(np.any(factors != 1.0))
    stats["negative_scale_channels"] += int(np.sum(factors < 0))
  return stats


def _requantize_bias(model, operator, old_scales, new_scales, input_scale):
  """Bias int32 at input_scale * old_c -> at input_scale * new_c (own copy)."""
  graph = model.subgraphs[0]
  bias = graph.tensors[operator.inputs[2]]
  values = _tensor_values(model, bias).astype(np.float64)
  real = values * input_scale * old_scales
  new_scale = input_scale * new_scales.astype(np.float64)
  requantized = np.clip(np.round(real / new_scale), -2**31, 2**31 - 1)
  copy = schema.TensorT()
  copy.shape, copy.type, copy.name = list(bias.shape), bias.type, bias.name
  copy.quantization = schema.QuantizationParametersT()
  copy.quantization.scale = new_scale.astype(np.float32)
  copy.quantization.zeroPoint = np.zeros(len(new_scale), np.int64)
  copy.quantization.quantizedDimension = 0
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(requantized.astype(np.int32).tobytes(), np.uint8)
  model.buffers.append(buffer)
  copy.buffer = len(model.buffers) - 1
  graph.tensors.append(copy)
  inputs = list(operator.inputs)
  inputs[2] = len(graph.tensors) - 1
  operator.inputs = inputs


# ----------------------------------------------------------------------------
# Public API.


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


def _metadata(model: schema.ModelT, kernels: list) -> None:
  """Records which tensors hold OPQ codes (and their bits) in the file."""
  content = json.dumps({entry.key: {"bits": int(entry.bits)}
                        for entry in kernels}).encode()
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(content, np.uint8)
  model.buffers.append(buffer)
  metadata = schema.MetadataT()
  metadata.name = METADATA_NAME.encode()
  metadata.buffer = len(model.buffers) - 1
  model.metadata = list(model.metadata or []) + [metadata]


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
) -> dict:
  """Writes `path` (.tflite) with the OPQ codes as int8 weights; returns facts.

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
    sparse: store a kernel in CSR form behind DENSIFY where that is smaller
      (float activations only). Default: with compute="float" only. LiteRT
      2.3's default XNNPACK delegate fails to prepare a hybrid conv fed by
      DENSIFY (the converter's own EXPERIMENTAL_SPARSITY output fails the same
      way), so a sparse hybrid file runs only with XNNPACK off
      (`interpreter(path, xnnpack=False)`).
    compute: with float activations, "float": each int8 kernel feeds a
      DEQUANTIZE op and the convs run in float (XNNPACK unpacks the weights
      once at load; the logits are Keras'); "hybrid": LiteRT's dynamic-range kernels (int8
      weights, activations quantized on the fly), as the converter's
      Optimize.DEFAULT writes them.

  Returns:
    What report.json records under "litert": file name, bytes, gzip bytes,
    activations, conversion method, kernel counts and the bits note.

  Raises:
    ValueError: the model was never applied, `path` exists, the converter
      fails, or `int8_activations` without `representative_data`.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    raise ValueError(f"LiteRT target {path!r} exists; choose a new path or "
                     "remove it first (export never overwrites).")
  if compute not in COMPUTES:
    raise ValueError(f"compute={compute!r}; use one of {COMPUTES}.")
  if sparse is None:
    sparse = compute == "float" and not int8_activations
  elif sparse and int8_activations:
    raise ValueError("sparse=True needs float activations; the integer "
                     "kernels have no sparse path here.")
  if int8_activations and representative_data is None:
    raise ValueError(
        "int8_activations needs representative_data: a function yielding "
        "[batch] lists of training images to calibrate activation ranges.")
  _check_kinds(kernels)
  float_model = _load(float_tflite(stripped))
  if int8_activations:

    def configure(converter):
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = representative_data
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

    model = _load(_converter_bytes(stripped, configure))
    stats = _rewrite_integer(model, float_model, kernels)
  else:
    model = float_model
    stats = _rewrite_float(model, kernels, sparse,
                           dequantize=compute == "float")
  _metadata(model, kernels)
  content = _serialize(model)
  try:  # Never write a file the interpreter cannot load.
    resolver = litert_interpreter.OpResolverType
    checked = litert_interpreter.Interpreter(
        model_content=content, experimental_op_resolver_type=(
            resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            if sparse and compute == "hybrid" else resolver.AUTO))
    checked.allocate_tensors()
  except Exception as error:
    raise ValueError(
        f"The rewritten .tflite does not load in the LiteRT interpreter "
        f"({error}); export without LiteRT and report this model.") from error
  files.atomic_write(path, content)
  return {
      "file": os.path.basename(path),
      "bytes": len(content),
      "gzip_bytes": len(gzip.compress(content, 9)),
      "activations": "int8" if int8_activations else "float32",
      "conversion": (
          f"tf.lite.TFLiteConverter (TensorFlow {tf.__version__}, "
          + ("full integer, representative dataset" if int8_activations
             else "float") +
          "); each compressed kernel's tensor rewritten as int8 OPQ codes, "
          "zero point 0, scale = step x the BatchNormalization factor the "
          "converter folded into it (1 when none)"
          + ("" if int8_activations else
             "; DEQUANTIZE into float ops" if compute == "float" else
             "; hybrid (dynamic-range) kernels")
          + ("; CSR + DENSIFY where smaller" if sparse else "")),
      "compute": "int8" if int8_activations else compute,
      "kernels_int8": len(kernels),
      "sparse": bool(sparse),
      **stats,
      **({"sparse_note": "runs only with XNNPACK off in LiteRT 2.3"}
         if stats["kernels_sparse"] and compute == "hybrid" else {}),
      "bits": sorted({int(entry.bits) for entry in kernels}),
      "bits_note": BITS_NOTE,
  }


def read_weights(path: Union[str, os.PathLike]) -> dict[str, StoredWeight]:
  """Every int8 weight of a conv / depthwise / fully-connected op, by tensor name.

  Tensors written by `convert` are named by the kernel's key
  ("<layer>/<weight>"); sparse ones are densified.
  """
  with open(path, "rb") as f:
    model = _load(f.read())
  graph = model.subgraphs[0]
  weights = {}
  for _, builtin, index, sparse in _weight_inputs(model):
    tensor = graph.tensors[index]
    if tensor.type != schema.TensorType.INT8:
      continue
    quantization = tensor.quantization
    weights[tensor.name.decode()] = StoredWeight(
        values=_tensor_values(model, tensor),
        scales=np.asarray(quantization.scale, np.float32),
        zero_points=np.asarray(quantization.zeroPoint, np.int64),
        quantized_dimension=int(quantization.quantizedDimension),
        op=_OP_NAMES[builtin],
        sparse=sparse)
  return weights


def interpreter(path: Union[str, os.PathLike], *, num_threads: int = 1,
                xnnpack: bool = True) -> litert_interpreter.Interpreter:
  """An ai_edge_litert Interpreter, with or without its default XNNPACK delegate."""
  resolver = (litert_interpreter.OpResolverType.AUTO if xnnpack else
              litert_interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  return litert_interpreter.Interpreter(
      model_path=os.fspath(path), num_threads=num_threads,
      experimental_op_resolver_type=resolver)


def predict(path: Union[str, os.PathLike], images: np.ndarray, *,
            xnnpack: bool = True) -> np.ndarray:
  """The .tflite model's single output on a batch of float32 images."""
  runner = interpreter(path, xnnpack=xnnpack)
  detail = runner.get_input_details()[0]
  images = np.asarray(images, np.float32)
  runner.resize_tensor_input(detail["index"], images.shape)
  runner.allocate_tensors()
  runner.set_tensor(detail["index"], images)
  runner.invoke()
  return runner.get_tensor(runner.get_output_details()[0]["index"])


def compare(tflite_path: Union[str, os.PathLike], keras_model: keras.Model,
            images: np.ndarray, labels: Optional[np.ndarray] = None, *,
            xnnpack: bool = True) -> dict:
  """How closely the .tflite model follows `keras_model` on `images`.

  Returns:
    {"images", "max_abs_logit_difference", "mean_abs_logit_difference",
     "top1_agreement"} (agreement of the arg-max over the logits), and with
    `labels` also "keras_top1_accuracy" and "tflite_top1_accuracy".
  """
  expected = np.asarray(keras_model(np.asarray(images, np.float32),
                                    training=False))
  actual = predict(tflite_path, images, xnnpack=xnnpack)
  difference = np.abs(actual.astype(np.float64) - expected)
  result = {
      "images": int(len(images)),
      "max_abs_logit_difference": float(difference.max()),
      "mean_abs_logit_difference": float(difference.mean()),
      "top1_agreement": float(np.mean(actual.argmax(-1) == expected.argmax(-1))),
  }
  if labels is not None:
    labels = np.asarray(labels).reshape(-1)
    result["keras_top1_accuracy"] = float(np.mean(expected.argmax(-1) == labels))
    result["tflite_top1_accuracy"] = float(np.mean(actual.argmax(-1) == labels))
  return result
