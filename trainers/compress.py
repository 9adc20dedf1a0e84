r"""Compresses FP32 weights with OPQ, finetunes, evaluates and exports.

    python -m trainers.compress --config=configs/resnet50.py \
        --workdir=/tmp/opq_resnet50 --config.pretrained=/ckpt/resnet50.weights.h5 \
        --config.data_dir=/data/tfds [--config.manual_dir=/data/ILSVRC2012]

The FP32 weights are config.pretrained (a .h5 / .weights.h5 file, checkpoint,
Keras SavedModel, or "imagenet") or, without it, <workdir>/fp32/weights.h5 from
trainers/train.py. The compression plan is computed once and kept as
<workdir>/plan.json; rerunning on the workdir resumes finetuning from the
latest checkpoint with the same plan, masks and steps. Results:
<workdir>/export/{saved_model,report.json,model.opq} and
<workdir>/final_report.json; the per-layer table and accuracies are printed.

Every input is checked before anything runs; a bad one exits with status 2
and a message on stderr, leaving the workdir untouched.
"""

from absl import flags

from opq_tf.training import data
from opq_tf.training import distribute
from opq_tf.training import report
from opq_tf.training import training
from trainers import common

flags.adopt_module_key_flags(common)  # --help lists them


def main(argv):
  config, workdir, strategy = common.start(argv, "compress", phase="compress")
  data_dir = data.prepare_data(config, workdir, strategy)
  final = training.compress_and_finetune(config, workdir, strategy, data_dir)
  if distribute.is_chief(strategy):
    common.print_summary("compress", report.artefacts(final, workdir))


if __name__ == "__main__":
  common.run(main)
