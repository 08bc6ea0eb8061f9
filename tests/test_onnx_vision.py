"""The int8 engine on onnxruntime (kanoclip/onnx_vision.py): what runs where, what a detection keeps,
what is cached on disk and when it is rebuilt, many threads at once."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from threads import in_threads
from torch import nn

from kanoclip import KAnoCLIP
from kanoclip.config import BiCMCIConfig, KAnoCLIPConfig, VVConfig
from kanoclip.modeling.vv_attention import CLIPVV
from kanoclip.references import References

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kanoclip.onnx_vision import OnnxInt8Tower  # noqa: E402  (after the skip: it needs onnxruntime)


@pytest.fixture(scope="module")
def config(tiny_backbone) -> KAnoCLIPConfig:
    return KAnoCLIPConfig(backbone=str(tiny_backbone), bicmci=BiCMCIConfig(dim=32, num_heads=2))


@pytest.fixture(scope="module")
def models(config) -> tuple[KAnoCLIP, KAnoCLIP]:
    """(fp32, int8 on onnxruntime), training-free, on one backbone cache."""
    cache: dict = {}
    fp32 = KAnoCLIP.from_pretrained(config=config, device="cpu", precision="fp32", backbone_cache=cache)
    int8 = KAnoCLIP.from_pretrained(
        config=config, device="cpu", precision="int8", int8_engine="onnxruntime", backbone_cache=cache
    )
    return fp32, int8


def graph_file(model: KAnoCLIP):
    engine = model.model.tower_engine
    visual = model.model.visual
    return engine.prepare(visual, model.image_size, [model.model.num_replaced_blocks()], model.model.image_token)


def test_the_tower_runs_in_an_int8_graph_and_the_torch_backbone_stays_fp32(models, bottle_image, monkeypatch):
    fp32, int8 = models
    assert int8.engine == "onnxruntime" and int8.precision == "int8" and fp32.engine == "torch"
    assert int8.model.clip is fp32.model.clip  # no quantised torch copy: the fp32 backbone is shared
    assert all(type(m) is not nn.Linear or m.weight.dtype == torch.float32 for m in int8.model.clip.modules())
    graph = onnx.load(str(graph_file(int8)))
    ops = [node.op_type for node in graph.graph.node]
    int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    # 8 blocks x (q, k, v, out, fc1, fc2) plus the 6-block V-V path's out_proj, each an int8 product
    assert ops.count("MatMulInteger") == 8 * 6 + 6
    assert len(int8_weights) >= 8 * 6  # (the V-V path's out_proj may share its block's weight)
    assert "Conv" in ops  # the patch embedding stays a float convolution
    # torch's vision encoder is not run at all: the detection comes from the graph
    monkeypatch.setattr(
        int8.model.clip.vision_model.encoder, "forward", lambda *a, **k: pytest.fail("torch's encoder ran")
    )
    det = int8.detect(Image.open(bottle_image).convert("RGB"), "bottle")
    assert 0.0 <= det.score <= 1.0 and det.anomaly_map.shape == (900, 900)


def test_a_detection_keeps_guidance_stage_maps_references_and_thresholds(models, bottle_image, good_bottle_paths):
    fp32, int8 = models
    image = Image.open(bottle_image).convert("RGB")
    ours, theirs = int8.detect(image, "bottle"), fp32.detect(image, "bottle")
    # the same prompts guide it (their ranking follows the int8 features' similarities)
    assert sorted(g.text for g in ours.guidance) == sorted(g.text for g in theirs.guidance) and ours.guidance
    assert all(-1.0 <= g.image_similarity <= 1.0 for g in ours.guidance)
    assert len(ours.stage_maps) == len(theirs.stage_maps) == len(int8.model.visual.stage_layers)
    assert ours.normal_map.shape == ours.abnormal_map.shape == (900, 900)
    assert not np.array_equal(ours.anomaly_map, theirs.anomaly_map)  # int8 really ran
    store = References(int8.reference_fingerprint())
    refs = int8.add_references("bottle", good_bottle_paths[:3], store=store)
    assert refs.count == 3 and refs.calibrated  # k >= 2: a leave-one-out threshold from the int8 features
    with_refs = int8.detect(image, "bottle", references=store)
    assert with_refs.reference_count == 3 and with_refs.reference_map is not None
    assert with_refs.threshold == pytest.approx(refs.threshold)
    # references record the engine: those built on torch's fp32 do not serve this model
    assert int8.reference_fingerprint()["precision"] == "int8 (onnxruntime)"


def test_threads_sharing_the_engine_each_get_their_own_result(models, bottle_images):
    _, int8 = models
    alone = [int8.detect(image, "bottle") for image in bottle_images[:4]]
    together = in_threads([lambda image=image: int8.detect(image, "bottle") for image in bottle_images[:4]] * 3, 4)
    for k, got in enumerate(together):
        expected = alone[k % 4]
        assert abs(got.score - expected.score) <= 1e-6
        assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= 1e-5


def test_a_graph_is_built_once_found_on_disk_and_rebuilt_when_what_it_depends_on_changes(
    tiny_backbone, tmp_path, monkeypatch, caplog
):
    from kanoclip.backbone import load_backbone

    monkeypatch.setenv("KANOCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KANOCLIP_INT8_GRAPHS", "1")
    clip = load_backbone(str(tiny_backbone), device="cpu").model
    visual = CLIPVV(clip, VVConfig())
    caplog.set_level(logging.WARNING, logger="kanoclip")
    first = OnnxInt8Tower(clip).prepare(visual, 112, [6], "original")
    assert first.is_file() and first.parent == tmp_path / "int8-onnx"
    assert first.with_suffix(".json").is_file()  # what it depends on, for whoever looks in the folder
    assert sum("building the vision tower's int8 graph" in r.message for r in caplog.records) == 1
    caplog.clear()
    again = OnnxInt8Tower(clip).prepare(visual, 112, [6], "original")  # a new process would do the same
    assert again == first and not any("building" in r.message for r in caplog.records)
    # another V-V path length, another graph; with KANOCLIP_INT8_GRAPHS=1 the older one goes
    other = OnnxInt8Tower(clip).prepare(visual, 112, [3], "original")
    assert other != first and other.is_file() and not first.exists()
    # new weights (here: changed in place): another digest, another graph
    engine = OnnxInt8Tower(clip)
    before = engine.weights_digest()
    with torch.no_grad():
        clip.vision_model.encoder.layers[0].mlp.fc1.weight.add_(0.01)
    assert engine.weights_digest() != before
    assert engine.prepare(visual, 112, [3], "original") != other


def test_graph_folder_bound_must_be_a_whole_number(monkeypatch):
    from kanoclip.errors import KAnoCLIPError
    from kanoclip.onnx_vision import graphs_to_keep

    monkeypatch.setenv("KANOCLIP_INT8_GRAPHS", "zero")
    with pytest.raises(KAnoCLIPError, match="KANOCLIP_INT8_GRAPHS must be a whole number of at least 1, got 'zero'"):
        graphs_to_keep()


def test_the_app_header_names_the_onnxruntime_engine_and_why(models):
    from demo.state import describe_model

    header = describe_model(models[1])
    assert "backbone int8 on onnxruntime int8 (MLAS) (chosen with --precision int8; engine onnxruntime: " in header
    assert "chosen with int8_engine onnxruntime" in header
