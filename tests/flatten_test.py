"""Tests for opq_tf.tf_keras.flatten: inlining nested submodels."""

from absl.testing import absltest
import numpy as np

from opq_tf.tf_keras import flatten as flatten_lib
from opq_tf.tf_keras._keras import keras, tf, tfmot


def _assert_flat(test, model):
  test.assertFalse([l.name for l in model.layers if isinstance(l, keras.Model)])


class FlattenTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tf.random.set_seed(0)
    self.images = np.random.RandomState(0).uniform(
        0, 255, (3, 32, 32, 3)).astype(np.float32)

  def test_functional_in_functional(self):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    backbone = keras.applications.MobileNet(
        weights=None, include_top=False, input_shape=(32, 32, 3))
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))
    flat = flatten_lib.flatten(model)
    _assert_flat(self, flat)
    self.assertLen(flat.layers, len(backbone.layers) + 3)
    self.assertIs(flat.get_layer("conv_dw_1"), backbone.get_layer("conv_dw_1"))
    self.assertEqual({id(w) for w in flat.weights},
                     {id(w) for w in model.weights})
    np.testing.assert_array_equal(flat(self.images, training=False).numpy(),
                                  model(self.images, training=False).numpy())

  def test_sequential_in_functional_twice_and_nested_deeper(self):
    inner = keras.Sequential(
        [keras.layers.Dense(5, activation="relu", input_shape=(4,), name="d1"),
         keras.layers.Dense(4, name="d2")], name="inner")
    middle_inputs = keras.Input((4,))
    middle = keras.Model(middle_inputs, inner(inner(middle_inputs)),
                         name="middle")
    inputs = keras.Input((4,))
    left = middle(inputs)
    outputs = keras.layers.Concatenate(name="concat")(
        [left, keras.layers.Dense(2, name="side")(inputs)])
    model = keras.Model(inputs, outputs)
    flat = flatten_lib.flatten(model)
    _assert_flat(self, flat)
    self.assertCountEqual([l.name for l in flat.layers],
                          [model.layers[0].name, "d1", "d2", "side", "concat"])
    features = np.random.RandomState(1).normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_array_equal(flat(features).numpy(),
                                  model(features).numpy())

  def test_replace_is_called_once_per_layer(self):
    inner = keras.Sequential(
        [keras.layers.Dense(4, input_shape=(4,), name="shared")], name="inner")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, inner(inner(inputs)))
    calls = []

    def annotate(layer):
      calls.append(layer.name)
      return tfmot.quantization.keras.quantize_annotate_layer(layer)

    flat = flatten_lib.flatten(model, replace=annotate)
    self.assertEqual(calls, ["shared"])
    annotated = flat.layers[1]
    self.assertEqual(type(annotated).__name__, "QuantizeAnnotate")
    self.assertIs(annotated.layer, inner.layers[0])
    self.assertLen(flat.layers, 2)
    features = np.random.RandomState(2).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(flat(features).numpy(), model(features).numpy(),
                               rtol=1e-6)

  def test_model_without_submodels_is_returned_as_is(self):
    model = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    self.assertIs(flatten_lib.flatten(model), model)

  def test_name_clash_raises(self):
    inner_inputs = keras.Input((3,))
    inner = keras.Model(inner_inputs,
                        keras.layers.Dense(3, name="dense")(inner_inputs))
    inputs = keras.Input((3,))
    model = keras.Model(inputs,
                        keras.layers.Dense(2, name="dense")(inner(inputs)))
    with self.assertRaisesRegex(ValueError, "'dense' is used both.*Rename"):
      flatten_lib.flatten(model)

  def test_subclassed_submodel_raises(self):

    class Block(keras.Model):

      def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

      def call(self, inputs):
        return self.dense(inputs)

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Block()(inputs))
    with self.assertRaisesRegex(TypeError, "rebuild it as a Functional"):
      flatten_lib.flatten(model)


if __name__ == "__main__":
  absltest.main()
