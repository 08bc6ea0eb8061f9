"""The Gradio app, driven over HTTP with gradio_client (and its upload checks as unit tests).

The app runs in-process on 127.0.0.1 with the tiny random CLIP: every score here is plumbing,
never accuracy. Training uses a scripted trainer (the real one is tested with kanoclip.training).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from demo import AppConfig, build_app  # noqa: E402
from demo.app import CSS  # noqa: E402
from demo.uploads import ZipLimits, check_zip, confine, discard_upload, extract_zip  # noqa: E402
from kanoclip import KAnoCLIP  # noqa: E402
from kanoclip.errors import CheckpointError, InputError  # noqa: E402
from kanoclip.images import load_image  # noqa: E402
from kanoclip.knowledge import KnowledgeBase  # noqa: E402
from kanoclip.references import References  # noqa: E402
from kanoclip.training import TrainProgress, TrainResult  # noqa: E402
from kanoclip.viz import colorize, heatmap_overlay  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    config: AppConfig
    demo: object

    def client(self) -> Client:
        return Client(self.url, verbose=False)


def launch(config: AppConfig, **kwargs) -> Running:
    demo = build_app(config, **kwargs)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, css=CSS)
    return Running(url=f"http://127.0.0.1:{port}/", config=config, demo=demo)


def app_config(tmp: Path, backbone: Path | str, **extra) -> AppConfig:
    return AppConfig(
        backbone=str(backbone),
        device="cpu",
        data_root=tmp / "data",
        checkpoints_dir=tmp / "checkpoints",
        kb_dir=tmp / "kb",
        **extra,
    )


def mini_mvtec(root: Path, bottle_dir: Path) -> Path:
    """A 4-image MVTec-layout dataset (real bottle images) at ``root/bottle``."""
    for split, names in (("good", ["000.png", "001.png"]), ("broken_large", ["000.png", "001.png"])):
        dest = root / "bottle" / "test" / split
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(bottle_dir / "test" / split / name, dest / name)
            if split != "good":
                masks = root / "bottle" / "ground_truth" / split
                masks.mkdir(parents=True, exist_ok=True)
                shutil.copy(bottle_dir / "ground_truth" / split / name.replace(".png", "_mask.png"), masks)
    return root


def train_inputs(
    name: str, folder: str | None = None, *, kind: str = "auto-detect", archive: Path | None = None
) -> tuple:
    """The /train endpoint's inputs: 1 epoch, batch size 2, lr 1e-3, the backbone's image size."""
    source = "uploaded zip" if archive else "folder under the data root"
    return (source, folder, kind, handle_file(str(archive)) if archive else None, name, 1, 2, 1e-3, 0)


def wait_until_idle(client: Client, deadline: float) -> bool:
    """Whether the app reports no running training before ``deadline`` (the slot frees when the thread ends)."""
    while time.time() < deadline:
        try:
            if client.predict(api_name="/cancel_training") == "No training is running.":
                return True
        except AppError:  # still running, and started by another session
            pass
        time.sleep(0.2)
    return False


def error_text(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "Traceback" not in text and text.strip() not in ("", "Error", "None")
    return text


@dataclass
class ScriptedTrainer:
    """A trainer that reports steps until released (or stopped), then writes a real checkpoint."""

    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    configs: list = field(default_factory=list)
    kb_classes: list = field(default_factory=list)
    stops: int = 0  # how many trainings ended because should_stop() said so
    steps: int = 0  # progress events of the latest training

    def __call__(self, config, progress, should_stop):
        self.configs.append(config)
        self.kb_classes = KnowledgeBase.load(config.kb).classes()  # the file lives only while training
        self.started.set()
        step = self.steps = 0
        while not self.release.wait(0.05):
            step = self.steps = step + 1
            progress(
                TrainProgress(
                    epoch=1,
                    epochs=config.epochs,
                    step=step,
                    steps=1000,
                    losses={"total": 1.0 / step},
                    message=f"step {step}",
                )
            )
            if should_stop():
                self.stops += 1
                return TrainResult(
                    checkpoint=config.out, history=[], loss_curve=config.out / "loss.png", cancelled=True
                )
            if step > 2000:
                raise RuntimeError("never released")
        KAnoCLIP.from_pretrained(backbone=config.backbone, device="cpu").save_pretrained(config.out)
        return TrainResult(
            checkpoint=config.out, history=[{"epoch": 1, "total": 0.5}], loss_curve=config.out / "loss.png"
        )


# ---------------------------------------------------------------------------- the shared app
@pytest.fixture(scope="module")
def trainer() -> ScriptedTrainer:
    return ScriptedTrainer()


@pytest.fixture(scope="module")
def app(tiny_backbone: Path, bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory, trainer: ScriptedTrainer):
    tmp = tmp_path_factory.mktemp("app")
    mini_mvtec(tmp / "data" / "mvtec-mini", bottle_dir)
    outside = tmp / "outside"
    outside.mkdir()
    (tmp / "data" / "escape").symlink_to(outside, target_is_directory=True)
    running = launch(app_config(tmp, tiny_backbone), train_fn=trainer)
    yield running
    running.demo.close()


@pytest.fixture(scope="module")
def client(app: Running) -> Client:
    return app.client()


# ---------------------------------------------------------------------------- detect
def test_detect_bottle_gives_the_heat_map_at_the_input_size(client: Client, tiny_model, bottle_image: Path) -> None:
    summary, score, verdict, overlay_path, region, gallery, guidance = client.predict(
        handle_file(str(bottle_image)), "bottle", api_name="/detect"
    )
    direct = tiny_model.detect(bottle_image, "bottle")
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(direct.score, abs=1e-5)
    assert Path(overlay_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # lossless PNG
    overlay = Image.open(overlay_path).convert("RGB")
    assert overlay.height == 900 and overlay.width > 900  # the colour bar is beside the 900x900 heat map
    expected = np.asarray(heatmap_overlay(load_image(bottle_image), direct.anomaly_map), dtype=int)
    assert np.abs(np.asarray(overlay, dtype=int)[:, :900] - expected).max() <= 2
    assert Image.open(region["image"]).size == (900, 900)
    assert len(region["annotations"]) == 1 and region["annotations"][0]["label"].startswith("anomalous region")
    assert [item["caption"].split(" ")[0] for item in gallery] == ["stage"] * 4 + ["normal", "abnormal"]
    word = "ANOMALOUS" if direct.is_anomalous else "normal"
    assert verdict["label"].startswith(word)
    sources = {row[1] for row in guidance["data"]}
    assert sources == {"built-in", "template"}  # the shipped knowledge base is hand-written, not LLM
    assert [row[3] for row in guidance["data"]] == [g.text for g in direct.guidance]  # ranked by image similarity
    assert "training-free" in summary and "`bottle` (in the knowledge base)" in summary


def test_random_backbone_is_called_meaningless(client: Client) -> None:
    status = client.predict(api_name="/status")
    assert "Random test backbone" in status and "meaningless" in status
    assert "training-free" in status and "cpu" in status


def test_unknown_class_and_threshold_are_used(client: Client, tiny_model, bottle_image: Path) -> None:
    summary, score, verdict, *_ = client.predict(
        handle_file(str(bottle_image)), "space widget", "training-free", 0.0, 0.0, api_name="/detect"
    )
    direct = tiny_model.detect(bottle_image, "space widget", threshold=0.0, sigma=0.0)
    assert score == pytest.approx(direct.score, abs=1e-5)
    assert "not in the knowledge base" in summary
    assert verdict["label"].startswith("ANOMALOUS")  # every score reaches threshold 0


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, bottle_image: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad")
    text = tmp / "notes.png"
    text.write_text("this is not an image\n")
    truncated = tmp / "truncated.png"
    data = bottle_image.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    huge = tmp / "huge.png"
    Image.new("1", (12_000, 9_000)).save(huge, optimize=False)  # 108 MP, a few hundred kB on disk
    return {"text": text, "truncated": truncated, "huge": huge}


@pytest.mark.parametrize(
    ("image", "class_name", "expected"),
    [
        (None, "bottle", "no image"),
        ("text", "bottle", "notes.png: not an image file"),
        ("truncated", "bottle", "truncated.png: corrupt or truncated image"),
        ("huge", "bottle", "megapixel"),
        ("bottle", "", "class name is empty"),
        ("bottle", "   ", "class name is empty"),
    ],
)
def test_bad_input_gets_the_apps_message(
    client: Client, bad_files, bottle_image: Path, image, class_name, expected
) -> None:
    path = {"bottle": bottle_image, **bad_files}.get(image)
    with pytest.raises(AppError) as excinfo:
        client.predict(handle_file(str(path)) if path else None, class_name, api_name="/detect")
    text = error_text(excinfo)
    assert expected in text
    assert "/tmp/gradio" not in text  # the server's cache path is not shown


def test_bad_controls_and_models_are_refused(client: Client, bottle_image: Path) -> None:
    with pytest.raises(AppError) as excinfo:
        client.predict(handle_file(str(bottle_image)), "bottle", "training-free", 1.5, api_name="/detect")
    assert "1.5" in error_text(excinfo)  # the slider's own bound check (a clear gr.Error, not a bare "Error")
    with pytest.raises(AppError) as excinfo:
        client.predict(handle_file(str(bottle_image)), "bottle", "../../etc", api_name="/detect")
    assert "is not 'training-free', a checkpoint under" in error_text(excinfo)


def test_concurrent_clients_each_get_their_own_result(
    app: Running, tiny_model, bottle_dir: Path, shared_data: Path
) -> None:
    jobs = [
        (bottle_dir / "test" / "broken_large" / "000.png", "bottle"),
        (bottle_dir / "test" / "good" / "000.png", "bottle"),
        (bottle_dir / "test" / "contamination" / "000.png", "bottle"),
        (shared_data / "mtd" / "MT_Crack" / "Imgs" / "exp1_num_265613.jpg", "magnetic tile"),
        (shared_data / "mtd" / "MT_Free" / "Imgs" / "exp0_num_743.jpg", "magnetic_tile"),
        (shared_data / "headct" / "head_ct" / "004.png", "head"),
        (shared_data / "headct" / "head_ct" / "150.png", "brain"),
        (bottle_dir / "test" / "broken_small" / "000.png", "screw"),
    ]

    def one(job):
        image, name = job
        out = Client(app.url, verbose=False).predict(handle_file(str(image)), name, api_name="/detect")
        return out[1], Image.open(out[3]).height, out[0]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    for (image, name), (score, height, summary) in zip(jobs, results):
        direct = tiny_model.detect(image, name)
        assert score == pytest.approx(direct.score, abs=1e-5), (image, name)
        assert height == Image.open(image).height  # this request's own image
        assert f"`{direct.class_name}`" in summary
    assert len({round(score, 6) for score, _, _ in results}) > 1


# ---------------------------------------------------------------------------- normal references
def good_bottles(bottle_dir: Path) -> list[Path]:
    return sorted((bottle_dir / "test" / "good").glob("*.png"))


def direct_with(model: KAnoCLIP, image: Path, references: list[Path], class_name: str = "bottle"):
    """``model.detect`` with a store of its own built from ``references`` (the shared model is not changed)."""
    store = References(model.reference_fingerprint())
    if references:
        model.add_references(class_name, references, store=store)
    return model.detect(image, class_name, references=store)


def add_references(client: Client, images: list[Path], class_name: str = "bottle") -> str:
    status, uploaded = client.predict(
        [handle_file(str(p)) for p in images], class_name, "training-free", api_name="/add_references"
    )
    assert uploaded in (None, [])  # the upload box is emptied once they are added
    return status


def test_references_give_a_reference_map_and_a_calibrated_verdict_until_cleared(
    app: Running, tiny_model, bottle_dir: Path, bottle_image: Path
) -> None:
    client = app.client()  # a session of its own
    refs = good_bottles(bottle_dir)[:3]
    status = add_references(client, refs)
    assert "**Normal references of `bottle`:** 3 (yours: this session only)" in status
    assert "calibrated leave-one-out on its 3 references" in status

    summary, score, verdict, _, _, gallery, _ = client.predict(
        handle_file(str(bottle_image)), "bottle", api_name="/detect"
    )
    direct = direct_with(tiny_model, bottle_image, refs)
    assert direct.reference_count == 3 and direct.reference_map is not None
    assert score == pytest.approx(direct.score, abs=1e-5)
    assert f"score {'≥' if direct.is_anomalous else '<'} {direct.threshold:.2f}" in verdict["label"]
    assert verdict["label"].endswith(f"threshold {direct.threshold:.3f}, calibrated leave-one-out on its 3 references")
    assert "**References:** 3 normal images (yours: this session only)" in summary
    captions = [item["caption"] for item in gallery]
    assert len(captions) == 7 and captions[-1] == "reference map (3 normal refs)"
    # drawn like the other maps: the jet colours of the reference map, shrunk to the gallery's 768 px
    drawn = np.asarray(Image.open(gallery[-1]["image"]).convert("RGB"), dtype=float)
    shrunk = np.asarray(Image.fromarray(direct.reference_map.astype(np.float32)).resize((768, 768), Image.BILINEAR))
    assert drawn.shape == (768, 768, 3)
    assert np.abs(drawn - colorize(np.clip(shrunk, 0, 1))).mean() < 3.0

    status = client.predict("bottle", "training-free", api_name="/clear_references")
    assert "**Normal references of `bottle`:** none · default threshold 0.500 (not calibrated)" in status
    _, score, verdict, _, _, gallery, _ = client.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
    assert score == pytest.approx(tiny_model.detect(bottle_image, "bottle").score, abs=1e-5)
    assert verdict["label"].endswith("default threshold 0.500 (not calibrated)")
    assert len(gallery) == 6


def test_the_slider_decides_when_the_calibrated_threshold_is_not_wanted(
    app: Running, tiny_model, bottle_dir: Path, bottle_image: Path
) -> None:
    client = app.client()
    refs = good_bottles(bottle_dir)[3:5]
    add_references(client, refs)
    _, score, verdict, *_ = client.predict(
        handle_file(str(bottle_image)), "bottle", "training-free", 0.3, 4.0, False, api_name="/detect"
    )
    assert score == pytest.approx(direct_with(tiny_model, bottle_image, refs).score, abs=1e-5)  # still fused with them
    assert verdict["label"].endswith("threshold 0.300 set with the slider")
    assert verdict["label"].startswith("ANOMALOUS" if score >= 0.3 else "normal")


def test_concurrent_clients_with_different_references_get_their_own_results(
    app: Running, tiny_model, bottle_dir: Path
) -> None:
    good = good_bottles(bottle_dir)
    sets = [good[i : i + 2 + i % 2] for i in range(0, 16, 2)]  # 8 disjoint sets of 2 or 3 images
    # one test image per client: Gradio rewrites an output file at its content hash on every
    # request, so identical outputs (the stage maps of one image) served at once can be read half-written
    images = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[: len(sets)]

    def one(job: tuple[Path, list[Path]]):
        image, refs = job
        client = Client(app.url, verbose=False)  # each its own session
        add_references(client, refs)
        summary, score, verdict, *_ = client.predict(handle_file(str(image)), "bottle", api_name="/detect")
        return score, verdict["label"], summary

    with ThreadPoolExecutor(max_workers=len(sets)) as pool:
        results = list(pool.map(one, zip(images, sets)))
    for image, refs, (score, label, summary) in zip(images, sets, results):
        direct = direct_with(tiny_model, image, refs)
        assert score == pytest.approx(direct.score, abs=1e-5), [p.name for p in refs]
        assert label.endswith(
            f"threshold {direct.threshold:.3f}, calibrated leave-one-out on its {len(refs)} references"
        )
        assert f"**References:** {len(refs)} normal images" in summary
    assert len({round(score, 6) for score, _, _ in results}) == len(sets)


@pytest.fixture(scope="module")
def many_tiny_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("many")
    paths = []
    for i in range(65):
        path = folder / f"good_{i:02d}.png"
        Image.new("RGB", (16, 16), (i, 100, 200)).save(path)
        paths.append(path)
    return paths


def test_bad_references_get_the_apps_message_and_add_nothing(
    app: Running, bad_files, bottle_dir: Path, bottle_image: Path, many_tiny_images: list[Path]
) -> None:
    client = app.client()
    good = good_bottles(bottle_dir)[:2]
    with pytest.raises(AppError) as excinfo:
        add_references(client, [good[0], bad_files["text"], good[1]])
    text = error_text(excinfo)
    assert "notes.png: not an image file" in text and "/tmp/gradio" not in text
    with pytest.raises(AppError) as excinfo:
        client.predict([], "bottle", "training-free", api_name="/add_references")
    assert "no reference images" in error_text(excinfo)
    with pytest.raises(AppError) as excinfo:
        add_references(client, good, class_name="")
    assert "class name is empty; pick the class the reference images show" in error_text(excinfo)
    with pytest.raises(AppError) as excinfo:
        add_references(client, many_tiny_images)
    assert "65 reference images of 'bottle' exceed the limit of 64 per class; upload at most 64 more" in error_text(
        excinfo
    )
    # none of the refused uploads was added: the session still has no references
    _, _, verdict, _, _, gallery, _ = client.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
    assert verdict["label"].endswith("default threshold 0.500 (not calibrated)") and len(gallery) == 6


def test_a_session_holds_at_most_max_session_references_over_all_classes(
    tiny_backbone: Path, bottle_dir: Path, tmp_path: Path
) -> None:
    running = launch(app_config(tmp_path, tiny_backbone, max_session_references=3))
    try:
        client, good = running.client(), good_bottles(bottle_dir)
        add_references(client, good[:2])
        with pytest.raises(AppError) as excinfo:
            add_references(client, good[2:4], class_name="screw")
        assert "4 reference images over all classes exceed the limit of 3" in error_text(excinfo)
        assert "**Normal references of `screw`:** 1 " in add_references(client, good[2:3], class_name="screw")
    finally:
        running.demo.close()


def test_saved_references_serve_every_session_without_its_own(
    tiny_backbone: Path, tiny_model, bottle_dir: Path, bottle_image: Path, tmp_path: Path
) -> None:
    good = good_bottles(bottle_dir)
    maker = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    maker.add_references("bottle", good[:2])
    folder = maker.save_references(tmp_path / "refs")
    KAnoCLIP.for_training(backbone=str(tiny_backbone), device="cpu").save_pretrained(
        tmp_path / "checkpoints" / "trained"
    )
    running = launch(app_config(tmp_path, tiny_backbone, references=folder))
    try:
        visitor, other = running.client(), running.client()
        _, score, verdict, *_ = visitor.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
        assert score == pytest.approx(direct_with(tiny_model, bottle_image, good[:2]).score, abs=1e-5)
        assert verdict["label"].endswith("calibrated leave-one-out on its 2 references")
        status = add_references(other, good[2:5])  # the other visitor's own win over the shared ones, for them only
        assert "3 (yours: this session only)" in status
        assert (
            "Shared references (loaded with `--references`) of `bottle` serve every visitor whose session has none"
            in status
        )
        _, other_score, other_verdict, *_ = other.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
        assert other_score == pytest.approx(direct_with(tiny_model, bottle_image, good[2:5]).score, abs=1e-5)
        assert other_verdict["label"].endswith("on its 3 references")
        _, again, *_ = visitor.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
        assert again == score
        status = visitor.predict("bottle", "training-free", api_name="/clear_references")
        assert "2 (the app's shared references, loaded with --references)" in status  # not the visitor's to clear
        # a trained checkpoint extracts other features: the saved references do not serve it, and it still loads
        status = visitor.predict("bottle", "checkpoints/trained", api_name="/clear_references")
        assert "**Normal references of `bottle`:** none" in status
        assert (
            "The shared references (`--references`) do not serve this model:" in status
            and "was built for another model" in status
        )
    finally:
        running.demo.close()


def test_a_references_folder_without_references_stops_the_app(tiny_backbone: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as excinfo:
        build_app(app_config(tmp_path, tiny_backbone, references=tmp_path / "empty", preload=False))
    assert str(excinfo.value).startswith(
        f"--references / KANOCLIP_REFERENCES {tmp_path / 'empty'} holds no saved references (expected references.json"
    )


# ---------------------------------------------------------------------------- prompts
def test_prompts_tab_shows_untrained_context_in_training_free_mode(client: Client, tiny_model) -> None:
    header, tokens, heatmap, pca, kd, texts = client.predict("training-free", "bottle", api_name="/prompts")
    assert "context vectors are untrained" in header
    n_ctx = tiny_model.config.prompts.n_ctx
    assert len(tokens["data"]) == 2 * n_ctx and tokens["data"][0][:2] == ["normal", "N1"]
    assert heatmap["type"] == "matplotlib" and heatmap["plot"].startswith("data:image/png;base64,")
    assert pca["plot"].startswith("data:image/png;base64,")
    assert "d(w̄k, w̄a)" in kd and "d(w̄k, w̄n)" in kd
    assert texts["data"][0][0] == "N1"


# ---------------------------------------------------------------------------- train
@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("../outside", "contains '..'"),
        ("/etc", "is outside the data root"),
        ("escape", "leads outside the data root through a symlink"),
        ("no-such-folder", "does not exist"),
        ("", "no data folder given"),
    ],
)
def test_train_folder_is_confined_to_the_data_root(client: Client, folder: str, expected: str) -> None:
    with pytest.raises(AppError) as excinfo:
        client.predict(*train_inputs("", folder), api_name="/train")
    assert expected in error_text(excinfo)


def test_one_training_at_a_time_and_its_checkpoint_reaches_detect(
    app: Running, trainer: ScriptedTrainer, bottle_image: Path
) -> None:
    first, second = app.client(), app.client()
    trainer.release.clear()
    job = first.submit(*train_inputs("run-a", "mvtec-mini"), api_name="/train")
    assert trainer.started.wait(30), "the training did not start"
    with pytest.raises(AppError) as excinfo:
        second.predict(*train_inputs("run-b", "mvtec-mini"), api_name="/train")
    assert "busy" in error_text(excinfo) and "one training runs at a time" in str(excinfo.value)
    with pytest.raises(AppError) as excinfo:
        second.predict(api_name="/cancel_training")
    assert "another visitor" in error_text(excinfo)
    trainer.release.set()
    status, curves, detect_model, _ = job.result(timeout=60)
    assert "Finished: `checkpoints/run-a`" in status and "bottle" in status
    assert curves["plot"].startswith("data:image/png;base64,")
    assert detect_model["value"] == "checkpoints/run-a" and ["checkpoints/run-a"] * 2 in detect_model["choices"]
    config = trainer.configs[-1]
    assert config.data == [f"mvtec={(app.config.data_root / 'mvtec-mini').resolve()}"]
    assert Path(config.out) == app.config.checkpoints_dir / "run-a" and config.epochs == 1 and config.batch_size == 2
    assert "bottle" in trainer.kb_classes  # the app's knowledge base went with it
    assert not Path(config.kb).exists()  # ...and the scratch folder was removed afterwards
    summary, score, *_ = first.predict(
        handle_file(str(bottle_image)), "bottle", "checkpoints/run-a", api_name="/detect"
    )
    assert "trained — checkpoint" in summary and 0.0 <= score <= 1.0
    with pytest.raises(AppError) as excinfo:  # names are not reused
        first.predict(*train_inputs("run-a", "mvtec-mini"), api_name="/train")
    assert "already exists" in error_text(excinfo)


def test_training_can_be_cancelled_by_who_started_it(app: Running, trainer: ScriptedTrainer) -> None:
    owner = app.client()
    trainer.release.clear()
    trainer.started.clear()
    job = owner.submit(*train_inputs("run-cancel", "mvtec-mini", kind="mvtec"), api_name="/train")
    assert trainer.started.wait(30)
    assert "Cancelling" in owner.predict(api_name="/cancel_training")
    status, *_ = job.result(timeout=60)
    assert "Cancelled before a checkpoint was written" in status
    assert not (app.config.checkpoints_dir / "run-cancel").exists()
    assert owner.predict(api_name="/cancel_training") == "No training is running."


def test_training_stops_when_its_stream_is_abandoned(app: Running, trainer: ScriptedTrainer) -> None:
    trainer.release.clear()
    trainer.started.clear()
    stops_before = trainer.stops
    job = app.client().submit(*train_inputs("run-left", "mvtec-mini"), api_name="/train")
    assert trainer.started.wait(30)
    job.cancel()  # what the browser does when the visitor leaves
    deadline = time.time() + 30
    while trainer.stops == stops_before and time.time() < deadline:
        time.sleep(0.2)
    assert trainer.stops == stops_before + 1, "the training kept running for nobody"
    assert wait_until_idle(app.client(), deadline), "the training slot was not freed"


def test_failed_training_leaves_no_checking_message(client: Client) -> None:
    job = client.submit(*train_inputs("", "no-such-folder"), api_name="/train")
    with pytest.raises(AppError) as excinfo:
        job.result(timeout=60)
    assert "does not exist" in error_text(excinfo)
    statuses = [out[0] for out in job.outputs()]
    assert statuses and not any(
        "Checking" in text for text in statuses
    )  # the status was cleared, not left beside the error


def test_model_lists_are_reread_on_page_load(app: Running, client: Client) -> None:
    copied = app.config.checkpoints_dir / "copied-in"  # a checkpoint that appears after the app was built
    copied.mkdir(parents=True)
    (copied / "config.json").write_text("{}")
    (copied / "model.safetensors").write_bytes(b"")
    try:
        detect_list, prompts_list = client.predict(api_name="/model_lists")
        for listed in (detect_list, prompts_list):
            assert ["checkpoints/copied-in"] * 2 in listed["choices"] and ["training-free"] * 2 in listed["choices"]
    finally:
        shutil.rmtree(copied)


def test_loss_curve_is_drawn_per_step(app: Running, trainer: ScriptedTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    import demo.train_tab

    drawn: list[list[dict]] = []
    original = demo.train_tab.plot_loss_curves

    def recording(history, title="Training loss"):
        drawn.append([dict(h) for h in history])
        return original(history, title)

    monkeypatch.setattr(demo.train_tab, "plot_loss_curves", recording)
    trainer.release.clear()
    trainer.started.clear()
    job = app.client().submit(*train_inputs("per-step", "mvtec-mini"), api_name="/train")
    assert trainer.started.wait(30)
    deadline = time.time() + 30
    while trainer.steps < 4 and time.time() < deadline:
        time.sleep(0.05)
    trainer.release.set()
    status, *_ = job.result(timeout=60)
    assert "Finished: `checkpoints/per-step`" in status
    final = drawn[
        -1
    ]  # the trainer's own history is one point per epoch ({"epoch": 1, "total": 0.5}); the app keeps every step
    assert len(final) == trainer.steps >= 4
    assert [p["epoch"] for p in final] == pytest.approx(
        [i / 1000 for i in range(1, trainer.steps + 1)]
    )  # step i of 1000 in epoch 1
    assert [p["total"] for p in final] == pytest.approx([1.0 / i for i in range(1, trainer.steps + 1)])


def test_train_tab_shows_one_source_and_explains_a_missing_data_root(tiny_backbone: Path, tmp_path: Path) -> None:
    running = launch(app_config(tmp_path, tiny_backbone, preload=False))  # tmp/data does not exist
    try:
        import urllib.request

        with urllib.request.urlopen(running.url + "config", timeout=30) as answer:
            components = {c["props"].get("elem_id"): c["props"] for c in json.load(answer)["components"]}
        assert (
            "--data-root" in components["train-folder"]["info"]
            and "does not exist" in components["train-folder"]["info"]
        )
        assert components["train-folder"]["visible"] is not False and components["train-zip"]["visible"] is False
        client = running.client()
        folder, archive = client.predict("uploaded zip", api_name="/train_source")
        assert folder["visible"] is False and archive["visible"] is True
        folder, archive = client.predict("folder under the data root", api_name="/train_source")
        assert folder["visible"] is True and archive["visible"] is False
        with pytest.raises(AppError) as excinfo:
            client.predict(*train_inputs("x", "mvtec"), api_name="/train")
        assert "--data-root" in error_text(excinfo) and str(tmp_path / "data") in str(excinfo.value)
    finally:
        running.demo.close()


def make_zip(
    path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None, compression=zipfile.ZIP_DEFLATED
) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def zip_folder(folder: Path, path: Path) -> Path:
    entries = {
        f"dataset/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
    return make_zip(path, entries, compression=zipfile.ZIP_STORED)


def uploaded_copies(name: str) -> list[Path]:
    """Files called ``name`` in Gradio's upload folder (where the server keeps uploads)."""
    from gradio.utils import get_upload_folder

    return list(Path(get_upload_folder()).rglob(name))


