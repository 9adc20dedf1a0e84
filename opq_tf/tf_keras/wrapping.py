"""`apply`: wrap a pre-trained model for OPQ finetuning; `strip`: undo it.

    plan = opq_tf.allocate(model, pruning_rate=0.9, bits=4)
    qmodel = opq_tf.apply(model, plan)      # an OPQQuantizeWrapper per layer
    qmodel.compile(...); qmodel.fit(...)    # masks and steps stay fixed
    plain = opq_tf.strip(qmodel)            # plain tf_keras, kernels compressed

Each planned layer of a copy of the model is wrapped in an
`OPQQuantizeWrapper` (tfmot's `QuantizeWrapperV2`, which also takes
several inputs and sublayers' kernels, as a MultiHeadAttention's) with the
`OPQQuantizeConfig` (one `OPQWeightQuantizer` per compressed kernel) that
`OPQQuantizeScheme`'s registry gives it; every other layer is left as it is.
This is what tfmot's `quantize_apply` does with that scheme, without its
one-input annotation wrapper. After wrapping, each quantizer's `mask` variable is set to
`|w| >= threshold` on the pre-trained weights and its `step` to the plan's
step; both are non-trainable and never recomputed.
"""

from typing import Optional

import numpy as np

from opq_tf.core import allocation
from opq_tf.core.contract import CompressedKernel
from opq_tf.tf_keras import flatten as flatten_lib
from opq_tf.core import grid
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras import scheme as scheme_lib
from opq_tf.tf_keras._keras import keras, tf, tfmot
from opq_tf.tf_keras.quantize_configs import OPQQuantizeConfig
from opq_tf.tf_keras.quantize_configs import OPQQuantizeWrapper

_tfmot_keras = tfmot.quantization.keras


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


def _split(key: str) -> tuple[str, str]:
  """"mha/_query_dense/kernel" -> ("mha", "_query_dense/kernel"): the layer of
  the graph and the kernel's attribute path in it."""
  name, _, attr = key.partition("/")
  return name, attr


