"""Train-step time of OPQ-wrapped models against FP32 and tfmot, one run.

Issue target: an OPQ finetuning step of ResNet-50 / MobileNet-V1 at 224x224
costs at most 1.15x the FP32 step.

    python -m benchmarks.step_time             # -> docs/step_time_results.md
    python -m benchmarks.step_time --batch_size=64   # on a GPU: 64 or more
    python -m benchmarks.step_time --quick     # tiny_cnn, 32x32, 2 steps

Variants, all tf_keras.applications models (weights=None, 1000 logits) fed
the same random batch, trained by the same step (a tf.function, with and
without jit_compile: GradientTape, cross-entropy, SGD momentum 0.9):

| variant     | model                                                  |
|-------------|--------------------------------------------------------|
| fp32        | the plain model                                        |
| opq         | opq_tf.apply(model, pruning_rate=p, bits=B)            |
| tfmot_prune | prune_low_magnitude, ConstantSparsity(p), frequency 100 |
| tfmot_pqat  | prune -> strip_pruning -> quantize_annotate_model ->   |
|             | quantize_apply(Default8BitPrunePreserveQuantizeScheme) |
| opq_ops     | OPQ's quantizer alone (forward, STE backward), all kernels |

p and B are the configs' (ResNet-50 0.79 / 4, MobileNet-V1 0.656 / 4).
--models takes resnet50, mobilenet_v1 and tiny_cnn (five layers, for --quick).

The machines this runs on are shared, so only ratios taken in one run mean
something: the step functions are called round-robin (the order rotated each
round), each step's wall and process CPU time is recorded, and a variant's
ratio is the median over rounds of its time divided by the FP32 time of the
same round and jit setting. A variant that fails (e.g. an op XLA cannot
compile) gets its error in the table instead of stopping the run.
"""

import dataclasses
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from opq_tf._keras import keras, tf, tfmot
from opq_tf.wrapping import apply as opq_apply
from opq_tf.quantizers import OPQWeightQuantizer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_OUTPUT = os.path.join(_REPO, "docs", "step_time_results.md")

