"""The trainers (absl binaries). Importing any of them runs this first.

Keras 3 fixes its backend when keras is first imported, and importing
TensorFlow (which every binary does through opq_tf.training) imports keras,
so `--config.backend=jax` must reach KERAS_BACKEND before any binary's own
imports: `python -m trainers.<binary>` imports this package first. A clash
with KERAS_BACKEND exits 2 here, before TensorFlow loads.
"""

import os
import sys

from opq_tf.training import keras3_distribute

try:
  keras3_distribute.select_backend(sys.argv)
except ValueError as error:
  # While `python -m trainers.<binary>` imports this package, sys.argv[0] is
  # still "-m"; the binary's name is in the interpreter's own command line.
  command = sys.orig_argv
  program = (command[command.index("-m") + 1].rsplit(".", 1)[-1]
             if "-m" in command[:-1] else os.path.basename(sys.argv[0]))
  print(f"{program.removesuffix('.py')}: error: {error}", file=sys.stderr)
  sys.exit(2)
