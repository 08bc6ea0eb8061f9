"""``kanoclip detect``: score images of one class and, optionally, write heat-map overlays.

One line per image on stdout: ``PATH<TAB>SCORE<TAB>anomalous|normal``. With ``--json`` stdout is
one JSON list instead: ``{"image", "score", "is_anomalous"}`` per image, or ``{"image", "error"}``
for an image that could not be read. With ``--out DIR``: ``<name>_overlay.png`` per image
(the heat map over the image at its own size, with a colour bar beside it) and ``results.csv``.
An unreadable image does not stop the others; the exit status is then 1.

Under ``accelerate launch`` (or ``torchrun``) the images are split into one contiguous part per
process (in the order above); each process scores its part and writes its part's overlays (each
image's own file, so ``--out`` must be a folder every process sees), and the main process
gathers the rows and alone prints them and writes ``results.csv``: the same lines, JSON and CSV
as one process gives. It shows its own part's progress and rows as they come, then the others'.

Video clips (``.mp4``, ``.mov``, ``.mkv``, ``.webm``, ...) instead of images: see :mod:`kanoclip.cli.detect_video`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from kanoclip.cli.detect_video import add_video_options, run_videos, video_inputs
from kanoclip.cli.options import add_model_options, load_model, positive_int, progress_bar

RESULTS_CSV = "results.csv"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="score images of one class for anomalies (and write heat-map overlays)",
        description="Detect anomalies in images of one class; folders are searched recursively for images.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS", help="image files and/or folders")
    parser.add_argument(
        "--class", dest="class_name", required=True, metavar="NAME", help="what the images show, e.g. bottle"
    )
    add_model_options(parser)
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="score at or above which an image is anomalous (default: the model's, 0.5)",
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="write an overlay PNG per image and results.csv here")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of one line per image")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default 8)")
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="GOOD",
        help="normal images of the class (files or folders, repeatable): their map is fused with the model's, "
        "and with 2 or more the threshold is calibrated on them (leave-one-out)",
    )
    parser.add_argument(
        "--calibrate",
        metavar="VAL_DIR",
        help="set the threshold on validation images: with good/ (or ok/, normal/) and defect sub-folders, the F1-max "
        "threshold; with images only, all taken as normal (their largest score + a margin)",
    )
    add_video_options(parser)
    parser.set_defaults(func=run)


NORMAL_FOLDERS = ("good", "ok", "normal")


def calibration_images(folder: str) -> tuple[list[str], list[int] | None]:
    """The images under ``folder`` and their labels from their sub-folders (None: no sub-folders, all normal)."""
    root = Path(folder).expanduser()
    paths = [path for path, _ in find_images([folder])]
    nested = [path.relative_to(root).parts[:-1] for path in paths]
    if not any(nested):
        return [str(p) for p in paths], None
    labels = [0 if any(part.lower() in NORMAL_FOLDERS for part in parts) else 1 for parts in nested]
    return [str(p) for p in paths], labels


def find_images(inputs: list[str]) -> list[tuple[Path, str]]:
    """``(path, overlay name)`` of each input file and each image under each input folder.

    A missing path is kept (it is reported as that image's error). Overlay names are the
    path below the given folder joined with ``__``, made unique.
    """
    from kanoclip.data.layouts import natural_key
    from kanoclip.data.sample import IMAGE_EXTENSIONS, is_image
    from kanoclip.errors import InputError

    found: list[tuple[Path, str]] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and is_image(p)]
            if not files:
                raise InputError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.sort(key=lambda p: natural_key(p.relative_to(path).as_posix()))
            found += [(p, "__".join(p.relative_to(path).with_suffix("").parts)) for p in files]
        else:
            found.append((path, path.stem or "image"))
    names: set[str] = set()
    unique = []
    for path, name in found:
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}-{n}", n + 1
        names.add(candidate)
        unique.append((path, f"{candidate}_overlay.png"))
    return unique


def _detect_all(
    model: Any, images: list[tuple[Path, str]], args: argparse.Namespace, emit, *, show_progress: bool = True
) -> list[dict[str, Any]]:
    from kanoclip.errors import ImageError
    from kanoclip.images import load_image
    from kanoclip.viz import overlay_with_colorbar, save_png

    rows: list[dict[str, Any]] = []
    bar = progress_bar(len(images), "detecting", disable=not show_progress or len(images) < 2)
    try:
        for start in range(0, len(images), args.batch_size):
            batch = images[start : start + args.batch_size]
            decoded = []
            for path, name in batch:
                try:
                    decoded.append((path, name, load_image(path)))
                except ImageError as exc:
                    rows.append({"image": str(path), "error": str(exc)})
                    emit(rows[-1])
            if decoded:
                detections = model.detect_batch(
                    [pil for _, _, pil in decoded], args.class_name, threshold=args.threshold
                )
                for (path, name, pil), det in zip(decoded, detections):
                    row = {"image": str(path), "score": det.score, "is_anomalous": det.is_anomalous}
                    if args.out is not None:
                        overlay = overlay_with_colorbar(pil, det.anomaly_map)
                        save_png(overlay, args.out / name)
                        row["overlay"] = name
                    row["threshold"] = det.threshold
                    rows.append(row)
                    emit(row)
            bar.update(len(batch))
    finally:
        bar.close()
    order = {str(path): i for i, (path, _) in enumerate(images)}
    return sorted(rows, key=lambda r: order[r["image"]])


def _write_csv(rows: list[dict[str, Any]], folder: Path) -> Path:
    from kanoclip.fileio import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "score", "is_anomalous", "threshold", "overlay", "error"])
    for row in rows:
        score = f"{row['score']:.6f}" if "score" in row else ""
        writer.writerow(
            [
                row["image"],
                score,
                row.get("is_anomalous", ""),
                row.get("threshold", ""),
                row.get("overlay", ""),
                row.get("error", ""),
            ]
        )
    return atomic_write_text(folder / RESULTS_CSV, buffer.getvalue())


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kanoclip.distributed import Processes

    videos = video_inputs(args.inputs)
    images = [] if videos else find_images(args.inputs)
    procs = Processes(args.device)
    args.device = procs.model_device  # with several processes, each loads the model on its own device
    model = load_model(args)
    class_name, known = model.canonical_class(args.class_name)  # an empty class name fails before any work
    if args.reference:  # every process adds the same references (a deterministic encoding)
        refs = model.add_references(class_name, [str(path) for path, _ in find_images(args.reference)])
        if refs.note and procs.is_main:
            print(f"kanoclip detect: --reference: {refs.note}", file=sys.stderr)
    if args.calibrate:  # --batch-size images at a time; only their scores are kept
        model.calibrate(class_name, *calibration_images(args.calibrate), batch_size=args.batch_size)
    if not known and procs.is_main:
        near = model.knowledge.suggest(class_name)
        hint = f"did you mean --class {' or '.join(near)}? Otherwise pass" if near else "pass"
        print(
            f"kanoclip detect: warning: class {class_name!r} is not in the knowledge base, so generic anomaly "
            f"descriptions are used; {hint} a knowledge base that describes it with --kb",
            file=sys.stderr,
        )
    if videos:  # a clip's frames are scored in order by the main process alone
        return run_videos(model, class_name, videos, args) if procs.is_main else 0

    def emit(row: dict[str, Any]) -> None:
        if "error" in row:
            tqdm.write(f"kanoclip detect: error: {row['error']}", file=sys.stderr)
        elif not args.json:
            verdict = "anomalous" if row["is_anomalous"] else "normal"
            tqdm.write(f"{row['image']}\t{row['score']:.4f}\t{verdict}", file=sys.stdout)

    mine = procs.shard(images)  # the main process's part comes first
    rows = _detect_all(model, mine, args, emit if procs.is_main else lambda _row: None, show_progress=procs.is_main)
    rows = procs.gather(rows)
    failed = 1 if any("error" in row for row in rows) else 0
    if not procs.is_main:
        return failed
    for row in rows[len(mine) :]:
        emit(row)
    if args.out is not None:
        _write_csv(rows, args.out)
    refs = model.references(class_name)
    if procs.is_main and refs is not None:
        print(
            f"kanoclip detect: {refs.count} references of {class_name!r}; "
            f"{refs.describe(model.config.scoring.threshold)}",
            file=sys.stderr,
        )
    if args.json:
        keep = ("image", "score", "is_anomalous", "error")
        print(json.dumps([{k: row[k] for k in keep if k in row} for row in rows], indent=2))
    return failed
