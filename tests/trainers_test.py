"""Tests for the trainers/ binaries, run as subprocesses like a user would.

Every bad input must stop the binary before training with exit status 2, a
message naming the problem on stderr, and nothing written to the workdir.
What the flag parsing decides is run here, plus one value refused by
checks.validate to show the exit path and the workdir states validate (or
the run) refuses; every other refusal is checked in process by
checks_test.py. RunTest runs trainers.train and trainers.compress to a
finish on the digits data (a few steps) and reruns and breaks copies of
that one workdir; killed and resumed runs are in distributed_test.py.
"""

import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

import opq_tf
from configs import default
from opq_tf.training import planning
import digits_data
from opq_tf.tf_keras._keras import keras


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
        "nested_unknown_field": ("train", ["--config.foo.bar=1"],
                                 r"train: error: unknown config field among "
                                 r"\['--config\.foo\.bar'\]"),
        "subfield_of_a_field": ("compress", ["--config.model_options.foo=1"],
                                r"config\.model_options is a str field with no "
                                r"subfield 'foo'; set it whole: "
                                r"--config\.model_options=<value>"),
        "stray_positional": ("run_default", ["extra"],
                             r"run_default: error: unexpected argument\(s\) "
                             r"\['extra'\]: every setting is a flag"),
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

  def test_help_lists_the_flags(self):
    result = _run("compress", "--help")
    for flag in ("--workdir", "--config", "--strategy", "--cpu_devices",
                 "--[no]verbose"):
      self.assertIn(flag, result.stdout)


def _tree(directory: str) -> dict[str, tuple[int, int]]:
  """path -> (size, mtime) of every file under directory."""
  return {os.path.relpath(os.path.join(root, name), directory):
          (os.path.getsize(os.path.join(root, name)),
           os.stat(os.path.join(root, name)).st_mtime_ns)
          for root, _, names in os.walk(directory) for name in names}


