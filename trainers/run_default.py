r"""The README's main job, end to end, on the embedded default.

    python -m trainers.run_default --workdir=/tmp/opq_default

With configs/default.py (no download, a few minutes on 2 CPU cores): builds
the digits ILSVRC manual_dir under the workdir, prepares it with the real
TFDS imagenet2012 builder, trains the FP32 small_resnet, allocates the OPQ
plan (p = 0.9, B = 4; the per-layer table is printed), finetunes, evaluates
and exports <workdir>/export/{saved_model,report.json,model.opq}; the
accuracies before/after compression and the compression figures are printed
and saved as <workdir>/final_report.json. Rerunning on the workdir resumes.

Any config works (--config=configs/resnet50.py --config.pretrained=... runs
OPQ on ImageNet; a pretrained skips the FP32 training). Every input is checked
before anything runs; a bad one exits with status 2 and a message on stderr.
"""

from absl import flags

from opq_tf.training import distribute
from opq_tf.training import report
from opq_tf.training import training
from trainers import common

flags.adopt_module_key_flags(common)  # --help lists them


def main(argv):
  config, workdir, strategy = common.start(argv, "run_default", phase="all")
  final = training.train_and_evaluate(config, workdir, strategy)
  if distribute.is_chief(strategy):
    common.print_summary("run_default", report.artefacts(final, workdir))


if __name__ == "__main__":
  common.run(main)
