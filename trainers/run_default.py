r"""The README's main job, end to end, on the embedded default.

    python -m trainers.run_default --workdir=/tmp/opq_default

With configs/default.py (no download, a few minutes on 2 CPU cores): builds
the digits ILSVRC manual_dir under the workdir, prepares it with the real
TFDS imagenet2012 builder, trains the FP32 small_resnet, allocates the OPQ
plan (p = 0.9, B = 4; the per-layer table is printed), finetunes, evaluates
and exports <workdir>/export/{saved_model,report.json,model.opq}; the
accuracies before/after compression and the compression figures are printed
and saved as <workdir>/final_report.json. Rerunning on the workdir resumes.

Any config works (--config=configs/resnet50.py --pretrained=... runs OPQ on
ImageNet; --pretrained skips the FP32 training). Every input is checked
before anything runs; a bad one exits with status 2 and a message on stderr.
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
_PRETRAINED = flags.DEFINE_string("pretrained", None, "FP32 weights; skips FP32 "
                                  "training (overrides config.pretrained).")
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
    print(f"run_default: error: cannot load --config: {error}", file=sys.stderr)
    sys.exit(2)
  from opq_tf import training  # pylint: disable=g-import-not-at-top

  for flag, field in ((_DATA_DIR, "data_dir"), (_MANUAL_DIR, "manual_dir"),
                      (_PRETRAINED, "pretrained")):
    if flag.value is not None:
      config[field] = flag.value
  try:
    strategy = training.make_strategy(_STRATEGY.value, _CPU_DEVICES.value)
    training.validate(config, strategy, _WORKDIR.value, phase="all")
  except (ValueError, TypeError) as error:
    print(f"run_default: error: {error}", file=sys.stderr)
    sys.exit(2)
  logging.info("Config:\n%s", config)
  training.train_and_evaluate(config, _WORKDIR.value, strategy)


if __name__ == "__main__":
  app.run(main)
