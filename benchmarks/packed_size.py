"""Benchmark: the packed file against its entropy bound (target: within 5%).

Usage: python -m benchmarks.packed_size [--configs=mobilenet_v1,resnet50]

Each config's model (`opq_tf.training.models.build(config.model, ...)`, weights at
their initialisation, since no pre-trained weights can be downloaded here) is
compressed with the config's settings (pruning_rate, bits, method, objective,
step granularity), exported with opq_tf.export, and the report's three size
figures are printed as a markdown row: weight-bits ratio, model ratio (FP32
bytes / packed bytes on disk) and packed bytes over the entropy bound.
"""

import importlib
import tempfile

from absl import app
from absl import flags

import opq_tf
from opq_tf.training import models

_CONFIGS = flags.DEFINE_list("configs", ["mobilenet_v1", "resnet50"],
                             "configs/<name>.py whose model to export.")


def main(argv):
  del argv
  print("| config | model | p | B | weight-bits ratio | model ratio | "
        "packed bytes | entropy bound bytes | packed / bound |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in _CONFIGS.value:
    config = importlib.import_module(f"configs.{name}").get_config()
    model = models.build(config.model, config.num_classes, config.image_size)
    plan = opq_tf.allocate(
        model, config.pruning_rate, config.bits, method=config.method,
        objective=config.objective, step_granularity=config.step_granularity,
        step_stats=config.step_stats)
    qmodel = opq_tf.apply(model, plan)
    with tempfile.TemporaryDirectory() as directory:
      report = opq_tf.export(qmodel, directory)
    print(f"| {name} | {config.model} | {config.pruning_rate} | {config.bits} | "
          f"{report['weight_bits_ratio']:.2f}x | {report['model_ratio']:.2f}x | "
          f"{report['packed_bytes']:,} | {report['entropy_bound_bytes']:,.0f} | "
          f"{report['packed_over_bound']:.4f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
