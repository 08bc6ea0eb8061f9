"""Evaluation: metrics per class and per dataset, the report, and the issue's acceptance run.

The tiny random CLIP gives plumbing figures, never accuracy: these tests check counts,
layout and that the report's numbers are compute_metrics' numbers.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kanoclip import KAnoCLIP
from kanoclip.config import flatten_overrides
from kanoclip.data import group_by_class, load_dataset, load_mask
from kanoclip.evaluation.evaluate import RANDOM_WARNING, evaluate, format_report, sweep
from kanoclip.evaluation.metrics import METRIC_KEYS, compute_metrics
from kanoclip.images import load_image, preprocess

from test_training import make_small_mvtec, run_cli

CLASS_KEYS = {"n_normal", "n_anomalous", *METRIC_KEYS}


def make_small_headct(root: Path, shared_data: Path, per_label: int = 3, side: int = 80) -> Path:
    """A HeadCT copy (``head_ct/NNN.png`` + ``labels.csv``) with a few shrunk images per label."""
    source = shared_data / "headct"
    rows = [line.split(",") for line in (source / "labels.csv").read_text().splitlines()[1:] if line.strip()]
    chosen = [r for r in rows if r[1].strip() == "0"][:per_label] + [r for r in rows if r[1].strip() == "1"][:per_label]
    (root / "head_ct").mkdir(parents=True)
    for number, _ in chosen:
        name = f"{int(number):03d}.png"
        Image.open(source / "head_ct" / name).convert("RGB").resize((side, side)).save(root / "head_ct" / name)
    (root / "labels.csv").write_text("id, hemorrhage\n" + "".join(f"{int(n)},{int(label)}\n" for n, label in chosen))
    return root


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory, bottle_dir, shared_data) -> list[tuple[str, Path]]:
    base = tmp_path_factory.mktemp("eval-data")
    return [
        ("mvtec", make_small_mvtec(base / "mvtec", bottle_dir, n_good=4, n_bad=5)),
        ("headct", make_small_headct(base / "headct", shared_data)),
    ]


def _expected(model: KAnoCLIP, kind: str, root: Path, batch_size: int) -> dict:
    """compute_metrics on the model's own scores and S x S maps, computed here batch by batch."""
    samples = load_dataset(kind, root)
    scores, maps = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        pixels = preprocess([load_image(s.image) for s in batch], model.image_size, model.image_mean, model.image_std)
        with torch.inference_mode():
            out = model(model.encode_image(pixels), [model.canonical_class(s.class_name)[0] for s in batch])
        scores += out.score.tolist()
        maps.append(out.anomaly_map.numpy())
    labels = [s.label for s in samples]
    size = (model.image_size, model.image_size)
    masks = np.stack([load_mask(s, size) for s in samples]) if any(s.mask for s in samples) else None
    return compute_metrics(labels, scores, masks, np.concatenate(maps) if masks is not None else None)


def test_report_metrics_are_compute_metrics_of_the_same_scores(tiny_model, small_sets):
    seen: list[tuple[int, int]] = []
    results = evaluate(tiny_model, small_sets, batch_size=3, progress=lambda d, t: seen.append((d, t)))

    assert set(results) == {"datasets"} and list(results["datasets"]) == ["mvtec", "headct"]
    assert seen[-1] == (15, 15) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    mvtec, headct = results["datasets"]["mvtec"], results["datasets"]["headct"]
    assert set(mvtec) == {"classes", "mean"} and set(mvtec["mean"]) == set(METRIC_KEYS)
    row = mvtec["classes"]["bottle"]
    assert set(row) == CLASS_KEYS and (row["n_normal"], row["n_anomalous"]) == (4, 5)
    assert headct["classes"]["head"]["n_normal"] == 3 and headct["classes"]["head"]["n_anomalous"] == 3

    for kind, root in small_sets:
        expected = _expected(tiny_model, kind, root, batch_size=3)
        entry = results["datasets"][kind]
        (row,) = entry["classes"].values()
        for key in METRIC_KEYS:
            if expected[key] is None:
                assert row[key] is None and entry["mean"][key] is None, key
            else:
                assert row[key] == pytest.approx(expected[key], abs=1e-6), key
                assert entry["mean"][key] == pytest.approx(expected[key], abs=1e-6), key
    assert mvtec["mean"]["pixel_aupro"] is not None and headct["mean"]["pixel_auroc"] is None
    json.dumps(results)  # JSON-ready: plain floats, ints and None

    report = format_report(results, tiny_model)
    assert RANDOM_WARNING in report
    bottle = mvtec["classes"]["bottle"]
    cells = [f"{100 * bottle[k]:.1f}" for k in METRIC_KEYS]
    assert f"| mvtec | bottle | 4 | 5 | {' | '.join(cells)} |" in report
    head = results["datasets"]["headct"]["classes"]["head"]
    head_cells = [f"{100 * head[k]:.1f}" for k in METRIC_KEYS[:3]] + ["-", "-", "-"]
    assert f"| headct | head | 3 | 3 | {' | '.join(head_cells)} |" in report
    assert "| headct | **mean** | 3 | 3 |" in report


