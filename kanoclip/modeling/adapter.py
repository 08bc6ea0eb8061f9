"""Conv-Adapter (paper §2.4, eq. 11): a bottleneck on the global visual feature.

    Î_G = ReLU(LN(I_G) · W_down) · W_up                                        (eq. 11)

The paper calls it a depthwise-separable convolution bottleneck but writes eq. 11 with dense
projections. A depthwise convolution needs a spatial axis and the global feature ``I_G`` is a
single vector (a 1×1 map): over it a depthwise k×k kernel reduces to a per-channel scale,
which ``W_down`` already absorbs, and the pointwise convolutions are exactly ``W_down`` and
``W_up``. So we implement eq. 11 as written, with the two projections as pointwise (1×1)
convolutions, i.e. ``nn.Linear``.

Our one addition, configurable: the output mixes the adapted feature with ``I_G`` itself,
``ratio · Î_G + (1 − ratio) · I_G`` (``ratio = 1`` is eq. 11 exactly; the default 0.2 follows
CLIP-Adapter so an untrained adapter starts close to zero-shot CLIP).
"""

from __future__ import annotations

import torch
from torch import nn

from kanoclip.config import AdapterConfig


class ConvAdapter(nn.Module):
    """``(B, C) -> (B, C)``: LN → W_down (C→d) → ReLU → W_up (d→C), residual-mixed.

    Args:
        feature_dim: C, the global feature's width.
        config: ``bottleneck`` d (None: C // 4, at least 1) and the mixing ``ratio``.
    """

    def __init__(self, feature_dim: int, config: AdapterConfig) -> None:
        super().__init__()
        bottleneck = config.bottleneck or max(1, feature_dim // 4)
        self.ratio = config.ratio
        self.norm = nn.LayerNorm(feature_dim)
        self.down = nn.Linear(feature_dim, bottleneck)
        self.up = nn.Linear(bottleneck, feature_dim)

    def forward(self, global_feature: torch.Tensor) -> torch.Tensor:
        """Eq. 11 mixed with its input: ``ratio · Î_G + (1 − ratio) · I_G``.

        Args:
            global_feature: (B, C) I_G, the global visual feature.

        Returns:
            (B, C) the adapted global feature.
        """
        adapted = self.up(torch.relu(self.down(self.norm(global_feature))))
        return self.ratio * adapted + (1.0 - self.ratio) * global_feature
