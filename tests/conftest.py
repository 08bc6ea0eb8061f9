"""Shared fixtures: a tiny random CLIP backbone, the real data in ../shared, offline settings.

Numbers computed on the tiny random backbone are plumbing, never accuracy.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny test models gain nothing from intra-op threads, and with servers and subprocesses
# sharing 2 cores, oversubscribed OpenMP threads make them ~30x slower. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Gradio's upload folder is shared by every app on the machine by default, and an app's shutdown
# empties it (delete_cache): each test process (and the apps it starts) gets its own. Assigned, not
# defaulted: pytest-xdist's workers inherit the controller's environment, so a default would give
# every worker the same folder, and one worker's app shutdown deleted another's uploads.
os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="kanoclip-tests-gradio-")
# int8 graphs (kanoclip/onnx_vision.py) built by this process go to its own folder, never the user's cache
os.environ.setdefault("KANOCLIP_CACHE_DIR", tempfile.mkdtemp(prefix="kanoclip-tests-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KANOCLIP_SHARED_DIR", REPO.parent / "shared"))
DATA = SHARED / "data"
TOKENIZER = SHARED / "clip_tokenizer"
TINY_REPO_ID = "kanoclip-test/tiny-clip"


SHARED_SKIP = "needs the shared test folder"  # how every skip of require_shared starts


def require_shared(path: Path = DATA) -> Path:
    """Skip the calling test, with the reason and the fix, when ../shared (or a part of it) is absent."""
    if not path.exists():
        pytest.skip(
            f"{SHARED_SKIP} {path}, absent here; set KANOCLIP_SHARED_DIR=/path/to/shared "
            f"(a folder holding clip_tokenizer/ and data/) or put it at {REPO.parent / 'shared'}"
        )
    return path


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Report every require_shared skip at one place, so ``-ra`` folds them into one line per folder.

    pytest reports a skip by the test's own location, and its summary folds only skips with the
    same location and reason: without this, a clone without ../shared lists ~90 lines.
    """
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and SHARED_SKIP in report.longrepr[2]:
        report.longrepr = (__file__, None, report.longrepr[2])
    return report


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared(DATA)


@pytest.fixture(scope="session")
def bottle_dir(shared_data: Path) -> Path:
    return require_shared(shared_data / "mvtec_ad" / "bottle")


@pytest.fixture(scope="session")
def bottle_image(bottle_dir: Path) -> Path:
    """A real 900x900 MVTec-AD bottle image with a defect."""
    return bottle_dir / "test" / "broken_large" / "000.png"


@pytest.fixture(scope="session", autouse=True)
def cpu_without_native_bf16():
    """The suite's CPU, as ``precision="auto"`` sees it, has no native bf16 on every machine.

    On a CPU with AVX512-BF16 or AMX, ``auto`` picks bf16 (kanoclip/precision.py); tests that
    compare a default model with fp32 figures would then depend on that CPU's bf16 rounding.
    The real probe's model and flags are kept, less those flags; tests of the rule fake their own.
    """
    from dataclasses import replace

    from kanoclip import precision

    real = precision.cpu_features()
    fake = replace(real, flags=real.flags - precision.NATIVE_BF16_FLAGS - precision.NATIVE_FP16_FLAGS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "cpu_features", lambda: fake)
        yield


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP (vision 8 x 64 wide, patch 14, 112 px; text 2 layers) as an HF folder."""
    from kanoclip.backbone import make_random_backbone

    require_shared(TOKENIZER)
    return make_random_backbone(tmp_path_factory.mktemp("tiny-clip"), TOKENIZER, architecture="tiny", seed=0)


@pytest.fixture(scope="module")
def app_url(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app with the tests' default settings (``test_app.app_config``) on the tiny backbone, for a
    module's browser tests; closed after the module."""
    from test_app import app_config, launch

    running = launch(app_config(tmp_path_factory.mktemp("browser-app"), tiny_backbone))
    yield running.url
    running.demo.close()


def put_in_hub_cache(folder: Path, repo_id: str, cache: Path) -> Path:
    """Lay ``folder``'s files out as the Hugging Face hub cache does for ``repo_id``; returns ``cache``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def write_test_image(path: Path, seed: int) -> Path:
    """A real 32x32 image (format from the suffix) whose colour, and so bytes, depend on ``seed``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (seed * 37 % 256, 90, 200)).save(path)
    return path


@pytest.fixture(scope="session")
def fake_hub_cache(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face hub cache holding the tiny backbone as ``kanoclip-test/tiny-clip``."""
    return put_in_hub_cache(tiny_backbone, TINY_REPO_ID, tmp_path_factory.mktemp("hub-cache"))


@pytest.fixture(scope="session")
def tiny_model(tiny_backbone: Path):
    """A training-free KAnoCLIP on the tiny backbone (shared: tests must not mutate it)."""
    from kanoclip import KAnoCLIP

    return KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")


CLIP_FRAMES, CLIP_FPS, CLIP_SIDE = 24, 8, 450
CLIP_PAINTED = range(8, 16)  # the frames that carry the painted square


@pytest.fixture(scope="session")
def bottle_clip(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(clip, references): an H.264 clip of 24 frames at 8 fps of one good MVTec bottle (450 px)
    whose frames 8-15 carry a painted 90x90 square, and a folder of 3 other good bottles."""
    import av
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("bottle-clip")
    goods = sorted((bottle_dir / "test" / "good").glob("*.png"))[:4]
    side = (CLIP_SIDE, CLIP_SIDE)
    (root / "good").mkdir()
    for path in goods[1:]:
        Image.open(path).convert("RGB").resize(side).save(root / "good" / path.name)
    base = np.asarray(Image.open(goods[0]).convert("RGB").resize(side))
    clip = root / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = CLIP_SIDE, CLIP_SIDE, "yuv420p"
        for i in range(CLIP_FRAMES):
            frame = base.copy()
            if i in CLIP_PAINTED:
                frame[150:240, 200:290] = (255, 255, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return clip, root / "good"


@pytest.fixture(scope="session")
def bottle_images(bottle_dir: Path) -> list:
    """8 distinct real MVTec-AD bottle test images (4 kinds of defect and good ones), shrunk to 128 px:
    the tiny model's input is 112 px, so tests of many detections stay fast."""
    from PIL import Image

    kinds = ("broken_large", "broken_small", "contamination", "good")
    names = [f"{kind}/{i:03d}.png" for kind in kinds for i in (0, 1)]
    return [Image.open(bottle_dir / "test" / name).convert("RGB").resize((128, 128), Image.BILINEAR) for name in names]


@pytest.fixture(scope="session")
def good_bottle_paths(bottle_dir: Path) -> list[Path]:
    """The real good bottle test images, by name (normal references for tests)."""
    return sorted((bottle_dir / "test" / "good").glob("*.png"))
