"""The tf_keras and Keras 3 frontends give the same numbers on the same weights.

Runs in the main pytest process: tf_keras (TensorFlow) and Keras 3 (on the
backend KERAS_BACKEND names, TensorFlow by default) live side by side. The
same Conv+BN+depthwise+separable+Dense network, and an attention network
(MultiHeadAttention's four EinsumDense projections, an EinsumDense, a
Dense), is built in both with the same weights; the plans must be equal to
the last digit, the codes equal and the packed files equal byte for byte.
Calibration sums float32 statistics in each framework's own order, so it
agrees within a tolerance instead (see test_calibration_agrees), on both
networks: each frontend reconstructs a sublayer's kernels (MultiHeadAttention's)
from the sublayer's own input.
"""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import keras  # Keras 3

import keras3_models
import opq_tf
from opq_tf.keras3 import layers as keras3_layers
from opq_tf.keras3 import wrapping as keras3_wrapping
from opq_tf.tf_keras import exporting as tf_keras_exporting
from opq_tf.tf_keras import wrapping as tf_keras_wrapping
from opq_tf.tf_keras._keras import keras as tf_keras


def _tf_keras_conv_model() -> tf_keras.Model:
  """keras3_models.conv_model, layer for layer, in tf_keras."""
  layers = tf_keras.layers
  inputs = tf_keras.Input(keras3_models.IMAGE_SHAPE, name="images")
  x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
  x = layers.BatchNormalization(name="bn")(x)
  x = layers.ReLU(name="relu")(x)
  x = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
  x = layers.SeparableConv2D(8, 3, strides=2, name="separable")(x)
  x = layers.GlobalAveragePooling2D(name="pool")(x)
  return tf_keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _twins(seed: int = 0):
  """(tf_keras model, Keras 3 model) with the same weights, by key."""
  model = keras3_models.randomize(keras3_models.conv_model(), seed)
  twin = _tf_keras_conv_model()
  source = keras3_layers.named_weights(model)
  target = tf_keras_exporting.named_weights(twin)
  if list(source) != list(target):
    raise AssertionError(f"weight keys differ: {list(source)} vs "
                         f"{list(target)}")
  for name, variable in target.items():
    variable.assign(source[name].numpy())
  return twin, model


def _attention_model(k):
  """An attention network in Keras `k` (tf_keras or Keras 3), same layers."""
  inputs = k.Input(keras3_models.SEQUENCE_SHAPE, name="embeddings")
  x = k.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
  x = k.layers.LayerNormalization(name="norm")(x + inputs)
  x = k.layers.EinsumDense("abc,cd->abd", (None, 8), bias_axes="d",
                           name="projection")(x)
  x = k.layers.GlobalAveragePooling1D(name="pool")(x)
  return k.Model(inputs, k.layers.Dense(3, name="head")(x))


def _attention_twins():
  """(tf_keras, Keras 3) attention networks with the same weights, by key."""
  model = keras3_models.randomize(_attention_model(keras))
  twin = _attention_model(tf_keras)
  source = keras3_layers.named_weights(model)
  target = tf_keras_exporting.named_weights(twin)
  if sorted(source) != sorted(target):
    raise AssertionError(f"weight keys differ: {sorted(source)} vs "
                         f"{sorted(target)}")
  for name, variable in target.items():
    variable.assign(source[name].numpy())
  return twin, model


def _upsampling_model(k):
  """A Conv2D then a Conv2DTranspose (not a compressed kind) in Keras `k`."""
  inputs = k.Input(keras3_models.IMAGE_SHAPE, name="images")
  x = k.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
  return k.Model(inputs, k.layers.Conv2DTranspose(3, 2, strides=2,
                                                  name="up")(x))


def _packed_bytes(qmodel, directory: str, plan) -> tuple[bytes, dict]:
  report = opq_tf.export(qmodel, directory, formats=("packed",), plan=plan)
  with open(os.path.join(directory, "model.opq"), "rb") as f:
    return f.read(), report


