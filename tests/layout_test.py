"""The layout's import rules (docs/architecture.md), checked on the source.

- opq_tf/core imports only NumPy, constriction and the standard library.
- opq_tf/__init__.py imports only the core (frontends load on first use).
- the keras3 frontend imports neither tf_keras nor tfmot, and TensorFlow only
  inside functions (the TensorFlow backend's formats).
- nothing under opq_tf/ imports configs/, trainers/ or benchmarks/.
- no import cycle among opq_tf's modules.
"""

import ast
import os
import sys

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY = os.path.join(_ROOT, "opq_tf")


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every module of opq_tf."""
  modules = {}
  for directory, _, names in os.walk(_LIBRARY):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, _ROOT)[:-3].replace(os.sep, ".")
        modules[dotted.removesuffix(".__init__")] = path
  return modules


def _imports(path: str, top_level_only: bool = False) -> set[str]:
  """Modules `path` imports (for `from a import b`, both a and a.b)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  nodes = tree.body if top_level_only else ast.walk(tree)
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return found


class LayoutTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.modules = _modules()

  def test_core_is_pure_numpy(self):
    allowed = {"numpy", "constriction", "opq_tf"}
    for name, path in self.modules.items():
      if not name.startswith("opq_tf.core"):
        continue
      for module in _imports(path):
        root = module.split(".")[0]
        if root in sys.stdlib_module_names or root in allowed:
          self.assertFalse(module.startswith("opq_tf.")
                           and not module.startswith("opq_tf.core"),
                           f"{name} imports {module}")
          continue
        self.fail(f"{name} imports {module}: the core imports only NumPy")

  def test_package_init_imports_only_the_core(self):
    for module in _imports(self.modules["opq_tf"]):
      root = module.split(".")[0]
      self.assertTrue(root in sys.stdlib_module_names
                      or module.startswith("opq_tf.core"), module)

  def test_keras3_frontend_needs_no_tensorflow_at_import(self):
    for name, path in self.modules.items():
      if not name.startswith("opq_tf.keras3"):
        continue
      everywhere = {m.split(".")[0] for m in _imports(path)}
      self.assertNotIn("tf_keras", everywhere, name)
      self.assertNotIn("tensorflow_model_optimization", everywhere, name)
      at_import = {m.split(".")[0] for m in _imports(path, top_level_only=True)}
      self.assertNotIn("tensorflow", at_import, name)

  def test_library_imports_no_configs_trainers_or_benchmarks(self):
    for name, path in self.modules.items():
      for module in _imports(path):
        self.assertNotIn(module.split(".")[0],
                         ("configs", "trainers", "benchmarks"),
                         f"{name} imports {module}")

  def test_no_import_cycle(self):
    graph = {name: {m for m in _imports(path) if m in self.modules
                    and m != name and not name.startswith(m + ".")}
             for name, path in self.modules.items()}
    # Importing a module runs its package __init__s: a package importing a
    # module of its own is not a cycle, so only module -> module edges count.
    visiting, done = [], set()

    def visit(node):
      if node in done:
        return
      if node in visiting:
        cycle = visiting[visiting.index(node):] + [node]
        self.fail("import cycle: " + " -> ".join(cycle))
      visiting.append(node)
      for child in sorted(graph[node]):
        visit(child)
      visiting.pop()
      done.add(node)

    for node in sorted(graph):
      visit(node)


if __name__ == "__main__":
  absltest.main()
