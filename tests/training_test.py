"""Tests for the training system (opq_tf.training.training and its parts:
layout, data, loop, planning, job, serving, report): real tiny runs
on the digits stand-in of ImageNet, and the package's import structure.

The digits data is shared per process (digits_data); every run trains
small_resnet for a few steps of a 16-image global batch. Killed runs of the
binaries are in distributed_test.py, input checks in checks_test.py.
"""

import ast
import glob
import inspect
import json
import os
import shutil
import subprocess
import tarfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from configs import default
from opq_tf.core import allocation
from opq_tf.training import data
from opq_tf.training import distribute
from opq_tf.training import imagenet_input
from opq_tf.training import imagenet_manual
from opq_tf.training import layout
from opq_tf.training import loop
from opq_tf.training import models
from opq_tf.training import planning
from opq_tf.training import pretrained
from opq_tf.training import training
import cpu_devices
import digits_data
from opq_tf.tf_keras._keras import keras, tf
from opq_tf.tf_keras.wrapping import apply, compressed_kernels
from opq_tf.tf_keras.exporting import load_packed


cpu_devices.split_cpu()

# Same data, same initial weights, same global batch: one device and two
# replicas (synchronized BatchNorm, loss over the global batch) differ only
# by float32 summation order. Measured here over 4 steps at lr 0.01: per-step
# losses within 1e-7 relative, weight updates within 7e-6 (on digits_data's
# 4 record files; the batches of 2 files happen to amplify rounding to 1e-5
# and 3e-3). (At lr 0.1 with
# warmup the E[x^2] - E[x]^2 BatchNorm statistics' rounding is amplified by
# training to ~1e-3 after a few steps, so the test keeps the rate small.)
_REPLICA_RTOL = 1e-5
_UPDATE_RTOL = 1e-4


def _scalars(directory: str, tag: str) -> dict[int, list[float]]:
  """step -> values of a scalar summary, from every event file under directory."""
  values = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values.setdefault(event.step, []).append(
              float(tf.make_ndarray(value.tensor)))
  return values


def _masks(config, weights_path: str, workdir: str, checkpoint: str = ""
           ) -> dict[str, np.ndarray]:
  """Masks of the workdir's compressed model after restoring `checkpoint`.

  The plan is applied to the FP32 weights at `weights_path` first, so a mask
  that differs from that application's came from the checkpoint.
  """
  model = models.build(config.model, config.num_classes, config.image_size)
  pretrained.load(model, weights_path)
  qmodel = apply(model, planning.read(workdir))
  if checkpoint:
    tf.train.Checkpoint(model=qmodel).restore(checkpoint).expect_partial()
  return {k.key: k.mask for k in compressed_kernels(qmodel)}


