"""Tests for opq_tf.training.distribute: strategies, the chief, barriers."""

import types

from absl.testing import absltest
from absl.testing import parameterized

from opq_tf.training import distribute
import cpu_devices
from opq_tf.tf_keras._keras import tf


cpu_devices.split_cpu()


def _in_cluster(cluster: dict, task_type: str, task_id: int):
  """A stand-in strategy whose resolver says where this process is."""
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)
  return types.SimpleNamespace(cluster_resolver=resolver)


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

  def test_a_single_process_is_the_chief_of_one(self):
    strategy = distribute.make_strategy("one_device")
    self.assertTrue(distribute.is_chief(strategy))
    self.assertEqual(distribute.num_workers(strategy), 1)
    self.assertEqual(distribute.task(strategy), (None, 0))
    distribute.barrier(strategy)  # returns at once

  @parameterized.named_parameters(
      ("worker0_without_chief", {"worker": ["a:1", "b:1"]}, "worker", 0, True),
      ("worker1", {"worker": ["a:1", "b:1"]}, "worker", 1, False),
      ("chief", {"chief": ["c:1"], "worker": ["a:1"]}, "chief", 0, True),
      ("worker0_with_chief", {"chief": ["c:1"], "worker": ["a:1"]}, "worker",
       0, False),
  )
  def test_chief_in_a_cluster(self, cluster, task_type, task_id, chief):
    strategy = _in_cluster(cluster, task_type, task_id)
    self.assertEqual(distribute.is_chief(strategy), chief)
    self.assertEqual(distribute.num_workers(strategy), 2)
    self.assertEqual(distribute.task(strategy), (task_type, task_id))


if __name__ == "__main__":
  absltest.main()
