"""`export`: every format of a compressed model, behind one seam.

    report = opq_tf.export(qmodel, "out/")          # saved_model/ + model.opq
    report = opq_tf.export(qmodel, "out/", formats=("packed", "litert"))
    # out/saved_model/   SavedModel of opq_tf.strip(qmodel), serving_default
    # out/model.opq      entropy-coded masks/codes + steps + raw FP32 rest
    # out/model.tflite   LiteRT, int8 (or int4) weights that are the OPQ codes
    # out/report.json    plan + realised sizes and ratios (opq_tf/core/report.py)
    model = opq_tf.load_packed("out/model.opq", build_model)

Each format is one module with a `write` (saved_model.py, packed.py,
litert.py): a new format is one module and one line of `FORMATS`. The model is
stripped once, here, and every writer reads the same stripped copy and
compressed kernels. The report's sizes are measured on the packed file, so
"packed" is always among the formats.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

from opq_tf.core import files
from opq_tf.core import report as report_lib
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras import packed as packed_lib
from opq_tf.tf_keras import saved_model as saved_model_lib
from opq_tf.tf_keras._keras import keras, tf
from opq_tf.core.reconstruction import check_finite
from opq_tf.tf_keras.packed import load_packed, named_weights  # noqa: F401
from opq_tf.tf_keras.wrapping import compressed_kernels, strip

FORMATS = ("saved_model", "packed", "litert")
DEFAULT_FORMATS = ("saved_model", "packed")
REPORT_FILE = report_lib.FILE
SAVED_MODEL_DIR = saved_model_lib.DIRECTORY
PACKED_FILE = packed_lib.FILE


def _check_target(directory: str) -> None:
  if os.path.isfile(directory):
    raise ValueError(
        f"Export target {directory!r} is a file; choose a new directory.")
  if os.path.isdir(directory) and os.listdir(directory):
    raise ValueError(
        f"Export directory {directory!r} is not empty (it holds "
        f"{sorted(os.listdir(directory))[:5]}); choose a new directory or "
        "remove it first (export never overwrites).")


def _check_formats(formats: Sequence[str], litert: bool) -> tuple[str, ...]:
  if isinstance(formats, str):
    formats = (formats,)
  formats = tuple(formats) + (("litert",) if litert else ())
  unknown = [name for name in formats if name not in FORMATS]
  if unknown:
    raise ValueError(f"Unknown export format(s) {unknown}; use some of "
                     f"{FORMATS}.")
  if "packed" not in formats:
    raise ValueError(
        f"formats={formats} leaves out 'packed', on which report.json's sizes "
        "are measured; add it, e.g. formats=('packed', 'litert').")
  return tuple(name for name in FORMATS if name in formats)


def export(
    model: keras.Model,
    directory: Union[str, os.PathLike],
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    plan: Optional[Any] = None,
    serving_fn: Optional[Callable[..., Any]] = None,
    input_signature: Optional[Sequence[tf.TensorSpec]] = None,
    litert: bool = False,
    litert_int8_activations: bool = False,
    litert_weights: str = "int8",
    representative_data: Optional[Callable[[], Any]] = None,
) -> dict:
  """Writes `directory` with report.json and each of `formats`.

  Everything is written under a temporary sibling and renamed at the end, so
  an error leaves no partial directory.

  Args:
    model: a model returned by `opq_tf.apply` (possibly finetuned).
    directory: a new (or empty) directory.
    formats: some of "saved_model", "packed" (always needed) and "litert".
    plan: the `CompressionPlan` the model was made with, recorded in
      report.json (the model itself holds every mask and step, not the
      request that chose them).
    serving_fn: called as `serving_fn(stripped_model, *inputs)` inside a
      tf.function with `input_signature`; returns a tensor or a dict of named
      tensors. E.g. JPEG bytes in, probabilities out:
      `lambda model, jpegs: model(tf.map_fn(decode, jpegs, ...))` with
      `input_signature=[tf.TensorSpec([None], tf.string, name="jpegs")]`.
      Default: the model itself, outputs named "outputs".
    input_signature: the serving inputs; default one float32 batch
      `(None, *input shape)` per model input, named "inputs" for a
      single-input model.
    litert: the same as adding "litert" to `formats`: model.tflite
      (`opq_tf.tf_keras.litert`), whose integer weights are exactly the OPQ
      codes; report.json gains its facts under "litert".
    litert_int8_activations: quantize the .tflite's activations to int8 too
      (needs `representative_data`, a function yielding [one-image batch]).
    litert_weights: "int8", "int4" (B <= 4 kernels as int4 codes where
      LiteRT runs their op so, the rest int8), "int2" (also B <= 2 kernels
      as int2 codes where the op runs them: each kernel at its smallest
      type) or "auto" (per op type where measured no slower); the report's
      litert "stored" says per kernel what was stored and why.
    representative_data: see litert_int8_activations.

  Returns:
    The report (also written to report.json).

  Raises:
    ValueError: the model was never applied, the directory is not empty, a
      format is unknown, or serving_fn cannot be traced.
  """
  directory = os.path.abspath(os.fspath(directory))
  formats = _check_formats(formats, litert)
  if "litert" in formats:
    # Imported on use: it loads the LiteRT runtime and flatbuffer schema.
    from opq_tf import litert_codes  # pylint: disable=g-import-not-at-top

    if litert_weights not in litert_codes.WEIGHTS:
      raise ValueError(f"litert_weights={litert_weights!r}; use one of "
                       f"{litert_codes.WEIGHTS}.")
  _check_target(directory)
  kernels = compressed_kernels(model)
  for kernel in kernels:  # A NaN latent weight is NaN even where pruned.
    check_finite(kernel.kernel, f"Kernel {kernel.key}")
    check_finite(kernel.step, f"The step of {kernel.key}")
  stripped = strip(model)
  concrete = (saved_model_lib.serving_function(stripped, serving_fn,
                                               input_signature)
              if "saved_model" in formats else None)

  created = []  # Parents this export creates, removed again on failure.
  ancestor = os.path.dirname(directory)
  while not os.path.exists(ancestor):
    created.append(ancestor)
    ancestor = os.path.dirname(ancestor)
  try:
    with files.atomic_path(directory) as temp:
      os.mkdir(temp)
      written = {}
      if "saved_model" in formats:
        written["saved_model"] = saved_model_lib.write(stripped, temp, concrete)
      packed, rest, stats = packed_lib.write(kernels, stripped, temp)
      written["packed"] = PACKED_FILE
      litert_facts = None
      if "litert" in formats:
        # Imported on use: it loads the LiteRT runtime and flatbuffer schema.
        from opq_tf.tf_keras import litert as litert_lib  # pylint: disable=g-import-not-at-top

        litert_facts = litert_lib.write(
            kernels, stripped, os.path.join(temp, litert_lib.LITERT_FILE),
            int8_activations=litert_int8_activations,
            representative_data=representative_data, weights=litert_weights)
        written["litert"] = litert_lib.LITERT_FILE
      report = report_lib.build(kernels, packed, rest, stats, plan, written,
                                layers_lib.fp32_kernels(stripped))
      if litert_facts is not None:
        report["litert"] = litert_facts
      files.write_json(os.path.join(temp, REPORT_FILE), report)
      _check_target(directory)
      if os.path.isdir(directory):
        os.rmdir(directory)
  except BaseException as error:
    for path in created:
      try:
        os.rmdir(path)
      except OSError:
        break
    if isinstance(error, OSError):  # It names the hidden temporary: say
      raise OSError(                  # which target, and what to do.
          f"Cannot export to {directory!r}: {error.strerror or error}; "
          "choose a directory you can write to.") from error
    raise
  return report
