"""The one place opq_tf imports TensorFlow, tf_keras and tfmot.

tfmot 0.8 only understands Keras 2 (tf_keras). TF_USE_LEGACY_KERAS=1 must be set
before TensorFlow is first imported so that tf.keras, tfmot and our code all see
the same Keras; importing TensorFlow any other way first is an error we name.
"""

import os
import sys

if "tensorflow" not in sys.modules:
  os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if not tf.keras.__name__.startswith("tf_keras"):
  raise ImportError(
      "TensorFlow was imported before opq_tf with Keras 3 as tf.keras; tfmot "
      "needs Keras 2. Set TF_USE_LEGACY_KERAS=1 in the environment (or import "
      "opq_tf before tensorflow)."
  )

import tensorflow_model_optimization as tfmot  # noqa: E402

__all__ = ["keras", "tf", "tfmot"]
