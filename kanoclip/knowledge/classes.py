"""The catalogue of known class names: canonical names, their datasets, and aliases.

A *canonical* class name is the folder name a dataset uses for the class
(``metal_nut``, ``pcb3``, ``01``, ``Class7``, ...). Users type names loosely, so
matching ignores case and treats spaces, underscores and hyphens alike
(``"Metal-Nut"`` and ``"metal nut"`` both mean ``metal_nut``). On top of that,
:data:`ALIASES` maps extra spellings to one canonical name, and :data:`GROUPS`
maps a family name (``"pcb"``) to several classes: :func:`canonical_name` returns
the first member of a group (``"pcb"`` -> ``pcb1``), :func:`classes_matching`
returns all of them (``"pcb"`` -> ``pcb1 ... pcb4``).
"""

from __future__ import annotations

import re

#: Canonical class name -> the dataset(s) it comes from.
DATASETS: dict[str, tuple[str, ...]] = {
    **{
        name: ("MVTec-AD",)
        for name in (
            "bottle",
            "cable",
            "capsule",
            "carpet",
            "grid",
            "hazelnut",
            "leather",
            "metal_nut",
            "pill",
            "screw",
            "tile",
            "toothbrush",
            "transistor",
            "wood",
            "zipper",
        )
    },
    **{
        name: ("VisA",)
        for name in (
            "candle",
            "capsules",
            "cashew",
            "chewinggum",
            "fryum",
            "macaroni1",
            "macaroni2",
            "pcb1",
            "pcb2",
            "pcb3",
            "pcb4",
            "pipe_fryum",
        )
    },
    **{
        name: ("MPDD",)
        for name in (
            "bracket_black",
            "bracket_brown",
            "bracket_white",
            "connector",
            "metal_plate",
            "tubes",
        )
    },
    **{name: ("BTAD",) for name in ("01", "02", "03")},
    "electrical_commutator": ("SDD",),
    **{f"Class{i}": ("DAGM 2007",) for i in range(1, 11)},
    "brain": ("BrainMRI", "Br35H"),
    "liver": ("LiverCT",),
    "retina": ("RESC", "OCT"),
    "chest": ("COVID-19", "X-ray"),
    "head": ("HeadCT", "hemorrhage"),
    "magnetic_tile": ("MTD",),
}

#: Extra spellings -> canonical name. Keys are matched after :func:`normalize`.
ALIASES: dict[str, str] = {
    # BTAD: its classes are folder numbers; "btad 01", "btad1", "btad_01" all work.
    **{f"btad {i:02d}": f"{i:02d}" for i in (1, 2, 3)},
    **{f"btad{i:02d}": f"{i:02d}" for i in (1, 2, 3)},
    **{f"btad {i}": f"{i:02d}" for i in (1, 2, 3)},
    **{f"btad{i}": f"{i:02d}" for i in (1, 2, 3)},
    # DAGM 2007: "dagm 3", "dagm class 3", "class 3".
    **{f"dagm {i}": f"Class{i}" for i in range(1, 11)},
    **{f"dagm class{i}": f"Class{i}" for i in range(1, 11)},
    **{f"dagm class {i}": f"Class{i}" for i in range(1, 11)},
    **{f"class {i}": f"Class{i}" for i in range(1, 11)},
    # VisA / MVTec spellings.
    "chewing gum": "chewinggum",
    "pipe fryum": "pipe_fryum",
    "nut": "metal_nut",
    "hazel nut": "hazelnut",
    "tooth brush": "toothbrush",
    # MPDD.
    "black bracket": "bracket_black",
    "brown bracket": "bracket_brown",
    "white bracket": "bracket_white",
    "tube": "tubes",
    "metal plate": "metal_plate",
    # SDD (KolektorSDD).
    "commutator": "electrical_commutator",
    "kolektor": "electrical_commutator",
    "kolektorsdd": "electrical_commutator",
    "sdd": "electrical_commutator",
    # MTD.
    "mtd": "magnetic_tile",
    "magnetic tiles": "magnetic_tile",
    # Medical.
    "brain mri": "brain",
    "brainmri": "brain",
    "br35h": "brain",
    "brain tumor": "brain",
    "liver ct": "liver",
    "liverct": "liver",
    "retinal oct": "retina",
    "retina oct": "retina",
    "oct": "retina",
    "resc": "retina",
    "chest x ray": "chest",
    "chest xray": "chest",
    "x ray": "chest",
    "xray": "chest",
    "covid": "chest",
    "covid 19": "chest",
    "covid19": "chest",
    "head ct": "head",
    "headct": "head",
    "hemorrhage": "head",
    "brain hemorrhage": "head",
}

#: Family names -> several canonical names, in order; the first is what
#: :func:`canonical_name` returns for the family name.
GROUPS: dict[str, tuple[str, ...]] = {
    "pcb": ("pcb1", "pcb2", "pcb3", "pcb4"),
    "printed circuit board": ("pcb1", "pcb2", "pcb3", "pcb4"),
    "macaroni": ("macaroni1", "macaroni2"),
    "bracket": ("bracket_black", "bracket_brown", "bracket_white"),
    "btad": ("01", "02", "03"),
    "dagm": tuple(f"Class{i}" for i in range(1, 11)),
}

_SEPARATORS = re.compile(r"[\s_\-]+")


def normalize(text: str) -> str:
    """The matching key of a class name: lower case, ``_``/``-``/spaces folded to one space."""
    return _SEPARATORS.sub(" ", text).strip().lower()


def _build_lookup() -> dict[str, str]:
    lookup = {normalize(name): name for name in DATASETS}
    for alias, target in ALIASES.items():
        lookup.setdefault(normalize(alias), target)
    for family, members in GROUPS.items():
        lookup.setdefault(normalize(family), members[0])
    return lookup


_LOOKUP = _build_lookup()


def spellings() -> dict[str, tuple[str, ...]]:
    """Every known spelling (a canonical name, alias or family name, normalized) -> the classes it names."""
    return {**{key: (name,) for key, name in _LOOKUP.items()}, **{normalize(f): m for f, m in GROUPS.items()}}


def canonical_names() -> list[str]:
    """Every canonical class name of the catalogue, sorted."""
    return sorted(DATASETS)


def canonical_name(text: str) -> str | None:
    """The one canonical class name ``text`` means, or ``None`` if the catalogue lacks it.

    A family name resolves to the family's first member (``"pcb"`` -> ``"pcb1"``);
    use :func:`classes_matching` for all of them.
    """
    return _LOOKUP.get(normalize(text))


def class_key(text: str) -> str:
    """The name to store a class under: its canonical name if the catalogue knows it,
    else the text in lower case with spaces and hyphens as underscores (``"Foo Bar"`` -> ``foo_bar``).
    """
    return canonical_name(text) or normalize(text).replace(" ", "_")


def classes_matching(text: str) -> list[str]:
    """All canonical class names ``text`` may mean: a family's members, else one name, else none."""
    members = GROUPS.get(normalize(text))
    if members is not None:
        return list(members)
    name = canonical_name(text)
    return [] if name is None else [name]


def datasets_of(name: str) -> tuple[str, ...]:
    """The datasets a canonical class name comes from (empty for a class outside the catalogue)."""
    return DATASETS.get(name, ())


def display_name(name: str) -> str:
    """The human-readable form used in prompts: underscores become spaces (``metal nut``)."""
    return " ".join(name.replace("_", " ").split())
