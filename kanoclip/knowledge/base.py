"""The LLM-VQA knowledge base of KnPL (paper §2.2.1).

For each class the knowledge base holds *n* general anomaly descriptions written
by an LLM (``source="llm"``) and *m* image-specific descriptions per image written
by a VQA model (``source="vqa"``, keyed by the image's sha256). Every entry keeps
its :class:`Provenance` (model, endpoint, date, prompt template).

On disk it is one versioned JSON file::

    {
      "schema_version": 1,
      "provenance": {"<id>": {"model": ..., "endpoint": ..., "date": ..., "template": ...}},
      "classes": {
        "bottle": {
          "llm": [{"text": "...", "provenance": "<id>"}],
          "vqa": [{"image": "<sha256>", "image_name": "000.png", "text": "...",
                   "provenance": "<id>"}]
        }
      }
    }

A :class:`KnowledgeBase` is not thread-safe; callers that share one between
threads hold their own lock.
"""

from __future__ import annotations

import copy
import datetime as _dt
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

_BUILTIN_RESOURCE = "builtin.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REBUILD = "rebuild it with 'kanoclip kb build'"


@dataclass(frozen=True)
class Description:
    """One anomaly description of a class."""

    text: str
    source: Literal["llm", "vqa"]
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
    """Anomaly descriptions per class, from an LLM and a VQA model."""

    SCHEMA_VERSION: ClassVar[int] = 1

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
        if isinstance(version, bool) or not isinstance(version, int) or version != cls.SCHEMA_VERSION:
            raise _SchemaError(f"schema_version {version!r} is not supported (expected {cls.SCHEMA_VERSION})")
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
            _expect_keys(entry, set(), {"llm", "vqa"}, where)
            for source_name in ("llm", "vqa"):
                items = _expect(entry.get(source_name, []), list, f"{where}.{source_name}")
                for i, item in enumerate(items):
                    kb._classes.setdefault(name, []).append(
                        _parse_item(item, source_name, table, f"{where}.{source_name}[{i}]")
                    )
        return kb

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (classes sorted; descriptions in insertion order)."""
        table: dict[str, dict[str, Any]] = {}
        classes: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for name in self.classes():
            out: dict[str, list[dict[str, Any]]] = {"llm": [], "vqa": []}
            for entry in self._classes[name]:
                desc, prov = entry.description, entry.provenance
                table.setdefault(prov.key, asdict(prov))
                item: dict[str, Any] = {"text": desc.text, "provenance": prov.key}
                if desc.source == "vqa":
                    item = {"image": desc.image, "image_name": desc.image_name, **item}
                out[desc.source].append(item)
            classes[name] = out
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
        """LLM then VQA descriptions of the class; generic ones for an unknown class."""
        resolved = self.resolve(class_name)
        if resolved is None:
            shown = " ".join(str(class_name).replace("_", " ").split()) or "object"
            return [Description(text=t.format(name=shown), source="llm") for t in GENERIC_TEMPLATES]
        entries = [e.description for e in self._classes[resolved]]
        return [d for d in entries if d.source == "llm"] + [d for d in entries if d.source == "vqa"]

    def provenance(self, class_name: str) -> list[tuple[Description, Provenance]]:
        """Each description of a known class with its provenance (empty for an unknown class)."""
        resolved = self.resolve(class_name)
        return [] if resolved is None else [(e.description, e.provenance) for e in self._classes[resolved]]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per class, how many LLM and VQA descriptions it has."""
        result = {}
        for name in self.classes():
            sources = [e.description.source for e in self._classes[name]]
            result[name] = {"llm": sources.count("llm"), "vqa": sources.count("vqa")}
        return result

    # ------------------------------------------------------------------ editing
    def add_llm(self, class_name: str, texts: list[str], provenance: Provenance) -> int:
        """Append LLM descriptions (duplicates of existing ones are skipped); returns how many were added."""
        name = self._key_for(class_name)
        new = [Description(text=_clean_text(t, "an LLM description"), source="llm") for t in texts]
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

    def set_llm(self, class_name: str, texts: list[str]) -> None:
        """Replace the class's LLM descriptions (used by the app's editor).

        Texts that were already there keep their provenance; new ones are marked as
        written by the user. An empty list removes the class's LLM descriptions (and
        the class itself if it has no VQA descriptions left).
        """
        name = self._key_for(class_name)
        entries = self._classes.get(name, [])
        old = {e.description.text: e for e in entries if e.description.source == "llm"}
        edited = Provenance(
            model="edited by the user", endpoint=None, date=_dt.date.today().isoformat(), template=LLM_TEMPLATE
        )
        llm: list[_Entry] = []
        for text in dict.fromkeys(_clean_text(t, "an LLM description") for t in texts):
            llm.append(old.get(text) or _Entry(Description(text=text, source="llm"), edited))
        vqa = [e for e in entries if e.description.source == "vqa"]
        if llm or vqa:
            self._classes[name] = llm + vqa
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
    if source == "llm":
        return _Entry(Description(text=text, source="llm"), table[pid])
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
