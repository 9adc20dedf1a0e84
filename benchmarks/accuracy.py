r"""Accuracy benchmark: OPQ allocations against each other and against tfmot.

    python benchmarks/accuracy.py --workdir=/tmp/opq_accuracy
    python benchmarks/accuracy.py --quick --workdir=/tmp/q --output_dir=/tmp/q

Measures what `trainers.run_default` runs, with the trainer's own parts:
configs/default.py (small_resnet on the digits stand-in of ImageNet: 1,297
train / 500 validation images, 32x32, its TFDS imagenet2012 records and input
pipeline), FP32 weights from `training.train_fp32` (cached in --workdir),
`loop.make_train_step` (coupled L2 on the kernels, `kernel_l2`) and
`loop.make_eval_step` under `distribute.make_strategy`, and the config's
finetuning recipe (SGD momentum, warmup + cosine learning rate, weight decay).
Every method starts from the same FP32 weights and gets the same steps; a seed
changes the finetuning data order.

Methods at each (pruning rate p, bits B):
  opq, opq_total, uniform, global_magnitude: `opq_tf.allocate(method=...,
    objective=...)` ("opq" is the default objective and step granularity,
    "opq_total" objective="total"), `opq_tf.apply`, optionally
    `calibrate(batchnorm=True)` on training images, finetune, `opq_tf.export`.
  tfmot: benchmarks/tfmot_baselines.py: prune_low_magnitude (PolynomialDecay
    0 -> p) for floor(E/2) epochs, strip, then QAT for the rest.

Writes <workdir>/results.json, <output_dir>/accuracy_results.md (tables only)
and <output_dir>/accuracy.png; the analysis is in docs/benchmarks.md.
"""

import datetime
import os
import platform
import shutil
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, _REPO)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import tfmot_baselines  # noqa: E402
from configs import default as default_config  # noqa: E402
import opq_tf  # noqa: E402
from opq_tf.training import distribute  # noqa: E402
from opq_tf.core import files  # noqa: E402
from opq_tf.core import grid  # noqa: E402
from opq_tf.training import imagenet_input  # noqa: E402
from opq_tf.training import data  # noqa: E402
from opq_tf.tf_keras import layers as layers_lib  # noqa: E402
from opq_tf.training import models  # noqa: E402
from opq_tf.training import pretrained  # noqa: E402
from opq_tf.training import layout  # noqa: E402
from opq_tf.training import loop  # noqa: E402
from opq_tf.training import training  # noqa: E402
from opq_tf.tf_keras import wrapping  # noqa: E402
from opq_tf.tf_keras._keras import keras, tf, tfmot  # noqa: E402

try:  # Being written alongside this benchmark (opq_tf/tf_keras/calibration.py).
  from opq_tf.tf_keras import calibration  # noqa: E402
except ImportError:  # pragma: no cover
  calibration = None

flags.DEFINE_string("workdir", "/tmp/opq_accuracy",
                    "Data, FP32 weights, exports and results.json.")
flags.DEFINE_string("output_dir", os.path.join(_REPO, "docs"),
                    "Where accuracy_results.md and accuracy.png go.")
flags.DEFINE_bool("quick", False,
                  "Smoke run: 1 setting, 1 seed, 2 epochs, short FP32 training.")
flags.DEFINE_integer("seeds", None, "Finetuning seeds (default 3; quick 1).")
flags.DEFINE_integer("epochs", None,
                     "Finetuning epochs per method (default: the config's "
                     "num_epochs; quick 2; >= 2).")
flags.DEFINE_bool("calibrate", True,
                  "Re-estimate BatchNorm statistics (calibrate(batchnorm=True))"
                  " on training images before finetuning the opq_tf methods.")
flags.DEFINE_enum("strategy", "mirrored", distribute.STRATEGIES,
                  "tf.distribute strategy, as the trainers' --strategy.")
flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into N replicas.")
FLAGS = flags.FLAGS

