"""A bounded, thread-safe least-recently-used cache: the one kind of cache kanoclip keeps.

Every per-key cache (a class's text features, its knowledge-base features, a resized position
table) is an :class:`LRUCache` owned by one object, so a public Space typing 100,000 distinct
class names holds at most ``max_size`` of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most ``max_size`` entries; the least recently used goes first.

    ``get_or_compute`` runs ``compute`` outside the lock, so two threads missing the same key at
    once may both compute it (the second result wins); lookups never wait on a computation.

    >>> cache = LRUCache(2)
    >>> for key in "abc":
    ...     _ = cache.get_or_compute(key, lambda: key.upper())
    >>> list(cache.keys())
    ['b', 'c']
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"an LRU cache needs max_size >= 1, got {max_size}")
        self.max_size = max_size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Store ``value``, dropping the least recently used entries beyond ``max_size``."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The cached value of ``key``, else ``compute()``, stored."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)
