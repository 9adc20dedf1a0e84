"""Runs `benchmarks/accuracy.py --quick` end to end so the benchmark cannot rot.

The quick run prepares the digits stand-in, trains configs/default.py's FP32
model for a few epochs with training.train_fp32, compresses it with opq,
opq_total, uniform and global_magnitude (opq_tf, BatchNorm calibrated) and
the tfmot baseline at (0.5, 8), finetunes each for 2 epochs with
loop.make_train_step and writes the tables, the plot and results.json.
About 1.5 min on an idle 2-core machine.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_REPO, "benchmarks", "accuracy.py")
_METHODS = ("opq", "opq_total", "uniform", "global_magnitude", "tfmot")
_QUICK_SETTINGS = [[0.5, 8]]


class AccuracyBenchmarkTest(absltest.TestCase):
  """One test: pytest-xdist would run setUpClass once per worker."""

  def test_quick_run(self):
    directory = tempfile.mkdtemp(prefix="accuracy_benchmark_")
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    self.workdir = os.path.join(directory, "work")
    self.output_dir = os.path.join(directory, "out")
    completed = subprocess.run(
        [sys.executable, _SCRIPT, "--quick", f"--workdir={self.workdir}",
         f"--output_dir={self.output_dir}"],
        cwd=_REPO, capture_output=True, text=True, timeout=900, check=False)
    self.assertEqual(completed.returncode, 0,
                     msg=completed.stdout[-3000:] + completed.stderr[-5000:])
    with open(os.path.join(self.workdir, "results.json")) as f:
      self.results = json.load(f)
    with open(os.path.join(self.output_dir, "accuracy_results.md")) as f:
      self.markdown = f.read()
    self.check_plot_and_markdown()
    self.check_table_has_one_row_per_method_and_setting()
    self.check_accuracies_and_sizes_are_sane()
    self.check_no_verdicts_in_the_tables()

  def check_plot_and_markdown(self):
    with open(os.path.join(self.output_dir, "accuracy.png"), "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertGreater(
        os.path.getsize(os.path.join(self.output_dir, "accuracy.png")), 10000)
    self.assertIn("python benchmarks/accuracy.py --quick", self.markdown)
    self.assertIn("os.cpu_count()=", self.markdown)

  def check_table_has_one_row_per_method_and_setting(self):
    rows = re.findall(
        r"^\| (0\.\d+) \| (\d) \| (\w+) \| ([\d.]+) \| ([\d.]+|n/a) \| "
        r"([\d.]+) ±", self.markdown, flags=re.MULTILINE)
    found = sorted((float(p), int(b), method) for p, b, method, *_ in rows)
    expected = sorted((p, b, m) for p, b in _QUICK_SETTINGS for m in _METHODS)
    self.assertEqual(found, expected)
    for _, _, method, compressed, calibrated, accuracy in rows:
      self.assertBetween(float(compressed), 0.0, 100.0)
      self.assertBetween(float(accuracy), 0.0, 100.0)
      if method == "tfmot":
        self.assertEqual(calibrated, "n/a")
      else:
        self.assertBetween(float(calibrated), 0.0, 100.0)

  def check_accuracies_and_sizes_are_sane(self):
    context = self.results["context"]
    self.assertEqual(context["settings"], _QUICK_SETTINGS)
    self.assertGreater(context["fp32_accuracy"], 0.7)
    self.assertEqual(context["model"], "small_resnet")
    self.assertLen(self.results["results"], len(_QUICK_SETTINGS) * len(_METHODS))
    for result in self.results["results"]:
      name = f"{result['method']} p={result['pruning_rate']} B={result['bits']}"
      self.assertBetween(result["zero_shot"], 0.0, 1.0, msg=name)
      if result["method"] != "tfmot":
        self.assertBetween(result["calibrated"], 0.0, 1.0, msg=name)
      for seed in result["seeds"]:
        self.assertLen(seed["accuracies"], context["epochs"], msg=name)
        for accuracy in seed["accuracies"]:
          self.assertBetween(accuracy, 0.0, 1.0, msg=name)
      # Finetuning from the FP32 weights beats chance (10%) at 8x-80x.
      self.assertGreater(result["accuracy_mean"], 0.2, msg=name)
      self.assertGreater(result["model_ratio"], 1.0, msg=name)
      bound = 32.0 / ((1.0 - result["pruning_rate"]) * result["bits"])
      self.assertBetween(result["weight_bits_ratio"], 1.0, bound * 1.05,
                         msg=name)
      if result["method"] != "tfmot":
        self.assertAlmostEqual(result["sparsity"], result["pruning_rate"],
                               delta=0.002, msg=name)
        self.assertGreater(result["measured_mse"], 0.0, msg=name)
        self.assertGreater(result["modelled_mse"], 0.0, msg=name)
    tfmot_8bit = next(r for r in self.results["results"]
                      if r["method"] == "tfmot" and r["bits"] == 8)
    # PQAT keeps the pruned zeros (the quantizer can only add zeros).
    self.assertGreaterEqual(tfmot_8bit["sparsity"],
                            tfmot_8bit["pruning_rate"] - 0.002)

  def check_no_verdicts_in_the_tables(self):
    """Issue-target verdicts and analysis live in docs/benchmarks.md."""
    self.assertNotIn("checks", self.results)
    self.assertNotRegex(self.markdown, r"HELD|target")


if __name__ == "__main__":
  absltest.main()
