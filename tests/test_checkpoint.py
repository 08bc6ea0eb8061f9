"""Checkpoint paths: a local folder that is missing is reported as such, in the caller's language."""

from __future__ import annotations

from pathlib import Path

import pytest

from kanoclip.checkpoint import resolve_checkpoint
from kanoclip.errors import CheckpointError


@pytest.mark.parametrize("path", ["./checkpoints/mine", "/abs/path", "~/x-no-such-checkpoint", "checkpoints/mine"])
def test_missing_local_checkpoint_is_no_such_folder(path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()  # so "checkpoints/mine" names a folder here, not a hub repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(path, cache_dir=tmp_path / "hub")
    message = str(info.value)
    assert "no such folder" in message and path in message
    assert "hf download" not in message and "cache" not in message  # not treated as a hub repo
    assert "checkpoint=" in message
    assert "checkpoint=" not in info.value.message(flags=True) and "--checkpoint" in info.value.message(flags=True)


def test_uncached_hub_checkpoint_names_the_api_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no "someone/" folder here: a hub id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("someone/not-cached", cache_dir=tmp_path / "hub")
    assert "HF_HUB_OFFLINE" in str(info.value) and "hf download someone/not-cached" in str(info.value)
    assert str(info.value).endswith("pass the folder as checkpoint=")
    assert info.value.message(flags=True).endswith("pass the folder as --checkpoint")


def test_file_and_pickle_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle"):
        resolve_checkpoint(weights)
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(plain)
