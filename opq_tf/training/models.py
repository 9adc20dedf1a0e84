"""The networks OPQ is run on, all taking float32 RGB images in [0, 255].

    model = models.build("resnet50", num_classes=1000, image_size=224)
    pretrained.load(model, "/ckpt/resnet50.weights.h5")   # opq_tf/training/pretrained.py

Every model starts with its own input normalisation, so the data pipeline,
the trainer and the exported serving signature all feed raw pixels:

| name         | normalisation (first layers)                | backbone                      |
|--------------|---------------------------------------------|-------------------------------|
| resnet50     | RGB->BGR, minus the ImageNet mean ("caffe") | tf_keras.applications.ResNet50 |
| mobilenet_v1 | x / 127.5 - 1 ("tf")                        | tf_keras.applications.MobileNet (alpha 1) |
| alexnet      | (x / 255 - mean) / std ("torch")            | `alexnet_backbone` below       |
| small_resnet | x / 255                                     | `small_resnet_backbone` below  |

The normalisations are the ones the Keras / torchvision ImageNet weights were
trained with, so `pretrained.load(model, "imagenet")` gives a working model.
Keras' backbones stay nested Functional submodels (`opq_tf.apply` inlines
them); every model outputs logits (no softmax).

Layer names are fixed (no Keras auto-numbering) so that weight files,
compression plans and packed files match across processes.

Any other tf_keras network goes through the same door (issue 8 §6), so the
trainers take the user's real model, not only these four:

    models.build("applications.MobileNet", 1000, 224,
                 model_options='{"alpha": 0.75}', preprocessing="tf")
    models.build("saved:/ckpt/my_model.keras", 10, 32, preprocessing="torch")

"applications.<Constructor>" calls that `tf_keras.applications` constructor
with `model_options` (a JSON object) plus weights=None, classes=num_classes,
input_shape=(image_size, image_size, 3) and, where it has one,
classifier_activation=None (logits). "saved:<path>" (or just an existing
path: a .keras / full-model .h5 file or a SavedModel directory) loads a full
tf_keras model with its weights. Either becomes a nested submodel behind
`preprocessing`, the input scaling it was trained with, as layers (see
PREPROCESSINGS), so that the pipeline still feeds 0..255 pixels and the
export still takes JPEG bytes.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Callable

import numpy as np

from opq_tf.tf_keras._keras import keras, tf

NAMES = ("resnet50", "mobilenet_v1", "alexnet", "small_resnet")
APPLICATIONS_PREFIX = "applications."
SAVED_PREFIX = "saved:"
# A user model's input scaling, as keras.applications.imagenet_utils
# .preprocess_input's modes: "none" = it takes 0..255 itself (the built-ins),
# "tf" = x / 127.5 - 1, "torch" = (x / 255 - mean) / std, "caffe" = RGB->BGR
# minus the ImageNet mean.
PREPROCESSINGS = ("none", "tf", "torch", "caffe")
# Keyword arguments build() sets itself for an applications constructor.
_OWN_OPTIONS = ("weights", "classes", "input_shape", "input_tensor")
# The smallest side `build` lets through for a user model; the model itself
# may need more (keras.applications then names its own minimum).
_MIN_USER_IMAGE_SIZE = 8

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


def min_image_size(name: str) -> int:
  """Smallest image_size `build(name, ...)` accepts (its own check for a user model)."""
  return MIN_IMAGE_SIZE.get(name, _MIN_USER_IMAGE_SIZE)


def saved_model_path(name: str) -> str | None:
  """The path of a saved-model `name` ("saved:<path>" or an existing path), else None.

  A bare path counts only if it exists and looks like a full model (a .keras
  or .h5 file, or a directory with saved_model.pb), so that a typo in a
  built-in or applications name is reported as such, not as a missing file.
  """
  if name.startswith(SAVED_PREFIX):
    return os.path.expanduser(name[len(SAVED_PREFIX):])
  path = os.path.expanduser(name)
  if os.path.isfile(path) and path.endswith((".keras", ".h5", ".hdf5")):
    return path
  if os.path.isfile(os.path.join(path, "saved_model.pb")):
    return path
  return None


def check_model_name(name: str) -> None:
  """Raises ValueError naming the fix unless `name` names a buildable model.

  Cheap (no model is built or loaded): a built-in name, an existing
  `tf_keras.applications` constructor, or an existing saved-model path.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"Unknown model {name!r}; " + _NAME_HELP)
  if name in NAMES:
    return
  if name.startswith(APPLICATIONS_PREFIX):
    constructor = name[len(APPLICATIONS_PREFIX):]
    if not callable(getattr(keras.applications, constructor, None)) or (
        not constructor[:1].isupper()):
      known = sorted(n for n in dir(keras.applications)
                     if n[:1].isupper() and callable(getattr(keras.applications, n)))
      raise ValueError(
          f"Unknown model {name!r}: tf_keras.applications has no constructor "
          f"{constructor!r}; use one of applications.{{{', '.join(known)}}}.")
    return
  path = saved_model_path(name)
  if path is None:
    raise ValueError(f"Unknown model {name!r}; " + _NAME_HELP)
  if not os.path.exists(path):
    raise ValueError(
        f"Model {name!r}: {path!r} does not exist; pass an existing full "
        "tf_keras model (.keras, full-model .h5 or a SavedModel directory) as "
        "--config.model=saved:<path>.")


