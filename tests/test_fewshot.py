"""The few-shot protocol (kanoclip.evaluation.fewshot) and ``kanoclip eval --shots``.

Tiny random backbone: plumbing (draws, left-out references, mean ± std), never accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kanoclip import KAnoCLIP
from kanoclip.data import load_dataset
from kanoclip.evaluation.evaluate import evaluate
from kanoclip.evaluation.fewshot import draw_references, few_shot
from kanoclip.evaluation.metrics import compute_metrics
from kanoclip.references import References

from test_training import make_small_mvtec, run_cli


def test_draws_are_seeded_and_differ_between_seeds(tmp_path):
    pool = [tmp_path / f"{i}.png" for i in range(20)]
    assert draw_references(pool, 3, 0, "bottle") == draw_references(pool, 3, 0, "bottle")
    assert len({tuple(draw_references(pool, 3, seed, "bottle")) for seed in range(5)}) > 1
    assert len(set(draw_references(pool, 4, 1, "bottle"))) == 4


def test_a_run_equals_detecting_the_rest_with_the_drawn_references(tiny_backbone, bottle_dir, tmp_path):
    """No train split: k test normals become the references and leave the test set; the run's
    metrics are compute_metrics of detect's scores on what is left (computed here with the API)."""
    root = make_small_mvtec(tmp_path / "mvtec", bottle_dir, n_good=5, n_bad=4)
    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    result = few_shot(model, [("mvtec", root)], shots=[2], seeds=2, batch_size=4)
    samples = load_dataset("mvtec", root)
    normals = [s.image for s in samples if s.label == 0]
    for seed in range(2):
        chosen = draw_references(normals, 2, seed, "bottle")
        store = References(model.reference_fingerprint())
        model.add_references("bottle", [str(p) for p in chosen], store=store)
        rest = [s for s in samples if s.image not in chosen]
        scores = np.array([model.detect(str(s.image), "bottle", references=store).score for s in rest])
        expected = compute_metrics(np.array([s.label for s in rest]), scores, None, None)["image_auroc"]
        assert result["shots"][2]["datasets"]["mvtec"]["classes"]["bottle"]["image_auroc"]["runs"][
            seed
        ] == pytest.approx(expected, abs=1e-6)
    spread = result["shots"][2]["datasets"]["mvtec"]["mean"]["image_auroc"]
    assert spread["mean"] == pytest.approx(np.mean(spread["runs"])) and spread["std"] == pytest.approx(
        np.std(spread["runs"])
    )
    assert result["shots"][2]["datasets"]["mvtec"]["classes"]["bottle"]["n_normal"] == 3  # 5 - 2 left out
    assert result["protocol"]["pools"] == {"mvtec/bottle": "test"}
    # the zero-shot row on the same test images, seed by seed: the model with no references on the rest
    for seed in range(2):
        rest = [s for s in samples if s.image not in draw_references(normals, 2, seed, "bottle")]
        scores = np.array([model.detect(str(s.image), "bottle").score for s in rest])
        expected = compute_metrics(np.array([s.label for s in rest]), scores, None, None)["image_auroc"]
        same = result["zero_shot_same_images"]["mvtec"]["classes"]["bottle"]["image_auroc"]["runs"][seed]
        assert same == pytest.approx(expected, abs=1e-6)


def test_eval_shots_on_the_real_bottle_data_reports_each_k_with_mean_and_std(
    tiny_backbone, shared_data, bottle_dir, tmp_path
):
    """With --references too: the zero-shot row is plain eval's (the model without references)."""
    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    plain = evaluate(model, [("mvtec", shared_data / "mvtec_ad")])["datasets"]["mvtec"]["mean"]
    model.add_references("bottle", [str(p) for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:2]])
    refs = model.save_references(tmp_path / "refs")
    out_json = tmp_path / "fewshot.json"
    done = run_cli(
        "eval", "--backbone", str(tiny_backbone), "--device", "cpu", "--data", f"mvtec={shared_data / 'mvtec_ad'}",
        "--shots", "1,2", "--seeds", "2", "--json", str(out_json), "--references", str(refs),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| mvtec |")]
    settings = ["zero-shot", "zero-shot, k-shot's test images", "1-shot", "2-shot"]
    assert [row.split("|")[2].strip() for row in rows] == settings
    assert all("±" in row for row in rows[1:]) and "±" not in rows[0]
    saved = json.loads(out_json.read_text())
    for metric, value in plain.items():
        assert saved["zero_shot"]["datasets"]["mvtec"]["mean"][metric] == pytest.approx(value, abs=1e-6), metric
    for k in ("1", "2"):
        bottle = saved["shots"][k]["datasets"]["mvtec"]["classes"]["bottle"]
        assert len(bottle["pixel_auroc"]["runs"]) == 2 and bottle["n_normal"] == 20 - 2  # max(k) held out per seed
    bad = run_cli(
        "eval", "--backbone", str(tiny_backbone), "--data", f"mvtec={shared_data / 'mvtec_ad'}", "--shots", "0,x"
    )
    assert bad.returncode == 2 and "--shots" in bad.stderr
