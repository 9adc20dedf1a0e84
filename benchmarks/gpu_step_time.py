r"""Keras 3 train-step time, FP32 vs OPQ, on one backend: the GPU command.

    benchmarks/gpu_step_time.sh DIR     # the GPU machine: wheels, then this
    python -m benchmarks.gpu_step_time --output=/tmp/gpu.json   # the GPU run
    python -m benchmarks.gpu_step_time --tiny       # CPU smoke run, 32x32
    KERAS_BACKEND=tensorflow python -m benchmarks.gpu_step_time \
        --precision=float32 --batch_size=8 --train_step=trainer
                                  # how benchmarks/step_time.py's Keras 3
                                  # rows run it, one process per backend

Defaults are the GPU run (issue 15): ResNet-50 and MobileNet-V1
(configs/resnet50.py, configs/mobilenet_v1.py: p, B, the learning rate and
momentum, the image size 224 and the global batch 256), bf16 mixed precision
(`keras.config.set_dtype_policy("mixed_bfloat16")`), the JAX backend unless
KERAS_BACKEND names another, synthetic data, jit-compiled train steps.

| variant | model                                                             |
|---------|-------------------------------------------------------------------|
| fp32    | keras.applications.ResNet50 / MobileNet (alpha 1), weights=None     |
| opq     | opq_tf.apply(model, opq_tf.allocate(model, the config's p, B, ...)) |

The step (benchmarks/keras3_steps.py) is, with --train_step=keras (the
default, the GPU's), Keras' own compiled train step driven as `model.fit`
drives it: SGD momentum on the logits' cross-entropy, one fixed random
batch already on the device; with --train_step=trainer, the trainers' step
(opq_tf.training.keras3_loop.make_train_step, the config's weight decay
too), which imports TensorFlow and so cannot run on the GPU machine. The two
variants' steps are called round-robin (benchmarks/step_timing.py); the
ratio is the median over rounds of OPQ / FP32 in the same round, and
images/s is the global batch over the median wall time of a step. Target:
OPQ <= 1.02x FP32.

With the keras step on the JAX backend nothing imports TensorFlow: the GPU
machine has none. The JSON (printed, and written to --output) holds the settings, the
machine and versions, every step time, the ratios, a summary per model and
`tensorflow_imported`.
"""

import os
import sys

if __name__ == "__main__":
  # Keras reads its backend once, when first imported.
  os.environ.setdefault("KERAS_BACKEND", "jax")

import datetime  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
from typing import Callable, Optional, Sequence  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import keras3_steps  # noqa: E402
from benchmarks import step_timing  # noqa: E402
from benchmarks.step_timing import Timing  # noqa: E402
import opq_tf  # noqa: E402
from opq_tf.core import files  # noqa: E402
from opq_tf.keras3._keras import tensorflow_not_probed  # noqa: E402

PRECISIONS = ("mixed_bfloat16", "float32")
VARIANTS = ("fp32", "opq")
TARGET_RATIO = 1.02

_CONFIGS = flags.DEFINE_list(
    "configs", ["resnet50", "mobilenet_v1"],
    "configs/<name>.py to time; their model must be one of "
    f"{sorted(keras3_steps.KERAS3_MODELS)}.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Global batch (0: the config's global_batch_size).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Input height = width (0: the config's).")
_PRECISION = flags.DEFINE_enum("precision", "mixed_bfloat16", PRECISIONS,
                               "Keras dtype policy of both variants.")
_JIT = flags.DEFINE_list("jit_compile", ["true"],
                         "compile(jit_compile=...) settings to time.")
_TRAIN_STEP = flags.DEFINE_enum(
    "train_step", "keras", keras3_steps.TRAIN_STEPS,
    "keras: Keras' own compiled train step, as model.fit runs it (no "
    "TensorFlow); trainer: the trainers' step, opq_tf.training.keras3_loop."
    "make_train_step with the config's weight decay (imports TensorFlow).")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (rounds) per variant.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 5, "Untimed steps per variant, the first one compiling.")
_TINY = flags.DEFINE_bool(
    "tiny", False, "CPU smoke run: 32x32 images, batch 2, 1 warmup + 2 timed "
    "steps (flags given explicitly still win).")
