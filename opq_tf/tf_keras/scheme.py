"""`OPQQuantizeScheme`: OPQ as a tfmot quantization scheme.

A tfmot scheme is the pair `quantize_apply` is built from: a layout
transformer (tfmot's default 8-bit scheme folds BatchNorm into convolutions
there) and a registry that gives each supported layer its QuantizeConfig.
OPQ's transformer leaves the model as it is (the kernels are compressed as
they were trained, BatchNorm stays a layer), and its registry is
`quantize_configs.OPQQuantizeRegistry`: the layer table read for one plan.
`opq_tf.apply` wraps every planned layer with the config this scheme's
registry gives it, so a kind added with `register_layer` is wrapped because
the registry supports it.

    scheme = OPQQuantizeScheme(plan)
    registry = scheme.get_quantize_registry()
    config = registry.get_quantize_config(model.get_layer("conv"))
"""

from opq_tf.tf_keras._keras import tfmot
from opq_tf.tf_keras.quantize_configs import OPQQuantizeRegistry

_tfmot_keras = tfmot.quantization.keras


class OPQLayoutTransform(_tfmot_keras.QuantizeLayoutTransform):
  """Leaves the model and its layer -> config map as they are: no BatchNorm
  folding, no input quantizers."""

  def apply(self, model, layer_quantize_map):
    return model, layer_quantize_map


class OPQQuantizeScheme(_tfmot_keras.QuantizeScheme):
  """No layout transforms, and the layer table's registry for `plan`."""

  def __init__(self, plan=None, quantize_activations: bool = False):
    self._registry = OPQQuantizeRegistry(plan, quantize_activations)

  def get_layout_transformer(self) -> OPQLayoutTransform:
    return OPQLayoutTransform()

  def get_quantize_registry(self) -> OPQQuantizeRegistry:
    return self._registry
