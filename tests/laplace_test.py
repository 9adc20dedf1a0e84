"""Tests of the closed-form Laplace error model against Monte-Carlo."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from opq_tf.core import grid
from opq_tf.core import laplace


def _monte_carlo_error(samples, threshold, step, bits):
  k = grid.max_code(bits)
  quantized = step * np.clip(np.round(samples / step), -k, k)
  compressed = np.where(np.abs(samples) < threshold, 0.0, quantized)
  return np.mean((samples - compressed) ** 2)


class UnitErrorTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.samples = np.random.default_rng(0).laplace(scale=1.0, size=8_000_000)

  @parameterized.product(
      bits=[2, 3, 4, 5, 6, 7, 8],
      threshold_and_step=[(0.0, 0.5), (0.5, 0.3), (1.0, 1.2), (2.0, 0.7),
                          (0.3, 0.08), (3.0, 3.5)],
  )
  def test_closed_form_matches_monte_carlo_within_2_percent(
      self, bits, threshold_and_step):
    threshold, step = threshold_and_step
    expected = _monte_carlo_error(self.samples, threshold, step, bits)
    self.assertAlmostEqual(
        float(laplace.unit_error(threshold, step, bits)) / expected, 1.0,
        delta=0.02)

  def test_scales_with_laplace_scale(self):
    samples = self.samples[:2_000_000] * 0.05
    expected = _monte_carlo_error(samples, 0.05 * 0.7, 0.05 * 0.4, 4)
    modelled = 0.05**2 * float(laplace.unit_error(0.7, 0.4, 4))
    self.assertAlmostEqual(modelled / expected, 1.0, delta=0.02)

  def test_everything_pruned_costs_the_second_moment(self):
    self.assertAlmostEqual(float(laplace.unit_error(60.0, 1.0, 4)), 2.0)

  def test_pruned_fraction(self):
    np.testing.assert_allclose(
        laplace.unit_pruned_fraction([0.0, 1.0]), [0.0, 1.0 - np.exp(-1.0)])


class OptimalStepTest(parameterized.TestCase):

  @parameterized.parameters(2, 4, 8)
  def test_step_is_a_minimum(self, bits):
    thresholds = np.array([0.0, 0.5, 2.0])
    steps = laplace.optimal_unit_step(thresholds, bits)
    best = laplace.unit_error(thresholds, steps, bits)
    for factor in (0.97, 1.03):
      self.assertTrue(np.all(
          laplace.unit_error(thresholds, steps * factor, bits) >= best))

  def test_ternary_step_is_the_conditional_mean(self):
    # With K = 1 every kept weight becomes ±Δ, so the best Δ for t > Δ/2 is
    # E[u | u > t] = t + 1 under Exp(1).
    np.testing.assert_allclose(
        laplace.optimal_unit_step(np.array([2.0, 4.0]), 2), [3.0, 5.0],
        rtol=1e-5)


class UnitTableTest(parameterized.TestCase):

  @parameterized.parameters(2, 3, 4, 8)
  def test_threshold_grows_with_the_multiplier(self, bits):
    table = laplace.unit_table(bits)
    thresholds, _ = table.solve(np.logspace(-6, 3, 200))
    self.assertTrue(np.all(np.diff(thresholds) >= 0))
    self.assertTrue(np.all(np.diff(table.multipliers) > 0))

  @parameterized.parameters(3, 4, 6)
  def test_solution_minimises_the_lagrangian(self, bits):
    table = laplace.unit_table(bits)
    thresholds = np.linspace(0.0, 8.0, 4001)
    objective_terms = (
        laplace.unit_error(thresholds, laplace.optimal_unit_step(thresholds, bits), bits),
        laplace.unit_pruned_fraction(thresholds))
    for multiplier in (0.05, 0.5, 2.0, 10.0):
      threshold, step = table.solve(np.array(multiplier))
      ours = (laplace.unit_error(threshold, step, bits)
              - multiplier * laplace.unit_pruned_fraction(threshold))
      brute = np.min(objective_terms[0] - multiplier * objective_terms[1])
      self.assertLessEqual(float(ours), brute + 1e-4)

  def test_rejects_bits_out_of_range(self):
    with self.assertRaisesRegex(ValueError, "2..8"):
      laplace.unit_table(9)


class StepTableTest(parameterized.TestCase):

  @parameterized.parameters(2, 4, 8)
  def test_table_agrees_with_the_search(self, bits):
    thresholds = np.array([0.0, 0.013, 0.5, 1.2345, 3.0, 7.77, 12.5, 30.0])
    np.testing.assert_allclose(
        laplace.optimal_unit_step_table(thresholds, bits),
        laplace.optimal_unit_step(thresholds, bits), rtol=2e-4)


class MinimiseLogTest(absltest.TestCase):

  def test_returns_the_scan_point_and_the_refined_minimum(self):
    # Four problems at once: minima inside the range, on a scan point, and
    # half a spacing past its upper end (still reached: the bracket extends
    # one point past each end).
    targets = np.array([0.3, -1.7, 1.0, 2.25])
    scan_best, refined = laplace.minimise_log(
        lambda x: (x - targets)**2, np.full(4, -2.0), np.full(4, 2.0),
        points=9, iterations=40)
    np.testing.assert_allclose(refined, targets, atol=1e-6)
    np.testing.assert_array_equal(scan_best, [0.5, -1.5, 1.0, 2.0])

  def test_the_scan_escapes_a_local_minimum(self):
    # Golden section alone over [-3, 3] would close in on the local minimum
    # at x = -0.5 (error 0.5); the scan finds the global one at x = 2.5.
    def error(x):
      return np.minimum((x - 2.5)**2, 0.5 + 4.0 * (x + 0.5)**2)
    _, refined = laplace.minimise_log(error, np.array([-3.0]), np.array([3.0]),
                                      points=25, iterations=40)
    np.testing.assert_allclose(refined, [2.5], atol=1e-6)

  def test_minimise_step_searches_log_steps(self):
    np.testing.assert_allclose(
        laplace.minimise_step(lambda s: np.log(s / 0.02)**2, np.array([1e-3]),
                              np.array([1.0])), [0.02], rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
