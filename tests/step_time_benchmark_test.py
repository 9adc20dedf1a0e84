"""Tests for benchmarks/step_time.py (and step_timing.py): its --quick run
and its results tables.

The quick run is the real binary in a subprocess (configs/default.py's
small_resnet at 32x32, batch 2, both jit settings, every variant, the
trainer's step under the mirrored strategy; the Keras 3 rows on JAX:
configs/mobilenet_v1.py at 32x32), so the benchmark cannot rot unnoticed.
No test looks at how fast anything is, only that every time is measured.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest

from benchmarks import step_time
from benchmarks import step_timing

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROW = re.compile(r"^\| (\w+) \| (True|False) \| ([^|]+?) \| (.*) \|$")
_KERAS3_ROW = re.compile(
    r"^\| (\w+) \| (tensorflow|jax) \| (True|False) \| ([^|]+?) \| (.*) \|$")


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


def _keras3_rows(markdown: str) -> dict:
  """(model, backend, jit, label) -> the remaining cells of the Keras 3 table."""
  rows = {}
  for line in markdown.splitlines():
    match = _KERAS3_ROW.match(line)
    if match:
      *key, rest = match.groups()
      rows[tuple(key)] = [cell.strip() for cell in rest.split("|")]
  return rows


class QuickRunTest(absltest.TestCase):
  """One test method: the run takes ~1 min, so it must not be split (xdist)."""

  def test_quick_run_times_every_variant_and_writes_what_it_prints(self):
    output = os.path.join(tempfile.mkdtemp(), "results.md")
    result = _run("--quick", "--keras3_backends=jax", f"--output={output}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(output) as stream:
      written = stream.read()
    self.assertIn(written.strip(), result.stdout)
    for heading in ("- Machine:", "- Date:", "- Command: `python -m "
                    "benchmarks.step_time --quick", "loop.make_train_step"
                    "` under mirrored"):
      self.assertIn(heading, written)
    self.assertNotIn("## Why", written)  # The analysis is in the docs.
    # p and B come from configs/default.py.
    self.assertRegex(written, r"\| default \| small_resnet \| 32 \| [\d.]+M \| "
                     r"0\.9 \| 4 \| 0\.0001 \|")
    with open(os.path.splitext(output)[0] + ".json") as stream:
      results = json.load(stream)
    self.assertEqual(results["notes"]["default"]["pruning_rate"], 0.9)

    rows = _rows(written)
    # tfmot's wrappers sync replicas (merge_call) in their forward pass, which
    # the trainer's jit-compiled forward/backward cannot hold: an error row.
    timed = {"False": step_time.VARIANTS,
             "True": ("fp32", "opq", "opq_ops")}
    for jit, variants in timed.items():
      for variant in variants:
        key = ("default", jit, step_time._LABELS[variant])
        self.assertIn(key, rows)
        first_call, median, minimum, cpu, wall_ratio, cpu_ratio = rows[key]
        self.assertGreater(float(first_call), 0, key)
        self.assertGreater(float(minimum), 0, key)
        self.assertGreaterEqual(float(median), float(minimum), key)
        self.assertGreater(float(cpu), 0, key)
        self.assertRegex(wall_ratio, r"^\d+\.\d\dx$", key)
        self.assertRegex(cpu_ratio, r"^\d+\.\d\dx$", key)
      self.assertEqual(rows[("default", jit, "FP32")][4:], ["1.00x", "1.00x"])
    ratio = r"\d+\.\d\dx / \d+\.\d\dx"
    self.assertRegex(
        written, rf"\| default \| False \| {ratio} \| {ratio} \| {ratio} \| "
        rf"{ratio} \| -?[\d.]+ \| [\d.]+ \|")

    # Keras 3 rows: the trainers' Keras 3 step on JAX, jit-compiled.
    self.assertIn("## Keras 3 frontend (opq_tf.apply on a keras.Model)",
                  written)
    keras3 = _keras3_rows(written)
    self.assertEqual(set(keras3), {
        ("mobilenet_v1", "jax", "True", step_time._LABELS[variant])
        for variant in ("fp32", "opq")})
    for key, (first_call, wall, cpu, wall_ratio, cpu_ratio) in keras3.items():
      self.assertGreater(float(first_call), 0, key)
      self.assertGreater(float(wall), 0, key)
      self.assertGreater(float(cpu), 0, key)
      self.assertRegex(wall_ratio, r"^\d+\.\d\dx$", key)
      self.assertRegex(cpu_ratio, r"^\d+\.\d\dx$", key)
    jax_results = results["keras3"]["jax"]
    self.assertEqual(jax_results["settings"]["train_step"], "trainer")
    self.assertEqual(jax_results["notes"]["mobilenet_v1"]["image_size"], 32)


class FlagsTest(absltest.TestCase):

  def test_bad_flags_are_all_named_with_the_choices(self):
    result = _run("--configs=vgg16", "--variants=fp32,qat", "--steps=0",
                  "--keras3_backends=torch", "--output=/nonexistent/never.md")
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("Unknown --configs ['vgg16']; use some of ['resnet50'",
                  result.stderr)
    self.assertIn("Unknown --variants ['qat']; use some of ['fp32'",
                  result.stderr)
    self.assertIn("--steps=0 must be >= 1", result.stderr)
    self.assertIn("Unknown --keras3_backends ['torch']; use some of "
                  "['tensorflow', 'jax']", result.stderr)


class ResultsMarkdownTest(absltest.TestCase):

  def _timings(self):
    baseline = step_timing.Timing("m", False, "fp32", 1.0,
                                  [100.0, 200.0, 100.0], [50.0, 50.0, 50.0])
    opq = step_timing.Timing("m", False, "opq", 1.0, [110.0, 300.0, 120.0],
                             [55.0, 56.0, 57.0])
    failed = step_timing.Timing("m", False, "tfmot_pqat",
                                error="InvalidArgumentError: no XLA kernel")
    return baseline, opq, failed

  def test_paired_ratio_is_the_median_of_per_round_ratios(self):
    baseline, opq, failed = self._timings()
    self.assertAlmostEqual(step_timing.paired_ratio(opq, baseline), 1.2)
    self.assertAlmostEqual(
        step_timing.paired_ratio(opq, baseline, "cpu_ms"), 1.12)
    self.assertIsNone(step_timing.paired_ratio(failed, baseline))

  def test_a_failed_variant_shows_its_error_instead_of_times(self):
    baseline, opq, failed = self._timings()
    settings = {"date": "d", "command": "c", "batch_size": 8,
                "image_size": 224, "steps": 3, "warmup": 1,
                "strategy": "mirrored", "replicas": 1}
    notes = {"m": {"model": "resnet50", "image_size": 224, "parameters": 1e6,
                   "pruning_rate": 0.79, "bits": 4, "weight_decay": 1e-4}}
    text = step_time.results_markdown(
        [baseline, opq, failed], notes, settings, (1.0, 2.0))
    rows = _rows(text)
    self.assertEqual(rows[("m", "False", "OPQ (opq_tf.apply)")],
                     ["1.0", "120.0", "110.0", "56.0", "1.20x", "1.12x"])
    pqat = rows[("m", "False", "tfmot PQAT (prune-preserve 8-bit QAT)")]
    self.assertEqual(pqat, ["error"] * 5 + ["InvalidArgumentError: no XLA "
                                            "kernel"])
    # OPQ - FP32 = 56 - 50 CPU ms; no verdict column.
    self.assertIn("| m | False | 1.20x / 1.12x | n/a / n/a | n/a / n/a | "
                  "n/a / n/a | 6.0 | n/a |", text)
    self.assertNotIn("Keras 3", text)

  def test_keras3_rows_come_from_each_backends_results(self):
    baseline, opq, _ = self._timings()
    baseline.jit_compile = opq.jit_compile = True
    keras3 = {
        "jax": {"timings": step_timing.rows([baseline, opq]),
                "machine": {"keras": "3.15.1", "backend_version": "0.10.2",
                            "devices": ["cpu:0"]}},
        "tensorflow": {"error": "exit 1: ImportError: no | keras"},
    }
    text = "\n".join(step_time.keras3_markdown(keras3))
    rows = _keras3_rows(text)
    self.assertEqual(rows[("m", "jax", "True", "OPQ (opq_tf.apply)")],
                     ["1.0", "120.0", "56.0", "1.20x", "1.12x"])
    self.assertEqual(rows[("m", "jax", "True", "FP32")][3:], ["1.00x", "1.00x"])
    self.assertIn("| all | tensorflow | - | - | error | error | error | error "
                  "| exit 1: ImportError: no / keras |", text)
    self.assertIn("- jax: Keras 3.15.1, jax 0.10.2, devices cpu:0", text)

  def test_error_text_names_the_innermost_error(self):
    error = RuntimeError(
        "in user code:\n\n  File x\n    RuntimeError: Exception encountered "
        "when calling layer 'q'.\n\n        RuntimeError: `merge_call` called "
        "while defining a new graph or a tf.function. This can often happen")
    self.assertEqual(step_timing.error_text(error),
                     "RuntimeError: `merge_call` called while defining a new "
                     "graph or a tf.function")


if __name__ == "__main__":
  absltest.main()
