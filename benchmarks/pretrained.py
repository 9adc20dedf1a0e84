"""One-shot compression of a real pre-trained model, before any finetuning.

    python -m benchmarks.pretrained                      # MobileNet-V1 0.75, ~3 h
    python -m benchmarks.pretrained --quick              # two rows, ~5 min
    KERAS_BACKEND=jax python -m benchmarks.pretrained --frontend=keras3 --quick

Takes any tf_keras model with weights (a full saved model, or a
`tf_keras.applications` constructor with its options and a weights file) and a
folder of labelled images `<wnid>.JPEG` (label = position of the wnid among the
sorted wnids of the folder's 1,000 classes, the Keras/TFDS order). Default:
../shared/data/imagenet_mobilenet (real ImageNet MobileNet-V1 0.75 weights and
1,000 real images); where it is absent the benchmark says so and exits 0.
`--frontend=keras3` loads the same weights file into Keras 3's
`keras.applications.MobileNet` (on the backend KERAS_BACKEND names) and runs
the same rows through the Keras 3 frontend; every row records its frontend
and backend and the seconds of each step (allocate, apply, strip, calibrate,
evaluate), so the frontends' figures and times compare row by row.

Fixed split of the sorted files: the first half calibrates, the second half
evaluates. For each (p, B), method, step granularity and calibration (none,
batchnorm, batchnorm + reconstruct) it records top-1 / top-5 on the evaluation
half, realised sparsity, weight-bits ratio (32 bits per stored step), and the
allocation and calibration times. Methods:

- opq/per_kernel, opq/total: `opq_tf.allocate(method="opq", objective=...)`,
  with the default steps (the Laplace optimum refined on the weights);
  opq/per_kernel+laplace_steps keeps the Laplace model's steps as they are;
- uniform, global_magnitude: the same per-layer / global magnitude pruning
  with OPQ's steps;
- tfmot: per-layer magnitude pruning (tfmot's ConstantSparsity masks every
  layer at p) with tfmot's own weight quantizer, `LastValueQuantizer`
  (symmetric, narrow range: step = max|w| / K per tensor, or per output
  channel with per_axis), applied through opq_tf so that calibration treats
  it exactly like the others. The steps are checked against the tfmot
  quantizer's output on every kernel.

Everything runs through the product: allocate -> apply -> strip -> calibrate
-> evaluate. Results go to docs/pretrained_results.{json,md} and a plot to
docs/pretrained.png; the analysis is in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

import opq_tf
from opq_tf.core import files
from opq_tf.core import grid
from opq_tf.tf_keras import layers
from opq_tf.tf_keras._keras import keras, tf, tfmot

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
_DEFAULT_DATA = os.path.join(_ROOT, os.pardir, "shared", "data",
                             "imagenet_mobilenet")

_DATA = flags.DEFINE_string("data", _DEFAULT_DATA, "Folder with <wnid>.JPEG "
                            "images (and, by default, the weights).")
_MODEL = flags.DEFINE_string(
    "model", "", "A full saved tf_keras model (SavedModel dir, .keras, .h5); "
    "overrides --application/--weights.")
_APPLICATION = flags.DEFINE_string("application", "MobileNet",
                                   "A tf_keras.applications constructor.")
_APPLICATION_KWARGS = flags.DEFINE_string(
    "application_kwargs", '{"alpha": 0.75, "input_shape": [224, 224, 3]}',
    "JSON options of the constructor (weights=None is added).")
_WEIGHTS = flags.DEFINE_string("weights", "mobilenet_v1_0.75_224_imagenet.h5",
                               "Weights file (relative to --data).")
_PREPROCESS = flags.DEFINE_string(
    "preprocess", "mobilenet", "tf_keras.applications.<module>.preprocess_input "
    "applied to the 0..255 centre crop.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Centre crop size.")
_QUICK = flags.DEFINE_bool("quick", False, "Two rows only, to check it runs.")
_FRONTEND = flags.DEFINE_enum(
    "frontend", "tf_keras", ["tf_keras", "keras3"],
    "tf_keras, or keras3: the same weights in Keras 3's application, on the "
    "backend KERAS_BACKEND names (the tfmot rows need tf_keras).")
_SETTINGS = flags.DEFINE_string("settings", "0.5:8,0.656:4,0.8:4",
                                "p:B pairs.")
_RECONSTRUCT = flags.DEFINE_string(
    "reconstruct", "all", "Rows (method/granularity, comma-separated) that "
    "also get batchnorm+reconstruct, or 'all'; reconstruction costs 3-5 "
    "minutes per row on 2 cores.")
_ROUNDING = flags.DEFINE_enum(
    "rounding", "error_feedback", ["nearest", "error_feedback", "learned"],
    "calibrate(rounding=...) for the batchnorm+reconstruct rows; recorded in "
    "every row.")
_RESUME = flags.DEFINE_bool("resume", False, "Keep the rows already in the "
                            "results JSON and run only the missing ones.")
_OUT = flags.DEFINE_string("out", os.path.join(_ROOT, "docs"),
                           "Where the results files go.")

METHODS = ("opq/per_kernel", "opq/per_kernel+laplace_steps", "opq/total",
           "uniform", "global_magnitude", "tfmot")
GRANULARITIES = ("channel", "kernel")
CALIBRATIONS = ("none", "batchnorm", "batchnorm+reconstruct")
_EVAL_BATCH = 50


@dataclasses.dataclass
class Images:
  calibration: np.ndarray
  evaluation: np.ndarray
  evaluation_labels: np.ndarray


def load_images(folder: str, image_size: int, preprocess: str) -> Images:
  """Decodes, centre-crops and preprocesses every image; splits in halves."""
  names = sorted(n for n in os.listdir(folder) if n.endswith(".JPEG"))
  if not names:
    raise ValueError(f"No <wnid>.JPEG images in {folder!r}.")
  wnids = sorted(n[:-len(".JPEG")] for n in names)
  label_of = {wnid: i for i, wnid in enumerate(wnids)}
  module = getattr(keras.applications, preprocess)

  def load(name: str) -> np.ndarray:
    image = tf.io.decode_jpeg(tf.io.read_file(os.path.join(folder, name)),
                              channels=3)
    height, width = image.shape[0], image.shape[1]
    top, left = (height - image_size) // 2, (width - image_size) // 2
    if min(height, width) < image_size:
      image = tf.image.resize(image, (image_size, image_size))
    else:
      image = image[top:top + image_size, left:left + image_size]
    return module.preprocess_input(tf.cast(image, tf.float32)).numpy()

  pixels = np.stack([load(name) for name in names])
  labels = np.array([label_of[n[:-len(".JPEG")]] for n in names])
  half = len(names) // 2
  return Images(pixels[:half], pixels[half:], labels[half:])


def _keras():
  """The Keras the chosen frontend builds with (tf_keras, or Keras 3)."""
  if _FRONTEND.value == "keras3":
    import keras as keras3  # pylint: disable=g-import-not-at-top
    return keras3
  return keras


def backend() -> str:
  """"tensorflow" for tf_keras; Keras 3's backend for keras3."""
  return _keras().backend.backend() if _FRONTEND.value == "keras3" else (
      "tensorflow")


