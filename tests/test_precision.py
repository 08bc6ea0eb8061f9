"""Precision: the backbone may run in bf16 or int8, everything from the stage features on stays fp32.

CI has no GPU, so the reduced-precision path is run with CPU bf16 autocast, the same code a
GPU takes with CUDA autocast. int8 is CPU-only.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from kanoclip import KAnoCLIP
from kanoclip import precision as precision_module
from kanoclip.config import BiCMCIConfig, KAnoCLIPConfig
from kanoclip.errors import InputError
from kanoclip.precision import (
    CPUFeatures,
    explain_precision,
    keep_fp32_exact,
    parse_cpuinfo,
    resolve_int8_engine,
    resolve_precision,
)


@pytest.fixture(scope="module")
def config(tiny_backbone) -> KAnoCLIPConfig:
    return KAnoCLIPConfig(backbone=str(tiny_backbone), bicmci=BiCMCIConfig(dim=32, num_heads=2))


def model_at(config: KAnoCLIPConfig, precision: str, trained: bool, int8_engine: str = "auto") -> KAnoCLIP:
    torch.manual_seed(3)  # the same trainable weights for every precision
    options = dict(config=config, device="cpu", precision=precision, int8_engine=int8_engine)
    if trained:
        return KAnoCLIP.for_training(**options).eval()
    return KAnoCLIP.from_pretrained(**options)


needs_onnxruntime = pytest.mark.skipif(
    not precision_module.onnxruntime_installed(), reason="needs the [onnx] extra: pip install -e '.[onnx]'"
)
AVX2_EPYC = CPUFeatures("AMD EPYC", frozenset({"fpu", "sse2", "avx", "fma", "avx2"}), "AVX2")
AVX512_BF16 = CPUFeatures("Intel Xeon", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}), "AVX512")


@pytest.fixture
def cpu_is(monkeypatch):
    """Fake the CPU probe: ``cpu_is(features)``."""
    return lambda features: monkeypatch.setattr(precision_module, "cpu_features", lambda: features)


def test_cpuinfo_is_parsed_for_the_model_and_the_flags():
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: other\n"
    assert parse_cpuinfo(x86) == ("AMD EPYC 7B13", frozenset({"fpu", "avx2", "fma"}))
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd40\n"
    assert parse_cpuinfo(arm) == ("", frozenset({"fp", "asimd", "bf16", "i8mm"}))
    assert AVX2_EPYC.summary() == "AMD EPYC (avx2 fma; torch AVX2)"  # only the flags that decide speed, in order


def test_auto_on_a_cpu_picks_bf16_only_where_it_is_native(cpu_is):
    cpu = torch.device("cpu")
    cpu_is(AVX2_EPYC)
    assert resolve_precision("auto", cpu) == "fp32"
    assert explain_precision("auto", cpu).reason == "no native bf16 on this CPU"
    cpu_is(AVX512_BF16)
    assert resolve_precision("auto", cpu) == "bf16"
    assert explain_precision("auto", cpu).warning is None


def test_precision_names_resolve_per_device():
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("fp16", cpu) == "fp16"  # runs, with a warning where it is not native
    assert resolve_precision("int8", cpu) == "int8"
    with pytest.raises(InputError, match="precision must be one of"):
        resolve_precision("half", cpu)


def test_int8_is_refused_on_cuda_in_one_line():
    # the device is only named, never used: this runs without a GPU
    with pytest.raises(InputError, match="'int8' runs on the CPU only, this model is on cuda:0") as info:
        resolve_precision("int8", torch.device("cuda:0"))
    assert "\n" not in str(info.value)


def test_an_explicit_bf16_or_fp16_without_native_support_warns_in_one_line_at_load(config, cpu_is, caplog):
    cpu_is(AVX2_EPYC)
    with caplog.at_level(logging.WARNING, logger="kanoclip"):
        assert KAnoCLIP.from_pretrained(config=config, device="cpu").precision == "fp32"
        assert not caplog.records  # auto, fp32 here: nothing to say
        for name in ("bf16", "fp16"):
            caplog.clear()
            assert KAnoCLIP.from_pretrained(config=config, device="cpu", precision=name).precision == name
            (record,) = [r for r in caplog.records if r.name == "kanoclip"]
            line = record.getMessage()
            assert "\n" not in line and "several times slower than fp32" in line and "AMD EPYC" in line
            assert "use 'int8' for speed or 'fp32'" in line
        cpu_is(AVX512_BF16)
        caplog.clear()
        assert KAnoCLIP.from_pretrained(config=config, device="cpu", precision="bf16").precision == "bf16"
        assert not caplog.records  # native: no warning


@pytest.mark.parametrize(
    ("capability", "name", "auto", "bf16_warns"),
    [
        ((7, 5), "Tesla T4", "fp16", True),
        ((8, 0), "NVIDIA A100", "bf16", False),
        ((9, 0), "NVIDIA H100", "bf16", False),
    ],
)
def test_auto_on_cuda_picks_bf16_only_where_it_is_native(monkeypatch, capability, name, auto, bf16_warns):
    # the device is only named and its queries patched: this runs without a GPU
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # a T4 emulates it
    cuda = torch.device("cuda:0")
    assert resolve_precision("auto", cuda) == auto
    choice = explain_precision("bf16", cuda)
    assert choice.resolved == "bf16" and (choice.warning is not None) == bf16_warns
    if bf16_warns:
        assert "Tesla T4 (compute capability 7.5)" in choice.warning and "use precision 'fp16'" in choice.warning


def test_tf32_is_turned_off_once_per_process_from_any_number_of_threads(monkeypatch):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(precision_module, "_fp32_kept", False)
    monkeypatch.delenv(precision_module.TF32_ENV, raising=False)
    try:
        torch.backends.cudnn.allow_tf32 = True
        monkeypatch.setenv(precision_module.TF32_ENV, "1")
        assert keep_fp32_exact() is False and torch.backends.cudnn.allow_tf32  # the user's opt-out
        monkeypatch.delenv(precision_module.TF32_ENV)
        results: list[bool] = []
        threads = [threading.Thread(target=lambda: results.append(keep_fp32_exact())) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [False] * 7 + [True]
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize("trained", [False, True])
def test_bf16_backbone_keeps_the_maps_resolution_and_values(config, bottle_image, trained):
    """An image already at the model's input size, so no upsampling hides a quantised map: under
    bf16 the map keeps at least half the distinct values of fp32's (fp32 maps from bf16
    arithmetic fell to ~635 of ~12,500 in training-free mode and 14 in trained mode), and maps
    and scores stay within 0.05 of fp32's, at the input size and at 900x900."""
    fp32, bf16 = model_at(config, "fp32", trained), model_at(config, "bf16", trained)
    full = Image.open(bottle_image).convert("RGB")
    small = full.resize((fp32.image_size, fp32.image_size), Image.BICUBIC)
    for image in (small, full):
        a, b = fp32.detect(image, "bottle"), bf16.detect(image, "bottle")
        assert b.anomaly_map.shape == (image.height, image.width)
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 0.05
        assert abs(a.score - b.score) <= 0.05
        if image is small:
            assert len(np.unique(b.anomaly_map)) >= len(np.unique(a.anomaly_map)) / 2


