"""Inline nested Functional/Sequential submodels into one Functional graph.

tfmot wraps layers, not models, and refuses a model inside a model; yet many
real models nest one (`preprocessing -> keras.applications.MobileNet -> head`).
`flatten` rebuilds such a model as a single graph that calls the *same layer
objects* (so the same weights) in the same order, by replaying each model's
nodes (`model._nodes_by_depth`, as `Functional._run_internal_graph` does) on
symbolic tensors and descending into every node whose layer is itself a model.
"""

from typing import Callable, Optional

from opq_tf.tf_keras._keras import keras, tf


def is_graph_model(layer) -> bool:
  """True for a Functional or Sequential model (one with a layer graph)."""
  return isinstance(layer, keras.Model) and (
      isinstance(layer, keras.Sequential) or layer._is_graph_network  # pylint: disable=protected-access
  )


def _check_nested(model: keras.Model) -> bool:
  """True if `model` has a submodel; raises for ones that cannot be inlined."""
  nested = False
  for layer in model.layers:
    if not isinstance(layer, keras.Model):
      continue
    if not is_graph_model(layer) or not layer.built or not layer.inputs:
      raise TypeError(
          f"Nested model {layer.name!r} ({type(layer).__name__}) is subclassed "
          "or not built, so its layers cannot be inlined; rebuild it as a "
          "Functional or Sequential model with a known input shape."
      )
    _check_nested(layer)
    nested = True
  return nested


def _check_unique_names(model: keras.Model, owners: dict) -> None:
  """Raises if two different layers of the flattened graph share a name."""
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      _check_unique_names(layer, owners)
      continue
    if isinstance(layer, keras.layers.InputLayer):
      continue
    other = owners.setdefault(layer.name, (layer, model.name))
    if other[0] is not layer:
      raise ValueError(
          f"Layer name {layer.name!r} is used both in model {other[1]!r} and "
          f"in model {model.name!r}; flattening needs unique names. Rename one "
          "of the layers (or give the submodel's layers a prefix) first."
      )


def _replay(model: keras.Model, inputs: list, replace) -> list:
  """Calls `model`'s layers on `inputs` (a flat list); returns flat outputs."""
  usage = model._tensor_usage_count  # pylint: disable=protected-access
  tensors = {}
  for reference, tensor in zip(model.inputs, inputs):
    tensors[str(id(reference))] = [tensor] * usage[str(id(reference))]
  for depth in sorted(model._nodes_by_depth, reverse=True):  # pylint: disable=protected-access
    for node in model._nodes_by_depth[depth]:  # pylint: disable=protected-access
      if node.is_input or any(i not in tensors for i in node.flat_input_ids):
        continue
      args, kwargs = node.map_arguments(tensors)
      if is_graph_model(node.layer):
        outputs = _replay(node.layer, tf.nest.flatten(args[0]), replace)
      else:
        outputs = tf.nest.flatten(replace(node.layer)(*args, **kwargs))
      for output_id, output in zip(node.flat_output_ids, outputs):
        tensors[output_id] = [output] * usage[output_id]
  return [tensors[str(id(output))].pop() for output in model.outputs]


def flatten(
    model: keras.Model,
    replace: Optional[Callable[[keras.layers.Layer], keras.layers.Layer]] = None,
) -> keras.Model:
  """Returns `model` with every nested Functional/Sequential submodel inlined.

  The result shares its layer objects (and so its variables) with `model` and
  computes the same function; a model without submodels is returned as it is
  (unless `replace` is given).

  Args:
    model: a built Functional or Sequential tf_keras model.
    replace: optional layer -> layer called once per layer object, whose result
      is called in the layer's place (e.g. to wrap it, as tfmot's
      `quantize_annotate_layer`); layers are shared if it returns its argument.

  Returns:
    A Functional model with the same inputs and (nested) outputs whose layers
    are all non-model layers.

  Raises:
    TypeError: a (nested) model is subclassed.
    ValueError: two layers from different (sub)models share a name.
  """
  if not is_graph_model(model):
    raise TypeError(
        f"{type(model).__name__} is a subclassed model; rebuild it as a "
        "Functional or Sequential model (subclassed layers inside are fine)."
    )
  if not _check_nested(model) and replace is None:
    return model
  _check_unique_names(model, {})
  replaced = {}

  def replace_once(layer):
    if id(layer) not in replaced:
      replaced[id(layer)] = replace(layer) if replace else layer
    return replaced[id(layer)]

  outputs = _replay(model, model.inputs, replace_once)
  outputs = tf.nest.pack_sequence_as(model._nested_outputs, outputs)  # pylint: disable=protected-access
  return keras.Model(model._nested_inputs, outputs, name=model.name)  # pylint: disable=protected-access
