"""`calibrate`: repair a compressed model on a few hundred unlabelled images.

    qmodel = opq_tf.apply(model, plan)
    opq_tf.calibrate(qmodel, images, reconstruct=True)   # in place
    print(qmodel.opq_calibration.table())                # output errors

Two repairs, both with masks and steps fixed (docs/method.md part D):

* BatchNorm re-estimation (`batchnorm=True`). Compressing the kernels shifts
  every activation's mean and variance, so the FP32 moving statistics no longer
  match: on real ImageNet weights every allocation collapses at p >= 0.5
  without this step. As NNCF's BN adaptation does, the calibration batches run
  forward with every BatchNorm normalising by its batch statistics, and each
  layer's moving mean and variance become the average of its per-batch mean and
  (Bessel-corrected, as TF's fused kernel keeps it) variance, weighted by batch
  size. The statistics are computed in a tf.function, outside replica context,
  so a model built under a tf.distribute strategy gets exactly what it would
  get without one; only `moving_mean` and `moving_variance` change.
* Reconstruction (`reconstruct=True`). Layer by layer in network order, the
  kept weights of each kernel move so that the compressed layer reproduces
  the FP32 network's output there: with X the layer's input in the
  already-compressed network and Z its input in an FP32 copy of the network,
  minimise ||W Z - W_hat X||^2 (+ damping pulling W_hat towards W) with W_hat
  zero where pruned and on the grid `step * clip(round(w / step), -K, K)`
  where kept. Targets from the FP32 network, not W X, let each layer undo the
  error its input accumulated before it. The kept weights of each output
  first move to the least-squares optimum with the pruned ones at zero; then
  columns are fixed one at a time (largest diag(H) first), each column's
  rounding error fed back onto the columns not fixed yet through the inverse
  Hessian H = X X^T + damping (OBS; GPTQ / SparseGPT with a given mask);
  `rounding="learned"` then lets each kept weight choose up or down on the
  same loss (AdaRound, `core.reconstruction.learned_rounding`). A
  layer with a bias then absorbs its output's mean error into the bias (bias
  correction; this needs only the mean input, so it is done for kernels with
  too few samples to reconstruct as well, such as a classifier). Convolutions
  use im2col patches, depthwise kernels one H per input channel, an
  EinsumDense its input flattened over the dimensions it contracts. A
  SeparableConv2D is one layer: its pointwise kernel's X and Z are the
  compressed and FP32 depthwise outputs, so it also absorbs the depthwise
  kernel's remaining error. Wrapped models get latent kernels at the values
  the rounding started from, each within half a step of its reconstructed
  grid value (the quantizer rounds them to the same codes; finetuning can
  move a code; `core.reconstruction.latent_value`), so reconstruct once, on
  the model `apply` returned: a second call would take those as its target.

Kernel inputs come from a walk over the graph, linear in depth: both
networks run one graph node at a time over all batches (nested Functional
submodels inlined, as `apply` does), each node's inputs taken from the cached
outputs of the nodes before it (`opq_tf.core.activations`: in memory up to
`_CACHE_BYTES`, then on disk), and a layer's kernels are reconstructed when
the walk reaches it, before it runs. Each layer therefore runs once per batch
and network, instead of the whole prefix once per kernel: the same numbers
(tests/calibration_test.py checks it against prefixes run from the images on
a residual block) at a cost that grows linearly with depth. A kernel of a
sublayer (a MultiHeadAttention's four EinsumDense projections, a custom
block's Dense) takes the sublayer's own input, caught by hooking the
sublayer's `call` while its node runs on the cached inputs, sublayer by
sublayer in the order the layer calls them (`_reconstruct_node`).

Reconstruction fits each kernel to the calibration samples, so it overfits
kernels that see too few of them: measured on ImageNet, 128 images lowered
top-1 by 3-4 points (the 768x1000 classifier sees one sample per image) while
500 images, 5% damping and plain rounding for kernels with fewer than 4
samples per input weight raised it by 1.5 points. Those are the defaults.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import warnings
from typing import Callable, Optional, Sequence, Union

from absl import logging
import numpy as np

from opq_tf.core import activations
from opq_tf.core import einsum
from opq_tf.core import grid
from opq_tf.core.contract import CompressedKernel
from opq_tf.core import reconstruction
from opq_tf.core.reconstruction import (  # noqa: F401  (re-exported)
    DEFAULT_BATCH_SIZE, DEFAULT_DAMPING, DEFAULT_MAX_IMAGES,
    DEFAULT_MIN_SAMPLES_PER_WEIGHT, DEFAULT_ROUNDING, CalibrationReport,
    KernelCalibration, LearnedRounding)
from opq_tf.tf_keras import flatten
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf, tfmot

_PATCH_BYTES = 256 * 2**20  # im2col patches per call, at most.
# Cached activations held in memory, at most; the rest go to disk.
_CACHE_BYTES = activations.DEFAULT_MEMORY_BYTES

Data = Union[np.ndarray, tf.data.Dataset]


@dataclasses.dataclass
class _Kernel:
  """One compressed kernel and where its compressed value lives."""

  key: str
  layer: keras.layers.Layer  # the Conv2D/Dense/... that owns the kernel
  # The layer of the graph that calls it (a wrapper, or the layer itself,
  # or the MultiHeadAttention / custom block whose sublayer `layer` is).
  node_layer: keras.layers.Layer
  attr: str
  variable: tf.Variable  # latent kernel (wrapped) or compressed kernel (plain)
  target: np.ndarray  # FP32 kernel the layer should reproduce
  mask: np.ndarray  # bool, kernel shape
  step: np.ndarray  # float32, broadcastable to the kernel
  bits: int
  wrapped: bool

  def compressed(self) -> np.ndarray:
    """The kernel the model uses now: mask * step * codes of the variable."""
    return grid.compress(self.variable.numpy(), self.step, self.bits, self.mask)

  @property
  def path(self) -> str:
    """The kernel's attribute path in the graph's layer
    ("_query_dense/kernel")."""
    return self.key.partition("/")[2]

  @property
  def sublayer(self) -> str:
    """The owner's attribute path in the graph's layer ("_query_dense"), or
    "" when that layer owns the kernel itself."""
    return self.path.rpartition("/")[0]


class _Stop(BaseException):
  """Ends a layer's call once a sublayer's input is caught (a BaseException,
  so that no `except Exception` inside Keras rewraps it)."""


def calibrate(
    model: keras.Model,
    data: Data,
    *,
    batchnorm: bool = True,
    reconstruct: bool = False,
    max_images: int = DEFAULT_MAX_IMAGES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    damping: float = DEFAULT_DAMPING,
    min_samples_per_weight: float = DEFAULT_MIN_SAMPLES_PER_WEIGHT,
    rounding: "str | LearnedRounding" = DEFAULT_ROUNDING,
    kernels: Optional[Sequence[CompressedKernel]] = None,
    verbose: bool = True,
) -> CalibrationReport:
  """Re-estimates BatchNorm statistics and/or reconstructs kernels, in place.

  Masks and steps never change; pruned weights stay exactly zero and kept ones
  on their grid (latent weights round to the reconstructed codes). Everything
  is validated before any variable is touched, and a failure half way restores
  every variable, so a failed call leaves the model as it was.

  Args:
    model: a model returned by `opq_tf.apply` (wrapped; its layers hold every
      mask, step and latent FP32 kernel), or by `opq_tf.strip` (plain; then
      pass `kernels`). One image input.
    data: images as a NumPy array (N, *input shape), or a tf.data.Dataset of
      images or of (images, labels, ...) tuples (labels ignored), batched or
      not. Cast to the model's input dtype.
    batchnorm: re-estimate every BatchNorm layer's moving mean and variance
      (first, and again after reconstruction, whose kernels shift them again).
      A model without BatchNorm gets a warning, not an error.
    reconstruct: reconstruct every compressed kernel with at least
      `min_samples_per_weight` calibration samples per input weight.
    max_images: use at most this many images (the first ones of `data`).
    batch_size: images per forward pass (and per BatchNorm statistic); a
      batched dataset is re-batched to it.
    damping: added to H's diagonal, as a fraction of its mean.
    min_samples_per_weight: kernels below it keep plain rounding.
    rounding: how reconstructed kernels are rounded onto their grid:
      "error_feedback" (after the masked least squares), "learned" (AdaRound
      from there, `LearnedRounding()`; or a `LearnedRounding` with other
      settings) or "nearest" (plain rounding, the bias still corrected).
    kernels: for a stripped model only: the `CompressedKernel`s of the
      wrapped model it was stripped from
      (`opq_tf.tf_keras.wrapping.compressed_kernels(qmodel)`), whose masks,
      steps and FP32 kernels a plain model no longer holds.

  Returns:
    A `CalibrationReport` (per-kernel output errors before and after
    reconstruction; `.table()` prints them).

  Raises:
    TypeError, ValueError: the model was never compressed, the data has the
      wrong shape, dtype or is empty, or an option is out of range; the message
      says what to pass instead.
  """
  _check_options(batchnorm, reconstruct, max_images, batch_size, damping,
                 min_samples_per_weight)
  rounding = reconstruction.check_rounding(rounding)
  kernels = _compressed_kernels(model, kernels)
  images = _calibration_images(model, data, max_images, batch_size)
  bn_layers = [layer for layer in layers_lib.iter_layers(model)
               if isinstance(layer, keras.layers.BatchNormalization)]
  if batchnorm and not bn_layers:
    warnings.warn(
        f"Model {model.name!r} has no BatchNormalization layer: batchnorm "
        "calibration does nothing; pass batchnorm=False to silence this.",
        stacklevel=2)
  batches = [images[start:start + batch_size]
             for start in range(0, len(images), batch_size)]

  saved = [(variable, variable.numpy()) for variable in _touched_variables(
      kernels if reconstruct else [], bn_layers if batchnorm else [])]
  reestimated, rows = [], {}
  try:
    if batchnorm and bn_layers:
      reestimated = _reestimate_batchnorm(model, bn_layers, batches)
    if reconstruct:
      # Each reconstructed kernel changes its layer's output statistics, so
      # moving statistics estimated before it are stale for every layer
      # after it: taking the next layers' inputs through them drifts further
      # with every layer (measured on ImageNet MobileNet: top-1 0.4% before
      # the final re-estimation, and 3 points below plain rounding after
      # it). With batchnorm, inputs are therefore taken with every
      # BatchNorm normalising by its batch statistics, as the final
      # re-estimation will make them.
      #
      # Targets come from an FP32 copy of the network (inputs Z, outputs
      # W Z), run the same way: each layer then also undoes the error its
      # input accumulated in the compressed layers before it.
      reference = _fp32_network(model, kernels)
      reference_bn = [layer for layer in layers_lib.iter_layers(reference)
                      if isinstance(layer, keras.layers.BatchNormalization)]
      records = []  # batch statistics the BatchNorm calls append; unused
      with (_batch_statistics_mode(bn_layers + reference_bn, records)
            if batchnorm else contextlib.nullcontext()):
        rows = _reconstruct_layer_by_layer(
            model, reference, kernels, batches, damping,
            min_samples_per_weight, rounding, verbose, records)
      if batchnorm and bn_layers:
        _reestimate_batchnorm(model, bn_layers, batches)
    _check_finite(kernels, bn_layers)
  except BaseException:
    for variable, value in saved:
      variable.assign(value)
    raise
  report = CalibrationReport(len(images), tuple(reestimated), rows)
  logging.info("opq_tf.calibrate: %s", report.table())
  return report


def _check_finite(kernels: list[_Kernel], bn_layers) -> None:
  """After calibration: every kernel, step and BatchNorm statistic finite."""
  for kernel in kernels:
    reconstruction.check_finite(kernel.variable.numpy(), f"Kernel {kernel.key}")
    reconstruction.check_finite(kernel.step, f"The step of {kernel.key}")
    bias = _bias_of(kernel)
    if bias is not None:
      reconstruction.check_finite(bias.numpy(), f"The bias of {kernel.key}")
  for layer in bn_layers:
    for variable in (layer.moving_mean, layer.moving_variance):
      reconstruction.check_finite(variable.numpy(), f"BatchNorm {layer.name!r} "
                   f"{variable.name.rsplit('/', 1)[-1].split(':')[0]}")


def _check_options(batchnorm, reconstruct, max_images, batch_size, damping,
                   min_samples_per_weight) -> None:
  for name, value in (("batchnorm", batchnorm), ("reconstruct", reconstruct)):
    if not isinstance(value, bool):
      raise TypeError(f"{name} must be True or False, got {value!r}.")
  for name, value in (("max_images", max_images), ("batch_size", batch_size)):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 1):
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  if not (isinstance(damping, (int, float)) and damping > 0):
    raise ValueError(
        f"damping must be > 0 (a fraction of mean diag(H), e.g. "
        f"{DEFAULT_DAMPING}), got {damping!r}: without it H can be singular.")
  if not (isinstance(min_samples_per_weight, (int, float))
          and min_samples_per_weight >= 0):
    raise ValueError("min_samples_per_weight must be >= 0, got "
                     f"{min_samples_per_weight!r}.")


def _compressed_kernels(model, recorded) -> list[_Kernel]:
  """Every compressed kernel of a wrapped or stripped model, in model order."""
  if not isinstance(model, keras.Model):
    raise TypeError(
        f"calibrate needs a tf_keras Model, got {type(model).__name__}; pass "
        "the model returned by opq_tf.apply or opq_tf.strip.")
  if len(model.inputs or ()) != 1:
    raise ValueError(
        f"calibrate needs a built model with one image input; model "
        f"{model.name!r} has {len(model.inputs or ())}. Build it with one "
        "keras.Input.")
  kernels = []
  for wrapper, attr, weight, quantizer, variables in wrapping._opq_weights(model):  # pylint: disable=protected-access
    kernel = weight.numpy()
    owner, name = layers_lib.owner_of(wrapper.layer, attr)  # a sublayer's too
    kernels.append(_Kernel(
        key=f"{wrapper.layer.name}/{attr}", layer=owner,
        node_layer=wrapper, attr=name, variable=weight,
        target=np.asarray(kernel, np.float32),
        mask=variables["mask"].numpy() > 0,
        step=_step_for(variables["step"].numpy(), kernel.shape,
                       quantizer.channel_axes),
        bits=int(quantizer.bits), wrapped=True))
  if kernels:
    if recorded is not None:
      raise ValueError(
          f"Model {model.name!r} is wrapped and holds its own compressed "
          "kernels; pass kernels= only with a stripped model.")
    return kernels
  if recorded is None:
    raise ValueError(
        f"Model {model.name!r} has no OPQ-compressed kernel: OPQ was never "
        "applied to it. Call opq_tf.apply(model, plan) first and calibrate "
        "the model it returns; to calibrate opq_tf.strip of it, pass "
        "kernels=opq_tf.tf_keras.wrapping.compressed_kernels(wrapped_model), "
        "the masks, steps and FP32 kernels a plain model no longer holds.")
  by_name = {layer.name: layer for layer in layers_lib.iter_layers(model)}
  for entry in recorded:  # CompressedKernel, latent kernel included
    name, _, path = entry.key.partition("/")
    try:
      layer, attr = layers_lib.owner_of(by_name.get(name), path)
    except (ValueError, AttributeError):
      layer, attr = None, entry.weight
    variable = getattr(layer, attr, None)
    if (not isinstance(variable, tf.Variable)
        or tuple(variable.shape) != entry.kernel.shape):
      raise ValueError(
          f"kernels= names the compressed kernel {entry.key!r}, but model "
          f"{model.name!r} has no such weight; pass the kernels of the "
          "wrapped model this one was stripped from, unmodified in structure.")
    kernels.append(_Kernel(
        key=entry.key, layer=layer, node_layer=by_name[name], attr=attr,
        variable=variable, target=np.asarray(entry.kernel, np.float32),
        mask=np.asarray(entry.mask) > 0,
        step=_step_for(entry.step, variable.shape, entry.channel_axes),
        bits=int(entry.bits), wrapped=False))
  if not kernels:
    raise ValueError(
        f"kernels= is empty for model {model.name!r}: nothing was "
        "compressed; call opq_tf.apply first.")
  return kernels


def _step_for(step, kernel_shape, channel_axes) -> np.ndarray:
  """The step as float32, broadcastable to the kernel (scalar or channel)."""
  values = np.asarray(step, np.float32)
  if values.size == 1:
    return values.reshape(())
  return grid.step_array(values, tuple(kernel_shape), channel_axes)


def _calibration_images(model, data, max_images: int,
                        batch_size: int) -> np.ndarray:
  """Up to `max_images` images of `data` as one array of the model's dtype."""
  input_shape = tuple(model.inputs[0].shape)
  dtype = model.inputs[0].dtype.as_numpy_dtype
  example = "(N, " + ", ".join(str(d) for d in input_shape[1:]) + ")"
  if isinstance(data, tf.data.Dataset):
    spec = data.element_spec
    if isinstance(spec, (tuple, list)) and spec:
      first = spec[0]
      data = data.map(lambda *parts: parts[0])
    else:
      first = spec
    if not isinstance(first, tf.TensorSpec):
      raise TypeError(
          f"calibrate needs a Dataset of images or (images, labels) tuples; "
          f"its elements are {spec}. Map it to images shaped {example}.")
    _check_dtype(first.dtype.as_numpy_dtype, first.dtype.name)
    rank = first.shape.rank
    if rank == len(input_shape) - 1:
      data = data.batch(batch_size)
    elif rank is not None and rank != len(input_shape):
      raise ValueError(
          f"The dataset's images have shape {first.shape}, but model "
          f"{model.name!r} takes images shaped {input_shape[1:]}: resize or "
          f"reshape them to {example} batches or single images.")
    parts, count = [], 0
    for batch in data:
      batch = np.asarray(batch)
      parts.append(batch[:max_images - count])
      count += len(parts[-1])
      if count >= max_images:
        break
    images = (np.concatenate(parts) if parts
              else np.zeros((0,) + input_shape[1:], dtype))
  elif isinstance(data, np.ndarray):
    _check_dtype(data.dtype, str(data.dtype))
    images = data[:max_images]
  else:
    raise TypeError(
        f"calibrate needs images as a NumPy array {example} or a "
        f"tf.data.Dataset, got {type(data).__name__}.")
  if not np.all(np.isfinite(images)):
    raise ValueError(
        "The calibration images hold NaN or Inf values; they would make every "
        "BatchNorm statistic NaN. Decode and preprocess them as for "
        "evaluation, and drop broken images, first.")
  if images.ndim != len(input_shape) or any(
      want is not None and got != want
      for got, want in zip(images.shape[1:], input_shape[1:])):
    raise ValueError(
        f"Calibration images have shape {images.shape}, but model "
        f"{model.name!r} takes {input_shape}: pass an array or batches shaped "
        f"{example}.")
  if not len(images):
    raise ValueError(
        "The calibration data is empty: pass at least one image (a few "
        f"hundred; default max_images={DEFAULT_MAX_IMAGES}).")
  return images.astype(dtype, copy=False)


