"""A bounded in-memory map (least recently used entry dropped first), for compiled kernels held in memory.

Bounds, documented in README.md (The kernel cache): entries and, optionally, total bytes. Dropping an entry
only forgets it here: a Program that launches the kernel keeps its own reference (a loaded library, a CUDA
module), and the next compile of that source is a warm start from the disk cache. Callers hold their lock.
"""
from __future__ import annotations

from collections import OrderedDict


class BoundedCache:
    def __init__(self, max_entries: int, max_bytes: int | None = None, size=len):
        self.max_entries, self.max_bytes, self.size = max_entries, max_bytes, size
        self._d: OrderedDict = OrderedDict()
        self.bytes = 0
        self.evicted = 0

    def __contains__(self, key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __getitem__(self, key):
        value = self._d[key]
        self._d.move_to_end(key)
        return value

    def __setitem__(self, key, value) -> None:
        if key in self._d:
            self.bytes -= self._bytes(self._d.pop(key))
        self._d[key] = value
        self.bytes += self._bytes(value)
        while len(self._d) > max(1, self.max_entries) or (
                self.max_bytes is not None and self.bytes > self.max_bytes and len(self._d) > 1):
            _, old = self._d.popitem(last=False)
            self.bytes -= self._bytes(old)
            self.evicted += 1

    def _bytes(self, value) -> int:
        return self.size(value) if self.max_bytes is not None else 0

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0

    def values(self):
        return list(self._d.values())
