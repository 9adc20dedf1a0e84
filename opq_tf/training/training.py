"""The whole job under a distribution strategy: data, FP32 training, OPQ.

    strategy = distribute.make_strategy("mirrored")
    checks.validate(config, strategy, workdir,            # the binary does this
                    default_config=default.get_config())
    training.train_and_evaluate(config, workdir, strategy)

`train_and_evaluate` = `data.prepare_data` (once; the data_dir is passed
down) -> `train_fp32` (unless `layout.starting_point` says the FP32 weights
exist) -> `compress_and_finetune`. Each runs opq_tf.training.job with the
config's frontend: `compression.FRONTEND` (tf_keras + tfmot under
tf.distribute) or, for config.frontend = "keras3", `keras3_training.FRONTEND`
(Keras 3 on TensorFlow strategies or JAX DataParallel). The parts, each a
module of opq_tf.training:

    job           the job itself, once for both frontends
    layout        the workdir's files and where a run starts (starting_point)
    data          where a config's data lives; prepare_data
    loop          make_train_step / make_eval_step, kernel_l2, fit, evaluate
    planning      config -> allocate's options; plan.json computed once
    compression   the tf_keras frontend's job steps: export, LiteRT accuracy
    serving       the export's serving signature (JPEG bytes in)
    report        the final report and its printed lines
    checks        every check of the input, before any of this runs
    keras3_*      the Keras 3 frontend's models, loop, strategies and steps
"""

from __future__ import annotations

from typing import Any

import ml_collections

from opq_tf.training import job


def frontend(config: ml_collections.ConfigDict) -> job.Frontend:
  """The config's frontend, imported on first use: a tf_keras run imports no
  Keras 3 frontend, a Keras 3 run no tfmot wrappers."""
  # pylint: disable=g-import-not-at-top
  if config.get("frontend", "tf_keras") == "keras3":
    from opq_tf.training import keras3_training
    return keras3_training.FRONTEND
  from opq_tf.training import compression
  return compression.FRONTEND


def train_fp32(config: ml_collections.ConfigDict, workdir: str,
               strategy: Any, data_dir: str) -> dict[str, Any]:
  """job.train_fp32 with the config's frontend: <workdir>/fp32/weights.h5
  and metrics.json (a workdir that has both is not retrained)."""
  return job.train_fp32(frontend(config), config, workdir, strategy, data_dir)


def compress_and_finetune(config: ml_collections.ConfigDict, workdir: str,
                          strategy: Any, data_dir: str) -> dict[str, Any]:
  """job.compress_and_finetune with the config's frontend: the final report."""
  return job.compress_and_finetune(frontend(config), config, workdir,
                                   strategy, data_dir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       strategy: Any) -> dict[str, Any]:
  """The whole job: data -> FP32 training (if `starting_point` says) -> OPQ.

  The config is assumed valid (checks.validate, which the trainers run).

  Returns:
    The final report of compress_and_finetune, plus "wall_seconds".
  """
  return job.train_and_evaluate(frontend(config), config, workdir, strategy)
