"""Tests for opq_tf.apply: wrapping, fixed masks/steps in training, strip."""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import opq_tf
from opq_tf.tf_keras import wrapping
from opq_tf.core import grid
from opq_tf.tf_keras import layers as layers_lib
import cpu_devices
from opq_tf.tf_keras._keras import keras, tf, tfmot

_tfmot_keras = tfmot.quantization.keras


cpu_devices.split_cpu()


def _small_model() -> keras.Model:
  inputs = keras.Input((8, 8, 3))
  x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.ReLU(name="relu")(x)
  x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
  x = keras.layers.SeparableConv2D(8, 3, name="separable")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def _data(count=160, seed=0):
  random = np.random.RandomState(seed)
  images = random.uniform(-1, 1, (count, 8, 8, 3)).astype(np.float32)
  labels = random.randint(0, 3, count).astype(np.int32)
  return images, labels


def _state(qmodel):
  """key -> (latent kernel, mask, step, TF-computed compressed kernel)."""
  state = {}
  for wrapper, attr, weight, quantizer, variables in wrapping._opq_weights(qmodel):  # pylint: disable=protected-access
    compressed = quantizer(weight, False, variables)
    state[f"{wrapper.layer.name}/{attr}"] = (
        weight.numpy().copy(), variables["mask"].numpy().copy(),
        variables["step"].numpy().copy(), compressed.numpy(),
        quantizer.max_code)
  return state


class ApplyTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    keras.backend.clear_session()
    tf.random.set_seed(0)
    np.random.seed(0)

  def _assert_fixed_and_compressed(self, before, after):
    """Masks/steps unchanged, pruned exactly 0, kept on grid, weights moved."""
    self.assertEqual(set(before), set(after))
    moved = 0
    for key, (kernel, mask, step, _, max_code) in before.items():
      new_kernel, new_mask, new_step, compressed, _ = after[key]
      np.testing.assert_array_equal(new_mask, mask, err_msg=key)
      self.assertEqual(new_step.tobytes(), step.tobytes(), key)
      pruned = mask == 0
      np.testing.assert_array_equal(compressed[pruned], 0.0, err_msg=key)
      codes = np.round(compressed / step)
      np.testing.assert_array_equal(codes * step, compressed, err_msg=key)
      self.assertLessEqual(np.abs(codes).max(), max_code, key)
      # Straight-through gradient is the mask: latent pruned weights never move.
      np.testing.assert_array_equal(new_kernel[pruned], kernel[pruned],
                                    err_msg=key)
      moved += np.count_nonzero(new_kernel[~pruned] != kernel[~pruned])
    self.assertGreater(moved, 0)

  @parameterized.named_parameters(
      ("resnet50", keras.applications.ResNet50),
      ("mobilenet", keras.applications.MobileNet),
      ("mobilenet_v2", keras.applications.MobileNetV2),
      ("efficientnet_b0", keras.applications.EfficientNetB0),
  )
  def test_applications(self, application):
    model = application(weights=None, input_shape=(32, 32, 3), classes=4)
    kernels = layers_lib.compressible_kernels(model)
    plan = opq_tf.allocate(model, pruning_rate=0.6, bits=4)
    qmodel = wrapping.apply(model, plan)
    entries = wrapping.compressed_kernels(qmodel)
    self.assertEqual([entry.key for entry in entries], list(kernels))
    by_key = plan.by_key()
    for entry in entries:
      kernel = kernels[entry.key].values
      np.testing.assert_array_equal(entry.kernel, kernel)
      np.testing.assert_array_equal(
          entry.mask, np.abs(kernel) >= by_key[entry.key].threshold)
      np.testing.assert_array_equal(entry.step,
                                    by_key[entry.key].step_array())
      self.assertEqual(entry.step.shape, grid.step_shape(
          kernel.shape, kernels[entry.key].channel_axes))
      self.assertEqual(entry.kind, kernels[entry.key].kind)
    wrapped = [l for l in qmodel.layers
               if isinstance(l, _tfmot_keras.QuantizeWrapper)]
    self.assertLen(wrapped, len({entry.layer_name for entry in entries}))
    self.assertFalse([l.name for l in qmodel.layers
                      if "quantize_layer" in type(l).__module__])
    kept = sum(e.mask.sum() for e in entries)
    self.assertAlmostEqual(1 - kept / sum(e.mask.size for e in entries),
                           plan.realised_pruning_rate, places=6)
    images = np.random.RandomState(0).uniform(size=(2, 32, 32, 3))
    images = images.astype(np.float32)
    self.assertTrue(np.all(np.isfinite(qmodel(images, training=False).numpy())))

  def test_nested_functional_model_matches_compressed_original(self):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="rescale")(inputs)
    backbone = _small_model()
    x = keras.Model(backbone.inputs, backbone.get_layer("pool").output,
                    name="backbone")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    qmodel = opq_tf.apply(model, pruning_rate=0.7, bits=3)
    self.assertFalse([l for l in qmodel.layers if isinstance(l, keras.Model)])
    entries = wrapping.compressed_kernels(qmodel)
    self.assertEqual([e.key for e in entries],
                     list(layers_lib.compressible_kernels(model)))
    images = np.random.RandomState(0).uniform(0, 255, (4, 8, 8, 3))
    images = images.astype(np.float32)
    for entry in entries:  # The original, nested, with compressed kernels.
      layer = next(l for l in layers_lib.iter_layers(model)
                   if l.name == entry.layer_name)
      getattr(layer, entry.weight).assign(entry.compressed)
    np.testing.assert_allclose(qmodel(images, training=False).numpy(),
                               model(images, training=False).numpy(), atol=1e-5)

  def test_subclassed_model_raises_type_error_naming_fix(self):

    class Net(keras.Model):

      def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

      def call(self, inputs):
        return self.dense(inputs)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    with self.assertRaisesRegex(TypeError,
                                "rebuild it as a Functional or Sequential"):
      wrapping.apply(net, pruning_rate=0.5, bits=4)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, "not built.*input shape"):
      wrapping.apply(keras.Sequential([keras.layers.Dense(2)]),
                      pruning_rate=0.5, bits=4)
    model = _small_model()
    with self.assertRaisesRegex(ValueError, "needs pruning_rate and bits"):
      wrapping.apply(model)
    other_plan = opq_tf.allocate(
        {"other/kernel": np.random.RandomState(0).normal(size=(4, 4))}, 0.5, 4)
    with self.assertRaisesRegex(ValueError,
                                r"not in model.*\['other/kernel'\]"):
      wrapping.apply(model, other_plan)
    plan = opq_tf.allocate(model, 0.5, 4)
    with self.assertRaisesRegex(ValueError, "either a plan or pruning_rate"):
      wrapping.apply(model, plan, bits=4)
    with self.assertRaisesRegex(
        ValueError, "was never applied: call opq_tf.apply first"):
      wrapping.compressed_kernels(model)
    no_kernels = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.BatchNormalization(),
         keras.layers.GlobalAveragePooling2D()])
    with self.assertRaisesRegex(ValueError, "no compressible layer.*register"):
      wrapping.apply(no_kernels, pruning_rate=0.5, bits=4)
    broken = _small_model()
    kernel = broken.get_layer("conv").kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0, 0, 0]], [np.nan]))
    with self.assertRaisesRegex(ValueError, "conv/kernel contains NaN or Inf"):
      wrapping.apply(broken, pruning_rate=0.5, bits=4)

  def test_fit_keeps_masks_and_steps_fixed(self):
    qmodel = opq_tf.apply(_small_model(), pruning_rate=0.7, bits=3)
    before = _state(qmodel)
    qmodel.compile(
        keras.optimizers.SGD(learning_rate=1.0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images, labels = _data()
    history = qmodel.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    self.assertEqual(qmodel.optimizer.iterations.numpy(), 20)
    self.assertTrue(np.isfinite(history.history["loss"][-1]))
    self._assert_fixed_and_compressed(before, _state(qmodel))

  def test_gradient_tape_loop(self):
    qmodel = opq_tf.apply(_small_model(), pruning_rate=0.6, bits=4)
    before = _state(qmodel)
    optimizer = keras.optimizers.SGD(learning_rate=0.5)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dataset = tf.data.Dataset.from_tensor_slices(_data(64)).batch(16)

    @tf.function
    def train_step(images, labels):
      with tf.GradientTape() as tape:
        loss = loss_fn(labels, qmodel(images, training=True))
      gradients = tape.gradient(loss, qmodel.trainable_variables)
      optimizer.apply_gradients(zip(gradients, qmodel.trainable_variables))
      return loss

    for _ in range(2):
      losses = [float(train_step(images, labels)) for images, labels in dataset]
    self.assertTrue(np.all(np.isfinite(losses)))
    self.assertNotIn(id(qmodel.get_layer("quant_conv").weights[-1]),
                     {id(v) for v in qmodel.trainable_variables})
    self._assert_fixed_and_compressed(before, _state(qmodel))

  def test_mirrored_strategy_two_replicas(self):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < 2:
      self.skipTest("TF was initialised before this module could split the "
                    "CPU; run tests/wrapping_test.py on its own.")
    strategy = tf.distribute.MirroredStrategy(devices[:2])
    model = _small_model()
    plan = opq_tf.allocate(model, pruning_rate=0.7, bits=3)
    with strategy.scope():
      qmodel = opq_tf.apply(model, plan)
      qmodel.compile(
          keras.optimizers.SGD(learning_rate=0.5),
          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    opq_weights = list(wrapping._opq_weights(qmodel))  # pylint: disable=protected-access
    self.assertLen(opq_weights, 5)
    for *_, variables in opq_weights:
      mask = variables["mask"]
      self.assertTrue(strategy.extended.variable_created_in_scope(mask))
      replicas = strategy.experimental_local_results(mask)
      self.assertLen(replicas, 2)
      np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
      self.assertFalse(replicas[1].numpy().all())  # Assigned on every replica.
    before = _state(qmodel)
    images, labels = _data(64)
    qmodel.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    self._assert_fixed_and_compressed(before, _state(qmodel))

  def test_strip(self):
    model = _small_model()
    qmodel = opq_tf.apply(model, pruning_rate=0.7, bits=3)
    qmodel.compile(keras.optimizers.SGD(0.1),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qmodel.fit(*_data(32), batch_size=16, verbose=0)  # Moves the BN statistics.
    stripped = opq_tf.strip(qmodel)
    self.assertEqual([l.name for l in stripped.layers],
                     [l.name for l in model.layers])
    self.assertEqual([type(l) for l in stripped.layers],
                     [type(l) for l in model.layers])
    self.assertFalse([type(l).__name__ for l in stripped.layers
                      if "tensorflow_model_optimization" in type(l).__module__])
    for entry in wrapping.compressed_kernels(qmodel):
      layer = stripped.get_layer(entry.layer_name)
      kernel = getattr(layer, entry.weight).numpy()
      np.testing.assert_array_equal(kernel, entry.compressed)
      self.assertTrue(np.all(kernel[~entry.mask] == 0))
    np.testing.assert_array_equal(
        stripped.get_layer("bn").moving_mean.numpy(),
        qmodel.get_layer("bn").moving_mean.numpy())
    images, _ = _data(8, seed=1)
    np.testing.assert_allclose(stripped(images, training=False).numpy(),
                               qmodel(images, training=False).numpy(),
                               atol=1e-5)

  def test_quantize_activations_and_unplanned_layers_untouched(self):
    model = _small_model()
    plan = opq_tf.allocate(model, 0.5, 4,
                           overrides={"depthwise": {"skip": True}})
    qmodel = opq_tf.apply(model, plan, quantize_activations=True)
    self.assertIs(type(qmodel.get_layer("depthwise")),
                  keras.layers.DepthwiseConv2D)
    self.assertIs(type(qmodel.get_layer("relu")), keras.layers.ReLU)
    wrapper = qmodel.get_layer("quant_conv")
    self.assertIsInstance(wrapper._output_quantizers[0],  # pylint: disable=protected-access
                          _tfmot_keras.quantizers.MovingAverageQuantizer)
    self.assertEqual(wrapper._output_quantizers[0].num_bits, 8)  # pylint: disable=protected-access
    output_max = wrapper._output_quantizer_vars["max_var"]  # pylint: disable=protected-access
    self.assertEqual(float(output_max.numpy()), 6.0)
    qmodel.compile(keras.optimizers.SGD(0.1),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = qmodel.fit(*_data(32), batch_size=16, verbose=0)
    self.assertTrue(np.isfinite(history.history["loss"][-1]))
    self.assertNotEqual(float(output_max.numpy()), 6.0)
    images, _ = _data(4, seed=1)
    outputs = keras.Model(qmodel.inputs, wrapper.output)(images, training=False)
    levels = np.unique(outputs.numpy())
    self.assertLessEqual(len(levels), 256)


class CopiedModelTest(parameterized.TestCase):
  """A compressed model keeps its state in its variables, not in attributes:
  a clone or a reloaded .h5 strips, calibrates and exports like the original."""

  @parameterized.named_parameters(("clone", "clone"), ("h5", "h5"))
  def test_copy_strips_calibrates_and_exports(self, how):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))
    plan = opq_tf.allocate(model, pruning_rate=0.5, bits=4)
    qmodel = opq_tf.apply(model, plan)
    with tfmot.quantization.keras.quantize_scope():
      if how == "clone":
        copy = keras.models.clone_model(qmodel)
        copy.set_weights(qmodel.get_weights())
      else:
        path = os.path.join(tempfile.mkdtemp(), "q.h5")
        qmodel.save(path)
        copy = keras.models.load_model(path)
    images = np.random.RandomState(0).uniform(
        size=(20, 8, 8, 3)).astype(np.float32)

    np.testing.assert_array_equal(opq_tf.strip(copy)(images),
                                  opq_tf.strip(qmodel)(images))
    report = opq_tf.calibrate(copy, images, reconstruct=True)
    self.assertEqual(report.batchnorm_layers, ("bn",))
    self.assertEqual(set(report.kernels), {"conv/kernel", "dense/kernel"})
    exported = opq_tf.export(
        copy, os.path.join(tempfile.mkdtemp(), "out"), plan=plan)
    self.assertEqual(exported["kept_weights"], plan.kept_weights)
    # The reconstruction moved kept weights only; masks and steps are the
    # original's.
    for got, want in zip(wrapping.compressed_kernels(copy),
                         wrapping.compressed_kernels(qmodel)):
      np.testing.assert_array_equal(got.mask, want.mask)
      np.testing.assert_array_equal(got.step, want.step)


class AttentionTest(absltest.TestCase):
  """A MultiHeadAttention is wrapped once for its four EinsumDense kernels."""

  def test_wrapped_copies_and_original_untouched(self):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 6))
    x = keras.layers.MultiHeadAttention(2, 3, name="mha")(inputs, inputs)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    original = [w.numpy() for w in model.weights]
    qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=4)
    wrapper = qmodel.get_layer("quant_mha")
    self.assertEqual(wrapper.quantize_config.weight_attrs, (
        "_query_dense/kernel", "_key_dense/kernel", "_value_dense/kernel",
        "_output_dense/kernel"))
    mask_names = [v.name for v in wrapper.non_trainable_weights
                  if "_mask" in v.name]
    self.assertLen(set(mask_names), 4)
    self.assertIn("quant_mha/_query_dense_kernel_mask:0", mask_names)
    # The model's own layers still hold their kernel variables, unchanged.
    for weight, value in zip(model.weights, original):
      np.testing.assert_array_equal(weight.numpy(), value)
    self.assertIsInstance(model.get_layer("mha")._query_dense.kernel,  # pylint: disable=protected-access
                          tf.Variable)
    sequences = np.random.RandomState(0).normal(size=(5, 4, 6)).astype(
        np.float32)
    expected = qmodel(sequences).numpy()
    with tfmot.quantization.keras.quantize_scope():
      clone = keras.models.clone_model(qmodel)
      clone.set_weights(qmodel.get_weights())
      path = os.path.join(tempfile.mkdtemp(), "q.h5")
      qmodel.save(path)
      reloaded = keras.models.load_model(path)
    for copy in (clone, reloaded):
      np.testing.assert_array_equal(copy(sequences).numpy(), expected)
      for got, want in zip(wrapping.compressed_kernels(copy),
                           wrapping.compressed_kernels(qmodel)):
        self.assertEqual((got.key, got.kind), (want.key, "EinsumDense")
                         if want.key.startswith("mha/") else
                         (want.key, "Dense"))
        np.testing.assert_array_equal(got.mask, want.mask)
    kernel = wrapping.compressed_kernels(qmodel)[0]
    self.assertEqual((kernel.layer_name, kernel.weight),
                     ("mha/_query_dense", "kernel"))


if __name__ == "__main__":
  absltest.main()
