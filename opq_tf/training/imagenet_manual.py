"""ImageNet's manual-download contract: what a user puts where, and prepare.

TFDS's `imagenet2012` builder cannot download ImageNet (registration); it
reads the ILSVRC-2012 archives from a manual_dir and writes its records into
a data_dir, once:

    <manual_dir>/ILSVRC2012_img_train.tar   one tar per synset inside
                                            (n01440764.tar, ...), each holding
                                            JPEGs such as n01440764_10026.JPEG
    <manual_dir>/ILSVRC2012_img_val.tar     ILSVRC2012_val_00000001.JPEG ...
                                            ILSVRC2012_val_00050000.JPEG
    <manual_dir>/ILSVRC2012_img_test.tar    optional, unlabelled, not used here

    check_manual_dir(manual_dir)           # before anything is written
    prepare(data_dir, manual_dir)          # once; later calls are no-ops

Label i is line i of TFDS's bundled labels.txt (`synsets()`); validation image
ILSVRC2012_val_<k> has the synset of line k of validation_labels.txt
(`validation_synsets()`). `python -m opq_tf.training.digits_imagenet --manual_dir=DIR`
writes a small stand-in of the same layout from scikit-learn's digits.

Where a training config's data lives, and preparing it once per run under
tf.distribute, is run policy: opq_tf.training.data.

Importing this module needs neither TensorFlow nor TFDS (they are imported
where used), so the digits stand-in builds without them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tarfile
from typing import Any, Optional

import numpy as np

DATASET_NAME = "imagenet2012"
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
TEST_TAR = "ILSVRC2012_img_test.tar"
# Record files per split the digits stand-in is prepared with, so that up to
# this many workers each get a file to read (file-level sharding).
DIGITS_NUM_SHARDS = 4

# Member names: of the train tar, and of the val tar (which the pipeline
# also labels by).
_SYNSET_TAR = re.compile(r"n\d{8}\.tar")
VAL_JPEG_PATTERN = r"ILSVRC2012_val_\d{8}\.JPEG"
_VAL_JPEG = re.compile(VAL_JPEG_PATTERN)


# --------------------------------------------------------------------------
# TFDS's bundled label files.


def _tfds_imagenet_file(name: str) -> str:
  """Path of a file bundled with TFDS's imagenet2012 builder."""
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "tensorflow_datasets is not installed; it ships the ImageNet label "
        "files. Install it with `pip install -r requirements.txt`.")
  root = list(spec.submodule_search_locations)[0]
  return os.path.join(root, "datasets", "imagenet2012", name)


def synsets() -> list[str]:
  """The 1000 synset ids in TFDS label order (label i = labels.txt line i)."""
  with open(_tfds_imagenet_file("labels.txt")) as f:
    return f.read().split()


def validation_synsets() -> list[str]:
  """50 000 synsets; position k - 1 is that of ILSVRC2012_val_{k:08d}.JPEG."""
  with open(_tfds_imagenet_file("validation_labels.txt")) as f:
    return f.read().split()


def validation_label_table() -> np.ndarray:
  """int32 [50000]: label of ILSVRC2012_val_{k:08d}.JPEG at position k - 1."""
  index = {synset: i for i, synset in enumerate(synsets())}
  return np.array([index[s] for s in validation_synsets()], np.int32)


# --------------------------------------------------------------------------
# The manual_dir.


def _instructions(manual_dir: str) -> str:
  return (
      f"Put the ILSVRC-2012 archives (https://image-net.org/download-images) "
      f"unchanged in {manual_dir}:\n"
      f"  {os.path.join(manual_dir, TRAIN_TAR)}  (one tar per synset inside: "
      "n01440764.tar, n01443537.tar, ...)\n"
      f"  {os.path.join(manual_dir, VAL_TAR)}  (ILSVRC2012_val_00000001.JPEG "
      "... ILSVRC2012_val_00050000.JPEG)\n"
      f"  ({TEST_TAR} is optional and unused.)\n"
      "Or build the small embedded stand-in from scikit-learn's digits:\n"
      f"  python -m opq_tf.training.digits_imagenet --manual_dir={manual_dir}"
  )


def _manual_dir_error(manual_dir: str, problem: str) -> ValueError:
  return ValueError(
      f"ImageNet manual_dir {manual_dir!r} is not usable: {problem}.\n"
      + _instructions(manual_dir)
  )


def _member_names(path: str, limit: Optional[int]) -> list[str]:
  """Names of the first `limit` members (all if None) of an uncompressed tar."""
  from opq_tf.tf_keras._keras import tf  # pylint: disable=g-import-not-at-top

  names = []
  with tf.io.gfile.GFile(path, "rb") as f:
    with tarfile.open(fileobj=f, mode="r:") as tar:
      while limit is None or len(names) < limit:
        member = tar.next()
        if member is None:
          break
        if member.isfile():
          names.append(member.name)
  return names


