"""Both frontends on the real MobileNet-V1 0.75 weights: plans, codes, files.

Evidence, not a test (it needs ../shared/data, which tests must not):

    python tests/keras3_mobilenet_compare.py [--images 500] [--calibration 200]

(--calibration 0 compares plans, codes and files only.)

Loads ../shared/data/imagenet_mobilenet/mobilenet_v1_0.75_224_imagenet.h5 into
`keras.applications.MobileNet(alpha=0.75, weights=None)` (Keras 3, on the
backend KERAS_BACKEND names) and into tf_keras' MobileNet, checks that every
weight agrees by key, then for each (pruning rate, bits): the two plans'
JSON, the codes of the applied models and the packed files' bytes, and
top-1 on the real images with the compressed kernels as they are, after
BatchNorm re-estimation and after reconstruction, in each frontend.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TESTS)]

import keras  # noqa: E402

import opq_tf  # noqa: E402
from opq_tf.keras3 import layers as keras3_layers  # noqa: E402
from opq_tf.keras3 import wrapping as keras3_wrapping  # noqa: E402

_DATA = os.path.join(os.path.dirname(os.path.dirname(_TESTS)), "shared",
                     "data", "imagenet_mobilenet")
_WEIGHTS = os.path.join(_DATA, "mobilenet_v1_0.75_224_imagenet.h5")


def _images(count: int, offset: int = 0):
  """Centre crops x / 127.5 - 1 and labels of sorted images [offset, +count)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  names = sorted(os.listdir(os.path.join(_DATA, "images")))
  label_of = {name: index for index, name in enumerate(names)}
  images, labels = [], []
  for name in names[offset:offset + count]:
    image = Image.open(os.path.join(_DATA, "images", name)).convert("RGB")
    width, height = image.size
    left, top = (width - 224) // 2, (height - 224) // 2
    crop = np.asarray(image.crop((left, top, left + 224, top + 224)),
                      np.float32)
    images.append(crop / 127.5 - 1.0)
    labels.append(label_of[name])
  return np.stack(images), np.array(labels)


def _top1(model, images, labels) -> float:
  logits = model.predict(images, batch_size=50, verbose=0)
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=500)
  parser.add_argument("--calibration", type=int, default=200)
  args = parser.parse_args()
  if not os.path.exists(_WEIGHTS):
    raise SystemExit(f"{_WEIGHTS} is absent; nothing to compare.")

  from opq_tf.tf_keras import exporting as tf_keras_exporting  # pylint: disable=g-import-not-at-top
  from opq_tf.tf_keras import wrapping as tf_keras_wrapping  # pylint: disable=g-import-not-at-top
  from opq_tf.tf_keras._keras import keras as tf_keras  # pylint: disable=g-import-not-at-top

  print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")
  model = keras.applications.MobileNet(alpha=0.75, weights=None)
  model.load_weights(_WEIGHTS)
  twin = tf_keras.applications.MobileNet(alpha=0.75, weights=None)
  twin.load_weights(_WEIGHTS)
  mine = keras3_layers.named_weights(model)
  theirs = tf_keras_exporting.named_weights(twin)
  assert list(mine) == list(theirs), "weight keys differ"
  for name, variable in mine.items():
    np.testing.assert_array_equal(variable.numpy(), theirs[name].numpy(), name)
  print(f"{len(mine)} weights, equal by key in both frontends")

  evaluation = _images(args.images, 1000 - args.images)
  calibration = _images(args.calibration)[0] if args.calibration else None
  print(f"FP32 top-1 on {args.images} images: keras3 "
        f"{_top1(model, *evaluation):.3f}, tf_keras {_top1(twin, *evaluation):.3f}")
  for pruning_rate, bits in ((0.5, 8), (0.656, 4)):
    started = time.time()
    plan = opq_tf.allocate(model, pruning_rate=pruning_rate, bits=bits)
    twin_plan = opq_tf.allocate(twin, pruning_rate=pruning_rate, bits=bits)
    print(f"\n(p, B) = ({pruning_rate}, {bits}): {len(plan.kernels)} kernels, "
          f"plans identical: {plan.to_json() == twin_plan.to_json()}, "
          f"weight-bits ratio {plan.weight_bits_ratio:.2f}x "
          f"({time.time() - started:.1f} s for both)")
    qmodel, qtwin = opq_tf.apply(model, plan), opq_tf.apply(twin, plan)
    codes_equal = all(
        np.array_equal(a.codes, b.codes) and np.array_equal(a.mask, b.mask)
        for a, b in zip(keras3_wrapping.compressed_kernels(qmodel),
                        tf_keras_wrapping.compressed_kernels(qtwin)))
    with tempfile.TemporaryDirectory() as directory:
      opq_tf.export(qmodel, os.path.join(directory, "a"), formats=("packed",))
      opq_tf.export(qtwin, os.path.join(directory, "b"), formats=("packed",))
      files = [open(os.path.join(directory, d, "model.opq"), "rb").read()
               for d in ("a", "b")]
    print(f"  codes and masks identical: {codes_equal}; packed files "
          f"byte-identical: {files[0] == files[1]} ({len(files[0])} bytes)")
    if calibration is None:  # --calibration 0: plans and files only
      continue
    for name, compressed in (("keras3", qmodel), ("tf_keras", qtwin)):
      row = [f"{_top1(compressed, *evaluation):.3f}"]
      started = time.time()
      opq_tf.calibrate(compressed, calibration, verbose=False)
      row.append(f"{_top1(compressed, *evaluation):.3f} "
                 f"({time.time() - started:.0f} s)")
      started = time.time()
      opq_tf.calibrate(compressed, calibration, reconstruct=True,
                       verbose=False)
      row.append(f"{_top1(compressed, *evaluation):.3f} "
                 f"({time.time() - started:.0f} s)")
      print(f"  {name:8} top-1 as compressed / BN re-estimated / "
            f"reconstructed: {' / '.join(row)}")
    kernels = {k.key: k for k in tf_keras_wrapping.compressed_kernels(qtwin)}
    agreement = [np.mean(k.codes == kernels[k.key].codes)
                 for k in keras3_wrapping.compressed_kernels(qmodel)]
    print(f"  after calibration, codes equal between frontends: min "
          f"{min(agreement):.4f}, mean {np.mean(agreement):.4f}")


if __name__ == "__main__":
  main()
