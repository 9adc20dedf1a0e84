"""Tests for opq_tf's public verbs: dispatch by model class, and a light import."""

import os
import subprocess
import sys

from absl.testing import absltest
import numpy as np

import opq_tf
from opq_tf.tf_keras._keras import keras


class ImportTest(absltest.TestCase):

  def test_import_loads_no_tensorflow_no_keras_and_sets_no_variable(self):
    code = ("import os, sys, opq_tf; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'tensorflow', 'keras', 'tf_keras', 'jax', 'torch'}), "
            "os.environ.get('TF_USE_LEGACY_KERAS'))")
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, env=env).stdout
    self.assertEqual(out.strip(), "[] None")

  def test_tf_keras_models_work_where_tf_keras_is_keras_3(self):
    # TensorFlow imported first, without TF_USE_LEGACY_KERAS: tf.keras is
    # Keras 3, and tfmot (hence the tf_keras frontend) still serves tf_keras.
    code = "\n".join([
        "import numpy as np, tensorflow as tf, tf_keras, opq_tf",
        "assert tf.keras.__name__.startswith('keras'), tf.keras.__name__",
        "m = tf_keras.Sequential([tf_keras.Input((6,)), tf_keras.layers.Dense(4)])",
        "plan = opq_tf.allocate(m, pruning_rate=0.5, bits=4)",
        "q = opq_tf.apply(m, plan)",
        "x = np.ones((2, 6), np.float32)",
        "same = np.allclose(q(x), opq_tf.strip(q)(x), atol=1e-6)",
        "from opq_tf.tf_keras import wrapping",
        "kept = sum(int(k.mask.sum()) for k in wrapping.compressed_kernels(q))",
        "print(same, kept == plan.kept_weights)",
    ])
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, env=env).stdout
    self.assertEqual(out.strip().splitlines()[-1], "True True")


class FrontendOfTest(absltest.TestCase):

  def test_tf_keras_model_and_layer_class(self):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    self.assertEqual(opq_tf.frontend_of(model), "tf_keras")
    self.assertEqual(opq_tf.frontend_of(keras.layers.Dense), "tf_keras")

  def test_not_keras_names_what_it_got(self):
    with self.assertRaisesRegex(TypeError, "needs a Keras model.*ndarray"):
      opq_tf.apply(np.zeros(3), pruning_rate=0.5, bits=4)


if __name__ == "__main__":
  absltest.main()
