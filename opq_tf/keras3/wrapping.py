"""`apply`: wrap a pre-trained Keras 3 model for OPQ finetuning; `strip`: undo it.

    plan = opq_tf.allocate(model, pruning_rate=0.9, bits=4)
    qmodel = opq_tf.apply(model, plan)      # an OPQWrapper per planned layer
    qmodel.compile(..., jit_compile=True); qmodel.fit(...)  # masks/steps fixed
    plain = opq_tf.strip(qmodel)            # plain Keras 3, kernels compressed

`apply` copies the model with `keras.models.clone_model` (nested Functional
and Sequential models are copied in place, not flattened), putting each layer
that holds a planned kernel inside an `OPQWrapper`; every layer gets the
original's weights. Each wrapper's `mask` is then set to `|w| >= threshold`
on the pre-trained weights and its `step` to the plan's; both are
non-trainable and never recomputed.

A plan from the tf_keras frontend applies as well when its kernels are this
model's (same keys, shapes and channel axes): both frontends key kernels
alike (opq_tf/keras3/layers.py).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from opq_tf.core import allocation
from opq_tf.core.contract import CompressedKernel
from opq_tf.keras3 import layers as layers_lib
from opq_tf.keras3._keras import keras, tensorflow_not_probed
from opq_tf.keras3.quantizers import OPQWeightQuantizer
from opq_tf.keras3.wrapper import KernelSpec, OPQWrapper


def _check_model(model: Any, verb: str) -> None:
  layers_lib.check_keras_model(model, verb)
  if not layers_lib.is_graph_model(model):
    raise TypeError(
        f"{type(model).__name__} is a subclassed keras.Model: {verb} rebuilds "
        "a model layer by layer from its graph (keras.models.clone_model), "
        "which a subclassed model does not have. Rebuild it as a Functional "
        "model, keras.Model(inputs, outputs) (subclassed layers inside are "
        "fine), or compress it layer by layer, in place: plan = "
        "opq_tf.allocate(model, ...), then for each planned layer "
        "opq_tf.keras3.wrapping.replace_layer(parent, attribute, plan), e.g. "
        "replace_layer(model, 'head', plan); the model then finetunes with "
        "compressed kernels (strip, calibrate and export need a Functional "
        "model).")


def _check_plan(model: keras.Model, plan, sites: dict) -> None:
  """Raises naming the first planned kernel this model does not have alike."""
  for planned in plan.kernels:
    site = sites.get(planned.key)
    if site is None:
      listing = ", ".join(list(sites)[:5]) + (" ..." if len(sites) > 5 else "")
      raise ValueError(
          f"The plan's kernel {planned.key!r} is not in model {model.name!r}, "
          f"whose kernels are {listing}: the plan was made on another model. "
          "Make it with opq_tf.allocate on this model.")
    shape = tuple(site.variable.shape)
    if shape != tuple(planned.shape) or (
        tuple(site.channel_axes) != tuple(planned.channel_axes)):
      raise ValueError(
          f"The plan's kernel {planned.key!r} has shape {tuple(planned.shape)} "
          f"and channel axes {tuple(planned.channel_axes)}, but in model "
          f"{model.name!r} it has shape {shape} and channel axes "
          f"{tuple(site.channel_axes)}: the plan was made on another model. "
          "Make it with opq_tf.allocate on this model.")


def _copy_layer(layer: keras.layers.Layer, build: bool) -> keras.layers.Layer:
  """A fresh layer of the same class and config (weights copied later).

  `build`: build it now, from the shapes the original was built with (a
  wrapper needs its layer's kernels before its first call; a layer with
  several inputs, like MultiHeadAttention, cannot be built from one shape).
  """
  try:
    copy = layer.__class__.from_config(layer.get_config())
  except Exception as error:
    raise TypeError(
        f"Layer {layer.name!r} ({type(layer).__name__}) cannot be rebuilt from "
        f"its config ({type(error).__name__}: {error}); give the class a "
        "get_config() returning its constructor arguments (and register it "
        "with keras.saving.register_keras_serializable), so OPQ can copy it."
    ) from error
  build_config = layer.get_build_config() if layer.built else None
  if build and build_config:
    copy.build_from_config(build_config)
  return copy


def _clone(model: keras.Model, replace) -> keras.Model:
  """clone_model with `replace(layer) -> (new, target)` per non-model layer;
  afterwards every `target` gets its source layer's weights."""
  pairs = []

  def clone_function(layer):
    if not isinstance(layer, keras.layers.Layer):
      return layer  # an operation such as `x + y`: stateless, shared.
    new, target = replace(layer)
    pairs.append((layer, target))
    return new

  with tensorflow_not_probed():
    copy = keras.models.clone_model(model, clone_function=clone_function,
                                    recursive=True)
  for source, target in pairs:
    if isinstance(source, OPQWrapper):
      source = source.layer
    if source.weights:
      target.set_weights(source.get_weights())
  return copy


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

  Variables are created in the current `keras.distribution` scope, if any;
  each mask gets its kernel's layout.

  Args:
    model: a built Functional or Sequential Keras 3 model with pre-trained
      weights (it is not modified); nested models and layers with sublayers
      (MultiHeadAttention, custom blocks) are fine.
    plan: a `CompressionPlan` for `model` (or one made by the tf_keras
      frontend on the same kernels); if None, it is computed with
      `opq_tf.allocate(model, pruning_rate, bits, **allocate_options)`.
    pruning_rate: target global pruning rate p (only without `plan`).
    bits: bit-width B (only without `plan`).
    quantize_activations: not supported by the Keras 3 frontend (FP32
      activations, as the paper); True raises.
    **allocate_options: passed to `opq_tf.allocate`.

  Returns:
    A model of the same structure with an `OPQWrapper` in place of every
    layer that holds a planned kernel. Its masks and steps are variables of
    the wrappers; the plan is not stored on it (pass it to `export(plan=)`).
  """
  _check_model(model, "apply")
  if quantize_activations:
    raise NotImplementedError(
        "quantize_activations=True is only in the tf_keras frontend (tfmot's "
        "8-bit output quantizers); the Keras 3 frontend keeps activations FP32 "
        "(as OPQ does): drop the option.")
  if is_compressed(model):
    raise ValueError(
        f"Model {model.name!r} is already compressed (it has OPQWrapper "
        "layers); apply OPQ to the FP32 model, or opq_tf.strip this one first.")
  sites = layers_lib.kernel_sites(model)
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
  _check_plan(model, plan, sites)
  specs_by_top: dict[int, list[KernelSpec]] = {}
  for planned in plan.kernels:
    site = sites[planned.key]
    specs_by_top.setdefault(id(site.top), []).append(KernelSpec(
        site.sublayer, site.attr, planned.weight, tuple(planned.shape),
        OPQWeightQuantizer(planned.bits, planned.step, planned.threshold,
                           planned.channel_axes)))

  def replace(layer):
    specs = specs_by_top.get(id(layer))
    copy = _copy_layer(layer, build=specs is not None)
    if specs is None:
      return copy, copy
    return OPQWrapper(copy, specs), copy

  qmodel = _clone(model, replace)
  plan_by_key = plan.by_key()
  for entry in layers_lib.iter_layers(qmodel):
    if entry.wrapper is None:
      continue
    for spec, _, kernel, variables in entry.wrapper.kernels():
      planned = plan_by_key[f"{entry.path}/{spec.relative_key}"]
      mask = np.abs(kernel.numpy()) >= planned.threshold
      variables["mask"].assign(mask.astype(np.float32))
      variables["step"].assign(planned.step_array())
  return qmodel


def wrap_layer(layer: keras.layers.Layer, plan: "allocation.CompressionPlan",
               path: Optional[str] = None
               ) -> OPQWrapper:
  """An `OPQWrapper` around one built layer, sharing it (no copy).

  For models `apply` cannot copy (`replace_layer` puts it in the layer's
  place). The plan's kernels under `path` (default: the layer's name, as
  `allocate` keys the layers of a model) are compressed with masks from the
  layer's weights now; the layer's weights train as before.
  """
  path = layer.name if path is None else path
  sites = layers_lib.kernel_sites(layer)
  planned = [kernel for kernel in plan.kernels
             if kernel.key.startswith(f"{path}/")]
  if not planned:
    raise ValueError(
        f"The plan has no kernel under {path!r}; pass the layer's path in the "
        "model the plan was made on (path=...).")
  specs = []
  for kernel in planned:
    local = f"{layer.name}/{kernel.key[len(path) + 1:]}"
    site = sites.get(local)
    if site is None or tuple(site.variable.shape) != tuple(kernel.shape):
      raise ValueError(
          f"The plan's kernel {kernel.key!r} is not a kernel of layer "
          f"{layer.name!r} (or has another shape there).")
    specs.append(KernelSpec(site.sublayer, site.attr, kernel.weight,
                            tuple(kernel.shape), OPQWeightQuantizer(
                                kernel.bits, kernel.step, kernel.threshold,
                                kernel.channel_axes)))
  wrapper = OPQWrapper(layer, specs)
  wrapper.build()
  for (spec, _, variable, variables), kernel in zip(wrapper.kernels(), planned):
    variables["mask"].assign(
        (np.abs(variable.numpy()) >= kernel.threshold).astype(np.float32))
    variables["step"].assign(kernel.step_array())
  return wrapper


def replace_layer(parent: keras.layers.Layer, attr: str,
                  plan: "allocation.CompressionPlan",
                  path: Optional[str] = None) -> OPQWrapper:
  """Replaces `parent.<attr>` by `wrap_layer` of it, in place, once built.

  For subclassed models, whose layers `apply` cannot rebuild: the wrapper
  takes the layer's place in `parent`'s tracked sublayers (Keras refuses new
  sublayers once a layer is built, so the tracked one is swapped), and
  `parent`'s call reaches it through the attribute.

  ```python
  plan = opq_tf.allocate(model, pruning_rate=0.8, bits=4)
  replace_layer(model, "hidden", plan)
  replace_layer(model, "head", plan)
  ```
  """
  layer = getattr(parent, attr, None)
  if not isinstance(layer, keras.layers.Layer):
    raise ValueError(f"{parent.name!r}.{attr} is not a layer.")
  wrapper = wrap_layer(layer, plan, path)
  parent._tracker.replace_tracked_value("layers", layer, wrapper)  # pylint: disable=protected-access
  setattr(parent, attr, wrapper)
  return wrapper


def is_compressed(model: keras.Model) -> bool:
  """True if `model` holds at least one `OPQWrapper` (a wrapped model)."""
  return any(entry.wrapper is not None
             for entry in layers_lib.iter_layers(model))


def compressed_kernels(model: keras.Model) -> list[CompressedKernel]:
  """Every OPQ-compressed kernel of a model returned by `apply`, in model order.

  Raises:
    ValueError: the model has no OPQ wrapper.
  """
  kernels = []
  for entry in layers_lib.iter_layers(model):
    if entry.wrapper is None:
      continue
    for spec, owner, kernel, variables in entry.wrapper.kernels():
      key = f"{entry.path}/{spec.relative_key}"
      quantizer = spec.quantizer
      kernels.append(CompressedKernel(
          key=key, layer_name=key.rpartition("/")[0], weight=spec.name,
          kind=type(owner).__name__,
          kernel=np.asarray(kernel.numpy(), np.float32),
          mask=variables["mask"].numpy() > 0,
          step=np.asarray(variables["step"].numpy(), np.float32),
          bits=quantizer.bits, threshold=quantizer.threshold,
          channel_axes=quantizer.channel_axes))
  if not kernels:
    raise ValueError(
        f"Model {model.name!r} has no OPQ wrapper: OPQ was never applied: "
        "call opq_tf.apply first.")
  return kernels


def strip(model: keras.Model) -> keras.Model:
  """Returns a plain Keras 3 copy of a wrapped model with compressed kernels.

  Every `OPQWrapper` is replaced by a copy of the layer it wraps, under the
  layer's name; compressed kernels hold `mask * q(w)`, every other weight is
  copied. It predicts what the wrapped model predicts and needs nothing of
  opq_tf to load. To calibrate it, pass
  `kernels=compressed_kernels(model)` of the wrapped model (the masks,
  steps and FP32 kernels it no longer holds).
  """
  _check_model(model, "strip")
  kernels = compressed_kernels(model)

  def replace(layer):
    copy = _copy_layer(layer.layer if isinstance(layer, OPQWrapper) else layer,
                       build=False)
    return copy, copy

  stripped = _clone(model, replace)
  sites = layers_lib.kernel_sites(stripped)
  for kernel in kernels:
    sites[kernel.key].variable.assign(kernel.compressed)
  return stripped
