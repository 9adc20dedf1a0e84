"""Which layer kinds OPQ compresses, and which of their weights.

A compressible *entry* is one kernel of one layer, keyed
`"<layer name>/<weight>"`:

| layer class                  | weights                                 |
|------------------------------|-----------------------------------------|
| Conv2D, Conv1D, Dense        | `kernel`                                |
| DepthwiseConv2D              | `depthwise_kernel`                      |
| SeparableConv2D              | `depthwise_kernel`, `pointwise_kernel`  |

Matching is by exact class: a Conv2DTranspose (a Conv2D subclass) or a user's
Dense subclass is *not* compressed unless registered with
`opq_tf.register_layer`. Biases, BatchNorm and every other weight stay FP32.
"""

from typing import Optional

import numpy as np

from opq_tf._keras import keras

# layer class -> names of its compressed weight attributes, in this order.
WEIGHT_ATTRS: dict[type, tuple[str, ...]] = {
    keras.layers.Conv1D: ("kernel",),
    keras.layers.Conv2D: ("kernel",),
    keras.layers.Dense: ("kernel",),
    keras.layers.DepthwiseConv2D: ("depthwise_kernel",),
    keras.layers.SeparableConv2D: ("depthwise_kernel", "pointwise_kernel"),
}


def weight_attrs(layer: keras.layers.Layer) -> Optional[tuple[str, ...]]:
  """The compressed weight attributes of `layer`; None if not compressible."""
  return WEIGHT_ATTRS.get(type(layer))


def iter_layers(model: keras.Model):
  """Yields the non-model layers of `model` in order, entering submodels."""
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from iter_layers(layer)
    else:
      yield layer


def compressible_kernels(
    model: keras.Model,
) -> dict[str, tuple[str, np.ndarray]]:
  """Maps `"<layer name>/<weight>"` -> (layer class name, kernel value).

  Args:
    model: a built tf_keras model; nested models are searched too (their layer
      names are used as they are, without a prefix).

  Returns:
    One item per compressed weight, in model order; kernels are float32 copies.
  """
  kernels = {}
  for layer in iter_layers(model):
    for attr in weight_attrs(layer) or ():
      kernel = getattr(layer, attr)
      kernels[f"{layer.name}/{attr}"] = (
          type(layer).__name__,
          np.asarray(kernel.numpy(), dtype=np.float32),
      )
  return kernels
