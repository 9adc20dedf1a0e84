"""Tests for opq_tf.core.grid: bits, codes, per-channel steps and the ratio."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from opq_tf.core import grid


class GridTest(parameterized.TestCase):

  @parameterized.parameters((2, 1), (3, 3), (4, 7), (8, 127))
  def test_max_code(self, bits, k):
    self.assertEqual(grid.max_code(bits), k)

  @parameterized.parameters(1, 9, 16)
  def test_bits_out_of_range(self, bits):
    with self.assertRaisesRegex(ValueError, "bits must be in 2..8"):
      grid.check_bits(bits)

  @parameterized.parameters(4.0, True, "4")
  def test_bits_not_an_integer(self, bits):
    with self.assertRaisesRegex(TypeError, "must be an integer in 2..8"):
      grid.check_bits(bits)

  def test_codes_clip_round_and_mask(self):
    values = np.array([-1.0, -0.26, 0.04, 0.06, 0.24, 5.0], np.float32)
    mask = np.array([True, True, True, True, False, True])
    np.testing.assert_array_equal(grid.codes(values, 0.1, 3, mask),
                                  [-3, -3, 0, 1, 0, 3])
    np.testing.assert_array_equal(
        grid.compress(values, 0.1, 3, mask),
        np.float32(0.1) * np.array([-3, -3, 0, 1, 0, 3], np.float32))

  def test_channel_steps_broadcast_over_the_channel_axes(self):
    values = np.ones((3, 3, 4, 2), np.float32)
    steps = np.arange(1, 9, dtype=np.float32) / 8
    step = grid.step_array(steps, values.shape, (-2, -1))
    self.assertEqual(step.shape, (4, 2))
    codes = grid.codes(values, step, 8)
    np.testing.assert_array_equal(codes[0, 0], np.round(1 / step))
    self.assertEqual(grid.step_array(0.5, values.shape, (-1,)).shape, ())
    self.assertEqual(grid.channel_count(values.shape, (-2, -1)), 8)

  def test_weight_bits_ratio_counts_every_step(self):
    self.assertAlmostEqual(
        grid.weight_bits_ratio([1000, 100], [250, 50], [4, 8], [1, 10]),
        32 * 1100 / (250 * 4 + 32 + 50 * 8 + 320))


if __name__ == "__main__":
  absltest.main()
