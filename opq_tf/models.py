"""The networks OPQ is run on, all taking float32 RGB images in [0, 255].

    model = models.build("resnet50", num_classes=1000, image_size=224)
    models.load_pretrained(model, "/ckpt/resnet50.weights.h5")   # or "imagenet"

Every model starts with its own input normalisation, so the data pipeline,
the trainer and the exported serving signature all feed raw pixels:

| name         | normalisation (first layers)                | backbone                      |
|--------------|---------------------------------------------|-------------------------------|
| resnet50     | RGB->BGR, minus the ImageNet mean ("caffe") | tf_keras.applications.ResNet50 |
| mobilenet_v1 | x / 127.5 - 1 ("tf")                        | tf_keras.applications.MobileNet (alpha 1) |
| alexnet      | (x / 255 - mean) / std ("torch")            | `alexnet_backbone` below       |
| small_resnet | x / 255                                     | `small_resnet_backbone` below  |

The normalisations are the ones the Keras / torchvision ImageNet weights were
trained with, so `load_pretrained(model, "imagenet")` gives a working model.
Keras' backbones stay nested Functional submodels (`opq_tf.apply` inlines
them); every model outputs logits (no softmax).

Layer names are fixed (no Keras auto-numbering) so that weight files,
compression plans and packed files match across processes.
"""

from __future__ import annotations

import os
from typing import Callable, Union

import numpy as np

from opq_tf._keras import keras, tf

NAMES = ("resnet50", "mobilenet_v1", "alexnet", "small_resnet")

# ImageNet channel statistics in [0, 255] units.
_IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # torchvision: 255 * (0.485, ...)
_IMAGENET_STD_RGB = (58.395, 57.12, 57.375)  # torchvision: 255 * (0.229, ...)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications "caffe" mode

# Smallest input side each model accepts (AlexNet's three 3x3/2 max pools need
# a 13x13 map after conv1 at 224; below 63 pixels the last pool is empty).
MIN_IMAGE_SIZE = {"resnet50": 32, "mobilenet_v1": 32, "alexnet": 63,
                  "small_resnet": 8}


@keras.utils.register_keras_serializable(package="opq_tf")
class ReverseChannels(keras.layers.Layer):
  """RGB <-> BGR: `x[..., ::-1]` (Keras' ResNet50 weights expect BGR input)."""

  def call(self, inputs):
    return tf.reverse(inputs, axis=[-1])


def _check_build_args(name: str, num_classes: int, image_size: int) -> None:
  if name not in NAMES:
    raise ValueError(f"Unknown model {name!r}; use one of {NAMES}.")
  for what, value, least in (("num_classes", num_classes, 2),
                             ("image_size", image_size, MIN_IMAGE_SIZE[name])):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{what} must be an integer, got {value!r}.")
    if value < least:
      raise ValueError(
          f"{what}={value} is too small for {name}; it needs at least {least}.")


def build(name: str, num_classes: int, image_size: int) -> keras.Model:
  """Returns the named model for `image_size`^2 RGB inputs and `num_classes` logits.

  Args:
    name: one of NAMES.
    num_classes: number of output logits.
    image_size: input height = width (at least MIN_IMAGE_SIZE[name]).

  Returns:
    A built Functional tf_keras model named `name`, input float32
    [batch, image_size, image_size, 3] in [0, 255], output float32 logits
    [batch, num_classes]. Weights are freshly initialised (weights=None).
  """
  _check_build_args(name, num_classes, image_size)
  return _BUILDERS[name](int(num_classes), int(image_size))


def _inputs(image_size: int) -> keras.layers.Layer:
  return keras.Input((image_size, image_size, 3), dtype="float32", name="images")


def _resnet50(num_classes: int, image_size: int) -> keras.Model:
  inputs = _inputs(image_size)
  x = ReverseChannels(name="rgb_to_bgr")(inputs)
  x = keras.layers.Normalization(mean=_CAFFE_MEAN_BGR, variance=(1.0, 1.0, 1.0),
                                 name="caffe_mean")(x)
  backbone = keras.applications.ResNet50(
      weights=None, input_shape=(image_size, image_size, 3),
      classes=num_classes, classifier_activation=None)
  return keras.Model(inputs, backbone(x), name="resnet50")


