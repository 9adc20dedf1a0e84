"""Tests for benchmarks/pretrained_e2e.py without the shared data or a run.

The run itself (TFDS preparation, trainers.compress on the real MobileNet)
takes minutes and needs ../shared; these check the parts that can rot
quietly: the ILSVRC tars it writes, the results table, and the clean skip.
"""

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from benchmarks import pretrained_e2e
from opq_tf.training import imagenet_manual

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG")
  return buffer.getvalue()


def _report(top1_after: float) -> dict:
  figures = lambda top1: {"top1": top1, "top5": top1 + 0.2}
  return {"pruning_rate": 0.656, "bits": 4,
          "accuracy": {"fp32": figures(0.8),
                       "compressed_before_finetune": figures(0.0),
                       "calibrated_before_finetune": figures(0.4),
                       "compressed_after_finetune": figures(top1_after)},
          "compression": {"weight_bits_ratio": 21.5, "model_ratio": 13.3,
                          "packed_bytes": 782746,
                          "realised_pruning_rate": 0.656}}


class PretrainedE2eBenchmarkTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def test_manual_dir_is_what_the_tfds_builder_reads(self):
    images = os.path.join(self.root, "images")
    os.makedirs(images)
    synsets = imagenet_manual.synsets()
    chosen = [synsets[3], synsets[1], synsets[900], synsets[42]]
    for seed, synset in enumerate(chosen):
      with open(os.path.join(images, f"{synset}.JPEG"), "wb") as f:
        f.write(_jpeg(seed))
    manual_dir = os.path.join(self.root, "manual")
    counts = pretrained_e2e.write_manual_dir(images, manual_dir)
    self.assertEqual(counts, {"train": 2, "validation": 2})
    imagenet_manual.check_manual_dir(manual_dir)
    first_half, second_half = sorted(chosen)[:2], sorted(chosen)[2:]
    with tarfile.open(os.path.join(manual_dir, imagenet_manual.TRAIN_TAR)) as tar:
      self.assertEqual(tar.getnames(), [f"{s}.tar" for s in first_half])
    val_synsets = imagenet_manual.validation_synsets()
    with tarfile.open(os.path.join(manual_dir, imagenet_manual.VAL_TAR)) as tar:
      labelled = sorted(val_synsets[int(name[15:23]) - 1]
                        for name in tar.getnames())
      self.assertEqual(labelled, second_half)
      for member in tar.getmembers():  # The bytes are copied unchanged.
        synset = val_synsets[int(member.name[15:23]) - 1]
        with open(os.path.join(images, f"{synset}.JPEG"), "rb") as f:
          self.assertEqual(tar.extractfile(member).read(), f.read())

  def test_markdown_puts_the_lr_table_and_in_memory_rows_beside(self):
    context = {"date": "2026-11-27", "machine": "x86_64, 2 cores",
               "trainer_seconds": 48.0, "calibration_images": 500,
               "num_epochs": 1, "global_batch_size": 25, "learning_rate": 5e-5,
               "in_memory_source": "docs/pretrained_results.json"}
    rows = [{"calibration": "batchnorm", "top1": 0.41, "top5": 0.66,
             "weight_bits_ratio": 21.4}]
    text = pretrained_e2e.markdown(_report(0.406), rows, context,
                                   {5e-4: _report(0.362)})
    self.assertIn("| compressed + calibration + finetuning | 40.6% | 60.6% |",
                  text)
    self.assertIn("| 5e-05 (config) | 40.6% | 60.6% |", text)
    self.assertLess(text.index("| 0.0005 | 36.2%"), text.index("| 5e-05"))
    self.assertIn("| batchnorm | 41.0% | 66.0% | 21.40x |", text)
    self.assertIn("| compressed + BatchNorm calibration | 40.0% |", text)
    reconstructed = {**_report(0.406), "calibration": {"reconstruct": True}}
    self.assertIn("| compressed + calibration (BatchNorm + reconstruction) "
                  "| 40.0% |", pretrained_e2e.markdown(reconstructed, rows,
                                                       context))
    self.assertIn("no row for p = 0.656",
                  pretrained_e2e.markdown(_report(0.4), [], context))

  def test_skips_cleanly_without_the_shared_images(self):
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.pretrained_e2e",
         f"--images={self.root}/absent", f"--out={self.root}/out.md"],
        cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
    self.assertEqual(completed.returncode, 0, msg=completed.stderr[-3000:])
    self.assertIn("Skipping", completed.stdout)
    self.assertFalse(os.path.exists(os.path.join(self.root, "out.md")))


if __name__ == "__main__":
  absltest.main()
