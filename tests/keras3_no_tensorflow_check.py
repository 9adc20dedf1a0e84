"""The whole Keras 3 path on JAX, then prints the TensorFlow modules loaded.

Run as `KERAS_BACKEND=jax python tests/keras3_no_tensorflow_check.py`; the
last line of its output is a JSON list that tests/keras3_test.py expects to
be empty: import opq_tf, allocate, apply, fit, calibrate (BatchNorm and
reconstruction), strip, export (model.keras + model.opq + report.json) and
load_packed import no TensorFlow module.
"""

import json
import os
import sys
import tempfile

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]

import keras  # noqa: E402

import keras3_models as models  # noqa: E402
import opq_tf  # noqa: E402


def main() -> None:
  if keras.backend.backend() != "jax":
    raise SystemExit(f"run with KERAS_BACKEND=jax, not "
                     f"{keras.backend.backend()}")
  model = models.randomize(models.conv_model())
  plan = opq_tf.allocate(model, pruning_rate=0.5, bits=4)
  qmodel = opq_tf.apply(model, plan)
  images = models.images(32)
  qmodel.compile(optimizer="sgd",
                 loss=keras.losses.SparseCategoricalCrossentropy(
                     from_logits=True), jit_compile=True)
  qmodel.fit(images, models.labels(32), batch_size=16, verbose=0)
  opq_tf.calibrate(qmodel, images, reconstruct=True, batch_size=16)
  opq_tf.strip(qmodel)
  with tempfile.TemporaryDirectory() as directory:
    report = opq_tf.export(qmodel, os.path.join(directory, "out"))
    opq_tf.load_packed(os.path.join(directory, "out", "model.opq"),
                       models.conv_model)
  assert "saved_model" not in report["files"], report["files"]
  print(json.dumps(sorted(name for name in sys.modules
                          if name.split(".", 1)[0] == "tensorflow")))


if __name__ == "__main__":
  main()
