"""`calibrate` for Keras 3: repair a compressed model on unlabelled samples.

    qmodel = opq_tf.apply(model, plan)
    report = opq_tf.calibrate(qmodel, images, reconstruct=True)  # in place
    print(report.table())                                         # errors

The same two repairs as the tf_keras frontend (opq_tf/tf_keras/calibration.py
explains them and docs/method.md part D measures them), with masks and steps
fixed, computed with `keras.ops` on any backend:

* BatchNorm re-estimation (`batchnorm=True`): the calibration batches run
  forward with every BatchNorm normalising by its batch statistics, and each
  layer's moving mean and variance become the batch-size-weighted average of
  its per-batch mean and Bessel-corrected variance (what tf_keras stores, so
  both frontends agree; Keras 3's own training keeps the biased one, which
  differs by count / (count - 1), 0.03% for a batch of 50 8x8 maps).
* Reconstruction (`reconstruct=True`): kernel by kernel, in the order the
  forward pass reaches them, the kept weights move so that the compressed
  layer reproduces the FP32 network's output there, with X the layer's input
  in the compressed network and Z in the FP32 one; the sums of X and Z go to
  `opq_tf.core.reconstruction.solve` (least squares with the mask, then
  error-feedback rounding onto the grid, then bias correction), the same
  solver as tf_keras. Convolutions use im2col patches (built from strided
  slices, in the kernel's (kh, kw, in) order), depthwise kernels one group
  per input channel, a SeparableConv2D's pointwise kernel the compressed and
  FP32 depthwise outputs, an EinsumDense (MultiHeadAttention's projections)
  the input flattened over its contracted dimensions.

Kernel inputs come from a walk over the graph, linear in depth, as in
tf_keras: both networks run one graph node at a time over all batches, in
the order Keras' own `Functional` call runs them (nested Functional and
Sequential models expanded into their nodes, not inlined: the walk follows
their graphs), each node's inputs taken from the cached outputs of the nodes
before it (`opq_tf.core.activations`: in memory up to `_CACHE_BYTES`, then on
disk), and the kernels a node holds are reconstructed when the walk reaches
it, before it runs. A kernel may live in a sublayer that no graph node
exposes (MultiHeadAttention's query projection, a custom block's Dense), so
its input is caught by hooking the owner's `call` while that one node runs
on its cached inputs, stopping there. Each layer therefore runs a small
constant number of times per batch and network (once, plus once per kernel
it holds, cut short at that kernel), instead of the whole prefix once per
kernel. The FP32 network is the same model run inside a
`keras.StatelessScope` that maps every variable to its value when
reconstruction started and every compressed kernel to its FP32 kernel, with
the wrappers passing kernels through unquantized: no copy of the model is
made. Data is NumPy arrays (a `tf.data.Dataset` is accepted when TensorFlow is
already imported), so on the JAX backend nothing imports TensorFlow.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import sys
import warnings
from typing import (Any, Callable, Hashable, Iterable, Iterator, Optional,
                    Sequence)

from absl import logging
import numpy as np

from opq_tf.core import activations
from opq_tf.core import einsum
from opq_tf.core import grid
from opq_tf.core import reconstruction
from opq_tf.core.contract import CompressedKernel
from opq_tf.core.reconstruction import (  # noqa: F401  (re-exported)
    DEFAULT_BATCH_SIZE, DEFAULT_DAMPING, DEFAULT_MAX_IMAGES,
    DEFAULT_MIN_SAMPLES_PER_WEIGHT, DEFAULT_ROUNDING, CalibrationReport,
    KernelCalibration, LearnedRounding)
from opq_tf.keras3 import layers as layers_lib
from opq_tf.keras3 import quantize_configs
from opq_tf.keras3._keras import keras, ops

_PATCH_BYTES = 256 * 2**20  # im2col patches per statistics call, at most.
# Cached activations held in memory, at most; the rest go to disk.
_CACHE_BYTES = activations.DEFAULT_MEMORY_BYTES


@dataclasses.dataclass
class _Kernel:
  """One compressed kernel and where its compressed value lives."""

  key: str
  owner: keras.layers.Layer  # the Conv2D/Dense/EinsumDense/... that owns it
  attr: str
  variable: Any  # latent kernel (wrapped) or compressed kernel (stripped)
  target: np.ndarray  # FP32 kernel the layer should reproduce
  mask: np.ndarray  # bool, kernel shape
  step: np.ndarray  # float32, broadcastable to the kernel
  bits: int
  wrapped: bool

  def compressed(self) -> np.ndarray:
    """The kernel the model uses now: mask * step * codes of the variable."""
    return grid.compress(self.variable.numpy(), self.step, self.bits, self.mask)


class _Stop(BaseException):
  """Ends a forward pass once the hooked layer's input is caught (a
  BaseException, so no `except Exception` inside Keras rewraps it)."""


def calibrate(
    model: keras.Model,
    data: Any,
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
  is validated before any variable is touched, and a failure half way
  restores every variable.

  Args:
    model: a model returned by `opq_tf.apply` (wrapped; its wrappers hold
      every mask, step and latent FP32 kernel), or by `opq_tf.strip` (plain;
      then pass `kernels`).
    data: samples as a NumPy array (N, *input shape); for a model with several
      inputs, a list or dict of such arrays (as the model is called); or a
      tf.data.Dataset of samples or (samples, labels, ...) tuples, batched or
      not, if TensorFlow is already imported. Cast to the inputs' dtypes.
    batchnorm: re-estimate every BatchNorm layer's moving mean and variance
      (first, and again after reconstruction). A model without BatchNorm
      gets a warning, not an error.
    reconstruct: reconstruct every compressed kernel with at least
      `min_samples_per_weight` calibration samples per input weight.
    max_images: use at most this many samples (the first ones of `data`).
    batch_size: samples per forward pass (and per BatchNorm statistic).
    damping: added to H's diagonal, as a fraction of its mean.
    min_samples_per_weight: kernels below it keep plain rounding.
    rounding: "error_feedback", "learned" (or a `LearnedRounding`) or
      "nearest", as for the tf_keras frontend's `calibrate`.
    kernels: for a stripped model only: the `CompressedKernel`s of the
      wrapped model it was stripped from
      (`opq_tf.keras3.wrapping.compressed_kernels(qmodel)`).
    verbose: one stderr line per reconstructed kernel (with the time left).

  Returns:
    A `CalibrationReport` (per-kernel output errors before and after
    reconstruction; `.table()` prints them).

  Raises:
    TypeError, ValueError: the model was never compressed, the data has the
      wrong structure, shape or dtype or is empty, or an option is out of
      range; the message says what to pass instead.
  """
  _check_options(batchnorm, reconstruct, max_images, batch_size, damping,
                 min_samples_per_weight)
  rounding = reconstruction.check_rounding(rounding)
  kernels = _compressed_kernels(model, kernels)
  samples = _calibration_samples(model, data, max_images)
  count = len(keras.tree.flatten(samples)[0])
  batches = [keras.tree.map_structure(lambda a: a[start:start + batch_size],
                                      samples)
             for start in range(0, count, batch_size)]
  bn_layers = [entry.layer for entry in layers_lib.iter_layers(model)
               if isinstance(entry.layer, keras.layers.BatchNormalization)]
  if batchnorm and not bn_layers:
    warnings.warn(
        f"Model {model.name!r} has no BatchNormalization layer: batchnorm "
        "calibration does nothing; pass batchnorm=False to silence this.",
        stacklevel=2)

  saved = [(variable, variable.numpy()) for variable in _touched_variables(
      kernels if reconstruct else [], bn_layers if batchnorm else [])]
  reestimated, rows = [], {}
  try:
    if batchnorm and bn_layers:
      reestimated = _reestimate_batchnorm(model, bn_layers, batches)
    if reconstruct:
      # As in tf_keras: with batchnorm, inputs are taken with every BatchNorm
      # normalising by its batch statistics (as the final re-estimation will
      # make them), and targets come from the FP32 network run the same way.
      records = []  # batch statistics the BatchNorm calls append; unused
      with (_batch_statistics_mode(bn_layers, records) if batchnorm
            else contextlib.nullcontext()):
        rows = _reconstruct_layer_by_layer(
            model, _Reference(model, kernels), kernels, batches, damping,
            min_samples_per_weight, rounding, verbose, records)
      if batchnorm and bn_layers:
        _reestimate_batchnorm(model, bn_layers, batches)
    _check_finite(kernels, bn_layers)
  except BaseException:
    for variable, value in saved:
      variable.assign(value)
    raise
  report = CalibrationReport(count, tuple(reestimated), rows)
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
      reconstruction.check_finite(variable.numpy(),
                   f"BatchNorm {layer.name!r} {variable.name}")


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


