"""The app's shared state (demo/state.py): the model registry's bounds and the knowledge versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from demo.state import AppConfig, KnowledgeStore, ModelRegistry
from kanoclip import KAnoCLIP


@pytest.fixture(scope="module")
def two_checkpoints(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoints/a and checkpoints/b, trained-mode models on two copies of the tiny backbone."""
    root = tmp_path_factory.mktemp("registry")
    for name in ("a", "b"):
        backbone = shutil.copytree(tiny_backbone, root / f"backbone-{name}")
        KAnoCLIP.for_training(backbone=str(backbone), device="cpu").save_pretrained(root / "checkpoints" / name)
    return root


def registry_of(root: Path, **options) -> ModelRegistry:
    config = AppConfig(device="cpu", checkpoints_dir=root / "checkpoints", kb_dir=root / "kb", **options)
    knowledge = KnowledgeStore(config)
    registry = ModelRegistry(config, knowledge)
    knowledge.registry = registry
    return registry


def test_a_backbone_leaves_memory_with_the_last_model_using_it(two_checkpoints: Path):
    registry = registry_of(two_checkpoints, max_models=1)
    first = registry.get("checkpoints/a")
    assert [b.name for b in registry._backbones.values()] == [first.backbone_name]
    second = registry.get("checkpoints/b")  # evicts a, and a's backbone with it
    assert registry.loaded() == [second]
    assert [b.name for b in registry._backbones.values()] == [second.backbone_name]
    assert first.backbone_name != second.backbone_name


def test_a_model_behind_the_knowledge_version_takes_the_given_knowledge_base(two_checkpoints: Path):
    """What a ZeroGPU worker does: its models were loaded at the fork, the app's edits come with the call."""
    registry = registry_of(two_checkpoints)
    model = registry.get("checkpoints/a")
    version, kb = registry.knowledge.versioned()
    edited = kb.copy()
    edited.set_general("space widget", ["a bent space widget"])
    assert registry.get("checkpoints/a", (version, kb)).knowledge.resolve("space widget") is None
    assert registry.get("checkpoints/a", (version + 1, edited)) is model
    assert model.knowledge.resolve("space widget") == "space_widget"
    edited.set_general("space widget", ["changed after it was given"])  # the model holds its own copy
    assert model.knowledge.to_dict() != edited.to_dict()


def test_edits_reach_the_loaded_models_and_count_as_versions(two_checkpoints: Path):
    registry = registry_of(two_checkpoints)
    model = registry.get("checkpoints/a")
    before = registry.knowledge.version
    registry.knowledge.edit(lambda kb: kb.set_general("space widget", ["a bent space widget"]))
    assert registry.knowledge.version == before + 1 and model.knowledge.resolve("space widget") == "space_widget"


def test_on_a_public_app_a_visitors_pick_never_evicts_a_loaded_model(two_checkpoints: Path):
    from demo.access import AccessConfig
    from kanoclip.errors import InputError

    registry = registry_of(two_checkpoints, max_models=1, access=AccessConfig(public=True))
    first = registry.get("checkpoints/a")  # room: a visitor's pick loads it
    with pytest.raises(InputError, match=r"holds as many models as it may \(KANOCLIP_MAX_MODELS=1\).*checkpoints/a'$"):
        registry.get("checkpoints/b")
    assert registry.loaded() == [first]  # the others' model is still there
    assert registry.get("checkpoints/b", owner=True).checkpoint_name.endswith("checkpoints/b")  # the owner may
    assert registry.loaded() != [first]
