"""Killed and resumed runs, multi-worker training, and TF's CLI on the export.

Each test runs real processes: trainers/run_default.py as a user would, killed
with SIGKILL once during FP32 training and once during finetuning and started
again with the same command, under the default (mirrored) strategy and under
MultiWorkerMirroredStrategy (two workers on localhost with TF_CONFIG); and
two workers finetuning side by side. The digits stand-in of ImageNet comes
prepared from digits_data, shared per process.
"""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

from absl.testing import absltest
import numpy as np

from opq_tf.core import allocation
from opq_tf.training import imagenet_input
from opq_tf.training import imagenet_manual
from opq_tf.tf_keras import layers
from opq_tf.training import models
from opq_tf.training import pretrained
import digits_data
import processes
from opq_tf.tf_keras._keras import keras, tf
from opq_tf.tf_keras.exporting import load_packed

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT = 600
# Both phases: 1 epoch of 10 steps, a checkpoint every 2 steps.
_STEPS_PER_EPOCH = 10
_EPOCHS = 1
_TOTAL_STEPS = _STEPS_PER_EPOCH * _EPOCHS

_WORKER = """
import sys
import numpy as np
from configs import default
from opq_tf.training import distribute
from opq_tf.training import loop
from opq_tf.training import models
from opq_tf.tf_keras.wrapping import apply
from opq_tf.tf_keras._keras import keras, tf

workdir, data_dir, out = sys.argv[1:4]
config = default.get_config()
config.update(dict(data_dir=data_dir, global_batch_size=16, steps_per_epoch=3,
                   steps_per_checkpoint=2, num_epochs=1))
strategy = distribute.make_strategy("multi_worker")
keras.utils.set_random_seed(0)
with strategy.scope():
  model = models.build(config.model, config.num_classes, config.image_size)
  qmodel = apply(model, pruning_rate=0.8, bits=3)
np.savez(out.replace(".npz", "_initial.npz"), *qmodel.get_weights())
result = loop.fit(qmodel, config, strategy, data_dir, workdir,
                  phase="finetune", epochs=1, learning_rate=0.05,
                  warmup_epochs=0.0)
np.savez(out, *[w for w in qmodel.get_weights()])
print("STEPS", result["steps"], "LOSS", result["train_loss"])
"""


