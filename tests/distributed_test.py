"""Multi-worker training, SIGKILL and resume, and TF's CLI on the export.

Each test runs real processes: two MultiWorkerMirroredStrategy workers on
localhost with TF_CONFIG, and trainers/compress.py killed with SIGKILL
mid-epoch and started again with the same command. The digits stand-in of
ImageNet is built and prepared with the real TFDS builder once.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

from absl.testing import absltest
import numpy as np

from opq_tf import allocation
from opq_tf import digits_imagenet
from opq_tf import imagenet_input
from opq_tf import models
from opq_tf._keras import keras
from opq_tf.exporting import load_packed

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT = 600

# One worker of a two-worker cluster: FP32 init (same seed everywhere) ->
# allocate -> apply -> three finetuning steps under MultiWorkerMirroredStrategy,
# then every weight (latent kernels, masks, steps, BN) saved for comparison.
_WORKER = """
import sys
import numpy as np
from configs import default
from opq_tf import training, models
from opq_tf.wrapping import apply
from opq_tf._keras import keras

workdir, data_dir, out = sys.argv[1:4]
config = default.get_config()
config.update(dict(data_dir=data_dir, global_batch_size=16, steps_per_epoch=3,
                   steps_per_checkpoint=2, num_epochs=1))
strategy = training.make_strategy("multi_worker")
keras.utils.set_random_seed(0)
with strategy.scope():
  model = models.build(config.model, config.num_classes, config.image_size)
  qmodel = apply(model, pruning_rate=0.8, bits=3)
result = training._fit(qmodel, config, strategy, data_dir, workdir,
                       phase="finetune", epochs=1, learning_rate=0.05,
                       warmup_epochs=0.0)
