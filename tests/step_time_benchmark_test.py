"""Tests for benchmarks/step_time.py: its --quick run and its results table.

The quick run is the real binary in a subprocess (tiny_cnn, 32x32, batch 2,
both jit settings, every variant), so the benchmark cannot rot unnoticed.
No test looks at how fast anything is, only that every time is measured.
"""

import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest

from benchmarks import step_time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROW = re.compile(r"^\| (\w+) \| (True|False) \| ([^|]+?) \| (.*) \|$")


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "benchmarks.step_time", *args], cwd=_REPO,
      capture_output=True, text=True, timeout=300, check=False)


def _rows(markdown: str) -> dict:
  """(model, jit, label) -> the remaining cells of the step-time table."""
  rows = {}
  for line in markdown.splitlines():
    match = _ROW.match(line)
    if match and "x FP32" not in line:
      model, jit, label, rest = match.groups()
      rows[(model, jit, label)] = [cell.strip() for cell in rest.split("|")]
  return rows


class QuickRunTest(absltest.TestCase):
  """One test method: the run takes ~30 s, so it must not be split (xdist)."""

  def test_quick_run_times_every_variant_and_writes_what_it_prints(self):
    output = os.path.join(tempfile.mkdtemp(), "results.md")
    result = _run("--quick", f"--output={output}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(output) as stream:
      written = stream.read()
    self.assertIn(written.strip(), result.stdout)
    for heading in ("- Machine:", "- Date:", "- Command: `python -m "
                    "benchmarks.step_time --quick", "## Why OPQ costs"):
      self.assertIn(heading, written)

    rows = _rows(written)
    for jit in ("False", "True"):
      for variant in step_time.VARIANTS:
        key = ("tiny_cnn", jit, step_time._LABELS[variant])
        self.assertIn(key, rows)
        first_call, median, minimum, cpu, wall_ratio, cpu_ratio = rows[key]
        self.assertGreater(float(first_call), 0, key)
        self.assertGreater(float(minimum), 0, key)
        self.assertGreaterEqual(float(median), float(minimum), key)
        self.assertGreater(float(cpu), 0, key)
        self.assertRegex(wall_ratio, r"^\d+\.\d\dx$", key)
        self.assertRegex(cpu_ratio, r"^\d+\.\d\dx$", key)
      self.assertEqual(rows[("tiny_cnn", jit, "FP32")][4:], ["1.00x", "1.00x"])
      ratio = r"\d+\.\d\dx / \d+\.\d\dx"
      self.assertRegex(
          written, rf"\| tiny_cnn \| {jit} \| {ratio} \| {ratio} \| {ratio} \| "
          rf"{ratio} \| (yes|no) \|")


class FlagsTest(absltest.TestCase):

  def test_bad_flags_are_all_named_with_the_choices(self):
    result = _run("--models=vgg16", "--variants=fp32,qat", "--steps=0",
                  "--output=/nonexistent/never.md")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("Unknown --models ['vgg16']; use some of ['mobilenet_v1'",
                  result.stderr)
    self.assertIn("Unknown --variants ['qat']; use some of ['fp32'",
                  result.stderr)
    self.assertIn("--steps=0 must be >= 1", result.stderr)


class ResultsMarkdownTest(absltest.TestCase):

  def _timings(self):
    baseline = step_time.Timing("m", False, "fp32", 1.0, [100.0, 200.0, 100.0],
                                [50.0, 50.0, 50.0])
    opq = step_time.Timing("m", False, "opq", 1.0, [110.0, 300.0, 120.0],
                           [55.0, 56.0, 57.0])
    failed = step_time.Timing("m", False, "tfmot_pqat",
                              error="InvalidArgumentError: no XLA kernel")
    return baseline, opq, failed

  def test_paired_ratio_is_the_median_of_per_round_ratios(self):
    baseline, opq, failed = self._timings()
    self.assertAlmostEqual(step_time.paired_ratio(opq, baseline), 1.2)
    self.assertAlmostEqual(
        step_time.paired_ratio(opq, baseline, "cpu_ms"), 1.12)
    self.assertIsNone(step_time.paired_ratio(failed, baseline))

  def test_a_failed_variant_shows_its_error_instead_of_times(self):
    baseline, opq, failed = self._timings()
    settings = {"date": "d", "command": "c", "batch_size": 8,
                "image_size": 224, "steps": 3, "warmup": 1}
    text = step_time.results_markdown(
        [baseline, opq, failed], {"m": {"weights": 1e6}}, settings, (1.0, 2.0),
        architectures={"m": (None, 0.5, 4)})
    rows = _rows(text)
    self.assertEqual(rows[("m", "False", "OPQ (opq_tf.apply)")],
                     ["1.0", "120.0", "110.0", "56.0", "1.20x", "1.12x"])
    pqat = rows[("m", "False", "tfmot PQAT (prune-preserve 8-bit QAT)")]
    self.assertEqual(pqat, ["error"] * 5 + ["InvalidArgumentError: no XLA "
                                            "kernel"])
    # Judged on the CPU-time ratio (1.12x), not the wall one (1.20x).
    self.assertIn("| m | False | 1.20x / 1.12x | n/a / n/a | n/a / n/a | "
                  "n/a / n/a | yes |", text)


if __name__ == "__main__":
  absltest.main()