SETTINGS = ((0.5, 8), (0.8, 4), (0.9, 4), (0.95, 3), (0.97, 2))
QUICK_SETTINGS = ((0.5, 8),)  # one setting: the test suite runs it
# Method name -> opq_tf.allocate keyword arguments.
OPQ_METHODS = {
    "opq": {"method": "opq"},
    "opq_total": {"method": "opq", "objective": "total"},
    "uniform": {"method": "uniform"},
    "global_magnitude": {"method": "global_magnitude"},
}
METHODS = tuple(OPQ_METHODS) + ("tfmot",)
QUICK_FP32_EPOCHS = 6
TOLERANCE = 0.005  # "within 0.5 points of FP32"


# ------------------------------------------------------------ the trainer's parts


class Bench:
  """The config, strategy, data and step functions every method shares."""

  def __init__(self, config, workdir: str, strategy: tf.distribute.Strategy):
    self.config, self.workdir, self.strategy = config, workdir, strategy
    self.data_dir = data.prepare_data(config, workdir, strategy)
    self.steps_per_epoch = (
        imagenet_input.num_examples(self.data_dir, "train")
        // config.global_batch_size)
    self.validation = strategy.distribute_datasets_from_function(
        imagenet_input.make_dataset_fn(
            split="validation", data_dir=self.data_dir,
            image_size=config.image_size,
            global_batch_size=config.eval_batch_size, train=False,
            num_classes=config.num_classes))

  def build(self) -> keras.Model:
    with self.strategy.scope():
      return models.build(self.config.model, self.config.num_classes,
                          self.config.image_size)

  def evaluator(self, model: keras.Model):
    """() -> top-1 accuracy on the validation split (one traced eval step)."""
    eval_step = loop.make_eval_step(model, self.strategy)

    def evaluate() -> float:
      totals = np.zeros(4)
      for images, labels in self.validation:
        totals += eval_step(images, labels).numpy()
      return float(totals[1] / totals[3])

    return evaluate

  def calibration_images(self, count: int) -> np.ndarray:
    """The first `count` training images, preprocessed as for evaluation."""
    dataset = imagenet_input.make_dataset_fn(
        split="train", data_dir=self.data_dir, image_size=self.config.image_size,
        global_batch_size=100, train=False,
        num_classes=self.config.num_classes)()
    parts = []
    for images, _ in dataset:
      parts.append(images.numpy())
      if sum(len(p) for p in parts) >= count:
        break
    return np.concatenate(parts)[:count]

  def schedule(self, epochs: int) -> loop.WarmupCosine:
    """The config's finetuning learning rate over `epochs` epochs."""
    return loop.WarmupCosine(
        self.config.learning_rate,
        round(self.config.warmup_epochs * self.steps_per_epoch),
        epochs * self.steps_per_epoch)

  def trainer(self, model: keras.Model, epochs: int, start_step: int = 0):
    """(optimizer, train_epoch(seed, epoch)): the trainer's step, E epochs' lr."""
    with self.strategy.scope():
      optimizer = keras.optimizers.SGD(self.schedule(epochs),
                                       momentum=self.config.momentum,
                                       jit_compile=self.config.jit_compile)
      optimizer.build(model.trainable_variables)
    optimizer.iterations.assign(start_step)
    train_step = loop.make_train_step(
        model, optimizer, self.strategy,
        global_batch_size=self.config.global_batch_size,
        weight_decay=float(self.config.weight_decay))

    def train_epoch(seed: int, epoch: int) -> float:
      dataset_fn = imagenet_input.make_dataset_fn(
          split="train", data_dir=self.data_dir,
          image_size=self.config.image_size,
          global_batch_size=self.config.global_batch_size, train=True,
          num_classes=self.config.num_classes,
          seed=self.config.seed + 1000 * seed + epoch)
      iterator = iter(self.strategy.distribute_datasets_from_function(
          dataset_fn))
      start = time.perf_counter()
      for _ in range(self.steps_per_epoch):
        train_step(iterator)
      return time.perf_counter() - start

    return optimizer, train_epoch


def reset_optimizer(optimizer, start_step: int = 0) -> None:
  """Zeroes the momentum slots and sets the step (a fresh optimizer)."""
  variables = optimizer.variables
  for variable in variables() if callable(variables) else variables:
    variable.assign(tf.zeros_like(variable))
  optimizer.iterations.assign(start_step)


def kernels(model: keras.Model) -> dict[str, np.ndarray]:
  """key -> FP32 value of every compressible kernel."""
  return {key: kernel.values for key, kernel
          in layers_lib.compressible_kernels(model).items()}


def with_kernels(bench: Bench, model: keras.Model,
                 new_kernels: dict[str, np.ndarray]) -> keras.Model:
  """A plain copy of `model` whose compressible kernels are `new_kernels`."""
  with bench.strategy.scope():
    copy = tfmot_baselines.copy_model(model)
  for layer in layers_lib.iter_layers(copy):
    for variable in layer.weights:
      key = layers_lib.weight_key(layer, variable)
      if key in new_kernels:
        variable.assign(new_kernels[key])
  return copy


def weight_bits_ratio(compressed: dict[str, np.ndarray], bits: int,
                      step_counts: dict[str, int]) -> float:
  """grid.weight_bits_ratio over the nonzero weights of `compressed`."""
  keys = list(compressed)
  return grid.weight_bits_ratio(
      [compressed[k].size for k in keys],
      [int(np.count_nonzero(compressed[k])) for k in keys],
      [bits] * len(keys), [step_counts[k] for k in keys])


def tfmot_step_counts(reference: dict[str, np.ndarray]) -> dict[str, int]:
  """tfmot's stored scales per kernel: per output channel for Conv2D."""
  return {k: v.shape[-1] if v.ndim == 4 else 1 for k, v in reference.items()}


def mean_squared_error(reference, compressed) -> float:
  squared = sum(float(np.sum((reference[k].astype(np.float64)
                              - compressed[k])**2)) for k in compressed)
  return squared / sum(reference[k].size for k in compressed)


# ------------------------------------------------------------------- opq_tf


def run_opq(bench: Bench, fp32: keras.Model, method: str, pruning_rate: float,
            bits: int, seeds: int, epochs: int, calibration_images) -> dict:
  """One plan and wrapped model, finetuned once per seed from the same start.

  The wrapped model and its traced train step are reused across seeds: its
  weights (latent kernels, masks, steps, BatchNorm) and optimizer are reset.
  """
  reference = kernels(fp32)
  plan = opq_tf.allocate(fp32, pruning_rate, bits, **OPQ_METHODS[method])
  with bench.strategy.scope():
    qmodel = opq_tf.apply(fp32, plan)
  evaluate = bench.evaluator(qmodel)
  compressed = {k.key: k.compressed for k in wrapping.compressed_kernels(qmodel)}
  result = {
      "method": method, "pruning_rate": pruning_rate, "bits": bits,
      "scheme": f"opq_tf.allocate({pruning_rate}, {bits}, " + ", ".join(
          f"{k}={v!r}" for k, v in OPQ_METHODS[method].items()) + ")",
      "zero_shot": evaluate(),
      "modelled_mse": plan.modelled_error / plan.total_weights,
      "measured_mse": mean_squared_error(reference, compressed),
      "weight_bits_ratio": plan.weight_bits_ratio,
      "sparsity": plan.realised_pruning_rate,
      "layers": [{
          "key": kernel.key, "size": kernel.size,
          "pruning_rate": kernel.pruning_rate,
          "modelled_pruning_rate": kernel.modelled_pruning_rate,
          "modelled_mse": kernel.modelled_error,
          "measured_mse": mean_squared_error(reference,
                                             {kernel.key: compressed[kernel.key]}),
      } for kernel in plan.kernels],
      "seeds": [],
  }
  if calibration_images is not None:
    calibration.calibrate(qmodel, calibration_images, batchnorm=True)
    result["calibrated"] = evaluate()
  initial = qmodel.get_weights()
  optimizer, train_epoch = bench.trainer(qmodel, epochs)
  for seed in range(seeds):
    qmodel.set_weights(initial)
    reset_optimizer(optimizer)
    keras.utils.set_random_seed(seed)
    accuracies, seconds = [], []
    for epoch in range(epochs):
      seconds.append(train_epoch(seed, epoch))
      accuracies.append(evaluate())
    result["seeds"].append({"accuracies": accuracies, "seconds": seconds,
                            "first_compressed_epoch": 1,
                            "traced_epochs": [1] if seed == 0 else []})
  export_dir = os.path.join(bench.workdir, "exports",
                            f"{method}_p{pruning_rate}_b{bits}")
  shutil.rmtree(export_dir, ignore_errors=True)
  report = opq_tf.export(qmodel, export_dir)  # the last seed's weights
  for key in ("model_ratio", "packed_bytes", "entropy_bound_bytes"):
    result[key] = report[key]
  return result


# -------------------------------------------------------------------- tfmot


def tfmot_schedule(bench: Bench, pruning_rate: float, prune_epochs: int):
  """PolynomialDecay 0 -> p, ending one epoch before the pruning phase ends
  (so the last pruning epoch recovers at full sparsity), or at the end of the
  only pruning epoch; masks updated 4 times per epoch."""
  steps = bench.steps_per_epoch
  frequency = max(1, steps // 4)
  ramp_steps = (prune_epochs - 1) * steps if prune_epochs > 1 else steps - 1
  end_step = max(frequency, ramp_steps // frequency * frequency)
  return tfmot.sparsity.keras.PolynomialDecay(
      initial_sparsity=0.0, final_sparsity=pruning_rate, begin_step=0,
      end_step=end_step, frequency=frequency)


def run_tfmot(bench: Bench, fp32: keras.Model, pruning_rate: float, bits: int,
              seeds: int, epochs: int) -> dict:
  """prune_low_magnitude for floor(E/2) epochs, strip, QAT for the rest.

  The learning rate follows one warmup + cosine schedule over all E epochs,
  as for the opq_tf methods; the QAT phase's optimizer starts where the
  pruning phase's stopped (its momentum cannot carry over to new variables).
  """
  reference = kernels(fp32)
  step_counts = tfmot_step_counts(reference)
  zero_shot_kernels = tfmot_baselines.magnitude_quantized_kernels(
      reference, pruning_rate, bits)
  prune_epochs = epochs // 2
  result = {
      "method": "tfmot", "pruning_rate": pruning_rate, "bits": bits,
      "scheme": tfmot_baselines.scheme_name(bits),
      "zero_shot": bench.evaluator(
          with_kernels(bench, fp32, zero_shot_kernels))(),
      "zero_shot_weight_bits_ratio": weight_bits_ratio(
          zero_shot_kernels, bits, step_counts),
      "measured_mse": mean_squared_error(reference, zero_shot_kernels),
      "seeds": [],
  }
  ratios, sparsities = [], []
  for seed in range(seeds):
    keras.utils.set_random_seed(seed)
    with bench.strategy.scope():
      pruned = tfmot_baselines.prune(
          fp32, tfmot_schedule(bench, pruning_rate, prune_epochs))
    tfmot_baselines.pruning_step_callback(pruned)
    _, train_epoch = bench.trainer(pruned, epochs)
    evaluate = bench.evaluator(pruned)
    accuracies, seconds = [], []
    for epoch in range(prune_epochs):
      seconds.append(train_epoch(seed, epoch))
      tfmot_baselines.apply_masks(pruned)
      accuracies.append(evaluate())
    with bench.strategy.scope():
      qmodel = tfmot_baselines.quantize(tfmot_baselines.strip(pruned), bits)
    _, train_epoch = bench.trainer(qmodel, epochs,
                                   start_step=prune_epochs * bench.steps_per_epoch)
    evaluate = bench.evaluator(qmodel)
    for epoch in range(prune_epochs, epochs):
      seconds.append(train_epoch(seed, epoch))
      accuracies.append(evaluate())
    final = tfmot_baselines.final_kernels(qmodel)
    final_kernels = {key: value for key, (value, _, _) in final.items()}
    ratios.append(weight_bits_ratio(final_kernels, bits, step_counts))
    sparsities.append(
        1.0 - sum(np.count_nonzero(v) for v in final_kernels.values())
        / sum(v.size for v in final_kernels.values()))
    if seed == 0:
      result["model_ratio"], result["packed_bytes"] = (
          tfmot_baselines.packed_model_ratio(
              fp32, final, os.path.join(bench.workdir, "exports",
                                        f"tfmot_p{pruning_rate}_b{bits}.opq")))
    result["seeds"].append({
        "accuracies": accuracies, "seconds": seconds,
        "first_compressed_epoch": prune_epochs + 1,
        "traced_epochs": [1, prune_epochs + 1], "sparsity": sparsities[-1]})
  result.update(weight_bits_ratio=float(np.mean(ratios)),
                sparsity=float(np.mean(sparsities)))
  return result


# ------------------------------------------------------------------ summary


def summarise(result: dict, fp32_accuracy: float) -> dict:
  """Adds mean/std of final accuracy, epochs to FP32 - 0.5 points, seconds."""
  finals = [s["accuracies"][-1] for s in result["seeds"]]
  reached = []
  for s in result["seeds"]:
    first = s["first_compressed_epoch"]
    hits = [epoch for epoch, accuracy in enumerate(s["accuracies"], start=1)
            if epoch >= first and accuracy >= fp32_accuracy - TOLERANCE]
    reached.append(hits[0] if hits else None)
  epoch_seconds = [t for s in result["seeds"]
                   for epoch, t in enumerate(s["seconds"], start=1)
                   if epoch not in s["traced_epochs"]]
  result.update(
      fp32_accuracy=fp32_accuracy,
      accuracy_mean=float(np.mean(finals)), accuracy_std=float(np.std(finals)),
      accuracy_min=float(np.min(finals)), accuracy_max=float(np.max(finals)),
      epochs_to_target=reached,
      finetune_seconds=float(sum(result["seeds"][0]["seconds"])),
      seconds_per_epoch=float(np.median(epoch_seconds or
                                        result["seeds"][0]["seconds"])))
  return result


def _epochs_cell(reached, epochs):
  hits = [e for e in reached if e is not None]
  if not hits:
    return f"not in {epochs}"
  return f"{np.mean(hits):.1f} ({len(hits)}/{len(reached)})"


def _pct(value) -> str:
  return "n/a" if value is None else f"{100 * value:.2f}"


def markdown(results: list, context: dict) -> str:
  """The results file: setup lines and tables (the analysis is elsewhere)."""
  fp32 = context["fp32_accuracy"]
  lines = [
      "# Accuracy: opq_tf allocations vs tfmot",
      "",
      "Written by `benchmarks/accuracy.py`; analysis in "
      "[benchmarks.md](benchmarks.md).",
      "",
      f"- Command: `{context['command']}`",
      f"- Machine: {context['machine']}; date {context['date']}; wall time "
      f"{context['wall_seconds'] / 60:.1f} min, process CPU time "
      f"{context['cpu_seconds'] / 60:.1f} min.",
      f"- Job: configs/default.py ({context['model']}, "
      f"{context['kernel_weights']:,} kernel weights in {context['kernels']} "
      f"kernels, {context['parameters']:,} parameters) on the digits stand-in "
      f"({context['train_size']} train / {context['test_size']} validation "
      f"images), strategy {context['strategy']} ({context['replicas']} "
      f"replica(s)); FP32 top-1 **{_pct(fp32)}%** (`training.train_fp32`, "
      f"{context['fp32_epochs']} epochs).",
      f"- Finetuning: `loop.make_train_step`, {context['epochs']} epochs "
      f"of {context['steps_per_epoch']} steps, batch "
      f"{context['global_batch_size']}, SGD momentum {context['momentum']}, "
      f"lr {context['learning_rate']} (warmup {context['warmup_epochs']} "
      f"epochs, cosine), L2 {context['weight_decay']} on kernels; "
      f"{context['seeds']} seed(s) (data order). Calibration: "
      f"{context['calibration']}.",
      "",
      "Top-1 on the validation split, %. *Compressed* = right after "
      "compression; *calibrated* = after `calibrate(batchnorm=True)`; *after "
      "finetuning* = mean ± std over seeds. *Sparsity* = exact zeros of the "
      "final kernels. *Epochs to FP32-0.5* = first epoch within 0.5 points of "
      "FP32 (mean over the seeds that got there; tfmot: QAT epochs only). "
      "*s/epoch* = median over epochs that trace no new graph.",
      "",
      "| p | B | method | compressed | calibrated | after finetuning | Δ FP32 "
      "| sparsity | weight-bits ratio | model ratio | s/epoch | "
      "epochs to FP32-0.5 |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
        f"| {r['pruning_rate']} | {r['bits']} | {r['method']} | "
        f"{_pct(r['zero_shot'])} | {_pct(r.get('calibrated'))} | "
        f"{_pct(r['accuracy_mean'])} ± {_pct(r['accuracy_std'])} | "
        f"{100 * (r['accuracy_mean'] - fp32):+.2f} | "
        f"{_pct(r['sparsity'])}% | {r['weight_bits_ratio']:.1f}x | "
        f"{r['model_ratio']:.1f}x | {r['seconds_per_epoch']:.2f} | "
        f"{_epochs_cell(r['epochs_to_target'], context['epochs'])} |")
  schemes = {r["bits"]: r["scheme"] for r in results if r["method"] == "tfmot"}
  lines += [
      "",
      "tfmot (benchmarks/tfmot_baselines.py): " + "; ".join(
          f"B={b}: {schemes[b]}" for b in sorted(schemes)) +
      f"; pruning for {context['epochs'] // 2} epoch(s), QAT for "
      f"{context['epochs'] - context['epochs'] // 2}. Its *compressed* column "
      "is per-layer magnitude pruning + its weight quantizer (no "
      "calibration); its model ratio packs its codes with opq_tf's packer "
      "plus its FP32 scales.",
      "",
      "## Final accuracy by setting, %",
      "",
      "| p | B | " + " | ".join(METHODS) + " |",
      "|---|---|" + "---|" * len(METHODS),
  ]
  for pruning_rate, bits in context["settings"]:
    row = {r["method"]: r for r in results
           if (r["pruning_rate"], r["bits"]) == (pruning_rate, bits)}
    best = max(row[m]["accuracy_mean"] for m in METHODS)
    lines.append(f"| {pruning_rate} | {bits} | " + " | ".join(
        (f"**{_pct(row[m]['accuracy_mean'])}**" if row[m]["accuracy_mean"]
         == best else _pct(row[m]["accuracy_mean"])) for m in METHODS) + " |")
  lines += [
      "",
      "## Laplace error model vs the real kernels",
      "",
      "Modelled = plan.modelled_error / total weights; measured = mean squared "
      "difference of the FP32 and compressed kernels right after `apply`.",
      "",
      "| p | B | method | modelled MSE | measured MSE | measured / modelled |",
      "|---|---|---|---|---|---|",
  ]
  for r in results:
    if r["method"] in OPQ_METHODS:
      lines.append(
          f"| {r['pruning_rate']} | {r['bits']} | {r['method']} | "
          f"{r['modelled_mse']:.3e} | {r['measured_mse']:.3e} | "
          f"{r['measured_mse'] / r['modelled_mse']:.2f} |")
  plans = [next(r for r in results if r["method"] == "opq" and
                (r["pruning_rate"], r["bits"]) == (p, b))
           for p, b in context["settings"]]
  header = " | ".join(f"p={p} B={b}" for p, b in context["settings"])
  lines += [
      "",
      "## Per-kernel check of the opq plans",
      "",
      "Kurtosis E[w^4]/E[w^2]^2 of each FP32 kernel (Laplace 6, Gaussian 3, "
      "uniform 1.8); per setting the realised pruning rate (the Laplace "
      "model's rate at the same threshold) and measured / modelled MSE.",
      "",
      f"| kernel | weights | kurtosis | {header} |",
      "|---|---|---|" + "---|" * len(plans),
  ]
  for index, key in enumerate(l["key"] for l in plans[0]["layers"]):
    cells = []
    for plan in plans:
      layer = plan["layers"][index]
      cells.append(f"{100 * layer['pruning_rate']:.1f}% "
                   f"({100 * layer['modelled_pruning_rate']:.1f}%), "
                   f"{layer['measured_mse'] / layer['modelled_mse']:.2f}x")
    lines.append(f"| {key} | {plans[0]['layers'][index]['size']:,} | "
                 f"{context['kurtosis'][key]:.1f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results: list, fp32_accuracy: float, path: str) -> None:
  """Accuracy vs weight-bits ratio (log x): after finetuning and compressed."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for method in METHODS:
    rows = sorted((r for r in results if r["method"] == method),
                  key=lambda r: r["weight_bits_ratio"])
    ratios = [r["weight_bits_ratio"] for r in rows]
    axes[0].errorbar(ratios, [100 * r["accuracy_mean"] for r in rows],
                     yerr=[100 * r["accuracy_std"] for r in rows], marker="o",
                     capsize=3, label=method)
    axes[1].plot([r.get("zero_shot_weight_bits_ratio", r["weight_bits_ratio"])
                  for r in rows],
                 [100 * r.get("calibrated", r["zero_shot"]) for r in rows],
                 marker="o", label=method)
  titles = ("after finetuning", "before finetuning (calibrated; tfmot: "
            "magnitude + quantizer)")
  for axis, title in zip(axes, titles):
    axis.axhline(100 * fp32_accuracy, color="black", linewidth=1, label="FP32")
    axis.axhline(100 * (fp32_accuracy - TOLERANCE), color="black",
                 linestyle="--", linewidth=1, label="FP32 - 0.5")
    axis.set_xscale("log")
    axis.set_xlabel("weight-bits ratio (32·Σn / Σ(kept·B + 32·steps))")
    axis.set_ylabel("top-1 (%)")
    axis.set_title(title, fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
  axes[0].legend(loc="lower left", fontsize=8)
  figure.suptitle("configs/default.py (small_resnet, digits): accuracy vs "
                  "compression")
  figure.tight_layout()
  with files.atomic_path(path) as temp:
    figure.savefig(temp, dpi=110, format="png")
  plt.close(figure)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  tf.get_logger().setLevel("ERROR")
  config = default_config.get_config()
  seeds = FLAGS.seeds or (1 if FLAGS.quick else 3)
  epochs = FLAGS.epochs or (2 if FLAGS.quick else config.num_epochs)
  if FLAGS.quick:
    config.fp32_epochs = QUICK_FP32_EPOCHS
  settings = QUICK_SETTINGS if FLAGS.quick else SETTINGS
  if epochs < 2:
    raise app.UsageError(
        f"--epochs={epochs}: tfmot needs at least 2 (one pruning epoch, one "
        "QAT epoch); pass --epochs=2 or more.")
  if FLAGS.calibrate and calibration is None:
    raise app.UsageError("opq_tf.tf_keras.calibration.calibrate is not importable; "
                         "pass --nocalibrate.")
  strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.cpu_devices)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  start = time.perf_counter()

  bench = Bench(config, FLAGS.workdir, strategy)
  fp32_seconds = time.perf_counter()
  training.train_fp32(config, FLAGS.workdir, strategy, bench.data_dir)
  fp32_seconds = time.perf_counter() - fp32_seconds
  fp32 = bench.build()
  pretrained.load(fp32, os.path.join(FLAGS.workdir, layout.FP32_WEIGHTS))
  fp32_accuracy = bench.evaluator(fp32)()
  reference = kernels(fp32)
  print(f"FP32: top-1 {fp32_accuracy:.4f}, "
        f"{sum(v.size for v in reference.values())} kernel weights "
        f"(train_fp32 {fp32_seconds:.0f} s; ~0 = cached)", flush=True)
  calibration_images = (bench.calibration_images(
      calibration.DEFAULT_MAX_IMAGES) if FLAGS.calibrate else None)

  results = []
  for pruning_rate, bits in settings:
    for method in METHODS:
      if method == "tfmot":
        result = run_tfmot(bench, fp32, pruning_rate, bits, seeds, epochs)
      else:
        result = run_opq(bench, fp32, method, pruning_rate, bits, seeds, epochs,
                         calibration_images)
      results.append(summarise(result, fp32_accuracy))
      print(f"p={pruning_rate} B={bits} {method:16s} compressed "
            f"{result['zero_shot']:.4f} calibrated "
            f"{_pct(result.get('calibrated'))} -> {result['accuracy_mean']:.4f}"
            f" ± {result['accuracy_std']:.4f}  {result['weight_bits_ratio']:.1f}x"
            f" ({time.perf_counter() - start:.0f} s)", flush=True)

  train_size = imagenet_input.num_examples(bench.data_dir, "train")
  context = {
      "command": " ".join(["python", os.path.relpath(sys.argv[0], _REPO)]
                          + sys.argv[1:]),
      "machine": f"{platform.platform()}, {platform.processor() or 'cpu'}, "
                 f"os.cpu_count()={os.cpu_count()}, Python "
                 f"{platform.python_version()}, TF {tf.__version__}, tfmot "
                 f"{tfmot.__version__}",
      "date": datetime.date.today().isoformat(),
      "wall_seconds": time.perf_counter() - start,
      "cpu_seconds": time.process_time(),
      "model": config.model, "strategy": FLAGS.strategy,
      "replicas": strategy.num_replicas_in_sync,
      "train_size": train_size,
      "test_size": imagenet_input.num_examples(bench.data_dir, "validation"),
      "steps_per_epoch": bench.steps_per_epoch,
      "global_batch_size": config.global_batch_size,
      "learning_rate": config.learning_rate,
      "warmup_epochs": config.warmup_epochs, "momentum": config.momentum,
      "weight_decay": config.weight_decay,
      "calibration": (f"BatchNorm re-estimated on {len(calibration_images)} "
                      "training images before finetuning (opq_tf methods)"
                      if FLAGS.calibrate else "none (--nocalibrate)"),
      "seeds": seeds, "epochs": epochs, "fp32_epochs": config.fp32_epochs,
      "settings": [list(s) for s in settings],
      "kernels": len(reference),
      "kernel_weights": int(sum(v.size for v in reference.values())),
      "kurtosis": {key: float(np.mean(v.astype(np.float64)**4)
                              / np.mean(v.astype(np.float64)**2)**2)
                   for key, v in reference.items()},
      "parameters": int(fp32.count_params()),
      "fp32_accuracy": fp32_accuracy,
  }
  text = markdown(results, context)
  files.atomic_write(os.path.join(FLAGS.output_dir, "accuracy_results.md"), text)
  plot(results, fp32_accuracy, os.path.join(FLAGS.output_dir, "accuracy.png"))
  files.write_json(os.path.join(FLAGS.workdir, "results.json"),
                   {"context": context, "results": results})
  print(text)


if __name__ == "__main__":
  app.run(main)
