"""The export report: every size figure, computed in one place (NumPy).

Size figures, all over the whole model unless stated:
- weight_bits_ratio = 32·Σn_i / Σ_i(kept_i·B_i + 32·steps_i), over compressed
  kernels (steps_i = 1, or the output channels at "channel" granularity).
- model_ratio = 4·(all parameters) / (bytes of model.opq on disk).
- entropy_bound_bytes = (Σ_i n_i·H_i + 32·(steps) + 32·(FP32 rest
  parameters)) / 8: the stored steps are part of what must be written,
  H_i the empirical entropy of kernel i's symbols (0 = pruned, c + K + 1 = code c).
- packed_over_bound = packed_bytes / entropy_bound_bytes.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from opq_tf.core import contract
from opq_tf.core import grid
from opq_tf.core import packing

FILE = "report.json"  # its name in every export directory, either frontend's


def build(kernels: Sequence[contract.CompressedKernel],
          packed: Sequence[packing.PackedKernel], rest: Mapping[str, np.ndarray],
          stats: packing.PackStats, plan: Optional[Any] = None,
          files: Optional[Mapping[str, str]] = None,
          fp32: Optional[Mapping[str, str]] = None) -> dict:
  """report.json contents: plan, totals and per-kernel realised figures.

  Args:
    kernels: the compressed kernels, in model order.
    packed: their `PackedKernel`s as written to the packed file (same order).
    rest: the FP32 weights stored beside them, by name.
    stats: what `packing.write_packed` measured.
    plan: the `CompressionPlan`, recorded as JSON when given.
    files: format -> file or folder name, as the export wrote them.
    fp32: kernel-like weights left FP32 -> why (the frontend's
      `fp32_kernels` of the exported model), stored among `rest`.
  """
  kernel_reports = []
  total_weights = kept_weights = entropy_bits = 0.0
  for kernel, packed_kernel in zip(kernels, packed):
    counts = stats.kernel_counts[packed_kernel.name]
    entropy = packing.entropy_from_counts(counts)
    size = int(counts.sum())
    kept = int(kernel.mask.sum())
    total_weights += size
    kept_weights += kept
    entropy_bits += size * entropy
    kernel_reports.append({
        "key": kernel.key,
        "weight_name": packed_kernel.name,
        "kind": kernel.kind,
        "shape": list(kernel.mask.shape),
        "size": size,
        "kept": kept,
        "pruning_rate": 1.0 - kept / size,
        "bits": kernel.bits,
        "step": kernel.step.tolist(),
        "steps": int(kernel.step.size),
        "threshold": kernel.threshold,
        "entropy_bits_per_weight": entropy,
        "coded_bytes": stats.kernel_coded_bits[packed_kernel.name] / 8,
    })
  rest_parameters = int(sum(np.size(v) for v in rest.values()))
  all_parameters = int(total_weights) + rest_parameters
  steps = sum(r["steps"] for r in kernel_reports)
  entropy_bound_bytes = (entropy_bits + 32 * steps + 32 * rest_parameters) / 8
  return {
      "weight_bits_ratio": grid.weight_bits_ratio(
          [r["size"] for r in kernel_reports], [r["kept"] for r in kernel_reports],
          [r["bits"] for r in kernel_reports],
          [r["steps"] for r in kernel_reports]),
      "model_ratio": 4 * all_parameters / stats.file_bytes,
      "fp32_model_bytes": 4 * all_parameters,
      "packed_bytes": stats.file_bytes,
      "entropy_bound_bytes": entropy_bound_bytes,
      "packed_over_bound": stats.file_bytes / entropy_bound_bytes,
      "packed_parts_bytes": {
          "header": stats.header_bytes,
          "coded": stats.coded_bytes,
          "fp32_rest": stats.rest_bytes,
      },
      "parameters": all_parameters,
      "compressed_weights": int(total_weights),
      "kept_weights": int(kept_weights),
      "realised_pruning_rate": 1.0 - kept_weights / total_weights,
      "fp32_rest_parameters": rest_parameters,
      "kernels": kernel_reports,
      "fp32": dict(fp32 or {}),
      "plan": json.loads(plan.to_json()) if plan is not None else None,
      "files": dict(files or {}),
  }
