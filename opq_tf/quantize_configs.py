"""`OPQQuantizeConfig`: which weights of a layer OPQ compresses, and how.

One config per planned layer holds one `OPQWeightQuantizer` per compressed
weight attribute (a SeparableConv2D has two). Activations stay FP32 unless
`quantize_activations=True`, which quantizes the layer's output to 8 bits with
tfmot's own `MovingAverageQuantizer` (asymmetric, per-tensor).

The layer kinds and their weight attributes live in
`opq_tf.layers.WEIGHT_ATTRS`; `register_layer` adds a user's layer class to it.
"""

from typing import Sequence

from opq_tf import layers as layers_lib
from opq_tf._keras import keras, tfmot
from opq_tf.quantizers import OPQWeightQuantizer

_MovingAverageQuantizer = (
    tfmot.quantization.keras.quantizers.MovingAverageQuantizer)


def register_layer(layer_class: type, weight_attrs: Sequence[str]) -> None:
  """Makes OPQ compress `weight_attrs` of every layer of exactly `layer_class`.

  Each attribute must name a weight variable the layer creates in `build()` and
  reads back from the same attribute in `call()` (as Keras' own `self.kernel`),
  because the tfmot wrapper substitutes the compressed tensor through it.

  The allocation fits a Laplace scale per output channel: a weight called
  `"depthwise_kernel"` has its last two axes as channels (in x multiplier), any
  other weight its last axis.

  The class is also registered as a Keras serializable under package `opq_tf`
  (unless it already is), so wrapped models containing it clone, save and load.

  ```python
  class ScaledDense(keras.layers.Dense):
    ...

  opq_tf.register_layer(ScaledDense, ["kernel"])
  qmodel = opq_tf.apply(model, pruning_rate=0.8, bits=4)
  ```

  Args:
    layer_class: a `keras.layers.Layer` subclass (matched exactly, not its
      subclasses).
    weight_attrs: names of the weight attributes to compress.
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
        'names, e.g. ["kernel"].'
    )
  if keras.utils.get_registered_object(
      keras.utils.get_registered_name(layer_class)) is None:
    keras.utils.register_keras_serializable(package="opq_tf")(layer_class)
  layers_lib.WEIGHT_ATTRS[layer_class] = tuple(weight_attrs)


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

  def get_weights_and_quantizers(self, layer):
    return [(getattr(layer, attr), quantizer)
            for attr, quantizer in self.weight_quantizers.items()]

  def set_quantize_weights(self, layer, quantize_weights):
    if len(quantize_weights) != len(self.weight_quantizers):
      raise ValueError(
          f"{layer.name}: got {len(quantize_weights)} quantized weights for "
          f"attributes {self.weight_attrs}."
      )
    for attr, weight in zip(self.weight_quantizers, quantize_weights):
      setattr(layer, attr, weight)

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