def test_mean_is_over_classes(tiny_model, bottle_dir, tmp_path):
    root = make_small_mvtec(tmp_path / "two", bottle_dir, n_good=3, n_bad=3)
    (root / "bottle").rename(root / "cable")  # a second class: same images, another class name
    make_small_mvtec(root, bottle_dir, n_good=2, n_bad=2)
    entry = evaluate(tiny_model, [("mvtec", root)], batch_size=4)["datasets"]["mvtec"]
    assert list(entry["classes"]) == ["bottle", "cable"]
    for key in METRIC_KEYS:
        values = [row[key] for row in entry["classes"].values()]
        assert entry["mean"][key] == pytest.approx(np.mean(values)), key


def test_acceptance_train_on_bottle_then_eval_mtd_and_headct(tiny_backbone, bottle_dir, shared_data, tmp_path):
    """The issue's run: train 1 epoch on MVTec-AD bottle, evaluate zero-shot on MTD and HeadCT."""
    out = tmp_path / "checkpoints" / "bottle"
    started = time.monotonic()
    trained = run_cli(
        "train", "--data", f"mvtec={bottle_dir.parent}", "--epochs", "1", "--out", str(out),
        "--backbone", str(tiny_backbone), "--device", "cpu", "--image-size", "56",
    )  # fmt: skip
    train_s = time.monotonic() - started
    assert trained.returncode == 0, trained.stderr
    assert f"checkpoint: {out}" in trained.stdout

    report_path, json_path = tmp_path / "report.md", tmp_path / "metrics.json"
    started = time.monotonic()
    done = run_cli(
        "eval", "--checkpoint", str(out), "--data", f"mtd={shared_data / 'mtd'}",
        "--data", f"headct={shared_data / 'headct'}",
        "--json", str(json_path), "--report", str(report_path), "--batch-size", "32",
    )  # fmt: skip
    eval_s = time.monotonic() - started
    print(f"acceptance: train {train_s:.1f} s (83 images, 1 epoch), eval {eval_s:.1f} s (1544 images)")
    assert done.returncode == 0, done.stderr
    results = json.loads(json_path.read_text())
    mtd, headct = results["datasets"]["mtd"], results["datasets"]["headct"]
    assert [(c["n_normal"], c["n_anomalous"]) for c in mtd["classes"].values()] == [(952, 392)]
    assert [(c["n_normal"], c["n_anomalous"]) for c in headct["classes"].values()] == [(100, 100)]
    assert all(set(c) == CLASS_KEYS for d in (mtd, headct) for c in d["classes"].values())
    assert mtd["mean"]["pixel_auroc"] is not None and headct["mean"]["pixel_auroc"] is None
    report = report_path.read_text()
    assert report == done.stdout
    assert RANDOM_WARNING in report
    assert "| mtd | magnetic_tile | 952 | 392 |" in report and "| headct | head | 100 | 100 |" in report
    assert eval_s < 240, f"evaluating 1544 tiny-model images took {eval_s:.0f} s"


def test_eval_cli_errors_are_one_line(tmp_path, small_sets):
    kind, root = small_sets[0]
    done = run_cli("eval", "--data", f"{kind}={root}", "--backbone", str(tmp_path / "no-such-backbone"))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kanoclip eval: error:") and "no-such-backbone" in lines[0]


SWEEP = {
    "last stage": {"training_free.stage_weights": [0, 0, 0, 1]},
    "all stages, 8 V-V blocks": {"training_free": {"stage_weights": [1, 1, 1, 1], "num_replaced_blocks": 8}},
    "no descriptions, sigma 1": {"training_free.use_descriptions": False, "scoring.sigma": 1.0},
}


