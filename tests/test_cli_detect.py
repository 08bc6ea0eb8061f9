"""``kanoclip detect``: per-image lines, JSON output, unreadable images, overlays and CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from kanoclip.cli import main
from kanoclip.viz import colorbar_image

from test_training import corrupt


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, bottle_dir) -> Path:
    """good/a.png (120x90), good/nested/b.jpg (70x100), c.png (64x64), all real bottle pixels."""
    root = tmp_path_factory.mktemp("detect-images")
    source = Image.open(bottle_dir / "test" / "broken_large" / "000.png").convert("RGB")
    (root / "good" / "nested").mkdir(parents=True)
    source.resize((120, 90)).save(root / "good" / "a.png")
    source.resize((70, 100)).save(root / "good" / "nested" / "b.jpg")
    source.resize((64, 64)).save(root / "c.png")
    (root / "notes.txt").write_text("not an image, not picked up from a folder")
    return root


@pytest.fixture(scope="module")
def with_corrupt(tmp_path_factory, image_folder) -> Path:
    root = tmp_path_factory.mktemp("detect-corrupt")
    for path in image_folder.rglob("*.*"):
        target = root / path.relative_to(image_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    Image.open(image_folder / "c.png").resize((200, 200)).save(root / "broken.png")
    corrupt(root / "broken.png")
    return root


def _detect(capsys, tiny_backbone, *args: str) -> tuple[int, str, str]:
    code = main(["detect", *args, "--class", "bottle", "--backbone", str(tiny_backbone), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_line_per_image(capsys, tiny_backbone, image_folder):
    code, out, _ = _detect(capsys, tiny_backbone, str(image_folder))
    assert code == 0
    lines = [line.split("\t") for line in out.splitlines()]
    assert [Path(p).relative_to(image_folder).as_posix() for p, _, _ in lines] == [
        "c.png",
        "good/a.png",
        "good/nested/b.jpg",
    ]
    for _, score, verdict in lines:
        assert 0.0 <= float(score) <= 1.0
        assert verdict == ("anomalous" if float(score) >= 0.5 else "normal")

    code, out, _ = _detect(capsys, tiny_backbone, str(image_folder / "c.png"), "--threshold", "0")
    assert code == 0 and out.strip().endswith("\tanomalous") and len(out.splitlines()) == 1


def test_json_output_with_an_unreadable_image(capsys, tiny_backbone, with_corrupt):
    code, out, err = _detect(capsys, tiny_backbone, str(with_corrupt), "--json")
    assert code == 1
    results = json.loads(out)  # stdout is exactly one JSON document
    assert [Path(r["image"]).name for r in results] == ["broken.png", "c.png", "a.png", "b.jpg"]
    broken, *good = results
    assert set(broken) == {"image", "error"} and "broken.png" in broken["error"]
    assert "truncated" in broken["error"] or "corrupt" in broken["error"]
    for result in good:
        assert set(result) == {"image", "score", "is_anomalous"}
        assert isinstance(result["score"], float) and 0.0 <= result["score"] <= 1.0
        assert result["is_anomalous"] == (result["score"] >= 0.5)
    assert "broken.png" in err


def test_out_writes_overlays_of_the_input_size_and_a_csv(capsys, tiny_backbone, with_corrupt, tmp_path):
    out_dir = tmp_path / "out"
    code, out, _ = _detect(capsys, tiny_backbone, str(with_corrupt), "--out", str(out_dir))
    assert code == 1 and len(out.splitlines()) == 3
    sizes = {"c_overlay.png": (64, 64), "good__a_overlay.png": (120, 90), "good__nested__b_overlay.png": (70, 100)}
    assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(sizes)
    for name, (width, height) in sizes.items():
        overlay = Image.open(out_dir / name)
        assert overlay.size == (width + colorbar_image(height).width, height), name
    with (out_dir / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [Path(r["image"]).name for r in rows] == ["broken.png", "c.png", "a.png", "b.jpg"]
    assert rows[0]["error"] and not rows[0]["score"]
    assert all(r["overlay"] in sizes and 0 <= float(r["score"]) <= 1 and not r["error"] for r in rows[1:])


def test_errors_are_one_line(capsys, tiny_backbone, image_folder, tmp_path):
    code = main(
        ["detect", str(image_folder), "--class", "bottle", "--backbone", str(tmp_path / "missing"), "--device", "cpu"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kanoclip detect: error:") and "missing" in err[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["detect", str(empty), "--class", "bottle", "--backbone", str(tiny_backbone)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds no images" in err[0]


def test_backbone_defaults_to_the_environment(capsys, tiny_backbone, image_folder, monkeypatch):
    monkeypatch.setenv("KANOCLIP_BACKBONE", str(tiny_backbone))
    code = main(["detect", str(image_folder / "c.png"), "--class", "bottle", "--device", "cpu", "--json"])
    (result,) = json.loads(capsys.readouterr().out)
    assert code == 0 and set(result) == {"image", "score", "is_anomalous"}


def test_unknown_class_warns_and_suggests_near_classes(capsys, tiny_backbone, image_folder):
    image = str(image_folder / "c.png")
    base = ["detect", image, "--backbone", str(tiny_backbone), "--device", "cpu"]
    assert main([*base, "--class", "pcb board"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [
        (
            "kanoclip detect: warning: class 'pcb board' is not in the knowledge base, so generic anomaly descriptions "
            "are used; did you mean --class pcb1 or pcb2 or pcb3 or pcb4? "
            "Otherwise pass a knowledge base that describes it with --kb"
        )
    ]
    assert main([*base, "--class", "zzzz qqqq"]) == 0
    assert "; pass a knowledge base that describes it with --kb" in capsys.readouterr().err
    assert main([*base, "--class", "Bottle"]) == 0
    assert "warning" not in capsys.readouterr().err  # a known class: no warning
