"""`OPQQuantizeScheme`: tfmot's `quantize_apply` with nothing but the plan.

tfmot's default 8-bit scheme folds BatchNorm into convolutions, inserts input
quantizers and quantizes the outputs of the layers feeding an annotated layer.
OPQ does none of that: the kernels are compressed as they were trained, and only
the layers of the plan are wrapped, each with its explicit `OPQQuantizeConfig`.

    qmodel = tfmot.quantization.keras.quantize_apply(
        annotated_model, scheme=OPQQuantizeScheme())
"""

from opq_tf.tf_keras._keras import tfmot

_tfmot_keras = tfmot.quantization.keras


class OPQLayoutTransform(_tfmot_keras.QuantizeLayoutTransform):
  """Leaves the model as it is: no BatchNorm folding, no input quantizers."""

  def apply(self, model, layer_quantize_map):
    return model, layer_quantize_map


class OPQQuantizeRegistry(_tfmot_keras.QuantizeRegistry):
  """Supports no layer: every planned layer arrives with its own config.

  `quantize_apply` asks the registry about the unannotated layers that feed an
  annotated one (to quantize their outputs); answering "not supported" keeps
  every layer outside the plan untouched and FP32.
  """

  def supports(self, layer) -> bool:
    return False

  def get_quantize_config(self, layer):
    raise ValueError(
        f"Layer {layer.name!r} is not in the OPQ plan; annotate it with an "
        "OPQQuantizeConfig (opq_tf.apply does) or leave it unannotated.")


class OPQQuantizeScheme(_tfmot_keras.QuantizeScheme):
  """No layout transforms and a registry that adds nothing to the plan."""

  def get_layout_transformer(self):
    return OPQLayoutTransform()

  def get_quantize_registry(self):
    return OPQQuantizeRegistry()
