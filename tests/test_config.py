"""Config sections: __post_init__ validation, and checkpoint round-trips through to_dict/from_dict."""

from __future__ import annotations

import pytest

from kanoclip.config import AdapterConfig, BiCMCIConfig, KAnoCLIPConfig, LossConfig, VVConfig


@pytest.mark.parametrize(
    ("build", "field", "value"),
    [
        (lambda: BiCMCIConfig(dim=30, num_heads=4), "dim", "30"),
        (lambda: BiCMCIConfig(dim=0), "BiCMCIConfig.dim", "0"),
        (lambda: BiCMCIConfig(num_heads=-2), "BiCMCIConfig.num_heads", "-2"),
        (lambda: BiCMCIConfig(deform_stride=0), "BiCMCIConfig.deform_stride", "0"),
        (lambda: BiCMCIConfig(offset_range=float("nan")), "BiCMCIConfig.offset_range", "nan"),
        (lambda: VVConfig(num_replaced_blocks=0), "VVConfig.num_replaced_blocks", "0"),
        (lambda: VVConfig(stage_layers=(6, 3)), "VVConfig.stage_layers", "(6, 3)"),
        (lambda: VVConfig(stage_layers=(0, 3)), "VVConfig.stage_layers", "(0, 3)"),
        (lambda: VVConfig(position_interpolation="nearest"), "VVConfig.position_interpolation", "'nearest'"),
        (lambda: AdapterConfig(ratio=1.5), "AdapterConfig.ratio", "1.5"),
        (lambda: AdapterConfig(bottleneck=-1), "AdapterConfig.bottleneck", "-1"),
        (lambda: LossConfig(gamma=-1.0), "LossConfig.gamma", "-1.0"),
        (lambda: LossConfig(local_loss="sum"), "LossConfig.local_loss", "'sum'"),
    ],
)
def test_bad_values_raise_naming_the_field_and_value(build, field, value):
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert field in message and value in message and "\n" not in message


def test_valid_values_are_kept():
    assert BiCMCIConfig(dim=32, num_heads=8).dim == 32
    assert VVConfig(stage_layers=[2, 4]).stage_layers == (2, 4)  # a JSON list becomes a tuple
    assert VVConfig(position_interpolation="bilinear").position_interpolation == "bilinear"
    assert LossConfig(alpha=0.0, local_loss="per_stage").local_loss == "per_stage"
    assert AdapterConfig(ratio=1.0, bottleneck=0).ratio == 1.0


def test_new_fields_round_trip_through_a_checkpoint_dict():
    config = KAnoCLIPConfig(
        backbone="tiny",
        vv=VVConfig(position_interpolation="bilinear"),
        bicmci=BiCMCIConfig(residual_logits=True),
        loss=LossConfig(local_loss="per_stage"),
    )
    again = KAnoCLIPConfig.from_dict(config.to_dict())
    assert again == config
    assert (
        again.vv.position_interpolation == "bilinear"
        and again.bicmci.residual_logits
        and again.loss.local_loss == "per_stage"
    )


def test_a_config_written_before_the_new_fields_loads_with_the_defaults():
    old = KAnoCLIPConfig(backbone="tiny").to_dict()
    del old["vv"]["position_interpolation"], old["bicmci"]["residual_logits"], old["loss"]["local_loss"]
    loaded = KAnoCLIPConfig.from_dict(old, source="old-checkpoint")
    assert loaded.vv.position_interpolation == "bicubic"
    assert loaded.bicmci.residual_logits is False
    assert loaded.loss.local_loss == "mean"
