"""The Keras 3 frontend on one backend: run as `python tests/keras3_backend_checks.py`.

Keras fixes its backend per process (KERAS_BACKEND at import), and the main
pytest process runs TensorFlow with tf_keras, so tests/keras3_test.py runs
this file in a subprocess once per backend (tensorflow, jax; on torch it
passes too, in over 3 minutes, so CI runs only the shorter
keras3_no_tensorflow_check.py there). Not collected by pytest itself (no
`_test.py` suffix).
"""

import os
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]  # keras3_models, opq_tf

import keras  # noqa: E402

import keras3_models as models  # noqa: E402
import opq_tf  # noqa: E402
from opq_tf.core import grid  # noqa: E402
from opq_tf.keras3 import calibration  # noqa: E402
from opq_tf.keras3 import layers as layers_lib  # noqa: E402
from opq_tf.keras3 import quantize_configs  # noqa: E402
from opq_tf.keras3 import wrapping  # noqa: E402
from opq_tf.keras3.quantizers import OPQWeightQuantizer  # noqa: E402

BACKEND = keras.backend.backend()

_BUILDERS = {"conv": (models.conv_model, models.images),
             "encoder": (models.encoder_model, models.sequences)}


def _wrapped(kind="conv", pruning_rate=0.5, bits=4):
  """(plan, wrapped model, data function)."""
  build, data = _BUILDERS[kind]
  model = models.randomize(build())
  plan = opq_tf.allocate(model, pruning_rate=pruning_rate, bits=bits)
  return plan, opq_tf.apply(model, plan), data


def _state(qmodel):
  return {kernel.key: kernel for kernel in wrapping.compressed_kernels(qmodel)}


def _predict(model, inputs):
  """An eager call: cheaper than compiling `predict` for these tiny models."""
  return keras.ops.convert_to_numpy(model(inputs, training=False))


def _fit(qmodel, inputs, epochs=2):
  qmodel.compile(
      optimizer=keras.optimizers.SGD(learning_rate=1.0),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      jit_compile=True)
  qmodel.fit(inputs, models.labels(len(inputs)), batch_size=16, epochs=epochs,
             verbose=0)


class LayersTest(parameterized.TestCase):

  def test_keys_and_channel_axes(self):
    kernels = layers_lib.compressible_kernels(models.conv_model())
    self.assertEqual(
        {key: (kernel.kind, kernel.channel_axes)
         for key, kernel in kernels.items()},
        {"conv/kernel": ("Conv2D", (-1,)),
         "depthwise/depthwise_kernel": ("DepthwiseConv2D", (-2, -1)),
         "separable/depthwise_kernel": ("SeparableConv2D", (-2, -1)),
         "separable/pointwise_kernel": ("SeparableConv2D", (-1,)),
         "logits/kernel": ("Dense", (-1,))})

  def test_sublayers_of_attention_and_custom_blocks_are_found(self):
    model = models.encoder_model()
    kernels = layers_lib.compressible_kernels(model)
    self.assertEqual(list(kernels), [
        "mha/_query_dense/kernel", "mha/_key_dense/kernel",
        "mha/_value_dense/kernel", "mha/_output_dense/kernel",
        "block/attention/_query_dense/kernel",
        "block/attention/_key_dense/kernel",
        "block/attention/_value_dense/kernel",
        "block/attention/_output_dense/kernel", "block/intermediate/kernel",
        "block/projection/kernel", "head/kernel"])
    self.assertEqual(kernels["mha/_query_dense/kernel"].channel_axes, (-2, -1))
    self.assertEqual(kernels["mha/_output_dense/kernel"].channel_axes, (-1,))
    self.assertEqual(kernels["block/projection/kernel"].values.shape, (16, 8))
    names = list(layers_lib.named_weights(model))
    self.assertLen(set(names), len(model.weights))
    self.assertIn("block/attention_norm/gamma", names)

  def test_nested_models_keep_their_layer_names(self):
    self.assertEqual(list(layers_lib.compressible_kernels(
        models.nested_model())), ["stem/kernel", "rows/kernel", "head/kernel"])

  def test_einsum_with_leading_output_axis_gets_one_step(self):
    inputs = keras.Input((5,))
    outputs = keras.layers.EinsumDense("ab,cb->ac", output_shape=(4,),
                                       bias_axes="c", name="rev")(inputs)
    model = models.randomize(keras.Model(inputs, outputs))
    plan = opq_tf.allocate(model, pruning_rate=0.5, bits=4)
    self.assertEqual(plan.kernels[0].channel_axes, ())
    qmodel = opq_tf.apply(model, plan)
    (kernel,) = wrapping.compressed_kernels(qmodel)
    self.assertEqual(kernel.step.shape, ())
    self.assertEqual(kernel.kernel.shape, (4, 5))
    row = opq_tf.calibrate(qmodel, np.ones((8, 5), np.float32),
                           reconstruct=True, batchnorm=False,
                           verbose=False).kernels["rev/kernel"]
    self.assertEqual(row.method, "plain rounding")
    self.assertIn("does not contract", row.reason)

  def test_register_layer_makes_a_subclass_compressible(self):

    class ScaledDense(keras.layers.Dense):
      pass

    inputs = keras.Input((4,))
    model = keras.Model(inputs, ScaledDense(3, name="scaled")(inputs))
    with self.assertRaisesRegex(ValueError, "no compressible kernel.*"
                                "register_layer"):
      opq_tf.allocate(model, pruning_rate=0.5, bits=4)
    opq_tf.register_layer(ScaledDense, ["kernel"])
    try:
      self.assertEqual(list(layers_lib.compressible_kernels(model)),
                       ["scaled/kernel"])
    finally:
      del quantize_configs.CONFIGS[ScaledDense]


