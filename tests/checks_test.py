"""Tests for opq_tf.training.checks: every bad input is refused before anything runs.

Each refusal names the problem and the fix, and leaves the workdir unmade.
"""

import glob
import importlib.util
import os

from absl.testing import absltest
from absl.testing import parameterized

from configs import default
import opq_tf
from opq_tf.core import allocation
from opq_tf.training import checks
from opq_tf.training import distribute
from opq_tf.core import grid
from opq_tf.training import layout
from opq_tf.training import models
from opq_tf.training import planning
from opq_tf.tf_keras._keras import keras
import cpu_devices
import digits_data


cpu_devices.split_cpu()
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _validate(config, strategy, workdir, **options) -> None:
  """checks.validate against configs/default.py, as the trainers call it."""
  checks.validate(config, strategy, workdir,
                  default_config=default.get_config(), **options)


class ChecksTest(digits_data.DigitsTestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.one_device = distribute.make_strategy("one_device")
    cls.mirrored = distribute.make_strategy("mirrored")
    cls.fp32_weights = os.path.join(cls.root, "fp32.h5")
    models.build("small_resnet", 10, 32).save_weights(cls.fp32_weights)

  @classmethod
  def config(cls, **overrides):
    config = default.get_config()
    config.update(dict(data_dir=cls.data_dir, manual_dir=cls.manual_dir,
                       global_batch_size=16, steps_per_epoch=4, fp32_epochs=1,
                       fp32_warmup_epochs=0.0, num_epochs=1, warmup_epochs=0.0))
    config.update(overrides)
    return config

  def test_a_good_config_passes_and_writes_nothing(self):
    for phase in checks.PHASES:
      _validate(self.config(pretrained=self.fp32_weights),
                self.one_device, self.workdir("never"), phase=phase)
    self.assertFalse(os.path.exists(self.workdir("never")))

  def test_fields_are_those_of_the_default_config(self):
    fields = checks.fields(default.get_config())
    self.assertEqual(set(fields), set(default.get_config().keys()))
    self.assertIn("method", fields)
    self.assertNotIn("allocation", fields)

  def test_renamed_field_names_the_new_one(self):
    config = self.config()
    config.allocation = "opq"
    with self.assertRaisesRegex(ValueError, r"config\.allocation is now "
                                r"config\.method.*--config\.method="):
      _validate(config, self.one_device, self.workdir("never"))

  def test_bits_range_is_the_grids(self):
    _validate(self.config(bits=grid.MIN_BITS), self.one_device,
              self.workdir("never"), phase="fp32")
    _validate(self.config(bits=grid.MAX_BITS), self.one_device,
              self.workdir("never"), phase="fp32")
    for bits in (grid.MIN_BITS - 1, grid.MAX_BITS + 1):
      with self.assertRaisesRegex(ValueError, f"config.bits={bits} is invalid"):
        _validate(self.config(bits=bits), self.one_device,
                  self.workdir("never"))

  def test_jit_compile_is_refused_for_synchronized_batchnorm_on_replicas(self):
    with self.assertRaisesRegex(ValueError, "jit_compile=True cannot compile "
                                "small_resnet's synchronized BatchNorm"):
      _validate(self.config(jit_compile=True), self.mirrored,
                self.workdir("never"), phase="fp32")
    _validate(self.config(jit_compile=True), self.one_device,
              self.workdir("never"), phase="fp32")

  @parameterized.named_parameters(
      ("model", {"model": "vgg16"}, "config.model='vgg16' is invalid"),
      ("pruning_rate", {"pruning_rate": 1.5}, r"pruning_rate=1.5 .*\[0, 1\)"),
      ("bits", {"bits": 9}, r"bits=9 .*2\.\.8"),
      ("learning_rate", {"learning_rate": -1.0}, "learning_rate=-1.0"),
      ("nan", {"weight_decay": float("nan")}, "weight_decay=nan"),
      ("momentum", {"momentum": 1.0}, "momentum=1.0"),
      ("epochs", {"num_epochs": -2}, "num_epochs=-2"),
      ("image_size", {"model": "alexnet"}, "image_size=32 is too small"),
      ("warmup", {"warmup_epochs": 3.0}, "warmup_epochs=3.0 is longer"),
      ("missing_manual_dir", {"manual_dir": "/nonexistent/ilsvrc"},
       "does not exist"),
      ("missing_pretrained", {"pretrained": "/nonexistent/w.h5"},
       "do not exist"),
      # Also the trainers' exit-2 cases (trainers_test.py keeps the flag ones).
      ("pruning_rate_message", {"pruning_rate": 1.5},
       r"config\.pruning_rate=1\.5 is invalid.*\[0, 1\)"),
      ("bits_message", {"bits": 9}, r"config\.bits=9 is invalid.*2\.\.8"),
      ("learning_rate_message", {"learning_rate": -1.0},
       r"config\.learning_rate=-1\.0 is invalid.*> 0"),
      ("missing_manual_dir_message", {"manual_dir": "/tmp/opq_no/no_manual"},
       r"manual_dir .*no_manual' is not usable: the directory does not exist"),
      ("method", {"method": "magic"}, r"config\.method='magic' is invalid"),
      ("objective", {"objective": "all"}, r"config\.objective='all'"),
      ("step_granularity", {"step_granularity": "layer"},
       r"config\.step_granularity='layer'"),
      ("step_fit", {"step_fit": "model"}, r"config\.step_fit='model'"),
      ("calibration_images", {"calibration_images": -1},
       r"config\.calibration_images=-1 is invalid.*>= 0"),
      # One checkpoint leaves nothing to fall back to.
      ("checkpoints_to_keep", {"checkpoints_to_keep": 1},
       r"config\.checkpoints_to_keep=1 is invalid.*>= 2"),
  )
  def test_validate_rejects(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      _validate(self.config(**overrides), self.one_device,
                self.workdir("never"), phase="all")
    self.assertFalse(os.path.exists(self.workdir("never")))

  def test_validate_rejects_unknown_field_and_indivisible_batch(self):
    config = self.config()
    config.learning_rat = 0.1
    with self.assertRaisesRegex(ValueError, r"Unknown config field.*learning_rat"):
      _validate(config, self.one_device, self.workdir("never"))
    with self.assertRaisesRegex(ValueError, "not divisible by the 2 replicas"):
      _validate(self.config(global_batch_size=15), self.mirrored,
                self.workdir("never"))
    with self.assertRaisesRegex(
        ValueError, "global_batch_size=63 is not divisible by the 2 replicas"):
      _validate(self.config(global_batch_size=63), self.mirrored,
                self.workdir("never"))

  def test_validate_rejects_unusable_workdirs(self):
    a_file = os.path.join(self.root, "a_file")
    open(a_file, "w").close()
    with self.assertRaisesRegex(ValueError, "is a file"):
      _validate(self.config(), self.one_device, a_file)
    with self.assertRaisesRegex(ValueError, "cannot be created"):
      _validate(self.config(), self.one_device, os.path.join(a_file, "run"))
    with self.assertRaisesRegex(ValueError, "not writable"):
      _validate(self.config(), self.one_device, "/proc/opq_run")
    # Root may write anywhere but on a read-only file system.
    with self.assertRaisesRegex(
        ValueError, "workdir '/proc/opq_trainers_test' is not writable"):
      _validate(self.config(), self.one_device, "/proc/opq_trainers_test")

  def test_validate_rejects_a_plan_made_for_other_settings(self):
    workdir = self.workdir("other_plan")
    os.makedirs(workdir)
    model = models.build("small_resnet", 10, 32)
    plan = opq_tf.allocate(model, 0.5, 3)
    with open(os.path.join(workdir, layout.PLAN_FILE), "w") as f:
      f.write(plan.to_json())
    config = self.config(pretrained=self.fp32_weights)
    with self.assertRaisesRegex(ValueError, "plan.json was computed for"):
      _validate(config, self.one_device, workdir, phase="compress")
    # Every allocation field counts: a plan of the config's p and B with
    # Laplace-model steps is not this config's.
    plan = opq_tf.allocate(model, **planning.allocate_options(
        self.config(step_fit="laplace")))
    with open(os.path.join(workdir, layout.PLAN_FILE), "w") as f:
      f.write(plan.to_json())
    with self.assertRaisesRegex(ValueError, "'step_fit': 'laplace'"):
      _validate(config, self.one_device, workdir, phase="compress")
    _validate(self.config(pretrained=self.fp32_weights, step_fit="laplace"),
              self.one_device, workdir, phase="compress")

  def test_validate_rejects_a_plan_of_another_model(self):
    workdir = self.workdir("foreign_plan")
    os.makedirs(workdir)
    config = self.config(pretrained=self.fp32_weights)
    other = keras.Sequential([keras.layers.Dense(64, input_shape=(32,),
                                                 name="foreign")])
    plan = opq_tf.allocate(other, **planning.allocate_options(config))
    with open(os.path.join(workdir, layout.PLAN_FILE), "w") as f:
      f.write(plan.to_json())
    with self.assertRaisesRegex(
        ValueError, r"plan\.json was computed for another model than "
        r"config\.model='small_resnet' \(kernel 'foreign/kernel' \(32, 64\) "
        r"is not in the model.*the model's '.*' is not in it.*fresh --workdir"):
      _validate(config, self.one_device, workdir, phase="compress")

  @parameterized.named_parameters(
      ("a_file", "file", r"export is not a directory; move it away or remove"),
      ("foreign_files", "foreign", r"export holds \['notes\.txt'\] but no "
       r"report\.json, so it is not an export of this run; move it away"),
      ("corrupt_report", "corrupt", r"report\.json is not readable JSON"),
  )
  def test_validate_rejects_an_export_dir_in_a_bad_state(self, state, message):
    workdir = self.workdir(f"export_{state}")
    export_dir = os.path.join(workdir, layout.EXPORT_DIR)
    os.makedirs(workdir)
    if state == "file":
      open(export_dir, "w").close()
    else:
      os.makedirs(export_dir)
      name = "notes.txt" if state == "foreign" else "report.json"
      with open(os.path.join(export_dir, name), "w") as f:
        f.write("{not json")
    config = self.config(pretrained=self.fp32_weights)
    with self.assertRaisesRegex(ValueError, message):
      _validate(config, self.one_device, workdir, phase="compress")
    if state != "file":  # An export of a run is fine (a rerun may replace it).
      with open(os.path.join(export_dir, "report.json"), "w") as f:
        f.write('{"made_from": {"checkpoint_step": 4}}')
      if state == "foreign":
        os.remove(os.path.join(export_dir, "notes.txt"))
      _validate(config, self.one_device, workdir, phase="compress")

  def test_validate_names_truncated_weights_and_the_fix(self):
    truncated = os.path.join(self.root, "truncated.h5")
    with open(self.fp32_weights, "rb") as f:
      data = f.read()
    with open(truncated, "wb") as f:
      f.write(data[:len(data) // 2])
    with self.assertRaisesRegex(
        ValueError, r"FP32 weights '.*truncated\.h5' cannot be read, the file "
        r"is truncated or corrupt .*; pass an intact copy as "
        r"--config\.pretrained"):
      _validate(self.config(pretrained=truncated), self.one_device,
                self.workdir("never"), phase="compress")
    workdir = self.workdir("truncated_fp32")
    os.makedirs(os.path.join(workdir, "fp32"))
    os.rename(truncated, os.path.join(workdir, layout.FP32_WEIGHTS))
    with self.assertRaisesRegex(
        ValueError, r"fp32/weights\.h5' cannot be read.*delete it and rerun to "
        r"train the FP32 weights again"):
      _validate(self.config(), self.one_device, workdir, phase="compress")

  def test_validate_needs_fp32_weights_to_compress(self):
    with self.assertRaisesRegex(ValueError, "No FP32 weights"):
      _validate(self.config(), self.one_device, self.workdir("never"),
                phase="compress")

  def test_validate_rejects_mismatched_pretrained_weights(self):
    path = os.path.join(self.root, "seven_classes.h5")
    models.build("small_resnet", 7, 32).save_weights(path)
    with self.assertRaisesRegex(ValueError, r"'logits'.*\(128, 7\).*\(128, 10\)"):
      _validate(self.config(pretrained=path), self.one_device,
                self.workdir("never"))
    with self.assertRaisesRegex(
        ValueError, r"layer 'logits' weight 'logits/kernel.*\(128, 7\).*\(128, 10\)"):
      _validate(self.config(pretrained=path), self.one_device,
                self.workdir("never"), phase="compress")


class ConfigsTest(parameterized.TestCase):
  """Every experiment in configs/ passes the field checks as it is."""

  @parameterized.named_parameters(
      (os.path.basename(path)[:-3], path) for path in sorted(glob.glob(
          os.path.join(_ROOT, "configs", "*.py")))
      if not path.endswith("__init__.py"))
  def test_config_passes_the_field_checks(self, path):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    checks.check_fields(config, default.get_config())
    self.assertEqual(set(config.keys()), set(default.get_config().keys()))


class UserModelChecksTest(digits_data.DigitsTestCase, parameterized.TestCase):
  """config.model may name an applications constructor or a saved model."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.one_device = distribute.make_strategy("one_device")
    cls.weights = os.path.join(cls.root, "mobilenet_025.h5")
    # A by-name .h5 of the bare constructor, as the shared MobileNet weights.
    keras.applications.MobileNet(
        alpha=0.25, weights=None, input_shape=(32, 32, 3), classes=10,
        classifier_activation=None).save_weights(cls.weights)

  def config(self, **overrides):
    config = default.get_config()
    config.update(dict(
        data_dir=self.data_dir, manual_dir=self.manual_dir,
        model="applications.MobileNet", model_options='{"alpha": 0.25}',
        preprocessing="tf", pretrained=self.weights, global_batch_size=16,
        steps_per_epoch=4, num_epochs=1, warmup_epochs=0.0))
    config.update(overrides)
    return config

  def test_an_applications_model_with_its_weights_passes(self):
    _validate(self.config(), self.one_device,
              os.path.join(self.root, "never"), phase="compress")
    self.assertFalse(os.path.exists(os.path.join(self.root, "never")))

  @parameterized.named_parameters(
      ("unknown_constructor", {"model": "applications.MobileNetV9"},
       r"no constructor 'MobileNetV9'.*--config\.model="),
      ("unknown_name", {"model": "vgg16"},
       r"Unknown model 'vgg16'.*applications\.<Constructor>.*saved:<path>"),
      ("missing_path", {"model": "saved:/nonexistent/model.keras"},
       r"'/nonexistent/model\.keras' does not exist.*--config\.model=saved:"),
      ("bad_json", {"model_options": "{alpha: 0.75}"},
       r"config\.model_options='\{alpha: 0\.75\}' is invalid: it must be a "
       r"JSON object"),
      ("unknown_preprocessing", {"preprocessing": "inception"},
       r"config\.preprocessing='inception' is invalid: it must be one of "
       r"\('none', 'tf', 'torch', 'caffe'\)"),
      ("options_on_builtin", {"model": "small_resnet", "pretrained": ""},
       r"config\.model='small_resnet' is a built-in model.*"
       r"--config\.model_options='\{\}' and --config\.preprocessing=none"),
      ("options_on_saved", {"model": "saved:" + __file__, "preprocessing": "none"},
       r"only apply to 'applications\.<Constructor>' models"),
      ("option_the_constructor_refuses", {"model_options": '{"depth": 3}'},
       r"refused model_options=\{'depth': 3\}"),
      ("weights_of_another_alpha", {"model_options": '{"alpha": 0.5}'},
       r"do not fit the model"),
  )
  def test_validate_rejects(self, overrides, message):
    with self.assertRaisesRegex(ValueError, message):
      _validate(self.config(**overrides), self.one_device,
                os.path.join(self.root, "never"), phase="compress")
    self.assertFalse(os.path.exists(os.path.join(self.root, "never")))

  def test_a_user_model_is_built_even_without_pretrained_weights(self):
    config = self.config(model_options='{"depth": 3}', pretrained="",
                         fp32_epochs=1, fp32_warmup_epochs=0.0)
    with self.assertRaisesRegex(ValueError, r"refused model_options=\{'depth'"):
      _validate(config, self.one_device,
                os.path.join(self.root, "never"), phase="fp32")


if __name__ == "__main__":
  absltest.main()
