r"""OPQ on MobileNet-V1 / ImageNet: the paper's finetuning recipe, B = 4, p = 0.656.

    python -m trainers.compress --config=configs/mobilenet_v1.py \
        --workdir=/tmp/opq_mobilenet --config.pretrained=/ckpt/mobilenet_v1_fp32.h5 \
        --config.data_dir=/data/tfds --config.manual_dir=/data/ILSVRC2012

The model is tf_keras.applications.MobileNet (alpha 1.0, 4.2 M parameters);
its 13 DepthwiseConv2D kernels are compressed too (one step per channel).

Compression (method doc, part C): the paper's 23.26x, read as a weight-bits
ratio 32 / (kept fraction x B), is p = 0.541 at B = 3, 0.656 at B = 4 and
0.725 at B = 5. MobileNet-V1 is the compact one: it has little redundancy to
prune (magnitude pruning to 75 % costs it ~3 points of top-1, Zhu & Gupta
2017) and its depthwise kernels are hard to quantize with one step per layer.
B = 4 balances the two: 65.6 % sparsity stays below where pruning starts to
hurt badly, and 15 levels per layer are far safer than B = 3's 7; B = 5 would
need 72.5 % sparsity.

Finetuning (paper): global batch 256, SGD momentum 0.9, weight decay 1e-4,
lr 0.005; coupled L2 on the kernels, depthwise included (see
opq_tf/training/loop.py). Schedule (our choice): 20 epochs, 1-epoch linear warmup,
cosine decay to 0 (reasons in configs/resnet50.py).

The FP32 fields are a from-scratch SGD recipe (90 epochs, lr 0.1 at batch
256, 5 warmup epochs), used only by trainers/train.py.
"""

from configs import default


def get_config():
  """MobileNet-V1 (alpha 1.0) at 224x224 on ILSVRC-2012."""
  config = default.get_config()
  config.model = "mobilenet_v1"
  config.num_classes = 1000
  config.image_size = 224
  config.build_digits_manual_dir = False  # real ImageNet via --config.manual_dir

  config.global_batch_size = 256
  config.eval_batch_size = 256
  config.steps_per_checkpoint = 1000
  config.log_every_steps = 100

  config.fp32_epochs = 90
  config.fp32_learning_rate = 0.1
  config.fp32_warmup_epochs = 5.0

  config.pruning_rate = 0.656
  config.bits = 4
  # Long-trained ImageNet kernels are close to Laplace: the per-kernel
  # objective, measured best on them (docs/benchmarks.md, pretrained).
  config.objective = "per_kernel"
  # Reconstruction on the 500 calibration images, before finetuning: +4.4 and
  # +14.4 points one-shot top-1 on real MobileNet weights at (0.5, 8) and
  # (0.656, 4) (docs/benchmarks.md, pretrained).
  config.calibrate_reconstruct = True

  config.num_epochs = 20
  config.learning_rate = 0.005
  config.warmup_epochs = 1.0
  config.momentum = 0.9
  config.weight_decay = 1e-4
  return config
