"""`OPQQuantizeScheme`: tfmot's `quantize_apply` with nothing but the plan.

tfmot's default 8-bit scheme folds BatchNorm into convolutions, inserts input
quantizers and quantizes the outputs of the layers feeding an annotated layer.
OPQ does none of that: the kernels are compressed as they were trained, and only
the layers of the plan are wrapped, each with its explicit `OPQQuantizeConfig`.

    qmodel = tfmot.quantization.keras.quantize_apply(
        annotated_model, scheme=OPQQuantizeScheme())
"""

from typing import Mapping, Optional

from opq_tf._keras import tfmot
from opq_tf.quantize_configs import OPQQuantizeConfig

_tfmot_keras = tfmot.quantization.keras


class OPQLayoutTransform(_tfmot_keras.QuantizeLayoutTransform):
  """Leaves the model as it is: no BatchNorm folding, no input quantizers."""

  def apply(self, model, layer_quantize_map):
    return model, layer_quantize_map


class OPQQuantizeRegistry(_tfmot_keras.QuantizeRegistry):
  """Knows only the configs it is given (by layer name); supports nothing else.

  `quantize_apply` asks the registry about the unannotated layers that feed an
  annotated one (to quantize their outputs); answering "not supported" keeps
  every layer outside the plan untouched and FP32.
  """

  def __init__(self, configs: Optional[Mapping[str, OPQQuantizeConfig]] = None):
    self._configs = dict(configs or {})

  def supports(self, layer) -> bool:
    return layer.name in self._configs

  def get_quantize_config(self, layer):
    if layer.name not in self._configs:
      raise ValueError(
          f"Layer {layer.name!r} is not in the OPQ plan; annotate it with an "
          "OPQQuantizeConfig (opq_tf.apply does) or leave it unannotated."
      )
    return self._configs[layer.name]


class OPQQuantizeScheme(_tfmot_keras.QuantizeScheme):
  """No layout transforms and a registry that knows only the plan's layers."""

  def __init__(self, configs: Optional[Mapping[str, OPQQuantizeConfig]] = None):
    self._configs = dict(configs or {})

  def get_layout_transformer(self):
    return OPQLayoutTransform()

  def get_quantize_registry(self):
    return OPQQuantizeRegistry(self._configs)
