"""Tests for the training system on Keras 3 models (config.frontend="keras3").

TensorFlow backend: in this process (the pytest process's keras runs on
TensorFlow), under the tf.distribute strategies the tf_keras job uses (two
localhost workers with TF_CONFIG for MultiWorkerMirroredStrategy). JAX
backend: in subprocesses with KERAS_BACKEND=jax (Keras fixes its backend per
process): tests/keras3_training_checks.py (DataParallel over two devices
against one, exact mid-epoch resume, the whole job and its export), two
processes training as one DataParallel run, and trainers/run_default.py
killed with SIGKILL during finetuning and run again. Real tiny runs on the
digits stand-in of ImageNet (digits_data), a few steps of a 16-image batch.
"""

import functools
import glob
import json
import os
import signal
import subprocess
import sys
import time

from absl.testing import absltest
import keras
import numpy as np

from configs import default
import opq_tf
from opq_tf.core import allocation
from opq_tf.keras3 import layers as keras3_layers
from opq_tf.keras3 import wrapping
from opq_tf.training import checks
from opq_tf.training import distribute
from opq_tf.training import keras3_distribute
from opq_tf.training import keras3_loop
from opq_tf.training import keras3_models
from opq_tf.training import keras3_training
from opq_tf.training import layout
from opq_tf.training import loop
from opq_tf.training import models
from opq_tf.training import pretrained
from opq_tf.training import training
import cpu_devices
import digits_data
import processes
from opq_tf.tf_keras._keras import tf

cpu_devices.split_cpu()

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
_TIMEOUT = 600

# One of two TensorFlow workers (TF_CONFIG) finetuning a compressed Keras 3
# model under MultiWorkerMirroredStrategy, as the trainers do.
_TF_WORKER = """
import sys
import numpy as np
import keras
from configs import default
import opq_tf
from opq_tf.training import distribute
from opq_tf.training import keras3_loop

workdir, data_dir, out = sys.argv[1:4]
config = default.get_config()
config.update(dict(frontend="keras3", data_dir=data_dir, global_batch_size=16,
                   steps_per_epoch=3, steps_per_checkpoint=2, num_epochs=1))
strategy = distribute.make_strategy("multi_worker")
keras.utils.set_random_seed(0)
with strategy.scope():
  inputs = keras.Input((32, 32, 3))
  x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="conv")(inputs)
  x = keras.layers.BatchNormalization(synchronized=True, name="bn")(x)
  x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
  model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))
  qmodel = opq_tf.apply(model, pruning_rate=0.5, bits=4)
initial = [np.asarray(w) for w in qmodel.get_weights()]
result = keras3_loop.fit(qmodel, config, strategy, data_dir, workdir,
                         phase="finetune", epochs=1, learning_rate=0.05,
                         warmup_epochs=0.0)
np.savez(out, *[np.asarray(w) for w in qmodel.get_weights()])
np.savez(out.replace(".npz", "_initial.npz"), *initial)
print("STEPS", result["steps"], flush=True)
"""


def _config(data_dir: str, manual_dir: str, **overrides):
  config = default.get_config()
  config.update(dict(
      frontend="keras3", data_dir=data_dir, manual_dir=manual_dir,
      global_batch_size=16, eval_batch_size=500, steps_per_epoch=4,
      fp32_epochs=1, fp32_learning_rate=0.01, fp32_warmup_epochs=0.0,
      num_epochs=1, warmup_epochs=0.0, steps_per_checkpoint=2,
      log_every_steps=1, calibration_images=100))
  config.update(overrides)
  return config