_MODELS = flags.DEFINE_list("models", ["resnet50", "mobilenet_v1"],
                            "Architectures to time.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 8, "Images per step (8 suits a 2-core CPU; 64+ on a GPU).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input height = width.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (rounds) per variant.")
_WARMUP = flags.DEFINE_integer(
    "warmup", 2, "Untimed steps per variant, the first one tracing/compiling.")
_JIT = flags.DEFINE_list("jit_compile", ["false", "true"],
                         "tf.function jit_compile settings to time.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["fp32", "opq", "tfmot_prune", "tfmot_pqat", "opq_ops"],
    "Variants to time (fp32, the baseline of every ratio, is always timed).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke run: tiny_cnn, 32x32, batch 2, 1 warmup + 2 timed "
    "steps (flags given explicitly still win, e.g. --models=mobilenet_v1); "
    "writes --output only if it is given.")
_OUTPUT = flags.DEFINE_string("output", _DEFAULT_OUTPUT,
                              "Markdown file to write the results to.")



def tiny_cnn(weights=None, input_shape=(32, 32, 3), classes=1000,
             classifier_activation=None) -> keras.Model:
  """MobileNet's layer kinds in five layers, for --quick (a smoke test).

  Same signature as the keras.applications builders; conv -> BN -> ReLU ->
  depthwise conv -> BN -> ReLU -> 1x1 conv -> global pool -> dense.
  """
  if weights is not None:
    raise ValueError("tiny_cnn has no pre-trained weights; use weights=None.")
  layers = keras.layers
  inputs = keras.Input(input_shape)
  x = layers.Conv2D(16, 3, strides=2, use_bias=False)(inputs)
  x = layers.ReLU()(layers.BatchNormalization()(x))
  x = layers.DepthwiseConv2D(3, use_bias=False)(x)
  x = layers.ReLU()(layers.BatchNormalization()(x))
  x = layers.GlobalAveragePooling2D()(layers.Conv2D(32, 1)(x))
  outputs = layers.Dense(classes, activation=classifier_activation)(x)
  return keras.Model(inputs, outputs, name="tiny_cnn")


# Architecture, pruning rate and bit-width of the configs (weight-bits ratio
# 38.03x and 23.26x, the paper's figures; see the method doc, part C).
ARCHITECTURES = {
    "resnet50": (keras.applications.ResNet50, 0.79, 4),
    "mobilenet_v1": (keras.applications.MobileNet, 0.656, 4),
    "tiny_cnn": (tiny_cnn, 0.656, 4),
}
VARIANTS = ("fp32", "opq", "tfmot_prune", "tfmot_pqat", "opq_ops")
_PRUNING_FREQUENCY = 100  # tfmot's default mask-update frequency.
_LEARNING_RATE = 0.005  # The paper's ImageNet finetuning rate.


@dataclasses.dataclass(eq=False)
class Timing:
  """Times of one (model, jit setting, variant) step function."""

  model: str
  jit_compile: bool
  variant: str
  first_call_s: Optional[float] = None
  step_ms: list = dataclasses.field(default_factory=list)
  cpu_ms: list = dataclasses.field(default_factory=list)
  error: Optional[str] = None


def _error_text(error: Exception) -> str:
  """One line naming the failure (XLA's unsupported-op line if there is one)."""
  text = str(error)
  found = re.search(r"Detected unsupported operations[^\n]*\n?[^\n]*", text)
  line = found.group(0) if found else (text.strip().splitlines() or [""])[0]
  line = " ".join(line.split()).replace("|", "/")
  return f"{type(error).__name__}: {line[:300]}"


def _fresh_copy(model: keras.Model) -> keras.Model:
  """A clone with its own variables holding `model`'s values."""
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  return copy


def _tfmot_pruned(model: keras.Model, pruning_rate: float) -> keras.Model:
  """prune_low_magnitude with masks already computed once, as after step 1.

  ConstantSparsity(begin_step=1, frequency=100): the wrapper increments its
  step before the mask update, so the masks are computed (top-k) in the first
  training call and again every 100 steps; the timed steps fall between.
  """
  schedule = tfmot.sparsity.keras.ConstantSparsity(
      pruning_rate, begin_step=1, frequency=_PRUNING_FREQUENCY)
  pruned = tfmot.sparsity.keras.prune_low_magnitude(
      _fresh_copy(model), pruning_schedule=schedule)
  callback = tfmot.sparsity.keras.UpdatePruningStep()
  callback.set_model(pruned)
  callback.on_train_begin()  # Sets every wrapper's step to 0, as fit() does.
  return pruned


def _tfmot_pqat(model: keras.Model, pruning_rate: float,
                images: tf.Tensor) -> keras.Model:
  """tfmot's prune-preserving QAT model of a model pruned to `pruning_rate`.

  The documented flow without the finetuning in between: prune_low_magnitude,
  one training call (computes the masks and zeroes the pruned weights),
  strip_pruning, quantize_annotate_model, quantize_apply with
  Default8BitPrunePreserveQuantizeScheme (8-bit per-channel weights keeping
  the zeros, 8-bit activations).
  """
  pruned = _tfmot_pruned(model, pruning_rate)
  pruned(images[:1], training=True)
  stripped = tfmot.sparsity.keras.strip_pruning(pruned)
  annotated = tfmot.quantization.keras.quantize_annotate_model(stripped)
  scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
  return tfmot.quantization.keras.quantize_apply(annotated, scheme=scheme)


def _zero_fraction(model: keras.Model) -> float:
  """Fraction of exact zeros over the model's conv/dense kernels."""
  zeros = total = 0
  for weight in model.weights:
    if re.search(r"(depthwise_)?kernel:0$", weight.name):
      value = weight.numpy()
      zeros += int(np.sum(value == 0))
      total += value.size
  return zeros / max(total, 1)


def make_train_step(model: keras.Model, optimizer,
                    jit_compile: bool) -> Callable:
  """(images, labels) -> loss: one SGD step of `model` as a tf.function."""
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  @tf.function(jit_compile=jit_compile)
  def train_step(images, labels):
    with tf.GradientTape() as tape:
      loss = loss_fn(labels, model(images, training=True))
    variables = model.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return train_step


def make_opq_ops_step(plan, jit_compile: bool, seed: int = 0) -> Callable:
  """() -> compressed kernels and their gradients, OPQ's per-step extra work.

  For every planned kernel w (its shape, step, threshold): w_hat =
  mask * q(w) forward and mask * upstream backward (the straight-through
  estimator), with OPQWeightQuantizer itself, on random Laplace-like values.
  Both are returned so that XLA cannot drop either.
  """
  rng = np.random.default_rng(seed)
  kernels, quantizer_vars, upstreams, quantizers = [], [], [], []
  for entry in plan.layers:
    value = rng.laplace(scale=entry.laplace_scale, size=entry.shape)
    kernel = tf.Variable(value.astype(np.float32))
    kernels.append(kernel)
    quantizer_vars.append({
        "mask": tf.Variable(np.abs(value) >= entry.threshold, dtype=tf.float32,
                            trainable=False),
        "step": tf.Variable(np.float32(entry.step), trainable=False),
    })
    upstreams.append(tf.Variable(rng.standard_normal(entry.shape)
                                 .astype(np.float32), trainable=False))
    quantizers.append(OPQWeightQuantizer(entry.bits, entry.step,
                                         entry.threshold))

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


def _build_variants(name: str, image_size: int, images: tf.Tensor,
                    variants: Sequence[str]) -> tuple[dict, dict, dict]:
  """(variant -> model, variant -> error text, setup notes) for one model."""
  architecture, pruning_rate, bits = ARCHITECTURES[name]
  keras.utils.set_random_seed(0)
  base = architecture(weights=None, input_shape=(image_size, image_size, 3),
                      classes=1000, classifier_activation=None)
  builders = {
      "fp32": lambda: _fresh_copy(base),
      "opq": lambda: opq_apply(_fresh_copy(base), pruning_rate=pruning_rate,
                               bits=bits),
      "tfmot_prune": lambda: _tfmot_pruned(base, pruning_rate),
      "tfmot_pqat": lambda: _tfmot_pqat(base, pruning_rate, images),
  }
  models, errors, notes = {}, {}, {}
  needed = set(variants) | ({"opq"} if "opq_ops" in variants else set())
  for variant, builder in builders.items():
    if variant not in needed:
      continue
    start = time.perf_counter()
    try:
      models[variant] = builder()
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("Building %s/%s failed", name, variant)
      errors[variant] = _error_text(error)
      continue
    logging.info("Built %s/%s in %.1f s", name, variant,
                 time.perf_counter() - start)
  notes["weights"] = base.count_params()
  if "opq" in models:
    notes["plan"] = models["opq"].opq_plan
  if "tfmot_pqat" in models:
    notes["pqat_zeros"] = _zero_fraction(models["tfmot_pqat"])
  return models, errors, notes


def time_model(name: str, batch_size: int, image_size: int, steps: int,
               warmup: int, jit_settings: Sequence[bool],
               variants: Sequence[str] = VARIANTS
               ) -> tuple[list[Timing], dict]:
  """Times every variant of one model, round-robin; returns (timings, notes).

  Each step function is called once (trace/compile: `first_call_s`), then
  `warmup - 1 + steps` rounds call every working function once in a rotated
  order; the last `steps` rounds are recorded: wall time (`step_ms`) and this
  process's CPU time over all threads (`cpu_ms`, far less sensitive to other
  jobs on the machine). A function that raises gets the error text and is
  dropped from later rounds.
  """
  images = tf.random.stateless_normal((batch_size, image_size, image_size, 3),
                                      seed=(1, 2))
  labels = tf.random.stateless_uniform((batch_size,), seed=(3, 4), minval=0,
                                       maxval=1000, dtype=tf.int32)
  variants = [v for v in VARIANTS if v in variants or v == "fp32"]
  models, errors, notes = _build_variants(name, image_size, images, variants)
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
          function = make_opq_ops_step(notes["plan"], jit_compile)
          functions[timing] = lambda f=function: f()
        else:
          model = models[variant]
          if variant not in optimizers:
            optimizers[variant] = keras.optimizers.SGD(
                _LEARNING_RATE, momentum=0.9, jit_compile=False)
            optimizers[variant].build(model.trainable_variables)
          function = make_train_step(model, optimizers[variant], jit_compile)
          functions[timing] = lambda f=function: f(images, labels).numpy()
      except Exception as error:  # pylint: disable=broad-except
        timing.error = _error_text(error)

  def call(timing: Timing) -> Optional[tuple[float, float]]:
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
      functions[timing]()
    except Exception as error:  # pylint: disable=broad-except
      logging.warning("%s/%s jit=%s failed: %s", name, timing.variant,
                      timing.jit_compile, error)
      timing.error = _error_text(error)
      del functions[timing]
      return None
    return time.perf_counter() - start, time.process_time() - start_cpu

  def active() -> list:
    return [timing for timing in timings if timing in functions]

  for timing in active():
    elapsed = call(timing)
    timing.first_call_s = elapsed and elapsed[0]
    logging.info("%s/%s jit=%s first call %s s", name, timing.variant,
                 timing.jit_compile, timing.first_call_s)
  for round_index in range(warmup - 1 + steps):
    order = active()
    shift = round_index % max(len(order), 1)
    for timing in order[shift:] + order[:shift]:
      elapsed = call(timing)
      if elapsed is not None and round_index >= warmup - 1:
        timing.step_ms.append(1e3 * elapsed[0])
        timing.cpu_ms.append(1e3 * elapsed[1])
  return timings, notes


def paired_ratio(timing: Timing, baseline: Timing,
                 clock: str = "step_ms") -> Optional[float]:
  """Median over rounds of timing / baseline, rounds matched by index.

  `clock` is "step_ms" (wall) or "cpu_ms"; None if either failed.
  """
  if timing.error or baseline.error or not getattr(baseline, clock):
    return None
  return statistics.median(
      t / b for t, b in zip(getattr(timing, clock), getattr(baseline, clock)))


_LABELS = {
    "fp32": "FP32",
    "opq": "OPQ (opq_tf.apply)",
    "tfmot_prune": "tfmot prune_low_magnitude",
    "tfmot_pqat": "tfmot PQAT (prune-preserve 8-bit QAT)",
    "opq_ops": "OPQ quantizer ops only (all kernels, fwd + STE bwd)",
}


def _format_ratio(ratio: Optional[float]) -> str:
  return "n/a" if ratio is None else f"{ratio:.2f}x"


def results_markdown(timings: Sequence[Timing], notes: dict, settings: dict,
                     load: tuple, architectures: Optional[dict] = None) -> str:
  """The results file: machine, date, command, tables and the analysis.

  Args:
    timings: from `time_model`, all models.
    notes: model name -> setup notes of `time_model`.
    settings: date, command, batch_size, image_size, steps, warmup.
    load: 1-minute load average at the start and the end of the run.
    architectures: name -> (builder, pruning rate, bits); default ARCHITECTURES.
  """
  architectures = architectures or ARCHITECTURES
  lines = [
      "# Train-step time: FP32 vs OPQ vs tfmot",
      "",
      "Written by `benchmarks/step_time.py`; rerun it to refresh this file.",
      "",
      f"- Date: {settings['date']}",
      f"- Machine: {platform.platform()}, {platform.machine()}, "
      f"{os.cpu_count()} CPU cores (`os.cpu_count()`), no GPU used; "
      f"TensorFlow {tf.__version__}, tfmot {tfmot.__version__}, "
      f"Python {platform.python_version()}",
      f"- Load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}. "
      "The machine was shared with other jobs: absolute times are noisy; the "
      "ratios, taken round-robin within one run, are the figures to read.",
      f"- Command: `{settings['command']}`",
      f"- Batch {settings['batch_size']}, {settings['image_size']}x"
      f"{settings['image_size']} inputs, {settings['warmup']} untimed + "
      f"{settings['steps']} timed steps per variant (the first untimed one "
      "traces and compiles). A train step: `model(x, training=True)`, "
      "sparse cross-entropy, GradientTape, SGD momentum 0.9, in a "
      "`tf.function(jit_compile=...)`. On a GPU one would time batch 64 or "
      "more; see the analysis for why batch size moves the OPQ ratio.",
      "",
      "## Setup",
      "",
  ]
  for name, note in notes.items():
    _, pruning_rate, bits = architectures[name]
    text = f"- {name}: {note['weights'] / 1e6:.1f}M parameters; OPQ p = " \
           f"{pruning_rate}, B = {bits}"
    if "plan" in note:
      plan = note["plan"]
      text += (f", {len(plan.layers)} kernels ({plan.total_weights / 1e6:.1f}M "
               f"weights) compressed, realised pruning rate "
               f"{plan.realised_pruning_rate:.3f}")
    if "pqat_zeros" in note:
      text += (f"; tfmot PQAT kernels {note['pqat_zeros']:.3f} zeros "
               f"(ConstantSparsity {pruning_rate} per layer; tfmot does not "
               "prune DepthwiseConv2D kernels)")
    lines.append(text + ".")
  lines += [
      "",
      "## Step times",
      "",
      "Wall: elapsed time of a step. CPU: this process's CPU time over all its "
      "threads during the step, which other jobs on the machine disturb far "
      "less than the wall time. `x FP32` is the median over rounds of "
      "(variant step / FP32 step of the same round and jit setting).",
      "",
      "| model | jit_compile | variant | first call (s) | wall ms/step "
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
        f"{_format_ratio(paired_ratio(timing, baseline))} | "
        f"{_format_ratio(paired_ratio(timing, baseline, 'cpu_ms'))} |")
  lines += [
      "",
      "## Ratios against the issue's target (OPQ <= 1.15x FP32)",
      "",
      "Each cell: wall ratio / CPU-time ratio. The target is judged on the "
      "CPU-time ratio, the one a shared machine disturbs least.",
      "",
      "| model | jit_compile | OPQ / FP32 | tfmot prune / FP32 | "
      "tfmot PQAT / FP32 | OPQ ops alone / FP32 | OPQ target met |",
      "|---|---|---|---|---|---|---|",
  ]
  by_key = {(t.model, t.jit_compile, t.variant): t for t in timings}
  for (model, jit_compile), baseline in baselines.items():
    cells, opq_cpu = [], None
    for variant in VARIANTS[1:]:
      timing = by_key.get((model, jit_compile, variant))
      wall = timing and paired_ratio(timing, baseline)
      cpu = timing and paired_ratio(timing, baseline, "cpu_ms")
      cells.append(f"{_format_ratio(wall)} / {_format_ratio(cpu)}")
      if variant == "opq":
        opq_cpu = cpu
    met = "n/a" if opq_cpu is None else "yes" if opq_cpu <= 1.15 else "no"
    lines.append(f"| {model} | {jit_compile} | {' | '.join(cells)} | {met} |")
  lines += ["", "Where the time goes (medians of CPU ms/step):", ""]
  for (model, jit_compile), baseline in baselines.items():
    if baseline.error:
      continue
    fp32 = statistics.median(baseline.cpu_ms)
    text = f"- {model}, jit_compile={jit_compile}: FP32 {fp32:.1f} ms"
    opq, ops = (by_key.get((model, jit_compile, v)) for v in ("opq", "opq_ops"))
    if opq and not opq.error:
      text += f"; OPQ - FP32 = {statistics.median(opq.cpu_ms) - fp32:.1f} ms"
    if ops and not ops.error:
      text += (f"; OPQ's quantizer ops alone "
               f"{statistics.median(ops.cpu_ms):.1f} ms")
    eager = baselines.get((model, False))
    if jit_compile and eager and not eager.error:
      text += (f"; XLA FP32 step / default FP32 step = "
               f"{fp32 / statistics.median(eager.cpu_ms):.2f}x")
    lines.append(text + ".")
  lines += ["", _ANALYSIS]
  return "\n".join(lines) + "\n"


_ANALYSIS = """\
## Why OPQ costs what it costs

Per step and per compressed kernel w (n weights), the OPQ wrapper computes

    w_hat = mask * (stop_gradient(step * clip(round(w / step), -K, K))
                    + (w - stop_gradient(w)))

forward (about eight elementwise ops: divide, round, two clips, multiply,
subtract, add, mask multiply) and `mask * upstream` backward (the
straight-through estimator). That is O(n) work per step, independent of the
batch, on top of the convolutions' O(batch x FLOPs): for ResNet-50, 25.5M
kernel weights against about 4.1 GFLOPs per image forward. The arithmetic is
negligible, but without fusion each op streams whole kernels through memory
(about 8 ops x 3 tensors x 4 bytes x 25.5M = 2.4 GB per forward on
ResNet-50), which on a 2-core CPU at batch 8 is a visible fraction of a step.
The `opq_ops` row times exactly this work, outside any model; the OPQ step's
extra time over FP32 ("OPQ - FP32" above) should be close to it, within the
run's noise. A variant that does strictly more work than FP32 (tfmot prune)
reading below 1.00x shows how large that noise is: under load, read ratios
within about 0.1 of 1 as "no measurable difference".

Consequences and what could be cheaper:

- The relative cost falls with the batch: the kernel ops are paid once per
  step, the convolutions per image. At batch 64+ on a GPU the ratio is far
  closer to 1 than at batch 8 on this CPU.
- The compressed kernel is already computed once per step per kernel (the
  minimum for fake quantization: the weights change every step, so w_hat
  cannot be cached). With `jit_compile=True` XLA fuses the whole quantizer
  into one pass (read w and mask, write w_hat) and the backward into one
  multiply, which removes most of the memory traffic.
- Smaller gains left: pruned latent weights could be zeroed once by `apply`
  (their gradient is masked, so they stay zero under SGD, momentum and weight
  decay) so the forward mask multiply could go, leaving the mask only in the
  backward; `w * (1 / step)` instead of `w / step`; a bool or int8 mask
  instead of float32 would quarter the mask's memory traffic (the float mask
  also doubles the kernel memory of the wrapped model).
- tfmot's prune_low_magnitude also multiplies every kernel by its mask each
  step (plus a top-k mask update every 100 steps, not in the timed steps);
  its PQAT additionally fake-quantizes activations (8-bit, moving-average
  ranges) and keeps per-channel min/max, so it does strictly more work per
  step than OPQ with FP32 activations.
- On a CPU, `jit_compile=True` can make whole steps several times slower
  (the "XLA FP32 step / default FP32 step" figures above): XLA:CPU runs
  convolutions through its own (Eigen-based) runtime rather than the oneDNN
  kernels of TensorFlow's default CPU path, and depthwise convolutions
  (MobileNet) suffer most. The jit ratios are then ratios of slow steps and sit closer
  to 1; on a GPU, XLA is usually the faster setting and the fused quantizer
  the cheap one.
- None of the variants gets faster convolutions from the sparsity or the
  low bit-width while training: the kernels stay dense FP32 tensors.
"""


def _write_atomic(path: str, text: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temp_path = tempfile.mkstemp(dir=directory, suffix=".tmp")
  try:
    with os.fdopen(handle, "w") as stream:
      stream.write(text)
    os.replace(temp_path, path)
  except BaseException:
    os.unlink(temp_path)
    raise


def _settings() -> dict:
  """Flag values, with --quick's smaller defaults for flags not given."""
  quick = _QUICK.value
  def pick(flag, quick_value):
    return quick_value if quick and not flags.FLAGS[flag.name].present \
        else flag.value
  settings = {
      "models": pick(_MODELS, ["tiny_cnn"]),
      "batch_size": pick(_BATCH_SIZE, 2),
      "image_size": pick(_IMAGE_SIZE, 32),
      "steps": pick(_STEPS, 2),
      "warmup": pick(_WARMUP, 1),
      "output": (_OUTPUT.value if not quick or flags.FLAGS["output"].present
                 else None),
  }
  jit = [value.strip().lower() for value in _JIT.value]
  problems = []
  unknown = [m for m in settings["models"] if m not in ARCHITECTURES]
  if unknown:
    problems.append(f"Unknown --models {unknown}; use some of "
                    f"{sorted(ARCHITECTURES)}.")
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    problems.append(f"Unknown --variants {unknown}; use some of "
                    f"{list(VARIANTS)}.")
  for name in ("batch_size", "steps", "warmup"):
    if settings[name] < 1:
      problems.append(f"--{name}={settings[name]} must be >= 1.")
  if settings["image_size"] < 32:
    problems.append(f"--image_size={settings['image_size']} is too small: "
                    "ResNet50 and MobileNet need at least 32.")
  if not jit or set(jit) - {"true", "false"}:
    problems.append(f"--jit_compile={_JIT.value}: give a list of true and/or "
                    "false, e.g. --jit_compile=false,true.")
  if problems:
    raise app.UsageError(" ".join(problems))
  settings["jit_settings"] = [value == "true" for value in jit]
  settings["variants"] = _VARIANTS.value
  settings["command"] = " ".join(["python -m benchmarks.step_time",
                                  *sys.argv[1:]])
  settings["date"] = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")
  return settings


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  settings = _settings()
  load_start = os.getloadavg()[0]
  timings, notes = [], {}
  for name in settings["models"]:
    model_timings, notes[name] = time_model(
        name, settings["batch_size"], settings["image_size"], settings["steps"],
        settings["warmup"], settings["jit_settings"], settings["variants"])
    timings += model_timings
    keras.backend.clear_session()
  text = results_markdown(timings, notes, settings,
                          (load_start, os.getloadavg()[0]))
  print(text)
  if settings["output"]:
    _write_atomic(settings["output"], text)
    logging.info("Wrote %s", settings["output"])


if __name__ == "__main__":
  app.run(main)
