"""Loading pre-trained FP32 weights into a model from opq_tf.training.models.

    model = models.build("resnet50", num_classes=1000, image_size=224)
    pretrained.load(model, "/ckpt/resnet50.h5")      # or "imagenet"

Every format a user is likely to hold is accepted (legacy and v3 HDF5,
TF checkpoints including the trainers' own, Keras SavedModels, Keras'
ImageNet weights), and every shape is checked before any weight is written,
so a mismatch names the layer and both shapes instead of half-loading.
`save` writes the trainer's FP32 weights file atomically.
"""

from __future__ import annotations

import os
from typing import Union

from opq_tf.core import files
from opq_tf.tf_keras._keras import keras, tf

# Keras' own ImageNet weights (downloaded by Keras on first use).
_KERAS_APPLICATIONS = {
    "resnet50": lambda: keras.applications.ResNet50(weights="imagenet"),
    "mobilenet_v1": lambda: keras.applications.MobileNet(weights="imagenet"),
}


def _leaf_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
  """Layer name -> layer for every non-model layer with weights, nested too."""
  leaves = {}
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      leaves.update(_leaf_layers(layer))
    elif layer.weights:
      leaves[layer.name] = layer
  return leaves


def _mismatch(source: str, mismatches: list) -> ValueError:
  """mismatches: [(layer name, weight name, shape in source, shape in model)]."""
  listed = "; ".join(
      f"layer {layer!r} weight {weight!r} has shape {tuple(source_shape)} there "
      f"but {tuple(model_shape)} in the model"
      for layer, weight, source_shape, model_shape in mismatches[:5])
  more = f" (and {len(mismatches) - 5} more)" if len(mismatches) > 5 else ""
  return ValueError(
      f"Pre-trained weights {source!r} do not fit the model: {listed}{more}. "
      "Pass weights trained for this model, num_classes and architecture (or "
      "change the config to match).")


def _copy_from_model(source_model: keras.Model, model: keras.Model,
                     source: str) -> None:
  """Copies every leaf layer's weights by layer name, checking all shapes first."""
  sources, targets = _leaf_layers(source_model), _leaf_layers(model)
  missing = sorted(set(targets) - set(sources))
  if missing:
    raise ValueError(
        f"Pre-trained weights {source!r} have no layers named {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}; pass weights of the same "
        "architecture (layer names must match).")
  mismatches = []
  for name, layer in targets.items():
    src_weights, dst_weights = sources[name].weights, layer.weights
    if len(src_weights) != len(dst_weights):
      raise ValueError(
          f"Pre-trained weights {source!r}: layer {name!r} has "
          f"{len(src_weights)} weights there but {len(dst_weights)} in the "
          "model; pass weights of the same architecture.")
    mismatches.extend((name, dst.name, src.shape, dst.shape)
                      for src, dst in zip(src_weights, dst_weights)
                      if tuple(src.shape) != tuple(dst.shape))
  if mismatches:
    raise _mismatch(source, mismatches)
  for name, layer in targets.items():
    layer.set_weights(sources[name].get_weights())


def _h5_weight_shapes(path: str) -> dict[str, list[tuple[str, tuple]]]:
  """Top-level layer name -> [(weight name, shape)] of a Keras 2 HDF5 file."""
  import h5py  # pylint: disable=g-import-not-at-top

  def text(value):
    return value.decode("utf8") if isinstance(value, bytes) else str(value)

  with h5py.File(path, "r") as f:
    group = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in group.attrs:
      raise ValueError(
          f"{path!r} is not a tf_keras (Keras 2) HDF5 weights file (no "
          "'layer_names'); save it with model.save_weights('x.weights.h5') "
          "from tf_keras.")
    shapes = {}
    for layer_name in map(text, group.attrs["layer_names"]):
      names = map(text, group[layer_name].attrs.get("weight_names", []))
      shapes[layer_name] = [(n, tuple(group[layer_name][n].shape)) for n in names]
    return shapes


