"""The Keras 3 frontend on each backend, each in its own process.

Keras fixes its backend per process (KERAS_BACKEND, read when keras is first
imported), and this pytest process runs TensorFlow with tf_keras, so each
backend's checks (tests/keras3_backend_checks.py, on TensorFlow and JAX) run
in a subprocess with KERAS_BACKEND set, as does the whole path on JAX and on
PyTorch (tests/keras3_no_tensorflow_check.py: fit keeps the grid, the packed
file reloads bit for bit, and no TensorFlow module is imported). PyTorch
gets only the latter, fitting eagerly: torch.compile alone takes 30-300 s
on 2 cores (the full checks, jit-compiled, take over 3 minutes there, and
pass). A backend not installed is skipped, saying so.
"""

import importlib.util
import json
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
_TIMEOUT_S = 600


def _run(script: str, backend: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join(
                 [_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  if backend == "jax":  # two CPU devices, for the layout check
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=2").strip()
  return subprocess.run([sys.executable, os.path.join(_TESTS, script)],
                        env=env, capture_output=True, text=True,
                        timeout=_TIMEOUT_S, cwd=_ROOT, check=False)


class BackendsTest(parameterized.TestCase):

  @parameterized.parameters("tensorflow", "jax")
  def test_backend_checks_pass(self, backend):
    _skip_unless_installed(self, backend)
    result = _run("keras3_backend_checks.py", backend)
    output = result.stdout + result.stderr
    self.assertEqual(result.returncode, 0, output[-6000:])
    self.assertRegex(output, r"Ran (1\d|[2-9]\d) tests")
    self.assertRegex(output, r"\nOK")

  @parameterized.parameters("jax", "torch")
  def test_path_keeps_the_grid_and_imports_no_tensorflow(self, backend):
    _skip_unless_installed(self, backend)
    result = _run("keras3_no_tensorflow_check.py", backend)
    self.assertEqual(result.returncode, 0, (result.stdout + result.stderr)[-4000:])
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    self.assertEqual(loaded, [])


def _skip_unless_installed(test: absltest.TestCase, backend: str) -> None:
  if importlib.util.find_spec(backend) is None:
    test.skipTest(f"{backend} is not installed, so the Keras 3 frontend is "
                  f"not checked on the {backend} backend")


if __name__ == "__main__":
  absltest.main()
