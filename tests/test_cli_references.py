"""``kanoclip references build|show`` and ``--references`` on detect."""

from __future__ import annotations

import json

import pytest

from kanoclip import KAnoCLIP

from test_training import run_cli


def test_build_show_and_detect_with_saved_references(tiny_backbone, bottle_dir, bottle_image, tmp_path):
    good = sorted((bottle_dir / "test" / "good").glob("*.png"))[:3]
    out = tmp_path / "refs"
    built = run_cli(
        "references",
        "build",
        *map(str, good),
        "--class",
        "bottle",
        "--out",
        str(out),
        "--backbone",
        str(tiny_backbone),
        "--device",
        "cpu",
    )
    assert built.returncode == 0, built.stderr
    assert "bottle: 3 references saved" in built.stdout and "leave-one-out" in built.stdout
    shown = run_cli("references", "show", str(out), "--json")
    listed = json.loads(shown.stdout)["classes"]
    assert [(c["class"], c["count"]) for c in listed] == [("bottle", 3)] and listed[0]["threshold"] is not None

    detected = run_cli(
        "detect",
        str(bottle_image),
        "--class",
        "bottle",
        "--references",
        str(out),
        "--backbone",
        str(tiny_backbone),
        "--device",
        "cpu",
        "--json",
    )
    assert detected.returncode == 0, detected.stderr
    row = json.loads(detected.stdout)[0]
    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    model.add_references("bottle", list(map(str, good)))
    expected = model.detect(str(bottle_image), "bottle")
    assert row["score"] == pytest.approx(expected.score, abs=1e-5)
    assert row["is_anomalous"] == expected.is_anomalous

    again = run_cli(
        "references",
        "build",
        str(good[0]),
        "--class",
        "screw",
        "--out",
        str(out),
        "--backbone",
        str(tiny_backbone),
        "--device",
        "cpu",
    )
    assert again.returncode == 0, again.stderr  # a second class joins the folder
    assert {c["class"] for c in json.loads(run_cli("references", "show", str(out), "--json").stdout)["classes"]} == {
        "bottle",
        "screw",
    }


def test_references_errors_are_one_line(tiny_backbone, bottle_image, tmp_path):
    missing = run_cli(
        "detect",
        str(bottle_image),
        "--class",
        "bottle",
        "--references",
        str(tmp_path / "none"),
        "--backbone",
        str(tiny_backbone),
    )
    assert (
        missing.returncode == 2 and "holds no saved references" in missing.stderr and "Traceback" not in missing.stderr
    )
    not_refs = run_cli("references", "show", str(tmp_path))
    assert not_refs.returncode == 2 and "Traceback" not in not_refs.stderr


def test_detect_with_reference_and_calibrate_folders(tiny_backbone, bottle_dir, tmp_path):
    """--reference GOOD_DIR fuses the references; --calibrate VAL_DIR (good/ + a defect folder) sets the
    F1-max threshold, the same as the API's calibrate on the same labelled images."""
    import shutil

    good_dir, val = tmp_path / "good", tmp_path / "val"
    for i, p in enumerate(sorted((bottle_dir / "test" / "good").glob("*.png"))[:6]):
        target = (good_dir if i < 3 else val / "good") / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target)
    for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:3]:
        (val / "broken").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, val / "broken" / p.name)
    test_image = sorted((bottle_dir / "test" / "contamination").glob("*.png"))[0]
    done = run_cli(
        "detect", str(test_image), "--class", "bottle", "--reference", str(good_dir), "--calibrate", str(val),
        "--backbone", str(tiny_backbone), "--device", "cpu", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3 references of 'bottle'" in done.stderr and "F1-max" in done.stderr
    row = json.loads(done.stdout)[0]
    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    model.add_references("bottle", sorted(map(str, good_dir.glob("*.png"))))
    val_images = sorted(map(str, (val / "broken").glob("*.png"))) + sorted(map(str, (val / "good").glob("*.png")))
    threshold = model.calibrate("bottle", val_images, [1, 1, 1, 0, 0, 0])
    expected = model.detect(str(test_image), "bottle")
    assert row["score"] == pytest.approx(expected.score, abs=1e-5)
    assert row["is_anomalous"] == (expected.score >= threshold)
