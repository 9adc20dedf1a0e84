r"""The trainer end to end on a real model and real images (issue 8 §6).

    python -m benchmarks.pretrained_e2e          # ~4 min on 2 cores

What benchmarks/pretrained.py measures in memory, through the product's
front door instead: the 1,000 shared ImageNet images
(../shared/data/imagenet_mobilenet/images/<wnid>.JPEG) are written as
ILSVRC-2012 tars into a temporary manual_dir, the real TFDS imagenet2012
builder prepares them, and `python -m trainers.compress
--config=configs/mobilenet_v1_shared.py` compresses the shared MobileNet-V1
0.75 weights (a tf_keras.applications model, not a built-in), calibrates,
finetunes one epoch, evaluates and exports. Its final report goes to
docs/pretrained_e2e_results.md, beside the in-memory benchmark's figures for
the same setting (docs/pretrained_results.json) where it has them, with the
same run at a few other finetuning learning rates (--other_learning_rates),
the evidence for the config's choice.

Split, as benchmarks/pretrained.py's: the first 500 sorted files are the
train split (calibration and finetuning), the last 500 the validation split.

    ILSVRC2012_img_train.tar   <wnid>.tar per class (first 500), each holding
                               the one image as <wnid>_1.JPEG
    ILSVRC2012_img_val.tar     ILSVRC2012_val_<k>.JPEG, k = the first line of
                               TFDS's validation_labels.txt with that wnid

The JPEG bytes are copied as they are (no re-encoding). A partial val tar is
fine: opq_tf.training.imagenet_input labels validation images by file name (see
opq_tf/training/imagenet_manual.py). Where ../shared is absent the benchmark says so
and exits 0.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags

from opq_tf.training import imagenet_manual

_ROOT = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir))
_SHARED = os.path.join(_ROOT, os.pardir, "shared", "data", "imagenet_mobilenet")
CONFIG = "configs/mobilenet_v1_shared.py"
_MTIME = 1325376000  # Fixed, so that the tars are byte-reproducible.

_IMAGES = flags.DEFINE_string(
    "images", os.path.join(_SHARED, "images"), "Folder of <wnid>.JPEG files.")
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Where the tars, TFDS records and the run go; '' = a new "
    "temporary directory (kept: it holds the export).")
_REPO = flags.DEFINE_string(
    "repo", _ROOT, "Repository whose trainers/ and configs/ run.")
_OUT = flags.DEFINE_string(
    "out", os.path.join(_ROOT, "docs", "pretrained_e2e_results.md"),
    "The results file.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "Extra --config.<field>=<value> for the trainer.")
_IN_MEMORY_RESULTS = flags.DEFINE_string(
    "in_memory_results", os.path.join(_ROOT, "docs", "pretrained_results.json"),
    "benchmarks/pretrained.py's results, for the side-by-side table.")
_OTHER_LEARNING_RATES = flags.DEFINE_string(
    "other_learning_rates", "5e-4,1.5e-4,1e-5", "Comma-separated finetuning "
    "learning rates to run besides the config's, each in its own workdir on "
    "the same prepared data, for the lr table ('' = none).")


def _tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def write_manual_dir(images_dir: str, manual_dir: str) -> dict[str, int]:
  """Writes the shared images as ILSVRC2012_img_{train,val}.tar; returns counts.

  The first half of the sorted <wnid>.JPEG files goes to train, the second
  to validation (see the module docstring for the member names).
  """
  names = sorted(n for n in os.listdir(images_dir) if n.endswith(".JPEG"))
  known = set(imagenet_manual.synsets())
  unknown = [n for n in names if n[:-len(".JPEG")] not in known]
  if unknown:
    raise ValueError(f"{images_dir} holds {unknown[0]}, not <wnid>.JPEG of an "
                     "ILSVRC-2012 synset.")
  half = len(names) // 2
  first_val_index = {}
  for k, synset in enumerate(imagenet_manual.validation_synsets(), start=1):
    first_val_index.setdefault(synset, k)

  def read(name: str) -> bytes:
    with open(os.path.join(images_dir, name), "rb") as f:
      return f.read()

  train = []
  for name in names[:half]:
    synset = name[:-len(".JPEG")]
    train.append((f"{synset}.tar", _tar_bytes([(f"{synset}_1.JPEG",
                                                read(name))])))
  val = sorted(
      (f"ILSVRC2012_val_{first_val_index[name[:-len('.JPEG')]]:08d}.JPEG",
       read(name)) for name in names[half:])
  os.makedirs(manual_dir, exist_ok=True)
  for tar_name, members in ((imagenet_manual.TRAIN_TAR, train),
                            (imagenet_manual.VAL_TAR, val)):
    with open(os.path.join(manual_dir, tar_name), "wb") as f:
      f.write(_tar_bytes(members))
  return {"train": len(train), "validation": len(val)}


def run_trainer(repo: str, workdir: str, manual_dir: str, data_dir: str,
                overrides: Sequence[str], log_path: str) -> float:
  """Runs trainers.compress as a user would; returns its wall seconds."""
  command = [sys.executable, "-m", "trainers.compress", f"--config={CONFIG}",
             f"--workdir={workdir}", f"--config.manual_dir={manual_dir}",
             f"--config.data_dir={data_dir}", *overrides]
  print("Running:", " ".join(command), f"(log: {log_path})", flush=True)
  started = time.time()
  with open(log_path, "w") as log:
    process = subprocess.run(command, cwd=repo, stdout=log,
                             stderr=subprocess.STDOUT, check=False)
  if process.returncode:
    with open(log_path) as log:
      tail = log.read()[-3000:]
    raise RuntimeError(f"trainers.compress exited with {process.returncode}; "
                       f"end of {log_path}:\n{tail}")
  return time.time() - started


def in_memory_rows(path: str, pruning_rate: float, bits: int
                   ) -> list[dict[str, Any]]:
  """benchmarks/pretrained.py's rows for this setting (opq/per_kernel, channel)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    results = json.load(f)
  return [row for row in results.get("rows", [])
          if abs(row["pruning_rate"] - pruning_rate) < 1e-9
          and row["bits"] == bits and row["method"] == "opq/per_kernel"
          and row["granularity"] == "channel"]