def _step_for(step, kernel_shape, channel_axes) -> np.ndarray:
  values = np.asarray(step, np.float32)
  if values.size == 1:
    return values.reshape(())
  return grid.step_array(values, tuple(kernel_shape), channel_axes)


def _compressed_kernels(model, recorded) -> list[_Kernel]:
  """Every compressed kernel of a wrapped or stripped model, in model order."""
  if not isinstance(model, keras.Model):
    raise TypeError(
        f"calibrate needs a Keras 3 Model, got {type(model).__name__}; pass "
        "the model returned by opq_tf.apply or opq_tf.strip.")
  if not model.built or not getattr(model, "inputs", None):
    raise ValueError(
        f"calibrate needs a built Functional or Sequential model; model "
        f"{model.name!r} has no inputs. Pass the model opq_tf.apply returned.")
  kernels = []
  for entry in layers_lib.iter_layers(model):
    if entry.wrapper is None:
      continue
    for spec, owner, variable, variables in entry.wrapper.kernels():
      kernel = np.asarray(variable.numpy(), np.float32)
      kernels.append(_Kernel(
          key=f"{entry.path}/{spec.relative_key}", owner=owner,
          attr=spec.attr, variable=variable, target=kernel,
          mask=variables["mask"].numpy() > 0,
          step=_step_for(variables["step"].numpy(), kernel.shape,
                         spec.quantizer.channel_axes),
          bits=spec.quantizer.bits, wrapped=True))
  if kernels:
    if recorded is not None:
      raise ValueError(
          f"Model {model.name!r} is wrapped and holds its own compressed "
          "kernels; pass kernels= only with a stripped model.")
    return kernels
  if not recorded:
    raise ValueError(
        f"Model {model.name!r} has no OPQ-compressed kernel: OPQ was never "
        "applied to it. Call opq_tf.apply(model, plan) first and calibrate "
        "the model it returns, or a stripped copy of it with "
        "kernels=opq_tf.keras3.wrapping.compressed_kernels(qmodel) (the "
        "masks, steps and FP32 kernels a plain model no longer holds).")
  sites = layers_lib.kernel_sites(model)
  for entry in recorded:
    site = sites.get(entry.key)
    if site is None or tuple(site.variable.shape) != entry.kernel.shape:
      raise ValueError(
          f"kernels= names the compressed kernel {entry.key!r}, which model "
          f"{model.name!r} does not have (with that shape); pass the kernels "
          "of the wrapped model this one was stripped from.")
    kernels.append(_Kernel(
        key=entry.key, owner=site.owner, attr=site.attr,
        variable=site.variable, target=np.asarray(entry.kernel, np.float32),
        mask=np.asarray(entry.mask) > 0,
        step=_step_for(entry.step, entry.kernel.shape, entry.channel_axes),
        bits=int(entry.bits), wrapped=False))
  return kernels


