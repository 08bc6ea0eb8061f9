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

    Args:
        knowledge: (n_classes, n_k, C) raw features of each class's knowledge-base descriptions.
        abnormal: (n_classes, n_a, C) raw features of the learnable abnormal prompts (LAPs).
        normal: (n_classes, n_n, C) raw features of the learnable normal prompts (LNPs).

    Returns:
        The scalar loss, 0 for a class whose knowledge is nearer its LAPs than its LNPs.

    >>> k, a, n = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
    >>> round(float(kd_loss(k, a, n)), 4)  # d(k, a) = √2, d(k, n) = 0
    1.4142
    >>> float(kd_loss(k, n, a))  # knowledge already nearer the abnormal side
    0.0
    """
    wk = F.normalize(knowledge.mean(dim=-2), dim=-1)
    wa = F.normalize(abnormal.mean(dim=-2), dim=-1)
    wn = F.normalize(normal.mean(dim=-2), dim=-1)
    return torch.clamp((wk - wa).norm(dim=-1) - (wk - wn).norm(dim=-1), min=0).mean()


def _batch_mean(per_image: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``per_image`` (B,) over the batch, or over the images of weight 1 (0 when there are none).

    Weighting rather than selecting keeps shapes fixed and the GPU free of a host sync per step.
    """
    if weight is None:
        return per_image.mean()
    return (per_image * weight).sum() / weight.sum().clamp(min=1.0)


def focal_loss(
    prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary focal loss (Lin et al.) ``−(1 − p_t)^γ · log(p_t)``, mean over pixels.

    Args:
        prob: (B, H, W) predicted probabilities of the positive class (clamped to [eps, 1 − eps]).
        target: (B, H, W) 0/1 ground truth (``> 0.5`` counts as positive).
        gamma: γ, the focusing exponent (0: binary cross-entropy).
        eps: the clamp that keeps the log finite.
        weight: (B,) 0/1, the images that count (None: all).

    Returns:
        The scalar mean loss.

    >>> prob, target = torch.full((1, 2, 2), 0.5), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    >>> round(float(focal_loss(prob, target)), 4)  # every pixel: −0.5² · log 0.5
    0.1733
    """
    prob = prob.clamp(eps, 1 - eps)
    p_t = torch.where(target > 0.5, prob, 1 - prob)
    return _batch_mean((-((1 - p_t) ** gamma) * torch.log(p_t)).flatten(1).mean(dim=1), weight)


def dice_loss(
    prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft Dice loss ``1 − (2|P∩G| + ε) / (|P| + |G| + ε)`` per image, averaged over the batch.

    Args:
        prob: (B, H, W) predicted probabilities P.
        target: (B, H, W) 0/1 ground truth G.
        eps: ε, the smoothing term (an empty P and G give loss 0).
        weight: (B,) 0/1, the images that count (None: all).

    Returns:
        The scalar mean loss.

    >>> target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    >>> float(dice_loss(target, target))  # a perfect prediction: 1 − (2 + 1) / (2 + 1)
    0.0
    >>> float(dice_loss(torch.full((1, 2, 2), 0.5), target))  # 1 − (2 · 0.5 + 1) / (2 + 1 + 1)
    0.5
    """
    inter = (prob * target).flatten(1).sum(dim=1)
    total = prob.flatten(1).sum(dim=1) + target.flatten(1).sum(dim=1)
    return _batch_mean(1 - (2 * inter + eps) / (total + eps), weight)


def global_loss(score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Eq. 14: BCE between the global score in [0, 1] and the image label.

    Args:
        score: (B,) global scores in [0, 1] (clamped to [1e-6, 1 − 1e-6]), any float dtype.
        label: (B,) 0/1 image labels.

    Returns:
        The scalar mean BCE, in float32.
    """
    return F.binary_cross_entropy(score.float().clamp(1e-6, 1 - 1e-6), label.float())


def local_loss(
    normal: torch.Tensor,
    abnormal: torch.Tensor,
    mask: torch.Tensor,
    focal_gamma: float = 2.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 15: ``Focal(M^a, G) + Dice(M^n, 1 − G) + Dice(M^a, G)``.

    Args:
        normal: (B, H, W) M^n, the normal map in [0, 1].
        abnormal: (B, H, W) M^a, the abnormal map in [0, 1].
        mask: (B, H, W) 0/1 ground truth G.
        focal_gamma: γ of the focal term.
        weight: (B,) 0/1, the images that count (None: all).

    Returns:
        The scalar loss.
    """
    return (
        focal_loss(abnormal, mask, focal_gamma, weight=weight)
        + dice_loss(normal, 1 - mask, weight=weight)
        + dice_loss(abnormal, mask, weight=weight)
    )


def stage_local_loss(
    stage_maps: torch.Tensor, mask: torch.Tensor, focal_gamma: float = 2.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """AnomalyCLIP's per-layer reading of eq. 15: ``Σ_i L_local(M_i^n, M_i^a)`` over the stages.

    Args:
        stage_maps: (B, n, 2, h, w) each stage's [normal, abnormal] maps on the patch grid
            (``KAnoCLIPOutput.stage_maps``); each is upsampled to the mask's size like the model's maps.
        mask: (B, H, W) 0/1 ground truth.
        focal_gamma: γ of the focal term.
        weight: (B,) 0/1, the images that count (None: all).

    Returns:
        The scalar sum over the n stages.
    """
    b, n = stage_maps.shape[:2]
    maps = upsample(stage_maps.flatten(1, 2), tuple(mask.shape[-2:])).view(b, n, 2, *mask.shape[-2:])
    return sum(local_loss(maps[:, i, 0], maps[:, i, 1], mask, focal_gamma, weight) for i in range(n))


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
        score: (B,) global scores in [0, 1].
        label: (B,) 0/1 image labels.
        normal: (B, S, S) M^n, the stage mean normal map.
        abnormal: (B, S, S) M^a, the stage mean abnormal map.
        mask: (B, S, S) 0/1 pixel ground truth (any values where ``has_mask`` is False).
        has_mask: (B,) bool, whether each sample has a pixel ground truth.
        stage_maps: (B, n, 2, h, w) per-stage maps; required when ``local_loss="per_stage"``.

    Returns:
        ``{"total", "kd", "global", "local"}`` scalars.

    Raises:
        ValueError: ``config.local_loss`` is "per_stage" and ``stage_maps`` is None.
    """
    if config.local_loss == "per_stage" and stage_maps is None:
        raise ValueError("total_loss: LossConfig.local_loss='per_stage' needs stage_maps (KAnoCLIPOutput.stage_maps)")
    g = global_loss(score, label)
    # weighted by has_mask rather than selected: no host sync per step (the mean is the same)
    weight = has_mask.float()
    mask = torch.where(has_mask.view(-1, 1, 1).bool(), mask.float(), 0.0)  # any values where there is none
    if config.local_loss == "per_stage":
        loc = stage_local_loss(stage_maps, mask, config.focal_gamma, weight)
    else:
        loc = local_loss(normal, abnormal, mask, config.focal_gamma, weight)
    total = config.alpha * kd + config.beta * g + config.gamma * loc
    return {"total": total, "kd": kd, "global": g, "local": loc}
