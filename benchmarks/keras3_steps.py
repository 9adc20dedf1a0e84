"""The Keras 3 models and train steps that the step-time benchmarks time.

    model = keras3_steps.build_model("resnet50", num_classes=1000,
                                     image_size=224)
    plan = opq_tf.allocate(model, **keras3_steps.allocate_options(config))
    keras3_steps.compile_for_training(model, learning_rate=0.1, momentum=0.9,
                                      jit_compile=True)
    step = keras3_steps.make_train_step(model, images, labels)
    loss = step()           # one update on (images, labels); waits for it

Importing this module imports Keras and no TensorFlow (the GPU machine has
none); only `make_trainer_step`, the trainers' step, imports it.

`make_train_step` times the product path of a plain Keras user: the model's
compiled `train_step` (forward, loss, backward, optimizer update, loss
metric), jit-compiled as `compile(jit_compile=True)` makes it, and driven
the way `model.fit` drives it on each backend:

- TensorFlow: `model.train_on_batch`, which calls the same `train_function`
  (a tf.function, XLA-compiled with jit_compile) that `fit` calls per step;
  the variables are updated in place.
- JAX: the first call is `model.train_on_batch` (it builds the optimizer and
  compiles); after it, each call is one `model.train_function(state, batch)`
  with the state (trainable, non-trainable, optimizer and metric variables)
  carried from step to step as arrays and donated, exactly `fit`'s inner
  loop. `fit` writes the state back to the variables only at epoch end
  (writing ~500 variables per step would add milliseconds to every step, and
  more to a compressed model, which holds a mask and a step per kernel);
  `sync()` does that here. Until then the model's variables hold no values
  (as in `fit`, so the donated arrays are not read).

The batch is converted to the backend's tensors once, so no step includes a
host-to-device copy. The returned loss is a Python float, so a call returns
only when its step has run (JAX dispatches asynchronously).
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import ml_collections
import numpy as np

# config.model -> its keras.applications constructor and options.
KERAS3_MODELS = {"resnet50": ("ResNet50", {}),
                 "mobilenet_v1": ("MobileNet", {"alpha": 1.0})}


def allocate_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """opq_tf.allocate's options for `config`, as the trainers pass them
  (opq_tf.training.planning.allocate_options, which imports tf_keras; a test
  keeps the two equal)."""
  return {"pruning_rate": config.pruning_rate, "bits": config.bits,
          "method": config.method, "objective": config.objective,
          "step_granularity": config.step_granularity,
          "step_stats": config.step_stats, "step_fit": config.step_fit}


def build_model(name: str, num_classes: int, image_size: int) -> keras.Model:
  """config.model `name` as a Keras 3 model: logits, weights=None.

  keras.applications' network without an input-scaling layer (an
  elementwise op, the same in both variants).
  """
  if name not in KERAS3_MODELS:
    raise ValueError(
        f"config.model {name!r} has no Keras 3 build here; use a config whose "
        f"model is one of {sorted(KERAS3_MODELS)}.")
  constructor, options = KERAS3_MODELS[name]
  return getattr(keras.applications, constructor)(
      weights=None, input_shape=(image_size, image_size, 3),
      classes=num_classes, classifier_activation=None, **options)


class TrainStep:
  """`step()` -> loss: one compiled train step of `model` on a fixed batch."""

  def __init__(self, model: keras.Model, images: np.ndarray,
               labels: np.ndarray):
    if getattr(model, "optimizer", None) is None:
      raise ValueError(
          f"Model {model.name!r} is not compiled: call model.compile(optimizer, "
          "loss, jit_compile=...) before make_train_step.")
    self.model = model
    # (x, y, sample_weight), the structure train_on_batch hands the step,
    # so that the jitted step is traced once.
    self._batch = (keras.ops.convert_to_tensor(images),
                   keras.ops.convert_to_tensor(labels), None)
    self._jax = keras.backend.backend() == "jax"
    self._state = None

  def __call__(self) -> float:
    if not self._jax or self._state is None:
      logs = self.model.train_on_batch(*self._batch[:2], return_dict=True)
      if self._jax:
        self._state = self.model._get_jax_state(  # pylint: disable=protected-access
            trainable_variables=True, non_trainable_variables=True,
            optimizer_variables=True, metrics_variables=True,
            purge_model_variables=True)
      return float(logs["loss"])
    logs, self._state = self.model.train_function(self._state,
                                                  iter([self._batch]))
    return float(logs["loss"])

  def sync(self) -> None:
    """Writes the carried state back to the model's variables (JAX), as
    `fit` does at the end of each epoch."""
    if self._state is None:
      return
    trainable, non_trainable, optimizer, metrics = self._state
    self.model._jax_state = {  # pylint: disable=protected-access
        "trainable_variables": trainable,
        "non_trainable_variables": non_trainable,
        "optimizer_variables": optimizer, "metrics_variables": metrics}
    self.model._jax_state_synced = False  # pylint: disable=protected-access
    self.model.jax_state_sync()
    self._state = None


def make_train_step(model: keras.Model, images: np.ndarray,
                    labels: np.ndarray) -> Callable[[], float]:
  """A `TrainStep` of the compiled `model` on (images, labels)."""
  return TrainStep(model, images, labels)


def make_trainer_step(model: keras.Model, images: np.ndarray,
                      labels: np.ndarray, *, learning_rate: float,
                      momentum: float, weight_decay: float,
                      jit_compile: bool) -> Callable[[], np.ndarray]:
  """() -> [cross-entropy, correct]: the trainers' Keras 3 step on the batch.

  `opq_tf.training.keras3_loop.make_train_step` with SGD momentum and the
  config's coupled weight decay, on one device; it imports TensorFlow (the
  trainers read tf.data), so it is imported only here. The batch is what
  the trainer's step takes: tensors on TensorFlow, NumPy on JAX.
  """
  from opq_tf.training import keras3_loop  # pylint: disable=g-import-not-at-top

  step = keras3_loop.make_train_step(
      model, keras.optimizers.SGD(learning_rate, momentum=momentum),
      global_batch_size=len(images), weight_decay=weight_decay,
      jit_compile=jit_compile)
  batch = (images, labels)
  if keras.backend.backend() != "jax":
    batch = tuple(keras.ops.convert_to_tensor(value) for value in batch)
  return lambda: step(*batch)


def compile_for_training(model: keras.Model, learning_rate: float,
                         momentum: float, jit_compile: bool) -> keras.Model:
  """`model.compile` with SGD momentum and the logits' cross-entropy.

  The trainers' recipe (configs/*.py) without its weight decay, which a
  plain `compile` does not have (Keras' `weight_decay=` is decoupled, not
  the trainers' coupled L2); it is the same for FP32 and OPQ, so the ratio
  does not depend on it.
  """
  model.compile(
      optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      jit_compile=jit_compile)
  return model


TRAIN_STEPS = ("keras", "trainer")

__all__ = ["KERAS3_MODELS", "TRAIN_STEPS", "TrainStep", "allocate_options",
           "build_model",
           "compile_for_training", "make_train_step", "make_trainer_step"]