def test_train_from_an_uploaded_zip(app: Running, trainer: ScriptedTrainer, tmp_path: Path, bottle_image: Path) -> None:
    tag = f"{os.getpid()}-{time.time_ns()}"
    archive = zip_folder(app.config.data_root / "mvtec-mini", tmp_path / f"mini-{tag}.zip")
    trainer.release.set()
    status, *_ = app.client().predict(*train_inputs("from-zip", archive=archive), api_name="/train")
    assert "Dataset **mvtec**, 4 images" in status and "Finished: `checkpoints/from-zip`" in status
    data = Path(trainer.configs[-1].data[0].split("=", 1)[1])
    assert not data.exists()  # the extracted upload is removed after the training
    assert uploaded_copies(archive.name) == []  # ...and so is the uploaded zip itself
    image = shutil.copy(bottle_image, tmp_path / f"image-{tag}.png")
    app.client().predict(handle_file(str(image)), "bottle", api_name="/detect")
    assert len(uploaded_copies(Path(image).name)) == 1  # the control: uploads do land where we looked
    evil = make_zip(tmp_path / f"evil-{tag}.zip", {"../evil.txt": b"x"})
    with pytest.raises(AppError) as excinfo:
        app.client().predict(*train_inputs("evil", archive=evil), api_name="/train")
    assert "points outside the archive" in error_text(excinfo)
    assert uploaded_copies(evil.name) == []  # a refused upload is deleted too


