"""The flags every trainer takes, and the checks before any of them runs.

Each binary in trainers/ imports this module (which defines the flags), then
runs `app.run(main, flags_parser=common.parse_flags)` and calls `start` in
its main to get a validated config, workdir and strategy:
every bad input is reported on stderr with exit status 2 before TensorFlow
trains anything or anything is written.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from opq_tf import training

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                               "default.py")
try:  # config_flags resolves --config.<field> overrides right here.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "A configs/*.py file; override fields with --config.<field>=<value>.")
except (AttributeError, KeyError) as unknown:
  _overrides = [arg.split("=")[0] for arg in sys.argv[1:]
                if arg.startswith("--config.")]
  print(f"{os.path.basename(sys.argv[0]).removesuffix('.py')}: error: "
        f"unknown config field among {_overrides} ({unknown}); the fields are "
        "those of configs/default.py.", file=sys.stderr)
  sys.exit(2)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything the "
                               "run writes; rerunning on it resumes.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir "
                                "(overrides config.data_dir).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory with the "
                                  "ILSVRC2012 tars (overrides config.manual_dir).")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "FP32 weights: a .h5 / .weights.h5 file, checkpoint, "
    "Keras SavedModel or 'imagenet' (overrides config.pretrained).")
_STRATEGY = flags.DEFINE_enum("strategy", "mirrored",
                              ["mirrored", "multi_worker", "one_device"],
                              "tf.distribute strategy (multi_worker reads "
                              "TF_CONFIG).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this "
                                    "many logical devices (0: do not).")
flags.mark_flag_as_required("workdir")


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: a bad flag value exits 2 with one line, as start."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    program = os.path.basename(argv[0]).removesuffix(".py")
    print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(2)


def start(argv, program: str, phase: str):
  """Returns (config, workdir, strategy), or exits 2 naming what is wrong.

  Args:
    argv: the binary's positional arguments (none are accepted).
    program: the binary's name, for error messages.
    phase: what the run will do, for training.validate ("fp32", "compress" or
      "all").
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:  # config_flags reports a missing file or unknown field only here.
    config = _CONFIG.value
    config.keys()
  except (OSError, AttributeError, KeyError, ValueError, TypeError) as error:
    print(f"{program}: error: cannot load --config: {error}", file=sys.stderr)
    sys.exit(2)
  for flag, field in ((_DATA_DIR, "data_dir"), (_MANUAL_DIR, "manual_dir"),
                      (_PRETRAINED, "pretrained")):
    if flag.value is not None:
      config[field] = flag.value
  try:
    strategy = training.make_strategy(_STRATEGY.value, _CPU_DEVICES.value)
    training.validate(config, strategy, _WORKDIR.value, phase=phase)
  except (ValueError, TypeError) as error:
    print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(2)
  logging.info("Config:\n%s", config)
  return config, _WORKDIR.value, strategy
