"""Tests for the trainers/ binaries, run as subprocesses like a user would.

Every bad input must stop the binary before training with a non-zero exit, a
message naming the problem on stderr, and nothing written to the workdir.
"""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

from opq_tf import models

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
    cls.seven_classes = os.path.join(cls.root, "seven_classes.h5")
    models.build("small_resnet", 7, 32).save_weights(cls.seven_classes)

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
        "bits": ("compress", ["--config.bits=9"],
                 r"config\.bits=9 is invalid.*2\.\.8"),
        "learning_rate": ("run_default", ["--config.learning_rate=-1"],
                          r"config\.learning_rate=-1\.0 is invalid.*> 0"),
        "non_numeric": ("run_default", ["--config.learning_rate=fast"],
                        r"--config\.learning_rate=fast.*could not convert "
                        r"string to float"),
        "unknown_field": ("compress", ["--config.no_such=1"],
                          r"compress: error: unknown config field among "
                          r"\['--config\.no_such'\]"),
        "indivisible_batch": (
            "run_default", ["--strategy=mirrored", "--cpu_devices=2",
                            "--config.global_batch_size=63"],
            r"global_batch_size=63 is not divisible by the 2 replicas"),
        "unknown_strategy": ("train", ["--strategy=tpu"],
                             r"--strategy=tpu: value should be one of <mirrored\|multi_worker\|one_device>"),
        "missing_manual_dir": (
            "run_default", [f"--manual_dir={self._workdir('no_manual')}"],
            r"manual_dir .*no_manual' is not usable: the directory does not "
            r"exist"),
        "mismatched_pretrained": (
            "compress", [f"--pretrained={self.seven_classes}"],
            r"layer 'logits' weight 'logits/kernel.*\(128, 7\).*\(128, 10\)"),
        # Root may write anywhere but on a read-only file system.
        "unwritable_workdir": ("train", [], r"workdir '/proc/opq_trainers_"
                               r"test' is not writable"),
    }
    workdirs = {name: self._workdir(name) for name in cases}
    workdirs["unwritable_workdir"] = "/proc/opq_trainers_test"

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
    self.assertEqual(sorted(os.listdir(self.root)), ["seven_classes.h5"])


class RunDefaultTest(absltest.TestCase):

  def test_main_job_end_to_end(self):
    """The README's job with 3-step epochs: data, FP32, OPQ, finetune, export."""
    root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, root, ignore_errors=True)
    workdir = os.path.join(root, "opq_default")
    result = _run("run_default", f"--workdir={workdir}", "--strategy=one_device",
                  "--config.fp32_epochs=1", "--config.num_epochs=1",
                  "--config.steps_per_epoch=3", "--config.global_batch_size=16")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertRegex(result.stdout, r"stage3_b_conv/kernel\s+Conv2D\s+3x3x128x128")
    self.assertRegex(result.stdout, r"pruned 90\.00% \(target 90\.00%\)")
    self.assertRegex(result.stdout, r"compressed_after_finetune\s+top-1 \d\.\d{4}")
    report = json.load(open(os.path.join(workdir, "final_report.json")))
    self.assertEqual(report["accuracy"]["fp32"]["examples"], 500)
    self.assertEqual(report["finetune"]["steps"], 3)
    self.assertGreater(report["compression"]["weight_bits_ratio"], 50)
    self.assertGreater(report["wall_seconds"], 0)
    for path in ("export/saved_model/saved_model.pb", "export/report.json",
                 "export/model.opq", "plan.json", "fp32/weights.h5",
                 "manual/ILSVRC2012_img_train.tar"):
      self.assertTrue(os.path.exists(os.path.join(workdir, path)), path)
    self.assertEqual([n for n in os.listdir(workdir) if ".tmp" in n], [])


if __name__ == "__main__":
  absltest.main()
