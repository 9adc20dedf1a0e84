r"""Accuracy benchmark: opq_tf against its own baselines and against tfmot.

    python benchmarks/accuracy.py --workdir=/tmp/opq_accuracy     # < 20 min, 2 cores
    python benchmarks/accuracy.py --quick --workdir=/tmp/q --output_dir=/tmp/q

Data: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no
download), scaled to [0, 1], upscaled to 32x32 (bilinear), one fixed stratified
split (70% train, 30% = 540 test images; split seed 0).

Model: a small residual CNN (stem + three residual blocks, ~307k kernel
weights in 10 Conv2D/Dense kernels), trained FP32 once and cached in --workdir.
Every method starts from the same FP32 weights and is finetuned with the same
optimizer (the paper's SGD recipe: lr 0.005, momentum 0.9, weight decay 1e-4),
batch size, data and number of epochs. Each seed changes the finetuning data
order (the FP32 model and the split are the same for all seeds).

Methods, at each (pruning rate p, bits B):
  opq, uniform, global_magnitude: `opq_tf.allocate(strategy=...)`, `apply`,
    finetune, `export` (the model ratio is read off the packed model.opq).
  tfmot: `prune_low_magnitude` (PolynomialDecay 0 -> p, every layer to p) for
    the first half of the epochs (floor(E/2); the ramp ends one epoch before
    the phase ends so the last pruning epoch recovers at full sparsity, or at
    the end of the only pruning epoch),
    `strip_pruning`, then QAT for the remaining epochs: B = 8 with PQAT
    (`Default8BitPrunePreserveQuantizeScheme`, which keeps the pruned zeros);
    B < 8 with the experimental `DefaultNBitQuantizeScheme(num_bits_weight=B,
    num_bits_activation=8)`, for which tfmot 0.8 has no sparsity-preserving
    variant (the prune-preserve registry wraps only the 8-bit configs), so the
    sparsity that survives is counted as exact zeros of the final quantized
    kernels. tfmot's schemes also quantize activations to 8 bits; opq_tf's
    default keeps activations FP32. tfmot's "zero-shot" accuracy is that of
    per-layer magnitude pruning to p plus its weight quantizer, FP32
    activations (its own flow has no compressed model before finetuning).

Also measured: opq_tf.allocate's modelled error (plan.modelled_error / total
weights) against the measured MSE of the compressed kernels, per layer with
each kernel's kurtosis; epochs until the test accuracy is within 0.5 points of
FP32 (evaluated after every finetuning epoch).

Size figures: weight-bits ratio 32·Σn / Σ(nonzero·B + 32) over the same
kernels for every method. Model ratio = FP32 model bytes / packed file bytes;
for tfmot the final integer codes go through the same packer
(`opq_tf.packing.write_packed`) with its per-channel scales stored as extra
FP32 parameters (its activation ranges are not counted).
"""

import datetime
import json
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

import opq_tf  # noqa: E402
from opq_tf import wrapping  # noqa: E402
from opq_tf import layers as layers_lib  # noqa: E402
from opq_tf import packing  # noqa: E402
from opq_tf._keras import keras, tf, tfmot  # noqa: E402

flags.DEFINE_string("workdir", "/tmp/opq_accuracy",
                    "Cache (FP32 weights), exports and results.json.")
flags.DEFINE_string("output_dir", os.path.join(_REPO, "docs"),
                    "Where accuracy_results.md and accuracy.png go.")
flags.DEFINE_bool("quick", False,
                  "Smoke run: 2 settings, 1 seed, 2 epochs, short FP32 training.")
flags.DEFINE_integer("seeds", None, "Finetuning seeds (default 3; quick 1).")
flags.DEFINE_integer("epochs", None,
                     "Finetuning epochs per method (default 6; quick 2; >= 2).")
flags.DEFINE_integer("fp32_epochs", None,
                     "FP32 training epochs (default 30; quick 6).")
FLAGS = flags.FLAGS

