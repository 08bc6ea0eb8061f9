"""Each loss against a value computed by hand on a small example."""

from __future__ import annotations

import math

import pytest
import torch

from kanoclip.config import LossConfig
from kanoclip.losses import dice_loss, focal_loss, global_loss, kd_loss, local_loss, total_loss


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
    terms = total_loss(config, kd=kd, score=score, label=label, normal=normal, abnormal=abnormal, mask=mask, has_mask=has_mask)
    local = local_loss(normal[:1], abnormal[:1], mask[:1])  # only the sample with a mask
    expected = 2.0 * 0.25 + 3.0 * global_loss(score, label) + 5.0 * local
    torch.testing.assert_close(terms["total"], expected)
    torch.testing.assert_close(terms["local"], local)
    none = total_loss(config, kd=kd, score=score, label=label, normal=normal, abnormal=abnormal, mask=mask, has_mask=torch.tensor([False, False]))
    assert float(none["local"]) == 0.0
