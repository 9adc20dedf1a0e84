"""Tests for opq_tf.tf_keras.litert and opq_tf.litert_codes: the OPQ codes
(int8, int4 or int2) in a .tflite file that LiteRT runs, from both frontends."""

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
    cls.model = model
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
  # int4 and int2 weights.

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

  def _stored(self, info):
    """key -> stored type, from the facts."""
    return {key: fact["dtype"] for key, fact in info["stored"].items()}

  def test_packing_is_litert_s(self):
    # LiteRT's UnpackPackedIntToInt8: first value in the lowest bits.
    np.testing.assert_array_equal(
        litert_codes.pack(np.array([1, -2, 0, -1, 1]), "int2"),
        [0b11001001, 0b00000001])
    np.testing.assert_array_equal(
        litert_codes.pack(np.array([-1, 3, -8]), "int4"), [0x3F, 0x08])
    rng = np.random.default_rng(0)
    for dtype, low, high in (("int4", -8, 7), ("int2", -2, 1)):
      for count in (1, 2, 3, 5, 8, 33):
        values = rng.integers(low, high + 1, count).astype(np.int8)
        np.testing.assert_array_equal(
            litert_codes.unpack(litert_codes.pack(values, dtype), count, dtype),
            values)

  def test_int4_stored_integers_are_the_codes(self):
    path, info = self.int4_path, self.int4_info
    dtypes = self._stored(info)
    self.assertEqual((info["weights"], info["kernels_int4"],
                      info["kernels_int8"], info["kernels_int2"],
                      info["kernels_sparse"]), ("int4", 10, 1, 0, 1))
    self.assertEqual(info["stored"]["logits/kernel"],
                     {"op": "FULLY_CONNECTED", "bits": 4, "dtype": "int4",
                      "why": "B = 4 fits int4, which LiteRT runs "
                             "FULLY_CONNECTED with"})
    int4 = self._assert_codes(path, self.qmodel, dtypes)
    int8 = litert.read_weights(self.path)  # The int8 file (CSR where smaller).
    for key, stored in int4.items():
      # The one kernel pruned so far that int8 CSR beats dense int4.
      self.assertEqual(stored.sparse, dtypes[key] == "int8")
      if stored.sparse:
        self.assertRegex(info["stored"][key]["why"],
                         r"^int8 in CSR \([\d,]+ bytes\) is smaller than "
                         r"dense int4")
      np.testing.assert_array_equal(stored.values, int8[key].values)
      np.testing.assert_array_equal(stored.scales, int8[key].scales)
      self.assertEqual(stored.quantized_dimension,
                       int8[key].quantized_dimension)
    # Half a byte per weight: 308 320 weights, ~158 kB; int8 dense ~312 kB.
    self.assertLess(info["bytes"], 0.55 * self.dense_info["bytes"])
    self.assertLess(info["bytes"], self.info["bytes"])  # Smaller than CSR.
    dense_path = os.path.join(self.directory, "int4_dense.tflite")
    dense = litert.convert(self.qmodel, dense_path, weights="int4",
                           sparse=False)
    self.assertEqual(dense["kernels_int4"], 11)
    self.assertLess(info["bytes"], dense["bytes"])

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
    self.assertEqual(self._stored(info), {"dw/depthwise_kernel": "int8",
                                          "pw/kernel": "int4",
                                          "fc/kernel": "int4"})
    self.assertIn("not int4: LiteRT 2.3 has no hybrid DEPTHWISE_CONV_2D",
                  info["stored"]["dw/depthwise_kernel"]["why"])
    self._assert_codes(path, qmodel, self._stored(info))
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

  # What LiteRT 2.3 runs with int2 filters (B = 2 everywhere): every op under
  # float compute; FULLY_CONNECTED only under hybrid and int8 activations,
  # the convolutions then at int4 (hybrid depthwise: int8, as for int4).
  @parameterized.parameters(
      ("float", {"dw/depthwise_kernel": "int2", "pw/kernel": "int2",
                 "fc/kernel": "int2"}),
      ("hybrid", {"dw/depthwise_kernel": "int8", "pw/kernel": "int4",
                  "fc/kernel": "int2"}),
      ("int8", {"dw/depthwise_kernel": "int4", "pw/kernel": "int4",
                "fc/kernel": "int2"}))
  def test_int2_where_the_op_takes_it(self, compute, expected):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=2)
    images = np.random.default_rng(0).normal(size=(16, 12, 12, 3))
    options = {"compute": compute}
    if compute == "int8":
      options = {"int8_activations": True, "representative_data": lambda: (
          [image[None].astype(np.float32)] for image in images)}
    path = os.path.join(self.directory, f"int2_{compute}.tflite")
    info = litert.convert(qmodel, path, weights="int2", **options)
    self.assertEqual(self._stored(info), expected)
    for key, dtype in expected.items():
      why = info["stored"][key]["why"]
      if dtype == "int2":
        self.assertTrue(why.startswith("B = 2 fits int2"), why)
      else:
        self.assertTrue(why.startswith("not int2: LiteRT 2.3"), why)
    self._assert_codes(path, qmodel, expected)
    for xnnpack in (True, False):
      result = litert.compare(path, opq_tf.strip(qmodel), images,
                              xnnpack=xnnpack)
      self.assertEqual(result["top1_agreement"], 1.0)
      if compute == "float":
        self.assertLess(result["max_abs_logit_difference"], 1e-5)

  def test_each_cannot_run_entry_still_fails(self):
    """Every (type, compute, op) the writer avoids: without its entry, the
    file is refused, or (hybrid int2 CONV_2D) runs far off Keras."""
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=2)
    images = np.random.default_rng(0).normal(size=(16, 12, 12, 3))
    for entry in litert_codes._CANNOT_RUN:
      dtype, compute, op = entry
      with self.subTest(entry=entry):
        options = {"compute": compute}
        if compute == "int8":
          options = {"int8_activations": True, "representative_data": lambda: (
              [image[None].astype(np.float32)] for image in images)}
        path = os.path.join(self.directory, "cannot_%s_%s_%s.tflite" % entry)
        rest = {k: v for k, v in litert_codes._CANNOT_RUN.items()
                if k != entry}
        with mock.patch.dict(litert_codes._CANNOT_RUN, rest, clear=True):
          try:
            info = litert.convert(qmodel, path, weights=dtype, **options)
          except ValueError as error:
            self.assertIn("does not run in the LiteRT interpreter", str(error))
            self.assertFalse(os.path.exists(path))
            continue
        self.assertEqual(entry, ("int2", "hybrid", "conv_2d"))
        self.assertEqual(info["stored"]["pw/kernel"]["dtype"], "int2")
        result = litert.compare(path, opq_tf.strip(qmodel), images,
                                xnnpack=False)
        self.assertGreater(result["max_abs_logit_difference"], 0.1)

  @parameterized.parameters("int4", "int2")
  def test_kernels_above_four_bits_stay_int8(self, weights):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=4,
                          overrides={"fc": {"bits": 6}, "pw": {"bits": 3}})
    path = os.path.join(self.directory, f"mixed_bits_{weights}.tflite")
    info = litert.convert(qmodel, path, weights=weights)
    self.assertEqual(info["bits"], [3, 4, 6])
    expected = {"dw/depthwise_kernel": "int4", "pw/kernel": "int4",
                "fc/kernel": "int8"}
    self.assertEqual(self._stored(info), expected)
    self.assertEqual(info["stored"]["fc/kernel"]["why"],
                     "not int4: B = 6 > 4" if weights == "int4" else
                     "not int2: B = 6 > 2; not int4: B = 6 > 4")
    self.assertEqual(info["stored"]["pw/kernel"]["why"],
                     "B = 3 fits int4, which LiteRT runs CONV_2D with"
                     if weights == "int4" else "not int2: B = 3 > 2")
    self._assert_codes(path, qmodel, expected)

  def test_mixed_plan_stores_each_kernel_at_its_smallest_type(self):
    # A 3-bit budget: B from 2 to 6 here (at 4 bits, the least B is 3).
    plan = opq_tf.allocate(self.model, 0.5, bits="mixed", average_bits=3,
                           bits_range=(2, 8))
    qmodel = opq_tf.apply(self.model, plan)
    path = os.path.join(self.directory, "mixed_plan.tflite")
    info = litert.convert(qmodel, path, weights="int2")
    smallest = {kernel.key: ("int2" if kernel.bits <= 2 else
                             "int4" if kernel.bits <= 4 else "int8")
                for kernel in _kernels(qmodel)}
    # Under float compute every op runs int2 and int4 filters.
    self.assertEqual(self._stored(info), smallest)
    self.assertEqual(set(smallest.values()), {"int2", "int4", "int8"})
    self._assert_codes(path, qmodel, smallest)
    result = litert.compare(path, opq_tf.strip(qmodel), self.test_images,
                            self.test_labels)
    self.assertEqual(result["top1_agreement"], 1.0)

  def test_auto_says_what_it_chose(self):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=4,
                          overrides={"fc": {"bits": 2}})
    path = os.path.join(self.directory, "auto.tflite")
    info = litert.convert(qmodel, path, weights="auto")
    auto = info["auto"]
    self.assertIn("XNNPACK on", auto["measured"])
    self.assertGreater(auto["all_int8_ms"], 0)
    ops = {"dw/depthwise_kernel": "DEPTHWISE_CONV_2D", "pw/kernel": "CONV_2D",
           "fc/kernel": "FULLY_CONNECTED"}
    narrow = {"dw/depthwise_kernel": "int4", "pw/kernel": "int4",
              "fc/kernel": "int2"}
    self.assertEqual(sorted(auto.keys() - {"measured", "all_int8_ms"}),
                     sorted(set(ops.values())))
    dtypes = {key: narrow[key] if auto[op]["chose"] == "narrow" else "int8"
              for key, op in ops.items()}
    self.assertEqual(self._stored(info), dtypes)
    self._assert_codes(path, qmodel, dtypes)
    for key, dtype in dtypes.items():
      if dtype == "int8":
        self.assertTrue(info["stored"][key]["why"].startswith("auto: "))

  def test_unrunnable_file_is_never_written(self):
    keras.utils.set_random_seed(1)
    qmodel = opq_tf.apply(_plain_model(), pruning_rate=0.5, bits=4)
    path = os.path.join(self.directory, "unrunnable.tflite")
    # Without the table of what LiteRT cannot run, the hybrid depthwise
    # kernel gets an int4 filter, which the interpreter refuses.
    with mock.patch.dict(litert_codes._CANNOT_RUN, clear=True):
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
    self.assertEqual(report["litert"]["stored"], self.int4_info["stored"])
    path = os.path.join(self.directory, "export", "model.tflite")
    self.assertEqual(report["litert"]["bytes"], os.path.getsize(path))
    self.assertEqual({key: w.dtype for key, w in
                      litert.read_weights(path).items()},
                     self._stored(self.int4_info))


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

  @parameterized.parameters("int8", "int4", "int2")
  def test_stored_integers_are_the_codes(self, weights):
    """B = 2, 4 and 6 kernels, each at its smallest type from `weights` up
    (float compute: every op runs int4 and int2 filters)."""
    import keras as keras3  # pylint: disable=g-import-not-at-top
    from opq_tf.keras3 import wrapping as keras3_wrapping  # pylint: disable=g-import-not-at-top

    if keras3.backend.backend() != "tensorflow":
      self.skipTest("LiteRT export needs Keras 3's TensorFlow backend")
    keras3.utils.set_random_seed(0)
    qmodel = opq_tf.apply(_keras3_model(keras3), pruning_rate=0.5, bits=4,
                          overrides={"ff": {"bits": 2}, "fc": {"bits": 6}})
    directory = os.path.join(tempfile.mkdtemp(), "out")
    report = opq_tf.export(qmodel, directory, formats=("packed",),
                           litert=True, litert_weights=weights)
    path = os.path.join(directory, "model.tflite")
    kernels = keras3_wrapping.compressed_kernels(qmodel)
    self.assertLen(kernels, 7)  # 4 EinsumDense, 2 Dense, 1 Conv1D.
    holds = {"int2": 2, "int4": 4, "int8": 8}  # The largest B of each type.
    types = litert_codes.DTYPES[litert_codes.DTYPES.index(weights):]
    expected = {kernel.key: next(t for t in types if kernel.bits <= holds[t])
                for kernel in kernels}
    self.assertEqual(sorted({k.bits for k in kernels}), [2, 4, 6])
    for dtype in litert_codes.DTYPES:
      self.assertEqual(report["litert"][f"kernels_{dtype}"],
                       list(expected.values()).count(dtype))
    stored = litert_codes.read_weights(path)
    self.assertEqual(sorted(stored), sorted(k.key for k in kernels))
    for kernel in kernels:
      codes = np.moveaxis(kernel.codes, kernel.channel_axes,
                          range(len(kernel.channel_axes)))
      self.assertEqual(stored[kernel.key].dtype, expected[kernel.key])
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
