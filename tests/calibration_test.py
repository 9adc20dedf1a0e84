"""Tests for opq_tf.calibrate: BatchNorm re-estimation and reconstruction."""

import contextlib
import io
import os
from unittest import mock
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import opq_tf
from opq_tf.core import activations
from opq_tf.core import reconstruction
from opq_tf.tf_keras import calibration
from opq_tf.tf_keras import wrapping
from opq_tf.core import grid
import cpu_devices
from opq_tf.tf_keras._keras import keras, tf

cpu_devices.split_cpu()


def _bn_model() -> keras.Model:
  """Conv-BN-ReLU, depthwise-BN, separable, dense: every BN after a kernel."""
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
  x = keras.layers.BatchNormalization(name="bn_depthwise")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.SeparableConv2D(16, 3, strides=2, name="separable")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dense(8, name="dense")(x)
  x = keras.layers.BatchNormalization(name="bn_dense")(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def _images(count=120, seed=0, shape=(8, 8, 3)) -> np.ndarray:
  return np.random.RandomState(seed).uniform(
      -1, 1, (count,) + shape).astype(np.float32)


def _trained(model_fn, steps=5) -> keras.Model:
  """A few SGD steps, so that BN statistics and kernels are not at init."""
  model = model_fn()
  images = _images(160, seed=1, shape=tuple(model.inputs[0].shape[1:]))
  labels = np.arange(160) % 3
  model.compile(keras.optimizers.SGD(0.05),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(images, labels, batch_size=32, epochs=steps, verbose=0)
  return model


# id(stripped model) -> the CompressedKernels of the wrapped model it came
# from, which calibrate needs for a plain model (`kernels=`).
_KERNELS = {}


def _calibrate(model, data, **options):
  return calibration.calibrate(model, data, kernels=_KERNELS.get(id(model)),
                               **options)


def _strip(qmodel) -> keras.Model:
  stripped = opq_tf.strip(qmodel)
  _KERNELS[id(stripped)] = wrapping.compressed_kernels(qmodel)
  return stripped


def _weights(model) -> list[np.ndarray]:
  return [w.numpy().copy() for w in model.weights]


def _kernel_state(model) -> dict:
  """key -> (compressed kernel as the model uses it, mask, step, bits)."""
  state = {}
  for kernel in calibration._compressed_kernels(model, _KERNELS.get(id(model))):  # pylint: disable=protected-access
    if kernel.wrapped:
      wrapper = kernel.node_layer
      index = wrapper.quantize_config.weight_attrs.index(kernel.path)
      _, quantizer, variables = wrapper._weight_vars[index]  # pylint: disable=protected-access
      used = quantizer(kernel.variable, False, variables).numpy()
    else:
      used = kernel.variable.numpy()
    state[kernel.key] = (used, kernel.mask.copy(),
                         np.broadcast_to(kernel.step, used.shape).copy(),
                         kernel.bits)
  return state


def _expected_batchnorm(model, images, batch_size) -> dict:
  """Independently: BN inputs in Keras training mode, moments in NumPy,
  averaged over batches weighted by batch size (unbiased variance)."""
  bns = [l for l in model.layers
         if isinstance(l, keras.layers.BatchNormalization)]
  probe = keras.Model(model.inputs,
                      [calibration._layer_input(model, bn) for bn in bns])  # pylint: disable=protected-access
  sums = {bn.name: [0.0, 0.0, 0] for bn in bns}
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    outputs = probe(batch, training=True)  # batch statistics everywhere
    for bn, values in zip(bns, outputs):
      values = values.numpy().astype(np.float64)
      values = values.reshape(-1, values.shape[-1])
      sums[bn.name][0] += len(batch) * values.mean(0)
      sums[bn.name][1] += len(batch) * values.var(0, ddof=1)
      sums[bn.name][2] += len(batch)
  return {name: (m / n, v / n) for name, (m, v, n) in sums.items()}


class BatchNormTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)

  @parameterized.named_parameters(("wrapped", False), ("stripped", True))
  def test_moving_statistics_are_the_average_batch_statistics(self, strip):
    qmodel = opq_tf.apply(_trained(_bn_model), pruning_rate=0.6, bits=3)
    model = _strip(qmodel) if strip else qmodel
    images = _images(100)
    before = _weights(model)
    expected = _expected_batchnorm(model, images, batch_size=40)
    # The probe ran in training mode, which moved the moving averages: reset.
    for weight, value in zip(model.weights, before):
      weight.assign(value)
    moving_before = {layer.name: layer.moving_variance.numpy()
                     for layer in model.layers
                     if isinstance(layer, keras.layers.BatchNormalization)}

    model_report = _calibrate(model, images, batch_size=40)

    for name, (mean, variance) in expected.items():
      layer = model.get_layer(name)
      np.testing.assert_allclose(layer.moving_mean.numpy(), mean,
                                 rtol=1e-4, atol=1e-5, err_msg=name)
      np.testing.assert_allclose(layer.moving_variance.numpy(), variance,
                                 rtol=1e-4, atol=1e-6, err_msg=name)
      self.assertGreater(np.abs(layer.moving_variance.numpy()
                                - moving_before[name]).max(), 1e-3, name)
    # Nothing but the moving statistics changed: not gamma/beta, kernels,
    # masks, steps.
    for weight, value in zip(model.weights, before):
      if "moving_" not in weight.name:
        np.testing.assert_array_equal(weight.numpy(), value,
                                      err_msg=weight.name)
    self.assertEqual(model_report.batchnorm_layers,
                     ("bn", "bn_depthwise", "bn_dense"))
    self.assertEqual(model_report.kernels, {})

  @parameterized.named_parameters(
      ("array", lambda x, y: x),
      ("unbatched_images", lambda x, y: tf.data.Dataset.from_tensor_slices(x)),
      ("batched_pairs",
       lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(7)),
      ("unbatched_triples",
       lambda x, y: tf.data.Dataset.from_tensor_slices((x, y, y))),
  )
  def test_data_forms_give_the_same_statistics(self, make_data):
    reference = opq_tf.apply(_trained(_bn_model), pruning_rate=0.6, bits=3)
    images, labels = _images(90), np.arange(90) % 3
    _calibrate(reference, images, max_images=64)
    expected = _weights(reference)

    model = opq_tf.apply(_trained(_bn_model), pruning_rate=0.6, bits=3)
    for weight, value in zip(model.weights, _weights(reference)):
      weight.assign(value)
    model_report = _calibrate(model, make_data(images, labels), max_images=64)

    self.assertEqual(model_report.images, 64)
    for got, want in zip(_weights(model), expected):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_model_without_batchnorm_warns_and_is_unchanged(self):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(x))
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=4)
    before = _weights(qmodel)

    with self.assertWarnsRegex(UserWarning, "no BatchNormalization"):
      _calibrate(qmodel, _images(20))

    for got, want in zip(_weights(qmodel), before):
      np.testing.assert_array_equal(got, want)


