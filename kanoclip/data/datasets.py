"""Listing the test split of the paper's datasets, and reading their masks.

``load_dataset(kind, root)`` lists the samples of one dataset in its publisher's
layout (see ``docs/datasets.md``); ``detect_kind(root)`` recognises the layout;
``parse_data_arg("mvtec=PATH")`` parses the CLI's ``--data`` values. Listing never
decodes an image: :func:`verify_images` does that, on request, and reports every
unreadable file by path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from kanoclip.data import layouts
from kanoclip.data.layouts import natural_key
from kanoclip.data.sample import Sample, binarize_mask, read_mask_array
from kanoclip.errors import DatasetError, InputError

KINDS = (
    "mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "brainmri", "liverct", "resc",
    "br35h", "covid19", "headct", "mtd", "folder",
)

_READERS: dict[str, Callable[[Path], list[Sample]]] = {
    "mvtec": layouts.read_mvtec,
    "visa": layouts.read_visa,
    "mpdd": layouts.read_mpdd,
    "btad": layouts.read_btad,
    "sdd": layouts.read_sdd,
    "dagm": layouts.read_dagm,
    "brainmri": lambda root: layouts.read_yes_no("brainmri", root),
    "br35h": lambda root: layouts.read_yes_no("br35h", root),
    "liverct": lambda root: layouts.read_bmad("liverct", root),
    "resc": lambda root: layouts.read_bmad("resc", root),
    "covid19": layouts.read_covid,
    "headct": layouts.read_headct,
    "mtd": layouts.read_mtd,
    "folder": layouts.read_folder,
}

_MATCHES: dict[str, Callable[[Path], bool]] = {
    "mvtec": layouts.is_mvtec_tree,
    "visa": layouts.is_visa,
    "mpdd": layouts.is_mvtec_tree,
    "btad": layouts.is_btad_tree,
    "sdd": layouts.is_sdd,
    "dagm": layouts.is_dagm,
    "brainmri": layouts.is_yes_no,
    "br35h": layouts.is_yes_no,
    "liverct": layouts.is_bmad,
    "resc": layouts.is_bmad,
    "covid19": layouts.is_covid,
    "headct": layouts.is_headct,
    "mtd": layouts.is_mtd,
    "folder": layouts.is_folder,
}

# Spellings accepted for a kind, compared without case, '-' or '_'.
_ALIASES = {
    "mvtecad": "mvtec", "ksdd": "sdd", "kolektorsdd": "sdd", "dagm2007": "dagm",
    "brain": "brainmri", "covid": "covid19", "mtdd": "mtd", "magnetictile": "mtd",
}


# ----------------------------------------------------------------- kinds and roots


def _normalise_kind(kind: str) -> str | None:
    key = re.sub(r"[-_\s]", "", kind.strip().lower())
    if key in KINDS:
        return key
    return _ALIASES.get(key)


def _check_kind(kind: str) -> str:
    canonical = _normalise_kind(kind)
    if canonical is None:
        raise InputError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    return canonical


def _existing_folder(root: str | os.PathLike[str], what: str) -> Path:
    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{what} at {path}: {state}; pass the folder the dataset archive unpacks to")
    return path


def _locate(root: Path, matches: Callable[[Path], bool]) -> Path:
    """``root`` if it matches, else its only sub-folder that matches, else ``root``."""
    if matches(root):
        return root
    hits = [folder for folder in layouts.subdirs(root) if matches(folder)]
    return hits[0] if len(hits) == 1 else root


def _yes_no_kind(folder: Path) -> str:
    """Br35H (its ``no/`` files are ``no0.jpg`` ..., and it ships ``pred/``) or BrainMRI."""
    if layouts.child(folder, "pred") is not None:
        return "br35h"
    names = [path.name for path in layouts.images(layouts.child(folder, "no"))]
    numbered = sum(bool(re.fullmatch(r"no\d+\.jpe?g", name)) for name in names)
    return "br35h" if names and numbered * 2 > len(names) else "brainmri"


def _bmad_kind(folder: Path) -> str:
    """LiverCT or RESC, from the folder's name or a parent's (``Liver``, ``RESC``, ``Retina_RESC``)."""
    for part in reversed(folder.parts):
        name = part.lower()
        if "liver" in name:
            return "liverct"
        if "resc" in name or "retina" in name:
            return "resc"
    raise DatasetError(
        f"dataset at {folder}: the BMAD layout (test/good/img, test/Ungood/img) is shared by "
        f"liverct and resc and the folder name does not say which; pass liverct={folder} or resc={folder}"
    )


# The order matters where layouts overlap: BMAD has test/good like MVTec; COVID has Normal/.
_DETECTORS: tuple[tuple[Callable[[Path], bool], Callable[[Path], str]], ...] = (
    (layouts.is_visa, lambda folder: "visa"),
    (layouts.is_bmad, _bmad_kind),
    (layouts.is_btad_tree, lambda folder: "btad"),
    (layouts.is_mvtec_tree, lambda folder: "mpdd" if layouts.is_mpdd_tree(folder) else "mvtec"),
    (layouts.is_dagm, lambda folder: "dagm"),
    (layouts.is_sdd, lambda folder: "sdd"),
    (layouts.is_mtd, lambda folder: "mtd"),
    (layouts.is_headct, lambda folder: "headct"),
    (layouts.is_covid, lambda folder: "covid19"),
    (layouts.is_yes_no, _yes_no_kind),
    (layouts.is_folder, lambda folder: "folder"),
)


def _detect_here(folder: Path) -> str | None:
    for matches, kind_of in _DETECTORS:
        if matches(folder):
            return kind_of(folder)
    return None


def detect_kind(root: str | os.PathLike[str]) -> str:
    """The dataset kind whose layout ``root`` (or its only matching sub-folder) has.

    Raises :class:`DatasetError` listing what was found when no layout matches, or when
    several sub-folders hold different datasets.
    """
    path = _existing_folder(root, "dataset")
    kind = _detect_here(path)
    if kind is not None:
        return kind
    hits = [(folder, found) for folder in layouts.subdirs(path) if (found := _detect_here(folder))]
    if len(hits) == 1:
        return hits[0][1]
    if hits:
        listing = ", ".join(f"{folder.name}/ ({found})" for folder, found in hits)
        raise DatasetError(f"dataset at {path}: holds several datasets, {listing}; pass one of those folders")
    raise DatasetError(
        f"dataset at {path}: no known layout, found {layouts.describe(path)}; "
        f"pass KIND=PATH with KIND one of {', '.join(KINDS)} (layouts in docs/datasets.md)"
    )


def parse_data_arg(spec: str) -> tuple[str, Path]:
    """``"mvtec=PATH"`` -> ``("mvtec", PATH)``; a bare ``"PATH"`` has its kind detected.

    A ``NAME=`` prefix that is not a path and not a known kind raises :class:`InputError`
    listing the valid kinds; a missing folder raises :class:`DatasetError`.
    """
    text = str(spec).strip()
    if not text:
        raise InputError(f"empty dataset argument; use KIND=PATH with KIND one of {', '.join(KINDS)}, or PATH")
    name, sep, rest = text.partition("=")
    is_folder_name = Path(text).expanduser().is_dir() and _normalise_kind(name) is None
    if sep and not re.search(r"[/\\]", name) and not is_folder_name:
        kind = _check_kind(name)
        if not rest.strip():
            raise InputError(f"dataset argument {text!r} has no path after '='; use {kind}=PATH")
        path = _existing_folder(rest.strip(), f"{kind} dataset")
        return kind, path
    path = _existing_folder(text, "dataset")
    return detect_kind(path), path


# ------------------------------------------------------------------------ listing


def load_dataset(kind: str | None, root: str | os.PathLike[str]) -> list[Sample]:
    """The test-split samples of the dataset at ``root``, sorted by class then path.

    ``kind`` None detects it (:func:`detect_kind`). ``root`` may also be a folder whose
    only sub-folder in the layout is the dataset (an archive's wrapper folder).
    """
    if kind is None:
        kind = detect_kind(root)
    kind = _check_kind(kind)
    path = _existing_folder(root, f"{kind} dataset")
    samples = _READERS[kind](_locate(path, _MATCHES[kind]))
    if not samples:
        raise DatasetError(f"{kind} dataset at {path}: the layout matches but holds no images; check the folder")
    return sorted(samples, key=lambda s: (natural_key(s.class_name), natural_key(s.image.as_posix())))


def load_train_normals(kind: str | None, root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """``{class: normal training images}`` of the dataset at ``root``; ``{}`` where it has no train split.

    The k-shot protocol (``kanoclip eval --shots``) draws its references from here, as WinCLIP does,
    and from the test split's normal images (left out of that run's test set) where this is empty.
    """
    if kind is None:
        kind = detect_kind(root)
    kind = _check_kind(kind)
    path = _existing_folder(root, f"{kind} dataset")
    found = layouts.train_normals(kind, _locate(path, _MATCHES[kind]))
    return {name: sorted(paths, key=lambda p: natural_key(p.as_posix())) for name, paths in found.items()}


def group_by_class(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Samples by class name, classes in natural order, samples in their given order."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.class_name, []).append(sample)
    return {name: groups[name] for name in sorted(groups, key=natural_key)}


def summarize(samples: Iterable[Sample]) -> dict[str, dict[str, int]]:
    """``{class: {"n_normal": .., "n_anomalous": .., "n_masks": ..}}`` in class order."""
    return {
        name: {
            "n_normal": sum(s.label == 0 for s in group),
            "n_anomalous": sum(s.label == 1 for s in group),
            "n_masks": sum(s.mask is not None for s in group),
        }
        for name, group in group_by_class(samples).items()
    }


# ------------------------------------------------------------------------- reading


def load_mask(sample: Sample, size: tuple[int, int] | None = None) -> np.ndarray:
    """The pixel ground truth of ``sample`` as a bool ``(H, W)`` array.

    ``size`` is ``(H, W)``; None keeps the mask's own size (a normal sample without a
    mask then needs ``size``). Pixels above 127 are anomalous (MTD masks have grey
    fringes), or above 0 in masks with no value over 127 (VisA's 0/1 masks); the mask
    is resized with nearest-neighbour when its size differs. A sample without a mask
    (every normal sample) gives all False.
    """
    if size is not None:
        if len(size) != 2 or any(int(v) != v or v < 1 for v in size):
            raise InputError(f"mask size {size!r} is not (height, width) in positive integers; pass e.g. (336, 336)")
        height, width = int(size[0]), int(size[1])
    if sample.mask is None:
        if size is None:
            raise InputError(f"{sample.image} has no mask, so load_mask needs size=(height, width)")
        return np.zeros((height, width), dtype=bool)
    mask = binarize_mask(read_mask_array(sample.mask))
    if size is None or mask.shape == (height, width):
        return mask
    grey = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(grey.resize((width, height), Image.Resampling.NEAREST)) > 127


def verify_images(samples: Iterable[Sample], *, decode: bool = False) -> list[tuple[Path, str]]:
    """``(path, reason)`` for every image or mask of ``samples`` that cannot be read.

    Each file is checked with PIL's ``Image.verify()`` (headers and, for PNG, checksums);
    ``decode=True`` also decodes every pixel, which catches truncated JPEGs but is slow.
    Callers report the failures by path; nothing is dropped here.
    """
    failures: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for sample in samples:
        for path in (sample.image, sample.mask):
            if path is None or path in seen:
                continue
            seen.add(path)
            reason = _unreadable(path, decode)
            if reason is not None:
                failures.append((path, reason))
    return failures


def _unreadable(path: Path, decode: bool) -> str | None:
    """Why ``path`` cannot be decoded, in one line, or None if it can."""
    try:
        with Image.open(path) as image:
            image.verify()
        if decode:
            with Image.open(path) as image:
                image.load()
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # PIL raises many types for corrupt files
        text = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return None
