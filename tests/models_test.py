"""Tests for opq_tf.models: the four networks and loading pre-trained weights."""

import collections
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from opq_tf import layers
from opq_tf import models
from opq_tf._keras import keras, tf
from opq_tf.wrapping import apply, compressed_entries


def _kernel_kinds(model):
  return collections.Counter(
      kind for kind, _ in layers.compressible_kernels(model).values())


def _images(size, n=2, seed=0):
  return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(
      np.float32)


def _small(num_classes=10, seed=0):
  keras.utils.set_random_seed(seed)
  return models.build("small_resnet", num_classes, 32)


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
    self.assertEqual(sum(kernel.size for _, kernel in kernels), weights)
    self.assertEqual(model.output_shape, (None, classes))
    self.assertEqual(model(_images(size)).shape, (2, classes))

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
    images = _images(64)
    np.testing.assert_allclose(normalise(images).numpy(),
                               preprocess(images.copy()), rtol=1e-5, atol=1e-4)

  def test_small_resnet_uses_synchronized_batchnorm(self):
    norms = [l for l in _small().layers
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
    entries = compressed_entries(qmodel)
    self.assertLen(entries, 28)
    self.assertEqual(sum(e.kind == "DepthwiseConv2D" for e in entries), 13)
    images = _images(32)
    self.assertEqual(qmodel(images).shape, (2, 10))


class LoadPretrainedTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.source = _small(seed=1)
    cls.wrong = _small(num_classes=7, seed=2)
    cls.paths, cls.wrong_paths = {}, {}
    for kind in ("legacy_h5", "v3_weights_h5", "tf_prefix", "checkpoint",
                 "saved_model"):
      cls.paths[kind] = cls._save(cls.source, kind, "right")
      cls.wrong_paths[kind] = cls._save(cls.wrong, kind, "wrong")

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def _save(cls, model, kind, tag):
    base = os.path.join(cls.root, f"{tag}_{kind}")
    if kind == "legacy_h5":
      model.save_weights(base + ".h5")
      return base + ".h5"
    if kind == "v3_weights_h5":
      model.save_weights(base + ".weights.h5")
      return base + ".weights.h5"
    if kind == "tf_prefix":
      model.save_weights(base)
      return base
    if kind == "checkpoint":  # as the trainers' checkpoints: root.model
      return tf.train.Checkpoint(model=model).write(base)
    model.save(base, save_format="tf")
    return base

  @parameterized.parameters("legacy_h5", "v3_weights_h5", "tf_prefix",
                            "checkpoint", "saved_model")
  def test_round_trip(self, kind):
    model = _small(seed=3)
    self.assertIs(models.load_pretrained(model, self.paths[kind]), model)
    for expected, actual in zip(self.source.weights, model.weights):
      np.testing.assert_array_equal(expected.numpy(), actual.numpy(),
                                    err_msg=actual.name)
    images = _images(32)
    np.testing.assert_allclose(model(images), self.source(images), rtol=1e-5,
                               atol=1e-5)

  @parameterized.parameters("legacy_h5", "v3_weights_h5", "tf_prefix",
                            "checkpoint", "saved_model")
  def test_shape_mismatch_names_layer_and_shapes(self, kind):
    model = _small(seed=3)
    before = [w.numpy() for w in model.weights]
    with self.assertRaises(ValueError) as caught:
      models.load_pretrained(model, self.wrong_paths[kind])
    message = str(caught.exception)
    self.assertIn("logits", message)
    self.assertRegex(message, r"\(128, 7\)")
    self.assertRegex(message, r"\(128, 10\)")
    for old, weight in zip(before, model.weights):  # nothing half-loaded
      np.testing.assert_array_equal(old, weight.numpy())

  def test_missing_file(self):
    with self.assertRaisesRegex(ValueError, "do not exist"):
      models.load_pretrained(_small(), os.path.join(self.root, "nope.h5"))

  def test_other_architecture(self):
    other = models.build("alexnet", 10, 63)
    path = os.path.join(self.root, "alexnet.h5")
    other.save_weights(path)
    with self.assertRaisesRegex(ValueError, "no layer"):
      models.load_pretrained(_small(), path)

  def test_imagenet_needs_a_keras_application_at_224(self):
    with self.assertRaisesRegex(ValueError, "no ImageNet weights"):
      models.load_pretrained(_small(), "imagenet")
    with self.assertRaisesRegex(ValueError, "image_size 224"):
      models.load_pretrained(models.build("mobilenet_v1", 1000, 64), "imagenet")


if __name__ == "__main__":
  absltest.main()
