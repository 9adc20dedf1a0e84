"""Two logical CPU devices, so MirroredStrategy tests have two replicas."""

from opq_tf.tf_keras._keras import tf


def split_cpu(count: int = 2) -> None:
  """Splits the CPU into `count` logical devices, if TF has not started yet.

  Called by tests/conftest.py before any test runs, and by the test modules
  that need two replicas, so that they also work when run on their own.
  """
  try:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * count)
  except RuntimeError:  # TF's runtime already started, e.g. in conftest.py.
    pass