def _calibration_samples(model, data, max_images: int):
  """Up to `max_images` samples of `data`, in the structure the model takes."""
  inputs = list(model.inputs)
  tf = sys.modules.get("tensorflow")
  if tf is not None and isinstance(data, tf.data.Dataset):
    data = _from_dataset(model, data, max_images)
  leaves = keras.tree.flatten(data) if not isinstance(data, np.ndarray) else [
      data]
  if not all(isinstance(leaf, np.ndarray) for leaf in leaves) or (
      len(leaves) != len(inputs)):
    raise TypeError(
        f"calibrate needs the samples of model {model.name!r} as NumPy arrays: "
        f"{_expected(inputs)}; got {_describe(data)}. Convert tensors with "
        "np.asarray (a tf.data.Dataset works once TensorFlow is imported).")
  count = len(leaves[0])
  for leaf, tensor in zip(leaves, inputs):
    shape = tuple(tensor.shape)
    dtype = np.dtype(leaf.dtype)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.floating)
                                 or np.issubdtype(dtype, np.integer)):
      raise TypeError(
          f"Calibration samples must be real numbers, got dtype {dtype}; "
          "decode and preprocess them as for evaluation first.")
    if leaf.ndim != len(shape) or len(leaf) != count or any(
        want is not None and got != want
        for got, want in zip(leaf.shape[1:], shape[1:])):
      raise ValueError(
          f"Calibration samples have shape {leaf.shape}, but model "
          f"{model.name!r} takes {_expected(inputs)}: pass arrays of that "
          "shape with one leading sample axis (the same for every input).")
  if not count:
    raise ValueError(
        "The calibration data is empty: pass at least one sample (a few "
        f"hundred; default max_images={DEFAULT_MAX_IMAGES}).")
  cast = iter([np.asarray(leaf[:max_images], dtype=tensor.dtype)
               for leaf, tensor in zip(leaves, inputs)])
  if isinstance(data, np.ndarray):
    return next(cast)
  return keras.tree.map_structure(lambda _: next(cast), data)


def _from_dataset(model, dataset, max_images: int):
  """The first `max_images` samples of a tf.data.Dataset (one-input models)."""
  if len(model.inputs) != 1:
    raise TypeError(
        "A tf.data.Dataset calibrates one-input models only; pass a list or "
        f"dict of NumPy arrays for model {model.name!r}.")
  rank = len(model.inputs[0].shape)
  parts, count = [], 0
  for element in dataset.as_numpy_iterator():
    if isinstance(element, (tuple, list)):
      element = element[0]
    element = np.asarray(element)
    if element.ndim == rank - 1:
      element = element[None]
    parts.append(element[:max_images - count])
    count += len(parts[-1])
    if count >= max_images:
      break
  if not parts:
    return np.zeros((0,) + tuple(d or 1 for d in model.inputs[0].shape[1:]),
                    np.float32)
  return np.concatenate(parts)


