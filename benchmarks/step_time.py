"""Train-step time of OPQ-wrapped models against FP32 and tfmot, one run.

    python -m benchmarks.step_time             # -> docs/step_time_results.md
    python -m benchmarks.step_time --batch_size=64   # on a GPU: 64 or more
    python -m benchmarks.step_time --quick     # configs/default.py, 2 steps

Times the trainer's own step, `loop.make_train_step` (cross-entropy over
the global batch + the config's `kernel_l2` weight decay, SGD momentum, the
all-reduce), under the strategy the trainers use (`distribute.make_strategy`,
--strategy / --cpu_devices as in trainers/), with and without its
jit_compile (XLA for the forward/backward pass). Models, pruning rate p, bits
B and the allocation options come from the configs (configs/<name>.py:
`models.build(config.model, ...)`, planning.allocate_options(config));
only the image size and batch are flags (a 2-core CPU cannot run 224x224 at
the configs' batch 256).

| variant     | model                                                        |
|-------------|--------------------------------------------------------------|
| fp32        | the plain model                                              |
| opq         | opq_tf.apply(model, allocate(model, config's p, B, options)) |
| tfmot_prune | prune_low_magnitude, ConstantSparsity(p), frequency 100      |
| tfmot_pqat  | prune -> strip -> 8-bit prune-preserving QAT                 |
| opq_ops     | OPQ's quantizer alone (forward, STE backward), all kernels   |

Keras 3 rows (--keras3_backends): the same configs' models as Keras 3
networks (keras.applications ResNet50 / MobileNet), FP32 and
opq_tf.apply(keras.Model, plan), timed on each backend in a process of its
own (Keras reads its backend once per process) by
benchmarks/gpu_step_time.py with the trainers' Keras 3 step
(`keras3_loop.make_train_step`, the same loss, decay and SGD momentum,
one device), float32; on JAX the step is always jit-compiled. Configs
whose model has no Keras 3 build there are skipped; --quick times
configs/mobilenet_v1.py at 32x32 for these rows.

The tfmot variants are benchmarks/tfmot_baselines.py's. Every variant gets
the same random batch (from a repeated dataset, distributed as the trainer
distributes its input). The step functions are called round-robin (the order
rotated each round); each step's wall and process CPU time is recorded, and a
variant's ratio is the median over rounds of its time divided by the FP32
time of the same round and jit setting: only ratios taken in one run mean
something on a shared machine. A variant that fails gets its error in the
table instead of stopping the run. Writes a markdown file of tables and a
JSON file of every time; the analysis is in docs/benchmarks.md.
"""

import datetime
import importlib
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from benchmarks import keras3_steps
from benchmarks import step_timing
from benchmarks.step_timing import Timing
from benchmarks import tfmot_baselines
import opq_tf
from opq_tf.training import distribute
from opq_tf.core import files
from opq_tf.training import models
from opq_tf.training import loop
from opq_tf.training import planning
from opq_tf.tf_keras import wrapping
from opq_tf.tf_keras._keras import keras, tf, tfmot
from opq_tf.tf_keras.quantizers import OPQWeightQuantizer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_OUTPUT = os.path.join(_REPO, "docs", "step_time_results.md")

CONFIGS = ("resnet50", "mobilenet_v1", "alexnet", "default")
KERAS3_BACKENDS = ("tensorflow", "jax")
# The Keras 3 rows of a --quick run: the default config has no Keras 3 build.
_QUICK_KERAS3_CONFIG, _QUICK_KERAS3_IMAGE_SIZE = "mobilenet_v1", 32

_CONFIGS = flags.DEFINE_list(
    "configs", ["resnet50", "mobilenet_v1"],
    f"configs/<name>.py to time, some of {list(CONFIGS)}.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 8, "Global batch (8 suits a 2-core CPU; 64+ on a GPU).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 224, "Input height = width (0: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (rounds) per variant.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed steps per variant, the first one tracing/compiling.")
_JIT = flags.DEFINE_list("jit_compile", ["false", "true"],
                         "make_train_step jit_compile settings to time.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["fp32", "opq", "tfmot_prune", "tfmot_pqat", "opq_ops"],
    "Variants to time (fp32, the baseline of every ratio, is always timed).")
_STRATEGY = flags.DEFINE_enum("strategy", "mirrored", distribute.STRATEGIES,
                              "tf.distribute strategy, as the trainers'.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into N replicas, as the trainers'.")
