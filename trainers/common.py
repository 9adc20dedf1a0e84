"""The flags every trainer takes, and the checks before any of them runs.

Each binary in trainers/ imports this module (which defines the flags), then
runs `app.run(main, flags_parser=common.parse_flags)` and calls `start` in
its main to get a validated config, workdir and strategy: every bad input is
reported on stderr with exit status 2 before TensorFlow trains anything or
anything is written.

Experiment settings are config fields only (`--config.data_dir=...`,
`--config.pretrained=...`); the flags are what is not an experiment: where
to write (--workdir) and what to run on (--strategy, --cpu_devices).
configs/default.py is both the default --config and what checks.validate
knows the fields from (the library itself imports nothing from configs/).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from configs import default
from opq_tf.training import checks
from opq_tf.training import distribute

_DEFAULT_CONFIG = default.__file__


def _unknown_field_message(argv: list[str], unknown: Exception) -> str:
  """One line for an unknown --config.<field>, naming a renamed field's new name."""
  overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
  for override in overrides:
    field = override.removeprefix("--config.").split(".")[0]
    if field in checks.RENAMED:
      return (f"config.{field} is now config.{checks.RENAMED[field]}; write "
              f"--config.{checks.RENAMED[field]}=... instead.")
  return (f"unknown config field among {overrides} ({unknown}); the fields are "
          "those of configs/default.py.")


try:  # config_flags resolves --config.<field> overrides right here.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "A configs/*.py file; override fields with --config.<field>=<value>.")
except (AttributeError, KeyError) as unknown_field:
  print(f"{os.path.basename(sys.argv[0]).removesuffix('.py')}: error: "
        f"{_unknown_field_message(sys.argv[1:], unknown_field)}",
        file=sys.stderr)
  sys.exit(2)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything the "
                               "run writes; rerunning on it resumes.")
_STRATEGY = flags.DEFINE_enum("strategy", "mirrored", list(distribute.STRATEGIES),
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
    phase: what the run will do, for checks.validate ("fp32", "compress" or
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
  try:
    strategy = distribute.make_strategy(_STRATEGY.value, _CPU_DEVICES.value)
    checks.validate(config, strategy, _WORKDIR.value, phase=phase,
                    default_config=default.get_config())
  except (ValueError, TypeError) as error:
    print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(2)
  logging.info("Config:\n%s", config)
  return config, _WORKDIR.value, strategy
