"""`OPQLayerConfig`: which weights of one layer kind OPQ compresses, and how.

One config object per layer class, in the `CONFIGS` table, declares the
compressed weight attributes and their channel axes (the trailing axes that
index output channels: one Laplace scale each, and one step each at
"channel" granularity), as a tfmot `QuantizeConfig` does for tf_keras:

| layer class           | attribute                  | key weight         | channel axes      |
|-----------------------|----------------------------|--------------------|-------------------|
| Conv1D, Conv2D, Dense | `kernel`                   | `kernel`           | (-1,)             |
| DepthwiseConv2D       | `kernel`                   | `depthwise_kernel` | (-2, -1)          |
| SeparableConv2D       | `depthwise_kernel`         | `depthwise_kernel` | (-2, -1)          |
|                       | `pointwise_kernel`         | `pointwise_kernel` | (-1,)             |
| EinsumDense           | `kernel`                   | `kernel`           | its output dims   |

Keras 3's DepthwiseConv2D calls its kernel `kernel` where tf_keras says
`depthwise_kernel`; keys use tf_keras's name, so a plan and a packed file
mean the same kernel in both frontends. An EinsumDense kernel's channel axes
are its dimensions that survive into the output: "abc,cde->abde" (the query
projection of MultiHeadAttention) has kernel "cde" and output axes d, e, so
(-2, -1); "abcd,cde->abe" (its output projection) has (-1,). Output
dimensions that are not the kernel's trailing ones cannot carry a
broadcastable step, so such a kernel gets () (one scale, one step).

Matching is by exact class, as in tf_keras: a user's Dense subclass is not
compressed unless `register_layer` adds it. `OPQWrapper` (wrapper.py) uses a
config to read the variables (`get_weights`) and, during its call, to put the
compressed tensors where the layer's `call` reads them
(`substituted`: the instance attribute that holds the variable, e.g. Dense's
`_kernel` behind its `kernel` property).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence, Union

from opq_tf.core import einsum
from opq_tf.core import grid
from opq_tf.keras3._keras import keras


class OPQLayerConfig:
  """The compressed weights of one layer kind: attribute -> channel axes.

  ```python
  config = OPQLayerConfig({"kernel": (-1,)})
  layer = keras.layers.Dense(3)
  layer.build((None, 2))
  config.get_weights(layer)        # {"kernel": <Variable kernel (2, 3)>}
  with config.substituted(layer, {"kernel": keras.ops.zeros((2, 3))}):
    layer(keras.ops.ones((1, 2)))  # computed with the zero kernel
  ```
  """

  def __init__(self, weights: Mapping[str, Sequence[int]],
               names: Mapping[str, str] | None = None,
               like: type | None = None):
    """Constructs the config.

    Args:
      weights: attribute name -> channel axes (negative, trailing), in the
        order the kernels are listed.
      names: attribute -> the weight name used in keys, where it differs
        from the attribute (DepthwiseConv2D's "kernel" is "depthwise_kernel").
      like: the built-in kind whose function the layer computes on these
        weights (calibrate then reconstructs it as that kind); None for a
        built-in kind itself, or a kind calibrate keeps at plain rounding.
    """
    self.weights = {attr: _check_axes(attr, axes)
                    for attr, axes in weights.items()}
    self.names = dict(names or {})
    self.like = like

  def weight_attrs(self, layer: keras.layers.Layer) -> dict[str, tuple[int, ...]]:
    """attribute -> channel axes of `layer`'s compressed weights."""
    del layer
    return dict(self.weights)

  def weight_name(self, attr: str) -> str:
    """The weight's name in keys ("<layer path>/<name>")."""
    return self.names.get(attr, attr)

  def attr_of(self, name: str) -> str:
    """Inverse of `weight_name`."""
    for attr, alias in self.names.items():
      if alias == name:
        return attr
    return name

  def get_weights(self, layer: keras.layers.Layer) -> dict[str, Any]:
    """attribute -> the variable it holds, for every compressed weight.

    Raises:
      ValueError: an attribute is not a variable, e.g. the layer computes it
        (LoRA adds its low-rank update; Keras' own int8/int4 quantization
        stores integers).
    """
    variables = {}
    for attr in self.weight_attrs(layer):
      if getattr(layer, "quantization_mode", None):
        raise ValueError(
            f"Layer {layer.name!r} is already quantized by Keras "
            f"(quantization_mode={layer.quantization_mode!r}); OPQ compresses "
            "FP32 kernels: apply OPQ to the unquantized model instead.")
      if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer {layer.name!r} has LoRA enabled, so its `{attr}` is the "
            "kernel plus a low-rank update, not one variable; merge the LoRA "
            "weights into the kernel (rebuild the layer without lora_rank, "
            "kernel = kernel + lora update) before applying OPQ.")
      variable = getattr(layer, attr, None)
      if not isinstance(variable, keras.Variable):
        raise ValueError(
            f"{type(layer).__name__} {layer.name!r} has no weight variable "
            f"`{attr}` (got {type(variable).__name__}); build the layer first, "
            "or register the attribute that holds its kernel variable with "
            "opq_tf.register_layer.")
      variables[attr] = variable
    return variables

  @contextlib.contextmanager
  def substituted(self, layer: keras.layers.Layer,
                  tensors: Mapping[str, Any]) -> Iterator[None]:
    """Inside, `layer`'s `call` reads `tensors[attr]` instead of each variable.

    Sets the instance attributes that hold the variables (found by identity,
    e.g. `_kernel` behind Dense's `kernel` property) with `object.__setattr__`,
    so that Keras' tracking never sees the tensors, and puts the variables
    back on exit. Python-level, so it costs nothing inside a traced or
    jit-compiled step.
    """
    variables = self.get_weights(layer)
    replaced = []
    try:
      for attr, tensor in tensors.items():
        holders = [name for name, value in vars(layer).items()
                   if value is variables[attr]]
        if not holders:
          raise ValueError(
              f"{type(layer).__name__} {layer.name!r} does not hold its "
              f"`{attr}` variable in an attribute of its own, so OPQ cannot "
              "substitute the compressed kernel; register the attribute "
              "that holds it.")
        for name in holders:
          object.__setattr__(layer, name, tensor)
          replaced.append((name, variables[attr]))
      yield
    finally:
      for name, variable in replaced:
        object.__setattr__(layer, name, variable)

  def get_config(self) -> dict:
    return {"weights": {attr: list(axes) for attr, axes in self.weights.items()},
            "names": dict(self.names)}

  def __eq__(self, other) -> bool:
    return (type(other) is type(self)
            and self.get_config() == other.get_config())