def _single_layer_model(kind: str) -> tuple[keras.Model, tuple]:
  """One compressed layer fed by the input, so X is the input itself."""
  shapes = {"conv1d": (12, 6), "conv1d_causal": (12, 6), "dense3d": (5, 24),
            "separable": (9, 9, 16)}
  shape = shapes.get(kind, (9, 9, 6))
  inputs = keras.Input(shape)
  layer = {
      "conv_same_strided": keras.layers.Conv2D(12, 3, strides=2,
                                               padding="same"),
      "conv_valid_dilated": keras.layers.Conv2D(12, 3, dilation_rate=2),
      "conv_1x1": keras.layers.Conv2D(12, 1),
      "conv1d_causal": keras.layers.Conv1D(12, 3, padding="causal"),
      "conv1d": keras.layers.Conv1D(12, 3, strides=2),
      "dense3d": keras.layers.Dense(12),
      "depthwise": keras.layers.DepthwiseConv2D(3, depth_multiplier=2,
                                                padding="same"),
      "separable": keras.layers.SeparableConv2D(12, 3, strides=2,
                                                padding="same"),
  }[kind]
  return keras.Model(inputs, layer(inputs)), shape


def _correlated_inputs(count, shape, seed=0) -> np.ndarray:
  """Inputs correlated across channels and neighbouring positions, as image
  features are: without correlation H is diagonal and error feedback has
  nothing to work with."""
  random = np.random.RandomState(seed)
  base = random.normal(size=(count,) + shape[:-1] + (2,))
  for axis in range(1, len(shape)):  # 3-wide box filter along each position
    base = (np.roll(base, 1, axis) + base + np.roll(base, -1, axis)) / 3
  mixing = random.normal(size=(2, shape[-1]))
  noise = 0.1 * random.normal(size=(count,) + shape)
  return (base @ mixing + noise).astype(np.float32)


def _output_error(fp32_model, model, images) -> float:
  """||y - y_hat||^2 / ||y - bias||^2 of a single-layer model."""
  bias = fp32_model.layers[-1].bias.numpy()
  reference = fp32_model(images).numpy()
  return float(np.sum((reference - model(images).numpy()) ** 2)
               / np.sum((reference - bias) ** 2))


class ReconstructTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)

  def _assert_compressed(self, before: dict, after: dict):
    """Masks and steps unchanged, pruned exactly 0, kept on the grid."""
    self.assertEqual(set(before), set(after))
    moved = 0
    for key, (kernel, mask, step, bits) in before.items():
      new_kernel, new_mask, new_step, _ = after[key]
      np.testing.assert_array_equal(new_mask, mask, err_msg=key)
      np.testing.assert_array_equal(new_step, step, err_msg=key)
      np.testing.assert_array_equal(new_kernel[~mask], 0.0, err_msg=key)
      codes = np.round(new_kernel / step)
      np.testing.assert_array_equal(
          (codes * step).astype(np.float32), new_kernel, err_msg=key)
      self.assertLessEqual(np.abs(codes).max(), grid.max_code(bits), key)
      moved += np.count_nonzero(new_kernel != kernel)
    self.assertGreater(moved, 0)

  @parameterized.parameters(
      "conv_same_strided", "conv_valid_dilated", "conv_1x1", "conv1d",
      "conv1d_causal", "dense3d", "depthwise", "separable")
  def test_lowers_output_error_and_stays_on_grid(self, kind):
    fp32_model, shape = _single_layer_model(kind)
    qmodel = opq_tf.apply(fp32_model, pruning_rate=0.5, bits=3)
    images = _correlated_inputs(60, shape)
    plain_error = _output_error(fp32_model, qmodel, images)
    before = _kernel_state(qmodel)

    qmodel_report = _calibrate(qmodel, images, batchnorm=False, reconstruct=True)

    self._assert_compressed(before, _kernel_state(qmodel))
    error = _output_error(fp32_model, qmodel, images)
    self.assertLess(error, 0.9 * plain_error)
    rows = qmodel_report.kernels
    self.assertTrue(all(row.method == "reconstructed"
                        for row in rows.values()), rows)
    if len(rows) == 1:  # the reported errors are the layer's, via im2col H.
      (row,) = rows.values()
      self.assertAlmostEqual(row.error_before, plain_error,
                             delta=1e-3 * plain_error)
      self.assertAlmostEqual(row.error_after, error, delta=1e-3 * error)

  @parameterized.parameters("conv_same_strided", "depthwise")
  def test_each_rounding_lowers_the_output_error_of_the_one_before(self,
                                                                   kind):
    fp32_model, shape = _single_layer_model(kind)
    images = _correlated_inputs(60, shape)
    errors = {}
    for rounding in ("nearest", "error_feedback", "learned"):
      qmodel = opq_tf.apply(fp32_model, pruning_rate=0.5, bits=3)
      before = _kernel_state(qmodel)
      _calibrate(qmodel, images, batchnorm=False, reconstruct=True,
                 rounding=rounding, verbose=False)
      if rounding != "nearest":
        self._assert_compressed(before, _kernel_state(qmodel))
      errors[rounding] = _output_error(fp32_model, qmodel, images)
    self.assertLess(errors["error_feedback"], errors["nearest"])
    self.assertLess(errors["learned"], errors["error_feedback"])

  def test_a_gradient_step_can_move_a_reconstructed_code(self):
    # Latent weights kept within half a step of their codes at the values
    # the rounding started from: a step moving each by under half a step
    # moves some codes, and none when the latent weights sit on the grid.
    fp32_model, shape = _single_layer_model("conv_same_strided")
    qmodel = opq_tf.apply(fp32_model, pruning_rate=0.5, bits=3)
    images = _correlated_inputs(60, shape)
    _calibrate(qmodel, images, batchnorm=False, reconstruct=True,
               verbose=False)
    (kernel,) = calibration._compressed_kernels(qmodel, None)  # pylint: disable=protected-access
    codes = kernel.compressed()
    kept = kernel.mask
    self.assertGreater(np.mean(kernel.variable.numpy()[kept] != codes[kept]),
                       0.5)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.square(qmodel(images) - fp32_model(images)))
    gradient = tape.gradient(loss, kernel.variable).numpy()
    self.assertGreater(np.count_nonzero(gradient[kept]), 0)
    rate = 0.45 * np.min(kernel.step) / np.max(np.abs(gradient))
    moved = {}
    for start in ("latent", "on_grid"):
      value = kernel.variable.numpy() if start == "latent" else codes
      kernel.variable.assign(value - rate * gradient)
      moved[start] = np.count_nonzero(kernel.compressed() != codes)
      kernel.variable.assign(value)
    self.assertGreater(moved["latent"], 0)
    self.assertEqual(moved["on_grid"], 0)

  def test_statistics_do_not_depend_on_the_patch_memory_bound(self):
    fp32_model, shape = _single_layer_model("conv_same_strided")
    images = _correlated_inputs(30, shape)
    reports = []
    for patch_bytes in (calibration._PATCH_BYTES, 1):  # pylint: disable=protected-access
      qmodel = opq_tf.apply(fp32_model, pruning_rate=0.5, bits=3)
      with mock.patch.object(calibration, "_PATCH_BYTES", patch_bytes):
        qmodel_report = _calibrate(qmodel, images, batchnorm=False,
                              reconstruct=True)
      (row,) = qmodel_report.kernels.values()
      reports.append(row)
    self.assertEqual(reports[0].samples_per_weight,
                     reports[1].samples_per_weight)
    self.assertAlmostEqual(reports[0].error_before, reports[1].error_before,
                           delta=1e-5 * reports[0].error_before)
    self.assertLess(reports[1].error_after, 0.9 * reports[1].error_before)

  @parameterized.parameters("kernel", "channel")
  def test_stripped_model_matches_wrapped(self, step_granularity):
    qmodel = opq_tf.apply(_trained(_bn_model), pruning_rate=0.6, bits=3,
                          step_granularity=step_granularity)
    stripped = _strip(qmodel)
    images = _correlated_inputs(200, (8, 8, 3))
    before = _kernel_state(stripped)
    self.assertEqual(step_granularity == "channel",
                     np.ndim(_KERNELS[id(stripped)][0].step) > 0)

    stripped_report = _calibrate(stripped, images, reconstruct=True)
    qmodel_report = _calibrate(qmodel, images, reconstruct=True)

    self._assert_compressed(before, _kernel_state(stripped))
    self._assert_compressed(before, _kernel_state(qmodel))
    rows = stripped_report.kernels
    for key, row in rows.items():
      self.assertLessEqual(row.error_after, row.error_before, key)
    self.assertLess(rows["conv/kernel"].error_after,
                    0.9 * rows["conv/kernel"].error_before)
    # The same computation as on the wrapped model.
    self.assertEqual(qmodel_report, stripped_report)
    wrapped_state = _kernel_state(qmodel)
    for key, (kernel, *_) in _kernel_state(stripped).items():
      np.testing.assert_array_equal(kernel, wrapped_state[key][0], key)
    np.testing.assert_allclose(stripped.predict(images, verbose=0),
                               qmodel.predict(images, verbose=0),
                               rtol=1e-4, atol=1e-4)

  def test_few_samples_per_weight_keep_plain_rounding(self):
    qmodel = opq_tf.apply(_trained(_bn_model), pruning_rate=0.6, bits=3)
    before = _kernel_state(qmodel)
    # 40 images: "dense" (16 inputs) sees 2.5 samples per input weight < 4,
    # "logits" (8 inputs) 5.
    qmodel_report = _calibrate(qmodel, _correlated_inputs(40, (8, 8, 3)),
                          reconstruct=True)

    after = _kernel_state(qmodel)
    rows = qmodel_report.kernels
    self.assertEqual(rows["dense/kernel"].method, "plain rounding")
    self.assertIn("samples per input weight", rows["dense/kernel"].reason)
    self.assertEqual(rows["dense/kernel"].samples_per_weight, 2.5)
    np.testing.assert_array_equal(after["dense/kernel"][0],
                                  before["dense/kernel"][0])
    self.assertEqual(rows["logits/kernel"].method, "reconstructed")
    self.assertEqual(rows["conv/kernel"].method, "reconstructed")

  def test_bias_absorbs_the_mean_error_of_a_kernel_too_wide_to_reconstruct(
      self):
    # A classifier on pooled ReLU features: inputs with a large positive mean,
    # 40 samples for 32 inputs (< 4 per weight), so plain rounding; pruning
    # then shifts every output's mean, which only the bias can take back.
    inputs = keras.Input((32,))
    fp32_model = keras.Model(inputs, keras.layers.Dense(10, name="head")(inputs))
    features = np.abs(_correlated_inputs(40, (32,))) + 1.0
    qmodel = opq_tf.apply(fp32_model, pruning_rate=0.7, bits=4)
    kernel_before = _kernel_state(qmodel)["head/kernel"][0]
    mean_shift = lambda: np.mean(fp32_model(features) - qmodel(features), 0)
    scale = np.std(fp32_model(features).numpy())
    self.assertGreater(np.abs(mean_shift()).max(), 0.05 * scale)
    plain_error = _output_error(fp32_model, qmodel, features)

    qmodel_report = _calibrate(qmodel, features, batchnorm=False, reconstruct=True)

    np.testing.assert_array_equal(_kernel_state(qmodel)["head/kernel"][0],
                                  kernel_before)
    self.assertLess(np.abs(mean_shift()).max(), 1e-4 * scale)
    row = qmodel_report.kernels["head/kernel"]
    self.assertEqual((row.method, row.bias_corrected), ("plain rounding", True))
    self.assertIn("+ bias", qmodel_report.table())
    error = _output_error(fp32_model, qmodel, features)
    self.assertLess(error, 0.9 * plain_error)
    self.assertAlmostEqual(row.error_before, plain_error,
                           delta=1e-3 * plain_error)
    self.assertAlmostEqual(row.error_after, error, delta=1e-3 * error)

  def test_kept_weights_compensate_every_pruned_one(self):
    # On a fine grid the result must come close to the continuous optimum
    # with the mask fixed, V_K = (W H)_K H_KK^-1 per output (8-bit rounding
    # adds the rest). Fixing columns one at a time from the FP32 weights (a
    # kept column fixed before a pruned one cannot compensate it) does not
    # lower this layer's error at all.
    inputs = keras.Input((24,))
    fp32_model = keras.Model(
        inputs, keras.layers.Dense(16, use_bias=False, name="d")(inputs))
    images = _correlated_inputs(600, (24,))
    qmodel = opq_tf.apply(fp32_model, pruning_rate=0.6, bits=8)
    mask = _kernel_state(qmodel)["d/kernel"][1]
    weights = fp32_model.layers[-1].kernel.numpy().astype(np.float64)
    hessian = images.T.astype(np.float64) @ images
    damped = hessian + calibration.DEFAULT_DAMPING * np.mean(
        np.diag(hessian)) * np.eye(24)
    optimum = np.zeros_like(weights)
    for output in range(16):
      kept = mask[:, output]
      optimum[kept, output] = np.linalg.solve(
          damped[np.ix_(kept, kept)], (damped @ weights[:, output])[kept])
    error_of = lambda kernel: float(
        np.trace((weights - kernel).T @ hessian @ (weights - kernel))
        / np.trace(weights.T @ hessian @ weights))

    with contextlib.redirect_stderr(io.StringIO()) as stderr:
      qmodel_report = _calibrate(qmodel, images, batchnorm=False,
                                 reconstruct=True)

    row = qmodel_report.kernels["d/kernel"]
    self.assertEqual(row.method, "reconstructed")
    self.assertRegex(stderr.getvalue(),
                     r"calibrate: 1/1 d/kernel reconstructed in [\d.]+ s, "
                     r"~0 s left")
    self.assertLess(row.error_after, 3 * error_of(optimum))
    self.assertLess(error_of(optimum), 0.05 * row.error_before)

  def test_fp32_targets_undo_the_error_of_the_layers_before(self):
    # Two compressed layers: the second, fitted to the FP32 network's output
    # W Z rather than to W X on its drifted input X, also absorbs the first
    # layer's remaining error, so the network's output is closer to FP32.
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(16, use_bias=False, name="first")(inputs)
    fp32_model = keras.Model(inputs, keras.layers.Dense(
        8, use_bias=False, name="second")(hidden))
    images = _correlated_inputs(400, (16,))
    errors = {}
    for targets in ("fp32 network", "own inputs"):
      qmodel = _strip(opq_tf.apply(fp32_model, pruning_rate=0.6, bits=3))
      with mock.patch.object(
          keras.models, "clone_model",
          side_effect=(ValueError("no copy") if targets == "own inputs"
                       else keras.models.clone_model)):
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          _calibrate(qmodel, images, batchnorm=False,
                                reconstruct=True)
      reference = fp32_model(images).numpy()
      errors[targets] = float(np.sum((qmodel(images).numpy() - reference)**2)
                              / np.sum(reference**2))
    self.assertLess(errors["fp32 network"], 0.8 * errors["own inputs"])

  def test_a_model_that_cannot_be_copied_is_reconstructed_on_its_own_inputs(
      self):
    qmodel = _strip(opq_tf.apply(_trained(_bn_model), pruning_rate=0.6,
                                 bits=3))
    images = _correlated_inputs(200, (8, 8, 3))
    before = _kernel_state(qmodel)
    with mock.patch.object(keras.models, "clone_model",
                           side_effect=ValueError("no get_config")):
      with self.assertWarnsRegex(UserWarning, "could not copy.*no get_config"):
        qmodel_report = _calibrate(qmodel, images, reconstruct=True)

    self._assert_compressed(before, _kernel_state(qmodel))
    row = qmodel_report.kernels["conv/kernel"]
    self.assertEqual(row.method, "reconstructed")
    self.assertLess(row.error_after, 0.9 * row.error_before)

  def test_mirrored_strategy_gives_the_same_result(self):
    fp32 = _trained(_bn_model)
    images = _images(100)
    single = opq_tf.apply(fp32, pruning_rate=0.6, bits=3)
    _calibrate(single, images, reconstruct=True)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    with strategy.scope():
      mirrored_fp32 = _bn_model()
      mirrored_fp32.set_weights(fp32.get_weights())
      mirrored = opq_tf.apply(mirrored_fp32, pruning_rate=0.6, bits=3)
      _calibrate(mirrored, images, reconstruct=True)

    self.assertIsInstance(mirrored.get_layer("bn").moving_mean,
                          tf.distribute.DistributedValues)
    for got, want in zip(mirrored.weights, single.weights):
      np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4,
                                 atol=1e-5, err_msg=want.name)
    # Both replicas hold the re-estimated statistics.
    for component in mirrored.get_layer("bn").moving_variance.values:
      np.testing.assert_allclose(
          component.numpy(), single.get_layer("bn").moving_variance.numpy(),
          rtol=1e-4)


  @parameterized.named_parameters(("wrapped", False), ("stripped", True))
  def test_attention_sublayer_kernels_are_reconstructed(self, stripped):
    fp32 = _attention_model()
    sequences = _correlated_inputs(100, (6, 8))
    reference = fp32(sequences).numpy()
    error = lambda model: float(np.sum((model(sequences).numpy() - reference)
                                       ** 2) / np.sum(reference ** 2))
    plain = opq_tf.apply(fp32, pruning_rate=0.5, bits=3)
    qmodel = _strip(plain) if stripped else opq_tf.apply(
        fp32, pruning_rate=0.5, bits=3)
    before = _kernel_state(qmodel)

    report = _calibrate(qmodel, sequences, batchnorm=False, reconstruct=True,
                        verbose=False)

    self.assertEqual(list(report.kernels), [
        "mha/_query_dense/kernel", "mha/_key_dense/kernel",
        "mha/_value_dense/kernel", "mha/_output_dense/kernel",
        "projection/kernel", "head/kernel"])
    for key, row in report.kernels.items():
      self.assertEqual(row.method, "reconstructed", f"{key}: {row.reason}")
      self.assertLess(row.error_after, row.error_before, key)
    self._assert_compressed(before, _kernel_state(qmodel))
    # Measured: plain rounding's output error 0.95, reconstruction's 0.013.
    self.assertLess(error(qmodel), 0.25 * error(plain))

  def test_a_shared_sublayer_keeps_plain_rounding_and_says_why(self):
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(8, name="embed")(inputs)
    model = keras.Model(inputs, TwiceDense(name="twice")(x))
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=3)

    report = _calibrate(qmodel, _correlated_inputs(100, (6, 8)),
                        batchnorm=False, reconstruct=True, verbose=False)

    self.assertEqual(report.kernels["embed/kernel"].method, "reconstructed")
    row = report.kernels["twice/dense/kernel"]
    self.assertEqual(row.method, "plain rounding")
    self.assertEqual(row.reason, "sublayer 'dense' is called 2 times in each "
                     "call of 'twice' (shared)")


