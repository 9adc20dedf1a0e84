"""Keras 3 calibration in linear time, on every backend, each in its process.

Keras fixes its backend per process, so tests/keras3_calibration_checks.py
(branching and nested models reconstructed on their grids, the walk's steps
reproducing the forward pass, each layer run a constant number of times per
batch, sublayer kernels, depthwise patches, the disk cache) runs in a
subprocess per backend, as tests/keras3_test.py runs the other Keras 3
checks. A backend not installed is skipped, saying so.
"""

from absl.testing import absltest
from absl.testing import parameterized

import keras3_test


class CalibrationBackendsTest(parameterized.TestCase):

  @parameterized.parameters("tensorflow", "jax", "torch")
  def test_calibration_checks_pass(self, backend):
    keras3_test._skip_unless_installed(self, backend)  # pylint: disable=protected-access
    result = keras3_test._run("keras3_calibration_checks.py", backend)  # pylint: disable=protected-access
    output = result.stdout + result.stderr
    self.assertEqual(result.returncode, 0, output[-6000:])
    self.assertRegex(output, r"Ran 6 tests")
    self.assertRegex(output, r"\nOK")


if __name__ == "__main__":
  absltest.main()
