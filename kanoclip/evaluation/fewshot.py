"""The few-shot protocol: k normal references per class, several seeds, beside zero-shot.

``few_shot(model, datasets, shots=(1, 2, 4), seeds=3)``, as WinCLIP evaluates its few-shot mode:

* for each class and each (k, seed), k normal references are drawn at random (seeded with the
  seed, k and the class name) from the class's **normal training images** where the dataset
  publishes a train split (MVTec-AD, VisA, MPDD, BTAD: ``load_train_normals``); where it does not
  (HeadCT, MTD, ...), they are drawn from the **test split's normal images and left out of that
  run's test set**;
* the model detects the test set with those references (:mod:`kanoclip.references`: fused map
  and score), and the six metrics are computed as :func:`~kanoclip.evaluation.evaluate.evaluate` does;
* each metric is reported per class and per dataset (the mean over classes) as the mean ± std over
  the seeds (std with ``ddof=0``; 0 with one seed), beside the zero-shot figures.

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
        ``{"zero_shot": evaluate's result, "shots": {k: {"datasets": {KIND: {"classes": {name:
        {metric: {"mean", "std", "runs"}}}, "mean": {metric: {"mean", "std", "runs"}}}}}}, "protocol": ...}``.
    """
    shots = sorted(set(int(k) for k in shots))
    if not shots or shots[0] < 1 or seeds < 1:
        raise InputError(f"shots must be whole numbers >= 1 and seeds >= 1, got shots={shots}, seeds={seeds}")
    listed = [(kind, root, load_dataset(kind, root)) for kind, root in datasets]
    runs_total = len(shots) * seeds
    total = sum(len(samples) for *_, samples in listed) * (1 + runs_total)
    done = 0

    def on_batch(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    zero = evaluate(
        model,
        datasets,
        batch_size=batch_size,
        progress=lambda d, _t: progress(d, total) if progress else None,
        observer=observer,
    )
    done = sum(len(samples) for *_, samples in listed)
    out: dict[str, Any] = {"zero_shot": zero, "shots": {}, "protocol": {"shots": shots, "seeds": seeds, "pools": {}}}
    for k in shots:
        out["shots"][k] = {"datasets": {}}
    for (kind, root, samples), key in zip(listed, zero["datasets"]):
        pools = load_train_normals(kind or samples[0].dataset, root)
        per_run: dict[int, list[dict[str, dict[str, Any]]]] = {k: [] for k in shots}
        for class_name, group in group_by_class(samples).items():
            source = "train" if class_name in pools else "test"
            out["protocol"]["pools"][f"{key}/{class_name}"] = source
            for k in shots:
                for seed in range(seeds):
                    row = _run(model, class_name, group, pools.get(class_name), k, seed, batch_size, on_batch)
                    if seed >= len(per_run[k]):
                        per_run[k].append({})
                    per_run[k][seed][class_name] = row
        for k in shots:
            runs = per_run[k]  # one {class: metrics} per seed
            classes = {name: _spread([run[name] for run in runs]) for name in runs[0]}
            means = _spread([_mean(list(run.values())) for run in runs])
            out["shots"][k]["datasets"][key] = {"classes": classes, "mean": means}
    return out


def _run(
    model: Any,
    class_name: str,
    group: list[Sample],
    pool: list[Path] | None,
    k: int,
    seed: int,
    batch_size: int,
    on_batch: Callable[[int], None],
) -> dict[str, Any]:
    """One (k, seed) run on one class: draw, add the references to a fresh store, detect, score."""
    if pool is None:  # no train split: draw from the test normals and leave them out of this run's test set
        normals = [s.image for s in group if s.label == 0]
        if k >= len(normals):
            raise InputError(
                f"class {class_name!r} has {len(normals)} normal test images and no train split: "
                f"k={k} would leave none to test"
            )
        chosen = draw_references(normals, k, seed, class_name)
        test = [s for s in group if s.image not in set(chosen)]
    else:
        if k > len(pool):
            raise InputError(f"class {class_name!r} has {len(pool)} normal training images; k={k} is more")
        chosen, test = draw_references(pool, k, seed, class_name), group
    store = References(model.reference_fingerprint())
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
        "dataset has one, else from the test split's (left out of that run's test set)",
        "",
        "| dataset | setting | " + " | ".join(_HEADERS) + " |",
        "|---|---|" + "---:|" * len(_HEADERS),
    ]
    for key, dataset in results["zero_shot"]["datasets"].items():
        lines.append(f"| {key} | zero-shot | " + " | ".join(_cell(dataset["mean"][m]) for m in METRIC_KEYS) + " |")
        for k, entry in results["shots"].items():
            mean = entry["datasets"][key]["mean"]
            lines.append(f"| {key} | {k}-shot | " + " | ".join(_pm(mean[m]) for m in METRIC_KEYS) + " |")
    return "\n".join(lines) + "\n"
