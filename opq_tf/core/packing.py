"""The packed `.opq` file: entropy-coded OPQ weights plus the FP32 rest.

Pure NumPy + constriction (no TensorFlow), so the file format reads and tests
on its own.

Symbols. A compressed kernel with B-bit codes c in [-K, K], K = 2**(B-1) - 1,
and a keep-mask becomes ONE stream of per-weight symbols over an alphabet of
size 2K + 2 (C order):

    symbol = 0            if the weight is pruned,
    symbol = c + K + 1    if it is kept with code c.

A kept weight whose code rounds to 0 (symbol K + 1) stays distinct from a
pruned one, so mask and codes are both recovered exactly.

Coding. Each kernel's symbols are i.i.d. under a categorical model whose
probabilities are the kernel's own symbol counts (stored in the header as
integers). Encoder and decoder build the constriction model from the same
integers (float64 of an integer is exact, `perfect=False` is deterministic), so
their probability tables are bit-identical. All kernels share one ANS stack
(`constriction.stream.stack.AnsCoder`): the coded size is within a few bytes of
sum_i n_i * H_i, H_i the empirical entropy of kernel i.

File layout (all integers little-endian):

    magic  b"OPQ\\x02"                       4 bytes
    crc32  of everything after this field   4 bytes
    varint header length, then the header (raw deflate):
        varint n_kernels, n_rest, n_words
        per kernel: name, shape, u8 bits, u8 number of channel axes A
            (0: one step), f32 steps (1, or the product of the last A
            dims of shape, C order), 2K+2 varint symbol counts
        per rest parameter: name, shape
    ANS words                               4 * n_words bytes (uint32)
    rest parameters, raw float32, in header order

Names are utf-8 with a varint length; shapes are a varint rank then varint
dims. There is no architecture in the file: the reader supplies the model.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from collections.abc import Mapping, Sequence

import constriction
import numpy as np

from opq_tf.core import files
from opq_tf.core import grid

MAGIC = b"OPQ\x02"  # The last byte is the format version.
# Declared kernel elements that read_packed decodes at most, by default: a
# run of one symbol codes to almost nothing, so the file size bounds nothing.
DEFAULT_MAX_ELEMENTS = 1 << 27


def max_code(bits: int) -> int:
  """K = 2**(bits-1) - 1, the largest code magnitude of a B-bit grid."""
  return grid.max_code(grid.check_bits(bits))


def alphabet_size(bits: int) -> int:
  """2K + 2 symbols: 0 (pruned) and c + K + 1 for each code c in [-K, K]."""
  return 2 * max_code(bits) + 2


def symbols_from_codes(mask: np.ndarray, codes: np.ndarray,
                       bits: int) -> np.ndarray:
  """Flattened (C order) int32 symbols of one kernel.

  Args:
    mask: bool array, True where the weight is kept.
    codes: integer array of the same shape, codes in [-K, K] (ignored where
      pruned).
    bits: B.

  Returns:
    int32 array of size mask.size: 0 where pruned, codes + K + 1 where kept.
  """
  mask = np.asarray(mask, dtype=bool)
  codes = np.asarray(codes)
  if mask.shape != codes.shape:
    raise ValueError(
        f"mask shape {mask.shape} and codes shape {codes.shape} differ; pass "
        "the mask and codes of the same kernel.")
  k = max_code(bits)
  kept_codes = codes[mask]
  if kept_codes.size and (kept_codes.min() < -k or kept_codes.max() > k):
    raise ValueError(
        f"codes outside [-{k}, {k}] for bits={bits}: got range "
        f"[{kept_codes.min()}, {kept_codes.max()}]; clip codes to the B-bit "
        "grid or pass the right bits.")
  symbols = np.where(mask, codes.astype(np.int64) + k + 1, 0)
  return symbols.astype(np.int32).ravel()


def codes_from_symbols(symbols: np.ndarray, bits: int,
                       shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of symbols_from_codes: (bool mask, int32 codes) of `shape`."""
  k = max_code(bits)
  symbols = np.asarray(symbols).reshape(tuple(shape))
  mask = symbols != 0
  codes = np.where(mask, symbols.astype(np.int32) - (k + 1), 0).astype(np.int32)
  return mask, codes