class TrainingTest(digits_data.DigitsTestCase, tf.test.TestCase,
                   parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.one_device = distribute.make_strategy("one_device")
    cls.mirrored = distribute.make_strategy("mirrored")
    cls.fp32 = training.train_fp32(cls.config(), cls.workdir("fp32_one"),
                                   cls.one_device, cls.data_dir)

  @classmethod
  def config(cls, **overrides):
    config = default.get_config()
    config.update(dict(
        data_dir=cls.data_dir, manual_dir=cls.manual_dir,
        global_batch_size=16, eval_batch_size=100, steps_per_epoch=4,
        fp32_epochs=1, fp32_learning_rate=0.01, fp32_warmup_epochs=0.0,
        num_epochs=1, warmup_epochs=0.0, steps_per_checkpoint=2,
        log_every_steps=1))
    config.update(overrides)
    return config

  def test_fp32_run_writes_weights_metrics_and_summaries(self):
    workdir = self.workdir("fp32_one")
    self.assertTrue(os.path.exists(os.path.join(workdir, layout.FP32_WEIGHTS)))
    accuracy = self.fp32["accuracy"]
    self.assertEqual(accuracy["examples"], 500)
    self.assertBetween(accuracy["top1"], 0.0, 1.0)
    self.assertGreaterEqual(accuracy["top5"], accuracy["top1"])
    losses = _scalars(os.path.join(workdir, "tensorboard", "fp32"), "train/loss")
    self.assertEqual(sorted(losses), [1, 2, 3, 4])
    rates = _scalars(os.path.join(workdir, "tensorboard", "fp32"),
                     "train/learning_rate")
    # No warmup: cosine from 0.01 at step 1 towards 0 after step 4.
    self.assertAlmostEqual(rates[1][0], 0.01)
    self.assertAlmostEqual(rates[3][0], 0.005, places=7)
    self.assertAlmostEqual(rates[4][0], 0.01 * (1 + np.cos(0.75 * np.pi)) / 2,
                           places=7)
    self.assertEqual(self.fp32["training"]["steps"], 4)
    # A rerun on the finished workdir does not retrain.
    again = training.train_fp32(self.config(), workdir, self.one_device,
                                self.data_dir)
    self.assertEqual(again["accuracy"], json.loads(json.dumps(accuracy)))

  def test_mirrored_two_replicas_match_one_device(self):
    self.assertEqual(self.mirrored.num_replicas_in_sync, 2)
    workdir = self.workdir("fp32_mirrored")
    mirrored = training.train_fp32(self.config(), workdir, self.mirrored,
                                   self.data_dir)
    one = _scalars(os.path.join(self.workdir("fp32_one"), "tensorboard", "fp32"),
                   "train/loss")
    two = _scalars(os.path.join(workdir, "tensorboard", "fp32"), "train/loss")
    self.assertEqual(sorted(one), sorted(two))
    np.testing.assert_allclose([two[s] for s in sorted(two)],
                               [one[s] for s in sorted(one)], rtol=_REPLICA_RTOL)
    # The weight updates agree too (a gradient scaled per replica instead of
    # per global batch, or BatchNorm on half batches, would be off by ~100%).
    keras.utils.set_random_seed(self.config().seed)  # as train_fp32 does
    initial = models.build("small_resnet", 10, 32)
    updates = []
    for run in ("fp32_one", "fp32_mirrored"):
      trained = models.build("small_resnet", 10, 32)
      pretrained.load(trained, os.path.join(self.workdir(run),
                                                   layout.FP32_WEIGHTS))
      updates.append(np.concatenate([
          (after.numpy() - before.numpy()).ravel() for after, before in zip(
              trained.trainable_weights, initial.trainable_weights)]))
    self.assertGreater(np.linalg.norm(updates[0]), 0.01)
    self.assertLess(np.linalg.norm(updates[1] - updates[0])
                    / np.linalg.norm(updates[0]), _UPDATE_RTOL)
    self.assertAlmostEqual(mirrored["accuracy"]["top1"],
                           self.fp32["accuracy"]["top1"], delta=0.004)

  def test_finetune_resumes_with_the_saved_plan_masks_and_steps(self):
    workdir = self.workdir("compress")
    fp32_weights = os.path.join(self.workdir("fp32_one"), layout.FP32_WEIGHTS)
    config = self.config(pretrained=fp32_weights, num_epochs=1, litert=True,
                         calibrate_reconstruct=True)
    first = training.compress_and_finetune(config, workdir, self.one_device,
                                              self.data_dir)
    # Calibration (BatchNorm re-estimation and reconstruction on training
    # images) runs once, before finetuning, and changes the network it
    # evaluates. (How much it repairs a well-trained one is measured by
    # benchmarks/accuracy.py and benchmarks/pretrained.py; this FP32 model
    # trained for 4 steps.)
    self.assertGreater(first["seconds"]["calibrate"], 0)
    self.assertGreater(first["calibration"]["kernels_reconstructed"], 0)
    self.assertGreater(first["calibration"]["biases_corrected"], 0)
    self.assertGreater(first["calibration"]["batchnorm_layers"], 0)
    self.assertNotEqual(first["accuracy"]["calibrated_before_finetune"]["loss"],
                        first["accuracy"]["compressed_before_finetune"]["loss"])

    plan_path = os.path.join(workdir, layout.PLAN_FILE)
    plan_bytes, plan_mtime = open(plan_path, "rb").read(), os.stat(
        plan_path).st_mtime_ns
    checkpoints = os.path.join(workdir, "finetune", "checkpoints")
    final_masks = _masks(config, fp32_weights, workdir,
                         os.path.join(checkpoints, "ckpt-4"))
    plan = allocation.CompressionPlan.from_json(plan_bytes.decode())
    fp32_model = models.build("small_resnet", 10, 32)
    pretrained.load(fp32_model, fp32_weights)
    for layer in plan.kernels:  # masks = |w_fp32| >= threshold, never retrained
      kernel = getattr(fp32_model.get_layer(layer.name), layer.weight).numpy()
      np.testing.assert_array_equal(final_masks[layer.key],
                                    np.abs(kernel) >= layer.threshold)

    # Interrupt after step 2: drop step 4's checkpoint, leave a half-written
    # save of it behind (data without index) and no export.
    for path in glob.glob(os.path.join(checkpoints, "ckpt-4*")):
      os.remove(path)
    with open(os.path.join(checkpoints, "ckpt-4.data-00000-of-00001"), "wb") as f:
      f.write(b"half written")
    with open(os.path.join(checkpoints, "checkpoint"), "w") as f:
      f.write('model_checkpoint_path: "ckpt-2"\n'
              'all_model_checkpoint_paths: "ckpt-2"\n')
    shutil.rmtree(os.path.join(workdir, layout.EXPORT_DIR))
    os.remove(os.path.join(workdir, layout.FINAL_REPORT))

    # Resume from other FP32 weights: if masks were recomputed from them
    # instead of restored, they would differ.
    perturbed = models.build("small_resnet", 10, 32)
    pretrained.load(perturbed, fp32_weights)
    rng = np.random.default_rng(0)
    for weight in perturbed.trainable_weights:
      weight.assign(weight + rng.normal(0, 0.05, weight.shape).astype(np.float32))
    perturbed_path = os.path.join(self.root, "perturbed.h5")
    perturbed.save_weights(perturbed_path)
    resumed_config = self.config(pretrained=perturbed_path, num_epochs=1,
                                 litert=True, litert_int8_activations=True)
    second = training.compress_and_finetune(resumed_config, workdir,
                                               self.one_device, self.data_dir)

    self.assertEqual(open(plan_path, "rb").read(), plan_bytes)
    self.assertEqual(os.stat(plan_path).st_mtime_ns, plan_mtime)
    self.assertEqual(second["finetune"]["resumed_from_step"], 2)
    # The finetuning checkpoint holds the calibrated statistics: no rerun.
    self.assertEqual(second["seconds"]["calibrate"], 0)
    self.assertEqual(second["finetune"]["steps"], 4)
    resumed_masks = _masks(config, perturbed_path, workdir,
                           os.path.join(checkpoints, "ckpt-4"))
    recomputed = _masks(config, perturbed_path, workdir)
    self.assertTrue(any(not np.array_equal(recomputed[k], final_masks[k])
                        for k in final_masks))
    for key, mask in final_masks.items():
      np.testing.assert_array_equal(resumed_masks[key], mask, err_msg=key)
    # Steps 3 and 4 saw the same batches and state as in the first run.
    losses = _scalars(os.path.join(workdir, "tensorboard", "finetune"),
                      "train/loss")
    for step in (3, 4):
      self.assertLen(losses[step], 2)
      np.testing.assert_allclose(losses[step][1], losses[step][0], rtol=1e-5)
    self.assertEqual(second["accuracy"]["compressed_before_finetune"],
                     json.loads(json.dumps(
                         first["accuracy"]["compressed_before_finetune"])))

    report = json.load(open(os.path.join(workdir, layout.FINAL_REPORT)))
    self.assertEqual(set(report["accuracy"]), {
        "fp32", "compressed_before_finetune", "calibrated_before_finetune",
        "compressed_after_finetune"})
    tflite = os.path.join(workdir, layout.EXPORT_DIR, "model.tflite")
    self.assertEqual(report["litert"]["bytes"], os.path.getsize(tflite))
    self.assertIn("int8", report["litert"]["bits_note"])
    # Float-activation .tflite: the Keras model's logits up to rounding (first
    # run); int8 activations (the resumed run's export) reported beside the
    # float-activation conversion of the same model.
    first_accuracy = first["litert"]["accuracy"]["float_activations"]
    self.assertEqual(first_accuracy["top1_agreement"], 1.0)
    self.assertEqual(first_accuracy["tflite_top1_accuracy"],
                     first_accuracy["keras_top1_accuracy"])
    accuracy = report["litert"]["accuracy"]
    self.assertEqual(accuracy["images"], 500)
    self.assertEqual(report["litert"]["activations"], "int8")
    self.assertEqual(set(accuracy), {"images", "int8_activations",
                                     "float_activations"})
    self.assertGreater(accuracy["int8_activations"]["top1_agreement"], 0.8)
    self.assertAlmostEqual(report["plan"]["realised_pruning_rate"], 0.9,
                           places=3)
    self.assertGreater(report["compression"]["weight_bits_ratio"], 50)
    self.assertGreater(report["compression"]["model_ratio"], 10)
    self.assertGreater(report["finetune"]["images_per_second"], 0)
    sparsity = _scalars(os.path.join(workdir, "tensorboard", "finetune"),
                        "compression/sparsity")

    # The SavedModel serves encoded JPEGs and agrees with the packed file.
    export_dir = os.path.join(workdir, layout.EXPORT_DIR)
    loaded = tf.saved_model.load(os.path.join(export_dir, "saved_model"))
    serve = loaded.signatures["serving_default"]
    with tarfile.open(os.path.join(self.manual_dir,
                                   imagenet_manual.VAL_TAR)) as tar:
      jpegs = [tar.extractfile(m).read() for m in tar.getmembers()[:6]]
    outputs = serve(jpegs=tf.constant(jpegs))
    self.assertEqual(outputs["classes"].shape, (6,))
    np.testing.assert_allclose(
        tf.reduce_sum(outputs["probabilities"], axis=-1), np.ones(6), rtol=1e-5)
    packed = load_packed(os.path.join(export_dir, "model.opq"),
                         lambda: models.build("small_resnet", 10, 32))
    images = imagenet_input.preprocess_for_eval(tf.constant(jpegs), 32)
    np.testing.assert_allclose(outputs["logits"], packed(images, training=False),
                               rtol=1e-4, atol=1e-4)
    # The sparsity summary counts the zeros of the compressed kernels: the
    # pruned ones, plus the few kept weights that per-channel steps (and
    # reconstruction, which moves kept weights) round to 0.
    zeros = sum(np.count_nonzero(
        getattr(packed.get_layer(kernel.name), kernel.weight).numpy() == 0)
                for kernel in plan.kernels)
    self.assertAlmostEqual(sparsity[4][-1], zeros / plan.total_weights,
                           places=6)
    self.assertAlmostEqual(sparsity[4][-1],
                           report["compression"]["realised_pruning_rate"],
                           delta=0.01)

    # report.json records what the export was made from; an unchanged rerun
    # reuses it, one with more epochs (other weights) replaces it whole.
    report_path = os.path.join(export_dir, "report.json")
    packed_path = os.path.join(export_dir, "model.opq")
    self.assertEqual(json.load(open(report_path))["made_from"], {
        "checkpoint_step": 4,
        "options": {"litert": True, "litert_int8_activations": True,
                    "litert_weights": "int8"}})
    packed_mtime = os.stat(packed_path).st_mtime_ns
    training.compress_and_finetune(resumed_config, workdir, self.one_device,
                                      self.data_dir)
    self.assertEqual(os.stat(packed_path).st_mtime_ns, packed_mtime)
    # A killed export's staging directory (its process is gone) is removed.
    finished = subprocess.Popen(["true"])
    finished.wait()
    leftover = os.path.join(workdir, f".export.tmp-{finished.pid}-killed")
    os.makedirs(os.path.join(leftover, "export"))
    longer = self.config(pretrained=perturbed_path, num_epochs=2)  # no LiteRT
    third = training.compress_and_finetune(longer, workdir, self.one_device,
                                              self.data_dir)
    self.assertEqual(third["finetune"]["steps"], 8)
    self.assertEqual(json.load(open(report_path))["made_from"], {
        "checkpoint_step": 8,
        "options": {"litert": False, "litert_int8_activations": False,
                    "litert_weights": "int8"}})
    self.assertFalse(os.path.exists(tflite))
    self.assertFalse(os.path.exists(leftover))
    self.assertEqual([n for n in os.listdir(workdir) if ".tmp-" in n], [])
    self.assertEqual(json.load(open(os.path.join(workdir, layout.FINAL_REPORT)))
                     ["finetune"]["steps"], 8)
    # The packed file holds step 8's weights: those of its checkpoint.
    model = models.build("small_resnet", 10, 32)
    pretrained.load(model, perturbed_path)
    qmodel = apply(model, plan)
    tf.train.Checkpoint(model=qmodel).restore(
        os.path.join(checkpoints, "ckpt-8")).expect_partial()
    finetuned = {k.key: k.compressed for k in compressed_kernels(qmodel)}
    packed = load_packed(packed_path,
                         lambda: models.build("small_resnet", 10, 32))
    for kernel in plan.kernels:
      np.testing.assert_allclose(
          getattr(packed.get_layer(kernel.name), kernel.weight).numpy(),
          finetuned[kernel.key], rtol=1e-6, atol=1e-7, err_msg=kernel.key)

  def test_train_and_evaluate_prepares_the_data_once(self):
    """The whole job: one prepare_data, its data_dir passed down; and the
    config's step_fit (which no option list used to pass) reaches the plan."""
    workdir = self.workdir("train_and_evaluate")
    config = self.config(steps_per_epoch=2, calibration_images=0,
                         step_fit="laplace")
    with mock.patch.object(data, "prepare_data",
                           wraps=data.prepare_data) as prepare_data:
      report = training.train_and_evaluate(config, workdir, self.one_device)
    prepare_data.assert_called_once_with(config, workdir, self.one_device)
    self.assertEqual(report["fp32_training"]["steps"], 2)
    self.assertEqual(report["finetune"]["steps"], 2)
    self.assertIsNone(report["accuracy"]["calibrated_before_finetune"])
    self.assertEqual(planning.read(workdir).step_fit, "laplace")

  def test_warmup_cosine(self):
    schedule = loop.WarmupCosine(0.2, warmup_steps=10, total_steps=110)
    lr = lambda step: float(schedule(step))
    self.assertAlmostEqual(lr(0), 0.0)
    self.assertAlmostEqual(lr(5), 0.1, places=6)
    self.assertAlmostEqual(lr(10), 0.2, places=6)
    self.assertAlmostEqual(lr(60), 0.1, places=6)
    self.assertAlmostEqual(lr(110), 0.0, places=6)
    self.assertEqual(
        loop.WarmupCosine(**schedule.get_config()).get_config(),
        schedule.get_config())

  def test_fit_resumes_under_mirrored_strategy(self):
    """The defect of issue 7: resuming under MirroredStrategy died in fit."""
    workdir = self.workdir("fit_mirrored")
    config = self.config(steps_per_epoch=2, steps_per_checkpoint=1)

    def run(epochs):
      keras.utils.set_random_seed(0)
      with self.mirrored.scope():
        model = models.build("small_resnet", 10, 32)
      return loop.fit(model, config, self.mirrored, self.data_dir, workdir,
                      phase="fp32", epochs=epochs, learning_rate=0.01,
                      warmup_epochs=0.0)

    self.assertEqual(run(1)["resumed_from_step"], 0)
    resumed = run(2)
    self.assertEqual(resumed["resumed_from_step"], 2)
    self.assertEqual(resumed["steps"], 4)

  def test_fit_falls_back_to_the_previous_readable_checkpoint(self):
    workdir = self.workdir("fit_fallback")
    config = self.config(steps_per_epoch=2, steps_per_checkpoint=1)

    def run(epochs):
      keras.utils.set_random_seed(0)
      with self.one_device.scope():
        model = models.build("small_resnet", 10, 32)
      return loop.fit(model, config, self.one_device, self.data_dir, workdir,
                      phase="fp32", epochs=epochs, learning_rate=0.01,
                      warmup_epochs=0.0)

    run(1)  # ckpt-1 (mid-epoch) and ckpt-2
    checkpoints = layout.checkpoint_dir(workdir, "fp32")
    (newest,) = glob.glob(os.path.join(checkpoints, "ckpt-2.data-*"))
    with open(newest, "r+b") as f:
      f.truncate(os.path.getsize(newest) // 2)
    with self.assertLogs("absl", level="WARNING") as logs:
      resumed = run(2)
    self.assertIn(newest, "\n".join(logs.output))
    self.assertEqual(resumed["resumed_from_step"], 1)
    self.assertEqual(resumed["steps"], 4)
    for index in glob.glob(os.path.join(checkpoints, "ckpt-*.index")):
      with open(index, "r+b") as f:
        f.truncate(8)
    with self.assertRaisesRegex(
        layout.WorkdirError, rf"No checkpoint under {checkpoints} is readable "
        r"\(.*ckpt-4\.index.*ckpt-2\.index.*\). Remove that directory"):
      run(3)

  def test_kernel_l2_is_half_wd_times_the_squared_kernels(self):
    model = models.build("small_resnet", 10, 32)
    kernels = [layer.kernel for layer in model.layers
               if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)]
    self.assertLen(kernels, 11)
    expected = 0.5 * 1e-3 * sum(float(tf.reduce_sum(k * k)) for k in kernels)
    self.assertAllClose(loop.kernel_l2(model, 1e-3), expected, rtol=1e-5)
    self.assertEqual(float(loop.kernel_l2(model, 0.0)), 0.0)
    # Biases and BatchNorm are not decayed.
    logits = model.get_layer("logits")
    logits.bias.assign(tf.ones_like(logits.bias))
    self.assertAllClose(loop.kernel_l2(model, 1e-3), expected, rtol=1e-5)

  def test_train_step_with_jit_compile_matches_without(self):
    """The XLA path of make_train_step: same loss, same update, one replica."""
    dataset_fn = imagenet_input.make_dataset_fn(
        split="train", data_dir=self.data_dir, image_size=32,
        global_batch_size=16, train=True, num_classes=10, seed=0)
    results = []
    for jit_compile in (False, True):
      keras.utils.set_random_seed(0)
      with self.one_device.scope():
        model = models.build("small_resnet", 10, 32)
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9,
                                         jit_compile=jit_compile)
        optimizer.build(model.trainable_variables)
      step = loop.make_train_step(
          model, optimizer, self.one_device, global_batch_size=16,
          weight_decay=1e-4, jit_compile=jit_compile)
      iterator = iter(self.one_device.distribute_datasets_from_function(
          dataset_fn))
      sums = step(iterator).numpy()
      results.append((sums, [w.numpy() for w in model.trainable_weights]))
    (loss, correct), weights = results[0]
    (jit_loss, jit_correct), jit_weights = results[1]
    self.assertAllClose(jit_loss, loss, rtol=1e-4)
    self.assertEqual(jit_correct, correct)
    for before, after in zip(weights, jit_weights):
      self.assertAllClose(after, before, rtol=1e-3, atol=1e-5)



