"""Tests for opq_tf.training.models: the four networks (weights: pretrained_test.py),
and any user model: tf_keras.applications constructors and saved models."""

import collections
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from opq_tf.tf_keras import layers
from opq_tf.training import models
from opq_tf.training import pretrained
from opq_tf.tf_keras._keras import keras
import model_inputs
from opq_tf.tf_keras.wrapping import apply, compressed_kernels


def _kernel_kinds(model):
  return collections.Counter(
      kernel.kind for kernel in layers.compressible_kernels(model).values())


class BuildTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # name, image size, classes, compressible kernels by kind, kernel weights
      ("resnet50", "resnet50", 64, 1000, {"Conv2D": 53, "Dense": 1}, 25_502_912),
      ("mobilenet_v1", "mobilenet_v1", 64, 1000,
       {"Conv2D": 15, "DepthwiseConv2D": 13}, 4_209_088),
      ("alexnet", "alexnet", 63, 1000, {"Conv2D": 5, "Dense": 3}, 61_090_496),
      ("small_resnet", "small_resnet", 32, 10, {"Conv2D": 10, "Dense": 1},
       308_320),
  )
  def test_compressible_kernels(self, name, size, classes, kinds, weights):
    model = models.build(name, classes, size)
    self.assertEqual(model.name, name)
    self.assertEqual(_kernel_kinds(model), kinds)
    kernels = layers.compressible_kernels(model).values()
    self.assertEqual(sum(kernel.values.size for kernel in kernels), weights)
    self.assertEqual(model.output_shape, (None, classes))
    self.assertEqual(model(model_inputs.images(size)).shape, (2, classes))

  def test_alexnet_has_torchvisions_parameter_count(self):
    model = models.build("alexnet", 1000, 224)
    self.assertEqual(model.count_params(), 61_100_840)
    self.assertEqual(model.get_layer("pool5").output_shape, (None, 6, 6, 256))
    self.assertEqual(model.get_layer("fc6").kernel.shape, (9216, 4096))

  @parameterized.parameters((63, 1), (100, 2), (227, 6))
  def test_alexnet_pools_any_size_to_6x6(self, size, pool5_side):
    model = models.build("alexnet", 10, size)
    self.assertEqual(model.get_layer("pool5").output_shape[1], pool5_side)
    self.assertEqual(model.get_layer("fc6").kernel.shape, (9216, 4096))

  @parameterized.named_parameters(
      ("resnet50_caffe", "resnet50", "caffe_mean",
       keras.applications.resnet50.preprocess_input),
      ("mobilenet_tf", "mobilenet_v1", "to_unit_range",
       keras.applications.mobilenet.preprocess_input),
      ("alexnet_torch", "alexnet", "torch_normalize",
       lambda x: keras.applications.imagenet_utils.preprocess_input(
           x, mode="torch")),
  )
  def test_normalisation_matches_the_pretrained_weights(self, name, last_layer,
                                                        preprocess):
    """The model's own first layers equal Keras' preprocess_input for it."""
    model = models.build(name, 10, 64)
    normalise = keras.Model(model.input, model.get_layer(last_layer).output)
    images = model_inputs.images(64)
    np.testing.assert_allclose(normalise(images).numpy(),
                               preprocess(images.copy()), rtol=1e-5, atol=1e-4)

  def test_small_resnet_uses_synchronized_batchnorm(self):
    norms = [l for l in model_inputs.small().layers
             if isinstance(l, keras.layers.BatchNormalization)]
    self.assertLen(norms, 10)
    self.assertTrue(all(l.synchronized for l in norms))

  @parameterized.parameters(("vgg16", 10, 224, "Unknown model"),
                            ("alexnet", 10, 62, "image_size=62"),
                            ("small_resnet", 1, 32, "num_classes=1"))
  def test_bad_arguments(self, name, classes, size, message):
    with self.assertRaisesRegex(ValueError, message):
      models.build(name, classes, size)

  def test_apply_flattens_nested_mobilenet(self):
    """opq_tf.apply compresses every kernel of the nested Keras backbone."""
    model = models.build("mobilenet_v1", 10, 32)
    qmodel = apply(model, pruning_rate=0.5, bits=4)
    entries = compressed_kernels(qmodel)
    self.assertLen(entries, 28)
    self.assertEqual(sum(e.kind == "DepthwiseConv2D" for e in entries), 13)
    images = model_inputs.images(32)
    self.assertEqual(qmodel(images).shape, (2, 10))