def symbol_counts(symbols: np.ndarray, alphabet: int) -> np.ndarray:
  """int64 histogram of symbols over range(alphabet)."""
  symbols = np.asarray(symbols).ravel()
  if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
    raise ValueError(
        f"symbols outside [0, {alphabet}); got range [{symbols.min()}, "
        f"{symbols.max()}]; pass the alphabet size the symbols were made for.")
  return np.bincount(symbols, minlength=alphabet).astype(np.int64)


def entropy_from_counts(counts: np.ndarray) -> float:
  """Empirical entropy H = -sum q log2 q in bits/symbol, q = counts / n."""
  counts = np.asarray(counts, dtype=np.float64)
  total = counts.sum()
  if total == 0:
    return 0.0
  q = counts[counts > 0] / total
  return float(-(q * np.log2(q)).sum())


def empirical_entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
  """Empirical entropy of a symbol stream in bits per symbol."""
  return entropy_from_counts(symbol_counts(symbols, alphabet))


def _model(counts: np.ndarray):
  """(categorical model over the used symbols, used symbol ids), or None.

  Only symbols with a nonzero count enter the model, so unused alphabet
  symbols cost nothing. Both coder ends call this with the same integer
  counts, hence build bit-identical tables. None if fewer than two symbols are
  used: such a stream is fully determined by its counts and costs 0 bits.
  """
  used = np.flatnonzero(counts)
  if used.size < 2:
    return None, used
  model = constriction.stream.model.Categorical(
      counts[used].astype(np.float64), perfect=False)
  return model, used


def encode_streams(
    streams: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, list[int]]:
  """Entropy-codes several symbol streams onto one ANS stack.

  Args:
    streams: (symbols, counts) per stream; counts = symbol_counts(symbols, A).

  Returns:
    (uint32 words, coded bits per stream). The bits of a stream are the growth
    of the stack's valid bits while it was pushed; their sum is at most
    32 * len(words), the rest being padding to whole words.
  """
  coder = constriction.stream.stack.AnsCoder()
  bits = [0] * len(streams)
  # A stack: push the last stream first so decoding runs in stream order.
  for index in reversed(range(len(streams))):
    symbols, counts = streams[index]
    model, used = _model(np.asarray(counts))
    if model is None:
      continue
    lookup = np.zeros(len(counts), dtype=np.int32)
    lookup[used] = np.arange(used.size, dtype=np.int32)
    before = coder.num_valid_bits()
    coder.encode_reverse(lookup[np.asarray(symbols).ravel()], model)
    bits[index] = int(coder.num_valid_bits() - before)
  return coder.get_compressed().astype("<u4"), bits