def compressed_kernels(qmodel) -> list:
  """The wrapped model's kernels, which calibrating its stripped copy needs."""
  if _FRONTEND.value == "keras3":
    from opq_tf.keras3 import wrapping  # pylint: disable=g-import-not-at-top
  else:
    from opq_tf.tf_keras import wrapping  # pylint: disable=g-import-not-at-top
  return wrapping.compressed_kernels(qmodel)


def load_model():
  k = _keras()
  if _MODEL.value:
    return k.models.load_model(_MODEL.value, compile=False)
  constructor = getattr(k.applications, _APPLICATION.value)
  model = constructor(weights=None, **json.loads(_APPLICATION_KWARGS.value))
  model.load_weights(os.path.join(_DATA.value, _WEIGHTS.value))
  return model


def accuracy(model, images: Images) -> tuple[float, float]:
  """(top-1, top-5) on the evaluation half."""
  logits = model.predict(images.evaluation, batch_size=_EVAL_BATCH, verbose=0)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  labels = images.evaluation_labels
  return (float(np.mean(top5[:, 0] == labels)),
          float(np.mean(np.any(top5 == labels[:, None], axis=1))))


def tfmot_plan(model: keras.Model, pruning_rate: float, bits: int,
               granularity: str) -> opq_tf.CompressionPlan:
  """Per-layer magnitude masks and tfmot LastValueQuantizer steps, as a plan.

  tfmot's ConstantSparsity prunes the smallest p of every layer (method
  "uniform" does exactly that). tfmot's 8-bit-style weight quantizer is
  symmetric with a narrow range: codes in [-K, K], scale max|w| / K over
  the tensor or, per_axis, over each output channel; the plan's steps are set
  to that and checked against the quantizer itself.
  """
  if _FRONTEND.value != "tf_keras":
    raise ValueError("The tfmot rows need --frontend=tf_keras.")
  plan = opq_tf.allocate(model, pruning_rate, bits, method="uniform",
                         step_granularity=granularity)
  kernels = layers.compressible_kernels(model)
  replaced = []
  for entry in plan.kernels:
    values = kernels[entry.key].values
    mask = np.abs(values) >= entry.threshold
    kept = np.where(mask, values, 0.0)
    axes = entry.channel_axes if granularity == "channel" else ()
    reduce_axes = tuple(range(values.ndim - len(axes)))
    maximum = np.max(np.abs(kept), axis=reduce_axes)
    maximum = np.where(maximum > 0, maximum, np.max(np.abs(values)))
    step = (maximum / grid.max_code(bits)).astype(np.float32)
    _check_against_tfmot(kept, step, bits, granularity == "channel", axes)
    step = (tuple(float(s) for s in step.ravel()) if granularity == "channel"
            else float(step))
    replaced.append(dataclasses.replace(entry, step=step))
  return dataclasses.replace(plan, method="tfmot", kernels=replaced)


