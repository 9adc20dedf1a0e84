"""Benchmark: OPQ's .tflite (int8 and int4 codes) against FP32, dynamic-range
int8 and tfmot PQAT.

Usage: python -m benchmarks.litert [--quick] [--models=...] [--output=...]

Per model (tf_keras.applications at 224x224, weights=None, the configs' p and
B; the real ImageNet MobileNet-V1 0.75 of ../shared/data/imagenet_mobilenet
when present; a transformer block, MultiHeadAttention + a Dense feed-forward,
p = 0.5, B = 4): the size of each .tflite (plain and gzipped) and of the
packed file, CPU latency in the LiteRT interpreter (median of batch-1 runs)
with XNNPACK on and off, on 1 and 2 threads, and agreement of each .tflite
with its Keras model (top-1 agreement, max |logit difference|). Images: the
real ImageNet ones for the ImageNet model, uniform noise in [-1, 1] (already
preprocessed) otherwise (agreement there is about rounding, not accuracy).

--quick also narrows ResNet-50 (the slowest to convert and run on a small
machine) to FP32, OPQ int8 (CSR where smaller, and dense) and OPQ int4
(`_QUICK_ONLY`).

Targets (not tests): OPQ int4 file <= 0.55x the OPQ int8 file (B = 4), OPQ
.tflite >= 3.5x smaller than FP32's and smaller than tfmot's, top-1
agreement >= 99.5%; latency reported as measured. Misses are reported as
measured.
"""

import collections
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

_QUICK = flags.DEFINE_bool("quick", False, "Fewer runs and images.")
_MODELS = flags.DEFINE_list(
    "models", ["transformer_block", "transformer_block_keras3",
               "imagenet_mobilenet_0.75", "mobilenet_v1", "resnet50"],
    "Models to measure.")
_OUTPUT = flags.DEFINE_string("output", "docs/litert_results.md",
                              "Markdown results file ('' to only print).")
_IMAGENET_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                             "data", "imagenet_mobilenet")
# (XNNPACK, threads) per latency column.
_LATENCY_SETTINGS = ((True, 1), (True, 2), (False, 1), (False, 2))
# A latency's runs stop here once 5 are done: ResNet-50's unpacking int4
# builtin kernels take seconds a run, and 50 of them per column would make
# the full mode hours long on 2 cores.
_LATENCY_SECONDS = 20
# label -> litert.convert options; "opq int8" is its default (CSR where smaller).
_OPQ_VARIANTS = {
    "opq int8": {},
    "opq int8 dense": {"sparse": False},
    "opq int8 hybrid": {"compute": "hybrid"},
    "opq int4": {"weights": "int4"},
    "opq int4 hybrid": {"compute": "hybrid", "weights": "int4"},
    "opq auto": {"weights": "auto"},
    "opq auto hybrid": {"compute": "hybrid", "weights": "auto"},
}
# Noise images per agreement for the models without real images: their
# agreement measures rounding only, and 500 ResNet-50 runs per artefact would
# take most of the full mode.
_NOISE_IMAGES = 100
# model -> the only artefacts --quick measures for it (FP32 is the size
# reference of every row).
_QUICK_ONLY = {"resnet50": ("fp32", "opq int8", "opq int8 dense", "opq int4")}


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


