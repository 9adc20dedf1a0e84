"""One-shot allocation of pruning thresholds and quantization steps (method doc B).

Pure NumPy: the allocation reads and tests without TensorFlow. Given the
pre-trained kernels, a global pruning rate p and a bit-width B, it returns a
`CompressionPlan` with one (threshold, step) per kernel:

- "opq" (default): minimise Σ_i n_i e_i(t_i, Δ_i) subject to
  Σ_i #{|w_i| < t_i} = p·Σ_i n_i. A Lagrange multiplier μ splits this into
  independent per-layer problems min e_i - μ·P_i, each a scaled copy of the
  unit problem solved once in `laplace.unit_table`; μ is found by bisection on
  the *realised* pruned count, so the global rate is met on the actual weights.
- "uniform": the same pruning rate p in every layer.
- "global_magnitude": one magnitude threshold for all layers.

Then each layer's single step Δ_i is chosen for its threshold: either from the
layer's Laplace fit ("layer") or, by default, the unified channel-wise step
("channel", B.5) that minimises the summed expected error of all output
channels, each with its own Laplace scale.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
from typing import Any, Mapping, Optional
import warnings

import numpy as np

from opq_tf import laplace

STRATEGIES = ("opq", "uniform", "global_magnitude")
STEP_STATS = ("channel", "layer")
_OVERRIDE_OPTIONS = ("skip", "bits", "min_kept")
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """The allocation of one kernel. Errors are expected squared error per weight."""

  name: str
  weight: str
  kind: str
  shape: tuple[int, ...]
  size: int
  laplace_scale: float
  threshold: float
  pruning_rate: float
  modelled_pruning_rate: float
  step: float
  bits: int
  modelled_error: float
  kept: int

  @property
  def key(self) -> str:
    return f"{self.name}/{self.weight}"


@dataclasses.dataclass(frozen=True)
class CompressionPlan:
  """Per-kernel thresholds and steps, plus the request that produced them."""

  strategy: str
  step_stats: str
  target_pruning_rate: float
  bits: int
  layers: list[LayerPlan]
  skipped: list[str] = dataclasses.field(default_factory=list)

  @property
  def total_weights(self) -> int:
    return sum(layer.size for layer in self.layers)

  @property
  def kept_weights(self) -> int:
    return sum(layer.kept for layer in self.layers)

  @property
  def realised_pruning_rate(self) -> float:
    return 1.0 - self.kept_weights / self.total_weights

  @property
  def modelled_error(self) -> float:
    """Σ_i n_i e_i: the objective the "opq" strategy minimises."""
    return sum(layer.size * layer.modelled_error for layer in self.layers)

  @property
  def weight_bits_ratio(self) -> float:
    """32·Σn / Σ(kept·B + 32): the papers' compression figure (one FP32 step each)."""
    coded = sum(layer.kept * layer.bits + 32 for layer in self.layers)
    return 32.0 * self.total_weights / coded

  def by_key(self) -> dict[str, LayerPlan]:
    return {layer.key: layer for layer in self.layers}

  def to_json(self) -> str:
    data = dataclasses.asdict(self)
    data["format_version"] = _FORMAT_VERSION
    data["totals"] = {
        "total_weights": self.total_weights,
        "kept_weights": self.kept_weights,
        "realised_pruning_rate": self.realised_pruning_rate,
        "weight_bits_ratio": self.weight_bits_ratio,
        "modelled_error": self.modelled_error,
    }
    return json.dumps(data, indent=1)

  @classmethod
  def from_json(cls, text: str) -> "CompressionPlan":
    data = json.loads(text)
    if data.get("format_version") != _FORMAT_VERSION:
      raise ValueError(
          f"Compression plan format {data.get('format_version')!r} is not "
          f"{_FORMAT_VERSION}; recompute the plan with opq_tf.allocate.")
    data.pop("format_version")
    data.pop("totals")
    layers = [
        LayerPlan(**{**layer, "shape": tuple(layer["shape"])})
        for layer in data.pop("layers")
    ]
    return cls(layers=layers, **data)

  def table(self) -> str:
    """A printable per-layer table with totals."""
    header = ("layer", "kind", "shape", "size", "b", "threshold", "pruned",
              "modelled", "step", "bits", "mse")
    rows = [header]
    for layer in self.layers:
      rows.append((
          layer.key, layer.kind, "x".join(map(str, layer.shape)),
          str(layer.size), f"{layer.laplace_scale:.3g}",
          f"{layer.threshold:.3g}", f"{layer.pruning_rate:.2%}",
          f"{layer.modelled_pruning_rate:.2%}", f"{layer.step:.3g}",
          str(layer.bits), f"{layer.modelled_error:.3g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"{self.strategy}/{self.step_stats}: {len(self.layers)} kernels, "
        f"{self.total_weights} weights, pruned {self.realised_pruning_rate:.2%} "
        f"(target {self.target_pruning_rate:.2%}), weight-bits ratio "
        f"{self.weight_bits_ratio:.2f}x"
        + (f", FP32: {', '.join(self.skipped)}" if self.skipped else ""))
    return "\n".join(lines)


@dataclasses.dataclass
class _Kernel:
  name: str
  weight: str
  kind: str
  values: np.ndarray
  bits: int
  min_kept: float = 0.0

  def __post_init__(self):
    self.magnitudes = np.abs(self.values).ravel()
    self.scale = float(self.magnitudes.mean(dtype=np.float64))
    # The most weights min_kept allows to prune, and the threshold that prunes
    # exactly that many (everything if min_kept is 0).
    self.max_pruned = int(math.floor((1.0 - self.min_kept) * self.size + 1e-9))
    self.threshold_cap = _threshold_pruning(self.magnitudes, self.max_pruned)

  @property
  def key(self) -> str:
    return f"{self.name}/{self.weight}"

  @property
  def size(self) -> int:
    return self.magnitudes.size

  def channel_scales(self) -> np.ndarray:
    """Mean |w| per output channel (depthwise kernels: the last two axes)."""
    shape = self.values.shape
    channels = (int(np.prod(shape[-2:])) if self.weight == "depthwise_kernel"
                and len(shape) >= 2 else shape[-1] if shape else 1)
    magnitudes = self.magnitudes.reshape(-1, channels)
    return magnitudes.mean(axis=0, dtype=np.float64)

  def pruned_count(self, threshold: float) -> int:
    return int(np.count_nonzero(self.magnitudes < threshold))


def allocate(
    model_or_kernels: Any,
    pruning_rate: float,
    bits: int,
    strategy: str = "opq",
    step_stats: str = "channel",
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> CompressionPlan:
  """Solves every kernel's pruning threshold and quantization step in one shot.

  Args:
    model_or_kernels: a tf_keras model (its Conv2D, DepthwiseConv2D,
      SeparableConv2D, Dense and Conv1D kernels, plus registered layers), or a
      mapping from name (optionally "layer/weight") to a kernel array.
    pruning_rate: p in [0, 1), the fraction of all compressed weights pruned.
    bits: B in 2..8, the default bit-width of every kernel.
    strategy: "opq", "uniform" or "global_magnitude" (module docstring).
    step_stats: "channel" (unified channel-wise step) or "layer".
    overrides: per layer name or "layer/weight" key, a dict of `skip` (leave
      FP32), `bits` (2..8) and `min_kept` (the least fraction kept, in [0, 1]).

  Returns:
    The CompressionPlan, with realised pruning rates on the given weights.

  Raises:
    ValueError / TypeError: on bad input, naming the problem and the fix.
  """
  _check_pruning_rate(pruning_rate)
  _check_bits(bits, "bits")
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown strategy {strategy!r}; use one of {STRATEGIES}.")
  if step_stats not in STEP_STATS:
    raise ValueError(
        f"Unknown step_stats {step_stats!r}; use one of {STEP_STATS}.")
  named = _named_kernels(model_or_kernels)
  kernels, skipped = _apply_overrides(named, overrides or {}, bits)
  if not kernels:
    raise ValueError(
        "Every compressible kernel was skipped by the overrides; leave at "
        "least one layer to compress.")

  if strategy == "opq":
    thresholds = _opq_thresholds(kernels, pruning_rate)
  elif strategy == "uniform":
    thresholds = [
        _threshold_pruning(k.magnitudes, round(pruning_rate * k.size))
        for k in kernels
    ]
  else:
    everything = np.concatenate([k.magnitudes for k in kernels])
    global_threshold = _threshold_pruning(
        everything, round(pruning_rate * everything.size))
    thresholds = [global_threshold] * len(kernels)
  thresholds = [min(t, k.threshold_cap) for t, k in zip(thresholds, kernels)]

  layers = [
      _plan_layer(kernel, threshold, step_stats)
      for kernel, threshold in zip(kernels, thresholds)
  ]
  _warn_about_emptied_kernels(layers)
  return CompressionPlan(strategy, step_stats, float(pruning_rate), int(bits),
                         layers, skipped)


def _warn_about_emptied_kernels(layers: list[LayerPlan]) -> None:
  """Warns when a kernel keeps under 1% of its weights: its layer is nearly cut.

  That can be the optimum (a layer with a much smaller scale than the rest),
  or a sign that its weights have lighter tails than the Laplace model assumes
  (e.g. barely trained from a uniform initialisation), so that the global rate
  empties it. Either way the user should know, and can bound it.
  """
  for layer in layers:
    if layer.kept < max(1, 0.01 * layer.size):
      warnings.warn(
          f"{layer.key} keeps {layer.kept} of {layer.size} weights "
          f"({layer.pruning_rate:.2%} pruned), which nearly cuts its layer "
          "off; if that is not wanted, bound it with "
          f"overrides={{'{layer.name}': {{'min_kept': 0.05}}}}.",
          stacklevel=3)


def _check_pruning_rate(pruning_rate: Any) -> None:
  if isinstance(pruning_rate, bool) or not isinstance(
      pruning_rate, (int, float, np.integer, np.floating)):
    raise TypeError(
        f"pruning_rate must be a number in [0, 1), got {pruning_rate!r}.")
  if not 0.0 <= float(pruning_rate) < 1.0:
    raise ValueError(
        f"pruning_rate must be in [0, 1), got {pruning_rate}: it is the "
        "fraction of weights pruned, e.g. 0.9 keeps one weight in ten.")


def _check_bits(bits: Any, what: str) -> None:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f"{what} must be an integer in 2..8, got {bits!r}.")
  if not 2 <= bits <= 8:
    raise ValueError(
        f"{what} must be in 2..8, got {bits}: OPQ's grid needs at least the "
        "levels -1, 0, +1 (2 bits); above 8 bits use ordinary FP32 or int8.")


def _named_kernels(model_or_kernels: Any) -> list[tuple[str, str, str, np.ndarray]]:
  """(layer name, weight, kind, values) for each compressible kernel."""
  if isinstance(model_or_kernels, collections.abc.Mapping):
    items = []
    for key, value in model_or_kernels.items():
      kind = "array"
      if isinstance(value, tuple):
        kind, value = value
      name, _, weight = str(key).rpartition("/")
      items.append((name, weight, kind, value) if name
                   else (weight, "kernel", kind, value))
  elif hasattr(model_or_kernels, "layers"):
    from opq_tf import layers  # pylint: disable=g-import-not-at-top

    items = [(key.rpartition("/")[0], key.rpartition("/")[2], kind, value)
             for key, (kind, value)
             in layers.compressible_kernels(model_or_kernels).items()]
  else:
    raise TypeError(
        "allocate() takes a tf_keras model or a mapping name -> kernel array, "
        f"got {type(model_or_kernels).__name__}.")
  if not items:
    raise ValueError(
        "The model has no compressible layer (Conv2D, DepthwiseConv2D, "
        "SeparableConv2D, Dense, Conv1D). Register your own layer types with "
        "opq_tf.register_layer, or compress a model that has such layers.")
  named = []
  for name, weight, kind, value in items:
    array = np.asarray(value, dtype=np.float32)
    if array.size == 0:
      raise ValueError(f"Kernel {name}/{weight} is empty; skip it in overrides.")
    if not np.all(np.isfinite(array)):
      raise ValueError(
          f"Kernel {name}/{weight} contains NaN or Inf; fix the pre-trained "
          "weights (e.g. restore an earlier checkpoint) before compressing.")
    if not np.any(array):
      raise ValueError(
          f"Kernel {name}/{weight} is all zeros, so it has no weight "
          "distribution to fit; load the pre-trained weights first, or skip "
          f"it with overrides={{'{name}': {{'skip': True}}}}.")
    named.append((name, weight, kind, array))
  return named


def _apply_overrides(
    named: list[tuple[str, str, str, np.ndarray]],
    overrides: Mapping[str, Mapping[str, Any]],
    bits: int,
) -> tuple[list[_Kernel], list[str]]:
  known = {name for name, *_ in named} | {f"{n}/{w}" for n, w, *_ in named}
  for target, options in overrides.items():
    if target not in known:
      raise ValueError(
          f"overrides names {target!r}, which is not a compressible layer of "
          f"this model; use one of: {', '.join(sorted(known))}.")
    unknown = set(options) - set(_OVERRIDE_OPTIONS)
    if unknown:
      raise ValueError(
          f"Unknown override option(s) {sorted(unknown)} for {target!r}; the "
          f"options are {_OVERRIDE_OPTIONS}.")
    if "bits" in options:
      _check_bits(options["bits"], f"overrides[{target!r}]['bits']")
    min_kept = options.get("min_kept", 0.0)
    if not 0.0 <= min_kept <= 1.0:
      raise ValueError(
          f"overrides[{target!r}]['min_kept'] must be in [0, 1], got {min_kept}.")
  kernels, skipped = [], []
  for name, weight, kind, values in named:
    options = {**overrides.get(name, {}), **overrides.get(f"{name}/{weight}", {})}
    if options.get("skip", False):
      skipped.append(f"{name}/{weight}")
      continue
    kernels.append(_Kernel(name, weight, kind, values,
                           int(options.get("bits", bits)),
                           float(options.get("min_kept", 0.0))))
  return kernels, skipped


def _threshold_pruning(magnitudes: np.ndarray, count: int) -> float:
  """The threshold t with exactly `count` magnitudes below it (barring ties)."""
  count = int(min(max(count, 0), magnitudes.size))
  if count == 0:
    return 0.0
  if count == magnitudes.size:
    return float(np.nextafter(magnitudes.max(), np.inf))
  return float(np.partition(magnitudes, count)[count])


def _opq_thresholds(kernels: list[_Kernel], pruning_rate: float) -> list[float]:
  """Thresholds on the Lagrangian optimum whose realised global rate is p.

  Every t_i(μ) = b_i · t'(μ / b_i²) is non-decreasing in μ, so the realised
  pruned count is too, and a 1-D search on log μ meets the target count.
  """
  tables = [laplace.unit_table(k.bits) for k in kernels]
  scales = np.array([k.scale for k in kernels])
  total = sum(k.size for k in kernels)
  target = round(pruning_rate * total)

  def thresholds_at(log_mu: float) -> list[float]:
    return [
        min(scale * float(table.solve(np.exp(log_mu) / scale**2)[0]),
            kernel.threshold_cap)
        for kernel, table, scale in zip(kernels, tables, scales)
    ]

  def pruned_at(log_mu: float) -> int:
    return sum(k.pruned_count(t) for k, t in zip(kernels, thresholds_at(log_mu)))

  # The Laplace model's own answer is a close first guess: solve it (cheap,
  # no data), then correct on the realised counts by regula falsi in log μ.
  sizes = np.array([k.size for k in kernels], dtype=np.float64)

  def modelled_pruned_at(log_mu: float) -> float:
    unit_thresholds = [
        float(table.solve(np.exp(log_mu) / scale**2)[0])
        for table, scale in zip(tables, scales)
    ]
    return float(sizes @ laplace.unit_pruned_fraction(unit_thresholds))

  low = min(math.log(t.multipliers[0] * s**2) for t, s in zip(tables, scales))
  high = max(math.log(t.multipliers[-1] * s**2) for t, s in zip(tables, scales))
  low, high = low - 1.0, high + 1.0
  for _ in range(60):
    middle = (low + high) / 2.0
    low, high = ((middle, high) if modelled_pruned_at(middle) < target
                 else (low, middle))
  guess = (low + high) / 2.0

  tolerance = max(1, total // 20000)  # 0.005% of the weights
  low, high = guess - 0.25, guess + 0.25
  gap_low, gap_high = pruned_at(low) - target, pruned_at(high) - target
  while gap_low > 0 and low > guess - 64:
    low -= 2.0 * (guess - low)
    gap_low = pruned_at(low) - target
  while gap_high < 0 and high < guess + 64:
    high += 2.0 * (high - guess)
    gap_high = pruned_at(high) - target
  best_log_mu, best_gap = (low, gap_low) if -gap_low < gap_high else (high, gap_high)
  for iteration in range(100):
    if abs(best_gap) <= tolerance or gap_high == gap_low:
      break
    # Alternate interpolation (fast on smooth counts) with bisection (safe).
    middle = (low - gap_low * (high - low) / (gap_high - gap_low)
              if iteration % 2 == 0 else (low + high) / 2.0)
    gap = pruned_at(middle) - target
    if abs(gap) < abs(best_gap):
      best_log_mu, best_gap = middle, gap
    if gap < 0:
      low, gap_low = middle, gap
    else:
      high, gap_high = middle, gap
  return thresholds_at(best_log_mu)


def _plan_layer(kernel: _Kernel, threshold: float, step_stats: str) -> LayerPlan:
  scale, bits = kernel.scale, kernel.bits
  unit_threshold = threshold / scale
  layer_step = scale * float(laplace.optimal_unit_step(unit_threshold, bits))
  if step_stats == "layer":
    step = layer_step
    modelled_error = scale**2 * float(
        laplace.unit_error(unit_threshold, step / scale, bits))
    modelled_pruned = float(laplace.unit_pruned_fraction(unit_threshold))
  else:
    channel_scales = kernel.channel_scales()
    live = channel_scales[channel_scales > 0]

    def channel_error(step: np.ndarray) -> np.ndarray:
      step = np.asarray(step, dtype=np.float64)[..., None]
      errors = laplace.unit_error(threshold / live, step / live, bits)
      return np.sum(live**2 * errors, axis=-1)

    step = float(laplace.minimise_step(
        _grouped_channel_error(live, threshold, bits),
        layer_step / 8.0, layer_step * 8.0))
    modelled_error = float(channel_error(step)) / channel_scales.size
    modelled_pruned = float(
        (np.sum(laplace.unit_pruned_fraction(threshold / live))
         + (channel_scales.size - live.size)) / channel_scales.size)
  pruned = kernel.pruned_count(threshold)
  return LayerPlan(
      name=kernel.name,
      weight=kernel.weight,
      kind=kernel.kind,
      shape=tuple(int(d) for d in kernel.values.shape),
      size=kernel.size,
      laplace_scale=scale,
      threshold=float(threshold),
      pruning_rate=pruned / kernel.size,
      modelled_pruning_rate=modelled_pruned,
      step=step,
      bits=bits,
      modelled_error=modelled_error,
      kept=kernel.size - pruned,
  )


def _grouped_channel_error(scales: np.ndarray, threshold: float, bits: int):
  """Σ_j b_j² e(t/b_j, Δ/b_j) as a function of Δ, with channels grouped.

  The per-channel error is smooth in b_j, so channels whose scales agree to
  within ~1% are summed as one group of their count: wide layers (2048
  channels) then cost as little as narrow ones, and the optimal step moves by
  far less than the search's own tolerance.
  """
  log_scales = np.log(scales)
  edges = np.linspace(log_scales.min(), log_scales.max() + 1e-9,
                      min(scales.size, 1 + int(np.ptp(log_scales) / 0.01)) + 1)
  group = np.clip(np.searchsorted(edges, log_scales, side="right") - 1, 0,
                  edges.size - 2)
  counts = np.bincount(group, minlength=edges.size - 1)
  sums = np.bincount(group, weights=log_scales, minlength=edges.size - 1)
  used = counts > 0
  counts, group_scales = counts[used], np.exp(sums[used] / counts[used])

  def error(step: np.ndarray) -> np.ndarray:
    step = np.asarray(step, dtype=np.float64)[..., None]
    errors = laplace.unit_error(threshold / group_scales, step / group_scales, bits)
    return np.sum(counts * group_scales**2 * errors, axis=-1)

  return error