def _expected(inputs) -> str:
  return " and ".join(
      "(N, " + ", ".join(str(d) for d in tuple(t.shape)[1:]) + ")"
      for t in inputs)


def _describe(data) -> str:
  if isinstance(data, (list, tuple, dict)):
    return f"a {type(data).__name__} of {len(data)}"
  return type(data).__name__


def _touched_variables(kernels, bn_layers) -> list[Any]:
  variables = [kernel.variable for kernel in kernels]
  variables += [bias for bias in map(_bias_of, kernels) if bias is not None]
  for layer in bn_layers:
    variables += [layer.moving_mean, layer.moving_variance]
  return variables


# -------------------------------------------------------------------- hooks


@contextlib.contextmanager
def _hooked(layers_and_calls) -> Iterator[None]:
  """Inside, each layer's `call` is replaced (an instance attribute, which
  Keras' `__call__` reads before the class's method)."""
  originals = []
  try:
    for layer, call in layers_and_calls:
      originals.append((layer, layer.__dict__.get("call")))
      object.__setattr__(layer, "call", call)
    yield
  finally:
    for layer, original in reversed(originals):
      if original is None:
        object.__delattr__(layer, "call")
      else:
        object.__setattr__(layer, "call", original)


def _first_input(args, kwargs):
  return args[0] if args else kwargs.get("inputs")


def _capture(step: "_Step", owner, values: dict) -> Any:
  """`owner`'s input (float32) when `step` runs on one batch of `values`;
  the step stops there."""
  captured = []

  def call(*args, **kwargs):
    captured.append(_first_input(args, kwargs))
    raise _Stop()

  with _hooked([(owner, call)]):
    try:
      _run_step(step, values)
    except _Stop:
      pass
  if not captured:
    raise AssertionError(
        f"{owner.name!r} was not called when its graph node "
        f"{step.operation.name!r} ran (data-dependent control flow?).")
  return ops.cast(captured[0], "float32")


def _call_order(model, kernels, batch) -> tuple[dict[int, int], dict[int, int]]:
  """(id(owner) -> position of its first call, id(owner) -> number of calls)
  in one forward pass."""
  order, calls = {}, {}
  owners = {id(kernel.owner): kernel.owner for kernel in kernels}

  def recorder(layer):
    original = layer.call

    def call(*args, **kwargs):
      order.setdefault(id(layer), len(order))
      calls[id(layer)] = calls.get(id(layer), 0) + 1
      return original(*args, **kwargs)

    return call

  with _hooked([(owner, recorder(owner)) for owner in owners.values()]):
    model(batch, training=False)
  return order, calls


class _Reference:
  """The FP32 network: `model`'s layers run inside `scope()` see every
  variable at its value now, compressed kernels at their FP32 targets, and
  wrappers passing kernels through."""

  def __init__(self, model, kernels: list[_Kernel]):
    targets = {id(kernel.variable): kernel.target for kernel in kernels}
    self._mapping = [
        (variable, ops.convert_to_tensor(
            targets.get(id(variable), variable.numpy()), dtype=variable.dtype))
        for variable in model.variables]
    self._wrappers = [entry.wrapper for entry in layers_lib.iter_layers(model)
                      if entry.wrapper is not None]

  @contextlib.contextmanager
  def scope(self) -> Iterator[None]:
    for wrapper in self._wrappers:
      object.__setattr__(wrapper, "opq_bypass", True)
    try:
      with keras.StatelessScope(state_mapping=self._mapping):
        yield
    finally:
      for wrapper in self._wrappers:
        object.__setattr__(wrapper, "opq_bypass", False)


# ---------------------------------------------------------------- BatchNorm


def _batch_statistics_call(layer, records: list) -> Callable:
  """A BatchNorm `call` that normalises by batch statistics and records them
  (touching no variable, as the layer's own training mode would)."""

  def call(inputs, training=None, mask=None, **kwargs):
    del training, mask, kwargs
    values = ops.cast(inputs, "float32")
    rank = len(values.shape)
    axis = layer.axis % rank
    reduction = [a for a in range(rank) if a != axis]
    mean, variance = ops.moments(values, reduction)
    count = math.prod(values.shape) // values.shape[axis]
    records.append((layer, mean, variance * count / max(count - 1.0, 1.0),
                    values.shape[0]))
    gamma = None if layer.gamma is None else ops.cast(layer.gamma, "float32")
    beta = None if layer.beta is None else ops.cast(layer.beta, "float32")
    outputs = ops.batch_normalization(values, mean, variance, axis,
                                      offset=beta, scale=gamma,
                                      epsilon=layer.epsilon)
    return ops.cast(outputs, inputs.dtype)

  return call


def _batch_statistics_mode(bn_layers, records: list):
  return _hooked([(layer, _batch_statistics_call(layer, records))
                  for layer in bn_layers])