def _transformer_block(k=keras, tokens: int = 64, width: int = 256,
                       heads: int = 4, hidden: int = 1024, classes: int = 10):
  """One pre-LN encoder block + mean pooling + a classifier, logits out, in
  Keras `k` (tf_keras or Keras 3).

  tf_keras's frontend compresses its Dense layers (feed-forward and
  classifier, 0.53 M of the 0.79 M kernel weights) and keeps
  MultiHeadAttention's EinsumDense projections FP32; Keras 3's compresses
  those too.
  """
  inputs = k.Input((tokens, width), name="tokens")
  x = k.layers.LayerNormalization(name="ln_attention")(inputs)
  x = k.layers.MultiHeadAttention(heads, width // heads, name="mha")(x, x)
  x = k.layers.Add(name="residual_attention")([inputs, x])
  y = k.layers.LayerNormalization(name="ln_ffn")(x)
  y = k.layers.Dense(hidden, activation="relu", name="ffn_in")(y)
  y = k.layers.Dense(width, name="ffn_out")(y)
  x = k.layers.Add(name="residual_ffn")([x, y])
  x = k.layers.GlobalAveragePooling1D(name="pool")(x)
  return k.Model(inputs, k.layers.Dense(classes, name="logits")(x),
                 name="transformer_block")


def _keras3_transformer_block():
  import keras as keras3  # pylint: disable=g-import-not-at-top

  keras3.utils.set_random_seed(0)
  return _transformer_block(keras3)


def _keras3_tflite(model, directory: str, optimizations=()) -> bytes:
  """Keras 3's own LiteRT conversion (what opq_tf.export starts from)."""
  path = os.path.join(directory, "keras3_baseline.tflite")
  model.export(path, format="litert", verbose=False,
               optimizations=list(optimizations))
  with open(path, "rb") as f:
    content = f.read()
  os.remove(path)
  return content


# name -> (builder, pruning rate, bits), as in configs/<model>.py. Logits out
# (no softmax), so the differences below are logit differences. Keras 3
# models (the builder's name says so) are exported by opq_tf.export, float
# compute only, and have no tfmot baseline (tfmot is Keras 2 only).
_SETTINGS = {
    "mobilenet_v1": (lambda: keras.applications.MobileNet(
        weights=None, classifier_activation=None), 0.656, 4),
    "resnet50": (lambda: keras.applications.ResNet50(
        weights=None, classifier_activation=None), 0.79, 4),
    "imagenet_mobilenet_0.75": (None, 0.656, 4),
    "transformer_block": (_transformer_block, 0.5, 4),
    "transformer_block_keras3": (_keras3_transformer_block, 0.5, 4),
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


def _latency_ms(path: str, runs: int, xnnpack: bool, threads: int) -> float:
  runner = litert.interpreter(path, num_threads=threads, xnnpack=xnnpack)
  runner.allocate_tensors()
  detail = runner.get_input_details()[0]
  image = np.random.default_rng(0).uniform(
      0, 1, detail["shape"]).astype(detail["dtype"])
  runner.set_tensor(detail["index"], image)
  runner.invoke()  # Warm-up (DENSIFY/dequantize-once, delegate set-up).
  times = []
  deadline = time.perf_counter() + _LATENCY_SECONDS
  while len(times) < runs and (len(times) < 5 or time.perf_counter() < deadline):
    start = time.perf_counter()
    runner.invoke()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def _gzip_bytes(path: str) -> int:
  with open(path, "rb") as f:
    return len(gzip.compress(f.read(), 9))


def _storage_note(info: dict) -> str:
  """What the OPQ writer stored: counts per type, and per reason how many
  kernels are wider than asked."""
  parts = [f"{info['kernels_int2']} int2 / {info['kernels_int4']} int4 / "
           f"{info['kernels_int8']} int8 kernels ({info['kernels_sparse']} CSR)"]
  wider = collections.Counter(  # By reason, its figures in brackets cut.
      (fact["dtype"], fact["why"].split(" (")[0])
      for fact in info["stored"].values() if not fact["why"].startswith("B = "))
  parts += [f"{dtype}: {count} ({why})"
            for (dtype, why), count in sorted(wider.items())]
  auto = info.get("auto")
  if auto:
    parts.append("auto: " + ", ".join(
        f"{op} {choice['chose']} ({choice['narrow_ms']:.2f} vs "
        f"{auto['all_int8_ms']:.2f} ms)"
        for op, choice in auto.items() if isinstance(choice, dict)))
  return "; ".join(parts)


def _measure(name: str, directory: str, runs: int, image_count: int):
  """(rows, notes) for one model."""
  build, pruning_rate, bits = _SETTINGS[name]
  if build is None:
    loaded = _imagenet_mobilenet()
    if loaded is None:
      print(f"{name}: {_IMAGENET_DIR} absent, skipped.")
      return [], []
    model, images = loaded
  else:
    keras.utils.set_random_seed(0)
    model = build()
    image_count = min(image_count, _NOISE_IMAGES)
    images = np.random.default_rng(0).uniform(
        -1, 1, (image_count, *model.input_shape[1:]))
  images = images[:image_count].astype(np.float32)
  keras.utils.set_random_seed(0)
  qmodel = opq_tf.apply(model, pruning_rate=pruning_rate, bits=bits)
  stripped = opq_tf.strip(qmodel)
  paths, references, notes = {}, {}, []
  only = _QUICK_ONLY.get(name) if _QUICK.value else None

  def wanted(label: str) -> bool:
    return only is None or label in only

  def write(label, content, reference):
    path = os.path.join(directory, f"{name}_{label.replace(' ', '_')}.tflite")
    files.atomic_write(path, content)
    paths[label], references[label] = path, reference

  if name.endswith("_keras3"):
    write("fp32", _keras3_tflite(model, directory), model)
    write("dynamic-range int8", _keras3_tflite(
        model, directory, [tf.lite.Optimize.DEFAULT]), model)
    for label, options in _OPQ_VARIANTS.items():
      if set(options) - {"weights"} or not wanted(label):
        continue  # The Keras 3 export: float compute, CSR where smaller.
      report = opq_tf.export(
          qmodel, os.path.join(directory, f"{name}_{label.replace(' ', '_')}"),
          formats=("packed",), litert=True,
          litert_weights=options.get("weights", "int8"))
      paths[label] = os.path.join(
          directory, f"{name}_{label.replace(' ', '_')}", "model.tflite")
      references[label] = stripped
      notes.append(f"{name}, {label}: {_storage_note(report['litert'])}")
  else:
    write("fp32", litert.float_tflite(model), model)
    if wanted("dynamic-range int8"):
      write("dynamic-range int8", litert.float_tflite(
          model, optimizations=[tf.lite.Optimize.DEFAULT]), model)
    try:
      if wanted("tfmot prune+PQAT"):
        pqat = _tfmot_pqat(model, pruning_rate)
        write("tfmot prune+PQAT", litert.float_tflite(
            pqat, optimizations=[tf.lite.Optimize.DEFAULT]), pqat)
    except Exception as error:  # Reported, not fatal: a baseline failed.
      notes.append(f"{name}: tfmot prune+PQAT failed: "
                   f"{str(error).strip().splitlines()[-1][:160]}")
      print(notes[-1], flush=True)
    for label, options in _OPQ_VARIANTS.items():
      if not wanted(label):
        continue
      paths[label] = os.path.join(directory,
                                  f"{name}_{label.replace(' ', '_')}.tflite")
      references[label] = stripped
      info = litert.convert(qmodel, paths[label], **options)
      notes.append(f"{name}, {label}: {_storage_note(info)}")
    report = opq_tf.export(qmodel, os.path.join(directory, f"{name}_export"),
                           formats=("packed",))

  sizes = {label: os.path.getsize(path) for label, path in paths.items()}
  rows = []
  for label, path in paths.items():
    latency = [_latency_ms(path, runs, xnnpack, threads)
               for xnnpack, threads in _LATENCY_SETTINGS]
    agreement = litert.compare(path, references[label], images)
    rows.append([name, label, sizes[label], _gzip_bytes(path),
                 sizes["fp32"] / sizes[label],
                 sizes[label] / sizes["opq int8"], *latency,
                 agreement["top1_agreement"],
                 agreement["max_abs_logit_difference"]])
    print(f"{name} {label}: {rows[-1][2:]}", flush=True)
  packed = report["packed_bytes"]
  rows.append([name, "packed model.opq", packed, None, sizes["fp32"] / packed,
               packed / sizes["opq int8"], None, None, None, None, None, None])
  return rows, notes


def _format(value, spec):
  return "-" if value is None else format(value, spec)


def _table(rows) -> str:
  lines = [
      "| model | artefact | bytes | gzip bytes | FP32 / bytes | / opq int8 "
      "bytes | ms XNNPACK 1t | ms XNNPACK 2t | ms builtin 1t | ms builtin 2t "
      "| top-1 agreement | max abs logit diff |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for (name, label, size, gz, ratio, to_int8, *latency, agreement,
       difference) in rows:
    lines.append(
        f"| {name} | {label} | {size:,} | {_format(gz, ',')} | {ratio:.2f}x | "
        f"{to_int8:.2f}x | "
        + " | ".join(_format(ms, ".1f") for ms in latency)
        + f" | {_format(agreement, '.3f')} | {_format(difference, '.3g')} |")
  return "\n".join(lines)


def _document(rows, notes, runs: int, image_count: int, minutes: float) -> str:
  from ai_edge_litert import __version__ as litert_version  # pylint: disable=g-import-not-at-top

  return (
      "# LiteRT export: sizes, latency, agreement\n\n"
      f"`python -m benchmarks.litert{' --quick' if _QUICK.value else ''}` "
      f"(--models={','.join(_MODELS.value)}), {time.strftime('%Y-%m-%d')}, "
      f"TensorFlow {tf.__version__}, ai-edge-litert {litert_version}, "
      f"{os.cpu_count()} CPU cores (shared with other jobs: latencies are "
      f"noisy; compare within one model), {minutes:.0f} min. {runs} batch-1 "
      f"runs per latency (median; fewer, at least 5, where they pass "
      f"{_LATENCY_SECONDS} s), {image_count} real images per agreement for "
      f"the real model, {min(image_count, _NOISE_IMAGES)} noise images for "
      "the others.\n\n"
      "Artefacts: `fp32` TFLiteConverter of the FP32 model; `dynamic-range "
      "int8` the same with Optimize.DEFAULT; `tfmot prune+PQAT` tfmot's "
      "prune_low_magnitude (constant sparsity p, one step) + "
      "Default8BitPrunePreserveQuantizeScheme, never trained or calibrated, "
      "converted with Optimize.DEFAULT; `opq int8` litert.convert's default "
      "(int8 codes -> DEQUANTIZE -> float ops, CSR + DENSIFY where smaller); "
      "`opq int8 dense` the same without CSR; `opq int4` the same codes as "
      "int4 (dense, two a byte; int8 CSR for a kernel where that is smaller); "
      "`hybrid` LiteRT's dynamic-range kernels on the same codes (a depthwise "
      "kernel stays int8 there: LiteRT has no hybrid int4 depthwise kernel); "
      "`opq auto` the int2 / int4 storage per op type where the interpreter "
      "measured it no slower (XNNPACK, 1 thread; under float or hybrid "
      "compute); `packed "
      "model.opq` opq_tf.export's entropy-coded file. Latency columns: "
      "XNNPACK on / off (builtin kernels), 1 / 2 threads. Agreement is each "
      ".tflite against its own Keras model (OPQ: opq_tf.strip(qmodel)).\n\n"
      + _table(rows) + "\n\n## What the writer stored\n\n"
      + "\n".join(f"- {note}" for note in notes) + "\n")


def main(argv):
  del argv
  runs, image_count = (10, 50) if _QUICK.value else (50, 500)
  rows, notes = [], []
  started = time.time()
  with tempfile.TemporaryDirectory() as directory:
    for name in _MODELS.value:
      model_rows, model_notes = _measure(name, directory, runs, image_count)
      rows += model_rows
      notes += model_notes
      print(_table(rows), "\n".join(model_notes), sep="\n", flush=True)
      if _OUTPUT.value:  # After each model: a long run keeps what it measured.
        files.atomic_write(_OUTPUT.value, _document(
            rows, notes, runs, image_count, (time.time() - started) / 60))


if __name__ == "__main__":
  app.run(main)