def test_real_training_through_the_app(
    tiny_backbone: Path, bottle_dir: Path, bottle_image: Path, tmp_path: Path
) -> None:
    """kanoclip.training itself, 1 epoch on 4 real bottle images with the tiny random CLIP."""
    pytest.importorskip("kanoclip.training", reason="kanoclip.training is not in this checkout")
    mini_mvtec(tmp_path / "data" / "mini", bottle_dir)
    running = launch(app_config(tmp_path, tiny_backbone))
    try:
        client = running.client()
        status, curves, detect_model, _ = client.predict(
            *train_inputs("tiny-run", "mini", kind="mvtec"), api_name="/train"
        )
        assert "Finished: `checkpoints/tiny-run`" in status, status
        assert curves["plot"].startswith("data:image/png;base64,")
        assert detect_model["value"] == "checkpoints/tiny-run"
        summary, score, *_ = client.predict(
            handle_file(str(bottle_image)), "bottle", "checkpoints/tiny-run", api_name="/detect"
        )
        assert "trained — checkpoint" in summary and 0.0 <= score <= 1.0
        direct = KAnoCLIP.from_pretrained(
            running.config.checkpoints_dir / "tiny-run", backbone=str(tiny_backbone), device="cpu"
        )
        assert score == pytest.approx(direct.detect(bottle_image, "bottle").score, abs=1e-5)
    finally:
        running.demo.close()