_NAME_HELP = (
    f"use one of {NAMES}, 'applications.<Constructor>' (a tf_keras.applications "
    "constructor, e.g. applications.MobileNet, with --config.model_options="
    "'{\"alpha\": 0.75}'), or 'saved:<path>' (a full tf_keras model: .keras, "
    "full-model .h5 or SavedModel directory).")


def parse_model_options(model_options: str | dict) -> dict[str, Any]:
  """The keyword arguments of a JSON object string; ValueError naming the fix."""
  if isinstance(model_options, dict):
    return dict(model_options)
  try:
    options = json.loads(model_options or "{}")
  except (TypeError, ValueError) as error:
    raise ValueError(
        f"model_options {model_options!r} is not valid JSON ({error}); pass a "
        "JSON object, e.g. --config.model_options='{\"alpha\": 0.75}'.") from error
  if not isinstance(options, dict):
    raise ValueError(
        f"model_options {model_options!r} is not a JSON object; pass keyword "
        "arguments of the constructor, e.g. '{\"alpha\": 0.75}'.")
  own = sorted(set(options) & set(_OWN_OPTIONS))
  if own:
    raise ValueError(
        f"model_options sets {own}, which build() sets itself (weights=None, "
        "classes=num_classes, input_shape=(image_size, image_size, 3)); "
        "remove them (pretrained weights go in --config.pretrained).")
  return options


def check_preprocessing(preprocessing: str) -> None:
  if preprocessing not in PREPROCESSINGS:
    raise ValueError(
        f"Unknown preprocessing {preprocessing!r}; use one of {PREPROCESSINGS} "
        "(the input scaling the model was trained with, as keras.applications"
        ".imagenet_utils.preprocess_input's modes; 'none' = it takes 0..255).")


def _check_build_args(name: str, num_classes: int, image_size: int) -> None:
  check_model_name(name)
  for what, value, least in (("num_classes", num_classes, 2),
                             ("image_size", image_size, min_image_size(name))):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{what} must be an integer, got {value!r}.")
    if value < least:
      raise ValueError(
          f"{what}={value} is too small for {name}; it needs at least {least}.")


def build(name: str, num_classes: int, image_size: int, *,
          model_options: str | dict = "{}",
          preprocessing: str = "none") -> keras.Model:
  """Returns the named model for `image_size`^2 RGB inputs and `num_classes` logits.

  Args:
    name: one of NAMES, "applications.<Constructor>" or "saved:<path>" (or an
      existing .keras / .h5 / SavedModel path); see the module docstring.
    num_classes: number of output logits.
    image_size: input height = width (at least min_image_size(name)).
    model_options: JSON object (or dict) of keyword arguments for an
      applications constructor, e.g. '{"alpha": 0.75}'; must be empty
      otherwise.
    preprocessing: the input scaling a user model expects (PREPROCESSINGS);
      must be "none" for the built-ins, which normalise themselves.

  Returns:
    A built Functional tf_keras model, input float32
    [batch, image_size, image_size, 3] in [0, 255], output float32 logits
    [batch, num_classes]. Built-ins and applications are freshly initialised
    (weights=None; load weights with opq_tf.training.pretrained); a saved model keeps
    its weights.
  """
  _check_build_args(name, num_classes, image_size)
  check_preprocessing(preprocessing)
  options = parse_model_options(model_options)
  if name in NAMES:
    if options or preprocessing != "none":
      raise ValueError(
          f"{name} is a built-in model: it normalises its own input and takes "
          f"no options, but got model_options={options} and preprocessing="
          f"{preprocessing!r}; leave them at '{{}}' and 'none'.")
    return _BUILDERS[name](int(num_classes), int(image_size))
  if name.startswith(APPLICATIONS_PREFIX):
    user_model = _application(name[len(APPLICATIONS_PREFIX):], options,
                              int(num_classes), int(image_size))
  else:
    if options:
      raise ValueError(
          f"model_options={options} only apply to 'applications.<Constructor>' "
          f"models, not to the saved model {name!r}; leave them at '{{}}'.")
    user_model = _saved_model(saved_model_path(name), int(num_classes),
                              int(image_size))
  inputs = _inputs(int(image_size))
  x = preprocessing_layers(inputs, preprocessing)
  return keras.Model(inputs, user_model(x), name=f"{user_model.name}_opq_input")


