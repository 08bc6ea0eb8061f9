"""Hugging Face Hub repos as local folders, the same way for backbones and checkpoints.

The local hub cache is looked at first. Only when the repo is not cached is the hub
contacted, after one short reachability probe, so that an offline machine fails in seconds
with one clear line instead of after minutes of the hub client's retries.
"""

from __future__ import annotations

import os
from pathlib import Path

from kanoclip.errors import KAnoCLIPError

_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def looks_like_repo_id(name: str) -> bool:
    """``owner/name`` (one slash, not a relative or absolute path)."""
    return name.count("/") == 1 and not name.startswith((".", "~", os.sep)) and not name.endswith("/")


def is_local_path(name: str) -> bool:
    """Whether ``name`` means a local folder rather than a hub repo id.

    A path that is not ``owner/name`` (``./x``, ``/abs/x``, ``~/x``, ``a/b/c``) is local, and so
    is ``owner/name`` when ``owner`` is a folder here (``checkpoints/mine`` beside ``checkpoints/``):
    a missing folder is then reported as such, not as a hub repo to download.
    """
    return not looks_like_repo_id(name) or Path(name).expanduser().parent.is_dir()


def snapshot(
    repo_id: str,
    *,
    allow_patterns: list[str],
    error: type[KAnoCLIPError],
    what: str,
    fix: str,
    argument: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The local snapshot folder of ``repo_id``: from the cache, else downloaded.

    Every failure raises ``error(..., argument=argument)`` with one line:
    ``{what} 'repo' <why>; {fix}`` (``fix`` may name the argument as :data:`kanoclip.errors.ARG`).
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True, allow_patterns=allow_patterns)
        )
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in _OFFLINE_VALUES:
        raise error(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {fix}",
            argument=argument,
        )
    try:  # one request with a short timeout, instead of the hub client's retries
        HfApi().model_info(repo_id, timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable"
        raise error(
            f"{what} {repo_id!r} is not cached and the Hugging Face Hub is not reachable ({type(exc).__name__}); {fix}",
            argument=argument,
        ) from None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=allow_patterns))
    except Exception as exc:  # noqa: BLE001 - any download failure is reported the same way
        raise error(
            f"{what} {repo_id!r} could not be downloaded ({type(exc).__name__}); {fix}", argument=argument
        ) from None