class PlanningTest(absltest.TestCase):

  def test_every_allocation_field_of_the_config_reaches_allocate(self):
    config = default.get_config()
    parameters = inspect.signature(allocation.allocate).parameters
    allocation_fields = {
        name for name, parameter in parameters.items()
        if name in config and parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY)}
    self.assertContainsSubset({"pruning_rate", "bits", "method", "step_fit"},
                              allocation_fields)
    self.assertEqual(set(planning.allocate_options(config)), allocation_fields)

  def test_a_plan_records_the_options_it_was_allocated_with(self):
    """What checks compares an existing plan.json against."""
    config = default.get_config()
    config.update(dict(pruning_rate=0.7, bits=3, objective="per_kernel",
                       step_granularity="kernel", step_stats="layer",
                       step_fit="laplace"))
    kernels = {"dense": np.random.default_rng(0).laplace(
        size=(64, 32)).astype(np.float32)}
    plan = allocation.allocate(kernels, **planning.allocate_options(config))
    self.assertEqual(planning.recorded_options(plan),
                     planning.allocate_options(config))

  def test_mixed_bits_spend_bits_as_the_average_budget(self):
    config = default.get_config()
    config.update(dict(pruning_rate=0.5, bits=4, mixed_bits=True))
    rng = np.random.default_rng(0)
    kernels = {f"dense{i}": rng.laplace(size=(16 * (i + 1), 32)).astype(
        np.float32) for i in range(8)}
    plan = allocation.allocate(kernels, **planning.allocate_options(config))
    self.assertEqual((plan.bits, plan.average_bits), ("mixed", 4.0))
    self.assertLessEqual(plan.realised_average_bits, 4.0)
    self.assertEqual(planning.recorded_options(plan),
                     planning.allocate_options(config))
    config.mixed_bits = False
    self.assertNotEqual(planning.recorded_options(plan),
                        planning.allocate_options(config))