class TwiceDense(keras.layers.Layer):
  """A custom block that calls its one Dense sublayer twice."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.dense = keras.layers.Dense(8)

  def call(self, inputs):
    return self.dense(self.dense(inputs))


def _attention_model() -> keras.Model:
  """MultiHeadAttention (four EinsumDense sublayers), an EinsumDense and a
  Dense, on 6 tokens of width 8."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((6, 8))
  x = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
  x = keras.layers.EinsumDense("abc,cd->abd", (None, 8), bias_axes="d",
                               name="projection")(x)
  x = keras.layers.GlobalAveragePooling1D()(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def _branching_model() -> keras.Model:
  """A residual block (Add of a two-conv branch and a 1x1 shortcut) in a
  nested Functional submodel, between a stem and a classifier."""
  block_input = keras.Input((8, 8, 8))
  y = keras.layers.Conv2D(8, 3, padding="same", name="branch_a")(block_input)
  y = keras.layers.BatchNormalization(name="branch_a_bn")(y)
  y = keras.layers.ReLU()(y)
  y = keras.layers.Conv2D(8, 1, name="branch_b")(y)
  shortcut = keras.layers.Conv2D(8, 1, name="shortcut")(block_input)
  block = keras.Model(block_input, keras.layers.ReLU()(
      keras.layers.Add()([y, shortcut])), name="block")
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
  x = keras.layers.BatchNormalization(name="stem_bn")(x)
  x = block(keras.layers.ReLU()(x))
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def _reconstruct_from_the_images(qmodel, images, batch_size):
  """The direct reference: calibrate(reconstruct=True) with each kernel's
  inputs X and Z taken by running the network's prefix from the images
  (quadratic in depth), with the same solver."""
  kernels = calibration._compressed_kernels(qmodel, None)  # pylint: disable=protected-access
  batches = [images[start:start + batch_size]
             for start in range(0, len(images), batch_size)]
  batchnorm = [layer for layer in qmodel.layers
               if isinstance(layer, keras.layers.BatchNormalization)]
  calibration._reestimate_batchnorm(qmodel, batchnorm, batches)  # pylint: disable=protected-access
  fp32 = calibration._fp32_network(qmodel, kernels)  # pylint: disable=protected-access
  fp32_batchnorm = [layer for layer in fp32.layers
                    if isinstance(layer, keras.layers.BatchNormalization)]
  with calibration._batch_statistics_mode(batchnorm + fp32_batchnorm):  # pylint: disable=protected-access
    for kernel in kernels:
      prefixes = [
          keras.Model(qmodel.inputs, calibration._layer_input(  # pylint: disable=protected-access
              qmodel, kernel.node_layer)),
          keras.Model(fp32.inputs, calibration._layer_input(  # pylint: disable=protected-access
              fp32, fp32.get_layer(kernel.layer.name)))]
      inputs, targets = ([prefix(batch, training=False) for batch in batches]
                         for prefix in prefixes)
      calibration._reconstruct_kernel(  # pylint: disable=protected-access
          kernel, kernels, list(zip(inputs, targets)),
          calibration.DEFAULT_DAMPING,
          calibration.DEFAULT_MIN_SAMPLES_PER_WEIGHT)
  calibration._reestimate_batchnorm(qmodel, batchnorm, batches)  # pylint: disable=protected-access


class LayerByLayerTest(parameterized.TestCase):
  """Kernel inputs from cached layer outputs (linear in depth) against the
  prefix re-run from the images for every kernel."""

  def setUp(self):
    super().setUp()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)

  def test_matches_prefixes_run_from_the_images_on_a_branching_model(self):
    fp32 = _trained(_branching_model)
    images = _correlated_inputs(120, (8, 8, 3))
    walked = opq_tf.apply(fp32, pruning_rate=0.6, bits=3)
    direct = opq_tf.apply(fp32, pruning_rate=0.6, bits=3)
    before = _kernel_state(walked)
    self.assertNotIn("block", [layer.name for layer in walked.layers])

    report = _calibrate(walked, images, reconstruct=True, batch_size=40,
                        verbose=False)
    _reconstruct_from_the_images(direct, images, batch_size=40)

    self.assertLen(report.kernels, 5)
    self.assertTrue(all(row.method == "reconstructed"
                        for row in report.kernels.values()), report.table())
    self._assert_compressed_kernels_move(before, _kernel_state(walked))
    # Tolerance: the same float32 operations in another grouping (eager
    # layer by layer, not one graph per prefix) may move a product by an
    # ulp, which may round a weight at a grid midpoint the other way. On
    # this model the kernels come out identical; at most 1% of a kernel's
    # weights may differ, by one step, and the rest of the model to 1e-5.
    want = _kernel_state(direct)
    for key, (kernel, _, step, _) in _kernel_state(walked).items():
      moved = kernel != want[key][0]
      self.assertLessEqual(np.mean(moved), 0.01, key)
      np.testing.assert_allclose(np.abs(kernel - want[key][0])[moved],
                                 step[moved], rtol=1e-6, err_msg=key)
    for got, expected in zip(walked.weights, direct.weights):
      np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5,
                                 atol=1e-5, err_msg=expected.name)

  def _assert_compressed_kernels_move(self, before, after):
    for key, (kernel, mask, step, _) in before.items():
      new_kernel = after[key][0]
      np.testing.assert_array_equal(new_kernel[~mask], 0.0, err_msg=key)
      np.testing.assert_array_equal(
          (np.round(new_kernel / step) * step).astype(np.float32), new_kernel,
          err_msg=key)
    self.assertTrue(any(np.any(after[key][0] != kernel)
                        for key, (kernel, *_) in before.items()))

  def test_activations_on_disk_give_the_same_model(self):
    fp32 = _trained(_branching_model)
    images = _correlated_inputs(80, (8, 8, 3))
    in_memory = opq_tf.apply(fp32, pruning_rate=0.6, bits=3)
    on_disk = opq_tf.apply(fp32, pruning_rate=0.6, bits=3)
    _calibrate(in_memory, images, reconstruct=True, verbose=False)
    folders = []
    real_mkdtemp = activations.tempfile.mkdtemp

    def mkdtemp(**kwargs):
      folders.append(real_mkdtemp(**kwargs))
      return folders[-1]

    with mock.patch.object(calibration, "_CACHE_BYTES", 0), \
        mock.patch.object(activations.tempfile, "mkdtemp", mkdtemp):
      _calibrate(on_disk, images, reconstruct=True, verbose=False)

    self.assertLen(folders, 1)
    self.assertFalse(os.path.exists(folders[0]))  # removed at the end
    for got, want in zip(on_disk.weights, in_memory.weights):
      np.testing.assert_array_equal(got.numpy(), want.numpy(), want.name)