def _tiny_model(synchronized: bool = True) -> keras.Model:
  """conv -> BatchNorm -> dense, a user's model that builds in milliseconds
  (synchronized BatchNorm is TensorFlow's only: False to load it on JAX)."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((32, 32, 3), name="images")
  x = keras.layers.Rescaling(1.0 / 255.0, name="to_unit_range")(inputs)
  x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="conv")(x)
  x = keras.layers.BatchNormalization(momentum=0.9, synchronized=synchronized,
                                      name="bn")(x)
  x = keras.layers.ReLU(name="relu")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = keras.layers.Dense(10, name="logits")(x)
  return keras.Model(inputs, outputs, name="tiny")


def _scalars(directory: str, tag: str) -> dict[int, float]:
  """step -> value of a scalar summary under directory."""
  values = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


def _assert_plan_masks(test, workdir: str, fp32_model: keras.Model,
                       rebuilt: keras.Model) -> None:
  """The exported kernels are zero where the FP32 weight was below its
  threshold and on the plan's grid everywhere: the plan's masks and steps."""
  with open(os.path.join(workdir, layout.PLAN_FILE)) as f:
    plan = allocation.CompressionPlan.from_json(f.read())
  fp32 = keras3_layers.named_weights(fp32_model)
  exported = keras3_layers.named_weights(rebuilt)
  for entry in plan.kernels:
    kernel = np.asarray(exported[entry.key])
    pruned = np.abs(np.asarray(fp32[entry.key])) < entry.threshold
    test.assertEqual(np.count_nonzero(kernel[pruned]), 0, entry.key)
    codes = kernel / entry.step_array()
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)


def _in_a_fresh_process(test):
  """Runs `test` alone in a new pytest process.

  Under pytest-xdist a worker runs many files in one process; a Keras 3
  model's collectives under a MirroredStrategy made there can then meet
  collective instance keys of strategies made by earlier files ("Shape
  mismatch in the collective instance"), which a trainer, one job per
  process, never sees.
  """
  @functools.wraps(test)
  def wrapper(self):
    if os.environ.get("OPQ_FRESH_PROCESS"):
      return test(self)
    node = f"{os.path.abspath(__file__)}::{type(self).__name__}::{test.__name__}"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "0", "-q", "-p",
         "no:cacheprovider", node],
        env={**os.environ, "OPQ_FRESH_PROCESS": "1"}, capture_output=True,
        text=True, timeout=1200, check=False)
    self.assertEqual(result.returncode, 0, result.stdout[-4000:])
  return wrapper


class TensorFlowBackendTest(digits_data.DigitsTestCase, absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.one_device = distribute.make_strategy("one_device")
    cls.mirrored = distribute.make_strategy("mirrored")

  def config(self, **overrides):
    return _config(self.data_dir, self.manual_dir, **overrides)

  @_in_a_fresh_process
  def test_whole_job_under_mirrored_strategy(self):
    saved = os.path.join(self.root, "user_model.keras")
    _tiny_model().save(saved)  # a user's model: quicker than small_resnet
    config = self.config(model=f"saved:{saved}")
    workdir = self.workdir("job")
    report = training.train_and_evaluate(config, workdir, self.mirrored)
    self.assertEqual((report["frontend"], report["backend"], report["replicas"]),
                     ("keras3", "tensorflow", 2))
    self.assertEqual(report["strategy"], "MirroredStrategy")
    self.assertEqual(report["accuracy"]["fp32"]["examples"], 500)
    self.assertIsNotNone(report["accuracy"]["calibrated_before_finetune"])
    self.assertGreater(report["compression"]["weight_bits_ratio"], 10)
    with open(os.path.join(workdir, layout.FINAL_REPORT)) as f:
      self.assertEqual(json.load(f)["plan"], report["plan"])
    export = os.path.join(workdir, layout.EXPORT_DIR)
    for name in ("model.keras", "model.opq", "report.json",
                 "saved_model/saved_model.pb"):
      self.assertTrue(os.path.exists(os.path.join(export, name)), name)
    for phase in ("fp32", "finetune"):
      board = os.path.join(workdir, "tensorboard", phase)
      self.assertEqual(sorted(_scalars(board, "train/loss")), [1, 2, 3, 4])
    sparsity = _scalars(os.path.join(workdir, "tensorboard", "finetune"),
                        "compression/sparsity")
    # Zero where pruned at least (a kept weight may round to 0 too).
    self.assertGreaterEqual(sparsity[4],  # a float32 summary
                            report["plan"]["realised_pruning_rate"] - 1e-6)

    fp32_model = keras3_models.build_for_config(config)
    keras3_models.load_weights(fp32_model,
                               os.path.join(workdir, layout.FP32_WEIGHTS))
    rebuilt = opq_tf.load_packed(report["export"]["packed"],
                                 lambda: keras3_models.build_for_config(config))
    _assert_plan_masks(self, workdir, fp32_model, rebuilt)

    # A rerun asking for LiteRT trains nothing and exports again, whole.
    final_report = os.path.join(workdir, layout.FINAL_REPORT)
    again = training.train_and_evaluate(self.config(
        model=f"saved:{saved}", litert=True, litert_weights="int4"), workdir,
        self.mirrored)
    self.assertEqual(again["finetune"]["resumed_from_step"], 4)
    with open(os.path.join(export, "report.json")) as f:
      self.assertEqual(json.load(f)["made_from"], {
          "checkpoint_step": 4, "options": {
              "litert": True, "litert_int8_activations": False,
              "litert_weights": "int4"}})
    self.assertEqual(again["export"]["litert"],
                     os.path.join(export, "model.tflite"))
    accuracy = again["litert"]["accuracy"]["float_activations"]
    self.assertEqual(accuracy["top1_agreement"], 1.0)
    with open(final_report) as f:
      self.assertEqual(json.load(f)["litert"]["accuracy"]["images"], 500)

  def test_fit_resumes_mid_epoch_as_if_never_stopped(self):
    config = self.config(jit_compile=True)  # one replica: XLA compiles it
    workdir = self.workdir("resume")

    def compressed():
      with self.one_device.scope():
        return opq_tf.apply(_tiny_model(), pruning_rate=0.5, bits=4)

    def fit(model):
      return keras3_loop.fit(model, config, self.one_device, self.data_dir,
                             workdir, phase="finetune", epochs=1,
                             learning_rate=0.02, warmup_epochs=0.0)

    model = compressed()
    fit(model)
    checkpoints = layout.checkpoint_dir(workdir, "finetune")
    self.assertEqual(sorted(os.listdir(checkpoints)),
                     ["ckpt-2.npz", "ckpt-4.npz"])
    os.remove(os.path.join(checkpoints, "ckpt-4.npz"))  # killed after step 2
    resumed = compressed()
    self.assertEqual(fit(resumed)["resumed_from_step"], 2)
    for before, after in zip(model.get_weights(), resumed.get_weights()):
      np.testing.assert_allclose(before, after, rtol=1e-5, atol=1e-7)
    masks = [kernel.mask for kernel in wrapping.compressed_kernels(resumed)]
    np.testing.assert_array_equal(
        masks[0], wrapping.compressed_kernels(model)[0].mask)

  @_in_a_fresh_process
  def test_two_replicas_match_one_device(self):
    losses, weights = [], []
    for name, strategy in (("one", self.one_device), ("two", self.mirrored)):
      config = self.config(steps_per_epoch=3)
      with strategy.scope():
        model = _tiny_model()
      figures = keras3_loop.fit(model, config, strategy, self.data_dir,
                                self.workdir(f"replicas_{name}"), phase="fp32",
                                epochs=1, learning_rate=0.01,
                                warmup_epochs=0.0)
      losses.append(figures["train_loss"])
      weights.append(model.get_weights())
    # Synchronized BatchNorm, loss over the global batch: float rounding only.
    self.assertAlmostEqual(losses[0], losses[1], delta=1e-5 * losses[0])
    for one, two in zip(*weights):
      np.testing.assert_allclose(one, two, rtol=1e-3, atol=1e-5)

  def test_two_tensorflow_workers_finish_with_identical_weights(self):
    workdir = self.workdir("multi_worker")
    cluster = {"worker": [f"localhost:{port}"
                          for port in processes.free_ports(2)]}
    workers, outputs = [], []
    for index in range(2):
      outputs.append(os.path.join(self.root, f"tf_worker{index}.npz"))
      temp = os.path.join(self.root, f"tf_worker{index}_tmp")
      os.makedirs(temp)  # where a non-chief writes, and removes again
      tf_config = json.dumps({"cluster": cluster,
                              "task": {"type": "worker", "index": index}})
      workers.append(subprocess.Popen(
          [sys.executable, "-c", _TF_WORKER, workdir, self.data_dir,
           outputs[-1]], cwd=_ROOT, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True, env=processes.environment(
              KERAS_BACKEND="tensorflow", TF_CONFIG=tf_config, TMPDIR=temp)))
    logs = [worker.communicate(timeout=_TIMEOUT)[0] for worker in workers]
    for worker, log in zip(workers, logs):
      self.assertEqual(worker.returncode, 0, log[-3000:])
      self.assertIn("STEPS 3", log)
    first, second = np.load(outputs[0]), np.load(outputs[1])
    initial = np.load(outputs[0].replace(".npz", "_initial.npz"))
    for name in first.files:
      np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    self.assertTrue(any(not np.array_equal(first[name], initial[name])
                        for name in first.files))
    # Only the chief wrote checkpoints (steps 2 and 3) to the workdir.
    self.assertEqual(sorted(os.listdir(layout.checkpoint_dir(workdir,
                                                             "finetune"))),
                     ["ckpt-2.npz", "ckpt-3.npz"])

  def test_learning_rate_schedule_is_the_tf_keras_jobs(self):
    for warmup, total in ((0, 8), (3, 10)):
      ours = keras3_loop.learning_rate_schedule(0.1, warmup, total)
      theirs = loop.WarmupCosine(0.1, warmup, total)
      for step in range(total + 1):
        self.assertAlmostEqual(float(ours(step)), float(theirs(step)),
                               places=6, msg=(warmup, total, step))

  def test_weights_files_round_trip_and_read_tf_keras_weights(self):
    path = os.path.join(self.root, "weights.h5")
    keras.utils.set_random_seed(1)
    model = keras3_models.build("small_resnet", 10, 32)
    keras3_models.save_weights(model, path)
    loaded = keras3_models.build("small_resnet", 10, 32)
    keras3_models.load_weights(loaded, path)
    for saved, read in zip(model.get_weights(), loaded.get_weights()):
      np.testing.assert_array_equal(saved, read)
    # tf_keras' legacy .h5 (trainers' fp32/weights.h5 of a tf_keras run).
    tf_keras_model = models.build("small_resnet", 10, 32)
    legacy = os.path.join(self.root, "tf_keras.h5")
    pretrained.save(tf_keras_model, legacy)
    keras3_models.load_weights(loaded, legacy)
    np.testing.assert_array_equal(
        keras3_layers.named_weights(loaded)["stage2_a_conv/kernel"],
        tf_keras_model.get_layer("stage2_a_conv").kernel.numpy())
    with self.assertRaisesRegex(ValueError, "does not exist"):
      keras3_models.load_weights(loaded, path + ".missing")

  def test_bad_frontend_backend_and_options_are_refused(self):
    workdir = self.workdir("refused")
    with self.assertRaisesRegex(ValueError, r"config\.frontend='keras4'"):
      checks.validate(self.config(frontend="keras4"), self.one_device, workdir,
                      default_config=default.get_config())
    with self.assertRaisesRegex(ValueError, r"litert_int8_activations=True "
                                r"is only in the tf_keras frontend"):
      checks.validate(self.config(litert=True, litert_int8_activations=True),
                      self.one_device, workdir,
                      default_config=default.get_config())
    with self.assertRaisesRegex(ValueError, r"litert=True needs the "
                                r"TensorFlow backend"):
      keras3_training.check(self.config(litert=True, backend="jax"))
    with self.assertRaisesRegex(ValueError, "imported keras with the "
                                "'tensorflow' backend already"):
      keras3_distribute.make_strategy(self.config(backend="jax"), "mirrored")
    self.assertFalse(os.path.exists(workdir))


class JaxBackendTest(digits_data.DigitsTestCase, absltest.TestCase):

  def _run_checks(self, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(_TESTS, "keras3_training_checks.py"),
         *args], cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=processes.environment(
            KERAS_BACKEND="jax", OPQ_DIGITS_DATA_DIR=self.data_dir, **env))

  def test_jax_checks_pass(self):
    process = self._run_checks()
    output = process.communicate(timeout=_TIMEOUT)[0]
    self.assertEqual(process.returncode, 0, output[-6000:])
    self.assertRegex(output, r"Ran 4 tests")
    self.assertRegex(output, r"\nOK")

  def test_two_processes_train_as_one_data_parallel_run(self):
    addresses = ",".join(f"localhost:{port}"
                         for port in processes.free_ports(2))
    workdirs = [os.path.join(self.root, f"process{index}") for index in range(2)]
    outputs = [os.path.join(self.root, f"process{index}.npz")
               for index in range(2)]
    children = [self._run_checks(
        "worker", workdirs[index], outputs[index],
        KERAS_DISTRIBUTION_JOB_ADDRESSES=addresses,
        KERAS_DISTRIBUTION_NUM_PROCESSES="2",
        KERAS_DISTRIBUTION_PROCESS_ID=str(index)) for index in range(2)]
    logs = [process.communicate(timeout=_TIMEOUT)[0] for process in children]
    for process, log in zip(children, logs):
      self.assertEqual(process.returncode, 0, log[-4000:])
      self.assertIn("PROCESSES 2 REPLICAS 4 STEPS 3", log)
    first, second = np.load(outputs[0]), np.load(outputs[1])
    for name in first.files:
      np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # Only process 0 (the chief) writes its workdir.
    self.assertEqual(
        sorted(os.listdir(layout.checkpoint_dir(workdirs[0], "finetune"))),
        ["ckpt-2.npz", "ckpt-3.npz"])
    self.assertFalse(os.path.exists(workdirs[1]))

  def test_killed_run_default_resumes_with_the_same_plan_and_masks(self):
    saved = os.path.join(self.root, "user_model.keras")
    _tiny_model(synchronized=False).save(saved)
    workdir = os.path.join(self.root, "killed")
    steps = 16
    command = [
        sys.executable, "-m", "trainers.run_default", f"--workdir={workdir}",
        "--config.frontend=keras3", f"--config.model=saved:{saved}",
        f"--config.data_dir={self.data_dir}", "--config.global_batch_size=16",
        f"--config.steps_per_epoch={steps}", "--config.fp32_epochs=1",
        "--config.num_epochs=1", "--config.steps_per_checkpoint=2",
        "--config.calibration_images=0", "--config.eval_batch_size=500",
        "--cpu_devices=2"]
    env = processes.environment(KERAS_BACKEND="jax")
    log = os.path.join(self.root, "killed.log")
    with open(log, "w") as stderr:
      process = subprocess.Popen(command, cwd=_ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
      first = os.path.join(layout.checkpoint_dir(workdir, "finetune"),
                           "ckpt-2.npz")
      deadline = time.time() + _TIMEOUT
      while not os.path.exists(first):
        if process.poll() is not None:
          with open(log) as f:
            self.fail(f"finished before it could be killed:\n{f.read()[-3000:]}")
        self.assertLess(time.time(), deadline)
        time.sleep(0.02)
      process.send_signal(signal.SIGKILL)
      process.wait()
    self.assertFalse(os.path.exists(os.path.join(workdir, layout.FINAL_REPORT)))
    with open(os.path.join(workdir, layout.PLAN_FILE), "rb") as f:
      plan_bytes = f.read()

    rerun = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True,
                           text=True, timeout=_TIMEOUT, check=False)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    with open(os.path.join(workdir, layout.FINAL_REPORT)) as f:
      report = json.load(f)
    self.assertEqual((report["backend"], report["replicas"]), ("jax", 2))
    self.assertEqual(report["finetune"]["steps"], steps)
    self.assertBetween(report["finetune"]["resumed_from_step"], 2, steps - 1)
    with open(os.path.join(workdir, layout.PLAN_FILE), "rb") as f:
      self.assertEqual(f.read(), plan_bytes, "the plan was recomputed")
    self.assertRegex(rerun.stdout, r"compressed_after_finetune\s+top-1 \d\.\d{4}")
    config = _config(self.data_dir, "", model=f"saved:{saved}")
    fp32_model = keras3_models.build_for_config(config)
    keras3_models.load_weights(fp32_model,
                               os.path.join(workdir, layout.FP32_WEIGHTS))
    rebuilt = opq_tf.load_packed(report["export"]["packed"],
                                 lambda: keras3_models.build_for_config(config))
    _assert_plan_masks(self, workdir, fp32_model, rebuilt)

  def test_a_backend_clash_exits_2_before_tensorflow_loads(self):
    workdir = os.path.join(self.root, "clash")
    result = subprocess.run(
        [sys.executable, "-m", "trainers.train", f"--workdir={workdir}",
         "--config.frontend=keras3", "--config.backend=jax"], cwd=_ROOT,
        env=processes.environment(KERAS_BACKEND="tensorflow"),
        capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    self.assertEqual(result.returncode, 2, result.stderr[-3000:])
    self.assertIn("train: error: config.backend='jax' but KERAS_BACKEND="
                  "'tensorflow'", result.stderr)
    self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