_KERAS3_BACKENDS = flags.DEFINE_list(
    "keras3_backends", list(KERAS3_BACKENDS),
    "Keras 3 backends to time the Keras 3 frontend on, some of "
    f"{list(KERAS3_BACKENDS)} (empty: no Keras 3 rows).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke run: configs/default.py at its 32x32, batch 2, 1 "
    "warmup + 2 timed steps (flags given explicitly still win); writes "
    "--output only if it is given.")
_OUTPUT = flags.DEFINE_string(
    "output", _DEFAULT_OUTPUT,
    "Markdown file to write (and the JSON of every time beside it, .json).")

VARIANTS = ("fp32", "opq", "tfmot_prune", "tfmot_pqat", "opq_ops")


def load_config(name: str) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(): the model, p, B and recipe timed."""
  return importlib.import_module(f"configs.{name}").get_config()


def make_opq_ops_step(qmodel: keras.Model, jit_compile: bool,
                      seed: int = 0) -> Callable:
  """() -> compressed kernels and their gradients, OPQ's per-step extra work.

  For every compressed kernel of `qmodel` (its values, mask, step and bits):
  w_hat = mask * q(w) forward and mask * upstream backward (the
  straight-through estimator), with OPQWeightQuantizer itself, on copies of
  the kernels and a random upstream gradient. Both are returned so that XLA
  cannot drop either.
  """
  rng = np.random.default_rng(seed)
  kernels, quantizer_vars, upstreams, quantizers = [], [], [], []
  for entry in wrapping.compressed_kernels(qmodel):
    kernels.append(tf.Variable(entry.kernel))
    quantizer_vars.append({
        "mask": tf.Variable(entry.mask, dtype=tf.float32, trainable=False),
        "step": tf.Variable(entry.step, trainable=False),
    })
    upstreams.append(tf.Variable(rng.standard_normal(entry.kernel.shape)
                                 .astype(np.float32), trainable=False))
    quantizers.append(OPQWeightQuantizer(entry.bits, entry.step.ravel().tolist()
                                         if entry.step.ndim else
                                         float(entry.step), entry.threshold,
                                         entry.channel_axes))

  @tf.function(jit_compile=jit_compile)
  def opq_ops_step():
    with tf.GradientTape() as tape:
      compressed = [quantizer(kernel, True, variables) for quantizer, kernel,
                    variables in zip(quantizers, kernels, quantizer_vars)]
    gradients = tape.gradient(compressed, kernels,
                              output_gradients=[u.read_value()
                                                for u in upstreams])
    return compressed, gradients

  return opq_ops_step


def _build_variants(config: ml_collections.ConfigDict, image_size: int,
                    images: tf.Tensor, variants: Sequence[str],
                    strategy: tf.distribute.Strategy
                    ) -> tuple[dict, dict, dict]:
  """(variant -> model, variant -> error text, setup notes) for one config.

  Every model is built under `strategy.scope()`, as the trainer builds it.
  """
  keras.utils.set_random_seed(0)
  with strategy.scope():
    base = models.build(config.model, config.num_classes, image_size)

  plans = []

  def opq():
    plan = opq_tf.allocate(base, **planning.allocate_options(config))
    plans.append(plan)
    return wrapping.apply(base, plan,
                          quantize_activations=config.quantize_activations)

  builders = {
      "fp32": lambda: tfmot_baselines.copy_model(base),
      "opq": opq,
      "tfmot_prune": lambda: tfmot_baselines.pruned_for_timing(
          base, config.pruning_rate),
      "tfmot_pqat": lambda: tfmot_baselines.pqat_for_timing(
          base, config.pruning_rate, images),
  }
  built, errors, notes = {}, {}, {}
  needed = set(variants) | ({"opq"} if "opq_ops" in variants else set())
  for variant, builder in builders.items():
    if variant not in needed:
      continue
    start = time.perf_counter()
    try:
      with strategy.scope():
        built[variant] = builder()
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("Building %s/%s failed", config.model, variant)
      errors[variant] = step_timing.error_text(error)
      continue
    logging.info("Built %s/%s in %.1f s", config.model, variant,
                 time.perf_counter() - start)
  notes["parameters"] = base.count_params()
  if "opq" in built:
    plan = plans[-1]
    notes["plan"] = {"kernels": len(plan.kernels),
                     "weights": plan.total_weights,
                     "realised_pruning_rate": plan.realised_pruning_rate,
                     "weight_bits_ratio": plan.weight_bits_ratio}
  if "tfmot_pqat" in built:
    notes["pqat_zeros"] = _zero_fraction(built["tfmot_pqat"])
  return built, errors, notes


def _zero_fraction(model: keras.Model) -> float:
  """Fraction of exact zeros over the model's conv/dense kernels."""
  zeros = total = 0
  for weight in model.weights:
    if re.search(r"(depthwise_|pointwise_)?kernel:0$", weight.name):
      value = weight.numpy()
      zeros += int(np.sum(value == 0))
      total += value.size
  return zeros / max(total, 1)


