"""One reader per publisher's folder layout, and the tests that recognise each layout.

Every reader takes the folder the publisher's archive unpacks to and returns the test
split as :class:`~kanoclip.data.sample.Sample` records, without decoding any image.
A folder that does not match raises :class:`~kanoclip.errors.DatasetError` naming
what was expected and what was found; an anomalous image without its mask (where the
layout has masks) raises naming the image. Nothing is ever dropped silently.

Folder names are matched case-insensitively (``YES``/``yes``, ``Ungood``/``ungood``).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kanoclip.data.sample import Sample, is_image, read_mask_array
from kanoclip.errors import DatasetError

MPDD_CLASSES = frozenset(
    {"bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"}
)
_MASK_SUFFIXES = ("_mask", "")  # a mask is <stem>_mask.* or <stem>.*
_SDD_LABEL = re.compile(r"(.+)_label$", re.IGNORECASE)
_SDD_PART_FOLDER = re.compile(r"kos\d+$", re.IGNORECASE)
_DAGM_FOLDER = re.compile(r"class\d+$", re.IGNORECASE)
FOLDER_NORMAL = ("normal", "good")
FOLDER_ANOMALOUS = ("anomalous", "anomaly", "abnormal", "bad", "defect")


# --------------------------------------------------------------------------- helpers


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders ``Class2`` before ``Class10`` and ``Part2`` before ``Part10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _entries(folder: Path | None) -> list[os.DirEntry[str]]:
    """Visible entries of ``folder`` in natural order; empty if it is not a readable folder."""
    if folder is None:
        return []
    try:
        with os.scandir(folder) as scan:
            entries = [entry for entry in scan if not entry.name.startswith(".")]
    except OSError:
        return []
    return sorted(entries, key=lambda entry: natural_key(entry.name))


def subdirs(folder: Path | None) -> list[Path]:
    """Visible sub-folders of ``folder``, naturally sorted."""
    return [Path(entry.path) for entry in _entries(folder) if entry.is_dir()]


def images(folder: Path | None) -> list[Path]:
    """Image files directly in ``folder``, naturally sorted."""
    return [
        Path(entry.path)
        for entry in _entries(folder)
        if entry.is_file() and is_image(Path(entry.name))
    ]


def child(folder: Path | None, *names: str, file: bool = False) -> Path | None:
    """The first of ``names`` present in ``folder`` as a folder (or file), ignoring case."""
    found = {
        entry.name.lower(): Path(entry.path)
        for entry in _entries(folder)
        if (entry.is_file() if file else entry.is_dir())
    }
    for name in names:
        if name.lower() in found:
            return found[name.lower()]
    return None


def descend(folder: Path | None, *names: str) -> Path | None:
    """``folder/names[0]/names[1]/...`` with each step matched ignoring case, or None."""
    for name in names:
        folder = child(folder, name)
    return folder


def stems(folder: Path | None) -> dict[str, Path]:
    """Image files of ``folder`` by lower-case stem (the first in natural order wins)."""
    found: dict[str, Path] = {}
    for path in images(folder):
        found.setdefault(path.stem.lower(), path)
    return found


def describe(folder: Path) -> str:
    """What ``folder`` holds, for error messages: ``only 'a/', 'b.txt'`` and so on."""
    if not folder.exists():
        return "nothing (the folder does not exist)"
    if not folder.is_dir():
        return "a file, not a folder"
    names = [entry.name + ("/" if entry.is_dir() else "") for entry in _entries(folder)]
    if not names:
        return "an empty folder"
    shown = ", ".join(repr(name) for name in names[:8])
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return f"only {shown}{more}"


def layout_error(kind: str, root: Path, expected: str, found: str | None = None) -> DatasetError:
    """``<kind> dataset at <root>: expected <expected>, found <found>``."""
    return DatasetError(f"{kind} dataset at {root}: expected {expected}, found {found or describe(root)}")


def missing_mask(kind: str, root: Path, image: Path, looked: str) -> DatasetError:
    """The error for an anomalous image whose mask is missing (``looked`` says where)."""
    return DatasetError(
        f"{kind} dataset at {root}: anomalous image {image} has no mask ({looked}); "
        "restore the mask from the dataset archive or remove the image"
    )


def missing_listed(kind: str, root: Path, image: Path, where: str) -> DatasetError:
    """The error for an image that a label file (``where``) lists but that is missing."""
    return DatasetError(f"{kind} dataset at {root}: image {image} listed in {where} is missing; re-extract the archive")


def _samples(
    kind: str,
    root: Path,
    files: Iterable[Path],
    class_name: str,
    label: int,
    masks: dict[str, Path] | None = None,
    defect: str = "",
    mask_dir: Path | None = None,
) -> list[Sample]:
    """Samples for ``files``; with ``masks``, each anomalous file needs its mask there.

    ``masks`` maps lower-case stems to mask files (see :func:`stems`); a file is matched
    by ``<stem>_mask`` or ``<stem>``, and one with neither raises naming ``mask_dir``.
    """
    out = []
    for path in files:
        mask = None
        if label and masks is not None:
            keys = [path.stem.lower() + suffix for suffix in _MASK_SUFFIXES]
            mask = next((masks[key] for key in keys if key in masks), None)
            if mask is None:
                raise missing_mask(kind, root, path, f"looked for {path.stem}_mask.* and {path.stem}.* in {mask_dir}")
        out.append(Sample(path, class_name, label, mask, kind, "good" if label == 0 else defect))
    return out


# ------------------------------------------------ MVTec-style trees (mvtec, mpdd, btad)


def _test_children(category: Path) -> set[str]:
    return {folder.name.lower() for folder in subdirs(child(category, "test"))}


def category_dirs(root: Path, matches: Callable[[set[str]], bool]) -> list[Path]:
    """``[root]`` if it is one category (it has ``test/``), else the matching sub-folders.

    ``matches`` sees the lower-case names of the folders in a category's ``test/``.
    """
    if child(root, "test") is not None:
        return [root] if matches(_test_children(root)) else []
    return [folder for folder in subdirs(root) if matches(_test_children(folder))]


def is_mvtec_tree(folder: Path) -> bool:
    """MVTec AD / MPDD: categories whose ``test/`` has ``good/``."""
    return bool(category_dirs(folder, lambda names: "good" in names))


def is_btad_tree(folder: Path) -> bool:
    """BTAD: categories whose ``test/`` has ``ok/`` or ``ko/``."""
    return bool(category_dirs(folder, lambda names: bool(names & {"ok", "ko"})))


def is_mpdd_tree(folder: Path) -> bool:
    """An MVTec-style tree whose categories are all MPDD's."""
    cats = category_dirs(folder, lambda names: "good" in names)
    return bool(cats) and all(cat.name.lower() in MPDD_CLASSES for cat in cats)


