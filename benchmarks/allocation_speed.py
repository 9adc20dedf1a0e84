"""Benchmark: one-shot allocation time for real architectures (issue target:
ResNet-50, 25.6M weights, under 1 s on 2 cores).

Usage: python -m benchmarks.allocation_speed [--models=resnet50,mobilenet_v1]

Times opq_tf.allocate on the models' kernels (extracted to NumPy once), cold
(the per-bit-width unit table solved in the timed call) and warm (median of
--repeats), for the default "opq" strategy with channel-wise steps.
"""

import statistics
import time

from absl import app
from absl import flags

import opq_tf
from opq_tf import laplace
from opq_tf import layers
from opq_tf._keras import keras

_MODELS = flags.DEFINE_list("models", ["resnet50", "mobilenet_v1"],
                            "Architectures to allocate.")
_BITS = flags.DEFINE_list("bits", ["4", "8"], "Bit-widths to time.")
_PRUNING_RATE = flags.DEFINE_float("pruning_rate", 0.79, "Global pruning rate.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Warm repetitions.")

_ARCHITECTURES = {
    "resnet50": lambda: keras.applications.ResNet50(weights=None),
    "mobilenet_v1": lambda: keras.applications.MobileNet(weights=None),
}


def main(argv):
  del argv
  print("| model | weights | bits | cold (s) | warm median (s) | realised p |")
  print("|---|---|---|---|---|---|")
  for name in _MODELS.value:
    kernels = layers.compressible_kernels(_ARCHITECTURES[name]())
    size = sum(values.size for _, values in kernels.values())
    for bits in map(int, _BITS.value):
      laplace.unit_table.cache_clear()
      start = time.perf_counter()
      plan = opq_tf.allocate(kernels, _PRUNING_RATE.value, bits)
      cold = time.perf_counter() - start
      warm = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        opq_tf.allocate(kernels, _PRUNING_RATE.value, bits)
        warm.append(time.perf_counter() - start)
      print(f"| {name} | {size / 1e6:.1f}M | {bits} | {cold:.2f} | "
            f"{statistics.median(warm):.2f} | {plan.realised_pruning_rate:.4f} |")


if __name__ == "__main__":
  app.run(main)
