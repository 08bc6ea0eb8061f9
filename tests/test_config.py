"""Config sections: __post_init__ validation, and checkpoint round-trips through to_dict/from_dict."""

from __future__ import annotations

import pytest

from kanoclip.config import (
    AdapterConfig,
    BiCMCIConfig,
    CacheConfig,
    KAnoCLIPConfig,
    LossConfig,
    PromptConfig,
    ReferenceConfig,
    ScoringConfig,
    TrainingFreeConfig,
    VVConfig,
    flatten_overrides,
    with_overrides,
)


@pytest.mark.parametrize(
    ("build", "field", "value"),
    [
        (lambda: BiCMCIConfig(dim=30, num_heads=4), "dim", "30"),
        (lambda: BiCMCIConfig(dim=0), "bicmci.dim", "0"),
        (lambda: BiCMCIConfig(num_heads=-2), "bicmci.num_heads", "-2"),
        (lambda: BiCMCIConfig(deform_stride=0), "bicmci.deform_stride", "0"),
        (lambda: BiCMCIConfig(offset_range=float("nan")), "bicmci.offset_range", "nan"),
        (lambda: VVConfig(num_replaced_blocks=0), "vv.num_replaced_blocks", "0"),
        (lambda: VVConfig(stage_layers=(6, 3)), "vv.stage_layers", "(6, 3)"),
        (lambda: VVConfig(stage_layers=(0, 3)), "vv.stage_layers", "(0, 3)"),
        (lambda: VVConfig(position_interpolation="nearest"), "vv.position_interpolation", "'nearest'"),
        (lambda: AdapterConfig(ratio=1.5), "adapter.ratio", "1.5"),
        (lambda: AdapterConfig(bottleneck=-1), "adapter.bottleneck", "-1"),
        (lambda: LossConfig(gamma=-1.0), "loss.gamma", "-1.0"),
        (lambda: LossConfig(local_loss="sum"), "loss.local_loss", "'sum'"),
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


@pytest.mark.parametrize(
    ("build", "field", "value"),
    [
        (lambda: PromptConfig(n_ctx=0), "prompts.n_ctx", "0"),
        (lambda: PromptConfig(normal_adjectives=()), "prompts.normal_adjectives", "()"),
        (lambda: ScoringConfig(temperature=0.0), "scoring.temperature", "0.0"),
        (lambda: ScoringConfig(sigma=-1.0), "scoring.sigma", "-1.0"),
        (lambda: ScoringConfig(threshold=1.5), "scoring.threshold", "1.5"),
        (lambda: TrainingFreeConfig(stage_weights=(0, 0)), "training_free.stage_weights", "(0.0, 0.0)"),
        (lambda: TrainingFreeConfig(templates=("no placeholder",)), "training_free.templates", "no placeholder"),
        (lambda: CacheConfig(max_classes=0), "cache.max_classes", "0"),
        (lambda: ReferenceConfig(weight=2.0), "references.weight", "2.0"),
    ],
)
def test_every_section_names_its_dotted_path_and_the_value(build, field, value):
    """The name in the message is what --set takes (section.field)."""
    with pytest.raises(ValueError) as info:
        build()
    assert field in str(info.value) and value in str(info.value)


def test_overrides_coerce_text_and_refuse_unknown_keys():
    config = with_overrides(
        KAnoCLIPConfig(),
        {"training_free.stage_weights": "1,0,0,1", "scoring.sigma": "2", "training_free.use_descriptions": "false"},
    )
    assert config.training_free.stage_weights == (1.0, 0.0, 0.0, 1.0) and config.scoring.sigma == 2.0
    assert config.training_free.use_descriptions is False
    with pytest.raises(
        ValueError, match="unknown config key 'scoring.sigmaa'; scoring keys: temperature, sigma, threshold"
    ):
        with_overrides(KAnoCLIPConfig(), {"scoring.sigmaa": 1})
    with pytest.raises(ValueError, match="image_size must be int"):
        with_overrides(KAnoCLIPConfig(), {"image_size": "1.5"})
    assert flatten_overrides({"kanoclip_config_version": 2, "scoring": {"sigma": 1}, "image_size": 518}) == {
        "scoring.sigma": 1,
        "image_size": 518,
    }


def test_a_version_1_config_loads_without_its_old_training_free_template():
    data = KAnoCLIPConfig().to_dict()
    data["kanoclip_config_version"] = 1
    data["prompts"]["normal_template"] = "a photo of a {adjective} {class_name}."
    assert KAnoCLIPConfig.from_dict(data).prompts == PromptConfig()