def test_sweep_makes_one_backbone_pass_per_image_and_equals_separate_runs(tiny_backbone, small_sets):
    """Three variants (two V-V path lengths among them) cost one vision forward per image, and
    each variant's figures are those of a model loaded with the same overrides on its own."""
    model = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    images = []
    handle = model.model.clip.vision_model.encoder.register_forward_hook(  # the transformer stack: the backbone's work
        lambda _m, _args, kwargs, _out: images.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    try:
        results = sweep(model, small_sets, SWEEP, batch_size=4)
    finally:
        handle.remove()
    per_class = [len(group) for kind, root in small_sets for group in group_by_class(load_dataset(kind, root)).values()]
    assert sum(images) == sum(per_class) and len(images) == sum(math.ceil(n / 4) for n in per_class)
    assert list(results["variants"]) == list(SWEEP)
    for name, overrides in SWEEP.items():
        alone = KAnoCLIP.from_pretrained(
            backbone=str(tiny_backbone), device="cpu", overrides=flatten_overrides(overrides)
        )
        expected = evaluate(alone, small_sets, batch_size=4)
        for kind, dataset in expected["datasets"].items():
            got = results["variants"][name]["datasets"][kind]["mean"]
            assert got == pytest.approx(dataset["mean"], abs=1e-6), (name, kind)
    # the variants really differ (else the sweep would prove nothing)
    means = [results["variants"][name]["datasets"]["mvtec"]["mean"]["pixel_auroc"] for name in SWEEP]
    assert len(set(means)) == len(means)


def test_sweep_cli_on_the_real_bottle_data_prints_one_row_per_variant(tiny_backbone, shared_data, tmp_path):
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(SWEEP))
    out_json = tmp_path / "sweep-results.json"
    result = run_cli(
        "eval",
        "--backbone",
        str(tiny_backbone),
        "--device",
        "cpu",
        "--data",
        f"mvtec={shared_data / 'mvtec_ad'}",
        "--sweep",
        str(sweep_file),
        "--json",
        str(out_json),
        "--set",
        "scoring.sigma=2",
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| mvtec |" in line]
    assert [row.split("|")[1].strip() for row in rows] == list(SWEEP)
    saved = json.loads(out_json.read_text())
    bottle = saved["variants"]["last stage"]["datasets"]["mvtec"]["classes"]["bottle"]
    assert (bottle["n_normal"], bottle["n_anomalous"]) == (20, 63)
    assert "random backbone" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a": {"image_size": 168}}', "cannot set image_size"),
        ('{"a": {"scoring.sigmaa": 1}}', "unknown config key 'scoring.sigmaa'"),
        ('{"a": {"training_free.stage_weights": [1, 1]}}', "has 2 weights but the model has 4 stages"),
        ("[1, 2]", "expected a non-empty JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_sweep_and_set_errors_are_one_line(tiny_backbone, small_sets, tmp_path, content, message):
    sweep_file = tmp_path / "bad.json"
    sweep_file.write_text(content)
    kind, root = small_sets[0]
    result = run_cli(
        "eval",
        "--backbone",
        str(tiny_backbone),
        "--device",
        "cpu",
        "--data",
        f"{kind}={root}",
        "--sweep",
        str(sweep_file),
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()[-1:]) == 1


def test_set_and_config_flags_reach_the_model(tiny_backbone, small_sets, tmp_path):
    """--config then --set: the report equals a model loaded with the same overrides."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"training_free": {"stage_weights": [1, 0, 0, 0]}, "scoring.sigma": 1}))
    kind, root = small_sets[0]
    out_json = tmp_path / "r.json"
    result = run_cli(
        "eval",
        "--backbone",
        str(tiny_backbone),
        "--device",
        "cpu",
        "--data",
        f"{kind}={root}",
        "--config",
        str(config_file),
        "--set",
        "scoring.sigma=3",
        "--json",
        str(out_json),
    )
    assert result.returncode == 0, result.stderr
    alone = KAnoCLIP.from_pretrained(
        backbone=str(tiny_backbone),
        device="cpu",
        overrides={"training_free.stage_weights": (1, 0, 0, 0), "scoring.sigma": 3.0},
    )
    expected = evaluate(alone, [(kind, root)])
    assert json.loads(out_json.read_text())["datasets"][kind]["mean"] == pytest.approx(
        expected["datasets"][kind]["mean"], abs=1e-6
    )
    bad = run_cli("eval", "--backbone", str(tiny_backbone), "--data", f"{kind}={root}", "--set", "nonsense")
    assert bad.returncode == 2 and "--set: expected KEY=VALUE" in bad.stderr
