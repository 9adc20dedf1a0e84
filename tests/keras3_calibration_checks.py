"""Keras 3 calibration's graph walk on one backend: run as a script.

tests/keras3_calibration_test.py runs this file once per backend
(TensorFlow, JAX, PyTorch) in a subprocess with KERAS_BACKEND set, since
Keras fixes its backend per process. Not collected by pytest itself (no
`_test.py` suffix). Tiny real models, seeded: each check takes seconds.
"""

import collections
import os
import sys

from absl.testing import absltest
import numpy as np

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]  # keras3_models, opq_tf

import keras  # noqa: E402

import keras3_models as models  # noqa: E402
import opq_tf  # noqa: E402
from opq_tf.core import activations  # noqa: E402
from opq_tf.core import grid  # noqa: E402
from opq_tf.keras3 import calibration  # noqa: E402
from opq_tf.keras3 import layers as layers_lib  # noqa: E402
from opq_tf.keras3 import wrapping  # noqa: E402

_SHAPE = (8, 8, 3)


def _conv_bn(x, filters: int, name: str, kernel_size: int = 3,
             strides: int = 1, relu: bool = True):
  x = keras.layers.Conv2D(filters, kernel_size, strides=strides,
                          padding="same", use_bias=False, name=name)(x)
  x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
  return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _branching_model() -> keras.Model:
  """A stem, a residual block (identity shortcut), a ResNet bottleneck with
  a projection shortcut, a nested Functional block with its own residual,
  and a classifier: every kind of branch the walk must follow."""
  inner_inputs = keras.Input((4, 4, 12))
  y = keras.layers.DepthwiseConv2D(3, padding="same", name="inner_dw")(
      inner_inputs)
  y = keras.layers.Conv2D(12, 1, name="inner_pw")(y)
  inner = keras.Model(inner_inputs, keras.layers.Add(name="inner_add")(
      [inner_inputs, y]), name="inner_block")

  inputs = keras.Input(_SHAPE, name="images")
  x = _conv_bn(inputs, 8, "stem")
  shortcut = x
  x = _conv_bn(x, 8, "res_a")
  x = _conv_bn(x, 8, "res_b", relu=False)
  x = keras.layers.ReLU(name="res_out")(keras.layers.Add(name="res_add")(
      [shortcut, x]))
  shortcut = _conv_bn(x, 12, "proj", kernel_size=1, strides=2, relu=False)
  x = _conv_bn(x, 6, "bottle_a", kernel_size=1)
  x = _conv_bn(x, 6, "bottle_b", strides=2)
  x = _conv_bn(x, 12, "bottle_c", kernel_size=1, relu=False)
  x = keras.layers.ReLU(name="bottle_out")(x + shortcut)  # an op node
  x = inner(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  return keras.Model(inputs, keras.layers.Dense(5, name="logits")(x),
                     name="branching")


def _images(count: int, seed: int) -> np.ndarray:
  """Smooth random images (upsampled noise): correlated neighbouring pixels,
  so least squares has something to gain over rounding."""
  coarse = np.random.RandomState(seed).normal(size=(count, 4, 4, 3))
  return np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2).astype(np.float32)


def _randomized(model: keras.Model, data: np.ndarray) -> keras.Model:
  """Seeded random weights, then BatchNorm statistics of `data`, so the FP32
  network is a sensible reference for the compressed one."""
  models.randomize(model)
  bn_layers = [entry.layer for entry in layers_lib.iter_layers(model)
               if isinstance(entry.layer, keras.layers.BatchNormalization)]
  if bn_layers:
    calibration._reestimate_batchnorm(  # pylint: disable=protected-access
        model, bn_layers, [data[i:i + 32] for i in range(0, len(data), 32)])
  return model


def _predict(model, data) -> np.ndarray:
  return keras.ops.convert_to_numpy(model(data, training=False))


def _relative_error(outputs, reference) -> float:
  return float(np.sum((outputs - reference)**2) / np.sum(reference**2))