@pytest.mark.parametrize("trained", [False, True])
def test_forward_outputs_are_fp32_under_any_autocast(config, bottle_image, trained):
    model = model_at(config, "bf16", trained)
    pixels = model.pixel_values([Image.open(bottle_image).convert("RGB")] * 2)
    visual = model.encode_image(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(visual, ["bottle", "screw"])
    for name in ("score", "anomaly_map", "normal", "abnormal", "stage_maps", "grid_maps", "text", "global_feature"):
        assert getattr(out, name).dtype == torch.float32, name


def test_a_training_step_under_bf16_autocast_has_finite_losses_and_fp32_gradients(config, bottle_image):
    model = model_at(config, "bf16", trained=True)
    model.train()
    pixels = model.pixel_values([Image.open(bottle_image).convert("RGB")] * 2)
    visual = model.encode_image(pixels)
    mask = torch.zeros(2, model.image_size, model.image_size)
    mask[0, 30:60, 30:60] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(visual, ["bottle", "bottle"])
        # as the trainer does: the losses run in their own fp32 region (on CUDA autocast refuses BCE)
        terms = model.model.losses(
            out,
            model.knowledge_features(out.classes),
            label=torch.tensor([1, 0]),
            mask=mask,
            has_mask=torch.tensor([True, True]),
        )
    assert all(torch.isfinite(t) for t in terms.values())
    terms["total"].backward()
    for name, module in model.model.trainable_modules().items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), (
            name
        )


def vision_modules(model: KAnoCLIP, kind: type) -> list[nn.Module]:
    return [m for m in model.model.clip.vision_model.modules() if type(m) is kind]


def test_an_int8_model_quantises_a_copy_and_leaves_the_shared_fp32_backbone_alone(config, bottle_image):
    cache: dict = {}
    image = Image.open(bottle_image).convert("RGB")
    fp32 = KAnoCLIP.from_pretrained(config=config, device="cpu", backbone_cache=cache)
    before = fp32.detect(image, "bottle").anomaly_map
    int8 = KAnoCLIP.from_pretrained(
        config=config, device="cpu", precision="int8", int8_engine="torch", backbone_cache=cache
    )
    again = KAnoCLIP.from_pretrained(
        config=config, device="cpu", precision="int8", int8_engine="torch", backbone_cache=cache
    )
    assert int8.precision == "int8" and fp32.precision == "fp32"
    # 8 blocks x (q, k, v, out, fc1, fc2) in the tiny backbone's vision tower
    quantized = vision_modules(int8, DynamicQuantizedLinear)
    assert len(quantized) == len(vision_modules(fp32, nn.Linear)) == 8 * 6
    assert not vision_modules(int8, nn.Linear) and not vision_modules(fp32, DynamicQuantizedLinear)
    assert all(m.weight().dtype == torch.qint8 for m in quantized)
    assert type(int8.model.clip.visual_projection) is nn.Linear  # the stage features' projection stays fp32
    assert int8.model.clip.text_model is fp32.model.clip.text_model  # the fp32 text tower is shared, not copied
    assert again.model.clip is int8.model.clip  # the quantised copy is cached too
    np.testing.assert_array_equal(fp32.detect(image, "bottle").anomaly_map, before)


