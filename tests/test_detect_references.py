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


def test_two_concurrent_additions_to_one_session_on_copies_both_stay(tiny_backbone, tmp_path, good_bottle_paths):
    """The GPU path adds each upload to a copy of the session's store (ZeroGPU pickles it; here a
    pickle round trip stands in for the move) and keeps the set that comes back: two uploads at
    once must chain, not have the later replace the earlier."""
    import pickle

    import pytest
    from test_app import app_config
    from threads import in_threads

    import demo.detect_references as panel
    from demo.state import AppContext

    ctx = AppContext.create(app_config(tmp_path, tiny_backbone))
    add = panel.add_references_handler(ctx)
    stores: dict = {}
    _, session = panel.session_for(ctx, None, stores)  # the session's store exists before both uploads
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(panel, "move", lambda value, device: pickle.loads(pickle.dumps(value)))
        uploads = [[str(good_bottle_paths[0])], [str(good_bottle_paths[1]), str(good_bottle_paths[2])]]
        in_threads([lambda files=files: add(files, "bottle", None, stores, None, None) for files in uploads])
    kept = session.stored("bottle")
    assert kept.count == 3  # 1 + 2: neither upload lost
