"""The backbone's real loading path: local folder, hub cache, and fast clear failures."""

from __future__ import annotations

import time

import pytest
import torch

from kanoclip.backbone import load_backbone, resolve_backbone
from kanoclip.errors import BackboneError

from conftest import TINY_REPO_ID


def test_local_folder_loads_frozen_in_eval_mode(tiny_backbone):
    backbone = load_backbone(str(tiny_backbone))
    assert backbone.random_init is True
    assert backbone.image_size == 112
    assert not backbone.model.training
    assert all(not p.requires_grad for p in backbone.model.parameters())
    # the real OpenAI tokenizer, not a stand-in
    assert backbone.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_hub_id_resolves_from_the_local_cache_offline(fake_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve_backbone(TINY_REPO_ID, cache_dir=str(fake_hub_cache))
    assert folder.is_relative_to(fake_hub_cache)
    backbone = load_backbone(TINY_REPO_ID, cache_dir=str(fake_hub_cache))
    assert backbone.name == TINY_REPO_ID
    assert backbone.model.config.vision_config.num_hidden_layers == 8


@pytest.mark.parametrize("offline", ["1", "0"])
def test_uncached_hub_id_fails_fast_with_the_fix(offline, monkeypatch, tmp_path):
    """Offline or unreachable: one line naming the backbone and the fix, within seconds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.monotonic()
    with pytest.raises(BackboneError) as info:
        load_backbone("openai/clip-vit-large-patch14-336", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "openai/clip-vit-large-patch14-336" in message
    assert "backbone=" in message and "--backbone" not in message  # the API's own argument
    assert "KANOCLIP_BACKBONE" in message and "download" in message
    assert "\n" not in message
    assert "point --backbone / KANOCLIP_BACKBONE" in info.value.message(flags=True)  # how the CLI prints it


@pytest.mark.parametrize("path", ["./clip-folder", "/no/such/clip", "~/no-such-clip-here", "sub/dir/clip"])
def test_missing_local_folder_is_no_such_folder(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackboneError) as info:
        resolve_backbone(path, cache_dir=str(tmp_path))
    message = str(info.value)
    assert "no such folder" in message and path in message and "backbone=" in message
    assert "hf download" not in message  # not mistaken for a hub repo


def test_hub_like_path_beside_an_existing_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(BackboneError, match="no such folder"):
        resolve_backbone("models/clip", cache_dir=str(tmp_path))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(str(tmp_path))


def test_env_variable_is_read_by_from_pretrained_not_by_the_config(monkeypatch, tiny_backbone):
    """``$KANOCLIP_BACKBONE`` is read once, by the entry point (``from_pretrained``): a config
    built anywhere else is the same whatever the environment holds."""
    from kanoclip import KAnoCLIP
    from kanoclip.config import KAnoCLIPConfig

    monkeypatch.setenv("KANOCLIP_BACKBONE", str(tiny_backbone))
    assert KAnoCLIPConfig().backbone == "openai/clip-vit-large-patch14-336"
    assert KAnoCLIP.from_pretrained(device="cpu").backbone_name == str(tiny_backbone)


def test_random_backbone_is_deterministic(tmp_path, tiny_backbone):
    from kanoclip.backbone import make_random_backbone

    from conftest import TOKENIZER

    again = make_random_backbone(tmp_path / "again", TOKENIZER, architecture="tiny", seed=0)
    a = load_backbone(str(tiny_backbone)).model.state_dict()
    b = load_backbone(str(again)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
