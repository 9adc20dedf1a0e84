"""Benchmark: how long `calibrate(reconstruct=True)` takes (issue 17 part 4).

    python -m benchmarks.calibration_speed                      # both models
    python -m benchmarks.calibration_speed --models=mobilenet --images=100
    KERAS_BACKEND=jax python -m benchmarks.calibration_speed --frontend=keras3 \
        --quick                                # Keras 3 on JAX, a few minutes

Targets: MobileNet-V1 0.75 (real ImageNet weights), full reconstruction with
error feedback and BatchNorm re-estimation, <= 60 s on 2 cores for 500
images; ResNet-50 measured and reported. MobileNet uses the real weights and
the first --images of the real images in ../shared/data/imagenet_mobilenet
(centre crop 224, x / 127.5 - 1); where they are absent, or for ResNet-50
(random weights: the time does not depend on their values), it uses seeded
random images of the same shape and says so. Each model is compressed with
opq defaults at (p, B) = (--pruning_rate, --bits), then calibrated once.

--frontend picks the tf_keras (tfmot) or the Keras 3 frontend (on the
backend KERAS_BACKEND names; the same .h5 weights load into Keras 3's
MobileNet). --quick is MobileNet on 100 images, written nowhere unless
--output is given: a minutes-long check of a change, not the target's
figure.

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

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
_DATA = os.path.join(_ROOT, os.pardir, "shared", "data", "imagenet_mobilenet")

_MODELS = flags.DEFINE_list("models", ["mobilenet", "resnet50"],
                            "mobilenet (MobileNet-V1 0.75) and/or resnet50.")
_IMAGES = flags.DEFINE_integer("images", 500, "Calibration images.")
_PRUNING_RATE = flags.DEFINE_float("pruning_rate", 0.5, "p of the plan.")
_BITS = flags.DEFINE_integer("bits", 8, "B of the plan.")
_FRONTEND = flags.DEFINE_enum(
    "frontend", "tf_keras", ["tf_keras", "keras3"],
    "tf_keras, or keras3 (on the backend KERAS_BACKEND names).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "MobileNet on 100 images, no results file by default.")
_OUTPUT = flags.DEFINE_string(
    "output", None,
    "Where the results table goes ('' for nowhere); default "
    "docs/calibration_speed_results.md (tf_keras) or "
    "docs/calibration_speed_keras3_results.md, nowhere with --quick.")

_QUICK_IMAGES = 100


def _keras():
  """(the frontend's keras module, a version line for the results)."""
  if _FRONTEND.value == "keras3":
    import keras  # pylint: disable=g-import-not-at-top

    return keras, (f"Keras {keras.__version__} on "
                   f"{keras.backend.backend()}")
  from opq_tf.tf_keras._keras import keras, tf  # pylint: disable=g-import-not-at-top

  return keras, f"tf_keras, TensorFlow {tf.__version__}"


def _real_images(count: int) -> np.ndarray | None:
  """The first `count` sorted real images, preprocessed for MobileNet."""
  folder = os.path.join(_DATA, "images")
  if not os.path.isdir(folder):
    return None
  names = sorted(n for n in os.listdir(folder) if n.endswith(".JPEG"))[:count]
  crops = []
  # PIL, not tf.io: no TensorFlow import on the JAX or PyTorch backend (the
  # time does not depend on the decoder's last bit).
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for name in names:
    with Image.open(os.path.join(folder, name)) as file:
      image = file.convert("RGB")
    if min(image.size) < 224:  # as benchmarks/pretrained
      image = image.resize((224, 224), Image.BILINEAR)
    left, top = (image.size[0] - 224) // 2, (image.size[1] - 224) // 2
    crop = image.crop((left, top, left + 224, top + 224))
    crops.append(np.asarray(crop, np.float32) / 127.5 - 1)
  return np.stack(crops)


def _model_and_images(keras, name: str, count: int) -> tuple:
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


def _measure(keras, name: str, count: int) -> dict:
  model, images, source = _model_and_images(keras, name, count)
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
  keras, version = _keras()
  names, count = ((["mobilenet"], _QUICK_IMAGES) if _QUICK.value
                  else (_MODELS.value, _IMAGES.value))
  output = _OUTPUT.value
  if output is None:
    output = "" if _QUICK.value else os.path.join(
        _ROOT, "docs", "calibration_speed_results.md"
        if _FRONTEND.value == "tf_keras" else
        "calibration_speed_keras3_results.md")
  rows = []
  for name in names:
    rows.append(_measure(keras, name, count))
    print(rows[-1], flush=True)
  lines = [
      "# calibrate(reconstruct=True) speed (benchmarks/calibration_speed.py)",
      "",
      f"{datetime.date.today().isoformat()}, {platform.node()}, "
      f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
      f"{version}; opq defaults at p = "
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
  if output:
    files.atomic_write(output, text)


if __name__ == "__main__":
  app.run(main)
