"""The whole model: public contract, frozen backbone, gradients, checkpoints, overfitting."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from kanoclip import KAnoCLIP, KnowledgeBase
from kanoclip.checkpoint import WEIGHTS_NAME, read_checkpoint
from kanoclip.config import BiCMCIConfig, KAnoCLIPConfig, TrainingFreeConfig
from kanoclip.errors import CheckpointError, InputError
from kanoclip.images import preprocess
from kanoclip.modeling.losses import kd_loss, total_loss


@pytest.fixture(scope="module")
def small_config(tiny_backbone) -> KAnoCLIPConfig:
    return KAnoCLIPConfig(backbone=str(tiny_backbone), bicmci=BiCMCIConfig(dim=32, num_heads=2))


def fresh_model(config: KAnoCLIPConfig, seed: int = 0, *, trained: bool = False) -> KAnoCLIP:
    """Training-free, or trained mode with fresh (seeded) learned parts, in eval mode."""
    torch.manual_seed(seed)
    if trained:
        return KAnoCLIP.for_training(config=config, device="cpu").eval()
    return KAnoCLIP.from_pretrained(config=config, device="cpu")


@pytest.mark.parametrize("trained", [False, True])
def test_detect_real_bottle_gives_a_map_of_the_input_size(trained, small_config, bottle_image):
    model = fresh_model(small_config, trained=trained)
    det = model.detect(str(bottle_image), "bottle")
    assert model.mode == ("trained" if trained else "training-free")
    assert det.mode == model.mode
    assert det.anomaly_map.shape == (900, 900) and det.anomaly_map.dtype == np.float32
    assert 0.0 <= det.anomaly_map.min() and det.anomaly_map.max() <= 1.0
    assert 0.0 <= det.score <= 1.0
    assert det.is_anomalous == (det.score >= det.threshold)
    assert len(det.stage_maps) == 4 and all(m.shape == (900, 900) for m in det.stage_maps)
    assert det.normal_map.shape == det.abnormal_map.shape == (900, 900)
    sources = {g.source for g in det.guidance}
    assert "builtin" in sources  # the shipped knowledge base is hand-written
    assert ("learned" in sources) == trained
    sims = [g.image_similarity for g in det.guidance]
    assert sims == sorted(sims, reverse=True)


@pytest.mark.parametrize("trained", [False, True])
def test_eq9_maps_are_the_weighted_mean_of_the_upsampled_stage_maps(small_config, bottle_image, trained):
    """M^n, M^a (eq. 9: the mean when trained; training-free, the config's stage weights, here
    1, 0, 2, 1) against upsampling each stage's grid map first, by hand; a Detection's extra maps
    are the grid maps taken straight to the image's size."""
    config = replace(small_config, training_free=TrainingFreeConfig(stage_weights=(1, 0, 2, 1)))
    model = fresh_model(config, trained=trained)
    weights = torch.full((4,), 0.25) if trained else torch.tensor([0.25, 0.0, 0.5, 0.25])
    image = Image.open(bottle_image).convert("RGB")
    out, _ = model.infer([image], ["bottle"])
    s = model.image_size
    per_stage = torch.nn.functional.interpolate(
        out.stage_maps[0].float(), size=(s, s), mode="bilinear", align_corners=False
    )
    expected = (weights[:, None, None, None] * per_stage).sum(dim=0)  # (2, S, S)
    torch.testing.assert_close(out.normal[0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.abnormal[0], expected[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.stage_maps.sum(dim=2), torch.ones_like(out.stage_maps[:, :, 0]))  # softmax pairs

    det = model.detect(image, "bottle")
    stages = torch.nn.functional.interpolate(
        out.stage_maps[0, :, 1:2].float(), size=(900, 900), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(np.stack(det.stage_maps), stages[:, 0].clamp(0, 1).numpy(), atol=1e-6)
    grid_abnormal = (weights[:, None, None] * out.stage_maps[0, :, 1]).sum(dim=0)
    abnormal = torch.nn.functional.interpolate(
        grid_abnormal[None, None], size=(900, 900), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(det.abnormal_map, abnormal[0, 0].clamp(0, 1).numpy(), atol=1e-6)


def test_inputs_of_every_kind_give_the_same_result(tiny_model, bottle_image):
    pil = Image.open(bottle_image)
    array = np.asarray(pil.convert("RGB"))
    by_path = tiny_model.detect(str(bottle_image), "bottle")
    for image in (pil, array, bottle_image.read_bytes()):
        other = tiny_model.detect(image, "bottle")
        assert other.score == pytest.approx(by_path.score, abs=1e-6)
        np.testing.assert_allclose(other.anomaly_map, by_path.anomaly_map, atol=1e-5)


def test_detect_batch_matches_single_detections(tiny_model, bottle_dir):
    paths = sorted((bottle_dir / "test" / "broken_small").glob("*.png"))[:3]
    batch = tiny_model.detect_batch([str(p) for p in paths], ["bottle", "metal nut", "screw"])
    for path, name, det in zip(paths, ["bottle", "metal_nut", "screw"], batch):
        single = tiny_model.detect(str(path), name)
        assert det.class_name == name
        assert det.score == pytest.approx(single.score, abs=1e-5)
    with pytest.raises(InputError, match="class names"):
        tiny_model.detect_batch([str(paths[0])], ["a", "b"])


def test_guidance_of_a_mixed_batch_is_each_images_own(tiny_model, bottle_dir):
    """Each image's guidance: its own class's descriptions, with the cosine similarity between
    the image and the text as CLIP itself computes them (``get_image_features``/``get_text_features``,
    whose ``pooler_output`` is the projected feature in transformers 5)."""
    paths = sorted((bottle_dir / "test" / "contamination").glob("*.png"))[:2]
    images = [Image.open(p).convert("RGB") for p in paths]
    detections = tiny_model.detect_batch(images, ["bottle", "screw"])
    clip, tokenizer = tiny_model.model.clip, tiny_model.model.text_encoder.tokenizer
    for image, name, det in zip(images, ["bottle", "screw"], detections):
        described = [g for g in det.guidance if g.source not in ("learned", "template")]
        assert [g.text for g in sorted(described, key=lambda g: g.text)] == sorted(
            d.text for d in tiny_model.knowledge.descriptions(name)
        )
        pixels = preprocess([image], tiny_model.image_size, tiny_model.image_mean, tiny_model.image_std)
        tokens = tokenizer(
            [g.text for g in described], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            image_feature = torch.nn.functional.normalize(
                clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1
            )
            text_features = torch.nn.functional.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
        expected = (text_features @ image_feature[0]).tolist()
        assert [g.image_similarity for g in described] == pytest.approx(expected, abs=1e-4)
        single = tiny_model.detect(image, name)
        assert [g.region_similarity for g in single.guidance] == pytest.approx(
            [g.region_similarity for g in det.guidance], abs=1e-5
        )


def test_class_names(tiny_model, bottle_image):
    with pytest.raises(InputError, match="class name is empty"):
        tiny_model.detect(str(bottle_image), "   ")
    det = tiny_model.detect(str(bottle_image), "Metal-Nut")
    assert det.class_name == "metal_nut" and det.known_class
    odd = tiny_model.detect(str(bottle_image), "a widget " * 60)
    assert not odd.known_class and 0 <= odd.score <= 1


@pytest.mark.parametrize("trained", [False, True])
def test_text_features_are_computed_once_per_class(small_config, bottle_image, monkeypatch, trained):
    """Through detect and through the tensor-level forward alike, in both modes."""
    model = fresh_model(small_config, trained=trained)
    assert not model.training  # from_pretrained gives a model ready for inference
    calls = []
    original = model.model.text_encoder.encode
    monkeypatch.setattr(
        model.model.text_encoder, "encode", lambda texts, **kw: calls.append(len(texts)) or original(texts, **kw)
    )
    model.detect(str(bottle_image), "bottle")
    first = len(calls)
    model.detect(str(bottle_image), "bottle")
    model.detect(np.zeros((50, 60, 3), np.uint8), "bottle")
    with torch.inference_mode():
        model(model.encode_image(torch.zeros(2, 3, model.image_size, model.image_size)), ["bottle", "bottle"])
    assert first > 0 and len(calls) == first


def test_knowledge_descriptions_are_encoded_once_for_training_inference_and_plots(
    small_config, bottle_image, monkeypatch
):
    """The KD target (eq. 3), the inference text side and the Prompts plots share one encoding."""
    from kanoclip.knowledge import KNOWLEDGE_SOURCES
    from kanoclip.viz_prompts import prompt_set

    model = fresh_model(small_config)
    descriptions = [d.text for d in model.knowledge.descriptions("bottle")]
    encoded: list[list[str]] = []
    original = model.model.text_encoder.encode
    monkeypatch.setattr(
        model.model.text_encoder, "encode", lambda texts, **kw: encoded.append(list(texts)) or original(texts, **kw)
    )
    target = model.knowledge_features(["bottle"])
    model.detect(str(bottle_image), "bottle")
    plotted = prompt_set(model, "bottle")
    assert encoded.count(descriptions) == 1
    torch.testing.assert_close(target[0, 0], torch.as_tensor(plotted.group(KNOWLEDGE_SOURCES)).mean(dim=0))


def test_moving_the_model_drops_cached_text_features(small_config, bottle_image):
    """Cached features live on a device: after ``.to(...)`` they are rebuilt, not reused."""
    model = fresh_model(small_config)
    before = model.detect(str(bottle_image), "bottle")
    assert model._text_cache and model._knowledge_cache
    model.to("cpu")
    assert not model._text_cache and not model._knowledge_cache
    assert model.detect(str(bottle_image), "bottle").score == pytest.approx(before.score, abs=1e-6)


def test_optimizer_step_touches_only_the_trainable_parts(small_config, bottle_image):
    model = fresh_model(small_config, trained=True)
    model.train()
    frozen = {k: v.detach().clone() for k, v in model.model.clip.state_dict().items()}
    trainable = [p for m in model.model.trainable_modules().values() for p in m.parameters()]
    assert all(p.requires_grad for p in trainable)
    assert all(not p.requires_grad for p in model.model.clip.parameters())
    assert {id(p) for p in model.parameters()} >= {id(p) for p in trainable} | {
        id(p) for p in model.model.clip.parameters()
    }

    pixels = preprocess(
        [Image.open(bottle_image).convert("RGB")] * 2, model.image_size, model.image_mean, model.image_std
    )
    out = model(model.encode_image(pixels), ["bottle", "bottle"])
    mask = torch.zeros_like(out.anomaly_map)
    mask[:, 40:60, 40:60] = 1
    kd = kd_loss(model.knowledge_features(out.classes), out.prompts.abnormal, out.prompts.normal)
    terms = total_loss(
        model.config.loss,
        kd=kd,
        score=out.score,
        label=torch.tensor([1.0, 0.0]),
        normal=out.normal,
        abnormal=out.abnormal,
        mask=mask,
        has_mask=torch.tensor([True, True]),
    )
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    terms["total"].backward()
    missing = [
        n
        for name, m in model.model.trainable_modules().items()
        for n, p in m.named_parameters(prefix=name)
        if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []
    optimizer.step()
    assert all(p.grad is None for p in model.model.clip.parameters())
    after = model.model.clip.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert not model.model.clip.training


def test_checkpoint_round_trip(small_config, bottle_image, tmp_path):
    model = fresh_model(small_config, seed=1, trained=True)
    kb = KnowledgeBase.builtin()
    folder = model.save_pretrained(tmp_path / "ck", metadata={"epochs": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "knowledge_base.json", WEIGHTS_NAME]
    config = json.loads((folder / "config.json").read_text())
    assert config["metadata"]["epochs"] == 3 and config["model"]["backbone"] == small_config.backbone
    files = read_checkpoint(folder)
    assert set(files.state_dict) == set(model.model.trainable_state_dict())
    assert not any(k.startswith("clip.") for k in files.state_dict)  # trainable weights only
    loaded = KAnoCLIP.from_pretrained(folder, device="cpu")
    assert loaded.mode == "trained" and loaded.knowledge.counts() == kb.counts()
    a, b = model.detect(str(bottle_image), "bottle"), loaded.detect(str(bottle_image), "bottle")
    assert a.score == pytest.approx(b.score, abs=1e-6)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5)


def test_hub_id_checkpoint_loads_from_the_cache_offline(small_config, monkeypatch, tmp_path):
    from conftest import put_in_hub_cache

    model = fresh_model(small_config, seed=2, trained=True)
    cache = put_in_hub_cache(model.save_pretrained(tmp_path / "ck"), "someone/kanoclip-test", tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = KAnoCLIP.from_pretrained(
        "someone/kanoclip-test", backbone=small_config.backbone, device="cpu", cache_dir=str(cache)
    )
    assert loaded.mode == "trained"
    assert loaded.checkpoint_name == "someone/kanoclip-test"
    for name, tensor in model.model.trainable_state_dict().items():
        assert torch.equal(tensor, loaded.model.trainable_state_dict()[name]), name


@pytest.mark.parametrize("offline", ["1", "0"])
def test_uncached_hub_id_checkpoint_fails_fast_with_the_fix(offline, monkeypatch, tmp_path):
    """Like the backbone: no waiting out the hub client's retries on an offline machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint("someone/not-cached", cache_dir=tmp_path)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "someone/not-cached" in message and "hf download" in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl"])
def test_pickles_are_refused(suffix, tmp_path):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        KAnoCLIP.from_pretrained(path, device="cpu")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / f"pytorch_model{suffix}").write_bytes(b"\x80\x04")
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pickle"):
        KAnoCLIP.from_pretrained(folder, device="cpu")


def test_nan_weights_and_wrong_shapes_are_detected(small_config, tmp_path):
    from safetensors.torch import load_file, save_file

    model = fresh_model(small_config, trained=True)
    folder = model.save_pretrained(tmp_path / "ck")
    state = load_file(folder / WEIGHTS_NAME)
    key = next(iter(state))
    state[key][..., 0] = float("nan")
    save_file(state, folder / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        KAnoCLIP.from_pretrained(folder, device="cpu")

    other = KAnoCLIPConfig(backbone=small_config.backbone, bicmci=BiCMCIConfig(dim=16, num_heads=2))
    wrong = fresh_model(other, trained=True).save_pretrained(tmp_path / "wrong")
    with pytest.raises(CheckpointError, match="does not fit"):
        fresh_model(small_config, trained=True).load_trainable_state_dict(read_checkpoint(wrong).state_dict)
    with pytest.raises(InputError, match="need a trained-mode model"):  # the mode is never switched from outside
        fresh_model(small_config).load_trainable_state_dict(read_checkpoint(wrong).state_dict)


def _painted(images_dir, size: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for path in sorted(images_dir.glob("*.png"))[:n]:
        array = np.asarray(Image.open(path).convert("RGB").resize((size, size))).copy()
        mask = np.zeros((size, size), np.float32)
        y, x = rng.integers(8, size - 32, 2)
        array[y : y + 22, x : x + 22] = (255, 0, 0)  # a painted defect
        mask[y : y + 22, x : x + 22] = 1.0
        images.append(Image.fromarray(array))
        masks.append(mask)
    return images, torch.tensor(np.stack(masks))


def test_short_training_overfits_painted_defects(small_config, bottle_dir):
    """Gradients reach every trainable part: a few steps learn to segment painted squares.

    (Plumbing on a random backbone: it shows the training signal flows, not accuracy.)
    """
    model = fresh_model(small_config, trained=True)
    images, masks = _painted(bottle_dir / "test" / "good", model.image_size, n=4)
    visual = model.encode_image(preprocess(images, model.image_size, model.image_mean, model.image_std))
    model.train()
    params = [p for m in model.model.trainable_modules().values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    labels = torch.ones(4)
    start = {k: v.clone() for k, v in model.model.trainable_state_dict().items()}
    for _ in range(25):
        out = model(visual, ["bottle"] * 4)
        kd = kd_loss(model.knowledge_features(out.classes), out.prompts.abnormal, out.prompts.normal)
        terms = total_loss(
            model.config.loss,
            kd=kd,
            score=out.score,
            label=labels,
            normal=out.normal,
            abnormal=out.abnormal,
            mask=masks,
            has_mask=torch.ones(4, dtype=torch.bool),
        )
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = model(visual, ["bottle"] * 4).anomaly_map
    assert roc_auc_score(masks.flatten().numpy(), final.flatten().numpy()) > 0.9
    changed = {k for k, v in model.model.trainable_state_dict().items() if not torch.equal(v, start[k])}
    assert {k.split(".")[0] for k in changed} == {"prompt_learner", "bicmci", "adapter"}


def test_models_can_share_one_backbone(small_config, tmp_path):
    folder = fresh_model(small_config, trained=True).save_pretrained(tmp_path / "ck")
    cache: dict = {}
    free = KAnoCLIP.from_pretrained(config=small_config, device="cpu", backbone_cache=cache)
    trained = KAnoCLIP.from_pretrained(folder, device="cpu", backbone_cache=cache)
    assert len(cache) == 1
    assert trained.model.clip is free.model.clip and trained.mode == "trained" and free.mode == "training-free"


@pytest.mark.parametrize("missing", ["./checkpoints/mine", "/abs/path/to/ckpt"])
def test_from_pretrained_names_its_own_arguments(missing, tiny_backbone, tmp_path, monkeypatch):
    """From the Python API the messages say backbone= / checkpoint=, never the CLI's flags."""
    from kanoclip.errors import BackboneError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        KAnoCLIP.from_pretrained(missing, backbone=str(tiny_backbone), device="cpu")
    assert (
        "no such folder" in str(info.value)
        and "checkpoint=" in str(info.value)
        and "--checkpoint" not in str(info.value)
    )
    with pytest.raises(BackboneError) as info:
        KAnoCLIP.from_pretrained(backbone="./no-such-clip", device="cpu")
    assert "no such folder" in str(info.value) and "backbone=" in str(info.value) and "--" not in str(info.value)


def test_a_per_call_knowledge_base_serves_that_call_only(small_config, bottle_image):
    """``knowledge=`` changes one call's guidance and scores; the model's own knowledge base and results stay."""
    model = fresh_model(small_config)
    shared = model.detect(str(bottle_image), "bottle")
    own = model.knowledge.copy()
    mine = ["A bottle painted bright green all over its body.", "A bottle with a label glued upside down."]
    own.set_general("bottle", mine)
    own.set_general("gizmo", ["A gizmo with a bent antenna."])
    edited = model.detect(str(bottle_image), "bottle", knowledge=own)
    assert {g.text for g in edited.guidance if g.source == "manual"} == set(mine)
    assert edited.score != pytest.approx(shared.score, abs=1e-7)  # the descriptions join the abnormal side
    assert model.detect(str(bottle_image), "gizmo", knowledge=own).known_class  # only in the per-call copy
    assert not model.detect(str(bottle_image), "gizmo").known_class
    again = model.detect(str(bottle_image), "bottle")  # after the per-call one: nothing of it remains
    assert not {g.text for g in again.guidance} & set(mine)
    assert again.score == pytest.approx(shared.score, abs=1e-7)
    assert model.detect(str(bottle_image), "bottle", knowledge=own).score == pytest.approx(edited.score, abs=1e-7)
