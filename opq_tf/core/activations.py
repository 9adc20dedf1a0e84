"""The activation cache of a layer-by-layer calibration walk (NumPy).

Reconstruction fits each kernel to its layer's inputs over every calibration
image, and the next layer's inputs depend on the fitted kernel, so the
frontends walk the network one graph node at a time over all batches: a
node's outputs are computed once from its inputs' cached values, which is
linear in depth where re-running the prefix from the images for every kernel
was quadratic. What must be held at once is every tensor that some node not
run yet still reads (in a ResNet: a block's shortcut beside its branch), for
all images: for 500 ImageNet images 0.6 GB per 112x112x24 tensor, 1.6 GB per
56x56x256 one, in each of the two networks (compressed and FP32).

`ActivationCache` holds those tensors batch by batch, each until its last
reader has taken it: in memory up to `memory_bytes`, and beyond that in .npy
files of a private temporary folder, read back memory-mapped (the OS page
cache keeps them fast while memory allows, and lets them go when it does
not). Disk rather than streaming, because a layer's statistics need all
images before its outputs can be computed, so streaming would re-run the
prefix again.
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
from typing import Hashable, Iterable

import numpy as np

# In memory at most this many bytes of cached activations; the rest on disk.
DEFAULT_MEMORY_BYTES = 2 * 2**30


class ActivationCache:
  """Per-batch values of the tensors a walk still needs, keyed by tensor.

      cache = ActivationCache(uses={"x": 2, "y": 1})
      cache.append("x", batch)            # once per batch, in batch order
      inputs = cache.take("x")            # the list of batches; 1 use spent
      cache.close()                       # the folder goes, whatever is left

  `uses[key]` is how many times the walk will `take` the key; a key without
  uses is not stored, and the last `take` forgets it (and deletes its files;
  arrays already returned stay readable, as POSIX keeps an unlinked file
  while it is mapped).
  """

  def __init__(self, uses: Iterable[tuple[Hashable, int]] | dict,
               memory_bytes: int = DEFAULT_MEMORY_BYTES):
    self._uses = collections.Counter(dict(uses))
    self._memory_bytes = memory_bytes
    self._in_memory = 0
    self._batches: dict[Hashable, list[np.ndarray]] = {}
    self._files: dict[Hashable, list[str]] = {}
    self._folder = None
    self._written = 0  # files written so far: the next file's name

  def __enter__(self) -> "ActivationCache":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def append(self, key: Hashable, batch) -> None:
    """Stores the next batch of `key`: in memory as it is (a NumPy array, or
    a backend's CPU tensor, which np.asarray views without a copy, so that
    the next layer reads it without one) while the budget allows, else as a
    file."""
    if self._uses[key] <= 0:
      return
    nbytes = np.asarray(batch).nbytes
    batches = self._batches.setdefault(key, [])
    if self._in_memory + nbytes <= self._memory_bytes:
      self._in_memory += nbytes
      batches.append(batch)
      return
    if self._folder is None:
      self._folder = tempfile.mkdtemp(prefix="opq_tf_activations_")
    path = os.path.join(self._folder, f"{self._written}.npy")
    self._written += 1
    np.save(path, np.asarray(batch))
    self._files.setdefault(key, []).append(path)
    batches.append(np.load(path, mmap_mode="r"))

  def take(self, key: Hashable) -> list:
    """The batches of `key`, in order (memory-mapped arrays for those on
    disk); its last use forgets it."""
    if key not in self._batches:
      raise KeyError(f"{key!r} was never stored or has no use left.")
    batches = self._batches[key]
    self._uses[key] -= 1
    if self._uses[key] <= 0:
      del self._batches[key]
      self._in_memory -= sum(np.asarray(b).nbytes for b in batches
                             if not isinstance(b, np.memmap))
      for path in self._files.pop(key, ()):
        os.remove(path)
    return batches

  @property
  def on_disk(self) -> bool:
    """True once some batch went to disk (the memory budget was reached)."""
    return self._folder is not None

  def close(self) -> None:
    """Forgets everything and deletes the folder."""
    self._batches.clear()
    self._files.clear()
    self._in_memory = 0
    if self._folder is not None:
      shutil.rmtree(self._folder, ignore_errors=True)
      self._folder = None
