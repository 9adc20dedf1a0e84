"""The one place the tf_keras frontend imports TensorFlow, tf_keras and tfmot.

tfmot 0.8 only understands Keras 2 (tf_keras). If TensorFlow is not loaded
yet, TF_USE_LEGACY_KERAS=1 is set first, so that tf.keras is tf_keras too and
a user's `tf.keras` model is one this frontend can wrap. If TensorFlow was
already imported with Keras 3 as tf.keras (TensorFlow 2.16 and later), tfmot
0.8.1 still loads and uses tf_keras itself, so tf_keras models work all the
same; only `tf.keras` models are then Keras 3 ones, which the keras3 frontend
serves. The variable is set only when this frontend is first used, never by
`import opq_tf`.
"""

import os
import sys

if "tensorflow" not in sys.modules:
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402

try:
  import tf_keras as keras  # noqa: E402
  import tensorflow_model_optimization as tfmot  # noqa: E402
except ImportError as error:
  raise ImportError(
      f"The tf_keras frontend of opq_tf needs tf_keras and "
      f"tensorflow-model-optimization, which failed to import ({error}). "
      "Install them (pip install 'opq_tf[tf_keras]', or the pinned "
      "requirements.txt), or build the model with Keras 3 (import keras), "
      "which opq_tf's keras3 frontend serves without tfmot.") from error

from tensorflow_model_optimization.python.core.keras import compat as _tfmot_compat  # noqa: E402

if _tfmot_compat.keras.layers.Layer is not keras.layers.Layer:
  raise ImportError(
      "tensorflow-model-optimization loaded a Keras other than tf_keras, so "
      "its wrappers cannot hold tf_keras layers. Set TF_USE_LEGACY_KERAS=1 in "
      "the environment before anything imports TensorFlow.")

__all__ = ["keras", "tf", "tfmot"]