def decode_streams(words: np.ndarray,
                   counts_list: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Inverse of encode_streams; stream i has counts_list[i].sum() symbols."""
  coder = constriction.stream.stack.AnsCoder(
      np.ascontiguousarray(words, dtype=np.uint32))
  streams = []
  for counts in counts_list:
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    model, used = _model(counts)
    if model is None:
      symbol = used[0] if used.size else 0
      streams.append(np.full(n, symbol, dtype=np.int32))
      continue
    try:
      decoded = coder.decode(model, n)
    except Exception as error:  # constriction raises on exhausted data.
      raise ValueError(
          f"corrupt OPQ symbol stream ({error}); re-export the model."
      ) from error
    symbols = used[decoded].astype(np.int32)
    if not np.array_equal(np.bincount(symbols, minlength=len(counts)), counts):
      raise ValueError(
          "corrupt OPQ symbol stream: decoded symbols do not match the stored "
          "counts; re-export the model.")
    streams.append(symbols)
  if not coder.is_empty():
    raise ValueError(
        "corrupt OPQ symbol stream: data left over after decoding; re-export "
        "the model.")
  return streams


def encode_symbols(symbols: np.ndarray,
                   alphabet: int) -> tuple[np.ndarray, bytes]:
  """(int64 counts, coded bytes) of one symbol stream."""
  counts = symbol_counts(symbols, alphabet)
  words, _ = encode_streams([(symbols, counts)])
  return counts, words.tobytes()


def decode_symbols(data: bytes, counts: np.ndarray, n: int) -> np.ndarray:
  """int32 symbols (n of them) from encode_symbols' bytes and counts."""
  counts = np.asarray(counts, dtype=np.int64)
  if int(counts.sum()) != n:
    raise ValueError(
        f"counts sum to {int(counts.sum())} but n={n}; pass the counts "
        "returned by encode_symbols for this stream.")
  if len(data) % 4:
    raise ValueError(
        f"coded data has {len(data)} bytes, not a multiple of 4; pass the "
        "bytes returned by encode_symbols unchanged.")
  return decode_streams(np.frombuffer(data, dtype="<u4"), [counts])[0]


@dataclasses.dataclass(frozen=True)
class PackedKernel:
  """One compressed kernel: value = mask * step * codes (float32).

  `name` is the weight key the reader matches (e.g. "conv1/kernel"); `step`
  is a float32 array of shape () or the kernel's last `len(step.shape)` dims
  (one step per output channel).
  """

  name: str
  bits: int
  step: np.ndarray
  mask: np.ndarray
  codes: np.ndarray

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.mask.shape)

  def symbols(self) -> np.ndarray:
    return symbols_from_codes(self.mask, self.codes, self.bits)

  def values(self) -> np.ndarray:
    """float32 kernel: float32(step) * float32(code) where kept, else 0."""
    return grid.dequantize(np.where(self.mask, self.codes, 0), self.step)


@dataclasses.dataclass(frozen=True)
class PackStats:
  """What write_packed wrote: sizes in bytes; per kernel coded bits and counts."""

  file_bytes: int
  header_bytes: int
  coded_bytes: int
  rest_bytes: int
  kernel_coded_bits: dict[str, int]
  kernel_counts: dict[str, np.ndarray]


def _varint(value: int) -> bytes:
  out = bytearray()
  value = int(value)
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


class _Reader:
  """Cursor over header bytes; every overrun is a ValueError."""

  def __init__(self, data: bytes):
    self._data = data
    self.pos = 0

  def take(self, n: int) -> bytes:
    if n < 0 or self.pos + n > len(self._data):
      raise ValueError("truncated header")
    out = self._data[self.pos:self.pos + n]
    self.pos += n
    return out

  def varint(self) -> int:
    value, shift = 0, 0
    while True:
      byte = self.take(1)[0]
      value |= (byte & 0x7F) << shift
      if not byte & 0x80:
        return value
      shift += 7
      if shift > 63:
        raise ValueError("varint too long")

  def name(self) -> str:
    return self.take(self.varint()).decode("utf-8")

  def shape(self) -> tuple[int, ...]:
    return tuple(self.varint() for _ in range(self.varint()))


def _name_bytes(name: str) -> bytes:
  raw = name.encode("utf-8")
  return _varint(len(raw)) + raw


def _shape_bytes(shape: Sequence[int]) -> bytes:
  return _varint(len(shape)) + b"".join(_varint(d) for d in shape)


def _check_names(names: Sequence[str]) -> None:
  seen = set()
  for name in names:
    if name in seen:
      raise ValueError(
          f"weight name {name!r} appears twice; every packed weight needs a "
          "unique name.")
    seen.add(name)


