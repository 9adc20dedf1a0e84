"""Tests for opq_tf.export: SavedModel, report.json and the packed file."""

import json
import os
import re
import shutil
import subprocess
import struct
import sys
import tempfile
import zlib
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import opq_tf
from opq_tf.core import packing
from opq_tf.tf_keras import layers as layers_lib
from opq_tf.tf_keras._keras import keras, tf
from opq_tf.tf_keras.wrapping import apply, compressed_kernels, strip
# Not `from opq_tf import export`: the package's public verb shares that name.
from opq_tf.tf_keras.exporting import export, load_packed, named_weights


def _build_model(dense_units=10, dense_name="fc"):
  inputs = keras.Input((16, 16, 3))
  x = keras.layers.Conv2D(8, 3, name="conv1")(inputs)
  x = keras.layers.BatchNormalization(name="bn1")(x)
  x = keras.layers.ReLU(name="relu1")(x)
  x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
  x = keras.layers.Conv2D(16, 1, name="pw")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  outputs = keras.layers.Dense(dense_units, name=dense_name)(x)
  return keras.Model(inputs, outputs, name="small")


def _pretrained_model():
  keras.utils.set_random_seed(0)
  model = _build_model()
  rng = np.random.default_rng(0)
  bn = model.get_layer("bn1")
  bn.set_weights([rng.uniform(0.5, 1.5, 8), rng.normal(size=8),
                  rng.normal(size=8), rng.uniform(0.5, 2.0, 8)])
  return model


def _images(n=2):
  return np.random.default_rng(1).random((n, 16, 16, 3)).astype(np.float32)


def _siblings(directory):
  """Entries next to `directory` other than itself (temp leftovers)."""
  parent, base = os.path.split(directory)
  return sorted(n for n in os.listdir(parent) if n != base)


class ExportTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    model = _pretrained_model()
    cls.plan = opq_tf.allocate(model, pruning_rate=0.5, bits=4)
    cls.qmodel = apply(model, cls.plan)
    cls.stripped = strip(cls.qmodel)
    cls.directory = os.path.join(cls.root, "export")
    cls.report = export(cls.qmodel, cls.directory, plan=cls.plan)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp(dir=self.root)
    self.target = os.path.join(self.workdir, "out")

  def test_directory_layout(self):
    self.assertCountEqual(os.listdir(self.directory),
                          ["saved_model", "report.json", "model.opq"])
    self.assertTrue(os.path.isfile(
        os.path.join(self.directory, "saved_model", "saved_model.pb")))
    with open(os.path.join(self.directory, "report.json")) as f:
      self.assertEqual(json.load(f), self.report)
    self.assertNotIn(".export", " ".join(os.listdir(self.root)))

  @parameterized.named_parameters(
      ("model_fn", "model_fn"), ("json", "json"), ("config_dict", "dict"))
  def test_packed_file_rebuilds_strip_bit_identically(self, how):
    source = {
        "model_fn": _build_model,
        "json": self.stripped.to_json(),
        "dict": json.loads(self.stripped.to_json()),
    }[how]
    keras.utils.set_random_seed(123)  # Fresh weights differ from the export.
    rebuilt = load_packed(
        os.path.join(self.directory, "model.opq"), source)
    want = named_weights(self.stripped)
    got = named_weights(rebuilt)
    self.assertEqual(list(got), list(want))
    for name, variable in want.items():
      self.assertTrue(np.array_equal(got[name].numpy(), variable.numpy()),
                      msg=name)
    self.assertTrue(np.array_equal(rebuilt.predict(_images(), verbose=0),
                                   self.stripped.predict(_images(), verbose=0)))

  def test_rebuilt_kernels_are_the_compressed_kernels(self):
    rebuilt = load_packed(
        os.path.join(self.directory, "model.opq"), _build_model)
    weights = named_weights(rebuilt)
    for entry in compressed_kernels(self.qmodel):
      kernel = weights[entry.key].numpy()
      self.assertTrue(np.all(kernel[~entry.mask] == 0), msg=entry.key)
      codes = kernel / entry.step
      np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
      self.assertLessEqual(np.abs(np.round(codes)).max(), 7)

  def test_saved_model_serving_default_matches_keras(self):
    loaded = tf.saved_model.load(os.path.join(self.directory, "saved_model"))
    serving = loaded.signatures["serving_default"]
    outputs = serving(inputs=tf.constant(_images(3)))["outputs"].numpy()
    np.testing.assert_allclose(
        outputs, self.stripped.predict(_images(3), verbose=0), atol=1e-6)
    np.testing.assert_allclose(
        outputs, self.qmodel.predict(_images(3), verbose=0), atol=1e-5)

  def test_saved_model_cli_runs_serving_default(self):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    inputs_path = os.path.join(self.workdir, "images.npy")
    np.save(inputs_path, _images())
    # TF 2.21's --input_exprs only accepts Python literals (no np.* calls), so
    # the batch goes in through --inputs as an .npy file.
    result = subprocess.run(
        [cli, "run", "--dir", os.path.join(self.directory, "saved_model"),
         "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"inputs={inputs_path}"],
        capture_output=True, text=True, timeout=120, check=False)
    self.assertEqual(result.returncode, 0, msg=result.stderr[-2000:])
    printed = result.stdout.split("Result for output key outputs:", 1)[1]
    values = np.array(
        [float(v) for v in re.findall(r"-?\d+\.\d*(?:e[-+]\d+)?", printed)])
    want = self.stripped.predict(_images(), verbose=0)
    self.assertEqual(values.size, want.size)
    np.testing.assert_allclose(values.reshape(want.shape), want,
                               rtol=1e-5, atol=1e-7)

  def test_report_figures(self):
    entries = compressed_kernels(self.qmodel)
    sizes = np.array([e.mask.size for e in entries])
    kept = np.array([e.mask.sum() for e in entries])
    steps = np.array([e.step.size for e in entries])
    self.assertGreater(steps.max(), 1)  # One step per output channel.
    self.assertAlmostEqual(self.report["weight_bits_ratio"],
                           32 * sizes.sum() / (kept * 4 + 32 * steps).sum())
    packed_path = os.path.join(self.directory, "model.opq")
    self.assertEqual(self.report["packed_bytes"], os.path.getsize(packed_path))
    parameters = self.stripped.count_params()
    self.assertEqual(self.report["parameters"], parameters)
    self.assertAlmostEqual(self.report["model_ratio"],
                           4 * parameters / os.path.getsize(packed_path))
    entropy_bits = 0.0
    for entry in entries:
      symbols = np.where(entry.mask, entry.codes + 8, 0)
      q = np.unique(symbols, return_counts=True)[1] / symbols.size
      entropy_bits += -symbols.size * (q * np.log2(q)).sum()
    rest = parameters - sizes.sum()
    self.assertAlmostEqual(self.report["entropy_bound_bytes"],
                           (entropy_bits + 32 * steps.sum() + 32 * rest) / 8)
    self.assertAlmostEqual(
        self.report["packed_over_bound"],
        os.path.getsize(packed_path) / self.report["entropy_bound_bytes"])
    self.assertGreater(self.report["packed_over_bound"], 1.0)
    layers = {layer["key"]: layer for layer in self.report["kernels"]}
    self.assertEqual(list(layers), [e.key for e in entries])
    for entry in entries:
      layer = layers[entry.key]
      self.assertEqual(layer["size"], entry.mask.size)
      self.assertEqual(layer["kept"], int(entry.mask.sum()))
      self.assertAlmostEqual(layer["pruning_rate"],
                             1 - entry.mask.mean())
      self.assertEqual(layer["bits"], 4)
      np.testing.assert_array_equal(np.float32(layer["step"]), entry.step)
      self.assertEqual(layer["steps"], entry.step.size)
      self.assertGreater(layer["coded_bytes"], 0)
    self.assertEqual(self.report["plan"],
                     json.loads(self.plan.to_json()))

  def test_custom_serving_fn_takes_jpeg_bytes(self):
    pixels = (_images(2) * 255).astype(np.uint8)
    jpegs = tf.stack([tf.io.encode_jpeg(image) for image in pixels])

    def serving_fn(model, jpeg_bytes):
      def decode(data):
        image = tf.io.decode_jpeg(data, channels=3)
        return tf.reshape(tf.cast(image, tf.float32) / 255.0, (16, 16, 3))
      images = tf.map_fn(decode, jpeg_bytes, fn_output_signature=tf.float32)
      return {"probabilities": tf.nn.softmax(model(images, training=False))}

    signature = [tf.TensorSpec([None], tf.string, name="jpegs")]
    export(self.qmodel, self.target, serving_fn=serving_fn,
                      input_signature=signature)
    loaded = tf.saved_model.load(os.path.join(self.target, "saved_model"))
    got = loaded.signatures["serving_default"](jpegs=jpegs)["probabilities"]
    decoded = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpegs])
    want = tf.nn.softmax(
        self.stripped(decoded.astype(np.float32) / 255.0, training=False))
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)

  def test_litert_file_beside_the_others_holds_the_codes(self):
    from opq_tf.tf_keras import litert  # pylint: disable=g-import-not-at-top

    report = export(self.qmodel, self.target, litert=True)
    path = os.path.join(self.target, "model.tflite")
    self.assertEqual(report["litert"]["bytes"], os.path.getsize(path))
    self.assertEqual(report["files"]["litert"], "model.tflite")
    self.assertIn("int8", report["litert"]["bits_note"])
    stored = litert.read_weights(path)
    dense = stored["fc/kernel"]  # No BatchNorm folded in: scale = step.
    kernel = {k.key: k for k in compressed_kernels(self.qmodel)}["fc/kernel"]
    np.testing.assert_array_equal(dense.values, kernel.codes.T)
    np.testing.assert_array_equal(np.asarray(dense.scales, np.float32),
                                  np.ravel(kernel.step))
    self.assertEqual(_siblings(self.target), [])

  def test_export_into_existing_empty_directory(self):
    os.mkdir(self.target)
    export(self.qmodel, self.target)
    self.assertTrue(os.path.isfile(os.path.join(self.target, "model.opq")))
    self.assertEqual(_siblings(self.target), [])

  def test_never_applied_model_raises_and_writes_nothing(self):
    with self.assertRaisesRegex(ValueError, "call opq_tf.apply first"):
      export(_pretrained_model(), self.target)
    self.assertEqual(os.listdir(self.workdir), [])

  def test_non_empty_directory_raises_and_is_untouched(self):
    os.mkdir(self.target)
    with open(os.path.join(self.target, "keep.txt"), "w") as f:
      f.write("mine")
    with self.assertRaisesRegex(ValueError,
                                "choose a new directory or remove it"):
      export(self.qmodel, self.target)
    self.assertEqual(os.listdir(self.target), ["keep.txt"])
    self.assertEqual(_siblings(self.target), [])

  def test_failing_packer_leaves_no_directory(self):
    target = os.path.join(self.workdir, "new", "parents", "out")
    with mock.patch.object(packing, "write_packed",
                           side_effect=RuntimeError("disk full")):
      with self.assertRaisesRegex(RuntimeError, "disk full"):
        export(self.qmodel, target)
    self.assertEqual(os.listdir(self.workdir), [])

  def test_untraceable_serving_fn_raises_and_writes_nothing(self):
    with self.assertRaisesRegex(ValueError, "serving_fn could not be traced"):
      export(self.qmodel, self.target,
                        serving_fn=lambda model, inputs: object())
    self.assertEqual(os.listdir(self.workdir), [])

  @parameterized.named_parameters(
      ("wider_dense", lambda: _build_model(dense_units=11),
       r"'fc/kernel' with shape \(16, 10\), the model has \(16, 11\)"),
      ("renamed_layer", lambda: _build_model(dense_name="head"),
       "'fc/kernel', which the model does not have"),
  )
  def test_load_packed_with_other_architecture_raises(self, model_fn, pattern):
    with self.assertRaisesRegex(ValueError,
                                f"cannot load it.*{pattern}.*architecture"):
      load_packed(os.path.join(self.directory, "model.opq"),
                             model_fn)

  def test_load_packed_with_wrong_source_raises(self):
    path = os.path.join(self.directory, "model.opq")
    with self.assertRaisesRegex(TypeError, "zero-argument function"):
      load_packed(path, 42)
    with self.assertRaisesRegex(TypeError, "not a tf_keras Model"):
      load_packed(path, lambda: "model")

  def test_load_packed_checks_shapes_before_decoding(self):
    # A valid file declaring one all-pruned 40,000 x 40,000 "fc/kernel" (a
    # few bytes, gigabytes if decoded) is refused by the model's shapes, and
    # no symbol is decoded.
    header = bytearray(packing._varint(1) + packing._varint(0)
                       + packing._varint(0))
    header += packing._name_bytes("fc/kernel")
    header += packing._shape_bytes((40000, 40000))
    header += struct.pack("<BBf", 4, 0, 0.1)
    header += b"".join(packing._varint(c) for c in [1600000000] + [0] * 15)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = deflate.compress(bytes(header)) + deflate.flush()
    body = packing._varint(len(packed)) + packed
    path = os.path.join(self.workdir, "huge.opq")
    with open(path, "wb") as f:
      f.write(packing.MAGIC + struct.pack("<I", zlib.crc32(body)) + body)
    self.assertLess(os.path.getsize(path), 64)
    with mock.patch.object(packing, "decode_streams") as decode:
      with self.assertRaisesRegex(ValueError, r"fc/kernel' with shape "
                                  r"\(40000, 40000\), the model has \(16, 10\)"):
        load_packed(path, _build_model)
    decode.assert_not_called()

  def test_non_finite_weights_are_refused_by_name_and_nothing_written(self):
    for position, pattern in (("kept", "Kernel conv1/kernel"),
                              ("pruned", "Kernel conv1/kernel"),
                              ("batchnorm", "Weight 'bn1/moving_mean'")):
      qmodel = apply(_pretrained_model(), pruning_rate=0.5, bits=4)
      (kernel, *_) = compressed_kernels(qmodel)
      if position == "batchnorm":
        layer = qmodel.get_layer("bn1")
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, np.nan))
      else:
        wrapper = qmodel.get_layer("quant_conv1")
        variable = wrapper._weight_vars[0][0]  # pylint: disable=protected-access
        values = variable.numpy()
        index = np.argwhere(kernel.mask == (position == "kept"))[0]
        values[tuple(index)] = np.nan
        variable.assign(values)
      target = os.path.join(self.root, f"nan_{position}")
      with self.assertRaisesRegex(ValueError, f"{pattern}.*NaN or Inf"):
        export(qmodel, target)
      self.assertFalse(os.path.exists(target))

  def test_unwritable_target_is_named_and_leftovers_are_removed(self):
    blocker = os.path.join(self.root, "a_file")
    open(blocker, "w").close()
    target = os.path.join(blocker, "export")
    with self.assertRaisesRegex(OSError, f"Cannot export to '{target}'"):
      export(self.qmodel, target, formats=("packed",))
    # What a SIGKILL during an export leaves behind goes with the next one.
    target = os.path.join(self.root, "after_kill")
    leftover = os.path.join(self.root, ".after_kill.tmp-999999999-dead0000")
    os.makedirs(os.path.join(leftover, "saved_model"))
    export(self.qmodel, target, formats=("packed",))
    self.assertFalse(os.path.exists(leftover))
    self.assertEqual(sorted(os.listdir(target)), ["model.opq", "report.json"])

  def test_load_packed_names_the_automatic_names_cause_and_fix(self):
    def build():
      return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])

    keras.backend.clear_session()
    target = os.path.join(self.root, "auto_names")
    export(apply(build(), pruning_rate=0.5, bits=4), target,
           formats=("packed",))
    path = os.path.join(target, "model.opq")
    with self.assertRaisesRegex(ValueError, "'dense_1'.*clear_session"):
      load_packed(path, build)  # The second build is named dense_1.
    keras.backend.clear_session()
    self.assertEqual(load_packed(path, build).layers[0].name, "dense")

  def test_load_packed_corrupt_file_raises(self):
    path = os.path.join(self.workdir, "model.opq")
    with open(os.path.join(self.directory, "model.opq"), "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:-5])
    with self.assertRaisesRegex(ValueError, "corrupt or truncated"):
      load_packed(path, _build_model)


class TwoDense(keras.layers.Layer):
  """Two same-shape Dense sublayers: their kernels share the short name."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.first = keras.layers.Dense(6)
    self.second = keras.layers.Dense(6)

  def call(self, inputs):
    return self.first(inputs) + 2.0 * self.second(inputs)


def _attention_model():
  inputs = keras.Input((4, 6))
  x = keras.layers.Dense(6, name="embed")(inputs)
  x = keras.layers.MultiHeadAttention(2, 3, name="mha")(x, x)
  x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def _two_dense_model():
  inputs = keras.Input((6,))
  x = keras.layers.Dense(6, name="embed")(inputs)
  x = TwoDense(name="two")(x)
  return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


class SharedShortNamesTest(parameterized.TestCase):
  """Weights whose variable names end alike keep apart through the pipeline."""

  @parameterized.named_parameters(("multi_head_attention", _attention_model),
                                  ("two_dense_sublayers", _two_dense_model))
  def test_apply_fit_strip_export_load_packed(self, build):
    keras.utils.set_random_seed(0)
    model = build()
    shape = (8, *model.input_shape[1:])
    inputs = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    labels = np.arange(8) % 3
    qmodel = apply(model, pruning_rate=0.5, bits=4)
    qmodel.compile(keras.optimizers.SGD(0.1),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qmodel.fit(inputs, labels, epochs=1, batch_size=8, verbose=0)
    stripped = strip(qmodel)
    np.testing.assert_allclose(stripped(inputs).numpy(), qmodel(inputs).numpy(),
                               atol=1e-5)
    # Each sublayer weight reaches its own place, not a namesake's (the
    # fitted first and second Dense differ): the sublayers' kernels are
    # compressed, their biases copied.
    wrapped = {layers_lib.weight_key(inner, variable): variable
               for layer in qmodel.layers
               for inner in [getattr(layer, "layer", layer)]
               for variable in inner.weights}
    compressed = {kernel.key: kernel.compressed
                  for kernel in compressed_kernels(qmodel)}
    shared = [name for name in named_weights(stripped)
              if name.split("/")[0] in ("mha", "two")]
    self.assertGreaterEqual(len(set(shared) & set(compressed)), 2)
    self.assertGreaterEqual(len(set(shared) - set(compressed)), 2)
    for name in shared:
      np.testing.assert_array_equal(
          named_weights(stripped)[name].numpy(),
          compressed[name] if name in compressed else wrapped[name].numpy(),
          err_msg=name)
    directory = os.path.join(tempfile.mkdtemp(), "export")
    self.addCleanup(shutil.rmtree, os.path.dirname(directory))
    export(qmodel, directory)
    rebuilt = load_packed(os.path.join(directory, "model.opq"), build)
    want = named_weights(stripped)
    got = named_weights(rebuilt)
    self.assertEqual(list(got), list(want))
    for name, variable in want.items():
      self.assertTrue(np.array_equal(got[name].numpy(), variable.numpy()),
                      msg=name)
    np.testing.assert_allclose(rebuilt(inputs).numpy(), qmodel(inputs).numpy(),
                               atol=1e-5)


if __name__ == "__main__":
  absltest.main()