# ---------------------------------------------------------------------------- uploads (unit)
def test_zip_checks_refuse_unsafe_archives(tmp_path: Path) -> None:
    cases = {
        "traversal": (make_zip(tmp_path / "a.zip", {"data/../../x": b"1"}), "points outside the archive"),
        "absolute": (make_zip(tmp_path / "b.zip", {"/etc/x": b"1"}), "absolute path"),
        "drive": (make_zip(tmp_path / "c.zip", {"C:\\x": b"1"}), "absolute path"),
        "backslash traversal": (make_zip(tmp_path / "d.zip", {"data\\..\\..\\x": b"1"}), "points outside the archive"),
        "symlink": (make_zip(tmp_path / "e.zip", {"data/a.png": b"1"}, {"data/link": "/etc/passwd"}), "is a symlink"),
        "bomb": (make_zip(tmp_path / "f.zip", {"data/zeros.bin": bytes(20 * 1024 * 1024)}), "possible zip bomb"),
        "empty": (make_zip(tmp_path / "g.zip", {}), "holds no files"),
    }
    for name, (archive, expected) in cases.items():
        with pytest.raises(InputError, match=expected):
            check_zip(archive)
        dest = tmp_path / f"out-{name.replace(' ', '-')}"
        with pytest.raises(InputError):
            extract_zip(archive, dest)
        assert not dest.exists() or not any(dest.iterdir()), f"{name}: something was extracted"
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_zip_limits_on_entries_size_and_validity(tmp_path: Path) -> None:
    many = make_zip(tmp_path / "many.zip", {f"d/{i}.txt": b"x" for i in range(12)})
    with pytest.raises(InputError, match="12 entries, over the 10 limit"):
        check_zip(many, ZipLimits(max_entries=10))
    big = make_zip(tmp_path / "big.zip", {"d/a.bin": os.urandom(4096)}, compression=zipfile.ZIP_STORED)
    with pytest.raises(InputError, match="unpacks to more than"):
        check_zip(big, ZipLimits(max_uncompressed=1024))
    with pytest.raises(InputError, match="over the"):
        check_zip(big, ZipLimits(max_compressed=1024))
    notzip = tmp_path / "x.zip"
    notzip.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError, match="not a valid zip archive"):
        check_zip(notzip)


