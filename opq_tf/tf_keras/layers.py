"""The layer table: which layer kinds OPQ compresses, and how each is treated.

A compressible *kernel* is one weight of one layer, keyed
`"<layer name>/<weight>"`. `KERNELS` is the one table of this frontend: per
layer class and compressed weight, its `WeightRule`: the channel axes (the
trailing axes that get their own Laplace scale and, at "channel" step
granularity, their own step), how calibrate reconstructs it, and which LiteRT
op holds it. Allocation, wrapping, calibration, LiteRT and the trainers' weight
decay all read it, so a kind added with `opq_tf.register_layer` is handled
everywhere or refused with a message that names what is missing.

| layer class            | weight              | channel axes | reconstruction | LiteRT            |
|------------------------|---------------------|--------------|----------------|-------------------|
| Dense                  | `kernel`            | (-1,)        | dense          | FULLY_CONNECTED   |
| Conv1D, Conv2D         | `kernel`            | (-1,)        | conv           | CONV_2D           |
| DepthwiseConv2D        | `depthwise_kernel`  | (-2, -1)     | depthwise      | DEPTHWISE_CONV_2D |
| SeparableConv2D        | `depthwise_kernel`  | (-2, -1)     | depthwise      | DEPTHWISE_CONV_2D |
|                        | `pointwise_kernel`  | (-1,)        | pointwise      | CONV_2D           |
| EinsumDense            | `kernel`            | its equation | einsum         | FULLY_CONNECTED   |

An EinsumDense kernel's channel axes are its dimensions that survive into the
output (`opq_tf.core.einsum.channel_axes`, as in the Keras 3 frontend):
"abc,cde->abde" (MultiHeadAttention's query projection) gives (-2, -1).

Kernels are also found in the sublayers of a layer (a MultiHeadAttention's
four EinsumDense projections, a custom block's Dense layers), keyed by the
attribute path that holds them ("mha/_query_dense/kernel", the key
`weight_key` and the Keras 3 frontend give them); `apply` wraps the layer of
the graph once for all of them.

Matching is by exact class: a Conv2DTranspose (a Conv2D subclass) or a user's
Dense subclass is *not* compressed unless registered with
`opq_tf.register_layer`. Biases, BatchNorm and every other weight stay FP32;
`fp32_kernels` lists the kernel-like weights left so, and why.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from opq_tf.tf_keras._keras import keras, tf
from opq_tf.core import einsum
from opq_tf.core.contract import Kernel
from opq_tf.core.grid import DEPTHWISE_CHANNELS, OUTPUT_CHANNEL

RECONSTRUCTIONS = ("dense", "conv", "depthwise", "pointwise", "einsum")
LITERT_OPS = ("fully_connected", "conv_2d", "depthwise_conv_2d")
# Weights that the trainers decay in layers outside the table (FP32 layers
# such as Conv2DTranspose or EinsumDense), by the Keras attribute convention.
DECAYED_WEIGHTS = ("kernel", "depthwise_kernel", "pointwise_kernel")


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """How one compressed weight of one layer kind is treated everywhere.

  reconstruction: how calibrate lays out the layer's inputs to reconstruct
    the kernel ("dense": flattened input; "conv": im2col patches; "depthwise":
    patches per input channel; "pointwise": a SeparableConv2D's depthwise
    output; "einsum": the input flattened over the dimensions the equation
    contracts), or None: the kernel keeps plain rounding, and the report says so.
  litert: the LiteRT op whose filter holds the codes, or None: LiteRT export
    refuses the model, naming the kind.
  channel_axes: None means "read off the layer's einsum equation"
    (EinsumDense); use `layers.channel_axes(layer, attr)`.
  """

  channel_axes: Optional[tuple[int, ...]]
  reconstruction: Optional[str]
  litert: Optional[str]
  weight_decay: bool = True


_DENSE = WeightRule(OUTPUT_CHANNEL, "dense", "fully_connected")
_CONV = WeightRule(OUTPUT_CHANNEL, "conv", "conv_2d")
_DEPTHWISE = WeightRule(DEPTHWISE_CHANNELS, "depthwise", "depthwise_conv_2d")
_POINTWISE = WeightRule(OUTPUT_CHANNEL, "pointwise", "conv_2d")
_EINSUM = WeightRule(None, "einsum", "fully_connected")

# layer class -> {compressed weight attribute: its rule}, in order.
KERNELS: dict[type, dict[str, WeightRule]] = {
    keras.layers.Conv1D: {"kernel": _CONV},
    keras.layers.Conv2D: {"kernel": _CONV},
    keras.layers.Dense: {"kernel": _DENSE},
    keras.layers.DepthwiseConv2D: {"depthwise_kernel": _DEPTHWISE},
    keras.layers.SeparableConv2D: {"depthwise_kernel": _DEPTHWISE,
                                   "pointwise_kernel": _POINTWISE},
    keras.layers.EinsumDense: {"kernel": _EINSUM},
}


def weight_attrs(layer: keras.layers.Layer) -> Optional[tuple[str, ...]]:
  """The compressed weight attributes of `layer`; None if not compressible."""
  table = KERNELS.get(type(layer))
  return tuple(table) if table is not None else None


def rule(layer_or_kind, attr: str) -> WeightRule:
  """The rule of weight `attr` of a compressible layer (or its class name).

  `attr` may be a path to a sublayer's weight ("_query_dense/kernel"): the
  rule is then the sublayer's.
  """
  if isinstance(layer_or_kind, str):
    for cls, table in KERNELS.items():
      if cls.__name__ == layer_or_kind and attr in table:
        return table[attr]
    raise KeyError(f"No compressed layer kind {layer_or_kind!r} with weight "
                   f"{attr!r} in the layer table.")
  owner, name = owner_of(layer_or_kind, attr)
  return KERNELS[type(owner)][name]


def channel_axes(layer: keras.layers.Layer, attr: str) -> tuple[int, ...]:
  """The channel axes of weight `attr` (or path) of a compressible `layer`."""
  owner, name = owner_of(layer, attr)
  axes = KERNELS[type(owner)][name].channel_axes
  return einsum.channel_axes(owner.equation) if axes is None else axes


def owner_of(layer: keras.layers.Layer, path: str
             ) -> tuple[keras.layers.Layer, str]:
  """(the layer that holds the weight, its attribute) for an attribute path.

  "kernel" -> (layer, "kernel"); "_query_dense/kernel" ->
  (layer._query_dense, "kernel"); a list attribute's item is its index
  ("blocks/0/kernel").

  Raises:
    ValueError: the path names no sublayer of `layer`.
  """
  *parts, name = path.split("/")
  owner = layer
  for part in parts:
    try:
      owner = (owner[int(part)] if isinstance(owner, (list, tuple))
               else getattr(owner, part))
    except (AttributeError, IndexError, ValueError):
      raise ValueError(
          f"Layer {layer.name!r} ({type(layer).__name__}) has no sublayer at "
          f"{path!r}; the plan was made for another model.") from None
  return owner, name


def decayed_weights(model: keras.Model) -> list[tf.Variable]:
  """The trainable weights the trainers decay, once each, in model order.

  A table kind's compressed weights with `weight_decay`, and in every other
  layer the weights named `DECAYED_WEIGHTS` (biases and BatchNorm are never
  decayed).
  """
  decayed, seen = [], set()
  for layer in iter_layers(model):
    # A tfmot wrapper decays what the layer it wraps would.
    table = KERNELS.get(type(getattr(layer, "layer", layer)))
    for variable in layer.trainable_weights:
      if id(variable) in seen:
        continue
      attr = weight_key(layer, variable).rsplit("/", 1)[-1]
      if (table[attr].weight_decay if table and attr in table
          else attr in DECAYED_WEIGHTS):
        seen.add(id(variable))
        decayed.append(variable)
  return decayed


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


def kernel_owners(layer: keras.layers.Layer
                  ) -> list[tuple[str, keras.layers.Layer]]:
  """(attribute path, layer) of every table-kind layer in `layer`, in order.

  ("", layer) if `layer` is a table kind itself; else its sublayers of a
  table kind, found through the attributes that hold them (as `weight_key`
  walks them) and not entered further: a MultiHeadAttention gives
  ("_query_dense", <EinsumDense>), ... ("_output_dense", <EinsumDense>).
  """
  if type(layer) in KERNELS:
    return [("", layer)]
  owners, seen = [], {id(layer)}

  def walk(trackable, path: str) -> None:
    for name, child in trackable._trackable_children().items():  # pylint: disable=protected-access
      if (id(child) in seen or isinstance(child, (tf.Variable, keras.Model))):
        continue
      seen.add(id(child))
      if isinstance(child, keras.layers.Layer) and type(child) in KERNELS:
        owners.append((path + name, child))
      else:
        walk(child, f"{path}{name}/")

  walk(layer, "")
  return owners


def kernel_attrs(layer: keras.layers.Layer) -> list[str]:
  """The attribute paths of `layer`'s compressible kernels, its sublayers'
  included: ["kernel"], or ["_query_dense/kernel", ...] for an attention."""
  return [f"{path}/{attr}" if path else attr
          for path, owner in kernel_owners(layer)
          for attr in KERNELS[type(owner)]]


def compressible_kernels(model: keras.Model) -> dict[str, Kernel]:
  """Maps `"<layer name>/<weight path>"` -> `Kernel` for every compressed weight.

  Args:
    model: a built tf_keras model; nested models are searched too (their layer
      names are used as they are, without a prefix), and so are the sublayers
      of its layers ("mha/_query_dense/kernel").

  Returns:
    One item per compressed weight, in model order.
  """
  kernels = {}
  for layer in iter_layers(model):
    for attr in kernel_attrs(layer):
      owner, name = owner_of(layer, attr)
      kernel = getattr(owner, name, None)
      if not isinstance(kernel, tf.Variable):
        raise ValueError(
            f"{type(owner).__name__} {layer.name}/{attr} is not built (no "
            "weight variable yet); call the model on a batch first.")
      kernels[f"{layer.name}/{attr}"] = Kernel(
          type(owner).__name__, np.asarray(kernel.numpy(), dtype=np.float32),
          channel_axes(layer, attr))
  return kernels


def fp32_kernels(model: keras.Model) -> dict[str, str]:
  """Kernel-like weights OPQ leaves FP32 -> why, for reports.

  Every weight named as a kernel (`DECAYED_WEIGHTS`) of a layer, or
  sublayer, whose class is not in the layer table, e.g.
  {"up/kernel": "Conv2DTranspose is not a compressed kind (register it with
  opq_tf.register_layer)"}; biases and normalisation weights are not listed.
  """
  compressed = {id(getattr(*owner_of(layer, attr)))
                for layer in iter_layers(model) for attr in kernel_attrs(layer)}
  reasons = {}
  for layer in iter_layers(model):
    for variable in layer.weights:
      key = weight_key(layer, variable)
      if (id(variable) in compressed
          or key.rsplit("/", 1)[-1] not in DECAYED_WEIGHTS):
        continue
      owner, _ = owner_of(layer, key.partition("/")[2])
      reasons[key] = (f"{type(owner).__name__} is not a compressed kind "
                      "(register it with opq_tf.register_layer)")
  return reasons
