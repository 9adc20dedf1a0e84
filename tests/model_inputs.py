"""Small seeded models and random pixel batches shared by the model tests."""

import numpy as np

from opq_tf.training import models
from opq_tf.tf_keras._keras import keras


def images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
  """n random RGB images of size x size, pixel values in [0, 255)."""
  return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(
      np.float32)


def small(num_classes: int = 10, seed: int = 0) -> keras.Model:
  """The built-in small_resnet at 32x32, its initial weights set by seed."""
  keras.utils.set_random_seed(seed)
  return models.build("small_resnet", num_classes, 32)
