"""Tests for opq_tf.training.imagenet_input on the real TFDS imagenet2012 builder.

The data is the digits stand-in (opq_tf.training.digits_imagenet) prepared by the real
builder with 4 record files per split, shared per process (digits_data).
"""

import io
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

import tensorflow_datasets as tfds

from opq_tf.training import digits_imagenet
from opq_tf.training import imagenet_input
from opq_tf.training import imagenet_manual
import cpu_devices
import digits_data
from opq_tf.tf_keras._keras import tf


cpu_devices.split_cpu()


class ImagenetInputTest(digits_data.DigitsTestCase, tf.test.TestCase,
                        parameterized.TestCase):

  def _dataset_fn(self, **kwargs):
    args = dict(
        split="validation",
        data_dir=self.data_dir,
        image_size=32,
        global_batch_size=64,
        train=False,
        num_classes=10,
    )
    args.update(kwargs)
    return imagenet_input.make_dataset_fn(**args)

  def test_split_sizes_match_the_manual_dir(self):
    self.assertEqual(imagenet_input.num_examples(self.data_dir, "train"), 1297)
    self.assertEqual(
        imagenet_input.num_examples(self.data_dir, "validation"), 500
    )
    self.assertEqual(
        imagenet_input.num_examples(self.data_dir, "train[:10%]"), 130
    )

  def test_each_example_is_labelled_with_its_digit(self):
    builder = imagenet_manual.builder(self.data_dir)
    digits = load_digits()
    train, val = digits_imagenet.digit_assignment()
    source = dict(val)
    for files in train.values():
      source.update(files)
    stored_labels, labels = [], []
    for split in ("train", "validation"):
      raw = builder.as_dataset(
          split=split, decoders={"image": tfds.decode.SkipDecoding()}
      )
      stored = {
          ex["file_name"].decode(): ex["label"]
          for ex in raw.as_numpy_iterator()
      }
      examples = imagenet_input._examples(
          builder,
          split,
          tf.distribute.InputContext(),
          train=False,
          seed=None,
          num_classes=10,
          options=tf.data.Options(),
      )
      for example in examples.as_numpy_iterator():
        file_name = example["file_name"].decode()
        index = source[file_name]
        self.assertEqual(example["label"], digits.target[index], file_name)
        image = np.asarray(Image.open(io.BytesIO(example["image"])))
        expected = digits_imagenet.render_digit(digits.images[index], 32)
        self.assertLess(
            np.abs(image.astype(int) - expected.astype(int)).max(), 8
        )
        stored_labels.append(stored[file_name])
        labels.append(example["label"])
    self.assertLen(labels, 1797)
    np.testing.assert_array_equal(
        np.bincount(labels), np.bincount(digits.target)
    )
    # TFDS stores validation labels by sorted position in the val tar, which is
    # wrong for a partial tar; train labels (from the synset tars) are right.
    self.assertEqual(stored_labels[:1297], labels[:1297])
    self.assertGreater(
        np.mean(np.array(stored_labels[1297:]) != np.array(labels[1297:])), 0.9
    )

  def test_train_batches_under_mirrored_strategy(self):
    self.assertLen(
        tf.config.list_logical_devices("CPU"), 2,
        "TF was initialised before this module split the CPU in two; split it "
        "before any TF op (e.g. in conftest.py).",
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dataset = strategy.distribute_datasets_from_function(
        self._dataset_fn(
            split="train", image_size=48, global_batch_size=16, train=True,
            shuffle_buffer=256, seed=1,
        )
    )
    iterator = iter(dataset)
    for _ in range(3):
      images, labels = next(iterator)
      images = strategy.experimental_local_results(images)
      labels = strategy.experimental_local_results(labels)
      self.assertLen(images, 2)
      self.assertLen(labels, 2)
      for image, label in zip(images, labels):
        self.assertEqual(image.shape, (8, 48, 48, 3))
        self.assertEqual(image.dtype, tf.float32)
        self.assertEqual(label.dtype, tf.int32)
        self.assertBetween(float(tf.reduce_min(image)), 0.0, 10.0)
        self.assertBetween(float(tf.reduce_max(image)), 200.0, 255.0)
        self.assertAllInRange(label, 0, 9)
      self.assertNotAllClose(images[0], images[1])

  def test_train_pipeline_is_deterministic_with_a_seed(self):
    def first_batches(seed):
      dataset = self._dataset_fn(
          split="train", global_batch_size=32, train=True, seed=seed,
          shuffle_buffer=512,
      )()
      return [(x.numpy(), y.numpy()) for x, y in dataset.take(3)]

    first, again, other = first_batches(3), first_batches(3), first_batches(4)
    self.assertLen(first, 3)
    self.assertLen(again, 3)
    for (x1, y1), (x2, y2) in zip(first, again):
      self.assertAllEqual(x1, x2)
      self.assertAllEqual(y1, y2)
    self.assertEqual(first[0][0].shape, (32, 32, 32, 3))
    self.assertNotAllClose(first[0][0], other[0][0])

  def test_file_level_sharding_splits_the_files(self):
    dataset_fn = self._dataset_fn()
    shards = []
    for pipeline in range(2):
      context = tf.distribute.InputContext(
          num_input_pipelines=2, input_pipeline_id=pipeline,
          num_replicas_in_sync=2,
      )
      images = np.concatenate([x.numpy() for x, _ in dataset_fn(context)])
      shards.append({image.tobytes() for image in images})
    lengths = self._shard_lengths("validation")  # every 2nd file each
    self.assertLen(lengths, digits_data.NUM_SHARDS)
    self.assertCountEqual([len(s) for s in shards],
                          [sum(lengths[0::2]), sum(lengths[1::2])])
    self.assertEmpty(shards[0] & shards[1])
    with self.assertRaisesRegex(ValueError, "num_shards"):
      dataset_fn(tf.distribute.InputContext(
          num_input_pipelines=digits_data.NUM_SHARDS + 1))

  def _shard_lengths(self, split):
    builder = imagenet_manual.builder(self.data_dir)
    return list(builder.info.splits[split].shard_lengths)

  def test_eval_pipeline_is_deterministic_and_complete(self):
    dataset = self._dataset_fn(global_batch_size=64)()
    first = [(x.numpy(), y.numpy()) for x, y in dataset]
    again = [(x.numpy(), y.numpy()) for x, y in dataset]
    self.assertEqual([len(y) for _, y in first], [64] * 7 + [52])
    self.assertLen(again, len(first))
    for (x1, y1), (x2, y2) in zip(first, again):
      self.assertAllEqual(x1, x2)
      self.assertAllEqual(y1, y2)
    labels = np.concatenate([y for _, y in first])
    np.testing.assert_array_equal(np.bincount(labels), [50] * 10)
    cached = self._dataset_fn(global_batch_size=64, cache=True)()
    for _ in range(2):  # the pass that fills the cache, then one read from it
      batches = [(x.numpy(), y.numpy()) for x, y in cached]
      self.assertLen(batches, len(first))
      for (x1, y1), (x2, y2) in zip(first, batches):
        self.assertAllEqual(x1, x2)
        self.assertAllEqual(y1, y2)

  def test_preprocess_for_eval_is_the_eval_pipeline(self):
    builder = imagenet_manual.builder(self.data_dir)
    raw = builder.as_dataset(
        split="validation", decoders={"image": tfds.decode.SkipDecoding()}
    )
    jpegs = [ex["image"] for ex in raw.take(4).as_numpy_iterator()]
    pipeline_images = next(iter(self._dataset_fn(global_batch_size=4)()))[0]

    serve = tf.function(
        lambda jpeg: imagenet_input.preprocess_for_eval(jpeg, 32),
        input_signature=[tf.TensorSpec([None], tf.string)],
    )
    self.assertAllEqual(serve(tf.constant(jpegs)), pipeline_images)
    self.assertAllEqual(
        imagenet_input.preprocess_for_eval(jpegs[0], 32), pipeline_images[0]
    )
    decoded = tf.stack([tf.io.decode_jpeg(j, channels=3) for j in jpegs])
    self.assertAllClose(
        imagenet_input.preprocess_for_eval(decoded, 32), pipeline_images,
        atol=1e-3,
    )

  def test_center_crop_geometry(self):
    image = np.random.default_rng(0).integers(0, 256, (100, 60, 3), np.uint8)
    crop = int(imagenet_input.CROP_FRACTION * 60)  # 52
    top, left = (100 - crop + 1) // 2, (60 - crop + 1) // 2
    self.assertAllEqual(
        imagenet_input.preprocess_for_eval(image, crop),
        image[top : top + crop, left : left + crop].astype(np.float32),
    )
    self.assertEqual(
        imagenet_input.preprocess_for_eval(image, 224).shape, (224, 224, 3)
    )
    with self.assertRaisesRegex(ValueError, "rank"):
      imagenet_input.preprocess_for_eval(image[0], 32)

  def test_labels_beyond_num_classes_fail(self):
    dataset = self._dataset_fn(num_classes=5)()
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "num_classes"):
      for _ in dataset:
        pass

  def test_test_split_is_refused(self):
    with self.assertRaisesRegex(ValueError, "no labels"):
      self._dataset_fn(split="test")

  def test_unprepared_data_dir_is_named(self):
    empty = tempfile.mkdtemp(dir=self.root)
    with self.assertRaisesRegex(ValueError, "prepare"):
      imagenet_input.num_examples(empty, "train")
    with self.assertRaisesRegex(ValueError, "prepare"):
      self._dataset_fn(data_dir=empty)


if __name__ == "__main__":
  tf.test.main()
