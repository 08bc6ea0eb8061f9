"""Bi-CMCI: bi-directional cross-attention for multi-level cross-modal interaction (§2.4, eq. 9).

One :class:`BiCMCIStage` per CLIP-VV stage fuses that stage's patch features
``F_patch^i ∈ R^{HiWi×C}`` with the text features ``F_text = [F_n, F_a] ∈ R^{2×C}``:

1. self-attention within each modality: a deformable self-attention over the patch grid
   (DAT: offsets predicted from the features, keys/values sampled with ``grid_sample``), and a
   standard self-attention over the text tokens;
2. text-to-visual cross-attention (patch queries, text keys/values): aligns the text with
   the visual parts;
3. visual-to-text cross-attention (text queries, patch keys/values): refines the text with
   the local visual features;
4. each patch's softmax over its cosine similarities to the refined normal and abnormal text
   features gives the stage's normal and anomaly maps ``M_i^n, M_i^a`` (they sum to 1). With
   ``BiCMCIConfig.residual_logits`` CLIP's own patch-text logits are added before the softmax.

The paper does not give the order of the blocks nor their width; this order (self, then
bi-directional cross) and a 256-wide pre-norm residual layout are our choice
(:class:`~kanoclip.config.BiCMCIConfig`). Summation over the stages and ``Norm`` are in
:mod:`kanoclip.modeling.maps`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kanoclip.config import BiCMCIConfig
from kanoclip.modeling.maps import similarity_logits


class DeformableSelfAttention(nn.Module):
    """Deformable multi-head self-attention over a patch grid (Xia et al., CVPR 2022).

    Queries come from every patch; keys and values from features sampled at a coarser grid of
    reference points moved by offsets that a small convolutional network predicts from the
    queries. Input and output: ``(B, h*w, dim)``.

    Args:
        dim: the token width (a multiple of ``num_heads``).
        num_heads: attention heads.
        stride: the reference grid's stride over the patch grid (hk = ceil(h / stride) for an odd ``kernel``).
        kernel: the offset network's depthwise kernel size.
        offset_range: the largest offset, in reference-grid cells.
    """

    def __init__(self, dim: int, num_heads: int, stride: int, kernel: int, offset_range: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.stride = stride
        self.offset_range = offset_range
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.offset_net = nn.Sequential(
            nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim),  # depthwise
            nn.GELU(),
            nn.Conv2d(dim, 2, 1),  # (dx, dy) per reference point
        )

    def sampling_grid(self, q_map: torch.Tensor) -> torch.Tensor:
        """Deformed sampling locations in ``grid_sample``'s [-1, 1] coordinates.

        Args:
            q_map: (B, dim, h, w) the queries on the patch grid.

        Returns:
            (B, hk, wk, 2) (x, y) locations: the reference grid plus the predicted offsets, clamped to [-1, 1].
        """
        offsets = self.offset_net(q_map)  # (B, 2, hk, wk)
        b, _, hk, wk = offsets.shape
        ys = torch.linspace(-1, 1, hk, device=q_map.device, dtype=q_map.dtype) if hk > 1 else q_map.new_zeros(1)
        xs = torch.linspace(-1, 1, wk, device=q_map.device, dtype=q_map.dtype) if wk > 1 else q_map.new_zeros(1)
        ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (hk, wk, 2) as (x, y)
        # tanh bounds each offset to offset_range reference cells (a cell is 2/(n) wide).
        scale = offsets.new_tensor([2.0 / max(wk, 1), 2.0 / max(hk, 1)]).view(1, 2, 1, 1) * self.offset_range
        offsets = torch.tanh(offsets) * scale
        return (ref.unsqueeze(0) + offsets.permute(0, 2, 3, 1)).clamp(-1, 1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Every patch attends to features sampled at the deformed reference points.

        Args:
            x: (B, h*w, dim) patch tokens, row-major on the grid.
            grid: (h, w) the patch grid.

        Returns:
            (B, h*w, dim) attended tokens (no residual: the caller adds it).
        """
        b, n, dim = x.shape
        h, w = grid
        q = self.q(x)  # (B, N, dim)
        q_map = q.transpose(1, 2).reshape(b, dim, h, w)
        x_map = x.transpose(1, 2).reshape(b, dim, h, w)
        points = self.sampling_grid(q_map)  # (B, hk, wk, 2)
        sampled = F.grid_sample(x_map, points, mode="bilinear", align_corners=True)  # (B, dim, hk, wk)
        sampled = sampled.flatten(2).transpose(1, 2)  # (B, Ns, dim)
        k, v = self.kv(sampled).chunk(2, dim=-1)
        heads = lambda t: t.view(b, -1, self.num_heads, dim // self.num_heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # (B, heads, N, dim/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class _Attention(nn.Module):
    """Pre-norm residual multi-head attention: ``x + MHA(LN(x), LN(context))``.

    ``cross=False`` is self-attention (the context is ``x`` itself, no second norm).
    """

    def __init__(self, dim: int, num_heads: int, cross: bool) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else None
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        kv = q if self.norm_kv is None else self.norm_kv(context)
        return x + self.attn(q, kv, kv, need_weights=False)[0]


class BiCMCIStage(nn.Module):
    """Bi-CMCI for one stage: ``(patches (B, L, C), text (B, 2, C)) -> (B, 2, L)`` probabilities.

    Args:
        feature_dim: C, the width of the patch and text features.
        config: the blocks' width, heads, deformable attention and ``residual_logits``.
        temperature: τ of the final softmax.
    """

    def __init__(self, feature_dim: int, config: BiCMCIConfig, temperature: float) -> None:
        super().__init__()
        d = config.dim
        self.temperature = temperature
        self.config = config  # the caller's object: residual_logits is read at each forward
        self.in_visual = nn.Linear(feature_dim, d)
        self.in_text = nn.Linear(feature_dim, d)
        self.norm_deform = nn.LayerNorm(d)
        self.deform = DeformableSelfAttention(
            d, config.num_heads, config.deform_stride, config.deform_kernel, config.offset_range
        )
        self.text_self = _Attention(d, config.num_heads, cross=False)
        self.text_to_visual = _Attention(d, config.num_heads, cross=True)
        self.visual_to_text = _Attention(d, config.num_heads, cross=True)

    def forward(self, patches: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Steps 1-4 of the module docstring on one stage.

        Args:
            patches: (B, L, C) the stage's patch features, L = h * w.
            text: (B, 2, C) [normal, abnormal] text features.
            grid: (h, w) the patch grid.

        Returns:
            (B, 2, L) [M_i^n, M_i^a] probabilities per patch, summing to 1 over dim 1.
        """
        v = self.in_visual(patches)  # (B, L, d)
        t = self.in_text(text)  # (B, 2, d)
        v = v + self.deform(self.norm_deform(v), grid)
        t = self.text_self(t)
        v_new = self.text_to_visual(v, context=t)  # visual parts attend to the text
        t = self.visual_to_text(t, context=v)  # text refined by the local visual features
        logits = similarity_logits(v_new, t, self.temperature)  # (B, 2, L)
        if self.config.residual_logits:  # a learned correction of zero-shot CLIP's maps
            logits = logits + similarity_logits(patches, text, self.temperature)
        return logits.softmax(dim=1)


class BiCMCI(nn.Module):
    """One :class:`BiCMCIStage` per CLIP-VV stage.

    Args:
        feature_dim: C, the width of the patch and text features.
        num_stages: n, the number of CLIP-VV stages.
        config: each stage's configuration (all stages share it).
        temperature: τ of each stage's softmax.
    """

    def __init__(self, feature_dim: int, num_stages: int, config: BiCMCIConfig, temperature: float) -> None:
        super().__init__()
        self.stages = nn.ModuleList(BiCMCIStage(feature_dim, config, temperature) for _ in range(num_stages))

    def forward(self, stages: list[torch.Tensor], text: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """Each stage's maps from its own :class:`BiCMCIStage`.

        Args:
            stages: n x (B, L, C) patch features, one per stage.
            text: (B, 2, C) [normal, abnormal] text features, shared by the stages.
            grid: (h, w) the patch grid, h * w == L.

        Returns:
            n x (B, 2, L) [normal, abnormal] probabilities.
        """
        return [block(patches, text, grid) for block, patches in zip(self.stages, stages)]
