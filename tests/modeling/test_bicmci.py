"""Bi-CMCI (eq. 9): shapes, both modalities, deformable offsets, the CLIP-logits residual."""

from __future__ import annotations

import torch

from kanoclip.config import BiCMCIConfig
from kanoclip.modeling.bicmci import BiCMCI, DeformableSelfAttention


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
        clip_logits = (
            torch.nn.functional.cosine_similarity(text[:, :, None, :], stage[:, None, :, :], dim=-1) / 0.07
        )  # (B, 2, L)
        expected = p_plain * clip_logits.exp()
        torch.testing.assert_close(p_residual, expected / expected.sum(dim=1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain[0], residual[0])


def test_residual_logits_switch_on_a_loaded_model(tiny_backbone):
    from kanoclip import KAnoCLIP

    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")  # its own: the shared one stays as is
    torch.manual_seed(0)
    width = model.model.bicmci.stages[0].in_visual.in_features
    stages = [torch.randn(1, 16, width) for _ in model.model.bicmci.stages]
    text = torch.randn(1, 2, width)
    with torch.no_grad():
        before = model.model.bicmci(stages, text, (4, 4))
        model.config.bicmci.residual_logits = True
        after = model.model.bicmci(stages, text, (4, 4))
    assert not torch.allclose(before[0], after[0])
