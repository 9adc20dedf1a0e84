"""The tf_keras (Keras 2) frontend: tfmot wrappers, calibration, export.

tfmot 0.8 works only with Keras 2, so this frontend builds on `tf_keras`.
Importing it imports TensorFlow (through `opq_tf.tf_keras._keras`); the public
verbs in `opq_tf` load it when a tf_keras model is first used.
"""
