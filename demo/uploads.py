"""Training data from the web: paths confined to the data root, and zip archives checked before use.

Two ways for a visitor to name training data, both refused unless safe:

* :func:`confine` — a folder under the app's data root. No ``..`` component, no absolute
  path outside the root, and no symlink that leads out of it (the resolved path must stay
  inside the resolved root).
* :func:`check_zip` / :func:`extract_zip` — an uploaded zip. Every entry is checked *before*
  anything is written: the archive's size, the number of entries, the total uncompressed size,
  the compression ratio (zip bombs), path traversal (``../x``), absolute names (``/etc/x``,
  ``C:\\x``), symlinks and other special files, encrypted and duplicate entries. Extraction
  then counts the bytes it really writes, so an archive whose headers lie is stopped too.
* :func:`discard_upload` — an upload is deleted from Gradio's upload folder once processed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kanoclip.errors import InputError

GB = 1024**3
MB = 1024**2
_SKIPPED_PREFIXES = ("__MACOSX/",)  # macOS resource forks: not data, and they confuse layout detection
_CHUNK = 1 * MB


@dataclass(frozen=True)
class ZipLimits:
    """Size limits of an uploaded archive."""

    max_compressed: int = 2 * GB  # the archive file itself
    max_uncompressed: int = 4 * GB  # all entries together, as declared and as really written
    max_entries: int = 100_000
    max_ratio: float = 200.0  # uncompressed / compressed, per large entry and for the whole archive
    ratio_min_size: int = 1 * MB  # smaller entries are not ratio-checked (tiny files compress well)

    def describe(self) -> str:
        """The limits a visitor needs to know, e.g. ``≤ 2 GB, ≤ 4 GB unpacked, ≤ 100,000 entries``."""
        return (
            f"≤ {self.max_compressed / GB:g} GB, ≤ {self.max_uncompressed / GB:g} GB unpacked, "
            f"≤ {self.max_entries:,} entries"
        )


@dataclass(frozen=True)
class ZipSummary:
    """What :func:`check_zip` found: the entries to extract and their sizes."""

    files: int
    folders: int
    uncompressed: int
    compressed: int


def _size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.1f} MB"


def _entry_parts(name: str) -> tuple[str, ...]:
    """The path components of a zip entry name; :class:`InputError` if it is absolute or escapes."""
    if "\x00" in name:
        raise InputError(f"zip entry {name!r} has a NUL character in its name; the archive is refused")
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise InputError(f"zip entry {name!r} has an absolute path; entries must be relative (the archive is refused)")
    parts = tuple(p for p in PurePosixPath(normalised).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise InputError(f"zip entry {name!r} points outside the archive ('..'); the archive is refused")
    if not parts:
        raise InputError(f"zip entry {name!r} has an empty name; the archive is refused")
    return parts


def _is_special(info: zipfile.ZipInfo) -> str | None:
    """``'symlink'`` / ``'special file'`` for entries that are not plain files or folders (Unix mode bits)."""
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no Unix type recorded (Windows tools, Python's writestr)
        return None
    if kind == stat.S_IFLNK:
        return "symlink"
    return "special file (device, FIFO or socket)"


def skipped_entry(name: str) -> bool:
    """Whether a zip entry is left out (macOS resource forks): never data."""
    return name.replace("\\", "/").startswith(_SKIPPED_PREFIXES)


def check_zip(path: str | os.PathLike[str], limits: ZipLimits = ZipLimits()) -> ZipSummary:
    """Check an uploaded zip without extracting anything; :class:`InputError` naming the first problem."""
    path = Path(path)
    try:
        archive_size = path.stat().st_size
    except OSError:
        raise InputError(f"uploaded file {path.name} cannot be read; upload it again") from None
    if archive_size > limits.max_compressed:
        raise InputError(
            f"the zip is {_size(archive_size)}, over the {_size(limits.max_compressed)} limit; upload a smaller archive"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise InputError(f"{path.name} is not a valid zip archive; upload a .zip file") from None
    if len(infos) > limits.max_entries:
        raise InputError(
            f"the zip has {len(infos)} entries, over the {limits.max_entries} limit; split it or upload fewer files"
        )
    seen: set[tuple[str, ...]] = set()
    files = folders = total = compressed = 0
    for info in infos:
        parts = _entry_parts(info.filename)
        special = _is_special(info)
        if special:
            raise InputError(f"zip entry {info.filename!r} is a {special}; only plain files and folders are accepted")
        if info.flag_bits & 0x1:
            raise InputError(f"zip entry {info.filename!r} is encrypted; upload an unencrypted archive")
        key = tuple(p.lower() for p in parts)
        if key in seen and not info.is_dir():
            raise InputError(f"zip entry {info.filename!r} appears twice; the archive is refused")
        seen.add(key)
        if info.is_dir():
            folders += 1
            continue
        if skipped_entry(info.filename):
            continue
        files += 1
        total += info.file_size
        compressed += info.compress_size
        if total > limits.max_uncompressed:
            raise InputError(f"the zip unpacks to more than {_size(limits.max_uncompressed)}; upload a smaller archive")
        if info.file_size >= limits.ratio_min_size and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise InputError(
                f"zip entry {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                f"(over {limits.max_ratio:.0f}x): a possible zip bomb; the archive is refused"
            )
    if total >= limits.ratio_min_size and total > limits.max_ratio * max(archive_size, 1):
        raise InputError(
            f"the zip expands {total / max(archive_size, 1):.0f}x (over {limits.max_ratio:.0f}x): "
            "a possible zip bomb; the archive is refused"
        )
    if files == 0:
        raise InputError(f"{path.name} holds no files; upload a dataset archive")
    return ZipSummary(files=files, folders=folders, uncompressed=total, compressed=compressed)


def extract_zip(path: str | os.PathLike[str], dest: str | os.PathLike[str], limits: ZipLimits = ZipLimits()) -> Path:
    """Check the zip (:func:`check_zip`), then extract it into the empty folder ``dest``.

    Bytes are counted while writing: an entry larger than its header says, or a total over
    the limit, stops the extraction and removes ``dest``'s content.
    """
    check_zip(path, limits)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise InputError(f"extraction folder {dest} is not empty")
    written = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if skipped_entry(info.filename):
                    continue
                target = dest.joinpath(*_entry_parts(info.filename))
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                entry = 0
                with archive.open(info) as source, open(target, "xb") as sink:
                    while chunk := source.read(_CHUNK):
                        entry += len(chunk)
                        written += len(chunk)
                        if entry > info.file_size or written > limits.max_uncompressed:
                            raise InputError(
                                f"zip entry {info.filename!r} holds more data than its header declares; "
                                "the archive is refused"
                            )
                        sink.write(chunk)
    except InputError:
        _empty(dest)
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        _empty(dest)
        raise InputError(
            f"{Path(path).name} cannot be extracted ({type(exc).__name__}); the archive may be corrupt"
        ) from None
    return dest


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def discard_upload(path: str | os.PathLike[str], upload_root: str | os.PathLike[str]) -> bool:
    """Delete an uploaded file once it is processed, with its folder when that is left empty.

    Only a file inside ``upload_root`` (Gradio's upload folder) is deleted, never a file the
    app was pointed at elsewhere. Returns whether something was deleted. Gradio's own
    ``delete_cache`` removes whatever is left behind later; this frees the disk at once.
    """
    root = Path(upload_root).resolve()
    file = Path(path).resolve()
    if not file.is_relative_to(root) or file == root or not file.is_file():
        return False
    file.unlink(missing_ok=True)
    if file.parent != root:
        with contextlib.suppress(OSError):  # not empty: another upload shares it
            file.parent.rmdir()
    return True


def confine(
    root: str | os.PathLike[str],
    user_path: str,
    *,
    what: str = "folder",
    must_exist: bool = True,
    root_name: str = "data root",
) -> Path:
    """``user_path`` (relative to ``root``, or absolute inside it) resolved and checked to stay under ``root``.

    Refused: an empty path, any ``..`` component, an absolute path outside ``root``, and a path
    that leaves ``root`` through a symlink. With ``must_exist`` the target must be an existing folder.
    """
    text = (user_path or "").strip()
    if not text:
        raise InputError(f"no {what} given; type a path relative to the {root_name}")
    if "\x00" in text:
        raise InputError(f"{what} {text!r} has a NUL character")
    candidate = Path(text).expanduser() if text.startswith("~") else Path(text)
    if any(part == ".." for part in candidate.parts):
        raise InputError(f"{what} {text!r} contains '..'; give a path inside the {root_name}")
    base = Path(root).expanduser().resolve()
    full = candidate if candidate.is_absolute() else base / candidate
    resolved = full.resolve()
    if not resolved.is_relative_to(base):
        lexically_inside = Path(os.path.abspath(full)).is_relative_to(base)
        how = f"leads outside the {root_name} through a symlink" if lexically_inside else f"is outside the {root_name}"
        raise InputError(f"{what} {text!r} {how} ({base}); give a path inside it")
    if must_exist and not resolved.is_dir():
        state = "is a file, not a folder" if resolved.exists() else "does not exist"
        raise InputError(f"{what} {text!r} {state} under the {root_name} {base}")
    return resolved
