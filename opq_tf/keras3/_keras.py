"""The one place the Keras 3 frontend imports Keras.

`import keras` is Keras 3 whatever TF_USE_LEGACY_KERAS says (that variable
only redirects `tf.keras`). An old standalone Keras 2 installed as `keras`
cannot serve this frontend, so it is refused here with the fix.
"""

import contextlib
import sys
from typing import Iterator

import keras

if int(keras.__version__.split(".", 1)[0]) < 3:
  raise ImportError(
      f"The Keras 3 frontend of opq_tf needs Keras 3, but `import keras` "
      f"loaded Keras {keras.__version__}. Install Keras 3 (pip install "
      "'keras>=3'), or build the model with tf_keras, which opq_tf's tf_keras "
      "frontend serves.")

ops = keras.ops


@contextlib.contextmanager
def tensorflow_not_probed() -> Iterator[None]:
  """Inside, Keras' serializer does not import TensorFlow to inspect objects.

  `keras.saving.serialize_keras_object` (behind every `get_config`, so
  behind `clone_model` and `.keras` saving) asks `tf.available` before it
  checks whether an object is a `tf.TensorShape`, `tf.DType` or
  `tf.TypeSpec`, and that import takes seconds and loads all of TensorFlow
  on the JAX backend whenever it is installed. While TensorFlow is not
  imported no object can be one of those, so inside this block the probe
  answers "not available" (as if TensorFlow were not installed); it is
  reset on exit, and nothing changes once TensorFlow is loaded.
  """
  from keras.src.utils import module_utils  # pylint: disable=g-import-not-at-top

  probe = module_utils.tensorflow
  if "tensorflow" in sys.modules or probe._available is not None:  # pylint: disable=protected-access
    yield
    return
  probe._available = False  # pylint: disable=protected-access
  try:
    yield
  finally:
    if probe.module is None:
      probe._available = None  # pylint: disable=protected-access


__all__ = ["keras", "ops", "tensorflow_not_probed"]