class DataDirsTest(absltest.TestCase):

  def test_data_dirs_of_a_config(self):
    config = default.get_config()
    self.assertEqual(data.data_dirs(config, "/w"), ("/w/tfds", "/w/manual"))
    config.update(dict(data_dir="/d", manual_dir="/m"))
    self.assertEqual(data.data_dirs(config, "/w"), ("/d", "/m"))
    config.update(dict(data_dir="", manual_dir="",
                       build_digits_manual_dir=False))
    data_dir, manual_dir = data.data_dirs(config, "/w")
    self.assertEqual(manual_dir, "")
    self.assertNotIn("/w", data_dir)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _opq_tf_imports() -> dict[str, set[str]]:
  """opq_tf module -> the opq_tf modules it imports (anywhere in it, lazily
  too); `from package import name` counts as package.name when that is a
  module, else as the package."""
  modules = {}
  for directory, _, names in os.walk(os.path.join(_ROOT, "opq_tf")):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path, _ROOT)[:-3].replace(os.sep, ".")
        modules[module.removesuffix(".__init__")] = path
  imports = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        imported |= {alias.name for alias in node.names} & set(modules)
      elif isinstance(node, ast.ImportFrom) and node.module:
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          if full in modules:
            imported.add(full)
          elif node.module in modules:
            imported.add(node.module)
    imports[module] = imported - {module}
  return imports