def _nested_target(model: keras.Model,
                   shapes: dict[str, list[tuple[str, tuple]]]
                   ) -> keras.Model | None:
  """The one nested submodel a by-name HDF5 file was saved from, if any.

  A model from `models.build` wraps its backbone (e.g. a tf_keras.applications
  MobileNet) behind input-scaling layers; weights saved from the bare backbone
  (`MobileNet(...).save_weights("x.h5")`, Keras' own files) name its layers,
  not the wrapper's, so they load into that submodel. The wrapper's own
  layers are constants (the input scaling) and keep their values.
  """
  nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
  if len(nested) != 1 or nested[0].name in shapes:
    return None
  weighted = [layer.name for layer in nested[0].layers if layer.weights]
  if weighted and all(name in shapes for name in weighted):
    return nested[0]
  return None


def _load_h5(model: keras.Model, path: str) -> None:
  shapes = _h5_weight_shapes(path)
  target = _nested_target(model, shapes)
  if target is not None:
    _load_h5(target, path)
    return
  mismatches = []
  for layer in model.layers:
    weights = layer.trainable_weights + layer.non_trainable_weights
    if not weights:
      continue
    if layer.name not in shapes:
      raise ValueError(
          f"Pre-trained weights {path!r} have no layer {layer.name!r} (it has "
          f"{sorted(shapes)[:8]}); pass weights of the same architecture.")
    stored = shapes[layer.name]
    if len(stored) != len(weights):
      raise ValueError(
          f"Pre-trained weights {path!r}: layer {layer.name!r} has "
          f"{len(stored)} weights there but {len(weights)} in the model; pass "
          "weights of the same architecture.")
    for (stored_name, stored_shape), weight in zip(stored, weights):
      if stored_shape != tuple(weight.shape):
        leaf = stored_name.rsplit("/", 1)[0] if "/" in stored_name else layer.name
        mismatches.append((leaf, weight.name, stored_shape, weight.shape))
  if mismatches:
    raise _mismatch(path, mismatches)
  model.load_weights(path, by_name=True)


def _load_keras_v3(model: keras.Model, path: str) -> None:
  """A `.weights.h5` file (tf_keras' v3 format, matched by model structure).

  It is loaded into a scratch copy first, so a mismatch leaves `model` as it
  was; Keras' message names the variable (layer/weight) and both shapes.
  """
  scratch = keras.models.clone_model(model)
  try:
    scratch.load_weights(path)
  except (ValueError, KeyError) as error:
    raise ValueError(
        f"Pre-trained weights {path!r} do not fit the model {model.name!r}: "
        f"{error} Pass weights trained for this model, num_classes and "
        "architecture (or change the config to match).") from error
  model.set_weights(scratch.get_weights())


def _resolve(root, key: str):
  """The object an object-based checkpoint key names, or None."""
  node = root
  for part in key.split("/.ATTRIBUTES/")[0].split("/"):
    children = node._trackable_children()  # pylint: disable=protected-access
    if part not in children:
      return None
    node = children[part]
  return node


def _load_checkpoint(model: keras.Model, prefix: str) -> None:
  """Loads a TF checkpoint of `model` (save_weights) or of Checkpoint(model=)."""
  shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
  nested = any(key.startswith("model/") for key in shapes)
  root = tf.train.Checkpoint(model=model) if nested else model
  found, mismatches = {}, {}
  for key, shape in shapes.items():
    if not key.endswith("/.ATTRIBUTES/VARIABLE_VALUE"):
      continue
    if nested and not key.startswith("model/"):
      continue
    variable = _resolve(root, key)
    if not isinstance(variable, tf.Variable):
      continue
    found[id(variable)] = tuple(shape)
  for weight in model.weights:
    if id(weight) in found and found[id(weight)] != tuple(weight.shape):
      name = weight.name.rsplit(":", 1)[0]
      mismatches[name] = (name.rsplit("/", 1)[0], name, found[id(weight)],
                          weight.shape)
  if mismatches:
    raise _mismatch(prefix, list(mismatches.values()))
  missing = [w.name for w in model.weights if id(w) not in found]
  if missing:
    raise ValueError(
        f"Checkpoint {prefix!r} has no value for {len(missing)} model weights "
        f"(e.g. {missing[:3]}); pass a checkpoint of this architecture (a "
        "compressed model's finetuning checkpoint does not fit the FP32 model).")
  if nested:
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
  else:
    model.load_weights(prefix).expect_partial()


