"""Training: checkpoints and logs, the frozen-feature cache, bad samples, resume after SIGKILL.

Everything runs on the tiny random CLIP: losses and weights are plumbing, never accuracy.
Also holds helpers the other training/evaluation test files import (small datasets, CLI runs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kanoclip import KAnoCLIP
from kanoclip.checkpoint import CONFIG_NAME, KB_NAME, WEIGHTS_NAME, model_card, read_checkpoint
from kanoclip.errors import DatasetError, InputError
from kanoclip.modeling.vv_attention import VisualFeatures
from kanoclip.training import TrainConfig, TrainProgress, train
from kanoclip.training.feature_cache import MEMORY_ENV, FeatureCache, memory_limit_from_env
from kanoclip.training.state import STATE_DIR, STATE_JSON, capture_rng, restore_rng

REPO = Path(__file__).resolve().parents[1]
SIZE = 56  # model input size for quick runs: a 4x4 patch grid on the tiny backbone


# ----------------------------------------------------------------------------- helpers


def cli_env() -> dict[str, str]:
    """Environment for ``python -m kanoclip`` subprocesses: this checkout, offline, one thread.

    One thread per process: on a shared 2-core machine, OpenMP's spinning threads of
    concurrent processes slow each other down by an order of magnitude.
    """
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kanoclip", *args],
        env=cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_small_mvtec(root: Path, bottle_dir: Path, n_good: int = 4, n_bad: int = 4, side: int = 96) -> Path:
    """A small MVTec-AD tree ``root/bottle`` of real bottle images shrunk to ``side`` pixels."""
    pairs = [("good", p, None) for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:n_good]]
    for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:n_bad]:
        pairs.append(("broken_large", p, bottle_dir / "ground_truth" / "broken_large" / f"{p.stem}_mask.png"))
    for defect, image, mask in pairs:
        target = root / "bottle" / "test" / defect / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(image).convert("RGB").resize((side, side), Image.Resampling.BILINEAR).save(target)
        if mask is not None:
            mask_target = root / "bottle" / "ground_truth" / defect / mask.name
            mask_target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(mask).resize((side, side), Image.Resampling.NEAREST).save(mask_target)
    return root


def corrupt(path: Path) -> Path:
    """Truncate an image file so that it cannot be decoded."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture(scope="module")
def small_mvtec(tmp_path_factory, bottle_dir) -> Path:
    return make_small_mvtec(tmp_path_factory.mktemp("small-mvtec"), bottle_dir)


def quick_config(data_root: Path, out: Path, backbone: Path, **kw) -> TrainConfig:
    options = dict(epochs=2, batch_size=4, image_size=SIZE, device="cpu", backbone=str(backbone))
    options.update(kw)
    return TrainConfig(data=[f"mvtec={data_root}"], out=out, **options)


# ----------------------------------------------------------------------------- training


