"""opq_tf: One-shot Pruning-Quantization (OPQ, AAAI 2021) for Keras models.

The public API is six verbs, the same for tf_keras (Keras 2) and Keras 3
models:

    plan = opq_tf.allocate(model, pruning_rate=0.9, bits=4)   # pure NumPy
    qmodel = opq_tf.apply(model, plan)                          # fixed masks/steps
    opq_tf.calibrate(qmodel, images)                            # BN statistics
    qmodel.fit(...)                                             # masks/steps fixed
    opq_tf.export(qmodel, "out/")                               # packed + SavedModel
    model = opq_tf.load_packed("out/model.opq", model_fn)

Each verb looks at the model's class and hands it to its frontend: a tf_keras
model to `opq_tf.tf_keras` (tfmot wrappers), a Keras 3 model to
`opq_tf.keras3`. `import opq_tf` imports no TensorFlow and no Keras and sets
no environment variable; a frontend is imported when a model of its kind is
first used.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
from typing import Any

from opq_tf.core import allocation as _allocation
from opq_tf.core.allocation import CompressionPlan, KernelPlan

__all__ = ["CompressionPlan", "KernelPlan", "allocate", "apply", "calibrate",
           "strip", "export", "load_packed", "register_layer", "frontend_of"]

# Frontend name -> the module that holds its verbs.
_FRONTENDS = {"tf_keras": "opq_tf.tf_keras.api", "keras3": "opq_tf.keras3.api"}


def frontend_of(model_or_class: Any) -> str:
  """"tf_keras" or "keras3": which Keras `model_or_class` belongs to.

  Read off the class hierarchy's modules, so nothing is imported to decide.

  Raises:
    TypeError: neither a tf_keras nor a Keras 3 object.
  """
  cls = model_or_class if isinstance(model_or_class, type) else type(
      model_or_class)
  for base in cls.__mro__:
    root = base.__module__.split(".", 1)[0]
    if root == "tf_keras":
      return "tf_keras"
    if root == "keras":
      return "keras3"
  raise TypeError(
      f"opq_tf needs a Keras model (tf_keras or Keras 3), got "
      f"{cls.__name__} from {cls.__module__}; build the network as a "
      "keras.Sequential or a Functional keras.Model.")


def _frontend(model_or_class: Any):
  return importlib.import_module(_FRONTENDS[frontend_of(model_or_class)])


def allocate(model_or_kernels: Any, pruning_rate: float, bits: int | str,
             method: str = "opq", **options: Any) -> CompressionPlan:
  """Solves every kernel's threshold and step in one shot (pure NumPy).

  `model_or_kernels` is a tf_keras or Keras 3 model, or a mapping name ->
  kernel array (see `opq_tf.core.allocation.allocate` for every option).
  For a model, the plan's `fp32` lists the kernel-like weights of layer kinds
  OPQ does not compress, and why.
  """
  if isinstance(model_or_kernels, collections.abc.Mapping):
    return _allocation.allocate(model_or_kernels, pruning_rate, bits, method,
                                **options)
  frontend = _frontend(model_or_kernels)
  plan = _allocation.allocate(frontend.compressible_kernels(model_or_kernels),
                              pruning_rate, bits, method, **options)
  return dataclasses.replace(
      plan, fp32=frontend.fp32_kernels(model_or_kernels))


def apply(model: Any, plan: CompressionPlan | None = None, **options: Any):
  """A copy of `model` whose planned kernels are pruned and quantized."""
  return _frontend(model).apply(model, plan, **options)


def calibrate(model: Any, data: Any, **options: Any):
  """Re-estimates BatchNorm statistics and/or reconstructs kernels, in place."""
  return _frontend(model).calibrate(model, data, **options)


def strip(model: Any):
  """A plain copy of a compressed model with its kernels compressed."""
  return _frontend(model).strip(model)


def export(model: Any, directory: Any, **options: Any) -> dict:
  """Writes the compressed model's formats to `directory`; returns the report."""
  return _frontend(model).export(model, directory, **options)


def load_packed(path: Any, model_fn_or_architecture: Any):
  """Builds the architecture and fills it with the packed file's weights.

  `model_fn_or_architecture`: a zero-argument function returning a fresh
  plain model, a built model, or (tf_keras) its JSON text / config dict.
  """
  source = model_fn_or_architecture
  if isinstance(source, (str, bytes, dict)):
    module = importlib.import_module(_FRONTENDS["tf_keras"])
    return module.load_packed(path, source)
  if callable(source) and not hasattr(source, "layers"):
    source = source()
  try:
    module = _frontend(source)
  except TypeError:
    raise TypeError(
        "load_packed needs a zero-argument function returning a fresh Keras "
        "model (or the model itself); the function returned "
        f"{type(source).__name__}.") from None
  return module.load_packed(path, source)


def register_layer(layer_class: type, weight_attrs: Any, **options: Any) -> None:
  """Makes OPQ compress `weight_attrs` of every layer of exactly `layer_class`.

  See the frontend's `register_layer` (e.g.
  `opq_tf.tf_keras.quantize_configs.register_layer`) for `weight_attrs` and
  `like`.
  """
  try:
    module = _frontend(layer_class) if isinstance(layer_class, type) else None
  except TypeError:
    module = None
  if module is None:
    raise TypeError(
        "register_layer needs a keras.layers.Layer subclass, got "
        f"{layer_class!r}; pass the class itself, not an instance.")
  module.register_layer(layer_class, weight_attrs, **options)