class ImportsTest(absltest.TestCase):
  """The library's import structure, read from the source (ast)."""

  def test_no_opq_tf_module_imports_configs(self):
    for directory, _, names in os.walk(os.path.join(_ROOT, "opq_tf")):
      for name in names:
        if not name.endswith(".py"):
          continue
        path = os.path.join(directory, name)
        with open(path) as f:
          tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
          elif isinstance(node, ast.ImportFrom) and not node.level:
            roots = [(node.module or "").split(".")[0]]
          else:
            continue
          self.assertNotIn("configs", roots, f"{path}:{node.lineno}")

  def test_no_import_cycle_among_opq_tf_modules(self):
    imports = _opq_tf_imports()
    self.assertIn("opq_tf.training.data", imports["opq_tf.training.job"])

    def cycle_from(module: str, path: list[str]) -> list[str]:
      """A cycle through `path`'s last module, or [] if none."""
      for imported in sorted(imports[module]):
        if imported in path:
          return path[path.index(imported):] + [imported]
        if imported not in finished:
          found = cycle_from(imported, path + [imported])
          if found:
            return found
      finished.add(module)
      return []

    finished = set()
    for module in sorted(imports):
      if module not in finished:
        self.assertEqual(cycle_from(module, [module]), [],
                         "import cycle among opq_tf modules")

if __name__ == "__main__":
  absltest.main()