def _reestimate_batchnorm(model, bn_layers, batches) -> list[str]:
  """Sets every BatchNorm's moving statistics to its batch-size-weighted mean
  of per-batch statistics; returns the names of the layers it reached."""
  records = []
  totals: dict[int, list] = {}
  with _batch_statistics_mode(bn_layers, records):
    for batch in batches:
      records.clear()
      model(batch, training=False)
      # A layer called more than once (shared) averages over all its calls.
      for layer, mean, variance, weight in records:
        total = totals.setdefault(id(layer), [layer, 0.0, 0.0, 0.0])
        mean, variance = (np.asarray(ops.convert_to_numpy(value), np.float64)
                          for value in (mean, variance))
        total[1] = total[1] + weight * mean
        total[2] = total[2] + weight * variance
        total[3] += weight
  for layer, mean_sum, var_sum, weight in totals.values():
    layer.moving_mean.assign((mean_sum / weight).astype(np.float32))
    layer.moving_variance.assign((var_sum / weight).astype(np.float32))
  return [layer.name for layer in bn_layers if id(layer) in totals]


# ------------------------------------------------------------------- graph


@dataclasses.dataclass(frozen=True)
class _Step:
  """One operation call of the model's graph (a node; nested graph models
  expanded into theirs), with its tensors named by cache keys."""

  operation: Any  # a layer (an OPQWrapper, ...) or an op such as `x + y`
  arguments: Any  # the node's SymbolicArguments: how its call is made
  inputs: dict  # id(KerasTensor) in `arguments` -> cache key of its value
  outputs: tuple  # cache key of each of the node's flat outputs


def _graph_of(layer) -> Optional[Any]:
  """The Functional graph a Functional or built Sequential model runs."""
  if isinstance(layer, keras.Sequential):
    return getattr(layer, "_functional", None)
  return layer if layers_lib.is_graph_model(layer) else None


def _steps(model) -> tuple[list[Hashable], list[_Step]]:
  """(cache keys of the model's flat inputs, its steps in the order Keras'
  own call runs them).

  As `Functional._run_through_graph`: nodes by decreasing depth, without
  those not computable from the inputs. A node that calls a nested graph
  model on its first argument is replaced by that model's steps, the inner
  inputs and the node's outputs named by the keys they alias. A tensor's key
  is (the nodes of the enclosing model calls, id(tensor)), so a nested model
  called twice gets two sets of keys.
  """
  steps = []

  def walk(graph, scope: tuple, input_keys: list) -> list:
    alias = {id(tensor): key for tensor, key in zip(graph.inputs, input_keys)}
    key_of = lambda tensor: alias.get(id(tensor), (scope, id(tensor)))
    available = set(alias)
    by_depth = graph._nodes_by_depth  # pylint: disable=protected-access
    for depth in sorted(by_depth, reverse=True):
      for node in by_depth[depth]:
        if node.is_input or not node.operation or any(
            id(tensor) not in available for tensor in node.input_tensors):
          continue
        available.update(id(tensor) for tensor in node.outputs)
        inner = _graph_of(node.operation)
        first = (keras.tree.flatten(node.arguments.args[0])
                 if node.arguments.args else [])
        if inner is not None and len(first) == len(inner.inputs) and all(
            isinstance(tensor, keras.KerasTensor) for tensor in first):
          outputs = walk(inner, scope + (id(node),), list(map(key_of, first)))
          alias.update(zip(map(id, node.outputs), outputs))
          continue
        steps.append(_Step(
            node.operation, node.arguments,
            {id(tensor): key_of(tensor) for tensor in node.input_tensors},
            tuple(map(key_of, node.outputs))))
    return list(map(key_of, graph.outputs))

  graph = _graph_of(model)
  input_keys = [((), id(tensor)) for tensor in graph.inputs]
  walk(graph, (), input_keys)
  return input_keys, steps


def _run_step(step: _Step, values: dict) -> list:
  """One batch through one step: its operation called as the graph calls it,
  in inference mode (as `model(x, training=False)` passes `training` on),
  on `values` (cache key -> this batch's value); its flat outputs."""
  args, kwargs = step.arguments.fill_in(
      {tensor: ops.convert_to_tensor(values[key])
       for tensor, key in step.inputs.items()})
  if "training" in getattr(step.operation, "_call_context_args", ()):
    kwargs = {**kwargs, "training": False}
  return keras.tree.flatten(step.operation(*args, **kwargs))


def _contains(operation, layer) -> bool:
  """True if `layer` is `operation` or one of its sublayers."""
  if not isinstance(operation, keras.layers.Layer):
    return False
  return any(inner is layer for inner in operation._flatten_layers())  # pylint: disable=protected-access


# ------------------------------------------------------------ reconstruction