def _mobilenet_v1(num_classes: int, image_size: int) -> keras.Model:
  inputs = _inputs(image_size)
  x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
  backbone = keras.applications.MobileNet(
      weights=None, input_shape=(image_size, image_size, 3), alpha=1.0,
      classes=num_classes, classifier_activation=None)
  return keras.Model(inputs, backbone(x), name="mobilenet_v1")


def alexnet_backbone(x, num_classes: int):
  """torchvision's single-tower AlexNet (Krizhevsky 2014, "one weird trick").

  conv1 64 11x11/4 (pad 2) -> maxpool 3/2 -> conv2 192 5x5 -> maxpool 3/2 ->
  conv3 384, conv4 256, conv5 256 3x3 -> maxpool 3/2 -> average pool to 6x6 ->
  dropout 0.5 -> fc6 4096 -> dropout 0.5 -> fc7 4096 -> fc8 num_classes;
  ReLU after every conv and fc6/fc7. At 224x224 and 1000 classes it has
  61 100 840 parameters, as torchvision's. Differences from torchvision: the
  flatten order is HWC (Keras) instead of CHW, and the adaptive average pool
  is an identity at 224 (the map is already 6x6), an AveragePooling2D when the
  map is a multiple of 6, and an "area" resize otherwise.
  """
  relu = "relu"
  x = keras.layers.ZeroPadding2D(2, name="conv1_pad")(x)
  x = keras.layers.Conv2D(64, 11, strides=4, activation=relu, name="conv1")(x)
  x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)
  x = keras.layers.Conv2D(192, 5, padding="same", activation=relu, name="conv2")(x)
  x = keras.layers.MaxPooling2D(3, strides=2, name="pool2")(x)
  x = keras.layers.Conv2D(384, 3, padding="same", activation=relu, name="conv3")(x)
  x = keras.layers.Conv2D(256, 3, padding="same", activation=relu, name="conv4")(x)
  x = keras.layers.Conv2D(256, 3, padding="same", activation=relu, name="conv5")(x)
  x = keras.layers.MaxPooling2D(3, strides=2, name="pool5")(x)
  side = x.shape[1]
  if side % 6 == 0 and side > 6:
    x = keras.layers.AveragePooling2D(side // 6, name="avgpool")(x)
  elif side != 6:
    x = keras.layers.Resizing(6, 6, interpolation="area", name="avgpool")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  x = keras.layers.Dropout(0.5, name="drop6")(x)
  x = keras.layers.Dense(4096, activation=relu, name="fc6")(x)
  x = keras.layers.Dropout(0.5, name="drop7")(x)
  x = keras.layers.Dense(4096, activation=relu, name="fc7")(x)
  return keras.layers.Dense(num_classes, name="fc8")(x)


def _alexnet(num_classes: int, image_size: int) -> keras.Model:
  inputs = _inputs(image_size)
  x = keras.layers.Normalization(
      mean=_IMAGENET_MEAN_RGB, variance=np.square(_IMAGENET_STD_RGB),
      name="torch_normalize")(inputs)
  return keras.Model(inputs, alexnet_backbone(x, num_classes), name="alexnet")


def _conv_bn(x, filters: int, kernel_size: int, strides: int, name: str,
             relu: bool = True):
  x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same",
                          use_bias=False, kernel_initializer="he_normal",
                          name=f"{name}_conv")(x)
  # Synchronized: N replicas normalise with the statistics of the global
  # batch, so a MirroredStrategy run computes what one device computes.
  # Momentum 0.9 (Keras: 0.99): the moving statistics follow the compressed
  # kernels within ~30 steps of the short digits finetuning.
  x = keras.layers.BatchNormalization(momentum=0.9, synchronized=True,
                                      name=f"{name}_bn")(x)
  return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def small_resnet_backbone(x, num_classes: int, widths=(32, 64, 128)):
  """A ResNet-v1 with one basic block per stage, for 32x32 inputs.

  stem conv 3x3 32 -> 3 stages of one basic block (two 3x3 convs + projection
  shortcut, stride 2) with widths 32, 64, 128 -> global average pool -> dense.
  Spatial sides at 32x32 input: 32 -> 16 -> 8 -> 4. 308 320 kernel weights
  (11 compressible kernels) at 10 classes, ~13 M multiply-adds per image.
  """
  x = _conv_bn(x, widths[0], 3, 1, "stem")
  for stage, filters in enumerate(widths, start=1):
    name = f"stage{stage}"
    shortcut = _conv_bn(x, filters, 1, 2, f"{name}_proj", relu=False)
    y = _conv_bn(x, filters, 3, 2, f"{name}_a")
    y = _conv_bn(y, filters, 3, 1, f"{name}_b", relu=False)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    x = keras.layers.ReLU(name=f"{name}_out")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  return keras.layers.Dense(num_classes, name="logits")(x)


