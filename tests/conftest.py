"""pytest set-up shared by every test file: Keras 2 for tfmot, two CPU devices."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
  del config
  import cpu_devices  # pylint: disable=g-import-not-at-top

  cpu_devices.split_cpu()
