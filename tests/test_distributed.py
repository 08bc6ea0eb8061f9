"""Data-parallel ``detect`` and ``eval``: 2 gloo CPU processes give the single process's outputs.

The launches use ``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath; with
``--device cpu`` each process runs on the CPU over gloo), the command docs/multi-gpu.md gives.
The single-process references run in this process, with the same flags, except for the batch
size: the parts then go through other batches, whose float noise stays far below 1e-6.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kanoclip.cli import main
from kanoclip.distributed import Processes

from test_training import REPO, SIZE, cli_env, corrupt, make_small_mvtec

TOLERANCE = 1e-6


def launch(*args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "-m",
        "kanoclip",
        *args,
    ]
    done = subprocess.run(command, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done


def assert_close(ours: Any, reference: Any, where: str = "") -> None:
    """Same structure, keys in the same order, equal values; floats within TOLERANCE."""
    if isinstance(reference, dict):
        assert isinstance(ours, dict) and list(ours) == list(reference), where
        for key in reference:
            assert_close(ours[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, list):
        assert isinstance(ours, list) and len(ours) == len(reference), where
        for i, (a, b) in enumerate(zip(ours, reference)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(reference, float) and not isinstance(reference, bool):
        assert isinstance(ours, float) and (math.isnan(ours) == math.isnan(reference)), where
        assert math.isnan(reference) or abs(ours - reference) <= TOLERANCE, f"{where}: {ours} vs {reference}"
    else:
        assert ours == reference, where


def model_flags(backbone: Path) -> list[str]:
    return ["--backbone", str(backbone), "--device", "cpu", "--set", f"image_size={SIZE}"]


def test_a_process_alone_ignores_the_launcher_and_shards_nothing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it
    alone = Processes("cpu", alone=True)
    assert (alone.rank, alone.world, alone.is_main, alone.model_device) == (0, 1, True, "cpu")
    assert (
        alone.shard([3, 1, 2]) == [3, 1, 2] and alone.gather([3, 1]) == [3, 1] and alone.broadcast({"a": 1}) == {"a": 1}
    )
    monkeypatch.delenv("WORLD_SIZE")
    assert Processes("auto").model_device == "auto"  # one process: the loader resolves the option itself


def test_an_empty_part_predicts_empty_arrays(tiny_backbone):
    """A class with fewer images than processes leaves some processes nothing to predict."""
    from kanoclip import KAnoCLIP
    from kanoclip.evaluation.evaluate import predict

    model = KAnoCLIP.from_pretrained(None, backbone=str(tiny_backbone), device="cpu", overrides={"image_size": SIZE})
    ((scores, maps),) = predict({"": model}, []).values()
    assert (scores.shape, maps.shape) == ((0,), (0, SIZE, SIZE)) and maps.dtype == scores.dtype == "float32"


def test_two_processes_detect_like_one(tiny_backbone, bottle_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    # 6 files split 3 + 3, the unreadable one in the second process's part
    for i, path in enumerate(sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:5]):
        Image.open(path).convert("RGB").resize((80, 80)).save(images / f"{i}.png")
    shutil.copy(images / "0.png", images / "4b.png")
    corrupt(images / "4b.png")
    flags = [str(images), "--class", "bottle", *model_flags(tiny_backbone), "--json"]

    done = launch("detect", *flags, "--batch-size", "2", "--out", str(tmp_path / "two"))
    assert main(["detect", *flags, "--out", str(tmp_path / "one")]) == 1
    single = json.loads(capsys.readouterr().out)

    assert done.returncode == 1  # the unreadable image's exit status, from every process
    ours = json.loads(done.stdout)  # one JSON list: only the main process prints
    assert [Path(row["image"]).name for row in single] == ["0.png", "1.png", "2.png", "3.png", "4.png", "4b.png"]
    assert "error" in single[-1] and all("score" in row for row in single[:-1])
    assert_close(ours, single)
    with open(tmp_path / "one" / "results.csv") as a, open(tmp_path / "two" / "results.csv") as b:
        rows_one, rows_two = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [{k: v for k, v in r.items() if k != "score"} for r in rows_two] == [
        {k: v for k, v in r.items() if k != "score"} for r in rows_one
    ]
    assert all(
        abs(float(x["score"] or 0) - float(y["score"] or 0)) <= TOLERANCE + 5e-7 for x, y in zip(rows_two, rows_one)
    )  # 6 decimals
    overlays = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == overlays and len(overlays) == 6  # 5 overlays + CSV


@pytest.mark.parametrize("sweep", [False, True], ids=["eval", "sweep"])
def test_two_processes_evaluate_like_one(sweep, tiny_backbone, bottle_dir, tmp_path, capsys):
    data = make_small_mvtec(tmp_path / "data", bottle_dir, n_good=3, n_bad=4, side=64)  # 7 images: 4 + 3
    flags = ["--data", f"mvtec={data}", *model_flags(tiny_backbone)]
    if sweep:
        variants = {"base": {}, "last stage": {"training_free.stage_weights": [0, 0, 0, 1]}}
        (tmp_path / "sweep.json").write_text(json.dumps(variants))
        flags += ["--sweep", str(tmp_path / "sweep.json")]

    done = launch(
        "eval", *flags, "--batch-size", "2", "--json", str(tmp_path / "two.json"), "--report", str(tmp_path / "two.md")
    )
    assert main(["eval", *flags, "--json", str(tmp_path / "one.json")]) == 0
    single_report = capsys.readouterr().out

    assert done.returncode == 0
    assert done.stdout == (tmp_path / "two.md").read_text()  # printed once, by the main process
    assert done.stdout == single_report
    ours, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    entries = single["variants"].values() if sweep else [single]
    rows = [entry["datasets"]["mvtec"]["classes"]["bottle"] for entry in entries]
    assert len(rows) == (2 if sweep else 1) and all((r["n_normal"], r["n_anomalous"]) == (3, 4) for r in rows)
    assert all(r["pixel_auroc"] is not None for r in rows)  # the maps were gathered, not only the scores
    assert_close(ours, single)


def test_the_accelerator_ignores_accelerates_mixed_precision_setting():
    """A user's ``ACCELERATE_MIXED_PRECISION`` (or accelerate config) would make accelerate wrap the
    trainer in autocast; precision is the project's own setting, so the run's Accelerator pins "no"."""
    script = (
        "from accelerate import Accelerator\n"
        "from accelerate.state import AcceleratorState\n"
        "from kanoclip.distributed import Processes\n"
        "print(Accelerator(cpu=True).mixed_precision)\n"  # the premise: accelerate itself follows the variable
        "AcceleratorState._reset_state(True)\n"
        "procs = Processes('cpu', alone=True)\n"
        "procs.state = object()  # as with several processes, whose run builds the Accelerator\n"
        "accelerator = procs.accelerator\n"
        "print(accelerator.mixed_precision, accelerator.native_amp, accelerator.scaler)\n"
    )
    env = {**cli_env(), "ACCELERATE_MIXED_PRECISION": "bf16"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["bf16", "no False None"]
