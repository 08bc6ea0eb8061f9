"""The knowledge base: built-in content, aliases, fallback, schema checks, atomic save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kanoclip.errors import InputError, KnowledgeBaseError
from kanoclip.knowledge import (
    LLM_TEMPLATE,
    Description,
    KnowledgeBase,
    Provenance,
    canonical_name,
    canonical_names,
    classes_matching,
    image_sha256,
)
from kanoclip.knowledge.classes import DATASETS

PAPER_CLASSES = {
    "MVTec-AD": (
        "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper"
    ),
    "VisA": "candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum",
    "MPDD": "bracket_black bracket_brown bracket_white connector metal_plate tubes",
    "BTAD": "01 02 03",
    "SDD": "electrical_commutator",
    "DAGM 2007": " ".join(f"Class{i}" for i in range(1, 11)),
    "medical": "brain liver retina chest head",
    "MTD": "magnetic_tile",
}
ALL_CLASSES = sorted(name for names in PAPER_CLASSES.values() for name in names.split())
PROV = Provenance(
    model="test-model", endpoint="http://127.0.0.1:1/v1/chat/completions", date="2026-01-02", template=LLM_TEMPLATE
)
HASH = "ab" * 32


# ----------------------------------------------------------------------------- built-in content
def test_builtin_covers_every_paper_class_with_five_distinct_descriptions():
    kb = KnowledgeBase.builtin()
    assert kb.classes() == ALL_CLASSES == canonical_names()
    texts = []
    for name in ALL_CLASSES:
        written = [d.text for d in kb.descriptions(name) if d.source == "builtin"]
        assert len(written) >= 5, name
        assert len(set(written)) == len(written), name
        assert all(len(t.split()) >= 8 for t in written), name
        texts += written
    assert len(set(texts)) == len(texts), "descriptions repeat across classes"


def test_builtin_provenance_and_copy_semantics():
    kb = KnowledgeBase.builtin()
    provs = {prov for name in kb.classes() for _, prov in kb.provenance(name)}
    assert len(provs) == 1
    (prov,) = provs
    assert (prov.model, prov.endpoint, prov.template) == ("written by the kanoclip authors", None, LLM_TEMPLATE)
    assert len(prov.date) == 10 and prov.date.startswith("20")
    kb.set_general("bottle", ["only one description of a bottle"])
    assert len(KnowledgeBase.builtin().descriptions("bottle")) >= 5  # the cached one is untouched
    assert KnowledgeBase.load_or_builtin(None).counts() == KnowledgeBase.builtin().counts()


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("metal nut", "metal_nut"),
        ("Metal-Nut", "metal_nut"),
        ("METAL_NUT", "metal_nut"),
        ("01", "01"),
        ("btad 01", "01"),
        ("BTAD_02", "02"),
        ("btad3", "03"),
        ("pcb", "pcb1"),
        ("printed circuit board", "pcb1"),
        ("PCB3", "pcb3"),
        ("magnetic tile", "magnetic_tile"),
        ("tile", "tile"),
        ("brain mri", "brain"),
        ("Br35H", "brain"),
        ("head ct", "head"),
        ("chest x-ray", "chest"),
        ("covid", "chest"),
        ("COVID-19", "chest"),
        ("commutator", "electrical_commutator"),
        ("kolektor", "electrical_commutator"),
        ("retinal oct", "retina"),
        ("oct", "retina"),
        ("liver ct", "liver"),
        ("class 7", "Class7"),
        ("class10", "Class10"),
        ("pipe fryum", "pipe_fryum"),
        ("chewing gum", "chewinggum"),
        ("  Bracket White ", "bracket_white"),
        ("widget", None),
        ("", None),
        ("nut butter", None),
    ],
)
def test_resolve_aliases(text, expected):
    assert KnowledgeBase.builtin().resolve(text) == expected
    assert canonical_name(text) == expected


def test_classes_matching_returns_whole_families():
    assert classes_matching("pcb") == ["pcb1", "pcb2", "pcb3", "pcb4"]
    assert classes_matching("printed circuit board") == ["pcb1", "pcb2", "pcb3", "pcb4"]
    assert classes_matching("Macaroni") == ["macaroni1", "macaroni2"]
    assert classes_matching("metal nut") == ["metal_nut"]
    assert classes_matching("widget") == []
    assert set(DATASETS["brain"]) == {"BrainMRI", "Br35H"}


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(ALL_CLASSES),
    st.lists(st.sampled_from([" ", "_", "-", "  ", " - "]), min_size=4, max_size=4),
    st.randoms(),
)
def test_resolve_ignores_case_and_separators(name, seps, rnd):
    mangled = name.replace("_", seps[0])
    mangled = "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in mangled)
    assert KnowledgeBase.builtin().resolve(seps[1] + mangled + seps[2]) == name


# ----------------------------------------------------------------------------- descriptions
def test_unknown_class_gets_generic_fallback():
    kb = KnowledgeBase.builtin()
    assert not kb.is_known("gear_wheel") and kb.is_known("Metal Nut")
    generic = kb.descriptions("gear_wheel")
    assert len(generic) >= 5 and all(d.source == "generic" for d in generic)
    assert all("gear wheel" in d.text for d in generic)
    assert any("a gear wheel with a crack, a hole or a missing part" in d.text for d in generic)


def test_llm_before_vqa_and_counts():
    kb = KnowledgeBase()
    kb.add_vqa("bottle", HASH, "000.png", ["a crack at the rim seen in the photo"], PROV)
    kb.add_llm("bottle", ["llm one", "llm two", "llm one"], PROV)
    assert [d.source for d in kb.descriptions("bottle")] == ["llm", "llm", "vqa"]
    assert kb.descriptions("bottle")[-1] == Description("a crack at the rim seen in the photo", "vqa", HASH, "000.png")
    assert kb.counts() == {"bottle": {"llm": 2, "builtin": 0, "manual": 0, "vqa": 1}}
    assert kb.add_llm("Bottle", ["llm two", "llm three"], PROV) == 1  # alias of an existing class, duplicate skipped


def test_set_general_keeps_provenance_of_kept_texts():
    kb = KnowledgeBase()
    kb.add_llm("wood", ["kept text", "dropped text"], PROV)
    kb.add_vqa("wood", HASH, None, ["vqa text"], PROV)
    kb.set_general("wood", ["kept text", "new text", " new   text "])
    by_text = {d.text: p for d, p in kb.provenance("wood")}
    assert set(by_text) == {"kept text", "new text", "vqa text"}
    assert by_text["kept text"] == PROV and by_text["new text"].model == "edited by the user"
    assert {d.text: d.source for d in kb.descriptions("wood")} == {
        "kept text": "llm",
        "new text": "manual",
        "vqa text": "vqa",
    }
    kb.set_general("wood", [])
    assert kb.counts() == {"wood": {"llm": 0, "builtin": 0, "manual": 0, "vqa": 1}}
    kb2 = KnowledgeBase()
    kb2.add_llm("grid", ["x y z"], PROV)
    kb2.set_general("grid", [])
    assert kb2.classes() == [] and not kb2.is_known("grid")


@pytest.mark.parametrize(
    "call",
    [
        lambda kb: kb.add_llm("", ["text"], PROV),
        lambda kb: kb.add_llm("bottle", ["  "], PROV),
        lambda kb: kb.add_vqa("bottle", "not-a-hash", "x.png", ["text"], PROV),
        lambda kb: kb.add_llm("bottle", ["text"], "not a provenance"),
    ],
)
def test_bad_arguments_raise_input_error(call):
    with pytest.raises(InputError):
        call(KnowledgeBase())


def test_image_sha256(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"abc")
    assert image_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ----------------------------------------------------------------------------- file format
def test_round_trip(tmp_path):
    kb = KnowledgeBase()
    kb.add_llm("custom thing", ["a dent in the thing"], PROV)
    kb.add_vqa("custom thing", HASH, "a.png", ["a dark spot top left"], PROV)
    path = tmp_path / "sub" / "kb.json"
    kb.save(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2
    assert data["classes"]["custom_thing"]["vqa"][0]["image"] == HASH
    loaded = KnowledgeBase.load(path)
    assert loaded.to_dict() == kb.to_dict()
    assert loaded.provenance("custom thing")[0][1] == PROV


def valid_doc() -> dict:
    kb = KnowledgeBase()
    kb.add_llm("bottle", ["a crack in the glass"], PROV)
    kb.add_vqa("bottle", HASH, "a.png", ["a chip at the rim"], PROV)
    return kb.to_dict()


def mutate(path_keys, value):
    def apply(doc):
        target = doc
        for key in path_keys[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path_keys[-1]]
        else:
            target[path_keys[-1]] = value
        return doc

    return apply


PID = PROV.key
BAD_DOCS = {
    "wrong version": (
        mutate(["schema_version"], 7),
        "schema_version 7 is not supported (expected 1 or 2); rebuild it with 'kanoclip kb build'",
    ),
    "version as string": (mutate(["schema_version"], "1"), "schema_version '1' is not supported"),
    "version as bool": (mutate(["schema_version"], True), "schema_version True is not supported"),
    "no version": (mutate(["schema_version"], KeyError), "lacks required key 'schema_version'"),
    "classes is a list": (mutate(["classes"], []), "'classes' must be dict, got list"),
    "text is a number": (
        mutate(["classes", "bottle", "llm", 0, "text"], 3),
        "class 'bottle'.llm[0].text must be str, got int",
    ),
    "empty text": (mutate(["classes", "bottle", "llm", 0, "text"], " "), "must not be empty"),
    "unknown source": (mutate(["classes", "bottle", "gpt"], []), "class 'bottle' has unknown key 'gpt'"),
    "vqa without image": (mutate(["classes", "bottle", "vqa", 0, "image"], KeyError), "lacks required key 'image'"),
    "bad image hash": (mutate(["classes", "bottle", "vqa", 0, "image"], "xyz"), "sha256"),
    "dangling provenance": (
        mutate(["classes", "bottle", "llm", 0, "provenance"], "nope"),
        "'nope' is not in the 'provenance' table",
    ),
    "provenance without model": (mutate(["provenance", PID, "model"], KeyError), "lacks required key 'model'"),
    "top level list": (lambda doc: [doc], "the document must be dict, got list"),
}


@pytest.mark.parametrize("case", list(BAD_DOCS))
def test_schema_errors_name_the_file(tmp_path, case):
    change, expected = BAD_DOCS[case]
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(change(valid_doc())))
    with pytest.raises(KnowledgeBaseError) as info:
        KnowledgeBase.load(path)
    message = str(info.value)
    assert message.startswith(f"knowledge base {path}: ")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"{not json", "invalid JSON"), (b"", "invalid JSON"), (b"\xff\xfe\x00", "cannot read it")],
)
def test_unreadable_files(tmp_path, content, expected):
    path = tmp_path / "kb.json"
    path.write_bytes(content)
    with pytest.raises(KnowledgeBaseError, match=f"knowledge base {path}: {expected}"):
        KnowledgeBase.load(path)
    with pytest.raises(KnowledgeBaseError, match="file not found"):
        KnowledgeBase.load_or_builtin(str(tmp_path / "missing.json"))
    with pytest.raises(KnowledgeBaseError, match="dict, got list"):
        KnowledgeBase.from_dict({"schema_version": 1, "classes": []}, source="<mine>")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "kb.json"
    first = KnowledgeBase()
    first.add_llm("bottle", ["the old content"], PROV)
    first.save(path)
    old = path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["kb.json"]  # no temporary file left

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    second = KnowledgeBase.builtin()
    with pytest.raises(KnowledgeBaseError, match="cannot write it .No space left on device."):
        second.save(path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["kb.json"]
    monkeypatch.undo()
    second.save(path)
    assert KnowledgeBase.load(path).counts() == KnowledgeBase.builtin().counts()


def test_builtin_file_is_the_saved_form():
    """The shipped JSON is exactly what save() writes, so edits through the API round-trip."""
    shipped = Path(__file__).resolve().parents[1] / "kanoclip" / "knowledge" / "builtin.json"
    assert json.loads(shipped.read_text(encoding="utf-8")) == KnowledgeBase.builtin().to_dict()


# ----------------------------------------------------------------------------- honest sources
def test_builtin_is_hand_written_not_llm():
    kb = KnowledgeBase.builtin()
    sources = {d.source for name in kb.classes() for d in kb.descriptions(name)}
    assert sources == {"builtin"}
    assert all(c["llm"] == 0 and c["builtin"] >= 5 for c in kb.counts().values())
    shipped = json.loads((Path(__file__).resolve().parents[1] / "kanoclip" / "knowledge" / "builtin.json").read_text())
    assert shipped["schema_version"] == 2
    assert {key for entry in shipped["classes"].values() for key in entry} == {"builtin"}
    assert all(p["endpoint"] is None and "written by" in p["model"] for p in shipped["provenance"].values())


def test_schema_version_1_file_still_loads_with_its_sources(tmp_path):
    """A file written before the hand-written sources existed: its llm/vqa entries stay llm/vqa."""
    old = {
        "schema_version": 1,
        "provenance": {
            "p": {
                "model": "llama3.1",
                "endpoint": "http://h/v1/chat/completions",
                "date": "2025-01-01",
                "template": LLM_TEMPLATE,
            }
        },
        "classes": {
            "bottle": {
                "llm": [{"text": "a crack in the glass", "provenance": "p"}],
                "vqa": [{"image": HASH, "image_name": "a.png", "text": "a chip at the rim", "provenance": "p"}],
            },
            "widget": {"llm": [{"text": "a bent widget arm", "provenance": "p"}], "vqa": []},
        },
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    kb = KnowledgeBase.load(path)
    assert [(d.text, d.source) for d in kb.descriptions("bottle")] == [
        ("a crack in the glass", "llm"),
        ("a chip at the rim", "vqa"),
    ]
    assert [d.source for d in kb.descriptions("widget")] == ["llm"]
    kb.save(path)  # saving writes the current version, with the same sources
    new = json.loads(path.read_text())
    assert new["schema_version"] == 2
    assert new["classes"]["widget"] == {
        "llm": [{"text": "a bent widget arm", "provenance": next(iter(new["provenance"]))}]
    }
    old["classes"]["bottle"]["builtin"] = []  # version 1 had no hand-written sources
    path.write_text(json.dumps(old))
    with pytest.raises(KnowledgeBaseError, match="class 'bottle' has unknown key 'builtin'"):
        KnowledgeBase.load(path)


def test_hand_written_descriptions_are_manual_and_round_trip(tmp_path):
    me = Provenance(model="me", endpoint=None, date="2026-01-02", template=LLM_TEMPLATE)
    kb = KnowledgeBase.builtin()
    assert kb.add_manual("bottle", ["a label stuck on upside down", "a label stuck on upside down"], me) == 1
    kb.add_llm("bottle", ["an llm line"], PROV)
    sources = [d.source for d in kb.descriptions("bottle")]
    assert sources == ["llm"] + ["builtin"] * 5 + ["manual"]
    path = tmp_path / "kb.json"
    kb.save(path)
    entry = json.loads(path.read_text())["classes"]["bottle"]
    assert list(entry) == ["llm", "builtin", "manual"]  # only the sources the class has
    assert entry["manual"][0]["text"] == "a label stuck on upside down"
    loaded = KnowledgeBase.load(path)
    assert loaded.to_dict() == kb.to_dict()
    assert loaded.provenance("bottle")[-1] == (Description("a label stuck on upside down", "manual"), me)
    # the editor keeps built-in texts built-in and marks its own lines manual
    builtin_text = kb.descriptions("bottle")[1].text
    kb.set_general("bottle", [builtin_text, "typed in the editor"])
    assert [(d.text, d.source) for d in kb.descriptions("bottle")] == [
        (builtin_text, "builtin"),
        ("typed in the editor", "manual"),
    ]


# ----------------------------------------------------------------------------- suggestions
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pcb board", ["pcb1", "pcb2", "pcb3", "pcb4"]),
        ("screws", ["screw"]),
        ("bottel", ["bottle"]),
        ("zzzz qqqq", []),
        ("", []),
    ],
)
def test_suggest_near_known_classes(text, expected):
    assert KnowledgeBase.builtin().suggest(text) == expected


def test_suggest_limit_aliases_and_own_classes():
    kb = KnowledgeBase.builtin()
    assert kb.suggest("pcb board", limit=2) == ["pcb1", "pcb2"]
    assert kb.suggest("pcb board", limit=0) == []
    assert kb.suggest("hazel nuts")[0] == "hazelnut"  # via the alias "hazel nut"
    assert "metal_nut" in kb.suggest("nuts")  # via the alias "nut"
    kb.add_manual("gear wheel", ["a broken tooth on the gear"], Provenance("me", None, "2026-01-02", LLM_TEMPLATE))
    assert kb.suggest("gear wheels")[0] == "gear_wheel"
    empty = KnowledgeBase()
    assert empty.suggest("screws") == []  # only classes this knowledge base has
