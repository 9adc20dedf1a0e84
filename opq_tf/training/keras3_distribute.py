"""The Keras 3 side of a run: which frontend and backend, and what it runs on.

    keras3_distribute.select_backend(sys.argv)      # before anything imports keras
    strategy = keras3_distribute.make_strategy(config, "mirrored")

Keras 3 fixes its backend when `keras` is first imported (KERAS_BACKEND),
and importing TensorFlow imports keras, so a trainer must pick the backend
before it imports the training system: `select_backend` reads
`--config.backend=` off the command line and sets KERAS_BACKEND; once the
config is parsed, `make_strategy` checks that the keras in this process runs
the backend the config asks for (ValueError naming the fix otherwise) and
returns what the run trains under:

- tf_keras, or keras3 on TensorFlow: the tf.distribute strategy of
  `distribute.make_strategy` (mirrored, multi_worker, one_device), unchanged;
- keras3 on JAX: a `JaxDataParallel`, `keras.distribution.DataParallel` over
  every device of every process ("mirrored": the local devices; "multi_worker":
  `keras.distribution.initialize` first, from KERAS_DISTRIBUTION_* or, if
  those are unset, TF_CONFIG; "one_device": the first device, no mesh).

A `JaxDataParallel` answers what `distribute` asks of a strategy
(`num_replicas_in_sync`, `cluster_resolver`, `scope()`, `barrier()`), so the
run policy (data.prepare_data, distribute.is_chief, the report) is shared.
Nothing here imports keras or TensorFlow at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Optional, Sequence

import ml_collections

FRONTENDS = ("tf_keras", "keras3")
BACKENDS = ("tensorflow", "jax")
_BACKEND_FLAG = "--config.backend"


def _argv_backend(argv: Sequence[str]) -> Optional[str]:
  """The value of the last --config.backend=X (or --config.backend X) in argv."""
  value = None
  for index, arg in enumerate(argv):
    if arg.startswith(_BACKEND_FLAG + "="):
      value = arg.split("=", 1)[1]
    elif arg == _BACKEND_FLAG and index + 1 < len(argv):
      value = argv[index + 1]
  return value


def select_backend(argv: Sequence[str]) -> None:
  """Sets KERAS_BACKEND from --config.backend, if keras is not imported yet.

  An empty value, or none on the command line, leaves the environment as it
  is; keras already loaded is left for `check_backend` to report once the
  config is parsed.

  Raises:
    ValueError: KERAS_BACKEND names another backend (said before the
      seconds TensorFlow takes to import).
  """
  backend = _argv_backend(argv)
  environment = os.environ.get("KERAS_BACKEND", "")
  if backend and environment and environment != backend:
    raise ValueError(_clash_message(backend, environment))
  if backend and "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = backend


def _clash_message(backend: str, environment: str) -> str:
  return (f"config.backend={backend!r} but KERAS_BACKEND={environment!r}; set "
          "one of them (or both alike), e.g. KERAS_BACKEND=jax or "
          "--config.backend=jax.")


def wanted_backend(config: ml_collections.ConfigDict) -> str:
  """The backend a keras3 config trains on: config.backend, else
  KERAS_BACKEND, else Keras' default (tensorflow)."""
  return (config.get("backend", "") or os.environ.get("KERAS_BACKEND", "")
          or "tensorflow")


def check_backend(config: ml_collections.ConfigDict) -> str:
  """The backend of a keras3 config, checked against this process's keras.

  Raises:
    ValueError: an unknown backend, KERAS_BACKEND naming another one, or
      keras already imported with another backend.
  """
  backend = wanted_backend(config)
  if backend not in BACKENDS:
    raise ValueError(
        f"config.backend={backend!r} is not a backend the trainers run Keras 3 "
        f"on; use one of {BACKENDS} (--config.backend=jax).")
  environment = os.environ.get("KERAS_BACKEND", "")
  if config.get("backend", "") and environment and environment != backend:
    raise ValueError(_clash_message(backend, environment))
  import keras  # pylint: disable=g-import-not-at-top
  running = keras.backend.backend()
  if running != backend:
    raise ValueError(
        f"config.backend={backend!r}, but this process imported keras with the "
        f"{running!r} backend already (Keras fixes it at the first import). "
        f"Set KERAS_BACKEND={backend} in the environment before Python starts, "
        "or pass --config.backend on the command line (not only in a config "
        "file), so the trainer sets it before importing keras.")
  return backend


