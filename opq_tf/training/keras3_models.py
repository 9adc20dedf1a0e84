"""The trainers' architectures as Keras 3 models, and their FP32 weights files.

    model = keras3_models.build_for_config(config)    # config.frontend="keras3"
    keras3_models.load_weights(model, config.pretrained)

The same names as `opq_tf.training.models` (whose checks of names, options
and preprocessing are reused): the built-ins small_resnet, alexnet,
mobilenet_v1 and resnet50 (the last two from `keras.applications`), any
`"applications.<Constructor>"` of keras.applications, and `"saved:<path>"`
(a full Keras 3 `.keras` model). Layer names are the tf_keras models', so a
plan keys the same kernels on both frontends. Inputs are float32 RGB in
[0, 255]; every model normalises its own input (or with `preprocessing`).

BatchNorm of small_resnet is synchronized across replicas on TensorFlow (as
the tf_keras one); on JAX the train step sees the global batch as one array,
so its statistics are the global batch's without asking.

Weights files: Keras 3 writes only `.weights.h5` (the name it requires), and
reads those, `.keras` files and tf_keras' legacy `.h5`. The trainers keep
FP32 weights at layout.FP32_WEIGHTS (`fp32/weights.h5`) for both frontends,
so `save_weights` renames Keras 3's file there and `load_weights` reads it
back under a `.weights.h5` link.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import Any

import h5py
import numpy as np

from opq_tf.core import files
from opq_tf.keras3._keras import keras, ops
from opq_tf.training import models as models_lib


@keras.saving.register_keras_serializable(package="opq_tf")
class ReverseChannels(keras.layers.Layer):
  """RGB <-> BGR: `x[..., ::-1]` (Keras' ResNet50 weights expect BGR input)."""

  def call(self, inputs):
    return ops.flip(inputs, axis=-1)


def _inputs(image_size: int):
  return keras.Input((image_size, image_size, 3), dtype="float32", name="images")


def preprocessing_layers(x, preprocessing: str):
  """0..255 RGB `x` -> what a model trained with `preprocessing` expects
  (the layers and names of models.preprocessing_layers)."""
  models_lib.check_preprocessing(preprocessing)
  if preprocessing == "tf":
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0,
                                  name="to_unit_range")(x)
  if preprocessing == "torch":
    return keras.layers.Normalization(
        mean=models_lib._IMAGENET_MEAN_RGB,  # pylint: disable=protected-access
        variance=np.square(models_lib._IMAGENET_STD_RGB),  # pylint: disable=protected-access
        name="torch_normalize")(x)
  if preprocessing == "caffe":
    x = ReverseChannels(name="rgb_to_bgr")(x)
    return keras.layers.Normalization(
        mean=models_lib._CAFFE_MEAN_BGR, variance=(1.0, 1.0, 1.0),  # pylint: disable=protected-access
        name="caffe_mean")(x)
  return x


def _conv_bn(x, filters: int, kernel_size: int, strides: int, name: str,
             relu: bool = True):
  x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same",
                          use_bias=False, kernel_initializer="he_normal",
                          name=f"{name}_conv")(x)
  # Keras 3 refuses synchronized=True off TensorFlow; see the module docstring.
  x = keras.layers.BatchNormalization(
      momentum=0.9, synchronized=keras.backend.backend() == "tensorflow",
      name=f"{name}_bn")(x)
  return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _small_resnet(num_classes: int, image_size: int) -> keras.Model:
  """models.small_resnet_backbone in Keras 3 (the same layers and names)."""
  inputs = _inputs(image_size)
  x = keras.layers.Rescaling(1.0 / 255.0, name="to_unit_range")(inputs)
  widths = (32, 64, 128)
  x = _conv_bn(x, widths[0], 3, 1, "stem")
  for stage, filters in enumerate(widths, start=1):
    name = f"stage{stage}"
    shortcut = _conv_bn(x, filters, 1, 2, f"{name}_proj", relu=False)
    y = _conv_bn(x, filters, 3, 2, f"{name}_a")
    y = _conv_bn(y, filters, 3, 1, f"{name}_b", relu=False)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    x = keras.layers.ReLU(name=f"{name}_out")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = keras.layers.Dense(num_classes, name="logits")(x)
  return keras.Model(inputs, outputs, name="small_resnet")