@pytest.mark.parametrize("int8_engine", ["torch", pytest.param("onnxruntime", marks=needs_onnxruntime)])
@pytest.mark.parametrize("trained", [False, True])
def test_int8_backbone_maps_follow_fp32_maps(config, bottle_image, trained, int8_engine):
    """Pearson r >= 0.98 between the int8 and fp32 maps of a real image, through the V-V path's
    quantised ``v_proj`` and ``out_proj``, on either engine; the maps differ (the layers really ran in
    int8) and stay fp32. (r was 0.99997 and 0.999999 on torch, 0.9996 on onnxruntime, when written.)"""
    fp32, int8 = model_at(config, "fp32", trained), model_at(config, "int8", trained, int8_engine)
    assert int8.engine == int8_engine
    image = Image.open(bottle_image).convert("RGB")
    a, b = fp32.detect(image, "bottle").anomaly_map, int8.detect(image, "bottle").anomaly_map
    assert b.dtype == np.float32 and b.shape == a.shape
    assert not np.array_equal(a, b)
    x, y = a.ravel().astype(np.float64) - a.mean(), b.ravel().astype(np.float64) - b.mean()
    r = (x @ y) / np.sqrt((x @ x) * (y @ y))
    assert r >= 0.98, r


def test_the_app_header_says_which_precision_and_engine_run_and_why(config, cpu_is):
    from demo.state import describe_model

    cpu_is(AVX2_EPYC)
    auto = describe_model(KAnoCLIP.from_pretrained(config=config, device="cpu"))
    assert "backbone fp32 on torch (auto: no native bf16 on this CPU; AMD EPYC (avx2 fma; torch AVX2))" in auto
    assert "several times slower" not in auto  # (the random backbone has its own ⚠️ paragraph)
    int8 = describe_model(KAnoCLIP.from_pretrained(config=config, device="cpu", precision="int8", int8_engine="torch"))
    assert "backbone int8 on torch dynamic int8" in int8
    assert "chosen with --precision int8; engine torch: chosen with int8_engine torch" in int8
    bf16 = describe_model(KAnoCLIP.from_pretrained(config=config, device="cpu", precision="bf16"))
    assert "chosen with --precision bf16" in bf16
    assert "\n\n⚠️ precision 'bf16' on this CPU (AMD EPYC (avx2 fma; torch AVX2)): no native bf16" in bf16


def test_auto_runs_int8_on_onnxruntime_only_on_an_avx2_cpu_without_vnni_where_it_is_installed(cpu_is, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision_module, "onnxruntime_installed", lambda: True)
    cpu_is(AVX2_EPYC)
    choice = explain_precision("int8", cpu)
    assert (choice.int8_engine, choice.engine) == ("onnxruntime", "onnxruntime int8 (MLAS)")
    assert "no VNNI on this CPU" in choice.engine_reason and choice.warning is None
    cpu_is(AVX512_BF16)  # it has avx512_vnni
    assert explain_precision("int8", cpu).int8_engine == "torch"
    cpu_is(CPUFeatures("Graviton", frozenset({"asimd", "bf16"}), "DEFAULT"))  # neither engine measured: torch
    assert resolve_int8_engine("auto") == ("torch", "neither engine was measured on this CPU")
    assert explain_precision("int8", cpu, "onnxruntime").int8_engine == "onnxruntime"  # named: whatever the CPU
    assert explain_precision("fp32", cpu, "onnxruntime").int8_engine is None  # only int8 has an engine


def test_without_onnxruntime_int8_runs_on_torch_and_says_what_to_install_in_one_line(cpu_is, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision_module, "onnxruntime_installed", lambda: False)
    cpu_is(AVX2_EPYC)
    choice = explain_precision("int8", cpu)
    assert choice.int8_engine == "torch"
    assert "\n" not in choice.warning and "pip install 'kanoclip[onnx]'" in choice.warning
    with pytest.raises(InputError, match=r"int8_engine 'onnxruntime' needs onnxruntime.*kanoclip\[onnx\]'"):
        explain_precision("int8", cpu, "onnxruntime")
    with pytest.raises(InputError, match="int8_engine must be one of auto, torch, onnxruntime, got 'tensorrt'"):
        explain_precision("fp32", cpu, "tensorrt")  # refused whatever the precision