def time_model(name: str, batch_size: int, image_size: int, steps: int,
               warmup: int, jit_settings: Sequence[bool],
               variants: Sequence[str] = VARIANTS,
               strategy: Optional[tf.distribute.Strategy] = None
               ) -> tuple[list[Timing], dict]:
  """Times every variant of configs/<name>.py's model, round-robin.

  Each step function is called once (trace/compile: `first_call_s`), then
  `warmup - 1 + steps` rounds call every working function once in a rotated
  order; the last `steps` rounds are recorded: wall time (`step_ms`) and this
  process's CPU time over all threads (`cpu_ms`, far less sensitive to other
  jobs on the machine). A function that raises gets the error text and is
  dropped from later rounds.

  Returns:
    (timings, notes): notes hold the config's p, B, the model's parameter
    count and the OPQ plan's totals.
  """
  strategy = strategy or distribute.make_strategy("mirrored")
  config = load_config(name)
  image_size = image_size or config.image_size
  images = tf.random.stateless_uniform(
      (batch_size, image_size, image_size, 3), seed=(1, 2), maxval=255.0)
  labels = tf.random.stateless_uniform(
      (batch_size,), seed=(3, 4), minval=0, maxval=config.num_classes,
      dtype=tf.int32)
  batches = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors((images, labels)).repeat())
  variants = [v for v in VARIANTS if v in variants or v == "fp32"]
  built, errors, notes = _build_variants(config, image_size, images, variants,
                                         strategy)
  notes.update(model=config.model, pruning_rate=config.pruning_rate,
               bits=config.bits, weight_decay=config.weight_decay,
               image_size=image_size)
  functions, timings, optimizers = {}, [], {}
  for jit_compile in jit_settings:
    for variant in variants:
      timing = Timing(name, jit_compile, variant)
      timings.append(timing)
      source = "opq" if variant == "opq_ops" else variant
      if source in errors:
        timing.error = f"not built: {errors[source]}"
        continue
      try:
        if variant == "opq_ops":
          function = make_opq_ops_step(built["opq"], jit_compile)
          functions[timing] = lambda f=function: f()
        else:
          model = built[variant]
          if variant not in optimizers:
            with strategy.scope():
              optimizers[variant] = keras.optimizers.SGD(
                  config.learning_rate, momentum=config.momentum,
                  jit_compile=False)
              optimizers[variant].build(model.trainable_variables)
          function = loop.make_train_step(
              model, optimizers[variant], strategy,
              global_batch_size=batch_size,
              weight_decay=float(config.weight_decay), jit_compile=jit_compile)
          iterator = iter(batches)
          functions[timing] = (
              lambda f=function, i=iterator: f(i).numpy())
      except Exception as error:  # pylint: disable=broad-except
        timing.error = step_timing.error_text(error)

  step_timing.time_round_robin(timings, functions, warmup, steps)
  return timings, notes


_LABELS = {
    "fp32": "FP32",
    "opq": "OPQ (opq_tf.apply)",
    "tfmot_prune": "tfmot prune_low_magnitude",
    "tfmot_pqat": "tfmot PQAT (prune-preserve 8-bit QAT)",
    "opq_ops": "OPQ quantizer ops only (all kernels, fwd + STE bwd)",
}


def keras3_configs(settings: dict) -> list[str]:
  """The configs of `settings` whose model has a Keras 3 build."""
  configs = [name for name in settings["configs"]
             if load_config(name).model in keras3_steps.KERAS3_MODELS]
  if not configs and settings.get("quick"):
    configs = [_QUICK_KERAS3_CONFIG]
  return configs