def _reconstruct_layer_by_layer(
    model, reference: _Reference, kernels: list[_Kernel], batches,
    damping: float, min_samples_per_weight: float, rounding, verbose: bool,
    records: list) -> dict[str, KernelCalibration]:
  """Reconstructs every kernel in network order, in place; returns the rows
  in the kernels' order.

  Both networks (the compressed one and the FP32 `reference`) run one step
  at a time over every batch, each step's inputs taken from the cached
  outputs of the steps before it (core.activations), so the cost grows
  linearly with depth, branches included. When the walk reaches a step whose
  layer holds compressed kernels, they are reconstructed in the order its
  call reaches them, from their owners' inputs X (and Z, in the FP32
  network) caught as the step reruns on its cached inputs, before the step
  runs for its outputs, so the steps after it see its reconstructed output.
  The walk stops after the last such step. `records` (the BatchNorm calls'
  batch statistics) is emptied after every call.
  """
  input_keys, steps = _steps(model)
  order, calls = _call_order(model, kernels, batches[0])
  rows, kernels_at = {}, collections.defaultdict(list)
  progress = reconstruction.Progress(len(kernels), verbose)
  for kernel in sorted(kernels, key=lambda k: order.get(id(k.owner),
                                                        math.inf)):
    at = [position for position, step in enumerate(steps)
          if _contains(step.operation, kernel.owner)]
    if calls.get(id(kernel.owner), 0) == 1 and len(at) == 1:
      kernels_at[at[0]].append(kernel)
      continue
    rows[kernel.key] = KernelCalibration(
        "plain rounding", "layer is called more than once (shared)"
        if calls.get(id(kernel.owner)) else
        "layer is not called by the model's forward pass")
    progress.done(kernel.key, rows[kernel.key].method)

  networks = (("compressed", contextlib.nullcontext), ("fp32", reference.scope))
  uses = collections.Counter(
      (label, key) for label, _ in networks
      for step in steps for key in set(step.inputs.values()))
  with activations.ActivationCache(uses, _CACHE_BYTES) as cache:
    for label, _ in networks:
      for batch in batches:
        # As the model's own call maps the inputs (names, dtypes, ranks).
        flat = _graph_of(model)._standardize_inputs(batch)  # pylint: disable=protected-access
        for key, value in zip(input_keys, flat):
          cache.append((label, key), ops.convert_to_numpy(value))
    for position, step in enumerate(steps):
      if not kernels_at:
        break
      keys = list(dict.fromkeys(step.inputs.values()))
      values = []  # per network: per batch, cache key -> value
      for label, _ in networks:
        taken = [cache.take((label, key)) for key in keys]
        values.append([dict(zip(keys, batch)) for batch in zip(*taken)])
      for kernel in kernels_at.pop(position, ()):
        inputs, targets = (_captures(step, kernel.owner, per_batch, scope)
                           for (_, scope), per_batch in zip(networks, values))
        rows[kernel.key] = _reconstruct_kernel(
            kernel, kernels, inputs, targets, damping, min_samples_per_weight,
            rounding)
        records.clear()
        progress.done(kernel.key, rows[kernel.key].method)
      if not kernels_at:
        break
      for (label, scope), per_batch in zip(networks, values):
        with scope():
          for batch_values in per_batch:
            outputs = _run_step(step, batch_values)
            records.clear()
            for key, output in zip(step.outputs, outputs):
              cache.append((label, key), ops.convert_to_numpy(output))
  return {kernel.key: rows[kernel.key] for kernel in kernels}


def _captures(step: _Step, owner, per_batch: list[dict],
              scope: Callable) -> Iterator[Any]:
  """`owner`'s input, batch by batch, as `step` runs inside `scope()`."""
  for values in per_batch:
    with scope():  # closed before the yield: the other network runs next
      captured = _capture(step, owner, values)
    yield captured