np.savez(out, *[w for w in qmodel.get_weights()])
print("STEPS", result["steps"], "LOSS", result["train_loss"])
"""


def _free_ports(count: int) -> list[int]:
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _environment(**extra) -> dict:
  env = dict(os.environ, PYTHONPATH=_ROOT, TF_CPP_MIN_LOG_LEVEL="2", **extra)
  env.pop("TF_CONFIG", None)
  return env


class DistributedTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.manual_dir = os.path.join(cls.root, "manual")
    cls.data_dir = os.path.join(cls.root, "tfds")
    digits_imagenet.build_manual_dir(cls.manual_dir)
    imagenet_input.prepare(cls.data_dir, cls.manual_dir, num_shards=2)
    # FP32 weights to compress: small_resnet at its (seeded) initialisation.
    keras.utils.set_random_seed(0)
    cls.fp32_model = models.build("small_resnet", 10, 32)
    cls.fp32_weights = os.path.join(cls.root, "fp32.h5")
    cls.fp32_model.save_weights(cls.fp32_weights)

  def test_two_workers_finish_with_identical_weights(self):
    workdir = os.path.join(self.root, "multi_worker")
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    processes, outputs = [], []
    for index in range(2):
      out = os.path.join(self.root, f"worker{index}.npz")
      outputs.append(out)
      tf_config = json.dumps({"cluster": cluster,
                              "task": {"type": "worker", "index": index}})
      processes.append(subprocess.Popen(
          [sys.executable, "-c", _WORKER, workdir, self.data_dir, out],
          cwd=_ROOT, env=_environment(TF_CONFIG=tf_config),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=_TIMEOUT)[0] for p in processes]
    for process, log in zip(processes, logs):
      self.assertEqual(process.returncode, 0, log[-3000:])
      self.assertIn("STEPS 3", log)
    first, second = np.load(outputs[0]), np.load(outputs[1])
    self.assertLen(first.files, len(second.files))
    for name in first.files:
      np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # Only the chief writes the workdir's checkpoints.
    self.assertTrue(os.path.exists(
        os.path.join(workdir, "finetune", "checkpoints", "checkpoint")))

  def test_sigkill_mid_epoch_then_resume_with_the_same_plan(self):
    workdir = os.path.join(self.root, "resume")
    command = [
        sys.executable, "-m", "trainers.compress", f"--workdir={workdir}",
        f"--pretrained={self.fp32_weights}", "--strategy=one_device",
        f"--config.data_dir={self.data_dir}",
        f"--config.manual_dir={self.manual_dir}",
        "--config.global_batch_size=16", "--config.steps_per_epoch=10",
        "--config.num_epochs=3", "--config.steps_per_checkpoint=2",
        "--config.pruning_rate=0.8", "--config.bits=3",
    ]
    checkpoints = os.path.join(workdir, "finetune", "checkpoints")
    process = subprocess.Popen(command, cwd=_ROOT, env=_environment(),
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + _TIMEOUT
    while not os.path.exists(os.path.join(checkpoints, "ckpt-4.index")):
      self.assertIsNone(process.poll(), "finished before it could be killed")
      self.assertLess(time.time(), deadline)
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    self.assertFalse(os.path.exists(os.path.join(workdir, "final_report.json")))
    plan_path = os.path.join(workdir, "plan.json")
    with open(plan_path, "rb") as f:
      plan_bytes = f.read()
    plan_mtime = os.stat(plan_path).st_mtime_ns

    resumed = subprocess.run(command, cwd=_ROOT, env=_environment(),
                             capture_output=True, text=True, timeout=_TIMEOUT)
    self.assertEqual(resumed.returncode, 0, resumed.stderr[-3000:])
    with open(os.path.join(workdir, "final_report.json")) as f:
      report = json.load(f)
    finetune = report["finetune"]
    self.assertEqual(finetune["steps"], 30)
    self.assertGreaterEqual(finetune["resumed_from_step"], 4)
    self.assertLess(finetune["resumed_from_step"], 30)
    self.assertNotEqual(finetune["resumed_from_step"] % 10, 0, "not mid-epoch")
    with open(plan_path, "rb") as f:
      self.assertEqual(f.read(), plan_bytes, "the plan was recomputed")
    self.assertEqual(os.stat(plan_path).st_mtime_ns, plan_mtime)

    # The exported kernels use the original masks and steps: zero wherever
    # the FP32 weight was below its threshold, on the grid everywhere.
    plan = allocation.CompressionPlan.from_json(plan_bytes.decode())
    export_dir = os.path.join(workdir, "export")
    rebuilt = load_packed(os.path.join(export_dir, "model.opq"),
                          lambda: models.build("small_resnet", 10, 32))
    layers = {layer.name: layer for layer in rebuilt.layers}
    fp32_layers = {layer.name: layer for layer in self.fp32_model.layers}
    for entry in plan.layers:
      kernel = getattr(layers[entry.name], entry.weight).numpy()
      original = getattr(fp32_layers[entry.name], entry.weight).numpy()
      pruned = np.abs(original) < entry.threshold
      self.assertEqual(np.count_nonzero(kernel[pruned]), 0, entry.key)
      codes = kernel / np.float32(entry.step)
      np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    self._check_saved_model_cli(export_dir, rebuilt)

  def _check_saved_model_cli(self, export_dir: str, keras_model) -> None:
    """TF's own saved_model_cli runs the export on JPEG bytes; same top-1."""
    with tarfile.open(os.path.join(self.manual_dir, imagenet_input.VAL_TAR)) as tar:
      members = [m for m in tar.getmembers() if m.isfile()][:4]
      jpegs = np.array([tar.extractfile(m).read() for m in members], dtype=object)
    inputs = os.path.join(self.root, "jpegs.npy")
    np.save(inputs, jpegs, allow_pickle=True)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run(
        [cli, "run", "--dir", os.path.join(export_dir, "saved_model"),
         "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"jpegs={inputs}"],
        capture_output=True, text=True, timeout=_TIMEOUT, env=_environment())
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    printed = result.stdout.split("Result for output key classes:")[1]
    cli_classes = [int(c) for c in printed.split("]")[0].strip(" \n[").split()]
    images = imagenet_input.preprocess_for_eval(jpegs.astype(bytes), 32)
    keras_classes = np.argmax(keras_model(images, training=False), axis=-1)
    self.assertEqual(cli_classes, keras_classes.tolist())


if __name__ == "__main__":
  absltest.main()
