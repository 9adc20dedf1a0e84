"""Builds a small ILSVRC-2012-shaped manual_dir from scikit-learn's digits.

The real ImageNet tars cannot be fetched here (registration, 150 GB), but the
real TFDS `imagenet2012` builder can still be exercised end to end if its
manual-download contract is met with small real images. scikit-learn ships
1797 handwritten digits (8x8, `sklearn.datasets.load_digits`, no download);
each is upscaled bilinearly to `image_size` x `image_size`, replicated to RGB
and stored as a JPEG (Pillow, quality 95, no chroma subsampling).

Digit d is filed under the d-th synset of TFDS's imagenet2012 label order
(labels.txt: n01440764 tench, n01443537 goldfish, ...), so the TFDS label of a
digit-d image is d and `num_classes=10` works. The layout is exactly what the
builder reads:

    <manual_dir>/ILSVRC2012_img_train.tar
        n01440764.tar            one tar per synset, in label order
            n01440764_<i>.JPEG   i = index of the digit in load_digits()
        ...
    <manual_dir>/ILSVRC2012_img_val.tar
        ILSVRC2012_val_<k>.JPEG  k (1-based, 8 digits) is a line of TFDS's
                                 validation_labels.txt whose synset is digit d

validation_labels.txt has 50 lines for each synset, so at most 50 digits per
class go to validation; the rest of each class goes to train. The split is a
seeded permutation per class, so it is the same on every machine.

The test tar (ILSVRC2012_img_test.tar) is optional for the builder and is not
written. Note: TFDS labels the validation split by *sorted position* in the val
tar, which agrees with the file's index only for the full 50 000-image tar;
`opq_tf.training.imagenet_input` therefore labels validation images by their file name.

Usage:
  python -m opq_tf.training.digits_imagenet --manual_dir=/tmp/digits_manual
"""

import io
import os
import tarfile
from typing import Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from opq_tf.training import imagenet_manual
from opq_tf.training.imagenet_manual import TRAIN_TAR, VAL_TAR

NUM_CLASSES = 10
MAX_VAL_PER_CLASS = 50  # validation_labels.txt holds 50 images per synset.
_JPEG_QUALITY = 95
_MTIME = 1325376000  # 2012-01-01, fixed so that the tars are byte-reproducible.


def digit_synsets() -> list[str]:
  """The synsets digits 0..9 are filed under: the first ten in label order."""
  return imagenet_manual.synsets()[:NUM_CLASSES]


def render_digit(digit_image: np.ndarray, image_size: int) -> np.ndarray:
  """One 8x8 digit (values 0..16) -> uint8 [image_size, image_size, 3] RGB.

  Intensity 16 (full ink) maps to 255; the upscale is Pillow's bilinear filter.
  """
  grey = np.round(np.asarray(digit_image, np.float64) * (255.0 / 16.0))
  small = Image.fromarray(grey.clip(0, 255).astype(np.uint8), mode="L")
  large = small.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(large.convert("RGB"))


def _encode_jpeg(rgb: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rgb, mode="RGB").save(
      buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0
  )
  return buffer.getvalue()