def time_keras3(backend: str, configs: Sequence[str], settings: dict) -> dict:
  """benchmarks/gpu_step_time.py's results on `backend` (its JSON), or
  {"error": its last lines} if it failed.

  Run as a subprocess with KERAS_BACKEND=backend, float32, the trainers'
  step and this run's batch, steps and warmup (jit settings: this run's on
  TensorFlow, jit-compiled on JAX).
  """
  image_size = settings["image_size"]
  if settings.get("quick") and configs == [_QUICK_KERAS3_CONFIG]:
    image_size = image_size or _QUICK_KERAS3_IMAGE_SIZE
  jit = ("true" if backend == "jax" else
         ",".join(str(value).lower() for value in settings["jit_settings"]))
  with tempfile.TemporaryDirectory() as directory:
    output = os.path.join(directory, "keras3.json")
    command = [sys.executable, "-m", "benchmarks.gpu_step_time",
               f"--configs={','.join(configs)}",
               f"--batch_size={settings['batch_size']}",
               f"--image_size={image_size}", f"--steps={settings['steps']}",
               f"--warmup={settings['warmup']}", "--precision=float32",
               "--train_step=trainer", f"--jit_compile={jit}",
               f"--output={output}"]
    logging.info("Keras 3 rows on %s: %s", backend, " ".join(command[1:]))
    result = subprocess.run(command, cwd=_REPO, capture_output=True,
                            text=True, check=False,
                            env=dict(os.environ, KERAS_BACKEND=backend))
    results = (files.read_json(output) if os.path.exists(output) else {})
    if result.returncode or not results:
      tail = " ".join(result.stderr.strip().splitlines()[-3:])
      results["error"] = f"exit {result.returncode}: {tail}"[:500]
    return results


def _ratio(timing: Timing, baseline: Timing, clock: str = "step_ms") -> str:
  return step_timing.format_ratio(
      step_timing.paired_ratio(timing, baseline, clock))


