"""A bounded, thread-safe least-recently-used cache: the one kind of cache kanoclip keeps.

Every per-key cache (a class's text features, its knowledge-base features, a resized position
table) is an :class:`LRUCache` owned by one object, so a public Space typing 100,000 distinct
class names holds at most ``max_size`` of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most ``max_size`` entries; the least recently used goes first.

    ``get_or_compute`` computes each missing key once: a thread that misses a key another thread
    is computing waits for that computation and gets its value (or its exception, which is not
    cached). ``clear`` starts a new generation: a value whose computation began before it is
    returned to its callers but never stored, since it may come from state the clear invalidated
    (a knowledge base replaced, new weights loaded). At most one computation per key is in flight,
    so the cache holds at most ``max_size`` values plus one per running computation.

    >>> cache = LRUCache(2)
    >>> for key in "abc":
    ...     _ = cache.get_or_compute(key, lambda: key.upper())
    >>> list(cache.keys())
    ['b', 'c']
    >>> cache.get_or_compute("b", lambda: "never called")
    'B'
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"an LRU cache needs max_size >= 1, got {max_size}")
        self.max_size = max_size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._pending: dict[K, Future[V]] = {}  # keys being computed, this generation
        self._generation = 0  # bumped by clear()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value of ``key`` (now the most recently used), or None."""
        with self._lock:
            return self._get(key)

    def _get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store ``value``, dropping the least recently used entries beyond ``max_size``."""
        with self._lock:
            self._put(key, value)

    def _put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The cached value of ``key``, else ``compute()`` run once for all callers missing it, stored.

        Args:
            key: the entry.
            compute: makes the value when no other caller is making it; runs outside the lock.

        Returns:
            The value (a value computed across a :meth:`clear` is returned but not stored).

        Raises:
            Exception: what ``compute`` raised, in the caller that ran it and in every waiter.
        """
        with self._lock:
            value = self._get(key)
            if value is not None:
                return value
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = Future()
                generation = self._generation
        if not owner:
            return pending.result()  # type: ignore[union-attr]
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                if self._pending.get(key) is pending:
                    del self._pending[key]
            pending.set_exception(exc)  # type: ignore[union-attr]
            raise
        with self._lock:
            if self._pending.get(key) is pending:
                del self._pending[key]
            if generation == self._generation:  # nothing was invalidated meanwhile
                self._put(key, value)
        pending.set_result(value)  # type: ignore[union-attr]
        return value

    def clear(self) -> None:
        """Drop every entry; computations running now store nothing (their callers still get their value)."""
        with self._lock:
            self._items.clear()
            self._pending.clear()  # later callers compute anew, from the new state
            self._generation += 1

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)
