"""Shared fixtures: a tiny random CLIP backbone, the real data in ../shared, offline settings.

Numbers computed on the tiny random backbone are plumbing, never accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny test models gain nothing from intra-op threads, and with servers and subprocesses
# sharing 2 cores, oversubscribed OpenMP threads make them ~30x slower. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP (vision 8 x 64 wide, patch 14, 112 px; text 2 layers) as an HF folder."""
    from kanoclip.backbone import make_random_backbone

    require_shared(TOKENIZER)
    return make_random_backbone(tmp_path_factory.mktemp("tiny-clip"), TOKENIZER, architecture="tiny", seed=0)


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
