"""Losses of the joint optimisation (paper §2.2.2 and §2.5, eq. 2, 3, 13-15)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kanoclip.config import LossConfig
from kanoclip.modeling.maps import upsample


def kd_loss(knowledge: torch.Tensor, abnormal: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Knowledge-driven loss, eq. 2, averaged over classes.

    ``L_KD = max(0, d(w̄k/‖w̄k‖, w̄a/‖w̄a‖) − d(w̄k/‖w̄k‖, w̄n/‖w̄n‖))`` with d the Euclidean distance.
    Each argument holds raw text features ``(n_classes, n_i, C)`` whose mean over ``n_i`` is the
    w̄ of eq. 2-3: ``knowledge`` the knowledge-base descriptions (the paper's LLM + VQA; any source here),
    ``abnormal`` the LAPs, ``normal`` the LNPs.
    """
    wk = F.normalize(knowledge.mean(dim=-2), dim=-1)
    wa = F.normalize(abnormal.mean(dim=-2), dim=-1)
    wn = F.normalize(normal.mean(dim=-2), dim=-1)
    return torch.clamp((wk - wa).norm(dim=-1) - (wk - wn).norm(dim=-1), min=0).mean()


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss (Lin et al.) on probabilities ``prob`` against a 0/1 ``target``, mean over pixels."""
    prob = prob.clamp(eps, 1 - eps)
    p_t = torch.where(target > 0.5, prob, 1 - prob)
    return (-((1 - p_t) ** gamma) * torch.log(p_t)).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 − (2|P∩G| + ε) / (|P| + |G| + ε)`` per image, averaged; ``(B, H, W)``."""
    inter = (prob * target).flatten(1).sum(dim=1)
    total = prob.flatten(1).sum(dim=1) + target.flatten(1).sum(dim=1)
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def global_loss(score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Eq. 14: BCE between the global score in [0, 1] and the image label."""
    return F.binary_cross_entropy(score.float().clamp(1e-6, 1 - 1e-6), label.float())


def local_loss(
    normal: torch.Tensor, abnormal: torch.Tensor, mask: torch.Tensor, focal_gamma: float = 2.0
) -> torch.Tensor:
    """Eq. 15: ``Focal(M^a, G) + Dice(M^n, 1 − G) + Dice(M^a, G)`` on (B, H, W) maps."""
    return focal_loss(abnormal, mask, focal_gamma) + dice_loss(normal, 1 - mask) + dice_loss(abnormal, mask)


def stage_local_loss(stage_maps: torch.Tensor, mask: torch.Tensor, focal_gamma: float = 2.0) -> torch.Tensor:
    """AnomalyCLIP's per-layer reading of eq. 15: ``Σ_i L_local(M_i^n, M_i^a)`` over the stages.

    Args:
        stage_maps: (B, n, 2, h, w) each stage's [normal, abnormal] maps on the patch grid
            (``KAnoCLIPOutput.stage_maps``); each is upsampled to the mask's size like the model's maps.
        mask: (B, H, W) 0/1 ground truth.
        focal_gamma: γ of the focal term.

    Returns:
        The scalar sum over the n stages.
    """
    b, n = stage_maps.shape[:2]
    maps = upsample(stage_maps.flatten(1, 2), tuple(mask.shape[-2:])).view(b, n, 2, *mask.shape[-2:])
    return sum(local_loss(maps[:, i, 0], maps[:, i, 1], mask, focal_gamma) for i in range(n))


def total_loss(
    config: LossConfig,
    *,
    kd: torch.Tensor,
    score: torch.Tensor,
    label: torch.Tensor,
    normal: torch.Tensor,
    abnormal: torch.Tensor,
    mask: torch.Tensor,
    has_mask: torch.Tensor,
    stage_maps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 13, ``α·L_KD + β·L_global + γ·L_local``; returns every term and ``"total"``.

    ``has_mask`` (B,) bool: samples without a pixel ground truth (e.g. HeadCT) train the
    global loss only, so ``L_local`` is computed on the others (0 if there are none).

    Args:
        config: the weights and ``local_loss``: "mean" takes eq. 15 once on the stage mean
            ``normal``/``abnormal`` (B, S, S); "per_stage" sums it over ``stage_maps``.
        kd: L_KD (eq. 2), already computed.
        score: (B,) global scores in [0, 1]; ``label``: (B,) 0/1 image labels.
        normal: (B, S, S) M^n; ``abnormal``: (B, S, S) M^a; ``mask``: (B, S, S) ground truth.
        has_mask: (B,) whether each sample has a pixel ground truth.
        stage_maps: (B, n, 2, h, w) per-stage maps; required when ``local_loss="per_stage"``.

    Returns:
        ``{"total", "kd", "global", "local"}`` scalars.
    """
    if config.local_loss == "per_stage" and stage_maps is None:
        raise ValueError("total_loss: LossConfig.local_loss='per_stage' needs stage_maps (KAnoCLIPOutput.stage_maps)")
    g = global_loss(score, label)
    if bool(has_mask.any()):
        sel = has_mask.bool()
        if config.local_loss == "per_stage":
            loc = stage_local_loss(stage_maps[sel], mask[sel].float(), config.focal_gamma)
        else:
            loc = local_loss(normal[sel], abnormal[sel], mask[sel].float(), config.focal_gamma)
    else:
        loc = score.new_zeros(())
    total = config.alpha * kd + config.beta * g + config.gamma * loc
    return {"total": total, "kd": kd, "global": g, "local": loc}
