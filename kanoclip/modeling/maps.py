"""Anomaly maps and scores (paper eq. 9, 10, 12), shared by the trained and training-free modes.

``Norm`` in eq. 9 is taken as the mean over the stages. Each stage's maps are softmax
probabilities in [0, 1], so their mean is in [0, 1] too. A per-image min-max rescaling — the
other reading of "normalises to 0..1" — would make ``max(M) = 1`` for every image and so
remove the map's contribution to the global score (eq. 12); we do not use it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def similarity_logits(patches: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per patch, its cosine similarity to [normal, abnormal] text features over τ.

    ``patches``: (B, L, C); ``text``: (B, 2, C) or (2, C). Returns (B, 2, L).
    """
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(patches.shape[0], -1, -1)
    sims = F.normalize(text, dim=-1) @ F.normalize(patches, dim=-1).transpose(1, 2)
    return sims / temperature


def similarity_probabilities(patches: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per patch, softmax over its cosine similarity to [normal, abnormal] text features.

    ``patches``: (B, L, C); ``text``: (B, 2, C) or (2, C). Returns (B, 2, L).
    """
    return similarity_logits(patches, text, temperature).softmax(dim=1)


def stage_grid_maps(probs: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Each stage's (B, 2, L) probabilities as maps on the patch grid: (B, n_stages, 2, h, w)."""
    b = probs[0].shape[0]
    return torch.stack([p.view(b, 2, *grid) for p in probs], dim=1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, k, h, w) maps -> (B, k, H, W), bilinear, float32 (every map of the project is resized this way)."""
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """G_σ of eq. 10 on (B, H, W) maps: a separable Gaussian, reflect-padded (σ in pixels)."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, (min(maps.shape[-2:]) - 1))
    if radius < 1:
        return maps
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(maps.unsqueeze(1), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def combine_maps(normal: torch.Tensor, abnormal: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 10: ``M = G_σ(M^a + 1 − M^n) / 2`` on (B, H, W) maps in [0, 1]."""
    return gaussian_blur(abnormal + 1.0 - normal, sigma) / 2.0


def global_score(
    global_feature: torch.Tensor, text: torch.Tensor, anomaly_map: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Eq. 12, reported in [0, 1]: ``(softmax(Î_G · F_textᵀ / τ)[abnormal] + max(M)) / 2``.

    ``global_feature``: (B, C); ``text``: (B, 2, C); ``anomaly_map``: (B, H, W). Returns (B,).
    The paper's sum lies in [0, 2]; halving it keeps the ranking and makes it a probability
    for the BCE of eq. 14.
    """
    sims = torch.einsum("bc,bkc->bk", F.normalize(global_feature, dim=-1), F.normalize(text, dim=-1))
    p_abnormal = (sims / temperature).softmax(dim=-1)[:, 1]
    return (p_abnormal + anomaly_map.flatten(1).amax(dim=1)) / 2.0
