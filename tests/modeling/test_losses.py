"""Each loss against a value computed by hand on a small example."""

from __future__ import annotations

import math

import pytest
import torch

from kanoclip.config import LossConfig
from kanoclip.modeling.losses import dice_loss, focal_loss, global_loss, kd_loss, local_loss, total_loss


def test_kd_loss_hinge_on_normalised_mean_distances():
    # One class. Knowledge mean = (2, 0) -> (1, 0). Abnormal mean = (0, 3) -> (0, 1).
    # Normal mean = (1, 1) -> (1/√2, 1/√2).
    knowledge = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    abnormal = torch.tensor([[[0.0, 3.0]]])
    normal = torch.tensor([[[1.0, 1.0]]])
    d_ka = math.sqrt(2.0)  # |(1,0) - (0,1)|
    d_kn = math.sqrt((1 - 1 / math.sqrt(2)) ** 2 + (1 / math.sqrt(2)) ** 2)
    assert float(kd_loss(knowledge, abnormal, normal)) == pytest.approx(d_ka - d_kn, abs=1e-6)
    # swapped roles: the abnormal prompts are the closer ones -> hinge at 0
    assert float(kd_loss(knowledge, normal, abnormal)) == 0.0


def test_kd_loss_averages_over_classes():
    k = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    a = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    n = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert float(kd_loss(k, a, n)) == pytest.approx(math.sqrt(2) / 2, abs=1e-6)


def test_focal_loss_by_hand():
    prob = torch.tensor([[[0.9, 0.2]]])
    target = torch.tensor([[[1.0, 0.0]]])
    # p_t = 0.9 and 0.8; FL = -(1-p_t)^2 log p_t
    expected = (-(0.1**2) * math.log(0.9) - (0.2**2) * math.log(0.8)) / 2
    assert float(focal_loss(prob, target, gamma=2.0)) == pytest.approx(expected, rel=1e-5)


