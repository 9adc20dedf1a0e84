"""The OPQ grid: bit-widths, levels, codes and compressed values (pure NumPy).

One home for the arithmetic that allocation, the quantizer, strip, the packed
file and the reports must agree on bit for bit:

    K = 2**(B-1) - 1                       largest code magnitude of a B-bit grid
    code(w) = clip(round(w / step), -K, K) integer in [-K, K]; 0 where pruned
    w_hat = float32(step) * float32(code)  the compressed value

`step` is a scalar (one step per kernel, the paper's "kernel" granularity) or
one step per output channel ("channel" granularity), laid out as the kernel's
trailing channel axes so that it broadcasts against the kernel: (out,) for a
Conv2D / Dense kernel, (in, multiplier) for a depthwise kernel.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

MIN_BITS = 2  # levels -1, 0, +1: the least grid that can keep a weight.
MAX_BITS = 8  # above 8 bits, ordinary FP32 or int8 is the better tool.


def check_bits(bits: Any, what: str = "bits") -> int:
  """Returns `bits` as an int, or raises naming the valid range and why."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(
        f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}.")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(
        f"{what} must be in {MIN_BITS}..{MAX_BITS}, got {bits}: OPQ's grid "
        "needs at least the levels -1, 0, +1 (2 bits); above 8 bits use "
        "ordinary FP32 or int8.")
  return int(bits)


def max_code(bits: int) -> int:
  """K = 2**(B-1) - 1: the largest code magnitude of a B-bit grid."""
  return 2 ** (int(bits) - 1) - 1


def step_shape(kernel_shape: Sequence[int], channel_axes: Sequence[int]
               ) -> tuple[int, ...]:
  """Shape of a per-channel step: the kernel's (trailing) channel axes."""
  return tuple(int(kernel_shape[axis]) for axis in channel_axes)


def channel_count(kernel_shape: Sequence[int],
                  channel_axes: Sequence[int]) -> int:
  """Number of output channels (product of the channel axes' sizes)."""
  return int(np.prod(step_shape(kernel_shape, channel_axes), dtype=np.int64))


def step_array(step: Any, kernel_shape: Sequence[int],
               channel_axes: Sequence[int]) -> np.ndarray:
  """`step` as float32, shape () or the channel axes' shape (broadcastable).

  A plan stores a channel step flattened (C order over the channel axes); this
  lays it out against the kernel.
  """
  values = np.asarray(step, dtype=np.float32)
  if values.ndim == 0 or values.size == 1 and not channel_axes:
    return values.reshape(())
  return values.reshape(step_shape(kernel_shape, channel_axes))


def codes(values: np.ndarray, step: Any, bits: int,
          mask: np.ndarray | None = None) -> np.ndarray:
  """int32 codes clip(round(w / step), -K, K), zero where `mask` is False.

  Computed in float32, exactly as the TensorFlow quantizer does, so that the
  codes read back from a wrapped model are the ones its forward pass used.
  """
  values = np.asarray(values, dtype=np.float32)
  k = max_code(bits)
  out = np.clip(np.round(values / np.asarray(step, dtype=np.float32)), -k, k)
  if mask is not None:
    out = np.where(mask, out, 0)
  return out.astype(np.int32)


def dequantize(codes_: np.ndarray, step: Any) -> np.ndarray:
  """float32(step) * float32(code): the compressed kernel."""
  return (np.asarray(step, dtype=np.float32)
          * np.asarray(codes_, dtype=np.float32)).astype(np.float32)


def compress(values: np.ndarray, step: Any, bits: int,
             mask: np.ndarray) -> np.ndarray:
  """mask * step * clip(round(w / step), -K, K) as float32."""
  return dequantize(codes(values, step, bits, mask), step)


def weight_bits_ratio(sizes: Sequence[int], kept: Sequence[int],
                      bits: Sequence[int], step_counts: Sequence[int]) -> float:
  """32·Σn_i / Σ_i(kept_i·B_i + 32·steps_i): the papers' compression figure.

  Every stored FP32 step costs 32 bits: one per kernel, or one per output
  channel at "channel" granularity.
  """
  coded = sum(k * b + 32 * s for k, b, s in zip(kept, bits, step_counts))
  return 32.0 * float(sum(sizes)) / coded


# Channel axes of a kernel (the trailing axes that index its output channels),
# for kernels given as bare arrays; a model's layers take theirs from the layer
# table in opq_tf/tf_keras/layers.py, which `register_layer` extends.
OUTPUT_CHANNEL = (-1,)
DEPTHWISE_CHANNELS = (-2, -1)  # (in, multiplier): one output channel each


def default_channel_axes(weight_name: str) -> tuple[int, ...]:
  """Channel axes of a bare array named like a Keras weight."""
  return DEPTHWISE_CHANNELS if weight_name == "depthwise_kernel" else OUTPUT_CHANNEL