def _read_tree(kind: str, root: Path, normal: str, generic_defect: str | None = None) -> list[Sample]:
    """``<cat>/test/<defect>/*`` with the masks of a defect in ``<cat>/ground_truth/<defect>/``."""
    cats = category_dirs(root, bool)
    if not cats:
        raise layout_error(
            kind, root, f"category folders with test/<defect>/ ({normal}/ is normal) and ground_truth/<defect>/"
        )
    out: list[Sample] = []
    for cat in cats:
        for folder in subdirs(child(cat, "test")):
            name = folder.name
            if name.lower() == normal:
                out += _samples(kind, root, images(folder), cat.name, 0)
                continue
            mask_dir = descend(cat, "ground_truth", name)
            out += _samples(
                kind, root, images(folder), cat.name, 1, stems(mask_dir),
                "" if name.lower() == generic_defect else name,
                mask_dir or cat / "ground_truth" / name,
            )
    return out


def read_mvtec(root: Path) -> list[Sample]:
    return _read_tree("mvtec", root, "good")


def read_mpdd(root: Path) -> list[Sample]:
    return _read_tree("mpdd", root, "good")


def read_btad(root: Path) -> list[Sample]:
    """BTAD: ``NN/test/ok`` normal, ``NN/test/ko`` anomalous, masks ``NN/ground_truth/ko/<stem>.*``."""
    return _read_tree("btad", root, "ok", "ko")


# --------------------------------------------------------------------------- VisA


def is_visa(folder: Path) -> bool:
    return (folder / "split_csv" / "1cls.csv").is_file()


def _visa_rows(root: Path, split: str) -> Iterator[tuple[dict[str, str], str]]:
    """The rows of ``split_csv/1cls.csv`` whose split is ``split``, each with its place for messages."""
    table = root / "split_csv" / "1cls.csv"
    if not table.is_file():
        raise layout_error("visa", root, "split_csv/1cls.csv and the class folders (candle/Data/Images/...)")
    required = ["object", "split", "label", "image", "mask"]
    with table.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
        if any(name not in columns for name in required):
            raise DatasetError(
                f"visa split file {table}: expected columns {', '.join(required)}, "
                f"found {', '.join(columns) or 'none'}; restore it from the VisA archive"
            )
        for raw in reader:
            row = {(key or "").strip().lower(): (value or "").strip() for key, value in raw.items()}
            if row["split"].lower() != split:
                continue
            where = f"{table} line {reader.line_num}"
            if row["label"].lower() not in ("normal", "anomaly"):
                raise DatasetError(
                    f"visa split file {where}: label {row['label']!r} is neither 'normal' nor 'anomaly'; fix the row"
                )
            yield row, where