def _percent(value: Optional[float]) -> str:
  return "-" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict[str, Any], rows: list[dict[str, Any]],
             context: dict[str, Any],
             other_reports: Optional[dict[float, dict[str, Any]]] = None
             ) -> str:
  """The results file: the trainer's figures, then the in-memory ones."""
  accuracy = report["accuracy"]
  calibrated = ("compressed + calibration (BatchNorm + reconstruction)"
                if report.get("calibration", {}).get("reconstruct")
                else "compressed + BatchNorm calibration")
  lines = [
      "# Trainer end to end on the shared MobileNet-V1 0.75 "
      "(benchmarks/pretrained_e2e.py)", "",
      f"{context['date']}, {context['machine']}; `python -m trainers.compress "
      f"--config={CONFIG}` on the 1,000 shared images written as ILSVRC-2012 "
      "tars and prepared by the real TFDS imagenet2012 builder (500 train = "
      "calibration and finetuning, 500 validation). Trainer wall time "
      f"{context['trainer_seconds'] / 60:.1f} min.", "",
      f"Setting: p = {report['pruning_rate']}, B = {report['bits']}, "
      f"objective per_kernel, calibration on {context['calibration_images']} "
      f"images, finetuning {context['num_epochs']} epoch at batch "
      f"{context['global_batch_size']}, lr {context['learning_rate']:g} "
      "(why: configs/mobilenet_v1_shared.py).", "",
      "| stage (trainer, validation half) | top-1 | top-5 |",
      "|---|---|---|",
  ]
  for key, label in (("fp32", "FP32"),
                     ("compressed_before_finetune", "compressed, one shot"),
                     ("calibrated_before_finetune", calibrated),
                     ("compressed_after_finetune",
                      "compressed + calibration + finetuning")):
    figures = accuracy.get(key)
    if figures:
      lines.append(f"| {label} | {_percent(figures['top1'])} | "
                   f"{_percent(figures['top5'])} |")
  if other_reports:
    lines += ["", "Finetuning learning rate (same run otherwise; one epoch, "
              "20 steps; 1 image = 0.2 points):", "",
              "| lr | top-1 after finetuning | top-5 |", "|---|---|---|"]
    every = {**other_reports, context["learning_rate"]: report}
    for learning_rate in sorted(every, reverse=True):
      after = every[learning_rate]["accuracy"]["compressed_after_finetune"]
      mark = " (config)" if learning_rate == context["learning_rate"] else ""
      lines.append(f"| {learning_rate:g}{mark} | {_percent(after['top1'])} | "
                   f"{_percent(after['top5'])} |")
  compression = report["compression"]
  lines += ["", f"Weight-bits ratio {compression['weight_bits_ratio']:.2f}x, "
            f"model ratio {compression['model_ratio']:.2f}x (packed file "
            f"{compression['packed_bytes']:,} bytes), realised pruning rate "
            f"{compression['realised_pruning_rate']:.3f}.", "",
            "In-memory benchmark (benchmarks/pretrained.py: same weights, "
            "same halves, its own decoding and crop; "
            f"{context['in_memory_source']}), opq/per_kernel, one step per "
            "channel:", ""]
  if rows:
    lines += ["| calibration | top-1 | top-5 | weight-bits ratio |",
              "|---|---|---|---|"]
    lines += [f"| {row['calibration']} | {_percent(row['top1'])} | "
              f"{_percent(row['top5'])} | {row['weight_bits_ratio']:.2f}x |"
              for row in rows]
  else:
    lines.append(
        f"(no row for p = {report['pruning_rate']}, B = {report['bits']} "
        "there yet: run `python -m benchmarks.pretrained "
        f"--settings={report['pruning_rate']}:{report['bits']}`.)")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  images_dir = os.path.normpath(_IMAGES.value)
  if not os.path.isdir(images_dir):
    print(f"Skipping: the shared images {images_dir} are absent (this "
          "benchmark needs ../shared/data/imagenet_mobilenet).")
    return
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="opq_pretrained_e2e_")
  manual_dir = os.path.join(workdir, "manual")
  data_dir = os.path.join(workdir, "tfds")
  run_dir = os.path.join(workdir, "run")
  if not os.path.exists(os.path.join(manual_dir, imagenet_manual.VAL_TAR)):
    counts = write_manual_dir(images_dir, manual_dir)
    print(f"Wrote {counts} images as ILSVRC-2012 tars to {manual_dir}")
  seconds = run_trainer(_REPO.value, run_dir, manual_dir, data_dir,
                        _OVERRIDES.value, os.path.join(workdir, "trainer.log"))
  with open(os.path.join(run_dir, "final_report.json")) as f:
    report = json.load(f)
  other_reports = {}
  for text in filter(None, _OTHER_LEARNING_RATES.value.split(",")):
    learning_rate = float(text)
    other_dir = os.path.join(workdir, f"run_lr{text}")
    run_trainer(_REPO.value, other_dir, manual_dir, data_dir,
                [*_OVERRIDES.value, f"--config.learning_rate={text}"],
                os.path.join(workdir, f"trainer_lr{text}.log"))
    with open(os.path.join(other_dir, "final_report.json")) as f:
      other_reports[learning_rate] = json.load(f)
  sys.path.insert(0, _REPO.value)
  # pylint: disable-next=g-import-not-at-top
  from configs import mobilenet_v1_shared

  config = mobilenet_v1_shared.get_config()
  for override in _OVERRIDES.value:
    field, value = override.removeprefix("--config.").split("=", 1)
    config[field] = type(config[field])(value)
  context = {"date": time.strftime("%Y-%m-%d"),
             "machine": f"{platform.machine()}, {os.cpu_count()} cores",
             "trainer_seconds": seconds,
             "calibration_images": config.calibration_images,
             "num_epochs": config.num_epochs,
             "global_batch_size": config.global_batch_size,
             "learning_rate": config.learning_rate,
             "in_memory_source": os.path.relpath(_IN_MEMORY_RESULTS.value,
                                                 _ROOT)}
  rows = in_memory_rows(_IN_MEMORY_RESULTS.value, report["pruning_rate"],
                        report["bits"])
  text = markdown(report, rows, context, other_reports)
  with open(_OUT.value, "w") as f:
    f.write(text)
  print(text)
  print(f"Wrote {_OUT.value}; the run is in {run_dir}.")


if __name__ == "__main__":
  app.run(main)
