"""Benchmark: one-shot allocation time for real architectures (issue targets:
ResNet-50, 25.6M weights, under 1 s on 2 cores; warm, with the default
step_fit="weights", under 0.5 s, issue 13).

Usage: python -m benchmarks.allocation_speed [--configs=resnet50,mobilenet_v1]
  [--bits=4,8] [--step_fit=laplace] [--repeats=5]
(quick: --configs=resnet50 --bits=4 --repeats=3)

Times opq_tf.allocate on each config's model's kernels (extracted to NumPy
once), cold (the per-bit-width unit table solved in the timed call) and warm
(median of --repeats), with the config's pruning rate and allocation options
(method, objective, step granularity, step fit) at each of --bits. The
machine's load shows in the times: compare runs made side by side.
"""

import importlib
import statistics
import time

from absl import app
from absl import flags

import opq_tf
from opq_tf.core import laplace
from opq_tf.tf_keras import layers
from opq_tf.training import models

_CONFIGS = flags.DEFINE_list("configs", ["resnet50", "mobilenet_v1"],
                             "configs/<name>.py whose model to allocate.")
_BITS = flags.DEFINE_list("bits", ["4", "8"], "Bit-widths to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Warm repetitions.")
_STEP_FIT = flags.DEFINE_enum(
    "step_fit", None, ["weights", "laplace"],
    "Overrides the config's step_fit: 'laplace' leaves out the fit of the "
    "steps to the weights, to show its share of the time.")


def main(argv):
  del argv
  print("| config | weights | p | bits | cold (s) | warm median (s) | "
        "realised p |")
  print("|---|---|---|---|---|---|---|")
  for name in _CONFIGS.value:
    config = importlib.import_module(f"configs.{name}").get_config()
    kernels = layers.compressible_kernels(
        models.build(config.model, config.num_classes, config.image_size))
    size = sum(kernel.values.size for kernel in kernels.values())
    options = {"method": config.method, "objective": config.objective,
               "step_granularity": config.step_granularity,
               "step_stats": config.step_stats,
               "step_fit": _STEP_FIT.value or config.step_fit}
    for bits in map(int, _BITS.value):
      laplace.unit_table.cache_clear()
      start = time.perf_counter()
      plan = opq_tf.allocate(kernels, config.pruning_rate, bits, **options)
      cold = time.perf_counter() - start
      warm = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        opq_tf.allocate(kernels, config.pruning_rate, bits, **options)
        warm.append(time.perf_counter() - start)
      print(f"| {name} | {size / 1e6:.1f}M | {config.pruning_rate} | {bits} | "
            f"{cold:.2f} | {statistics.median(warm):.2f} | "
            f"{plan.realised_pruning_rate:.4f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
