"""A training run's data: where a config's data lives, and preparing it once.

    data_dir = data.prepare_data(config, workdir, strategy)   # once per run

This is run policy on top of the manual-download contract of
opq_tf.training.imagenet_manual (what must be where, and TFDS's prepare):
which directories an empty config.data_dir / config.manual_dir mean, building
the digits stand-in (opq_tf.training.digits_imagenet) when the config asks
for it, and who prepares under tf.distribute (the chief; the other workers
wait). The binaries call `prepare_data` once and pass the data_dir down.
"""

from __future__ import annotations

import os

from absl import logging
import ml_collections

from opq_tf.tf_keras._keras import tf
from opq_tf.training import digits_imagenet
from opq_tf.training import distribute
from opq_tf.training import imagenet_manual


def data_dirs(config: ml_collections.ConfigDict, workdir: str
              ) -> tuple[str, str]:
  """(TFDS data_dir, ILSVRC manual_dir or '') a trainer config reads from.

  An empty config.data_dir means <workdir>/tfds for the digits stand-in
  (config.build_digits_manual_dir) and TFDS's default (~/tensorflow_datasets
  or $TFDS_DATA_DIR) otherwise; an empty manual_dir means <workdir>/manual for
  the digits stand-in (built there) and "already prepared" otherwise.
  """
  digits = config.build_digits_manual_dir
  data_dir = config.data_dir or (
      os.path.join(workdir, "tfds") if digits else os.path.expanduser(
          os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))
  manual_dir = config.manual_dir or (
      os.path.join(workdir, "manual") if digits else "")
  return data_dir, manual_dir


def prepare_data(config: ml_collections.ConfigDict, workdir: str,
                 strategy: tf.distribute.Strategy) -> str:
  """Builds the digits manual_dir if asked, prepares TFDS; returns data_dir.

  Idempotent (TFDS's prepare is a no-op on a prepared data_dir), but not free
  (it reads the builder's metadata, and waits at a barrier), so a run calls
  it once. In a multi-worker run the chief prepares while the others wait; a
  worker that does not share the chief's file system then prepares its own
  copy.
  """
  data_dir, manual_dir = data_dirs(config, workdir)
  if imagenet_manual.is_prepared(data_dir):
    return data_dir
  if distribute.is_chief(strategy):
    if config.build_digits_manual_dir and not config.manual_dir and not (
        os.path.exists(os.path.join(manual_dir, imagenet_manual.VAL_TAR))):
      counts = digits_imagenet.build_manual_dir(manual_dir,
                                                image_size=config.image_size)
      logging.info("Built the digits manual_dir %s: %s", manual_dir, counts)
    num_shards = (imagenet_manual.DIGITS_NUM_SHARDS
                  if config.build_digits_manual_dir else None)
    imagenet_manual.prepare(data_dir, manual_dir or None, num_shards=num_shards)
  distribute.barrier(strategy)
  if not imagenet_manual.is_prepared(data_dir):  # No shared file system.
    imagenet_manual.prepare(data_dir, manual_dir or None)
  return data_dir
