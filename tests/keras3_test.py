"""The Keras 3 frontend on each backend, each in its own process.

Keras fixes its backend per process (KERAS_BACKEND, read when keras is first
imported), and this pytest process runs TensorFlow with tf_keras, so each
backend's checks (tests/keras3_backend_checks.py) run in a subprocess with
KERAS_BACKEND set, as does the check that the JAX path imports no
TensorFlow. PyTorch is not installed here: its case is skipped, saying so.
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

  @parameterized.parameters("tensorflow", "jax", "torch")
  def test_backend_checks_pass(self, backend):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    if importlib.util.find_spec(module[backend]) is None:
      self.skipTest(f"{backend} is not installed, so the Keras 3 frontend is "
                    f"not checked on the {backend} backend")
    result = _run("keras3_backend_checks.py", backend)
    output = result.stdout + result.stderr
    self.assertEqual(result.returncode, 0, output[-6000:])
    self.assertRegex(output, r"Ran (1\d|[2-9]\d) tests")
    self.assertRegex(output, r"\nOK")

  def test_jax_path_imports_no_tensorflow(self):
    if importlib.util.find_spec("jax") is None:
      self.skipTest("jax is not installed")
    result = _run("keras3_no_tensorflow_check.py", "jax")
    self.assertEqual(result.returncode, 0, (result.stdout + result.stderr)[-4000:])
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    self.assertEqual(loaded, [])


if __name__ == "__main__":
  absltest.main()
