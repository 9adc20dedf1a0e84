"""`OPQQuantizeConfig`: which weights of a layer OPQ compresses, and how.

One config per planned layer holds one `OPQWeightQuantizer` per compressed
weight attribute (a SeparableConv2D has two). Activations stay FP32 unless
`quantize_activations=True`, which quantizes the layer's output to 8 bits with
tfmot's own `MovingAverageQuantizer` (asymmetric, per-tensor).

The layer kinds, their weight attributes and channel axes live in
`opq_tf.tf_keras.layers.KERNELS`, the layer table; `register_layer` adds a
user's layer class to it. `OPQQuantizeRegistry` is tfmot's view of that table
for one plan: which layers it supports and the config of each, what `apply`
wraps every layer with (through `opq_tf.tf_keras.scheme.OPQQuantizeScheme`).
"""

import dataclasses
import inspect
from typing import Mapping, Optional, Sequence, Union

from opq_tf.core import grid
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras._keras import keras, tfmot
from opq_tf.tf_keras.quantizers import OPQWeightQuantizer

_MovingAverageQuantizer = (
    tfmot.quantization.keras.quantizers.MovingAverageQuantizer)


def register_layer(
    layer_class: type,
    weight_attrs: Union[Sequence[str], Mapping[str, Sequence[int]]],
    like: Optional[type] = None,
) -> None:
  """Makes OPQ compress `weight_attrs` of every layer of exactly `layer_class`.

  Each attribute must name a weight variable the layer creates in `build()` and
  reads back from the same attribute in `call()` (as Keras' own `self.kernel`),
  because the tfmot wrapper substitutes the compressed tensor through it.

  Each weight's *channel axes* are the trailing axes that index the layer's
  output channels: the allocation fits one Laplace scale per channel, and
  "channel" step granularity stores one step per channel. Give them as a
  mapping attribute -> axes; a plain list of names means (-1,) each (the
  last axis, as a Dense or Conv2D kernel), except that a weight called
  "depthwise_kernel" gets (-2, -1) (in x multiplier, as DepthwiseConv2D).

  `like` names a built-in kind whose function the layer computes on those
  weights (e.g. `keras.layers.Dense` for a Dense with an extra scale): its
  reconstruction layout and LiteRT op then apply too. Without it the kind is
  compressed, decayed in training and packed, but calibrate keeps its kernels
  at plain rounding (saying so) and LiteRT export refuses it by name.

  The class is also registered as a Keras serializable under package `opq_tf`
  (unless it already is), so wrapped models containing it clone, save and load.

  ```python
  class ScaledDense(keras.layers.Dense):
    ...

  opq_tf.register_layer(ScaledDense, ["kernel"])
  opq_tf.register_layer(MyDepthwise, {"taps": (-2, -1)})
  qmodel = opq_tf.apply(model, pruning_rate=0.8, bits=4)
  ```

  Args:
    layer_class: a `keras.layers.Layer` subclass (matched exactly, not its
      subclasses).
    weight_attrs: names of the weight attributes to compress, or a mapping
      name -> channel axes (negative, trailing: (-1,) or (-2, -1)).
    like: optional built-in layer class of the table whose weights of the
      same names this layer's mirror.
  """
  if not (isinstance(layer_class, type)
          and issubclass(layer_class, keras.layers.Layer)):
    raise TypeError(
        "register_layer needs a keras.layers.Layer subclass, got "
        f"{layer_class!r}; pass the class itself, not an instance."
    )
  if isinstance(weight_attrs, str) or not weight_attrs:
    raise ValueError(
        f"weight_attrs={weight_attrs!r} must be a non-empty list of attribute "
        'names, e.g. ["kernel"], or a mapping name -> channel axes.'
    )
  if not isinstance(weight_attrs, Mapping):
    weight_attrs = {attr: grid.default_channel_axes(attr)
                    for attr in weight_attrs}
  table = {}
  for attr, axes in weight_attrs.items():
    axes = tuple(axes)
    if not axes or any(not isinstance(a, int) or a >= 0 for a in axes) or (
        axes != tuple(range(-len(axes), 0))):
      raise ValueError(
          f"Channel axes {axes} of {layer_class.__name__}.{attr} must be the "
          "trailing axes as negative numbers: (-1,) or (-2, -1).")
    table[attr] = layers_lib.WeightRule(axes, None, None)
  if like is not None:
    model_rules = layers_lib.KERNELS.get(like)
    missing = [attr for attr in table if attr not in (model_rules or {})]
    if missing:
      raise ValueError(
          f"like={getattr(like, '__name__', like)!r} has no compressed weight "
          f"{missing[0]!r}; pass a built-in kind with the same weight names "
          f"({', '.join(c.__name__ for c in layers_lib.KERNELS)}), or none.")
    table = {attr: dataclasses.replace(model_rules[attr],
                                       channel_axes=rule.channel_axes)
             for attr, rule in table.items()}
  if keras.utils.get_registered_object(
      keras.utils.get_registered_name(layer_class)) is None:
    keras.utils.register_keras_serializable(package="opq_tf")(layer_class)
  layers_lib.KERNELS[layer_class] = table


