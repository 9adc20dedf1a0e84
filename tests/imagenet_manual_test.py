"""Tests for opq_tf.training.imagenet_manual: the ILSVRC manual_dir, label files, prepare.

The digits stand-in (digits_data, shared per process) is the manual_dir and
the prepared data_dir; tests that break a manual_dir break a copy.
"""

import collections
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from opq_tf.training import imagenet_manual
import digits_data


def _tar(path: str, members: dict[str, bytes]) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


class LabelFilesTest(absltest.TestCase):

  def test_synsets_in_label_order(self):
    synsets = imagenet_manual.synsets()
    self.assertLen(synsets, 1000)
    self.assertLen(set(synsets), 1000)
    self.assertEqual(synsets[:2], ["n01440764", "n01443537"])

  def test_fifty_validation_images_per_synset(self):
    counts = collections.Counter(imagenet_manual.validation_synsets())
    self.assertEqual(set(counts), set(imagenet_manual.synsets()))
    self.assertEqual(set(counts.values()), {50})

  def test_needs_no_tensorflow(self):
    code = ("import sys; from opq_tf.training import imagenet_manual; "
            "imagenet_manual.synsets(); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    self.assertEqual(out.strip(), "False")




class ManualDirTest(digits_data.DigitsTestCase, parameterized.TestCase):

  def test_prepare_again_is_a_no_op_that_reads_no_manual_dir(self):
    version_dir = os.path.join(self.data_dir, "imagenet2012", "5.1.0")
    before = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns
              for f in os.listdir(version_dir)}
    # Not even a manual_dir is needed, and a missing one is not looked at:
    # the records are not built again.
    imagenet_manual.prepare(self.data_dir)
    builder = imagenet_manual.prepare(self.data_dir,
                                      os.path.join(self.root, "no_manual"))
    after = {f: os.stat(os.path.join(version_dir, f)).st_mtime_ns
             for f in os.listdir(version_dir)}
    self.assertEqual(before, after)
    self.assertEqual(builder.info.splits["train"].num_examples, 1297)
    self.assertLen(builder.info.splits["train"].shard_lengths,
                   digits_data.NUM_SHARDS)

  def test_prepare_checks_the_manual_dir_before_writing(self):
    data_dir = tempfile.mkdtemp(dir=self.root)
    with self.assertRaisesRegex(ValueError, "does not exist"):
      imagenet_manual.prepare(data_dir, os.path.join(data_dir, "nowhere"))
    self.assertEmpty(os.listdir(data_dir))

  def test_check_manual_dir_accepts_the_digits_dir(self):
    imagenet_manual.check_manual_dir(self.manual_dir)

  @parameterized.named_parameters(
      ("missing_dir", "missing_dir", "the directory does not exist"),
      ("missing_val_tar", "missing_val_tar",
       "ILSVRC2012_img_val.tar is missing"),
      ("not_a_tar", "not_a_tar", "ILSVRC2012_img_train.tar is not an "
       "uncompressed tar archive"),
      ("empty_train_tar", "empty_train_tar", "ILSVRC2012_img_train.tar is an "
       "empty tar archive"),
      ("no_synset_tars", "no_synset_tars", "holds 'n01440764_1.JPEG' .* one "
       r"tar per synset \(n01440764.tar"),
      ("unknown_synset", "unknown_synset", "n99999999.tar, which is not one"),
      ("bad_val_names", "bad_val_names", "holds 'val_1.jpg' .* "
       "ILSVRC2012_val_XXXXXXXX.JPEG"),
  )
  def test_check_manual_dir_errors(self, case, message):
    manual_dir = os.path.join(tempfile.mkdtemp(dir=self.root), "manual")
    if case != "missing_dir":
      shutil.copytree(self.manual_dir, manual_dir)
    train = os.path.join(manual_dir, "ILSVRC2012_img_train.tar")
    val = os.path.join(manual_dir, "ILSVRC2012_img_val.tar")
    if case == "missing_val_tar":
      os.remove(val)
    elif case == "not_a_tar":
      with open(train, "w") as f:
        f.write("not a tar\n" * 100)
    elif case == "empty_train_tar":
      _tar(train, {})
    elif case == "no_synset_tars":
      _tar(train, {"n01440764_1.JPEG": b"\xff\xd8"})
    elif case == "unknown_synset":
      _tar(train, {"n99999999.tar": b""})
    elif case == "bad_val_names":
      _tar(val, {"val_1.jpg": b"\xff\xd8"})
    with self.assertRaisesRegex(ValueError, message) as caught:
      imagenet_manual.check_manual_dir(manual_dir)
    text = str(caught.exception)
    self.assertIn(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), text)
    self.assertIn(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), text)
    self.assertIn("python -m opq_tf.training.digits_imagenet --manual_dir=", text)

  def test_is_prepared(self):
    self.assertTrue(imagenet_manual.is_prepared(self.data_dir))
    self.assertFalse(imagenet_manual.is_prepared(tempfile.mkdtemp(dir=self.root)))


if __name__ == "__main__":
  absltest.main()
