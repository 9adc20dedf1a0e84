"""Tests of opq_tf.allocate: the constraint, the optimum, strategies, bad input."""

import dataclasses
import itertools
import json
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import opq_tf
from opq_tf.core import laplace


def _kernels(seed=0):
  """Kernels of different sizes and scales; one Gaussian, so not all Laplace."""
  rng = np.random.default_rng(seed)
  return {
      "conv1/kernel": rng.laplace(scale=0.1, size=(3, 3, 3, 32)),
      "conv2/kernel": rng.laplace(scale=0.02, size=(3, 3, 32, 64)),
      "depthwise/depthwise_kernel": rng.laplace(scale=0.2, size=(3, 3, 64, 1)),
      "pointwise/kernel": rng.normal(scale=0.03, size=(1, 1, 64, 128)),
      "dense/kernel": rng.laplace(scale=0.05, size=(128, 10)),
  }


def _layer_error(scale, pruned_fraction, bits):
  """Modelled per-weight error of a layer at a pruned fraction, best step."""
  threshold = -np.log1p(-pruned_fraction)
  step = laplace.optimal_unit_step(threshold, bits)
  return scale**2 * float(laplace.unit_error(threshold, step, bits))


def _reference_fit(values, threshold, start, bits):
  """The "weights" step fit as first written, densely and step by step.

  Every channel's sampled rows (every n-th of at most 512, pruned weights as
  zeros, plus the channel's largest weight) are scanned at 25 log-spaced
  factors in [1/4, 4], golden section runs 12 steps between the best point's
  neighbours, and the model's, the scan's and the refined step compete on all
  kept weights. `values` is (weights per channel, channels).
  """
  max_code = 2**(bits - 1) - 1
  channels = values.shape[1]
  kept = np.where(np.abs(values) >= threshold, values, np.float32(0))
  stride = -(-kept.shape[0] // 512)
  sample = np.concatenate([kept[::stride], kept[
      np.argmax(np.abs(kept), axis=0), np.arange(channels)][None]])

  def error(log_factor, weights=sample):
    scale = (start * np.exp(log_factor)).astype(np.float32)
    codes = np.clip(np.round(weights / scale), -max_code, max_code)
    return np.sum(np.square(weights - codes * scale), axis=0, dtype=np.float64)

  factors = np.linspace(-np.log(4.0), np.log(4.0), 25)
  best = factors[np.argmin([error(np.full(channels, f)) for f in factors], 0)]
  spacing = factors[1] - factors[0]
  low, high = best - spacing, best + spacing
  golden = (np.sqrt(5.0) - 1.0) / 2.0
  c, d = high - golden * (high - low), low + golden * (high - low)
  error_c, error_d = error(c), error(d)
  for _ in range(12):
    left = error_c < error_d
    low, high = np.where(left, low, c), np.where(left, d, high)
    c, d = (np.where(left, high - golden * (high - low), d),
            np.where(left, c, low + golden * (high - low)))
    error_probe = error(np.where(left, c, d))
    error_c, error_d = (np.where(left, error_probe, error_d),
                        np.where(left, error_c, error_probe))
  candidates = np.stack([np.zeros(channels), best, (low + high) / 2.0])
  errors = np.stack([error(f, kept) for f in candidates])
  return start * np.exp(candidates[np.argmin(errors, 0), np.arange(channels)])


class AllocateTest(parameterized.TestCase):

  @parameterized.product(
      pruning_rate=[0.0, 0.3, 0.5, 0.8, 0.9, 0.97],
      bits=[2, 4, 8],
      method=["opq", "uniform", "global_magnitude"],
  )
  def test_realised_global_rate_equals_target(self, pruning_rate, bits, method):
    plan = opq_tf.allocate(_kernels(), pruning_rate, bits, method=method)
    self.assertAlmostEqual(plan.realised_pruning_rate, pruning_rate, delta=1e-3)
    kernels = _kernels()
    for layer in plan.kernels:
      magnitudes = np.abs(kernels[layer.key].astype(np.float32))
      self.assertEqual(layer.kept, np.count_nonzero(magnitudes >= layer.threshold))
      # A float32 threshold: float32 (apply) and float64 comparisons agree.
      self.assertEqual(float(np.float32(layer.threshold)), layer.threshold)

  @parameterized.parameters(0.5, 0.8, 0.9, 0.97)
  def test_opq_is_a_true_optimum(self, pruning_rate):
    # Moving pruned weights from any layer to any other at a fixed total must
    # not lower the modelled error Σ n_i e_i (the KKT condition, checked with
    # finite moves rather than derivatives).
    plan = opq_tf.allocate(_kernels(), pruning_rate, 4, objective="total",
                           step_granularity="kernel", step_stats="layer")
    layers = plan.kernels
    for a, b in itertools.permutations(range(len(layers)), 2):
      la, lb = layers[a], layers[b]
      before = (la.size * _layer_error(la.laplace_scale, la.modelled_pruning_rate, 4)
                + lb.size * _layer_error(lb.laplace_scale, lb.modelled_pruning_rate, 4))
      self.assertAlmostEqual(
          la.size * la.modelled_error + lb.size * lb.modelled_error, before,
          delta=1e-4 * before)
      moved = 0.01 * min(la.size, lb.size)
      pruned_a = la.modelled_pruning_rate + moved / la.size
      pruned_b = lb.modelled_pruning_rate - moved / lb.size
      if not (0.0 <= pruned_a < 1.0 and 0.0 <= pruned_b < 1.0):
        continue
      after = (la.size * _layer_error(la.laplace_scale, pruned_a, 4)
               + lb.size * _layer_error(lb.laplace_scale, pruned_b, 4))
      self.assertGreaterEqual(after, before * (1.0 - 1e-6),
                              f"moving {moved} weights {la.key} <- {lb.key}")

  @parameterized.parameters(0.5, 0.8, 0.95)
  def test_opq_models_less_error_than_the_baselines(self, pruning_rate):
    errors = {
        method: opq_tf.allocate(_kernels(), pruning_rate, 3, method=method,
                                objective="total", step_granularity="kernel",
                                step_stats="layer").modelled_error
        for method in ("opq", "uniform", "global_magnitude")
    }
    self.assertLessEqual(errors["opq"], errors["uniform"])
    self.assertLessEqual(errors["opq"], errors["global_magnitude"] * (1 + 1e-3))

  def test_uniform_prunes_every_layer_alike(self):
    plan = opq_tf.allocate(_kernels(), 0.7, 4, method="uniform")
    for layer in plan.kernels:
      self.assertAlmostEqual(layer.pruning_rate, 0.7, delta=1.0 / layer.size)

  def test_global_magnitude_shares_one_threshold(self):
    plan = opq_tf.allocate(_kernels(), 0.7, 4, method="global_magnitude")
    self.assertLen({layer.threshold for layer in plan.kernels}, 1)

  @parameterized.parameters("opq", "uniform", "global_magnitude")
  def test_total_objective_thresholds_follow_quantization_noise(self, method):
    # B.4's stationarity: pruning the weight at the threshold t_i trades its
    # quantization error (t_i - q(t_i))² for t_i², and at the optimum of
    # Σ n_i e_i that trade costs the same μ in every kernel:
    # t_i² - (t_i - q(t_i))² = μ (≈ μ' + Δ_i²/12 on average over the grid).
    # Holds for "opq" with the "total" objective, not for the other methods,
    # whose thresholds ignore the steps.
    plan = opq_tf.allocate(_kernels(), 0.8, 3, method=method,
                           objective="total", step_granularity="kernel",
                           step_stats="layer")
    trades = []
    for kernel in plan.kernels:
      t, step = kernel.threshold, kernel.step
      trades.append(t**2 - (t - step * np.clip(np.round(t / step), -3, 3))**2)
    spread = np.ptp(trades) / np.mean(trades)
    if method == "opq":
      self.assertLess(spread, 0.02)
    else:
      self.assertGreater(spread, 0.5)

  def test_per_kernel_objective_spares_small_kernels(self):
    # D.2: e_i'(t_i)/σ_i² = μ n_i P_i'(t_i). Two kernels of one scale:
    # "total" prunes both alike (global magnitude with a correction), while
    # "per_kernel" spares the small one (432 weights) and prunes the large
    # one (36,864) deeper.
    rng = np.random.default_rng(6)
    kernels = {"stem/kernel": rng.laplace(scale=0.05, size=(3, 3, 3, 16)),
               "body/kernel": rng.laplace(scale=0.05, size=(3, 3, 64, 64))}
    total = opq_tf.allocate(kernels, 0.8, 4, objective="total").by_key()
    per_kernel = opq_tf.allocate(kernels, 0.8, 4,
                                 objective="per_kernel").by_key()
    self.assertAlmostEqual(total["stem/kernel"].pruning_rate,
                           total["body/kernel"].pruning_rate, delta=0.05)
    self.assertLess(per_kernel["stem/kernel"].pruning_rate,
                    total["stem/kernel"].pruning_rate - 0.2)
    self.assertGreater(per_kernel["body/kernel"].pruning_rate,
                       total["body/kernel"].pruning_rate)

  @parameterized.parameters(0.5, 0.8)
  def test_per_kernel_objective_is_a_true_optimum(self, pruning_rate):
    # Moving pruned weights between two kernels at a fixed total must not
    # lower Σ e_i / σ_i² (modelled): the per-kernel objective's KKT check.
    plan = opq_tf.allocate(_kernels(), pruning_rate, 4, objective="per_kernel",
                           step_granularity="kernel", step_stats="layer")
    def relative(kernel, pruned):
      return _layer_error(kernel.laplace_scale, pruned, 4) / kernel.mean_square
    for la, lb in itertools.permutations(plan.kernels, 2):
      before = (relative(la, la.modelled_pruning_rate)
                + relative(lb, lb.modelled_pruning_rate))
      moved = 0.01 * min(la.size, lb.size)
      pruned_a = la.modelled_pruning_rate + moved / la.size
      pruned_b = lb.modelled_pruning_rate - moved / lb.size
      if not (0.0 <= pruned_a < 1.0 and 0.0 <= pruned_b < 1.0):
        continue
      after = relative(la, pruned_a) + relative(lb, pruned_b)
      # The unit table interpolates t'(λ) between hull vertices, which costs
      # up to ~0.05% of a pair's error with these small, unequal kernels.
      self.assertGreaterEqual(after, before * (1.0 - 1e-3),
                              f"moving {moved} weights {la.key} <- {lb.key}")

  def test_channel_granularity_gives_each_channel_its_own_optimum(self):
    rng = np.random.default_rng(3)
    scales = np.geomspace(0.005, 0.2, 64)
    kernel = {"conv/kernel": rng.laplace(size=(3, 3, 16, 64)) * scales}
    plan = opq_tf.allocate(kernel, 0.8, 4, step_granularity="channel",
                           step_fit="laplace")
    entry = plan.kernels[0]
    self.assertLen(entry.step, 64)
    self.assertEqual(entry.step_array().shape, (64,))
    b = np.abs(kernel["conv/kernel"]).reshape(-1, 64).mean(0)
    want = b * laplace.optimal_unit_step(entry.threshold / b, 4)
    np.testing.assert_allclose(entry.step, want, rtol=1e-4)  # table vs search
    shared = opq_tf.allocate(kernel, 0.8, 4, step_granularity="kernel",
                             step_fit="laplace")
    self.assertLess(entry.modelled_error, shared.kernels[0].modelled_error)
    # Every stored step costs 32 bits in the ratio.
    self.assertAlmostEqual(
        plan.weight_bits_ratio,
        32 * entry.size / (entry.kept * 4 + 32 * 64))

  def test_channel_step_beats_layer_step_on_the_channel_model(self):
    rng = np.random.default_rng(3)
    scales = np.geomspace(0.005, 0.2, 64)
    kernel = {"conv/kernel": rng.laplace(size=(3, 3, 16, 64)) * scales}
    channel = opq_tf.allocate(kernel, 0.8, 4, step_granularity="kernel",
                              step_stats="channel").kernels[0]
    layer = opq_tf.allocate(kernel, 0.8, 4, step_granularity="kernel",
                            step_stats="layer").kernels[0]
    self.assertEqual(channel.threshold, layer.threshold)
    self.assertNotAlmostEqual(channel.step, layer.step, delta=1e-3 * layer.step)

    def channel_model_error(step):
      b = np.abs(kernel["conv/kernel"]).reshape(-1, 64).mean(0)
      return np.mean(b**2 * laplace.unit_error(layer.threshold / b, step / b, 4))

    self.assertLess(channel_model_error(channel.step),
                    channel_model_error(layer.step))
    self.assertAlmostEqual(channel.modelled_error,
                           channel_model_error(channel.step),
                           delta=1e-6 * channel.modelled_error)

  @parameterized.parameters("kernel", "channel")
  def test_steps_fitted_to_the_weights_lower_their_actual_error(self,
                                                                granularity):
    # Gaussian channels have lighter tails than the Laplace model: the
    # model's step wastes levels on them, the fitted step is smaller and its
    # actual squared error over the kept weights is lower in every channel.
    rng = np.random.default_rng(7)
    values = rng.normal(size=(3, 3, 16, 8)) * np.geomspace(0.01, 0.1, 8)
    options = dict(step_granularity=granularity)
    model = opq_tf.allocate({"c/kernel": values}, 0.6, 4, step_fit="laplace",
                            **options).kernels[0]
    fitted = opq_tf.allocate({"c/kernel": values}, 0.6, 4, step_fit="weights",
                             **options).kernels[0]
    self.assertEqual(model.threshold, fitted.threshold)
    kept = np.abs(values) >= fitted.threshold

    def error(entry):
      step = entry.step_array().astype(np.float64)
      codes = np.clip(np.round(values / step), -7, 7)
      return np.sum(np.where(kept, values - codes * step, 0)**2,
                    axis=(0, 1, 2))

    if granularity == "channel":  # Each channel's own step is fitted.
      self.assertTrue(np.all(error(fitted) <= error(model) * (1 + 1e-9)))
    self.assertLess(np.sum(error(fitted)), 0.9 * np.sum(error(model)))
    self.assertLess(np.median(fitted.step), np.median(model.step))


  @parameterized.product(granularity=["kernel", "channel"], bits=[3, 4, 8])
  def test_fitted_steps_equal_the_reference_fit(self, granularity, bits):
    # The shared search (laplace.minimise_log), the pruned weights left out
    # and |w| for w must not move any fitted step: 1152 rows, so the sample
    # is every 3rd row; heavy and light tails, and a channel kept whole next
    # to one pruned away entirely.
    rng = np.random.default_rng(11)
    values = np.concatenate([rng.laplace(size=(3, 3, 128, 6)),
                             rng.normal(size=(3, 3, 128, 6)),
                             rng.standard_t(3, size=(3, 3, 128, 4))], -1)
    values *= np.geomspace(0.01, 0.2, 16)
    values[..., 0] *= 100.0
    values[..., 1] *= 1e-4
    values = values.astype(np.float32)
    options = dict(step_granularity=granularity)
    model = opq_tf.allocate({"c/kernel": values}, 0.7, bits,
                            step_fit="laplace", **options).kernels[0]
    fitted = opq_tf.allocate({"c/kernel": values}, 0.7, bits,
                             step_fit="weights", **options).kernels[0]
    channels = 16 if granularity == "channel" else 1
    reference = _reference_fit(values.reshape(-1, channels), model.threshold,
                               np.asarray(model.step, np.float64), bits)
    if granularity == "channel":  # float32 steps: bit for bit.
      self.assertEqual(fitted.step,
                       tuple(reference.astype(np.float32).tolist()))
      self.assertGreater(np.sum(np.not_equal(fitted.step, model.step)), 8)
    else:  # The float64 step may differ in its last bits (the scan's grid).
      np.testing.assert_allclose(fitted.step, reference[0], rtol=1e-14)

  @parameterized.parameters("kernel", "channel")
  def test_depthwise_channels_are_the_last_two_axes(self, granularity):
    # A depthwise kernel (3, 3, 8, 2) has 16 output channels (in x
    # multiplier): it must get exactly the steps of the same values laid out
    # as a plain kernel (9, 16) whose last axis holds those channels, and
    # not those of the plain reading (last axis only: 2 channels).
    rng = np.random.default_rng(4)
    kernel = rng.laplace(size=(3, 3, 8, 2)) * np.geomspace(
        0.01, 1.0, 16).reshape(8, 2)
    options = dict(method="uniform", step_granularity=granularity)
    as_depthwise = opq_tf.allocate({"dw/depthwise_kernel": kernel}, 0.5, 4,
                                   **options).kernels[0]
    as_plain = opq_tf.allocate({"dw/kernel": kernel.reshape(9, 16)}, 0.5, 4,
                               **options).kernels[0]
    wrong = opq_tf.allocate({"dw/kernel": kernel}, 0.5, 4,
                            **options).kernels[0]
    self.assertEqual(as_depthwise.threshold, as_plain.threshold)
    self.assertEqual(as_depthwise.step, as_plain.step)
    self.assertNotEqual(np.ravel(as_depthwise.step)[0], np.ravel(wrong.step)[0])
    if granularity == "channel":
      self.assertEqual(as_depthwise.step_array().shape, (8, 2))


class EmptiedKernelTest(absltest.TestCase):

  def test_warns_when_a_kernel_keeps_under_one_percent(self):
    # Uniform weights (no tails) in the largest kernel: meeting p = 0.98 on
    # them empties it, which the Laplace model alone would never do.
    rng = np.random.default_rng(5)
    kernels = {"small/kernel": rng.laplace(scale=0.1, size=(64, 64)),
               "large/kernel": rng.uniform(-0.05, 0.05, size=(512, 256))}
    with self.assertWarnsRegex(UserWarning, "large/kernel keeps .*min_kept"):
      plan = opq_tf.allocate(kernels, 0.98, 4)
    self.assertLess(plan.by_key()["large/kernel"].kept, 0.01 * 512 * 256)
    bounded = opq_tf.allocate(kernels, 0.98, 4,
                              overrides={"large": {"min_kept": 0.05}})
    self.assertGreaterEqual(bounded.by_key()["large/kernel"].kept,
                            0.05 * 512 * 256)

  def test_no_warning_when_every_kernel_keeps_enough(self):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      opq_tf.allocate(_kernels(), 0.8, 4)


class OverridesTest(absltest.TestCase):

  def test_skip_bits_and_min_kept(self):
    plan = opq_tf.allocate(
        _kernels(), 0.9, 4,
        overrides={"conv1": {"skip": True},
                   "dense/kernel": {"bits": 8, "min_kept": 0.5}})
    self.assertEqual(plan.skipped, ["conv1/kernel"])
    self.assertNotIn("conv1/kernel", plan.by_key())
    dense = plan.by_key()["dense/kernel"]
    self.assertEqual(dense.bits, 8)
    self.assertGreaterEqual(dense.kept, dense.size // 2)
    self.assertAlmostEqual(plan.realised_pruning_rate, 0.9, delta=1e-3)

  def test_unknown_layer_names_the_known_ones(self):
    with self.assertRaisesRegex(ValueError, "'nope'.*conv1"):
      opq_tf.allocate(_kernels(), 0.5, 4, overrides={"nope": {"skip": True}})

  def test_unknown_option(self):
    with self.assertRaisesRegex(ValueError, "Unknown override option"):
      opq_tf.allocate(_kernels(), 0.5, 4, overrides={"conv1": {"bitz": 3}})

  def test_everything_skipped(self):
    with self.assertRaisesRegex(ValueError, "at least one layer"):
      opq_tf.allocate({"a/kernel": np.ones(4)}, 0.5, 4,
                      overrides={"a": {"skip": True}})


class BadInputTest(parameterized.TestCase):

  @parameterized.parameters(-0.1, 1.0, 1.5, float("nan"))
  def test_pruning_rate_out_of_range(self, pruning_rate):
    with self.assertRaisesRegex(ValueError, r"pruning_rate must be in \[0, 1\)"):
      opq_tf.allocate(_kernels(), pruning_rate, 4)

  @parameterized.parameters(1, 9, 0, 32)
  def test_bits_out_of_range(self, bits):
    with self.assertRaisesRegex(ValueError, r"bits must be in 2..8"):
      opq_tf.allocate(_kernels(), 0.5, bits)

  @parameterized.parameters("0.5", None, True)
  def test_pruning_rate_not_a_number(self, pruning_rate):
    with self.assertRaisesRegex(TypeError, "pruning_rate must be a number"):
      opq_tf.allocate(_kernels(), pruning_rate, 4)

  def test_bits_not_an_integer(self):
    with self.assertRaisesRegex(TypeError, "bits must be an integer"):
      opq_tf.allocate(_kernels(), 0.5, 4.0)

  @parameterized.parameters(np.nan, np.inf, -np.inf)
  def test_non_finite_kernel(self, value):
    kernels = _kernels()
    kernels["conv2/kernel"][0, 0, 0, 0] = value
    with self.assertRaisesRegex(ValueError, "conv2/kernel contains NaN or Inf"):
      opq_tf.allocate(kernels, 0.5, 4)

  def test_no_compressible_layer(self):
    with self.assertRaisesRegex(ValueError, "no compressible layer.*register"):
      opq_tf.allocate({}, 0.5, 4)

  @parameterized.parameters(("method", "random"), ("objective", "sum"),
                            ("step_granularity", "tensor"),
                            ("step_stats", "global"),
                            ("step_fit", "model"))
  def test_unknown_choice(self, option, value):
    with self.assertRaisesRegex(ValueError, f"Unknown {option} '{value}'"):
      opq_tf.allocate(_kernels(), 0.5, 4, **{option: value})

  def test_old_strategy_keyword_names_method(self):
    with self.assertRaisesRegex(TypeError, "strategy=.*method="):
      opq_tf.allocate(_kernels(), 0.5, 4, strategy="uniform")

  def test_all_zero_kernel(self):
    with self.assertRaisesRegex(ValueError, "all zeros.*skip"):
      opq_tf.allocate({"a/kernel": np.zeros((4, 4))}, 0.5, 4)

  def test_not_a_model(self):
    with self.assertRaisesRegex(TypeError, "needs a Keras model"):
      opq_tf.allocate([np.ones(3)], 0.5, 4)


def _laplace_kernels(seed=0):
  """A network's worth of Laplace kernels: sizes from 1k to 64k weights.

  Under the per-kernel objective a Laplace kernel's relative error does not
  depend on its scale, so sizes are what should make the bits differ: a bit
  costs a large kernel more. A Lagrangian over discrete bits spends its
  budget closely only when there are many kernels, as in a real network.
  """
  rng = np.random.default_rng(seed)
  return {f"layer{i}/kernel": rng.laplace(scale=rng.uniform(0.01, 0.3),
                                          size=(1, 1, channels, 64))
                              .astype(np.float32)
          for i, channels in enumerate(rng.integers(16, 1024, size=16))}


class MixedBitsTest(parameterized.TestCase):

  @parameterized.product(average_bits=[3, 4, 6], pruning_rate=[0.3, 0.7])
  def test_spends_the_budget_and_models_less_error_than_uniform(
      self, average_bits, pruning_rate):
    mixed = opq_tf.allocate(_laplace_kernels(), pruning_rate, "mixed",
                            average_bits=average_bits)
    uniform = opq_tf.allocate(_laplace_kernels(), pruning_rate, average_bits)
    self.assertLessEqual(mixed.realised_average_bits, average_bits)
    self.assertGreaterEqual(mixed.weight_bits_ratio, uniform.weight_bits_ratio)
    self.assertLess(mixed.modelled_relative_error,
                    uniform.modelled_relative_error)
    self.assertGreater(len({k.bits for k in mixed.kernels}), 1)
    self.assertAlmostEqual(mixed.realised_pruning_rate, pruning_rate, places=3)

  def test_bits_stay_in_range_and_overrides_keep_theirs(self):
    plan = opq_tf.allocate(_laplace_kernels(), 0.5, "mixed", average_bits=4,
                           bits_range=(3, 6), overrides={"layer3": {"bits": 8}})
    bits = {k.key: k.bits for k in plan.kernels}
    self.assertEqual(bits.pop("layer3/kernel"), 8)
    self.assertTrue(all(3 <= b <= 6 for b in bits.values()), bits)
    self.assertLessEqual(plan.realised_average_bits, 4)

  def test_json_round_trip_and_table(self):
    plan = opq_tf.allocate(_laplace_kernels(), 0.5, "mixed", average_bits=4)
    self.assertEqual(opq_tf.CompressionPlan.from_json(plan.to_json()), plan)
    self.assertEqual((plan.bits, plan.average_bits), ("mixed", 4.0))
    self.assertIn("mixed bits", plan.table())

  @parameterized.parameters(
      ({}, "needs average_bits"),
      ({"average_bits": 9}, "needs average_bits"),
      ({"average_bits": 4, "bits_range": (6, 3)}, "lowest < highest"),
      ({"average_bits": 4, "method": "uniform"}, "method='opq'"))
  def test_bad_mixed_requests_name_the_fix(self, options, message):
    with self.assertRaisesRegex(ValueError, message):
      opq_tf.allocate(_laplace_kernels(), 0.5, "mixed", **options)

  def test_average_bits_without_mixed_is_refused(self):
    with self.assertRaisesRegex(ValueError, "pass bits='mixed'"):
      opq_tf.allocate(_laplace_kernels(), 0.5, 4, average_bits=4)


class PlanTest(absltest.TestCase):

  def test_json_round_trip(self):
    plan = opq_tf.allocate(_kernels(), 0.8, 3, overrides={"conv1": {"skip": True}})
    text = plan.to_json()
    self.assertEqual(opq_tf.CompressionPlan.from_json(text), plan)
    self.assertAlmostEqual(json.loads(text)["totals"]["weight_bits_ratio"],
                           plan.weight_bits_ratio)

  def test_weight_bits_ratio(self):
    plan = opq_tf.allocate({"a/kernel": np.arange(1, 1001.0)}, 0.75, 4,
                           method="uniform", step_granularity="kernel")
    self.assertEqual(plan.kept_weights, 250)
    self.assertAlmostEqual(plan.weight_bits_ratio, 32 * 1000 / (250 * 4 + 32))

  def test_table_names_every_layer_and_the_totals(self):
    plan = opq_tf.allocate(_kernels(), 0.8, 3)
    table = plan.table()
    for key in _kernels():
      self.assertIn(key, table)
    self.assertIn("weight-bits ratio", table)

  def test_fp32_weights_round_trip_and_print_and_old_plans_still_load(self):
    plan = dataclasses.replace(
        opq_tf.allocate(_kernels(), 0.8, 3),
        fp32={"up/kernel": "Conv2DTranspose is not a compressed kind"})
    self.assertEqual(opq_tf.CompressionPlan.from_json(plan.to_json()), plan)
    self.assertTrue(plan.table().endswith(
        "left FP32 (1):\n  up/kernel  Conv2DTranspose is not a compressed "
        "kind"))
    self.assertNotIn("left FP32", opq_tf.allocate(_kernels(), 0.8, 3).table())
    data = json.loads(plan.to_json())
    del data["fp32"]  # a plan.json written before the field existed
    self.assertEqual(opq_tf.CompressionPlan.from_json(json.dumps(data)).fp32,
                     {})

  def test_old_format_is_refused(self):
    data = json.loads(opq_tf.allocate(_kernels(), 0.8, 3).to_json())
    data["format_version"] = 1
    with self.assertRaisesRegex(ValueError, "recompute the plan"):
      opq_tf.CompressionPlan.from_json(json.dumps(data))

  def test_import_does_not_load_tensorflow(self):
    import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
    code = ("import sys, opq_tf; opq_tf.allocate({'a': [1.0, -2.0, 3.0]}, 0.3, 4);"
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    self.assertEqual(out.strip(), "False")


if __name__ == "__main__":
  absltest.main()
