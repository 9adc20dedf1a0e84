"""Tests for opq_tf.training.pretrained: FP32 weights in every format, shapes checked."""

import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from opq_tf.training import models
from opq_tf.training import pretrained
from opq_tf.tf_keras._keras import tf
import model_inputs


class LoadPretrainedTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.source = model_inputs.small(seed=1)
    cls.wrong = model_inputs.small(num_classes=7, seed=2)
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
    model = model_inputs.small(seed=3)
    self.assertIs(pretrained.load(model, self.paths[kind]), model)
    for expected, actual in zip(self.source.weights, model.weights):
      np.testing.assert_array_equal(expected.numpy(), actual.numpy(),
                                    err_msg=actual.name)
    images = model_inputs.images(32)
    np.testing.assert_allclose(model(images), self.source(images), rtol=1e-5,
                               atol=1e-5)

  @parameterized.parameters("legacy_h5", "v3_weights_h5", "tf_prefix",
                            "checkpoint", "saved_model")
  def test_shape_mismatch_names_layer_and_shapes(self, kind):
    model = model_inputs.small(seed=3)
    before = [w.numpy() for w in model.weights]
    with self.assertRaises(ValueError) as caught:
      pretrained.load(model, self.wrong_paths[kind])
    message = str(caught.exception)
    self.assertIn("logits", message)
    self.assertRegex(message, r"\(128, 7\)")
    self.assertRegex(message, r"\(128, 10\)")
    for old, weight in zip(before, model.weights):  # nothing half-loaded
      np.testing.assert_array_equal(old, weight.numpy())

  def test_missing_file(self):
    with self.assertRaisesRegex(ValueError, "do not exist"):
      pretrained.load(model_inputs.small(), os.path.join(self.root, "nope.h5"))

  def test_other_architecture(self):
    other = models.build("alexnet", 10, 63)
    path = os.path.join(self.root, "alexnet.h5")
    other.save_weights(path)
    with self.assertRaisesRegex(ValueError, "no layer"):
      pretrained.load(model_inputs.small(), path)

  def test_imagenet_needs_a_keras_application_at_224(self):
    with self.assertRaisesRegex(ValueError, "no ImageNet weights"):
      pretrained.load(model_inputs.small(), "imagenet")
    with self.assertRaisesRegex(ValueError, "image_size 224"):
      pretrained.load(models.build("mobilenet_v1", 1000, 64), "imagenet")

  def test_save_is_atomic_legacy_h5(self):
    directory = tempfile.mkdtemp(dir=self.root)
    path = os.path.join(directory, "weights.h5")
    pretrained.save(self.source, path)
    self.assertEqual(os.listdir(directory), ["weights.h5"])
    model = model_inputs.small(seed=3)
    pretrained.load(model, path)
    for expected, actual in zip(self.source.weights, model.weights):
      np.testing.assert_array_equal(expected.numpy(), actual.numpy())


if __name__ == "__main__":
  absltest.main()
