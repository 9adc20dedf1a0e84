"""Tests for opq_tf.tf_keras.quantizers.OPQWeightQuantizer."""

import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf, tfmot
from opq_tf.tf_keras.quantizers import OPQWeightQuantizer


def _built_quantizer(bits=3, step=0.1, threshold=0.12, shape=(4, 5)):
  """A quantizer built on a Dense layer whose kernel spans a few grid steps."""
  quantizer = OPQWeightQuantizer(bits, step, threshold)
  layer = keras.layers.Dense(shape[-1])
  layer.build((None, shape[0]))
  kernel = np.random.RandomState(0).uniform(-1.0, 1.0, shape).astype(np.float32)
  layer.kernel.assign(kernel)
  variables = quantizer.build(layer.kernel.shape, "kernel", layer)
  variables["mask"].assign((np.abs(kernel) >= threshold).astype(np.float32))
  return quantizer, layer, variables, kernel


class OPQWeightQuantizerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    tf.random.set_seed(0)

  def test_build_creates_fixed_variables(self):
    _, layer, variables, kernel = _built_quantizer()
    self.assertEqual(variables["mask"].shape, kernel.shape)
    self.assertFalse(variables["mask"].trainable)
    self.assertFalse(variables["step"].trainable)
    self.assertEqual(variables["step"].shape, ())
    self.assertAlmostEqual(float(variables["step"].numpy()), 0.1, places=7)
    self.assertIn(variables["mask"], layer.non_trainable_weights)

  @parameterized.parameters(2, 3, 4, 8)
  def test_forward_on_grid_and_pruned_exactly_zero(self, bits):
    step, threshold = 0.05, 0.1
    quantizer, layer, variables, kernel = _built_quantizer(
        bits, step, threshold)
    for training in (True, False):
      output = quantizer(layer.kernel, training, variables).numpy()
      max_code = 2 ** (bits - 1) - 1
      codes = np.round(output / np.float32(step))
      np.testing.assert_array_equal(codes * np.float32(step), output)
      self.assertLessEqual(np.abs(codes).max(), max_code)
      pruned = np.abs(kernel) < threshold
      self.assertTrue(pruned.any() and (~pruned).any())
      np.testing.assert_array_equal(output[pruned], 0.0)
      expected = np.clip(np.round(kernel / np.float32(step)),
                         -max_code, max_code)
      expected = (expected * np.float32(step) * ~pruned).astype(np.float32)
      np.testing.assert_array_equal(output, expected)

  def test_gradient_is_mask(self):
    quantizer, layer, variables, _ = _built_quantizer()
    upstream = tf.constant(
        np.random.RandomState(1).normal(size=layer.kernel.shape), tf.float32)
    with tf.GradientTape() as tape:
      output = quantizer(layer.kernel, True, variables)
      loss = tf.reduce_sum(output * upstream)
    gradient = tape.gradient(loss, layer.kernel).numpy()
    np.testing.assert_array_equal(
        gradient, variables["mask"].numpy() * upstream.numpy())

  @parameterized.parameters(((-1,), (5, 4), (4,)), ((-2, -1), (3, 3, 4, 2), (4, 2)))
  def test_channel_steps_scale_each_channel(self, axes, shape, step_shape):
    # One step per output channel, laid out as the kernel's channel axes.
    steps = np.geomspace(0.01, 0.5, int(np.prod(step_shape)))
    quantizer = OPQWeightQuantizer(bits=4, step=list(steps), threshold=0.0,
                                   channel_axes=axes)
    self.assertEqual(quantizer.get_config()["step"], list(steps))
    layer = keras.layers.Layer()
    kernel = tf.Variable(np.random.RandomState(2).uniform(
        -1, 1, shape).astype(np.float32))
    variables = quantizer.build(kernel.shape, "kernel", layer)
    self.assertEqual(variables["step"].shape, step_shape)
    output = quantizer(kernel, True, variables).numpy()
    step = steps.astype(np.float32).reshape(step_shape)
    want = np.clip(np.round(kernel.numpy() / step), -7, 7) * step
    np.testing.assert_array_equal(output, want.astype(np.float32))

  def test_uses_step_variable_not_constructor_value(self):
    quantizer, layer, variables, _ = _built_quantizer(bits=8, step=0.1)
    variables["step"].assign(0.03)
    output = quantizer(layer.kernel, False, variables).numpy()
    codes = output / np.float32(0.03)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    self.assertFalse(np.allclose(output / 0.1, np.round(output / 0.1)))

  def test_config_round_trip(self):
    quantizer = OPQWeightQuantizer(bits=5, step=0.0123, threshold=0.04)
    self.assertEqual(quantizer.get_config(),
                     {"bits": 5, "step": 0.0123, "threshold": 0.04,
                      "channel_axes": [-1]})
    self.assertEqual(OPQWeightQuantizer.from_config(quantizer.get_config()),
                     quantizer)
    serialized = keras.utils.legacy.serialize_keras_object(quantizer)
    with tfmot.quantization.keras.quantize_scope():
      restored = keras.utils.legacy.deserialize_keras_object(serialized)
    self.assertIsInstance(restored, OPQWeightQuantizer)
    self.assertEqual(restored, quantizer)
    self.assertNotEqual(restored, OPQWeightQuantizer(4, 0.0123, 0.04))

  @parameterized.parameters((1, 0.1), (4, 0.0), (4, -1.0))
  def test_bad_arguments(self, bits, step):
    with self.assertRaisesRegex(ValueError, "bits must be in 2..8|from the plan"):
      OPQWeightQuantizer(bits, step, 0.0)

  @parameterized.named_parameters(
      ("h5_with_separable", "model.h5", True),
      ("savedmodel", "saved_model", False),
  )
  def test_saved_and_loaded_under_quantize_scope(self, filename, separable):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    if separable:
      x = keras.layers.SeparableConv2D(4, 3, name="separable")(x)
    else:
      x = keras.layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))
    qmodel = wrapping.apply(model, pruning_rate=0.6, bits=3)
    images = np.random.RandomState(0).uniform(size=(4, 8, 8, 3))
    images = images.astype(np.float32)
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory)
    path = os.path.join(directory, filename)
    qmodel.save(path)
    with tfmot.quantization.keras.quantize_scope():
      loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(images, training=False).numpy(),
                                  qmodel(images, training=False).numpy())
    for before, after in zip(wrapping.compressed_kernels(qmodel),
                             wrapping.compressed_kernels(loaded)):
      self.assertEqual(before.key, after.key)
      np.testing.assert_array_equal(before.mask, after.mask)
      np.testing.assert_array_equal(before.step, after.step)
      self.assertEqual(before.bits, after.bits)
    self.assertFalse(wrapping.compressed_kernels(loaded)[0].mask.all())


if __name__ == "__main__":
  absltest.main()
