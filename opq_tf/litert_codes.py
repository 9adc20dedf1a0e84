"""The OPQ codes in a LiteRT (.tflite) flatbuffer: the frontend-neutral part.

    content, facts = litert_codes.rewrite(converted, kernels, ops,
                                          weights="int2")
    litert_codes.save("out/model.tflite", content)     # runs it first
    weights = litert_codes.read_weights("out/model.tflite")  # key -> StoredWeight

Each frontend converts its stripped float model with TensorFlow's converter
(tf_keras: `TFLiteConverter.from_keras_model`; Keras 3: `Model.export(format=
"litert")`) and hands the bytes here with its `CompressedKernel`s and, per
kernel key, the LiteRT op that computes it ("conv_2d", "depthwise_conv_2d",
"fully_connected"). The converter picks its own int8 scale (max|w_c| / 127),
which is not the plan's step, so `rewrite` lets it do everything else (graph
lowering, BatchNormalization folding, fusions) and then replaces the weight
tensor of every compressed kernel:

    stored integers = codes (OPQ's, in TFLite layout), zero point 0,
    scale_c         = step_c * f_c,

f_c being the per-output-channel factor the converter folded into the kernel
(gamma_c / sqrt(var_c + eps) of a following BatchNormalization; 1 when none).
Where f_c < 0 the channel stores -codes with scale |step_c * f_c| (LiteRT
wants positive scales). A kernel is found in the converted graph by its shape
and zero pattern, and accepted only if the float tensor is exactly
codes * step * f_c per channel.

Storage (`weights`, the narrowest type asked for): "int8" one byte per
weight; "int4" two codes per byte (TFLite's INT4: low nibble first) for every
kernel of B <= 4 whose op LiteRT runs with int4 filters; "int2" also four
codes per byte (TFLite's INT2: lowest bit pair first) for every kernel of
B <= 2 whose op runs int2 filters, so each kernel of a mixed plan gets the
smallest type that holds its codes; the same integers and scales in every
type. "auto": per op type, the "int2" storage unless the interpreter
measured it over 5% slower than int8. A kernel goes to the next width up
where its codes or its op need it, and to int8 in CSR (with `sparse`) where
that is smaller than its dense narrow form (a kernel pruned past ~75% for
int4, ~87% for int2); the facts say per kernel what was stored and why.
What LiteRT 2.3 runs (checked by tests/litert_test.py):

| compute                  | CONV_2D    | DEPTHWISE_CONV_2D | FULLY_CONNECTED |
|--------------------------|------------|-------------------|-----------------|
| float (DEQUANTIZE -> op) | int4, int2 | int4, int2        | int4, int2      |
| hybrid (dynamic range)   | int4       | int8 only         | int4, int2      |
| int8 activations         | int4       | int4              | int4, int2      |

Narrow kernels are otherwise stored dense (DENSIFY of int4 / int2 is not
tried). Smaller is not always faster: XNNPACK (LiteRT's default CPU
delegate) takes int4 filters only in hybrid FULLY_CONNECTED, and does not
fold an int4 / int2 DEQUANTIZE into static weights as it does an int8 one,
so under float compute those ops run outside it, dequantizing every invoke;
"auto" measures that instead of assuming it. `save` loads, allocates and
invokes the file in the interpreter (with and without XNNPACK) and wants
finite outputs before writing it atomically, so a file LiteRT cannot run is
never written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from ai_edge_litert import interpreter as litert_interpreter
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from opq_tf.core import files

METADATA_NAME = "opq_kernels"
COMPUTES = ("float", "hybrid", "int8")
WEIGHTS = ("int8", "int4", "int2", "auto")
# Stored types, narrowest first, and the largest B whose codes (|code| <=
# 2**(B-1) - 1) each holds: INT2 spans [-2, 1], INT4 [-8, 7].
DTYPES = ("int2", "int4", "int8")
_HOLDS_BITS = {"int2": 2, "int4": 4, "int8": 8}
OPS = ("conv_2d", "depthwise_conv_2d", "fully_connected")

_Op = schema.BuiltinOperator
_Type = schema.TensorType
_WEIGHT_OPS = (_Op.CONV_2D, _Op.DEPTHWISE_CONV_2D, _Op.FULLY_CONNECTED)
_OP_OF = {"conv_2d": _Op.CONV_2D, "depthwise_conv_2d": _Op.DEPTHWISE_CONV_2D,
          "fully_connected": _Op.FULLY_CONNECTED}
# Lowest op versions with per-channel int8 weights under float activations
# (hybrid kernels), as TensorFlow 2.21's dynamic-range conversion writes them.
_HYBRID_VERSION = {_Op.CONV_2D: 5, _Op.DEPTHWISE_CONV_2D: 6,
                   _Op.FULLY_CONNECTED: 12}
# Int8 activations with int4 filters (TFLite's op_version.cc); LiteRT 2.3's
# resolver runs int2 FULLY_CONNECTED at the same version.
_NARROW_INTEGER_VERSION = {_Op.CONV_2D: 7, _Op.DEPTHWISE_CONV_2D: 7,
                           _Op.FULLY_CONNECTED: 10}
# DEQUANTIZE of int8: version 2; per-channel int8: version 5; int4: 6 (int2
# runs at 6 in LiteRT 2.3 too).
_DEQUANTIZE_VERSION = {"int8": {False: 2, True: 5}, "int4": {False: 6, True: 6},
                       "int2": {False: 6, True: 6}}
# (stored type, compute, op) LiteRT 2.3 cannot run, and why (probed with its
# interpreter; tests/litert_test.py checks each entry still fails or errs).
_CANNOT_RUN = {
    ("int4", "hybrid", "depthwise_conv_2d"):
        "LiteRT 2.3 has no hybrid DEPTHWISE_CONV_2D kernel for int4 filters "
        "('Type FLOAT32 with filter type INT4 not currently supported')",
    ("int2", "hybrid", "depthwise_conv_2d"):
        "LiteRT 2.3 has no hybrid DEPTHWISE_CONV_2D kernel for int2 filters",
    ("int2", "hybrid", "conv_2d"):
        "LiteRT 2.3's hybrid CONV_2D runs an int2 filter but computes "
        "wrong outputs with it (logits off by 0.3 builtin, 1e27 XNNPACK)",
    ("int2", "int8", "conv_2d"):
        "LiteRT 2.3's integer CONV_2D takes int8 or int4 filters only "
        "('filter->type == kTfLiteInt8 || filter->type == kTfLiteInt4')",
    ("int2", "int8", "depthwise_conv_2d"):
        "LiteRT 2.3's integer DEPTHWISE_CONV_2D takes no int2 filter",
}
_FACTOR_TOLERANCE = 1e-5  # relative, of folded / (step * code) within a channel
_AUTO_SLOWER = 1.05  # narrow kept when its latency is within 5% of int8's


@dataclasses.dataclass(frozen=True)
class StoredWeight:
  """One int8, int4 or int2 weight tensor read back from a .tflite file.

  `values` (int8 numpy, dense: int4 / int2 unpacked) is in TFLite layout:
  Conv2D [out, H, W, in], DepthwiseConv2D [1, H, W, in * multiplier],
  FullyConnected [out, in]; the real weight is `values * scales[c]` along
  `quantized_dimension` (zero points are 0 here). `dtype` is the stored type (one of `DTYPES`).
  """

  values: np.ndarray
  scales: np.ndarray
  zero_points: np.ndarray
  quantized_dimension: int
  op: str
  sparse: bool
  dtype: str = "int8"


@dataclasses.dataclass
class _Target:
  """A compressed kernel in TFLite layout: codes, per-channel steps, dtype."""

  key: str
  layer_name: str
  codes: np.ndarray  # int32, TFLite layout
  steps: np.ndarray  # float32, one per channel along `axis`
  axis: int
  dtype: str = "int8"


def check_ops(kernels: Sequence[Any], ops: Mapping[str, Optional[str]]) -> None:
  """Refuses kernels whose layer kind names no LiteRT op."""
  for entry in kernels:
    if ops.get(entry.key) not in OPS:
      raise ValueError(
          f"{entry.key}: layer kind {entry.kind} names no LiteRT op, so its "
          "codes cannot be placed in the .tflite; skip the layer in the plan "
          "(overrides={'<layer>': {'skip': True}}) or export without LiteRT.")


def _squeezed(dims) -> list[int]:
  return [int(d) for d in dims if d != 1]


def _target(entry, codes: np.ndarray, op: str,
            shape: tuple[int, ...]) -> Optional[_Target]:
  """`entry`'s codes and steps in the layout of a TFLite tensor of `shape`.

  Depthwise kernels [H, W, in, mult] become [1, H, W, in * mult] (channel
  axis 3, C order); every other kernel moves its channel axes first and
  flattens them into one ([out, ...], axis 0; EinsumDense's d, e -> d * e),
  reshaped to `shape` when that only adds unit axes (Conv1D) or flattens
  the rest into one (a fully connected [out, in]).
  """
  channel_shape = tuple(codes.shape[a] for a in entry.channel_axes)
  channels = int(np.prod(channel_shape))
  if op == "depthwise_conv_2d":
    laid_out, axis = codes.reshape((1, *codes.shape[:-2], -1)), 3
    fits = laid_out.shape == tuple(shape)
  else:
    count = len(entry.channel_axes)
    moved = np.moveaxis(codes, entry.channel_axes, range(count))
    rest, wanted = moved.shape[count:], tuple(shape[1:])
    laid_out, axis = moved.reshape(channels, *rest), 0
    fits = len(shape) > 0 and shape[0] == channels and (
        _squeezed(rest) == _squeezed(wanted)
        or (len(wanted) == 1 and int(np.prod(rest)) == wanted[0]))
  if not fits:
    return None
  steps = np.asarray(entry.step, np.float32)
  if steps.size != channels:  # A scalar (per-kernel) step.
    steps = np.broadcast_to(steps.reshape(()), channel_shape)
  return _Target(entry.key, entry.layer_name,
                 np.ascontiguousarray(laid_out.reshape(shape)),
                 np.ascontiguousarray(steps.reshape(-1)), axis)


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
_NUMPY_TYPES = {_Type.FLOAT32: np.float32, _Type.INT8: np.int8,
                _Type.INT32: np.int32}


_TENSOR_TYPES = {"int2": _Type.INT2, "int4": _Type.INT4, "int8": _Type.INT8}
_DTYPE_OF = {tensor_type: dtype for dtype, tensor_type in _TENSOR_TYPES.items()}
_PACKED_BITS = {"int4": 4, "int2": 2}


def pack(values: np.ndarray, dtype: str) -> np.ndarray:
  """int8 values -> TFLite INT4 (two a byte) or INT2 (four a byte) bytes.

  As LiteRT's UnpackPackedIntToInt8 reads them: the first value in the
  lowest bits of its byte, a short last byte's unused high bits 0. The
  values must lie in the type's range ([-8, 7] or [-2, 1]).
  """
  bits = _PACKED_BITS[dtype]
  per_byte = 8 // bits
  flat = np.asarray(values, np.int8).reshape(-1)
  flat = np.concatenate([flat, np.zeros((-flat.size) % per_byte, np.int8)])
  fields = (flat.view(np.uint8) & ((1 << bits) - 1)).reshape(-1, per_byte)
  shifts = np.arange(per_byte, dtype=np.uint8) * bits
  return np.bitwise_or.reduce(fields << shifts, axis=1).astype(np.uint8)


def unpack(data: np.ndarray, count: int, dtype: str) -> np.ndarray:
  """Inverse of `pack`: the first `count` values, int8, sign-extended."""
  bits = _PACKED_BITS[dtype]
  shifts = np.arange(8 // bits, dtype=np.uint8) * bits
  fields = ((np.asarray(data, np.uint8)[:, None] >> shifts)
            & ((1 << bits) - 1)).reshape(-1)[:count].astype(np.int16)
  return np.where(fields >= 1 << (bits - 1), fields - (1 << bits),
                  fields).astype(np.int8)


def _tensor_values(model: schema.ModelT, tensor) -> Optional[np.ndarray]:
  """A constant tensor's dense values, or None (no data / unknown type)."""
  data = model.buffers[tensor.buffer].data
  if data is None or len(data) == 0:
    return None
  shape = tuple(int(d) for d in tensor.shape)
  raw = np.asarray(data, np.uint8)
  packed = _DTYPE_OF.get(tensor.type)
  if packed in _PACKED_BITS:
    if tensor.sparsity is not None:
      return None
    return unpack(raw, int(np.prod(shape)), packed).reshape(shape)
  dtype = _NUMPY_TYPES.get(tensor.type)
  if dtype is None:
    return None
  flat = np.frombuffer(raw.tobytes(), dtype)
  if tensor.sparsity is not None:
    return _densify(flat, shape, tensor.sparsity)
  return flat.reshape(shape)


def _weight_inputs(model: schema.ModelT):
  """Yields (op, builtin, weight tensor index, sparse) per conv / fc op.

  The weight is followed back through the DEQUANTIZE and DENSIFY ops that
  `rewrite` (or the converter) puts in front of it, to the stored constant.
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


def _match(model: schema.ModelT, kernels: Sequence[Any], codes: dict,
           ops: Mapping[str, str], exact_floats: bool) -> dict:
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
      target = _target(entry, codes[entry.key], ops[entry.key], values.shape)
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
      if not any(_shares(entry, codes, ops, matched[index][0])
                 for index in used):
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


def _shares(entry, codes: dict, ops: Mapping[str, str],
            target: _Target) -> bool:
  """Whether `entry` has exactly `target`'s codes (the converter stores equal
  constants once, e.g. two fully pruned kernels of one shape)."""
  other = _target(entry, codes[entry.key], ops[entry.key], target.codes.shape)
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


def _store(model: schema.ModelT, tensor, target: _Target,
           payload: np.ndarray) -> None:
  """Writes `payload` (int8 values) into `tensor`'s buffer as target.dtype."""
  tensor.name = target.key.encode()
  tensor.type = _TENSOR_TYPES[target.dtype]
  if target.dtype in _PACKED_BITS:
    data = pack(payload, target.dtype)
  else:
    data = np.frombuffer(payload.astype(np.int8).tobytes(), np.uint8)
  model.buffers[tensor.buffer].data = data


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
    output.type = _Type.FLOAT32
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


