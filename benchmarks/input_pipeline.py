"""Throughput of the TFDS imagenet2012 training pipeline, in images per second.

By default the digits stand-in (opq_tf.training.digits_imagenet) is built and prepared
in a temporary directory; pass --data_dir (already prepared, or with
--manual_dir to prepare it) to measure real ImageNet. The pipeline is the one
training uses (make_dataset_fn(train=True): file shuffle, shuffle, repeat,
decode fused with a random crop, flip, resize, batch, prefetch), on a single
input pipeline, timed over --num_batches batches after --warmup_batches.

    python -m benchmarks.input_pipeline
    python -m benchmarks.input_pipeline --data_dir=~/tfds --image_sizes=224

Prints a markdown table, one row per image size.
"""

import os
import shutil
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

from opq_tf.training import digits_imagenet
from opq_tf.training import imagenet_input
from opq_tf.training import imagenet_manual
from opq_tf.tf_keras._keras import tf

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data_dir; default: a temporary one with digits."
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "ILSVRC-2012 tars to prepare from, if not prepared."
)
_DIGITS_SIZE = flags.DEFINE_integer(
    "digits_image_size", 32, "Side of the digits JPEGs (the native size)."
)
_IMAGE_SIZES = flags.DEFINE_list(
    "image_sizes", None, "Output sizes; default: 224 and the native size."
)
_BATCH = flags.DEFINE_integer("global_batch_size", 128, "Images per batch.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 100, "Batches timed.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 10, "Batches not timed.")
_SPLIT = flags.DEFINE_string("split", "train", "TFDS split to read.")


def images_per_second(
    data_dir: str,
    image_size: int,
    global_batch_size: int,
    num_batches: int,
    warmup_batches: int,
    split: str = "train",
) -> float:
  """Images/s of the training pipeline, iterated eagerly as training would."""
  dataset = imagenet_input.make_dataset_fn(
      split=split,
      data_dir=data_dir,
      image_size=image_size,
      global_batch_size=global_batch_size,
      train=True,
      seed=None,
  )()
  iterator = iter(dataset)
  for _ in range(warmup_batches):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    images, _ = next(iterator)
  images.numpy()
  return num_batches * global_batch_size / (time.perf_counter() - start)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  scratch = None
  data_dir = _DATA_DIR.value
  if data_dir is None:
    scratch = tempfile.mkdtemp(prefix="opq_input_bench_")
    data_dir = os.path.join(scratch, "data")
  manual_dir = _MANUAL_DIR.value
  try:
    source = f"ImageNet at {data_dir}"
    if manual_dir is None and _DATA_DIR.value is None:
      manual_dir = os.path.join(scratch, "manual")
      size = _DIGITS_SIZE.value
      digits_imagenet.build_manual_dir(manual_dir, image_size=size)
      source = f"digits stand-in, {size}x{size} JPEG"
    start = time.perf_counter()
    imagenet_manual.prepare(data_dir, manual_dir)
    prepare_seconds = time.perf_counter() - start
    sizes = [int(s) for s in (_IMAGE_SIZES.value or [224, _DIGITS_SIZE.value])]
    print(f"prepare: {prepare_seconds:.2f} s; {os.cpu_count()} CPUs; "
          f"TF {tf.__version__}")
    print("| pipeline | data | image size | global batch | images/s |")
    print("|---|---|---|---|---|")
    for size in sizes:
      rate = images_per_second(
          data_dir, size, _BATCH.value, _NUM_BATCHES.value, _WARMUP.value,
          _SPLIT.value,
      )
      print(f"| TFDS imagenet2012 {_SPLIT.value} (decode+random crop+flip+"
            f"resize) | {source} | {size}x{size} | {_BATCH.value} | "
            f"{rate:,.0f} |")
  finally:
    if scratch is not None:
      shutil.rmtree(scratch)


if __name__ == "__main__":
  app.run(main)
