"""The Laplace error model behind OPQ's one-shot allocation (method doc, B.1-B.4).

A layer's weights are modelled as zero-mean Laplace with scale b = mean|w|. Its
weights are pruned below a magnitude threshold t and the rest are quantized to
a symmetric grid of step Δ with K = 2^(B-1) - 1 levels each side:

    ŵ = 0                                 if |w| < t
    ŵ = Δ · clip(round(w / Δ), -K, K)     otherwise

Everything scales with b: e(t, Δ; b) = b² · e(t/b, Δ/b; 1). So the whole model
reduces to the *unit problem* on u = |w|/b ~ Exp(1), which this module solves
once per bit-width; every layer then reads its answer off the unit table.

Closed form. With G(u; m) = -e^{-u} ((u-m)² + 2(u-m) + 2), an antiderivative of
(u-m)² e^{-u},

    e(t, Δ) = ∫_0^t u² e^{-u} du + Σ_{k=0..K} ∫_{bin k ∩ [t, ∞)} (u - kΔ)² e^{-u} du

where bin k = [(k-½)Δ, (k+½)Δ) and the last bin K extends to infinity (clipping).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from opq_tf.core import grid

_UNIT_THRESHOLDS = np.linspace(0.0, 12.0, 3001)  # P(|w|<t) up to 1 - 6e-6
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


def _antiderivative(u: np.ndarray, centre: np.ndarray) -> np.ndarray:
  d = u - centre
  return -np.exp(-u) * (d * d + 2.0 * d + 2.0)


def unit_error(threshold, step, bits: int) -> np.ndarray:
  """E[(u - û)²] for u = |w|/b ~ Exp(1); broadcasts `threshold` and `step`.

  Args:
    threshold: pruning threshold t/b (>= 0).
    step: quantization step Δ/b (> 0).
    bits: B in 2..8.

  Returns:
    The expected squared error per weight, in units of b².
  """
  threshold = np.asarray(threshold, dtype=np.float64)[..., None]
  step = np.asarray(step, dtype=np.float64)[..., None]
  k = np.arange(grid.max_code(bits) + 1, dtype=np.float64)
  centre = k * step
  lower = np.maximum((k - 0.5) * step, threshold)
  last = k == k[-1]
  upper = np.maximum(np.where(last, 0.0, (k + 0.5) * step), lower)
  upper_term = np.where(last, 0.0, _antiderivative(upper, centre))
  kept = np.sum(upper_term - _antiderivative(lower, centre), axis=-1)
  t = threshold[..., 0]
  pruned = 2.0 - np.exp(-t) * (t * t + 2.0 * t + 2.0)
  return pruned + kept


def unit_pruned_fraction(threshold) -> np.ndarray:
  """P(|w| < t) under the Laplace model, with t in units of b."""
  return -np.expm1(-np.asarray(threshold, dtype=np.float64))


def minimise_log(error_fn: Callable[[np.ndarray], np.ndarray],
                 log_lower: np.ndarray, log_upper: np.ndarray, points: int,
                 iterations: int) -> tuple[np.ndarray, np.ndarray]:
  """Minimises independent 1-D problems in x, a log-step, all at once.

  Both of OPQ's step searches, the Laplace model's (`minimise_step`) and the
  fit to actual weights (allocation's "weights" step fit), run this one
  search: an error measured on few weights is rough in the step, so a scan
  of `points` evenly spaced x in [log_lower, log_upper] first finds the basin
  of the global minimum (a second local minimum cannot trap the search), then
  `iterations` golden-section steps refine it between the best point's two
  neighbours. The grid is extended by one point past each end, so a minimum
  at the edge of the range is still refined rather than pinned to it.

  Args:
    error_fn: maps an array of x, one per problem (the broadcast shape of
      `log_lower` and `log_upper`), to their errors, same shape. It is called
      once per scan point and once per golden-section step, each call for
      every problem together.
    log_lower, log_upper: the scanned range of each problem's x.
    points: the scan's size (>= 2).
    iterations: golden-section steps; each shrinks the bracket by 0.618.

  Returns:
    (scan_best, refined): each problem's best scan point and the centre of
    its final bracket. Callers that measure the error more finely than
    `error_fn` can choose between them.
  """
  log_lower, log_upper = np.broadcast_arrays(
      np.asarray(log_lower, dtype=np.float64),
      np.asarray(log_upper, dtype=np.float64))
  fractions = np.linspace(0.0, 1.0, points)
  candidates = (log_lower[..., None]
                + fractions * (log_upper - log_lower)[..., None])
  errors = np.stack([error_fn(candidates[..., i]) for i in range(points)], -1)
  best = np.argmin(errors, axis=-1)
  spacing = candidates[..., 1] - candidates[..., 0]
  extended = np.concatenate([(candidates[..., 0] - spacing)[..., None],
                             candidates,
                             (candidates[..., -1] + spacing)[..., None]], -1)
  scan_best = np.take_along_axis(candidates, best[..., None], -1)[..., 0]
  a = np.take_along_axis(extended, best[..., None], -1)[..., 0]
  b = np.take_along_axis(extended, best[..., None] + 2, -1)[..., 0]
  c = b - _GOLDEN * (b - a)
  d = a + _GOLDEN * (b - a)
  error_c, error_d = error_fn(c), error_fn(d)
  for _ in range(iterations):
    left = error_c < error_d
    b = np.where(left, d, b)
    a = np.where(left, a, c)
    probe = np.where(left, b - _GOLDEN * (b - a), a + _GOLDEN * (b - a))
    error_probe = error_fn(probe)
    c, d = np.where(left, probe, d), np.where(left, c, probe)
    error_c, error_d = (np.where(left, error_probe, error_d),
                        np.where(left, error_c, error_probe))
  return scan_best, (a + b) / 2.0


def minimise_step(error_fn: Callable[[np.ndarray], np.ndarray], lower, upper,
                  iterations: int = 48, points: int = 33) -> np.ndarray:
  """`minimise_log` of error_fn(step) for steps in about [lower, upper].

  `error_fn(step)` maps an array of steps to an array of errors of the same
  shape (one independent 1-D problem per element). Returns the refined steps.
  """
  _, refined = minimise_log(lambda x: error_fn(np.exp(x)), np.log(lower),
                            np.log(upper), points, iterations)
  return np.exp(refined)


@dataclasses.dataclass(frozen=True)
class UnitTable:
  """The unit problem's solution for one bit-width, indexed by the multiplier.

  For a layer of scale b and global Lagrange multiplier μ, the layer solves
  min_t' E(t') - λ·P(t') with λ = μ / b², E(t') = min_Δ' e(t', Δ'). The
  optimal t' for every λ lies on the lower convex hull of (P, E); `multipliers`
  are the hull's mid-slopes, increasing, and `thresholds`/`steps` the matching
  unit threshold and step, so a layer's answer is one interpolation.
  """

  bits: int
  multipliers: np.ndarray
  thresholds: np.ndarray
  steps: np.ndarray

  def solve(self, multiplier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit (threshold, step) minimising e - λ·P, interpolated in log λ."""
    log_multiplier = np.log(np.maximum(multiplier, 1e-300))
    log_table = np.log(self.multipliers)
    threshold = np.interp(log_multiplier, log_table, self.thresholds)
    step = np.interp(log_multiplier, log_table, self.steps)
    return threshold, step