class EinsumDenseConfig(OPQLayerConfig):
  """EinsumDense: the kernel's channel axes are read off the equation
  (`opq_tf.core.einsum.channel_axes`)."""

  def __init__(self):
    super().__init__({"kernel": grid.OUTPUT_CHANNEL})

  def weight_attrs(self, layer) -> dict[str, tuple[int, ...]]:
    return {"kernel": einsum.channel_axes(layer.equation)}


def _check_axes(attr: str, axes: Sequence[int]) -> tuple[int, ...]:
  axes = tuple(axes)
  if any(isinstance(a, bool) or not isinstance(a, int) for a in axes) or (
      axes != tuple(range(-len(axes), 0))):
    raise ValueError(
        f"Channel axes {axes} of weight {attr!r} must be the trailing axes as "
        "negative numbers: (-1,) or (-2, -1) (or () for one step per kernel).")
  return axes


# layer class -> its config; `register_layer` adds to it.
CONFIGS: dict[type, OPQLayerConfig] = {
    keras.layers.Conv1D: OPQLayerConfig({"kernel": grid.OUTPUT_CHANNEL}),
    keras.layers.Conv2D: OPQLayerConfig({"kernel": grid.OUTPUT_CHANNEL}),
    keras.layers.Dense: OPQLayerConfig({"kernel": grid.OUTPUT_CHANNEL}),
    keras.layers.DepthwiseConv2D: OPQLayerConfig(
        {"kernel": grid.DEPTHWISE_CHANNELS}, names={"kernel": "depthwise_kernel"}),
    keras.layers.SeparableConv2D: OPQLayerConfig(
        {"depthwise_kernel": grid.DEPTHWISE_CHANNELS,
         "pointwise_kernel": grid.OUTPUT_CHANNEL}),
    keras.layers.EinsumDense: EinsumDenseConfig(),
}