_OUTPUT = flags.DEFINE_string("output", "",
                              "JSON file to write (it is printed as well).")


def load_config(name: str) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(): the model, p, B and recipe timed."""
  return importlib.import_module(f"configs.{name}").get_config()


def time_config(name: str, batch_size: int, image_size: int, steps: int,
                warmup: int, jit_settings: Sequence[bool],
                train_step: str = "keras") -> tuple[list[Timing], dict]:
  """Times FP32 and OPQ train steps of configs/<name>.py's model.

  Every (variant, jit setting) gets its own model, built from the same seed
  (the same weights), compiled with its jit setting; OPQ's is
  opq_tf.apply of it with one plan, allocated once.

  Returns:
    (timings, notes): notes hold the config's p, B, recipe, the model's
    parameter count and the plan's totals.
  """
  config = load_config(name)
  image_size = image_size or config.image_size
  batch_size = batch_size or config.global_batch_size
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)
                       ).astype(np.float32)
  labels = rng.integers(0, config.num_classes, (batch_size,)).astype(np.int32)

  def fp32() -> keras.Model:
    # set_random_seed seeds TensorFlow too if it can import it: not probed.
    with tensorflow_not_probed():
      keras.utils.set_random_seed(0)
    return keras3_steps.build_model(config.model, config.num_classes, image_size)

  notes = {"model": config.model, "image_size": image_size,
           "batch_size": batch_size, "pruning_rate": config.pruning_rate,
           "bits": config.bits, "learning_rate": config.learning_rate,
           "momentum": config.momentum,
           "weight_decay": config.weight_decay if train_step == "trainer"
                           else 0.0}
  plan = None
  builders: dict[str, Callable[[], keras.Model]] = {
      "fp32": fp32, "opq": lambda: opq_tf.apply(fp32(), plan)}
  timings, functions = [], {}
  try:
    base = fp32()
    notes["parameters"] = base.count_params()
    plan = opq_tf.allocate(base, **keras3_steps.allocate_options(config))
    notes["plan"] = {"kernels": len(plan.kernels),
                     "weights": plan.total_weights,
                     "realised_pruning_rate": plan.realised_pruning_rate,
                     "weight_bits_ratio": plan.weight_bits_ratio}
  except Exception as error:  # pylint: disable=broad-except
    logging.exception("Building %s failed", name)
    notes["error"] = step_timing.error_text(error)
  for jit_compile in jit_settings:
    for variant in VARIANTS:
      timing = Timing(name, jit_compile, variant)
      timings.append(timing)
      if "error" in notes:
        timing.error = f"not built: {notes['error']}"
        continue
      try:
        model = builders[variant]()
        if train_step == "trainer":
          functions[timing] = keras3_steps.make_trainer_step(
              model, images, labels, learning_rate=config.learning_rate,
              momentum=config.momentum, weight_decay=config.weight_decay,
              jit_compile=jit_compile)
        else:
          keras3_steps.compile_for_training(
              model, config.learning_rate, config.momentum, jit_compile)
          functions[timing] = keras3_steps.make_train_step(
              model, images, labels)
      except Exception as error:  # pylint: disable=broad-except
        logging.exception("Building %s/%s failed", name, variant)
        timing.error = step_timing.error_text(error)
  step_timing.time_round_robin(timings, functions, warmup, steps)
  return timings, notes


def images_per_s(timing: Timing, batch_size: int) -> Optional[float]:
  """The global batch over the median wall time of a step."""
  if timing.error or not timing.step_ms:
    return None
  return batch_size / (statistics.median(timing.step_ms) / 1e3)


def summary(timings: Sequence[Timing], notes: dict) -> list[dict]:
  """Per (config, jit setting): images/s of each variant and OPQ / FP32."""
  by_key = {(t.model, t.jit_compile, t.variant): t for t in timings}
  result = []
  for (name, jit_compile, variant), fp32 in by_key.items():
    if variant != "fp32":
      continue
    opq = by_key[(name, jit_compile, "opq")]
    batch_size = notes[name]["batch_size"]
    ratio_wall = step_timing.paired_ratio(opq, fp32)
    result.append({
        "config": name, "model": notes[name]["model"],
        "jit_compile": jit_compile, "batch_size": batch_size,
        "image_size": notes[name]["image_size"],
        "fp32_images_per_s": images_per_s(fp32, batch_size),
        "opq_images_per_s": images_per_s(opq, batch_size),
        "opq_over_fp32_wall": ratio_wall,
        "opq_over_fp32_cpu": step_timing.paired_ratio(opq, fp32, "cpu_ms"),
        "target": TARGET_RATIO,
        "meets_target": None if ratio_wall is None
                        else ratio_wall <= TARGET_RATIO,
        "errors": {t.variant: t.error for t in (fp32, opq) if t.error}})
  return result


def machine() -> dict:
  """Where it ran: platform, devices and the versions that matter."""
  backend = keras.backend.backend()
  return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
          "python": platform.python_version(), "keras": keras.__version__,
          "backend": backend,
          "backend_version": importlib.import_module(backend).__version__,
          "devices": [str(device)
                      for device in keras.distribution.list_devices()]}


def _settings() -> dict:
  """Flag values, with --tiny's smaller defaults for flags not given."""
  tiny = _TINY.value

  def pick(flag, tiny_value):
    return tiny_value if tiny and not flags.FLAGS[flag.name].present \
        else flag.value

  settings = {"configs": _CONFIGS.value, "batch_size": pick(_BATCH_SIZE, 2),
              "image_size": pick(_IMAGE_SIZE, 32), "steps": pick(_STEPS, 2),
              "warmup": pick(_WARMUP, 1), "precision": _PRECISION.value,
              "train_step": _TRAIN_STEP.value}
  jit = [value.strip().lower() for value in _JIT.value]
  problems = []
  for name in settings["configs"]:
    try:
      model = load_config(name).model
    except ImportError:
      problems.append(f"--configs: no configs/{name}.py.")
      continue
    if model not in keras3_steps.KERAS3_MODELS:
      problems.append(
          f"--configs: configs/{name}.py's model {model!r} has no Keras 3 "
          f"build here; use configs whose model is one of "
          f"{sorted(keras3_steps.KERAS3_MODELS)} (e.g. resnet50, mobilenet_v1).")
  for name in ("steps", "warmup"):
    if settings[name] < 1:
      problems.append(f"--{name}={settings[name]} must be >= 1.")
  for name in ("batch_size", "image_size"):
    if settings[name] < 0:
      problems.append(f"--{name}={settings[name]} must be >= 0 (0: the "
                      "config's).")
  if not jit or set(jit) - {"true", "false"}:
    problems.append(f"--jit_compile={_JIT.value}: give a list of true and/or "
                    "false, e.g. --jit_compile=true.")
  if problems:
    raise app.UsageError(" ".join(problems), exitcode=2)
  settings["jit_settings"] = [value == "true" for value in jit]
  settings["command"] = " ".join(["python -m benchmarks.gpu_step_time",
                                  *sys.argv[1:]])
  settings["date"] = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")
  return settings


def run(settings: dict, output: str = "") -> dict:
  """Times every config of `settings`; returns the results JSON.

  With `output`, the results so far are written there after each config,
  so a run stopped by a time limit keeps the models it finished.
  """
  keras.config.set_dtype_policy(settings["precision"])
  timings, notes = [], {}
  for name in settings["configs"]:
    config_timings, notes[name] = time_config(
        name, settings["batch_size"], settings["image_size"],
        settings["steps"], settings["warmup"], settings["jit_settings"],
        settings["train_step"])
    timings += config_timings
    keras.backend.clear_session()
    results = {"settings": settings, "machine": machine(), "notes": notes,
               "timings": step_timing.rows(timings),
               "summary": summary(timings, notes),
               "tensorflow_imported": "tensorflow" in sys.modules}
    if output:
      files.write_json(output, results)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}", exitcode=2)
  results = run(_settings(), _OUTPUT.value)
  for row in results["summary"]:
    logging.info("%s jit=%s: FP32 %s img/s, OPQ %s img/s, OPQ/FP32 %s",
                 row["config"], row["jit_compile"], row["fp32_images_per_s"],
                 row["opq_images_per_s"], row["opq_over_fp32_wall"])
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)
