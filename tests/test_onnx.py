"""ONNX export (kanoclip.onnx, ``kanoclip export``): onnxruntime against the torch model.

Figures from the tiny random backbone are plumbing: the tests check that the exported graph
computes what the torch model computes, in both modes, not how well either detects.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kanoclip import KAnoCLIP
from kanoclip.cli import main
from kanoclip.errors import CheckpointError, InputError, KAnoCLIPError
from kanoclip.images import load_image
from kanoclip.onnx import OnnxDetector, export_onnx, sidecar_path

TOL = 1e-4
CLASSES = ["bottle", "magnetic tile"]


@pytest.fixture(scope="module")
def trained_model(tiny_backbone: Path) -> KAnoCLIP:
    torch.manual_seed(0)
    return KAnoCLIP.for_training(str(tiny_backbone), device="cpu").eval()


@pytest.fixture(scope="module", params=["training-free", "trained"])
def exported(request, tiny_model: KAnoCLIP, trained_model: KAnoCLIP, tmp_path_factory) -> tuple[KAnoCLIP, Path]:
    """(the torch model, its export for CLASSES), in each mode."""
    model = tiny_model if request.param == "training-free" else trained_model
    assert model.mode == request.param
    path = export_onnx(model, CLASSES, tmp_path_factory.mktemp("export") / "model.onnx")
    return model, path


@pytest.fixture(scope="module")
def two_images(shared_data: Path) -> list[Path]:
    """A 900x900 RGB bottle and a 606x240 greyscale magnetic tile (real, of different sizes and modes)."""
    tile = next((shared_data / "mtd" / "MT_Fray" / "Imgs").glob("*.jpg"))
    return [shared_data / "mvtec_ad" / "bottle" / "test" / "broken_large" / "000.png", tile]


def test_graph_outputs_equal_the_torch_models(exported, two_images):
    model, path = exported
    import onnxruntime as ort

    pils = [load_image(p) for p in two_images]
    classes = [model.canonical_class(c)[0] for c in CLASSES]
    out, _ = model.infer(pils, classes)
    pixels = model.pixel_values(pils).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    anomaly_map, score = session.run(None, {"pixel_values": pixels, "class_index": np.array([0, 1], dtype=np.int64)})
    assert anomaly_map.shape == (2, model.image_size, model.image_size) and score.shape == (2,)
    np.testing.assert_allclose(anomaly_map, out.anomaly_map.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(score, out.score.numpy(), atol=TOL, rtol=0)
    # the class index picks the class's baked-in text: swapping it changes the score as torch does
    swapped, _ = model.infer(pils, classes[::-1])
    _, score_swapped = session.run(None, {"pixel_values": pixels, "class_index": np.array([1, 0], dtype=np.int64)})
    np.testing.assert_allclose(score_swapped, swapped.score.numpy(), atol=TOL, rtol=0)


def test_sidecar_describes_the_export(exported):
    model, path = exported
    meta = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path) == path.with_name("model.onnx.json")
    assert meta["format"] == "kanoclip-onnx" and meta["version"] == 1
    assert meta["classes"] == [model.canonical_class(c)[0] for c in CLASSES]
    assert meta["mode"] == model.mode and meta["backbone"] == model.backbone_name
    assert meta["image_size"] == 112  # the tiny backbone's native size
    assert meta["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's
    assert meta["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert meta["threshold"] == {name: 0.5 for name in meta["classes"]}


def test_detect_equals_the_torch_detect(exported, bottle_image):
    model, path = exported
    onnx_detector = OnnxDetector(path)
    expected = model.detect(bottle_image, "bottle")
    got = onnx_detector.detect(bottle_image, "bottle")
    assert got.anomaly_map.shape == (900, 900) == expected.anomaly_map.shape
    assert got.score == pytest.approx(expected.score, abs=TOL)
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, atol=TOL, rtol=0)
    assert (got.class_name, got.known_class, got.mode, got.threshold) == (
        expected.class_name,
        expected.known_class,
        expected.mode,
        0.5,
    )
    assert got.guidance == [] and got.image == str(bottle_image)


def test_detect_batch_takes_a_class_per_image(exported, two_images):
    model, path = exported
    images = [*two_images, two_images[0]]  # a batch of 3: the batch axis is not fixed to the example's 2
    names = ["Bottle", "Magnetic_Tile", "magnetic tile"]
    expected = model.detect_batch(images, names)
    got = OnnxDetector(path).detect_batch(images, names, threshold=0.25)
    for g, e in zip(got, expected):
        assert g.class_name == e.class_name and g.anomaly_map.shape == e.anomaly_map.shape
        assert g.score == pytest.approx(e.score, abs=TOL) and g.threshold == 0.25
        np.testing.assert_allclose(g.anomaly_map, e.anomaly_map, atol=TOL, rtol=0)
    assert got[0].score != pytest.approx(got[2].score, abs=1e-6)  # same image, other class


def test_unknown_class_lists_the_exported_ones(exported, bottle_image):
    _, path = exported
    with pytest.raises(InputError) as info:
        OnnxDetector(path).detect(bottle_image, "screw")
    message = str(info.value)
    assert "'screw'" in message and "bottle" in message and "\n" not in message


def test_cli_export_of_a_checkpoint(tmp_path, tiny_backbone, trained_model, bottle_image, capsys):
    checkpoint = trained_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "deploy" / "model.onnx"
    code = main([
        "export", "--class", "Bottle", "--class", "bottle", "--format", "onnx", "--out", str(out),
        "--checkpoint", str(checkpoint), "--backbone", str(tiny_backbone), "--device", "cpu",
        "--set", "scoring.threshold=0.3",
    ])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.split() == [str(out), str(sidecar_path(out))]
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["classes"] == ["bottle"]  # both names are the same class
    assert meta["mode"] == "trained" and meta["threshold"] == {"bottle": 0.3}
    loaded = KAnoCLIP.from_pretrained(checkpoint, backbone=str(tiny_backbone), device="cpu")
    expected = loaded.detect(bottle_image, "bottle")
    got = OnnxDetector(out).detect(bottle_image, "bottle")
    assert got.score == pytest.approx(expected.score, abs=TOL) and got.threshold == 0.3
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, atol=TOL, rtol=0)


def test_cli_refuses_a_reduced_precision(capsys, tmp_path):
    code = main(["export", "--class", "bottle", "--out", str(tmp_path / "m.onnx"), "--precision", "bf16"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--precision bf16" in err and "fp32" in err
    assert not (tmp_path / "m.onnx").exists()


def _foreign_onnx(path: Path) -> Path:
    """A valid ONNX graph that is not a kanoclip export: y = x."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), path)
    return path


