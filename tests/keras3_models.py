"""Tiny Keras 3 models and data for the keras3 tests, built on any backend.

Random weights, fixed seeds: a Conv+BN+depthwise+separable+Dense image model,
a nested Functional model, and a KerasHub-style transformer encoder built from
keras.layers (keras_hub is not a dependency): a registered `EncoderBlock`
layer holding MultiHeadAttention (EinsumDense projections), a Dense
feed-forward and LayerNormalization, so its kernels are sublayers of
sublayers.
"""

import numpy as np

import keras

IMAGE_SHAPE = (8, 8, 3)
SEQUENCE_SHAPE = (6, 8)  # tokens x width of the encoder's input embeddings


def conv_model(name: str = "conv_model") -> keras.Model:
  inputs = keras.Input(IMAGE_SHAPE, name="images")
  x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.ReLU(name="relu")(x)
  x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
  x = keras.layers.SeparableConv2D(8, 3, strides=2, name="separable")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = keras.layers.Dense(3, name="logits")(x)
  return keras.Model(inputs, outputs, name=name)


def nested_model() -> keras.Model:
  """Preprocessing -> a Functional backbone (a model in the model) -> head."""
  backbone_inputs = keras.Input(IMAGE_SHAPE)
  x = keras.layers.Conv2D(4, 3, strides=2, name="stem")(backbone_inputs)
  x = keras.layers.BatchNormalization(name="stem_bn")(x)
  x = keras.layers.Conv1D(4, 2, padding="causal", name="rows")(
      keras.layers.Reshape((9, 4), name="flatten_rows")(x))
  backbone = keras.Model(backbone_inputs, x, name="backbone")
  inputs = keras.Input(IMAGE_SHAPE)
  x = keras.layers.Rescaling(0.5, name="scale")(inputs)
  x = backbone(x)
  x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="head")(x),
                     name="nested")


@keras.saving.register_keras_serializable(package="opq_tf_tests")
class EncoderBlock(keras.layers.Layer):
  """A transformer encoder block as KerasHub writes one: post-norm attention
  and feed-forward, each with a residual."""

  def __init__(self, heads: int = 2, key_dim: int = 4, hidden: int = 16,
               **kwargs):
    super().__init__(**kwargs)
    self.heads, self.key_dim, self.hidden = heads, key_dim, hidden
    self.attention = keras.layers.MultiHeadAttention(heads, key_dim,
                                                     name="attention")
    self.attention_norm = keras.layers.LayerNormalization(name="attention_norm")
    self.intermediate = keras.layers.Dense(hidden, activation="gelu",
                                           name="intermediate")
    self.projection = None
    self.output_norm = keras.layers.LayerNormalization(name="output_norm")

  def build(self, input_shape):
    width = input_shape[-1]
    self.attention.build(input_shape, input_shape)
    self.attention_norm.build(input_shape)
    self.intermediate.build(input_shape)
    self.projection = keras.layers.EinsumDense("abc,cd->abd", (None, width),
                                               bias_axes="d", name="projection")
    self.projection.build(tuple(input_shape[:-1]) + (self.hidden,))
    self.output_norm.build(input_shape)

  def call(self, inputs):
    x = self.attention_norm(inputs + self.attention(inputs, inputs))
    return self.output_norm(x + self.projection(self.intermediate(x)))

  def get_config(self):
    return {**super().get_config(), "heads": self.heads,
            "key_dim": self.key_dim, "hidden": self.hidden}


def encoder_model() -> keras.Model:
  """Embeddings -> MultiHeadAttention (a graph layer) -> EncoderBlock -> head."""
  inputs = keras.Input(SEQUENCE_SHAPE, name="embeddings")
  x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
  x = keras.layers.LayerNormalization(name="norm")(x + inputs)
  x = EncoderBlock(name="block")(x)
  x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="head")(x),
                     name="encoder")


def randomize(model: keras.Model, seed: int = 0) -> keras.Model:
  """Gives every weight seeded random values (Laplace-like kernels, and
  BatchNorm statistics that are not the identity)."""
  random = np.random.RandomState(seed)
  for variable in model.weights:
    shape = tuple(variable.shape)
    name = variable.name
    if name == "moving_variance":
      value = random.uniform(0.5, 2.0, shape)
    elif name in ("gamma",):
      value = random.uniform(0.5, 1.5, shape)
    else:
      value = random.laplace(0, 0.2, shape)
    variable.assign(value.astype(variable.dtype))
  return model


def images(count: int = 64, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(
      -1, 1, (count,) + IMAGE_SHAPE).astype(np.float32)


def sequences(count: int = 64, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).normal(
      0, 1, (count,) + SEQUENCE_SHAPE).astype(np.float32)


def labels(count: int = 64, seed: int = 1) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 3, count).astype(np.int32)
