"""Tests for benchmarks/tfmot_baselines.py: tfmot's flow on the product's model.

small_resnet has an input Rescaling layer, which whole-model tfmot wrapping
refuses; the baseline must still prune, strip and quantize it.
"""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from benchmarks import tfmot_baselines
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.training import models
from opq_tf.tf_keras._keras import keras, tf


def _small_resnet() -> keras.Model:
  keras.utils.set_random_seed(0)
  return models.build("small_resnet", num_classes=10, image_size=16)


class MagnitudeQuantizedKernelsTest(parameterized.TestCase):

  @parameterized.parameters((0.5, 8), (0.9, 4), (0.97, 2))
  def test_prunes_each_kernel_to_p_and_lands_on_its_grid(self, pruning_rate,
                                                         bits):
    rng = np.random.default_rng(0)
    kernels = {"conv/kernel": rng.laplace(size=(3, 3, 4, 8)).astype(np.float32),
               "dense/kernel": rng.laplace(size=(32, 10)).astype(np.float32)}
    compressed = tfmot_baselines.magnitude_quantized_kernels(
        kernels, pruning_rate, bits)
    max_code = 2**(bits - 1) - 1
    for key, value in compressed.items():
      self.assertEqual(value.shape, kernels[key].shape)
      # Rounding can zero a few more weights than the mask; never fewer.
      self.assertGreaterEqual(np.mean(value == 0), pruning_rate - 0.01, key)
      axes = (0, 1, 2) if value.ndim == 4 else None
      scale = np.max(np.abs(value), axis=axes) / max_code
      codes = value / np.where(scale > 0, scale, 1.0)
      np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
      self.assertLessEqual(np.max(np.abs(codes)), max_code + 1e-4)


class FlowTest(parameterized.TestCase):

  def test_prune_masks_only_compressible_layers_and_apply_masks_zeroes(self):
    model = _small_resnet()
    pruned = tfmot_baselines.pruned_for_timing(model, 0.75)
    wrapped = [layer for layer in pruned.layers
               if hasattr(layer, "pruning_vars")]
    self.assertLen(wrapped, len(layers_lib.compressible_kernels(model)))
    images = tf.random.uniform((2, 16, 16, 3), maxval=255.0)
    pruned(images, training=True)  # Computes the masks (begin_step=1).
    for layer in wrapped:
      for weight, _, _ in layer.pruning_vars:
        weight.assign_add(tf.ones_like(weight))  # As a gradient step would.
    tfmot_baselines.apply_masks(pruned)
    for layer in wrapped:
      for weight, mask, _ in layer.pruning_vars:
        np.testing.assert_array_equal(weight.numpy()[mask.numpy() == 0], 0.0)
        self.assertAlmostEqual(float(np.mean(mask.numpy() == 0)), 0.75,
                               delta=0.01)

  @parameterized.parameters(8, 4)
  def test_strip_quantize_reads_back_kernels_and_packs(self, bits):
    model = _small_resnet()
    images = tf.random.uniform((2, 16, 16, 3), maxval=255.0)
    pruned = tfmot_baselines.pruned_for_timing(model, 0.5)
    pruned(images, training=True)
    tfmot_baselines.apply_masks(pruned)
    qmodel = tfmot_baselines.quantize(tfmot_baselines.strip(pruned), bits)
    self.assertEqual(qmodel(images, training=False).shape, (2, 10))
    # tfmot's weight quantizers set their ranges from the weights in a
    # training call (finetuning's first step); before it every range is the
    # initial [-6, 6], which rounds every 4-bit weight to 0.
    qmodel(images, training=True)
    final = tfmot_baselines.final_kernels(qmodel)
    self.assertEqual(set(final), set(layers_lib.compressible_kernels(model)))
    for key, (value, scale, kernel_bits) in final.items():
      # tfmot's quantizer at the asked bit-width, not a silent 8-bit
      # fall-back: every value is scale * an integer code in [-K, K].
      self.assertEqual(kernel_bits, bits, key)
      codes = value / np.where(scale > 0, scale, 1.0)
      np.testing.assert_allclose(codes, np.round(codes), atol=1e-3,
                                 err_msg=key)
      self.assertLessEqual(np.abs(codes).max(), 2**(bits - 1) - 1 + 1e-3, key)
      self.assertGreater(len(np.unique(np.round(codes))), 2, key)
      # Before any finetuning the pruned zeros are still zero: a symmetric
      # quantizer maps 0 to code 0 (PQAT keeps them at 8 bits later too).
      self.assertGreaterEqual(np.mean(value == 0), 0.5 - 0.01, key)
    path = os.path.join(tempfile.mkdtemp(), "tfmot.opq")
    ratio, packed_bytes = tfmot_baselines.packed_model_ratio(model, final, path)
    self.assertEqual(os.path.getsize(path), packed_bytes)
    self.assertGreater(ratio, 1.0)


if __name__ == "__main__":
  absltest.main()