@keras.utils.register_keras_serializable(package="opq_tf")
class OPQQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
  """Compresses the named weights of one layer with `OPQWeightQuantizer`s.

  ```python
  config = OPQQuantizeConfig(
      {"kernel": OPQWeightQuantizer(bits=4, step=0.02, threshold=0.03)})
  annotated = tfmot.quantization.keras.quantize_annotate_layer(
      keras.layers.Dense(10), quantize_config=config)
  ```
  """

  def __init__(self, weight_quantizers: dict,
               quantize_activations: bool = False):
    """Constructs the config.

    Args:
      weight_quantizers: weight attribute name -> `OPQWeightQuantizer`, in the
        layer's attribute order.
      quantize_activations: also quantize the layer output to 8 bits (tfmot
        `MovingAverageQuantizer`, asymmetric, per-tensor).
    """
    self.weight_quantizers = dict(weight_quantizers)
    self.quantize_activations = bool(quantize_activations)

  @property
  def weight_attrs(self) -> tuple[str, ...]:
    return tuple(self.weight_quantizers)

  @property
  def nested(self) -> bool:
    """True if a compressed weight is a sublayer's ("_query_dense/kernel")."""
    return any("/" in attr for attr in self.weight_quantizers)

  def get_weights_and_quantizers(self, layer):
    return [(getattr(*layers_lib.owner_of(layer, attr)), quantizer)
            for attr, quantizer in self.weight_quantizers.items()]

  def set_quantize_weights(self, layer, quantize_weights):
    if len(quantize_weights) != len(self.weight_quantizers):
      raise ValueError(
          f"{layer.name}: got {len(quantize_weights)} quantized weights for "
          f"attributes {self.weight_attrs}."
      )
    for attr, weight in zip(self.weight_quantizers, quantize_weights):
      setattr(*layers_lib.owner_of(layer, attr), weight)

  def get_activations_and_quantizers(self, layer):
    return []

  def set_quantize_activations(self, layer, quantize_activations):
    pass

  def get_output_quantizers(self, layer):
    if not self.quantize_activations:
      return []
    return [_MovingAverageQuantizer(
        num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

  def get_config(self):
    return {
        "weight_quantizers": {
            attr: quantizer.get_config()
            for attr, quantizer in self.weight_quantizers.items()
        },
        "quantize_activations": self.quantize_activations,
    }

  @classmethod
  def from_config(cls, config):
    return cls(
        {attr: OPQWeightQuantizer.from_config(quantizer)
         for attr, quantizer in config["weight_quantizers"].items()},
        config.get("quantize_activations", False),
    )

  def __eq__(self, other):
    return (isinstance(other, OPQQuantizeConfig)
            and self.get_config() == other.get_config())

  def __ne__(self, other):
    return not self.__eq__(other)


class OPQQuantizeRegistry(tfmot.quantization.keras.QuantizeRegistry):
  """tfmot's registry over the layer table, for one `CompressionPlan`.

  A layer is supported when its class, or a sublayer's (a MultiHeadAttention's
  EinsumDense projections), is in `layers.KERNELS`: the built-in kinds and
  every kind `register_layer` added, so registering a kind is all it takes
  for `apply` to wrap it. Its config holds one `OPQWeightQuantizer` per
  kernel the plan gives it (by key, "<layer name>/<weight path>").

  ```python
  registry = OPQQuantizeRegistry(opq_tf.allocate(model, 0.5, 4))
  layer = model.get_layer("conv")
  registry.supports(layer)                 # True: Conv2D is in the table
  registry.get_quantize_config(layer)      # OPQQuantizeConfig({"kernel": ...})
  ```
  """

  def __init__(self, plan=None, quantize_activations: bool = False):
    """Constructs the registry.

    Args:
      plan: the `CompressionPlan` whose thresholds and steps the configs
        hold; without one, `supports` answers and `get_quantize_config`
        refuses.
      quantize_activations: the configs also quantize each wrapped layer's
        output to 8 bits.
    """
    self._planned = {}
    for planned in (plan.kernels if plan is not None else ()):
      name, _, attr = planned.key.partition("/")
      self._planned.setdefault(name, {})[attr] = planned
    self._quantize_activations = bool(quantize_activations)

  def supports(self, layer) -> bool:
    return bool(layers_lib.kernel_attrs(layer))

  def planned(self, layer) -> bool:
    """True if the plan compresses some kernel of `layer`."""
    return layer.name in self._planned

  def get_quantize_config(self, layer) -> "OPQQuantizeConfig":
    if not self.supports(layer):
      raise ValueError(
          f"Layer {layer.name!r} ({type(layer).__name__}) holds no kernel of "
          "a compressed kind; register its class with opq_tf.register_layer "
          "to compress it, or leave it out of the plan.")
    planned = self._planned.get(layer.name)
    if not planned:
      raise ValueError(
          f"The plan compresses no kernel of layer {layer.name!r}; make the "
          "plan with opq_tf.allocate on this model.")
    return OPQQuantizeConfig(
        {attr: OPQWeightQuantizer(kernel.bits, kernel.step, kernel.threshold,
                                  kernel.channel_axes)
         for attr, kernel in planned.items()},
        self._quantize_activations)


@keras.utils.register_keras_serializable(package="opq_tf")
class OPQQuantizeWrapper(tfmot.quantization.keras.QuantizeWrapperV2):
  """tfmot's `QuantizeWrapperV2` for every layer OPQ compresses.

  tfmot's wrapper assumes a layer with one input whose own attributes hold
  its kernels. This one also wraps a layer called with several inputs whose
  kernels are its sublayers' (a MultiHeadAttention, called as `mha(query,
  value)`, and its four EinsumDense projections): the inputs after the first
  reach the layer's `call` under their parameter names, the quantized
  kernels are set on the sublayers that hold them, and each kernel's mask and
  step variables are named after its attribute path ("_query_dense_kernel_
  mask"), not after the variable's last name ("kernel", four times).
  """

  def __call__(self, *args, **kwargs):
    if not self.built and not self._kernels_built():
      # A layer rebuilt from its config (a clone, a reloaded .h5) creates its
      # sublayers' kernels on its first call, which the wrapper's build needs.
      self.layer(*args, **kwargs)
    return super().__call__(*args, **kwargs)

  def _kernels_built(self) -> bool:
    try:
      self.quantize_config.get_weights_and_quantizers(self.layer)
    except AttributeError:
      return False
    return True

  def _weight_name(self, name):
    for attr, (weight, _) in zip(
        self.quantize_config.weight_attrs,
        self.quantize_config.get_weights_and_quantizers(self.layer)):
      if weight.name == name:
        return attr.replace("/", "_")
    return super()._weight_name(name)

  def call(self, inputs, *args, training=None, **kwargs):
    if args:
      names = [parameter for parameter in
               inspect.signature(self.layer.call).parameters][1:]
      kwargs.update(zip(names, args))
    return super().call(inputs, training=training, **kwargs)
