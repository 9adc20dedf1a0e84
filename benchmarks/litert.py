"""Benchmark: OPQ's .tflite against FP32, dynamic-range int8 and tfmot PQAT.

Usage: python -m benchmarks.litert [--quick] [--models=...] [--output=...]

Per model (tf_keras.applications at 224x224, weights=None, the configs' p and
B; plus the real ImageNet MobileNet-V1 0.75 of ../shared/data/imagenet_mobilenet
when present): the size of each .tflite (plain and gzipped) and of the packed
file, single-thread CPU latency in the LiteRT interpreter (median of many
batch-1 runs, XNNPACK on and off, ratios to the FP32 .tflite of the same run),
and agreement of each .tflite with its Keras model (top-1 agreement, max |logit
difference|). Images: the real ImageNet ones for the ImageNet model, uniform
noise in [-1, 1] (already preprocessed) for the weights=None models (their agreement is about
rounding, not accuracy). Targets (not tests): OPQ .tflite >= 3.5x smaller than
the FP32 .tflite and smaller than tfmot's, latency no worse than dynamic-range
int8, top-1 agreement >= 99.5%. Misses are reported as measured.
"""

import glob
import gzip
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import opq_tf
from opq_tf.core import files
from opq_tf.tf_keras import litert
from opq_tf.tf_keras._keras import keras, tf, tfmot

_QUICK = flags.DEFINE_bool("quick", False, "Fewer runs and images (~5 min).")
_MODELS = flags.DEFINE_list(
    "models", ["mobilenet_v1", "resnet50", "imagenet_mobilenet_0.75"],
    "Models to measure.")
_OUTPUT = flags.DEFINE_string("output", "docs/litert_results.md",
                              "Markdown results file ('' to only print).")
_IMAGENET_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                             "data", "imagenet_mobilenet")


def _imagenet_mobilenet():
  """The real MobileNet-V1 0.75 and its preprocessed images, or None."""
  weights = os.path.join(_IMAGENET_DIR, "mobilenet_v1_0.75_224_imagenet.h5")
  if not os.path.exists(weights):
    return None
  model = keras.applications.MobileNet(alpha=0.75, input_shape=(224, 224, 3),
                                       weights=None, classifier_activation=None)
  model.load_weights(weights)
  images = []
  for path in sorted(glob.glob(os.path.join(_IMAGENET_DIR, "images", "*.JPEG"))):
    image = tf.image.decode_jpeg(tf.io.read_file(path), channels=3)
    height, width = image.shape[:2]
    if min(height, width) != 256:  # The README's shorter side, to be sure.
      scale = 256 / min(height, width)
      image = tf.cast(tf.round(tf.image.resize(
          image, (round(height * scale), round(width * scale)))), tf.uint8)
      height, width = image.shape[:2]
    top, left = (height - 224) // 2, (width - 224) // 2
    images.append(image[top:top + 224, left:left + 224].numpy())
  images = np.stack(images).astype(np.float32) / 127.5 - 1.0
  return model, images


# name -> (builder, pruning rate, bits), as in configs/<model>.py. Logits out
# (no softmax), so the differences below are logit differences.
_SETTINGS = {
    "mobilenet_v1": (lambda: keras.applications.MobileNet(
        weights=None, classifier_activation=None), 0.656, 4),
    "resnet50": (lambda: keras.applications.ResNet50(
        weights=None, classifier_activation=None), 0.79, 4),
    "imagenet_mobilenet_0.75": (None, 0.656, 4),
}


def _tfmot_pqat(model, pruning_rate: float) -> keras.Model:
  """tfmot's prune (constant sparsity, one step) then PQAT wrappers.

  tfmot wraps the model's own layers, so it works on a copy; the one training
  step has learning rate 0 and only applies the pruning masks.
  """
  copy = keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  sparsity = tfmot.sparsity.keras
  pruned = sparsity.prune_low_magnitude(
      copy, pruning_schedule=sparsity.ConstantSparsity(pruning_rate, 0, frequency=1))
  pruned.compile(keras.optimizers.SGD(learning_rate=0.0), "mse")
  batch = np.zeros((1, *model.input_shape[1:]), np.float32)
  pruned.fit(batch, pruned.predict(batch, verbose=0), epochs=1, verbose=0,
             callbacks=[sparsity.UpdatePruningStep()])
  stripped = sparsity.strip_pruning(pruned)
  quantization = tfmot.quantization.keras
  annotated = quantization.quantize_annotate_model(stripped)
  return quantization.quantize_apply(
      annotated,
      tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme())


def _latency_ms(path: str, runs: int, xnnpack: bool) -> float:
  runner = litert.interpreter(path, num_threads=1, xnnpack=xnnpack)
  runner.allocate_tensors()
  detail = runner.get_input_details()[0]
  image = np.random.default_rng(0).uniform(
      0, 1, detail["shape"]).astype(detail["dtype"])
  runner.set_tensor(detail["index"], image)
  runner.invoke()  # Warm-up (DENSIFY/dequantize-once, delegate set-up).
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    runner.invoke()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def _gzip_bytes(path: str) -> int:
  with open(path, "rb") as f:
    return len(gzip.compress(f.read(), 9))


