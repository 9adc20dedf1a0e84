"""What a frontend hands the core for each kernel, and what it gets back.

A frontend (opq_tf/tf_keras, opq_tf/keras3) knows its Keras; the core knows
only NumPy. They meet in two records:

- `Kernel`: one compressible weight of a model as the frontend reads it: its
  key `"<layer name>/<weight>"`, the layer kind, a float32 copy of its values
  and its channel axes (the trailing axes that index output channels).
  `allocate` takes a mapping key -> `Kernel`.
- `CompressedKernel`: one compressed weight as a frontend reads it back from
  its layer's variables: the latent FP32 kernel, the mask, the step and the
  bit-width; `codes` and `compressed` are computed here, by the grid, so every
  frontend gets the same integers bit for bit. strip, export, the packed file,
  LiteRT and calibration all consume it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from opq_tf.core import grid


class Kernel(NamedTuple):
  """One compressible kernel of a model, as `allocate` reads it."""

  kind: str  # layer class name
  values: np.ndarray  # float32 copy
  channel_axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CompressedKernel:
  """One compressed kernel of a wrapped model, read back from its variables.

  `kernel` is the latent FP32 kernel; the compressed kernel is
  `mask * step * clip(round(kernel / step), -K, K)`, K = 2**(bits-1) - 1, with
  `step` a float32 array of shape () or the channel axes' shape.
  """

  key: str
  layer_name: str
  weight: str
  kind: str
  kernel: np.ndarray
  mask: np.ndarray
  step: np.ndarray
  bits: int
  threshold: float
  channel_axes: tuple[int, ...]

  @property
  def codes(self) -> np.ndarray:
    """Integer codes in [-K, K], 0 where pruned (int32, kernel shape)."""
    return grid.codes(self.kernel, self.step, self.bits, self.mask)

  @property
  def compressed(self) -> np.ndarray:
    """mask * step * codes (float32): the kernel the wrapped model uses."""
    return grid.dequantize(self.codes, self.step)
