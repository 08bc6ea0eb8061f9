"""The Detect tab's references panel helpers (demo/detect_references.py), on the tiny random CLIP."""

from __future__ import annotations

from types import SimpleNamespace

from demo.detect_references import (
    SESSION_WHOSE,
    SHARED_WHOSE,
    references_markdown,
    serving_references,
    session_store,
)


def test_a_session_keeps_one_store_per_model_and_starts_anew_for_another_model(tiny_model) -> None:
    stores: dict = {}
    key = ("training-free", "tiny")
    store = session_store(stores, key, tiny_model, max_images=5)
    assert store.max_images == 5 and store.identity == tiny_model.reference_fingerprint()
    assert session_store(stores, key, tiny_model, max_images=5) is store  # kept while the model is the same
    other = SimpleNamespace(reference_fingerprint=lambda: {"backbone": "another"})  # the folder now holds another
    renewed = session_store(stores, key, other)
    assert renewed is not store and renewed.identity == {"backbone": "another"} and stores[key] is renewed


def test_a_sessions_own_references_win_and_are_described_as_its_own(tiny_model, bottle_images) -> None:
    session = session_store({}, ("training-free", "tiny"), tiny_model)
    store, refs, whose = serving_references(tiny_model, session, "bottle")
    assert (store, refs, whose) == (tiny_model.reference_store, None, SHARED_WHOSE)  # the app has none of bottle
    default = tiny_model.config.scoring.threshold
    before = references_markdown(tiny_model, session, "bottle")
    assert f"**Normal references of `bottle`:** none · default threshold {default:.3f} (not calibrated)" in before
    tiny_model.add_references("bottle", bottle_images[-2:], store=session)  # the two good bottles, the session's
    store, refs, whose = serving_references(tiny_model, session, "bottle")
    assert store is session and refs is not None and refs.count == 2 and whose == SESSION_WHOSE
    after = references_markdown(tiny_model, session, "bottle")
    assert f"**Normal references of `bottle`:** 2 ({SESSION_WHOSE})" in after
    assert tiny_model.references("bottle") is None  # the model's own (shared) store is untouched
