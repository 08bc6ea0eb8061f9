"""References that follow every model change: provenance, recomputation, precision, devices, safe saves.

On the tiny random backbone with real bottle images: plumbing, never accuracy. Every expected
threshold is computed independently, by adding the same images to a fresh model.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import kanoclip.references as references_module
from kanoclip import KAnoCLIP
from kanoclip.config import KAnoCLIPConfig
from kanoclip.errors import CheckpointError, InputError
from kanoclip.knowledge import KnowledgeBase
from kanoclip.knowledge.base import Provenance
from kanoclip.references import TENSORS_NAME, References


@pytest.fixture(scope="module")
def good(bottle_dir) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:5]]


@pytest.fixture(scope="module")
def bad(bottle_dir) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:3]]


@pytest.fixture(scope="module")
def checkpoints(tiny_backbone, tmp_path_factory) -> tuple[Path, Path]:
    """Two trained-mode checkpoints of the tiny backbone with different (random) learned weights."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for seed, name in ((0, "A"), (1, "B")):
        torch.manual_seed(seed)
        model = KAnoCLIP.for_training(backbone=str(tiny_backbone), device="cpu")
        paths.append(model.save_pretrained(folder / name))
    return paths[0], paths[1]


def training_free(tiny_backbone, **kwargs) -> KAnoCLIP:
    return KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu", **kwargs)


def trained(tiny_backbone, checkpoint: Path, **kwargs) -> KAnoCLIP:
    return KAnoCLIP.from_pretrained(checkpoint=checkpoint, backbone=str(tiny_backbone), device="cpu", **kwargs)


def test_a_set_saved_with_checkpoint_a_serves_b_with_bs_own_threshold(tiny_backbone, checkpoints, good, tmp_path):
    a_path, b_path = checkpoints
    model_a = trained(tiny_backbone, a_path)
    a_refs = model_a.add_references("bottle", good[1:4])
    folder = model_a.save_references(tmp_path / "refs")
    expected = trained(tiny_backbone, b_path).add_references("bottle", good[1:4])  # B's own, computed afresh
    assert abs(expected.threshold - a_refs.threshold) > 1e-4  # else the test could not tell them apart
    model_b = trained(tiny_backbone, b_path, references=folder)
    served = model_b.references("bottle")
    assert served.threshold == pytest.approx(expected.threshold, abs=1e-6)
    assert served.model_scores == pytest.approx(expected.model_scores, abs=1e-6)
    det = model_b.detect(good[0], "bottle")
    assert det.threshold == pytest.approx(expected.threshold, abs=1e-6) and "leave-one-out" in det.threshold_note
    # loading B's weights into A's model recomputes A's own store the same way
    model_a.load_trainable_state_dict(model_b.model.trainable_state_dict())
    assert model_a.references("bottle").threshold == pytest.approx(expected.threshold, abs=1e-6)


def test_a_labelled_calibration_is_dropped_with_a_note_under_another_checkpoint(
    tiny_backbone, checkpoints, good, bad, tmp_path
):
    a_path, b_path = checkpoints
    model_a = trained(tiny_backbone, a_path)
    model_a.calibrate("bottle", good[:3] + bad, [0, 0, 0, 1, 1, 1])
    folder = model_a.save_references(tmp_path / "refs")
    det = trained(tiny_backbone, b_path, references=folder).detect(good[0], "bottle")
    assert det.threshold == KAnoCLIPConfig().scoring.threshold  # the default: never A's, marked calibrated
    assert f"checkpoint {a_path}" in det.threshold_note and "recalibrate" in det.threshold_note
    assert "not calibrated" in det.threshold_note


def test_adding_references_after_calibrate_says_what_became_of_the_threshold(tiny_backbone, good, bad):
    model = training_free(tiny_backbone)
    calibrated = model.calibrate("bottle", good[:2] + bad[:2], [0, 0, 1, 1], batch_size=3)
    refs = model.add_references("bottle", good[2:4])
    assert refs.source == "leave-one-out" and refs.threshold != calibrated
    assert f"the threshold {calibrated:.3f} calibrated on 4 labelled images (F1-max) was replaced" in refs.note
    assert "recalibrate" in model.detect(good[0], "bottle").threshold_note


