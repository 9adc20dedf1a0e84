"""Benchmark: how long `calibrate(reconstruct=True)` takes (issue 17 part 4).

    python -m benchmarks.calibration_speed                      # both models
    python -m benchmarks.calibration_speed --models=mobilenet --images=100

Targets: MobileNet-V1 0.75 (real ImageNet weights), full reconstruction with
error feedback and BatchNorm re-estimation, <= 60 s on 2 cores for 500
images; ResNet-50 measured and reported. MobileNet uses the real weights and
the first --images of the real images in ../shared/data/imagenet_mobilenet
(centre crop 224, x / 127.5 - 1); where they are absent, or for ResNet-50
(random weights: the time does not depend on their values), it uses seeded
random images of the same shape and says so. Each model is compressed with
opq defaults at (p, B) = (--pruning_rate, --bits), then calibrated once.

Reports wall time, CPU time (time.process_time: every thread of the process,
so that a machine shared with other jobs shows as wall > CPU / cores) and the
peak resident memory of the process, and writes them with the machine and
date to docs/calibration_speed_results.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import time

from absl import app
from absl import flags
import numpy as np

import opq_tf
from opq_tf.core import files
from opq_tf.tf_keras._keras import keras, tf

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
_DATA = os.path.join(_ROOT, os.pardir, "shared", "data", "imagenet_mobilenet")

_MODELS = flags.DEFINE_list("models", ["mobilenet", "resnet50"],
                            "mobilenet (MobileNet-V1 0.75) and/or resnet50.")
_IMAGES = flags.DEFINE_integer("images", 500, "Calibration images.")
_PRUNING_RATE = flags.DEFINE_float("pruning_rate", 0.5, "p of the plan.")
_BITS = flags.DEFINE_integer("bits", 8, "B of the plan.")
_OUTPUT = flags.DEFINE_string(
    "output", os.path.join(_ROOT, "docs", "calibration_speed_results.md"),
    "Where the results table goes ('' for nowhere).")


def _real_images(count: int) -> np.ndarray | None:
  """The first `count` sorted real images, preprocessed for MobileNet."""
  folder = os.path.join(_DATA, "images")
  if not os.path.isdir(folder):
    return None
  names = sorted(n for n in os.listdir(folder) if n.endswith(".JPEG"))[:count]
  crops = []
  for name in names:
    image = tf.io.decode_jpeg(tf.io.read_file(os.path.join(folder, name)), 3)
    if min(image.shape[0], image.shape[1]) < 224:  # as benchmarks/pretrained
      image = tf.image.resize(image, (224, 224))
    top, left = (image.shape[0] - 224) // 2, (image.shape[1] - 224) // 2
    crops.append(tf.cast(image[top:top + 224, left:left + 224], tf.float32)
                 .numpy() / 127.5 - 1)
  return np.stack(crops)


def _model_and_images(name: str, count: int) -> tuple[keras.Model, np.ndarray,
                                                     str]:
  """(FP32 model, calibration images, what they are)."""
  keras.utils.set_random_seed(0)
  random_images = lambda: np.random.RandomState(0).uniform(
      -1, 1, (count, 224, 224, 3)).astype(np.float32)
  if name == "mobilenet":
    model = keras.applications.MobileNet(alpha=0.75, weights=None,
                                         input_shape=(224, 224, 3))
    weights = os.path.join(_DATA, "mobilenet_v1_0.75_224_imagenet.h5")
    images = _real_images(count)
    if images is not None and os.path.exists(weights):
      model.load_weights(weights)
      return model, images, "real weights, real images"
    return model, random_images(), "random weights, random images (no data)"
  if name == "resnet50":
    model = keras.applications.ResNet50(weights=None)
    return model, random_images(), "random weights, random images"
  raise app.UsageError(f"--models: unknown model {name!r}; use mobilenet "
                       "and/or resnet50.")


def _measure(name: str) -> dict:
  model, images, source = _model_and_images(name, _IMAGES.value)
  plan = opq_tf.allocate(model, pruning_rate=_PRUNING_RATE.value,
                         bits=_BITS.value)
  qmodel = opq_tf.apply(model, plan)
  wall, cpu = time.perf_counter(), time.process_time()
  report = opq_tf.calibrate(qmodel, images, reconstruct=True)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  reconstructed = sum(row.method == "reconstructed"
                      for row in report.kernels.values())
  return {"model": name, "source": source, "images": len(images),
          "kernels": len(report.kernels), "reconstructed": reconstructed,
          "wall_s": wall, "cpu_s": cpu,
          "peak_rss_gib": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv):
  del argv
  rows = []
  for name in _MODELS.value:
    rows.append(_measure(name))
    print(rows[-1], flush=True)
  lines = [
      "# calibrate(reconstruct=True) speed (benchmarks/calibration_speed.py)",
      "",
      f"{datetime.date.today().isoformat()}, {platform.node()}, "
      f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
      f"TensorFlow {tf.__version__}; opq defaults at p = "
      f"{_PRUNING_RATE.value}, B = {_BITS.value}, BatchNorm re-estimation and "
      "reconstruction with error feedback. CPU time is time.process_time "
      "(all threads); peak memory is the process's maximum resident set "
      "after that model (cumulative over the rows).",
      "",
      "| model | data | images | kernels (reconstructed) | wall (s) | "
      "CPU (s) | peak RSS (GiB) |",
      "|---|---|---|---|---|---|---|",
  ]
  lines += [f"| {r['model']} | {r['source']} | {r['images']} | {r['kernels']} "
            f"({r['reconstructed']}) | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss_gib']:.1f} |" for r in rows]
  text = "\n".join(lines) + "\n"
  print(text)
  if _OUTPUT.value:
    files.atomic_write(_OUTPUT.value, text)


if __name__ == "__main__":
  app.run(main)
