"""Tests for opq_tf.tf_keras.litert: int8 OPQ codes in a .tflite file that LiteRT runs."""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from sklearn import datasets

import opq_tf
from opq_tf.training import digits_imagenet
from opq_tf.tf_keras import litert
from opq_tf.training import models
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf

_IMAGE_SIZE = 32


def _kernels(qmodel):
  read = getattr(wrapping, "compressed_kernels", None) or getattr(
      wrapping, "compressed_entries")
  return read(qmodel)


def _digits(count: int, seed: int = 0):
  """`count` real digit images (float32 RGB in [0, 255]) and their labels."""
  digits = datasets.load_digits()
  order = np.random.default_rng(seed).permutation(len(digits.images))[:count]
  images = np.stack([digits_imagenet.render_digit(digits.images[i], _IMAGE_SIZE)
                     for i in order]).astype(np.float32)
  return images, digits.target[order]


def _layout(codes: np.ndarray, depthwise: bool) -> np.ndarray:
  """Keras kernel layout -> TFLite weight layout."""
  if depthwise:
    return codes.reshape((1, *codes.shape[:-2], -1))
  return np.moveaxis(codes, -1, 0)


def _channel_steps(kernel, depthwise: bool) -> np.ndarray:
  """The kernel's step per TFLite output channel (float32, flat)."""
  channels = kernel.codes.shape[-2:] if depthwise else kernel.codes.shape[-1:]
  step = np.asarray(kernel.step, np.float32)
  if step.size == 1:
    step = np.broadcast_to(step.reshape(()), channels)
  return step.reshape(-1)


def _plain_model():
  """Depthwise (multiplier 2), pointwise and dense kernels, no BatchNorm."""
  inputs = keras.Input((12, 12, 3))
  x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                   name="dw")(inputs)
  x = keras.layers.Conv2D(16, 1, activation="relu", name="pw")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x), name="plain")


class LitertTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    """The embedded default model, briefly trained on digits, then OPQ'd."""
    super().setUpClass()
    keras.utils.set_random_seed(0)
    images, labels = _digits(1200)
    model = models.build("small_resnet", num_classes=10, image_size=_IMAGE_SIZE)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, labels, batch_size=64, epochs=2, verbose=0)
    cls.qmodel = opq_tf.apply(model, pruning_rate=0.7, bits=4)
    cls.stripped = opq_tf.strip(cls.qmodel)
    cls.images = images[:200]
    cls.test_images, cls.test_labels = _digits(300, seed=1)
    cls.directory = tempfile.mkdtemp()
    cls.path = os.path.join(cls.directory, "model.tflite")
    cls.info = litert.convert(cls.qmodel, cls.path)

  def _bn_factor(self, conv_name: str) -> np.ndarray:
    """gamma / sqrt(var + eps) of the BatchNorm after `conv_name` (x 1/255 at
    the stem, whose input Rescaling the converter also folds in)."""
    bn = self.stripped.get_layer(conv_name.replace("_conv", "_bn"))
    gamma, _, _, variance = bn.get_weights()
    factor = gamma / np.sqrt(variance + bn.epsilon)
    return factor / 255.0 if conv_name == "stem_conv" else factor

  def test_stored_integers_are_the_codes(self):
    weights = litert.read_weights(self.path)
    kernels = _kernels(self.qmodel)
    self.assertLen(kernels, 11)
    self.assertEqual(sorted(weights), sorted(k.key for k in kernels))
    for kernel in kernels:
      stored = weights[kernel.key]
      self.assertEqual(stored.values.dtype, np.int8)
      codes = _layout(kernel.codes, depthwise=False)
      steps = _channel_steps(kernel, depthwise=False)
      self.assertEqual(stored.quantized_dimension, 0)
      if kernel.kind == "Dense":
        # No folding: the scale is the plan's step itself.
        np.testing.assert_array_equal(stored.values, codes)
        np.testing.assert_array_equal(
            np.broadcast_to(stored.scales, steps.shape), steps)
      else:
        factor = self._bn_factor(kernel.layer_name)
        signs = np.where(factor < 0, -1, 1).reshape(-1, 1, 1, 1)
        np.testing.assert_array_equal(stored.values, codes * signs)
        np.testing.assert_allclose(stored.scales, steps * np.abs(factor),
                                   rtol=2e-6)
      np.testing.assert_array_equal(stored.zero_points, 0)
      self.assertEqual(np.count_nonzero(stored.values),
                       np.count_nonzero(kernel.codes))
      self.assertTrue(np.all(stored.values[_layout(~kernel.mask, False)] == 0))

  def test_report_fields(self):
    self.assertEqual(self.info["file"], "model.tflite")
    self.assertEqual(self.info["bytes"], os.path.getsize(self.path))
    self.assertEqual(self.info["activations"], "float32")
    self.assertEqual(self.info["compute"], "float")
    self.assertTrue(self.info["sparse"])
    self.assertEqual(self.info["kernels_int8"], 11)
    self.assertEqual(self.info["batchnorm_folded_kernels"], 10)
    self.assertEqual(self.info["bits"], [4])
    self.assertIn("int4", self.info["bits_note"])
    # One byte per weight of the 308 320 kernel weights, not four.
    self.assertLess(self.info["bytes"], 308_320 * 1.15)

  @parameterized.parameters(True, False)
  def test_interpreter_follows_keras_on_digits(self, xnnpack):
    result = litert.compare(self.path, self.stripped, self.test_images,
                            self.test_labels, xnnpack=xnnpack)
    logits = np.asarray(self.stripped(self.test_images, training=False))
    self.assertEqual(result["images"], 300)
    # Float compute on the dequantized codes: Keras' logits up to rounding.
    self.assertEqual(result["top1_agreement"], 1.0)
    self.assertLess(result["max_abs_logit_difference"],
                    1e-4 * np.ptp(logits))
    self.assertEqual(result["tflite_top1_accuracy"],
                     result["keras_top1_accuracy"])

  def test_hybrid_kernels_follow_keras_on_digits(self):
    path = os.path.join(self.directory, "hybrid.tflite")
    info = litert.convert(self.qmodel, path, compute="hybrid")
    self.assertEqual(info["compute"], "hybrid")
    self.assertFalse(info["sparse"])
    dense = litert.read_weights(self.path)
    for key, stored in litert.read_weights(path).items():
      np.testing.assert_array_equal(stored.values, dense[key].values)
      np.testing.assert_array_equal(stored.scales, dense[key].scales)
    logits = np.asarray(self.stripped(self.test_images, training=False))
    for xnnpack in (True, False):
      with self.subTest(xnnpack=xnnpack):
        # Activations quantized on the fly: close, not equal.
        result = litert.compare(path, self.stripped, self.test_images,
                                self.test_labels, xnnpack=xnnpack)
        self.assertGreaterEqual(result["top1_agreement"], 0.98)
        self.assertLess(result["max_abs_logit_difference"],
                        0.05 * np.ptp(logits))
    self.assertAlmostEqual(result["tflite_top1_accuracy"],
                           result["keras_top1_accuracy"], delta=0.02)

  def test_int8_activations(self):
    def representative_data():
      for image in self.images[:16]:
        yield [image[None]]

    path = os.path.join(self.directory, "int8.tflite")
    info = litert.convert(self.qmodel, path, int8_activations=True,
                          representative_data=representative_data)
    self.assertEqual(info["activations"], "int8")
    reference = litert.read_weights(self.path)
    for key, stored in litert.read_weights(path).items():
      np.testing.assert_array_equal(stored.values, reference[key].values)
      np.testing.assert_allclose(
          stored.scales,
          np.broadcast_to(reference[key].scales, stored.scales.shape),
          rtol=1e-6)
    result = litert.compare(path, self.stripped, self.test_images)
    self.assertGreaterEqual(result["top1_agreement"], 0.9)

  @parameterized.parameters("kernel", "channel")
  def test_depthwise_layout_and_unfolded_steps(self, step_granularity):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=5,
                          step_granularity=step_granularity)
    path = os.path.join(self.directory, f"plain_{step_granularity}.tflite")
    info = litert.convert(qmodel, path)
    self.assertEqual(info["batchnorm_folded_kernels"], 0)
    weights = litert.read_weights(path)
    for kernel in _kernels(qmodel):
      stored = weights[kernel.key]
      depthwise = kernel.kind == "DepthwiseConv2D"
      np.testing.assert_array_equal(stored.values,
                                    _layout(kernel.codes, depthwise))
      steps = _channel_steps(kernel, depthwise)
      if step_granularity == "kernel" and not depthwise:
        self.assertLen(stored.scales, 1)  # Per tensor.
      np.testing.assert_array_equal(
          np.broadcast_to(stored.scales, steps.shape), steps)
      self.assertEqual(stored.quantized_dimension, 3 if depthwise else 0)
      self.assertEqual(stored.op, "DEPTHWISE_CONV_2D" if depthwise else
                       ("FULLY_CONNECTED" if kernel.kind == "Dense" else
                        "CONV_2D"))
    images = np.random.default_rng(0).normal(size=(16, 12, 12, 3))
    result = litert.compare(path, opq_tf.strip(qmodel), images)
    self.assertGreaterEqual(result["top1_agreement"], 0.9)

  def test_sparse_kernels_decode_to_the_codes(self):
    path = os.path.join(self.directory, "dense.tflite")
    info = litert.convert(self.qmodel, path, sparse=False)
    self.assertEqual(info["kernels_sparse"], 0)
    self.assertGreater(self.info["kernels_sparse"], 0)
    self.assertLess(self.info["bytes"], info["bytes"])
    dense = litert.read_weights(path)
    sparse = litert.read_weights(self.path)
    self.assertTrue(any(stored.sparse for stored in sparse.values()))
    self.assertFalse(any(stored.sparse for stored in dense.values()))
    for key, stored in sparse.items():
      np.testing.assert_array_equal(stored.values, dense[key].values)
    result = litert.compare(path, self.stripped, self.test_images)
    self.assertEqual(result["top1_agreement"], 1.0)

  def test_never_applied_model(self):
    path = os.path.join(self.directory, "plain_model.tflite")
    with self.assertRaisesRegex(ValueError, "opq_tf.apply"):
      litert.convert(self.stripped, path)
    self.assertFalse(os.path.exists(path))

  def test_existing_target_is_kept(self):
    path = os.path.join(self.directory, "taken.tflite")
    with open(path, "wb") as f:
      f.write(b"mine")
    with self.assertRaisesRegex(ValueError, "exists; choose a new path"):
      litert.convert(self.qmodel, path)
    with open(path, "rb") as f:
      self.assertEqual(f.read(), b"mine")

  def test_int8_activations_need_data(self):
    with self.assertRaisesRegex(ValueError, "representative_data"):
      litert.convert(self.qmodel, os.path.join(self.directory, "x.tflite"),
                     int8_activations=True)

  def test_unconvertible_layer(self):
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="fc")(inputs)
    x = keras.layers.Lambda(
        lambda t: tf.numpy_function(np.sin, [t], tf.float32, stateful=False),
        output_shape=(4,), name="numpy_sin")(x)
    model = keras.Model(inputs, x)
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=4)
    path = os.path.join(self.directory, "unconvertible.tflite")
    with self.assertRaisesRegex(ValueError, "cannot convert.*Replace the layer"):
      litert.convert(qmodel, path)
    self.assertEqual([name for name in os.listdir(self.directory)
                      if name.startswith(".unconvertible")], [])
    self.assertFalse(os.path.exists(path))


if __name__ == "__main__":
  absltest.main()
