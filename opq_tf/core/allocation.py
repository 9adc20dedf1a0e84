"""One-shot allocation of pruning thresholds and quantization steps (docs/method.md).

Pure NumPy: the allocation reads and tests without TensorFlow. Given the
pre-trained kernels, a global pruning rate p and a bit-width B, it returns a
`CompressionPlan` with one threshold and one step (or one step per output
channel) per kernel.

Methods (how the thresholds are chosen):
- "opq" (default): a Lagrange multiplier μ splits the constrained problem
  into independent per-kernel problems, each a scaled copy of the unit problem
  solved once in `laplace.unit_table`; μ is found by a 1-D search on the
  *realised* pruned count, so the global rate is met on the actual weights.
  The objective is either
  - "per_kernel" (default, method doc D.2): Σ_i e_i / σ_i², each kernel's
    relative error counted once whatever its size, or
  - "total" (the paper's reading, B.4): Σ_i n_i e_i, which on real weights
    behaves like global magnitude pruning;
  both subject to Σ_i #{|w_i| < t_i} = p·Σ_i n_i.
- "uniform": the same pruning rate p in every kernel.
- "global_magnitude": one magnitude threshold for all kernels.

Steps, for each kernel's threshold:
- step_granularity "channel" (default, D.4): one step per output channel,
  each the optimum for its channel's own Laplace scale; every stored step is
  counted as 32 bits in every ratio.
- step_granularity "kernel": the paper's single shared step, chosen from the
  kernel's Laplace fit (step_stats "layer") or as the unified channel-wise step
  (step_stats "channel", B.5) minimising the summed expected error of all
  output channels, each with its own Laplace scale.
The defaults were chosen by measurement on real ImageNet weights
(docs/benchmarks.md, benchmarks/pretrained.py).
"""

from __future__ import annotations

import collections.abc
from concurrent import futures
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union
import warnings

import numpy as np

from opq_tf.core import contract
from opq_tf.core import grid
from opq_tf.core import laplace

METHODS = ("opq", "uniform", "global_magnitude")
OBJECTIVES = ("per_kernel", "total")
STEP_GRANULARITIES = ("channel", "kernel")
STEP_STATS = ("channel", "layer")
STEP_FITS = ("weights", "laplace")
_FIT_ROWS = 512
_OVERRIDE_OPTIONS = ("skip", "bits", "min_kept")
_FORMAT_VERSION = 2
# A mixed plan bisects its modelled budget at most this many times, and
# stops once the realised average is within this fraction below the budget.
_BUDGET_ROUNDS = 8
_BISECTIONS = 44  # of log μ and log ν over [-690, 690]: to ~1e-10
_BUDGET_SLACK = 0.01


def _map(function, *iterables) -> list:
  """map() over kernels on one thread per core, results in order.

  Each kernel's work (|w|, its threshold count, its step fit) is NumPy on
  arrays of up to millions of weights, which releases the GIL: on 2 cores
  ResNet-50 allocates ~1.5x faster. Every result is computed exactly as it
  would be in sequence, so plans do not depend on the thread count.
  """
  with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    return list(pool.map(function, *iterables))

