"""The digits stand-in of ImageNet, built and prepared once per test process.

Building the ILSVRC tars and running the real TFDS builder on them takes
seconds; every test file that needs data shares one copy per process (one
per pytest-xdist worker) instead of rebuilding it per class. Tests read it
and never write into it (copy it first to break it).
"""

import atexit
import os
import shutil
import tempfile

from opq_tf.training import digits_imagenet
from opq_tf.training import imagenet_manual

IMAGE_SIZE = 32
# Record files per split: as many as the trainers prepare the digits with
# (4), so that tests see the batches a run_default user sees, and up to four
# workers (or input pipelines) get a file each.
NUM_SHARDS = imagenet_manual.DIGITS_NUM_SHARDS
_dirs: dict[str, str] = {}


def dirs() -> tuple[str, str]:
  """(manual_dir, data_dir) of the shared digits data, made on first call.

  manual_dir holds the two ILSVRC tars of 32x32 digits (1297 train, 500
  validation images, 10 classes); data_dir is TFDS imagenet2012 prepared
  from it with NUM_SHARDS record files per split.
  """
  if not _dirs:
    root = tempfile.mkdtemp(prefix="opq_digits_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    manual_dir = os.path.join(root, "manual")
    data_dir = os.path.join(root, "tfds")
    digits_imagenet.build_manual_dir(manual_dir, image_size=IMAGE_SIZE)
    imagenet_manual.prepare(data_dir, manual_dir, num_shards=NUM_SHARDS)
    _dirs.update(manual_dir=manual_dir, data_dir=data_dir)
  return _dirs["manual_dir"], _dirs["data_dir"]


class DigitsTestCase:
  """Mixin for test classes: `cls.manual_dir`, `cls.data_dir` (the shared
  digits data) and `cls.root`, a temporary directory of the class's own,
  removed after it. Put it first among the bases."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.manual_dir, cls.data_dir = dirs()

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def workdir(cls, name: str) -> str:
    return os.path.join(cls.root, name)
