"""Tests for opq_tf.tf_keras.layers: which kernels are compressible."""

from absl.testing import absltest
import numpy as np

from opq_tf.tf_keras import layers
from opq_tf.tf_keras._keras import keras, tf


def _model_with_every_kind() -> keras.Model:
  inputs = keras.Input((12, 12, 3))
  x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
  x = keras.layers.DepthwiseConv2D(3, name="depthwise")(x)
  x = keras.layers.SeparableConv2D(4, 3, name="separable")(x)
  x = keras.layers.Conv2DTranspose(4, 3, name="transpose")(x)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.Reshape((-1, 4), name="reshape")(x)
  x = keras.layers.Conv1D(3, 2, name="conv1d")(x)
  x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
  head_inputs = keras.Input((3,))
  head_outputs = keras.layers.Dense(2, name="dense")(head_inputs)
  head = keras.Model(head_inputs, head_outputs, name="head")
  return keras.Model(inputs, head(x))


class TwoDense(keras.layers.Layer):
  """Two same-shape Dense sublayers with automatic names."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.first = keras.layers.Dense(4)
    self.second = keras.layers.Dense(4)

  def call(self, inputs):
    return self.first(inputs) - self.second(inputs)


class LayersTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tf.random.set_seed(0)

  def test_compressible_kernels_keys_kinds_values(self):
    model = _model_with_every_kind()
    kernels = layers.compressible_kernels(model)
    self.assertEqual(list(kernels), [
        "conv/kernel", "depthwise/depthwise_kernel",
        "separable/depthwise_kernel", "separable/pointwise_kernel",
        "conv1d/kernel", "dense/kernel"])
    self.assertEqual(kernels["depthwise/depthwise_kernel"].kind,
                     "DepthwiseConv2D")
    self.assertEqual(kernels["dense/kernel"].kind, "Dense")
    dense = model.get_layer("head").get_layer("dense")
    np.testing.assert_array_equal(kernels["dense/kernel"].values,
                                  dense.kernel.numpy())
    self.assertEqual(kernels["separable/pointwise_kernel"].values.dtype,
                     np.float32)
    self.assertEqual(
        {key: kernel.channel_axes for key, kernel in kernels.items()},
        {"conv/kernel": (-1,), "depthwise/depthwise_kernel": (-2, -1),
         "separable/depthwise_kernel": (-2, -1),
         "separable/pointwise_kernel": (-1,), "conv1d/kernel": (-1,),
         "dense/kernel": (-1,)})

  def test_fp32_kernels_name_what_is_left_and_why(self):
    self.assertEqual(layers.fp32_kernels(_model_with_every_kind()), {
        "transpose/kernel": "Conv2DTranspose is not a compressed kind "
                            "(register it with opq_tf.register_layer)"})

  def test_attention_and_custom_block_sublayer_kernels(self):
    inputs = keras.Input((3, 4))
    x = keras.layers.MultiHeadAttention(2, 3, name="mha")(inputs, inputs)
    x = keras.layers.EinsumDense("abc,cd->abd", (None, 5), name="proj")(x)
    model = keras.Model(inputs, TwoDense(name="two")(x))
    kernels = layers.compressible_kernels(model)
    self.assertEqual(
        {key: (kernel.kind, kernel.values.shape, kernel.channel_axes)
         for key, kernel in kernels.items()},
        {"mha/_query_dense/kernel": ("EinsumDense", (4, 2, 3), (-2, -1)),
         "mha/_key_dense/kernel": ("EinsumDense", (4, 2, 3), (-2, -1)),
         "mha/_value_dense/kernel": ("EinsumDense", (4, 2, 3), (-2, -1)),
         "mha/_output_dense/kernel": ("EinsumDense", (2, 3, 4), (-1,)),
         "proj/kernel": ("EinsumDense", (4, 5), (-1,)),
         "two/first/kernel": ("Dense", (5, 4), (-1,)),
         "two/second/kernel": ("Dense", (5, 4), (-1,))})
    mha = model.get_layer("mha")
    self.assertIs(layers.owner_of(mha, "_key_dense/kernel")[0],
                  mha._key_dense)  # pylint: disable=protected-access
    self.assertEqual(layers.rule(mha, "_key_dense/kernel").litert,
                     "fully_connected")
    # Every key is the weight's one name.
    for key in kernels:
      name, _, path = key.partition("/")
      layer = model.get_layer(name)
      self.assertEqual(
          layers.weight_key(layer, getattr(*layers.owner_of(layer, path))),
          key)
    with self.assertRaisesRegex(ValueError, "no sublayer at '_nope/kernel'"):
      layers.owner_of(mha, "_nope/kernel")

  def test_exact_class_match(self):
    self.assertIsNone(layers.weight_attrs(keras.layers.Conv2DTranspose(2, 3)))
    self.assertIsNone(layers.weight_attrs(keras.layers.BatchNormalization()))
    self.assertEqual(layers.weight_attrs(keras.layers.SeparableConv2D(2, 3)),
                     ("depthwise_kernel", "pointwise_kernel"))

  def test_weight_key_names_sublayer_weights_apart_and_stably(self):
    # A MultiHeadAttention's four kernels and a custom layer's two Dense
    # kernels all end in "kernel"; their keys must differ, and agree between
    # two instances built in one process (whose auto-named sublayers differ).
    def build():
      inputs = keras.Input((2, 4))
      x = TwoDense(name="two")(inputs)
      return keras.Model(
          inputs, keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x))

    first, second = build(), build()
    keys = {}
    for model in (first, second):
      keys[model.name] = [
          layers.weight_key(layer, weight)
          for name in ("two", "mha")
          for layer in [model.get_layer(name)] for weight in layer.weights]
    self.assertEqual(keys[first.name], keys[second.name])
    self.assertLen(set(keys[first.name]), len(keys[first.name]))
    self.assertIn("two/first/kernel", keys[first.name])
    self.assertIn("mha/_query_dense/kernel", keys[first.name])
    self.assertNotEqual(first.get_layer("two").first.name,
                        second.get_layer("two").first.name)

  def test_weight_key_of_plain_layers(self):
    bn = keras.layers.BatchNormalization(name="bn")
    bn.build((None, 3))
    self.assertEqual([layers.weight_key(bn, w) for w in bn.weights],
                     ["bn/gamma", "bn/beta", "bn/moving_mean",
                      "bn/moving_variance"])

  def test_iter_layers_enters_submodels(self):
    model = _model_with_every_kind()
    names = [layer.name for layer in layers.iter_layers(model)]
    self.assertIn("dense", names)
    self.assertNotIn("head", names)


if __name__ == "__main__":
  absltest.main()
