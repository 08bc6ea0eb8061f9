"""Hub ids versus local paths, and the one-line failures of a hub snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from kanoclip.errors import ARG, CheckpointError
from kanoclip.hub import is_local_path, looks_like_repo_id, snapshot


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("openai/clip-vit-large-patch14-336", False),
        ("./clip", True),
        ("/abs/clip", True),
        ("~/clip", True),
        ("a/b/c", True),
        ("clip-folder", True),
    ],
)
def test_local_paths_and_hub_ids(name: str, local: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_local_path(name) is local


def test_owner_name_is_local_when_the_owner_folder_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert looks_like_repo_id("runs/mine") and not is_local_path("runs/mine")
    (tmp_path / "runs").mkdir()
    assert is_local_path("runs/mine")


def test_offline_snapshot_error_carries_its_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        snapshot(
            "someone/x",
            allow_patterns=["*.json"],
            error=CheckpointError,
            what="checkpoint",
            fix=f"set {ARG}",
            argument="checkpoint",
            cache_dir=tmp_path,
        )
    assert info.value.argument == "checkpoint"
    assert (
        str(info.value)
        == "checkpoint 'someone/x' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; set checkpoint="
    )
    assert info.value.message(flags=True).endswith("; set --checkpoint")
