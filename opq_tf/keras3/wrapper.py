"""`OPQWrapper`: a Keras 3 layer that runs another layer on compressed kernels.

    wrapped = OPQWrapper(dense, [KernelSpec("", "kernel", "kernel", (16, 8),
                                            OPQWeightQuantizer(4, 0.1, 0.05))])
    y = wrapped(x)    # dense's call, with mask * q(kernel) as its kernel

Why a wrapper that swaps the kernel, and not Keras' own quantization hooks:
Keras 3 quantizes by mode inside each layer class (`Dense.quantized_call`,
`_int8_build`, the `_kernel` property), a closed set of modes per class with
no place for a user-defined quantizer; subclassing each kind would need one
class per kind and lose the user's class. The wrapper instead holds the
original layer unchanged and, during its own call only, puts the compressed
tensor `w_hat` where the layer's `call` reads its kernel (the attribute that
holds the variable, e.g. Dense's `_kernel` behind its `kernel` property), then
calls the layer and puts the variable back. The swap is Python-level, so it
costs nothing in a traced step, `w_hat` is `keras.ops` only (it runs under
`jit_compile=True` on every backend), and gradients reach the latent kernel
through the straight-through estimator. One wrapper covers every compressed
kernel of the layer it wraps, its sublayers' included: a MultiHeadAttention
is wrapped once and its four EinsumDense projections are swapped together,
so the attention layer itself stays the stock Keras class.

The `mask` and `step` of each kernel are non-trainable variables the wrapper
creates in `build` (so under a `keras.distribution` they are created in its
scope, with the kernel's layout); they are saved in `.keras` files and
restored by `keras.saving.load_model` with the class registered under
package "opq_tf".
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Mapping, Sequence

from opq_tf.keras3 import layers as layers_lib
from opq_tf.keras3 import quantize_configs
from opq_tf.keras3._keras import keras, ops
from opq_tf.keras3.quantizers import OPQWeightQuantizer


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  """One compressed kernel of a wrapped layer.

  `sublayer` is the attribute path of the layer that owns the kernel inside
  the wrapped layer ("" for the wrapped layer itself, "_query_dense" for a
  MultiHeadAttention's query projection), `attr` the owner's attribute
  holding the kernel variable and `name` the kernel's weight name in keys.
  """

  sublayer: str
  attr: str
  name: str
  shape: tuple[int, ...]
  quantizer: OPQWeightQuantizer

  @property
  def relative_key(self) -> str:
    """The key below the wrapped layer's path: "kernel", "_query_dense/kernel"."""
    return f"{self.sublayer}/{self.name}" if self.sublayer else self.name

  def get_config(self) -> dict:
    return {"sublayer": self.sublayer, "attr": self.attr, "name": self.name,
            "shape": list(self.shape),
            "quantizer": self.quantizer.get_config()}

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "KernelSpec":
    if isinstance(config, KernelSpec):
      return config
    return cls(config["sublayer"], config["attr"], config["name"],
               tuple(int(d) for d in config["shape"]),
               OPQWeightQuantizer.from_config(config["quantizer"]))


@keras.saving.register_keras_serializable(package="opq_tf")
class OPQWrapper(keras.layers.Wrapper):
  """Calls `layer` with its planned kernels pruned and quantized.

  The wrapper takes the wrapped layer's name, so `model.get_layer(name)`
  finds it; it computes `w_hat` in float32 (`autocast=False`) and casts it
  to the owner's compute dtype.
  """

  opq_wrapper = True  # what layers.is_wrapper looks for

  def __init__(self, layer: keras.layers.Layer,
               kernels: Sequence[KernelSpec | Mapping[str, Any]], **kwargs):
    kwargs.setdefault("name", layer.name)
    kwargs["autocast"] = False
    super().__init__(layer, **kwargs)
    self.kernel_specs = tuple(KernelSpec.from_config(spec) for spec in kernels)
    if not self.kernel_specs:
      raise ValueError(f"OPQWrapper of {layer.name!r} needs at least one kernel.")
    self.supports_masking = getattr(layer, "supports_masking", False)
    # Calibration's FP32 reference pass sets this: the latent kernels are
    # used as they are (Python-level; never set inside a traced step).
    self.opq_bypass = False

  def build(self, input_shape=None):
    if not self.layer.built:
      self.layer.build(input_shape)
    variables = []
    for spec, kernel in zip(self.kernel_specs, self._kernel_variables()):
      if tuple(kernel.shape) != spec.shape:
        raise ValueError(
            f"Kernel {spec.relative_key!r} of layer {self.layer.name!r} has "
            f"shape {tuple(kernel.shape)}, but the wrapper was made for "
            f"{spec.shape}.")
      name = spec.relative_key.replace("/", "_")
      variables.append(spec.quantizer.build(
          spec.shape, name, self, layout=getattr(kernel, "_layout", None)))
    # Assigning tracks them as this layer's own non-trainable variables.
    self.opq_variables = variables
    self.built = True

  def _owner(self, spec: KernelSpec) -> keras.layers.Layer:
    return layers_lib.sublayer(self.layer, spec.sublayer)

  def _kernel_variables(self) -> list[Any]:
    kernels = []
    for spec in self.kernel_specs:
      owner = self._owner(spec)
      config = quantize_configs.config_for(owner)
      if config is None:
        raise ValueError(
            f"{type(owner).__name__} {owner.name!r} inside {self.layer.name!r} "
            "is not a layer kind OPQ compresses; register it with "
            "opq_tf.register_layer before loading or wrapping.")
      kernels.append(config.get_weights(owner)[spec.attr])
    return kernels

  def kernels(self) -> Iterator[tuple[KernelSpec, keras.layers.Layer, Any,
                                      dict]]:
    """Yields (spec, owner layer, latent kernel variable, {mask, step})."""
    for spec, kernel, variables in zip(self.kernel_specs,
                                       self._kernel_variables(),
                                       self.opq_variables):
      yield spec, self._owner(spec), kernel, variables

  def call(self, *args, **kwargs):
    by_owner: dict[int, tuple[keras.layers.Layer, dict]] = {}
    for spec, owner, kernel, variables in self.kernels():
      if self.opq_bypass:
        value = ops.convert_to_tensor(kernel)
      else:
        value = spec.quantizer(kernel, weights=variables)
      value = ops.cast(value, owner.compute_dtype)
      by_owner.setdefault(id(owner), (owner, {}))[1][spec.attr] = value
    with contextlib.ExitStack() as stack:
      for owner, tensors in by_owner.values():
        config = quantize_configs.config_for(owner)
        stack.enter_context(config.substituted(owner, tensors))
      return self.layer(*args, **kwargs)

  def get_config(self) -> dict:
    config = super().get_config()
    config["kernels"] = [spec.get_config() for spec in self.kernel_specs]
    return config
