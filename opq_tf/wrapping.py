"""`apply`: wrap a pre-trained model for OPQ finetuning; `strip`: undo it.

    plan = opq_tf.allocate(model, pruning_rate=0.9, bits=4)
    qmodel = opq_tf.apply(model, plan)      # tfmot QuantizeWrapperV2 per layer
    qmodel.compile(...); qmodel.fit(...)    # masks and steps stay fixed
    plain = opq_tf.strip(qmodel)            # plain tf_keras, kernels compressed

Each planned layer is wrapped by tfmot's `quantize_apply` with an
`OPQQuantizeConfig` (one `OPQWeightQuantizer` per compressed kernel); every
other layer is left as it is. After wrapping, each quantizer's `mask` variable
is set to `|w| >= threshold` on the pre-trained weights and its `step` to the
plan's step; both are non-trainable and never recomputed.
"""

import dataclasses
from typing import Optional

import numpy as np

from opq_tf import allocation
from opq_tf import flatten as flatten_lib
from opq_tf import layers as layers_lib
from opq_tf._keras import keras, tf, tfmot
from opq_tf.quantize_configs import OPQQuantizeConfig
from opq_tf.quantizers import OPQWeightQuantizer
from opq_tf.scheme import OPQQuantizeScheme

_tfmot_keras = tfmot.quantization.keras


@dataclasses.dataclass(frozen=True)
class CompressedEntry:
  """One compressed kernel of a wrapped model, read back from its variables.

  `kernel` is the latent FP32 kernel; the compressed kernel is
  `mask * step * clip(round(kernel / step), -K, K)`, K = 2**(bits-1) - 1.
  """

  key: str
  layer_name: str
  weight: str
  kind: str
  kernel: np.ndarray
  mask: np.ndarray
  step: float
  bits: int
  threshold: float

  @property
  def codes(self) -> np.ndarray:
    """Integer codes in [-K, K], 0 where pruned (int32, kernel shape)."""
    max_code = 2 ** (self.bits - 1) - 1
    step = np.float32(self.step)
    codes = np.clip(np.round(self.kernel / step), -max_code, max_code)
    return (codes * self.mask).astype(np.int32)

  @property
  def compressed(self) -> np.ndarray:
    """mask * step * codes (float32): the kernel the wrapped model uses."""
    return self.codes.astype(np.float32) * np.float32(self.step)


def _check_model(model) -> None:
  if not isinstance(model, keras.Model):
    raise TypeError(
        f"apply needs a tf_keras Model, got {type(model).__name__}; build "
        "your network as keras.Sequential or a Functional keras.Model (tfmot "
        "does not support Keras 3 models: use tf_keras)."
    )
  if not flatten_lib.is_graph_model(model):
    raise TypeError(
        f"{type(model).__name__} is a subclassed keras.Model, which tfmot "
        "cannot wrap layer by layer; rebuild it as a Functional or Sequential "
        "model (subclassed layers inside it are fine), e.g. "
        "keras.Model(inputs, MyBlock()(inputs))."
    )
  if not model.built or not model.inputs:
    raise ValueError(
        f"Model {model.name!r} is not built; give it an input shape "
        "(keras.Input or input_shape=...) or call model.build(input_shape) "
        "first."
    )


def _configs_for(model: keras.Model, plan, quantize_activations: bool) -> dict:
  """Layer name -> OPQQuantizeConfig for every layer named in `plan`."""
  by_name = {layer.name: layer for layer in layers_lib.iter_layers(model)}

  def matches(entry) -> bool:
    weight = getattr(by_name.get(entry.name), entry.weight, None)
    return (isinstance(weight, tf.Variable)
            and tuple(weight.shape) == tuple(entry.shape))

  missing = [entry.key for entry in plan.layers if not matches(entry)]
  if missing:
    raise ValueError(
        f"The plan names weights that are not in model {model.name!r} (or "
        f"have another shape there): {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}; make the plan with "
        "opq_tf.allocate on this model.")
  quantizers = {}
  for entry in plan.layers:
    quantizers.setdefault(entry.name, {})[entry.weight] = OPQWeightQuantizer(
        entry.bits, entry.step, entry.threshold)
  return {name: OPQQuantizeConfig(by_weight, quantize_activations)
          for name, by_weight in quantizers.items()}


