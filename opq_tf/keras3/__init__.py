"""The Keras 3 frontend: `keras.ops` wrappers, calibration, export.

Serves `keras.Model`s (Sequential, Functional, nested models, layers with
sublayers such as MultiHeadAttention) on any Keras 3 backend. It imports
`keras` only: with KERAS_BACKEND=jax nothing here imports TensorFlow (the
SavedModel export is the one TensorFlow-only format). The public verbs in
`opq_tf` load it when a Keras 3 model is first used.
"""
