"""The OPQ weight quantizer in `keras.ops`: a fixed mask and a fixed step.

Forward, for a kernel `w` with mask `M` (same shape, 0/1), step `step` (a
scalar, or one per output channel laid out as the kernel's channel axes so
that it broadcasts) and `K = 2**(bits - 1) - 1` (opq_tf/core/grid.py):

    w_hat = M * (stop_gradient(step * clip(round(w / step), -K, K))
                 + (w - stop_gradient(w)))

which is `M * step * code` in the forward pass (w - w is exactly 0) and has
gradient `M` (straight-through), exactly as the tf_keras quantizer. Only
`keras.ops`, so it traces under `jit_compile=True` on every backend, and
`round` is half-to-even everywhere, as NumPy's, so the codes the forward pass
uses are the ones `opq_tf.core.grid.codes` computes.

`M` and `step` are non-trainable variables the wrapping layer creates in its
`build` (`OPQWrapper`): saved in `.keras` files and checkpoints, never
recomputed.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from opq_tf.core import grid
from opq_tf.keras3._keras import keras, ops


@keras.saving.register_keras_serializable(package="opq_tf")
class OPQWeightQuantizer:
  """Prunes with a fixed mask and rounds onto a fixed symmetric uniform grid.

  Usually built by `opq_tf.apply` inside an `OPQWrapper`; standalone:

  ```python
  quantizer = OPQWeightQuantizer(bits=4, step=0.1, threshold=0.05)
  layer = keras.layers.Dense(3)
  layer.build((None, 2))
  weights = quantizer.build(layer.kernel.shape, "kernel", layer)
  weights["mask"].assign(
      keras.ops.cast(keras.ops.abs(layer.kernel) >= 0.05, "float32"))
  w_hat = quantizer(layer.kernel, training=True, weights=weights)
  # w_hat / 0.1 is an integer in [-7, 7]; zero where |kernel| < 0.05.
  ```
  """

  def __init__(self, bits: int, step: Union[float, Sequence[float]],
               threshold: float,
               channel_axes: Sequence[int] = grid.OUTPUT_CHANNEL):
    """Constructs the quantizer.

    Args:
      bits: bit-width B of a kept weight's code; codes are in [-K, K],
        K = 2**(B-1) - 1.
      step: the plan's step (the initial value of the `step` variable): a
        float, or one float per output channel in C order over
        `channel_axes`.
      threshold: magnitude threshold t of the mask |w| >= t, kept for
        reference (the mask itself lives in the `mask` variable).
      channel_axes: the kernel's output-channel axes, which a per-channel
        step is laid out over.
    """
    self.bits = grid.check_bits(bits)
    steps = np.asarray(step, dtype=np.float64)
    if steps.size == 0 or not np.all(steps > 0):
      raise ValueError(f"step={step} must be > 0; take it from the plan.")
    self.step = (float(steps) if steps.ndim == 0
                 else [float(s) for s in steps.ravel()])
    self.threshold = float(threshold)
    self.channel_axes = tuple(int(axis) for axis in channel_axes)

  @property
  def max_code(self) -> int:
    """K = 2**(bits-1) - 1: the largest code magnitude."""
    return grid.max_code(self.bits)

  def build(self, tensor_shape: Sequence[int], name: str,
            layer: keras.layers.Layer, layout: Any = None) -> dict:
    """Creates the `mask` and `step` variables for a kernel of `tensor_shape`.

    Args:
      tensor_shape: the kernel's shape.
      name: the variables are named "<name>_mask" and "<name>_step" (no "/").
      layer: the layer they belong to (their path is under its name); the
        caller tracks them by assigning the returned dict to an attribute.
      layout: the kernel's `keras.distribution.TensorLayout`, if any: the
        mask gets it, and a per-channel step the layout of the kernel's
        channel axes, so that under a `keras.distribution` they are sharded
        as the kernel they multiply (a LayoutMap written for the kernel's
        path need not know them).
    """
    shape = tuple(int(d) for d in tensor_shape)
    initial = grid.step_array(self.step, shape, self.channel_axes)
    step_layout = None
    if layout is not None and getattr(layout, "axes", None) is not None:
      axes = tuple(layout.axes)
      step_layout = keras.distribution.TensorLayout(
          axes[len(axes) - initial.ndim:] if initial.ndim else (),
          layout.device_mesh)
    with keras.name_scope(layer.name, caller=layer):
      mask = keras.Variable(
          initializer=keras.initializers.Ones(), shape=shape, dtype="float32",
          trainable=False, name=f"{name}_mask", layout=layout)
      step = keras.Variable(
          initializer=keras.initializers.Constant(initial),
          shape=initial.shape, dtype="float32", trainable=False,
          name=f"{name}_step", layout=step_layout)
    return {"mask": mask, "step": step}

  def __call__(self, inputs, training=None, weights=None, **kwargs):
    """w_hat = mask * (stop_gradient(step * codes) + (w - stop_gradient(w)))."""
    del training, kwargs
    values = ops.convert_to_tensor(inputs)
    step = ops.convert_to_tensor(weights["step"])
    codes = ops.clip(ops.round(ops.divide(values, step)), -self.max_code,
                     self.max_code)
    straight_through = ops.subtract(values, ops.stop_gradient(values))
    return ops.multiply(
        ops.convert_to_tensor(weights["mask"]),
        ops.add(ops.stop_gradient(ops.multiply(codes, step)), straight_through))

  def get_config(self) -> dict:
    return {"bits": self.bits, "step": self.step, "threshold": self.threshold,
            "channel_axes": list(self.channel_axes)}

  @classmethod
  def from_config(cls, config: dict) -> "OPQWeightQuantizer":
    return cls(**config)

  def __eq__(self, other) -> bool:
    return (isinstance(other, OPQWeightQuantizer)
            and self.get_config() == other.get_config())

  def __repr__(self) -> str:
    steps = np.atleast_1d(np.asarray(self.step))
    return (f"OPQWeightQuantizer(bits={self.bits}, steps={steps.size}, "
            f"threshold={self.threshold:.4g})")
