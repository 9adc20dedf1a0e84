"""Benchmark: the packed file against its entropy bound (target: within 5%).

Usage: python -m benchmarks.packed_size [--models=mobilenet_v1,resnet50]

Each model (tf_keras.applications, weights=None: FP32 weights at their
initialisation, since no pre-trained weights can be downloaded here) is
compressed with its config's settings (configs/*.py), exported with
opq_tf.export, and the report's three size figures are printed as a markdown
row: weight-bits ratio, model ratio (FP32 bytes / packed bytes on disk) and
packed bytes over the entropy bound.
"""

import tempfile

from absl import app
from absl import flags

import opq_tf
from opq_tf._keras import keras

_MODELS = flags.DEFINE_list("models", ["mobilenet_v1", "resnet50"],
                            "Architectures to export.")

# (builder, pruning rate, bits) as in configs/<model>.py.
_SETTINGS = {
    "mobilenet_v1": (lambda: keras.applications.MobileNet(weights=None), 0.656, 4),
    "resnet50": (lambda: keras.applications.ResNet50(weights=None), 0.79, 4),
}


def main(argv):
  del argv
  print("| model | p | B | weight-bits ratio | model ratio | packed bytes | "
        "entropy bound bytes | packed / bound |")
  print("|---|---|---|---|---|---|---|---|")
  for name in _MODELS.value:
    build, pruning_rate, bits = _SETTINGS[name]
    qmodel = opq_tf.apply(build(), pruning_rate=pruning_rate, bits=bits)
    with tempfile.TemporaryDirectory() as directory:
      report = opq_tf.export(qmodel, directory)
    print(f"| {name} | {pruning_rate} | {bits} | "
          f"{report['weight_bits_ratio']:.2f}x | {report['model_ratio']:.2f}x | "
          f"{report['packed_bytes']:,} | {report['entropy_bound_bytes']:,.0f} | "
          f"{report['packed_over_bound']:.4f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