def write_packed(path: str | os.PathLike, kernels: Sequence[PackedKernel],
                 rest: Mapping[str, np.ndarray]) -> PackStats:
  """Writes the packed file (via a temp file + rename) and returns its sizes.

  Args:
    path: destination file.
    kernels: compressed kernels, in the order they are stored.
    rest: every other parameter, name -> array, stored raw as float32.

  Returns:
    PackStats with the on-disk size and per-kernel coded bits.
  """
  _check_names([e.name for e in kernels] + list(rest))
  streams, header = [], bytearray()
  header += _varint(len(kernels)) + _varint(len(rest))
  kernel_header = bytearray()
  for kernel in kernels:
    symbols = kernel.symbols()
    counts = symbol_counts(symbols, alphabet_size(kernel.bits))
    streams.append((symbols, counts))
    kernel_header += _name_bytes(kernel.name) + _shape_bytes(kernel.shape)
    step = np.asarray(kernel.step, dtype="<f4")
    if step.shape != kernel.shape[len(kernel.shape) - step.ndim:]:
      raise ValueError(
          f"step shape {step.shape} of {kernel.name!r} is not () or the last "
          f"dims of its shape {kernel.shape}; pass one step per output channel.")
    kernel_header += struct.pack("<BB", kernel.bits, step.ndim) + step.tobytes()
    kernel_header += b"".join(_varint(c) for c in counts)
  words, bits = encode_streams(streams)
  header += _varint(words.size) + kernel_header
  rest_arrays = []
  for name, value in rest.items():
    value = np.asarray(value)
    header += _name_bytes(name) + _shape_bytes(value.shape)
    rest_arrays.append(np.ascontiguousarray(value, dtype="<f4"))
  deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
  packed_header = deflate.compress(bytes(header)) + deflate.flush()
  coded = words.tobytes()
  body = b"".join([_varint(len(packed_header)), packed_header, coded,
                   *(a.tobytes() for a in rest_arrays)])
  data = MAGIC + struct.pack("<I", zlib.crc32(body)) + body
  files.atomic_write(path, data)
  return PackStats(
      file_bytes=os.path.getsize(path),
      header_bytes=len(data) - len(coded) - sum(a.nbytes for a in rest_arrays),
      coded_bytes=len(coded),
      rest_bytes=sum(a.nbytes for a in rest_arrays),
      kernel_coded_bits={e.name: b for e, b in zip(kernels, bits)},
      kernel_counts={e.name: c for e, (_, c) in zip(kernels, streams)})


