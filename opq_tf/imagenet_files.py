"""ILSVRC-2012's manual-download file names and TFDS's bundled label files.

Shared by the TFDS input pipeline (imagenet_input.py) and the digits stand-in
(digits_imagenet.py). TensorFlow-free, so the stand-in builds without it.
"""

import importlib.util
import os

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


def _tfds_imagenet_file(name: str) -> str:
  """Path of a file bundled with TFDS's imagenet2012 builder."""
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
        "tensorflow_datasets is not installed; it ships the ImageNet label "
        "files. Install it with `pip install -r requirements.txt`.")
  root = list(spec.submodule_search_locations)[0]
  return os.path.join(root, "datasets", "imagenet2012", name)


def synsets() -> list[str]:
  """The 1000 synset ids in TFDS label order (label i = labels.txt line i)."""
  with open(_tfds_imagenet_file("labels.txt")) as f:
    return f.read().split()


def validation_synsets() -> list[str]:
  """50 000 synsets; position k - 1 is that of ILSVRC2012_val_{k:08d}.JPEG."""
  with open(_tfds_imagenet_file("validation_labels.txt")) as f:
    return f.read().split()
