"""Large blocks handed from one solve to the next instead of back to the allocator.

A QP layer call builds a few (B, n, n)- and (B, m, m)-sized blocks (the Cholesky factor
of Q, the half-solves, W) that the backward pass reads, so they live until it ends and
are freed then. Freed, blocks of a few MiB go back to the operating system (glibc's
malloc unmaps or trims them), and the next call's first writes fault them back in page by
page: 1.6 ms of the factorization's 5.7 ms a call at (128, 50, 50, 10), as long as a
process-wide ``dl.retain_cpu_memory()`` saves. A :class:`BufferPool` keeps those blocks
instead: a block is held by the object that uses it (:meth:`BufferPool.hold`) and comes
back to the pool when that object is collected, for the next solve of the same shapes.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

__all__ = ["BufferPool", "scratch"]


def scratch(pool, shape, dtype, device: torch.device) -> torch.Tensor:
    """A contiguous block of this shape (contents undefined): from ``pool`` (a
    :class:`BufferPool` or None: a fresh one)."""
    return torch.empty(shape, dtype=dtype, device=device) if pool is None else pool.take(shape, dtype, device)


class BufferPool:
    """Free blocks by (shape, dtype, device), the most recent ``max_keys`` such
    signatures at most, ``per_key`` blocks each: a layer called with ever new batch sizes
    keeps a bounded amount. Thread-safe; copies and pickles of a pool are empty."""

    def __init__(self, max_keys: int = 8, per_key: int = 8):
        self.max_keys, self.per_key = max_keys, per_key
        self._free: "OrderedDict[tuple, list]" = OrderedDict()
        self._lock = threading.Lock()

    def take(self, shape, dtype, device: torch.device) -> torch.Tensor:
        """A contiguous block of this shape (contents undefined): a free one, or new."""
        key = (tuple(shape), dtype, device)
        with self._lock:
            free = self._free.get(key)
            if free:
                self._free.move_to_end(key)
                return free.pop()
        return torch.empty(shape, dtype=dtype, device=device)

    def hold(self, owner, *blocks: torch.Tensor) -> None:
        """Give ``blocks`` back to the pool when ``owner`` is collected. Nothing else may
        keep a reference to them (or to views of them) beyond the owner's lifetime."""
        weakref.finalize(owner, self.give_back, *blocks)

    def give_back(self, *blocks: torch.Tensor) -> None:
        """Return blocks no one reads any more."""
        with self._lock:
            for block in blocks:
                key = (tuple(block.shape), block.dtype, block.device)
                free = self._free.setdefault(key, [])
                self._free.move_to_end(key)
                if len(free) < self.per_key:
                    free.append(block)
            while len(self._free) > self.max_keys:
                self._free.popitem(last=False)

    def __getstate__(self):
        return {"max_keys": self.max_keys, "per_key": self.per_key}

    def __setstate__(self, state):
        self.__init__(**state)