def keras3_markdown(keras3: dict) -> list[str]:
  """The Keras 3 section: backend -> `time_keras3` results, as table lines."""
  lines = [
      "",
      "## Keras 3 frontend (opq_tf.apply on a keras.Model)",
      "",
      "`benchmarks/gpu_step_time.py --train_step=trainer --precision=float32`"
      ", one process per backend: the trainers' Keras 3 step "
      "(`keras3_loop.make_train_step`, one device), keras.applications "
      "networks, FP32 and OPQ round-robin as above; JAX steps are always "
      "jit-compiled. Target: OPQ / FP32 CPU <= 1.02x.",
      "",
      "| config | backend | jit_compile | variant | first call (s) | wall "
      "ms/step (median) | CPU ms/step (median) | x FP32 wall | x FP32 CPU |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for backend, results in keras3.items():
    timings = [step_timing.from_row(row) for row in results.get("timings", [])]
    baselines = {(t.model, t.jit_compile): t for t in timings
                 if t.variant == "fp32"}
    for timing in timings:
      head = (f"| {timing.model} | {backend} | {timing.jit_compile} | "
              f"{_LABELS[timing.variant]} |")
      if timing.error or not timing.step_ms:
        lines.append(f"{head}{' error |' * 4} {timing.error} |")
        continue
      baseline = baselines[(timing.model, timing.jit_compile)]
      lines.append(
          f"{head} {timing.first_call_s:.1f} | "
          f"{statistics.median(timing.step_ms):.1f} | "
          f"{statistics.median(timing.cpu_ms):.1f} | "
          f"{_ratio(timing, baseline)} | {_ratio(timing, baseline, 'cpu_ms')} |")
    if "error" in results:
      lines.append(f"| all | {backend} | - | - |{' error |' * 4} "
                   f"{results['error'].replace('|', '/')} |")
  lines.append("")
  for backend, results in keras3.items():
    machine = results.get("machine")
    if machine:
      lines.append(f"- {backend}: Keras {machine['keras']}, {backend} "
                   f"{machine['backend_version']}, devices "
                   f"{', '.join(machine['devices'])}")
  return lines


def results_markdown(timings: Sequence[Timing], notes: dict, settings: dict,
                     load: tuple, keras3: Optional[dict] = None) -> str:
  """The results file: machine, date, command and tables (no analysis).

  Args:
    timings: from `time_model`, all configs.
    notes: config name -> setup notes of `time_model`.
    settings: date, command, batch_size, image_size, steps, warmup, strategy,
      replicas.
    load: 1-minute load average at the start and the end of the run.
    keras3: backend -> `time_keras3`'s results (no Keras 3 section if empty).
  """
  lines = [
      "# Train-step time: FP32 vs OPQ vs tfmot",
      "",
      "Written by `benchmarks/step_time.py`; analysis in "
      "[benchmarks.md](benchmarks.md).",
      "",
      f"- Date: {settings['date']}",
      f"- Machine: {platform.platform()}, {platform.machine()}, "
      f"{os.cpu_count()} CPU cores (`os.cpu_count()`), no GPU used; "
      f"TensorFlow {tf.__version__}, tfmot {tfmot.__version__}, "
      f"Python {platform.python_version()}",
      f"- Load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}.",
      f"- Command: `{settings['command']}`",
      f"- Step: `loop.make_train_step` under {settings['strategy']} "
      f"({settings['replicas']} replica(s)), global batch "
      f"{settings['batch_size']}, {settings['warmup']} untimed + "
      f"{settings['steps']} timed steps per variant (the first untimed one "
      "traces and compiles); jit_compile = XLA for the forward/backward pass.",
      "",
      "## Setup (from the configs)",
      "",
      "| config | model | image size | parameters | p | B | weight decay | "
      "OPQ kernels (weights) | OPQ realised p | OPQ weight-bits ratio | "
      "tfmot PQAT kernel zeros |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, note in notes.items():
    plan = note.get("plan")
    plan_cells = (f"{plan['kernels']} ({plan['weights'] / 1e6:.2f}M) | "
                  f"{plan['realised_pruning_rate']:.3f} | "
                  f"{plan['weight_bits_ratio']:.2f}x" if plan
                  else "n/a | n/a | n/a")
    zeros = note.get("pqat_zeros")
    lines.append(
        f"| {name} | {note['model']} | {note['image_size']} | "
        f"{note['parameters'] / 1e6:.2f}M | {note['pruning_rate']} | "
        f"{note['bits']} | {note['weight_decay']} | {plan_cells} | "
        f"{'n/a' if zeros is None else f'{zeros:.3f}'} |")
  lines += [
      "",
      "## Step times",
      "",
      "Wall: elapsed time of a step. CPU: this process's CPU time over all its "
      "threads during the step. `x FP32` is the median over rounds of "
      "(variant step / FP32 step of the same round and jit setting).",
      "",
      "| config | jit_compile | variant | first call (s) | wall ms/step "
      "(median) | wall ms/step (min) | CPU ms/step (median) | x FP32 wall | "
      "x FP32 CPU |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  baselines = {(t.model, t.jit_compile): t for t in timings
               if t.variant == "fp32"}
  for timing in timings:
    head = (f"| {timing.model} | {timing.jit_compile} | "
            f"{_LABELS[timing.variant]} |")
    if timing.error or not timing.step_ms:
      lines.append(f"{head}{' error |' * 5} {timing.error} |")
      continue
    baseline = baselines[(timing.model, timing.jit_compile)]
    lines.append(
        f"{head} {timing.first_call_s:.1f} | "
        f"{statistics.median(timing.step_ms):.1f} | "
        f"{min(timing.step_ms):.1f} | {statistics.median(timing.cpu_ms):.1f} | "
        f"{_ratio(timing, baseline)} | {_ratio(timing, baseline, 'cpu_ms')} |")
  lines += [
      "",
      "## Ratios to FP32 (wall / CPU)",
      "",
      "| config | jit_compile | OPQ / FP32 | tfmot prune / FP32 | "
      "tfmot PQAT / FP32 | OPQ ops alone / FP32 | OPQ - FP32 (CPU ms) | "
      "OPQ ops alone (CPU ms) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  by_key = {(t.model, t.jit_compile, t.variant): t for t in timings}
  for (model, jit_compile), baseline in baselines.items():
    cells = []
    for variant in VARIANTS[1:]:
      timing = by_key.get((model, jit_compile, variant))
      wall = timing and step_timing.paired_ratio(timing, baseline)
      cpu = timing and step_timing.paired_ratio(timing, baseline, "cpu_ms")
      cells.append(f"{step_timing.format_ratio(wall)} / "
                   f"{step_timing.format_ratio(cpu)}")
    extra = []
    for variant in ("opq", "opq_ops"):
      timing = by_key.get((model, jit_compile, variant))
      if (timing is None or timing.error or not timing.cpu_ms
          or baseline.error or not baseline.cpu_ms):
        extra.append("n/a")
        continue
      value = statistics.median(timing.cpu_ms)
      if variant == "opq":
        value -= statistics.median(baseline.cpu_ms)
      extra.append(f"{value:.1f}")
    lines.append(f"| {model} | {jit_compile} | {' | '.join(cells)} | "
                 f"{' | '.join(extra)} |")
  if keras3:
    lines += keras3_markdown(keras3)
  return "\n".join(lines) + "\n"


def results_json(timings: Sequence[Timing], notes: dict, settings: dict,
                 load: tuple, keras3: Optional[dict] = None) -> dict:
  """Every measured time, the setup notes and the ratios, for results JSON
  (`keras3`: each backend's gpu_step_time.py results as they came)."""
  return {"settings": {k: v for k, v in settings.items() if k != "output"},
          "load_average": list(load), "notes": notes,
          "timings": step_timing.rows(timings), "keras3": keras3 or {},
          "machine": platform.platform(), "cpu_count": os.cpu_count(),
          "tensorflow": tf.__version__, "tfmot": tfmot.__version__}


def _settings() -> dict:
  """Flag values, with --quick's smaller defaults for flags not given."""
  quick = _QUICK.value
  def pick(flag, quick_value):
    return quick_value if quick and not flags.FLAGS[flag.name].present \
        else flag.value
  settings = {
      "configs": pick(_CONFIGS, ["default"]),
      "batch_size": pick(_BATCH_SIZE, 2),
      "image_size": pick(_IMAGE_SIZE, 0),
      "steps": pick(_STEPS, 2),
      "warmup": pick(_WARMUP, 1),
      "output": (_OUTPUT.value if not quick or flags.FLAGS["output"].present
                 else None),
  }
  jit = [value.strip().lower() for value in _JIT.value]
  problems = []
  unknown = [c for c in settings["configs"] if c not in CONFIGS]
  if unknown:
    problems.append(f"Unknown --configs {unknown}; use some of "
                    f"{list(CONFIGS)}.")
  unknown = [b for b in _KERAS3_BACKENDS.value
             if b and b not in KERAS3_BACKENDS]
  if unknown:
    problems.append(f"Unknown --keras3_backends {unknown}; use some of "
                    f"{list(KERAS3_BACKENDS)}, or none (empty).")
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    problems.append(f"Unknown --variants {unknown}; use some of "
                    f"{list(VARIANTS)}.")
  for name in ("batch_size", "steps", "warmup"):
    if settings[name] < 1:
      problems.append(f"--{name}={settings[name]} must be >= 1.")
  if settings["image_size"] < 0:
    problems.append(f"--image_size={settings['image_size']} must be >= 0 "
                    "(0: the config's).")
  if not jit or set(jit) - {"true", "false"}:
    problems.append(f"--jit_compile={_JIT.value}: give a list of true and/or "
                    "false, e.g. --jit_compile=false,true.")
  if problems:
    raise app.UsageError(" ".join(problems))
  settings["jit_settings"] = [value == "true" for value in jit]
  settings["variants"] = _VARIANTS.value
  settings["quick"] = quick
  settings["keras3_backends"] = [b for b in _KERAS3_BACKENDS.value if b]
  settings["command"] = " ".join(["python -m benchmarks.step_time",
                                  *sys.argv[1:]])
  settings["date"] = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")
  return settings


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  settings = _settings()
  strategy = distribute.make_strategy(_STRATEGY.value, _CPU_DEVICES.value)
  settings.update(strategy=_STRATEGY.value,
                  replicas=strategy.num_replicas_in_sync)
  if settings["batch_size"] % strategy.num_replicas_in_sync:
    raise app.UsageError(
        f"--batch_size={settings['batch_size']} is not divisible by the "
        f"{strategy.num_replicas_in_sync} replicas.")
  load_start = os.getloadavg()[0]
  timings, notes = [], {}
  for name in settings["configs"]:
    config_timings, notes[name] = time_model(
        name, settings["batch_size"], settings["image_size"], settings["steps"],
        settings["warmup"], settings["jit_settings"], settings["variants"],
        strategy)
    timings += config_timings
    keras.backend.clear_session()
  keras3 = {}
  configs = keras3_configs(settings) if settings["keras3_backends"] else []
  for backend in settings["keras3_backends"] if configs else ():
    keras3[backend] = time_keras3(backend, configs, settings)
  load = (load_start, os.getloadavg()[0])
  text = results_markdown(timings, notes, settings, load, keras3)
  print(text)
  if settings["output"]:
    files.atomic_write(settings["output"], text)
    files.write_json(os.path.splitext(settings["output"])[0] + ".json",
                     results_json(timings, notes, settings, load, keras3))
    logging.info("Wrote %s", settings["output"])


if __name__ == "__main__":
  app.run(main)
