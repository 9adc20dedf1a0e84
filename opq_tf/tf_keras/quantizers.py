"""The OPQ weight quantizer: a fixed mask and a fixed step per kernel.

Forward, for a kernel `w` with mask `M` (same shape, 0/1), step `step` (a
scalar, or one per output channel laid out as the kernel's channel axes so that
it broadcasts) and `K = 2**(bits - 1) - 1` (opq_tf/core/grid.py):

    w_hat = M * step * clip(round(w / step), -K, K)

Backward is straight-through: d w_hat / d w = M, so the latent FP32 weights
are trained as if the quantizer were the identity, and pruned weights get no
gradient. `M` and `step` are non-trainable variables of the wrapping layer:
they are saved in checkpoints and SavedModels and never recomputed
(`opq_tf.apply` assigns them once from the plan and the pre-trained weights).
"""

from typing import Sequence, Union

import numpy as np

from opq_tf.core import grid
from opq_tf.tf_keras._keras import keras, tf, tfmot


@keras.utils.register_keras_serializable(package="opq_tf")
class OPQWeightQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
  """Prunes with a fixed mask and rounds onto a fixed symmetric uniform grid.

  Usually built by `opq_tf.apply`; standalone, it works like any tfmot
  `Quantizer` inside a `QuantizeConfig`:

  ```python
  quantizer = OPQWeightQuantizer(bits=4, step=0.1, threshold=0.05)
  layer = keras.layers.Dense(3)
  layer.build((None, 2))
  weights = quantizer.build(layer.kernel.shape, "kernel", layer)
  weights["mask"].assign(tf.cast(tf.abs(layer.kernel) >= 0.05, tf.float32))
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
      step: quantization step (the plan's value; the initial value of the `step`
        variable): a float, or one float per output channel in C order over
        `channel_axes`.
      threshold: magnitude threshold t of the mask |w| >= t, kept for reference
        (the mask itself lives in the `mask` variable).
      channel_axes: the kernel's output-channel axes, which a per-channel step
        is laid out over.
    """
    self.bits = grid.check_bits(bits)
    steps = np.asarray(step, dtype=np.float64)
    if steps.size == 0 or not np.all(steps > 0):
      raise ValueError(f"step={step} must be > 0; take it from the plan.")
    self.step = float(steps) if steps.ndim == 0 else [float(s) for s in steps]
    self.threshold = float(threshold)
    self.channel_axes = tuple(int(axis) for axis in channel_axes)

  @property
  def max_code(self) -> int:
    """K = 2**(bits-1) - 1: the largest code magnitude."""
    return grid.max_code(self.bits)

  def build(self, tensor_shape, name, layer):
    mask = layer.add_weight(
        f"{name}_mask",
        shape=tensor_shape,
        dtype=tf.float32,
        initializer=keras.initializers.Ones(),
        trainable=False,
    )
    initial = grid.step_array(self.step, tuple(tensor_shape), self.channel_axes)
    step = layer.add_weight(
        f"{name}_step",
        shape=initial.shape,
        dtype=tf.float32,
        initializer=keras.initializers.Constant(initial),
        trainable=False,
    )
    return {"mask": mask, "step": step}

  def __call__(self, inputs, training, weights, **kwargs):
    step = weights["step"]
    codes = tf.clip_by_value(
        tf.round(inputs / step), -self.max_code, self.max_code
    )
    # q + (w - sg(w)) is exactly q in the forward pass (w - w == 0 in IEEE
    # arithmetic), unlike w + sg(q - w), and has gradient 1 with respect to w.
    straight_through = inputs - tf.stop_gradient(inputs)
    return weights["mask"] * (tf.stop_gradient(codes * step) + straight_through)

  def get_config(self):
    return {"bits": self.bits, "step": self.step, "threshold": self.threshold,
            "channel_axes": list(self.channel_axes)}

  def __eq__(self, other):
    return (
        isinstance(other, OPQWeightQuantizer)
        and self.get_config() == other.get_config()
    )

  def __ne__(self, other):
    return not self.__eq__(other)
