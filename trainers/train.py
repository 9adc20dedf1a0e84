r"""Trains a config's FP32 model: the baseline that OPQ then compresses.

    python -m trainers.train --config=configs/default.py --workdir=/tmp/opq \
        [--config.fp32_epochs=10] [--strategy=mirrored]

Writes <workdir>/fp32/weights.h5 (read by trainers/compress.py on the same
workdir), <workdir>/fp32/metrics.json, checkpoints under
<workdir>/fp32/checkpoints (a rerun resumes from the latest) and TensorBoard
summaries under <workdir>/tensorboard/fp32. --pretrained starts from given
weights instead of from scratch.

Every input is checked before training starts; a bad one exits with status 2
and a message on stderr, leaving the workdir untouched.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                               "default.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG,
    "A configs/*.py file; override fields with --config.<field>=<value>.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything the "
                               "run writes; rerunning on it resumes.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir "
                                "(overrides config.data_dir).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory with the "
                                  "ILSVRC2012 tars (overrides config.manual_dir).")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "Initial FP32 weights "
                                  "(overrides config.pretrained).")
_STRATEGY = flags.DEFINE_enum("strategy", "mirrored",
                              ["mirrored", "multi_worker", "one_device"],
                              "tf.distribute strategy (multi_worker reads "
                              "TF_CONFIG).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this "
                                    "many logical devices (0: do not).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:  # config_flags reports a missing file or unknown field only here.
    config = _CONFIG.value
    config.keys()
  except (OSError, AttributeError, KeyError, ValueError, TypeError) as error:
    print(f"train: error: cannot load --config: {error}", file=sys.stderr)
    sys.exit(2)
  from opq_tf import training  # pylint: disable=g-import-not-at-top

  for flag, field in ((_DATA_DIR, "data_dir"), (_MANUAL_DIR, "manual_dir"),
                      (_PRETRAINED, "pretrained")):
    if flag.value is not None:
      config[field] = flag.value
  try:
    strategy = training.make_strategy(_STRATEGY.value, _CPU_DEVICES.value)
    training.validate(config, strategy, _WORKDIR.value, phase="fp32")
  except (ValueError, TypeError) as error:
    print(f"train: error: {error}", file=sys.stderr)
    sys.exit(2)
  logging.info("Config:\n%s", config)
  metrics = training.train_fp32(config, _WORKDIR.value, strategy)
  print(f"FP32 {config.model}: {metrics['accuracy']}")


if __name__ == "__main__":
  app.run(main)