def frontend_backend(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """("tf_keras", "tensorflow"), ("keras3", "tensorflow") or ("keras3", "jax")."""
  frontend = config.get("frontend", "tf_keras")
  if frontend != "keras3":
    return frontend, "tensorflow"
  return frontend, wanted_backend(config)


class JaxDataParallel:
  """keras.distribution.DataParallel over all devices of all processes.

  The trainers' strategy for Keras 3 on JAX. The model's variables stay
  host-local (so the library verbs, calibration and export run as in one
  process); the train and eval steps get them replicated, and the batch
  split along the mesh's "batch" axis, with the layouts of `distribution`.
  With one device `distribution` is None and nothing is laid out.
  """

  def __init__(self, devices: list[Any], multi_process: bool):
    import keras  # pylint: disable=g-import-not-at-top
    self.devices = devices
    self.distribution = (keras.distribution.DataParallel(devices=devices)
                         if len(devices) > 1 else None)
    self.num_replicas_in_sync = len(devices)
    self._multi_process = multi_process

  @property
  def cluster_resolver(self):
    """The processes as a TF cluster ("worker" i = JAX process i), for
    distribute.task / is_chief / num_workers; None in one process."""
    if not self._multi_process:
      return None
    import jax  # pylint: disable=g-import-not-at-top
    from opq_tf.tf_keras._keras import tf  # pylint: disable=g-import-not-at-top
    workers = [f"process{index}" for index in range(jax.process_count())]
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": workers}), task_type="worker",
        task_id=jax.process_index())

  def scope(self):
    """Variables are built host-local: a no-op, as OneDeviceStrategy's is."""
    return contextlib.nullcontext()

  def barrier(self) -> None:
    """Every process waits here; a no-op in one process."""
    if self._multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("opq_tf barrier")


def _initialize_processes() -> None:
  """keras.distribution.initialize from KERAS_DISTRIBUTION_* or TF_CONFIG."""
  import keras  # pylint: disable=g-import-not-at-top
  if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"):
    keras.distribution.initialize()
    return
  if not os.environ.get("TF_CONFIG"):
    raise ValueError(
        "--strategy=multi_worker on the JAX backend needs the cluster: set "
        "KERAS_DISTRIBUTION_JOB_ADDRESSES (comma-separated host:port, process "
        "0 first), KERAS_DISTRIBUTION_NUM_PROCESSES and "
        "KERAS_DISTRIBUTION_PROCESS_ID, or TF_CONFIG as for TensorFlow.")
  tf_config = json.loads(os.environ["TF_CONFIG"])
  workers = tf_config["cluster"].get("chief", []) + tf_config["cluster"]["worker"]
  task = tf_config["task"]
  index = task["index"] + (len(tf_config["cluster"].get("chief", []))
                           if task["type"] == "worker" else 0)
  keras.distribution.initialize(",".join(workers), len(workers), index)


def _jax_strategy(name: str, cpu_devices: int) -> JaxDataParallel:
  """The JaxDataParallel of a --strategy name (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  if cpu_devices:
    try:
      jax.config.update("jax_num_cpu_devices", cpu_devices)
    except RuntimeError as error:
      raise ValueError(
          f"Cannot split the CPU into {cpu_devices} JAX devices: JAX has "
          "started already; pass --cpu_devices before anything runs.") from error
  try:  # TensorFlow only feeds the data: keep it off the accelerators.
    from opq_tf.tf_keras._keras import tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  if name == "multi_worker":
    _initialize_processes()
  devices = jax.devices()
  if name == "one_device":
    devices = devices[:1]
  return JaxDataParallel(devices, multi_process=jax.process_count() > 1)


def make_strategy(config: ml_collections.ConfigDict, name: str = "mirrored",
                  cpu_devices: int = 0):
  """What the run trains under: a tf.distribute strategy or a JaxDataParallel.

  Raises:
    ValueError: a bad frontend, backend or strategy name (see check_backend,
      distribute.make_strategy).
  """
  from opq_tf.training import distribute  # pylint: disable=g-import-not-at-top
  frontend = config.get("frontend", "tf_keras")
  if frontend not in FRONTENDS:
    raise ValueError(f"config.frontend={frontend!r} is unknown; use one of "
                     f"{FRONTENDS} (--config.frontend=keras3).")
  if frontend == "keras3" and check_backend(config) == "jax":
    if name not in distribute.STRATEGIES:
      raise ValueError(f"Unknown strategy {name!r}; use one of "
                       f"{distribute.STRATEGIES} (--strategy=...).")
    return _jax_strategy(name, cpu_devices)
  return distribute.make_strategy(name, cpu_devices)