def _check_dtype(dtype, name: str) -> None:
  dtype = np.dtype(dtype)
  if dtype == np.bool_ or not (np.issubdtype(dtype, np.floating)
                               or np.issubdtype(dtype, np.integer)):
    raise TypeError(
        f"Calibration images must be real numbers (float or integer pixels), "
        f"got dtype {name}; decode and preprocess them as for evaluation "
        "first (e.g. tf.io.decode_jpeg, then the model's preprocessing).")


def _touched_variables(kernels, bn_layers) -> list[tf.Variable]:
  variables = [kernel.variable for kernel in kernels]
  variables += [bias for bias in map(_bias_of, kernels) if bias is not None]
  for layer in bn_layers:
    variables += [layer.moving_mean, layer.moving_variance]
  return variables


# ---------------------------------------------------------------- BatchNorm


def _batch_statistics_call(layer, records: list) -> Callable:
  """A BatchNorm `call` that normalises by batch statistics and records them.

  The layer's own training mode would also update its moving averages by the
  momentum EMA and put Dropout and activation quantizers in training mode;
  this normalises exactly as training does and touches no variable.
  """

  def call(inputs, training=None, mask=None, **kwargs):
    del training, mask, kwargs
    values = tf.cast(inputs, tf.float32)
    rank = values.shape.rank
    axes = [axis % rank for axis in layer.axis]
    reduction = [axis for axis in range(rank) if axis not in axes]
    mean, variance = tf.nn.moments(values, reduction, keepdims=True)
    count = tf.cast(tf.size(values) // tf.size(mean), tf.float32)
    records.append((layer, tf.reshape(mean, layer.moving_mean.shape),
                    tf.reshape(variance * count / tf.maximum(count - 1.0, 1.0),
                               layer.moving_variance.shape),
                    tf.cast(tf.shape(values)[0], tf.float32)))
    shape = tf.shape(mean)
    gamma = (None if layer.gamma is None
             else tf.reshape(tf.cast(layer.gamma, tf.float32), shape))
    beta = (None if layer.beta is None
            else tf.reshape(tf.cast(layer.beta, tf.float32), shape))
    outputs = tf.nn.batch_normalization(values, mean, variance, beta, gamma,
                                        layer.epsilon)
    return tf.cast(outputs, inputs.dtype)

  return call


@contextlib.contextmanager
def _hooked(layers_and_calls):
  """Inside, each layer's `call` is replaced (an instance attribute, which
  the layer's `__call__` reads before the class's method)."""
  originals = []
  try:
    for layer, call in layers_and_calls:
      originals.append((layer, layer.__dict__.get("call")))
      layer.call = call
    yield
  finally:
    for layer, original in reversed(originals):
      if original is None:
        del layer.call
      else:
        layer.call = original


def _batch_statistics_mode(bn_layers, records: Optional[list] = None):
  """Every BatchNorm in `bn_layers` normalises by batch statistics inside.

  Traced calls append (layer, mean, variance, batch size) to `records`.
  """
  records = [] if records is None else records
  return _hooked([(layer, _batch_statistics_call(layer, records))
                  for layer in bn_layers])


def _reestimate_batchnorm(model, bn_layers, batches) -> list[str]:
  """Sets every BatchNorm's moving statistics to its batch-size-weighted mean
  of per-batch statistics; returns the names of the layers it reached."""
  records = []
  input_spec = tf.TensorSpec((None,) + batches[0].shape[1:], batches[0].dtype)

  # No autograph: plain Python that traces as it is (autograph also warns
  # that it cannot convert the closure).
  @tf.function(input_signature=[input_spec], autograph=False)
  def batch_statistics(images):
    records.clear()
    model(images, training=False)
    return [(means, variances, weight) for _, means, variances, weight
            in records]

  with _batch_statistics_mode(bn_layers, records):
    concrete = batch_statistics.get_concrete_function()
    order = [layer for layer, *_ in records]
    sums = None
    for batch in batches:
      stats = concrete(tf.constant(batch))
      stats = [tuple(np.asarray(value, np.float64) for value in item)
               for item in stats]
      if sums is None:
        sums = [[weight * mean, weight * var, weight]
                for mean, var, weight in stats]
      else:
        for total, (mean, var, weight) in zip(sums, stats):
          total[0] += weight * mean
          total[1] += weight * var
          total[2] += weight
  # A layer called more than once (shared) averages over all its calls.
  totals = {}
  for layer, (mean_sum, var_sum, weight) in zip(order, sums):
    total = totals.setdefault(layer, [0.0, 0.0, 0.0])
    total[0] = total[0] + mean_sum
    total[1] = total[1] + var_sum
    total[2] += weight
  for layer, (mean_sum, var_sum, weight) in totals.items():
    layer.moving_mean.assign((mean_sum / weight).astype(np.float32))
    layer.moving_variance.assign((var_sum / weight).astype(np.float32))
  return [layer.name for layer in bn_layers if layer in totals]


# ------------------------------------------------------------ reconstruction


def _reconstruct_layer_by_layer(
    model, reference, kernels: list[_Kernel], batches, damping: float,
    min_samples_per_weight: float, rounding, verbose: bool,
    records: list) -> dict[str, KernelCalibration]:
  """Reconstructs every kernel in network order, in place; returns the rows
  in the kernels' order.

  Both networks (the compressed one and its FP32 copy) run one graph node at
  a time over every batch, each node's inputs taken from the cached outputs
  of the nodes before it (core.activations), so each node runs once per
  batch and the cost grows linearly with depth, branches included. When the
  walk reaches a layer that holds compressed kernels, they are reconstructed
  from its cached inputs X (and Z, its FP32 twin's) before it runs, so the
  layers after it see its reconstructed output. The walk stops after the
  last such layer. `records` (the BatchNorm calls' batch statistics) is
  emptied after every call.
  """
  network = flatten.flatten(model)
  fp32 = network if reference is model else flatten.flatten(reference)
  nodes = _computable_nodes(network)
  fp32_nodes = _by_plain_name(_computable_nodes(fp32))
  rows, kernels_at = {}, {}
  progress = reconstruction.Progress(len(kernels), verbose)
  for kernel in kernels:
    calls = sum(node.layer is kernel.node_layer for node in nodes)
    if calls == 1:
      kernels_at.setdefault(id(kernel.node_layer), []).append(kernel)
      continue
    reason = _layout(kernel, kernels)[-1] or (
        "layer is called more than once (shared)" if calls else
        "layer is not called by the model's forward pass")
    rows[kernel.key] = KernelCalibration("plain rounding", reason)
    progress.done(kernel.key, rows[kernel.key].method)

  walks = [("compressed", network, nodes)]
  if fp32 is not network:  # else Z = X: run the one network once
    missing = set(_plain_names(nodes)) - set(fp32_nodes)
    if missing:
      raise AssertionError(f"The FP32 copy lacks the layer calls {missing}.")
    walks.append(("fp32", fp32, [fp32_nodes[name] for name in
                                 _plain_names(nodes)]))
  uses = collections.Counter(
      (label, tensor) for label, _, walk_nodes in walks
      for node in walk_nodes for tensor in set(node.flat_input_ids))
  with activations.ActivationCache(uses, _CACHE_BYTES) as cache:
    for label, graph, _ in walks:
      for batch in batches:
        cache.append((label, str(id(graph.inputs[0]))), batch)
    for position, node in enumerate(nodes):
      if not kernels_at:
        break
      inputs = [{tensor: cache.take((label, tensor))
                 for tensor in set(walk_nodes[position].flat_input_ids)}
                for label, _, walk_nodes in walks]
      at_node = kernels_at.pop(id(node.layer), ())
      if at_node:
        rows.update(_reconstruct_node(
            at_node, [(graph, walk_nodes[position], values) for
                      (_, graph, walk_nodes), values in zip(walks, inputs)],
            kernels, damping, min_samples_per_weight, rounding, progress,
            records))
      if not kernels_at:
        break
      for (label, _, walk_nodes), values in zip(walks, inputs):
        walk_node = walk_nodes[position]
        for index in range(len(batches)):
          outputs = _run_node(walk_node, {tensor: batches_of[index] for
                                          tensor, batches_of in values.items()})
          records.clear()
          for tensor, output in zip(walk_node.flat_output_ids, outputs):
            cache.append((label, tensor), output)
  return {kernel.key: rows[kernel.key] for kernel in kernels}


def _computable_nodes(network) -> list:
  """The nodes of a flat Functional model in the order its own call runs
  them (deepest first), without those it skips (not computable from its
  inputs)."""
  available = {str(id(tensor)) for tensor in network.inputs}
  nodes = []
  by_depth = network._nodes_by_depth  # pylint: disable=protected-access
  for depth in sorted(by_depth, reverse=True):
    for node in by_depth[depth]:
      if node.is_input or any(tensor not in available
                              for tensor in node.flat_input_ids):
        continue
      nodes.append(node)
      available.update(node.flat_output_ids)
  return nodes


def _plain_names(nodes) -> list[tuple[str, int]]:
  """Per node: (its layer's name without the tfmot wrapper, how many nodes
  of that layer came before), the same in a model and its stripped copy."""
  names, seen = [], collections.Counter()
  for node in nodes:
    layer = _unwrapped(node.layer)
    names.append((layer.name, seen[layer.name]))
    seen[layer.name] += 1
  return names


def _by_plain_name(nodes) -> dict[tuple[str, int], object]:
  return dict(zip(_plain_names(nodes), nodes))


def _run_node(node, values: dict) -> list[tf.Tensor]:
  """One batch through one node: its layer called as in the graph (in
  inference mode, as `model(images, training=False)` calls it), on arrays
  or tensors, which are passed on as they are."""
  tensors = {tensor: [tf.convert_to_tensor(value)]
             * node.flat_input_ids.count(tensor)
             for tensor, value in values.items()}
  args, kwargs = node.map_arguments(tensors)
  if getattr(node.layer, "_expects_training_arg", False):
    kwargs.setdefault("training", False)
  return tf.nest.flatten(node.layer(*args, **kwargs))


def _reconstruct_node(node_kernels: Sequence[_Kernel], walks: list,
                      kernels: list[_Kernel], damping: float,
                      min_samples_per_weight: float, rounding, progress,
                      records: list) -> dict[str, KernelCalibration]:
  """Reconstructs the kernels one graph node calls, before the node runs.

  `walks`: per network (compressed, then FP32 if copied), (graph, its node,
  the node's cached inputs per tensor, a list of batches each). A kernel of
  the node's layer itself takes the layer's input from the cache. A kernel of
  a sublayer (a MultiHeadAttention's projections, a custom block's Dense)
  takes the sublayer's input, which no graph node exposes: the node runs on
  its cached inputs with the sublayer's `call` hooked, one batch at a time,
  until the sublayer is reached. Sublayers go in the order the layer calls
  them, each after the ones before it are reconstructed, so the attention's
  output projection sees its reconstructed query, key and value projections.
  The cost stays one (partial) run of the node per sublayer and batch: linear
  in depth, as the walk.
  """
  rows = {}
  direct = [kernel for kernel in node_kernels if not kernel.sublayer]
  if direct:
    inputs = [values[str(id(_layer_input(graph, node.layer)))]
              for graph, node, values in walks]
    batches = list(zip(inputs[0], inputs[-1]))
    for kernel in direct:
      rows[kernel.key] = _reconstruct_kernel(
          kernel, kernels, batches, damping, min_samples_per_weight, rounding)
      progress.done(kernel.key, rows[kernel.key].method)
  nested = [kernel for kernel in node_kernels if kernel.sublayer]
  if not nested:
    return rows
  _, node, values = walks[0]
  order, calls = _sublayer_calls(
      node, [kernel.layer for kernel in nested],
      {tensor: per_batch[0] for tensor, per_batch in values.items()})
  records.clear()
  for kernel in sorted(nested, key=lambda k: order.get(id(k.layer), np.inf)):
    count = calls.get(id(kernel.layer), 0)
    if count != 1:
      layer_name = kernel.key.partition("/")[0]
      rows[kernel.key] = KernelCalibration("plain rounding", (
          f"sublayer {kernel.sublayer!r} is called {count} times in each "
          f"call of {layer_name!r} (shared)" if count else
          f"sublayer {kernel.sublayer!r} is not called when {layer_name!r} "
          "runs"))
    else:
      owners = [kernel.layer] + [
          layers_lib.owner_of(_unwrapped(node.layer), kernel.path)[0]
          for _, node, _ in walks[1:]]
      rows[kernel.key] = _reconstruct_kernel(
          kernel, kernels, _sublayer_inputs(walks, owners, records), damping,
          min_samples_per_weight, rounding)
    progress.done(kernel.key, rows[kernel.key].method)
  return rows


def _unwrapped(layer):
  if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper):
    return layer.layer
  return layer


