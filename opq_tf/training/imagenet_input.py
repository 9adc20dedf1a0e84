"""ImageNet (TFDS `imagenet2012`) tf.data pipelines for tf.distribute.

The data comes from the real TFDS builder, prepared offline from the
ILSVRC-2012 tars by `opq_tf.training.imagenet_manual.prepare` (which spells out the
manual-download contract); this module only reads the prepared records:

    dataset_fn = make_dataset_fn(split="train", data_dir=data_dir,
                                 image_size=224, global_batch_size=256,
                                 train=True)
    dataset = strategy.distribute_datasets_from_function(dataset_fn)

Elements are (image float32 [B, S, S, 3] RGB in [0, 255], label int32 [B]),
B = the per-replica batch; models normalise their inputs themselves.

Validation labels. TFDS labels the validation split by zipping the *sorted*
member names of the val tar with the lines of its validation_labels.txt; that
matches the ILSVRC2012_val_<k> index only when the tar holds all 50 000 images.
This module instead labels each validation image by its index k, i.e. line k of
the same file, which is identical for the full tar and also correct for a
subset such as the digits stand-in (whose TFDS-stored validation labels are
therefore wrong and must not be read directly).

Labels >= num_classes are an error, not filtered: iterating such a pipeline
raises InvalidArgumentError naming num_classes.
"""

import re
from typing import Callable, Optional

import tensorflow_datasets as tfds

from opq_tf.training import imagenet_manual
from opq_tf.tf_keras._keras import tf

# The standard ImageNet eval crop: a 224 crop of a 256 resize (crop_padding=32
# at 224). For other sizes the padding scales with the image (32 * S / 224), so
# the central fraction stays 224 / 256 instead of swallowing small images.
CROP_PADDING = 32
CROP_FRACTION = 224.0 / (224.0 + CROP_PADDING)

_VAL_INDEX_START = len("ILSVRC2012_val_")


def _prepared_builder(data_dir: str) -> tfds.core.DatasetBuilder:
  if not imagenet_manual.is_prepared(data_dir):
    raise ValueError(
        f"TFDS {imagenet_manual.DATASET_NAME} is not prepared under data_dir {data_dir!r}. "
        "Run opq_tf.training.imagenet_manual.prepare(data_dir, manual_dir) first."
    )
  return imagenet_manual.builder(data_dir)


def num_examples(data_dir: str, split: str) -> int:
  """Examples in `split` (any TFDS split string, e.g. 'train[:10%]')."""
  return int(_prepared_builder(data_dir).info.splits[split].num_examples)


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """[H, W, 3] or [N, H, W, 3] -> float32 [.., S, S, 3] (bilinear), 0..255."""
  return tf.image.resize(image, [image_size, image_size], method="bilinear")


