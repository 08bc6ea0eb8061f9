"""The evaluation report folder (``kanoclip eval --report-dir``): its page, figures and per-image scores.

Runs the ``kanoclip`` command (in this process, for speed) on 4 good and 4 broken_large bottle
images (masks included) with the tiny random CLIP: the figures are plumbing, never accuracy. The
checks compare the folder with numbers computed here independently (direct ``model.detect``,
scikit-learn on the CSV).
"""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from kanoclip.cli import main
from kanoclip.evaluation.evaluate import format_sweep_report, sweep
from kanoclip.evaluation.fewshot import few_shot, format_few_shot_report
from kanoclip.evaluation.report import ReportConfig, ReportWriter, markdown_to_html, worst_cases

from test_training import make_small_mvtec


class _Page(HTMLParser):
    """The page's <img> sources, its links and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        if tag == "a":
            self.links.append(values["href"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def read_scores(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def mini_bottle(tmp_path_factory, bottle_dir: Path) -> Path:
    return make_small_mvtec(tmp_path_factory.mktemp("report-data"), bottle_dir, n_good=4, n_bad=4)


@pytest.fixture(scope="module")
def report(tiny_backbone: Path, mini_bottle: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    code = main([
        "eval", "--data", f"mvtec={mini_bottle}", "--backbone", str(tiny_backbone), "--device", "cpu",
        "--report-dir", str(out), "--worst", "3",
    ])  # fmt: skip
    assert code == 0 and (out / "index.html").is_file()
    return out


def test_the_page_shows_the_tables_and_every_figure_offline(report: Path) -> None:
    page = parse(report / "index.html")
    text = " ".join(page.text)
    assert len(page.images) >= 4
    for src in page.images:
        assert "/" not in src and src.endswith(".png")  # beside the page: the folder moves as one
        with Image.open(report / src) as image:
            image.load()
            assert image.width >= 200 and image.height >= 150
    for name in ("ROC curve", "histogram", "PRO curve", "Worst-case gallery"):
        assert name in text, name
    assert "script" not in page.tags and not re.search(
        r"(src|href)=['\"]?(https?:)?//", (report / "index.html").read_text()
    )
    assert {link for link in page.links if not link.startswith("#")} == {"report.md", "metrics.json", "scores.csv"}
    assert [link for link in page.links if link.startswith("#")] == ["#mvtec-bottle"]
    assert "id='mvtec-bottle'" in (report / "index.html").read_text()
    # the same table as report.md: each of its rows' cells, in order
    rows = [line for line in (report / "report.md").read_text().splitlines() if line.startswith("| mvtec |")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip().strip("*") for cell in row.strip("|").split("|")]
        assert re.search(r"\s+".join(re.escape(c) for c in cells), text), row
    assert "bottle" in text and "plumbing" in text


def test_scores_csv_holds_detects_scores(report: Path, mini_bottle: Path, tiny_model) -> None:
    rows = read_scores(report / "scores.csv")
    assert len(rows) == 8
    assert list(rows[0]) == ["dataset", "class", "path", "defect", "label", "score", "threshold", "verdict"]
    default = tiny_model.config.scoring.threshold
    for row in rows:
        path = Path(row["path"])
        assert path.is_relative_to(mini_bottle) and path.is_file()
        assert row["label"] == ("0" if path.parent.name == "good" else "1")
        direct = tiny_model.detect(path, "bottle")
        assert float(row["score"]) == pytest.approx(direct.score, abs=1e-5)
        assert float(row["threshold"]) == default  # no references: the default decides
        assert row["verdict"] == ("anomalous" if float(row["score"]) >= default else "normal")
    assert sum(row["label"] == "1" for row in rows) == 4


def test_the_reports_auroc_is_scikit_learns_on_scores_csv(report: Path) -> None:
    rows = read_scores(report / "scores.csv")
    labels = [int(row["label"]) for row in rows]
    scores = [float(row["score"]) for row in rows]
    bottle = json.loads((report / "metrics.json").read_text())["datasets"]["mvtec"]["classes"]["bottle"]
    assert bottle["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert bottle["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f"| {100 * roc_auc_score(labels, scores):.1f} |" in (report / "report.md").read_text()


def test_worst_cases_are_the_highest_good_and_the_lowest_anomalous() -> None:
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.7, 0.8, 0.3, 0.5, 0.05])
    good = sorted((i for i in range(8) if labels[i] == 0), key=lambda i: -scores[i])[:2]
    bad = sorted((i for i in range(8) if labels[i] == 1), key=lambda i: scores[i])[:2]
    assert worst_cases(labels, scores, 2).tolist() == good + bad == [0, 3, 7, 1]
    assert len(worst_cases(labels, scores, 10)) == 8  # fewer images than k: all of them


def test_bad_report_settings_are_refused(tmp_path: Path, mini_bottle: Path, capsys) -> None:
    with pytest.raises(ValueError, match="worst must be a whole number >= 1"):
        ReportConfig(worst=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, message in (
        (["--worst", "2"], "--worst sets the report folder's gallery; give --report-dir DIR too"),
        (["--report-dir", str(blocker)], f"--report-dir {blocker} is a file"),
    ):
        assert main(["eval", "--data", f"mvtec={mini_bottle}", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kanoclip eval: error:") and message in err[0]


def test_markdown_tables_become_html_tables() -> None:
    html = markdown_to_html("# T\n\n> **warn**\n\n- a `b`\n\n| x | y |\n|---|---:|\n| 1 | <2> |\n")
    assert "<h1>T</h1>" in html and "<blockquote><strong>warn</strong></blockquote>" in html
    assert "<li>a <code>b</code></li>" in html
    assert "<th>x</th><th>y</th>" in html and "<td>1</td><td>&lt;2&gt;</td>" in html and "---" not in html


def test_a_sweep_report_compares_the_variants(tiny_model, mini_bottle: Path, tmp_path: Path) -> None:
    variants = {"base": {}, "sigma 2": {"scoring.sigma": 2.0}}
    writer = ReportWriter(tmp_path / "sweep", tiny_model, ReportConfig(worst=1))
    results = sweep(tiny_model, [("mvtec", mini_bottle)], variants, observer=writer.observe)
    index = writer.finish(results, format_sweep_report(results, tiny_model))
    page = parse(index)
    assert "mvtec-sweep.png" in page.images and "Sweep" in " ".join(page.text)
    rows = read_scores(index.parent / "scores.csv")
    assert len(rows) == 16 and [row["variant"] for row in rows] == ["base"] * 8 + ["sigma 2"] * 8
    # each variant's rows give that variant's AUROC
    for name in variants:
        mine = [row for row in rows if row["variant"] == name]
        auroc = roc_auc_score([int(r["label"]) for r in mine], [float(r["score"]) for r in mine])
        assert results["variants"][name]["datasets"]["mvtec"]["classes"]["bottle"]["image_auroc"] == pytest.approx(
            auroc, abs=1e-12
        )


def test_a_few_shot_report_shows_k_shot_beside_zero_shot(tiny_model, mini_bottle: Path, tmp_path: Path) -> None:
    writer = ReportWriter(tmp_path / "shots", tiny_model, ReportConfig(worst=1))
    results = few_shot(tiny_model, [("mvtec", mini_bottle)], [1], 2, observer=writer.observe)
    index = writer.finish(results, format_few_shot_report(results, tiny_model))
    page = parse(index)
    text = " ".join(page.text)
    assert "mvtec-shots.png" in page.images and "zero-shot" in text and "1-shot" in text
    runs = results["shots"][1]["datasets"]["mvtec"]["classes"]["bottle"]["image_auroc"]["runs"]
    expected = f"{100 * np.mean(runs):.1f} ± {100 * np.std(runs):.1f}"
    assert expected in text  # the class's k-shot row, mean ± std over the 2 seeds


def test_the_calibrated_threshold_decides_where_references_give_one(tiny_backbone, bottle_dir, mini_bottle, tmp_path):
    from kanoclip import KAnoCLIP
    from kanoclip.evaluation.evaluate import evaluate, format_report

    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")  # its own store, not the shared one
    good = sorted((bottle_dir / "test" / "good").glob("*.png"))[10:13]  # not among the evaluated images
    calibrated = model.add_references("bottle", [str(p) for p in good]).threshold
    assert calibrated is not None and calibrated != model.config.scoring.threshold
    writer = ReportWriter(tmp_path / "calibrated", model, ReportConfig(worst=1))
    results = evaluate(model, [("mvtec", mini_bottle)], observer=writer.observe)
    writer.finish(results, format_report(results, model))
    rows = read_scores(tmp_path / "calibrated" / "scores.csv")
    assert len(rows) == 8
    for row in rows:
        direct = model.detect(row["path"], "bottle")  # with its references, as the evaluation
        assert float(row["score"]) == pytest.approx(direct.score, abs=1e-5)
        assert float(row["threshold"]) == pytest.approx(calibrated) == direct.threshold
        assert row["verdict"] == ("anomalous" if direct.is_anomalous else "normal")