def test_train_writes_checkpoint_state_history_and_curve(small_mvtec, tiny_backbone, tmp_path):
    reports: list[TrainProgress] = []
    out = tmp_path / "run"
    result = train(quick_config(small_mvtec, out, tiny_backbone), progress=reports.append)

    assert not result.cancelled and result.skipped == []
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(set(h) == {"epoch", "total", "kd", "global", "local"} for h in result.history)
    assert all(np.isfinite(h["total"]) for h in result.history)
    for name in (CONFIG_NAME, WEIGHTS_NAME, KB_NAME, "history.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert Image.open(result.loss_curve).format == "PNG"
    logged = json.loads((out / "history.json").read_text())
    assert logged["history"] == result.history and logged["skipped"] == []
    state = json.loads((out / STATE_DIR / STATE_JSON).read_text())
    assert state["epoch"] == 2 and (out / STATE_DIR / state["file"]).is_file()
    assert not any(out.rglob("*.pt")) and not any(out.rglob("*.bin"))  # never pickle
    assert not (out / "feature_cache").exists()

    files = read_checkpoint(out)
    assert files.metadata["epochs"] == 2 and files.metadata["image_size"] == SIZE
    assert files.metadata["n_train_samples"] == 8 and files.metadata["datasets"]
    loaded = KAnoCLIP.from_pretrained(out, device="cpu")
    assert loaded.trained and loaded.image_size == SIZE
    torch.manual_seed(0)
    untrained = KAnoCLIP.for_training(backbone=str(tiny_backbone), device="cpu", config=loaded.config)
    moved = [k for k, v in untrained.model.trainable_state_dict().items() if not torch.equal(v, files.state_dict[k])]
    assert moved, "training changed no weight"

    steps = [r for r in reports if r.epoch >= 1 and r.losses and not r.message]
    assert [(r.epoch, r.step, r.steps) for r in steps] == [(e, s, 2) for e in (1, 2) for s in (1, 2)]
    assert set(steps[0].losses) == {"total", "kd", "global", "local"}
    assert any(r.epoch == 0 and "encoding" in r.message for r in reports)

    card = model_card(files.config, files.metadata)
    assert "mvtec" in card and "Epochs: 2" in card and "randomly initialised" in card
    with pytest.raises(InputError, match="already holds a training run"):
        train(quick_config(small_mvtec, out, tiny_backbone))
    with pytest.raises(InputError, match="cannot resume .*: seed differs") as info:
        train(quick_config(small_mvtec, out, tiny_backbone, seed=1, resume=True))
    assert "--" not in str(info.value)  # the library names its arguments, not the CLI's flags


def test_feature_cache_encodes_each_image_once(small_mvtec, tiny_backbone, tmp_path, monkeypatch):
    encoded: list[int] = []
    original = KAnoCLIP.encode_image

    def counting(self, pixel_values):
        encoded.append(int(pixel_values.shape[0]))
        return original(self, pixel_values)

    monkeypatch.setattr(KAnoCLIP, "encode_image", counting)
    train(quick_config(small_mvtec, tmp_path / "cached", tiny_backbone, epochs=3))
    assert sum(encoded) == 8  # 8 images, 3 epochs: each encoded once

    encoded.clear()
    train(quick_config(small_mvtec, tmp_path / "uncached", tiny_backbone, epochs=2, feature_cache=False))
    assert sum(encoded) == 2 * 8


def test_feature_cache_spills_to_disk_in_float16(tmp_path, monkeypatch):
    def features(batch: int, seed: int) -> VisualFeatures:
        g = torch.Generator().manual_seed(seed)
        return VisualFeatures(
            torch.randn(batch, 8, generator=g), [torch.randn(batch, 4, 8, generator=g) for _ in range(4)], (2, 2)
        )

    first, second = features(3, 0), features(2, 1)
    per_image = (8 + 4 * 4 * 8) * 2  # float16 bytes
    cache = FeatureCache(tmp_path / "fc", memory_limit=3 * per_image)
    cache.put([0, 1, 2], first)
    cache.put([3, 4], second)  # over the budget: on disk
    assert cache.memory_bytes == 3 * per_image and cache.on_disk == 2 and len(cache) == 5
    assert len(list((tmp_path / "fc").glob("chunk-*.safetensors"))) == 1
    got = cache.get([4, 0, 3])
    expected_stage0 = torch.stack([second.stages[0][1], first.stages[0][0], second.stages[0][0]])
    torch.testing.assert_close(got.stages[0], expected_stage0.half().float())
    assert got.global_feature.dtype == torch.float32 and got.grid == (2, 2)

    other = FeatureCache(tmp_path / "fc", memory_limit=0)  # another process reading the chunk files
    other.scan_disk()
    assert 3 in other and 4 in other and 0 not in other
    torch.testing.assert_close(other.get([3]).global_feature, second.global_feature[:1].half().float())
    cache.clear()
    assert not (tmp_path / "fc").exists() and len(cache) == 0

    monkeypatch.setenv(MEMORY_ENV, "0.5")
    assert memory_limit_from_env() == 2**29
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(InputError, match=MEMORY_ENV):
        memory_limit_from_env()


@pytest.fixture
def mvtec_with_bad_image(tmp_path, bottle_dir) -> tuple[Path, Path]:
    root = make_small_mvtec(tmp_path / "data", bottle_dir, n_good=3, n_bad=3)
    bad = corrupt(root / "bottle" / "test" / "good" / "001.png")
    return root, bad


def test_bad_sample_stops_training_naming_it(mvtec_with_bad_image, tiny_backbone, tmp_path):
    root, bad = mvtec_with_bad_image
    with pytest.raises(DatasetError, match="001.png") as info:
        train(quick_config(root, tmp_path / "out", tiny_backbone, epochs=1))
    assert str(bad) in str(info.value) and "skip" in str(info.value)
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()


def test_bad_sample_is_skipped_and_listed(mvtec_with_bad_image, tiny_backbone, tmp_path):
    root, bad = mvtec_with_bad_image
    messages: list[str] = []
    out = tmp_path / "out"
    result = train(
        quick_config(root, out, tiny_backbone, epochs=1, on_bad_sample="skip"),
        progress=lambda p: messages.append(p.message),
    )
    assert [path for path, _ in result.skipped] == [str(bad)]
    assert "truncated" in result.skipped[0][1] or "corrupt" in result.skipped[0][1]
    assert any(str(bad) in m for m in messages)
    assert json.loads((out / "history.json").read_text())["skipped"][0][0] == str(bad)
    assert read_checkpoint(out).metadata["n_train_samples"] == 5


def test_should_stop_cancels_between_steps(small_mvtec, tiny_backbone, tmp_path):
    calls = {"n": 0}

    def stop_in_first_epoch() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # 2 preparation chunks, then one training step

    result = train(quick_config(small_mvtec, tmp_path / "out", tiny_backbone), should_stop=stop_in_first_epoch)
    assert result.cancelled and result.history == []
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()

    resumed = train(
        quick_config(small_mvtec, tmp_path / "out", tiny_backbone, epochs=1, resume=True)
    )  # nothing to resume: starts over
    assert not resumed.cancelled and [h["epoch"] for h in resumed.history] == [1]
    assert (tmp_path / "out" / WEIGHTS_NAME).is_file()


def test_push_uploads_only_the_checkpoint_files(small_mvtec, tiny_backbone, tmp_path, monkeypatch):
    import kanoclip.checkpoint as checkpoint

    uploaded: dict[str, list[str]] = {}

    def fake_push(folder, repo_id, **kw):
        uploaded[repo_id] = sorted(p.name for p in Path(folder).iterdir())
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(checkpoint, "push_to_hub", fake_push)
    train(quick_config(small_mvtec, tmp_path / "out", tiny_backbone, epochs=1, push_to_hub="me/kanoclip-test"))
    assert uploaded == {"me/kanoclip-test": sorted([CONFIG_NAME, KB_NAME, WEIGHTS_NAME])}


# ----------------------------------------------------------------------------- options


def test_adam_with_anomalyclips_betas_is_used_recorded_and_kept_on_resume(
    small_mvtec, tiny_backbone, tmp_path, monkeypatch
):
    built: list[tuple[str, dict]] = []
    for name in ("Adam", "AdamW"):
        original = getattr(torch.optim, name)

        def recording(params, *args, _original=original, _name=name, **kw):
            built.append((_name, kw))
            return _original(params, *args, **kw)

        monkeypatch.setattr(torch.optim, name, recording)
    out = tmp_path / "adam"
    train(quick_config(small_mvtec, out, tiny_backbone, epochs=1, optimizer="adam", betas=(0.5, 0.999)))
    assert built == [("Adam", {"lr": 1e-3, "betas": (0.5, 0.999)})]
    run = json.loads((out / STATE_DIR / STATE_JSON).read_text())["run"]
    assert run["optimizer"] == "adam" and run["betas"] == [0.5, 0.999]
    assert read_checkpoint(out).metadata["optimizer"] == "adam"
    with pytest.raises(InputError, match="optimizer differs .*was 'adam', now 'adamw'"):
        train(quick_config(small_mvtec, out, tiny_backbone, epochs=2, resume=True))
    with pytest.raises(InputError, match=r"betas differs .*was \[0.5, 0.999\], now \[0.9, 0.999\]"):
        train(quick_config(small_mvtec, out, tiny_backbone, epochs=2, optimizer="adam", resume=True))
    built.clear()
    result = train(
        quick_config(small_mvtec, out, tiny_backbone, epochs=2, optimizer="adam", betas=(0.5, 0.999), resume=True)
    )
    assert [h["epoch"] for h in result.history] == [1, 2] and built[0][0] == "Adam"


def test_a_state_written_before_the_optimizer_options_resumes_with_the_defaults(small_mvtec, tiny_backbone, tmp_path):
    out = tmp_path / "old"
    train(quick_config(small_mvtec, out, tiny_backbone, epochs=1))
    path = out / STATE_DIR / STATE_JSON
    state = json.loads(path.read_text())
    del (
        state["run"]["optimizer"],
        state["run"]["betas"],
        state["run"]["model"],
    )  # as written before these options existed
    path.write_text(json.dumps(state))
    result = train(quick_config(small_mvtec, out, tiny_backbone, epochs=2, resume=True))
    assert [h["epoch"] for h in result.history] == [1, 2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizer": "sgd"}, "optimizer must be 'adamw' or 'adam', got 'sgd'"),
        ({"betas": (1.0, 0.999)}, r"betas must be two numbers in \[0, 1\).*got \(1.0, 0.999\)"),
        ({"betas": (0.5,)}, r"betas must be two numbers"),
        ({"betas": (-0.1, 0.9)}, r"betas must be two numbers"),
        ({"epochs": 0}, "epochs and batch_size must be at least 1, got 0 and 8"),
        ({"lr": float("nan")}, r"lr \(the learning rate\) must be a positive number"),
        ({"on_bad_sample": "ignore"}, "on_bad_sample must be 'stop' or 'skip'"),
        ({"log_every": 0}, "log_every must be a whole number of steps >= 1, got 0"),
    ],
)
def test_bad_options_are_refused_naming_the_field(tmp_path, options, message):
    with pytest.raises(InputError, match=message) as info:
        train(TrainConfig(data=["mvtec=/nowhere"], out=tmp_path / "out", **options))
    assert "--" not in str(info.value) and "\n" not in str(info.value)