def _check_against_tfmot(kept: np.ndarray, step: np.ndarray, bits: int,
                         per_axis: bool, axes: Sequence[int]) -> None:
  """Asserts our grid equals tfmot's LastValueQuantizer on this kernel."""
  if per_axis and len(axes) != 1:
    return  # tfmot quantizes depthwise kernels per the last axis only.
  quantizer = tfmot.quantization.keras.quantizers.LastValueQuantizer(
      num_bits=bits, per_axis=per_axis, symmetric=True, narrow_range=True)
  layer = keras.layers.Layer()
  weights = quantizer.build(kept.shape, "bench", layer)
  theirs = quantizer(tf.constant(kept), training=True, weights=weights).numpy()
  ours = grid.compress(kept, step, bits, np.ones(kept.shape, bool))
  # fake_quant computes in float32 with a nudged range, so a value on a
  # rounding boundary may land one level away; anything more is a real
  # disagreement.
  difference = np.abs(theirs - ours)
  off = difference > 1e-6 * float(np.abs(kept).max())
  if off.mean() > 1e-3 or np.any(difference > 1.01 * np.broadcast_to(
      step, kept.shape) + 1e-12):
    raise AssertionError("tfmot's LastValueQuantizer disagrees with the "
                         "baseline's steps")


def plan_for(model, method: str, pruning_rate: float, bits: int,
             granularity: str) -> opq_tf.CompressionPlan:
  if method == "tfmot":
    return tfmot_plan(model, pruning_rate, bits, granularity)
  method, _, step_fit = method.partition("+")
  name, _, objective = method.partition("/")
  return opq_tf.allocate(model, pruning_rate, bits, method=name,
                         objective=objective or "per_kernel",
                         step_granularity=granularity,
                         step_fit="laplace" if step_fit else "weights")