def read_visa(root: Path) -> list[Sample]:
    """VisA: the ``split == test`` rows of ``split_csv/1cls.csv`` (paths relative to ``root``)."""
    out = []
    for row, where in _visa_rows(root, "test"):
        image = root / row["image"]
        if not image.is_file():
            raise missing_listed("visa", root, image, where)
        label = int(row["label"].lower() == "anomaly")
        mask = root / row["mask"] if label and row["mask"] else None
        if label and (mask is None or not mask.is_file()):
            raise missing_mask("visa", root, image, f"{mask or 'none listed'} in {where}")
        out.append(Sample(image, row["object"], label, mask, "visa", "" if label else "good"))
    if not out:
        raise layout_error("visa", root, f"rows with split 'test' in {root / 'split_csv' / '1cls.csv'}", "none")
    return out


# Normal training images, where a layout has a train split (used as k-shot references).
_TRAIN_NORMAL_FOLDERS = {"mvtec": "good", "mpdd": "good", "btad": "ok"}


def train_normals(kind: str, root: Path) -> dict[str, list[Path]]:
    """``{class: normal training images}`` for layouts with a train split, else ``{}``.

    MVTec-style trees: ``<cat>/train/good`` (BTAD ``train/ok``); VisA: the normal ``split == train``
    rows. Other layouts (HeadCT, MTD, ...) publish no train split.
    """
    if kind in _TRAIN_NORMAL_FOLDERS:
        found = {cat.name: images(descend(cat, "train", _TRAIN_NORMAL_FOLDERS[kind])) for cat in category_dirs(root, bool)}
        return {name: paths for name, paths in found.items() if paths}
    if kind == "visa":
        out: dict[str, list[Path]] = {}
        for row, _ in _visa_rows(root, "train"):
            if row["label"].lower() == "normal" and (root / row["image"]).is_file():
                out.setdefault(row["object"], []).append(root / row["image"])
        return out
    return {}


# ----------------------------------------------------------------- KolektorSDD (sdd)


def _has_sdd_labels(folder: Path) -> bool:
    return any(_SDD_LABEL.match(path.stem) for path in images(folder))


def _sdd_part_dirs(folder: Path) -> list[Path]:
    return [d for d in subdirs(folder) if _SDD_PART_FOLDER.match(d.name) and _has_sdd_labels(d)]


def is_sdd(folder: Path) -> bool:
    return _has_sdd_labels(folder) or bool(_sdd_part_dirs(folder))


def read_sdd(root: Path) -> list[Sample]:
    """KolektorSDD: ``kosNN/PartK.jpg`` + ``PartK_label.bmp``; anomalous iff the label has a pixel > 0.

    The label masks are the only record of which parts are defective, so they are
    decoded here (399 small files).
    """
    folders = [root] if _has_sdd_labels(root) else _sdd_part_dirs(root)
    if not folders:
        raise layout_error("sdd", root, "kosNN/ folders holding PartK.jpg and PartK_label.bmp")
    out = []
    for folder in folders:
        files = images(folder)
        labels = {m.group(1).lower(): path for path in files if (m := _SDD_LABEL.match(path.stem))}
        for path in files:
            if _SDD_LABEL.match(path.stem):
                continue
            label_file = labels.get(path.stem.lower())
            if label_file is None:
                raise DatasetError(
                    f"sdd dataset at {root}: image {path} has no label mask ({path.stem}_label.bmp "
                    "beside it), so its label is unknown; restore it from the KolektorSDD archive"
                )
            label = int(read_mask_array(label_file).max() > 0)
            mask = label_file if label else None
            out.append(Sample(path, "electrical_commutator", label, mask, "sdd", "" if label else "good"))
    return out


# --------------------------------------------------------------------- DAGM 2007


def _dagm_labels(folder: Path) -> Path | None:
    return child(descend(folder, "Test", "Label"), "Labels.txt", file=True)


def _dagm_class_dirs(folder: Path) -> list[Path]:
    """``ClassN`` sub-folders with ``Test/Label/Labels.txt`` (``ClassN_def`` never matches)."""
    return [d for d in subdirs(folder) if _DAGM_FOLDER.match(d.name) and _dagm_labels(d) is not None]


def is_dagm(folder: Path) -> bool:
    return _dagm_labels(folder) is not None or bool(_dagm_class_dirs(folder))


