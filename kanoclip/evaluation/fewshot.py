"""The few-shot protocol: k normal references per class, several seeds, beside zero-shot.

``few_shot(model, datasets, shots=(1, 2, 4), seeds=3)``, as WinCLIP evaluates its few-shot mode:

* for each class and each (k, seed), k normal references are drawn at random (seeded with the
  seed, k and the class name) from the class's **normal training images** where the dataset
  publishes a train split (MVTec-AD, VisA, MPDD, BTAD: ``load_train_normals``); where it does not
  (HeadCT, MTD, ...), each seed first holds out max(k) of the **test split's normal images**, the
  k references of each k are drawn from those, and every row of that seed (each k, and a
  zero-shot row of its own) is scored on the same remaining test images;
* the model detects the test set with those references (:mod:`kanoclip.references`: fused map
  and score), and the six metrics are computed as :func:`~kanoclip.evaluation.evaluate.evaluate` does;
* each metric is reported per class and per dataset (the mean over classes) as the mean ± std over
  the seeds (std with ``ddof=0``; 0 with one seed), beside the zero-shot figures. The zero-shot row
  is the model with no references (also when it was loaded with some: ``--references``), on the
  whole test set, as plain ``evaluate``; a dataset with a class without a train split also gets the
  zero-shot row on the k-shot rows' test images (``zero_shot_same_images``), mean ± std over the seeds.

Every run makes its own backbone pass over the test set (the references change nothing upstream of
the fusion, but one pass for all runs would hold every run's S×S maps at once).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kanoclip.data import Sample, group_by_class, load_dataset, load_train_normals
from kanoclip.errors import InputError
from kanoclip.evaluation.evaluate import (
    METRIC_KEYS,
    ClassObserver,
    ProgressFn,
    _cell,
    _mean,
    _report_header,
    class_ground_truth,
    evaluate,
    predict,
)
from kanoclip.evaluation.metrics import compute_metrics
from kanoclip.references import References

_HEADERS = ("image AUROC", "image AP", "image F1-max", "pixel AUROC", "pixel AUPRO", "pixel F1-max")


def draw_references(pool: Sequence[Path], k: int, seed: int, class_name: str) -> list[Path]:
    """k of ``pool`` without replacement, the same for the same (seed, k, class) everywhere."""
    rng = np.random.default_rng([seed, k, zlib.crc32(class_name.encode("utf-8"))])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]


def few_shot(
    model: Any,
    datasets: Sequence[tuple[str | None, str | Path]],
    shots: Sequence[int],
    seeds: int,
    *,
    batch_size: int = 16,
    progress: ProgressFn | None = None,
    observer: ClassObserver | None = None,
) -> dict[str, Any]:
    """Zero-shot and k-shot metrics for each k in ``shots``, over ``seeds`` seeds.

    Args:
        model: a loaded :class:`~kanoclip.KAnoCLIP` (its own references are not used).
        datasets: ``(kind, root)`` pairs, as for :func:`evaluate`.
        shots: the k values, each >= 1.
        seeds: the number of seeds (draws) per k, >= 1.
        batch_size: images per backbone forward.
        progress: called with (images done, images in all) after each batch.
        observer: called with each class's zero-shot predictions (see :func:`evaluate`).

    Returns:
        ``{"zero_shot": evaluate's result (no references), "zero_shot_same_images": {KIND: as a k's entry}
        (datasets with a class without a train split), "shots": {k: {"datasets": {KIND: {"classes": {name:
        {metric: {"mean", "std", "runs"}}}, "mean": {metric: {"mean", "std", "runs"}}}}}}, "protocol": ...}``.
    """
    shots = sorted(set(int(k) for k in shots))
    if not shots or shots[0] < 1 or seeds < 1:
        raise InputError(f"shots must be whole numbers >= 1 and seeds >= 1, got shots={shots}, seeds={seeds}")
    listed = [(kind, root, load_dataset(kind, root)) for kind, root in datasets]
    pools_of = [load_train_normals(kind or samples[0].dataset, root) for kind, root, samples in listed]
    untrained = sum(  # images of the classes without a train split: also scored zero-shot once per seed
        len(group) for (*_, samples), pools in zip(listed, pools_of)
        for name, group in group_by_class(samples).items() if name not in pools
    )  # fmt: skip
    total = sum(len(samples) for *_, samples in listed) * (1 + len(shots) * seeds) + untrained * seeds
    done = 0

    def on_batch(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    bare = model.variant({})  # the same model and weights with no references: the zero-shot rows
    zero = evaluate(
        bare,
        datasets,
        batch_size=batch_size,
        progress=lambda d, _t: progress(d, total) if progress else None,
        observer=observer,
    )
    done = sum(len(samples) for *_, samples in listed)
    out: dict[str, Any] = {
        "zero_shot": zero, "zero_shot_same_images": {}, "shots": {k: {"datasets": {}} for k in shots},
        "protocol": {"shots": shots, "seeds": seeds, "pools": {}},
    }  # fmt: skip
    for (_kind, _root, samples), pools, key in zip(listed, pools_of, zero["datasets"]):
        per_run: dict[int, list[dict[str, dict[str, Any]]]] = {k: [{} for _ in range(seeds)] for k in (0, *shots)}
        for class_name, group in group_by_class(samples).items():
            pool = pools.get(class_name)
            out["protocol"]["pools"][f"{key}/{class_name}"] = "train" if pool is not None else "test"
            for seed in range(seeds):
                if pool is None:  # no train split: hold out max(k) test normals; every row scores the rest
                    pool_here, test = _held_out(class_name, group, shots[-1], seed)
                    per_run[0][seed][class_name] = _score(bare, class_name, test, [], batch_size, on_batch)
                else:
                    pool_here, test = pool, group
                    per_run[0][seed][class_name] = zero["datasets"][key]["classes"][class_name]
                for k in shots:
                    if k > len(pool_here):
                        raise InputError(
                            f"class {class_name!r} has {len(pool_here)} normal training images; k={k} is more"
                        )
                    chosen = draw_references(pool_here, k, seed, class_name)
                    per_run[k][seed][class_name] = _score(bare, class_name, test, chosen, batch_size, on_batch)
        for k, runs in per_run.items():  # one {class: metrics} per seed
            classes = {name: _spread([run[name] for run in runs]) for name in runs[0]}
            entry = {"classes": classes, "mean": _spread([_mean(list(run.values())) for run in runs])}
            if k:
                out["shots"][k]["datasets"][key] = entry
            elif any(pools.get(name) is None for name in runs[0]):
                out["zero_shot_same_images"][key] = entry
    return out


def _held_out(class_name: str, group: list[Sample], k: int, seed: int) -> tuple[list[Path], list[Sample]]:
    """(the seed's max(k) held-out test normals, the test images left) of a class without a train split."""
    normals = [s.image for s in group if s.label == 0]
    if k >= len(normals):
        raise InputError(
            f"class {class_name!r} has {len(normals)} normal test images and no train split: "
            f"k={k} would leave none to test"
        )
    held = draw_references(normals, k, seed, class_name)
    return held, [s for s in group if s.image not in set(held)]


def _score(
    model: Any,
    class_name: str,
    test: list[Sample],
    chosen: list[Path],
    batch_size: int,
    on_batch: Callable[[int], None],
) -> dict[str, Any]:
    """One run on one class: the ``chosen`` references (none: zero-shot) in a fresh store, detect, score."""
    store = References(model.reference_fingerprint())
    if chosen:
        model.add_references(class_name, [str(p) for p in chosen], store=store)
    scores, maps = predict({"": model}, test, batch_size=batch_size, on_batch=on_batch, references=store)[""]
    labels, masks = class_ground_truth(test, model.image_size)
    counts = {"n_normal": int((labels == 0).sum()), "n_anomalous": int((labels == 1).sum())}
    return {**counts, **compute_metrics(labels, scores, masks, maps if masks is not None else None)}


def _spread(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's mean ± std over runs (None where a run lacks it), and the runs' values."""
    spread: dict[str, Any] = {}
    for key in METRIC_KEYS:
        values = [row[key] for row in rows if row.get(key) is not None]
        spread[key] = (
            None if not values else {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}
        )
    for key in ("n_normal", "n_anomalous"):
        if key in rows[0]:
            spread[key] = rows[0][key]
    return spread


def _pm(value: dict[str, Any] | None) -> str:
    if value is None or not math.isfinite(value["mean"]):
        return "-"
    return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"


def format_few_shot_report(results: dict[str, Any], model: Any) -> str:
    """A markdown table per dataset: zero-shot, then each k as mean ± std over the seeds (values in %)."""
    protocol = results["protocol"]
    lines = _report_header("KAnoCLIP few-shot evaluation", model)
    lines += [
        f"- k normal references per class, {protocol['seeds']} seed(s) each: "
        "from the train split's normal images where the "
        "dataset has one, else from max(k) test normals held out per seed (every row of the seed scores the rest)",
        "",
        "| dataset | setting | " + " | ".join(_HEADERS) + " |",
        "|---|---|" + "---:|" * len(_HEADERS),
    ]
    for key, dataset in results["zero_shot"]["datasets"].items():
        lines.append(f"| {key} | zero-shot | " + " | ".join(_cell(dataset["mean"][m]) for m in METRIC_KEYS) + " |")
        same = results.get("zero_shot_same_images", {}).get(key)
        if same is not None:  # a class without a train split: zero-shot on the k-shot rows' test images
            row = " | ".join(_pm(same["mean"][m]) for m in METRIC_KEYS)
            lines.append(f"| {key} | zero-shot, k-shot's test images | {row} |")
        for k, entry in results["shots"].items():
            mean = entry["datasets"][key]["mean"]
            lines.append(f"| {key} | {k}-shot | " + " | ".join(_pm(mean[m]) for m in METRIC_KEYS) + " |")
    return "\n".join(lines) + "\n"
