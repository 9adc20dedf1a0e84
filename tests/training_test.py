"""Tests for opq_tf.training: real tiny runs on the digits stand-in of ImageNet.

One digits manual_dir is built and prepared with the real TFDS builder once;
every run trains small_resnet for a few steps of a 16-image global batch.
"""

import glob
import json
import os
import shutil
import tarfile
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from configs import default
from opq_tf import allocation
from opq_tf import imagenet_input
from opq_tf import models
from opq_tf import training
import cpu_devices
from opq_tf._keras import keras, tf
from opq_tf.wrapping import apply, compressed_entries
from opq_tf.exporting import load_packed


cpu_devices.split_cpu()

# Same data, same initial weights, same global batch: one device and two
# replicas (synchronized BatchNorm, loss over the global batch) differ only
# by float32 summation order. Measured here over 4 steps at lr 0.01: per-step
# losses within 1e-7 relative, weight updates within 7e-6. (At lr 0.1 with
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
  models.load_pretrained(model, weights_path)
  with open(os.path.join(workdir, training.PLAN_FILE)) as f:
    plan = allocation.CompressionPlan.from_json(f.read())
  qmodel = apply(model, plan)
  if checkpoint:
    tf.train.Checkpoint(model=qmodel).restore(checkpoint).expect_partial()
  return {e.key: e.mask for e in compressed_entries(qmodel)}


class TrainingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.one_device = training.make_strategy("one_device")
    cls.mirrored = training.make_strategy("mirrored")
    # Builds <root>/manual from the digits and prepares <root>/tfds.
    cls.data_dir = training.prepare_data(default.get_config(), cls.root,
                                         cls.one_device)
    cls.fp32 = training.train_fp32(cls.config(), cls.workdir("fp32_one"),
                                   cls.one_device)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def workdir(cls, name):
    return os.path.join(cls.root, name)

  @classmethod
  def config(cls, **overrides):
    config = default.get_config()
    config.update(dict(
        data_dir=os.path.join(cls.root, "tfds"),
        manual_dir=os.path.join(cls.root, "manual"),
        global_batch_size=16, eval_batch_size=100, steps_per_epoch=4,
        fp32_epochs=1, fp32_learning_rate=0.01, fp32_warmup_epochs=0.0,
        num_epochs=1, warmup_epochs=0.0, steps_per_checkpoint=2,
        log_every_steps=1))
    config.update(overrides)
    return config

  def test_fp32_run_writes_weights_metrics_and_summaries(self):
    workdir = self.workdir("fp32_one")
    self.assertTrue(os.path.exists(os.path.join(workdir, training.FP32_WEIGHTS)))
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
    again = training.train_fp32(self.config(), workdir, self.one_device)
    self.assertEqual(again["accuracy"], json.loads(json.dumps(accuracy)))

  def test_mirrored_two_replicas_match_one_device(self):
    self.assertEqual(self.mirrored.num_replicas_in_sync, 2)
    workdir = self.workdir("fp32_mirrored")
    mirrored = training.train_fp32(self.config(), workdir, self.mirrored)
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
      models.load_pretrained(trained, os.path.join(self.workdir(run),
                                                   training.FP32_WEIGHTS))
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
    fp32_weights = os.path.join(self.workdir("fp32_one"), training.FP32_WEIGHTS)
    config = self.config(pretrained=fp32_weights, num_epochs=1)
    training.validate(config, self.one_device, workdir, phase="compress")
    first = training.compress_and_finetune(config, workdir, self.one_device)

    plan_path = os.path.join(workdir, training.PLAN_FILE)
    plan_bytes, plan_mtime = open(plan_path, "rb").read(), os.stat(
        plan_path).st_mtime_ns
    checkpoints = os.path.join(workdir, "finetune", "checkpoints")
    final_masks = _masks(config, fp32_weights, workdir,
                         os.path.join(checkpoints, "ckpt-4"))
    plan = allocation.CompressionPlan.from_json(plan_bytes.decode())
    fp32_model = models.build("small_resnet", 10, 32)
    models.load_pretrained(fp32_model, fp32_weights)
    for layer in plan.layers:  # masks = |w_fp32| >= threshold, never retrained
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
    shutil.rmtree(os.path.join(workdir, training.EXPORT_DIR))
    os.remove(os.path.join(workdir, training.FINAL_REPORT))

    # Resume from other FP32 weights: if masks were recomputed from them
    # instead of restored, they would differ.
    perturbed = models.build("small_resnet", 10, 32)
    models.load_pretrained(perturbed, fp32_weights)
    rng = np.random.default_rng(0)
    for weight in perturbed.trainable_weights:
      weight.assign(weight + rng.normal(0, 0.05, weight.shape).astype(np.float32))
    perturbed_path = os.path.join(self.root, "perturbed.h5")
    perturbed.save_weights(perturbed_path)
    resumed_config = self.config(pretrained=perturbed_path, num_epochs=1)
    second = training.compress_and_finetune(resumed_config, workdir,
                                            self.one_device)

    self.assertEqual(open(plan_path, "rb").read(), plan_bytes)
    self.assertEqual(os.stat(plan_path).st_mtime_ns, plan_mtime)
    self.assertEqual(second["finetune"]["resumed_from_step"], 2)
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

    report = json.load(open(os.path.join(workdir, training.FINAL_REPORT)))
    self.assertEqual(set(report["accuracy"]), {
        "fp32", "compressed_before_finetune", "compressed_after_finetune"})
    self.assertAlmostEqual(report["plan"]["realised_pruning_rate"], 0.9,
                           places=3)
    self.assertGreater(report["compression"]["weight_bits_ratio"], 50)
    self.assertGreater(report["compression"]["model_ratio"], 10)
    self.assertGreater(report["finetune"]["images_per_second"], 0)
    sparsity = _scalars(os.path.join(workdir, "tensorboard", "finetune"),
                        "compression/sparsity")
    # Zeros of the compressed kernels: the pruned ones (none rounds to 0).
    self.assertAlmostEqual(sparsity[4][-1],
                           report["compression"]["realised_pruning_rate"],
                           places=6)

    # The SavedModel serves encoded JPEGs and agrees with the packed file.
    export_dir = os.path.join(workdir, training.EXPORT_DIR)
    loaded = tf.saved_model.load(os.path.join(export_dir, "saved_model"))
    serve = loaded.signatures["serving_default"]
    with tarfile.open(os.path.join(self.root, "manual",
                                   imagenet_input.VAL_TAR)) as tar:
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

  def test_warmup_cosine(self):
    schedule = training.WarmupCosine(0.2, warmup_steps=10, total_steps=110)
    lr = lambda step: float(schedule(step))
    self.assertAlmostEqual(lr(0), 0.0)
    self.assertAlmostEqual(lr(5), 0.1, places=6)
    self.assertAlmostEqual(lr(10), 0.2, places=6)
    self.assertAlmostEqual(lr(60), 0.1, places=6)
    self.assertAlmostEqual(lr(110), 0.0, places=6)
    self.assertEqual(
        training.WarmupCosine(**schedule.get_config()).get_config(),
        schedule.get_config())

  @parameterized.named_parameters(
      ("model", {"model": "vgg16"}, "config.model='vgg16' is invalid"),
      ("pruning_rate", {"pruning_rate": 1.5}, r"pruning_rate=1.5 .*\[0, 1\)"),
      ("bits", {"bits": 9}, r"bits=9 .*2\.\.8"),
      ("learning_rate", {"learning_rate": -1.0}, "learning_rate=-1.0"),
      ("nan", {"weight_decay": float("nan")}, "weight_decay=nan"),
      ("momentum", {"momentum": 1.0}, "momentum=1.0"),
      ("epochs", {"num_epochs": -2}, "num_epochs=-2"),
      ("image_size", {"model": "alexnet"}, "image_size=32 is too small"),
      ("warmup", {"warmup_epochs": 3.0}, "warmup_epochs=3.0 is longer"),
      ("missing_manual_dir", {"manual_dir": "/nonexistent/ilsvrc"},
       "does not exist"),
      ("missing_pretrained", {"pretrained": "/nonexistent/w.h5"},
       "do not exist"),
  )
  def test_validate_rejects(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      training.validate(self.config(**overrides), self.one_device,
                        self.workdir("never"), phase="all")
    self.assertFalse(os.path.exists(self.workdir("never")))

  def test_validate_rejects_unknown_field_and_indivisible_batch(self):
    config = self.config()
    config.learning_rat = 0.1
    with self.assertRaisesRegex(ValueError, r"Unknown config field.*learning_rat"):
      training.validate(config, self.one_device, self.workdir("never"))
    with self.assertRaisesRegex(ValueError, "not divisible by the 2 replicas"):
      training.validate(self.config(global_batch_size=15), self.mirrored,
                        self.workdir("never"))

  def test_validate_rejects_unusable_workdirs(self):
    a_file = os.path.join(self.root, "a_file")
    open(a_file, "w").close()
    with self.assertRaisesRegex(ValueError, "is a file"):
      training.validate(self.config(), self.one_device, a_file)
    with self.assertRaisesRegex(ValueError, "cannot be created"):
      training.validate(self.config(), self.one_device,
                        os.path.join(a_file, "run"))
    with self.assertRaisesRegex(ValueError, "not writable"):
      training.validate(self.config(), self.one_device, "/proc/opq_run")

  def test_validate_rejects_a_plan_made_for_other_settings(self):
    workdir = self.workdir("other_plan")
    os.makedirs(workdir)
    model = models.build("small_resnet", 10, 32)
    plan = allocation.allocate(model, 0.5, 3)
    with open(os.path.join(workdir, training.PLAN_FILE), "w") as f:
      f.write(plan.to_json())
    config = self.config(pretrained=os.path.join(
        self.workdir("fp32_one"), training.FP32_WEIGHTS))
    with self.assertRaisesRegex(ValueError, "plan.json was computed for"):
      training.validate(config, self.one_device, workdir, phase="compress")

  def test_validate_needs_fp32_weights_to_compress(self):
    with self.assertRaisesRegex(ValueError, "No FP32 weights"):
      training.validate(self.config(), self.one_device, self.workdir("never"),
                        phase="compress")

  def test_validate_rejects_mismatched_pretrained_weights(self):
    path = os.path.join(self.root, "seven_classes.h5")
    models.build("small_resnet", 7, 32).save_weights(path)
    with self.assertRaisesRegex(ValueError, r"'logits'.*\(128, 7\).*\(128, 10\)"):
      training.validate(self.config(pretrained=path), self.one_device,
                        self.workdir("never"))

  def test_make_strategy(self):
    self.assertIsInstance(training.make_strategy("one_device"),
                          tf.distribute.OneDeviceStrategy)
    with self.assertRaisesRegex(ValueError, "Unknown strategy"):
      training.make_strategy("tpu")
    with self.assertRaisesRegex(ValueError, "already started"):
      training.make_strategy("mirrored", cpu_devices=3)


if __name__ == "__main__":
  absltest.main()