def _configs_for(model: keras.Model, plan, quantize_activations: bool) -> dict:
  """Layer name -> OPQQuantizeConfig for every layer named in `plan`, from
  `OPQQuantizeScheme`'s registry."""
  by_name = {layer.name: layer for layer in layers_lib.iter_layers(model)}

  def matches(planned) -> bool:
    name, attr = _split(planned.key)
    if name not in by_name:
      return False
    try:
      weight = getattr(*layers_lib.owner_of(by_name[name], attr), None)
    except ValueError:
      return False
    return (isinstance(weight, tf.Variable)
            and tuple(weight.shape) == tuple(planned.shape))

  missing = [planned.key for planned in plan.kernels if not matches(planned)]
  if missing:
    raise ValueError(
        f"The plan names weights that are not in model {model.name!r} (or "
        f"have another shape there): {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}; make the plan with "
        "opq_tf.allocate on this model.")
  registry = scheme_lib.OPQQuantizeScheme(
      plan, quantize_activations).get_quantize_registry()
  return {name: registry.get_quantize_config(layer)
          for name, layer in by_name.items() if registry.planned(layer)}


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
    **allocate_options: passed to `opq_tf.allocate` (method, objective,
      step_granularity, step_stats, overrides).

  Returns:
    A Functional model of `OPQQuantizeWrapper`s (tfmot `QuantizeWrapperV2`s,
    for the planned layers) and copies of the other layers. Every mask and
    step is a variable of its wrapper, so a clone (with its weights copied),
    a checkpoint or a saved model keeps them; pass the plan to `export` to
    record it.
  """
  _check_model(model)
  if plan is None:
    if pruning_rate is None or bits is None:
      raise ValueError(
          "Without a plan, apply needs pruning_rate and bits, e.g. "
          "opq_tf.apply(model, pruning_rate=0.9, bits=4).")
    plan = allocation.allocate(layers_lib.compressible_kernels(model),
                               pruning_rate, bits, **allocate_options)
  elif pruning_rate is not None or bits is not None or allocate_options:
    raise ValueError(
        "Pass either a plan or pruning_rate/bits (and allocate options), not "
        "both: the plan already fixes every threshold and step.")
  if not plan.kernels:
    raise ValueError("The plan compresses no layer; nothing to apply. Check "
                     "the plan's overrides and that the model has kernels.")
  configs = _configs_for(model, plan, quantize_activations)

  def wrap(layer):
    if layer.name in configs:
      return OPQQuantizeWrapper(layer, configs[layer.name])
    return layer

  flat = flatten_lib.flatten(model)
  # Wrapping sets the quantized kernels on the layers it wraps: wrap the
  # layers of a copy (built, with the model's weights), never the model's.
  copy = keras.models.clone_model(flat)
  copy.set_weights(flat.get_weights())
  qmodel = keras.models.clone_model(copy, clone_function=wrap)

  plan_by_key = plan.by_key()
  for wrapper, attr, weight, _, variables in _opq_weights(qmodel):
    planned = plan_by_key[f"{wrapper.layer.name}/{attr}"]
    kernel = weight.numpy()
    mask = np.abs(kernel) >= planned.threshold
    variables["mask"].assign(mask.astype(np.float32))
    variables["step"].assign(planned.step_array())
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


def is_compressed(model: keras.Model) -> bool:
  """True if `model` holds at least one OPQ quantizer (a wrapped model)."""
  return next(_opq_weights(model), None) is not None


def compressed_kernels(model: keras.Model) -> list[CompressedKernel]:
  """Every OPQ-compressed kernel of a model returned by `apply`, in model order.

  Raises:
    ValueError: the model has no OPQ quantizer.
  """
  kernels = [
      CompressedKernel(
          key=f"{wrapper.layer.name}/{attr}",
          layer_name=f"{wrapper.layer.name}/{attr}".rpartition("/")[0],
          weight=attr.rpartition("/")[2],
          kind=type(layers_lib.owner_of(wrapper.layer, attr)[0]).__name__,
          kernel=np.asarray(weight.numpy(), np.float32),
          mask=variables["mask"].numpy() > 0,
          step=np.asarray(variables["step"].numpy(), np.float32),
          bits=quantizer.bits,
          threshold=quantizer.threshold,
          channel_axes=quantizer.channel_axes,
      )
      for wrapper, attr, weight, quantizer, variables in _opq_weights(model)
  ]
  if not kernels:
    raise ValueError(
        f"Model {model.name!r} has no OPQ quantizer: OPQ was never applied: "
        "call opq_tf.apply first."
    )
  return kernels


def strip(model: keras.Model) -> keras.Model:
  """Returns a plain tf_keras copy of a wrapped model with compressed kernels.

  Every tfmot wrapper is replaced by (a clone of) the layer it wraps, under the
  original layer name; compressed kernels hold `mask * q(w)`, every other weight
  is copied, matched by `layers.weight_key`. With FP32 activations it predicts
  what the wrapped model predicts.

  A plain model holds no mask or step: to calibrate it, pass
  `kernels=compressed_kernels(model)` of the wrapped one.
  """
  kernels = compressed_kernels(model)

  def unwrap(layer):
    if isinstance(layer, _tfmot_keras.QuantizeWrapper):
      layer = layer.layer
    return layer.__class__.from_config(layer.get_config())

  stripped = keras.models.clone_model(model, clone_function=unwrap)
  compressed = {kernel.key: kernel.compressed for kernel in kernels}
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    source = layer.layer if isinstance(
        layer, _tfmot_keras.QuantizeWrapper) else layer
    values = {layers_lib.weight_key(source, weight): weight
              for weight in _own_weights(layer)}
    if isinstance(layer, _tfmot_keras.QuantizeWrapper):
      # Detached kernels are known by their attribute (see _own_weights).
      for attr, (weight, _, _) in zip(layer.quantize_config.weight_attrs,
                                      layer._weight_vars):  # pylint: disable=protected-access
        values[f"{source.name}/{attr}"] = weight
    target = stripped.get_layer(source.name)
    keys = [layers_lib.weight_key(target, weight) for weight in target.weights]
    missing = [key for key in keys if key not in values]
    if missing:
      raise ValueError(
          f"strip cannot find the weights {missing} in layer {source.name!r} "
          "of the wrapped model; report this with the layer's class.")
    target.set_weights([
        compressed[key] if key in compressed else values[key].numpy()
        for key in keys
    ])
  return stripped


def _own_weights(layer) -> list:
  """The weights of a layer, or of the layer a tfmot wrapper wraps.

  tfmot's wrapper sets `layer.kernel = <quantized tensor>`, which drops the
  kernel variable from `wrapper.layer.weights`; it stays in `wrapper.weights`
  next to the wrapper's own variables (optimizer step, quantizer variables),
  which are left out here.
  """
  if not isinstance(layer, _tfmot_keras.QuantizeWrapper):
    return list(layer.weights)
  own = {id(layer.optimizer_step)}
  for _, _, variables in layer._weight_vars:  # pylint: disable=protected-access
    own.update(id(v) for v in variables.values())
  output_variables = getattr(layer, "_output_quantizer_vars", {})
  own.update(id(v) for v in output_variables.values())
  weights = []
  for weight in layer.weights:
    if id(weight) not in own:
      own.add(id(weight))
      weights.append(weight)
  return weights
