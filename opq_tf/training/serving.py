"""The export's serving signature: encoded JPEGs in, classes out.

<workdir>/export/saved_model has one signature,
serving_default(jpegs: tf.string [batch] of encoded JPEGs) ->
{logits [batch, classes], probabilities, classes int32 [batch]}; images are
decoded, centre-cropped and resized exactly as in evaluation
(imagenet_input.preprocess_for_eval), so a served model sees what the
evaluated one saw.

    exporting.export(qmodel, export_dir, serving_fn=serving.serving_fn(224),
                     input_signature=serving.SERVING_SIGNATURE)
"""

from __future__ import annotations

from typing import Callable

from opq_tf.tf_keras._keras import keras, tf
from opq_tf.training import imagenet_input

SERVING_SIGNATURE = [tf.TensorSpec([None], tf.string, name="jpegs")]


def serving_fn(image_size: int
               ) -> Callable[[keras.Model, tf.Tensor], dict[str, tf.Tensor]]:
  """The serving_default function of the export: JPEG bytes in, classes out.

  Input `jpegs`: tf.string [batch], each an encoded JPEG of any size; decoded,
  centre-cropped and resized by imagenet_input.preprocess_for_eval exactly as
  in evaluation. Outputs: `logits` float32 [batch, classes], `probabilities`
  (softmax), `classes` int32 [batch] (argmax).
  """

  def serve(model, jpegs):
    images = imagenet_input.preprocess_for_eval(jpegs, image_size)
    logits = model(images, training=False)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}

  return serve
