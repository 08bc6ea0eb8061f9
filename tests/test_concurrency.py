"""One model, many callers: threads through the Python API and through the app each get what a lone call gets.

Before CLIP-VV's capture belonged to the call, 4 threads sharing one model got 197 of 288
results that differed from the same call run alone (a map gap up to 0.146): each call's hooks
received the other calls' tensors. Here every result is compared with the sequential one,
in fp32: the map within 1e-5, the score within 1e-6.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from threads import in_threads

from kanoclip import KAnoCLIP
from kanoclip.detection import Detection
from kanoclip.references import References

THREADS = 4
MAP_TOLERANCE, SCORE_TOLERANCE = 1e-5, 1e-6


def assert_same(got: Detection, expected: Detection, what: object) -> None:
    assert abs(got.score - expected.score) <= SCORE_TOLERANCE, what
    assert np.abs(got.anomaly_map - expected.anomaly_map).max() <= MAP_TOLERANCE, what
    assert (got.threshold, got.reference_count) == (expected.threshold, expected.reference_count), what


@pytest.fixture(scope="module", params=["training-free", "trained"])
def model(request, tiny_backbone: Path, good_bottle_paths: list[Path]) -> KAnoCLIP:
    """A model of each mode with 2 normal references of ``bottle`` in its own store."""
    if request.param == "trained":
        torch.manual_seed(0)  # fresh learned parts: a trained-mode model without a checkpoint
        built = KAnoCLIP.for_training(backbone=str(tiny_backbone), device="cpu").eval()
    else:
        built = KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu")
    built.add_references("bottle", good_bottle_paths[10:12])
    assert built.mode == request.param
    return built


def test_threads_sharing_one_model_get_what_a_lone_call_gets(model: KAnoCLIP, bottle_images) -> None:
    """4 threads, distinct real images, detect and detect_batch mixed, with 2 references: 3 rounds of 8 images."""
    alone = [model.detect(image, "bottle") for image in bottle_images]
    jobs = []
    for _ in range(3):
        for i, image in enumerate(bottle_images):
            if i % 2:
                jobs.append(lambda i=i, image=image: (i, model.detect(image, "bottle")))
            else:
                jobs.append(lambda i=i, image=image: (i, model.detect_batch([image], "bottle")[0]))
    for i, result in in_threads(jobs, THREADS):
        assert result.reference_count == 2
        assert_same(result, alone[i], i)


def test_two_models_sharing_one_backbone_run_concurrently(tiny_backbone: Path, bottle_images) -> None:
    """Models of both modes and two V-V path lengths on one backbone (``backbone_cache``), called at once."""
    cache: dict = {}
    torch.manual_seed(0)
    models = [
        KAnoCLIP.from_pretrained(backbone=str(tiny_backbone), device="cpu", backbone_cache=cache),
        KAnoCLIP.for_training(backbone=str(tiny_backbone), device="cpu", backbone_cache=cache).eval(),
        KAnoCLIP.from_pretrained(
            backbone=str(tiny_backbone), device="cpu", backbone_cache=cache,
            overrides={"training_free.num_replaced_blocks": 3},
        ),
    ]  # fmt: skip
    assert len(cache) == 1 and all(m.model.clip is models[0].model.clip for m in models)
    pairs = [(m, i) for m in range(len(models)) for i in range(len(bottle_images))]
    alone = {(m, i): models[m].detect(bottle_images[i], "bottle") for m, i in pairs}
    results = in_threads([lambda m=m, i=i: models[m].detect(bottle_images[i], "bottle") for m, i in pairs * 2], THREADS)
    for (m, i), result in zip(pairs * 2, results):
        assert_same(result, alone[(m, i)], (m, i))


def test_concurrent_additions_to_one_class_lose_none(tiny_model: KAnoCLIP, good_bottle_paths: list[Path]) -> None:
    store = References(tiny_model.reference_fingerprint())
    images = good_bottle_paths[2:6]
    in_threads(
        [lambda image=image: tiny_model.add_references("bottle", [image], store=store) for image in images], THREADS
    )
    refs = store.stored("bottle")
    assert sorted(refs.image_names) == sorted(str(p) for p in images)  # none lost
    per = refs.grid[0] * refs.grid[1]
    kept = [stage for stage in refs.bank if stage is not None]  # the stages the mode reads
    assert kept and [stage.shape[0] for stage in kept] == [4 * per] * len(kept)
    # the same images added one after another, in the order they were merged, give the same set
    by_name = {str(p): p for p in images}
    sequential = References(tiny_model.reference_fingerprint())
    for name in refs.image_names:
        tiny_model.add_references("bottle", [by_name[name]], store=sequential)
    expected = sequential.stored("bottle")
    assert refs.threshold == pytest.approx(expected.threshold, abs=1e-6)
    for got, want in zip(refs.bank, expected.bank):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-3, rtol=0)  # fp16 banks


def test_calibrate_and_add_references_on_one_store_keep_both(tiny_model, good_bottle_paths, bottle_images) -> None:
    """A calibration and an addition at once: the store ends with the references and a threshold from one of them."""
    store = References(tiny_model.reference_fingerprint())
    tiny_model.add_references("bottle", good_bottle_paths[2:4], store=store)
    in_threads(
        [
            lambda: tiny_model.add_references("bottle", good_bottle_paths[4:5], store=store),
            lambda: tiny_model.calibrate("bottle", bottle_images[:2], [1, 0], store=store),
        ],
        threads=2,
    )
    refs = store.stored("bottle")
    assert refs.count == 3 and refs.calibrated


# ---------------------------------------------------------------------------- the app's GPU path
def shrunk(paths: list[Path], folder: Path, side: int = 128) -> list[Path]:
    """Copies of real images at ``side`` px (the tiny model's input is 112 px): quick to upload and draw."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR).save(folder / path.name)
    return [folder / path.name for path in paths]


def test_app_gpu_path_without_the_cpu_lock_serves_each_visitor_their_own(
    tiny_backbone: Path, tiny_model: KAnoCLIP, bottle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's path on a CPU: passes not serialised (the CPU lock is held by the test all along, so a
    pass that took it would never finish) and batched; 8 clients, each with its own references and image."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client, handle_file
    from test_app import add_references, app_config, direct_with, launch

    import demo.state

    monkeypatch.setattr(demo.state, "one_pass_at_a_time", lambda model: False)
    monkeypatch.delenv("KANOCLIP_BATCH_SIZE", raising=False)  # auto: batching on, as on a GPU
    monkeypatch.setenv("KANOCLIP_BATCH_WAIT_MS", "50")
    good = shrunk(sorted((bottle_dir / "test" / "good").glob("*.png"))[:16], tmp_path / "good")
    sets = [good[i : i + 2 + i % 2] for i in range(0, 16, 2)]  # 8 disjoint sets of 2 or 3 images
    images = shrunk(sorted((bottle_dir / "test" / "broken_small").glob("*.png"))[: len(sets)], tmp_path / "test")
    running = launch(app_config(tmp_path, tiny_backbone, concurrency=len(sets), preload=True))

    def visitor(job: tuple[Path, list[Path]]):
        image, refs = job
        client = Client(running.url, verbose=False)  # each its own session
        add_references(client, refs)
        summary, score, verdict, *_ = client.predict(handle_file(str(image)), "bottle", api_name="/detect")
        return score, verdict["label"]

    assert demo.state._CPU_COMPUTE.acquire(timeout=5)
    try:
        with ThreadPoolExecutor(max_workers=len(sets)) as pool:
            futures = [pool.submit(visitor, job) for job in zip(images, sets)]
            results = [future.result(timeout=600) for future in futures]
        served = sum(batcher.stats.requests for batcher in demo.state._BATCHERS.values())
    finally:
        demo.state._CPU_COMPUTE.release()
        running.demo.close()
    assert served == len(sets)  # every detection went through the app model's batcher
    for image, refs, (score, label) in zip(images, sets, results):
        direct = direct_with(tiny_model, image, refs)
        assert score == pytest.approx(direct.score, abs=1e-5), [p.name for p in refs]
        assert label.endswith(
            f"threshold {direct.threshold:.3f}, calibrated leave-one-out on its {len(refs)} references"
        )
    assert len({round(score, 6) for score, _ in results}) == len(sets)