class ParityTest(parameterized.TestCase):

  def test_dispatch(self):
    twin, model = _twins()
    self.assertEqual(opq_tf.frontend_of(model), "keras3")
    self.assertEqual(opq_tf.frontend_of(twin), "tf_keras")

  @parameterized.parameters(
      dict(pruning_rate=0.6, bits=4),
      dict(pruning_rate=0.8, bits=3, step_granularity="kernel"),
      dict(pruning_rate=0.5, bits=5, method="uniform"))
  def test_same_plan(self, **options):
    twin, model = _twins()
    tf_keras_plan = opq_tf.allocate(twin, **options)
    keras3_plan = opq_tf.allocate(model, **options)
    self.assertEqual(keras3_plan.to_json(), tf_keras_plan.to_json())
    self.assertLen(keras3_plan.kernels, 5)

  def test_same_codes_and_byte_identical_packed_file(self):
    twin, model = _twins()
    plan = opq_tf.allocate(twin, pruning_rate=0.6, bits=4)
    tf_keras_q = opq_tf.apply(twin, plan)
    keras3_q = opq_tf.apply(model, plan)  # a tf_keras plan, same kernels
    expected = tf_keras_wrapping.compressed_kernels(tf_keras_q)
    got = keras3_wrapping.compressed_kernels(keras3_q)
    self.assertEqual([k.key for k in got], [k.key for k in expected])
    for mine, theirs in zip(got, expected):
      np.testing.assert_array_equal(mine.mask, theirs.mask, mine.key)
      np.testing.assert_array_equal(mine.step, theirs.step, mine.key)
      np.testing.assert_array_equal(mine.codes, theirs.codes, mine.key)
    images = keras3_models.images(8)
    np.testing.assert_allclose(keras3_q.predict(images, verbose=0),
                               tf_keras_q.predict(images, verbose=0),
                               atol=1e-5)
    with tempfile.TemporaryDirectory() as directory:
      tf_keras_report = opq_tf.export(tf_keras_q, os.path.join(directory, "a"),
                                      formats=("packed",), plan=plan)
      keras3_report = opq_tf.export(keras3_q, os.path.join(directory, "b"),
                                    formats=("packed",), plan=plan)
      with open(os.path.join(directory, "a", "model.opq"), "rb") as f:
        tf_keras_bytes = f.read()
      with open(os.path.join(directory, "b", "model.opq"), "rb") as f:
        keras3_bytes = f.read()
      # Either frontend loads the other's file.
      loaded = opq_tf.load_packed(os.path.join(directory, "a", "model.opq"),
                                  keras3_models.conv_model)
    self.assertEqual(keras3_bytes, tf_keras_bytes)
    del keras3_report["files"], tf_keras_report["files"]
    self.assertEqual(keras3_report, tf_keras_report)
    stripped = tf_keras_exporting.named_weights(opq_tf.strip(tf_keras_q))
    for name, variable in keras3_layers.named_weights(loaded).items():
      np.testing.assert_array_equal(variable.numpy(), stripped[name].numpy(),
                                    name)

  def test_attention_same_plan_codes_and_packed_file(self):
    twin, model = _attention_twins()
    tf_keras_plan = opq_tf.allocate(twin, pruning_rate=0.6, bits=4)
    self.assertEqual(opq_tf.allocate(model, pruning_rate=0.6, bits=4).to_json(),
                     tf_keras_plan.to_json())
    self.assertEqual(
        {k.key: (k.kind, k.channel_axes) for k in tf_keras_plan.kernels},
        {"mha/_query_dense/kernel": ("EinsumDense", (-2, -1)),
         "mha/_key_dense/kernel": ("EinsumDense", (-2, -1)),
         "mha/_value_dense/kernel": ("EinsumDense", (-2, -1)),
         "mha/_output_dense/kernel": ("EinsumDense", (-1,)),
         "projection/kernel": ("EinsumDense", (-1,)),
         "head/kernel": ("Dense", (-1,))})
    tf_keras_q = opq_tf.apply(twin, tf_keras_plan)
    keras3_q = opq_tf.apply(model, tf_keras_plan)
    expected = tf_keras_wrapping.compressed_kernels(tf_keras_q)
    got = keras3_wrapping.compressed_kernels(keras3_q)
    self.assertEqual([(k.key, k.layer_name, k.weight, k.kind) for k in got],
                     [(k.key, k.layer_name, k.weight, k.kind)
                      for k in expected])
    for mine, theirs in zip(got, expected):
      np.testing.assert_array_equal(mine.codes, theirs.codes, mine.key)
      np.testing.assert_array_equal(mine.step, theirs.step, mine.key)
    sequences = keras3_models.sequences(4)
    np.testing.assert_allclose(keras3_q.predict(sequences, verbose=0),
                               tf_keras_q.predict(sequences, verbose=0),
                               atol=1e-5)
    with tempfile.TemporaryDirectory() as directory:
      tf_keras_bytes, tf_keras_report = _packed_bytes(
          tf_keras_q, os.path.join(directory, "a"), tf_keras_plan)
      keras3_bytes, keras3_report = _packed_bytes(
          keras3_q, os.path.join(directory, "b"), tf_keras_plan)
    self.assertEqual(keras3_bytes, tf_keras_bytes)
    del keras3_report["files"], tf_keras_report["files"]
    self.assertEqual(keras3_report, tf_keras_report)

  def test_both_frontends_list_what_stays_fp32_in_plan_and_report(self):
    reason = ("Conv2DTranspose is not a compressed kind (register it with "
              "opq_tf.register_layer)")
    for model in (_upsampling_model(tf_keras), _upsampling_model(keras)):
      frontend = opq_tf.frontend_of(model)
      plan = opq_tf.allocate(model, pruning_rate=0.5, bits=4)
      self.assertEqual([k.key for k in plan.kernels], ["conv/kernel"])
      self.assertEqual(plan.fp32, {"up/kernel": reason}, frontend)
      self.assertIn(f"left FP32 (1):\n  up/kernel  {reason}", plan.table())
      self.assertEqual(opq_tf.CompressionPlan.from_json(plan.to_json()), plan)
      with tempfile.TemporaryDirectory() as directory:
        report = opq_tf.export(opq_tf.apply(model, plan),
                               os.path.join(directory, "out"),
                               formats=("packed",), plan=plan)
        with open(os.path.join(directory, "out", "report.json")) as f:
          written = json.load(f)
      self.assertEqual(report["fp32"], {"up/kernel": reason}, frontend)
      self.assertEqual(written["fp32"], {"up/kernel": reason}, frontend)
      self.assertEqual(written["plan"]["fp32"], {"up/kernel": reason})

  @parameterized.named_parameters(
      ("conv", _twins, lambda: keras3_models.images(96, seed=3), True),
      ("attention", _attention_twins,
       lambda: keras3_models.sequences(96, seed=3), False))
  def test_calibration_agrees(self, make_twins, make_samples, batchnorm):
    """BatchNorm statistics within 1e-4 (relative), >= 98% of the codes equal
    and output errors within 5% of each other: the statistics are float32
    sums in each framework's order, so a code at a rounding boundary may
    fall either way, and each flip moves the later layers' inputs a little."""
    twin, model = make_twins()
    plan = opq_tf.allocate(twin, pruning_rate=0.6, bits=4)
    tf_keras_q = opq_tf.apply(twin, plan)
    keras3_q = opq_tf.apply(model, plan)
    samples = make_samples()
    tf_keras_report, keras3_report = (
        opq_tf.calibrate(qmodel, samples, batchnorm=batchnorm,
                         reconstruct=True, batch_size=32, verbose=False)
        for qmodel in (tf_keras_q, keras3_q))
    if batchnorm:
      for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            getattr(keras3_q.get_layer("bn"), name).numpy(),
            getattr(tf_keras_q.get_layer("bn"), name).numpy(),
            rtol=1e-4, atol=1e-6, err_msg=name)
    expected = {k.key: k for k in tf_keras_wrapping.compressed_kernels(
        tf_keras_q)}
    for kernel in keras3_wrapping.compressed_kernels(keras3_q):
      equal = np.mean(kernel.codes == expected[kernel.key].codes)
      self.assertGreaterEqual(equal, 0.98, kernel.key)
    rows = keras3_report.kernels
    self.assertEqual(list(rows), list(tf_keras_report.kernels))
    self.assertIn("reconstructed", {row.method for row in rows.values()})
    for key, row in tf_keras_report.kernels.items():
      self.assertEqual(rows[key].method, row.method, key)
      self.assertAlmostEqual(rows[key].error_before, row.error_before,
                             delta=0.05 * row.error_before, msg=key)
      self.assertAlmostEqual(rows[key].error_after, row.error_after,
                             delta=0.05 * row.error_after, msg=key)


if __name__ == "__main__":
  absltest.main()