def run_row(model, images: Images, method: str, pruning_rate: float,
            bits: int, granularity: str,
            calibrations: Sequence[str]) -> list[dict[str, Any]]:
  """All calibrations of one (p, B, method, granularity): one dict each."""
  start = time.perf_counter()
  plan = plan_for(model, method, pruning_rate, bits, granularity)
  allocation_seconds = time.perf_counter() - start
  start = time.perf_counter()
  qmodel = opq_tf.apply(model, plan)
  apply_seconds = time.perf_counter() - start
  base = {
      "frontend": _FRONTEND.value, "backend": backend(),
      "pruning_rate": pruning_rate, "bits": bits, "method": method,
      "granularity": granularity,
      "realised_sparsity": plan.realised_pruning_rate,
      "weight_bits_ratio": plan.weight_bits_ratio,
      "allocation_seconds": allocation_seconds,
      "apply_seconds": apply_seconds,
  }
  rows = []
  for calibration in calibrations:
    start = time.perf_counter()
    stripped = opq_tf.strip(qmodel)
    strip_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if calibration != "none":
      # Passed only when not the default, for a frontend without it.
      rounding = ({} if _ROUNDING.value == "error_feedback"
                  else {"rounding": _ROUNDING.value})
      opq_tf.calibrate(stripped, images.calibration, batchnorm=True,
                       reconstruct=calibration.endswith("reconstruct"),
                       kernels=compressed_kernels(qmodel), **rounding)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    top1, top5 = accuracy(stripped, images)
    rows.append({**base, "calibration": calibration,
                 "rounding": _ROUNDING.value, "top1": top1,
                 "top5": top5, "strip_seconds": strip_seconds,
                 "calibration_seconds": seconds,
                 "evaluation_seconds": time.perf_counter() - start})
    logging.info("%s", json.dumps(rows[-1]))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _row_order(row: dict) -> tuple:
  return (row["pruning_rate"], row["bits"], METHODS.index(row["method"]),
          GRANULARITIES.index(row["granularity"]),
          CALIBRATIONS.index(row["calibration"]))


