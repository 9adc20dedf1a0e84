"""Writing files so that a crash never leaves one half-written.

Everything the project writes that a later run or a user reads (plans,
reports, checkpoints' side files, packed models, benchmark tables) goes
through here: written under a temporary sibling name, then renamed over the
target, which POSIX makes atomic within one file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
  """Yields a temporary sibling of `path`; renames it onto `path` on success.

  The caller writes a file or a directory at the yielded path. On an
  exception it is removed and `path` is left as it was. An existing directory
  at `path` is not replaced (os.replace refuses a non-empty one).
  """
  path = os.path.abspath(os.fspath(path))
  parent, base = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  _remove_leftovers(parent, base)
  temp = os.path.join(parent,
                      f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    yield temp
    os.replace(temp, path)
  finally:
    if os.path.isdir(temp):
      shutil.rmtree(temp, ignore_errors=True)
    elif os.path.lexists(temp):
      os.remove(temp)


def _remove_leftovers(parent: str, base: str) -> None:
  """Removes temporaries of `base` left by processes that no longer run.

  A process killed while writing (SIGKILL, power loss) cannot clean up; the
  next write of the same target does. A temporary names its writer's pid, so
  one of a live process (a concurrent writer on this machine) is kept.
  """
  prefix = f".{base}.tmp-"
  for name in os.listdir(parent):
    if not name.startswith(prefix):
      continue
    pid = name[len(prefix):].split("-", 1)[0]
    if pid.isdigit() and _alive(int(pid)):
      continue
    leftover = os.path.join(parent, name)
    if os.path.isdir(leftover) and not os.path.islink(leftover):
      shutil.rmtree(leftover, ignore_errors=True)
    else:
      try:
        os.remove(leftover)
      except OSError:
        pass


def remove_leftovers(path: PathLike) -> None:
  """Removes what killed writers of `path` left (as atomic_path does first),
  for a writer that stages `path` itself under a name of the same pattern."""
  parent, base = os.path.split(os.path.abspath(os.fspath(path)))
  if os.path.isdir(parent):
    _remove_leftovers(parent, base)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
  """Writes `data` (bytes, or text as UTF-8) to `path` atomically."""
  with atomic_path(path) as temp:
    with open(temp, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: PathLike, data: Any) -> None:
  """Writes `data` as indented JSON to `path` atomically."""
  atomic_write(path, json.dumps(data, indent=1) + "\n")


def read_json(path: PathLike) -> Any:
  with open(path) as f:
    return json.load(f)
