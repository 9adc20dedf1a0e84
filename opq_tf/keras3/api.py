"""The verbs of the Keras 3 frontend, as `opq_tf`'s dispatch calls them."""

from opq_tf.keras3.calibration import calibrate
from opq_tf.keras3.exporting import export, load_packed
from opq_tf.keras3.layers import compressible_kernels, fp32_kernels
from opq_tf.keras3.quantize_configs import register_layer
from opq_tf.keras3.wrapping import apply, strip

__all__ = ["apply", "calibrate", "compressible_kernels", "export",
           "fp32_kernels", "load_packed", "register_layer", "strip"]
