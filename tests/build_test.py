"""Keeps BUILD honest: every .py file has a target, every target's files exist.

Bazel cannot fetch rules_python offline here, so this test reads BUILD as the
Starlark it is (a Python-syntax subset) and checks what Bazel would: sources,
test and binary targets, local deps matching imports, pip deps in
requirements.txt.
"""

import ast
import os
import re

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGES = ("opq_tf", "trainers", "configs", "tests", "benchmarks")
_RULES = ("py_library", "py_binary", "py_test")


def _targets() -> dict[str, dict]:
  """name -> {rule, srcs, deps, main} for every rule call in BUILD."""
  with open(os.path.join(_ROOT, "BUILD")) as f:
    tree = ast.parse(f.read(), "BUILD")
  targets = {}
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _RULES):
      continue
    fields = {kw.arg: kw.value for kw in node.keywords}
    name = ast.literal_eval(fields["name"])
    deps = []
    for dep in getattr(fields.get("deps"), "elts", []):
      if isinstance(dep, ast.Call):  # requirement("package")
        deps.append("pip:" + ast.literal_eval(dep.args[0]))
      else:
        deps.append(ast.literal_eval(dep))
    targets[name] = {
        "rule": node.func.id,
        "srcs": ast.literal_eval(fields["srcs"]) if "srcs" in fields else [],
        "deps": deps,
        "main": ast.literal_eval(fields["main"]) if "main" in fields else None,
    }
  return targets


def _python_files() -> list[str]:
  files = []
  for package in _PACKAGES:
    for directory, _, names in os.walk(os.path.join(_ROOT, package)):
      files += [os.path.relpath(os.path.join(directory, n), _ROOT)
                for n in names if n.endswith(".py")]
  return sorted(files)


def _local_imports(path: str) -> set[str]:
  """Repository files imported by `path` (opq_tf.x -> opq_tf/x.py)."""
  with open(os.path.join(_ROOT, path)) as f:
    tree = ast.parse(f.read(), path)
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      modules.add(node.module)
      modules.update(f"{node.module}.{alias.name}" for alias in node.names)
  files = set()
  for module in modules:
    sibling = os.path.join(os.path.dirname(path), module + ".py")
    if "." not in module and os.path.exists(os.path.join(_ROOT, sibling)):
      files.add(sibling)  # e.g. tests/ helpers imported by bare name
      continue
    if module.split(".")[0] not in _PACKAGES:
      continue
    candidate = module.replace(".", "/") + ".py"
    package_init = module.replace(".", "/") + "/__init__.py"
    if os.path.exists(os.path.join(_ROOT, candidate)):
      files.add(candidate)
    elif (os.path.exists(os.path.join(_ROOT, package_init))
          and not path.startswith(module.replace(".", "/") + "/")):
      # Importing a package runs its __init__; inside the package that would
      # be a dependency cycle, which Bazel forbids and Python tolerates.
      files.add(package_init)
  return files - {path}


def _normalise(package: str) -> str:
  return re.sub(r"[-_.]+", "-", package).lower()


class BuildTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.targets = _targets()
    cls.owner = {}
    for name, target in cls.targets.items():
      for src in target["srcs"]:
        cls.owner.setdefault(src, []).append(name)

  def test_every_python_file_has_exactly_one_target(self):
    for path in _python_files():
      self.assertLen(self.owner.get(path, []), 1,
                     f"{path} needs exactly one target in BUILD")

  def test_every_source_exists(self):
    for name, target in self.targets.items():
      for src in target["srcs"]:
        self.assertTrue(os.path.exists(os.path.join(_ROOT, src)),
                        f"BUILD target {name} names missing file {src}")

  def test_tests_and_binaries_use_the_right_rule(self):
    for path in _python_files():
      target = self.targets[self.owner[path][0]]
      if path.startswith("tests/") and path.endswith("_test.py"):
        self.assertEqual(target["rule"], "py_test", path)
      with open(os.path.join(_ROOT, path)) as f:
        runnable = "__main__" in f.read()
      if path.startswith(("trainers/", "benchmarks/")) and runnable:
        self.assertEqual(target["rule"], "py_binary", path)

  def test_local_deps_match_imports(self):
    for name, target in self.targets.items():
      needed = set()
      for src in target["srcs"]:
        needed |= {self.owner[f][0] for f in _local_imports(src)
                   if f in self.owner}
      needed.discard(name)
      declared = {dep.lstrip(":") for dep in target["deps"]
                  if not dep.startswith("pip:")}
      self.assertEqual(needed - declared, set(),
                       f"BUILD target {name} imports these without deps")
      self.assertEqual(declared - set(self.targets), set(),
                       f"BUILD target {name} depends on unknown targets")

  def test_pip_deps_are_pinned_requirements(self):
    with open(os.path.join(_ROOT, "requirements.txt")) as f:
      pinned = {_normalise(line.split("==")[0]) for line in f
                if "==" in line and not line.startswith("#")}
    for name, target in self.targets.items():
      for dep in target["deps"]:
        if dep.startswith("pip:"):
          self.assertIn(_normalise(dep[4:]), pinned,
                        f"{name} needs {dep[4:]} in requirements.txt")


if __name__ == "__main__":
  absltest.main()