def _small_resnet(num_classes: int, image_size: int) -> keras.Model:
  inputs = _inputs(image_size)
  x = keras.layers.Rescaling(1.0 / 255.0, name="to_unit_range")(inputs)
  return keras.Model(inputs, small_resnet_backbone(x, num_classes),
                     name="small_resnet")


_BUILDERS: dict[str, Callable[[int, int], keras.Model]] = {
    "resnet50": _resnet50,
    "mobilenet_v1": _mobilenet_v1,
    "alexnet": _alexnet,
    "small_resnet": _small_resnet,
}

# Keras' own ImageNet weights (downloaded by Keras on first use).
_KERAS_APPLICATIONS = {
    "resnet50": lambda: keras.applications.ResNet50(weights="imagenet"),
    "mobilenet_v1": lambda: keras.applications.MobileNet(weights="imagenet"),
}


# --------------------------------------------------------------------------
# Pre-trained weights.


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


def _load_h5(model: keras.Model, path: str) -> None:
  shapes = _h5_weight_shapes(path)
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
        f"{sorted(_KERAS_APPLICATIONS)}); pass a weights file as --pretrained.")
  if (image_size, num_classes) != (224, 1000):
    raise ValueError(
        f"Keras' ImageNet weights for {name} need image_size 224 and 1000 "
        f"classes, not {image_size} and {num_classes}; set "
        "--config.image_size=224 --config.num_classes=1000.")


def load_pretrained(model: keras.Model, path_or_imagenet: Union[str, os.PathLike]
                    ) -> keras.Model:
  """Fills `model` (from `build`) with pre-trained FP32 weights, in place.

  Every shape is checked before any weight is written.

  Args:
    model: a model from `build`.
    path_or_imagenet: one of
      - a tf_keras HDF5 weights file: `.h5` / `.hdf5` (legacy format, also a
        whole model saved as `.h5`), matched by top-level layer name, or
        `.weights.h5` (Keras v3 format), matched by model structure;
      - a TF checkpoint prefix or a directory with a `checkpoint` file, from
        `model.save_weights(prefix)` or `tf.train.Checkpoint(model=model)`;
      - a Keras SavedModel directory, matched by (nested) layer name;
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
      try:
        loaded = keras.models.load_model(source, compile=False)
      except Exception as error:  # pylint: disable=broad-except
        raise ValueError(
            f"{source!r} is a SavedModel but not a Keras one ({error}); pass "
            "the FP32 weights as .h5 or a checkpoint instead.") from error
      _copy_from_model(loaded, model, source)
      return model
    prefix = tf.train.latest_checkpoint(source)
    if prefix is None:
      raise ValueError(
          f"Directory {source!r} holds neither a SavedModel nor a TF checkpoint; "
          "pass a weights file, checkpoint prefix or SavedModel directory.")
    _load_checkpoint(model, prefix)
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