def test_zip_that_lies_about_its_size_is_stopped_while_extracting(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "liar.zip", {"d/a.bin": b"y" * 5000})
    raw = bytearray(archive.read_bytes())
    # shrink the declared uncompressed size (local header and central directory) from 5000 to 10 bytes
    declared = (5000).to_bytes(4, "little")
    for offset in [i for i in range(len(raw) - 3) if raw[i : i + 4] == declared]:
        raw[offset : offset + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    assert check_zip(archive).uncompressed == 10  # the headers alone look harmless
    dest = tmp_path / "out"
    with pytest.raises(InputError, match="liar.zip cannot be extracted|more data than its header declares"):
        extract_zip(archive, dest)
    assert not any(dest.iterdir())  # what was written is removed


def test_safe_zip_is_extracted(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "ok.zip", {"ds/a/1.txt": b"one", "ds/b/2.txt": b"two", "__MACOSX/ds/._1.txt": b"junk"}
    )
    summary = check_zip(archive)
    assert summary.files == 2 and summary.uncompressed == 6
    dest = extract_zip(archive, tmp_path / "out")
    assert (dest / "ds" / "a" / "1.txt").read_bytes() == b"one" and (dest / "ds" / "b" / "2.txt").read_bytes() == b"two"
    assert not (dest / "__MACOSX").exists()


def test_discard_upload_deletes_only_inside_the_upload_folder(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    upload = root / "hash1" / "data.zip"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"zip")
    shared = root / "hash2"
    shared.mkdir()
    (shared / "a.zip").write_bytes(b"a")
    (shared / "b.zip").write_bytes(b"b")
    elsewhere = tmp_path / "mine.zip"
    elsewhere.write_bytes(b"keep")
    assert discard_upload(upload, root) and not upload.exists() and not upload.parent.exists()
    assert discard_upload(shared / "a.zip", root) and (shared / "b.zip").is_file()  # the folder stays for b.zip
    assert not discard_upload(elsewhere, root) and elsewhere.read_bytes() == b"keep"
    assert not discard_upload(root / "hash2" / ".." / ".." / "mine.zip", root) and elsewhere.exists()
    assert root.is_dir()


def test_confine_keeps_paths_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret", target_is_directory=True)
    (root / "inner").symlink_to(root / "a", target_is_directory=True)
    assert confine(root, "a/b") == (root / "a" / "b").resolve()
    assert confine(root, str(root / "a")) == (root / "a").resolve()  # absolute, but inside
    assert confine(root, "inner/b") == (root / "a" / "b").resolve()  # a symlink that stays inside
    for bad, message in (
        ("../secret", "'..'"),
        ("a/../../secret", "'..'"),
        (str(tmp_path / "secret"), "is outside"),
        ("link", "through a symlink"),
        ("a/missing", "does not exist"),
    ):
        with pytest.raises(InputError, match=message):
            confine(root, bad)


# ---------------------------------------------------------------------------- knowledge
@pytest.fixture()
def kb_app(tiny_backbone: Path, tmp_path: Path):
    running = launch(app_config(tmp_path, tiny_backbone))
    yield running
    running.demo.close()


def test_knowledge_edits_reach_detection_and_save_atomically(kb_app: Running, bottle_image: Path) -> None:
    client = kb_app.client()
    new = ["A bottle whose rim is chipped with a sharp missing piece.", "A bottle with a brown stain on the bottom."]
    counts, llm, table, note, *_ = client.predict("bottle", "\n".join(new) + "\n\n", api_name="/kb_apply")
    assert llm.splitlines() == new and "2 general descriptions" in note
    assert [r[1] for r in table["data"] if r[0] == "hand-written"] == new and len(table["data"]) == 2
    *_, guidance = client.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
    assert {row[3] for row in guidance["data"] if row[1] == "hand-written"} == set(new)
    message = client.predict("mine.json", api_name="/kb_save")
    saved = kb_app.config.kb_dir / "mine.json"
    assert str(saved.resolve()) in message
    assert [d.text for d in KnowledgeBase.load(saved).descriptions("bottle") if d.source == "manual"] == new
    for bad in ("../escape.json", "/etc/kanoclip.json", "notes.txt"):
        with pytest.raises(AppError) as excinfo:
            client.predict(bad, api_name="/kb_save")
        assert "knowledge-base" in error_text(excinfo)


def test_knowledge_tab_labels_sources_and_datasets(kb_app: Running) -> None:
    from demo.components import class_choices
    from demo.knowledge_tab import class_view, counts_table

    kb = KnowledgeBase.builtin()
    table = counts_table(kb)
    assert list(table.columns) == ["class", "dataset", "LLM", "built-in", "hand-written", "VQA"]
    row = table.set_index("class").loc["Class3"]
    assert (row["dataset"], row["LLM"], row["built-in"]) == ("DAGM 2007", 0, 5)
    choices = {value: label for label, value in class_choices(kb)}
    assert (
        choices["01"] == "01 (BTAD)"
        and choices["Class3"] == "Class3 (DAGM 2007)"
        and choices["brain"] == "brain (BrainMRI, Br35H)"
    )
    general, rows, _ = class_view(kb, "bottle")
    assert len(general.splitlines()) == 5 and set(rows["source"]) == {"built-in"}
    _, _, note = class_view(kb, "pcb board")
    assert "not in the knowledge base" in note and "Did you mean `pcb1`, `pcb2`, `pcb3`, `pcb4`?" in note
    # over HTTP: a class typed in the tab is unknown, then hand-written once applied
    client = kb_app.client()
    counts, _, described, _, *_ = client.predict("gear wheel", "a gear wheel with a broken tooth", api_name="/kb_apply")
    assert [r[0] for r in described["data"]] == ["hand-written"]
    assert [r[:6] for r in counts["data"] if r[0] == "gear_wheel"] == [["gear_wheel", "", 0, 0, 1, 0]]


def test_unknown_class_summary_suggests_near_classes(client: Client, bottle_image: Path) -> None:
    summary, *_ = client.predict(handle_file(str(bottle_image)), "screws", api_name="/detect")
    assert "not in the knowledge base" in summary and "Did you mean `screw`?" in summary


def test_knowledge_generation_from_an_llm_endpoint(kb_app: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    from chat_server import ChatServer

    client = kb_app.client()
    with ChatServer() as server:
        out = client.predict("bottle", "LLM", server.url, "test-model", "", 3, None, api_name="/kb_generate")
        assert "Generated 3 new LLM descriptions" in out[3]
        assert len(server.requests) >= 1
        with pytest.raises(AppError) as excinfo:
            client.predict("bottle", "LLM", server.url, "test-model", "HF_TOKEN", 3, None, api_name="/kb_generate")
        assert "not allowed as an API key source" in error_text(excinfo)
    assert "test-model" in {row[3] for row in out[2]["data"]}
    with pytest.raises(AppError) as excinfo:
        client.predict("bottle", "LLM", "http://127.0.0.1:9/v1", "m", "", 1, None, api_name="/kb_generate")
    assert "connection failed" in error_text(excinfo) or "no answer" in str(excinfo.value)


# ---------------------------------------------------------------------------- the entry point
@contextlib.contextmanager
def app_py(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, start_s: float = 120
) -> Iterator[tuple[Client, int, Path]]:
    """``python app.py ARGS`` offline with an empty HF_HOME on a free port: (client, port, its output file).

    ``env``: more environment variables for the app; ``start_s``: how long it may take to come up.
    """
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HOME": str(tmp_path / "hf"),
        **(env or {}),
    }
    env.pop("KANOCLIP_BACKBONE", None)
    output = tmp_path / "app-output.txt"
    command = [sys.executable, str(REPO / "app.py"), *args, "--port", str(port), "--data-root", str(tmp_path)]
    with open(output, "wb") as sink:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + start_s
        client = None
        while time.time() < deadline and process.poll() is None:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        assert client is not None, f"app.py did not come up: {output.read_text(errors='replace')[-2000:]}"
        yield client, port, output
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_app_py_comes_up_without_a_backbone_and_says_why(tmp_path: Path) -> None:
    with app_py(tmp_path, "--backbone", "does-not-exist/model", "--no-training") as (client, _, _):
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert "/detect" in endpoints and "/train" not in endpoints  # --no-training hides the Train tab
        status = client.predict(api_name="/status")
        assert (
            "could not be loaded" in status
            and "HF_HUB_OFFLINE" in status
            and "hf download does-not-exist/model" in status
        )
        with pytest.raises(AppError) as excinfo:
            client.predict(
                handle_file(str(REPO / "demo" / "examples" / "bottle_broken_large_000.png")),
                "bottle",
                api_name="/detect",
            )
        assert "does-not-exist/model" in error_text(excinfo)
        assert "--backbone" in str(excinfo.value)  # the app is started with flags: its errors name them


def test_default_app_py_offline_says_on_the_terminal_what_failed_once(tmp_path: Path) -> None:
    """The plain ``python app.py`` on a machine without the default backbone: terminal and page agree."""
    default = "openai/clip-vit-large-patch14-336"
    with app_py(tmp_path) as (client, port, output):
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as answer:
            page = answer.read().decode()
        status = client.predict(api_name="/status")
        text = output.read_text(errors="replace")
    reason = next(
        line.split("could not be loaded: ", 1)[1] for line in text.splitlines() if "could not be loaded: " in line
    )
    assert reason.startswith(f"backbone '{default}' is not in the local Hugging Face cache")
    assert "--backbone / KANOCLIP_BACKBONE" in reason  # app.py's flag, not the API's backbone=
    assert text.count(reason) == 1  # printed once
    assert f"loading the model (training-free, backbone {default}) on device auto (cpu)" in text
    assert f"http://127.0.0.1:{port}" in text  # listening on localhost only
    assert reason in status
    assert (
        page.count(json.dumps(reason)[1:-1]) == 1
    )  # the page says it once (the header), not in the Detect summary too


def test_examples_and_their_credits_ship_with_the_app() -> None:
    from demo.detect_tab import EXAMPLES, EXAMPLES_DIR

    credits = (EXAMPLES_DIR / "CREDITS.md").read_text()
    for name, _ in EXAMPLES:
        assert (EXAMPLES_DIR / name).is_file() and name in credits
        load_image(EXAMPLES_DIR / name)
    assert "CC BY-NC-SA 4.0" in credits and "Bergmann" in credits and "Huang" in credits and "Kitamura" in credits


def test_training_progress_maps_to_the_bar_and_the_curve() -> None:
    """Preparation (epoch 0) moves neither the bar nor the loss curve; steps count within epochs."""
    from demo.train_tab import fraction, history_point, stage

    preparing = TrainProgress(epoch=0, epochs=4, step=30, steps=100, losses={}, message="caching")
    assert fraction(preparing) == 0.0 and history_point(preparing) is None and stage(preparing).startswith("preparing")
    step = TrainProgress(epoch=2, epochs=4, step=5, steps=10, losses={"total": 0.25, "kd": 0.5})
    assert fraction(step) == pytest.approx(1.5 / 4)
    assert history_point(step) == {"epoch": 1.5, "total": 0.25, "kd": 0.5}
    assert stage(step) == "epoch 2/4"