class QuantizerTest(absltest.TestCase):

  def test_forward_is_the_grid(self):
    random = np.random.RandomState(0)
    kernel = random.laplace(0, 0.1, (5, 4)).astype(np.float32)
    step = np.float32([0.02, 0.03, 0.05, 0.04])
    mask = np.abs(kernel) >= 0.03
    quantizer = OPQWeightQuantizer(3, step, 0.03)
    layer = keras.layers.Dense(4)
    layer.build((None, 5))
    variables = quantizer.build((5, 4), "kernel", layer)
    variables["mask"].assign(mask.astype(np.float32))
    self.assertEqual(tuple(variables["step"].shape), (4,))
    self.assertFalse(variables["mask"].trainable)
    compressed = keras.ops.convert_to_numpy(quantizer(kernel, weights=variables))
    np.testing.assert_array_equal(compressed,
                                  grid.compress(kernel, step, 3, mask))
    self.assertEqual(OPQWeightQuantizer.from_config(quantizer.get_config()),
                     quantizer)


class ApplyFitStripTest(parameterized.TestCase):

  @parameterized.parameters("conv", "encoder")
  def test_fit_keeps_masks_steps_and_grid_then_packs_bit_identically(self, kind):
    plan, qmodel, data = _wrapped(kind)
    inputs = data(48)
    stripped = opq_tf.strip(qmodel)
    np.testing.assert_allclose(_predict(qmodel, inputs),
                               _predict(stripped, inputs), atol=1e-5)
    before = _state(qmodel)
    _fit(qmodel, inputs)
    after = _state(qmodel)
    self.assertEqual(list(before), list(after))
    for key, kernel in after.items():
      np.testing.assert_array_equal(kernel.mask, before[key].mask, key)
      np.testing.assert_array_equal(kernel.step, before[key].step, key)
      # Straight-through gradient = mask: plain SGD leaves pruned latent
      # weights exactly where they were and moves kept ones.
      np.testing.assert_array_equal(kernel.kernel[~kernel.mask],
                                    before[key].kernel[~kernel.mask], key)
      self.assertGreater(np.abs(kernel.kernel - before[key].kernel).max(), 0,
                         key)
      self.assertTrue(np.all(kernel.compressed[~kernel.mask] == 0), key)
      self.assertLessEqual(np.abs(kernel.codes).max(),
                           grid.max_code(kernel.bits), key)
    # The kernels the forward pass uses are step * code, the codes NumPy's.
    for entry in layers_lib.iter_layers(qmodel):
      if entry.wrapper is None:
        continue
      for spec, _, variable, variables in entry.wrapper.kernels():
        key = f"{entry.path}/{spec.relative_key}"
        used = keras.ops.convert_to_numpy(spec.quantizer(variable,
                                                         weights=variables))
        np.testing.assert_array_equal(used, after[key].compressed, key)
    stripped = opq_tf.strip(qmodel)
    np.testing.assert_allclose(_predict(qmodel, inputs),
                               _predict(stripped, inputs), atol=1e-4)
    sites = layers_lib.kernel_sites(stripped)
    for key, kernel in after.items():
      np.testing.assert_array_equal(sites[key].variable.numpy(),
                                    kernel.compressed, key)
    with tempfile.TemporaryDirectory() as directory:
      report = opq_tf.export(qmodel, os.path.join(directory, "out"),
                             formats=("keras", "packed"), plan=plan)
      loaded = opq_tf.load_packed(os.path.join(directory, "out", "model.opq"),
                                  _BUILDERS[kind][0])
      reloaded = keras.saving.load_model(
          os.path.join(directory, "out", "model.keras"))
    self.assertEqual(report["files"], {"keras": "model.keras",
                                       "packed": "model.opq"})
    self.assertGreater(report["weight_bits_ratio"], 1.0)
    self.assertAlmostEqual(report["realised_pruning_rate"],
                           plan.realised_pruning_rate)
    self.assertEqual(report["plan"]["bits"], 4)
    for source in (loaded, reloaded):
      named = layers_lib.named_weights(source)
      expected = layers_lib.named_weights(stripped)
      self.assertEqual(list(named), list(expected))
      for name, variable in expected.items():
        np.testing.assert_array_equal(named[name].numpy(), variable.numpy(),
                                      name)

  def test_keras_file_round_trip_keeps_masks_and_steps(self):
    _, qmodel, data = _wrapped("encoder")
    random = np.random.RandomState(0)
    for kernel in qmodel.trainable_weights:  # as finetuning would move them
      kernel.assign(kernel.numpy() + random.normal(
          0, 0.01, kernel.shape).astype(np.float32))
    with tempfile.TemporaryDirectory() as directory:
      path = os.path.join(directory, "qmodel.keras")
      qmodel.save(path)
      loaded = keras.saving.load_model(path)
    saved, restored = _state(qmodel), _state(loaded)
    self.assertEqual(list(saved), list(restored))
    for key, kernel in saved.items():
      for field in ("kernel", "mask", "step"):
        np.testing.assert_array_equal(getattr(restored[key], field),
                                      getattr(kernel, field), f"{key} {field}")
    inputs = data(8)
    np.testing.assert_array_equal(_predict(loaded, inputs),
                                  _predict(qmodel, inputs))

  def test_nested_and_sequential_models(self):
    nested = models.randomize(models.nested_model())
    qnested = opq_tf.apply(nested, pruning_rate=0.5, bits=4)
    self.assertIsInstance(qnested.get_layer("backbone").get_layer("stem"),
                          opq_tf.keras3.wrapper.OPQWrapper)
    self.assertEqual(list(_state(qnested)),
                     ["stem/kernel", "rows/kernel", "head/kernel"])
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(
        5, name="hidden"), keras.layers.Dense(2, name="out")])
    qsequential = opq_tf.apply(models.randomize(sequential), pruning_rate=0.5,
                               bits=3)
    self.assertIsInstance(qsequential, keras.Sequential)
    inputs = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(
        _predict(qsequential, inputs),
        _predict(opq_tf.strip(qsequential), inputs), atol=1e-6)