def markdown(fp32: tuple[float, float], rows: list[dict], context: dict) -> str:
  lines = [
      "# One-shot compression of a real pre-trained model (no finetuning)",
      "",
      f"Written by `python -m benchmarks.pretrained` on {context['date']}, "
      f"{context['machine']}; model {context['model']} "
      f"({context.get('frontend', 'tf_keras')} frontend, "
      f"{context.get('backend', 'tensorflow')} backend), "
      f"{context['evaluation_images']} evaluation and "
      f"{context['calibration_images']} calibration images. FP32: top-1 "
      f"{fp32[0]:.1%}, top-5 {fp32[1]:.1%}. Analysis: docs/benchmarks.md.",
      "",
      "| p | B | method | steps | calibration | top-1 | top-5 | sparsity "
      "| weight-bits ratio | alloc s | calib s |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['pruning_rate']} | {r['bits']} | {r['method']} | "
        f"{r['granularity']} | {r['calibration']} | {r['top1']:.1%} | "
        f"{r['top5']:.1%} | {r['realised_sparsity']:.3f} | "
        f"{r['weight_bits_ratio']:.2f}x | {r['allocation_seconds']:.2f} | "
        f"{r['calibration_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(fp32: tuple[float, float], rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  settings = sorted({(r["pruning_rate"], r["bits"]) for r in rows})
  figure, axes = pyplot.subplots(1, len(settings), figsize=(5 * len(settings), 4),
                                 squeeze=False)
  for axis, (p, b) in zip(axes[0], settings):
    chosen = [r for r in rows if (r["pruning_rate"], r["bits"]) == (p, b)]
    labels = sorted({(r["method"], r["granularity"]) for r in chosen})
    for offset, calibration in enumerate(CALIBRATIONS):
      values = [next((r["top1"] for r in chosen if r["calibration"] == calibration
                      and (r["method"], r["granularity"]) == label), np.nan)
                for label in labels]
      axis.bar(np.arange(len(labels)) + 0.27 * (offset - 1), values, 0.27,
               label=calibration)
    axis.axhline(fp32[0], color="black", linestyle="--", label="FP32")
    axis.set_xticks(np.arange(len(labels)),
                    [f"{m}\n{g}" for m, g in labels], rotation=90, fontsize=7)
    axis.set_title(f"p = {p}, B = {b}")
    axis.set_ylabel("top-1 (no finetuning)")
  axes[0][0].legend(fontsize=7)
  figure.tight_layout()
  with files.atomic_path(path) as temp:
    figure.savefig(temp, dpi=100, format="png")


def main(argv: Sequence[str]) -> None:
  del argv
  folder = os.path.join(_DATA.value, "images")
  if not _MODEL.value and not os.path.isdir(folder):
    print(f"benchmarks.pretrained: {_DATA.value!r} is absent; nothing to "
          "measure (it needs the shared ImageNet MobileNet data, or --model "
          "and --data).")
    return
  images = load_images(folder if os.path.isdir(folder) else _DATA.value,
                       _IMAGE_SIZE.value, _PREPROCESS.value)
  model = load_model()
  fp32 = accuracy(model, images)
  print(f"FP32 top-1 {fp32[0]:.1%} top-5 {fp32[1]:.1%}", flush=True)
  settings = [(float(p), int(b)) for p, b in
              (item.split(":") for item in _SETTINGS.value.split(","))]
  jobs = [(p, b, method, granularity)
          for p, b in settings for method in METHODS
          for granularity in GRANULARITIES]
  if _QUICK.value:
    jobs = [(0.5, 8, "opq/per_kernel", "channel"), (0.5, 8, "uniform", "kernel")]
  if _FRONTEND.value != "tf_keras":
    jobs = [job for job in jobs if job[2] != "tfmot"]
  rows = []
  suffix = "" if _FRONTEND.value == "tf_keras" else f"_keras3_{backend()}"
  results_path = os.path.join(
      _OUT.value, f"pretrained_quick{suffix}.json" if _QUICK.value
      else f"pretrained_results{suffix}.json")
  context = {
      "date": time.strftime("%Y-%m-%d"),
      "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores",
      "model": _MODEL.value or f"{_APPLICATION.value}({_APPLICATION_KWARGS.value})",
      "frontend": _FRONTEND.value,
      "backend": backend(),
      "calibration_images": len(images.calibration),
      "evaluation_images": len(images.evaluation),
  }
  if _RESUME.value and os.path.exists(results_path):
    rows = files.read_json(results_path)["rows"]
  done = {(r["pruning_rate"], r["bits"], r["method"], r["granularity"],
           r["calibration"]) for r in rows
          if r.get("rounding", "error_feedback") == _ROUNDING.value}
  chosen = set(_RECONSTRUCT.value.split(","))
  for p, b, method, granularity in jobs:
    calibrations = [c for c in CALIBRATIONS
                    if (p, b, method, granularity, c) not in done and (
                        not c.endswith("reconstruct") or "all" in chosen
                        or f"{method}/{granularity}" in chosen)]
    if not calibrations:
      continue
    rows += run_row(model, images, method, p, b, granularity, calibrations)
    rows.sort(key=_row_order)
    files.write_json(results_path, {"fp32": fp32, "context": context,
                                    "rows": rows})
  if not _QUICK.value:
    files.atomic_write(os.path.join(_OUT.value, f"pretrained_results{suffix}.md"),
                       markdown(fp32, rows, context))
    plot(fp32, rows, os.path.join(_OUT.value, f"pretrained{suffix}.png"))
  print(markdown(fp32, rows, context))


if __name__ == "__main__":
  app.run(main)
