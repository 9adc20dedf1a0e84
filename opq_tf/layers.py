"""Which layer kinds OPQ compresses, which of their weights, and how weights are named.

A compressible *kernel* is one weight of one layer, keyed
`"<layer name>/<weight>"`. The table says which weights of which layer
classes are compressed and which trailing axes of each are its output
channels (the axes that get their own Laplace scale and, at "channel" step
granularity, their own step):

| layer class            | weight              | channel axes              |
|------------------------|---------------------|---------------------------|
| Conv1D, Conv2D, Dense  | `kernel`            | (-1,): out                |
| DepthwiseConv2D        | `depthwise_kernel`  | (-2, -1): in x multiplier |
| SeparableConv2D        | `depthwise_kernel`  | (-2, -1)                  |
|                        | `pointwise_kernel`  | (-1,)                     |

Matching is by exact class: a Conv2DTranspose (a Conv2D subclass) or a user's
Dense subclass is *not* compressed unless registered with
`opq_tf.register_layer`. Biases, BatchNorm and every other weight stay FP32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from opq_tf._keras import keras, tf
from opq_tf.grid import DEPTHWISE_CHANNELS, OUTPUT_CHANNEL

# layer class -> {compressed weight attribute: its channel axes}, in order.
KERNELS: dict[type, dict[str, tuple[int, ...]]] = {
    keras.layers.Conv1D: {"kernel": OUTPUT_CHANNEL},
    keras.layers.Conv2D: {"kernel": OUTPUT_CHANNEL},
    keras.layers.Dense: {"kernel": OUTPUT_CHANNEL},
    keras.layers.DepthwiseConv2D: {"depthwise_kernel": DEPTHWISE_CHANNELS},
    keras.layers.SeparableConv2D: {"depthwise_kernel": DEPTHWISE_CHANNELS,
                                   "pointwise_kernel": OUTPUT_CHANNEL},
}


class Kernel(NamedTuple):
  """One compressible kernel of a model, as `allocate` reads it."""

  kind: str  # layer class name
  values: np.ndarray  # float32 copy
  channel_axes: tuple[int, ...]


def weight_attrs(layer: keras.layers.Layer) -> Optional[tuple[str, ...]]:
  """The compressed weight attributes of `layer`; None if not compressible."""
  table = KERNELS.get(type(layer))
  return tuple(table) if table is not None else None


def channel_axes(layer: keras.layers.Layer, attr: str) -> tuple[int, ...]:
  """The channel axes of weight `attr` of a compressible `layer`."""
  return KERNELS[type(layer)][attr]


def iter_layers(model: keras.Model):
  """Yields the non-model layers of `model` in order, entering submodels."""
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      yield from iter_layers(layer)
    else:
      yield layer


def weight_keys(layer: keras.layers.Layer) -> dict[int, str]:
  """Maps id(variable) -> `weight_key` for every weight `layer` tracks."""
  keys: dict[int, str] = {}
  seen: set[int] = set()

  def walk(trackable, path: str) -> None:
    if id(trackable) in seen:
      return
    seen.add(id(trackable))
    for name, child in trackable._trackable_children().items():  # pylint: disable=protected-access
      if isinstance(child, tf.Variable):
        keys.setdefault(id(child), path + name)
      elif not isinstance(child, keras.Model):
        walk(child, f"{path}{name}/")

  walk(layer, f"{layer.name}/")
  return keys


def weight_key(layer: keras.layers.Layer, variable) -> str:
  """The one name of a weight: "<layer name>/<attribute path in the layer>".

  E.g. "conv1/kernel", "bn/moving_mean", "mha/_query_dense/kernel". The path
  is the chain of attributes that holds the variable (what tf.train.Checkpoint
  keys it by), not the variable's name: a sublayer's automatic name
  ("dense_3") changes with every instance built in a process, its attribute
  does not, so a MultiHeadAttention's four kernels or a custom layer's two
  Dense kernels get distinct keys that agree between a model, its clone and a
  freshly built copy. Wrapping, strip, export, load_packed and the trainers
  all match weights by this key.
  """
  key = weight_keys(layer).get(id(variable))
  if key is None:  # A variable the layer does not track (e.g. detached).
    key = f"{layer.name}/{variable.name.rsplit(':', 1)[0].rsplit('/', 1)[-1]}"
  return key


def compressible_kernels(model: keras.Model) -> dict[str, Kernel]:
  """Maps `"<layer name>/<weight>"` -> `Kernel` for every compressed weight.

  Args:
    model: a built tf_keras model; nested models are searched too (their layer
      names are used as they are, without a prefix).

  Returns:
    One item per compressed weight, in model order.
  """
  kernels = {}
  for layer in iter_layers(model):
    for attr, axes in KERNELS.get(type(layer), {}).items():
      kernel = getattr(layer, attr)
      kernels[f"{layer.name}/{attr}"] = Kernel(
          type(layer).__name__,
          np.asarray(kernel.numpy(), dtype=np.float32), axes)
  return kernels
