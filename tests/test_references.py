"""k-shot normal references and calibrated thresholds (kanoclip.references, KAnoCLIP's API).

On the tiny random backbone: these prove the plumbing (nearest-neighbour maps, fusion,
calibration, saving), never accuracy.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from kanoclip import KAnoCLIP
from kanoclip.config import KAnoCLIPConfig, ReferenceConfig
from kanoclip.errors import CheckpointError, ImageError, InputError
from kanoclip.references import References, f1_max_threshold, nearest_distance


@pytest.fixture(scope="module")
def good(bottle_dir) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:6]]


def fresh(tiny_backbone, **sections) -> KAnoCLIP:
    return KAnoCLIP.from_pretrained(
        config=replace(KAnoCLIPConfig(backbone=str(tiny_backbone)), **sections), device="cpu"
    )


def painted(image: Image.Image, seed: int, side: int = 90) -> tuple[Image.Image, tuple[int, int]]:
    """A bright side x side square at a seeded place inside the bottle's area."""
    rng = np.random.default_rng(seed)
    array = np.asarray(image).copy()
    y, x = (int(v) for v in rng.integers(250, 900 - 250 - side, size=2))
    array[y : y + side, x : x + side] = (255, 255, 40)
    return Image.fromarray(array), (y, x)


def test_a_painted_square_stands_out_in_the_reference_map(tiny_backbone, good):
    model = fresh(tiny_backbone)
    refs = model.add_references("bottle", good[1:3])
    # training-free (stage weights 0, 0, 0, 1): only the last stage is kept
    assert refs.count == 2 and refs.bank[:3] == [None] * 3
    assert refs.bank[3].dtype == torch.float16 and refs.bank[3].device == model.device
    clean = model.detect(good[0], "bottle")
    for seed in range(10):
        image, (y, x) = painted(good[0], seed)
        det = model.detect(image, "bottle")
        assert det.reference_count == 2 and det.reference_map.shape == (900, 900)
        inside = det.reference_map[y : y + 90, x : x + 90].mean()
        assert inside > np.percentile(det.reference_map, 95), seed
        assert det.score > clean.score, seed


def test_an_image_as_its_own_reference_maps_to_zero(tiny_backbone, good):
    model = fresh(tiny_backbone)
    model.add_references("bottle", [good[0]])
    det = model.detect(good[0], "bottle")
    assert det.reference_map is not None and det.reference_map.max() <= 1e-4


def test_fusion_is_the_weighted_mean_of_the_two_maps(tiny_backbone, good):
    """λ = 0.3: the fused map and score against the model's own (no references) and the reference map."""
    model = fresh(tiny_backbone, references=ReferenceConfig(weight=0.3))
    plain = model.detect(good[3], "bottle")
    model.add_references("bottle", good[1:3])
    det = model.detect(good[3], "bottle")
    np.testing.assert_allclose(det.anomaly_map, 0.7 * plain.anomaly_map + 0.3 * det.reference_map, atol=1e-5)
    assert det.score == pytest.approx(0.7 * plain.score + 0.3 * float(det.reference_map.max()), abs=1e-4)


def test_nearest_distance_is_one_minus_the_best_cosine_by_hand():
    torch.manual_seed(0)
    patches, bank = torch.randn(2, 5, 8), torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    got = nearest_distance(patches, bank.half(), chunk=3)
    q = torch.nn.functional.normalize(patches, dim=-1)
    stored = torch.nn.functional.normalize(bank.half().float(), dim=-1)
    best = torch.stack(
        [torch.tensor([max(float(q[b, i] @ stored[j]) for j in range(7)) for i in range(5)]) for b in range(2)]
    )
    torch.testing.assert_close(got, (1 - best).clamp(0, 1), atol=1e-5, rtol=0)


def test_saved_references_reload_to_identical_detections(tiny_backbone, good, tmp_path):
    model = fresh(tiny_backbone)
    model.add_references("bottle", good[1:4])
    before = model.detect(good[0], "bottle")
    folder = model.save_references(tmp_path / "refs")
    again = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu", references=folder)
    after = again.detect(good[0], "bottle")
    assert after.score == pytest.approx(before.score, abs=1e-6) and after.threshold == pytest.approx(
        before.threshold, abs=1e-6
    )
    np.testing.assert_allclose(after.anomaly_map, before.anomaly_map, atol=1e-6)
    np.testing.assert_allclose(after.reference_map, before.reference_map, atol=1e-6)
    loaded = again.references("bottle")
    assert loaded.count == 3 and loaded.calibrated and loaded.image_names == model.references("bottle").image_names
    trained = KAnoCLIP.for_training(backbone=str(tiny_backbone), device="cpu")  # another V-V path: other features
    with pytest.raises(CheckpointError, match="built for another model .*vv_length 6 there, 3 here"):
        KAnoCLIP.from_pretrained(
            backbone=str(tiny_backbone),
            device="cpu",
            references=folder,
            config=trained.config,
            overrides={"training_free.num_replaced_blocks": 3},
        )