def _measure(name: str, directory: str, runs: int, image_count: int) -> list:
  build, pruning_rate, bits = _SETTINGS[name]
  if build is None:
    loaded = _imagenet_mobilenet()
    if loaded is None:
      print(f"{name}: {_IMAGENET_DIR} absent, skipped.")
      return []
    model, images = loaded
  else:
    model = build()
    images = np.random.default_rng(0).uniform(-1, 1, (image_count, 224, 224, 3))
  images = images[:image_count].astype(np.float32)
  keras.utils.set_random_seed(0)
  qmodel = opq_tf.apply(model, pruning_rate=pruning_rate, bits=bits)
  stripped = opq_tf.strip(qmodel)
  paths, references = {}, {}

  def write(label, content, reference):
    path = os.path.join(directory, f"{name}_{label}.tflite")
    files.atomic_write(path, content)
    paths[label], references[label] = path, reference

  write("fp32", litert.float_tflite(model), model)
  write("dynamic-range int8", litert.float_tflite(
      model, optimizations=[tf.lite.Optimize.DEFAULT]), model)
  try:
    pqat = _tfmot_pqat(model, pruning_rate)
    write("tfmot prune+PQAT", litert.float_tflite(
        pqat, optimizations=[tf.lite.Optimize.DEFAULT]), pqat)
  except Exception as error:  # Reported, not fatal: a baseline failed.
    print(f"{name}: tfmot prune+PQAT failed: {error}")
  # "opq": the default (float compute, CSR where smaller); then variants.
  variants = {"opq": {}, "opq dense": {"sparse": False},
              "opq hybrid": {"compute": "hybrid"},
              "opq hybrid sparse": {"compute": "hybrid", "sparse": True}}
  for label, options in variants.items():
    paths[label] = os.path.join(directory, f"{name}_{label.replace(' ', '_')}.tflite")
    references[label] = stripped
    info = litert.convert(qmodel, paths[label], **options)
    if label == "opq":
      conversion = info["conversion"]
  export_dir = os.path.join(directory, f"{name}_export")
  report = opq_tf.export(qmodel, export_dir)

  fp32_bytes = os.path.getsize(paths["fp32"])
  latency = {}
  rows = []
  for label, path in paths.items():
    size = os.path.getsize(path)
    xnnpack = label != "opq hybrid sparse"  # XNNPACK cannot prepare it.
    on = _latency_ms(path, runs, xnnpack=True) if xnnpack else None
    off = _latency_ms(path, runs, xnnpack=False)
    latency[label] = (on, off)
    agreement = litert.compare(path, references[label], images,
                               xnnpack=xnnpack)
    rows.append([name, label, size, _gzip_bytes(path), fp32_bytes / size,
                 on, off, agreement["top1_agreement"],
                 agreement["max_abs_logit_difference"]])
  packed = report["packed_bytes"]
  rows.append([name, "packed model.opq", packed, None, fp32_bytes / packed,
               None, None, None, None])
  for row in rows:
    if row[5] is not None or row[6] is not None:
      base_on, base_off = latency["fp32"]
      row.insert(7, (row[5] / base_on if row[5] else None,
                     row[6] / base_off if row[6] else None))
    else:
      row.insert(7, (None, None))
  print(f"{name}: OPQ conversion {conversion}", flush=True)
  return rows


def _format(value, spec):
  return "-" if value is None else format(value, spec)


def _table(rows) -> str:
  lines = [
      "| model | artefact | bytes | gzip bytes | FP32 / bytes | latency ms "
      "XNNPACK | latency ms no XNNPACK | vs FP32 (on / off) | top-1 agreement "
      "| max abs logit diff |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for (name, label, size, gz, ratio, on, off, (rel_on, rel_off), agreement,
       difference) in rows:
    lines.append(
        f"| {name} | {label} | {size:,} | {_format(gz, ',')} | {ratio:.2f}x | "
        f"{_format(on, '.1f')} | {_format(off, '.1f')} | "
        f"{_format(rel_on, '.2f')} / {_format(rel_off, '.2f')} | "
        f"{_format(agreement, '.3f')} | {_format(difference, '.3g')} |")
  return "\n".join(lines)


def main(argv):
  del argv
  runs, image_count = (10, 50) if _QUICK.value else (50, 500)
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    for name in _MODELS.value:
      rows += _measure(name, directory, runs, image_count)
      print(_table(rows), flush=True)
  text = (
      "# LiteRT export: sizes, latency, agreement\n\n"
      f"`python -m benchmarks.litert{' --quick' if _QUICK.value else ''}`, "
      f"{time.strftime('%Y-%m-%d')}, TensorFlow {tf.__version__}, "
      f"{runs} batch-1 runs per latency (median, 1 thread), {image_count} "
      "images per agreement. 'opq' is litert.convert's default (int8 codes -> "
      "DEQUANTIZE -> float ops, CSR where smaller); 'opq hybrid' uses LiteRT's "
      "dynamic-range kernels; 'opq hybrid sparse' runs only with XNNPACK off."
      "\n\n"
      + _table(rows) + "\n")
  if _OUTPUT.value:
    files.atomic_write(_OUTPUT.value, text)


if __name__ == "__main__":
  app.run(main)
