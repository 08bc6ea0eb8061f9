"""The LLM-VQA knowledge base of KnPL (paper §2.2.1).

In the paper each class has *n* general anomaly descriptions written by an LLM
(``source="llm"``) and *m* image-specific descriptions per image written by a VQA
model (``source="vqa"``, keyed by the image's sha256). Every entry keeps its
:class:`Provenance` (model, endpoint, date, prompt template).

Not every description here comes from a model, and the source says so (our choice;
the paper only has the two):

* ``"builtin"``: written by hand by the kanoclip authors; what the shipped
  ``builtin.json`` holds (no LLM wrote it).
* ``"manual"``: written by hand by a user (the app's editor, :meth:`KnowledgeBase.add_manual`).
* ``"generic"``: the fallback of :data:`GENERIC_TEMPLATES` for a class the knowledge
  base does not know; never stored.

All of them are knowledge descriptions alike: each one is a target of eq. 3 and a
guidance prompt. :data:`STORED_SOURCES` are the general (class-level) ``llm``,
``builtin``, ``manual`` and the image-specific ``vqa``.

On disk it is one versioned JSON file::

    {
      "schema_version": 2,
      "provenance": {"<id>": {"model": ..., "endpoint": ..., "date": ..., "template": ...}},
      "classes": {
        "bottle": {
          "builtin": [{"text": "...", "provenance": "<id>"}],
          "llm": [{"text": "...", "provenance": "<id>"}],
          "vqa": [{"image": "<sha256>", "image_name": "000.png", "text": "...",
                   "provenance": "<id>"}]
        }
      }
    }

A class lists only the sources it has. Schema version 1 (keys ``llm`` and ``vqa``
only) still loads, its entries keeping those sources; saving writes version 2.

A :class:`KnowledgeBase` is not thread-safe; callers that share one between
threads hold their own lock.
"""

from __future__ import annotations

import copy
import datetime as _dt
import difflib
import functools
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from kanoclip.errors import InputError, KnowledgeBaseError
from kanoclip.fileio import atomic_write_json
from kanoclip.knowledge import classes as _catalog

#: The paper's LLM prompt template (§2.2.1); ``{class}`` is the human-readable class name.
LLM_TEMPLATE = "Describe what an abnormal image of {class} looks like?"
#: The paper's VQA prompt template (§2.2.1), sent together with the image.
VQA_TEMPLATE = (
    "Identify anomalies in the input image of the specified class ({class}). "
    "Describe each anomaly's location, color, shape, size, and other characteristics."
)

#: Descriptions used for a class the knowledge base does not know; ``{name}`` is the
#: user's class text.
GENERIC_TEMPLATES: tuple[str, ...] = (
    "An abnormal image of a {name} may show a {name} with a crack, a hole or a missing part.",
    "An abnormal image of a {name} may show scratches, dents or deformations that break its usual shape.",
    "An abnormal image of a {name} may show stains, spots or discoloured patches that differ from its normal colour.",
    "An abnormal image of a {name} may show contamination or foreign material on its surface.",
    "An abnormal image of a {name} may show an irregular texture, such as rough, torn or uneven areas.",
)

#: Where a description comes from (see the module docstring).
Source = Literal["llm", "vqa", "builtin", "manual", "generic"]
#: The sources a knowledge-base file stores, in the order :meth:`KnowledgeBase.descriptions`
#: returns them: the general ones, then the image-specific VQA ones.
STORED_SOURCES: tuple[str, ...] = ("llm", "builtin", "manual", "vqa")
#: Every source of a knowledge description: the stored ones and the generic fallback.
KNOWLEDGE_SOURCES: tuple[str, ...] = (*STORED_SOURCES, "generic")
#: How the app and the CLI name each source.
SOURCE_LABELS: dict[str, str] = {
    "llm": "LLM",
    "vqa": "VQA",
    "builtin": "built-in",
    "manual": "hand-written",
    "generic": "generic",
}

_BUILTIN_RESOURCE = "builtin.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REBUILD = "rebuild it with 'kanoclip kb build'"