_REGISTERED: set[type] = set()  # the kinds register_layer added


def config_for(layer: keras.layers.Layer) -> OPQLayerConfig | None:
  """The config of `layer`'s exact class, or None if it is not compressed."""
  return CONFIGS.get(type(layer))


def register_layer(
    layer_class: type,
    weight_attrs: Union[Sequence[str], Mapping[str, Sequence[int]],
                        OPQLayerConfig],
    like: type | None = None,
) -> None:
  """Makes OPQ compress `weight_attrs` of every layer of exactly `layer_class`.

  Each attribute must hold a weight variable the layer creates in `build()`
  and reads back from that attribute (or a property over it) in `call()`,
  because the wrapper substitutes the compressed tensor there during the
  call.

  ```python
  class ScaledDense(keras.layers.Dense):
    ...

  opq_tf.register_layer(ScaledDense, ["kernel"])
  opq_tf.register_layer(MyDepthwise, {"taps": (-2, -1)})
  ```

  Args:
    layer_class: a `keras.layers.Layer` subclass (matched exactly).
    weight_attrs: names of the weight attributes to compress (each (-1,),
      except "depthwise_kernel": (-2, -1)), a mapping name -> channel axes,
      or an `OPQLayerConfig`.
    like: a built-in kind (e.g. `keras.layers.Dense`) whose function the
      layer computes on those weights, under the same attribute names:
      calibrate then reconstructs it as one. Without it the kind is
      compressed, finetuned and packed, and calibrate keeps its kernels at
      plain rounding, saying why.

  The class is also registered as Keras serializable under package "opq_tf"
  (unless it already is), so wrapped models holding it save and load.
  """
  if not (isinstance(layer_class, type)
          and issubclass(layer_class, keras.layers.Layer)):
    raise TypeError(
        "register_layer needs a keras.layers.Layer subclass, got "
        f"{layer_class!r}; pass the class itself, not an instance.")
  if isinstance(weight_attrs, OPQLayerConfig):
    config = weight_attrs
  else:
    if isinstance(weight_attrs, str) or not weight_attrs:
      raise ValueError(
          f"weight_attrs={weight_attrs!r} must be a non-empty list of "
          'attribute names, e.g. ["kernel"], or a mapping name -> channel '
          "axes.")
    if not isinstance(weight_attrs, Mapping):
      weight_attrs = {attr: grid.default_channel_axes(attr)
                      for attr in weight_attrs}
    for attr, axes in weight_attrs.items():
      if not tuple(axes):
        raise ValueError(
            f"Channel axes of {layer_class.__name__}.{attr} are empty; give "
            "the trailing output axes, e.g. (-1,).")
    config = OPQLayerConfig(weight_attrs)
  if like is not None:
    if like not in CONFIGS or like in _REGISTERED:
      raise ValueError(
          f"like={like!r} must be a built-in kind OPQ compresses: "
          f"{sorted(cls.__name__ for cls in CONFIGS if cls not in _REGISTERED)}.")
    config.like = like
  name = keras.saving.get_registered_name(layer_class)
  if (layer_class.__module__.split(".", 1)[0] != "keras"
      and keras.saving.get_registered_object(name) is None):
    keras.saving.register_keras_serializable(package="opq_tf")(layer_class)
  CONFIGS[layer_class] = config
  _REGISTERED.add(layer_class)
