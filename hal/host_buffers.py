"""Host buffers for background checkpoint copies, allocated once and reused by every save.

A background save copies this process's part of the train state to host memory while training goes on.
Allocating that memory per save is what makes a save slow on a GPU: pinned (page-locked) host memory,
which an asynchronous device-to-host copy needs, is costly to allocate, and its allocation can wait for
the device. So a set of buffers, one per tensor and sized like it, is made at the first save and handed
out again to every later one; a second set is made only while the first is still being written (two
saves in flight at once).

The pool is framework-free: `allocate(shape, dtype)` makes one buffer (torch: pinned memory on a CUDA
host, plain memory elsewhere).
"""
from __future__ import annotations

import threading
from typing import Callable


class HostBufferPool:
    def __init__(self, allocate: Callable[[tuple, object], object]):
        self._allocate = allocate
        self._free: list[dict] = []
        self._lock = threading.Lock()
        self.allocations = 0        # buffers made so far (one per tensor per set)

    def acquire(self, layout: dict) -> dict:
        """A set {name: buffer} with one buffer of each {name: (shape, dtype)}, held by the caller until
        `release`. A free set is reused; buffers whose shape or dtype no longer fit are remade."""
        with self._lock:
            held = self._free.pop() if self._free else {}
        buffers = {}
        for name, (shape, dtype) in layout.items():
            buf = held.get(name)
            if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
                buf = self._allocate(tuple(shape), dtype)
                self.allocations += 1
            buffers[name] = buf
        return buffers

    def release(self, buffers: dict) -> None:
        """Hand a set back once nothing reads it any more (its write has returned)."""
        with self._lock:
            self._free.append(buffers)

    def sets(self) -> int:
        """Sets free for reuse now."""
        with self._lock:
            return len(self._free)
