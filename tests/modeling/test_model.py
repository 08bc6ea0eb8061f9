"""The pure model (kanoclip.modeling.model): tensors in, tensors out, its mode fixed when built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kanoclip.backbone import load_backbone
from kanoclip.config import BiCMCIConfig, KAnoCLIPConfig, TrainingFreeConfig
from kanoclip.modeling.model import KAnoCLIPModel


@pytest.fixture(scope="module")
def backbone(tiny_backbone):
    return load_backbone(str(tiny_backbone))


def build(backbone, trained: bool, **sections) -> KAnoCLIPModel:
    torch.manual_seed(0)
    config = KAnoCLIPConfig(backbone=backbone.name, bicmci=BiCMCIConfig(dim=32, num_heads=2), **sections)
    return KAnoCLIPModel(
        backbone.model, backbone.tokenizer, config, trained=trained, image_size=backbone.image_size
    ).eval()


def test_training_free_forward_is_eq_9_10_12_on_given_text(backbone):
    """With text features given, the training-free maps are each stage's softmax over the cosine
    similarities (τ = 0.07), weighted by the config's stage weights, upsampled, then eq. 10 and 12 —
    computed here by hand from the model's own stage features."""
    model = build(backbone, trained=False, training_free=TrainingFreeConfig(stage_weights=(0, 1, 0, 1)))
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    visual = model.encode_image(pixels)
    text = torch.randn(2, 2, visual.stages[0].shape[-1])
    with torch.no_grad():
        out = model(visual, text, sigma=0.0)
    t = F.normalize(text, dim=-1)
    h, w = visual.grid
    probs = [((t @ F.normalize(s, dim=-1).transpose(1, 2)) / 0.07).softmax(dim=1) for s in visual.stages]  # (B, 2, L)
    grid = 0.5 * probs[1] + 0.5 * probs[3]
    up = F.interpolate(grid.view(2, 2, h, w), size=(model.image_size,) * 2, mode="bilinear", align_corners=False)
    expected_map = (up[:, 1] + 1 - up[:, 0]) / 2
    torch.testing.assert_close(out.anomaly_map, expected_map, atol=1e-5, rtol=0)
    g = F.normalize(visual.global_feature, dim=-1)
    p_abnormal = ((torch.einsum("bc,bkc->bk", g, t)) / 0.07).softmax(dim=-1)[:, 1]
    torch.testing.assert_close(out.score, (p_abnormal + expected_map.flatten(1).amax(dim=1)) / 2, atol=1e-5, rtol=0)
    assert out.prompts is None and out.classes == []


def test_the_mode_is_fixed_when_built(backbone):
    model = build(backbone, trained=False)
    with pytest.raises(AttributeError):
        model.trained = True  # noqa: B010 - the point: there is no setter
    trained = build(backbone, trained=True)
    assert trained.trained and not model.trained
    # each mode reads its own V-V path length: vv's when trained, training_free's otherwise
    assert trained.num_replaced_blocks() == 7 and model.num_replaced_blocks() == 6  # tiny: 8 layers, stages 2/4/6/8


def test_losses_need_a_training_forward(backbone):
    model = build(backbone, trained=True)
    visual = model.encode_image(torch.randn(1, 3, model.image_size, model.image_size))
    out = model(visual, torch.randn(1, 2, visual.stages[0].shape[-1]))
    with pytest.raises(ValueError, match="learned prompts"):
        model.losses(
            out,
            torch.randn(1, 1, 32),
            label=torch.ones(1),
            mask=torch.zeros(1, 112, 112),
            has_mask=torch.ones(1, dtype=torch.bool),
        )


def test_a_config_that_does_not_fit_the_backbone_is_refused(backbone):
    with pytest.raises(ValueError, match="has 3 weights but the model has 4 stages"):
        build(backbone, trained=False, training_free=TrainingFreeConfig(stage_weights=(1, 1, 1)))
    with pytest.raises(ValueError, match=r"num_replaced_blocks must be in \[1, 8\]"):
        build(backbone, trained=False, training_free=TrainingFreeConfig(num_replaced_blocks=9))


def test_image_features_prompts_and_losses_stay_on_cuda_without_host_syncs(tiny_backbone):
    """On fake CUDA (tests/fake_cuda.py: any op mixing devices raises, and every read of a device
    value on the host is recorded): CLIP-VV's features, the learned prompts through the text tower,
    the knowledge features and the three losses stay on the GPU, and none of them waits for it.
    Forward only: a CPU-only torch cannot accumulate gradients on a CUDA leaf."""
    from fake_cuda import fake_cuda, to_fake_cuda

    from kanoclip import KAnoCLIP
    from kanoclip.config import LossConfig
    from kanoclip.modeling.losses import global_loss, kd_loss, local_loss, total_loss

    detector = KAnoCLIP.for_training(backbone=str(tiny_backbone), device="cpu")
    detector.model.train()  # before the move: transformers' train() asks a CUDA GPU for its capability
    size = detector.image_size
    with fake_cuda() as (_, calls), torch.no_grad():
        to_fake_cuda(detector.model)
        visual = detector.model.encode_image(torch.randn(2, 3, size, size, device="cuda"))
        prompts = detector.model.learned_prompts(["bottle", "screw"])
        knowledge = detector.knowledge_features(["bottle", "screw"])
        losses = [
            kd_loss(knowledge, prompts.abnormal, prompts.normal),
            global_loss(torch.rand(2, device="cuda"), torch.tensor([1.0, 0.0], device="cuda")),
            local_loss(*(torch.rand(2, size, size, device="cuda") for _ in range(3)), 2.0),
        ]
        maps = [torch.rand(2, size, size, device="cuda") for _ in range(3)]
        stage_maps = torch.rand(2, 4, 2, 4, 4, device="cuda")
        for local in ("mean", "per_stage"):  # one image without a mask (HeadCT's): weighted, not selected
            losses += total_loss(
                LossConfig(local_loss=local), kd=losses[0], score=torch.rand(2, device="cuda"),
                label=torch.tensor([1.0, 0.0], device="cuda"), normal=maps[0], abnormal=maps[1], mask=maps[2],
                has_mask=torch.tensor([True, False], device="cuda"), stage_maps=stage_maps,
            ).values()  # fmt: skip
        tensors = [visual.global_feature, *visual.stages, prompts.normal, prompts.abnormal, knowledge, *losses]
        assert {t.device.type for t in tensors} == {"cuda"}
    assert calls.syncs == []
