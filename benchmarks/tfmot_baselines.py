"""tfmot's prune -> strip -> (PQ)AT flow, the one baseline every benchmark uses.

    pruned = tfmot_baselines.prune(model, schedule)       # prune_low_magnitude
    tfmot_baselines.pruning_step_callback(pruned)         # as fit() would
    ... train (any loop); tfmot_baselines.apply_masks(pruned) after each epoch
    qmodel = tfmot_baselines.quantize(tfmot_baselines.strip(pruned), bits)

The flow is tfmot's documented one (prune_low_magnitude, strip_pruning,
quantize_annotate, quantize_apply). Two choices make it run on the product's
models, and both leave tfmot's behaviour on the layers OPQ compresses intact:

* Only the layers OPQ compresses (the classes in opq_tf.tf_keras.layers.KERNELS) are
  wrapped, as the per-layer `prune_low_magnitude(layer)` and
  `quantize_annotate_layer(layer)` calls of tfmot's guides do. Whole-model
  wrapping refuses the models' own input normalisation (Rescaling,
  Normalization, ReverseChannels), and the comparison is about the kernels.
* Nested Functional submodels (keras.applications backbones) are inlined by
  `opq_tf.tf_keras.flatten` first, which tfmot cannot do itself; `opq_tf.apply` does
  the same.

Weights: B = 8 uses `Default8BitPrunePreserveQuantizeScheme` (PQAT: the
pruned zeros stay zero); B < 8 uses the experimental
`DefaultNBitQuantizeScheme(num_bits_weight=B, num_bits_activation=8)`, for
which tfmot 0.8 has no sparsity-preserving variant (its prune-preserve
registry wraps only the 8-bit configs), so only the zeros that survive QAT
count as pruned. Both schemes also quantize the wrapped layers' activations to
8 bits; OPQ's default keeps activations FP32.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from opq_tf.core import grid
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.core import packing
from opq_tf.tf_keras._keras import keras, tf, tfmot
from opq_tf.tf_keras.flatten import flatten

_sparsity = tfmot.sparsity.keras
_quantization = tfmot.quantization.keras

PRUNING_FREQUENCY = 100  # tfmot's default mask-update frequency (steps).


def is_compressible(layer: keras.layers.Layer) -> bool:
  """True for the layer kinds OPQ compresses: those tfmot is compared on."""
  return layers_lib.weight_attrs(layer) is not None


def copy_model(model: keras.Model) -> keras.Model:
  """A clone with its own variables holding `model`'s values."""
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  return copy


def prune(model: keras.Model,
          schedule: tfmot.sparsity.keras.PruningSchedule) -> keras.Model:
  """prune_low_magnitude on a copy of every compressible layer of `model`.

  Variables are created in the current tf.distribute strategy scope, if any.
  """
  return flatten(copy_model(model), replace=lambda layer: (
      _sparsity.prune_low_magnitude(layer, pruning_schedule=schedule)
      if is_compressible(layer) else layer))


def pruning_step_callback(pruned: keras.Model
                          ) -> tfmot.sparsity.keras.UpdatePruningStep:
  """tfmot's step callback, started as fit() starts it (pruning_step := 0).

  The wrappers count their steps themselves. After each epoch call
  `apply_masks`, not the callback's on_epoch_end: that one fails under a
  MirroredStrategy outside its replica context (tfmot 0.8 merge_calls into
  the default strategy with mirrored variables).
  """
  callback = _sparsity.UpdatePruningStep()
  callback.set_model(pruned)
  callback.on_train_begin()
  return callback


def apply_masks(pruned: keras.Model) -> None:
  """weights := weights * mask, what UpdatePruningStep.on_epoch_end does.

  Needed before `strip`: a training step masks the weights before its
  forward pass, so the gradient update leaves small values at pruned places.
  """
  for layer in pruned.layers:
    for weight, mask, _ in getattr(layer, "pruning_vars", ()):
      weight.assign(weight * mask)


def strip(pruned: keras.Model) -> keras.Model:
  """strip_pruning: the plain model with the pruned weights at zero."""
  return _sparsity.strip_pruning(pruned)


class NoOpQuantizeConfig(_quantization.QuantizeConfig):
  """Leaves a layer as it is: for layers tfmot cannot quantize (Rescaling).

  The 8-bit prune-preserve registry claims to support every layer, then
  raises for the input normalisation in front of the first convolution when
  quantize_apply quantizes that layer's output; annotating it with this
  config (tfmot's documented escape hatch) keeps it FP32.
  """

  def get_weights_and_quantizers(self, layer):
    return []

  def get_activations_and_quantizers(self, layer):
    return []

  def set_quantize_weights(self, layer, quantize_weights):
    pass

  def set_quantize_activations(self, layer, quantize_activations):
    pass

  def get_output_quantizers(self, layer):
    return []

  def get_config(self):
    return {}


def quantize(model: keras.Model, bits: int) -> keras.Model:
  """QAT wrappers on the compressible layers: PQAT at B = 8, n-bit QAT below.

  Layers tfmot's 8-bit registry does not know stay FP32 (NoOpQuantizeConfig).
  """
  registry = (_quantization.default_8bit.Default8BitQuantizeScheme()
              .get_quantize_registry())

  def annotate(layer):
    if is_compressible(layer):
      return _quantization.quantize_annotate_layer(layer)
    if (not isinstance(layer, keras.layers.InputLayer)
        and not registry.supports(layer)):
      return _quantization.quantize_annotate_layer(
          layer, quantize_config=NoOpQuantizeConfig())
    return layer

  annotated = flatten(model, replace=annotate)
  with _quantization.quantize_scope(
      {"NoOpQuantizeConfig": NoOpQuantizeConfig}):
    return _quantization.quantize_apply(annotated, scheme(bits))


