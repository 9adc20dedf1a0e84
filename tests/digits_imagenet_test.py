"""Tests for opq_tf.training.digits_imagenet: the ILSVRC-shaped digits manual_dir."""

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from opq_tf.training import digits_imagenet
from opq_tf.training import imagenet_manual

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _members(tar_bytes_or_path) -> dict[str, bytes]:
  if isinstance(tar_bytes_or_path, bytes):
    tar = tarfile.open(fileobj=io.BytesIO(tar_bytes_or_path), mode="r:")
  else:
    tar = tarfile.open(tar_bytes_or_path, mode="r:")
  with tar:
    return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


class DigitsImagenetTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.manual_dir = os.path.join(cls.root, "manual")
    cls.counts = digits_imagenet.build_manual_dir(cls.manual_dir, image_size=40)
    cls.digits = load_digits()
    tars = {name: os.path.join(cls.manual_dir, name)
            for name in (digits_imagenet.TRAIN_TAR, digits_imagenet.VAL_TAR)}
    cls.train = _members(tars[digits_imagenet.TRAIN_TAR])
    cls.val = _members(tars[digits_imagenet.VAL_TAR])

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root)
    super().tearDownClass()

  def _image(self, data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    self.assertEqual(image.format, "JPEG")
    self.assertEqual(image.mode, "RGB")
    return np.asarray(image)

  def _assert_is_digit(self, data: bytes, index: int) -> None:
    image = self._image(data)
    self.assertEqual(image.shape, (40, 40, 3))
    expected = digits_imagenet.render_digit(self.digits.images[index], 40)
    self.assertLessEqual(np.abs(image.astype(int) - expected).max(), 8)

  def test_counts(self):
    self.assertEqual(
        self.counts,
        {"train": 1297, "validation": 500, "num_classes": 10, "image_size": 40},
    )
    self.assertLen(self.val, 500)
    self.assertEqual(
        sum(len(_members(data)) for data in self.train.values()), 1297
    )

  def test_train_tar_is_one_tar_per_synset_in_label_order(self):
    synsets = imagenet_manual.synsets()
    self.assertLen(synsets, 1000)
    self.assertEqual(synsets[:2], ["n01440764", "n01443537"])
    self.assertEqual(list(self.train), [f"{s}.tar" for s in synsets[:10]])
    targets = self.digits.target
    for digit, synset in enumerate(synsets[:10]):
      images = _members(self.train[f"{synset}.tar"])
      self.assertLen(images, np.sum(targets == digit) - 50)
      for name, data in list(images.items())[:5]:
        self.assertRegex(name, rf"^{synset}_\d+\.JPEG$")
        index = int(name[len(synset) + 1 : -len(".JPEG")])
        self.assertEqual(targets[index], digit)
        self._assert_is_digit(data, index)

  def test_validation_files_are_labelled_by_their_line(self):
    synsets = imagenet_manual.synsets()
    val_synsets = imagenet_manual.validation_synsets()
    self.assertLen(val_synsets, 50000)
    _, assignment = digits_imagenet.digit_assignment()
    self.assertEqual(sorted(assignment), list(self.val))
    for name, data in self.val.items():
      self.assertRegex(name, r"^ILSVRC2012_val_\d{8}\.JPEG$")
      line = int(name[len("ILSVRC2012_val_") : -len(".JPEG")])
      index = assignment[name]
      self.assertEqual(
          synsets.index(val_synsets[line - 1]), self.digits.target[index]
      )
      self._assert_is_digit(data, index)
    digits = [self.digits.target[i] for i in assignment.values()]
    np.testing.assert_array_equal(np.bincount(digits), [50] * 10)

  def test_every_digit_is_used_once(self):
    train, val = digits_imagenet.digit_assignment()
    used = list(val.values())
    for files in train.values():
      used.extend(files.values())
    self.assertCountEqual(used, range(1797))

  def test_rebuild_is_byte_identical_and_leaves_no_temporaries(self):
    other = os.path.join(self.root, "again")
    digits_imagenet.build_manual_dir(other, image_size=40)
    for name in (digits_imagenet.TRAIN_TAR, digits_imagenet.VAL_TAR):
      self.assertEqual(
          _sha256(os.path.join(self.manual_dir, name)),
          _sha256(os.path.join(other, name)),
      )
    digits_imagenet.build_manual_dir(other, image_size=16, val_per_class=5)
    self.assertCountEqual(
        os.listdir(other), [digits_imagenet.TRAIN_TAR, digits_imagenet.VAL_TAR]
    )
    self.assertLen(_members(os.path.join(other, digits_imagenet.VAL_TAR)), 50)

  def test_seed_changes_the_split(self):
    _, val0 = digits_imagenet.digit_assignment(seed=0)
    _, val1 = digits_imagenet.digit_assignment(seed=1)
    self.assertEqual(list(val0), list(val1))
    self.assertNotEqual(list(val0.values()), list(val1.values()))

  @parameterized.named_parameters(
      ("no_validation", dict(val_per_class=0), "val_per_class=0"),
      ("too_much_validation", dict(val_per_class=51), "1 <= val_per_class"),
      ("too_small", dict(image_size=4), "image_size >= 8"),
  )
  def test_bad_arguments(self, kwargs, message):
    target = os.path.join(self.root, "bad")
    with self.assertRaisesRegex(ValueError, message):
      digits_imagenet.build_manual_dir(target, **kwargs)
    self.assertFalse(os.path.exists(target))

  def test_main_writes_the_tars(self):
    target = os.path.join(self.root, "cli")
    result = subprocess.run(
        [sys.executable, "-m", "opq_tf.training.digits_imagenet",
         f"--manual_dir={target}", "--image_size=12", "--val_per_class=3"],
        cwd=_REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn("(30 images)", result.stdout)
    self.assertLen(_members(os.path.join(target, digits_imagenet.VAL_TAR)), 30)


if __name__ == "__main__":
  absltest.main()
