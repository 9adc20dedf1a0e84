"""Tests for opq_tf.tf_keras.litert and opq_tf.litert_codes: the OPQ codes
(int8 or int4) in a .tflite file that LiteRT runs, from both frontends."""

import os
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from sklearn import datasets

import opq_tf
from opq_tf import litert_codes
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
    cls.dense_path = os.path.join(cls.directory, "dense.tflite")
    cls.dense_info = litert.convert(cls.qmodel, cls.dense_path, sparse=False)
    cls.int4_path = os.path.join(cls.directory, "int4.tflite")
    cls.int4_info = litert.convert(cls.qmodel, cls.int4_path, weights="int4")

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
    path, info = self.dense_path, self.dense_info
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


  # --------------------------------------------------------------------------
  # int4 weights.

  def _assert_codes(self, path, qmodel, dtypes):
    """Every compressed kernel's stored integers are its codes (the signs of
    negative folded factors aside) in the stored type `dtypes[key]`, with
    the int8 file's scales."""
    weights = litert.read_weights(path)
    for kernel in _kernels(qmodel):
      stored = weights[kernel.key]
      depthwise = kernel.kind == "DepthwiseConv2D"
      codes = _layout(kernel.codes, depthwise)
      self.assertEqual(stored.dtype, dtypes[kernel.key], kernel.key)
      self.assertEqual(stored.values.dtype, np.int8)
      np.testing.assert_array_equal(np.abs(stored.values), np.abs(codes))
      np.testing.assert_array_equal(stored.zero_points, 0)
    return weights

  def test_int4_stored_integers_are_the_codes(self):
    path, info = self.int4_path, self.int4_info
    self.assertEqual((info["weights"], info["kernels_int4"],
                      info["kernels_int8"], info["kernels_sparse"]),
                     ("int4", 11, 0, 0))
    self.assertEqual(info["int8_reasons"], {})
    int4 = self._assert_codes(path, self.qmodel,
                              {k.key: "int4" for k in _kernels(self.qmodel)})
    int8 = litert.read_weights(self.path)  # The int8 file (CSR where smaller).
    for key, stored in int4.items():
      np.testing.assert_array_equal(stored.values, int8[key].values)
      np.testing.assert_array_equal(stored.scales, int8[key].scales)
      self.assertEqual(stored.quantized_dimension,
                       int8[key].quantized_dimension)
    # Half a byte per weight: 308 320 weights, ~158 kB; int8 dense ~312 kB.
    self.assertLess(info["bytes"], 0.55 * self.dense_info["bytes"])
    self.assertLess(info["bytes"], self.info["bytes"])  # Smaller than CSR.

  @parameterized.parameters(True, False)
  def test_int4_interpreter_follows_keras_on_digits(self, xnnpack):
    result = litert.compare(self.int4_path, self.stripped, self.test_images,
                            self.test_labels, xnnpack=xnnpack)
    logits = np.asarray(self.stripped(self.test_images, training=False))
    self.assertEqual(result["top1_agreement"], 1.0)
    self.assertLess(result["max_abs_logit_difference"], 1e-4 * np.ptp(logits))

  def test_int4_under_hybrid_keeps_depthwise_int8(self):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=4)
    path = os.path.join(self.directory, "hybrid_int4.tflite")
    info = litert.convert(qmodel, path, compute="hybrid", weights="int4")
    (reason, keys), = info["int8_reasons"].items()
    self.assertIn("DEPTHWISE_CONV_2D", reason)
    self.assertEqual(keys, ["dw/depthwise_kernel"])
    self._assert_codes(path, qmodel, {"dw/depthwise_kernel": "int8",
                                      "pw/kernel": "int4", "fc/kernel": "int4"})
    images = np.random.default_rng(0).normal(size=(16, 12, 12, 3))
    for xnnpack in (True, False):
      result = litert.compare(path, opq_tf.strip(qmodel), images,
                              xnnpack=xnnpack)
      self.assertGreaterEqual(result["top1_agreement"], 0.9)

  def test_int4_with_int8_activations(self):
    def representative_data():
      for image in self.images[:16]:
        yield [image[None]]

    path = os.path.join(self.directory, "int8_act_int4.tflite")
    info = litert.convert(self.qmodel, path, int8_activations=True,
                          representative_data=representative_data,
                          weights="int4")
    self.assertEqual(info["kernels_int4"], 11)
    weights = self._assert_codes(path, self.qmodel,
                                 {k.key: "int4" for k in _kernels(self.qmodel)})
    self.assertTrue(all(w.dtype == "int4" for w in weights.values()))
    result = litert.compare(path, self.stripped, self.test_images)
    self.assertGreaterEqual(result["top1_agreement"], 0.9)

  def test_kernels_above_four_bits_stay_int8(self):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=4,
                          overrides={"fc": {"bits": 6}})
    path = os.path.join(self.directory, "mixed_bits.tflite")
    info = litert.convert(qmodel, path, weights="int4")
    self.assertEqual(info["int8_reasons"],
                     {"B = 6 > 4: its codes need int8": ["fc/kernel"]})
    self.assertEqual(info["bits"], [4, 6])
    self._assert_codes(path, qmodel, {"dw/depthwise_kernel": "int4",
                                      "pw/kernel": "int4", "fc/kernel": "int8"})

  def test_auto_says_what_it_chose(self):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=4)
    path = os.path.join(self.directory, "auto.tflite")
    info = litert.convert(qmodel, path, weights="auto")
    auto = info["auto"]
    self.assertIn("XNNPACK on", auto["measured"])
    self.assertGreater(auto["all_int8_ms"], 0)
    ops = {"dw/depthwise_kernel": "DEPTHWISE_CONV_2D", "pw/kernel": "CONV_2D",
           "fc/kernel": "FULLY_CONNECTED"}
    self.assertEqual(sorted(auto.keys() - {"measured", "all_int8_ms"}),
                     sorted(set(ops.values())))
    dtypes = {key: auto[op]["chose"] for key, op in ops.items()}
    self._assert_codes(path, qmodel, dtypes)
    self.assertEqual(info["kernels_int4"],
                     sum(d == "int4" for d in dtypes.values()))
    for reason, keys in info["int8_reasons"].items():
      self.assertTrue(reason.startswith("auto: "), reason)
      self.assertTrue(all(dtypes[key] == "int8" for key in keys))

  def test_unrunnable_file_is_never_written(self):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=4)
    path = os.path.join(self.directory, "unrunnable.tflite")
    # Without the table of what LiteRT cannot run in int4, the hybrid
    # depthwise kernel gets an int4 filter, which the interpreter refuses.
    with mock.patch.dict(litert_codes._NO_INT4, clear=True):
      with self.assertRaisesRegex(ValueError,
                                  "does not run in the LiteRT interpreter"):
        litert.convert(qmodel, path, compute="hybrid", weights="int4")
    self.assertFalse(os.path.exists(path))
    self.assertEqual([name for name in os.listdir(self.directory)
                      if name.startswith(".unrunnable")], [])

  def test_bad_weights_option(self):
    with self.assertRaisesRegex(ValueError, "use one of .*int4"):
      litert.convert(self.qmodel, os.path.join(self.directory, "w.tflite"),
                     weights="int3")
    with self.assertRaisesRegex(ValueError, "litert_weights='int3'"):
      opq_tf.export(self.qmodel, os.path.join(self.directory, "bad_export"),
                    litert=True, litert_weights="int3")
    self.assertFalse(os.path.exists(os.path.join(self.directory, "bad_export")))

  def test_export_writes_int4(self):
    report = opq_tf.export(self.qmodel, os.path.join(self.directory, "export"),
                           formats=("packed",), litert=True,
                           litert_weights="int4")
    self.assertEqual(report["litert"]["kernels_int4"], 11)
    path = os.path.join(self.directory, "export", "model.tflite")
    self.assertEqual(report["litert"]["bytes"], os.path.getsize(path))
    self.assertEqual({w.dtype for w in litert.read_weights(path).values()},
                     {"int4"})