def test_losses_are_read_every_log_every_steps_and_deterministic_is_scoped_to_the_run(
    small_mvtec, tiny_backbone, tmp_path
):
    """8 samples in batches of 2: 4 steps. The running means are read at steps 1, 2 and 4 (the
    first, every 2nd, the last); step 3 repeats step 2's. Deterministic algorithms are on during
    the run only."""
    reports: list[tuple[TrainProgress, bool]] = []
    config = quick_config(small_mvtec, tmp_path / "out", tiny_backbone, epochs=1, batch_size=2, log_every=2)
    config.deterministic = True
    result = train(config, progress=lambda p: reports.append((p, torch.are_deterministic_algorithms_enabled())))
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
    assert all(on for _, on in reports)
    steps = [p for p, _ in reports if p.epoch == 1 and not p.message]
    assert [p.step for p in steps] == [1, 2, 3, 4]
    assert steps[2].losses == steps[1].losses and steps[1].losses != steps[0].losses
    assert steps[3].losses == pytest.approx({k: v for k, v in result.history[0].items() if k != "epoch"})


def test_the_rng_state_holds_the_training_gpu_only(monkeypatch):
    """No GPU here: torch.cuda's RNG calls are recorded. Reading every GPU's state would create a
    CUDA context on each of them, from every process."""
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(3))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's RNG state was read"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's RNG state was set"))
    gpu = torch.device("cuda:1")
    rng = capture_rng(gpu)
    assert set(rng) == {"cpu", "cuda"} and calls == [("get", gpu)]
    assert set(capture_rng(torch.device("cpu"))) == {"cpu"} and len(calls) == 1
    restore_rng(rng, gpu)
    assert calls[-1] == ("set", 1, gpu)
    # a state written when every GPU's was kept: the training GPU's own is restored
    restore_rng({"cpu": torch.get_rng_state(), "cuda.0": torch.zeros(3), "cuda.1": torch.full((3,), 5.0)}, gpu)
    assert calls[-1] == ("set", 5, gpu)