def _center_crop_window(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """[offset_y, offset_x, crop, crop], crop = int(CROP_FRACTION * min(H, W))."""
  crop = tf.cast(
      CROP_FRACTION * tf.cast(tf.minimum(height, width), tf.float32), tf.int32
  )
  top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
  return tf.stack([top, left, crop, crop])


def _preprocess_one_for_eval(image: tf.Tensor, image_size: int) -> tf.Tensor:
  if image.dtype == tf.string:
    shape = tf.image.extract_jpeg_shape(image)
    window = _center_crop_window(shape[0], shape[1])
    cropped = tf.image.decode_and_crop_jpeg(image, window, channels=3)
  else:
    shape = tf.shape(image)
    window = _center_crop_window(shape[0], shape[1])
    cropped = image[
        window[0] : window[0] + window[2], window[1] : window[1] + window[3]
    ]
  return _resize(cropped, image_size)


def preprocess_for_eval(
    image_bytes_or_uint8: tf.Tensor, image_size: int
) -> tf.Tensor:
  """The eval preprocessing, shared by the eval pipeline and serving.

  Central crop of side int(CROP_FRACTION * min(H, W)) (CROP_FRACTION = 224/256,
  the crop_padding=32 crop scaled to any size), fused with JPEG decoding when
  given bytes, then a bilinear resize to image_size x image_size.

  Args:
    image_bytes_or_uint8: a JPEG as a string scalar or a [N] string batch, or
      decoded RGB uint8 [H, W, 3] or [N, H, W, 3].
    image_size: output side S.

  Returns:
    float32 [S, S, 3] or [N, S, S, 3], RGB in [0, 255].
  """
  image = tf.convert_to_tensor(image_bytes_or_uint8)
  single_rank = 0 if image.dtype == tf.string else 3
  if image.shape.rank == single_rank:
    return _preprocess_one_for_eval(image, image_size)
  if image.shape.rank == single_rank + 1:
    return tf.map_fn(
        lambda one: _preprocess_one_for_eval(one, image_size),
        image,
        fn_output_signature=tf.TensorSpec(
            [image_size, image_size, 3], tf.float32
        ),
    )
  raise ValueError(
      f"preprocess_for_eval takes JPEG bytes of rank 0 or 1 or uint8 images of "
      f"rank 3 or 4, got {image.dtype.name} of shape {image.shape}; pass one "
      "image or a batch of them."
  )


def _decode_and_random_crop(
    image_bytes: tf.Tensor, seed: tf.Tensor
) -> tf.Tensor:
  """Inception-style random crop decoded in one op (decode_and_crop_jpeg).

  The window covers 8%..100% of the area with aspect ratio 3/4..4/3 (the
  whole image when 10 attempts all fail).
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(image_bytes),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)


def _split_base_names(split: str) -> set[str]:
  return set(re.findall(r"([A-Za-z_]+)(?:\[[^\]]*\])?", split))


def _labelled(
    example: dict, val_labels: tf.Tensor, num_classes: int
) -> tf.Tensor:
  """int32 label: the validation index lookup for val files, else TFDS's."""
  file_name = example["file_name"]
  label = tf.cond(
      tf.strings.regex_full_match(file_name, imagenet_manual.VAL_JPEG_PATTERN),
      lambda: tf.gather(
          val_labels,
          tf.strings.to_number(
              tf.strings.substr(file_name, _VAL_INDEX_START, 8), tf.int32
          )
          - 1,
      ),
      lambda: tf.cast(example["label"], tf.int32),
  )
  checks = [
      tf.debugging.assert_non_negative(
          label, message="ImageNet label < 0 (the unlabelled test split?)"
      ),
      tf.debugging.assert_less(
          label,
          tf.constant(num_classes, tf.int32),
          message=(
              f"ImageNet label >= num_classes={num_classes}; pass the "
              "dataset's number of classes (1000 for ILSVRC-2012, 10 for the "
              "digits stand-in) as num_classes"
          ),
      ),
  ]
  with tf.control_dependencies(checks):
    return tf.identity(label)


def _examples(
    builder: tfds.core.DatasetBuilder,
    split: str,
    input_context: tf.distribute.InputContext,
    *,
    train: bool,
    seed: Optional[int],
    num_classes: int,
    options: tf.data.Options,
) -> tf.data.Dataset:
  """This pipeline's file shard of `split`: dicts of JPEG bytes and labels."""
  files = len(builder.info.splits[split].file_instructions)
  if files < input_context.num_input_pipelines:
    raise ValueError(
        f"Split {split!r} has {files} record file(s) but there are "
        f"{input_context.num_input_pipelines} input pipelines; file-level "
        "sharding needs one file per pipeline at least. Prepare into a fresh "
        "data_dir with prepare(..., num_shards=<number of workers or more>)."
    )
  read_config = tfds.ReadConfig(
      input_context=input_context,
      shuffle_seed=seed,
      options=options,
      try_autocache=False,
      skip_prefetch=True,
  )
  dataset = builder.as_dataset(
      split=split,
      shuffle_files=train,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=read_config,
  )
  val_labels = tf.constant(imagenet_manual.validation_label_table())
  return dataset.map(
      lambda example: {
          "image": example["image"],
          "label": _labelled(example, val_labels, num_classes),
          "file_name": example["file_name"],
      },
      num_parallel_calls=tf.data.AUTOTUNE,
  )


def make_dataset_fn(
    *,
    split: str,
    data_dir: str,
    image_size: int,
    global_batch_size: int,
    train: bool,
    num_classes: int = 1000,
    shuffle_buffer: int = 10_000,
    seed: Optional[int] = None,
    cache: bool = False,
) -> Callable[[Optional[tf.distribute.InputContext]], tf.data.Dataset]:
  """A dataset_fn for `strategy.distribute_datasets_from_function`.

  Each input pipeline reads every num_input_pipelines-th record file (file-level
  sharding) and batches input_context.get_per_replica_batch_size(
  global_batch_size) examples.

  train=True: shuffled files, shuffle(shuffle_buffer), repeat forever, random
  crop fused with decoding, random horizontal flip, resize; full batches only.
  train=False: one pass in file order, central crop (see preprocess_for_eval),
  resize; the last batch may be partial.

  Args:
    split: TFDS split string ('train', 'validation', 'train[:90%]', ...).
    data_dir: where `prepare` put the dataset.
    image_size: output side S.
    global_batch_size: batch over all replicas.
    train: training or evaluation preprocessing.
    num_classes: labels must be < num_classes, else iteration fails.
    shuffle_buffer: examples in the shuffle buffer (train only).
    seed: makes the training pipeline deterministic (file order, shuffle,
      crops and flips); None lets tf.data trade order for speed.
    cache: cache the undecoded JPEGs in memory after the first pass.

  Returns:
    dataset_fn(input_context=None) -> dataset of (float32 [B, S, S, 3] in
    [0, 255], int32 [B]).
  """
  if "test" in _split_base_names(split):
    raise ValueError(
        f"Split {split!r} includes ImageNet's test split, which has no labels; "
        "use 'train' or 'validation' (or slices of them, e.g. 'train[99%:]')."
    )
  builder = _prepared_builder(data_dir)

  def dataset_fn(
      input_context: Optional[tf.distribute.InputContext] = None,
  ) -> tf.data.Dataset:
    input_context = input_context or tf.distribute.InputContext()
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    pipeline_seed = (
        None if seed is None else seed + input_context.input_pipeline_id
    )
    options = tf.data.Options()
    options.deterministic = (seed is not None) or not train
    dataset = _examples(
        builder,
        split,
        input_context,
        train=train,
        seed=pipeline_seed,
        num_classes=num_classes,
        options=options,
    )
    if cache:
      dataset = dataset.cache()
    if train:
      dataset = dataset.shuffle(shuffle_buffer, seed=pipeline_seed).repeat()
      crop_seeds = tf.data.Dataset.random(seed=pipeline_seed).batch(2)
      dataset = tf.data.Dataset.zip((dataset, crop_seeds))

      def preprocess(example, crop_seed):
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(crop_seed, 2)
        )
        image = _decode_and_random_crop(example["image"], crop_seed)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return _resize(image, image_size), example["label"]

    else:

      def preprocess(example):
        image = preprocess_for_eval(example["image"], image_size)
        return image, example["label"]

    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=train)
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)

  return dataset_fn
