r"""Trains a config's FP32 model: the baseline that OPQ then compresses.

    python -m trainers.train --config=configs/default.py --workdir=/tmp/opq \
        [--config.fp32_epochs=10] [--strategy=mirrored]

Writes <workdir>/fp32/weights.h5 (read by trainers/compress.py on the same
workdir), <workdir>/fp32/metrics.json, checkpoints under
<workdir>/fp32/checkpoints (a rerun resumes from the latest) and TensorBoard
summaries under <workdir>/tensorboard/fp32. --config.pretrained starts from
given weights instead of from scratch.

Every input is checked before training starts; a bad one exits with status 2
and a message on stderr, leaving the workdir untouched.
"""

import os

from absl import flags

from opq_tf.training import data
from opq_tf.training import distribute
from opq_tf.training import layout
from opq_tf.training import training
from trainers import common

flags.adopt_module_key_flags(common)  # --help lists them


def main(argv):
  config, workdir, strategy = common.start(argv, "train", phase="fp32")
  data_dir = data.prepare_data(config, workdir, strategy)
  metrics = training.train_fp32(config, workdir, strategy, data_dir)
  print(f"FP32 {config.model}: {metrics['accuracy']}")
  if distribute.is_chief(strategy):
    common.print_summary("train", {
        "fp32 weights": os.path.join(workdir, layout.FP32_WEIGHTS),
        "fp32 metrics": os.path.join(workdir, layout.FP32_METRICS),
        "checkpoints": layout.checkpoint_dir(workdir, "fp32")})


if __name__ == "__main__":
  common.run(main)