def scheme(bits: int):
  """The tfmot scheme of `quantize` (the module docstring says why)."""
  if bits == 8:
    return tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
  return (_quantization.experimental.default_n_bit.DefaultNBitQuantizeScheme(
      num_bits_weight=bits, num_bits_activation=8))


def scheme_name(bits: int) -> str:
  if bits == 8:
    return "prune_low_magnitude -> strip -> PQAT (8-bit prune-preserve)"
  return (f"prune_low_magnitude -> strip -> n-bit QAT (w{bits}a8, no "
          "sparsity preservation in tfmot 0.8)")


def pruned_for_timing(model: keras.Model, pruning_rate: float) -> keras.Model:
  """prune_low_magnitude(ConstantSparsity(p, begin_step=1, frequency=100)).

  The wrapper increments its step before the mask update, so the masks are
  computed (top-k) in the first training call and again every 100 steps; a
  timed step in between does what most of tfmot's pruning steps do.
  """
  pruned = prune(model, _sparsity.ConstantSparsity(
      pruning_rate, begin_step=1, frequency=PRUNING_FREQUENCY))
  pruning_step_callback(pruned)
  return pruned


def pqat_for_timing(model: keras.Model, pruning_rate: float,
                    images: tf.Tensor) -> keras.Model:
  """The PQAT model of `model` pruned to `pruning_rate`, without finetuning.

  One training call computes the masks and zeroes the pruned weights, then
  strip and 8-bit prune-preserving QAT, as `quantize(strip(pruned), 8)`.
  """
  pruned = pruned_for_timing(model, pruning_rate)
  pruned(images[:1], training=True)
  return quantize(strip(pruned), 8)


def magnitude_quantized_kernels(kernels: Mapping[str, np.ndarray],
                                pruning_rate: float, bits: int
                                ) -> dict[str, np.ndarray]:
  """What tfmot's flow gives with no training, kernel by kernel.

  Per-layer magnitude pruning to `pruning_rate` (prune_low_magnitude's top-k
  mask), then tfmot's symmetric narrow-range B-bit weight quantizer: one
  scale max|w| / K per output channel for Conv2D kernels, per tensor
  otherwise. tfmot's own flow has no compressed model before training; this
  is the zero-shot point that stands for it.
  """
  max_code = grid.max_code(bits)
  compressed = {}
  for key, kernel in kernels.items():
    magnitudes = np.abs(kernel)
    keep = max(int(round(kernel.size * (1.0 - pruning_rate))), 1)
    threshold = np.sort(magnitudes.ravel())[-keep]
    pruned = np.where(magnitudes >= threshold, kernel, 0.0)
    axes = tuple(range(kernel.ndim - 1)) if kernel.ndim == 4 else None
    scale = np.max(np.abs(pruned), axis=axes) / max_code
    scale = np.where(scale > 0, scale, 1.0)
    compressed[key] = (np.clip(np.round(pruned / scale), -max_code, max_code)
                       * scale).astype(np.float32)
  return compressed


def final_kernels(qmodel: keras.Model) -> dict[str, tuple]:
  """key -> (kernel as the QAT model computes it at test time, scale, bits).

  Runs each wrapper's own weight quantizer in inference mode on its latent
  kernel; a symmetric narrow-range B-bit quantizer's scale is max / K. Keys
  are `opq_tf.tf_keras.layers.weight_key`s of the wrapped layer.
  """
  final = {}
  for layer in qmodel.layers:
    if not isinstance(layer, _quantization.QuantizeWrapperV2):
      continue
    for weight, quantizer, variables in layer._weight_vars:  # pylint: disable=protected-access
      value = quantizer(weight, training=False, weights=variables).numpy()
      scale = variables["max_var"].numpy() / grid.max_code(quantizer.num_bits)
      final[layers_lib.weight_key(layer.layer, weight)] = (
          value, scale, quantizer.num_bits)
  return final


def packed_model_ratio(fp32: keras.Model, final: Mapping[str, tuple],
                       path: str) -> tuple[float, int]:
  """(FP32 bytes / packed bytes, packed bytes) of tfmot's final kernels.

  The integer codes go through opq_tf's own packer, with tfmot's scales (one
  per output channel or per tensor) as extra FP32 parameters; its activation
  ranges are not counted. Every other weight of `fp32` is stored raw.
  """
  kernels, rest = [], {}
  for key, (value, scale, bits) in final.items():
    max_code = grid.max_code(bits)
    step = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.round(value / step), -max_code, max_code).astype(np.int32)
    if not np.allclose(codes * step, value, rtol=1e-5, atol=1e-7):
      raise ValueError(f"tfmot kernel {key} is not scale * integer code; the "
                       "quantizer read-out in final_kernels is wrong.")
    kernels.append(packing.PackedKernel(key, bits, np.float32(1.0), codes != 0,
                                        codes))
    rest[f"{key}_scale"] = np.atleast_1d(step)
  for layer in layers_lib.iter_layers(fp32):
    for variable in layer.weights:
      key = layers_lib.weight_key(layer, variable)
      if key not in final:
        rest[key] = variable.numpy()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  stats = packing.write_packed(path, kernels, rest)
  return 4.0 * fp32.count_params() / stats.file_bytes, stats.file_bytes