def read_dagm(root: Path) -> list[Sample]:
    """DAGM 2007: ``ClassN/Test/*.PNG`` labelled by ``ClassN/Test/Label/Labels.txt``.

    Rows read ``index flag image 0 mask``; flag 1 is defective, its mask in ``Label/``.
    The first line (the row count) is skipped.
    """
    folders = [root] if _dagm_labels(root) is not None else _dagm_class_dirs(root)
    if not folders:
        raise layout_error("dagm", root, "Class1/ ... Class10/ folders holding Test/Label/Labels.txt")
    out = []
    for folder in folders:
        table = _dagm_labels(folder)
        assert table is not None
        test, label_dir = table.parent.parent, table.parent
        listed = set()
        for number, line in enumerate(table.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            row = line.split()
            if not row or (number == 1 and len(row) == 1):  # a blank line, or the leading count
                continue
            if len(row) < 3 or row[1] not in ("0", "1"):
                raise DatasetError(
                    f"dagm labels file {table} line {number}: expected 'index flag image 0 mask', "
                    f"found {line.strip()!r}; restore it from the DAGM archive"
                )
            image = test / row[2]
            if not image.is_file():
                raise missing_listed("dagm", root, image, f"{table} line {number}")
            listed.add(row[2].lower())
            label = int(row[1])
            mask = label_dir / row[4] if label and len(row) > 4 else None
            if label and (mask is None or not mask.is_file()):
                raise missing_mask("dagm", root, image, f"{mask or 'none named'} in {table} line {number}")
            out.append(Sample(image, folder.name, label, mask, "dagm", "" if label else "good"))
        unlisted = [path.name for path in images(test) if path.name.lower() not in listed]
        if unlisted:
            raise DatasetError(
                f"dagm dataset at {root}: {len(unlisted)} image(s) in {test} are not in {table.name} "
                f"(first {unlisted[0]!r}); restore {table.name} or remove them"
            )
    return out


# ------------------------------------------------- two-folder layouts (medical, folder)


def _read_two_folders(
    kind: str,
    root: Path,
    class_name: str,
    normal: list[Path | None],
    anomalous: list[Path | None],
    expected: str,
    mask_dir: Path | None = None,
) -> list[Sample]:
    """Normal images from the ``normal`` folders, anomalous ones from ``anomalous``.

    Missing folders are ``None``; if all are missing the layout does not match. With
    ``mask_dir``, every anomalous image needs a mask there (matched by stem).
    """
    if not any(normal + anomalous):
        raise layout_error(kind, root, expected)
    masks = stems(mask_dir) if mask_dir is not None else None
    out = []
    for folder in normal:
        out += _samples(kind, root, images(folder), class_name, 0)
    for folder in anomalous:
        out += _samples(kind, root, images(folder), class_name, 1, masks, "", mask_dir)
    return out


def is_yes_no(folder: Path) -> bool:
    return child(folder, "yes") is not None and child(folder, "no") is not None


def read_yes_no(kind: str, root: Path) -> list[Sample]:
    """BrainMRI / Br35H (Kaggle): ``yes/`` tumour (anomalous), ``no/`` healthy; ``pred/`` ignored."""
    return _read_two_folders(
        kind, root, "brain", [child(root, "no")], [child(root, "yes")],
        "yes/ (tumour) and no/ (healthy) folders, or one folder holding them",
    )


def is_bmad(folder: Path) -> bool:
    test = child(folder, "test")
    return descend(test, "good", "img") is not None and descend(test, "Ungood", "img") is not None


def read_bmad(kind: str, root: Path) -> list[Sample]:
    """BMAD LiverCT / RESC: ``test/good/img``, ``test/Ungood/img``, masks ``test/Ungood/label``."""
    expected = "test/good/img/, test/Ungood/img/ and test/Ungood/label/ (the test split; valid/ is not used)"
    ungood = descend(root, "test", "Ungood")
    mask_dir = child(ungood, "label", "anomaly_mask")
    if is_bmad(root) and mask_dir is None:
        raise layout_error(kind, root, expected, f"no label/ folder in {ungood}")
    return _read_two_folders(
        kind, root, {"liverct": "liver", "resc": "retina"}[kind],
        [descend(root, "test", "good", "img")], [child(ungood, "img")], expected, mask_dir,
    )


def is_covid(folder: Path) -> bool:
    return child(folder, "COVID") is not None and child(folder, "Normal") is not None


def read_covid(root: Path) -> list[Sample]:
    """COVID-19 Radiography: ``COVID/images`` anomalous, ``Normal/images`` normal; lung masks unused."""

    def images_of(name: str) -> Path | None:
        folder = child(root, name)
        return child(folder, "images") or folder

    return _read_two_folders(
        "covid19", root, "chest", [images_of("Normal")], [images_of("COVID")],
        "COVID/images/ and Normal/images/ (or COVID/ and Normal/ holding the images)",
    )


def is_folder(folder: Path) -> bool:
    return child(folder, *FOLDER_NORMAL) is not None and child(folder, *FOLDER_ANOMALOUS) is not None


def folder_class_name(root: Path) -> str:
    """The class of a ``folder`` dataset: its folder name, lower-case, spaces as underscores."""
    return re.sub(r"\s+", "_", root.absolute().name.strip()).lower()


def read_folder(root: Path) -> list[Sample]:
    """``normal/`` (or ``good/``) and ``anomalous/`` (or ``anomaly/``, ``abnormal/``, ``bad/``, ``defect/``)."""
    found = {folder.name.lower(): folder for folder in subdirs(root)}
    return _read_two_folders(
        "folder", root, folder_class_name(root),
        [found.get(name) for name in FOLDER_NORMAL],
        [found.get(name) for name in FOLDER_ANOMALOUS],
        "normal/ and anomalous/ folders (or good/, abnormal/, bad/, defect/) and optional masks/",
        found.get("masks"),
    )


# ------------------------------------------------------------------------- HeadCT


def is_headct(folder: Path) -> bool:
    return child(folder, "labels.csv", file=True) is not None and child(folder, "head_ct") is not None


def read_headct(root: Path) -> list[Sample]:
    """HeadCT: ``head_ct/NNN.png`` labelled by ``labels.csv`` (``id, hemorrhage``; 1 = anomalous)."""
    table = child(root, "labels.csv", file=True)
    folder = child(root, "head_ct")
    if table is None or folder is None:
        raise layout_error("headct", root, "head_ct/NNN.png and labels.csv")
    folder = child(folder, "head_ct") or folder  # some copies nest head_ct/head_ct/
    files = {int(path.stem): path for path in images(folder) if path.stem.isdigit()}
    out, seen = [], set()
    with table.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        if header[:2] != ["id", "hemorrhage"]:
            raise DatasetError(
                f"headct labels file {table}: expected header 'id, hemorrhage', found {', '.join(header)!r}; restore it"
            )
        for row in reader:
            if not "".join(row).strip():
                continue
            try:
                number, label = int(row[0]), int(row[1])
            except (ValueError, IndexError):
                number, label = -1, -1
            if label not in (0, 1):
                raise DatasetError(
                    f"headct labels file {table} line {reader.line_num}: expected 'id, 0|1', "
                    f"found {','.join(row)!r}; fix the row"
                )
            if number not in files:
                problem = "appears twice" if number in seen else f"has no image ({folder / f'{number:03d}.png'})"
                raise DatasetError(
                    f"headct dataset at {root}: id {number} of {table} {problem}; fix labels.csv or restore the image"
                )
            seen.add(number)
            out.append(Sample(files.pop(number), "head", label, None, "headct", "" if label else "good"))
    if files:
        first = min(files.values(), key=lambda path: natural_key(path.name))
        raise DatasetError(
            f"headct dataset at {root}: {len(files)} image(s) have no row in {table} (first {first.name}); "
            "add their labels or remove them"
        )
    return out


# ---------------------------------------------------------- Magnetic Tile Defect (mtd)


def _mtd_dirs(folder: Path) -> list[Path]:
    return [d for d in subdirs(folder) if d.name.lower().startswith("mt_") and child(d, "Imgs") is not None]


def is_mtd(folder: Path) -> bool:
    return bool(_mtd_dirs(folder))


def read_mtd(root: Path) -> list[Sample]:
    """MTD: ``MT_<Kind>/Imgs/<stem>.jpg`` + mask ``<stem>.png`` beside it; ``MT_Free`` is normal."""
    folders = _mtd_dirs(root)
    if not folders:
        raise layout_error("mtd", root, "MT_Free/, MT_Blowhole/, ... folders holding Imgs/")
    out = []
    for folder in folders:
        imgs = child(folder, "Imgs")
        files = images(imgs)
        masks = {path.stem.lower(): path for path in files if path.suffix.lower() == ".png"}
        kind_name = folder.name[3:]
        label = int(kind_name.lower() != "free")
        pictures = [path for path in files if path.suffix.lower() != ".png"]
        out += _samples("mtd", root, pictures, "magnetic_tile", label, masks, kind_name, imgs)
    return out