def test_leave_one_out_threshold_and_k1(tiny_backbone, good):
    model = fresh(tiny_backbone)
    one = model.add_references("bottle", [good[1]])
    assert not one.calibrated and model.detect(good[0], "bottle").threshold == model.config.scoring.threshold
    model.remove_references("bottle")
    refs = model.add_references("bottle", good[1:4])
    assert refs.calibrated and "leave-one-out" in refs.calibration
    # by hand: each reference scored with the other two as its references, then the largest + margin
    loo = []
    for i in range(3):
        other = fresh(tiny_backbone)
        other.add_references("bottle", [g for j, g in enumerate(good[1:4]) if j != i])
        loo.append(other.detect(good[1 + i], "bottle").score)
    assert refs.threshold == pytest.approx(max(loo) + model.config.references.margin, abs=2e-3)
    det = model.detect(good[0], "bottle")
    assert det.threshold == refs.threshold and "calibrated" in det.threshold_note
    more = model.add_references("bottle", [good[4]])  # a second call adds to the bank and recalibrates
    assert more.count == 4 and more.model_scores[:3] == pytest.approx(refs.model_scores, abs=1e-6)
    assert "leave-one-out threshold of its 3 references" in more.note


def test_calibration_on_labelled_images_is_the_f1_max_threshold(tiny_backbone, good, bottle_dir):
    model = fresh(tiny_backbone)
    bad = [Image.open(p).convert("RGB") for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:4]]
    images, labels = good[:4] + bad, [0] * 4 + [1] * 4
    threshold = model.calibrate("bottle", images, labels)
    scores = np.array([model.detect(i, "bottle").score for i in images])
    best_f1, best_t = -1.0, None
    for t in sorted(set(scores)):  # brute force over every distinct score
        predicted = scores >= t
        tp = int((predicted & (np.array(labels) == 1)).sum())
        f1 = 2 * tp / (predicted.sum() + sum(labels)) if tp else 0.0
        if f1 > best_f1:
            best_f1, best_t = f1, t
    assert threshold == pytest.approx(best_t, abs=1e-6)
    assert model.references("bottle").calibrated and model.references("bottle").count == 0
    assert model.detect(good[0], "bottle").threshold == pytest.approx(threshold)
    unlabelled = model.calibrate("bottle", good[:4])
    assert unlabelled == pytest.approx(min(scores[:4].max() + 0.02, 1.0), abs=1e-6)


def test_f1_max_threshold_by_brute_force_on_random_scores():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores, labels = rng.random(30), rng.integers(0, 2, 30)
        labels[:2] = (0, 1)
        best = max(
            ((2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + labels.sum()), -t) for t in scores)
        )
        assert f1_max_threshold(scores, labels) == pytest.approx(-best[1])


def test_bad_references_are_refused_and_nothing_is_added(tiny_backbone, good, tmp_path):
    model = fresh(tiny_backbone, references=ReferenceConfig(max_per_class=3))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.png"):
        model.add_references("bottle", [good[0], str(text)])
    assert model.references("bottle") is None
    with pytest.raises(InputError, match="exceed the limit of 3 per class"):
        model.add_references("bottle", good[:4])
    with pytest.raises(InputError, match="NaN or infinite"):
        model.add_references("bottle", [np.full((64, 64, 3), np.nan, dtype=np.float32)])
    with pytest.raises(InputError, match="non-empty list"):
        model.add_references("bottle", [])
    small = good[1].resize((200, 150))  # another size than the test image works
    assert model.add_references("bottle", [small, good[2]]).count == 2
    assert model.detect(good[0], "bottle").reference_map.shape == (900, 900)


def test_references_are_per_store(tiny_backbone, good):
    """The app keeps one store per visitor: a store's references reach only detections given it."""
    from kanoclip.references import References

    model = fresh(tiny_backbone)
    mine, yours = (References(model.reference_fingerprint()) for _ in range(2))
    model.add_references("bottle", good[1:3], store=mine)
    assert model.detect(good[0], "bottle", references=mine).reference_count == 2
    assert model.detect(good[0], "bottle", references=yours).reference_count == 0
    assert model.detect(good[0], "bottle").reference_count == 0 and model.references("bottle") is None


def test_serving_on_another_device_leaves_the_stores_set_where_it_was(tiny_backbone, good):
    """A visitor's store lives on the CPU while a GPU model serves it: the set handed out is on the
    model's device, the one kept stays on the CPU (here the 'meta' device stands in for the GPU)."""
    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    store = References(model.reference_fingerprint())
    kept = model.add_references("bottle", good[:2], store=store)

    class OnMeta:  # the model's scoring, on another device
        device = torch.device("meta")
        reference_scoring = model.reference_scoring
        score_features = model.score_features

    served = store.serving("bottle", OnMeta())
    assert served.global_features.device.type == "meta" and all(f.is_meta for f in served.features if f is not None)
    assert store.stored("bottle") is kept and kept.global_features.device.type == "cpu"
