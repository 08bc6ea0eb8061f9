"""The micro-batcher: concurrent detect requests share backbone forwards, each caller gets its own result."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from threads import in_threads

from kanoclip import KAnoCLIP
from kanoclip.errors import InputError
from kanoclip.references import References
from kanoclip.serving import AUTO_BATCH_SIZE, BatchingConfig, MicroBatcher


@contextlib.contextmanager
def count_forwards(model: KAnoCLIP) -> Iterator[list[int]]:
    """A list that grows by one per backbone forward (a hook on the vision encoder, apart from the batcher)."""
    calls: list[int] = []
    handle = model.model.clip.vision_model.encoder.register_forward_hook(lambda _m, _args, _out: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def model(tiny_backbone) -> KAnoCLIP:
    return KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")


def test_eight_concurrent_requests_take_fewer_forwards_and_each_gets_its_own_result(
    model: KAnoCLIP, bottle_images, good_bottle_paths
) -> None:
    # 8 callers: their own images, classes, thresholds, σ and references (two share one store)
    stores = [References(model.reference_fingerprint()) for _ in range(3)]
    model.add_references("bottle", good_bottle_paths[10:12], store=stores[0])
    model.add_references("bottle", good_bottle_paths[12:15], store=stores[1])
    requests = [
        dict(class_name="bottle", threshold=None, sigma=None, references=stores[0]),
        dict(class_name="bottle", threshold=None, sigma=None, references=stores[1]),
        dict(class_name="bottle", threshold=0.3, sigma=None, references=stores[0]),
        dict(class_name="bottle", threshold=None, sigma=0.0, references=None),
        dict(class_name="screw", threshold=None, sigma=None, references=stores[2]),
        dict(class_name="bottle", threshold=0.7, sigma=2.0, references=stores[2]),
        dict(class_name="glass bottle", threshold=None, sigma=None, references=None),
        dict(class_name="bottle", threshold=None, sigma=None, references=stores[1]),
    ]
    alone = [model.detect(image, **request) for image, request in zip(bottle_images, requests)]
    batcher = MicroBatcher(model, BatchingConfig(max_batch_size=8, max_wait_ms=1000))
    with count_forwards(model) as forwards:
        results = in_threads(
            [lambda i=i: batcher.detect(bottle_images[i], **requests[i]) for i in range(len(requests))], catch=True
        )
    assert 1 <= len(forwards) < len(requests)  # batched: fewer backbone forwards than requests
    assert batcher.stats.forwards == len(forwards) and batcher.stats.requests == len(requests)
    for expected, got in zip(alone, results):
        assert not isinstance(got, Exception), got
        assert got.score == pytest.approx(expected.score, abs=1e-5)
        assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-5
        assert (got.threshold, got.threshold_note) == (expected.threshold, expected.threshold_note)
        assert got.reference_count == expected.reference_count and got.class_name == expected.class_name
    assert [r.reference_count for r in results] == [2, 3, 2, 0, 0, 0, 0, 3]
    assert len({round(r.score, 6) for r in results}) == len(results)  # each its own image


def test_a_bad_request_fails_only_its_caller(model: KAnoCLIP, bottle_images) -> None:
    batcher = MicroBatcher(model, BatchingConfig(max_batch_size=4, max_wait_ms=500))
    names = ["bottle", "   ", "bottle", "bottle"]
    results = in_threads([lambda i=i: batcher.detect(bottle_images[i], names[i]) for i in range(4)], catch=True)
    assert isinstance(results[1], InputError) and "class name is empty" in str(results[1])
    for i in (0, 2, 3):
        assert results[i].score == pytest.approx(model.detect(bottle_images[i], "bottle").score, abs=1e-5)


def test_batching_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KANOCLIP_BATCH_SIZE", raising=False)
    monkeypatch.delenv("KANOCLIP_BATCH_WAIT_MS", raising=False)
    assert BatchingConfig.from_env(serialised=True) == BatchingConfig(max_batch_size=1, max_wait_ms=5.0)
    assert BatchingConfig.from_env(serialised=False).max_batch_size == AUTO_BATCH_SIZE == 8
    monkeypatch.setenv("KANOCLIP_BATCH_SIZE", "16")
    monkeypatch.setenv("KANOCLIP_BATCH_WAIT_MS", "12.5")
    assert BatchingConfig.from_env(serialised=True) == BatchingConfig(max_batch_size=16, max_wait_ms=12.5)
    monkeypatch.setenv("KANOCLIP_BATCH_SIZE", "many")
    with pytest.raises(InputError, match="KANOCLIP_BATCH_SIZE='many'.*'auto' or a whole number"):
        BatchingConfig.from_env(serialised=False)
    monkeypatch.setenv("KANOCLIP_BATCH_SIZE", "0")
    with pytest.raises(InputError, match="KANOCLIP_BATCH_SIZE='0'"):
        BatchingConfig.from_env(serialised=False)
    with pytest.raises(ValueError, match="max_wait_ms must be between 0 and 1000"):
        BatchingConfig(max_wait_ms=-1)
    assert not BatchingConfig(max_batch_size=1).enabled and BatchingConfig(max_batch_size=2).enabled