class ErrorsTest(absltest.TestCase):

  def test_nothing_compressible(self):
    inputs = keras.Input((4, 4, 2))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(
        keras.layers.ReLU()(inputs)))
    with self.assertRaisesRegex(ValueError, "no compressible kernel.*"
                                "GlobalAveragePooling2D.*register_layer"):
      opq_tf.allocate(model, pruning_rate=0.5, bits=4)

  def test_subclassed_model_says_how_to_compress_it(self):

    class Classifier(keras.Model):

      def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(6, name="hidden")
        self.head = keras.layers.Dense(2, name="head")

      def call(self, inputs):
        return self.head(self.hidden(inputs))

    model = Classifier()
    model(np.ones((1, 4), np.float32))
    models.randomize(model)
    plan = opq_tf.allocate(model, pruning_rate=0.5, bits=4)
    self.assertEqual([k.key for k in plan.kernels],
                     ["hidden/kernel", "head/kernel"])
    with self.assertRaisesRegex(TypeError, "subclassed.*Functional.*"
                                "layer by layer.*replace_layer"):
      opq_tf.apply(model, plan)
    # The way the message gives: wrap the planned layers in place.
    wrapping.replace_layer(model, "head", plan)
    self.assertLen(model.layers, 2)
    kernels = {k.key: k for k in wrapping.compressed_kernels(model)}
    self.assertEqual(list(kernels), ["head/kernel"])
    head = kernels["head/kernel"]
    hidden = model.hidden(np.ones((1, 4), np.float32))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(np.ones((1, 4), np.float32))),
        keras.ops.convert_to_numpy(hidden) @ head.compressed
        + model.head.layer.bias.numpy(), atol=1e-5)

  def test_plan_of_another_model_names_the_first_differing_kernel(self):
    model = models.randomize(models.conv_model())
    inputs = keras.Input(models.IMAGE_SHAPE)
    x = keras.layers.Conv2D(6, 3, name="conv")(inputs)
    other = keras.Model(inputs, keras.layers.Dense(3, name="logits")(
        keras.layers.GlobalAveragePooling2D()(x)))
    plan = opq_tf.allocate(models.randomize(other), pruning_rate=0.5, bits=4)
    with self.assertRaisesRegex(ValueError, r"'conv/kernel' has shape "
                                r"\(3, 3, 3, 6\).*\(3, 3, 3, 8\).*another model"):
      opq_tf.apply(model, plan)
    encoder_plan = opq_tf.allocate(models.randomize(models.encoder_model()),
                                   pruning_rate=0.5, bits=4)
    with self.assertRaisesRegex(ValueError, "'mha/_query_dense/kernel' is not "
                                "in model 'conv_model'"):
      opq_tf.apply(model, encoder_plan)

  def test_calibrate_needs_a_compressed_model_and_matching_data(self):
    model = models.randomize(models.conv_model())
    with self.assertRaisesRegex(ValueError, "never applied"):
      opq_tf.calibrate(model, models.images(4))
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=4)
    with self.assertRaisesRegex(ValueError, r"\(N, 8, 8, 3\)"):
      opq_tf.calibrate(qmodel, np.zeros((4, 8, 8), np.float32))
    with self.assertRaisesRegex(TypeError, "NumPy arrays"):
      opq_tf.calibrate(qmodel, [[0.0]])


