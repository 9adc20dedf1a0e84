"""opq_tf: One-shot Pruning-Quantization (OPQ, AAAI 2021) for tf_keras models.

The public API is six verbs:

    plan = opq_tf.allocate(model, pruning_rate=0.9, bits=4)   # pure NumPy
    qmodel = opq_tf.apply(model, plan)                          # tfmot wrappers
    opq_tf.calibrate(qmodel, images)                            # BN statistics
    qmodel.fit(...)                                             # masks/steps fixed
    opq_tf.export(qmodel, "out/")                               # SavedModel + packed
    weights = opq_tf.load_packed("out/model.opq", model_fn)

`allocate` needs only NumPy, so `import opq_tf` does not import TensorFlow; the
TensorFlow-backed verbs are imported on first use.
"""

import os as _os

# tfmot 0.8 works only with Keras 2; this must be set before TensorFlow loads.
_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from opq_tf.allocation import CompressionPlan, KernelPlan, allocate  # noqa: E402

_LAZY = {
    "apply": "opq_tf.wrapping",
    "strip": "opq_tf.wrapping",
    "register_layer": "opq_tf.quantize_configs",
    "export": "opq_tf.exporting",
    "load_packed": "opq_tf.exporting",
    "calibrate": "opq_tf.calibration",
}

__all__ = ["CompressionPlan", "KernelPlan", "allocate", *_LAZY]


def __getattr__(name: str):
  if name in _LAZY:
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'opq_tf' has no attribute {name!r}")
