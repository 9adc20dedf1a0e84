"""The flags every trainer takes, and the checks before any of them runs.

Each binary in trainers/ imports this module (which defines the flags), then
runs `common.run(main)` and calls `start` in
its main to get a validated config, workdir and strategy: every bad input is
reported on stderr with exit status 2 before TensorFlow trains anything or
anything is written.

Experiment settings are config fields only (`--config.data_dir=...`,
`--config.pretrained=...`); the flags are what is not an experiment: where
to write (--workdir) and what to run on (--strategy, --cpu_devices), and
how much to say (--verbose: TFDS's progress bars and info lines, quiet by
default). configs/default.py is both the default --config and what
checks.validate knows the fields from (the library itself imports nothing
from configs/).

A binary's main ends with `print_summary` (the whole run's wall time and
every artefact it wrote); `run` turns a workdir file found unusable during
the run (layout.WorkdirError: every checkpoint unreadable, ...) into exit 2.
"""

import logging as python_logging
import os
import sys
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from configs import default
from opq_tf.training import checks
from opq_tf.training import distribute
from opq_tf.training import keras3_distribute
from opq_tf.training import layout
from opq_tf.training import report

_STARTED = time.time()  # The whole run's wall time counts from here.
_DEFAULT_CONFIG = default.__file__


def _unknown_field_message(argv: list[str], unknown: Exception) -> str:
  """One line for an unknown --config.<field>: a renamed field's new name, or
  that a field (e.g. --config.model_options.alpha) has no subfields."""
  overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
  for override in overrides:
    field = override.removeprefix("--config.").split(".")[0]
    if field in checks.RENAMED:
      return (f"config.{field} is now config.{checks.RENAMED[field]}; write "
              f"--config.{checks.RENAMED[field]}=... instead.")
  known = default.get_config()
  for override in overrides:
    field, _, subfield = override.removeprefix("--config.").partition(".")
    if field in known and subfield:
      return (f"config.{field} is a {type(known[field]).__name__} field with "
              f"no subfield {subfield!r}; set it whole: --config.{field}=<value>.")
  return (f"unknown config field among {overrides} ({unknown}); the fields are "
          "those of configs/default.py.")


try:  # config_flags resolves --config.<field> overrides right here.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "A configs/*.py file; override fields with --config.<field>=<value>.")
except (AttributeError, KeyError, TypeError) as unknown_field:
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
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show TFDS's progress bars and "
                             "info lines (quiet by default).")
flags.mark_flag_as_required("workdir")


class _QuietTFDS(python_logging.Filter):
  """Drops TFDS's info lines ("Load dataset info ...", sharding timings)."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return (record.levelno >= python_logging.WARNING
            or f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname)


def _quiet_tfds() -> None:
  """TFDS's progress bars and info lines off: a run's console is its own."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  python_logging.getLogger("absl").addFilter(_QuietTFDS())


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
    print(f"{program}: error: unexpected argument(s) {argv[1:]}: every setting "
          "is a flag (--workdir=..., --config.<field>=...); see --help.",
          file=sys.stderr)
    sys.exit(2)
  if not _VERBOSE.value:
    _quiet_tfds()
  try:  # config_flags reports a missing file or unknown field only here.
    config = _CONFIG.value
    config.keys()
  except (OSError, AttributeError, KeyError, ValueError, TypeError) as error:
    print(f"{program}: error: cannot load --config: {error}", file=sys.stderr)
    sys.exit(2)
  try:
    strategy = keras3_distribute.make_strategy(config, _STRATEGY.value,
                                               _CPU_DEVICES.value)
    checks.validate(config, strategy, _WORKDIR.value, phase=phase,
                    default_config=default.get_config())
  except (ValueError, TypeError) as error:
    print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(2)
  logging.info("Config:\n%s", config)
  return config, _WORKDIR.value, strategy


def print_summary(program: str, artefacts: dict[str, str]) -> None:
  """The run's last lines: its wall time and every artefact it wrote."""
  print(report.format_summary(program, time.time() - _STARTED, artefacts),
        flush=True)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) with the trainers' flag parsing and exit-2 rules.

  A layout.WorkdirError raised during the run (a workdir file that is
  unusable, found only when it is read) is one line on stderr and exit 2.
  """
  program = os.path.basename(sys.argv[0]).removesuffix(".py")

  def guarded(argv: list[str]) -> None:
    try:
      main(argv)
    except layout.WorkdirError as error:
      print(f"{program}: error: {error}", file=sys.stderr)
      sys.exit(2)

  app.run(guarded, flags_parser=parse_flags)
