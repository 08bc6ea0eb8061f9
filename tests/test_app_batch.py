"""The Batch tab (``/detect_many``) driven over HTTP with gradio_client, on the tiny random CLIP.

Scores are plumbing, never accuracy; each is checked against a direct ``model.detect`` of the same image.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_app import app_config, error_text, launch  # noqa: E402

from demo.batch_tab import CsvFiles, collect_images, results_table  # noqa: E402
from kanoclip.errors import InputError  # noqa: E402
from kanoclip.references import References  # noqa: E402

CAP = 4


@pytest.fixture(scope="module")
def app(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory):
    running = launch(app_config(tmp_path_factory.mktemp("batch-app"), tiny_backbone, max_batch=CAP))
    yield running
    running.demo.close()


@pytest.fixture(scope="module")
def bottles(bottle_dir: Path) -> list[Path]:
    """Three real bottle images, two defective and one good."""
    test = bottle_dir / "test"
    return [test / "broken_large" / "000.png", test / "good" / "000.png", test / "contamination" / "000.png"]


def read_csv(path: str) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_detect_many_sorts_by_score_and_matches_detect(app, tiny_model, bottles: list[Path]) -> None:
    summary, gallery, table, csv_path = Client(app.url, verbose=False).predict(
        [handle_file(str(p)) for p in bottles], "bottle", api_name="/detect_many"
    )
    assert table["headers"] == ["image", "score", "verdict", "threshold"]
    rows = table["data"]
    direct = {p.name + p.parent.name: tiny_model.detect(p, "bottle") for p in bottles}
    # the uploads keep their file names; two share 000.png, so match each row by its score
    expected = sorted(direct.values(), key=lambda d: d.score, reverse=True)
    assert len(rows) == 3
    assert [row[1] for row in rows] == sorted((row[1] for row in rows), reverse=True)
    for row, det in zip(rows, expected):
        assert row[1] == pytest.approx(det.score, abs=1e-5)
        assert row[2] == ("ANOMALOUS" if det.is_anomalous else "normal")
        assert row[3] == pytest.approx(det.threshold, abs=1e-6)
    assert [Path(row[0]).name for row in rows] == ["000.png"] * 3
    # the gallery: one map per image in the same order, captioned with score and verdict
    assert [item["caption"] for item in gallery] == [f"{r[1]:.4f} · {r[2]} · {r[0]}" for r in rows]
    # the CSV holds the same rows
    saved = read_csv(csv_path)
    assert saved[0] == ["image", "score", "verdict", "threshold"]
    assert [[r[0], float(r[1]), r[2], float(r[3])] for r in saved[1:]] == [[r[0], r[1], r[2], r[3]] for r in rows]
    assert "3 inspected" in summary and "Random test backbone" in summary


def test_a_bad_file_is_named_and_the_others_come_back(app, tiny_model, bottles: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    summary, _, table, _ = Client(app.url, verbose=False).predict(
        [handle_file(str(bottles[0])), handle_file(str(bad)), handle_file(str(bottles[1]))],
        "bottle",
        api_name="/detect_many",
    )
    assert "1 file(s) could not be read" in summary and "notes.png: not an image file" in summary
    assert "/tmp/gradio" not in summary  # the server's upload path is not shown
    scores = sorted((tiny_model.detect(p, "bottle").score for p in bottles[:2]), reverse=True)
    assert [row[1] for row in table["data"]] == pytest.approx(scores, abs=1e-5)


def test_the_cap_is_enforced(app, bottles: list[Path]) -> None:
    too_many = [handle_file(str(p)) for p in (bottles + bottles)[: CAP + 1]]
    with pytest.raises(AppError) as excinfo:
        Client(app.url, verbose=False).predict(too_many, "bottle", api_name="/detect_many")
    assert f"5 images is over this app's limit of {CAP} per batch" in error_text(excinfo)


def test_a_zip_of_images(app, tiny_model, bottles: list[Path], tmp_path: Path) -> None:
    archive = tmp_path / "line.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, path in enumerate(bottles):
            zf.write(path, f"batch/{i}.png")
        zf.writestr("batch/README.txt", "three bottles")
    summary, _, table, _ = Client(app.url, verbose=False).predict(
        [handle_file(str(archive))], "bottle", api_name="/detect_many"
    )
    rows = {row[0]: row[1] for row in table["data"]}
    assert set(rows) == {f"line.zip/batch/{i}.png" for i in range(3)}
    for i, path in enumerate(bottles):
        assert rows[f"line.zip/batch/{i}.png"] == pytest.approx(tiny_model.detect(path, "bottle").score, abs=1e-5)
    assert "1 zip entry not an image, left out" in summary


def test_the_sessions_references_and_calibrated_threshold_are_used(
    app, tiny_model, bottles: list[Path], bottle_dir: Path
) -> None:
    references = sorted((bottle_dir / "test" / "good").glob("*.png"))[1:4]
    client = Client(app.url, verbose=False)  # one session: its references stay in its state
    client.predict([handle_file(str(p)) for p in references], "bottle", "training-free", api_name="/add_references")
    summary, _, table, _ = client.predict([handle_file(str(p)) for p in bottles], "bottle", api_name="/detect_many")
    store = References(tiny_model.reference_fingerprint())
    refs = tiny_model.add_references("bottle", [str(p) for p in references], store=store)
    expected = sorted((tiny_model.detect(p, "bottle", references=store).score for p in bottles), reverse=True)
    assert [row[1] for row in table["data"]] == pytest.approx(expected, abs=1e-5)
    assert [row[3] for row in table["data"]] == pytest.approx([refs.threshold] * 3, abs=1e-6)
    assert "calibrated leave-one-out on its 3 references" in summary and "3 normal images (yours" in summary
    # another visitor's batch does not see them
    _, _, other, _ = Client(app.url, verbose=False).predict(
        [handle_file(str(bottles[0]))], "bottle", api_name="/detect_many"
    )
    assert other["data"][0][3] == pytest.approx(tiny_model.config.scoring.threshold)


def test_collect_images_refuses_before_decoding(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no images found"):
        collect_images([], 3)
    unsafe = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(unsafe, "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(InputError, match="points outside the archive"):
        collect_images([str(unsafe)], 3)


def test_csv_files_are_removed_after_their_age(tmp_path: Path) -> None:
    files = CsvFiles(max_age=0)
    table = results_table([])
    first = files.write(table, "bottle")
    assert first.name == "batch-bottle.csv" and first.is_file()
    second = files.write(table, "a/b")
    assert not first.exists() and second.name == "batch-a_b.csv"  # the older one went, no path from the name