def test_after_set_knowledge_the_threshold_equals_a_fresh_add(tiny_backbone, good):
    model = training_free(tiny_backbone)
    before = model.add_references("bottle", good[1:4]).threshold
    kb = KnowledgeBase.builtin().copy()
    kb.add_manual(
        "bottle", ["a bottle with a deep crack in its rim"], Provenance("test", None, "2026-12-07", "{class}")
    )
    model.set_knowledge(kb)
    expected = training_free(tiny_backbone, kb=kb).add_references("bottle", good[1:4]).threshold
    assert expected != pytest.approx(before, abs=1e-6)  # the descriptions move the model's own scores
    assert model.references("bottle").threshold == pytest.approx(expected, abs=1e-6)


def test_a_config_variant_recomputes_the_threshold_from_the_kept_features(tiny_backbone, good):
    model = training_free(tiny_backbone)
    model.add_references("bottle", good[1:4])
    variant = model.variant({"scoring.sigma": 1.0, "references.margin": 0.05})
    expected = variant.add_references("bottle", good[1:4], store=References(variant.reference_fingerprint()))
    assert variant.references("bottle", store=model.reference_store).threshold == pytest.approx(
        expected.threshold, abs=1e-6
    )


def test_another_precision_or_size_is_refused_naming_what_differs(tiny_backbone, good, tmp_path):
    model = training_free(tiny_backbone)
    model.add_references("bottle", good[1:3])
    folder = model.save_references(tmp_path / "refs")
    with pytest.raises(CheckpointError, match="precision fp32 there, bf16 here"):
        training_free(tiny_backbone, precision="bf16", references=folder)
    with pytest.raises(CheckpointError, match="image_size 112 there, 56 here"):
        training_free(tiny_backbone, overrides={"image_size": 56}, references=folder)
    other = training_free(tiny_backbone, overrides={"image_size": 56})
    with pytest.raises(InputError, match="image_size 112 there, 56 here"):
        other.detect(good[0], "bottle", references=model.reference_store)


@pytest.mark.parametrize("mode", ["training-free", "trained"])
def test_the_reference_path_runs_in_fp32_under_a_callers_bf16_autocast(tiny_backbone, checkpoints, good, mode):
    model = training_free(tiny_backbone) if mode == "training-free" else trained(tiny_backbone, checkpoints[0])
    model.add_references("bottle", good[1:4])
    size = model.image_size
    image = good[0].resize((size, size))  # the model's input size: no upsampling hides ties
    fp32 = model.detect(image, "bottle")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.detect(image, "bottle")
    assert mixed.reference_map.dtype == np.float32 and mixed.reference_map.shape == (size, size)
    assert len(np.unique(mixed.reference_map)) >= 0.5 * len(np.unique(fp32.reference_map))
    assert np.abs(mixed.reference_map - fp32.reference_map).max() <= 0.01
    assert mixed.score == pytest.approx(fp32.score, abs=0.01)


def test_the_banks_follow_the_model_to_another_device_and_dtype(tiny_backbone, good):
    model = training_free(tiny_backbone)
    model.add_references("bottle", good[1:3])
    before = model.detect(good[0], "bottle")
    model.double().float()  # a dtype round trip goes through _apply, as .to("cuda") does
    after = model.detect(good[0], "bottle")
    assert after.reference_count == 2 and after.score == pytest.approx(before.score, abs=1e-6)
    assert model.references("bottle").bank[3].dtype == torch.float16  # the bank keeps its storage dtype
    moved = training_free(tiny_backbone)
    moved.add_references("bottle", good[1:3])
    moved.to("meta")  # a device move without a GPU: the bank goes along
    refs = moved.reference_store.stored("bottle")
    assert refs.bank[3].device.type == "meta" and refs.global_features.device.type == "meta"


def test_a_save_interrupted_between_its_writes_leaves_a_loadable_set(tiny_backbone, good, tmp_path, monkeypatch):
    model = training_free(tiny_backbone)
    model.add_references("bottle", good[1:3])
    folder = model.save_references(tmp_path / "refs")
    model.add_references("bottle", [good[3]])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(references_module, "atomic_write_bytes", crash)  # killed in the first write: the old set
    with pytest.raises(KeyboardInterrupt):
        model.save_references(folder)
    assert training_free(tiny_backbone, references=folder).references("bottle").count == 2
    monkeypatch.undo()
    monkeypatch.setattr(references_module, "atomic_write_json", crash)  # killed between the two: the new set
    with pytest.raises(KeyboardInterrupt):
        model.save_references(folder)
    loaded = training_free(tiny_backbone, references=folder).references("bottle")
    assert loaded.count == 3 and loaded.threshold == pytest.approx(model.references("bottle").threshold, abs=1e-6)