def _reconstruct_kernel(kernel: _Kernel, kernels: list[_Kernel],
                        inputs: Iterable, targets: Iterable, damping: float,
                        min_samples_per_weight: float,
                        rounding: "str | LearnedRounding" = DEFAULT_ROUNDING
                        ) -> KernelCalibration:
  """Reconstructs one kernel in place from its layer's inputs, batch by
  batch, in the compressed (X) and the FP32 network (Z); returns its summary
  row."""
  columns_of, target_columns_of, to_rows, from_rows, reason = _layout(
      kernel, kernels)
  if columns_of is None:
    return KernelCalibration("plain rounding", reason)
  patch_width = int(np.prod(kernel.target.shape[:-1]))
  sums, samples = None, 0
  for batch_inputs, batch_targets in zip(inputs, targets):
    # im2col copies every input kh * kw times: bound its memory per call.
    patch_bytes = 4 * patch_width * max(1, int(np.prod(
        batch_inputs.shape[1:-1])))
    chunk = max(1, _PATCH_BYTES // patch_bytes)
    for start in range(0, batch_inputs.shape[0], chunk):
      rows, *parts = _statistics(
          columns_of(batch_inputs[start:start + chunk]),
          target_columns_of(batch_targets[start:start + chunk]))
      parts = [np.asarray(ops.convert_to_numpy(part), np.float64)
               for part in parts]
      sums = parts if sums is None else [a + b for a, b in zip(sums, parts)]
      samples += rows
  statistics = reconstruction.Statistics(samples, *sums)
  bias = _bias_of(kernel)
  rows_shape = to_rows(np.zeros(kernel.target.shape)).shape[:2]
  bias_fits = bias is not None and int(np.prod(bias.shape)) == int(
      np.prod(rows_shape))
  solved = reconstruction.solve(
      to_rows(kernel.target.astype(np.float64)), statistics,
      to_rows(kernel.mask),
      to_rows(np.broadcast_to(kernel.step, kernel.target.shape)), kernel.bits,
      damping, min_samples_per_weight, bias=bias_fits, rounding=rounding)
  if solved.reconstructed:
    kernel.variable.assign(reconstruction.latent_value(
        from_rows(solved.rows), from_rows(solved.latent),
        kernel.variable.numpy(), kernel.mask, kernel.step, kernel.bits,
        wrapped=kernel.wrapped, key=kernel.key))
  if bias_fits:
    shift = solved.bias_shift.reshape(tuple(bias.shape))
    bias.assign(bias.numpy() + shift.astype(bias.dtype))
  return solved.summary


def _statistics(x, z) -> tuple:
  """Sums of one chunk of columns (groups, samples, D): (samples, X X^T,
  sum X, Z X^T, Z Z^T, sum Z), the products per group (groups, D, D), the
  sums (groups, D). Batched matmuls, groups first: 4-5 times faster on
  TensorFlow than the einsum "sdg,seg->gde" on (samples, D, groups) for a
  depthwise kernel's columns (as in tf_keras), and no slower on JAX."""
  gram = lambda a, b: ops.matmul(ops.transpose(a, (0, 2, 1)), b)
  total = lambda a: ops.sum(a, axis=1)
  return (int(x.shape[1]), gram(x, x), total(x), gram(z, x), gram(z, z),
          total(z))


def _bias_of(kernel: _Kernel):
  """The bias added to the kernel's output, if its layer has one (not for a
  SeparableConv2D's depthwise half: the bias follows the pointwise one)."""
  if (kernel.attr == "depthwise_kernel"
      and isinstance(kernel.owner, keras.layers.SeparableConv2D)):
    return None
  bias = getattr(kernel.owner, "bias", None)
  return bias if isinstance(bias, keras.Variable) else None


def _layout(kernel: _Kernel, kernels: list[_Kernel]):
  """(columns_of, target_columns_of, to_rows, from_rows, reason) for the
  kernel's layer kind, as in tf_keras: columns_of(layer input) -> X shaped
  (groups, samples, D); to_rows maps a kernel-shaped array to (groups, rows,
  D), from_rows back. (None, ..., reason) if not supported."""
  layer, shape = kernel.owner, kernel.target.shape
  unsupported = lambda reason: (None, None, None, None, reason)
  if getattr(layer, "data_format", "channels_last") != "channels_last":
    return unsupported("channels_first layers are not reconstructed")
  config = quantize_configs.config_for(layer)
  kind = (config.like if config is not None and config.like is not None
          else type(layer))
  flat_rows = (lambda a: a.reshape(-1, shape[-1]).T[None],
               lambda rows: rows[0].T.reshape(shape))
  width = int(np.prod(shape[:-1]))
  if kind is keras.layers.Dense:
    columns = lambda x: ops.reshape(x, (1, -1, width))
    return columns, columns, *flat_rows, ""
  if kind is keras.layers.EinsumDense:
    return _einsum_layout(layer.equation, shape)
  if kind in (keras.layers.Conv2D, keras.layers.Conv1D):
    if getattr(layer, "groups", 1) != 1:
      return unsupported("grouped convolutions are not reconstructed")
    patches = _patches_fn(layer, shape[:-2])
    columns = lambda x: ops.reshape(patches(x), (1, -1, width))
    return columns, columns, *flat_rows, ""
  spatial = int(np.prod(shape[:-2]))
  if (kind is keras.layers.DepthwiseConv2D
      or kind is keras.layers.SeparableConv2D
      and kernel.attr == "depthwise_kernel"):
    channels, multiplier = shape[-2], shape[-1]
    columns = _depthwise_patches_fn(layer, shape[:-2], channels)
    return (columns, columns,
            lambda a: a.reshape(spatial, channels, multiplier).transpose(
                1, 2, 0),
            lambda rows: rows.transpose(2, 0, 1).reshape(shape), "")
  if kind is keras.layers.SeparableConv2D and kernel.attr == "pointwise_kernel":
    depthwise = _depthwise_as_used(kernel, kernels)
    compressed, fp32 = (_depthwise_output_fn(layer, value, shape[-2])
                        for value in depthwise)
    return compressed, fp32, *flat_rows, ""
  return unsupported(
      f"{kind.__name__}/{kernel.attr} is not a kind calibrate reconstructs; "
      "register it with like=<the built-in kind it computes> to reconstruct it")


def _einsum_layout(equation: str, shape):
  """An EinsumDense that contracts its input's last dimensions with the
  kernel's first ones is a Dense over those: X = input flattened to D."""
  contracted = einsum.contracted_dims(equation)
  if contracted is None:
    return (None, None, None, None,
            f"EinsumDense {equation!r} does not contract its input's last "
            "dimensions with the kernel's first ones")
  width = int(np.prod(shape[:contracted]))
  outputs = int(np.prod(shape[contracted:]))
  columns = lambda x: ops.reshape(x, (1, -1, width))
  return (columns, columns,
          lambda a: a.reshape(width, outputs).T[None],
          lambda rows: rows[0].T.reshape(shape), "")


def _patches_fn(layer, kernel_size) -> Callable:
  """im2col for a 1-D or 2-D convolution: (N, *positions, kh * kw * cin),
  in the order of the kernel's (kh, kw, cin) flattening."""
  strides, rates = tuple(layer.strides), tuple(layer.dilation_rate)
  padding = layer.padding.lower()
  kernel_size = tuple(int(k) for k in kernel_size)

  def patches(x):
    spatial = tuple(x.shape[1:-1])
    pads, outs = [(0, 0)], []
    for size, k, s, r in zip(spatial, kernel_size, strides, rates):
      extent = (k - 1) * r + 1
      if padding == "same":
        out = -(-size // s)
        total = max((out - 1) * s + extent - size, 0)
        pads.append((total // 2, total - total // 2))
      elif padding == "causal":
        out = (size - 1) // s + 1
        pads.append((extent - 1, 0))
      else:
        out = (size - extent) // s + 1
        pads.append((0, 0))
      outs.append(out)
    x = ops.pad(x, pads + [(0, 0)])
    pieces = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
      index = (slice(None),) + tuple(
          slice(o * r, o * r + (n - 1) * s + 1, s)
          for o, r, s, n in zip(offsets, rates, strides, outs)) + (slice(None),)
      pieces.append(x[index])
    return ops.concatenate(pieces, axis=-1)

  return patches


def _depthwise_patches_fn(layer, kernel_size, channels: int) -> Callable:
  """x -> each input channel's patches (channels, samples, kh * kw), in the
  kernel's (kh, kw) order.

  On TensorFlow a depthwise convolution with one-hot kernels (it copies
  each value exactly and pads as the layer does) is 5 times faster than
  strided slices and a concatenation; on JAX and PyTorch (CPU) it is up to
  2-3 times slower than the slices (measured on MobileNet's depthwise
  inputs), so those take the slices of `_patches_fn`.
  """
  spatial = math.prod(int(k) for k in kernel_size)
  if keras.backend.backend() != "tensorflow":
    patches = _patches_fn(layer, kernel_size)
    return lambda x: ops.transpose(
        ops.reshape(patches(x), (-1, spatial, channels)), (2, 0, 1))
  one_hot = np.zeros(tuple(kernel_size) + (channels, spatial), np.float32)
  for index, offsets in enumerate(np.ndindex(*kernel_size)):
    one_hot[offsets + (slice(None), index)] = 1.0
  one_hot = ops.convert_to_tensor(one_hot)

  def columns(x):
    # Output channel c * spatial + j is input channel c at kernel offset j.
    patches = ops.depthwise_conv(x, one_hot, strides=layer.strides,
                                 padding=layer.padding,
                                 data_format="channels_last",
                                 dilation_rate=layer.dilation_rate)
    return ops.transpose(ops.reshape(patches, (-1, channels, spatial)),
                         (1, 0, 2))

  return columns


def _depthwise_as_used(kernel: _Kernel, kernels: list[_Kernel]
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(compressed, FP32) depthwise kernel of `kernel`'s SeparableConv2D; the
  compressed one as the model uses it now (already reconstructed: it comes
  first)."""
  for other in kernels:
    if other.owner is kernel.owner and other.attr == "depthwise_kernel":
      return other.compressed(), other.target
  value = np.asarray(kernel.owner.depthwise_kernel.numpy(), np.float32)
  return value, value


def _depthwise_output_fn(layer, depthwise: np.ndarray, channels: int
                         ) -> Callable:
  """x -> a SeparableConv2D's depthwise output with the given depthwise
  kernel, as the pointwise kernel's columns (1, samples, channels)."""
  depthwise = ops.convert_to_tensor(depthwise)

  def columns(x):
    output = ops.depthwise_conv(x, depthwise, strides=layer.strides,
                                padding=layer.padding,
                                data_format="channels_last",
                                dilation_rate=layer.dilation_rate)
    return ops.reshape(output, (1, -1, channels))

  return columns
