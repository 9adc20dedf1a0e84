"""keras3 training on the JAX backend: run as `python tests/keras3_training_checks.py`.

Keras fixes its backend per process and the pytest process runs TensorFlow,
so tests/keras3_training_test.py runs this file in a subprocess with
KERAS_BACKEND=jax, two CPU devices and the digits data it prepared
(OPQ_DIGITS_DATA_DIR). Not collected by pytest itself (no `_test.py` suffix).
Argument "worker <workdir> <out.npz>" instead runs one process of the
two-process DataParallel test (KERAS_DISTRIBUTION_* set by the caller).
"""

import glob
import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)  # before JAX starts its runtime

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]

from absl.testing import absltest  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
import opq_tf  # noqa: E402
from opq_tf.keras3 import wrapping  # noqa: E402
from opq_tf.training import checks  # noqa: E402
from opq_tf.training import keras3_distribute  # noqa: E402
from opq_tf.training import keras3_loop  # noqa: E402
from opq_tf.training import keras3_models  # noqa: E402
from opq_tf.training import layout  # noqa: E402
from opq_tf.training import training  # noqa: E402

DATA_DIR = os.environ.get("OPQ_DIGITS_DATA_DIR", "")


def config(**overrides):
  """The default config on keras3/JAX, a few steps of a 16-image batch."""
  cfg = default.get_config()
  cfg.update(dict(
      frontend="keras3", backend="jax", data_dir=DATA_DIR,
      build_digits_manual_dir=False, global_batch_size=16, eval_batch_size=500,
      steps_per_epoch=4, fp32_epochs=1, fp32_learning_rate=0.01,
      fp32_warmup_epochs=0.0, num_epochs=1, warmup_epochs=0.0,
      steps_per_checkpoint=2, log_every_steps=1, calibration_images=100))
  cfg.update(overrides)
  return cfg


def tiny_model() -> keras.Model:
  """conv -> BatchNorm -> dense: compiles in a second, BatchNorm included."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((32, 32, 3), name="images")
  x = keras.layers.Rescaling(1.0 / 255.0, name="to_unit_range")(inputs)
  x = keras.layers.Conv2D(8, 3, strides=4, use_bias=False, name="conv")(x)
  x = keras.layers.BatchNormalization(momentum=0.9, name="bn")(x)
  x = keras.layers.ReLU(name="relu")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = keras.layers.Dense(10, name="logits")(x)
  return keras.Model(inputs, outputs, name="tiny")


def tiny_compressed() -> keras.Model:
  return opq_tf.apply(tiny_model(), pruning_rate=0.5, bits=4)


def fit(model, strategy, workdir, **overrides):
  return keras3_loop.fit(model, config(**overrides), strategy, DATA_DIR,
                         workdir, phase="finetune", epochs=1,
                         learning_rate=0.05, warmup_epochs=0.0)


def _worker(workdir: str, out: str) -> None:
  """One of two processes: DataParallel over both processes' devices."""
  strategy = keras3_distribute.make_strategy(config(), "multi_worker")
  model = tiny_compressed()
  result = fit(model, strategy, workdir, steps_per_epoch=3)
  np.savez(out, *[np.asarray(w) for w in model.get_weights()])
  print("PROCESSES", jax.process_count(), "REPLICAS",
        strategy.num_replicas_in_sync, "STEPS", result["steps"], flush=True)


class JaxTrainingTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = self.create_tempdir().full_path

  def test_data_parallel_on_two_devices_matches_one_device(self):
    weights, losses = [], []
    for name in ("one_device", "mirrored"):
      strategy = keras3_distribute.make_strategy(config(), name)
      self.assertEqual(strategy.num_replicas_in_sync,
                       1 if name == "one_device" else 2)
      model = tiny_compressed()
      losses.append(fit(model, strategy, os.path.join(self.root, name),
                        steps_per_epoch=3)["train_loss"])
      weights.append(model.get_weights())
    # One global batch, one XLA program: only the reduction order differs.
    self.assertAlmostEqual(losses[0], losses[1], delta=1e-5 * abs(losses[0]))
    for one, two in zip(*weights):
      np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-6)

  def test_fit_resumes_mid_epoch_as_if_never_stopped(self):
    strategy = keras3_distribute.make_strategy(config(), "mirrored")
    workdir = os.path.join(self.root, "run")
    model = tiny_compressed()
    fit(model, strategy, workdir)
    checkpoints = layout.checkpoint_dir(workdir, "finetune")
    self.assertEqual(sorted(os.listdir(checkpoints)),
                     ["ckpt-2.npz", "ckpt-4.npz"])
    os.remove(os.path.join(checkpoints, "ckpt-4.npz"))  # killed after step 2
    resumed = tiny_compressed()
    result = fit(resumed, strategy, workdir)
    self.assertEqual(result["resumed_from_step"], 2)
    self.assertEqual(result["steps"], 4)
    for before, after in zip(model.get_weights(), resumed.get_weights()):
      np.testing.assert_allclose(before, after, rtol=1e-6, atol=1e-7)
    pruned = [k.mask for k in wrapping.compressed_kernels(resumed)]
    self.assertTrue(all(np.any(mask == 0) for mask in pruned))

  def test_train_and_evaluate_exports_a_packed_file_that_loads_back(self):
    saved = os.path.join(self.root, "tiny.keras")
    tiny_model().save(saved)  # a user's model: quicker to compile than the default's
    cfg = config(model=f"saved:{saved}")
    strategy = keras3_distribute.make_strategy(cfg, "mirrored")
    workdir = os.path.join(self.root, "job")
    report = training.train_and_evaluate(cfg, workdir, strategy)
    self.assertEqual((report["frontend"], report["backend"], report["replicas"]),
                     ("keras3", "jax", 2))
    self.assertEqual(report["accuracy"]["compressed_after_finetune"]["examples"],
                     500)
    self.assertEqual(report["finetune"]["steps"], 4)
    export = os.path.join(workdir, layout.EXPORT_DIR)
    self.assertEqual(sorted(os.listdir(export)),
                     ["model.keras", "model.opq", "report.json"])
    self.assertNotEmpty(glob.glob(os.path.join(
        workdir, "tensorboard", "finetune", "events.out.tfevents.*")))
    rebuilt = opq_tf.load_packed(
        report["export"]["packed"],
        lambda: keras3_models.build_for_config(cfg))
    stripped = keras.saving.load_model(report["export"]["keras"])
    for packed, plain in zip(rebuilt.get_weights(), stripped.get_weights()):
      np.testing.assert_array_equal(packed, plain)
    # A rerun resumes: nothing left to train, the same plan.
    with open(os.path.join(workdir, layout.PLAN_FILE)) as f:
      plan = f.read()
    again = training.train_and_evaluate(cfg, workdir, strategy)
    self.assertEqual(again["finetune"]["resumed_from_step"], 4)
    with open(os.path.join(workdir, layout.PLAN_FILE)) as f:
      self.assertEqual(f.read(), plan)
    # One more epoch: the export is made again from the new weights.
    longer = training.train_and_evaluate(config(model=f"saved:{saved}",
                                                num_epochs=2), workdir, strategy)
    self.assertEqual(longer["finetune"]["steps"], 8)
    with open(os.path.join(export, "report.json")) as f:
      self.assertEqual(json.load(f)["made_from"]["checkpoint_step"], 8)
    stripped = keras.saving.load_model(longer["export"]["keras"])
    self.assertFalse(all(np.array_equal(a, b) for a, b in zip(
        stripped.get_weights(), rebuilt.get_weights())))

  def test_jit_compile_with_synchronized_batchnorm_is_accepted_on_jax(self):
    # tf.distribute cannot compile small_resnet's synchronized BatchNorm on
    # several replicas; JAX's DataParallel can, so checks lets it through.
    cfg = config(jit_compile=True)
    strategy = keras3_distribute.make_strategy(cfg, "mirrored")
    self.assertEqual(strategy.num_replicas_in_sync, 2)
    checks.validate(cfg, strategy, os.path.join(self.root, "jit"),
                    default_config=default.get_config())


if __name__ == "__main__":
  if sys.argv[1:2] == ["worker"]:
    _worker(*sys.argv[2:4])
  else:
    absltest.main()
