"""The verbs of the tf_keras frontend, as `opq_tf`'s dispatch calls them."""

from opq_tf.tf_keras.calibration import calibrate
from opq_tf.tf_keras.exporting import export, load_packed
from opq_tf.tf_keras.layers import compressible_kernels, fp32_kernels
from opq_tf.tf_keras.quantize_configs import register_layer
from opq_tf.tf_keras.wrapping import apply, strip

__all__ = ["apply", "calibrate", "compressible_kernels", "export",
           "fp32_kernels", "load_packed", "register_layer", "strip"]
