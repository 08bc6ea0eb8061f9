"""Bi-CMCI (eq. 9), the Conv-Adapter (eq. 11) and the map/score functions (eq. 10, 12)."""

from __future__ import annotations

import torch

from kanoclip.adapter import ConvAdapter
from kanoclip.bicmci import BiCMCI, DeformableSelfAttention
from kanoclip.config import AdapterConfig, BiCMCIConfig
from kanoclip.maps import combine_maps, gaussian_blur, global_score, similarity_probabilities


def test_bicmci_shapes_and_probabilities():
    torch.manual_seed(0)
    module = BiCMCI(feature_dim=32, num_stages=4, config=BiCMCIConfig(dim=16, num_heads=2), temperature=0.07)
    stages = [torch.randn(3, 64, 32) for _ in range(4)]
    text = torch.randn(3, 2, 32)
    out = module(stages, text, (8, 8))
    assert len(out) == 4
    for probs in out:
        assert probs.shape == (3, 2, 64)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(3, 64))


def test_bicmci_uses_both_modalities():
    torch.manual_seed(0)
    module = BiCMCI(32, 1, BiCMCIConfig(dim=16, num_heads=2), 0.07)
    patches, text = torch.randn(1, 64, 32), torch.randn(1, 2, 32)
    base = module([patches], text, (8, 8))[0]
    assert not torch.allclose(base, module([patches], torch.randn(1, 2, 32), (8, 8))[0])
    assert not torch.allclose(base, module([torch.randn(1, 64, 32)], text, (8, 8))[0])


def test_deformable_offsets_come_from_the_features():
    torch.manual_seed(0)
    attn = DeformableSelfAttention(dim=8, num_heads=2, stride=2, kernel=3, offset_range=2.0)
    q1, q2 = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 8)
    g1, g2 = attn.sampling_grid(q1), attn.sampling_grid(q2)
    assert g1.shape == (1, 4, 4, 2)
    assert g1.abs().max() <= 1.0
    assert not torch.allclose(g1, g2)
    # with a zero offset network the grid is the regular reference grid
    for p in attn.offset_net.parameters():
        torch.nn.init.zeros_(p)
    g0 = attn.sampling_grid(q1)
    torch.testing.assert_close(g0[0, 0, 0], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(g0[0, -1, -1], torch.tensor([1.0, 1.0]))
    out = attn(torch.randn(2, 64, 8), (8, 8))
    assert out.shape == (2, 64, 8)


def test_adapter_is_eq_11_at_ratio_1():
    torch.manual_seed(0)
    adapter = ConvAdapter(16, AdapterConfig(bottleneck=4, ratio=1.0))
    x = torch.randn(5, 16)
    expected = adapter.up(torch.relu(adapter.down(torch.nn.functional.layer_norm(x, (16,), adapter.norm.weight, adapter.norm.bias))))
    torch.testing.assert_close(adapter(x), expected)
    assert adapter.down.out_features == 4


def test_adapter_ratio_mixes_in_the_input():
    torch.manual_seed(0)
    adapter = ConvAdapter(16, AdapterConfig(ratio=0.2))
    assert adapter.down.out_features == 4  # default bottleneck: dim // 4
    x = torch.randn(2, 16)
    full = ConvAdapter(16, AdapterConfig(ratio=1.0))
    full.load_state_dict(adapter.state_dict())
    torch.testing.assert_close(adapter(x), 0.2 * full(x) + 0.8 * x)


def test_similarity_probabilities_prefer_the_closer_text():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normal along x, abnormal along y
    patches = torch.tensor([[[1.0, 0.1], [0.1, 1.0]]])
    probs = similarity_probabilities(patches, text, temperature=0.07)
    assert probs.shape == (1, 2, 2)
    assert probs[0, 0, 0] > 0.99 and probs[0, 1, 1] > 0.99


def test_combine_maps_is_eq_10():
    normal = torch.rand(2, 20, 20)
    abnormal = torch.rand(2, 20, 20)
    torch.testing.assert_close(combine_maps(normal, abnormal, sigma=0), (abnormal + 1 - normal) / 2)
    smoothed = combine_maps(normal, abnormal, sigma=2)
    assert smoothed.shape == (2, 20, 20)
    assert smoothed.std() < ((abnormal + 1 - normal) / 2).std()


def test_gaussian_blur_preserves_constants_and_mass_center():
    const = torch.full((1, 30, 30), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 3.0), const)
    spike = torch.zeros(1, 31, 31)
    spike[0, 15, 15] = 1.0
    blurred = gaussian_blur(spike, 2.0)
    assert blurred[0].argmax() == 15 * 31 + 15
    assert abs(float(blurred.sum()) - 1.0) < 1e-4


def test_global_score_is_eq_12_halved():
    feature = torch.tensor([[0.0, 1.0]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    amap = torch.zeros(1, 4, 4)
    amap[0, 1, 2] = 0.8
    p_abnormal = torch.softmax(torch.tensor([0.0, 1.0]) / 0.07, dim=0)[1]
    torch.testing.assert_close(global_score(feature, text, amap, 0.07), ((p_abnormal + 0.8) / 2).view(1))


def test_residual_logits_add_clips_own_logits_before_the_softmax():
    torch.manual_seed(0)
    config = BiCMCIConfig(dim=16, num_heads=2)
    module = BiCMCI(32, 2, config, temperature=0.07)
    stages = [torch.randn(2, 16, 32) for _ in range(2)]
    text = torch.randn(2, 2, 32)
    plain = module(stages, text, (4, 4))
    config.residual_logits = True  # read at forward time: the same module, switched
    residual = module(stages, text, (4, 4))
    for stage, p_plain, p_residual in zip(stages, plain, residual):
        # softmax(A + B) = softmax(A) * exp(B) / Σ, with B CLIP's cosine logits computed by hand
        clip_logits = torch.nn.functional.cosine_similarity(text[:, :, None, :], stage[:, None, :, :], dim=-1) / 0.07  # (B, 2, L)
        expected = p_plain * clip_logits.exp()
        torch.testing.assert_close(p_residual, expected / expected.sum(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain[0], residual[0])


def test_residual_logits_switch_on_a_loaded_model(tiny_backbone):
    from kanoclip import KAnoCLIP

    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")  # its own: the shared one stays as is
    torch.manual_seed(0)
    width = model.bicmci.stages[0].in_visual.in_features
    stages = [torch.randn(1, 16, width) for _ in model.bicmci.stages]
    text = torch.randn(1, 2, width)
    with torch.no_grad():
        before = model.bicmci(stages, text, (4, 4))
        model.config.bicmci.residual_logits = True
        after = model.bicmci(stages, text, (4, 4))
    assert not torch.allclose(before[0], after[0])