def test_files_that_are_not_an_export_get_one_line(tmp_path, exported):
    _, good = exported
    sidecar = sidecar_path(good).read_text()
    foreign = _foreign_onnx(tmp_path / "foreign.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("not a graph")
    cases = {"no such ONNX file": tmp_path / "missing.onnx", "sidecar foreign.onnx.json is missing": foreign}
    for reason, path in cases.items():
        with pytest.raises(CheckpointError, match=reason):
            OnnxDetector(path)
    sidecar_path(text).write_text(sidecar)  # a right sidecar beside a text file
    with pytest.raises(CheckpointError, match="onnxruntime cannot load it"):
        OnnxDetector(text)
    sidecar_path(foreign).write_text(sidecar)  # a right sidecar beside another graph
    with pytest.raises(CheckpointError, match=r"inputs \['x'\]"):
        OnnxDetector(foreign)
    sidecar_path(foreign).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a kanoclip export sidecar") as info:
        OnnxDetector(foreign)
    assert "\n" not in str(info.value)


def test_without_onnxruntime_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(KAnoCLIPError, match=r"onnxruntime.*kanoclip\[onnx\]"):
        OnnxDetector(tmp_path / "model.onnx")


def test_a_bf16_model_is_exported_in_fp32(tiny_backbone, tiny_model, tmp_path):
    """Certain by construction on every CPU: no tensor of the graph is bf16 (a bf16 export would
    hold bf16 casts or weights), and the graph's map and score are the fp32 model's. (Whether the
    torch bf16 model's score differs from fp32's depends on the CPU's bf16 rounding: 7.5e-5 apart
    on an AVX2 EPYC, so that cannot be the premise.)"""
    onnx = pytest.importorskip("onnx")
    bf16 = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu", precision="bf16")
    path = export_onnx(bf16, ["bottle"], tmp_path / "m.onnx")
    assert bf16.precision == "bf16"  # the model's own setting is left as it was
    graph = onnx.load(str(path)).graph
    bf16_type = onnx.TensorProto.BFLOAT16
    weights = [t.data_type for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, bf16_type)]
    assert weights and bf16_type not in weights
    assert not [n.name for n in graph.node for a in n.attribute if a.name == "to" and a.i == bf16_type]
    typed = [*graph.input, *graph.output, *graph.value_info]
    assert not [v.name for v in typed if v.type.tensor_type.elem_type == bf16_type]
    image = Image.new("RGB", (112, 112), (120, 60, 30))
    expected, got = tiny_model.detect(image, "bottle"), OnnxDetector(path).detect(image, "bottle")
    assert got.score == pytest.approx(expected.score, abs=TOL)
    np.testing.assert_allclose(got.anomaly_map, expected.anomaly_map, atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["training-free", "trained"])