def test_dice_loss_by_hand():
    prob = torch.tensor([[[0.5, 1.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # inter = 1.5, |P| + |G| = 1.5 + 2 = 3.5, eps = 1
    assert float(dice_loss(prob, target)) == pytest.approx(1 - (2 * 1.5 + 1) / (3.5 + 1), abs=1e-6)
    assert float(dice_loss(target, target)) == pytest.approx(0.0, abs=1e-6)


def test_global_loss_is_bce():
    score = torch.tensor([0.8, 0.3])
    label = torch.tensor([1.0, 0.0])
    expected = -(math.log(0.8) + math.log(0.7)) / 2
    assert float(global_loss(score, label)) == pytest.approx(expected, rel=1e-5)


def test_local_loss_is_focal_plus_two_dice():
    torch.manual_seed(0)
    abnormal = torch.rand(2, 4, 4)
    normal = 1 - abnormal
    mask = (torch.rand(2, 4, 4) > 0.5).float()
    expected = focal_loss(abnormal, mask) + dice_loss(normal, 1 - mask) + dice_loss(abnormal, mask)
    torch.testing.assert_close(local_loss(normal, abnormal, mask), expected)


def test_total_loss_weights_and_mask_selection():
    config = LossConfig(alpha=2.0, beta=3.0, gamma=5.0)
    abnormal = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]])
    normal = 1 - abnormal
    mask = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    score = torch.tensor([0.7, 0.4])
    label = torch.tensor([1.0, 0.0])
    kd = torch.tensor(0.25)
    has_mask = torch.tensor([True, False])
    terms = total_loss(
        config, kd=kd, score=score, label=label, normal=normal, abnormal=abnormal, mask=mask, has_mask=has_mask
    )
    local = local_loss(normal[:1], abnormal[:1], mask[:1])  # only the sample with a mask
    expected = 2.0 * 0.25 + 3.0 * global_loss(score, label) + 5.0 * local
    torch.testing.assert_close(terms["total"], expected)
    torch.testing.assert_close(terms["local"], local)
    none = total_loss(
        config,
        kd=kd,
        score=score,
        label=label,
        normal=normal,
        abnormal=abnormal,
        mask=mask,
        has_mask=torch.tensor([False, False]),
    )
    assert float(none["local"]) == 0.0
    # "any values where has_mask is False": even NaN there leaves the loss as it was
    garbage = mask.clone()
    garbage[1] = float("nan")
    again = total_loss(
        config, kd=kd, score=score, label=label, normal=normal, abnormal=abnormal, mask=garbage, has_mask=has_mask
    )
    torch.testing.assert_close(again["total"], expected)


def _focal_by_hand(p_abnormal: float, n_pos: int, n_pix: int, gamma: float = 2.0) -> float:
    """Focal loss of a constant abnormal map p against a mask with n_pos ones among n_pix pixels."""
    pos = -((1 - p_abnormal) ** gamma) * math.log(p_abnormal)  # target 1: p_t = p
    neg = -(p_abnormal**gamma) * math.log(1 - p_abnormal)  # target 0: p_t = 1 - p
    return (n_pos * pos + (n_pix - n_pos) * neg) / n_pix


def _dice_by_hand(p: float, n_target: int, n_pix: int) -> float:
    """Soft Dice (ε = 1) of a constant map p against a target with n_target ones."""
    return 1 - (2 * p * n_target + 1) / (p * n_pix + n_target + 1)


def _eq15_by_hand(p_abnormal: float, n_pos: int, n_pix: int) -> float:
    p_normal = 1 - p_abnormal
    return (
        _focal_by_hand(p_abnormal, n_pos, n_pix)
        + _dice_by_hand(p_normal, n_pix - n_pos, n_pix)
        + _dice_by_hand(p_abnormal, n_pos, n_pix)
    )


def _constant_stage_maps(abnormal: list[float], grid: int = 2) -> torch.Tensor:
    """(1, n, 2, grid, grid) stage maps, stage i constant: [1 - a_i, a_i] (upsampling keeps them)."""
    a = torch.tensor(abnormal).view(1, -1, 1, 1, 1).expand(1, len(abnormal), 1, grid, grid)
    return torch.cat([1 - a, a], dim=2)


def test_per_stage_local_loss_sums_eq_15_over_the_stages():
    stage_maps = _constant_stage_maps([0.8, 0.3, 0.6, 0.1])  # 4 stages on a 2x2 grid
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1  # 4 of 16 pixels abnormal
    mean_a = (0.8 + 0.3 + 0.6 + 0.1) / 4
    config = LossConfig(alpha=0.0, beta=0.0, gamma=1.0)
    common = dict(
        kd=torch.tensor(0.0),
        score=torch.tensor([0.5]),
        label=torch.tensor([1.0]),
        mask=mask,
        has_mask=torch.tensor([True]),
    )
    normal = torch.full((1, 4, 4), 1 - mean_a)
    abnormal = torch.full((1, 4, 4), mean_a)

    per_stage = total_loss(
        LossConfig(local_loss="per_stage"), normal=normal, abnormal=abnormal, stage_maps=stage_maps, **common
    )
    expected = sum(_eq15_by_hand(a, 4, 16) for a in (0.8, 0.3, 0.6, 0.1))
    assert float(per_stage["local"]) == pytest.approx(expected, rel=1e-5)

    mean = total_loss(config, normal=normal, abnormal=abnormal, stage_maps=stage_maps, **common)  # the default
    assert float(mean["local"]) == pytest.approx(_eq15_by_hand(mean_a, 4, 16), rel=1e-5)
    assert float(mean["total"]) == pytest.approx(_eq15_by_hand(mean_a, 4, 16), rel=1e-5)


def test_per_stage_local_loss_upsamples_each_stage_and_skips_samples_without_masks():
    torch.manual_seed(0)
    stage_maps = torch.rand(2, 3, 2, 2, 2)  # 2 images, 3 stages, 2x2 grids
    mask = (torch.rand(2, 6, 6) > 0.5).float()
    has_mask = torch.tensor([False, True])
    zeros = torch.zeros(2, 6, 6)
    terms = total_loss(
        LossConfig(local_loss="per_stage"), kd=torch.tensor(0.0), score=torch.tensor([0.5, 0.5]),
        label=torch.tensor([0.0, 1.0]), normal=zeros, abnormal=zeros, mask=mask, has_mask=has_mask,
        stage_maps=stage_maps,
    )  # fmt: skip
    expected = 0.0
    for i in range(3):  # only image 1 has a mask; each stage's maps bilinearly resized to 6x6
        maps = torch.nn.functional.interpolate(stage_maps[1:, i], size=(6, 6), mode="bilinear", align_corners=False)
        expected += float(local_loss(maps[:, 0], maps[:, 1], mask[1:]))
    assert float(terms["local"]) == pytest.approx(expected, rel=1e-5)


def test_per_stage_local_loss_needs_the_stage_maps():
    with pytest.raises(ValueError, match="stage_maps"):
        total_loss(
            LossConfig(local_loss="per_stage"), kd=torch.tensor(0.0), score=torch.tensor([0.5]),
            label=torch.tensor([1.0]), normal=torch.zeros(1, 2, 2), abnormal=torch.zeros(1, 2, 2),
            mask=torch.zeros(1, 2, 2), has_mask=torch.tensor([True]),
        )  # fmt: skip