def optimal_unit_step(threshold, bits: int) -> np.ndarray:
  """argmin_Δ' e(t', Δ') for each unit threshold t'."""
  threshold = np.asarray(threshold, dtype=np.float64)
  # The grid must reach past the threshold (ternary B=2 puts Δ near t) and down
  # to fine 8-bit steps; the range is in units of b.
  lower = np.full_like(threshold, 1e-3)
  upper = np.maximum(threshold, 1.0) * 4.0 + 4.0
  return minimise_step(lambda s: unit_error(threshold, s, bits), lower, upper)


@functools.lru_cache(maxsize=None)
def _unit_steps(bits: int) -> np.ndarray:
  """optimal_unit_step on the table's threshold grid, once per process."""
  return optimal_unit_step(_UNIT_THRESHOLDS, bits)


def optimal_unit_step_table(threshold, bits: int) -> np.ndarray:
  """optimal_unit_step read off the cached grid (linear interpolation).

  The optimal step is smooth in t' and the grid is 0.004 apart, so this
  agrees with the search to ~1e-5 relative, at the cost of one np.interp:
  "channel" granularity needs one step per output channel, 26k of them in
  ResNet-50. Beyond the grid (t' > 12: nearly every weight of the channel is
  pruned, but real weights can have a few that are not) it searches.
  """
  threshold = np.asarray(threshold, dtype=np.float64)
  steps = np.interp(threshold, _UNIT_THRESHOLDS, _unit_steps(bits))
  beyond = threshold > _UNIT_THRESHOLDS[-1]
  if np.any(beyond):
    steps[beyond] = optimal_unit_step(threshold[beyond], bits)
  return steps


@functools.lru_cache(maxsize=None)
def unit_table(bits: int) -> UnitTable:
  """Solves the unit problem for `bits` once per process (tens of ms)."""
  grid.check_bits(bits)
  thresholds = _UNIT_THRESHOLDS
  steps = _unit_steps(bits)
  errors = unit_error(thresholds, steps, bits)
  pruned = unit_pruned_fraction(thresholds)
  hull = _lower_convex_hull(pruned, errors)
  slopes = np.diff(errors[hull]) / np.diff(pruned[hull])
  # Vertex j is optimal for λ between the slopes on either side of it.
  slopes = np.maximum.accumulate(np.maximum(slopes, 1e-12))
  inner = np.sqrt(slopes[:-1] * slopes[1:])
  multipliers = np.concatenate([[slopes[0] / 2.0], inner, [slopes[-1] * 2.0]])
  multipliers = np.maximum.accumulate(multipliers)
  multipliers = multipliers + np.arange(multipliers.size) * 1e-15
  return UnitTable(bits, multipliers, thresholds[hull], steps[hull])


def _lower_convex_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Indices of the lower convex hull of points sorted by increasing x."""
  hull: list[int] = []
  for i in range(x.size):
    while len(hull) >= 2:
      i0, i1 = hull[-2], hull[-1]
      cross = (x[i1] - x[i0]) * (y[i] - y[i0]) - (y[i1] - y[i0]) * (x[i] - x[i0])
      if cross > 0:
        break
      hull.pop()
    hull.append(i)
  return np.asarray(hull)
