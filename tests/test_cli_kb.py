"""``kanoclip kb list|show|build``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kanoclip.cli import main
from kanoclip.knowledge import LLM_TEMPLATE, KnowledgeBase, Provenance

from conftest import write_test_image

try:
    from chat_server import Reply, server  # noqa: F401 - server is a fixture
except ImportError:  # tests/ imported as a package
    from tests.chat_server import Reply, server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CANONICAL = (
    "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper "
    "candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum "
    "bracket_black bracket_brown bracket_white connector metal_plate tubes 01 02 03 electrical_commutator "
    + " ".join(f"Class{i}" for i in range(1, 11))
    + " brain liver retina chest head magnetic_tile"
).split()
PROV = Provenance(
    model="m", endpoint="http://127.0.0.1:9/v1/chat/completions", date="2026-01-02", template=LLM_TEMPLATE
)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_listing(listing: dict) -> None:
    assert set(listing) == {"classes"}
    classes = listing["classes"]
    assert set(CANONICAL) <= set(classes) and len(CANONICAL) == 53
    for name in CANONICAL:
        assert classes[name] == {"llm": 0, "builtin": 5, "manual": 0, "vqa": 0}, name  # hand-written, no LLM


def test_list_json_in_process(capsys):
    code, out, _ = run_cli(capsys, "kb", "list", "--json")
    assert code == 0
    check_listing(json.loads(out))


def test_list_json_subprocess():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "kanoclip", "kb", "list", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    check_listing(json.loads(result.stdout))


def test_list_human(capsys):
    code, out, _ = run_cli(capsys, "kb", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["class", "llm", "builtin", "manual", "vqa", "dataset"]
    assert any(line.split()[:5] == ["metal_nut", "0", "5", "0", "0"] and "MVTec-AD" in line for line in lines)


def test_show_json_resolves_alias_and_includes_vqa(capsys, tmp_path):
    kb = KnowledgeBase()
    kb.add_llm("metal_nut", ["a bent lobe on the nut", "a pink paint spot"], PROV)
    kb.add_vqa("metal_nut", "c" * 64, "007.png", ["a scratch at the top"], PROV)
    kb.add_vqa("metal_nut", "d" * 64, None, ["a missing lobe"], PROV)
    kb.save(tmp_path / "kb.json")
    code, out, _ = run_cli(capsys, "kb", "show", "Metal-Nut", "--kb", str(tmp_path / "kb.json"), "--json")
    assert code == 0
    assert json.loads(out) == {
        "class": "metal_nut",
        "llm": ["a bent lobe on the nut", "a pink paint spot"],
        "vqa": [{"image": "007.png", "text": "a scratch at the top"}, {"image": "d" * 64, "text": "a missing lobe"}],
        "builtin": [],
        "manual": [],
        "generic": [],
        "suggestions": [],
    }


def test_show_builtin_human_and_unknown(capsys):
    code, out, _ = run_cli(capsys, "kb", "show", "magnetic tile")
    assert code == 0
    assert out.startswith("magnetic_tile (MTD)\nbuilt-in descriptions (5):\n  1. ")
    code, out, err = run_cli(capsys, "kb", "show", "gear wheel", "--json")
    data = json.loads(out)
    assert (
        code == 0 and data["class"] == "gear wheel" and len(data["generic"]) >= 5 and data["llm"] == data["vqa"] == []
    )
    assert "generic fallback" in err
    code, out, _ = run_cli(capsys, "kb", "show", "gear wheel")
    assert "not in the knowledge base; the generic fallback" in out and "a gear wheel with a crack" in out
    assert "\ngeneric descriptions (5):\n" in out and "LLM" not in out


def test_bad_kb_file_is_one_line_exit_2(capsys, tmp_path):
    bad = tmp_path / "kb.json"
    bad.write_text(json.dumps({"schema_version": 7, "classes": {}}))
    code, out, err = run_cli(capsys, "kb", "list", "--kb", str(bad))
    assert code == 2 and out == ""
    assert err == (
        f"kanoclip kb: error: knowledge base {bad}: schema_version 7 is not supported (expected 1 or 2); "
        "rebuild it with 'kanoclip kb build'\n"
    )


def test_show_prints_each_true_source(capsys, tmp_path):
    kb = KnowledgeBase.builtin()
    kb.add_llm("bottle", ["an llm line about the bottle"], PROV)
    kb.add_manual("bottle", ["my own line about the bottle"], Provenance("me", None, "2026-01-02", LLM_TEMPLATE))
    kb.save(tmp_path / "kb.json")
    code, out, _ = run_cli(capsys, "kb", "show", "bottle", "--kb", str(tmp_path / "kb.json"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "bottle (MVTec-AD)"
    assert lines[1:3] == ["LLM descriptions (1):", "  1. an llm line about the bottle"]
    assert lines[3] == "built-in descriptions (5):" and lines[9:] == [
        "hand-written descriptions (1):",
        "  1. my own line about the bottle",
    ]
    code, out, _ = run_cli(capsys, "kb", "show", "bottle", "--kb", str(tmp_path / "kb.json"), "--json")
    data = json.loads(out)
    assert (data["llm"], data["manual"], len(data["builtin"]), data["generic"]) == (
        ["an llm line about the bottle"],
        ["my own line about the bottle"],
        5,
        [],
    )


def test_show_unknown_class_suggests_near_ones(capsys):
    code, out, _ = run_cli(capsys, "kb", "show", "pcb board")
    assert code == 0
    assert out.splitlines()[0] == (
        "pcb board: not in the knowledge base (did you mean pcb1, pcb2, pcb3, pcb4?); "
        "the generic fallback descriptions are used:"
    )
    code, out, err = run_cli(capsys, "kb", "show", "screws", "--json")
    assert json.loads(out)["suggestions"] == ["screw"] and "(did you mean screw?)" in err
    code, out, _ = run_cli(capsys, "kb", "show", "zzzz qqqq")
    assert "did you mean" not in out


# ----------------------------------------------------------------------------- build
def test_build_with_images_extends_existing_output(capsys, server, tmp_path):
    out = tmp_path / "kb.json"
    existing = KnowledgeBase()
    existing.add_llm("wood", ["an old description kept across builds"], PROV)
    existing.save(out)
    for seed, (folder, name) in enumerate(
        [("Metal-Nut/test/bent", "000.png"), ("screw", "001.jpg"), ("other", "002.png")]
    ):
        write_test_image(tmp_path / "imgs" / folder / name, seed)
    code, stdout, stderr = run_cli(
        capsys,
        "kb",
        "build",
        "--classes",
        "metal nut,screw",
        "--images",
        str(tmp_path / "imgs"),
        "--llm-url",
        server.url,
        "--llm-model",
        "text-model",
        "--vqa-model",
        "vision-model",
        "--n",
        "3",
        "--m",
        "1",
        "--retries",
        "0",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    assert "added 6 LLM and 2 VQA descriptions" in stdout
    assert "skipped 1 images" in stderr and "kb build" in stderr  # the tqdm bar
    models = sorted((r.body["model"], r.is_vqa) for r in server.requests)
    assert models == [("text-model", False), ("text-model", False), ("vision-model", True), ("vision-model", True)]
    kb = KnowledgeBase.load(out)
    assert kb.counts() == {
        "metal_nut": {"llm": 3, "builtin": 0, "manual": 0, "vqa": 1},
        "screw": {"llm": 3, "builtin": 0, "manual": 0, "vqa": 1},
        "wood": {"llm": 1, "builtin": 0, "manual": 0, "vqa": 0},
    }
    vqa_prompts = sorted(r.prompt for r in server.requests if r.is_vqa)
    assert vqa_prompts[0].startswith("Identify anomalies in the input image of the specified class (metal nut).")
    # Rerun: nothing left to ask.
    server.requests.clear()
    code, stdout, _ = run_cli(
        capsys,
        "kb",
        "build",
        "--classes",
        "metal_nut,screw",
        "--images",
        str(tmp_path / "imgs"),
        "--llm-url",
        server.url,
        "--llm-model",
        "text-model",
        "--vqa-model",
        "vision-model",
        "--n",
        "3",
        "--out",
        str(out),
    )
    assert code == 0 and server.requests == [] and "(4 classes/images already complete)" in stdout


def test_build_failure_is_one_line_and_keeps_progress(capsys, server, tmp_path):
    server.responder = lambda request: Reply.error(500) if "grid" in request.prompt else None
    out = tmp_path / "kb.json"
    code, _, err = run_cli(
        capsys,
        "kb",
        "build",
        "--classes",
        "bottle,grid",
        "--llm-url",
        server.url,
        "--llm-model",
        "m",
        "--retries",
        "1",
        "--concurrency",
        "1",
        "--out",
        str(out),
    )
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("kanoclip kb: error: ") and "HTTP 500 after 2 attempts" in last
    assert KnowledgeBase.load(out).counts() == {"bottle": {"llm": 5, "builtin": 0, "manual": 0, "vqa": 0}}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", " , "], "--classes is empty"),
        (["--classes", "bottle", "--images", "IMGS"], "--images needs a VQA model"),
        (["--classes", "bottle", "--api-key-env", "KANOCLIP_TEST_UNSET_VAR"], "KANOCLIP_TEST_UNSET_VAR is not set"),
        (["--classes", "bottle", "--n", "0"], "n, m and concurrency must be >= 1"),
        (["--classes", "bottle", "--llm-url", "localhost:1"], "is not an http(s) URL"),
    ],
)
def test_build_argument_errors(capsys, tmp_path, extra, message):
    (tmp_path / "IMGS").mkdir()
    argv = ["kb", "build", "--llm-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--out", str(tmp_path / "kb.json")]
    argv += [str(tmp_path / "IMGS") if a == "IMGS" else a for a in extra]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "kb.json").exists()
