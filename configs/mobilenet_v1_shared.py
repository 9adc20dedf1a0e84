r"""OPQ on the shared real MobileNet-V1 0.75 over 1,000 real ImageNet images.

    python benchmarks/pretrained_e2e.py          # writes the tars, runs this

or by hand, once the tars exist:

    python -m trainers.compress --config=configs/mobilenet_v1_shared.py \
        --workdir=/tmp/opq_shared --config.manual_dir=/tmp/shared_manual \
        --config.data_dir=/tmp/shared_tfds

The model is the user's, not a built-in: tf_keras.applications.MobileNet with
alpha 0.75 (config.model_options), trained with "tf" preprocessing
(x / 127.5 - 1), loaded from ../shared/data/imagenet_mobilenet (by-name HDF5
of the bare application). benchmarks/pretrained_e2e.py writes the 1,000
shared images as ILSVRC-2012 tars: the first 500 sorted files are the train
split (calibration and finetuning), the last 500 the validation split, as in
the in-memory benchmarks/pretrained.py, so the figures compare.

Compression as configs/mobilenet_v1.py: p = 0.656, B = 4, per-kernel
objective; BatchNorm statistics re-estimated and kernels reconstructed on
the 500 training images.

Finetuning: one epoch over the 500 training images (one per class), batch
25 (20 steps), lr 5e-5, no warmup. The paper's lr 0.005 at batch 256 scales
to 5e-4 at batch 25, and a prototype (4-bit one-shot model distilled from
the FP32 one on these 500 images, batch 25, BatchNorm frozen) collapsed from
20% to 5-8% top-1 at 5e-4 but rose to 24% at 5e-5: with one image per class,
a step at the paper's rate moves the weights further than the data can
justify, so this run takes the rate that improved the model. Measured here
(benchmarks/pretrained_e2e.py, docs/pretrained_e2e_results.md; calibrated
40.0% top-1 before finetuning): 5e-4 drops to 36.2%, 1.5e-4 / 5e-5 / 1e-5
give 40.4 / 40.6 / 40.8% (within one 500-image standard error, ~2 points,
of each other). 5e-5 sits in that flat region, a tenth of the scaled paper
rate. Since calibration reconstructs (58.0% before finetuning), one epoch at
5e-5 or 5e-4 leaves top-1 at 58.0%: the reconstructed latent kernels sit on
their grid points and 20 steps flip no code (docs/benchmarks.md). Weight
decay and momentum as the paper's.
"""

import os

from configs import default

_SHARED = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shared",
    "data", "imagenet_mobilenet"))
WEIGHTS = os.path.join(_SHARED, "mobilenet_v1_0.75_224_imagenet.h5")


def get_config():
  """MobileNet-V1 0.75 (tf_keras.applications) at 224x224, the shared weights."""
  config = default.get_config()
  config.model = "applications.MobileNet"
  config.model_options = '{"alpha": 0.75}'
  config.preprocessing = "tf"
  config.num_classes = 1000
  config.image_size = 224
  config.build_digits_manual_dir = False  # --config.manual_dir: the shared tars
  config.pretrained = WEIGHTS

  config.global_batch_size = 25
  config.eval_batch_size = 50
  config.steps_per_checkpoint = 10
  config.log_every_steps = 5
  config.fp32_epochs = 0  # the weights are pre-trained

  config.pruning_rate = 0.656
  config.bits = 4
  config.objective = "per_kernel"
  config.calibration_images = 500
  config.calibrate_reconstruct = True

  config.num_epochs = 1
  config.learning_rate = 5e-5
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  config.weight_decay = 1e-4
  return config
