r"""Compresses FP32 weights with OPQ, finetunes, evaluates and exports.

    python -m trainers.compress --config=configs/resnet50.py \
        --workdir=/tmp/opq_resnet50 --pretrained=/ckpt/resnet50.weights.h5 \
        --data_dir=/data/tfds [--manual_dir=/data/ILSVRC2012]

The FP32 weights are --pretrained (a .h5 / .weights.h5 file, checkpoint,
Keras SavedModel, or "imagenet") or, without it, <workdir>/fp32/weights.h5 from
trainers/train.py. The compression plan is computed once and kept as
<workdir>/plan.json; rerunning on the workdir resumes finetuning from the
latest checkpoint with the same plan, masks and steps. Results:
<workdir>/export/{saved_model,report.json,model.opq} and
<workdir>/final_report.json; the per-layer table and accuracies are printed.

Every input is checked before anything runs; a bad one exits with status 2
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
_PRETRAINED = flags.DEFINE_string("pretrained", None, "FP32 weights to compress "
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
    print(f"compress: error: cannot load --config: {error}", file=sys.stderr)
    sys.exit(2)
  from opq_tf import training  # pylint: disable=g-import-not-at-top

  for flag, field in ((_DATA_DIR, "data_dir"), (_MANUAL_DIR, "manual_dir"),
                      (_PRETRAINED, "pretrained")):
    if flag.value is not None:
      config[field] = flag.value
  try:
    strategy = training.make_strategy(_STRATEGY.value, _CPU_DEVICES.value)
    training.validate(config, strategy, _WORKDIR.value, phase="compress")
  except (ValueError, TypeError) as error:
    print(f"compress: error: {error}", file=sys.stderr)
    sys.exit(2)
  logging.info("Config:\n%s", config)
  training.compress_and_finetune(config, _WORKDIR.value, strategy)


if __name__ == "__main__":
  app.run(main)