class CalibrationWalkTest(absltest.TestCase):

  def test_branching_model_reconstructs_every_kernel_on_its_grid(self):
    keras.utils.set_random_seed(0)
    data, held_out = _images(128, seed=0), _images(64, seed=1)
    model = _randomized(_branching_model(), data)
    plan = opq_tf.allocate(model, pruning_rate=0.5, bits=3)
    bn_only, reconstructed = opq_tf.apply(model, plan), opq_tf.apply(model,
                                                                     plan)
    before = {k.key: k for k in wrapping.compressed_kernels(reconstructed)}
    # Equal batches: each new shape costs an eager JAX backend a compile.
    opq_tf.calibrate(bn_only, data, batch_size=64, verbose=False)
    report = opq_tf.calibrate(reconstructed, data, reconstruct=True,
                              batch_size=64, verbose=False)

    self.assertEqual(list(report.kernels), list(before))
    self.assertLen(before, 10)  # 8 convs (2 in the nested block) + Dense
    for key, row in report.kernels.items():
      self.assertEqual(row.method, "reconstructed", f"{key}: {row}")
    after = wrapping.compressed_kernels(reconstructed)
    for kernel in after:
      np.testing.assert_array_equal(kernel.mask, before[kernel.key].mask,
                                    kernel.key)
      np.testing.assert_array_equal(kernel.compressed[~kernel.mask], 0,
                                    kernel.key)
      np.testing.assert_array_equal(
          grid.compress(kernel.kernel, kernel.step, kernel.bits, kernel.mask),
          kernel.compressed, kernel.key)
      # Latent weights off the grid: finetuning can move a code.
      kept = kernel.mask
      self.assertGreater(
          np.mean(kernel.kernel[kept] != kernel.compressed[kept]), 0.5,
          kernel.key)
    self.assertTrue(any(not np.array_equal(k.codes, before[k.key].codes)
                        for k in after))
    fp32 = _predict(model, held_out)
    self.assertLess(
        _relative_error(_predict(reconstructed, held_out), fp32),
        0.8 * _relative_error(_predict(bn_only, held_out), fp32))

  def test_steps_reproduce_the_forward_pass(self):
    """The walk's steps, run from the inputs, give the model's outputs
    exactly, nested Functional and Sequential models included."""
    sequential = keras.Sequential(
        [keras.Input(_SHAPE), keras.layers.Conv2D(4, 3, name="seq_conv"),
         keras.layers.Flatten(name="seq_flatten"),
         keras.layers.Dense(3, name="seq_dense")], name="sequential")
    inputs = keras.Input(_SHAPE)
    branching = _branching_model()
    outputs = keras.layers.Concatenate(name="both")(
        [branching(inputs), sequential(inputs)])
    model = models.randomize(keras.Model(inputs, outputs))
    for case in (model, sequential):
      input_keys, steps = calibration._steps(case)  # pylint: disable=protected-access
      batch = _images(4, seed=2)
      values = {input_keys[0]: batch}
      for step in steps:
        values.update(zip(step.outputs, calibration._run_step(step, values)))  # pylint: disable=protected-access
      self.assertNotIn(case.name, [step.operation.name for step in steps])
      np.testing.assert_allclose(
          keras.ops.convert_to_numpy(values[step.outputs[0]]),
          _predict(case, batch), rtol=1e-6, atol=1e-6)

  def test_each_layer_runs_a_constant_number_of_times_per_batch(self):
    """Linear cost, counted, not timed: on a 12-layer residual network each
    layer's call runs at most twice per batch and network (its outputs, and
    once cut short for its kernel's input), plus once for the call order,
    independently of its depth; re-running the prefix for every kernel ran
    the first layer 2 * 12 times per batch."""
    depth, batch_size, count = 12, 16, 64
    inputs = keras.Input((6,))
    x = keras.layers.Dense(6, name="dense_0")(inputs)
    for index in range(1, depth):
      y = keras.layers.Dense(6, name=f"dense_{index}")(x)
      x = keras.layers.Add(name=f"add_{index}")([x, y])
    model = models.randomize(keras.Model(inputs, x))
    data = np.random.RandomState(0).normal(size=(count, 6)).astype(np.float32)
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=4)
    calls = collections.Counter()

    def counted(layer):
      original = layer.call

      def call(*args, **kwargs):
        calls[layer.name] += 1
        return original(*args, **kwargs)

      return call

    layers = [layer for layer in qmodel.layers
              if not isinstance(layer, keras.layers.InputLayer)]
    for layer in layers:
      object.__setattr__(layer, "call", counted(layer))
    report = opq_tf.calibrate(qmodel, data, reconstruct=True, batchnorm=False,
                              batch_size=batch_size, verbose=False)
    for layer in layers:
      object.__delattr__(layer, "call")

    self.assertLen(report.kernels, depth)
    self.assertTrue(all(row.method != "plain rounding" or "lower" in row.reason
                        for row in report.kernels.values()), report.table())
    batches = count // batch_size
    bound = 2 * 2 * batches + 1
    self.assertEqual(calls["dense_0"], bound)  # the walk reached it all
    for layer in layers:
      self.assertLessEqual(calls[layer.name], bound, layer.name)
    self.assertLessEqual(sum(calls.values()), len(layers) * bound)

  def test_sublayer_kernels_are_reconstructed(self):
    """MultiHeadAttention's projections and a custom block's Dense and
    EinsumDense sublayers: inputs caught inside their node's one call."""
    model = models.randomize(models.encoder_model())
    mixing = np.random.RandomState(1).normal(size=(8, 8)) / 3
    data = (models.sequences(128) @ mixing).astype(np.float32)
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=3)
    rows = opq_tf.calibrate(qmodel, data, reconstruct=True, batchnorm=False,
                            batch_size=64, verbose=False).kernels
    for key in ("block/attention/_output_dense/kernel",
                "block/intermediate/kernel", "block/projection/kernel",
                "mha/_output_dense/kernel"):
      self.assertEqual(rows[key].method, "reconstructed", f"{key}: {rows[key]}")
      self.assertLess(rows[key].error_after, rows[key].error_before, key)

  def test_depthwise_patches_are_the_im2col_patches_per_channel(self):
    random = np.random.RandomState(0)
    for layer in (keras.layers.DepthwiseConv2D(3, strides=2, padding="same"),
                  keras.layers.DepthwiseConv2D((2, 3), dilation_rate=2)):
      inputs = random.normal(size=(2, 9, 8, 4)).astype(np.float32)
      layer.build(inputs.shape)
      patches = keras.ops.convert_to_numpy(calibration._patches_fn(  # pylint: disable=protected-access
          layer, layer.kernel_size)(inputs))
      spatial = int(np.prod(layer.kernel_size))
      expected = patches.reshape(-1, spatial, 4).transpose(2, 0, 1)
      got = calibration._depthwise_patches_fn(  # pylint: disable=protected-access
          layer, layer.kernel_size, 4)(inputs)
      np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), expected)

  def test_disk_cache_gives_the_same_kernels(self):
    """With no memory budget every cached activation goes to disk (memory
    stays bounded), and the result is the same to the bit."""
    data = _images(64, seed=0)
    model = _randomized(_branching_model(), data)
    plan = opq_tf.allocate(model, pruning_rate=0.5, bits=3)
    went_to_disk = []
    cache_class = activations.ActivationCache

    class Recorded(cache_class):

      def close(self):
        went_to_disk.append(self.on_disk)
        super().close()

    results = []
    for cache_bytes in (calibration._CACHE_BYTES, 0):  # pylint: disable=protected-access
      qmodel = opq_tf.apply(model, plan)
      original = calibration._CACHE_BYTES  # pylint: disable=protected-access
      calibration._CACHE_BYTES = cache_bytes  # pylint: disable=protected-access
      activations.ActivationCache = Recorded
      try:
        opq_tf.calibrate(qmodel, data, reconstruct=True, batch_size=32,
                         verbose=False)
      finally:
        calibration._CACHE_BYTES = original  # pylint: disable=protected-access
        activations.ActivationCache = cache_class
      results.append(wrapping.compressed_kernels(qmodel))
    self.assertEqual(went_to_disk, [False, True])
    for in_memory, on_disk in zip(*results):
      np.testing.assert_array_equal(in_memory.codes, on_disk.codes,
                                    in_memory.key)


if __name__ == "__main__":
  absltest.main()