class DistributedTest(digits_data.DigitsTestCase, absltest.TestCase):

  def test_two_workers_finish_with_identical_weights(self):
    workdir = os.path.join(self.root, "multi_worker")
    ports = processes.free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    children, outputs, temp_dirs = [], [], []
    for index in range(2):
      out = os.path.join(self.root, f"worker{index}.npz")
      outputs.append(out)
      # Each worker's own temporary directory: where a non-chief writes.
      temp_dirs.append(os.path.join(self.root, f"worker{index}_tmp"))
      os.makedirs(temp_dirs[-1])
      tf_config = json.dumps({"cluster": cluster,
                              "task": {"type": "worker", "index": index}})
      children.append(subprocess.Popen(
          [sys.executable, "-c", _WORKER, workdir, self.data_dir, out],
          cwd=_ROOT, env=processes.environment(TF_CONFIG=tf_config,
                                      TMPDIR=temp_dirs[-1]),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=_TIMEOUT)[0] for p in children]
    for process, log in zip(children, logs):
      self.assertEqual(process.returncode, 0, log[-3000:])
      self.assertIn("STEPS 3", log)
    first, second = np.load(outputs[0]), np.load(outputs[1])
    self.assertLen(first.files, len(second.files))
    for name in first.files:
      np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # Training moved the weights (the same way on both workers).
    initial = np.load(outputs[0].replace(".npz", "_initial.npz"))
    self.assertEqual(initial.files, first.files)
    changed = [name for name in first.files
               if not np.array_equal(first[name], initial[name])]
    self.assertGreaterEqual(len(changed), 11)  # small_resnet's 11 kernels, ...
    # Only the chief (worker 0) wrote the workdir: one summary file, one set
    # of checkpoints (steps 2 and 3); worker 1 wrote its checkpoints to its
    # temporary directory and removed them.
    checkpoints = os.path.join(workdir, "finetune", "checkpoints")
    self.assertEqual(sorted(os.listdir(workdir)), ["finetune", "tensorboard"])
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "finetune"))),
                     ["checkpoints"])
    self.assertEqual(
        sorted(n for n in os.listdir(checkpoints) if n.endswith(".index")),
        ["ckpt-2.index", "ckpt-3.index"])
    self.assertLen(os.listdir(os.path.join(workdir, "tensorboard", "finetune")),
                   1)
    self.assertEqual(os.listdir(temp_dirs[1]), [])

  def _launch(self, workdir: str, workers: int, capture: bool = False
              ) -> list[subprocess.Popen]:
    """trainers.run_default on `workdir`: one process, or a cluster of them."""
    command = [
        sys.executable, "-m", "trainers.run_default", f"--workdir={workdir}",
        f"--config.data_dir={self.data_dir}", "--config.global_batch_size=16",
        f"--config.steps_per_epoch={_STEPS_PER_EPOCH}",
        f"--config.fp32_epochs={_EPOCHS}", f"--config.num_epochs={_EPOCHS}",
        "--config.steps_per_checkpoint=2",
    ]
    if capture:
      output = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:  # A log to show if the run fails before it is killed.
      self.log = os.path.join(self.root, f"killed_{time.time_ns()}.log")
      output = dict(stdout=subprocess.DEVNULL,
                    stderr=open(self.log, "w"))  # pylint: disable=consider-using-with
    if workers == 1:  # The default strategy: no --strategy flag.
      return [subprocess.Popen(command, cwd=_ROOT, env=processes.environment(),
                               **output)]
    cluster = {"worker": [f"localhost:{port}"
                          for port in processes.free_ports(workers)]}
    return [subprocess.Popen(
        [*command, "--strategy=multi_worker"], cwd=_ROOT,
        env=processes.environment(TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})),
        **output) for index in range(workers)]

  def _kill_once_exists(self, children, path: str) -> None:
    deadline = time.time() + _TIMEOUT
    while not os.path.exists(path):
      for process in children:
        if process.poll() is not None:
          with open(self.log) as f:
            self.fail(f"finished before it could be killed:\n{f.read()[-3000:]}")
      self.assertLess(time.time(), deadline)
      time.sleep(0.05)
    for process in children:
      process.send_signal(signal.SIGKILL)
    for process in children:
      process.wait()

  def _assert_resumed_mid_epoch(self, figures: dict, what: str) -> None:
    """The rerun finished every step, from a checkpoint inside an epoch."""
    self.assertEqual(figures["steps"], _TOTAL_STEPS, what)
    self.assertGreaterEqual(figures["resumed_from_step"], 2, what)
    self.assertLess(figures["resumed_from_step"], _TOTAL_STEPS, what)
    self.assertNotEqual(figures["resumed_from_step"] % _STEPS_PER_EPOCH, 0,
                        f"{what}: not mid-epoch")

  def _kill_in_both_phases_then_finish(self, workdir: str, workers: int):
    """Kills run_default in FP32 training, then in finetuning; reruns it.

    Returns:
      (final report, the chief's stdout of the last run).
    """
    # 1. Killed during FP32 training, once its first checkpoint is listed in
    # the state file (written after the checkpoint itself).
    self._kill_once_exists(self._launch(workdir, workers), os.path.join(
        workdir, "fp32", "checkpoints", "checkpoint"))
    self.assertFalse(os.path.exists(os.path.join(workdir, "fp32", "weights.h5")))
    self.assertFalse(os.path.exists(os.path.join(workdir, "plan.json")))
    # 2. The rerun resumes FP32 training; killed after the first finetuning
    # checkpoint.
    self._kill_once_exists(self._launch(workdir, workers), os.path.join(
        workdir, "finetune", "checkpoints", "checkpoint"))
    self.assertFalse(os.path.exists(os.path.join(workdir, "final_report.json")))
    with open(os.path.join(workdir, "fp32", "metrics.json")) as f:
      self._assert_resumed_mid_epoch(json.load(f)["training"], "fp32")
    plan_path = os.path.join(workdir, "plan.json")
    with open(plan_path, "rb") as f:
      plan_bytes = f.read()
    plan_mtime = os.stat(plan_path).st_mtime_ns
    # 3. The rerun resumes finetuning with the same plan and finishes.
    children = self._launch(workdir, workers, capture=True)
    outputs = [p.communicate(timeout=_TIMEOUT) for p in children]
    for process, (_, stderr) in zip(children, outputs):
      self.assertEqual(process.returncode, 0, stderr[-3000:])
    with open(os.path.join(workdir, "final_report.json")) as f:
      report = json.load(f)
    self._assert_resumed_mid_epoch(report["finetune"], "finetune")
    self._assert_resumed_mid_epoch(report["fp32_training"], "fp32 in report")
    with open(plan_path, "rb") as f:
      self.assertEqual(f.read(), plan_bytes, "the plan was recomputed")
    self.assertEqual(os.stat(plan_path).st_mtime_ns, plan_mtime)
    self.assertEqual([n for n in os.listdir(workdir) if ".tmp" in n], [])
    return report, outputs[0][0]

  def test_killed_default_run_resumes_in_both_phases(self):
    """The README's job as a user runs it, killed twice; then its results."""
    workdir = os.path.join(self.root, "opq_default")
    report, stdout = self._kill_in_both_phases_then_finish(workdir, workers=1)
    self.assertEqual(report["strategy"], tf.distribute.MirroredStrategy.__name__)
    self.assertRegex(stdout, r"stage3_b_conv/kernel\s+Conv2D\s+3x3x128x128")
    self.assertRegex(stdout, r"pruned 90\.00% \(target 90\.00%\)")
    self.assertRegex(stdout, r"compressed_after_finetune\s+top-1 \d\.\d{4}")
    self.assertEqual(report["accuracy"]["fp32"]["examples"], 500)
    self.assertGreater(report["compression"]["weight_bits_ratio"], 50)
    self.assertGreater(report["wall_seconds"], 0)
    for path in ("export/saved_model/saved_model.pb", "export/report.json",
                 "export/model.opq", "plan.json", "fp32/weights.h5"):
      self.assertTrue(os.path.exists(os.path.join(workdir, path)), path)

    # The exported kernels use the original masks and steps: zero wherever
    # the FP32 weight was below its threshold, on the grid everywhere.
    with open(os.path.join(workdir, "plan.json")) as f:
      plan = allocation.CompressionPlan.from_json(f.read())
    fp32_model = models.build("small_resnet", 10, 32)
    pretrained.load(fp32_model, os.path.join(workdir, "fp32", "weights.h5"))
    export_dir = os.path.join(workdir, "export")
    rebuilt = load_packed(os.path.join(export_dir, "model.opq"),
                          lambda: models.build("small_resnet", 10, 32))
    rebuilt_layers = {layer.name: layer for layer in layers.iter_layers(rebuilt)}
    fp32_layers = {layer.name: layer for layer in layers.iter_layers(fp32_model)}
    for entry in plan.kernels:
      kernel = getattr(rebuilt_layers[entry.name], entry.weight).numpy()
      original = getattr(fp32_layers[entry.name], entry.weight).numpy()
      pruned = np.abs(original) < entry.threshold
      self.assertEqual(np.count_nonzero(kernel[pruned]), 0, entry.key)
      codes = kernel / entry.step_array()
      np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    self._check_saved_model_cli(export_dir, rebuilt)

  def test_killed_multi_worker_run_resumes_in_both_phases(self):
    workdir = os.path.join(self.root, "multi_worker_killed")
    report, _ = self._kill_in_both_phases_then_finish(workdir, workers=2)
    self.assertEqual(report["strategy"],  # CollectiveAllReduceStrategy
                     tf.distribute.MultiWorkerMirroredStrategy.__name__)
    self.assertEqual(report["replicas"], 2)
    self.assertTrue(os.path.exists(os.path.join(workdir, "export", "model.opq")))

  def _check_saved_model_cli(self, export_dir: str, keras_model) -> None:
    """TF's own saved_model_cli runs the export on JPEG bytes; same top-1."""
    with tarfile.open(os.path.join(self.manual_dir, imagenet_manual.VAL_TAR)) as tar:
      members = [m for m in tar.getmembers() if m.isfile()][:4]
      jpegs = np.array([tar.extractfile(m).read() for m in members], dtype=object)
    inputs = os.path.join(self.root, "jpegs.npy")
    np.save(inputs, jpegs, allow_pickle=True)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run(
        [cli, "run", "--dir", os.path.join(export_dir, "saved_model"),
         "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"jpegs={inputs}"],
        capture_output=True, text=True, timeout=_TIMEOUT,
        env=processes.environment())
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    printed = result.stdout.split("Result for output key classes:")[1]
    cli_classes = [int(c) for c in printed.split("]")[0].strip(" \n[").split()]
    images = imagenet_input.preprocess_for_eval(jpegs.astype(bytes), 32)
    keras_classes = np.argmax(keras_model(images, training=False), axis=-1)
    self.assertEqual(cli_classes, keras_classes.tolist())


if __name__ == "__main__":
  absltest.main()
