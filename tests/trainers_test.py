"""Tests for the trainers/ binaries, run as subprocesses like a user would.

Every bad input must stop the binary before training with exit status 2, a
message naming the problem on stderr, and nothing written to the workdir.
Only what the flag parsing decides is run here, plus one value refused by
checks.validate to show the exit path; every other refusal is checked in
process by checks_test.py, and whole runs of the binaries (killed and
resumed) are in distributed_test.py.
"""

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def _run(binary: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", f"trainers.{binary}", *args], cwd=_ROOT, env=_ENV,
      capture_output=True, text=True, timeout=timeout, check=False)


class BadInputTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def _workdir(self, name):
    return os.path.join(self.root, name)

  def test_bad_inputs_exit_non_zero_with_a_message_and_write_nothing(self):
    # name: (binary, flags, regex the message on stderr must match)
    cases = {
        "unknown_config": ("train", ["--config=configs/no_such_model.py"],
                           r"no_such_model\.py.*\n.*No such file"),
        "pruning_rate": ("compress", ["--config.pruning_rate=1.5"],
                         r"config\.pruning_rate=1\.5 is invalid.*\[0, 1\)"),
        "non_numeric": ("run_default", ["--config.learning_rate=fast"],
                        r"--config\.learning_rate=fast.*could not convert "
                        r"string to float"),
        "unknown_field": ("compress", ["--config.no_such=1"],
                          r"compress: error: unknown config field among "
                          r"\['--config\.no_such'\]"),
        "renamed_field": ("run_default", ["--config.allocation=uniform"],
                          r"run_default: error: config\.allocation is now "
                          r"config\.method; write --config\.method="),
        "unknown_strategy": ("train", ["--strategy=tpu"],
                             r"--strategy=tpu: value should be one of <mirrored\|multi_worker\|one_device>"),
        # Experiment settings are config fields, not flags.
        "pretrained_flag": ("compress", ["--pretrained=/ckpt/w.h5"],
                            r"Unknown command line flag 'pretrained'"),
    }
    workdirs = {name: self._workdir(name) for name in cases}

    def run(name):
      binary, flags, _ = cases[name]
      return _run(binary, f"--workdir={workdirs[name]}", *flags)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      results = dict(zip(cases, pool.map(run, cases)))
    for name, (binary, flags, message) in cases.items():
      with self.subTest(name):
        result = results[name]
        self.assertEqual(result.returncode, 2, f"{binary} {flags}")
        self.assertRegex(result.stderr, re.compile(message, re.DOTALL))
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(workdirs[name]))
    self.assertEqual(os.listdir(self.root), [])


if __name__ == "__main__":
  absltest.main()