def test_an_export_with_references_equals_the_torch_model_with_them(
    mode, tiny_backbone, bottle_dir, two_images, tmp_path
):
    """References of one of two classes, baked in: the referenced class's maps and scores are
    fused as the torch model fuses them (1e-4), the other class's are the model's own, and the
    sidecar carries the references' calibrated threshold."""
    torch.manual_seed(0)
    build = KAnoCLIP.from_pretrained if mode == "training-free" else KAnoCLIP.for_training
    model = build(backbone=str(tiny_backbone), device="cpu").eval()
    good = sorted((bottle_dir / "test" / "good").glob("*.png"))[:3]
    refs = model.add_references("bottle", [str(p) for p in good])
    path = export_onnx(model, CLASSES, tmp_path / "refs.onnx")
    detector = OnnxDetector(path)
    images = [two_images[0], two_images[1], two_images[0]]
    names = ["bottle", "magnetic tile", "magnetic tile"]
    got = detector.detect_batch([str(p) for p in images], names)
    want = model.detect_batch([str(p) for p in images], names)
    for g, w in zip(got, want):
        assert g.score == pytest.approx(w.score, abs=TOL) and g.reference_count == w.reference_count
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, atol=TOL, rtol=0)
    assert [g.reference_count for g in got] == [3, 0, 0]
    assert got[1].threshold == model.config.scoring.threshold
    # the sidecar's threshold is the fp32 leave-one-out one: the same images added to a fresh fp32 model
    torch.manual_seed(0)
    fresh = build(backbone=str(tiny_backbone), device="cpu", precision="fp32").eval()
    expected = fresh.add_references("bottle", [str(p) for p in good]).threshold
    assert got[0].threshold == pytest.approx(expected, abs=1e-6) and refs.threshold == pytest.approx(expected, abs=1e-6)


def test_each_image_is_matched_only_against_its_own_classs_bank(tiny_backbone, bottle_dir, two_images, tmp_path):
    """Two classes with references of different counts: each image's map is its own class's only."""
    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    good = sorted((bottle_dir / "test" / "good").glob("*.png"))
    model.add_references("bottle", [str(p) for p in good[:3]])
    model.add_references("magnetic tile", [str(two_images[1])])  # the tile itself: its own map is ~0
    detector = OnnxDetector(export_onnx(model, CLASSES, tmp_path / "two.onnx"))
    images, names = [str(two_images[1]), str(two_images[1])], ["magnetic tile", "bottle"]
    got, want = detector.detect_batch(images, names), model.detect_batch(images, names)
    for g, w in zip(got, want):
        assert g.score == pytest.approx(w.score, abs=TOL) and g.reference_count == w.reference_count
    assert want[0].reference_map.max() <= 1e-3 < want[1].reference_map.max()  # bottle rows never matched the tile
    assert got[0].score < got[1].score


def test_aliases_are_accepted_and_int8_is_refused(tiny_backbone, exported, bottle_image):
    model, path = exported
    detector = OnnxDetector(path)
    assert detector.class_index("Magnetic-Tile") == detector.class_index("magnetic_tile") == 1
    # catalogue aliases, as the knowledge base resolves them for the torch model
    assert model.canonical_class("magnetic tiles")[0] == model.canonical_class("MTD")[0] == "magnetic_tile"
    assert detector.detect(bottle_image, "magnetic tiles").class_name == detector.classes[1]
    assert detector.class_index("MTD") == 1
    int8 = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu", precision="int8")
    with pytest.raises(InputError, match="an int8 model cannot be exported.*precision='fp32'"):
        export_onnx(int8, ["bottle"], path.parent / "int8.onnx")


def test_reference_tables_of_cuda_banks_stay_on_cuda():
    """``kanoclip export --references`` on a GPU: the class tags sit beside the banks, so the graph's
    reference term mixes no devices (on fake CUDA, which raises on any op that mixes them)."""
    import types

    from fake_cuda import fake_cuda

    from kanoclip.modeling.vv_attention import VisualFeatures
    from kanoclip.onnx import ReferenceTables
    from kanoclip.references import ReferenceSet

    model = types.SimpleNamespace(stage_weight_values=lambda: [0.5, 0.5], image_size=16)
    with fake_cuda() as (_, calls):
        bank = [torch.randn(8, 16, device="cuda").half() for _ in range(2)]  # 2 images of a 2x2 grid
        tables = ReferenceTables([ReferenceSet("bottle", bank, None, ["a", "b"], grid=(2, 2)), None], 0.5, 4, 1.0)
        assert {b.device.type for b in tables.buffers()} == {"cuda"}
        visual = VisualFeatures(torch.randn(2, 16, device="cuda"), [torch.randn(2, 4, 16, device="cuda")] * 2, (2, 2))
        index = torch.tensor([0, 1], device="cuda")
        fused_map, fused_score = tables(
            model, visual, index, torch.rand(2, 16, 16, device="cuda"), torch.rand(2, device="cuda")
        )
        assert (fused_map.device.type, fused_score.device.type) == ("cuda", "cuda")
        assert fused_map.shape == (2, 16, 16) and fused_score.shape == (2,)
    assert calls.syncs == []  # the graph's term never waits for the device
