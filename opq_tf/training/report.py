"""The final report of a compression run: what final_report.json holds.

    report = report.final_report(config, strategy, ...)   # compression does
    print(report.format_report(report))

Accuracies (FP32, compressed before finetuning, calibrated, after
finetuning), the plan's and the export's compression figures, the training
figures and the time of every phase, in one JSON object; `format_report`
prints a few human lines of it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import ml_collections

from opq_tf.core import allocation
from opq_tf.core import report as export_report_lib
from opq_tf.training import layout

REPORT_FILE = export_report_lib.FILE

# The export report's figures the final report repeats under "compression".
_COMPRESSION_FIGURES = (
    "weight_bits_ratio", "model_ratio", "fp32_model_bytes", "packed_bytes",
    "entropy_bound_bytes", "packed_over_bound", "realised_pruning_rate",
    "parameters", "compressed_weights", "kept_weights")


def final_report(config: ml_collections.ConfigDict,
                 strategy: Any, *,
                 fp32_weights: Optional[str], evaluations: dict[str, Any],
                 after: dict[str, Any], plan: allocation.CompressionPlan,
                 export_report: dict[str, Any], finetune: dict[str, Any],
                 fp32_training: Optional[dict[str, Any]],
                 seconds: dict[str, float], export_dir: str,
                 frontend: str, backend: str) -> dict[str, Any]:
  """The report of `job.compress_and_finetune`.

  Args:
    config, strategy: the run's.
    fp32_weights: the FP32 weights that were compressed.
    evaluations: the cached <workdir>/evaluations.json: "fp32",
      "compressed_before_finetune" and, with calibration, "calibrated" and
      "calibration" (what calibrate did).
    after: the evaluation after finetuning.
    plan: the compression plan.
    export_report: what opq_tf's export returned (report.json).
    finetune, fp32_training: `loop.fit`'s figures of each phase (None when
      the FP32 weights were not trained in this workdir).
    seconds: the time of each phase.
    export_dir: <workdir>/export.
    frontend, backend: what the job ran on ("tf_keras" or "keras3"; the
      Keras backend).
  """
  report = {
      "model": config.model,
      "frontend": frontend,
      "backend": backend,
      "num_classes": config.num_classes,
      "image_size": config.image_size,
      "strategy": type(strategy).__name__,
      "replicas": strategy.num_replicas_in_sync,
      "pretrained": fp32_weights,
      "pruning_rate": config.pruning_rate,
      "bits": config.bits,
      "accuracy": {
          "fp32": evaluations["fp32"],
          "compressed_before_finetune": evaluations["compressed_before_finetune"],
          "calibrated_before_finetune": evaluations.get("calibrated"),
          "compressed_after_finetune": after,
      },
      "plan": {"realised_pruning_rate": plan.realised_pruning_rate,
               "weight_bits_ratio": plan.weight_bits_ratio,
               "kernels": len(plan.kernels)},
      "compression": {key: export_report[key] for key in _COMPRESSION_FIGURES},
      "finetune": finetune,
      "fp32_training": fp32_training,
      "calibration": {"images": config.calibration_images,
                      "reconstruct": config.calibrate_reconstruct,
                      **evaluations.get("calibration", {})},
      "seconds": seconds,
      # Every file the export wrote (its report's "files": format -> name).
      "export": {**{name: os.path.join(export_dir, path)
                    for name, path in export_report["files"].items()},
                 "report": os.path.join(export_dir, REPORT_FILE)},
  }
  if "litert" in export_report:
    report["litert"] = export_report["litert"]
  return report


def artefacts(report: dict[str, Any], workdir: str) -> dict[str, str]:
  """What a compression run wrote, by name: the export's files and the final
  report (what the binaries' summary lists)."""
  export = report.get("export", {})
  named = {"export dir": os.path.join(workdir, layout.EXPORT_DIR)}
  for name, key in (("saved_model", "saved_model"), ("model.keras", "keras"),
                    ("model.opq", "packed"), ("report.json", "report"),
                    ("model.tflite", "litert")):
    if key in export:
      named[name] = export[key]
  named["final_report.json"] = os.path.join(workdir, layout.FINAL_REPORT)
  return named


def format_summary(program: str, wall_seconds: float,
                   artefacts_by_name: dict[str, str]) -> str:
  """The last lines a binary prints: the whole run's time and its files."""
  lines = [f"{program}: done in {wall_seconds:.1f} s (whole run); wrote:"]
  lines += [f"  {name:18s} {path}" for name, path in artefacts_by_name.items()]
  return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
  """A few human lines of the final report (accuracies not measured, such as
  calibrated_before_finetune without calibration, are left out)."""
  lines = [f"OPQ {report['model']}: p={report['pruning_rate']}, "
           f"B={report['bits']}, {report['replicas']} replica(s)"]
  for name, accuracy in report["accuracy"].items():
    if accuracy is None:
      continue
    lines.append(f"  {name:28s} top-1 {accuracy['top1']:.4f}  "
                 f"top-5 {accuracy['top5']:.4f}  ({accuracy['examples']} images)")
  compression = report["compression"]
  if compression:
    lines.append(
        f"  weight-bits ratio {compression['weight_bits_ratio']:.2f}x, model "
        f"ratio {compression['model_ratio']:.2f}x ({compression['packed_bytes']} "
        f"bytes packed, {compression['packed_over_bound']:.3f} x entropy bound), "
        f"pruned {compression['realised_pruning_rate']:.2%}")
  finetune = report["finetune"]
  if finetune.get("images_per_second"):
    lines.append(f"  finetune {finetune['seconds']:.1f} s, "
                 f"{finetune['images_per_second']:.1f} images/s")
  lines.append(f"  compress and finetune "
               f"{report['seconds']['compress_and_finetune_total']:.1f} s;"
               f" export in {os.path.dirname(report['export']['report'])}")
  return "\n".join(lines)

