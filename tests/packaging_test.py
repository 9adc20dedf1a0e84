"""The package builds as a wheel and imports from outside the repository."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WheelTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.temp = tempfile.mkdtemp()
    # A copy of the source, so that the build's own files (build/,
    # *.egg-info) never land in the repository.
    source = os.path.join(cls.temp, "source")
    shutil.copytree(_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "*.egg-info", "__pycache__"))
    # --no-build-isolation: the venv's setuptools, nothing downloaded.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps",
         "--no-build-isolation", "--quiet", "-w", cls.temp, source],
        check=True, capture_output=True, text=True)
    (cls.wheel,) = glob.glob(os.path.join(cls.temp, "opq_tf-*.whl"))
    cls.site = os.path.join(cls.temp, "site")
    with zipfile.ZipFile(cls.wheel) as wheel:
      cls.names = wheel.namelist()
      wheel.extractall(cls.site)

  def _run(self, code: str) -> str:
    """Runs `code` in a fresh interpreter, from a directory outside the
    repository, with only the unpacked wheel on the path."""
    env = {**os.environ, "PYTHONPATH": self.site}
    return subprocess.run([sys.executable, "-c", code], cwd=self.temp,
                          env=env, check=True, capture_output=True,
                          text=True).stdout.strip()

  def test_wheel_holds_every_module_and_the_default_config(self):
    for path in ("opq_tf/__init__.py", "opq_tf/core/allocation.py",
                 "opq_tf/tf_keras/wrapping.py", "opq_tf/training/checks.py",
                 "trainers/train.py", "configs/default.py"):
      self.assertIn(path, self.names)
    metadata = [n for n in self.names if n.endswith("METADATA")]
    self.assertLen(metadata, 1)

  def test_imports_from_the_wheel_not_the_repository(self):
    where = self._run("import opq_tf; print(opq_tf.__file__)")
    self.assertTrue(where.startswith(self.site), where)

  def test_allocates_from_the_wheel(self):
    out = self._run(
        "import numpy as np, opq_tf; "
        "k = {'a/kernel': np.random.RandomState(0).laplace(size=(64, 8))}; "
        "print(opq_tf.allocate(k, 0.5, 4).realised_pruning_rate)")
    self.assertAlmostEqual(float(out), 0.5, places=2)

  def test_trainer_module_runs_from_the_wheel(self):
    env = {**os.environ, "PYTHONPATH": self.site}
    result = subprocess.run(
        [sys.executable, "-m", "trainers.train", "--helpfull"],
        cwd=self.temp, env=env, capture_output=True, text=True)
    self.assertIn("--workdir", result.stdout + result.stderr)


if __name__ == "__main__":
  absltest.main()