def test_a_bank_of_the_wrong_shape_or_a_damaged_file_is_refused(tiny_backbone, good, tmp_path):
    model = training_free(tiny_backbone)
    model.add_references("bottle", good[1:3])
    folder = model.save_references(tmp_path / "refs")
    with safe_open(str(folder / TENSORS_NAME), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    assert sorted(tensors) == ["bottle/global", "bottle/stage3"]  # keyed by class; only the stage read
    tensors["bottle/stage3"] = tensors["bottle/stage3"][:-5]
    save_file(tensors, str(folder / TENSORS_NAME), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"stage 3 bank of 'bottle' is \(\d+, \d+\), not"):
        training_free(tiny_backbone, references=folder)
    (folder / TENSORS_NAME).write_bytes((folder / TENSORS_NAME).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is damaged and cannot be read"):
        training_free(tiny_backbone, references=folder)


def test_concurrent_adds_to_one_store_lose_nothing(tiny_backbone, bottle_dir):
    model = training_free(tiny_backbone)
    paths = [str(p) for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:4]]
    errors: list[BaseException] = []

    def add(path):
        try:
            model.add_references("bottle", [path])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(path,)) for path in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refs = model.references("bottle")
    assert not errors and sorted(refs.image_names) == sorted(paths)
    assert refs.bank[3].shape[0] == 4 * refs.grid[0] * refs.grid[1] and len(refs.model_scores) == 4


def test_a_store_cap_over_all_classes_is_refused_in_one_line(tiny_backbone, good):
    model = training_free(tiny_backbone)
    store = References(model.reference_fingerprint(), max_images=3)
    model.add_references("bottle", good[:2], store=store)
    with pytest.raises(InputError, match="4 reference images over all classes exceed the limit of 3"):
        model.add_references("screw", good[2:4], store=store)
    assert store.total == 2


def test_detect_batch_refuses_a_bare_path(tiny_backbone, bottle_image):
    model = training_free(tiny_backbone)
    with pytest.raises(InputError, match="a list is expected"):
        model.detect_batch(str(bottle_image), "bottle")


def test_calibrate_keeps_only_scores_in_batches(tiny_backbone, good, monkeypatch):
    """Scored batch_size images at a time: no forward sees more, and the threshold is that of all scores."""
    model = training_free(tiny_backbone)
    seen: list[int] = []
    infer = model.infer

    def counting(images, classes, **kwargs):
        seen.append(len(images))
        return infer(images, classes, **kwargs)

    monkeypatch.setattr(model, "infer", counting)
    threshold = model.calibrate("bottle", good, batch_size=2)
    assert seen == [2, 2, 1]
    scores = [training_free(tiny_backbone).detect(g, "bottle").score for g in good]
    assert threshold == pytest.approx(max(scores) + model.config.references.margin, abs=1e-5)


def test_the_paper_image_token_is_the_vv_paths_cls(tiny_backbone, bottle_image):
    """trained mode reads S_l[0] (the V-V path's CLS); "original" and the training-free default read CLIP's own."""
    base = KAnoCLIPConfig(backbone=str(tiny_backbone))
    paper = KAnoCLIP.for_training(config=base, device="cpu").eval()
    clip_cls = KAnoCLIP.for_training(config=replace(base, vv=replace(base.vv, image_token="original")), device="cpu")
    free = training_free(tiny_backbone)
    pixels = paper.pixel_values([Image.open(bottle_image).convert("RGB")])
    with torch.no_grad():
        own = paper.model.clip.get_image_features(pixel_values=pixels)
        own = own if isinstance(own, torch.Tensor) else own.pooler_output
    torch.testing.assert_close(clip_cls.encode_image(pixels).global_feature, own.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(free.encode_image(pixels).global_feature, own.float(), atol=1e-5, rtol=0)
    assert (paper.encode_image(pixels).global_feature - own).abs().max() > 1e-3
    with pytest.raises(ValueError, match="vv.image_token"):
        replace(base.vv, image_token="cls")


def test_a_copied_store_is_independent_and_has_its_own_lock(tiny_backbone, good):
    """The app's GPU worker gets a pickled copy of a session's store; the set it returns is kept."""
    import pickle

    model = training_free(tiny_backbone)
    store = References(model.reference_fingerprint(), max_images=5)
    model.add_references("bottle", good[:2], store=store)
    copy = pickle.loads(pickle.dumps(store))
    added = model.add_references("bottle", [good[2]], store=copy)
    assert copy.total == 3 and store.total == 2 and copy.max_images == 5
    store.keep(added)
    assert store.total == 3 and model.references("bottle", store=store).threshold == added.threshold