def test_library_messages_name_fields_and_the_cli_names_flags():
    from kanoclip.cli.train import OPTIMIZERS as CLI_OPTIMIZERS
    from kanoclip.cli.train import flag
    from kanoclip.training.trainer import OPTIMIZERS, OptionError, api_name

    assert CLI_OPTIMIZERS == OPTIMIZERS
    error = OptionError(
        lambda name: f"pass {name('resume', True)} or {name('on_bad_sample', 'skip')}; check {name('max_samples')}"
    )
    assert str(error) == "pass resume=True or on_bad_sample='skip'; check max_samples"
    again = error.reworded(flag)
    assert isinstance(again, InputError) and str(again) == "pass --resume or --on-bad-sample skip; check --max-samples"
    assert api_name("data", ["a=1"]) == "data=['a=1']" and flag("data", ["a=1", "b=2"]) == "--data a=1 --data b=2"
    assert flag("feature_cache") == "--no-feature-cache" and flag("betas") == "--betas"


def test_cli_reports_a_resume_mismatch_with_its_flags(small_mvtec, tiny_backbone, tmp_path, capsys):
    from kanoclip.cli import main

    out = tmp_path / "run"
    train(quick_config(small_mvtec, out, tiny_backbone, epochs=1, seed=0))
    args = ["train", "--data", f"mvtec={small_mvtec}", "--out", str(out), "--epochs", "2", "--batch-size", "4",
            "--image-size", str(SIZE), "--backbone", str(tiny_backbone), "--device", "cpu"]  # fmt: skip
    assert main([*args, "--seed", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--seed differs from the interrupted run's (was 0, now 1)" in err and "another --out folder" in err
    assert main(args) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


def test_cli_set_and_precision_reach_the_trained_checkpoint(small_mvtec, tiny_backbone, tmp_path, capsys):
    """``kanoclip train --set ... --precision bf16``: the checkpoint's config holds the setting."""
    from kanoclip.cli import main

    out = tmp_path / "run"
    args = ["train", "--data", f"mvtec={small_mvtec}", "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--image-size", str(SIZE), "--backbone", str(tiny_backbone), "--device", "cpu"]  # fmt: skip
    assert (
        main(
            [*args, "--set", "loss.local_loss=per_stage", "--set", "bicmci.residual_logits=true", "--precision", "bf16"]
        )
        == 0
    )
    saved = read_checkpoint(out).config
    assert saved.loss.local_loss == "per_stage" and saved.bicmci.residual_logits is True
    assert main([*args, "--set", "loss.local_loss=sometimes"]) == 2
    assert "loss.local_loss must be one of" in capsys.readouterr().err


def test_cli_betas_flag_is_parsed_and_checked(capsys):
    from kanoclip.cli import build_parser

    parser = build_parser()
    base = ["train", "--data", "mvtec=/x", "--out", "o"]
    parsed = parser.parse_args([*base, "--optimizer", "adam", "--betas", "0.5,0.999"])
    assert parsed.optimizer == "adam" and parsed.betas == (0.5, 0.999)
    assert parser.parse_args(base).betas == (0.9, 0.999) and parser.parse_args(base).optimizer == "adamw"
    for bad in ("0.5", "1,0.9", "a,b"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--betas", bad])
        assert "--betas" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume


def _wait_for_epoch(out: Path, proc: subprocess.Popen, epoch: int, timeout: float = 120) -> None:
    state = out / STATE_DIR / STATE_JSON
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= epoch:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before epoch {epoch}: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    pytest.fail(f"epoch {epoch} not reached in {timeout} s")


def test_sigkill_then_resume_ends_with_the_same_weights(tiny_backbone, bottle_dir, tmp_path):
    data = make_small_mvtec(tmp_path / "data", bottle_dir, n_good=6, n_bad=6)
    args = ["--data", f"mvtec={data}", "--epochs", "3", "--batch-size", "3", "--image-size", str(SIZE),
            "--backbone", str(tiny_backbone), "--device", "cpu", "--seed", "7"]  # fmt: skip
    reference = tmp_path / "reference"
    done = run_cli("train", *args, "--out", str(reference))
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kanoclip", "train", *args, "--out", str(killed)],
        env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_epoch(killed, proc, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((killed / STATE_DIR / STATE_JSON).read_text())["epoch"] < 3, "killed too late to test resuming"

    resumed = run_cli("train", *args, "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    ref, got = load_file(reference / WEIGHTS_NAME), load_file(killed / WEIGHTS_NAME)
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=key)
    ref_log = json.loads((reference / "history.json").read_text())["history"]
    got_log = json.loads((killed / "history.json").read_text())["history"]
    assert [h["epoch"] for h in got_log] == [1, 2, 3]
    np.testing.assert_allclose([h["total"] for h in got_log], [h["total"] for h in ref_log], atol=1e-6)


def test_model_settings_reach_the_loss_and_the_checkpoint_and_are_kept_on_resume(
    small_mvtec, tiny_backbone, tmp_path, monkeypatch
):
    import kanoclip.modeling.model as modeling
    from kanoclip.config import KAnoCLIPConfig, LossConfig

    seen: list[tuple[str, tuple]] = []
    original = modeling.total_loss

    def recording(config, **kw):
        seen.append((config.local_loss, tuple(kw["stage_maps"].shape)))
        return original(config, **kw)

    monkeypatch.setattr(modeling, "total_loss", recording)
    model = KAnoCLIPConfig(loss=LossConfig(local_loss="per_stage"))
    out = tmp_path / "per-stage"
    result = train(quick_config(small_mvtec, out, tiny_backbone, epochs=1, model=model))
    assert seen and all(kind == "per_stage" and shape[1:] == (4, 2, 4, 4) for kind, shape in seen)  # 4 stages, 4x4 grid
    assert np.isfinite(result.history[0]["local"])
    assert model.image_size is None  # the caller's config is not changed
    saved = read_checkpoint(out).config
    assert saved.loss.local_loss == "per_stage" and saved.image_size == SIZE
    with pytest.raises(InputError, match=r"the model setting loss.local_loss differs .*was 'per_stage', now 'mean'"):
        train(quick_config(small_mvtec, out, tiny_backbone, epochs=2, resume=True))