def _new_stats() -> dict:
  """The rewrite's counts, and "csr_instead": key -> why a kernel asked
  narrow went int8 CSR (popped by `rewrite` into its "stored")."""
  return {"kernels_sparse": 0, "batchnorm_folded_kernels": 0,
          "negative_scale_channels": 0, "csr_instead": {}}


def _rewrite_float(model: schema.ModelT, kernels: Sequence[Any], codes: dict,
                   ops: Mapping[str, str], dtypes: Mapping[str, str],
                   sparse: bool, dequantize: bool) -> dict:
  """Float-activation model: compressed float kernels -> OPQ codes.

  With `dequantize` each kernel feeds a DEQUANTIZE op and the conv stays a
  float op (XNNPACK unpacks the weights once at load; LiteRT's builtin
  kernels also cache a dense kernel's DEQUANTIZE, not one after DENSIFY);
  otherwise the conv becomes a hybrid kernel. With `sparse`, a kernel is
  stored int8 in CSR behind DENSIFY where that is smaller than its dense
  form, int8, int4 or int2 (a heavily pruned one: CSR keeps only its kept
  codes and their indices); int4 / int2 ones are otherwise dense.
  """
  graph = model.subgraphs[0]
  matched = _match(model, kernels, codes, ops, exact_floats=True)
  stats = _new_stats()
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
    target.dtype = dtypes[target.key]
    values, scales = _stored(target, factors)
    tensor = graph.tensors[index]
    tensor.quantization = _quantization(scales, target.axis)
    payload, stored_sparse = values, False
    if sparse:
      nonzero, sparsity, size = _csr(values)
      dense = -(-values.size * _PACKED_BITS.get(target.dtype, 8) // 8)
      if size + 256 < dense:
        if target.dtype != "int8":
          stats["csr_instead"][target.key] = (
              f"int8 in CSR ({size:,} bytes) is smaller than dense "
              f"{target.dtype} ({dense:,} bytes)")
          target.dtype = "int8"
        payload, stored_sparse = nonzero, True
        tensor.sparsity = sparsity
    _store(model, tensor, target, payload)
    if stored_sparse:
      _insert_op(model, _Op.DENSIFY, 1, index, operator, dequantize=False)
      stats["kernels_sparse"] += 1
    if dequantize:
      per_channel = len(tensor.quantization.scale) > 1
      _insert_op(model, _Op.DEQUANTIZE,
                 _DEQUANTIZE_VERSION[target.dtype][per_channel],
                 operator.inputs[1], operator, dequantize=True)
    else:
      _set_version(model, operator, _HYBRID_VERSION[builtin])
    replaced[index] = operator.inputs[1]
    stats["batchnorm_folded_kernels"] += int(np.any(factors != 1.0))
    stats["negative_scale_channels"] += int(np.sum(factors < 0))
  return stats


def _rewrite_integer(model: schema.ModelT, float_model: schema.ModelT,
                     kernels: Sequence[Any], codes: dict,
                     ops: Mapping[str, str], dtypes: Mapping[str, str]) -> dict:
  """Full-int8 model: converter's int8 kernels -> OPQ codes; biases rescaled.

  The factors f_c come from the float conversion (exact floats); the bias of
  each op, int32 at input_scale * old_scale_c, is requantized to
  input_scale * new_scale_c.
  """
  graph = model.subgraphs[0]
  exact = {target.key: factors for target, factors in
           _match(float_model, kernels, codes, ops, exact_floats=True).values()}
  matched = _match(model, kernels, codes, ops, exact_floats=False)
  stats = _new_stats()
  rewritten = set()
  for operator, builtin, index, _ in list(_weight_inputs(model)):
    if index not in matched:
      continue
    target, _ = matched[index]
    target.dtype = dtypes[target.key]
    factors = exact[target.key]
    values, scales = _stored(target, factors)
    tensor = graph.tensors[index]
    if tensor.type != _Type.INT8 or index in rewritten:
      raise ValueError(
          f"The integer conversion left {target.key!r} as a non-int8 or shared "
          "tensor; convert with float activations instead.")
    rewritten.add(index)
    old = np.asarray(tensor.quantization.scale, np.float64)
    old = np.broadcast_to(old, scales.shape)
    input_scale = float(graph.tensors[operator.inputs[0]].quantization.scale[0])
    tensor.quantization = _quantization(scales, target.axis,
                                        per_tensor_if_equal=False)
    _store(model, tensor, target, values)
    if target.dtype != "int8":
      _set_version(model, operator, _NARROW_INTEGER_VERSION[builtin])
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


def _metadata(model: schema.ModelT, kernels: Sequence[Any],
              dtypes: Mapping[str, str]) -> None:
  """Records which tensors hold OPQ codes (bits, stored type) in the file."""
  content = json.dumps({entry.key: {"bits": int(entry.bits),
                                    "dtype": dtypes[entry.key]}
                        for entry in kernels}).encode()
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(content, np.uint8)
  model.buffers.append(buffer)
  metadata = schema.MetadataT()
  metadata.name = METADATA_NAME.encode()
  metadata.buffer = len(model.buffers) - 1
  model.metadata = list(model.metadata or []) + [metadata]


# ----------------------------------------------------------------------------
# Choosing the stored type per kernel.


def _narrowest(entry, op: str, compute: str, asked: str) -> tuple[str, list]:
  """The narrowest type from `asked` up that holds `entry`'s codes and that
  LiteRT runs `op` with under `compute`; and why each narrower one was not."""
  skipped = []
  for dtype in DTYPES[DTYPES.index(asked):]:
    blocker = (f"B = {entry.bits} > {_HOLDS_BITS[dtype]}"
               if entry.bits > _HOLDS_BITS[dtype] else
               _CANNOT_RUN.get((dtype, compute, op)))
    if blocker is None:
      return dtype, skipped
    skipped.append(f"not {dtype}: {blocker}")
  raise AssertionError("int8 holds every B <= 8 and runs every op.")


def _measure(contents: Sequence[bytes], xnnpack: bool, runs: int) -> list:
  """Median batch-1 latency (ms, 1 thread) of each file, runs interleaved."""
  runners = [_runner(content, xnnpack=xnnpack) for content in contents]
  for runner in runners:
    runner.invoke()  # Warm-up: delegate set-up, dequantize-once.
  times = [[] for _ in runners]
  for _ in range(runs):
    for runner, measured in zip(runners, times):
      start = time.perf_counter()
      runner.invoke()
      measured.append(time.perf_counter() - start)
  return [1000 * statistics.median(measured) for measured in times]


def rewrite(float_content: bytes, kernels: Sequence[Any],
            ops: Mapping[str, Optional[str]], *, compute: str = "float",
            sparse: bool = True, weights: str = "int8",
            integer_content: Optional[bytes] = None,
            auto_runs: int = 15) -> tuple[bytes, dict]:
  """The converter's file with every compressed kernel's codes; its facts.

  Args:
    float_content: the converter's float .tflite of the stripped model.
    kernels: the wrapped model's `CompressedKernel`s.
    ops: kernel key -> the LiteRT op computing it (one of `OPS`).
    compute: "float" (DEQUANTIZE -> float ops), "hybrid" (dynamic-range
      kernels) or "int8" (`integer_content`, the converter's full integer
      file, gets the codes; its biases are requantized).
    sparse: a kernel in int8 CSR behind DENSIFY where smaller than its
      dense form, int8, int4 or int2 ("float" and "hybrid" only).
    weights: the narrowest stored type asked for: "int8"; "int4" (B <= 4
      kernels whose op runs int4 filters); "int2" (also B <= 2 kernels in
      int2 where their op runs it: each kernel at the smallest type holding
      its codes); "auto" ("int2"'s choice per op type where it measured no
      slower than int8; XNNPACK on unless sparse hybrid, 1 thread, median of
      `auto_runs` interleaved invokes).

  Returns:
    (file bytes, facts): counts per stored type ("kernels_int8", ...);
    "stored": key -> {"op", "bits", "dtype", "why"} (why a kernel is at a
    wider type than asked: its B, or its op); for
    "auto" the latencies measured and the choice per op type.
  """
  if compute not in COMPUTES:
    raise ValueError(f"compute={compute!r}; use one of {COMPUTES}.")
  if weights not in WEIGHTS:
    raise ValueError(f"litert weights={weights!r}; use one of {WEIGHTS}.")
  if (compute == "int8") != (integer_content is not None):
    raise ValueError("compute='int8' goes with integer_content (the "
                     "converter's full integer file), and only it.")
  check_ops(kernels, ops)
  codes = {entry.key: np.asarray(entry.codes) for entry in kernels}
  asked = "int2" if weights == "auto" else weights
  stored = {}  # key -> what is stored and why (the facts' "stored").
  for entry in kernels:
    op = ops[entry.key]
    dtype, skipped = _narrowest(entry, op, compute, asked)
    stored[entry.key] = {
        "op": _OP_NAMES[_OP_OF[op]], "bits": int(entry.bits), "dtype": dtype,
        "why": "; ".join(skipped) or (
            f"B = {entry.bits} fits {dtype}, which LiteRT runs "
            f"{_OP_NAMES[_OP_OF[op]]} with")}

  def build(dtypes: Mapping[str, str]) -> tuple[bytes, dict]:
    model = _load(integer_content if compute == "int8" else float_content)
    if compute == "int8":
      stats = _rewrite_integer(model, _load(float_content), kernels, codes,
                               ops, dtypes)
    else:
      stats = _rewrite_float(model, kernels, codes, ops, dtypes, sparse,
                             dequantize=compute == "float")
    _metadata(model, kernels, {**dtypes, **{
        key: "int8" for key in stats["csr_instead"]}})
    return _serialize(model), stats

  auto = None
  narrow = {key: fact["op"] for key, fact in stored.items()
            if fact["dtype"] != "int8"}
  if weights == "auto" and narrow:
    auto = _choose(stored, narrow, build, compute, sparse, auto_runs)
  content, stats = build({key: fact["dtype"] for key, fact in stored.items()})
  for key, why in stats.pop("csr_instead").items():
    fact = stored[key]
    fact["why"] = why if fact["why"].startswith("B = ") else (
        f"{fact['why']}; {why}")
    fact["dtype"] = "int8"
  dtypes = {key: fact["dtype"] for key, fact in stored.items()}
  facts = {
      "weights": weights,
      **{f"kernels_{dtype}": sum(d == dtype for d in dtypes.values())
         for dtype in reversed(DTYPES)},
      **stats,
      "stored": stored,
  }
  if auto is not None:
    facts["auto"] = auto
  return content, facts


def _choose(stored: dict, narrow: Mapping[str, str], build, compute: str,
            sparse: bool, runs: int) -> dict:
  """weights="auto": per op type, keeps its narrow kernels narrow if the file
  measured no slower than all-int8, else stores them int8 (in `stored`)."""
  xnnpack = not (sparse and compute == "hybrid")
  groups = sorted(set(narrow.values()))
  all_int8 = {key: "int8" for key in stored}
  candidates = [build(all_int8)[0]] + [
      build({**all_int8, **{key: stored[key]["dtype"]
                            for key, op in narrow.items() if op == group}})[0]
      for group in groups]
  latency = _measure(candidates, xnnpack=xnnpack, runs=runs)
  auto = {"measured": f"LiteRT interpreter, XNNPACK {'on' if xnnpack else 'off'}, "
                      f"1 thread, median of {runs} batch-1 invokes",
          "all_int8_ms": round(latency[0], 3)}
  for group, milliseconds in zip(groups, latency[1:]):
    chosen = "narrow" if milliseconds <= _AUTO_SLOWER * latency[0] else "int8"
    auto[group] = {"narrow_ms": round(milliseconds, 3), "chose": chosen}
    if chosen == "int8":
      for key in (key for key, op in narrow.items() if op == group):
        stored[key]["dtype"] = "int8"
        stored[key]["why"] = (f"auto: {group} measured slower narrow "
                              f"({milliseconds:.2f} vs {latency[0]:.2f} ms)")
  return auto


# ----------------------------------------------------------------------------
# Running, writing and reading files.


def _runner(content: bytes, *, xnnpack: bool = True, num_threads: int = 1
            ) -> litert_interpreter.Interpreter:
  """An allocated interpreter of `content` with its inputs set: float ones
  uniform in [-1, 1] (seed 0; zeros hide a hybrid kernel's misreadings, its
  activation scale being 0), others 0."""
  resolver = litert_interpreter.OpResolverType
  runner = litert_interpreter.Interpreter(
      model_content=content, num_threads=num_threads,
      experimental_op_resolver_type=(
          resolver.AUTO if xnnpack else
          resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
  runner.allocate_tensors()
  rng = np.random.default_rng(0)
  for detail in runner.get_input_details():
    shape, dtype = detail["shape"], detail["dtype"]
    runner.set_tensor(detail["index"], (
        rng.uniform(-1, 1, shape).astype(dtype)
        if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)))
  return runner


def save(path: Union[str, os.PathLike], content: bytes, *,
         xnnpack_runs: bool = True) -> None:
  """Writes `content` to `path` atomically once the interpreter ran it.

  It is loaded, allocated and invoked on `_runner`'s inputs without XNNPACK
  (LiteRT's builtin kernels, which refuse unsupported filter types only at
  invoke) and, unless `xnnpack_runs` is False, with it; every output must be
  finite (a kernel that misreads its filter type shows as NaN / inf).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    raise ValueError(f"LiteRT target {path!r} exists; choose a new path or "
                     "remove it first (export never overwrites).")
  for xnnpack in (False, True) if xnnpack_runs else (False,):
    try:
      runner = _runner(content, xnnpack=xnnpack)
      runner.invoke()
      for detail in runner.get_output_details():
        if not np.all(np.isfinite(runner.get_tensor(detail["index"]))):
          raise ValueError(f"output {detail['name']!r} is not finite")
    except Exception as error:  # The runtime raises RuntimeError/ValueError.
      raise ValueError(
          f"The rewritten .tflite does not run in the LiteRT interpreter "
          f"(XNNPACK {'on' if xnnpack else 'off'}: "
          f"{str(error).strip().splitlines()[0] if str(error).strip() else error}"
          "); nothing was written. Export with litert_weights='int8' or "
          "without LiteRT, and report this model.") from error
  files.atomic_write(path, content)


def read_weights(path: Union[str, os.PathLike]) -> dict[str, StoredWeight]:
  """Every int8 / int4 / int2 weight of a conv / depthwise / fully-connected
  op, by tensor name (the kernel's key for tensors `rewrite` wrote; sparse
  ones densified, int4 / int2 ones unpacked)."""
  with open(path, "rb") as f:
    model = _load(f.read())
  graph = model.subgraphs[0]
  weights = {}
  for _, builtin, index, sparse in _weight_inputs(model):
    tensor = graph.tensors[index]
    if tensor.type not in _DTYPE_OF:
      continue
    quantization = tensor.quantization
    weights[tensor.name.decode()] = StoredWeight(
        values=_tensor_values(model, tensor),
        scales=np.asarray(quantization.scale, np.float32),
        zero_points=np.asarray(quantization.zeroPoint, np.int64),
        quantized_dimension=int(quantization.quantizedDimension),
        op=_OP_NAMES[builtin],
        sparse=sparse,
        dtype=_DTYPE_OF[tensor.type])
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


def compare(tflite_path: Union[str, os.PathLike], keras_model: Any,
            images: np.ndarray, labels: Optional[np.ndarray] = None, *,
            xnnpack: bool = True) -> dict:
  """How closely the .tflite model follows `keras_model` (either Keras).

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