def _alexnet(num_classes: int, image_size: int) -> keras.Model:
  """models.alexnet_backbone in Keras 3 (the same layers and names)."""
  inputs = _inputs(image_size)
  x = preprocessing_layers(inputs, "torch")
  x = keras.layers.ZeroPadding2D(2, name="conv1_pad")(x)
  x = keras.layers.Conv2D(64, 11, strides=4, activation="relu", name="conv1")(x)
  x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)
  for name, filters, size in (("conv2", 192, 5), ("conv3", 384, 3),
                              ("conv4", 256, 3), ("conv5", 256, 3)):
    x = keras.layers.Conv2D(filters, size, padding="same", activation="relu",
                            name=name)(x)
    if name == "conv2":
      x = keras.layers.MaxPooling2D(3, strides=2, name="pool2")(x)
  x = keras.layers.MaxPooling2D(3, strides=2, name="pool5")(x)
  side = x.shape[1]
  if side % 6 == 0 and side > 6:
    x = keras.layers.AveragePooling2D(side // 6, name="avgpool")(x)
  elif side != 6:
    x = keras.layers.Resizing(6, 6, interpolation="area", name="avgpool")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  x = keras.layers.Dropout(0.5, name="drop6")(x)
  x = keras.layers.Dense(4096, activation="relu", name="fc6")(x)
  x = keras.layers.Dropout(0.5, name="drop7")(x)
  x = keras.layers.Dense(4096, activation="relu", name="fc7")(x)
  outputs = keras.layers.Dense(num_classes, name="fc8")(x)
  return keras.Model(inputs, outputs, name="alexnet")


def _application(constructor: str, options: dict[str, Any], num_classes: int,
                 image_size: int) -> keras.Model:
  """keras.applications.<constructor>(**options), untrained, logits out."""
  function = getattr(keras.applications, constructor, None)
  if function is None:
    raise ValueError(f"keras.applications has no {constructor!r}; use one of "
                     "its constructors, e.g. applications.MobileNet.")
  kwargs = dict(options, weights=None, classes=num_classes,
                input_shape=(image_size, image_size, 3))
  if "classifier_activation" in inspect.signature(function).parameters:
    kwargs.setdefault("classifier_activation", None)
  try:
    return function(**kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(
        f"keras.applications.{constructor} refused model_options={options} at "
        f"image_size={image_size}, num_classes={num_classes}: {error} Fix "
        "--config.model_options (or the image size).") from error


def _wrapped(backbone: keras.Model, image_size: int, preprocessing: str,
             name: str) -> keras.Model:
  inputs = _inputs(image_size)
  return keras.Model(inputs, backbone(preprocessing_layers(inputs,
                                                           preprocessing)),
                     name=name)


def _saved_model(path: str, num_classes: int, image_size: int) -> keras.Model:
  """A full Keras 3 model from a .keras file, checked to fit the config."""
  if not path.endswith(".keras") or not os.path.exists(path):
    raise ValueError(
        f"Saved model {path!r} is not an existing .keras file; on the keras3 "
        "frontend pass a full model saved with model.save('model.keras') as "
        "--config.model=saved:<path>.")
  model = keras.saving.load_model(path, compile=False)
  if tuple(model.input_shape[1:]) != (image_size, image_size, 3) or (
      model.output_shape[-1] != num_classes):
    raise ValueError(
        f"Saved model {path!r} maps {model.input_shape} to "
        f"{model.output_shape}, not ({image_size}, {image_size}, 3) images to "
        f"{num_classes} logits; set --config.image_size / --config.num_classes.")
  return model


def build(name: str, num_classes: int, image_size: int, *,
          model_options: str | dict = "{}",
          preprocessing: str = "none") -> keras.Model:
  """The Keras 3 counterpart of `models.build` (same arguments and names)."""
  models_lib.check_model_name(name)
  options = models_lib.parse_model_options(model_options)
  num_classes, image_size = int(num_classes), int(image_size)
  if name == "small_resnet":
    return _small_resnet(num_classes, image_size)
  if name == "alexnet":
    return _alexnet(num_classes, image_size)
  if name == "mobilenet_v1":
    backbone = _application("MobileNet", {"alpha": 1.0}, num_classes,
                            image_size)
    return _wrapped(backbone, image_size, "tf", "mobilenet_v1")
  if name == "resnet50":
    backbone = _application("ResNet50", {}, num_classes, image_size)
    return _wrapped(backbone, image_size, "caffe", "resnet50")
  if name.startswith(models_lib.APPLICATIONS_PREFIX):
    backbone = _application(name[len(models_lib.APPLICATIONS_PREFIX):],
                            options, num_classes, image_size)
  else:
    backbone = _saved_model(models_lib.saved_model_path(name), num_classes,
                            image_size)
  return _wrapped(backbone, image_size, preprocessing,
                  f"{backbone.name}_opq_input")


def build_for_config(config: Any) -> keras.Model:
  """`build` for a trainer config."""
  return build(config.model, config.num_classes, config.image_size,
               model_options=config.model_options,
               preprocessing=config.preprocessing)


def save_weights(model: keras.Model, path: str) -> None:
  """Writes Keras 3's weights file to `path` (any name), atomically."""
  with files.atomic_path(path) as temp:
    with tempfile.TemporaryDirectory(dir=os.path.dirname(temp)) as scratch:
      written = os.path.join(scratch, "model.weights.h5")  # the name it needs
      model.save_weights(written)
      os.replace(written, temp)


def load_weights(model: keras.Model, path: str) -> None:
  """Loads a `.keras`, `.weights.h5` or tf_keras legacy `.h5` file into model.

  Raises:
    ValueError: the file is missing or does not fit the model.
  """
  if not os.path.exists(path):
    raise ValueError(f"Weights file {path!r} does not exist; pass an existing "
                     ".keras, .weights.h5 or .h5 file as --config.pretrained.")
  try:
    if path.endswith((".keras", ".weights.h5")):
      model.load_weights(path)
      return
    with h5py.File(path, "r") as f:
      legacy = "layer_names" in f.attrs
    if legacy:  # tf_keras' own format: Keras 3 reads it by layer order.
      model.load_weights(path)
      return
    with tempfile.TemporaryDirectory() as temp:
      link = os.path.join(temp, "model.weights.h5")
      os.symlink(os.path.abspath(path), link)
      model.load_weights(link)
  except (ValueError, OSError, KeyError) as error:
    raise ValueError(
        f"Cannot load {path!r} into {model.name}: {error} Pass weights of the "
        "same architecture (config.model, num_classes, image_size).") from error
