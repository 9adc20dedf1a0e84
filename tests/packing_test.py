"""Tests for opq_tf.core.packing: symbols, the constriction codec and the file."""

import os
import shutil
import struct
import tempfile
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from opq_tf.core import packing


def _stream(name, n, seed=0):
  """Symbol streams over the 4-bit alphabet (16 symbols) of various shapes."""
  rng = np.random.default_rng(seed)
  alphabet = packing.alphabet_size(4)
  if name == "uniform":
    return rng.integers(0, alphabet, size=n).astype(np.int32)
  if name == "laplace":
    codes = np.clip(np.round(rng.laplace(scale=2.0, size=n)), -7, 7)
    mask = rng.random(n) > 0.8
    return packing.symbols_from_codes(mask, codes.astype(np.int32), 4)
  if name == "skewed":
    p = np.full(alphabet, 1e-4)
    p[0] = 1.0 - 1e-4 * (alphabet - 1)
    return rng.choice(alphabet, size=n, p=p).astype(np.int32)
  if name == "unused_symbols":
    return rng.choice([0, 3, 15], size=n, p=[0.7, 0.2, 0.1]).astype(np.int32)
  if name == "all_pruned":
    return np.zeros(n, dtype=np.int32)
  if name == "single_kept":
    symbols = np.zeros(n, dtype=np.int32)
    symbols[n // 3] = 12
    return symbols
  if name == "two_symbols_one_rare":
    symbols = np.full(n, 8, dtype=np.int32)
    symbols[-1] = 0
    return symbols
  raise ValueError(name)


_STREAMS = ("uniform", "laplace", "skewed", "unused_symbols", "all_pruned",
            "single_kept", "two_symbols_one_rare")


class SymbolsTest(parameterized.TestCase):

  def test_symbols_keep_pruned_and_kept_zero_apart(self):
    mask = np.array([[True, False], [True, True]])
    codes = np.array([[0, 5], [-7, 7]])
    symbols = packing.symbols_from_codes(mask, codes, 4)
    np.testing.assert_array_equal(symbols, [8, 0, 1, 15])
    back_mask, back_codes = packing.codes_from_symbols(symbols, 4, (2, 2))
    np.testing.assert_array_equal(back_mask, mask)
    np.testing.assert_array_equal(back_codes, [[0, 0], [-7, 7]])

  @parameterized.parameters(2, 3, 4, 8)
  def test_alphabet_size(self, bits):
    k = 2 ** (bits - 1) - 1
    self.assertEqual(packing.alphabet_size(bits), 2 * k + 2)

  def test_codes_outside_grid_raise(self):
    with self.assertRaisesRegex(ValueError, r"outside \[-3, 3\].*clip"):
      packing.symbols_from_codes(np.ones(3, bool), np.array([0, 4, 1]), 3)

  def test_bad_bits_raise(self):
    with self.assertRaisesRegex(ValueError, "bits must be in 2..8"):
      packing.alphabet_size(1)

  def test_entropy(self):
    self.assertAlmostEqual(
        packing.empirical_entropy_bits(np.arange(8) % 4, 6), 2.0)
    self.assertEqual(packing.empirical_entropy_bits(np.zeros(9, int), 6), 0.0)


class CodecTest(parameterized.TestCase):

  @parameterized.parameters(*_STREAMS)
  def test_round_trip(self, name):
    symbols = _stream(name, 5000)
    alphabet = packing.alphabet_size(4)
    counts, data = packing.encode_symbols(symbols, alphabet)
    np.testing.assert_array_equal(counts, np.bincount(symbols, minlength=16))
    decoded = packing.decode_symbols(data, counts, symbols.size)
    np.testing.assert_array_equal(decoded, symbols)

  def test_single_symbol_stream_costs_nothing(self):
    _, data = packing.encode_symbols(_stream("all_pruned", 1000), 16)
    self.assertEqual(data, b"")

  @parameterized.parameters("uniform", "laplace", "skewed", "unused_symbols",
                            "two_symbols_one_rare")
  def test_coded_size_near_entropy(self, name):
    symbols = _stream(name, 200_000, seed=1)
    entropy_bytes = symbols.size * packing.empirical_entropy_bits(
        symbols, 16) / 8
    _, data = packing.encode_symbols(symbols, 16)
    self.assertLessEqual(len(data), 1.01 * entropy_bytes + 16)
    self.assertGreaterEqual(len(data), entropy_bytes - 16)

  def test_several_streams_share_one_stack(self):
    names = ("laplace", "all_pruned", "skewed", "single_kept")
    streams = [_stream(n, 3000 + i, seed=i) for i, n in enumerate(names)]
    pairs = [(s, packing.symbol_counts(s, 16)) for s in streams]
    words, bits = packing.encode_streams(pairs)
    self.assertEqual(bits[1], 0)
    self.assertLessEqual(sum(bits), 32 * words.size)
    decoded = packing.decode_streams(words, [c for _, c in pairs])
    for got, want in zip(decoded, streams):
      np.testing.assert_array_equal(got, want)

  def test_wrong_counts_raise(self):
    symbols = _stream("laplace", 2000)
    counts, data = packing.encode_symbols(symbols, 16)
    with self.assertRaisesRegex(ValueError, "counts sum"):
      packing.decode_symbols(data, counts, 1999)


class FileTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(3)
    weights = rng.laplace(scale=0.05, size=(3, 3, 8, 16)).astype(np.float32)
    mask = np.abs(weights) >= 0.04
    step = np.float32(0.0173)
    codes = np.clip(np.round(weights / step), -7, 7).astype(np.int32) * mask
    dense_mask = rng.random((64, 10)) > 0.9
    self.entries = [
        packing.PackedKernel("conv/kernel", 4, step, mask, codes),
        # One step per output channel.
        packing.PackedKernel("dense/kernel", 3,
                             np.linspace(0.1, 0.5, 10, dtype=np.float32),
                             dense_mask,
                             rng.integers(-3, 4, size=(64, 10)) * dense_mask),
        packing.PackedKernel("dw/depthwise_kernel", 8,
                             np.full((4, 1), 0.5, np.float32),
                             np.zeros((3, 3, 4, 1), bool),
                             np.zeros((3, 3, 4, 1), np.int32)),
    ]
    self.rest = {
        "conv/bias": rng.normal(size=16).astype(np.float32),
        "bn/moving_variance": np.array([np.pi, -0.0, 1e-30], np.float32),
    }
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory)
    self.path = os.path.join(directory, "model.opq")

  def test_round_trip_is_exact(self):
    stats = packing.write_packed(self.path, self.entries, self.rest)
    self.assertEqual(stats.file_bytes, os.path.getsize(self.path))
    entries, rest = packing.read_packed(self.path)
    self.assertEqual([e.name for e in entries],
                     [e.name for e in self.entries])
    for got, want in zip(entries, self.entries):
      self.assertEqual(got.bits, want.bits)
      np.testing.assert_array_equal(got.step, want.step)
      self.assertEqual(got.step.dtype, np.float32)
      np.testing.assert_array_equal(got.mask, want.mask)
      np.testing.assert_array_equal(got.codes, want.codes)
      self.assertTrue(np.array_equal(got.values(), want.values()))
      self.assertEqual(got.values().dtype, np.float32)
    self.assertEqual(list(rest), list(self.rest))
    for name, value in self.rest.items():
      self.assertEqual(rest[name].tobytes(), value.tobytes())
    self.assertEqual(stats.kernel_coded_bits["dw/depthwise_kernel"], 0)
    # Magic, crc, varint and a deflated header of 5 names, shapes and counts.
    self.assertLess(stats.header_bytes, 200)
    self.assertEqual(stats.file_bytes, stats.header_bytes + stats.coded_bytes
                     + stats.rest_bytes)

  def test_values_are_step_times_code(self):
    for entry in self.entries:
      want = np.where(entry.mask, np.float32(entry.step) *
                      entry.codes.astype(np.float32), 0).astype(np.float32)
      self.assertTrue(np.array_equal(entry.values(), want))
    dense = self.entries[1]  # Channel j is scaled by its own step.
    np.testing.assert_array_equal(
        dense.values()[:, 3],
        np.where(dense.mask[:, 3],
                 dense.codes[:, 3].astype(np.float32) * dense.step[3], 0))

  def test_step_shape_must_fit_the_kernel(self):
    entry = self.entries[1]
    bad = packing.PackedKernel(entry.name, 3, np.ones(7, np.float32),
                               entry.mask, entry.codes)
    with self.assertRaisesRegex(ValueError, "one step per output channel"):
      packing.write_packed(self.path, [bad], {})
    self.assertFalse(os.path.exists(self.path))

  def test_random_corruption_always_raises_value_error(self):
    # 400 files mutated at random places; the CRC catches most, the parser
    # the rest. Nothing but ValueError may come out.
    packing.write_packed(self.path, self.entries, self.rest)
    with open(self.path, "rb") as f:
      original = f.read()
    rng = np.random.default_rng(11)
    for trial in range(400):
      data = bytearray(original)
      for position in rng.integers(0, len(data), size=1 + trial % 4):
        data[position] = int(rng.integers(256))
      if bytes(data) == original:
        continue
      with open(self.path, "wb") as f:
        f.write(bytes(data))
      with self.assertRaises(ValueError, msg=f"trial {trial}"):
        packing.read_packed(self.path)

  def _hand_made(self, shape):
    """A valid file (magic, checksum) declaring one all-pruned kernel."""
    header = bytearray()
    header += packing._varint(1) + packing._varint(0) + packing._varint(0)
    header += packing._name_bytes("huge/kernel") + packing._shape_bytes(shape)
    header += struct.pack("<BBf", 4, 0, 0.1)
    size = int(np.prod(shape))
    header += b"".join(packing._varint(c)
                       for c in [size] + [0] * (packing.alphabet_size(4) - 1))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = deflate.compress(bytes(header)) + deflate.flush()
    body = packing._varint(len(packed)) + packed
    return packing.MAGIC + struct.pack("<I", zlib.crc32(body)) + body

  def test_declared_size_is_bounded_before_decoding(self):
    # 40,000 x 40,000 pruned weights cost a few bytes of header and would
    # allocate gigabytes if decoded.
    data = self._hand_made((40000, 40000))
    self.assertLess(len(data), 64)
    with open(self.path, "wb") as f:
      f.write(data)
    with self.assertRaisesRegex(ValueError, "declares more than .*max_elements"):
      packing.read_packed(self.path)
    with self.assertRaisesRegex(ValueError, "more than 1000 "):
      packing.read_packed(self.path, max_elements=1000)
    with self.assertRaisesRegex(ValueError, r"shape \(40000, 40000\).*\(3, 3\)"):
      packing.read_packed(self.path, expected_shapes={"huge/kernel": (3, 3)})
    with self.assertRaisesRegex(ValueError, "'huge/kernel', which the model"):
      packing.read_packed(self.path, expected_shapes={"conv/kernel": (3, 3)})

  def test_small_hand_made_file_decodes(self):
    # The same construction at a small size is a valid file: the refusal
    # above comes from the bound, not from a malformed header.
    with open(self.path, "wb") as f:
      f.write(self._hand_made((30, 20)))
    kernels, rest = packing.read_packed(self.path)
    self.assertEqual(kernels[0].shape, (30, 20))
    self.assertFalse(kernels[0].mask.any())
    self.assertEqual(rest, {})

  def test_expected_shapes_must_all_be_in_the_file(self):
    packing.write_packed(self.path, self.entries, self.rest)
    expected = {e.name: e.shape for e in self.entries}
    expected.update({n: v.shape for n, v in self.rest.items()})
    packing.read_packed(self.path, expected_shapes=expected)
    expected["extra/bias"] = (3,)
    with self.assertRaisesRegex(ValueError, "does not: extra/bias"):
      packing.read_packed(self.path, expected_shapes=expected)

  def test_non_finite_values_are_refused_on_reading(self):
    name = sorted(self.rest)[0]
    broken = {**self.rest, name: np.full_like(self.rest[name], np.nan)}
    packing.write_packed(self.path, self.entries, broken)
    with self.assertRaisesRegex(ValueError, f"NaN.*{name}"):
      packing.read_packed(self.path)

  def test_old_format_version_is_named(self):
    packing.write_packed(self.path, self.entries, self.rest)
    with open(self.path, "rb") as f:
      data = bytearray(f.read())
    data[3] = 1
    with open(self.path, "wb") as f:
      f.write(bytes(data))
    with self.assertRaisesRegex(ValueError, "format version 1, not 2.*re-export"):
      packing.read_packed(self.path)

  @parameterized.parameters("flip_header", "flip_payload", "truncate",
                            "append", "magic")
  def test_corrupt_file_raises(self, how):
    packing.write_packed(self.path, self.entries, self.rest)
    with open(self.path, "rb") as f:
      data = bytearray(f.read())
    if how == "flip_header":
      data[12] ^= 0x40
    elif how == "flip_payload":
      data[len(data) // 2] ^= 0x01
    elif how == "truncate":
      data = data[:-7]
    elif how == "append":
      data += b"\0"
    else:
      data[0:4] = b"PK\x03\x04"
    with open(self.path, "wb") as f:
      f.write(bytes(data))
    with self.assertRaisesRegex(ValueError, "OPQ packed file|corrupt"):
      packing.read_packed(self.path)

  def test_duplicate_names_raise_and_write_nothing(self):
    rest = {"conv/kernel": np.zeros(3, np.float32)}
    with self.assertRaisesRegex(ValueError, "appears twice"):
      packing.write_packed(self.path, self.entries, rest)
    self.assertFalse(os.path.exists(self.path))
    self.assertEmpty(os.listdir(os.path.dirname(self.path)))


if __name__ == "__main__":
  absltest.main()
