"""Where a Keras 3 model's kernels are, and the one name of every weight.

A compressible *kernel* is one weight of one layer, keyed
`"<layer path>/<weight>"`, the same keys as the tf_keras frontend
(`opq_tf.tf_keras.layers.weight_key`), so a plan, a packed file and a report
mean the same kernel in both:

- a layer of the model (or of a Functional/Sequential model nested in it,
  whose layers keep their own names, as tf_keras flattens them) is its name:
  "conv1/kernel", "bn/moving_mean";
- a sublayer of a layer is the attribute path that holds it, as Keras'
  `.keras` format and TensorFlow checkpoints key it: a MultiHeadAttention's
  projections are "mha/_query_dense/kernel", ..., "mha/_output_dense/kernel"
  (a sublayer's automatic name, "dense_3", changes with every instance built
  in a process; its attribute does not);
- the weight is the variable's own name ("kernel", "bias", "gamma"), or
  the name the kind's `OPQLayerConfig` gives it (DepthwiseConv2D's "kernel"
  is "depthwise_kernel", tf_keras's name).

Which layer kinds are compressed, and their channel axes, is the table in
`quantize_configs.CONFIGS`; `register_layer` extends it. The walk goes through
`OPQWrapper`s as if they were the layer they wrap, so a wrapped model, its
stripped copy and the original name every kernel alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, NamedTuple

import numpy as np

from opq_tf.core.contract import Kernel
from opq_tf.keras3 import quantize_configs
from opq_tf.keras3._keras import keras

_KERAS_CONTAINERS = ("_layers",)  # Keras' own list of every tracked sublayer
_TORCH_MODULES = "_modules"  # torch.nn.Module's registry of submodules


@dataclasses.dataclass(frozen=True)
class Site:
  """One compressible kernel of a model and where it lives.

  `top` is the layer of a (nested) Functional/Sequential model that holds it
  (the unit `apply` wraps); `sublayer` is the owner's attribute path inside
  `top` ("" when `top` owns it), `attr` the owner's attribute holding the
  variable.
  """

  key: str
  top: keras.layers.Layer
  sublayer: str
  owner: keras.layers.Layer
  attr: str
  variable: Any
  channel_axes: tuple[int, ...]

  @property
  def kind(self) -> str:
    return type(self.owner).__name__


def is_graph_model(layer: Any) -> bool:
  """True for a Functional or Sequential model (one `clone_model` rebuilds)."""
  from keras.src.models.functional import Functional  # pylint: disable=g-import-not-at-top

  return isinstance(layer, (keras.Sequential, Functional))


def is_wrapper(layer: Any) -> bool:
  """True for an `OPQWrapper` (known by its class flag, so that this module
  need not import wrapper.py, which imports it)."""
  return getattr(type(layer), "opq_wrapper", False) is True


def _unwrapped(layer: keras.layers.Layer) -> keras.layers.Layer:
  return layer.layer if is_wrapper(layer) else layer


def children(layer: keras.layers.Layer) -> list[tuple[str, keras.layers.Layer]]:
  """(attribute path, sublayer) for the direct sublayers of a non-model layer.

  The path is the attribute holding the sublayer ("_query_dense"), or
  "<attribute>/<index or key>" inside a list or dict attribute; a sublayer
  held by no attribute of its own, or a layer of a model, is named by its
  name (as `iter_layers` names the layers of a model).
  """
  layer = _unwrapped(layer)
  direct = layer._flatten_layers(include_self=False, recursive=False)  # pylint: disable=protected-access
  if isinstance(layer, keras.Model):
    return [(child.name, child) for child in direct]
  attrs: dict[int, str] = {}
  for name, value in _attributes(layer):
    if isinstance(value, keras.layers.Layer):
      attrs.setdefault(id(value), name)
  for name, value in _attributes(layer):
    if name in _KERAS_CONTAINERS:
      continue
    if isinstance(value, (list, tuple)):
      items = enumerate(value)
    elif isinstance(value, dict):
      items = value.items()
    else:
      continue
    for index, item in items:
      if isinstance(item, keras.layers.Layer):
        attrs.setdefault(id(item), f"{name}/{index}")
  return [(attrs.get(id(child), child.name), child) for child in direct]


def _attributes(layer: keras.layers.Layer) -> Iterator[tuple[str, Any]]:
  """(name, value) of the layer's instance attributes.

  On the PyTorch backend a Keras layer is a `torch.nn.Module`, whose
  `__setattr__` keeps sublayers in its `_modules` dict, keyed by attribute
  name, instead of the instance's `__dict__`: they are yielded under their
  attribute names, so keys are the same on every backend.
  """
  for name, value in vars(layer).items():
    if name == _TORCH_MODULES and isinstance(value, dict):
      yield from value.items()
    else:
      yield name, value


def sublayer(layer: keras.layers.Layer, path: str) -> keras.layers.Layer:
  """The sublayer of `layer` at attribute path `path` ("" is `layer`)."""
  current = _unwrapped(layer)
  for part in [p for p in path.split("/") if p]:
    found = dict(children(current)).get(part)
    if found is None:
      raise ValueError(
          f"Layer {current.name!r} ({type(current).__name__}) has no sublayer "
          f"{part!r} (of path {path!r}); the model's structure differs from "
          "the one the plan or the wrapper was made for.")
    current = _unwrapped(found)
  return current


class Entry(NamedTuple):
  """One layer of a model as `iter_layers` finds it."""

  path: str
  layer: keras.layers.Layer  # the layer itself (a wrapper's inner layer)
  top: keras.layers.Layer  # the graph model's layer that contains it
  top_path: str
  wrapper: Any  # the OPQWrapper around `layer`, or None


def iter_layers(model: keras.layers.Layer) -> Iterator[Entry]:
  """Yields an `Entry` for every non-model layer, in model order.

  `model` may also be a single layer (with its sublayers).

  `top` is the layer of a graph model's `layers` that contains it (the unit
  `apply` wraps), at path `top_path`. Models inside are entered: the layers
  of a model in the model keep their own names, as tf_keras flattens them;
  those of a model inside a layer are "<path>/<name>". Each layer object is
  yielded once, and an `OPQWrapper` is entered as the layer it wraps.
  """
  seen: set[int] = set()

  def visit(path: str, layer, top, top_path: str):
    if id(layer) in seen:
      return
    seen.add(id(layer))
    inner = _unwrapped(layer)
    if isinstance(inner, keras.Model):
      for child in inner.layers:
        if top is None:
          yield from visit(child.name, child, None, "")
        else:
          yield from visit(f"{path}/{child.name}", child, top, top_path)
      return
    if isinstance(inner, keras.layers.InputLayer):
      return
    if top is None:
      top, top_path = layer, path
    yield Entry(path, inner, top, top_path,
                layer if layer is not inner else None)
    for name, child in children(inner):
      yield from visit(f"{path}/{name}", child, top, top_path)

  if isinstance(model, keras.Model):
    yield from visit("", model, None, "")
  else:  # one layer, named as it is
    yield from visit(model.name, model, None, "")


def weight_names(layer: keras.layers.Layer) -> dict[int, str]:
  """id(variable) -> the weight's name in `layer` (not its sublayers')."""
  config = quantize_configs.config_for(layer)
  names = {}
  if config is not None and layer.built:
    for attr in config.weight_attrs(layer):
      variable = getattr(layer, attr, None)
      if isinstance(variable, keras.Variable):
        names[id(variable)] = config.weight_name(attr)
  inner = set()
  for _, child in children(layer):
    inner.update(id(v) for v in child.weights)
  for variable in layer.weights:
    if id(variable) not in inner:
      names.setdefault(id(variable), variable.name)
  return names


def named_weights(model: keras.Model) -> dict[str, Any]:
  """Maps "<layer path>/<weight>" -> variable for every weight, in order.

  The wrappers' own mask and step variables are not weights of the
  architecture and are left out.

  Raises:
    ValueError: two weights get the same name.
  """
  named, seen = {}, set()
  for path, layer, *_ in iter_layers(model):
    for variable_id, name in weight_names(layer).items():
      if variable_id in seen:
        continue
      seen.add(variable_id)
      key = f"{path}/{name}"
      if key in named:
        raise ValueError(
            f"Two weights of model {model.name!r} are both named {key!r}; "
            "give its layers unique names (e.g. the layers of two nested "
            "models) so weights can be matched by name.")
      named[key] = next(v for v in layer.weights if id(v) == variable_id)
  return named


def kernel_sites(model: keras.layers.Layer) -> dict[str, Site]:
  """key -> `Site` for every compressible kernel of `model`, in model order.

  `model` may also be a single layer (keys then start with its name).

  Raises:
    ValueError: two kernels get the same key, or a kernel is not a variable
      (LoRA, Keras' own quantization).
  """
  sites: dict[str, Site] = {}
  for path, layer, top, top_path, _ in iter_layers(model):
    config = quantize_configs.config_for(layer)
    if config is None or not layer.built:
      continue
    variables = config.get_weights(layer)
    relative = path[len(top_path) + 1:]
    for attr, axes in config.weight_attrs(layer).items():
      key = f"{path}/{config.weight_name(attr)}"
      if key in sites:
        raise ValueError(
            f"Two kernels of model {model.name!r} are both named {key!r}; "
            "give the layers unique names first.")
      sites[key] = Site(key, top, relative, layer, attr, variables[attr], axes)
  return sites


def compressible_kernels(model: keras.Model) -> dict[str, Kernel]:
  """Maps "<layer path>/<weight>" -> `Kernel` for every compressed weight.

  Args:
    model: a built Keras 3 model (Functional, Sequential or subclassed);
      nested models and sublayers (MultiHeadAttention's projections, a
      custom block's Dense layers) are searched too.

  Raises:
    TypeError: not a Keras 3 model.
    ValueError: it has nothing to compress, or is not built.
  """
  check_keras_model(model, "allocate")
  sites = kernel_sites(model)
  if not sites:
    kinds = sorted({type(layer).__name__ for _, layer, *_ in iter_layers(model)})
    raise ValueError(
        f"Keras 3 model {model.name!r} has no compressible kernel: OPQ "
        "compresses Conv1D, Conv2D, DepthwiseConv2D, SeparableConv2D, Dense "
        "and EinsumDense layers (also inside MultiHeadAttention and custom "
        f"layers), and its layers are {kinds}. Register your own layer "
        "kind with opq_tf.register_layer(MyLayer, {'kernel': (-1,)}), or "
        "compress a model that has such layers.")
  return {key: Kernel(site.kind, np.asarray(site.variable.numpy(), np.float32),
                      site.channel_axes)
          for key, site in sites.items()}


def check_keras_model(model: Any, verb: str) -> None:
  if not isinstance(model, keras.Model):
    raise TypeError(
        f"{verb} needs a Keras 3 keras.Model, got {type(model).__name__}; "
        "build the network as keras.Sequential or a Functional keras.Model.")
  if not model.built:
    raise ValueError(
        f"Model {model.name!r} is not built, so it has no weights yet; give "
        "it an input shape (keras.Input) or call it on a batch first.")


# Weight names that mark a kernel in a layer OPQ does not compress, as in
# tf_keras (`opq_tf.tf_keras.layers.DECAYED_WEIGHTS`).
_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")


def fp32_kernels(model: keras.Model) -> dict[str, str]:
  """Kernel-like weights OPQ leaves FP32 -> why, for plans and reports.

  Every weight named as a kernel of a layer, or sublayer, whose kind is not
  in `quantize_configs.CONFIGS`, keyed as the tf_keras frontend keys it, e.g.
  {"up/kernel": "Conv2DTranspose is not a compressed kind (register it with
  opq_tf.register_layer)"}; biases and normalisation weights are not listed.
  """
  compressed = {id(site.variable) for site in kernel_sites(model).values()}
  reasons = {}
  for path, layer, *_ in iter_layers(model):
    for variable_id, name in weight_names(layer).items():
      if variable_id not in compressed and name in _KERNEL_NAMES:
        reasons[f"{path}/{name}"] = (
            f"{type(layer).__name__} is not a compressed kind (register it "
            "with opq_tf.register_layer)")
  return reasons