def check_manual_dir(manual_dir: str) -> None:
  """Raises ValueError unless `manual_dir` holds usable ILSVRC-2012 tars.

  Checked before any preparation or training: the directory exists; the train
  and val tars exist, are uncompressed tar archives and are not empty; every
  member of the train tar is a per-synset tar of one of the 1000 synsets; the
  first members of the val tar are ILSVRC2012_val_XXXXXXXX.JPEG files. Only
  tar headers are read (the train tar has ~1000 members), not the images.
  The message of every error repeats what must be where.
  """
  from opq_tf.tf_keras._keras import tf  # pylint: disable=g-import-not-at-top

  manual_dir = os.fspath(manual_dir)
  if not tf.io.gfile.isdir(manual_dir):
    raise _manual_dir_error(manual_dir, "the directory does not exist")
  for name in (TRAIN_TAR, VAL_TAR):
    path = os.path.join(manual_dir, name)
    if not tf.io.gfile.exists(path):
      raise _manual_dir_error(manual_dir, f"{name} is missing")
    if tf.io.gfile.isdir(path):
      raise _manual_dir_error(manual_dir, f"{name} is a directory, not a file")
    try:
      names = _member_names(path, limit=None if name == TRAIN_TAR else 100)
    except tarfile.TarError as e:
      raise _manual_dir_error(
          manual_dir, f"{name} is not an uncompressed tar archive ({e})"
      ) from e
    if not names:
      raise _manual_dir_error(manual_dir, f"{name} is an empty tar archive")
    pattern, expected = (
        (_SYNSET_TAR, "one tar per synset (n01440764.tar, ...)")
        if name == TRAIN_TAR
        else (_VAL_JPEG, "ILSVRC2012_val_XXXXXXXX.JPEG images")
    )
    wrong = [n for n in names if not pattern.fullmatch(n)]
    if wrong:
      raise _manual_dir_error(
          manual_dir,
          f"{name} holds {wrong[0]!r} ({len(wrong)} such members) where "
          f"{expected} are expected",
      )
    if name == TRAIN_TAR:
      known = set(synsets())
      unknown = sorted(n[:-4] for n in names if n[:-4] not in known)
      if unknown:
        raise _manual_dir_error(
            manual_dir,
            f"{name} holds {unknown[0]}.tar, which is not one of the 1000 "
            "ILSVRC-2012 synsets of TFDS's labels.txt",
        )


# --------------------------------------------------------------------------
# The prepared TFDS data_dir.


def builder(data_dir: str) -> Any:
  """TFDS's imagenet2012 builder on `data_dir` (prepared or not)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.builder(DATASET_NAME, data_dir=os.fspath(data_dir))


def is_prepared(data_dir: str) -> bool:
  """True if TFDS imagenet2012 is prepared under `data_dir`."""
  prepared = builder(data_dir)
  # Checking existence first avoids TFDS's warning about a missing variant dir.
  return prepared.data_path.exists() and prepared.is_prepared()


def prepare(
    data_dir: str,
    manual_dir: Optional[str] = None,
    *,
    num_shards: Optional[int] = None,
) -> Any:
  """Prepares TFDS imagenet2012 under `data_dir` from `manual_dir`, offline.

  Runs the real builder's download_and_prepare with the manual_dir; nothing is
  downloaded (GCS is not tried). If the dataset is already prepared under
  `data_dir` this is a no-op (manual_dir is then not read, and not needed),
  so a changed manual_dir needs a fresh data_dir.

  Args:
    data_dir: TFDS data_dir; the records go to data_dir/imagenet2012/5.1.0 and
      TFDS's scratch directory to data_dir/downloads.
    manual_dir: directory with the ILSVRC-2012 tars (see `check_manual_dir`).
    num_shards: record files per split; None lets TFDS choose (1 for a small
      dataset). File-level sharding needs at least one file per input pipeline
      (worker), so multi-worker runs on a small dataset need num_shards >=
      the number of workers.

  Returns:
    The prepared tfds builder.
  """
  prepared = builder(data_dir)
  if prepared.data_path.exists() and prepared.is_prepared():
    return prepared
  if manual_dir is None:
    raise ValueError(
        f"TFDS {DATASET_NAME} is not prepared under {data_dir!r} and no "
        "manual_dir was given. " + _instructions("<manual_dir>")
    )
  check_manual_dir(manual_dir)
  try:
    # pylint: disable-next=g-import-not-at-top,unused-import
    import importlib_resources  # noqa: F401
  except ImportError as e:
    raise ImportError(
        "tensorflow-datasets 4.9.x needs the `importlib_resources` package in "
        "download_and_prepare even on Python >= 3.9; install it (it is in "
        "requirements.txt): pip install importlib_resources"
    ) from e
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  prepared.download_and_prepare(
      download_dir=os.path.join(os.fspath(data_dir), "downloads"),
      download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(manual_dir),
          try_download_gcs=False,
          num_shards=num_shards,
      ),
  )
  return prepared
