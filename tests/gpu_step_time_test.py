"""Tests for benchmarks/gpu_step_time.py and benchmarks/keras3_steps.py.

The GPU command runs here tiny (32x32, batch 2, 1 + 2 steps, MobileNet-V1
only, the GPU's bf16 and JAX), in a subprocess in which TensorFlow cannot be
imported, as on the GPU machine. No test looks at how fast anything is.
gpu_step_time.py is never imported here: its flags share names with
step_time.py's, which another test file imports.
"""

import importlib
import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import keras

from benchmarks import keras3_steps
from opq_tf.training import planning

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the module named by argv[1] as __main__ (its flags after it), with
# every `import tensorflow...` failing as it does where TensorFlow is not
# installed.
_WITHOUT_TENSORFLOW = """
import runpy, sys

class NoTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tf_keras"):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTensorFlow())
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _run_without_tensorflow(module: str, *args: str
                            ) -> subprocess.CompletedProcess:
  env = dict(os.environ, KERAS_BACKEND="jax")
  return subprocess.run(
      [sys.executable, "-c", _WITHOUT_TENSORFLOW, module, *args], cwd=_REPO,
      env=env, capture_output=True, text=True, timeout=300, check=False)


class TinyRunTest(absltest.TestCase):
  """One test method: the run compiles two train steps (~30 s)."""

  def test_the_gpu_command_runs_tiny_without_tensorflow(self):
    output = os.path.join(tempfile.mkdtemp(), "gpu.json")
    result = _run_without_tensorflow("benchmarks.gpu_step_time", "--tiny",
                                     "--configs=mobilenet_v1",
                                     f"--output={output}")
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    with open(output) as stream:
      results = json.load(stream)
    self.assertEqual(json.loads(result.stdout), results)
    self.assertFalse(results["tensorflow_imported"])
    self.assertEqual(results["machine"]["backend"], "jax")
    settings = results["settings"]
    self.assertEqual(
        {k: settings[k] for k in ("batch_size", "image_size", "steps",
                                  "warmup", "precision", "train_step",
                                  "jit_settings")},
        {"batch_size": 2, "image_size": 32, "steps": 2, "warmup": 1,
         "precision": "mixed_bfloat16", "train_step": "keras",
         "jit_settings": [True]})
    # p and B come from configs/mobilenet_v1.py; the plan is the model's.
    notes = results["notes"]["mobilenet_v1"]
    self.assertEqual((notes["pruning_rate"], notes["bits"]), (0.656, 4))
    self.assertEqual(notes["plan"]["kernels"], 28)
    self.assertAlmostEqual(notes["plan"]["realised_pruning_rate"], 0.656,
                           places=3)
    self.assertEqual([(t["variant"], t["error"], len(t["step_ms"]))
                      for t in results["timings"]],
                     [("fp32", None, 2), ("opq", None, 2)])
    (row,) = results["summary"]
    self.assertEqual((row["config"], row["batch_size"], row["image_size"],
                      row["target"], row["errors"]),
                     ("mobilenet_v1", 2, 32, 1.02, {}))
    for key in ("fp32_images_per_s", "opq_images_per_s",
                "opq_over_fp32_wall", "opq_over_fp32_cpu"):
      self.assertGreater(row[key], 0, key)
    self.assertEqual(row["meets_target"], row["opq_over_fp32_wall"] <= 1.02)


class FlagsTest(absltest.TestCase):

  def test_a_config_without_a_keras3_build_is_named_with_the_fix(self):
    result = _run_without_tensorflow("benchmarks.gpu_step_time",
                                     "--configs=default,nonexistent",
                                     "--steps=0")
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertIn("configs/default.py's model 'small_resnet' has no Keras 3 "
                  "build here; use configs whose model is one of "
                  "['mobilenet_v1', 'resnet50']", result.stderr)
    self.assertIn("--configs: no configs/nonexistent.py.", result.stderr)
    self.assertIn("--steps=0 must be >= 1.", result.stderr)


# The JAX path of keras3_steps.TrainStep against model.fit, in a process of
# its own (Keras reads its backend once): the same weights after 3 steps.
_SAME_AS_FIT = """
import json, keras, numpy as np
from benchmarks import keras3_steps

def model():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((6,))
  hidden = keras.layers.BatchNormalization()(keras.layers.Dense(8)(inputs))
  return keras.Model(inputs, keras.layers.Dense(3)(hidden))

rng = np.random.default_rng(0)
images = rng.standard_normal((16, 6)).astype("float32")
labels = rng.integers(0, 3, 16).astype("int32")
stepped, fitted = model(), model()
for m in (stepped, fitted):
  keras3_steps.compile_for_training(m, 0.1, 0.9, jit_compile=True)
step = keras3_steps.make_train_step(stepped, images, labels)
losses = [step() for _ in range(3)]
step.sync()
fitted.fit(images, labels, batch_size=16, epochs=3, shuffle=False, verbose=0)
print(json.dumps({"losses": losses, "difference": max(
    float(np.max(np.abs(a - b)))
    for a, b in zip(stepped.get_weights(), fitted.get_weights()))}))
"""


class TrainStepTest(absltest.TestCase):

  def test_the_jax_step_is_model_fit_step(self):
    result = subprocess.run(
        [sys.executable, "-c", _SAME_AS_FIT], cwd=_REPO,
        env=dict(os.environ, KERAS_BACKEND="jax"), capture_output=True,
        text=True, timeout=300, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    found = json.loads(result.stdout.strip().splitlines()[-1])
    self.assertLess(found["difference"], 1e-5)
    self.assertLess(found["losses"][-1], found["losses"][0])

  def test_an_uncompiled_model_is_refused_with_the_fix(self):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with self.assertRaisesRegex(ValueError, r"not compiled: call "
                                r"model.compile\(optimizer, loss"):
      keras3_steps.make_train_step(model, None, None)

  def test_allocate_options_are_the_trainers(self):
    for name in ("resnet50", "mobilenet_v1"):
      config = importlib.import_module(f"configs.{name}").get_config()
      self.assertEqual(keras3_steps.allocate_options(config),
                       planning.allocate_options(config), name)

  def test_an_unknown_model_is_named_with_the_choices(self):
    with self.assertRaisesRegex(ValueError, r"'small_resnet' has no Keras 3 "
                                r"build here; .*\['mobilenet_v1', 'resnet50'\]"):
      keras3_steps.build_model("small_resnet", 10, 32)


if __name__ == "__main__":
  absltest.main()