Step = Union[float, tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """The allocation of one kernel. Errors are expected squared error per weight.

  `step` is a float (kernel granularity) or a tuple of floats, one per output
  channel, in C order over `channel_axes` (channel granularity).
  `mean_square` is σ² = mean(w²), the scale of the per-kernel objective.
  `modelled_error` is the Laplace model's error at the model's own step (before
  a "weights" step fit refines it on the actual weights).
  """

  name: str
  weight: str
  kind: str
  shape: tuple[int, ...]
  size: int
  channel_axes: tuple[int, ...]
  laplace_scale: float
  mean_square: float
  threshold: float
  pruning_rate: float
  modelled_pruning_rate: float
  step: Step
  bits: int
  modelled_error: float
  kept: int

  @property
  def key(self) -> str:
    return f"{self.name}/{self.weight}"

  @property
  def step_count(self) -> int:
    """How many FP32 steps this kernel stores."""
    return len(self.step) if isinstance(self.step, tuple) else 1

  def step_array(self) -> np.ndarray:
    """The step as float32, shape () or the channel axes' shape."""
    return grid.step_array(self.step, self.shape, self.channel_axes)


@dataclasses.dataclass(frozen=True)
class CompressionPlan:
  """Per-kernel thresholds and steps, plus the request that produced them.

  `skipped`: kernels the overrides left FP32. `fp32`: kernel-like weights of
  layer kinds OPQ does not compress (a Conv2DTranspose) -> why, as
  `opq_tf.allocate(model, ...)` finds them (empty for a mapping of kernels,
  and in a plan.json written before the field existed).
  """

  method: str
  objective: str
  step_granularity: str
  step_stats: str
  step_fit: str
  target_pruning_rate: float
  bits: Union[int, str]  # B, or "mixed" (each kernel's own, `average_bits`)
  kernels: list[KernelPlan]
  skipped: list[str] = dataclasses.field(default_factory=list)
  average_bits: Optional[float] = None  # the budget of a "mixed" plan
  fp32: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def realised_average_bits(self) -> float:
    """Σ kept·B / Σ kept: the bits per kept weight the plan spends."""
    kept = max(self.kept_weights, 1)
    return sum(k.kept * k.bits for k in self.kernels) / kept

  @property
  def total_weights(self) -> int:
    return sum(kernel.size for kernel in self.kernels)

  @property
  def kept_weights(self) -> int:
    return sum(kernel.kept for kernel in self.kernels)

  @property
  def realised_pruning_rate(self) -> float:
    return 1.0 - self.kept_weights / self.total_weights

  @property
  def modelled_error(self) -> float:
    """Σ_i n_i e_i: the modelled total squared error ("total" objective)."""
    return sum(kernel.size * kernel.modelled_error for kernel in self.kernels)

  @property
  def modelled_relative_error(self) -> float:
    """Σ_i e_i / σ_i²: the "per_kernel" objective."""
    return sum(kernel.modelled_error / kernel.mean_square
               for kernel in self.kernels)

  @property
  def weight_bits_ratio(self) -> float:
    """32·Σn / Σ(kept·B + 32·steps): the papers' figure, every step counted."""
    return grid.weight_bits_ratio(
        [k.size for k in self.kernels], [k.kept for k in self.kernels],
        [k.bits for k in self.kernels], [k.step_count for k in self.kernels])

  def by_key(self) -> dict[str, KernelPlan]:
    return {kernel.key: kernel for kernel in self.kernels}

  def to_json(self) -> str:
    data = dataclasses.asdict(self)
    data["format_version"] = _FORMAT_VERSION
    data["totals"] = {
        "total_weights": self.total_weights,
        "kept_weights": self.kept_weights,
        "realised_pruning_rate": self.realised_pruning_rate,
        "weight_bits_ratio": self.weight_bits_ratio,
        "realised_average_bits": self.realised_average_bits,
        "modelled_error": self.modelled_error,
        "modelled_relative_error": self.modelled_relative_error,
    }
    return json.dumps(data, indent=1)

  @classmethod
  def from_json(cls, text: str) -> "CompressionPlan":
    data = json.loads(text)
    if data.get("format_version") != _FORMAT_VERSION:
      raise ValueError(
          f"Compression plan format {data.get('format_version')!r} is not "
          f"{_FORMAT_VERSION} (this opq_tf's); recompute the plan with "
          "opq_tf.allocate (e.g. delete the workdir's plan.json and rerun).")
    data.pop("format_version")
    data.pop("totals")
    kernels = [
        KernelPlan(**{
            **kernel,
            "shape": tuple(kernel["shape"]),
            "channel_axes": tuple(kernel["channel_axes"]),
            "step": (tuple(kernel["step"]) if isinstance(kernel["step"], list)
                     else kernel["step"]),
        })
        for kernel in data.pop("kernels")
    ]
    return cls(kernels=kernels, **data)

  def table(self) -> str:
    """A printable per-kernel table with totals."""
    header = ("kernel", "kind", "shape", "size", "b", "threshold", "pruned",
              "modelled", "step", "bits", "mse")
    rows = [header]
    for kernel in self.kernels:
      steps = np.atleast_1d(np.asarray(kernel.step))
      step = (f"{steps[0]:.3g}" if steps.size == 1 else
              f"{np.median(steps):.3g}~{steps.size}")
      rows.append((
          kernel.key, kernel.kind, "x".join(map(str, kernel.shape)),
          str(kernel.size), f"{kernel.laplace_scale:.3g}",
          f"{kernel.threshold:.3g}", f"{kernel.pruning_rate:.2%}",
          f"{kernel.modelled_pruning_rate:.2%}", step,
          str(kernel.bits), f"{kernel.modelled_error:.3g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    method = (f"opq/{self.objective}" if self.method == "opq" else self.method)
    lines.append(
        f"{method}, {self.step_granularity} steps: {len(self.kernels)} kernels, "
        f"{self.total_weights} weights, pruned {self.realised_pruning_rate:.2%} "
        f"(target {self.target_pruning_rate:.2%}), weight-bits ratio "
        f"{self.weight_bits_ratio:.2f}x"
        + (f", mixed bits {self.realised_average_bits:.2f} per kept weight "
           f"(budget {self.average_bits:g})" if self.bits == "mixed" else "")
        + (f", FP32: {', '.join(self.skipped)}" if self.skipped else "")
        + ("" if self.step_granularity == "kernel" else
           "; 'step' shows the median of the channel steps ~ their count"))
    if self.fp32:
      lines.append(f"left FP32 ({len(self.fp32)}):")
      width = max(len(key) for key in self.fp32)
      lines += [f"  {key.ljust(width)}  {reason}"
                for key, reason in self.fp32.items()]
    return "\n".join(lines)


@dataclasses.dataclass
class _Kernel:
  name: str
  weight: str
  kind: str
  values: np.ndarray
  channel_axes: tuple[int, ...]
  bits: Optional[int]  # None until a mixed plan chooses it
  min_kept: float = 0.0

  def __post_init__(self):
    self.magnitudes = np.abs(self.values).ravel()
    self.scale = float(self.magnitudes.mean(dtype=np.float64))
    self.mean_square = float(np.mean(np.square(self.magnitudes, dtype=np.float64)))
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

  def channel_magnitudes(self) -> np.ndarray:
    """|w| as (weights per channel, channels), channels in C order.

    A view of `magnitudes` when the channel axes are the trailing ones (as
    grid.OUTPUT_CHANNEL and grid.DEPTHWISE_CHANNELS are), so the per-channel
    passes need no second |w|.
    """
    channels = grid.channel_count(self.values.shape, self.channel_axes)
    magnitudes = np.moveaxis(
        self.magnitudes.reshape(self.values.shape),
        [axis % self.values.ndim for axis in self.channel_axes],
        range(self.values.ndim - len(self.channel_axes), self.values.ndim))
    return magnitudes.reshape(-1, channels)

  def channel_scales(self) -> np.ndarray:
    """Mean |w| per output channel, in C order over the channel axes."""
    return self.channel_magnitudes().mean(axis=0, dtype=np.float64)

  def pruned_count(self, threshold: float) -> int:
    return int(np.count_nonzero(self.magnitudes < threshold))


def allocate(
    model_or_kernels: Any,
    pruning_rate: float,
    bits: Union[int, str],
    method: str = "opq",
    *,
    average_bits: Optional[float] = None,
    bits_range: tuple[int, int] = (grid.MIN_BITS, grid.MAX_BITS),
    objective: str = "per_kernel",
    step_granularity: str = "channel",
    step_stats: str = "channel",
    step_fit: str = "weights",
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    **renamed: Any,
) -> CompressionPlan:
  """Solves every kernel's pruning threshold and quantization step in one shot.

  Args:
    model_or_kernels: a mapping from name (optionally "layer/weight") to a
      `contract.Kernel` (what a frontend reads off a model; `opq_tf.allocate`
      takes the model itself), a kernel array, a (kind, array) pair or a
      (kind, array, channel_axes) triple.
    pruning_rate: p in [0, 1), the fraction of all compressed weights pruned.
    bits: B in 2..8, the default bit-width of every kernel; or "mixed":
      each kernel chooses its own B in `bits_range` together with its
      threshold and step, from the same Lagrangian (method "opq" only),
      so that the kept weights average at most `average_bits` bits: the
      weight-bits ratio of the uniform plan at B = average_bits.
    average_bits: the budget of a "mixed" plan, in bits per kept weight.
    bits_range: the (lowest, highest) B a "mixed" kernel may choose.
    method: "opq", "uniform" or "global_magnitude" (module docstring).
    objective: "per_kernel" or "total" (method "opq" only).
    step_granularity: "channel" (one step per output channel) or "kernel".
    step_stats: for kernel granularity, "channel" (unified channel-wise step)
      or "layer".
    step_fit: "weights" (default): starting from the Laplace-optimal step,
      each step is refined to minimise the actual squared error of the kept
      weights it quantizes; "laplace": the Laplace model's step as it is.
    overrides: per layer name or "layer/weight" key, a dict of `skip` (leave
      FP32), `bits` (2..8) and `min_kept` (the least fraction kept, in [0, 1]).
    **renamed: refused with the new name (`strategy` is now `method`).

  Returns:
    The CompressionPlan, with realised pruning rates on the given weights.

  Raises:
    ValueError / TypeError: on bad input, naming the problem and the fix.
  """
  if "strategy" in renamed:
    raise TypeError(
        "allocate() no longer takes strategy=; the allocation method is "
        f"method= (e.g. method={renamed['strategy']!r}). 'strategy' now only "
        "means the tf.distribute strategy.")
  if renamed:
    raise TypeError(
        f"allocate() got unexpected keyword argument(s) {sorted(renamed)}.")
  _check_pruning_rate(pruning_rate)
  mixed = bits == "mixed"
  if mixed:
    candidates = _check_mixed(method, average_bits, bits_range)
  else:
    grid.check_bits(bits, "bits")
    if average_bits is not None:
      raise ValueError(
          f"average_bits={average_bits} is the budget of a mixed plan; pass "
          f"bits='mixed' with it, or leave it out for uniform bits={bits}.")
  for name, value, choices in (("method", method, METHODS),
                               ("objective", objective, OBJECTIVES),
                               ("step_granularity", step_granularity,
                                STEP_GRANULARITIES),
                               ("step_stats", step_stats, STEP_STATS),
                               ("step_fit", step_fit, STEP_FITS)):
    if value not in choices:
      raise ValueError(f"Unknown {name} {value!r}; use one of {choices}.")
  named = _named_kernels(model_or_kernels)
  kernels, skipped = _apply_overrides(named, overrides or {},
                                      None if mixed else bits)
  if not kernels:
    raise ValueError(
        "Every compressible kernel was skipped by the overrides; leave at "
        "least one layer to compress.")

  if mixed:
    thresholds = _mixed_thresholds(kernels, pruning_rate, objective,
                                   average_bits, candidates)
  elif method == "opq":
    thresholds = _opq_thresholds(kernels, pruning_rate, objective)
  elif method == "uniform":
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

  plans = _map(
      lambda kernel, threshold: _plan_kernel(kernel, threshold, step_granularity,
                                             step_stats, step_fit),
      kernels, thresholds)
  _warn_about_emptied_kernels(plans)
  return CompressionPlan(method, objective, step_granularity, step_stats,
                         step_fit,
                         float(pruning_rate), bits if mixed else int(bits),
                         plans, skipped,
                         float(average_bits) if mixed else None)


def _warn_about_emptied_kernels(kernels: list[KernelPlan]) -> None:
  """Warns when a kernel keeps under 1% of its weights: its layer is nearly cut.

  That can be the optimum (a layer with a much smaller scale than the rest),
  or a sign that its weights have lighter tails than the Laplace model assumes
  (e.g. barely trained from a uniform initialisation), so that the global rate
  empties it. Either way the user should know, and can bound it.
  """
  for kernel in kernels:
    if kernel.kept < max(1, 0.01 * kernel.size):
      warnings.warn(
          f"{kernel.key} keeps {kernel.kept} of {kernel.size} weights "
          f"({kernel.pruning_rate:.2%} pruned), which nearly cuts its layer "
          "off; if that is not wanted, bound it with "
          f"overrides={{'{kernel.name}': {{'min_kept': 0.05}}}}.",
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


def _named_kernels(model_or_kernels: Any) -> list[tuple]:
  """(layer name, weight, kind, values, channel axes) per compressible kernel."""
  if not isinstance(model_or_kernels, collections.abc.Mapping):
    raise TypeError(
        "allocate() takes a Keras model (through opq_tf.allocate) or a mapping "
        f"name -> kernel array, got {type(model_or_kernels).__name__}.")
  items = []
  for key, value in model_or_kernels.items():
    name, _, weight = str(key).rpartition("/")
    if not name:
      name, weight = weight, "kernel"
    kind, axes = "array", grid.default_channel_axes(weight)
    if isinstance(value, contract.Kernel):
      kind, value, axes = value
    elif isinstance(value, tuple) and len(value) == 3:
      kind, value, axes = value
    elif isinstance(value, tuple):
      kind, value = value
    items.append((name, weight, kind, value, tuple(axes)))
  if not items:
    raise ValueError(
        "The model has no compressible layer (Conv2D, DepthwiseConv2D, "
        "SeparableConv2D, Dense, Conv1D). Register your own layer types with "
        "opq_tf.register_layer, or compress a model that has such layers.")
  named = []
  for name, weight, kind, value, axes in items:
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
    # A kernel with fewer axes than its channel axes (e.g. a 1-D array) has
    # one channel per trailing axis it does have.
    axes = tuple(axes[len(axes) - min(len(axes), array.ndim):])
    named.append((name, weight, kind, array, axes))
  return named


def _apply_overrides(
    named: list[tuple],
    overrides: Mapping[str, Mapping[str, Any]],
    bits: Optional[int],
) -> tuple[list[_Kernel], list[str]]:
  """The kernels to compress (bits None where a mixed plan chooses them)."""
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
      grid.check_bits(options["bits"], f"overrides[{target!r}]['bits']")
    min_kept = options.get("min_kept", 0.0)
    if not 0.0 <= min_kept <= 1.0:
      raise ValueError(
          f"overrides[{target!r}]['min_kept'] must be in [0, 1], got {min_kept}.")
  kept, skipped = [], []
  for name, weight, kind, values, axes in named:
    options = {**overrides.get(name, {}), **overrides.get(f"{name}/{weight}", {})}
    if options.get("skip", False):
      skipped.append(f"{name}/{weight}")
      continue
    kept.append((name, weight, kind, values, axes,
                 options.get("bits", bits),
                 float(options.get("min_kept", 0.0))))
  return _map(lambda fields: _Kernel(*fields), kept), skipped


def _threshold_pruning(magnitudes: np.ndarray, count: int) -> float:
  """The threshold t with exactly `count` magnitudes below it (barring ties)."""
  count = int(min(max(count, 0), magnitudes.size))
  if count == 0:
    return 0.0
  if count == magnitudes.size:
    return float(np.nextafter(magnitudes.max(), np.inf))
  return float(np.partition(magnitudes, count)[count])


def _opq_thresholds(kernels: list[_Kernel], pruning_rate: float,
                    objective: str, bit_price: float = 0.0) -> list[float]:
  """Thresholds on the Lagrangian optimum whose realised global rate is p.

  Kernel i with Laplace scale b_i has error e_i(t, Δ) = b_i² e'(t/b_i, Δ/b_i)
  and pruned fraction P'(t/b_i), so its share of the Lagrangian is a scaled
  unit problem min e' - λ_i·P' with
    "total":      n_i e_i - μ n_i P_i          ->  λ_i = μ / b_i²,
    "per_kernel": e_i / σ_i² - μ n_i P_i       ->  λ_i = μ n_i σ_i² / b_i².
  Every t_i(μ) = b_i · t'(λ_i) is non-decreasing in μ, so the realised pruned
  count is too, and a 1-D search on log μ meets the target count. A mixed
  plan's price ν of a kept bit adds ν·w_i·B_i to λ_i (see _choose_bits);
  then μ may be negative, so the search runs on log(μ + ν·B_max).
  """
  tables = [laplace.unit_table(k.bits) for k in kernels]
  scales = np.array([k.scale for k in kernels])
  weights = _multiplier_weights(kernels, objective)
  bits = np.array([k.bits for k in kernels])
  offsets = bit_price * weights * (bits - bits.max())
  total = sum(k.size for k in kernels)
  target = round(pruning_rate * total)

  def thresholds_at(log_mu: float) -> list[float]:
    return [
        min(scale * float(table.solve(np.exp(log_mu) * weight + offset)[0]),
            kernel.threshold_cap)
        for kernel, table, scale, weight, offset
        in zip(kernels, tables, scales, weights, offsets)
    ]

  def pruned_at(log_mu: float) -> int:
    return sum(_map(_Kernel.pruned_count, kernels, thresholds_at(log_mu)))

  # The Laplace model's own answer is a close first guess: solve it (cheap,
  # no data), then correct on the realised counts by regula falsi in log μ.
  sizes = np.array([k.size for k in kernels], dtype=np.float64)

  def modelled_pruned_at(log_mu: float) -> float:
    unit_thresholds = [
        float(table.solve(np.exp(log_mu) * weight + offset)[0])
        for table, weight, offset in zip(tables, weights, offsets)
    ]
    return float(sizes @ laplace.unit_pruned_fraction(unit_thresholds))

  low = min(math.log(t.multipliers[0] / w) for t, w in zip(tables, weights))
  high = max(math.log((t.multipliers[-1] - o) / w)
             for t, w, o in zip(tables, weights, offsets))
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


def _multiplier_weights(kernels: list[_Kernel], objective: str) -> np.ndarray:
  """w_i with kernel i's unit multiplier λ_i = μ·w_i (see _opq_thresholds)."""
  scales = np.array([k.scale for k in kernels])
  if objective == "total":
    return 1.0 / scales**2
  return np.array([k.size * k.mean_square for k in kernels]) / scales**2


def _check_mixed(method: str, average_bits: Any,
                 bits_range: Sequence[int]) -> list[int]:
  """The candidate bit-widths of a mixed plan, or raises naming the fix."""
  if method != "opq":
    raise ValueError(
        f"bits='mixed' is chosen by OPQ's Lagrangian; method {method!r} has "
        "none. Use method='opq', or an integer bits.")
  low, high = (grid.check_bits(b, "bits_range") for b in bits_range)
  if low >= high:
    raise ValueError(f"bits_range must be (lowest, highest) with lowest < "
                     f"highest, got {tuple(bits_range)}.")
  if (isinstance(average_bits, bool)
      or not isinstance(average_bits, (int, float, np.number))
      or not low <= average_bits <= high):
    raise ValueError(
        f"bits='mixed' needs average_bits, the budget in bits per kept "
        f"weight, in bits_range {low}..{high}; got {average_bits!r} (e.g. "
        "average_bits=4 spends what a uniform 4-bit plan spends).")
  return list(range(low, high + 1))


def _choose_bits(kernels: list[_Kernel], pruning_rate: float, objective: str,
                 average_bits: float, candidates: list[int]) -> float:
  """Sets each unset kernel's B on the Laplace model; returns the bit price ν.

  A kept bit costs ν (in the objective's units), so kernel i's share of the
  Lagrangian, divided as in _opq_thresholds, becomes
    e'_B(t') - μ w_i P'(t') + ν w_i (1 - P'(t')) B
      = e'_B(t') - w_i (μ + ν B) P'(t') + ν w_i B:
  for each B the unit problem of `laplace.unit_table(B)` at the multiplier
  w_i (μ + ν B), and the kernel takes the B of least cost. μ meets the
  pruning target and ν the budget Σ n_i (1 - P'_i) B_i <= average_bits ·
  kept, both modelled. A kernel whose bits an override sets keeps them and
  spends from the same budget.
  """
  weights = _multiplier_weights(kernels, objective)
  sizes = np.array([k.size for k in kernels], dtype=np.float64)
  fixed = np.array([k.bits if k.bits is not None else 0 for k in kernels])
  options = np.array(sorted(set(candidates) | set(fixed[fixed > 0].tolist())))
  allowed = np.where(fixed == 0, np.isin(options, candidates)[:, None],
                     options[:, None] == fixed)
  # Every bit-width's hull (E', P' against log λ) in one table, each shifted
  # by its own offset, so that one np.interp reads all of them at once.
  tables = [laplace.unit_table(int(b)) for b in options]
  logs = [np.log(t.multipliers) for t in tables]
  span = (min(float(x[0]) for x in logs), max(float(x[-1]) for x in logs))
  offset = 2.0 * (span[1] - span[0]) + 1.0
  shifts = offset * np.arange(options.size)[:, None]
  lowest = np.array([x[0] for x in logs])[:, None]
  highest = np.array([x[-1] for x in logs])[:, None]
  log_table = np.concatenate([x + offset * i for i, x in enumerate(logs)])
  errors = np.concatenate([laplace.unit_error(t.thresholds, t.steps, t.bits)
                           for t in tables])
  fractions = np.concatenate([laplace.unit_pruned_fraction(t.thresholds)
                              for t in tables])
  columns = np.arange(len(kernels))

  def solve(log_mu: float, nu: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, P') per kernel at ν and μ = exp(log_mu) - ν·B_max (may be < 0)."""
    multiplier = weights * (math.exp(log_mu)
                            + nu * (options[:, None] - options.max()))
    at = np.clip(np.log(np.maximum(multiplier, 1e-300)), lowest,
                 highest) + shifts
    error = np.interp(at, log_table, errors)
    fraction = np.interp(at, log_table, fractions)
    costs = error - multiplier * fraction + nu * weights * options[:, None]
    choice = np.argmin(np.where(allowed, costs, np.inf), axis=0)
    return options[choice], fraction[choice, columns]

  # Past these, every kernel's multiplier is off its tables' ends.
  log_range = (span[0] - math.log(weights.max() * options.max()) - 2.0,
               span[1] - math.log(weights.min() * options.min()) + 2.0)
  target = pruning_rate * sizes.sum()
  budget = average_bits * (sizes.sum() - target)

  def log_mu_for(nu: float) -> float:
    low, high = log_range
    for _ in range(_BISECTIONS):
      middle = (low + high) / 2.0
      low, high = ((middle, high) if sizes @ solve(middle, nu)[1] < target
                   else (low, middle))
    return (low + high) / 2.0

  def spent(nu: float) -> float:
    bits, pruned = solve(log_mu_for(nu), nu)
    return float(sizes @ ((1.0 - pruned) * bits))

  nu = 0.0
  if spent(0.0) > budget:
    # Bits spent fall as ν grows: bisect log ν to the least ν within budget.
    low, high = log_range
    for _ in range(_BISECTIONS):
      middle = (low + high) / 2.0
      low, high = ((low, middle) if spent(math.exp(middle)) <= budget
                   else (middle, high))
    nu = math.exp(high)
  bits, _ = solve(log_mu_for(nu), nu)
  for kernel, chosen in zip(kernels, bits):
    kernel.bits = int(chosen)
  return nu


def _mixed_thresholds(kernels: list[_Kernel], pruning_rate: float,
                      objective: str, average_bits: float,
                      candidates: list[int]) -> list[float]:
  """Chooses every unset kernel's B, then its threshold on the realised counts.

  `_choose_bits` meets a budget on the Laplace model's kept counts; real
  kernels keep more or fewer weights than modelled (on ResNet-50 the realised
  average came out 7-9% over), and one large kernel changing B moves the
  average in a jump. So the modelled budget is bisected until the realised
  average is within `_BUDGET_SLACK` below `average_bits`, and the plan keeps
  the choice that spends most without exceeding it.
  """
  preset = [k.bits for k in kernels]

  def realise(modelled_budget: float) -> tuple[float, list[int], list[float]]:
    for kernel, bits in zip(kernels, preset):
      kernel.bits = bits
    price = _choose_bits(kernels, pruning_rate, objective, modelled_budget,
                         candidates)
    thresholds = _opq_thresholds(kernels, pruning_rate, objective, price)
    kept = [k.size - k.pruned_count(t) for k, t in zip(kernels, thresholds)]
    spent = sum(n * k.bits for n, k in zip(kept, kernels)) / max(sum(kept), 1)
    return spent, [k.bits for k in kernels], thresholds

  low, high = float(min(candidates)), float(average_bits)
  best = realise(high)
  if best[0] > average_bits:
    best = realise(low)
    for _ in range(_BUDGET_ROUNDS):
      if best[0] >= average_bits * (1 - _BUDGET_SLACK):
        break
      middle = (low + high) / 2.0
      trial = realise(middle)
      if trial[0] <= average_bits:
        low, best = middle, max(best, trial, key=lambda r: r[0])
      else:
        high = middle
  for kernel, bits in zip(kernels, best[1]):
    kernel.bits = bits
  return best[2]


def _plan_kernel(kernel: _Kernel, threshold: float, step_granularity: str,
                 step_stats: str, step_fit: str) -> KernelPlan:
  # The mask is |w| >= t on float32 weights. A float64 t between two float32
  # values would count differently in float64 (here) and float32 (NumPy's
  # comparison with a Python float, as in apply): t is made a float32 value.
  threshold = float(np.float32(threshold))
  scale, bits = kernel.scale, kernel.bits
  unit_threshold = threshold / scale
  channel_scales = kernel.channel_scales()
  live = channel_scales[channel_scales > 0]

  def kernel_step() -> float:
    # A scalar search (~3 ms): channel steps need it only for dead channels.
    return scale * float(laplace.optimal_unit_step(unit_threshold, bits))

  if step_granularity == "channel":
    # Each channel's own optimum for the kernel's threshold; a channel of
    # zeros (no scale) takes the kernel's step, which it never uses.
    steps = np.empty(channel_scales.shape)
    steps[channel_scales > 0] = live * laplace.optimal_unit_step_table(
        threshold / live, bits)
    if live.size < channel_scales.size:
      steps[channel_scales == 0] = kernel_step()
    step = tuple(steps.astype(np.float32).tolist())
    errors = live**2 * laplace.unit_error(threshold / live,
                                          steps[channel_scales > 0] / live, bits)
    modelled_error = float(np.sum(errors)) / channel_scales.size
  elif step_stats == "layer":
    step = kernel_step()
    modelled_error = scale**2 * float(
        laplace.unit_error(unit_threshold, step / scale, bits))
  else:
    around = kernel_step()
    step = float(laplace.minimise_step(
        _grouped_channel_error(live, threshold, bits), around / 8.0,
        around * 8.0))
    errors = live**2 * laplace.unit_error(threshold / live, step / live, bits)
    modelled_error = float(np.sum(errors)) / channel_scales.size
  if step_fit == "weights":
    step = _fit_to_weights(kernel, threshold, step, step_granularity)
  if step_granularity == "kernel" and step_stats == "layer":
    modelled_pruned = float(laplace.unit_pruned_fraction(unit_threshold))
  else:
    modelled_pruned = float(
        (np.sum(laplace.unit_pruned_fraction(threshold / live))
         + (channel_scales.size - live.size)) / channel_scales.size)
  pruned = kernel.pruned_count(threshold)
  return KernelPlan(
      name=kernel.name,
      weight=kernel.weight,
      kind=kernel.kind,
      shape=tuple(int(d) for d in kernel.values.shape),
      size=kernel.size,
      channel_axes=kernel.channel_axes,
      laplace_scale=scale,
      mean_square=kernel.mean_square,
      threshold=float(threshold),
      pruning_rate=pruned / kernel.size,
      modelled_pruning_rate=modelled_pruned,
      step=step,
      bits=bits,
      modelled_error=modelled_error,
      kept=kernel.size - pruned,
  )


def _fit_to_weights(kernel: _Kernel, threshold: float, step: Step,
                    step_granularity: str) -> Step:
  """Refines each step to minimise the squared error of its kept weights.

  The Laplace model's step is right for Laplace-shaped weights; real
  channels are often lighter- or heavier-tailed, and at B = 4 the model's step
  then clips or wastes levels (measured on ImageNet MobileNet-V1 at
  p = 0.656, B = 4: top-1 after BatchNorm re-estimation 24.4% with the model's
  channel steps, 39.0% with steps fitted to the weights). Each step is
  searched in [step/4, 4·step] by `laplace.minimise_log` (a log-spaced scan of
  25 points, then 12 golden-section steps), all channels at once, on a sample
  of each channel's kept weights; the model's, the scan's and the refined step
  are then compared on all kept weights, so the fit never does worse than the
  model on the weights themselves.
  """
  magnitudes = (kernel.channel_magnitudes() if step_granularity == "channel"
                else kernel.magnitudes[:, None])
  channels = magnitudes.shape[1]
  # The search reads at most _FIT_ROWS weights of each channel (every n-th,
  # plus each channel's largest, which sets the clipping): ResNet-50's 25M
  # weights would otherwise cost seconds. The quantization error is even in
  # w, so magnitudes stand for the weights.
  stride = max(1, -(-magnitudes.shape[0] // _FIT_ROWS))
  largest = magnitudes.max(axis=0)
  largest = np.where(largest >= threshold, largest, np.float32(0))
  sample = np.concatenate([_kept_first(magnitudes[::stride], threshold),
                           largest[None]])
  start = np.asarray(step, np.float64).reshape(channels)
  max_code = grid.max_code(kernel.bits)

  def scales(log_factor: np.ndarray) -> np.ndarray:
    return (start * np.exp(log_factor)).astype(np.float32)

  work = np.empty_like(sample)

  def sample_error(log_factor: np.ndarray) -> np.ndarray:
    _squared_error(sample, scales(log_factor), max_code, work)
    return np.sum(work, axis=0, dtype=np.float64)

  log_range = np.full(channels, np.log(4.0))
  scan_best, refined = laplace.minimise_log(
      sample_error, -log_range, log_range, points=25, iterations=12)
  # All kept weights, flattened: pruned ones add no error at any step. A
  # channel with nothing kept thus ties at zero and keeps the model's step.
  kept = np.flatnonzero(magnitudes >= threshold)
  kept_magnitudes = magnitudes.reshape(-1)[kept]
  kept_channels = kept % channels
  kept_work = np.empty_like(kept_magnitudes)

  def kept_error(log_factor: np.ndarray) -> np.ndarray:
    _squared_error(kept_magnitudes, scales(log_factor)[kept_channels],
                   max_code, kept_work)
    return np.bincount(kept_channels, kept_work, minlength=channels)

  candidates = np.stack([np.zeros(channels), scan_best, refined])
  errors = np.stack([kept_error(c) for c in candidates])
  fitted = start * np.exp(candidates[np.argmin(errors, axis=0),
                                     np.arange(channels)])
  if step_granularity == "channel":
    return tuple(fitted.astype(np.float32).tolist())
  return float(fitted[0])


def _squared_error(magnitudes: np.ndarray, scale: np.ndarray, max_code: int,
                   out: np.ndarray) -> np.ndarray:
  """(|w| - ŵ)² per weight, float32, for float32 steps `scale`, into `out`.

  In place: the search evaluates it ~40 times per kernel on arrays of up to
  a million weights, where fresh temporaries would double its cost.
  """
  np.divide(magnitudes, scale, out=out)
  np.rint(out, out=out)
  np.minimum(out, max_code, out=out)
  np.multiply(out, scale, out=out)
  np.subtract(magnitudes, out, out=out)
  return np.square(out, out=out)


def _kept_first(magnitudes: np.ndarray, threshold: float) -> np.ndarray:
  """Each column's magnitudes >= threshold, in order, on top of zero padding.

  Pruned weights add nothing to a channel's error, so dropping them (at
  p = 0.8, most of the rows) speeds the search's evaluations without
  changing any sum: each channel's kept weights are still added in order.
  """
  columns = magnitudes.T
  kept = columns >= threshold
  counts = np.count_nonzero(kept, axis=1)
  packed = np.zeros((columns.shape[0], counts.max(initial=0)), magnitudes.dtype)
  packed[np.arange(packed.shape[1]) < counts[:, None]] = columns[kept]
  return np.ascontiguousarray(packed.T)


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
