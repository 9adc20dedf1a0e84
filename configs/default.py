"""The embedded default: OPQ on a small ResNet over a digits stand-in of ImageNet.

    python -m trainers.run_default --workdir=/tmp/opq_default

runs the whole job in a few minutes on 2 CPU cores, with no download:
scikit-learn's bundled digits are written as ILSVRC-2012 tars under
<workdir>/manual (10 classes, 1297 train / 500 validation images, 32x32),
prepared by the real TFDS imagenet2012 builder into <workdir>/tfds, then a
small_resnet (308k kernel weights) is trained in FP32, compressed with OPQ
(p = 0.9, B = 4) and finetuned.

Every other config starts from this one and changes what differs (Flax's
ImageNet example does the same), so this file lists every field; override any
of them from the command line, e.g. --config.pruning_rate=0.8.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The embedded default config."""
  config = ml_collections.ConfigDict()

  # Which Keras the model is: "tf_keras" (Keras 2, tfmot wrappers) or "keras3"
  # (Keras 3, opq_tf.keras3; trains on TensorFlow or JAX). tf_keras stays the
  # default: its job has the JPEG-serving SavedModel and the LiteRT export.
  config.frontend = "tf_keras"
  # keras3 only: "tensorflow" | "jax"; "" = KERAS_BACKEND, else tensorflow.
  # Keras fixes it at import: pass it on the command line or in KERAS_BACKEND.
  config.backend = ""

  # Model and data. Images are RGB in [0, 255]; models normalise themselves.
  # resnet50 | mobilenet_v1 | alexnet | small_resnet, or a user's model:
  # "applications.<Constructor>" (tf_keras.applications) or "saved:<path>".
  config.model = "small_resnet"
  config.num_classes = 10
  config.image_size = 32
  # A user model's constructor options as a JSON object, e.g. '{"alpha": 0.75}'.
  config.model_options = "{}"
  # The input scaling that model was trained with: none (it takes 0..255, as
  # the built-ins do) | tf | torch | caffe (preprocess_input's modes).
  config.preprocessing = "none"
  # TFDS data_dir; "" = <workdir>/tfds here (TFDS's default for ImageNet).
  config.data_dir = ""
  # ILSVRC-2012 tars; "" = <workdir>/manual, built from the digits, here.
  config.manual_dir = ""
  config.build_digits_manual_dir = True
  # FP32 weights to compress (file, checkpoint, SavedModel or "imagenet");
  # "" = train them first (<workdir>/fp32/weights.h5).
  config.pretrained = ""

  # Batches and the loop.
  config.global_batch_size = 64  # over all replicas
  config.eval_batch_size = 100
  config.steps_per_epoch = 0  # 0 = train examples // global_batch_size (20)
  config.seed = 0  # weights init, data order, crops and flips
  config.steps_per_checkpoint = 10
  config.checkpoints_to_keep = 3
  config.log_every_steps = 10
  config.jit_compile = False  # XLA for the forward/backward pass

  # FP32 training (trainers/train.py, and run_default without a pretrained).
  config.fp32_epochs = 15
  config.fp32_learning_rate = 0.1
  config.fp32_warmup_epochs = 1.0

  # OPQ compression (method doc, part B).
  config.pruning_rate = 0.9
  config.bits = 4
  # True: `bits` is the average budget of a mixed plan, each kernel choosing
  # its own B in 2..8 (allocate(bits="mixed", average_bits=bits)).
  config.mixed_bits = False
  config.method = "opq"  # opq | uniform | global_magnitude
  # What opq minimises: "per_kernel" = Σ_i e_i / σ_i² (each kernel's error
  # relative to its weights' scale; the library's default, measured best on
  # real ImageNet weights) or "total" = Σ_i n_i e_i. This small model's
  # kernels barely leave their initialisation (nearly uniform, far from
  # Laplace): "per_kernel" empties its largest kernel (48% of the weights)
  # at p = 0.9 and finetunes to 86.3% where "total" reaches 92.9%
  # (benchmarks/accuracy.py, docs/benchmarks.md), so this config keeps "total".
  config.objective = "total"
  config.step_granularity = "channel"  # one step per output channel; "kernel"
  config.step_stats = "channel"  # kernel granularity: unified step; "layer"
  config.step_fit = "weights"  # refine steps on the weights; or "laplace"
  config.quantize_activations = False
  # Calibration before finetuning (opq_tf.calibrate): BatchNorm statistics
  # re-estimated on this many training images (0 = none), and optionally the
  # kept weights reconstructed layer by layer. On this job reconstruction
  # lifts top-1 before finetuning from 80.0% to 90.4% but not after it
  # (93.8% without, 93.4% with) and costs 15 s of the job's 50: off here; the
  # ImageNet configs, whose one-shot result it lifts by 4-14 points, turn it on.
  config.calibration_images = 500
  config.calibrate_reconstruct = False

  # Export: also a LiteRT model.tflite whose int8 weights are the OPQ codes,
  # with float activations, or int8 ones calibrated on training images.
  config.litert = False
  config.litert_int8_activations = False
  # Its stored weights: "int8", "int4" (B <= 4 kernels where LiteRT runs the
  # op so), "int2" (also B <= 2 kernels in int2: each at its smallest type)
  # or "auto" (per op type where the interpreter measured it no slower);
  # report.json's litert "stored" says per kernel what was stored and why.
  config.litert_weights = "int8"

  # Finetuning of the compressed model: SGD with momentum, coupled L2 weight
  # decay on the kernels, linear warmup then cosine decay to 0.
  config.num_epochs = 8
  config.learning_rate = 0.02
  config.warmup_epochs = 0.5
  config.momentum = 0.9
  config.weight_decay = 1e-4
  return config
