"""Tests for learned rounding (AdaRound) in opq_tf.core.reconstruction."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from opq_tf.core import grid
from opq_tf.core import reconstruction

_DAMPING = reconstruction.DEFAULT_DAMPING


def _problem(bits: int, pruning_rate: float, groups=2, rows=24, width=32,
             samples=400, seed=0):
  """Rows W (groups, rows, width) with a magnitude mask and a per-row step,
  and the statistics of inputs correlated across the width (without
  correlation H is diagonal and nearest rounding is already optimal); the
  FP32 inputs Z are the compressed ones X plus noise, as in a network whose
  earlier layers are compressed."""
  random = np.random.RandomState(seed)
  mixing = np.eye(width) + random.normal(size=(width, width)) / np.sqrt(width)
  inputs = np.einsum("de,ges->gds", mixing,
                     random.normal(size=(groups, width, samples)))
  targets = inputs + 0.3 * random.normal(size=inputs.shape)
  weights = 0.1 * random.laplace(size=(groups, rows, width))
  mask = np.abs(weights) > np.quantile(np.abs(weights), pruning_rate)
  # 0.6 x the range: some weights lie beyond the grid, so clipping matters.
  step = np.broadcast_to(0.6 * np.max(np.abs(weights), axis=-1, keepdims=True)
                         / grid.max_code(bits), weights.shape)
  transpose = lambda a: np.swapaxes(a, 1, 2)
  statistics = reconstruction.Statistics(
      samples, inputs @ transpose(inputs), inputs.sum(-1),
      targets @ transpose(inputs), targets @ transpose(targets),
      targets.sum(-1))
  return weights, statistics, mask, step


class LearnedRoundingTest(parameterized.TestCase):

  @parameterized.parameters((4, 0.0), (4, 0.5), (3, 0.0), (8, 0.5))
  def test_lowers_the_error_of_error_feedback_and_stays_on_grid(
      self, bits, pruning_rate):
    weights, statistics, mask, step = _problem(bits, pruning_rate)
    given_mask = mask.copy()
    error = lambda rows: statistics.relative_error(weights, rows)

    nearest = grid.compress(weights, step, bits, mask)
    feedback = reconstruction.error_feedback_rounding(
        weights, statistics.hessian, statistics.cross, mask, step, bits,
        _DAMPING)
    learned = reconstruction.learned_rounding(weights, statistics, mask, step,
                                              bits, _DAMPING)

    self.assertLess(error(feedback), error(nearest))
    self.assertLess(error(learned), error(feedback))
    np.testing.assert_array_equal(mask, given_mask)
    np.testing.assert_array_equal(learned[~mask], 0.0)
    codes = grid.codes(learned, step, bits)
    np.testing.assert_array_equal(grid.dequantize(codes, step), learned)
    self.assertLessEqual(np.abs(codes).max(), grid.max_code(bits))
    self.assertEqual(learned.dtype, np.float32)
    self.assertGreater(np.count_nonzero(learned != feedback), 0)

  def test_codes_at_two_bits_stay_within_one(self):
    weights, statistics, mask, step = _problem(2, 0.3)
    learned = reconstruction.learned_rounding(weights, statistics, mask, step,
                                              2, _DAMPING)
    self.assertEqual(set(np.unique(grid.codes(learned, step, 2))), {-1, 0, 1})

  def test_is_deterministic(self):
    weights, statistics, mask, step = _problem(4, 0.5)
    first, second = (reconstruction.learned_rounding(
        weights, statistics, mask, step, 4, _DAMPING, iterations=100)
                     for _ in range(2))
    np.testing.assert_array_equal(first, second)

  def test_keeps_error_feedback_when_learning_does_not_lower_the_error(self):
    # One iteration moves no h across 0.5: the codes are error feedback's,
    # whose error is not lowered, so error feedback's rows come back.
    weights, statistics, mask, step = _problem(4, 0.5)
    feedback = reconstruction.error_feedback_rounding(
        weights, statistics.hessian, statistics.cross, mask, step, 4,
        _DAMPING)
    learned = reconstruction.learned_rounding(
        weights, statistics, mask, step, 4, _DAMPING, iterations=1)
    np.testing.assert_array_equal(learned, feedback)


class SolveRoundingTest(parameterized.TestCase):

  def test_each_rounding_lowers_the_error_of_the_one_before(self):
    weights, statistics, mask, step = _problem(4, 0.5)
    errors = {}
    for rounding in ("nearest", "error_feedback", "learned",
                     reconstruction.LearnedRounding(iterations=200)):
      solved = reconstruction.solve(weights, statistics, mask, step, 4,
                                    _DAMPING, 4.0, bias=True,
                                    rounding=rounding)
      errors[str(rounding)] = solved.summary.error_after
      self.assertEqual(solved.reconstructed, rounding != "nearest")
      np.testing.assert_array_equal(solved.rows[~mask], 0.0)
    nearest, feedback, learned, short = errors.values()
    self.assertLess(feedback, nearest)
    self.assertLess(learned, feedback)
    self.assertLess(short, feedback)

  def test_nearest_is_plain_rounding_and_says_so(self):
    weights, statistics, mask, step = _problem(4, 0.5)
    solved = reconstruction.solve(weights, statistics, mask, step, 4,
                                  _DAMPING, 4.0, bias=True, rounding="nearest")
    np.testing.assert_array_equal(solved.rows,
                                  grid.compress(weights, step, 4, mask))
    self.assertEqual(solved.summary.method, "plain rounding")
    self.assertIn("nearest", solved.summary.reason)
    self.assertEqual(solved.bias_shift.shape, weights.shape[:2])

  @parameterized.parameters("error_feedback", "learned")
  def test_latent_rounds_to_the_rows_from_off_the_grid(self, rounding):
    weights, statistics, mask, step = _problem(4, 0.5)
    solved = reconstruction.solve(weights, statistics, mask, step, 4,
                                  _DAMPING, 4.0, bias=False, rounding=rounding)
    self.assertTrue(solved.reconstructed)
    np.testing.assert_array_equal(
        grid.compress(solved.latent, step, 4, mask), solved.rows)
    offset = np.abs(solved.latent - solved.rows) / step
    self.assertLessEqual(offset.max(), 0.49 + 1e-9)
    # Off the grid (room for finetuning to move a code) for most kept ones.
    self.assertGreater(np.mean(offset[mask] > 0.01), 0.5)
    np.testing.assert_array_equal(solved.latent[~mask], 0.0)

  def test_plain_rounding_keeps_the_weights_as_latent(self):
    weights, statistics, mask, step = _problem(4, 0.5)
    solved = reconstruction.solve(weights, statistics, mask, step, 4,
                                  _DAMPING, 4.0, bias=False, rounding="nearest")
    np.testing.assert_array_equal(solved.latent, weights)

  @parameterized.parameters(True, False)
  def test_latent_value_rounds_to_the_rows(self, wrapped):
    weights, statistics, mask, step = _problem(4, 0.5)
    solved = reconstruction.solve(weights, statistics, mask, step, 4,
                                  _DAMPING, 4.0, bias=False)
    current = np.full(weights.shape, 7.0)
    value = reconstruction.latent_value(
        solved.rows, solved.latent, current, mask, step, 4, wrapped=wrapped,
        key="dense/kernel")
    self.assertEqual(value.dtype, np.float32)
    np.testing.assert_array_equal(grid.compress(value, step, 4, mask),
                                  solved.rows)
    if wrapped:  # latent kept weights; pruned ones keep their values.
      np.testing.assert_array_equal(value[mask],
                                    solved.latent[mask].astype(np.float32))
      np.testing.assert_array_equal(value[~mask], 7.0)
    else:  # used as it is: the grid values.
      np.testing.assert_array_equal(value, solved.rows.astype(np.float32))

  def test_latent_value_refuses_a_value_off_its_codes(self):
    weights, statistics, mask, step = _problem(4, 0.5)
    solved = reconstruction.solve(weights, statistics, mask, step, 4,
                                  _DAMPING, 4.0, bias=False)
    with self.assertRaisesRegex(AssertionError, "dense/kernel: .* off its grid"):
      reconstruction.latent_value(
          solved.rows, solved.latent + 0.6 * step, weights, mask, step, 4,
          wrapped=True, key="dense/kernel")

  @parameterized.parameters("adaround", "Learned", None, 1)
  def test_bad_rounding_names_the_choices(self, rounding):
    weights, statistics, mask, step = _problem(4, 0.5)
    with self.assertRaisesRegex(
        ValueError, "'nearest', 'error_feedback', 'learned'"):
      reconstruction.solve(weights, statistics, mask, step, 4, _DAMPING, 4.0,
                           bias=False, rounding=rounding)

  @parameterized.parameters(
      ({"iterations": 0}, "iterations"), ({"iterations": 2.5}, "iterations"),
      ({"learning_rate": 0.0}, "learning_rate"),
      ({"regularization": -1.0}, "regularization"))
  def test_bad_settings_are_refused_by_name(self, settings, message):
    with self.assertRaisesRegex(ValueError, message):
      reconstruction.LearnedRounding(**settings)


if __name__ == "__main__":
  absltest.main()