@dataclass(frozen=True)
class Description:
    """One anomaly description of a class."""

    text: str
    source: Source
    image: str | None = None  #: VQA only: sha256 hex of the image file's bytes.
    image_name: str | None = None  #: VQA only: the image's file name, for display.


@dataclass(frozen=True)
class Provenance:
    """Where a description came from."""

    model: str  #: the model name, or who wrote it by hand
    endpoint: str | None  #: the chat-completions URL, ``None`` when written by hand
    date: str  #: ISO date (or date-time) of generation
    template: str  #: the prompt template, with ``{class}`` unfilled

    @property
    def key(self) -> str:
        """A stable id derived from the content, used to reference it in the JSON file."""
        blob = json.dumps(asdict(self), sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class _Entry:
    description: Description
    provenance: Provenance


def _clean_text(text: Any, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what} must be a non-empty string, got {text!r}; pass the description text")
    return " ".join(text.split())


class _SchemaError(ValueError):
    """A problem in a knowledge-base document; turned into a KnowledgeBaseError naming the file."""


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        got = "null" if value is None else type(value).__name__
        raise _SchemaError(f"{where} must be {names}, got {got}")
    return value


def _expect_keys(obj: dict, required: set[str], optional: set[str], where: str) -> None:
    missing = sorted(required - obj.keys())
    if missing:
        raise _SchemaError(f"{where} lacks required key {missing[0]!r}")
    extra = sorted(obj.keys() - required - optional)
    if extra:
        raise _SchemaError(f"{where} has unknown key {extra[0]!r}")


def _nonempty_str(value: Any, where: str) -> str:
    _expect(value, str, where)
    if not value.strip():
        raise _SchemaError(f"{where} must not be empty")
    return value


class KnowledgeBase:
    """Anomaly descriptions per class: from an LLM and a VQA model, or written by hand."""

    SCHEMA_VERSION: ClassVar[int] = 2
    #: Schema version -> the source keys a class may have in it.
    _SCHEMA_SOURCES: ClassVar[dict[int, tuple[str, ...]]] = {1: ("llm", "vqa"), 2: STORED_SOURCES}

    def __init__(self) -> None:
        self._classes: dict[str, list[_Entry]] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def builtin(cls) -> KnowledgeBase:
        """The knowledge base shipped in the package (parsed once; each call returns a copy)."""
        return _builtin_instance().copy()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KnowledgeBase:
        """Read and schema-check a knowledge-base file; :class:`KnowledgeBaseError` on any problem."""
        path = Path(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KnowledgeBaseError(
                f"knowledge base {path}: file not found; pass an existing file, or omit --kb to use the built-in one"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise KnowledgeBaseError(f"knowledge base {path}: cannot read it ({reason}); check the path") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise KnowledgeBaseError(
                f"knowledge base {path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                f"fix the file or {_REBUILD}"
            ) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def load_or_builtin(cls, path: str | os.PathLike[str] | None) -> KnowledgeBase:
        """:meth:`load` ``path``, or the built-in knowledge base when ``path`` is ``None`` or empty."""
        return cls.builtin() if path is None or str(path) == "" else cls.load(path)

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "<dict>") -> KnowledgeBase:
        """Build from the JSON document ``d``; ``source`` names it in error messages."""
        try:
            return cls._parse(d)
        except _SchemaError as exc:
            fix = _REBUILD if "schema_version" in str(exc) else f"fix the file or {_REBUILD}"
            raise KnowledgeBaseError(f"knowledge base {source}: {exc}; {fix}") from None

    @classmethod
    def _parse(cls, d: Any) -> KnowledgeBase:
        _expect(d, dict, "the document")
        _expect_keys(d, {"schema_version", "classes"}, {"provenance"}, "the document")
        version = d["schema_version"]
        if isinstance(version, bool) or not isinstance(version, int) or version not in cls._SCHEMA_SOURCES:
            expected = " or ".join(str(v) for v in cls._SCHEMA_SOURCES)
            raise _SchemaError(f"schema_version {version!r} is not supported (expected {expected})")
        sources = cls._SCHEMA_SOURCES[version]
        table: dict[str, Provenance] = {}
        for pid, p in _expect(d.get("provenance", {}), dict, "'provenance'").items():
            where = f"provenance {pid!r}"
            _expect(p, dict, where)
            _expect_keys(p, {"model", "date", "template"}, {"endpoint"}, where)
            endpoint = p.get("endpoint")
            if endpoint is not None:
                _expect(endpoint, str, f"{where}.endpoint")
            table[pid] = Provenance(
                model=_nonempty_str(p["model"], f"{where}.model"),
                endpoint=endpoint,
                date=_nonempty_str(p["date"], f"{where}.date"),
                template=_nonempty_str(p["template"], f"{where}.template"),
            )
        kb = cls()
        for name, entry in _expect(d["classes"], dict, "'classes'").items():
            where = f"class {name!r}"
            if not name.strip():
                raise _SchemaError("a class name is empty")
            _expect(entry, dict, where)
            _expect_keys(entry, set(), set(sources), where)
            for source_name in sources:
                items = _expect(entry.get(source_name, []), list, f"{where}.{source_name}")
                for i, item in enumerate(items):
                    kb._classes.setdefault(name, []).append(
                        _parse_item(item, source_name, table, f"{where}.{source_name}[{i}]")
                    )
        return kb

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        """The JSON document of :attr:`SCHEMA_VERSION` (classes sorted; each class lists the sources
        it has, in :data:`STORED_SOURCES` order; descriptions in insertion order)."""
        table: dict[str, dict[str, Any]] = {}
        classes: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for name in self.classes():
            out: dict[str, list[dict[str, Any]]] = {source: [] for source in STORED_SOURCES}
            for entry in self._classes[name]:
                desc, prov = entry.description, entry.provenance
                table.setdefault(prov.key, asdict(prov))
                item: dict[str, Any] = {"text": desc.text, "provenance": prov.key}
                if desc.source == "vqa":
                    item = {"image": desc.image, "image_name": desc.image_name, **item}
                out[desc.source].append(item)
            classes[name] = {source: items for source, items in out.items() if items}
        return {
            "schema_version": self.SCHEMA_VERSION,
            "provenance": dict(sorted(table.items())),
            "classes": classes,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the knowledge base to ``path`` atomically (the old file survives a failed write)."""
        try:
            atomic_write_json(path, self.to_dict())
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise KnowledgeBaseError(
                f"knowledge base {path}: cannot write it ({reason}); choose a writable path"
            ) from None

    def copy(self) -> KnowledgeBase:
        """An independent copy."""
        new = type(self)()
        new._classes = copy.deepcopy(self._classes)
        return new

    # ------------------------------------------------------------------ queries
    def classes(self) -> list[str]:
        """Canonical names of the classes that have at least one description, sorted."""
        return sorted(name for name, entries in self._classes.items() if entries)

    def resolve(self, name: str) -> str | None:
        """The class of this knowledge base that the user's text ``name`` means, or ``None``.

        Matching ignores case and treats spaces, underscores and hyphens alike, then
        tries the aliases of :mod:`kanoclip.knowledge.classes` (``"metal nut"``,
        ``"Metal-Nut"`` -> ``metal_nut``; ``"pcb"`` -> ``pcb1``).
        """
        if not isinstance(name, str) or not name.strip():
            return None
        known = self.classes()
        if name in known:
            return name
        key = _catalog.normalize(name)
        for candidate in known:
            if _catalog.normalize(candidate) == key:
                return candidate
        canonical = _catalog.canonical_name(name)
        return canonical if canonical in known else None

    def is_known(self, class_name: str) -> bool:
        """Whether :meth:`descriptions` returns real descriptions (not the generic fallback)."""
        return self.resolve(class_name) is not None

    def descriptions(self, class_name: str) -> list[Description]:
        """The class's descriptions by source in :data:`STORED_SOURCES` order (general ones, then VQA);
        for an unknown class the ``generic`` fallback of :data:`GENERIC_TEMPLATES`."""
        resolved = self.resolve(class_name)
        if resolved is None:
            shown = " ".join(str(class_name).replace("_", " ").split()) or "object"
            return [Description(text=t.format(name=shown), source="generic") for t in GENERIC_TEMPLATES]
        entries = [e.description for e in self._classes[resolved]]
        return [d for source in STORED_SOURCES for d in entries if d.source == source]

    def provenance(self, class_name: str) -> list[tuple[Description, Provenance]]:
        """Each description of a known class with its provenance (empty for an unknown class)."""
        resolved = self.resolve(class_name)
        return [] if resolved is None else [(e.description, e.provenance) for e in self._classes[resolved]]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per class, how many descriptions of each of :data:`STORED_SOURCES` it has."""
        result = {}
        for name in self.classes():
            sources = [e.description.source for e in self._classes[name]]
            result[name] = {source: sources.count(source) for source in STORED_SOURCES}
        return result

    def suggest(self, text: str, limit: int = 5) -> list[str]:
        """Classes of this knowledge base that ``text`` may have meant, best first (for "did you mean").

        A class is suggested when a word of ``text`` and a word of one of its spellings (its
        name or an alias of :mod:`kanoclip.knowledge.classes`) start alike (``"pcb board"`` ->
        ``pcb1`` .. ``pcb4``, ``"screws"`` -> ``screw``), or when :mod:`difflib` finds the two
        close (ratio >= 0.6, its default cutoff). Ranked by that ratio, word matches first.

        Args:
            text: what the user typed.
            limit: the most names returned.

        Returns:
            Canonical class names, at most ``limit`` (empty when nothing is near).
        """
        query = _catalog.normalize(text) if isinstance(text, str) else ""
        if not query or limit <= 0:
            return []
        words = [w for w in query.split() if len(w) >= 3]  # shorter words ("a", "of") match too much
        known = set(self.classes())
        own = {_catalog.normalize(name): (name,) for name in known if not _catalog.datasets_of(name)}
        best: dict[str, tuple[bool, float]] = {}
        for spelling, targets in {**_catalog.spellings(), **own}.items():
            ratio = difflib.SequenceMatcher(None, query, spelling).ratio()
            by_word = any(a.startswith(b) or b.startswith(a) for a in words for b in spelling.split() if len(b) >= 3)
            if by_word or ratio >= 0.6:
                for name in known.intersection(targets):
                    best[name] = max(best.get(name, (False, 0.0)), (by_word, ratio))
        return sorted(best, key=lambda name: (not best[name][0], -best[name][1], name))[:limit]

    # ------------------------------------------------------------------ editing
    def add_llm(self, class_name: str, texts: list[str], provenance: Provenance) -> int:
        """Append LLM descriptions (duplicates of existing ones are skipped); returns how many were added."""
        name = self._key_for(class_name)
        new = [Description(text=_clean_text(t, "an LLM description"), source="llm") for t in texts]
        return self._append(name, new, provenance)

    def add_manual(self, class_name: str, texts: list[str], provenance: Provenance) -> int:
        """Append descriptions a person wrote by hand (source ``"manual"``; duplicates skipped).

        Args:
            class_name: the class (aliases accepted; a new name is stored as
                :func:`~kanoclip.knowledge.classes.class_key`).
            texts: the descriptions.
            provenance: who wrote them, e.g. ``Provenance("me", None, "2026-11-29", LLM_TEMPLATE)``.

        Returns:
            How many were added.
        """
        name = self._key_for(class_name)
        new = [Description(text=_clean_text(t, "a description"), source="manual") for t in texts]
        return self._append(name, new, provenance)

    def add_vqa(
        self,
        class_name: str,
        image_hash: str,
        image_name: str | None,
        texts: list[str],
        provenance: Provenance,
    ) -> int:
        """Append VQA descriptions of one image (duplicates skipped); returns how many were added."""
        name = self._key_for(class_name)
        if not isinstance(image_hash, str) or not _SHA256.fullmatch(image_hash):
            raise InputError(f"image hash {image_hash!r} is not a sha256 hex digest; pass image_sha256(path)")
        new = [
            Description(text=_clean_text(t, "a VQA description"), source="vqa", image=image_hash, image_name=image_name)
            for t in texts
        ]
        return self._append(name, new, provenance)

    def set_general(self, class_name: str, texts: list[str]) -> None:
        """Replace the class's general descriptions: all but the image-specific VQA ones (the app's editor).

        Texts that were already there keep their source and provenance; new ones are
        ``"manual"``, marked as written by the user. An empty list removes the general
        descriptions (and the class itself if it has no VQA descriptions left).

        Args:
            class_name: the class (aliases accepted; a new name is stored as
                :func:`~kanoclip.knowledge.classes.class_key`).
            texts: the new general descriptions, in order; duplicates are dropped.
        """
        name = self._key_for(class_name)
        entries = self._classes.get(name, [])
        old = {e.description.text: e for e in entries if e.description.source != "vqa"}
        edited = Provenance(
            model="edited by the user", endpoint=None, date=_dt.date.today().isoformat(), template=LLM_TEMPLATE
        )
        general: list[_Entry] = []
        for text in dict.fromkeys(_clean_text(t, "a description") for t in texts):
            general.append(old.get(text) or _Entry(Description(text=text, source="manual"), edited))
        vqa = [e for e in entries if e.description.source == "vqa"]
        if general or vqa:
            self._classes[name] = general + vqa
        else:
            self._classes.pop(name, None)

    def _key_for(self, class_name: str) -> str:
        if not isinstance(class_name, str) or not class_name.strip():
            raise InputError(f"class name {class_name!r} is empty; pass a class name such as 'bottle'")
        return self.resolve(class_name) or _catalog.class_key(class_name)

    def _append(self, name: str, new: list[Description], provenance: Provenance) -> int:
        if not isinstance(provenance, Provenance):
            raise InputError(f"provenance must be a Provenance, got {type(provenance).__name__}")
        entries = self._classes.setdefault(name, [])
        seen = {e.description for e in entries}
        added = 0
        for desc in new:
            if desc not in seen:
                entries.append(_Entry(desc, provenance))
                seen.add(desc)
                added += 1
        if not entries:
            del self._classes[name]
        return added

    def __repr__(self) -> str:
        return f"KnowledgeBase({len(self.classes())} classes)"


def _parse_item(item: Any, source: str, table: dict[str, Provenance], where: str) -> _Entry:
    _expect(item, dict, where)
    required = {"text", "provenance"} | ({"image"} if source == "vqa" else set())
    optional = {"image_name"} if source == "vqa" else set()
    _expect_keys(item, required, optional, where)
    text = " ".join(_nonempty_str(item["text"], f"{where}.text").split())
    pid = _expect(item["provenance"], str, f"{where}.provenance")
    if pid not in table:
        raise _SchemaError(f"{where}.provenance {pid!r} is not in the 'provenance' table")
    if source != "vqa":
        return _Entry(Description(text=text, source=source), table[pid])  # type: ignore[arg-type]
    image = _expect(item["image"], str, f"{where}.image")
    if not _SHA256.fullmatch(image):
        raise _SchemaError(f"{where}.image must be a lowercase sha256 hex digest")
    image_name = item.get("image_name")
    if image_name is not None:
        _expect(image_name, str, f"{where}.image_name")
    return _Entry(Description(text=text, source="vqa", image=image, image_name=image_name), table[pid])


@functools.lru_cache(maxsize=1)
def _builtin_instance() -> KnowledgeBase:
    resource = resources.files("kanoclip.knowledge").joinpath(_BUILTIN_RESOURCE)
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KnowledgeBaseError(
            f"built-in knowledge base {_BUILTIN_RESOURCE}: cannot read it ({exc}); reinstall kanoclip"
        ) from None
    return KnowledgeBase.from_dict(data, source=f"built-in {_BUILTIN_RESOURCE}")


def image_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of a file's bytes: how VQA descriptions key their image."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
