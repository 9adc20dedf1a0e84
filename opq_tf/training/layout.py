"""What a run keeps in its workdir, and where a run on a workdir starts.

The workdir after a full run (trainers/run_default.py):

    <workdir>/manual/              digits ILSVRC tars (embedded default only)
    <workdir>/tfds/                TFDS imagenet2012 records (idem)
    <workdir>/fp32/weights.h5, metrics.json     FP32 weights (train_fp32)
    <workdir>/fp32/checkpoints/    FP32 training checkpoints
    <workdir>/plan.json            the compression plan, computed once
    <workdir>/evaluations.json     accuracies before finetuning (cached)
    <workdir>/finetune/checkpoints/
    <workdir>/tensorboard/{fp32,finetune}/
    <workdir>/export/saved_model/  stripped model; serving_default takes JPEGs
    <workdir>/export/report.json, model.opq
    <workdir>/final_report.json

Every file is written atomically, so a killed run leaves either the old file
or the new one; a rerun on the workdir reads back what exists and computes
only what is missing (`starting_point` says what that is). Only the chief
writes here (see opq_tf.training.distribute).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import ml_collections

from opq_tf.core import files

PLAN_FILE = "plan.json"
# Legacy (by layer name) HDF5; a name ending in .weights.h5 would select
# Keras' v3 format, which matches weights by model structure instead.
FP32_WEIGHTS = os.path.join("fp32", "weights.h5")
FP32_METRICS = os.path.join("fp32", "metrics.json")
EVALUATIONS = "evaluations.json"
FINAL_REPORT = "final_report.json"
EXPORT_DIR = "export"


class WorkdirError(ValueError):
  """A workdir file that is unusable (truncated, corrupt, foreign), found
  while the run reads it; the message names the file and the fix, and the
  trainers exit 2 on it as on a bad flag."""


def checkpoint_dir(workdir: str, phase: str) -> str:
  """<workdir>/<phase>/checkpoints: the training checkpoints of "fp32" or
  "finetune"."""
  return os.path.join(workdir, phase, "checkpoints")


def write_json(path: str, data: dict) -> None:
  """Atomic JSON; NumPy scalars become plain numbers."""
  files.write_json(path, json.loads(json.dumps(data, default=float)))


def read_json(path: str) -> dict:
  """The JSON at `path`, or {} if there is none (nothing cached yet)."""
  return files.read_json(path) if os.path.exists(path) else {}


@dataclasses.dataclass(frozen=True)
class Start:
  """What `starting_point` found: which rule, and the FP32 weights to compress.

  `fp32_weights` is None when they do not exist yet (rule 4: train them).
  """

  rule: str
  fp32_weights: Optional[str]

  @property
  def trains_fp32(self) -> bool:
    return self.rule == "train"


def starting_point(config: ml_collections.ConfigDict, workdir: str) -> Start:
  """Where a run on `workdir` starts from; the first rule that holds wins.

  1. "plan": <workdir>/plan.json exists, so compression has begun. The plan is
     read back and never recomputed (not from other weights, not for a changed
     config: checks.validate refuses that); finetuning resumes from the latest
     <workdir>/finetune/checkpoints, whose masks and steps win over anything
     the FP32 weights would give. No FP32 training. The FP32 weights
     (config.pretrained, else <workdir>/fp32/weights.h5) only rebuild the
     model before the checkpoint is restored.
  2. "pretrained": config.pretrained names FP32 weights (a file, checkpoint,
     SavedModel or "imagenet"): they are compressed; no FP32 training.
  3. "fp32_weights": <workdir>/fp32/weights.h5 exists, left by a finished
     FP32 run (trainers/train.py, or an earlier run_default): compressed as
     they are; no FP32 training.
  4. "train": nothing to compress yet: train FP32 first, resuming from the
     latest <workdir>/fp32/checkpoints if a killed run left some, then
     compress the result (rule 3 from then on).
  """
  workdir_weights = os.path.join(workdir, FP32_WEIGHTS)
  weights = config.pretrained or (
      workdir_weights if os.path.exists(workdir_weights) else None)
  if os.path.exists(os.path.join(workdir, PLAN_FILE)):
    return Start("plan", weights)
  if config.pretrained:
    return Start("pretrained", config.pretrained)
  if weights:
    return Start("fp32_weights", weights)
  return Start("train", None)
