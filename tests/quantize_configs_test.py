"""Tests for opq_tf.tf_keras.quantize_configs: OPQQuantizeConfig and register_layer."""

import os
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

import opq_tf
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras._keras import keras, tf, tfmot
from opq_tf.tf_keras.quantize_configs import OPQQuantizeConfig
from opq_tf.tf_keras.quantize_configs import OPQQuantizeRegistry
from opq_tf.tf_keras.quantize_configs import register_layer
from opq_tf.tf_keras.scheme import OPQQuantizeScheme
from opq_tf.tf_keras.quantizers import OPQWeightQuantizer


class ScaledDense(keras.layers.Dense):
  """A user's Dense subclass (not compressed unless registered)."""

  def __init__(self, units, scale=2.0, **kwargs):
    super().__init__(units, **kwargs)
    self.scale = scale

  def call(self, inputs):
    return super().call(inputs) * self.scale

  def get_config(self):
    return {**super().get_config(), "scale": self.scale}


def _separable_config(quantize_activations=False):
  return OPQQuantizeConfig(
      {"depthwise_kernel": OPQWeightQuantizer(3, 0.1, 0.05),
       "pointwise_kernel": OPQWeightQuantizer(4, 0.2, 0.1)},
      quantize_activations)


class OPQQuantizeConfigTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tf.random.set_seed(0)

  def test_weights_and_quantizers_per_attribute(self):
    layer = keras.layers.SeparableConv2D(4, 3)
    layer.build((None, 8, 8, 3))
    config = _separable_config()
    pairs = config.get_weights_and_quantizers(layer)
    self.assertEqual([weight.name for weight, _ in pairs],
                     [layer.depthwise_kernel.name, layer.pointwise_kernel.name])
    self.assertEqual([quantizer.bits for _, quantizer in pairs], [3, 4])
    replacement = [tf.zeros(layer.depthwise_kernel.shape),
                   tf.ones(layer.pointwise_kernel.shape)]
    config.set_quantize_weights(layer, replacement)
    self.assertIs(layer.depthwise_kernel, replacement[0])
    self.assertIs(layer.pointwise_kernel, replacement[1])
    with self.assertRaisesRegex(ValueError, "got 1 quantized weights"):
      config.set_quantize_weights(layer, replacement[:1])

  def test_activations_fp32_by_default(self):
    layer = keras.layers.Dense(2)
    config = _separable_config()
    self.assertEqual(config.get_activations_and_quantizers(layer), [])
    self.assertEqual(config.get_output_quantizers(layer), [])

  def test_quantize_activations_uses_tfmot_moving_average_8bit(self):
    quantizers = _separable_config(True).get_output_quantizers(None)
    self.assertEqual(quantizers, [
        tfmot.quantization.keras.quantizers.MovingAverageQuantizer(
            num_bits=8, per_axis=False, symmetric=False, narrow_range=False)])

  def test_config_round_trip_through_keras_serialization(self):
    config = _separable_config(True)
    serialized = keras.utils.legacy.serialize_keras_object(config)
    self.assertEqual(serialized["class_name"], "opq_tf>OPQQuantizeConfig")
    with tfmot.quantization.keras.quantize_scope():
      restored = keras.utils.legacy.deserialize_keras_object(serialized)
    self.assertEqual(restored, config)
    self.assertEqual(restored.weight_attrs,
                     ("depthwise_kernel", "pointwise_kernel"))
    self.assertEqual(restored.weight_quantizers["pointwise_kernel"],
                     OPQWeightQuantizer(4, 0.2, 0.1))
    self.assertTrue(restored.quantize_activations)


class MyDepthwise(keras.layers.DepthwiseConv2D):
  """A user's depthwise-like layer (not compressed unless registered)."""


class RegisterLayerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    tf.random.set_seed(0)
    saved = dict(layers_lib.KERNELS)
    self.addCleanup(lambda: (layers_lib.KERNELS.clear(),
                             layers_lib.KERNELS.update(saved)))

  def _model(self):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(16, activation="relu", name="dense")(inputs)
    return keras.Model(inputs, ScaledDense(3, scale=0.5, name="scaled")(x))

  def test_unregistered_subclass_is_not_compressed(self):
    self.assertEqual(list(layers_lib.compressible_kernels(self._model())),
                     ["dense/kernel"])

  def test_registered_subclass_is_compressed(self):
    register_layer(ScaledDense, ["kernel"])
    model = self._model()
    self.assertEqual(list(layers_lib.compressible_kernels(model)),
                     ["dense/kernel", "scaled/kernel"])
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=3)
    wrapper = qmodel.get_layer("quant_scaled")
    self.assertIsInstance(wrapper.layer, ScaledDense)
    entries = {e.key: e for e in wrapping.compressed_kernels(qmodel)}
    entry = entries["scaled/kernel"]
    np.testing.assert_array_equal(entry.mask,
                                  np.abs(entry.kernel) >= entry.threshold)
    self.assertFalse(entry.mask.all())
    inputs = np.random.RandomState(0).normal(size=(5, 6)).astype(np.float32)
    stripped = opq_tf.strip(qmodel)
    self.assertIsInstance(stripped.get_layer("scaled"), ScaledDense)
    np.testing.assert_array_equal(stripped.get_layer("scaled").kernel.numpy(),
                                  entry.compressed)
    np.testing.assert_allclose(stripped(inputs).numpy(), qmodel(inputs).numpy(),
                               atol=1e-5)

  def test_the_schemes_registry_sees_a_registered_kind_and_apply_uses_it(
      self):
    model = self._model()
    scaled = model.get_layer("scaled")
    self.assertFalse(
        OPQQuantizeScheme().get_quantize_registry().supports(scaled))
    register_layer(ScaledDense, ["kernel"])
    plan = opq_tf.allocate(model, pruning_rate=0.5, bits=3)
    scheme = OPQQuantizeScheme(plan)
    self.assertIsInstance(scheme, tfmot.quantization.keras.QuantizeScheme)
    registry = scheme.get_quantize_registry()
    self.assertIsInstance(registry, tfmot.quantization.keras.QuantizeRegistry)
    self.assertTrue(registry.supports(scaled))
    config = registry.get_quantize_config(scaled)
    self.assertEqual(config.weight_attrs, ("kernel",))
    self.assertEqual(config.weight_quantizers["kernel"].threshold,
                     plan.by_key()["scaled/kernel"].threshold)

    asked = []
    real = OPQQuantizeRegistry.get_quantize_config

    def recorded(registry, layer):
      asked.append(layer.name)
      return real(registry, layer)

    with mock.patch.object(OPQQuantizeRegistry, "get_quantize_config",
                           autospec=True, side_effect=recorded):
      qmodel = opq_tf.apply(model, plan)
    self.assertEqual(asked, ["dense", "scaled"])
    self.assertEqual(qmodel.get_layer("quant_scaled").quantize_config, config)
    with self.assertRaisesRegex(ValueError, "Conv2DTranspose.*register_layer"):
      registry.get_quantize_config(keras.layers.Conv2DTranspose(2, 3))

  def test_registered_channel_axes_reach_the_allocation(self):
    # A depthwise-like layer registered with channel axes (-2, -1) gets the
    # per-channel statistics and steps of a DepthwiseConv2D with the same
    # kernel; registered with the default (-1,) it does not.
    rng = np.random.default_rng(0)
    values = (rng.laplace(size=(3, 3, 6, 2))
              * np.geomspace(0.01, 1.0, 12).reshape(6, 2)).astype(np.float32)

    def model_with(layer):
      inputs = keras.Input((8, 8, 6))
      model = keras.Model(inputs, layer(inputs))
      layer.depthwise_kernel.assign(values)
      return model

    reference = opq_tf.allocate(
        model_with(keras.layers.DepthwiseConv2D(3, depth_multiplier=2,
                                                name="dw")),
        0.5, 4).kernels[0]
    register_layer(MyDepthwise, {"depthwise_kernel": (-2, -1)})
    mine = opq_tf.allocate(
        model_with(MyDepthwise(3, depth_multiplier=2, name="dw")),
        0.5, 4).kernels[0]
    self.assertEqual(mine.channel_axes, (-2, -1))
    self.assertEqual(mine.step, reference.step)
    self.assertEqual(np.shape(mine.step), (12,))
    register_layer(MyDepthwise, {"depthwise_kernel": (-1,)})
    last_axis = opq_tf.allocate(
        model_with(MyDepthwise(3, depth_multiplier=2, name="dw")),
        0.5, 4).kernels[0]
    self.assertEqual(np.shape(last_axis.step), (2,))

  def test_registered_kind_is_handled_everywhere_or_refused_by_name(self):
    register_layer(ScaledDense, ["kernel"])
    model = self._model()
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=3)
    images = np.random.RandomState(0).normal(size=(64, 6)).astype(np.float32)

    # Both kernels, no bias.
    self.assertEqual([tuple(v.shape) for v in layers_lib.decayed_weights(qmodel)],
                     [(6, 16), (16, 3)])
    report = opq_tf.calibrate(qmodel, images, batchnorm=False,
                              reconstruct=True, min_samples_per_weight=1.0)
    row = report.kernels["scaled/kernel"]
    self.assertEqual(row.method, "plain rounding")
    self.assertIn("like=", row.reason)
    self.assertIsNotNone(report.kernels["dense/kernel"].error_after)
    directory = os.path.join(tempfile.mkdtemp(), "out")
    with self.assertRaisesRegex(ValueError, "ScaledDense names no LiteRT op"):
      opq_tf.export(qmodel, directory, formats=("packed", "litert"))
    self.assertFalse(os.path.exists(directory))
    opq_tf.export(qmodel, directory, formats=("packed",))
    rebuilt = opq_tf.load_packed(os.path.join(directory, "model.opq"),
                                 self._model)
    np.testing.assert_array_equal(rebuilt(images), opq_tf.strip(qmodel)(images))

  def test_registered_like_a_dense_reconstructs_and_converts(self):
    register_layer(ScaledDense, ["kernel"], like=keras.layers.Dense)
    qmodel = opq_tf.apply(self._model(), pruning_rate=0.5, bits=3)
    images = np.random.RandomState(0).normal(size=(64, 6)).astype(np.float32)
    report = opq_tf.calibrate(qmodel, images, batchnorm=False,
                              reconstruct=True, min_samples_per_weight=1.0)
    self.assertNotIn("like=", report.kernels["scaled/kernel"].reason)
    self.assertIsNotNone(report.kernels["scaled/kernel"].error_after)
    exported = opq_tf.export(qmodel, os.path.join(tempfile.mkdtemp(), "out"),
                             formats=("packed", "litert"))
    self.assertEqual(exported["litert"]["kernels_int8"], 2)

  def test_like_must_have_the_same_weights(self):
    with self.assertRaisesRegex(ValueError, "has no compressed weight 'taps'"):
      register_layer(ScaledDense, ["taps"], like=keras.layers.Dense)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(TypeError, "pass the class itself"):
      register_layer(ScaledDense(2), ["kernel"])
    with self.assertRaisesRegex(ValueError, "non-empty list"):
      register_layer(ScaledDense, "kernel")
    with self.assertRaisesRegex(ValueError, r"trailing axes .*\(-2, -1\)"):
      register_layer(ScaledDense, {"kernel": (0,)})


if __name__ == "__main__":
  absltest.main()