def _preprocess_input(images, mode):
  if mode == "none":
    return images.copy()
  return keras.applications.imagenet_utils.preprocess_input(images.copy(),
                                                            mode=mode)


def _tiny_user_model(size=16, num_classes=5, seed=0):
  """A small full model with BatchNorm, as a user might save one (logits out)."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((size, size, 3))
  x = keras.layers.Conv2D(8, 3, name="user_conv")(inputs)
  x = keras.layers.BatchNormalization(name="user_bn")(x)
  x = keras.layers.ReLU(name="user_relu")(x)
  x = keras.layers.DepthwiseConv2D(3, name="user_dw")(x)
  x = keras.layers.GlobalAveragePooling2D(name="user_pool")(x)
  outputs = keras.layers.Dense(num_classes, name="user_logits")(x)
  model = keras.Model(inputs, outputs, name="user_net")
  # Non-trivial BatchNorm statistics, so that a lost weight would show.
  model.get_layer("user_bn").set_weights(
      [np.linspace(0.5, 1.5, 8), np.linspace(-1, 1, 8), np.linspace(-2, 2, 8),
       np.linspace(1, 3, 8)])
  return model


class UserModelTest(parameterized.TestCase):
  """config.model = "applications.<Constructor>" or a saved full model."""

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  @parameterized.parameters("none", "tf", "torch", "caffe")
  def test_applications_constructor_with_options(self, preprocessing):
    model = models.build("applications.MobileNet", 10, 32,
                         model_options='{"alpha": 0.25}',
                         preprocessing=preprocessing)
    backbone = model.layers[-1]
    self.assertEqual(backbone.name, "mobilenet_0.25_32")
    self.assertEqual(backbone.get_layer("conv1").filters, 8)  # 32 * 0.25
    self.assertEqual(model.input_shape, (None, 32, 32, 3))
    self.assertEqual(model.output_shape, (None, 10))
    # Logits, like the built-ins (the trainers' loss takes logits).
    self.assertEqual(backbone.layers[-1].activation.__name__, "linear")
    images = model_inputs.images(32)
    scaled = keras.Model(model.input, model.layers[-2].output)(images)
    np.testing.assert_allclose(scaled.numpy(),
                               _preprocess_input(images, preprocessing),
                               rtol=1e-5, atol=1e-4)

  def test_applications_weights_load_by_name_into_the_nested_backbone(self):
    """A by-name .h5 of the bare constructor (the shared MobileNet's kind)."""
    keras.utils.set_random_seed(1)
    bare = keras.applications.MobileNet(
        alpha=0.25, weights=None, input_shape=(32, 32, 3), classes=10,
        classifier_activation=None)
    path = os.path.join(self.root, "bare.h5")
    bare.save_weights(path)
    model = models.build("applications.MobileNet", 10, 32,
                         model_options={"alpha": 0.25}, preprocessing="tf")
    pretrained.load(model, path)
    images = model_inputs.images(32)
    np.testing.assert_allclose(
        model(images).numpy(), bare(_preprocess_input(images, "tf")).numpy(),
        rtol=1e-4, atol=1e-4)

  @parameterized.named_parameters(
      ("keras", "user.keras", "saved:"),
      ("h5", "user.h5", ""),
      ("saved_model", "user_saved_model", "saved:"),
  )
  def test_saved_full_model_round_trip(self, file_name, prefix):
    user = _tiny_user_model()
    path = os.path.join(self.root, file_name)
    user.save(path, save_format=None if "." in file_name else "tf")
    model = models.build(prefix + path, 5, 16, preprocessing="torch")
    images = model_inputs.images(16, n=3)
    expected = user(_preprocess_input(images, "torch")).numpy()
    np.testing.assert_allclose(model(images).numpy(), expected, rtol=1e-4,
                               atol=1e-4)
    # The trainers then load config.pretrained = the same path into it.
    fresh = models.build(prefix + path, 5, 16, preprocessing="torch")
    for weight in fresh.weights:
      weight.assign(np.zeros(weight.shape, weight.dtype.as_numpy_dtype))
    pretrained.load(fresh, path)
    np.testing.assert_allclose(fresh(images).numpy(), expected, rtol=1e-4,
                               atol=1e-4)
    # And OPQ inlines it: every kernel of the user's model is compressed.
    qmodel = apply(model, pruning_rate=0.5, bits=4)
    self.assertEqual(sorted(e.kind for e in compressed_kernels(qmodel)),
                     ["Conv2D", "Dense", "DepthwiseConv2D"])
    self.assertEqual(qmodel(images).shape, (3, 5))

  def test_apply_compresses_an_applications_model(self):
    model = models.build("applications.MobileNet", 10, 32,
                         model_options='{"alpha": 0.25}', preprocessing="tf")
    qmodel = apply(model, pruning_rate=0.5, bits=4)
    self.assertLen(compressed_kernels(qmodel), 28)
    self.assertEqual(qmodel(model_inputs.images(32)).shape, (2, 10))

  @parameterized.named_parameters(
      ("unknown_constructor", "applications.MobileNetV9", "{}", "none",
       r"no constructor 'MobileNetV9'.*applications\.\{.*MobileNet,"),
      ("bad_json", "applications.MobileNet", "{alpha: 0.75}", "tf",
       r"not valid JSON.*model_options='\{\"alpha\": 0\.75\}'"),
      ("json_not_object", "applications.MobileNet", "[0.75]", "tf",
       "not a JSON object"),
      ("own_option", "applications.MobileNet", '{"weights": "imagenet"}', "tf",
       r"sets \['weights'\].*config\.pretrained"),
      ("bad_option", "applications.MobileNet", '{"depth": 3}', "tf",
       r"refused model_options=\{'depth': 3\}.*Fix --config\.model_options"),
      ("missing_path", "saved:/nonexistent/model.keras", "{}", "none",
       r"'/nonexistent/model\.keras' does not exist"),
      ("unknown_preprocessing", "applications.MobileNet", "{}", "inception",
       r"Unknown preprocessing 'inception'.*'none', 'tf', 'torch', 'caffe'"),
      ("options_on_builtin", "mobilenet_v1", '{"alpha": 0.5}', "none",
       "is a built-in model"),
      ("preprocessing_on_builtin", "small_resnet", "{}", "tf",
       "is a built-in model"),
  )
  def test_errors_name_the_fix(self, name, options, preprocessing, message):
    with self.assertRaisesRegex(ValueError, message):
      models.build(name, 10, 32, model_options=options,
                   preprocessing=preprocessing)

  def test_saved_model_must_fit_the_config(self):
    user = _tiny_user_model()
    path = os.path.join(self.root, "user.keras")
    user.save(path)
    with self.assertRaisesRegex(ValueError, "--config.num_classes=5"):
      models.build(path, 7, 16)
    with self.assertRaisesRegex(ValueError, "set --config.image_size"):
      models.build(path, 5, 32)
    softmax = keras.Sequential([keras.Input((16, 16, 3)),
                                keras.layers.Flatten(),
                                keras.layers.Dense(5, activation="softmax")])
    softmax_path = os.path.join(self.root, "softmax.keras")
    softmax.save(softmax_path)
    with self.assertRaisesRegex(ValueError, "ends in a softmax"):
      models.build(softmax_path, 5, 16)
    weights_only = os.path.join(self.root, "weights_only.h5")
    user.save_weights(weights_only)
    with self.assertRaisesRegex(ValueError, "not a full tf_keras model"):
      models.build("saved:" + weights_only, 5, 16)


if __name__ == "__main__":
  absltest.main()
