"""Tests of opq_tf.allocate: the constraint, the optimum, strategies, bad input."""

import itertools
import json
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import opq_tf
from opq_tf import laplace


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


class AllocateTest(parameterized.TestCase):

  @parameterized.product(
      pruning_rate=[0.0, 0.3, 0.5, 0.8, 0.9, 0.97],
      bits=[2, 4, 8],
      strategy=["opq", "uniform", "global_magnitude"],
  )
  def test_realised_global_rate_equals_target(self, pruning_rate, bits, strategy):
    plan = opq_tf.allocate(_kernels(), pruning_rate, bits, strategy=strategy)
    self.assertAlmostEqual(plan.realised_pruning_rate, pruning_rate, delta=1e-3)
    kernels = _kernels()
    for layer in plan.layers:
      magnitudes = np.abs(kernels[layer.key].astype(np.float32))
      self.assertEqual(layer.kept, np.count_nonzero(magnitudes >= layer.threshold))

  @parameterized.parameters(0.5, 0.8, 0.9, 0.97)
  def test_opq_is_a_true_optimum(self, pruning_rate):
    # Moving pruned weights from any layer to any other at a fixed total must
    # not lower the modelled error Σ n_i e_i (the KKT condition, checked with
    # finite moves rather than derivatives).
    plan = opq_tf.allocate(_kernels(), pruning_rate, 4, step_stats="layer")
    layers = plan.layers
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
        strategy: opq_tf.allocate(_kernels(), pruning_rate, 3, strategy=strategy,
                                  step_stats="layer").modelled_error
        for strategy in ("opq", "uniform", "global_magnitude")
    }
    self.assertLessEqual(errors["opq"], errors["uniform"])
    self.assertLessEqual(errors["opq"], errors["global_magnitude"] * (1 + 1e-3))

  def test_uniform_prunes_every_layer_alike(self):
    plan = opq_tf.allocate(_kernels(), 0.7, 4, strategy="uniform")
    for layer in plan.layers:
      self.assertAlmostEqual(layer.pruning_rate, 0.7, delta=1.0 / layer.size)

  def test_global_magnitude_shares_one_threshold(self):
    plan = opq_tf.allocate(_kernels(), 0.7, 4, strategy="global_magnitude")
    self.assertLen({layer.threshold for layer in plan.layers}, 1)

  def test_opq_thresholds_follow_quantization_noise(self):
    # B.4: t_i² ≈ μ' + Δ_i²/12, so thresholds differ between layers, unlike
    # global magnitude pruning, and layers with larger steps prune deeper.
    plan = opq_tf.allocate(_kernels(), 0.8, 3, step_stats="layer")
    self.assertGreater(len({round(l.threshold, 6) for l in plan.layers}), 1)

  def test_channel_step_beats_layer_step_on_the_channel_model(self):
    rng = np.random.default_rng(3)
    scales = np.geomspace(0.005, 0.2, 64)
    kernel = {"conv/kernel": rng.laplace(size=(3, 3, 16, 64)) * scales}
    channel = opq_tf.allocate(kernel, 0.8, 4, step_stats="channel").layers[0]
    layer = opq_tf.allocate(kernel, 0.8, 4, step_stats="layer").layers[0]
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

  def test_depthwise_channels_are_the_last_two_axes(self):
    rng = np.random.default_rng(4)
    kernel = rng.laplace(size=(3, 3, 8, 2)) * np.array([0.01, 1.0])
    as_depthwise = opq_tf.allocate({"dw/depthwise_kernel": kernel}, 0.5, 4)
    as_kernel = opq_tf.allocate({"dw/kernel": kernel}, 0.5, 4)
    self.assertNotAlmostEqual(as_depthwise.layers[0].step,
                              as_kernel.layers[0].step, delta=1e-6)


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

  def test_unknown_strategy(self):
    with self.assertRaisesRegex(ValueError, "Unknown strategy"):
      opq_tf.allocate(_kernels(), 0.5, 4, strategy="random")

  def test_all_zero_kernel(self):
    with self.assertRaisesRegex(ValueError, "all zeros.*skip"):
      opq_tf.allocate({"a/kernel": np.zeros((4, 4))}, 0.5, 4)

  def test_not_a_model(self):
    with self.assertRaisesRegex(TypeError, "tf_keras model or a mapping"):
      opq_tf.allocate([np.ones(3)], 0.5, 4)


class PlanTest(absltest.TestCase):

  def test_json_round_trip(self):
    plan = opq_tf.allocate(_kernels(), 0.8, 3, overrides={"conv1": {"skip": True}})
    text = plan.to_json()
    self.assertEqual(opq_tf.CompressionPlan.from_json(text), plan)
    self.assertAlmostEqual(json.loads(text)["totals"]["weight_bits_ratio"],
                           plan.weight_bits_ratio)

  def test_weight_bits_ratio(self):
    plan = opq_tf.allocate({"a/kernel": np.arange(1, 1001.0)}, 0.75, 4,
                           strategy="uniform")
    self.assertEqual(plan.kept_weights, 250)
    self.assertAlmostEqual(plan.weight_bits_ratio, 32 * 1000 / (250 * 4 + 32))

  def test_table_names_every_layer_and_the_totals(self):
    plan = opq_tf.allocate(_kernels(), 0.8, 3)
    table = plan.table()
    for key in _kernels():
      self.assertIn(key, table)
    self.assertIn("weight-bits ratio", table)

  def test_old_format_is_refused(self):
    data = json.loads(opq_tf.allocate(_kernels(), 0.8, 3).to_json())
    data["format_version"] = 0
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