def apply(
    model: keras.Model,
    plan: Optional["allocation.CompressionPlan"] = None,
    *,
    pruning_rate: Optional[float] = None,
    bits: Optional[int] = None,
    quantize_activations: bool = False,
    **allocate_options,
) -> keras.Model:
  """Returns a copy of `model` whose planned kernels are pruned and quantized.

  Nested Functional/Sequential submodels are inlined (tfmot refuses them).
  Variables are created in the current `tf.distribute` strategy scope, if any.

  Args:
    model: a built Functional or Sequential tf_keras model with pre-trained
      weights (it is not modified).
    plan: a `CompressionPlan` for `model`; if None, it is computed with
      `opq_tf.allocate(model, pruning_rate, bits, **allocate_options)`.
    pruning_rate: target global pruning rate p (only without `plan`).
    bits: bit-width B (only without `plan`).
    quantize_activations: also quantize the outputs of the wrapped layers to
      8 bits (tfmot MovingAverageQuantizer); default FP32 activations.
    **allocate_options: passed to `opq_tf.allocate` (strategy, step_stats,
      overrides).

  Returns:
    A Functional model of tfmot `QuantizeWrapperV2`s (planned layers) and the
    original layers (the rest), with the plan as the attribute `opq_plan`.
  """
  _check_model(model)
  if plan is None:
    if pruning_rate is None or bits is None:
      raise ValueError(
          "Without a plan, apply needs pruning_rate and bits, e.g. "
          "opq_tf.apply(model, pruning_rate=0.9, bits=4).")
    plan = allocation.allocate(model, pruning_rate, bits, **allocate_options)
  elif pruning_rate is not None or bits is not None or allocate_options:
    raise ValueError(
        "Pass either a plan or pruning_rate/bits (and allocate options), not "
        "both: the plan already fixes every threshold and step.")
  if not plan.layers:
    raise ValueError("The plan compresses no layer; nothing to apply. Check "
                     "the plan's overrides and that the model has kernels.")
  configs = _configs_for(model, plan, quantize_activations)

  def annotate(layer):
    if layer.name in configs:
      return _tfmot_keras.quantize_annotate_layer(layer, configs[layer.name])
    return layer

  planned_classes = {type(layer).__name__: type(layer)
                     for layer in layers_lib.iter_layers(model)
                     if layer.name in configs}
  with _tfmot_keras.quantize_scope(planned_classes):
    annotated = flatten_lib.flatten(model, replace=annotate)
    qmodel = _tfmot_keras.quantize_apply(annotated, scheme=OPQQuantizeScheme())

  plan_by_key = plan.by_key()
  for wrapper, attr, weight, _, variables in _opq_weights(qmodel):
    entry = plan_by_key[f"{wrapper.layer.name}/{attr}"]
    kernel = weight.numpy()
    mask = np.abs(kernel) >= entry.threshold
    variables["mask"].assign(mask.astype(np.float32))
    variables["step"].assign(np.float32(entry.step))
  qmodel.opq_plan = plan
  return qmodel


def _opq_weights(model: keras.Model):
  """Yields (wrapper, attr, weight variable, quantizer, quantizer variables)."""
  for layer in layers_lib.iter_layers(model):
    if not (isinstance(layer, _tfmot_keras.QuantizeWrapper)
            and isinstance(layer.quantize_config, OPQQuantizeConfig)):
      continue
    for attr, (weight, quantizer, variables) in zip(
        layer.quantize_config.weight_attrs, layer._weight_vars):  # pylint: disable=protected-access
      yield layer, attr, weight, quantizer, variables


def compressed_entries(model: keras.Model) -> list[CompressedEntry]:
  """Every OPQ-compressed kernel of a model returned by `apply`, in model order.

  Raises:
    ValueError: the model has no OPQ quantizer.
  """
  entries = [
      CompressedEntry(
          key=f"{wrapper.layer.name}/{attr}",
          layer_name=wrapper.layer.name,
          weight=attr,
          kind=type(wrapper.layer).__name__,
          kernel=np.asarray(weight.numpy(), np.float32),
          mask=variables["mask"].numpy() > 0,
          step=float(variables["step"].numpy()),
          bits=quantizer.bits,
          threshold=quantizer.threshold,
      )
      for wrapper, attr, weight, quantizer, variables in _opq_weights(model)
  ]
  if not entries:
    raise ValueError(
        f"Model {model.name!r} has no OPQ quantizer: OPQ was never applied: "
        "call opq_tf.apply first."
    )
  return entries


def strip(model: keras.Model) -> keras.Model:
  """Returns a plain tf_keras copy of a wrapped model with compressed kernels.

  Every tfmot wrapper is replaced by (a clone of) the layer it wraps, under the
  original layer name; compressed kernels hold `mask * q(w)`, every other weight
  is copied. With FP32 activations it predicts what the wrapped model predicts.
  """
  compressed = {}
  for entry, (_, _, weight, _, _) in zip(compressed_entries(model),
                                         _opq_weights(model)):
    compressed[id(weight)] = entry.compressed

  def unwrap(layer):
    if isinstance(layer, _tfmot_keras.QuantizeWrapper):
      layer = layer.layer
    return layer.__class__.from_config(layer.get_config())

  stripped = keras.models.clone_model(model, clone_function=unwrap)
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    if isinstance(layer, _tfmot_keras.QuantizeWrapper):
      source, weights = layer.layer, _wrapped_layer_weights(layer)
    else:
      source, weights = layer, layer.weights
    values = {_short_name(w): compressed.get(id(w), w.numpy()) for w in weights}
    target = stripped.get_layer(source.name)
    target.set_weights([values[_short_name(w)] for w in target.weights])
  return stripped


def _short_name(variable) -> str:
  return variable.name.split("/")[-1]


def _wrapped_layer_weights(wrapper) -> list:
  """The wrapped layer's own variables (tfmot detaches reassigned kernels).

  tfmot's wrapper sets `layer.kernel = <quantized tensor>`, which drops the
  kernel variable from `wrapper.layer.weights`; it stays in `wrapper.weights`
  next to the wrapper's own variables (optimizer step, quantizer variables).
  """
  own = {id(wrapper.optimizer_step)}
  for _, _, variables in wrapper._weight_vars:  # pylint: disable=protected-access
    own.update(id(v) for v in variables.values())
  output_variables = getattr(wrapper, "_output_quantizer_vars", {})
  own.update(id(v) for v in output_variables.values())
  weights = []
  for weight in wrapper.weights:
    if id(weight) not in own:
      own.add(id(weight))
      weights.append(weight)
  return weights

