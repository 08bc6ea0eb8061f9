"""The bounded LRU cache, and the model's per-class caches that use it."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from kanoclip import KAnoCLIP
from kanoclip.cache import LRUCache
from kanoclip.config import CacheConfig, KAnoCLIPConfig


def test_lru_drops_the_least_recently_used():
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"] and cache.get("b") is None
    calls = []
    assert cache.get_or_compute("c", lambda: calls.append(1) or 9) == 3 and not calls
    assert cache.get_or_compute("d", lambda: 4) == 4 and cache.keys() == ["c", "d"]
    with pytest.raises(ValueError, match="max_size >= 1"):
        LRUCache(0)


def test_lru_stays_bounded_under_threads():
    cache: LRUCache[int, int] = LRUCache(10)

    def work(offset: int) -> None:
        for i in range(500):
            cache.get_or_compute(offset + i, lambda: i)

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 10


def test_threads_missing_one_key_compute_it_once():
    cache: LRUCache[str, object] = LRUCache(4)
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    calls = []
    release = threading.Event()

    def compute() -> object:
        calls.append(threading.get_ident())
        release.wait(5)  # held until every thread has asked for the key
        return object()

    results: list[object] = [None] * threads_n

    def work(i: int) -> None:
        barrier.wait()
        results[i] = cache.get_or_compute("key", compute)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    while not calls:  # the first thread is computing; let the others reach the cache too
        time.sleep(0.01)
    time.sleep(0.2)
    release.set()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(r is results[0] for r in results)  # every thread got the one computed value
    assert cache.get("key") is results[0]


def test_an_exception_reaches_every_waiter_and_is_not_cached():
    cache: LRUCache[str, int] = LRUCache(4)
    started, release = threading.Event(), threading.Event()

    def failing() -> int:
        started.set()
        release.wait(5)
        raise RuntimeError("no features")

    errors = []

    def work(compute) -> None:
        try:
            cache.get_or_compute("key", compute)
        except RuntimeError as exc:
            errors.append(str(exc))

    first = threading.Thread(target=work, args=(failing,))
    first.start()
    started.wait(5)
    waiter = threading.Thread(target=work, args=(lambda: 1,))  # joins the failing computation
    waiter.start()
    time.sleep(0.2)
    release.set()
    first.join()
    waiter.join()
    assert errors == ["no features", "no features"]
    assert cache.get("key") is None
    assert cache.get_or_compute("key", lambda: 7) == 7  # computed anew afterwards


def test_a_value_computed_across_a_clear_is_returned_but_not_stored():
    cache: LRUCache[str, str] = LRUCache(4)
    state = {"kb": "old"}
    started, release = threading.Event(), threading.Event()

    def compute() -> str:
        seen = state["kb"]
        started.set()
        release.wait(5)
        return seen

    result = []
    worker = threading.Thread(target=lambda: result.append(cache.get_or_compute("bottle", compute)))
    worker.start()
    started.wait(5)
    state["kb"] = "new"  # e.g. set_knowledge: the state changes, then the cache is cleared
    cache.clear()
    assert cache.get_or_compute("bottle", lambda: state["kb"]) == "new"  # no wait on the stale computation
    release.set()
    worker.join()
    assert result == ["old"]  # its caller began before the clear and gets what it computed
    assert cache.get("bottle") == "new"  # but the stale value never replaced the fresh one
    cache.clear()
    started.clear()
    release.clear()
    worker = threading.Thread(target=lambda: cache.get_or_compute("bottle", compute))
    worker.start()
    started.wait(5)
    cache.clear()
    release.set()
    worker.join()
    assert cache.get("bottle") is None and len(cache) == 0


def test_the_models_text_caches_hold_at_most_max_classes(tiny_backbone, bottle_image):
    config = replace(KAnoCLIPConfig(backbone=str(tiny_backbone)), cache=CacheConfig(max_classes=3))
    model = KAnoCLIP.from_pretrained(config=config, device="cpu")
    names = [f"widget {i}" for i in range(8)]
    detections = model.detect_batch([str(bottle_image)] * len(names), names)
    assert len(model._text_cache) == 3 and len(model._knowledge_cache) == 3
    assert [name for name, _ in model._text_cache.keys()] == names[-3:]  # keyed by (class, descriptions)
    # an evicted class is computed again, to the same result
    assert model.detect(str(bottle_image), names[0]).score == pytest.approx(detections[0].score, abs=1e-6)
