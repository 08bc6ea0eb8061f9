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

    Both sides are L2-normalised here, so raw features may be passed.

    Args:
        patches: (B, L, C) patch features.
        text: (B, 2, C) per-image or (2, C) shared [normal, abnormal] text features.
        temperature: τ; the similarities are divided by it.

    Returns:
        (B, 2, L) logits, row 0 normal and row 1 abnormal.

    >>> similarity_logits(torch.randn(3, 5, 8), torch.randn(2, 8), 0.07).shape
    torch.Size([3, 2, 5])
    """
    if text.dim() == 2:
        text = text.unsqueeze(0).expand(patches.shape[0], -1, -1)
    sims = F.normalize(text, dim=-1) @ F.normalize(patches, dim=-1).transpose(1, 2)
    return sims / temperature


def similarity_probabilities(patches: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per patch, softmax over its cosine similarity to [normal, abnormal] text features.

    Args:
        patches: (B, L, C) patch features.
        text: (B, 2, C) per-image or (2, C) shared [normal, abnormal] text features.
        temperature: τ of the softmax.

    Returns:
        (B, 2, L) probabilities [normal, abnormal]; they sum to 1 over dim 1.

    >>> probs = similarity_probabilities(torch.randn(3, 5, 8), torch.randn(3, 2, 8), 0.07)
    >>> probs.shape, torch.allclose(probs.sum(dim=1), torch.ones(3, 5))
    (torch.Size([3, 2, 5]), True)
    """
    return similarity_logits(patches, text, temperature).softmax(dim=1)


def stage_grid_maps(probs: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Each stage's probabilities as maps on the patch grid, stacked over the stages.

    Args:
        probs: n_stages x (B, 2, L) [normal, abnormal] probabilities, with L = h * w.
        grid: (h, w) the patch grid.

    Returns:
        (B, n_stages, 2, h, w) maps.

    >>> stage_grid_maps([torch.rand(2, 2, 12)] * 4, (3, 4)).shape
    torch.Size([2, 4, 2, 3, 4])
    """
    b = probs[0].shape[0]
    return torch.stack([p.view(b, 2, *grid) for p in probs], dim=1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize maps bilinearly, in float32 (every map of the project is resized this way).

    Args:
        maps: (B, k, h, w) maps, any float dtype.
        size: (H, W) the output size.

    Returns:
        (B, k, H, W) float32 maps (``align_corners=False``).

    >>> upsample(torch.rand(2, 3, 4, 4).half(), (16, 16)).shape
    torch.Size([2, 3, 16, 16])
    """
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """G_σ of eq. 10: a separable Gaussian blur, reflect-padded, so a constant map stays constant.

    The kernel's radius is ``ceil(3σ)``, cut to one less than the map's shorter side (what
    reflect padding allows).

    Args:
        maps: (B, H, W) maps.
        sigma: σ in pixels; ``<= 0`` returns ``maps`` unchanged.

    Returns:
        (B, H, W) blurred maps, of ``maps``' dtype and device.

    >>> flat = torch.full((1, 8, 8), 0.3)
    >>> torch.allclose(gaussian_blur(flat, sigma=2.0), flat)
    True
    >>> spot = torch.zeros(1, 9, 9)
    >>> spot[0, 4, 4] = 1.0
    >>> blurred = gaussian_blur(spot, sigma=1.0)
    >>> round(float(blurred.sum()), 4), bool(blurred[0, 4, 4] < 1.0)
    (1.0, True)
    """
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
    """Eq. 10: ``M = G_σ(M^a + 1 − M^n) / 2``, the anomaly map.

    Args:
        normal: (B, H, W) M^n, the normal map in [0, 1].
        abnormal: (B, H, W) M^a, the abnormal map in [0, 1].
        sigma: σ of G_σ in pixels (``<= 0``: no blur).

    Returns:
        (B, H, W) anomaly map M in [0, 1].

    >>> m = combine_maps(torch.full((1, 8, 8), 0.8), torch.full((1, 8, 8), 0.2), sigma=4.0)
    >>> m.shape, round(float(m.min()), 4), round(float(m.max()), 4)
    (torch.Size([1, 8, 8]), 0.2, 0.2)
    """
    return gaussian_blur(abnormal + 1.0 - normal, sigma) / 2.0


def global_score(
    global_feature: torch.Tensor, text: torch.Tensor, anomaly_map: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Eq. 12, reported in [0, 1]: ``(softmax(Î_G · F_textᵀ / τ)[abnormal] + max(M)) / 2``.

    The paper's sum lies in [0, 2]; halving it keeps the ranking and makes it a probability
    for the BCE of eq. 14.

    Args:
        global_feature: (B, C) global image feature Î_G (normalised here).
        text: (B, 2, C) [normal, abnormal] text features (normalised here).
        anomaly_map: (B, H, W) anomaly map M of eq. 10.
        temperature: τ of the softmax.

    Returns:
        (B,) image scores in [0, 1].

    >>> text = torch.eye(2, 4).unsqueeze(0)  # normal = e0, abnormal = e1
    >>> score = global_score(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), text, torch.full((1, 4, 4), 0.6), 0.01)
    >>> round(float(score), 4)  # (softmax ≈ 1 for abnormal + max M = 0.6) / 2
    0.8
    """
    sims = torch.einsum("bc,bkc->bk", F.normalize(global_feature, dim=-1), F.normalize(text, dim=-1))
    p_abnormal = (sims / temperature).softmax(dim=-1)[:, 1]
    return (p_abnormal + anomaly_map.flatten(1).amax(dim=1)) / 2.0
