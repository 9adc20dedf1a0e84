"""The whole Keras 3 path on JAX or PyTorch; prints the TensorFlow modules loaded.

Run as `KERAS_BACKEND=jax python tests/keras3_no_tensorflow_check.py` (or
`torch`); the last line of its output is a JSON list that tests/keras3_test.py
expects to be empty: import opq_tf, allocate, apply, fit (at a high
learning rate; jit-compiled on JAX), calibrate (BatchNorm and
reconstruction), strip, export (model.keras + model.opq + report.json) and
load_packed import no TensorFlow module. On the way it checks what every backend must keep: after fit, pruned
weights are exactly zero and kept ones on their grid with masks and steps
unchanged, and load_packed gives the stripped model's weights bit for bit.
"""

import json
import os
import sys
import tempfile

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras3_models as models  # noqa: E402
import opq_tf  # noqa: E402
from opq_tf.core import grid  # noqa: E402
from opq_tf.keras3 import layers as layers_lib  # noqa: E402
from opq_tf.keras3 import wrapping  # noqa: E402


def _state(qmodel) -> dict:
  return {kernel.key: kernel for kernel in wrapping.compressed_kernels(qmodel)}


def _check_fit_kept_the_grid(qmodel, before: dict) -> None:
  """Masks and steps unchanged, kept weights moved, and the kernels the
  forward pass uses are NumPy's mask * step * code (zero where pruned)."""
  after = _state(qmodel)
  assert list(before) == list(after), (list(before), list(after))
  for key, kernel in after.items():
    np.testing.assert_array_equal(kernel.mask, before[key].mask, key)
    np.testing.assert_array_equal(kernel.step, before[key].step, key)
    assert np.abs(kernel.kernel - before[key].kernel).max() > 0, (
        f"{key}: fit did not move the kept weights")
    assert np.abs(kernel.codes).max() <= grid.max_code(kernel.bits), key
  for entry in layers_lib.iter_layers(qmodel):
    for spec, _, variable, variables in (entry.wrapper.kernels()
                                         if entry.wrapper else ()):
      key = f"{entry.path}/{spec.relative_key}"
      used = keras.ops.convert_to_numpy(spec.quantizer(variable,
                                                       weights=variables))
      np.testing.assert_array_equal(used, after[key].compressed, key)
      assert np.all(used[~after[key].mask] == 0), key


def main() -> None:
  if keras.backend.backend() not in ("jax", "torch"):
    raise SystemExit(f"run with KERAS_BACKEND=jax or torch, not "
                     f"{keras.backend.backend()}")
  model = models.randomize(models.conv_model())
  plan = opq_tf.allocate(model, pruning_rate=0.5, bits=4)
  qmodel = opq_tf.apply(model, plan)
  images = models.images(32)
  # On torch, jit_compile is torch.compile, whose first compile alone takes
  # 30-300 s on 2 cores: this check fits eagerly there (the full backend
  # checks, which pass on torch in 3+ minutes, fit jit-compiled).
  qmodel.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0),
                 loss=keras.losses.SparseCategoricalCrossentropy(
                     from_logits=True),
                 jit_compile=keras.backend.backend() != "torch")
  before = _state(qmodel)
  qmodel.fit(images, models.labels(32), batch_size=16, verbose=0)
  _check_fit_kept_the_grid(qmodel, before)
  opq_tf.calibrate(qmodel, images, reconstruct=True, batch_size=16)
  stripped = opq_tf.strip(qmodel)
  with tempfile.TemporaryDirectory() as directory:
    report = opq_tf.export(qmodel, os.path.join(directory, "out"))
    loaded = opq_tf.load_packed(os.path.join(directory, "out", "model.opq"),
                                models.conv_model)
  assert "saved_model" not in report["files"], report["files"]
  expected = layers_lib.named_weights(stripped)
  named = layers_lib.named_weights(loaded)
  assert list(named) == list(expected), (list(named), list(expected))
  for name, variable in expected.items():
    np.testing.assert_array_equal(named[name].numpy(), variable.numpy(), name)
  print(json.dumps(sorted(name for name in sys.modules
                          if name.split(".", 1)[0] == "tensorflow")))


if __name__ == "__main__":
  main()
