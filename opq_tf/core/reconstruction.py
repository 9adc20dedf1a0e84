"""The reconstruction solver: kept weights fitted to a layer's output (NumPy).

A frontend gathers, for one compressed kernel, the sums of its layer's
calibration inputs X (compressed network) and Z (FP32 network) as
`Statistics`, lays the kernel out as rows W (groups, rows, D) and calls
`solve`: least squares with the mask, then error-feedback rounding onto the
grid (OBS / GPTQ / SparseGPT with a given mask; or AdaRound's learned
rounding from there, `rounding="learned"`), then the mean output error for
bias correction. Both frontends call the same code, so they agree on the
reconstructed codes up to the float sums of their statistics.
docs/method.md part D.6 gives the measurements behind every default.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Optional

import numpy as np

from opq_tf.core import grid

# 500 images: the measured setting (docs/method.md D.6). BatchNorm statistics
# settle within a few hundred images; reconstruction needs >= 4 samples per
# input weight, which 500 images give every convolution of ImageNet networks
# (one sample per output position) but not a classifier; cost is linear in it.
DEFAULT_MAX_IMAGES = 500
# A typical per-replica training batch: the batch statistics each BatchNorm
# normalises by during re-estimation are as noisy as in training, no more.
DEFAULT_BATCH_SIZE = 50
# Fraction of mean(diag(H)) added to H's diagonal. 5% is the measured setting;
# 1% overfitted 128 images.
DEFAULT_DAMPING = 0.05
# Below this many samples (rows of X) per input weight (columns of W), a kernel
# keeps plain rounding: the least-squares fit would follow the sample noise.
DEFAULT_MIN_SAMPLES_PER_WEIGHT = 4.0

# Learned rounding: measured settings (docs/method.md, "learned rounding").
DEFAULT_LEARNED_ITERATIONS = 500
DEFAULT_LEARNED_LEARNING_RATE = 0.1
DEFAULT_LEARNED_REGULARIZATION = 1.0
_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the rectified sigmoid

# How calibrate rounds each reconstructed kernel onto its grid: plain rounding
# (then only the bias is corrected), error feedback after the masked least
# squares (the default), or learned rounding from there.
ROUNDINGS = ("nearest", "error_feedback", "learned")
DEFAULT_ROUNDING = "error_feedback"

_BLOCK = 128  # columns per lazy-update block of the error feedback.
# A reconstructed kernel's latent weights lie within this many steps of their
# grid value: under half a step, so that the quantizer (float32 w / step)
# rounds each back to the same code.
_LATENT_REACH = 0.49
# Conjugate gradients for the masked least squares: far below the rounding
# error after a few dozen iterations, since damping bounds H's condition.
_CG_ITERATIONS = 100
_CG_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class KernelCalibration:
  """What calibrate did to one compressed kernel.

  `error_before` / `error_after`: relative output error
  ||(W - W_hat) X||^2 / ||W X||^2 of the layer on the calibration inputs X,
  with W the FP32 kernel and W_hat the compressed one, before and after
  reconstruction and bias correction (None when the kernel's layer kind is
  not reconstructed).
  """

  method: str  # "reconstructed" or "plain rounding"
  reason: str = ""  # why plain rounding
  samples_per_weight: Optional[float] = None
  error_before: Optional[float] = None
  error_after: Optional[float] = None
  bias_corrected: bool = False  # the layer's bias absorbed the mean error


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
  """`model.opq_calibration`: what the last `calibrate` call did."""

  images: int
  batchnorm_layers: tuple[str, ...]  # BatchNorm layers re-estimated
  kernels: dict[str, KernelCalibration]  # key -> summary; only if reconstruct

  def table(self) -> str:
    """One line per kernel: method, output error before -> after, reason."""
    lines = [f"{self.images} calibration images; BatchNorm re-estimated in "
             f"{len(self.batchnorm_layers)} layers"]
    for key, row in self.kernels.items():
      errors = ("" if row.error_before is None else
                f" {row.error_before:.4g} -> {row.error_after:.4g}"
                f" ({row.samples_per_weight:.1f} samples/weight)")
      reason = f" [{row.reason}]" if row.reason else ""
      bias = " + bias" if row.bias_corrected else ""
      lines.append(f"  {key:<40} {row.method}{bias}{errors}{reason}")
    return "\n".join(lines)


@dataclasses.dataclass
class Statistics:
  """Sums over the calibration samples of one layer, rows of W per group.

  X is the layer's input in the compressed network, Z its input in the FP32
  network (for a SeparableConv2D's pointwise kernel: the depthwise outputs of
  each), so that W Z is the FP32 output the compressed W_hat X should match.
  """

  samples: int
  hessian: np.ndarray  # X X^T, (groups, D, D)
  input_sum: np.ndarray  # sum of X, (groups, D)
  cross: np.ndarray  # Z X^T
  target_gram: np.ndarray  # Z Z^T
  target_sum: np.ndarray  # sum of Z

  def mean_error(self, weights: np.ndarray, compressed: np.ndarray
                 ) -> np.ndarray:
    """mean(W Z - W_hat X) over the samples, (groups, rows)."""
    return (np.einsum("grd,gd->gr", weights, self.target_sum)
            - np.einsum("grd,gd->gr", compressed, self.input_sum)) / self.samples

  def relative_error(self, weights: np.ndarray, compressed: np.ndarray,
                     bias_corrected: bool = False) -> float:
    """||W Z - W_hat X||^2 / ||W Z||^2 and, bias_corrected, with the mean
    error taken off every output (sum ||d - m||^2 = sum ||d||^2 - N ||m||^2)."""
    # sum over g, r of a[g, r] m[g] b[g, r]^T; matmuls, not a three-operand
    # einsum (ten times slower for a 768x768 kernel).
    quadratic = lambda a, m, b: float(np.sum((a @ m) * b))
    signal = quadratic(weights, self.target_gram, weights)
    error = (signal - 2 * quadratic(weights, self.cross, compressed)
             + quadratic(compressed, self.hessian, compressed))
    if bias_corrected:
      error -= self.samples * np.sum(self.mean_error(weights, compressed)**2)
    return float(max(error, 0.0) / signal) if signal > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class LearnedRounding:
  """`rounding="learned"` with its settings (`learned_rounding`'s).

  The loss is computed exactly from the layer's `Statistics`, so there is no
  batch of samples to choose: every iteration sees all calibration images.
  """

  iterations: int = DEFAULT_LEARNED_ITERATIONS
  learning_rate: float = DEFAULT_LEARNED_LEARNING_RATE  # Adam's, on alpha
  regularization: float = DEFAULT_LEARNED_REGULARIZATION  # lambda

  def __post_init__(self):
    if (isinstance(self.iterations, bool)
        or not isinstance(self.iterations, (int, np.integer))
        or self.iterations < 1):
      raise ValueError("LearnedRounding.iterations must be a positive "
                       f"integer, got {self.iterations!r}.")
    for name in ("learning_rate", "regularization"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not value > 0):
        raise ValueError(f"LearnedRounding.{name} must be > 0, got {value!r}.")


def check_rounding(rounding) -> "str | LearnedRounding":
  """`rounding` as `solve` takes it ("learned" -> `LearnedRounding()`), or a
  ValueError naming the choices."""
  if isinstance(rounding, LearnedRounding):
    return rounding
  if isinstance(rounding, str) and rounding in ROUNDINGS:
    return LearnedRounding() if rounding == "learned" else rounding
  raise ValueError(
      f"rounding must be one of {', '.join(map(repr, ROUNDINGS))} or an "
      f"opq_tf.core.reconstruction.LearnedRounding, got {rounding!r}.")


@dataclasses.dataclass(frozen=True)
class Solved:
  """What `solve` chose for one kernel: its grid values `rows` (to assign
  when `reconstructed`), `latent` values that round to the same codes (see
  `latent_value`), the mean output error the bias should absorb, and the
  kernel's summary row."""

  rows: np.ndarray
  latent: np.ndarray
  reconstructed: bool
  bias_shift: Optional[np.ndarray]
  summary: KernelCalibration


def solve(weights: np.ndarray, statistics: Statistics, mask: np.ndarray,
          step: np.ndarray, bits: int, damping: float,
          min_samples_per_weight: float, *, bias: bool,
          rounding: "str | LearnedRounding" = DEFAULT_ROUNDING) -> Solved:
  """Reconstructs rows W (groups, rows, D) on their grid from `statistics`.

  `rounding` (`ROUNDINGS`, or a `LearnedRounding`) says how:
  `error_feedback_rounding`, `learned_rounding`, or "nearest", which keeps
  plain rounding. Kernels with fewer than `min_samples_per_weight` samples
  per input weight, or whose fit does not lower the output error, keep plain
  rounding too; with `bias`, the mean output error is returned for the
  layer's bias either way.
  """
  rounding = check_rounding(rounding)
  samples_per_weight = statistics.samples / weights.shape[-1]
  rows = plain_rows = grid.compress(weights, step, bits, mask)
  latent = weights
  error_before = statistics.relative_error(weights, plain_rows)
  if rounding == "nearest":
    reason = 'rounding="nearest"'
  elif samples_per_weight < min_samples_per_weight:
    reason = (f"{samples_per_weight:.2f} samples per input weight < "
              f"{min_samples_per_weight:g}: more images (max_images) would "
              "reconstruct it")
  else:
    problem = _damped_problem(weights, statistics.hessian, statistics.cross,
                              damping)
    fitted, unrounded = _error_feedback(weights, *problem, mask, step, bits)
    if isinstance(rounding, LearnedRounding):
      fitted = _learned_from(fitted, unrounded, weights, statistics, problem,
                             mask, step, bits, **dataclasses.asdict(rounding))
    reason = ""
    if statistics.relative_error(weights, fitted) < error_before:
      rows = fitted
      latent = _within_reach(unrounded, rows, step, mask)
    else:
      reason = "reconstruction did not lower the output error"
  shift = statistics.mean_error(weights, rows) if bias else None
  summary = KernelCalibration(
      "plain rounding" if rows is plain_rows else "reconstructed", reason,
      samples_per_weight, error_before,
      statistics.relative_error(weights, rows, bias_corrected=bias),
      bias_corrected=bias)
  return Solved(rows, latent, rows is not plain_rows, shift, summary)


def _within_reach(unrounded: np.ndarray, rows: np.ndarray, step: np.ndarray,
                  mask: np.ndarray) -> np.ndarray:
  """The values each kept weight was rounded from, moved to within
  `_LATENT_REACH` steps of its grid value in `rows` (pruned: 0).

  Latent weights on their grid values leave finetuning no room: a gradient
  step of lr * g, far below a step, changes no code (one epoch at lr 5e-5 and
  5e-4 changed none on ImageNet MobileNet-V1 0.75). Kept at their
  pre-rounding values they give the same forward pass, and a weight the
  rounding left near the middle of two codes moves to the other when the
  gradient says so. Learned rounding's codes may lie one away from the
  value error feedback rounded: those start at the edge of their cell.
  """
  step = np.broadcast_to(np.asarray(step, np.float64), rows.shape)
  offset = np.divide(unrounded - rows, step, out=np.zeros(rows.shape),
                     where=step > 0)
  latent = rows + step * np.clip(offset, -_LATENT_REACH, _LATENT_REACH)
  return np.where(mask, latent, 0.0)


def latent_value(rows: np.ndarray, latent: np.ndarray, current: np.ndarray,
                 mask: np.ndarray, step: np.ndarray, bits: int, *,
                 wrapped: bool, key: str) -> np.ndarray:
  """What a reconstructed kernel's variable is assigned, float32: `Solved`'s
  `rows` and `latent` laid out as `current`, the variable's value now.

  A wrapped kernel's variable is the latent weight its quantizer rounds:
  it takes `latent` (pruned weights keep their values: the mask hides
  them). An unwrapped kernel is used as it is: it takes the grid values.
  Raises AssertionError if the value would not round to the solved codes,
  which no finetuning or export could then reproduce.
  """
  compressed = np.asarray(rows, np.float32)
  value = (np.where(mask, latent, current).astype(np.float32)
           if wrapped else compressed)
  if not np.array_equal(grid.compress(value, step, bits, mask), compressed):
    raise AssertionError(f"{key}: reconstructed kernel is off its grid.")
  return value


def error_feedback_rounding(weights: np.ndarray, hessian: np.ndarray,
                             cross: np.ndarray, mask: np.ndarray,
                             step: np.ndarray, bits: int,
                             damping: float) -> np.ndarray:
  """OBS rounding of rows W (groups, rows, D) with a fixed mask and grid.

  Minimises ||W Z - W_hat X||^2 + damping * ||W - W_hat||^2 (H = X X^T,
  cross = Z X^T; the damping, a fraction of mean(diag(H)), keeps W_hat near W
  where the samples say little). First the kept weights of every row move to
  their least-squares optimum with the pruned ones at zero
  (`masked_least_squares`): every kept weight compensates every pruned one.
  Fixing columns one at a time from W, as SparseGPT does with its own mask,
  lets a kept column fixed early compensate nothing pruned after it; measured
  on ImageNet MobileNet-V1 0.75, solving first raised top-1 after calibration
  by 2.4 and 1.8 points at (p, B) = (0.5, 8) and (0.656, 4). Then columns are
  fixed in order of decreasing diag(H) (GPTQ's act-order); fixing column j to
  its grid value q (0 where pruned) leaves the error (w_j - q) / U_jj, fed
  back to the unfixed columns through row j of U, the upper Cholesky factor
  of (H + damping)^-1 (GPTQ / SparseGPT), in lazy blocks. Returns the grid
  values, float32, same layout.
  """
  problem = _damped_problem(weights, hessian, cross, damping)
  return _error_feedback(weights, *problem, mask, step, bits)[0]


def _damped_problem(weights: np.ndarray, hessian: np.ndarray,
                    cross: np.ndarray, damping: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(H + damping, W cross + damping * W, diag(H)), float64: the quadratic
  V (H + damping) V^T - 2 V rhs^T that error feedback and learned rounding
  minimise per row V. An input that was always zero (H_jj = 0) gets H_jj = 1:
  any weight does there, and the damping keeps it at W."""
  hessian = np.array(hessian, np.float64)
  columns = np.arange(weights.shape[-1])
  diag = hessian[:, columns, columns]
  dead = diag <= 0
  damped = np.where(dead, 1.0, diag) + damping * np.mean(
      np.where(dead, 0.0, diag), axis=1, keepdims=True) + 1e-12
  hessian[:, columns, columns] = damped
  rhs = weights @ cross + weights * (damped - np.where(dead, 0.0, diag))[:, None]
  return hessian, rhs, diag


def _error_feedback(weights: np.ndarray, hessian: np.ndarray, rhs: np.ndarray,
                    diag: np.ndarray, mask: np.ndarray, step: np.ndarray,
                    bits: int) -> tuple[np.ndarray, np.ndarray]:
  """`error_feedback_rounding` on the damped problem (columns in order of
  decreasing diag(H)): (grid values, float32; the values each weight was
  rounded from, after the feedback before it)."""
  groups, rows, width = weights.shape
  weights = masked_least_squares(weights, rhs, hessian, mask)
  order = np.argsort(-diag, axis=1, kind="stable")
  take = lambda a: np.take_along_axis(a, order[:, None, :], axis=2)
  hessian = np.take_along_axis(take(hessian), order[:, :, None], axis=1)
  work, mask, step = take(weights).copy(), take(mask), take(step)
  inverse = np.linalg.inv(hessian)
  upper = np.swapaxes(np.linalg.cholesky((inverse + np.swapaxes(
      inverse, 1, 2)) / 2), 1, 2)
  result = np.zeros_like(work, dtype=np.float32)
  for start in range(0, width, _BLOCK):
    end = min(width, start + _BLOCK)
    errors = np.zeros((groups, rows, end - start))
    for j in range(start, end):
      column = grid.compress(work[:, :, j], step[:, :, j], bits, mask[:, :, j])
      result[:, :, j] = column
      error = (work[:, :, j] - column) / upper[:, None, j, j]
      work[:, :, j + 1:end] -= error[:, :, None] * upper[:, None, j, j + 1:end]
      errors[:, :, j - start] = error
    work[:, :, end:] -= errors @ upper[:, start:end, end:]
  unordered, unrounded = np.empty_like(result), np.empty_like(work)
  np.put_along_axis(unordered, order[:, None, :], result, axis=2)
  np.put_along_axis(unrounded, order[:, None, :], work, axis=2)
  return unordered, unrounded


def learned_rounding(weights: np.ndarray, statistics: Statistics,
                     mask: np.ndarray, step: np.ndarray, bits: int,
                     damping: float, *,
                     iterations: int = DEFAULT_LEARNED_ITERATIONS,
                     learning_rate: float = DEFAULT_LEARNED_LEARNING_RATE,
                     regularization: float = DEFAULT_LEARNED_REGULARIZATION
                     ) -> np.ndarray:
  """AdaRound (Nagel et al. 2020) of rows W (groups, rows, D), from error
  feedback.

  Each kept weight is W_hat = step * (floor(V0) + h(alpha)), with V0 / step
  the value error feedback rounded it from (`_error_feedback`), so that
  rounding h reproduces error feedback's grid value, and h the rectified
  sigmoid clip(sigmoid(alpha) * 1.2 - 0.1, 0, 1). Adam on alpha minimises,
  per row, the damped output error of `error_feedback_rounding` (exactly
  quadratic in W_hat: V (H + damping) V^T - 2 V rhs^T, one matmul per
  iteration on the statistics alone), divided by mean_j step_j^2 H_jj so
  that a code moved by one costs about 1 in every row, plus
  `regularization` * sum(1 - |2h - 1|^beta), which, after a warm-up of a
  fifth of the iterations, drives every h to 0 or 1 as beta is annealed
  from 20 to 2. Each h then rounds to 0 or 1: every kept weight ends on its
  grid (codes within +-K: floor(V0) is clipped to [-K, K-1]), pruned ones at
  zero. The result is kept only if its output error on the statistics is
  below error feedback's, which is returned otherwise. Float32 grid values,
  same layout.
  """
  problem = _damped_problem(weights, statistics.hessian, statistics.cross,
                            damping)
  start, unrounded = _error_feedback(weights, *problem, mask, step, bits)
  return _learned_from(start, unrounded, weights, statistics, problem, mask,
                       step, bits, iterations=iterations,
                       learning_rate=learning_rate,
                       regularization=regularization)


def _learned_from(start: np.ndarray, unrounded: np.ndarray,
                  weights: np.ndarray, statistics: Statistics,
                  problem: tuple[np.ndarray, np.ndarray, np.ndarray],
                  mask: np.ndarray, step: np.ndarray, bits: int, *,
                  iterations: int, learning_rate: float,
                  regularization: float) -> np.ndarray:
  """`learned_rounding` from error feedback's grid values `start` and the
  values it rounded them from."""
  hessian, rhs, _ = problem
  k = grid.max_code(bits)
  kept = np.asarray(mask, bool)
  step = np.broadcast_to(np.asarray(step, np.float64), weights.shape)
  scaled = np.divide(unrounded, step, out=np.zeros_like(unrounded),
                     where=kept)
  base = np.where(kept, np.clip(np.floor(scaled), -k, k - 1), 0.0)
  # h0: error feedback's choice (0 or 1), just inside (0, 1), where h's
  # gradient lives. (Starting from the fraction it rounded measured the same.)
  start_codes = grid.codes(start, step.astype(np.float32), bits, kept)
  fraction = np.clip(start_codes - base, 1e-3, 1 - 1e-3)
  alpha = -np.log((_ZETA - _GAMMA) / (fraction - _GAMMA) - 1.0)
  # A code moved by one changes row r's loss by about 2 step^2 H_jj: the
  # mean of step^2 H_jj over its kept weights is the unit of its loss.
  row_scale = np.sum(kept * step**2 * np.diagonal(hessian, axis1=1, axis2=2
                                                   )[:, None, :],
                     axis=-1, keepdims=True) / np.maximum(
                         np.sum(kept, axis=-1, keepdims=True), 1)
  row_scale = np.where(row_scale > 0, row_scale, 1.0)
  h = _rectified_sigmoid(_adam_on_rounding(
      alpha, kept * step, base, hessian, rhs, kept * step / row_scale, kept,
      iterations, learning_rate, regularization))[1]
  codes = np.where(kept, base + (h >= 0.5), 0).astype(np.int32)
  learned = grid.dequantize(codes, step.astype(np.float32))
  if (statistics.relative_error(weights, learned)
      < statistics.relative_error(weights, start)):
    return learned
  return start


def _rectified_sigmoid(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sigmoid(alpha), h = clip(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1))."""
  sigmoid = 1.0 / (1.0 + np.exp(-alpha))
  return sigmoid, np.clip(sigmoid * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _adam_on_rounding(alpha: np.ndarray, kept_step: np.ndarray,
                      base: np.ndarray, hessian: np.ndarray, rhs: np.ndarray,
                      gradient_scale: np.ndarray, kept: np.ndarray,
                      iterations: int, learning_rate: float,
                      regularization: float) -> np.ndarray:
  """`learned_rounding`'s optimisation: alpha after Adam (b1 0.9, b2 0.999)
  on the loss sum_r L_r(W_hat_r) / row_scale_r + lambda sum(1 - |2h - 1|^beta),
  with W_hat = kept * step * (base + h(alpha)), L_r the row's quadratic.

  Float32 (the loss's gradient 2 (W_hat H - rhs) needs no more: Adam
  normalises it), which halves the time of the one matmul and the
  elementwise steps of every iteration.
  """
  f32 = lambda a: np.asarray(a, np.float32)
  alpha, kept_step, hessian, rhs = map(f32, (alpha, kept_step, hessian, rhs))
  offset = kept_step * f32(base)
  gradient_scale = 2.0 * f32(gradient_scale)
  stretch = np.float32(_ZETA - _GAMMA)
  moment, second = np.zeros_like(alpha), np.zeros_like(alpha)
  warmup = int(0.2 * iterations)  # AdaRound's: no regulariser at first
  for iteration in range(iterations):
    sigmoid, h = _rectified_sigmoid(alpha)
    gradient = ((offset + kept_step * h) @ hessian - rhs) * gradient_scale
    if iteration >= warmup:  # beta annealed linearly from 20 to 2
      beta = 20.0 - 18.0 * (iteration - warmup) / max(1, iterations - warmup)
      centred = 2.0 * h - 1.0
      gradient -= np.float32(2.0 * regularization * beta) * np.copysign(
          np.abs(centred)**np.float32(beta - 1.0), centred)
    # dh/dalpha; zero where h is clipped at 0 or 1 and for pruned weights.
    raw = sigmoid * stretch + np.float32(_GAMMA)
    gradient *= stretch * sigmoid * (1.0 - sigmoid) * (
        kept & (raw > 0.0) & (raw < 1.0))
    moment = 0.9 * moment + 0.1 * gradient
    second = 0.999 * second + 0.001 * gradient**2
    rate = learning_rate * np.sqrt(1 - 0.999**(iteration + 1)) / (
        1 - 0.9**(iteration + 1))
    alpha -= np.float32(rate) * moment / (np.sqrt(second) + np.float32(1e-8))
  return alpha


def masked_least_squares(weights: np.ndarray, rhs: np.ndarray,
                          hessian: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per row: argmin over V, zero where pruned, of V H V^T - 2 V rhs^T.

  That is V_K = rhs_K H_KK^-1 on each row's kept set K, solved for all rows at
  once by Jacobi-preconditioned conjugate gradients from V = W * mask (each
  row has its own K, so a direct solve would factor one matrix per row: hours
  for ResNet-50's 3x3x512 convolutions). Every iteration is one (rows, D) x
  (D, D) product and lowers the objective; damping bounds H's condition.
  """
  kept = mask.astype(np.float64)
  solution = weights * kept
  residual = (rhs - solution @ hessian) * kept
  inverse_diag = 1.0 / np.diagonal(hessian, axis1=1, axis2=2)[:, None, :]
  preconditioned = residual * inverse_diag
  direction = preconditioned.copy()
  product = np.sum(residual * preconditioned, axis=-1, keepdims=True)
  tolerance = (_CG_TOLERANCE * np.linalg.norm(rhs * kept, axis=-1,
                                              keepdims=True))**2
  for _ in range(_CG_ITERATIONS):
    if np.all(np.sum(residual**2, axis=-1, keepdims=True) <= tolerance):
      break
    moved = (direction @ hessian) * kept
    curvature = np.sum(direction * moved, axis=-1, keepdims=True)
    alpha = np.divide(product, curvature, out=np.zeros_like(product),
                      where=curvature > 0)
    solution += alpha * direction
    residual -= alpha * moved
    preconditioned = residual * inverse_diag
    new_product = np.sum(residual * preconditioned, axis=-1, keepdims=True)
    beta = np.divide(new_product, product, out=np.zeros_like(product),
                     where=product > 0)
    direction = preconditioned + beta * direction
    product = new_product
  return solution


class Progress:
  """One stderr line per reconstructed kernel: `calibrate: 3/28 conv/kernel
  reconstructed in 1.2 s, ~30 s left`, as in the tf_keras frontend."""

  def __init__(self, total: int, verbose: bool):
    self.total, self.verbose = total, verbose
    self.count, self.started = 0, time.monotonic()
    self.last = self.started

  def done(self, key: str, method: str) -> None:
    now = time.monotonic()
    self.count += 1
    if self.verbose:
      left = (now - self.started) / self.count * (self.total - self.count)
      print(f"calibrate: {self.count}/{self.total} {key} {method} in "
            f"{now - self.last:.1f} s, ~{left:.0f} s left", file=sys.stderr,
            flush=True)
    self.last = now


def check_finite(values: np.ndarray, what: str) -> None:
  """Raises a ValueError naming `what` if `values` holds a NaN or an Inf."""
  if not np.all(np.isfinite(values)):
    raise ValueError(
        f"{what} holds NaN or Inf; the model's weights or the calibration "
        "data are broken there. Restore the weights (e.g. an earlier "
        "checkpoint) or fix the data, then compress or calibrate again.")