class CalibrateTest(absltest.TestCase):

  def test_batchnorm_statistics_are_the_calibration_statistics(self):
    _, qmodel, data = _wrapped("conv")
    inputs = data(60)
    stripped = opq_tf.strip(qmodel)
    bn_input = keras.Model(stripped.inputs,
                           stripped.get_layer("bn").input)
    features = np.asarray(_predict(bn_input, inputs), np.float64)
    report = opq_tf.calibrate(qmodel, inputs, batch_size=20)
    batches = features.reshape(3, -1, 8)
    np.testing.assert_allclose(qmodel.get_layer("bn").moving_mean.numpy(),
                               batches.mean(axis=(0, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        qmodel.get_layer("bn").moving_variance.numpy(),
        batches.var(axis=1, ddof=1).mean(axis=0), rtol=1e-4)
    self.assertEqual(report.batchnorm_layers, ("bn",))
    self.assertEqual(report.kernels, {})

  @absltest.skipUnless(BACKEND == "tensorflow", "tf.data: TensorFlow backend")
  def test_a_dataset_gives_what_its_arrays_give(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    _, qmodel, data = _wrapped("conv")
    images = data(40)
    dataset = tf.data.Dataset.from_tensor_slices(
        (images, models.labels(40))).batch(7)
    bn = qmodel.get_layer("bn")
    saved = [v.numpy() for v in (bn.moving_mean, bn.moving_variance)]
    opq_tf.calibrate(qmodel, images, batch_size=20, verbose=False)
    from_arrays = [v.numpy() for v in (bn.moving_mean, bn.moving_variance)]
    for variable, value in zip((bn.moving_mean, bn.moving_variance), saved):
      variable.assign(value)
    opq_tf.calibrate(qmodel, dataset, batch_size=20, verbose=False)
    for variable, value in zip((bn.moving_mean, bn.moving_variance),
                               from_arrays):
      np.testing.assert_array_equal(variable.numpy(), value)

  def test_reconstruction_lowers_errors_and_stays_on_the_grid(self):
    for kind in ("conv", "encoder"):
      _, qmodel, data = _wrapped(kind, bits=3)
      before = _state(qmodel)
      rows = opq_tf.calibrate(qmodel, data(96), reconstruct=True,
                              batchnorm=kind == "conv", batch_size=32,
                              verbose=False).kernels
      self.assertEqual(list(rows), list(before))
      reconstructed = [key for key, row in rows.items()
                       if row.method == "reconstructed"]
      self.assertGreaterEqual(len(reconstructed), len(rows) // 2, rows)
      for key, kernel in _state(qmodel).items():
        self.assertLessEqual(rows[key].error_after, rows[key].error_before, key)
        np.testing.assert_array_equal(kernel.mask, before[key].mask, key)
        np.testing.assert_array_equal(
            grid.compress(kernel.kernel, kernel.step, kernel.bits, kernel.mask),
            kernel.compressed, key)
      self.assertTrue(any(
          not np.array_equal(_state(qmodel)[key].codes, before[key].codes)
          for key in reconstructed))

  def test_stripped_model_with_its_kernels(self):
    _, qmodel, data = _wrapped("conv")
    kernels = wrapping.compressed_kernels(qmodel)
    stripped = opq_tf.strip(qmodel)
    with self.assertRaisesRegex(ValueError, "kernels=.*compressed_kernels"):
      opq_tf.calibrate(stripped, data(8))
    report = opq_tf.calibrate(stripped, data(64), reconstruct=True,
                              kernels=kernels, batch_size=32, verbose=False)
    self.assertEqual(list(report.kernels), [k.key for k in kernels])
    sites = layers_lib.kernel_sites(stripped)
    for kernel in kernels:
      value = sites[kernel.key].variable.numpy()
      np.testing.assert_array_equal(value[~kernel.mask], 0, kernel.key)
      np.testing.assert_array_equal(
          grid.compress(value, kernel.step, kernel.bits, kernel.mask), value,
          kernel.key)

  def test_registered_kind_is_reconstructed_only_like_a_builtin(self):

    class ScaledDense(keras.layers.Dense):
      pass

    inputs = keras.Input((6,))
    hidden = ScaledDense(12, name="scaled")(inputs)
    model = models.randomize(keras.Model(
        inputs, keras.layers.Dense(2, name="out")(hidden)))
    # Correlated inputs: with white ones the fit is plain rounding (X X^T ~ I)
    # and "reconstructed" would hang on a floating-point tie.
    random = np.random.RandomState(0)
    data = (random.normal(size=(128, 6))
            @ random.normal(size=(6, 6))).astype(np.float32)
    try:
      for like, method in ((None, "plain rounding"),
                           (keras.layers.Dense, "reconstructed")):
        opq_tf.register_layer(ScaledDense, ["kernel"], like=like)
        qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=3)
        row = opq_tf.calibrate(qmodel, data, reconstruct=True,
                               batchnorm=False, verbose=False).kernels[
                                   "scaled/kernel"]
        self.assertEqual(row.method, method, str(row))
        if like is None:
          self.assertIn("like=", row.reason)
    finally:
      quantize_configs.CONFIGS.pop(ScaledDense, None)

  def test_failure_restores_every_variable(self):
    _, qmodel, data = _wrapped("conv")
    saved = [v.numpy().copy() for v in qmodel.weights]
    with self.assertRaisesRegex(ValueError, "damping must be > 0"):
      opq_tf.calibrate(qmodel, data(8), damping=0.0)
    original = calibration._reconstruct_kernel  # pylint: disable=protected-access

    def failing(*args, **kwargs):
      raise RuntimeError("injected")

    calibration._reconstruct_kernel = failing  # pylint: disable=protected-access
    try:
      with self.assertRaisesRegex(RuntimeError, "injected"):
        opq_tf.calibrate(qmodel, data(16), reconstruct=True, batch_size=8)
    finally:
      calibration._reconstruct_kernel = original  # pylint: disable=protected-access
    for value, variable in zip(saved, qmodel.weights):
      np.testing.assert_array_equal(variable.numpy(), value, variable.path)

  def test_patches_reproduce_the_convolutions(self):
    random = np.random.RandomState(0)
    cases = [keras.layers.Conv2D(3, 3, strides=2, padding="same"),
             keras.layers.Conv2D(3, (2, 3), dilation_rate=2),
             keras.layers.Conv1D(3, 3, strides=2, padding="causal"),
             keras.layers.Conv1D(3, 2, padding="same")]
    for layer in cases:
      shape = (2, 9, 8, 4) if isinstance(layer, keras.layers.Conv2D) else (
          2, 9, 4)
      inputs = random.normal(size=shape).astype(np.float32)
      outputs = keras.ops.convert_to_numpy(layer(inputs))
      kernel = layer.kernel.numpy()
      patches = calibration._patches_fn(layer, kernel.shape[:-2])(inputs)  # pylint: disable=protected-access
      patches = keras.ops.convert_to_numpy(patches)
      np.testing.assert_allclose(
          patches @ kernel.reshape(-1, kernel.shape[-1])
          + layer.bias.numpy(), outputs, atol=1e-4, err_msg=layer.name)


@absltest.skipUnless(BACKEND == "tensorflow",
                     "SavedModel, LiteRT: TensorFlow backend")
class TensorFlowFormatsTest(absltest.TestCase):

  def test_saved_model_serves_the_stripped_model(self):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    _, qmodel, data = _wrapped("conv")
    inputs = data(4)
    with tempfile.TemporaryDirectory() as directory:
      report = opq_tf.export(qmodel, os.path.join(directory, "out"))
      self.assertEqual(report["files"]["saved_model"], "saved_model")
      served = tf.saved_model.load(os.path.join(directory, "out",
                                                "saved_model"))
      outputs = served.serve(tf.constant(inputs))
    np.testing.assert_allclose(
        np.asarray(outputs), _predict(opq_tf.strip(qmodel), inputs),
        atol=1e-5)


  def test_litert_file_runs_the_stripped_model(self):
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top

    _, qmodel, data = _wrapped("conv")
    inputs = data(1)
    with tempfile.TemporaryDirectory() as directory:
      report = opq_tf.export(qmodel, os.path.join(directory, "out"),
                             formats=("packed", "litert"))
      interpreter = Interpreter(os.path.join(directory, "out", "model.tflite"))
      interpreter.allocate_tensors()
      interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                             inputs)
      interpreter.invoke()
      outputs = interpreter.get_tensor(
          interpreter.get_output_details()[0]["index"])
    self.assertEqual(report["files"], {"packed": "model.opq",
                                       "litert": "model.tflite"})
    np.testing.assert_allclose(outputs, _predict(opq_tf.strip(qmodel), inputs),
                               atol=1e-5)


@absltest.skipUnless(BACKEND == "jax" and len(
    __import__("jax").devices()) >= 2, "layouts: JAX with 2 devices")
class DistributionTest(absltest.TestCase):

  def test_masks_are_laid_out_as_their_kernels(self):
    devices = keras.distribution.list_devices()[:2]
    mesh = keras.distribution.DeviceMesh((2,), ["model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["hidden/kernel"] = (None, "model")
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    with distribution.scope():
      inputs = keras.Input((4,))
      model = keras.Model(inputs, keras.layers.Dense(8, name="hidden")(inputs))
      models.randomize(model)
      qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=4)
    wrapper = qmodel.get_layer("hidden")
    (_, _, kernel, variables), = wrapper.kernels()
    self.assertEqual(variables["mask"].value.sharding, kernel.value.sharding)
    self.assertEqual(tuple(variables["step"].value.sharding.spec), ("model",))


if __name__ == "__main__":
  absltest.main()