def _sublayer_calls(node, owners, values: dict
                    ) -> tuple[dict[int, int], dict[int, int]]:
  """(id(owner) -> position of its first call, id(owner) -> its number of
  calls) when the node runs once on `values`."""
  order, calls = {}, {}

  def recorder(owner):
    original = owner.call

    def call(*args, **kwargs):
      order.setdefault(id(owner), len(order))
      calls[id(owner)] = calls.get(id(owner), 0) + 1
      return original(*args, **kwargs)

    return call

  unique = {id(owner): owner for owner in owners}.values()
  with _hooked([(owner, recorder(owner)) for owner in unique]):
    _run_node(node, values)
  return order, calls


def _sublayer_inputs(walks: list, owners: list, records: list):
  """Yields (X, Z) per batch: the input of `owners[0]` in the compressed
  network's node, and of its twin `owners[-1]` in the FP32 network's."""
  count = len(next(iter(walks[0][2].values())))
  for index in range(count):
    captured = []
    for (_, node, values), owner in zip(walks, owners):
      captured.append(_capture(node, owner, {
          tensor: batches[index] for tensor, batches in values.items()}))
      records.clear()
    yield captured[0], captured[-1]


def _capture(node, owner, values: dict) -> tf.Tensor:
  """`owner`'s first input when `node` runs on `values` (up to that call)."""
  captured = []

  def call(*args, **kwargs):
    captured.append(args[0] if args else kwargs["inputs"])
    raise _Stop()

  with _hooked([(owner, call)]):
    try:
      _run_node(node, values)
    except _Stop:
      pass
  if not captured:
    raise ValueError(
        f"Sublayer {owner.name!r} was called on the first calibration batch "
        "but not on a later one; its layer calls it depending on the data. "
        "Calibrate with batches that all take the same path.")
  return captured[0]


