"""Tests for opq_tf.training.distribute: strategies, the chief, barriers.

Single-process strategies are made here; the cluster cases run real
MultiWorkerMirroredStrategy processes on localhost (TF_CONFIG), which meet
at distribute.barrier before they report who they are.
"""

import json
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

from opq_tf.training import distribute
import cpu_devices
import processes
from opq_tf.tf_keras._keras import tf


cpu_devices.split_cpu()

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT = 300
_TASK = """
import json
from opq_tf.training import distribute
strategy = distribute.make_strategy("multi_worker")
distribute.barrier(strategy)
print("TASK", json.dumps({"chief": distribute.is_chief(strategy),
                          "workers": distribute.num_workers(strategy),
                          "task": list(distribute.task(strategy))}))
"""


def _start_cluster(task_types: list[str]) -> list[subprocess.Popen]:
  """One process per task, each making MultiWorkerMirroredStrategy from its
  TF_CONFIG, in the order of `task_types`."""
  ports = iter(processes.free_ports(len(task_types)))
  cluster, tasks = {}, []
  for task_type in task_types:
    cluster.setdefault(task_type, []).append(f"localhost:{next(ports)}")
    tasks.append({"type": task_type, "index": len(cluster[task_type]) - 1})
  return [subprocess.Popen(
      [sys.executable, "-c", _TASK], cwd=_ROOT, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      env=processes.environment(TF_CONFIG=json.dumps({"cluster": cluster,
                                                      "task": task})))
          for task in tasks]


def _report(process: subprocess.Popen) -> dict:
  """What a process of _start_cluster printed about itself."""
  output = process.communicate(timeout=_TIMEOUT)[0]
  if process.returncode != 0:
    raise AssertionError(output[-3000:])
  line = [l for l in output.splitlines() if l.startswith("TASK ")][-1]
  return json.loads(line.removeprefix("TASK "))


class DistributeTest(parameterized.TestCase):

  def test_make_strategy(self):
    self.assertIsInstance(distribute.make_strategy("one_device"),
                          tf.distribute.OneDeviceStrategy)
    mirrored = distribute.make_strategy("mirrored")
    self.assertIsInstance(mirrored, tf.distribute.MirroredStrategy)
    self.assertEqual(mirrored.num_replicas_in_sync, 2)  # cpu_devices
    with self.assertRaisesRegex(ValueError, "Unknown strategy"):
      distribute.make_strategy("tpu")
    with self.assertRaisesRegex(ValueError, "already started"):
      distribute.make_strategy("mirrored", cpu_devices=3)
    with self.assertRaisesRegex(ValueError, "cpu_devices must be"):
      distribute.make_strategy("mirrored", cpu_devices=-1)

  @parameterized.parameters("one_device", "mirrored")
  def test_a_single_process_is_the_chief_of_one(self, name):
    strategy = distribute.make_strategy(name)
    self.assertTrue(distribute.is_chief(strategy))
    self.assertEqual(distribute.num_workers(strategy), 1)
    self.assertEqual(distribute.task(strategy), (None, 0))
    distribute.barrier(strategy)  # returns at once

  def test_chief_in_a_cluster(self):
    # cluster -> (is_chief, task) of each task; both clusters run at once.
    expected = {
        # Without a chief task, worker 0 is the chief (TF's convention).
        ("worker", "worker"): [(True, ["worker", 0]), (False, ["worker", 1])],
        ("chief", "worker"): [(True, ["chief", 0]), (False, ["worker", 0])],
    }
    clusters = {tasks: _start_cluster(list(tasks)) for tasks in expected}
    for tasks, processes in clusters.items():
      with self.subTest(tasks):
        reports = [_report(process) for process in processes]
        self.assertEqual([(r["chief"], r["task"]) for r in reports],
                         expected[tasks])
        self.assertEqual([r["workers"] for r in reports], [2, 2])


if __name__ == "__main__":
  absltest.main()