def build_for_config(config: Any) -> keras.Model:
  """`build` for a trainer config (configs/*.py): its model, num_classes,
  image_size, model_options and preprocessing."""
  return build(config.model, config.num_classes, config.image_size,
               model_options=config.model_options,
               preprocessing=config.preprocessing)


def preprocessing_layers(x, preprocessing: str):
  """0..255 RGB `x` -> what a model trained with `preprocessing` expects.

  The same layers (and names) as the built-ins, so that weights files saved
  by the trainers match; all are constants, not trained.
  """
  check_preprocessing(preprocessing)
  if preprocessing == "tf":
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0,
                                  name="to_unit_range")(x)
  if preprocessing == "torch":
    return keras.layers.Normalization(
        mean=_IMAGENET_MEAN_RGB, variance=np.square(_IMAGENET_STD_RGB),
        name="torch_normalize")(x)
  if preprocessing == "caffe":
    x = ReverseChannels(name="rgb_to_bgr")(x)
    return keras.layers.Normalization(
        mean=_CAFFE_MEAN_BGR, variance=(1.0, 1.0, 1.0), name="caffe_mean")(x)
  return x


def _application(constructor: str, options: dict[str, Any], num_classes: int,
                 image_size: int) -> keras.Model:
  """tf_keras.applications.<constructor>(**options), untrained, logits out."""
  function = getattr(keras.applications, constructor)
  kwargs = dict(options, weights=None, classes=num_classes,
                input_shape=(image_size, image_size, 3))
  if "classifier_activation" in inspect.signature(function).parameters:
    kwargs.setdefault("classifier_activation", None)
  try:
    return function(**kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(
        f"tf_keras.applications.{constructor} refused model_options={options} "
        f"at image_size={image_size}, num_classes={num_classes}: {error} Fix "
        "--config.model_options (or the image size).") from error


def _saved_model(path: str, num_classes: int, image_size: int) -> keras.Model:
  """A full tf_keras model from `path`, checked to fit image_size and num_classes."""
  if not os.path.exists(path):
    raise ValueError(
        f"Saved model {path!r} does not exist; pass an existing .keras, "
        "full-model .h5 or SavedModel directory as --config.model=saved:<path>.")
  try:
    model = keras.models.load_model(path, compile=False)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        f"{path!r} is not a full tf_keras model ({error}); save the whole "
        "model with model.save('model.keras') (a weights-only file goes in "
        "--config.pretrained with a built-in or applications model).") from error
  if not isinstance(model, keras.Model) or not hasattr(model, "input_shape"):
    raise ValueError(f"{path!r} did not load as a tf_keras Model; save it with "
                     "tf_keras' model.save().")
  wanted_input = (image_size, image_size, 3)
  input_shape = tuple(model.input_shape[1:])
  if len(input_shape) != 3 or any(
      have is not None and have != want
      for have, want in zip(input_shape, wanted_input)):
    raise ValueError(
        f"Saved model {path!r} takes inputs {input_shape}, not {wanted_input}; "
        f"set --config.image_size to its size.")
  if model.output_shape[-1] != num_classes:
    raise ValueError(
        f"Saved model {path!r} has {model.output_shape[-1]} outputs, not "
        f"num_classes={num_classes}; set --config.num_classes="
        f"{model.output_shape[-1]}.")
  last = model.layers[-1]
  if getattr(getattr(last, "activation", None), "__name__", "") == "softmax":
    raise ValueError(
        f"Saved model {path!r} ends in a softmax ({last.name!r}), but the "
        "trainers need logits; save it with the last layer's activation "
        "removed (e.g. classifier_activation=None).")
  return model


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