def check_imagenet_weights(name: str, num_classes: int, image_size: int) -> None:
  """Raises ValueError unless Keras has ImageNet weights for this model."""
  if name not in _KERAS_APPLICATIONS:
    raise ValueError(
        f"Keras has no ImageNet weights for {name!r} (only for "
        f"{sorted(_KERAS_APPLICATIONS)}); pass a weights file as --config.pretrained.")
  if (image_size, num_classes) != (224, 1000):
    raise ValueError(
        f"Keras' ImageNet weights for {name} need image_size 224 and 1000 "
        f"classes, not {image_size} and {num_classes}; set "
        "--config.image_size=224 --config.num_classes=1000.")


def _copy_from_saved(model: keras.Model, source: str, problem: str) -> None:
  """Copies a saved full Keras model's weights into `model` by layer name."""
  try:
    loaded = keras.models.load_model(source, compile=False)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        f"{source!r} {problem} ({error}); pass the FP32 weights as .h5 or a "
        "checkpoint instead.") from error
  _copy_from_model(loaded, model, source)


def load(model: keras.Model, path_or_imagenet: Union[str, os.PathLike]
         ) -> keras.Model:
  """Fills `model` (from `build`) with pre-trained FP32 weights, in place.

  Every shape is checked before any weight is written.

  Args:
    model: a model from `models.build`.
    path_or_imagenet: one of
      - a tf_keras HDF5 weights file: `.h5` / `.hdf5` (legacy format, also a
        whole model saved as `.h5`), matched by top-level layer name, or
        `.weights.h5` (Keras v3 format), matched by model structure;
      - a TF checkpoint prefix or a directory with a `checkpoint` file, from
        `model.save_weights(prefix)` or `tf.train.Checkpoint(model=model)`;
      - a Keras SavedModel directory or `.keras` file, matched by (nested)
        layer name;
      - a by-name HDF5 file of the nested backbone alone (e.g. saved from
        `tf_keras.applications.MobileNet(alpha=0.75)`), loaded into it;
      - "imagenet": Keras' own ImageNet weights (resnet50 and mobilenet_v1 at
        224x224 and 1000 classes; Keras downloads them, so this needs internet).

  Returns:
    `model`.

  Raises:
    ValueError: the source is missing or unreadable, or a weight shape does not
      match (the message names the layer and both shapes).
  """
  source = os.fspath(path_or_imagenet)
  if source == "imagenet":
    check_imagenet_weights(model.name, model.output_shape[-1],
                           model.input_shape[1])
    _copy_from_model(_KERAS_APPLICATIONS[model.name](), model, "imagenet")
    return model
  if not os.path.exists(source) and not os.path.exists(source + ".index"):
    raise ValueError(
        f"Pre-trained weights {source!r} do not exist; pass an existing .h5 "
        "file, checkpoint prefix or SavedModel directory, or 'imagenet'.")
  if os.path.isdir(source):
    if os.path.exists(os.path.join(source, "saved_model.pb")):
      _copy_from_saved(model, source, "is a SavedModel but not a Keras one")
      return model
    prefix = tf.train.latest_checkpoint(source)
    if prefix is None:
      raise ValueError(
          f"Directory {source!r} holds neither a SavedModel nor a TF checkpoint; "
          "pass a weights file, checkpoint prefix or SavedModel directory.")
    _load_checkpoint(model, prefix)
  elif source.endswith(".keras"):
    _copy_from_saved(model, source, "is not a readable Keras model")
  elif source.endswith(".weights.h5"):
    _load_keras_v3(model, source)
  elif source.endswith((".h5", ".hdf5")):
    _load_h5(model, source)
  elif os.path.exists(source + ".index"):
    _load_checkpoint(model, source)
  else:
    raise ValueError(
        f"Cannot tell the format of {source!r}; name HDF5 files *.h5 (e.g. "
        "model.weights.h5), or pass a checkpoint prefix or SavedModel directory.")
  return model


def save(model: keras.Model, path: Union[str, os.PathLike]) -> None:
  """Writes `model`'s weights to `path` as legacy (by layer name) HDF5, atomically.

  Legacy HDF5 because `load` matches it by layer name, which survives
  rebuilding the model in another process; written under a temporary name
  (hence the explicit save_format: the name no longer ends in .h5) and
  renamed, so a killed run never leaves a half-written weights file.
  """
  with files.atomic_path(path) as temp:
    model.save_weights(temp, save_format="h5")