class ActivationCacheTest(absltest.TestCase):

  def test_keeps_each_batch_until_its_last_use_in_memory_or_on_disk(self):
    batches = [np.arange(6.0).reshape(2, 3), np.ones((1, 3))]
    for memory_bytes, on_disk in ((2**20, False), (48, True)):
      with activations.ActivationCache({"x": 2, "unused": 0},
                                       memory_bytes) as cache:
        for batch in batches:
          cache.append("x", batch)
          cache.append("unused", batch)
        self.assertEqual(cache.on_disk, on_disk)
        for _ in range(2):
          got = cache.take("x")
          self.assertLen(got, 2)
          for value, want in zip(got, batches):
            np.testing.assert_array_equal(value, want)
        self.assertEqual(isinstance(got[1], np.memmap), on_disk)
        with self.assertRaisesRegex(KeyError, "no use left"):
          cache.take("x")
        with self.assertRaisesRegex(KeyError, "never stored"):
          cache.take("unused")


class MaskedLeastSquaresTest(parameterized.TestCase):

  @parameterized.parameters((1, 5, 40), (3, 2, 9))
  def test_matches_a_direct_solve_on_each_rows_kept_set(self, groups, rows,
                                                        width):
    random = np.random.RandomState(groups)
    factor = random.normal(size=(groups, width, width)) + 2 * np.eye(width)
    hessian = factor @ np.swapaxes(factor, 1, 2) + np.eye(width)
    weights = random.normal(size=(groups, rows, width))
    rhs = random.normal(size=(groups, rows, width))
    mask = random.uniform(size=weights.shape) < 0.6

    got = reconstruction.masked_least_squares(weights, rhs, hessian, mask)  # pylint: disable=protected-access

    np.testing.assert_array_equal(got[~mask], 0.0)
    for g in range(groups):
      for r in range(rows):
        kept = mask[g, r]
        want = np.linalg.solve(hessian[g][np.ix_(kept, kept)], rhs[g, r, kept])
        np.testing.assert_allclose(got[g, r, kept], want, rtol=1e-3,
                                   atol=1e-4 * np.abs(want).max())


class ErrorTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)

  @parameterized.named_parameters(
      ("wrong_shape", lambda: _images(10, shape=(6, 6, 3)), ValueError,
       r"shape .*\(N, 8, 8, 3\)"),
      ("wrong_rank", lambda: _images(10)[0], ValueError, r"\(N, 8, 8, 3\)"),
      ("strings", lambda: tf.data.Dataset.from_tensor_slices(["a", "b"]),
       TypeError, "decode"),
      ("booleans", lambda: np.zeros((4, 8, 8, 3), bool), TypeError, "decode"),
      ("dict_dataset", lambda: tf.data.Dataset.from_tensor_slices(
          {"image": _images(4)}), TypeError, "Map it to images"),
      ("list", lambda: [_images(4)], TypeError, "NumPy array"),
      ("empty_dataset",
       lambda: tf.data.Dataset.from_tensor_slices(_images(4)).take(0),
       ValueError, "empty"),
      ("empty_array", lambda: _images(0), ValueError, "empty"),
      ("nan_images", lambda: np.where(np.arange(10)[:, None, None, None] == 3,
                                      np.nan, _images(10)),
       ValueError, "NaN or Inf"),
      ("inf_in_dataset", lambda: tf.data.Dataset.from_tensor_slices(
          np.where(_images(10) > 0.99, np.inf, _images(10))),
       ValueError, "NaN or Inf"),
  )
  def test_bad_data_names_the_fix_and_changes_nothing(self, make_data, error,
                                                      message):
    qmodel = opq_tf.apply(_trained(_bn_model, steps=1), pruning_rate=0.6,
                          bits=3)
    before = _weights(qmodel)
    with self.assertRaisesRegex(error, message):
      _calibrate(qmodel, make_data(), reconstruct=True)
    for got, want in zip(_weights(qmodel), before):
      np.testing.assert_array_equal(got, want)

  def test_non_finite_result_is_refused_by_name_and_rolled_back(self):
    # A NaN latent weight at a pruned position: the mask hides it from
    # allocation's view, but 0 * NaN is NaN, so every statistic after it is.
    qmodel = opq_tf.apply(_trained(_bn_model, steps=1), pruning_rate=0.6,
                          bits=3)
    wrapper = next(layer for layer in qmodel.layers
                   if getattr(layer, "_weight_vars", None))
    variable, _, variables = wrapper._weight_vars[0]  # pylint: disable=protected-access
    values = variable.numpy()
    values[tuple(np.argwhere(variables["mask"].numpy() == 0)[0])] = np.nan
    variable.assign(values)
    before = _weights(qmodel)
    with self.assertRaisesRegex(ValueError, "NaN or Inf"):
      _calibrate(qmodel, _images(20))
    for got, want in zip(_weights(qmodel), before):
      np.testing.assert_array_equal(got, want)

  @parameterized.named_parameters(("fp32", False), ("stripped_bare", True))
  def test_model_never_applied(self, stripped_bare):
    model = _bn_model()
    if stripped_bare:  # a plain model, calibrated without its kernels
      model = opq_tf.strip(opq_tf.apply(model, pruning_rate=0.5, bits=4))
    before = _weights(model)
    with self.assertRaisesRegex(ValueError, r"never applied.*opq_tf\.apply"):
      _calibrate(model, _images(10))
    for got, want in zip(_weights(model), before):
      np.testing.assert_array_equal(got, want)

  @parameterized.named_parameters(
      ("max_images", {"max_images": 0}, "max_images"),
      ("batch_size", {"batch_size": 2.5}, "batch_size"),
      ("damping", {"damping": 0.0}, "damping"),
      ("rounding", {"rounding": "adaround"},
       "'nearest', 'error_feedback', 'learned'"),
  )
  def test_bad_options(self, options, message):
    qmodel = opq_tf.apply(_bn_model(), pruning_rate=0.5, bits=4)
    with self.assertRaisesRegex(ValueError, message):
      _calibrate(qmodel, _images(10), **options)

  def test_failure_half_way_restores_every_variable(self):
    qmodel = opq_tf.apply(_trained(_bn_model, steps=1), pruning_rate=0.6,
                          bits=3)
    before = _weights(qmodel)
    real = reconstruction.solve
    calls = []

    def fail_on_third(*args, **kwargs):
      calls.append(1)
      if len(calls) == 3:
        raise MemoryError("out of memory")
      return real(*args, **kwargs)

    with mock.patch.object(reconstruction, "solve", fail_on_third):
      with self.assertRaises(MemoryError):
        _calibrate(qmodel, _images(100), reconstruct=True)
    self.assertLen(calls, 3)  # BN and two kernels had changed by then
    for got, want in zip(_weights(qmodel), before):
      np.testing.assert_array_equal(got, want)


if __name__ == "__main__":
  absltest.main()
