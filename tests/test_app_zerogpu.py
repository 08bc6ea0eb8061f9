"""The app on ZeroGPU: its GPU functions across a real process boundary (tests/zerogpu/spaces.py).

``SPACES_ZERO_GPU`` set and the fake ``spaces`` package on the path: each ``@gpu`` function runs
in a worker forked from the app and reused, with its arguments and result pickled across, as on
a ZeroGPU Space. CI has no GPU: the device checks of what crosses run on fake CUDA below.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

gradio_client = pytest.importorskip("gradio_client")
from fake_cuda import fake_cuda  # noqa: E402
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_app import app_py, error_text  # noqa: E402

from demo.gpu import gpu, move  # noqa: E402
from kanoclip.references import References, ReferenceSet  # noqa: E402

ZEROGPU = Path(__file__).resolve().parent / "zerogpu"
# the fake package's checker, imported under another name: this process is not a Space
_spec = importlib.util.spec_from_file_location("fake_spaces", ZEROGPU / "spaces.py")
fake_spaces = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_spaces)
crossing_devices = fake_spaces.crossing_devices


def test_a_gpu_functions_result_comes_back_on_the_cpu_and_its_input_goes_to_the_models_device():
    """On fake CUDA: a function that builds references on the GPU, as ``add_references`` does,
    returns them with CPU tensors only, and ``move`` takes a session's CPU store to the GPU."""

    def reference_set(name: str, device: str) -> ReferenceSet:
        features = [torch.randn(4, 8, device=device).half() for _ in range(2)]  # 1 image of a 2x2 grid
        return ReferenceSet(name, features, torch.randn(1, 8, device=device).half(), [f"{name}.png"], grid=(2, 2))

    @gpu
    def build(store: References) -> tuple[ReferenceSet, References]:
        on_device = move(store, "cuda")
        on_device.keep(replace(reference_set("bottle", "cuda"), threshold=0.4))
        assert {t.device.type for c in on_device.classes for t in on_device.stored(c).bank} == {"cuda"}
        return on_device.stored("bottle"), on_device

    with fake_cuda():
        session = References({"backbone": "tiny"})
        session.keep(reference_set("screw", "cpu"))
        assert set(crossing_devices(session)) == {"cpu"}  # what goes in
        result = build(session)
        devices = crossing_devices(result)
        assert set(devices) == {"cpu"}
        assert result[0].threshold == 0.4 and result[0].grid == (2, 2)
        assert session.classes == ["screw"]  # the caller's store is left as it was
        bare = move(build.__wrapped__(session), "cuda")  # the function without the boundary:
        assert set(crossing_devices(bare)) == {"cuda:0"}  # the check finds the GPU tensors


@pytest.fixture(scope="module")
def zerogpu_app(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("zerogpu")
    log = tmp / "crossings.jsonl"
    env = {
        "SPACES_ZERO_GPU": "1",
        "ZEROGPU_LOG": str(log),
        "PYTHONPATH": f"{ZEROGPU}:{Path.cwd()}",
        # its own upload folder: an app's shutdown empties Gradio's (delete_cache), shared by default
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
    }
    args = ("--backbone", str(tiny_backbone), "--device", "cpu")
    with app_py(tmp, *args, env=env, start_s=300) as (client, _, output):
        yield client, log, output


def crossings(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_detect_references_and_knowledge_cross_a_reused_worker(zerogpu_app, bottle_image, bottle_dir):
    client, log, _ = zerogpu_app
    summary, *_ = client.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
    assert "`bottle` (in the knowledge base)" in summary

    # a knowledge edit in the app's process reaches the worker forked before it
    client.predict("space widget", "a bent space widget\na scratched space widget", api_name="/kb_apply")
    summary, *_ = client.predict(handle_file(str(bottle_image)), "space widget", api_name="/detect")
    assert "`space_widget` (in the knowledge base)" in summary

    # references built in the worker come back to the session
    goods = sorted((bottle_dir / "test" / "good").glob("*.png"))[:2]
    status, *_ = client.predict(
        [handle_file(str(p)) for p in goods], "bottle", "training-free", api_name="/add_references"
    )
    assert "** 2 (yours: this session only)" in status, status
    summary, *_ = client.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
    assert "**References:** 2 normal images" in summary

    calls = crossings(log)
    assert [c["function"].rsplit(".", 1)[-1] for c in calls] == [
        "run_detection", "run_detection", "run_add_references", "run_detection"
    ]  # fmt: skip
    assert len({c["pid"] for c in calls}) == 1  # one worker, reused
    assert calls[2]["result"] and calls[3]["arguments"]  # the references' banks crossed, both ways
    assert all(d == "cpu" for c in calls for d in c["arguments"] + c["result"])


def test_prompts_cross_the_worker_too(zerogpu_app):
    client, log, _ = zerogpu_app
    header, *_ = client.predict("training-free", "bottle", api_name="/prompts")
    assert "training-free" in header
    last = crossings(log)[-1]
    assert last["function"].endswith("inspect_prompts") and all(d == "cpu" for d in last["arguments"] + last["result"])


def test_training_is_off_and_no_model_is_loaded_after_the_start(zerogpu_app, bottle_image):
    client, _, output = zerogpu_app
    assert "/train" not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "the Train tab is off on ZeroGPU" in output.read_text(errors="replace")
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(bottle_image)), "bottle", "someone/other-model", api_name="/detect")
    assert "was not loaded when this ZeroGPU Space started" in error_text(info)
