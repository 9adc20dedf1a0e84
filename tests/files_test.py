"""Tests for opq_tf.core.files: nothing half-written."""

import os
import subprocess
import tempfile

from absl.testing import absltest

from opq_tf.core import files


class AtomicTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.directory = tempfile.mkdtemp()
    self.path = os.path.join(self.directory, "out.json")

  def test_write_and_read_json(self):
    files.write_json(self.path, {"a": [1, 2]})
    self.assertEqual(files.read_json(self.path), {"a": [1, 2]})
    self.assertEqual(os.listdir(self.directory), ["out.json"])

  def test_failure_leaves_the_old_file_and_no_temp(self):
    files.atomic_write(self.path, "old")
    with self.assertRaisesRegex(RuntimeError, "crash"):
      with files.atomic_path(self.path) as temp:
        with open(temp, "w") as f:
          f.write("half")
        raise RuntimeError("crash")
    with open(self.path) as f:
      self.assertEqual(f.read(), "old")
    self.assertEqual(os.listdir(self.directory), ["out.json"])

  def test_directory_target(self):
    target = os.path.join(self.directory, "new", "export")
    with files.atomic_path(target) as temp:
      os.mkdir(temp)
      files.atomic_write(os.path.join(temp, "x"), b"\0")
    self.assertEqual(os.listdir(target), ["x"])
    self.assertEqual(os.listdir(os.path.dirname(target)), ["export"])

  def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(self):
    # A writer killed with SIGKILL leaves its temporary; a live one's stays.
    killed = subprocess.Popen(["sleep", "0"])
    killed.wait()
    dead = os.path.join(self.directory, f".out.json.tmp-{killed.pid}-abcd1234")
    os.mkdir(dead)
    live = os.path.join(self.directory, f".out.json.tmp-{os.getpid()}-live0000")
    open(live, "w").close()
    files.write_json(self.path, {})
    self.assertCountEqual(os.listdir(self.directory),
                          ["out.json", os.path.basename(live)])


if __name__ == "__main__":
  absltest.main()