def read_packed(
    path: str | os.PathLike,
    *,
    expected_shapes: Mapping[str, Sequence[int]] | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[list[PackedKernel], dict[str, np.ndarray]]:
  """Reads a file written by write_packed.

  Every declared kernel is checked before a single symbol is decoded: a
  hand-made header can declare a 40,000 x 40,000 kernel of one symbol in a
  few bytes, and decoding it would allocate gigabytes.

  Args:
    path: the model.opq file.
    expected_shapes: weight name -> shape of the model it is read for; each
      declared kernel and rest parameter must be named here with this shape.
    max_elements: refuse files whose kernels declare more elements in all.

  Returns:
    (kernels, rest): PackedKernel per compressed kernel in file order, and
    name -> float32 array for every other parameter.

  Raises:
    ValueError: the file is not an OPQ packed file, is truncated/corrupt, or
      declares names, shapes or sizes outside the bounds.
  """
  with open(path, "rb") as f:
    data = f.read()
  fix = f"re-export the model to rebuild {os.fspath(path)!r}"
  if len(data) >= 4 and data[:3] == MAGIC[:3] and data[:4] != MAGIC:
    raise ValueError(
        f"{os.fspath(path)!r} is a packed file of format version {data[3]}, "
        f"not {MAGIC[3]} (this opq_tf's); re-export it with this version of "
        "opq_tf.export.")
  if len(data) < 8 or data[:4] != MAGIC:
    raise ValueError(
        f"{os.fspath(path)!r} is not an OPQ packed file (bad magic); pass the "
        "model.opq written by opq_tf.export.")
  (crc,) = struct.unpack("<I", data[4:8])
  body = data[8:]
  if zlib.crc32(body) != crc:
    raise ValueError(
        f"{os.fspath(path)!r} is corrupt or truncated (checksum mismatch); "
        f"{fix}.")
  try:
    outer = _Reader(body)
    header_length = outer.varint()
    header = _Reader(zlib.decompress(outer.take(header_length), -15))
    n_kernels, n_rest, n_words = (header.varint() for _ in range(3))
    specs, declared = [], 0
    for _ in range(n_kernels):
      name, shape = header.name(), header.shape()
      _check_declared(name, shape, expected_shapes, path)
      declared += int(np.prod(shape, dtype=object))
      if declared > max_elements:
        raise _TooLarge(
            f"{os.fspath(path)!r} declares more than {max_elements} kernel "
            f"weights (at {name!r}, shape {shape}); if the model really is "
            "that large, raise read_packed's max_elements.")
      bits, axes = struct.unpack("<BB", header.take(2))
      if axes > len(shape):
        raise ValueError(f"{name!r} has {axes} channel axes but rank {len(shape)}")
      step_shape = shape[len(shape) - axes:]
      step = np.frombuffer(header.take(4 * int(np.prod(step_shape, dtype=np.int64))),
                           dtype="<f4").astype(np.float32).reshape(step_shape)
      counts = np.array([header.varint() for _ in range(alphabet_size(bits))],
                        dtype=np.int64)
      if int(counts.sum()) != int(np.prod(shape)):
        raise ValueError(f"counts of {name!r} do not match its shape {shape}")
      specs.append((name, shape, bits, step, counts))
    rest_specs = []
    for _ in range(n_rest):
      name, shape = header.name(), header.shape()
      _check_declared(name, shape, expected_shapes, path)
      rest_specs.append((name, shape))
    if expected_shapes is not None:
      missing = set(expected_shapes) - {s[0] for s in specs + rest_specs}
      if missing:
        raise _Mismatch(
            f"the model has weights that {os.fspath(path)!r} does not: "
            f"{_listing(missing)}; pass the architecture that was exported.")
    words = np.frombuffer(outer.take(4 * n_words), dtype="<u4")
    rest = {}
    for name, shape in rest_specs:
      size = int(np.prod(shape))
      rest[name] = np.frombuffer(
          outer.take(4 * size), dtype="<f4").astype(np.float32).reshape(shape)
    if outer.pos != len(body):
      raise ValueError(f"{len(body) - outer.pos} unexpected trailing bytes")
    broken = [name for name, _, _, step, _ in specs
              if not np.all(np.isfinite(step)) or not np.all(step > 0)]
    broken += [name for name, values in rest.items()
               if not np.all(np.isfinite(values))]
    if broken:
      raise _Mismatch(
          f"{os.fspath(path)!r} holds NaN, Inf or non-positive steps in "
          f"{_listing(broken)}; the exported model was broken: fix its "
          "weights and re-export.")
  except (_Mismatch, _TooLarge):
    raise
  except (ValueError, zlib.error, UnicodeDecodeError, struct.error) as error:
    raise ValueError(
        f"{os.fspath(path)!r} is not a valid OPQ packed file ({error}); "
        f"{fix}.") from error
  streams = decode_streams(words, [spec[4] for spec in specs])
  kernels = []
  for (name, shape, bits, step, _), symbols in zip(specs, streams):
    mask, codes = codes_from_symbols(symbols, bits, shape)
    kernels.append(PackedKernel(name=name, bits=bits, step=step, mask=mask,
                                codes=codes))
  return kernels, rest


class _Mismatch(ValueError):
  """The file's weights are not the model's (reported as they are)."""


class _TooLarge(ValueError):
  """The file declares more weights than the caller allows."""


def _listing(names, limit: int = 5) -> str:
  names = sorted(names)
  return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _check_declared(name: str, shape: tuple[int, ...],
                    expected_shapes: Mapping[str, Sequence[int]] | None,
                    path) -> None:
  if expected_shapes is None:
    return
  if name not in expected_shapes:
    raise _Mismatch(
        f"{os.fspath(path)!r} holds weight {name!r}, which the model does not "
        "have; pass the architecture that was exported (same layers and layer "
        "names).")
  if tuple(expected_shapes[name]) != tuple(shape):
    raise _Mismatch(
        f"{os.fspath(path)!r} declares {name!r} with shape {tuple(shape)}, "
        f"the model has {tuple(expected_shapes[name])}; pass the architecture "
        "that was exported.")