def _reconstruct_kernel(kernel: _Kernel, kernels: list[_Kernel],
                        batches, damping: float, min_samples_per_weight: float,
                        rounding: "str | LearnedRounding" = DEFAULT_ROUNDING
                        ) -> KernelCalibration:
  """Reconstructs one kernel in place from its layer's inputs, per batch
  (X, Z) in the compressed and the FP32 network (an iterable, consumed once);
  returns its summary row."""
  columns_of, target_columns_of, to_rows, from_rows, reason = _layout(
      kernel, kernels)
  if columns_of is None:
    return KernelCalibration("plain rounding", reason)
  statistics_of = None
  patch_width = int(np.prod(kernel.target.shape[:-1]))
  sums, samples = None, 0
  for batch_inputs, batch_targets in batches:
    if statistics_of is None:
      input_spec = tf.TensorSpec((None,) + tuple(batch_inputs.shape[1:]),
                                 tf.float32)
      # One trace per kernel; a concrete function keeps TF's retracing
      # warning (meant for accidental retracing) quiet.
      statistics_of = tf.function(
          functools.partial(_statistics, columns_of, target_columns_of),
          input_signature=[input_spec, input_spec]).get_concrete_function()
    # im2col copies every input kh * kw times: bound its memory per call.
    patch_bytes = 4 * patch_width * max(1, int(np.prod(
        batch_inputs.shape[1:-1])))
    chunk = max(1, _PATCH_BYTES // patch_bytes)
    for start in range(0, len(batch_inputs), chunk):
      rows, *parts = statistics_of(
          *(tf.cast(values[start:start + chunk], tf.float32)
            for values in (batch_inputs, batch_targets)))
      parts = [np.asarray(part, np.float64) for part in parts]
      sums = parts if sums is None else [a + b for a, b in zip(sums, parts)]
      samples += int(rows)
  statistics = reconstruction.Statistics(samples, *sums)
  weights = to_rows(kernel.target.astype(np.float64))
  solved = reconstruction.solve(
      weights, statistics, to_rows(kernel.mask),
      to_rows(np.broadcast_to(kernel.step, kernel.target.shape)), kernel.bits,
      damping, min_samples_per_weight, bias=_bias_of(kernel) is not None,
      rounding=rounding)
  if solved.reconstructed:
    kernel.variable.assign(reconstruction.latent_value(
        from_rows(solved.rows), from_rows(solved.latent),
        kernel.variable.numpy(), kernel.mask, kernel.step, kernel.bits,
        wrapped=kernel.wrapped, key=kernel.key))
  bias = _bias_of(kernel)
  if bias is not None:
    shift = solved.bias_shift.reshape(bias.shape)
    bias.assign(bias.numpy() + shift.astype(bias.dtype.as_numpy_dtype))
  return solved.summary


def _bias_of(kernel: _Kernel) -> Optional[tf.Variable]:
  """The bias added to the kernel's output, if its layer has one with one
  value per output (not for a SeparableConv2D's depthwise half: the bias
  follows the pointwise one; not for an EinsumDense whose bias_axes leave
  out some output dimension)."""
  rules = layers_lib.KERNELS[type(kernel.layer)]
  if (rules[kernel.attr].reconstruction == "depthwise"
      and any(r.reconstruction == "pointwise" for r in rules.values())):
    return None
  bias = getattr(kernel.layer, "bias", None)
  if not isinstance(bias, tf.Variable):
    return None
  shape, layout = kernel.target.shape, rules[kernel.attr].reconstruction
  if layout == "depthwise":
    outputs = shape[-2] * shape[-1]
  elif layout == "einsum":
    contracted = einsum.contracted_dims(kernel.layer.equation)
    if contracted is None:  # not reconstructed: no output rows to match
      return None
    outputs = int(np.prod(shape[contracted:]))
  else:
    outputs = shape[-1]
  return bias if int(np.prod(bias.shape)) == outputs else None


def _layer_input(model, layer):
  """The input tensor of `layer`'s one call in `model`'s graph, else None.

  Layers keep the nodes of every graph they were built into (tfmot's
  annotated copy, enclosing models), so `layer.input` may be another graph's.
  """
  network_nodes = getattr(model, "_network_nodes", set())
  indices = [index for index in range(len(layer._inbound_nodes))  # pylint: disable=protected-access
             if f"{layer.name}_ib-{index}" in network_nodes]
  if len(indices) != 1:
    return None
  return layer.get_input_at(indices[0])


def _layout(kernel: _Kernel, kernels: list[_Kernel]):
  """(columns_of, target_columns_of, to_rows, from_rows, reason) for the
  kernel's layer kind.

  columns_of(layer input) -> X, the inputs each output sees, shaped (samples,
  D, groups); target_columns_of(FP32 network's layer input) -> Z, the same
  for the FP32 layer (a different function only for the pointwise half of a
  SeparableConv2D). to_rows maps a kernel-shaped array to (groups, rows, D),
  from_rows maps back. (None, ..., reason) if not supported.
  """
  layer, shape = kernel.layer, kernel.target.shape
  unsupported = lambda reason: (None, None, None, None, reason)
  if getattr(layer, "data_format", "channels_last") != "channels_last":
    return unsupported("channels_first layers are not reconstructed")
  layout = layers_lib.rule(layer, kernel.attr).reconstruction
  flat_rows = (lambda a: a.reshape(-1, shape[-1]).T[None],
               lambda rows: rows[0].T.reshape(shape))
  width = int(np.prod(shape[:-1]))
  if layout == "dense":
    columns = lambda x: tf.reshape(x, (-1, width, 1))
    return columns, columns, *flat_rows, ""
  if layout == "conv":
    if getattr(layer, "groups", 1) != 1:
      return unsupported("grouped convolutions are not reconstructed")
    patches = _patches_fn(layer, shape[:-2])
    columns = lambda x: tf.reshape(patches(x), (-1, width, 1))
    return columns, columns, *flat_rows, ""
  if layout == "depthwise":
    spatial = int(np.prod(shape[:-2]))
    channels, multiplier = shape[-2], shape[-1]
    patches = _patches_fn(layer, shape[:-2])
    columns = lambda x: tf.reshape(patches(x), (-1, spatial, channels))
    return (columns, columns,
            lambda a: a.reshape(spatial, channels, multiplier).transpose(
                1, 2, 0),
            lambda rows: rows.transpose(2, 0, 1).reshape(shape), "")
  if layout == "pointwise":
    depthwise = _depthwise_as_used(kernel, kernels)
    if depthwise is None:
      return unsupported("its depthwise kernel is not accessible")
    compressed, fp32 = (_depthwise_output_fn(layer, value, shape[-2])
                        for value in depthwise)
    return compressed, fp32, *flat_rows, ""
  if layout == "einsum":
    # A Dense over the input's last `contracted` dimensions (as in Keras 3).
    contracted = einsum.contracted_dims(layer.equation)
    if contracted is None:
      return unsupported(
          f"EinsumDense {layer.equation!r} does not contract its input's "
          "last dimensions with the kernel's first ones")
    width = int(np.prod(shape[:contracted]))
    outputs = int(np.prod(shape[contracted:]))
    columns = lambda x: tf.reshape(x, (-1, width, 1))
    return (columns, columns, lambda a: a.reshape(width, outputs).T[None],
            lambda rows: rows[0].T.reshape(shape), "")
  return unsupported(
      f"{type(layer).__name__}/{kernel.attr} has no reconstruction layout; "
      "register it with like=<the built-in kind it computes> to reconstruct "
      "it")


def _statistics(columns_of, target_columns_of, inputs, targets):
  """Sums of one chunk: (samples, X X^T, sum X, Z X^T, Z Z^T, sum Z), the
  products per group (groups, D, D), the sums (groups, D)."""
  x, z = columns_of(inputs), target_columns_of(targets)
  samples = tf.shape(x)[0]
  # Groups first, then batched matmuls: 3.5 times faster than the einsum
  # "sdg,seg->gde" for a depthwise kernel's (samples, 9, channels) columns.
  x, z = (tf.transpose(a, (2, 0, 1)) for a in (x, z))
  gram = lambda a, b: tf.matmul(a, b, transpose_a=True)
  total = lambda a: tf.reduce_sum(a, axis=1)
  return samples, gram(x, x), total(x), gram(z, x), gram(z, z), total(z)


def _same_layer(reference, name: str):
  """The layer of the FP32 copy named `name` (a kernel key's first part)."""
  for layer in layers_lib.iter_layers(reference):
    if layer.name == name:
      return layer
  raise AssertionError(f"{name}: no such layer in the FP32 copy.")


def _fp32_network(model, kernels: list[_Kernel]) -> keras.Model:
  """A plain copy of the model with every compressed kernel at FP32.

  A wrapped model is stripped (tfmot's wrappers would quantize again), a
  stripped one cloned; the copy keeps every other weight and BatchNorm
  statistic as they are now. A model that cannot be copied (a custom layer
  without get_config, say) is returned itself, with a warning: each layer
  then matches W X on its compressed input, as before FP32 targets.
  """
  try:
    if kernels[0].wrapped:
      reference = wrapping.strip(model)
    else:
      reference = keras.models.clone_model(model)
      reference.set_weights(model.get_weights())
    for kernel in kernels:
      name, _, path = kernel.key.partition("/")
      getattr(*layers_lib.owner_of(_same_layer(reference, name), path)).assign(
          kernel.target)
  except (ValueError, TypeError, NotImplementedError, AttributeError) as error:
    warnings.warn(
        f"calibrate could not copy model {model.name!r} to take the FP32 "
        f"network's outputs as targets ({error}); each layer is reconstructed "
        "towards its FP32 kernel on the compressed network's inputs instead. "
        "Give custom layers a get_config to get the FP32 targets.",
        stacklevel=3)
    return model
  return reference


def _patches_fn(layer, kernel_size) -> Callable:
  """im2col for a 1-D or 2-D convolution: (..., positions, kh * kw * cin)."""
  strides, rates = tuple(layer.strides), tuple(layer.dilation_rate)
  padding = layer.padding.upper()
  if set(kernel_size) | set(strides) == {1}:  # 1x1: each position itself
    return lambda x: x
  if len(kernel_size) == 1:  # Conv1D: a 2-D convolution of height 1.
    kernel_size, strides, rates = ((1,) + tuple(kernel_size), (1,) + strides,
                                   (1,) + rates)
    causal = padding == "CAUSAL"
    if causal:
      padding = "VALID"

    def patches_1d(x):
      if causal:
        x = tf.pad(x, [[0, 0], [rates[1] * (kernel_size[1] - 1), 0], [0, 0]])
      return _extract(x[:, None], kernel_size, strides, rates, padding)

    return patches_1d
  return lambda x: _extract(x, kernel_size, strides, rates, padding)


def _extract(x, kernel_size, strides, rates, padding):
  return tf.image.extract_patches(
      x, sizes=(1,) + tuple(kernel_size) + (1,),
      strides=(1,) + tuple(strides) + (1,), rates=(1,) + tuple(rates) + (1,),
      padding=padding)


def _depthwise_as_used(kernel: _Kernel, kernels: list[_Kernel]
                       ) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(compressed, FP32) depthwise kernel of `kernel`'s SeparableConv2D; the
  compressed one as the model uses it now (already reconstructed: it comes
  first in network order)."""
  for other in kernels:
    if other.layer is kernel.layer and other.attr == "depthwise_kernel":
      return other.compressed(), other.target
  if kernel.wrapped:  # tfmot replaced the attribute by its quantized tensor.
    return None
  value = np.asarray(kernel.layer.depthwise_kernel.numpy(), np.float32)
  return value, value


def _depthwise_output_fn(layer, depthwise: np.ndarray, channels: int
                         ) -> Callable:
  """x -> a SeparableConv2D's depthwise output with the given depthwise
  kernel, as the pointwise kernel's columns (samples, channels, 1)."""

  def columns(x):
    output = tf.nn.depthwise_conv2d(
        x, tf.constant(depthwise), strides=(1,) + tuple(layer.strides) + (1,),
        padding=layer.padding.upper(), dilations=tuple(layer.dilation_rate))
    return tf.reshape(output, (-1, channels, 1))

  return columns


