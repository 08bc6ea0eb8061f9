"""The bounded LRU cache, and the model's per-class caches that use it."""

from __future__ import annotations

import threading
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


def test_the_models_text_caches_hold_at_most_max_classes(tiny_backbone, bottle_image):
    config = replace(KAnoCLIPConfig(backbone=str(tiny_backbone)), cache=CacheConfig(max_classes=3))
    model = KAnoCLIP.from_pretrained(config=config, device="cpu")
    names = [f"widget {i}" for i in range(8)]
    detections = model.detect_batch([str(bottle_image)] * len(names), names)
    assert len(model._text_cache) == 3 and len(model._knowledge_cache) == 3
    assert [name for name, _ in model._text_cache.keys()] == names[-3:]  # keyed by (class, descriptions)
    # an evicted class is computed again, to the same result
    assert model.detect(str(bottle_image), names[0]).score == pytest.approx(detections[0].score, abs=1e-6)