class RunTest(digits_data.DigitsTestCase, absltest.TestCase):
  """trainers.train then trainers.compress on one workdir, a few steps each."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir_path = os.path.join(cls.root, "run")
    cls.flags = [f"--workdir={cls.workdir_path}",
                 f"--config.data_dir={cls.data_dir}", "--strategy=one_device",
                 "--config.global_batch_size=16", "--config.steps_per_epoch=2"]
    cls.train = _run("train", *cls.flags, "--config.fp32_epochs=1",
                     "--config.fp32_warmup_epochs=0")
    cls.compress_flags = [*cls.flags, "--config.num_epochs=1",
                          "--config.warmup_epochs=0",
                          "--config.calibration_images=32"]
    cls.compress = _run("compress", *cls.compress_flags)

  def _copy(self, name: str) -> str:
    """A copy of the finished workdir, to break."""
    copy = os.path.join(self.root, name)
    shutil.copytree(self.workdir_path, copy)
    return copy

  def test_train_and_compress_finish_and_name_their_artefacts(self):
    self.assertEqual(self.train.returncode, 0, self.train.stderr[-3000:])
    self.assertEqual(self.compress.returncode, 0, self.compress.stderr[-3000:])
    workdir = self.workdir_path
    self.assertRegex(self.train.stdout, r"train: done in \d+\.\d s \(whole run\)")
    self.assertIn(os.path.join(workdir, "fp32", "weights.h5"), self.train.stdout)
    self.assertRegex(self.compress.stdout,
                     r"compress: done in \d+\.\d s \(whole run\)")
    for name, path in (("export dir", "export"),
                       ("saved_model", "export/saved_model"),
                       ("model.opq", "export/model.opq"),
                       ("report.json", "export/report.json"),
                       ("final_report.json", "final_report.json")):
      full = os.path.join(workdir, path)
      self.assertTrue(os.path.exists(full), full)
      self.assertRegex(self.compress.stdout,
                       rf"\n  {re.escape(name)} +{re.escape(full)}\n")
    self.assertNotIn("model.tflite", self.compress.stdout)
    with open(os.path.join(workdir, "final_report.json")) as f:
      report = json.load(f)
    self.assertEqual(report["finetune"]["steps"], 2)
    self.assertEqual(report["calibration"]["images"], 32)
    # TFDS is quiet by default.
    for stderr in (self.train.stderr, self.compress.stderr):
      self.assertNotIn("Load dataset info", stderr)

  def test_rerun_with_litert_exports_again(self):
    """--config.litert=True on a finished workdir writes the .tflite."""
    workdir = self._copy("litert")
    packed = os.path.join(workdir, "export", "model.opq")
    with open(packed, "rb") as f:
      packed_bytes = f.read()
    flags = [f"--workdir={workdir}", *self.compress_flags[1:]]
    result = _run("compress", *flags, "--config.litert=True", "--verbose")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    tflite = os.path.join(workdir, "export", "model.tflite")
    self.assertTrue(os.path.exists(tflite))
    self.assertRegex(result.stdout, rf"  model\.tflite +{re.escape(tflite)}\n")
    with open(os.path.join(workdir, "export", "report.json")) as f:
      made_from = json.load(f)["made_from"]
    self.assertEqual(made_from["checkpoint_step"], 2)
    self.assertTrue(made_from["options"]["litert"])
    with open(packed, "rb") as f:  # The same weights: the same packed file.
      self.assertEqual(f.read(), packed_bytes)
    self.assertIn("Load dataset info", result.stderr)  # --verbose
    self.assertEqual([n for n in os.listdir(workdir) if ".tmp-" in n], [])

  def test_unreadable_checkpoints_exit_2_naming_them(self):
    workdir = self._copy("corrupt_checkpoints")
    checkpoints = os.path.join(workdir, "finetune", "checkpoints")
    data_files = glob.glob(os.path.join(checkpoints, "ckpt-*.data-*"))
    self.assertNotEmpty(data_files)
    for path in data_files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    result = _run("compress", f"--workdir={workdir}", *self.compress_flags[1:])
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertRegex(result.stderr, rf"compress: error: No checkpoint under "
                     rf"{re.escape(checkpoints)} is readable \(.*ckpt-2\.data"
                     r".*Remove that directory")
    self.assertNotIn("Traceback", result.stderr)

  def test_a_workdir_in_a_bad_state_exits_2_and_is_left_as_it_is(self):
    # name: (how to break the copy, regex the message must match)
    def export_is_a_file(workdir):
      shutil.rmtree(os.path.join(workdir, "export"))
      with open(os.path.join(workdir, "export"), "w") as f:
        f.write("not an export")

    def foreign_plan(workdir):
      other = keras.Sequential([keras.layers.Dense(64, input_shape=(32,))])
      plan = opq_tf.allocate(other, **planning.allocate_options(
          default.get_config()))
      with open(os.path.join(workdir, "plan.json"), "w") as f:
        f.write(plan.to_json())

    def truncated_weights(workdir):
      path = os.path.join(workdir, "fp32", "weights.h5")
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)

    cases = {
        "export_is_a_file": (export_is_a_file,
                             r"export is not a directory; move it away or "
                             r"remove it"),
        "foreign_plan": (foreign_plan,
                         r"plan\.json was computed for another model .*"
                         r"use a fresh --workdir"),
        "truncated_weights": (truncated_weights,
                              r"fp32/weights\.h5' cannot be read, the file is "
                              r"truncated or corrupt .*delete it and rerun"),
    }
    workdirs, trees = {}, {}
    for name, (break_it, _) in cases.items():
      workdirs[name] = self._copy(name)
      break_it(workdirs[name])
      trees[name] = _tree(workdirs[name])

    def run(name):
      return _run("compress", f"--workdir={workdirs[name]}",
                  *self.compress_flags[1:])

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      results = dict(zip(cases, pool.map(run, cases)))
    for name, (_, message) in cases.items():
      with self.subTest(name):
        result = results[name]
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        self.assertRegex(result.stderr, re.compile(message, re.DOTALL))
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(_tree(workdirs[name]), trees[name])


if __name__ == "__main__":
  absltest.main()
