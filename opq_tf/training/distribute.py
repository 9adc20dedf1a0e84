"""The tf.distribute side of a run: which strategy, which process, barriers.

    strategy = distribute.make_strategy("mirrored")     # before any TF op
    if distribute.is_chief(strategy): ...               # the one writer
    distribute.barrier(strategy)                        # every worker waits

Under MultiWorkerMirroredStrategy every worker runs the same program; only
the chief writes the workdir, and the others must still join every
collective (reading BatchNorm's sync-on-read statistics is one), so the
trainer asks `is_chief` where it writes, never where it computes.
"""

from __future__ import annotations

from typing import Optional

from opq_tf.tf_keras._keras import tf

STRATEGIES = ("mirrored", "multi_worker", "one_device")


def make_strategy(name: str = "mirrored", cpu_devices: int = 0
                  ) -> tf.distribute.Strategy:
  """Returns the tf.distribute strategy to train under.

  Args:
    name: "mirrored" (all local GPUs; without GPUs, all logical CPU devices),
      "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes from the
      TF_CONFIG environment variable), or "one_device" (GPU 0, else CPU 0).
    cpu_devices: if > 0, split the host CPU into this many logical devices
      first (so "mirrored" runs that many replicas on a machine without GPUs;
      handy to test distribution). Must be called before TensorFlow starts
      its runtime, i.e. before any other TF op.

  Raises:
    ValueError: unknown name, or cpu_devices after the runtime has started.
  """
  if name not in STRATEGIES:
    raise ValueError(
        f"Unknown strategy {name!r}; use one of {STRATEGIES} (--strategy=...).")
  if isinstance(cpu_devices, bool) or not isinstance(cpu_devices, int) or (
      cpu_devices < 0):
    raise ValueError(f"cpu_devices must be an integer >= 0, got {cpu_devices!r}.")
  if cpu_devices:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    except RuntimeError as error:
      if len(tf.config.list_logical_devices("CPU")) != cpu_devices:
        raise ValueError(
            f"Cannot split the CPU into {cpu_devices} devices: TensorFlow has "
            "already started; call make_strategy first.") from error
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if gpus:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.MirroredStrategy(
      [device.name for device in tf.config.list_logical_devices("CPU")])


def task(strategy: tf.distribute.Strategy) -> tuple[Optional[str], int]:
  """(task type, task index) of this process; (None, 0) outside a cluster."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return None, 0
  return resolver.task_type, int(resolver.task_id or 0)


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Processes taking part in the run (chief included); 1 outside a cluster."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None:
    return 1
  spec = resolver.cluster_spec().as_dict()
  return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the one process that writes the workdir.

  That is the "chief" task if the cluster has one, else worker 0 (TF's own
  convention for MultiWorkerMirroredStrategy), and any single process.
  """
  task_type, task_id = task(strategy)
  if task_type in (None, "chief"):
    return True
  resolver = strategy.cluster_resolver
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief


def barrier(strategy: tf.distribute.Strategy) -> None:
  """Waits until every worker gets here (a tiny all-reduce); no-op alone.

  Used where one worker's write must be visible to all before they read it
  (prepared data, FP32 weights) or where all must read before one writes.
  A strategy with its own `barrier` (keras3_distribute.JaxDataParallel) uses it.
  """
  if hasattr(strategy, "barrier"):
    strategy.barrier()
  elif num_workers(strategy) > 1:
    strategy.reduce(tf.distribute.ReduceOp.SUM,
                    strategy.run(lambda: tf.constant(1.0)), axis=None)
