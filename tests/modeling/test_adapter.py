"""The Conv-Adapter (eq. 11)."""

from __future__ import annotations

import torch

from kanoclip.config import AdapterConfig
from kanoclip.modeling.adapter import ConvAdapter


def test_adapter_is_eq_11_at_ratio_1():
    torch.manual_seed(0)
    adapter = ConvAdapter(16, AdapterConfig(bottleneck=4, ratio=1.0))
    x = torch.randn(5, 16)
    expected = adapter.up(
        torch.relu(adapter.down(torch.nn.functional.layer_norm(x, (16,), adapter.norm.weight, adapter.norm.bias)))
    )
    torch.testing.assert_close(adapter(x), expected)
    assert adapter.down.out_features == 4


def test_adapter_ratio_mixes_in_the_input():
    torch.manual_seed(0)
    adapter = ConvAdapter(16, AdapterConfig(ratio=0.2))
    assert adapter.down.out_features == 4  # default bottleneck: dim // 4
    x = torch.randn(2, 16)
    full = ConvAdapter(16, AdapterConfig(ratio=1.0))
    full.load_state_dict(adapter.state_dict())
    torch.testing.assert_close(adapter(x), 0.2 * full(x) + 0.8 * x)
