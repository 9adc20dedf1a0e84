"""A run's compression plan: a config's allocate options, computed once.

    plan = planning.load_or_allocate(model, config, workdir, chief)

`allocate_options` is the one map from a config to the options of
`opq_tf.core.allocation.allocate`; the trainer allocates with it, checks
compares an existing <workdir>/plan.json against it, and the benchmarks
allocate with it, so a config field cannot reach one and miss the others.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import ml_collections

import opq_tf
from opq_tf.core import allocation
from opq_tf.core import files
from opq_tf.training import layout


def allocate_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """allocate's keyword arguments for `config`: p, B and how to allocate.

  allocate(kernels, **allocate_options(config)) is the config's plan.
  """
  bits = ({"bits": "mixed", "average_bits": float(config.bits)}
          if config.get("mixed_bits", False) else {"bits": config.bits})
  return {"pruning_rate": config.pruning_rate, **bits,
          "method": config.method, "objective": config.objective,
          "step_granularity": config.step_granularity,
          "step_stats": config.step_stats, "step_fit": config.step_fit}


def recorded_options(plan: allocation.CompressionPlan) -> dict[str, Any]:
  """The options `plan` was allocated with, keyed as `allocate_options`."""
  bits = ({"bits": "mixed", "average_bits": plan.average_bits}
          if plan.bits == "mixed" else {"bits": plan.bits})
  return {"pruning_rate": plan.target_pruning_rate, **bits,
          "method": plan.method, "objective": plan.objective,
          "step_granularity": plan.step_granularity,
          "step_stats": plan.step_stats, "step_fit": plan.step_fit}


def read(workdir: str) -> allocation.CompressionPlan:
  """<workdir>/plan.json."""
  with open(os.path.join(workdir, layout.PLAN_FILE)) as f:
    return allocation.CompressionPlan.from_json(f.read())


def load_or_allocate(model: Any, config: ml_collections.ConfigDict,
                     workdir: str, chief: bool) -> allocation.CompressionPlan:
  """The workdir's plan.json if there is one, else a new plan (saved).

  A plan is never recomputed: a resumed run's masks and steps must be those
  its finetuning checkpoint was trained with (layout.starting_point, rule 1).
  Only the chief writes plan.json. `model` is a tf_keras or Keras 3 model
  (opq_tf.allocate reads its kernels through its frontend).
  """
  path = os.path.join(workdir, layout.PLAN_FILE)
  if os.path.exists(path):
    logging.info("Reusing the compression plan %s", path)
    return read(workdir)
  plan = opq_tf.allocate(model, **allocate_options(config))
  if chief:
    files.atomic_write(path, plan.to_json())
  return plan