def digit_assignment(
    val_per_class: int = MAX_VAL_PER_CLASS, seed: int = 0
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
  """Which load_digits() image goes to which archive member.

  Returns:
    (train, val): train maps synset -> {member file name: digit index}, val
    maps 'ILSVRC2012_val_XXXXXXXX.JPEG' -> digit index. For every class d the
    digits of class d are permuted with `np.random.default_rng(seed + d)`; the
    first `val_per_class` go to the first `val_per_class` validation file
    indices whose synset (in validation_labels.txt) is digit d's synset.
  """
  if not 1 <= val_per_class <= MAX_VAL_PER_CLASS:
    raise ValueError(
        f"val_per_class={val_per_class} is out of range: TFDS's "
        f"validation_labels.txt has {MAX_VAL_PER_CLASS} validation images per "
        f"synset. Pass 1 <= val_per_class <= {MAX_VAL_PER_CLASS}."
    )
  targets = load_digits().target
  synsets = digit_synsets()
  val_synsets = imagenet_manual.validation_synsets()
  train: dict[str, dict[str, int]] = {}
  val: dict[str, int] = {}
  for digit, synset in enumerate(synsets):
    indices = np.flatnonzero(targets == digit)
    indices = np.random.default_rng(seed + digit).permutation(indices)
    val_files = [
        f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        for k, s in enumerate(val_synsets)
        if s == synset
    ]
    for name, index in zip(val_files[:val_per_class], indices[:val_per_class]):
      val[name] = int(index)
    train[synset] = {
        f"{synset}_{int(index)}.JPEG": int(index)
        for index in sorted(indices[val_per_class:])
    }
  return train, dict(sorted(val.items()))


def _tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      info.mtime = _MTIME
      info.mode = 0o644
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def build_manual_dir(
    manual_dir: str,
    image_size: int = 32,
    val_per_class: int = MAX_VAL_PER_CLASS,
    seed: int = 0,
) -> dict[str, int]:
  """Writes ILSVRC2012_img_{train,val}.tar of digits into `manual_dir`.

  Both tars are written to hidden temporary files in `manual_dir` and renamed
  into place only once both are complete, so an interrupted build leaves no
  half-written tar under the names the builder reads. Re-running with the same
  arguments rewrites byte-identical tars.

  Args:
    manual_dir: directory to create or reuse.
    image_size: side of the stored square JPEGs (>= 8; the digits are 8x8).
    val_per_class: validation images per digit, 1..50.
    seed: seed of the per-class train/validation permutation.

  Returns:
    {'train': n, 'validation': n, 'num_classes': 10, 'image_size': s} where
    n counts images (1797 in total).
  """
  if int(image_size) < 8:
    raise ValueError(
        f"image_size={image_size} is smaller than the 8x8 source digits; pass "
        "image_size >= 8 (e.g. 32)."
    )
  images = load_digits().images
  train, val = digit_assignment(val_per_class, seed)

  def jpeg(index: int) -> bytes:
    return _encode_jpeg(render_digit(images[index], image_size))

  train_tar = _tar_bytes([
      (f"{synset}.tar", _tar_bytes([(n, jpeg(i)) for n, i in files.items()]))
      for synset, files in train.items()
  ])
  val_tar = _tar_bytes([(n, jpeg(i)) for n, i in val.items()])

  os.makedirs(manual_dir, exist_ok=True)
  temporary = {}
  try:
    for name, data in ((TRAIN_TAR, train_tar), (VAL_TAR, val_tar)):
      temporary[name] = os.path.join(manual_dir, f".{name}.{os.getpid()}.tmp")
      with open(temporary[name], "wb") as f:
        f.write(data)
    for name, path in temporary.items():
      os.replace(path, os.path.join(manual_dir, name))
  finally:
    for path in temporary.values():
      if os.path.exists(path):
        os.remove(path)
  return {
      "train": sum(len(files) for files in train.values()),
      "validation": len(val),
      "num_classes": NUM_CLASSES,
      "image_size": int(image_size),
  }


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")

  counts = build_manual_dir(
      flags.FLAGS.manual_dir,
      image_size=flags.FLAGS.image_size,
      val_per_class=flags.FLAGS.val_per_class,
      seed=flags.FLAGS.seed,
  )
  print(
      f"Wrote {TRAIN_TAR} ({counts['train']} images) and {VAL_TAR} "
      f"({counts['validation']} images), {counts['num_classes']} classes at "
      f"{counts['image_size']}x{counts['image_size']} to "
      f"{flags.FLAGS.manual_dir}"
  )


def _define_flags() -> None:
  # Defined only when run as a program: the trainers import this module, and
  # their manual_dir is a config field (--config.manual_dir), not a flag.
  flags.DEFINE_string(
      "manual_dir", None, "Directory to write the ILSVRC2012 tars into."
  )
  flags.DEFINE_integer("image_size", 32, "Side of the stored JPEGs.")
  flags.DEFINE_integer(
      "val_per_class", MAX_VAL_PER_CLASS, "Validation images per digit (1..50)."
  )
  flags.DEFINE_integer("seed", 0, "Seed of the train/validation split.")
  flags.mark_flag_as_required("manual_dir")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
