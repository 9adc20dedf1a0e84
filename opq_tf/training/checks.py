"""Every check of a trainer's input, run once at the binary boundary.

    strategy = distribute.make_strategy("mirrored")
    checks.validate(config, strategy, workdir, phase="all",   # before anything
                    default_config=default.get_config())

`validate` raises ValueError naming the problem and the fix, and writes
nothing, so a bad flag costs a user one line on stderr instead of an hour of
training that dies at the end. The library functions after it (training.*)
assume a valid config and do not check again.

The config fields are those of the default config, which the caller passes
in (the trainers pass configs/default.py's get_config(); every other config
starts from it, and the library does not import configs/): a field it does
not have is unknown, a field it has is required, and a value must have the
type of the default's value; `_RULES` adds ranges and choices to the fields
that need more than a type.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Callable

import ml_collections
import numpy as np

from opq_tf import litert_codes
from opq_tf.core import allocation
from opq_tf.core import grid
from opq_tf.tf_keras import exporting
from opq_tf.tf_keras import layers
from opq_tf.tf_keras._keras import keras, tf
from opq_tf.training import data
from opq_tf.training import distribute
from opq_tf.training import imagenet_manual
from opq_tf.training import keras3_distribute
from opq_tf.training import layout
from opq_tf.training import models
from opq_tf.training import planning
from opq_tf.training import pretrained

PHASES = ("fp32", "compress", "all")
# Old field name -> new one: an old command line gets told the new spelling.
RENAMED = {"allocation": "method"}


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, bool) and math.isfinite(value))


def _int_at_least(least: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_int(v) and v >= least), f"an integer >= {least}"


def _bits(value: Any) -> bool:
  try:
    grid.check_bits(value)
  except (TypeError, ValueError):
    return False
  return True


def _json_object(value: Any) -> bool:
  try:
    models.parse_model_options(value)
  except ValueError:
    return False
  return isinstance(value, str)


def check_model(config: ml_collections.ConfigDict) -> None:
  """config.model, model_options and preprocessing fit together; cheap.

  The constructor must exist, the options parse as a JSON object and are
  only given to an applications model, the saved model's path exists, and
  the preprocessing is known (and "none" for a built-in, which normalises
  itself). Whether the options suit the constructor, and a saved model the
  image size and classes, is seen when validate builds the model.
  """
  options_text = config.get("model_options", "{}")
  preprocessing = config.get("preprocessing", "none")
  fix = ("Fix it in the config file or with --config.model=, "
         "--config.model_options=, --config.preprocessing=.")
  values = {"model": config.model, "model_options": options_text,
            "preprocessing": preprocessing}
  for field, check in (("model", models.check_model_name),
                       ("model_options", models.parse_model_options),
                       ("preprocessing", models.check_preprocessing)):
    value = values[field]
    try:
      check(value)
    except ValueError as error:
      raise ValueError(
          f"config.{field}={value!r} is invalid: {error} {fix}") from error
  options = models.parse_model_options(options_text)
  if config.model in models.NAMES and (options or preprocessing != "none"):
    raise ValueError(
        f"config.model={config.model!r} is a built-in model: it normalises its "
        f"own input and takes no options; set --config.model_options='{{}}' "
        "and --config.preprocessing=none (or use 'applications.<Constructor>').")
  if options and not config.model.startswith(models.APPLICATIONS_PREFIX):
    raise ValueError(
        f"config.model_options={options_text!r} only apply to "
        f"'applications.<Constructor>' models, not {config.model!r}; set "
        "--config.model_options='{}'.")


# field -> (check, what it must be), for fields that need more than the type
# of their default value.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frontend": (lambda v: v in keras3_distribute.FRONTENDS,
                 f"one of {keras3_distribute.FRONTENDS}"),
    "backend": (lambda v: v in ("",) + keras3_distribute.BACKENDS,
                f"one of {keras3_distribute.BACKENDS} (keras3; '' = "
                "KERAS_BACKEND, else tensorflow)"),
    # What the name points at (constructor, path) is checked by check_model.
    "model": (lambda v: isinstance(v, str) and bool(v),
              f"one of {models.NAMES}, 'applications.<Constructor>' or "
              "'saved:<path>'"),
    "model_options": (_json_object,
                      "a JSON object of constructor options, e.g. "
                      "'{\"alpha\": 0.75}' ('{}' for none)"),
    "preprocessing": (lambda v: v in models.PREPROCESSINGS,
                      f"one of {models.PREPROCESSINGS}"),
    "num_classes": _int_at_least(2),
    "image_size": _int_at_least(8),
    "global_batch_size": _int_at_least(1),
    "eval_batch_size": _int_at_least(1),
    "steps_per_epoch": (lambda v: _is_int(v) and v >= 0,
                        "an integer >= 0 (0 = one pass over the train split)"),
    "seed": _int_at_least(0),
    "fp32_epochs": _int_at_least(0),
    "num_epochs": _int_at_least(0),
    "fp32_learning_rate": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "learning_rate": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "fp32_warmup_epochs": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "warmup_epochs": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "pruning_rate": (lambda v: _is_number(v) and 0 <= v < 1,
                     "a number in [0, 1), the fraction of weights pruned"),
    "bits": (_bits, f"an integer in {grid.MIN_BITS}..{grid.MAX_BITS}"),
    "calibration_images": (lambda v: _is_int(v) and v >= 0,
                           "an integer >= 0 (0 = no calibration)"),
    "step_fit": (lambda v: v in allocation.STEP_FITS,
                 f"one of {allocation.STEP_FITS}"),
    "method": (lambda v: v in allocation.METHODS,
               f"one of {allocation.METHODS}"),
    "objective": (lambda v: v in allocation.OBJECTIVES,
                  f"one of {allocation.OBJECTIVES}"),
    "step_granularity": (lambda v: v in allocation.STEP_GRANULARITIES,
                         f"one of {allocation.STEP_GRANULARITIES}"),
    "step_stats": (lambda v: v in allocation.STEP_STATS,
                   f"one of {allocation.STEP_STATS}"),
    "litert_weights": (lambda v: v in litert_codes.WEIGHTS,
                       f"one of {litert_codes.WEIGHTS}"),
    "momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "steps_per_checkpoint": _int_at_least(1),
    # The previous checkpoint is the fall-back for a damaged newest one.
    "checkpoints_to_keep": _int_at_least(2),
    "log_every_steps": _int_at_least(1),
}


def _type_rule(value: Any) -> tuple[Callable[[Any], bool], str]:
  """The check a field gets from the type of its default value."""
  if isinstance(value, bool):
    return (lambda v: isinstance(v, bool)), "True or False"
  if isinstance(value, int):
    return _is_int, "an integer"
  if isinstance(value, float):
    return _is_number, "a number"
  if isinstance(value, str):
    return (lambda v: isinstance(v, str)), "a string ('' for none)"
  raise TypeError(f"The default config has a field of unsupported type "
                  f"{type(value).__name__}: {value!r}")


def fields(default_config: ml_collections.ConfigDict
           ) -> dict[str, tuple[Callable[[Any], bool], str]]:
  """field -> (check, what it must be), for every field of `default_config`."""
  return {field: _RULES.get(field) or _type_rule(value)
          for field, value in default_config.items()}


def check_fields(config: ml_collections.ConfigDict,
                 default_config: ml_collections.ConfigDict) -> None:
  """Unknown, missing and out-of-range fields; the message names the fix."""
  known = fields(default_config)
  unknown = sorted(set(config.keys()) - set(known))
  for old in unknown:
    if old in RENAMED:
      raise ValueError(
          f"config.{old} is now config.{RENAMED[old]}; write "
          f"--config.{RENAMED[old]}=... instead.")
  if unknown:
    raise ValueError(
        f"Unknown config field(s) {unknown}; the fields are those of "
        f"configs/default.py: {sorted(known)}.")
  missing = sorted(set(known) - set(config.keys()))
  if missing:
    raise ValueError(
        f"Config is missing field(s) {missing}; start the config from "
        "configs/default.py's get_config().")
  for field, (check, must_be) in known.items():
    value = config[field]
    if not check(value):
      raise ValueError(
          f"config.{field}={value!r} is invalid: it must be {must_be}. Fix it "
          f"in the config file or with --config.{field}=<value>.")
  check_model(config)
  least = models.min_image_size(config.model)
  if config.image_size < least:
    raise ValueError(
        f"config.image_size={config.image_size} is too small for "
        f"{config.model}, which needs at least {least}; set "
        f"--config.image_size=<{least} or more>.")
  for warmup, epochs in (("fp32_warmup_epochs", "fp32_epochs"),
                         ("warmup_epochs", "num_epochs")):
    if config[epochs] and config[warmup] > config[epochs]:
      raise ValueError(
          f"config.{warmup}={config[warmup]} is longer than config.{epochs}="
          f"{config[epochs]}; shorten the warmup.")


def check_workdir(workdir: str) -> None:
  """The workdir exists and is writable, or can be created; nothing is made."""
  if not workdir:
    raise ValueError("No workdir given; pass --workdir=<directory>.")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"workdir {workdir!r} is a file; pass a directory.")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(
        f"workdir {workdir!r} cannot be created: {existing!r} is a file. Pass "
        "another --workdir.")
  try:  # os.access says yes to root even on read-only file systems.
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    raise ValueError(
        f"workdir {workdir!r} is not writable ({existing!r}: "
        f"{error.strerror}); pass a --workdir you can write to.") from error


def check_data(config: ml_collections.ConfigDict, workdir: str,
               strategy: tf.distribute.Strategy) -> None:
  """The manual_dir is usable or the data_dir prepared, with a file per worker."""
  data_dir, manual_dir = data.data_dirs(config, workdir)
  prepared = imagenet_manual.is_prepared(data_dir)
  if config.manual_dir:
    imagenet_manual.check_manual_dir(config.manual_dir)
  elif not config.build_digits_manual_dir and not prepared:
    raise ValueError(
        f"TFDS imagenet2012 is not prepared under data_dir {data_dir!r} and no "
        "manual_dir was given: pass --config.manual_dir=<dir with the ILSVRC2012"
        " tars> (prepared once into config.data_dir), or "
        "--config.data_dir=<a prepared data_dir>.")
  elif manual_dir and os.path.exists(manual_dir):
    imagenet_manual.check_manual_dir(manual_dir)
  if prepared:
    builder = imagenet_manual.builder(data_dir)
    workers = distribute.num_workers(strategy)
    for split in ("train", "validation"):
      files = len(builder.info.splits[split].file_instructions)
      if files < workers:
        raise ValueError(
            f"The {split} split under {data_dir!r} has {files} record file(s) "
            f"but there are {workers} workers, each needing one; prepare into "
            "a fresh --config.data_dir (it is sharded for the number of "
            "workers).")


def check_weights(model: keras.Model, weights: str, workdir: str) -> None:
  """The FP32 weights the run will read load into `model` (shapes too).

  A truncated or corrupt file (h5py's OSError) is named with its fix: the
  workdir's own fp32/weights.h5 is made again by training, a given one must
  be replaced.
  """
  try:
    pretrained.load(model, weights)
  except OSError as error:
    if os.path.abspath(weights) == os.path.abspath(
        os.path.join(workdir, layout.FP32_WEIGHTS)):
      fix = (f"delete it and rerun to train the FP32 weights again (they "
             f"resume from {layout.checkpoint_dir(workdir, 'fp32')}), or pass "
             "--config.pretrained=<weights>")
    else:
      fix = "pass an intact copy as --config.pretrained"
    raise ValueError(
        f"FP32 weights {weights!r} cannot be read, the file is truncated or "
        f"corrupt ({error}); {fix}.") from error


def _check_plan_fits_model(plan: allocation.CompressionPlan,
                           model: keras.Model, path: str) -> None:
  """Every kernel of the plan is the model's, with its shape, and back."""
  shapes = {key: tuple(kernel.values.shape)
            for key, kernel in layers.compressible_kernels(model).items()}
  planned = {kernel.key: tuple(kernel.shape) for kernel in plan.kernels}
  foreign = sorted(key for key, shape in planned.items()
                   if shapes.get(key) != shape)
  unplanned = sorted(set(shapes) - set(planned) - set(plan.skipped))
  if foreign or unplanned:
    details = "; ".join(
        [f"kernel {key!r} {planned[key]} is "
         + (f"{shapes[key]} in the model" if key in shapes else
            "not in the model") for key in foreign[:3]]
        + [f"the model's {key!r} is not in it" for key in unplanned[:3]])
    raise ValueError(
        f"{path} was computed for another model than config.model="
        f"{model.name!r} ({details}). A workdir's plan belongs to the model it "
        "was computed for: use a fresh --workdir for this config.")


def check_plan_file(config: ml_collections.ConfigDict, workdir: str,
                    model: keras.Model | None = None) -> None:
  """An existing <workdir>/plan.json was made for this config's settings,
  and (given the config's tf_keras `model`) for its kernels."""
  path = os.path.join(workdir, layout.PLAN_FILE)
  if not os.path.exists(path):
    return
  try:
    plan = planning.read(workdir)
  except (ValueError, TypeError, KeyError) as error:
    raise ValueError(
        f"{path} is not a readable compression plan ({error}); use a fresh "
        "--workdir.") from error
  if model is not None:
    _check_plan_fits_model(plan, model, path)
  wanted = planning.allocate_options(config)
  found = planning.recorded_options(plan)
  if found != wanted:
    raise ValueError(
        f"{path} was computed for {found}, but the config asks for {wanted}. "
        "The plan of a workdir is never recomputed; use a fresh --workdir "
        "(or restore the config values).")


def check_export_dir(workdir: str) -> None:
  """<workdir>/export is absent, empty, or an export with a readable report.

  A rerun replaces an export whose report.json says it was made from other
  weights or options; anything else there (a file, someone's files) is not
  the run's to delete.
  """
  path = os.path.join(workdir, layout.EXPORT_DIR)
  if not os.path.lexists(path):
    return
  fix = (f"move it away or remove it, and rerun (the run exports to {path})")
  if not os.path.isdir(path) or os.path.islink(path):
    raise ValueError(f"{path} is not a directory; {fix}.")
  entries = sorted(os.listdir(path))
  if not entries:
    return
  report_path = os.path.join(path, exporting.REPORT_FILE)
  if exporting.REPORT_FILE not in entries:
    raise ValueError(
        f"{path} holds {entries[:5]} but no {exporting.REPORT_FILE}, so it is "
        f"not an export of this run; {fix}.")
  try:
    report = layout.read_json(report_path)
  except (OSError, ValueError) as error:
    raise ValueError(f"{report_path} is not readable JSON ({error}); {fix}."
                     ) from error
  if not isinstance(report, dict):
    raise ValueError(f"{report_path} is not an export report; {fix}.")


def validate(config: ml_collections.ConfigDict, strategy: tf.distribute.Strategy,
             workdir: str, *, phase: str = "all",
             default_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the problem and the fix for any bad input.

  Runs before any training and writes nothing. Checks every config field's
  type and range (pruning_rate in [0, 1), bits in MIN_BITS..MAX_BITS,
  positive learning rates, ...), that the global and eval batches divide
  into the strategy's replicas, that XLA can compile the model on them, that
  the workdir is writable, the ILSVRC manual_dir (or a prepared data_dir),
  that a user model builds and the FP32 weights the run reads load into the
  model (shapes; a truncated file is named), that an existing
  workdir/plan.json matches the config and the model's kernels, and that
  workdir/export is an export (or absent).

  Args:
    config: a ConfigDict from configs/.
    strategy: the strategy the run will use.
    workdir: the run's directory.
    phase: "fp32" (train_fp32), "compress" (compress_and_finetune: FP32
      weights must exist) or "all" (train_and_evaluate).
    default_config: the config every config starts from (configs/default.py's
      get_config()); its fields are the known ones.
  """
  if phase not in PHASES:
    raise ValueError(f"Unknown phase {phase!r}; use one of {PHASES}.")
  check_fields(config, default_config)
  replicas = strategy.num_replicas_in_sync
  for field in ("global_batch_size", "eval_batch_size"):
    if config[field] % replicas:
      raise ValueError(
          f"config.{field}={config[field]} is not divisible by the "
          f"{replicas} replicas of the strategy; pass a multiple of {replicas}, "
          f"e.g. --config.{field}={max(1, config[field] // replicas) * replicas}.")
  if (config.jit_compile and replicas > 1 and config.model == "small_resnet"
      and keras3_distribute.frontend_backend(config)[1] == "tensorflow"):
    raise ValueError(
        "config.jit_compile=True cannot compile small_resnet's synchronized "
        "BatchNorm (a cross-replica sync) with more than one replica under "
        "tf.distribute; set "
        "--config.jit_compile=False or use one replica.")
  check_workdir(workdir)
  check_data(config, workdir, strategy)
  start = layout.starting_point(config, workdir)
  if phase == "fp32" and config.fp32_epochs == 0:
    raise ValueError("config.fp32_epochs is 0: nothing to train; set "
                     "--config.fp32_epochs=<n>.")
  if start.fp32_weights is None and (phase == "compress" or start.rule == "plan"
                                     or config.fp32_epochs == 0):
    raise ValueError(
        f"No FP32 weights to compress: "
        f"{os.path.join(workdir, layout.FP32_WEIGHTS)} does not exist, "
        "config.pretrained is empty" + (
            " and config.fp32_epochs is 0" if phase == "all" else "") +
        ". Pass --config.pretrained=<weights>, or train them first "
        "(trainers/train.py, or --config.fp32_epochs=<n>).")
  model = None  # The config's tf_keras model, where a check builds it.
  if config.get("frontend", "tf_keras") == "keras3":
    from opq_tf.training import keras3_training  # pylint: disable=g-import-not-at-top
    keras3_training.check(config)
  elif config.pretrained == "imagenet":
    pretrained.check_imagenet_weights(config.model, config.num_classes,
                                      config.image_size)
  else:
    # The FP32 weights the run reads (a finished FP32 phase is not re-read).
    weights = config.pretrained or (start.fp32_weights if phase != "fp32"
                                    else None)
    if weights or config.model not in models.NAMES or (
        phase != "fp32" and start.rule == "plan"):
      model = models.build_for_config(config)  # The options suit the constructor.
    if weights:
      check_weights(model, weights, workdir)
  if phase != "fp32":
    check_plan_file(config, workdir, model)
    check_export_dir(workdir)