def _keras3_model(keras3):
  """MultiHeadAttention (EinsumDense projections) + Dense + Conv1D, Keras 3."""
  inputs = keras3.Input((8, 16))
  x = keras3.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs)
  x = keras3.layers.Dense(32, activation="relu", name="ff")(x)
  x = keras3.layers.Conv1D(16, 3, name="conv")(x)
  x = keras3.layers.GlobalAveragePooling1D(name="pool")(x)
  return keras3.Model(inputs, keras3.layers.Dense(5, name="fc")(x))


class Keras3LitertTest(parameterized.TestCase):
  """Keras 3 (TensorFlow backend) writes its .tflite with the shared writer."""

  @parameterized.parameters("int8", "int4")
  def test_stored_integers_are_the_codes(self, weights):
    import keras as keras3  # pylint: disable=g-import-not-at-top
    from opq_tf.keras3 import wrapping as keras3_wrapping  # pylint: disable=g-import-not-at-top

    if keras3.backend.backend() != "tensorflow":
      self.skipTest("LiteRT export needs Keras 3's TensorFlow backend")
    keras3.utils.set_random_seed(0)
    qmodel = opq_tf.apply(_keras3_model(keras3), pruning_rate=0.5, bits=4)
    directory = os.path.join(tempfile.mkdtemp(), "out")
    report = opq_tf.export(qmodel, directory, formats=("packed",),
                           litert=True, litert_weights=weights)
    path = os.path.join(directory, "model.tflite")
    kernels = keras3_wrapping.compressed_kernels(qmodel)
    self.assertLen(kernels, 7)  # 4 EinsumDense, 2 Dense, 1 Conv1D.
    self.assertEqual(report["litert"][f"kernels_{weights}"], 7)
    stored = litert_codes.read_weights(path)
    self.assertEqual(sorted(stored), sorted(k.key for k in kernels))
    for kernel in kernels:
      codes = np.moveaxis(kernel.codes, kernel.channel_axes,
                          range(len(kernel.channel_axes)))
      self.assertEqual(stored[kernel.key].dtype, weights)
      np.testing.assert_array_equal(
          stored[kernel.key].values.reshape(-1),
          codes.reshape(-1), err_msg=kernel.key)
    images = np.random.default_rng(0).normal(size=(32, 8, 16))
    for xnnpack in (True, False):
      result = litert_codes.compare(path, opq_tf.strip(qmodel), images,
                                    xnnpack=xnnpack)
      self.assertEqual(result["top1_agreement"], 1.0)
      self.assertLess(result["max_abs_logit_difference"], 1e-5)


if __name__ == "__main__":
  absltest.main()