SETTINGS = ((0.5, 8), (0.8, 4), (0.9, 4), (0.95, 3), (0.97, 2))
QUICK_SETTINGS = ((0.5, 8), (0.9, 4))
OPQ_METHODS = ("opq", "uniform", "global_magnitude")
METHODS = OPQ_METHODS + ("tfmot",)
BATCH_SIZE = 64
TEST_FRACTION = 0.3
FP32_LEARNING_RATE, FP32_WEIGHT_DECAY = 0.05, 5e-4
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.005, 0.9, 1e-4
TOLERANCE = 0.005  # "within 0.5 points of FP32"
TARGET_RATIO = 30.0


# ---------------------------------------------------------------- data, model


def load_data():
  """(x_train, y_train, x_test, y_test): float32 images (N, 32, 32, 1) in [0, 1]."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] / 16.0
  images = tf.image.resize(images, (32, 32), method="bilinear").numpy()
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, digits.target.astype(np.int32), test_size=TEST_FRACTION,
      stratify=digits.target, random_state=0)
  return x_train, y_train, x_test, y_test


def train_dataset(data, seed):
  x_train, y_train, _, _ = data
  return (tf.data.Dataset.from_tensor_slices((x_train, y_train))
          .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
          .batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE))


def test_dataset(data):
  _, _, x_test, y_test = data
  return tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(256)


def steps_per_epoch(data):
  return -(-len(data[0]) // BATCH_SIZE)


def _residual_block(x, filters, stride, name):
  shortcut = x
  x = keras.layers.Conv2D(filters, 3, stride, padding="same", use_bias=False,
                          name=f"{name}_conv1")(x)
  x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(x)
  x = keras.layers.ReLU(name=f"{name}_relu1")(x)
  x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          name=f"{name}_conv2")(x)
  x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(x)
  if stride != 1 or shortcut.shape[-1] != filters:
    shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False,
                                   name=f"{name}_proj")(shortcut)
    shortcut = keras.layers.BatchNormalization(
        momentum=0.9, name=f"{name}_proj_bn")(shortcut)
  x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
  return keras.layers.ReLU(name=f"{name}_relu2")(x)


def build_model():
  """32x32x1 -> 10 logits; 16x16x32 -> 16x16x32 -> 8x8x64 -> 4x4x128 -> GAP."""
  inputs = keras.Input((32, 32, 1), name="image")
  x = keras.layers.Conv2D(32, 3, 2, padding="same", use_bias=False,
                          name="stem")(inputs)
  x = keras.layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
  x = keras.layers.ReLU(name="stem_relu")(x)
  x = _residual_block(x, 32, 1, "block1")
  x = _residual_block(x, 64, 2, "block2")
  x = _residual_block(x, 128, 2, "block3")
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = keras.layers.Dense(10, name="logits")(x)
  return keras.Model(inputs, outputs, name="digits_resnet")


def compile_model(model, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY):
  model.compile(
      optimizer=keras.optimizers.SGD(learning_rate, momentum=MOMENTUM,
                                     weight_decay=weight_decay),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"])
  return model


def evaluate(model, data):
  return float(model.evaluate(test_dataset(data), verbose=0)[1])


def train_fp32(data, workdir, epochs):
  """The FP32 model, trained once (cosine lr) and cached in workdir."""
  path = os.path.join(workdir, f"fp32_e{epochs}.h5")
  keras.utils.set_random_seed(0)
  model = compile_model(build_model())
  if os.path.exists(path):
    model.load_weights(path)
    return model, 0.0
  schedule = keras.optimizers.schedules.CosineDecay(
      FP32_LEARNING_RATE, epochs * steps_per_epoch(data))
  compile_model(model, schedule, FP32_WEIGHT_DECAY)
  start = time.perf_counter()
  model.fit(train_dataset(data, seed=0), epochs=epochs, verbose=0)
  seconds = time.perf_counter() - start
  compile_model(model)
  model.save_weights(path[:-3] + ".tmp.h5")
  os.replace(path[:-3] + ".tmp.h5", path)
  return model, seconds


def kernels(model):
  """key -> FP32 kernel of every compressed (Conv2D / Dense) kernel."""
  return {key: value for key, (_, value)
          in layers_lib.compressible_kernels(model).items()}


def with_kernels(model, new_kernels):
  """A plain copy of `model` whose compressed kernels are `new_kernels`."""
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  for key, value in new_kernels.items():
    name, _, weight = key.rpartition("/")
    getattr(copy.get_layer(name), weight).assign(value)
  return compile_model(copy)


def finetune(model, data, seed, epochs, callbacks=()):
  """Fits epoch by epoch: (test accuracy after each epoch, seconds per epoch)."""
  dataset = train_dataset(data, seed)
  accuracies, seconds = [], []
  for _ in range(epochs):
    start = time.perf_counter()
    model.fit(dataset, epochs=1, verbose=0, callbacks=list(callbacks))
    seconds.append(time.perf_counter() - start)
    accuracies.append(evaluate(model, data))
  return accuracies, seconds


def reset_optimizer(model):
  variables = model.optimizer.variables
  for variable in (variables() if callable(variables) else variables):
    variable.assign(tf.zeros_like(variable))


def weight_bits_ratio(compressed, bits):
  """32·Σn / Σ(nonzero·B + 32) over the compressed kernels."""
  total = sum(v.size for v in compressed.values())
  coded = sum(np.count_nonzero(v) * bits + 32 for v in compressed.values())
  return 32.0 * total / coded


def mean_squared_error(reference, compressed):
  squared = sum(float(np.sum((reference[k].astype(np.float64) - compressed[k])**2))
                for k in reference)
  return squared / sum(v.size for v in reference.values())


# ------------------------------------------------------------------- opq_tf


def run_opq(fp32, data, strategy, pruning_rate, bits, seeds, epochs, workdir):
  """One plan and wrapped model, finetuned once per seed from the same start.

  The wrapped model and its traced train step are reused across seeds: its
  weights (latent kernels, masks, steps, BN) and optimizer slots are restored.
  """
  reference = kernels(fp32)
  plan = opq_tf.allocate(fp32, pruning_rate, bits, strategy=strategy)
  qmodel = compile_model(opq_tf.apply(fp32, plan))
  compressed = {e.key: e.compressed for e in wrapping.compressed_entries(qmodel)}
  result = {
      "method": strategy, "pruning_rate": pruning_rate, "bits": bits,
      "scheme": f"opq_tf.allocate(strategy={strategy!r})",
      "zero_shot": evaluate(qmodel, data),
      "modelled_mse": plan.modelled_error / plan.total_weights,
      "measured_mse": mean_squared_error(reference, compressed),
      "weight_bits_ratio": plan.weight_bits_ratio,
      "sparsity": plan.realised_pruning_rate,
      "layers": [{
          "key": layer.key, "size": layer.size,
          "pruning_rate": layer.pruning_rate,
          "modelled_pruning_rate": layer.modelled_pruning_rate,
          "modelled_mse": layer.modelled_error,
          "measured_mse": mean_squared_error({layer.key: reference[layer.key]},
                                             compressed),
      } for layer in plan.layers],
      "seeds": [],
  }
  initial = qmodel.get_weights()
  for seed in range(seeds):
    qmodel.set_weights(initial)
    reset_optimizer(qmodel)
    keras.utils.set_random_seed(seed)
    accuracies, seconds = finetune(qmodel, data, seed, epochs)
    result["seeds"].append({"accuracies": accuracies, "seconds": seconds,
                            "first_compressed_epoch": 1,
                            "traced_epochs": [1] if seed == 0 else []})
    if seed == 0:
      export_dir = os.path.join(workdir, "exports",
                                f"{strategy}_p{pruning_rate}_b{bits}")
      shutil.rmtree(export_dir, ignore_errors=True)
      report = opq_tf.export(qmodel, export_dir)
      result["model_ratio"] = report["model_ratio"]
      result["packed_bytes"] = report["packed_bytes"]
      result["entropy_bound_bytes"] = report["entropy_bound_bytes"]
  return result


# -------------------------------------------------------------------- tfmot


def tfmot_style_kernels(reference, pruning_rate, bits):
  """What tfmot reaches with no finetuning: per-layer magnitude pruning to p
  (prune_low_magnitude's top-k mask) and its symmetric narrow-range B-bit
  weight quantizer (per output channel for Conv2D, per tensor for Dense)."""
  max_code = 2**(bits - 1) - 1
  compressed = {}
  for key, kernel in reference.items():
    magnitudes = np.abs(kernel)
    keep = max(int(round(kernel.size * (1.0 - pruning_rate))), 1)
    threshold = np.sort(magnitudes.ravel())[-keep]
    pruned = np.where(magnitudes >= threshold, kernel, 0.0)
    axes = tuple(range(kernel.ndim - 1)) if kernel.ndim == 4 else None
    scale = np.max(np.abs(pruned), axis=axes) / max_code
    scale = np.where(scale > 0, scale, 1.0)
    compressed[key] = (np.clip(np.round(pruned / scale), -max_code, max_code)
                       * scale).astype(np.float32)
  return compressed


def tfmot_schedule(pruning_rate, data, prune_epochs):
  """PolynomialDecay 0 -> p, ending one epoch before the pruning phase ends."""
  steps = steps_per_epoch(data)
  frequency = max(1, steps // 4)
  ramp_steps = (prune_epochs - 1) * steps if prune_epochs > 1 else steps - 1
  end_step = max(frequency, ramp_steps // frequency * frequency)
  return tfmot.sparsity.keras.PolynomialDecay(
      initial_sparsity=0.0, final_sparsity=pruning_rate, begin_step=0,
      end_step=end_step, frequency=frequency)


def tfmot_quantize(model, bits):
  annotated = tfmot.quantization.keras.quantize_annotate_model(model)
  if bits == 8:
    scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
  else:
    scheme = (tfmot.quantization.keras.experimental.default_n_bit
              .DefaultNBitQuantizeScheme(num_bits_weight=bits,
                                         num_bits_activation=8))
  return compile_model(tfmot.quantization.keras.quantize_apply(annotated, scheme))


def tfmot_final_kernels(qmodel):
  """key -> (quantized kernel as the model computes it at test time, scales).

  Runs each wrapper's own weight quantizer in inference mode on its latent
  kernel; the scale of a symmetric narrow-range B-bit quantizer is max / K.
  """
  final = {}
  for layer in qmodel.layers:
    if not isinstance(layer, tfmot.quantization.keras.QuantizeWrapperV2):
      continue
    for weight, quantizer, variables in layer._weight_vars:  # pylint: disable=protected-access
      attr = weight.name.rsplit("/", 1)[-1].split(":")[0]
      value = quantizer(weight, training=False, weights=variables).numpy()
      max_code = 2**(quantizer.num_bits - 1) - 1
      scale = variables["max_var"].numpy() / max_code
      final[f"{layer.layer.name}/{attr}"] = (value, scale, quantizer.num_bits)
  return final


def tfmot_model_ratio(fp32, final, path):
  """FP32 bytes / bytes of the same packer on tfmot's codes + scales + rest."""
  entries, rest = [], {}
  for key, (value, scale, bits) in final.items():
    max_code = 2**(bits - 1) - 1
    codes = np.clip(np.round(value / np.where(scale > 0, scale, 1.0)),
                    -max_code, max_code).astype(np.int32)
    if not np.allclose(codes * scale, value, rtol=1e-5, atol=1e-7):
      raise ValueError(f"tfmot kernel {key} is not scale * integer code; the "
                       "quantizer read-out in tfmot_final_kernels is wrong.")
    entries.append(packing.PackedEntry(key, bits, 1.0, codes != 0, codes))
    rest[f"{key}_scale"] = np.atleast_1d(scale).astype(np.float32)
  compressed_keys = set(final)
  for layer in layers_lib.iter_layers(fp32):
    for variable in layer.weights:
      key = f"{layer.name}/{variable.name.rsplit('/', 1)[-1].split(':')[0]}"
      if key not in compressed_keys:
        rest[key] = variable.numpy()
  stats = packing.write_packed(path, entries, rest)
  return 4.0 * fp32.count_params() / stats.file_bytes, stats.file_bytes


def run_tfmot(fp32, data, pruning_rate, bits, seeds, epochs, workdir):
  """prune_low_magnitude for floor(E/2) epochs, then QAT for the rest."""
  reference = kernels(fp32)
  zero_shot_kernels = tfmot_style_kernels(reference, pruning_rate, bits)
  prune_epochs = epochs // 2
  result = {
      "method": "tfmot", "pruning_rate": pruning_rate, "bits": bits,
      "scheme": ("prune_low_magnitude + PQAT 8-bit" if bits == 8 else
                 f"prune_low_magnitude + n-bit QAT (w{bits}a8, no sparsity "
                 "preservation)"),
      "zero_shot": evaluate(with_kernels(fp32, zero_shot_kernels), data),
      "zero_shot_weight_bits_ratio": weight_bits_ratio(zero_shot_kernels, bits),
      "measured_mse": mean_squared_error(reference, zero_shot_kernels),
      "seeds": [],
  }
  ratios, sparsities, model_ratios = [], [], []
  for seed in range(seeds):
    keras.utils.set_random_seed(seed)
    start_model = keras.models.clone_model(fp32)
    start_model.set_weights(fp32.get_weights())
    pruned = compile_model(tfmot.sparsity.keras.prune_low_magnitude(
        start_model,
        pruning_schedule=tfmot_schedule(pruning_rate, data, prune_epochs)))
    prune_accuracies, prune_seconds = finetune(
        pruned, data, seed, prune_epochs,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    qmodel = tfmot_quantize(tfmot.sparsity.keras.strip_pruning(pruned), bits)
    qat_accuracies, qat_seconds = finetune(qmodel, data, seed,
                                           epochs - prune_epochs)
    final = tfmot_final_kernels(qmodel)
    final_kernels = {key: value for key, (value, _, _) in final.items()}
    ratios.append(weight_bits_ratio(final_kernels, bits))
    sparsities.append(1.0 - sum(np.count_nonzero(v) for v in final_kernels.values())
                      / sum(v.size for v in final_kernels.values()))
    if seed == 0:
      os.makedirs(os.path.join(workdir, "exports"), exist_ok=True)
      model_ratio, packed_bytes = tfmot_model_ratio(
          fp32, final, os.path.join(workdir, "exports",
                                    f"tfmot_p{pruning_rate}_b{bits}.opq"))
      model_ratios.append(model_ratio)
      result["packed_bytes"] = packed_bytes
    result["seeds"].append({
        "accuracies": prune_accuracies + qat_accuracies,
        "seconds": prune_seconds + qat_seconds,
        "first_compressed_epoch": prune_epochs + 1,
        "traced_epochs": [1, prune_epochs + 1],
        "sparsity": sparsities[-1],
    })
  result.update(weight_bits_ratio=float(np.mean(ratios)),
                sparsity=float(np.mean(sparsities)),
                model_ratio=model_ratios[0])
  return result


# ------------------------------------------------------------------ summary


def summarise(result, fp32_accuracy):
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
      accuracy_mean=float(np.mean(finals)), accuracy_std=float(np.std(finals)),
      accuracy_min=float(np.min(finals)), accuracy_max=float(np.max(finals)),
      epochs_to_target=reached,
      finetune_seconds=float(sum(result["seeds"][0]["seconds"])),
      seconds_per_epoch=float(np.median(epoch_seconds or
                                        result["seeds"][0]["seconds"])))
  return result


def target_checks(results, settings):
  """Per setting: is opq >= every other method, and near FP32 at >= 30x?"""
  checks = []
  for pruning_rate, bits in settings:
    rows = {r["method"]: r for r in results
            if (r["pruning_rate"], r["bits"]) == (pruning_rate, bits)}
    opq = rows["opq"]
    best_other = max((r for m, r in rows.items() if m != "opq"),
                     key=lambda r: r["accuracy_mean"])
    is_best = opq["accuracy_mean"] >= best_other["accuracy_mean"]
    if opq["weight_bits_ratio"] >= TARGET_RATIO:
      near = opq["accuracy_mean"] >= results[0]["fp32_accuracy"] - TOLERANCE
    else:
      near = None
    checks.append({"pruning_rate": pruning_rate, "bits": bits,
                   "opq_is_best": is_best, "best_other": best_other["method"],
                   "margin": opq["accuracy_mean"] - best_other["accuracy_mean"],
                   "near_fp32": near, "held": is_best and near is not False})
  return checks


def _epochs_cell(reached, epochs):
  hits = [e for e in reached if e is not None]
  if not hits:
    return f"not in {epochs}"
  return f"{np.mean(hits):.1f} ({len(hits)}/{len(reached)})"


def _pct(value):
  return f"{100 * value:.2f}"


def markdown(results, checks, context):
  """The results section: setup, main table, zero-shot, error model, target."""
  fp32 = context["fp32_accuracy"]
  lines = [
      "## Accuracy: opq_tf vs uniform / global-magnitude allocation vs tfmot",
      "",
      f"Command: `{context['command']}`  ",
      f"Machine: {context['machine']}; date {context['date']}; total wall time "
      f"{context['wall_seconds'] / 60:.1f} min, process CPU time "
      f"{context['cpu_seconds'] / 60:.1f} min (the 2 cores were shared with "
      "other jobs, so times are indicative).  ",
      f"Data: scikit-learn digits upscaled to 32x32, stratified split "
      f"{context['train_size']} train / {context['test_size']} test; "
      f"{context['seeds']} finetuning seed(s) (data order), "
      f"{context['epochs']} finetuning epochs per method, batch {BATCH_SIZE}, "
      f"SGD lr {LEARNING_RATE}, momentum {MOMENTUM}, weight decay "
      f"{WEIGHT_DECAY}.  ",
      f"Model: residual CNN, {context['kernel_weights']:,} kernel weights in "
      f"{context['kernels']} Conv2D/Dense kernels, {context['parameters']:,} "
      f"parameters; FP32 test accuracy **{_pct(fp32)}%** "
      f"({context['fp32_epochs']} epochs).",
      "",
      "Accuracy in % on the test set: mean ± std over seeds (min-max in the "
      "JSON). *Zero-shot* = right after compression, before finetuning. "
      "*Sparsity* = exact zeros in the final compressed kernels. *Epochs to "
      "FP32-0.5* = first finetuning epoch whose test accuracy is within 0.5 "
      "points of FP32, mean over the seeds that got there (count); for tfmot "
      "only QAT-phase epochs count (the pruning phase is not yet the "
      "compressed model). *Finetune s* = wall time of all fit calls of seed 0 "
      "(includes graph tracing: 1 model for opq_tf, 2 for tfmot); *s/epoch* = "
      "median time of the epochs that trace no new graph.",
      "",
      "| p | B | method | zero-shot | after finetuning | Δ FP32 | sparsity | "
      "weight-bits ratio | model ratio | finetune s | s/epoch | epochs to FP32-0.5 |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
        f"| {r['pruning_rate']} | {r['bits']} | {r['method']} | "
        f"{_pct(r['zero_shot'])} | {_pct(r['accuracy_mean'])} ± "
        f"{_pct(r['accuracy_std'])} | {100 * (r['accuracy_mean'] - fp32):+.2f} | "
        f"{_pct(r['sparsity'])}% | {r['weight_bits_ratio']:.1f}x | "
        f"{r['model_ratio']:.1f}x | {r['finetune_seconds']:.0f} | "
        f"{r['seconds_per_epoch']:.2f} | "
        f"{_epochs_cell(r['epochs_to_target'], context['epochs'])} |")
  schemes = {r["bits"]: r["scheme"] for r in results if r["method"] == "tfmot"}
  prune_epochs = context["epochs"] // 2
  lines += [
      "",
      "tfmot: " + "; ".join(f"B={b}: {schemes[b]}" for b in sorted(schemes)) +
      f". It prunes for floor(E/2) = {prune_epochs} epoch(s) (PolynomialDecay "
      "0 -> p, mask updates 4 times per epoch, reaching p "
      + ("one epoch before the phase ends" if prune_epochs > 1
         else "at the end of the epoch") +
      f"), then runs QAT for {context['epochs'] - prune_epochs}; its "
      "activations are 8-bit, opq_tf's FP32. tfmot's model ratio packs its "
      "integer codes with the same packer plus one FP32 scale per output "
      "channel (Conv2D) or per tensor (Dense); its zero-shot column is "
      "per-layer magnitude pruning + its weight quantizer with FP32 "
      "activations.",
      "",
      "### Zero-shot accuracy (no finetuning), %",
      "",
      "| p | B | opq | uniform | global_magnitude | tfmot-style |",
      "|---|---|---|---|---|---|",
  ]
  for pruning_rate, bits in context["settings"]:
    row = {r["method"]: r for r in results
           if (r["pruning_rate"], r["bits"]) == (pruning_rate, bits)}
    lines.append(f"| {pruning_rate} | {bits} | " + " | ".join(
        _pct(row[m]["zero_shot"]) for m in METHODS) + " |")
  lines += [
      "",
      "### Laplace error model vs the real kernels",
      "",
      "Modelled = plan.modelled_error / total weights (expected squared error "
      "per weight under the fitted Laplace); measured = mean squared "
      "difference between the FP32 kernels and the compressed kernels right "
      "after `apply`.",
      "",
      "| p | B | strategy | modelled MSE | measured MSE | measured / modelled |",
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
      "### Per-layer check of the opq plans",
      "",
      "Kurtosis E[w^4]/E[w^2]^2 of each FP32 kernel (Laplace 6, Gaussian 3, "
      "uniform 1.8); then per setting the realised pruning rate on the actual "
      "weights with the Laplace model's rate for the same threshold in "
      "brackets, and measured / modelled MSE.",
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
  emptied = [f"{layer['key']} at p={plan['pruning_rate']} B={plan['bits']}"
             for plan in plans for layer in plan["layers"]
             if layer["pruning_rate"] >= 0.999]
  lines += ["", "Kernels the opq plan prunes entirely (>= 99.9%): "
            + ("; ".join(emptied) if emptied else "none") + "."]
  lines += [
      "",
      "### Target",
      "",
      "Target: \"opq is at least as accurate as every other method at every "
      "setting, and within 0.5 points of FP32 at >= 30x weight-bits ratio\" "
      "(means over seeds).",
      "",
      "| p | B | opq >= all others | best other (opq margin, points) | "
      "within 0.5 of FP32 | held |",
      "|---|---|---|---|---|---|",
  ]
  for c in checks:
    near = {None: "n/a (< 30x)", True: "yes", False: "no"}[c["near_fp32"]]
    lines.append(
        f"| {c['pruning_rate']} | {c['bits']} | "
        f"{'yes' if c['opq_is_best'] else 'no'} | {c['best_other']} "
        f"({100 * c['margin']:+.2f}) | {near} | "
        f"{'HELD' if c['held'] else 'NOT HELD'} |")
  held = all(c["held"] for c in checks)
  lines += ["", f"Overall: target {'HELD' if held else 'NOT HELD'} "
            f"({sum(c['held'] for c in checks)}/{len(checks)} settings).", ""]
  return "\n".join(lines)


def plot(results, fp32_accuracy, path):
  """Accuracy vs weight-bits ratio (log x): after finetuning and zero-shot."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
  for method in METHODS:
    rows = sorted((r for r in results if r["method"] == method),
                  key=lambda r: r["weight_bits_ratio"])
    ratios = [r["weight_bits_ratio"] for r in rows]
    axes[0].errorbar(ratios, [100 * r["accuracy_mean"] for r in rows],
                     yerr=[100 * r["accuracy_std"] for r in rows], marker="o",
                     capsize=3, label=method)
    axes[1].plot([r.get("zero_shot_weight_bits_ratio", r["weight_bits_ratio"])
                  for r in rows], [100 * r["zero_shot"] for r in rows],
                 marker="o", label=method)
  for axis, title in zip(axes, ("after finetuning", "zero-shot (no finetuning)")):
    axis.axhline(100 * fp32_accuracy, color="black", linewidth=1, label="FP32")
    axis.axhline(100 * (fp32_accuracy - TOLERANCE), color="black",
                 linestyle="--", linewidth=1, label="FP32 - 0.5")
    axis.set_xscale("log")
    axis.set_xlabel("weight-bits ratio (32·Σn / Σ(nonzero·B + 32))")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
  axes[0].legend(loc="lower left", fontsize=8)
  figure.suptitle("Digits 32x32, residual CNN: accuracy vs compression")
  figure.tight_layout()
  figure.savefig(path + ".tmp.png", dpi=110)
  plt.close(figure)
  os.replace(path + ".tmp.png", path)


def _write(path, text):
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  tf.get_logger().setLevel("ERROR")
  seeds = FLAGS.seeds or (1 if FLAGS.quick else 3)
  epochs = FLAGS.epochs or (2 if FLAGS.quick else 6)
  fp32_epochs = FLAGS.fp32_epochs or (6 if FLAGS.quick else 30)
  settings = QUICK_SETTINGS if FLAGS.quick else SETTINGS
  if epochs < 2:
    raise app.UsageError(
        f"--epochs={epochs}: tfmot needs at least 2 (one pruning epoch, one "
        "QAT epoch); pass --epochs=2 or more.")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  start = time.perf_counter()

  data = load_data()
  fp32, fp32_seconds = train_fp32(data, FLAGS.workdir, fp32_epochs)
  fp32_accuracy = evaluate(fp32, data)
  reference = kernels(fp32)
  print(f"FP32: test accuracy {fp32_accuracy:.4f}, "
        f"{sum(v.size for v in reference.values())} kernel weights "
        f"(trained in {fp32_seconds:.0f} s; 0 = cached)", flush=True)

  results = []
  for pruning_rate, bits in settings:
    for method in METHODS:
      if method == "tfmot":
        result = run_tfmot(fp32, data, pruning_rate, bits, seeds, epochs,
                           FLAGS.workdir)
      else:
        result = run_opq(fp32, data, method, pruning_rate, bits, seeds, epochs,
                         FLAGS.workdir)
      result["fp32_accuracy"] = fp32_accuracy
      results.append(summarise(result, fp32_accuracy))
      print(f"p={pruning_rate} B={bits} {method:16s} zero-shot "
            f"{result['zero_shot']:.4f} -> {result['accuracy_mean']:.4f} "
            f"± {result['accuracy_std']:.4f}  {result['weight_bits_ratio']:.1f}x "
            f"({time.perf_counter() - start:.0f} s)", flush=True)

  checks = target_checks(results, settings)
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
      "train_size": len(data[0]), "test_size": len(data[2]),
      "seeds": seeds, "epochs": epochs, "fp32_epochs": fp32_epochs,
      "settings": [list(s) for s in settings],
      "kernels": len(reference),
      "kernel_weights": int(sum(v.size for v in reference.values())),
      "kurtosis": {key: float(np.mean(v.astype(np.float64)**4)
                              / np.mean(v.astype(np.float64)**2)**2)
                   for key, v in reference.items()},
      "parameters": int(fp32.count_params()),
      "fp32_accuracy": fp32_accuracy,
  }
  text = markdown(results, checks, context)
  _write(os.path.join(FLAGS.output_dir, "accuracy_results.md"), text)
  plot(results, fp32_accuracy, os.path.join(FLAGS.output_dir, "accuracy.png"))
  _write(os.path.join(FLAGS.workdir, "results.json"), json.dumps(
      {"context": context, "results": results, "checks": checks}, indent=1))
  print(text)


if __name__ == "__main__":
  app.run(main)
