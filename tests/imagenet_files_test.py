"""Tests for opq_tf.imagenet_files: TFDS's bundled ImageNet label files."""

import collections
import subprocess
import sys

from absl.testing import absltest

from opq_tf import imagenet_files


class ImagenetFilesTest(absltest.TestCase):

  def test_synsets_in_label_order(self):
    synsets = imagenet_files.synsets()
    self.assertLen(synsets, 1000)
    self.assertLen(set(synsets), 1000)
    self.assertEqual(synsets[:2], ["n01440764", "n01443537"])

  def test_fifty_validation_images_per_synset(self):
    counts = collections.Counter(imagenet_files.validation_synsets())
    self.assertEqual(set(counts), set(imagenet_files.synsets()))
    self.assertEqual(set(counts.values()), {50})

  def test_needs_no_tensorflow(self):
    code = ("import sys; from opq_tf import imagenet_files; "
            "imagenet_files.synsets(); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    self.assertEqual(out.strip(), "False")


if __name__ == "__main__":
  absltest.main()
