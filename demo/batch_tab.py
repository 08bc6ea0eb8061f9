"""The Batch tab: many images (or one zip of them) of one class in, sorted by anomaly score.

The handler :func:`build_batch_tab`'s ``detect_many`` is also the API endpoint ``/detect_many``
(inputs: the list of files, the class name, then the model with its default). It returns a
summary, a gallery of the maps over the images sorted by score (highest first, captioned with score
and verdict), the table ``image, score, verdict, threshold`` in the same order, and that table as a
CSV file.

Serving rules: the images are decoded here and detected in chunks of :data:`CHUNK` with
``detect_batch``, each chunk under :func:`~demo.state.compute_slot` (so one visitor's batch does
not hold the model for the whole request) and inside the ``gpu`` boundary. The visitor's own
normal references and calibrated threshold are used (the Detect tab's session state), else the
app's shared ones, else the default threshold; and the visitor's own knowledge base on a public
app (:class:`~demo.state.Session`), else the shared one.

Limits: at most ``AppConfig.max_batch`` images per request (``KANOCLIP_MAX_BATCH``, default 32),
counted before any is decoded; a zip is checked with :func:`~demo.uploads.check_zip` under
:data:`ZIP_LIMITS`. A file that cannot be decoded is named in the summary; the others' results
still come back. Memory: one chunk of decoded images and their input-size maps at a time (a
chunk of 8 images of 900×900 raised the peak RSS by ~150 MB on the CPU, about 20 bytes per input
pixel), plus one gallery picture per image, shrunk to at most
:data:`~demo.detect_tab.GALLERY_MAX_SIDE` pixels (~2 MB each).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from demo.components import class_dropdown, decode_upload, required_class_name, user_errors
from demo.detect_references import Stores, serving_references, session_for
from demo.detect_tab import DetectTab, gallery_size
from demo.gpu import gpu, move
from demo.state import AppContext, Session, compute_slot, describe_model
from demo.uploads import MB, ZipLimits, check_zip, skipped_entry
from kanoclip import KAnoCLIP
from kanoclip.data.sample import is_image
from kanoclip.detection import Detection, upsample_maps
from kanoclip.errors import ImageError, InputError
from kanoclip.images import load_image
from kanoclip.knowledge import KnowledgeBase
from kanoclip.references import References
from kanoclip.viz import overlay_with_colorbar

CHUNK = 8  # images per detect_batch call (and per hold of the compute slot)
COLUMNS = ["image", "score", "verdict", "threshold"]
ZIP_LIMITS = ZipLimits(max_compressed=1024 * MB, max_uncompressed=2048 * MB, max_entries=10_000)
MAX_IMAGE_BYTES = 64 * MB  # one image file of a zip; larger ones are named as too large, not read
CSV_MAX_AGE = 3600  # s: a batch's CSV file is kept this long for its download (Gradio keeps its own copy)


@dataclass(frozen=True)
class BatchImage:
    """One image of a request: the name shown for it and how to read it (a path, or a zip entry's bytes)."""

    name: str
    read: Callable[[], str | bytes]

    def decode(self) -> Image.Image:
        """The RGB image; :class:`ImageError` naming this image by its own name."""
        source = self.read()
        if isinstance(source, str):
            return decode_upload(source)  # names an uploaded file by its name, not the server's path
        try:
            return load_image(source)
        except ImageError as exc:
            raise ImageError(str(exc).replace("image bytes", self.name, 1)) from None


def _zip_entry(archive_path: Path, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        if info.file_size > MAX_IMAGE_BYTES:
            raise ImageError(f"image bytes: {info.file_size / MB:.0f} MB, over the {MAX_IMAGE_BYTES // MB} MB limit")
        with zipfile.ZipFile(archive_path) as archive:
            return archive.read(info)

    return read


def collect_images(files: list[str], limit: int) -> tuple[list[BatchImage], int]:
    """The request's images: uploaded files, or the image entries of uploaded zips; and how many
    zip entries were not images (left out).

    Raises:
        InputError: a zip that fails its checks, no image at all, or more than ``limit`` images
            (counted before any is decoded).
    """
    images: list[BatchImage] = []
    skipped = 0
    for file in files:
        path = Path(file)
        if path.suffix.lower() != ".zip":
            images.append(BatchImage(path.name, lambda p=str(path): p))
            continue
        check_zip(path, ZIP_LIMITS)
        with zipfile.ZipFile(path) as archive:
            entries = [i for i in archive.infolist() if not i.is_dir() and not skipped_entry(i.filename)]
        for info in sorted(entries, key=lambda i: i.filename):
            if is_image(Path(info.filename)):
                images.append(BatchImage(f"{path.name}/{info.filename}", _zip_entry(path, info)))
            else:
                skipped += 1
    if not images:
        raise InputError("no images found: upload image files, or a zip holding .png/.jpg/.bmp/.tif images")
    if len(images) > limit:
        raise InputError(
            f"{len(images)} images is over this app's limit of {limit} per batch; "
            f"upload at most {limit} at a time (split the folder or the zip)"
        )
    return images, skipped


@dataclass
class Inspected:
    """One image's outcome: its row of the table and its gallery picture."""

    name: str
    score: float
    verdict: str
    threshold: float
    picture: Image.Image

    @classmethod
    def of(cls, name: str, image: Image.Image, det: Detection) -> Inspected:
        """The row and the shrunk overlay (with the colour bar, as the Detect tab draws it) of a detection."""
        height, width = gallery_size(image.height, image.width)
        small = (
            image.resize((width, height), Image.Resampling.BILINEAR) if (height, width) != image.size[::-1] else image
        )
        small_map = upsample_maps(det.anomaly_map[None], (height, width))[0]
        verdict = "ANOMALOUS" if det.is_anomalous else "normal"
        # 6 decimals as the Detect tab's score: float32 carries about 7 digits
        return cls(
            name,
            round(float(det.score), 6),
            verdict,
            round(float(det.threshold), 6),
            overlay_with_colorbar(small, small_map),
        )


def results_table(results: list[Inspected]) -> pd.DataFrame:
    """The table shown and downloaded: ``image, score, verdict, threshold`` in the results' order."""
    return pd.DataFrame([[r.name, r.score, r.verdict, r.threshold] for r in results], columns=COLUMNS)


class CsvFiles:
    """The batches' CSV files: one folder per request under one scratch folder, removed after ``max_age`` s."""

    def __init__(self, max_age: float = CSV_MAX_AGE) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kanoclip-batch-"))
        self.max_age = max_age

    def write(self, table: pd.DataFrame, class_name: str) -> Path:
        """``table`` as ``batch-<class>.csv`` in a fresh folder; older folders are removed first."""
        cutoff = time.time() - self.max_age
        for folder in self.root.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another request removed it meanwhile
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in class_name)[:40] or "images"
        path = folder / f"batch-{safe}.csv"
        table.to_csv(path, index=False)
        return path


def batch_summary(
    model: KAnoCLIP, class_name: str, results: list[Inspected], bad: list[str], note: str, extra: str
) -> str:
    """Markdown above the results: model, class, counts, the threshold's origin, the unreadable files."""
    flagged = sum(r.verdict == "ANOMALOUS" for r in results)
    text = (
        f"{describe_model(model)}\n\n**Class:** `{class_name}` · **Images:** {len(results)} inspected, "
        f"{flagged} anomalous · **Threshold:** {note}"
    )
    if extra:
        text += f" · {extra}"
    if bad:
        text += f"\n\n⚠️ **{len(bad)} file(s) could not be read** (the others' results are below):\n" + "".join(
            f"\n- {line}" for line in bad
        )
    return text


@dataclass
class BatchTab:
    class_name: gr.Dropdown


def build_batch_tab(ctx: AppContext, detect: DetectTab) -> BatchTab:
    """The Batch tab; it shares the Detect tab's model choice, the session's references (``detect.stores``) and
    the visitor's own knowledge base (``detect.visitor``)."""
    config, registry = ctx.config, ctx.registry
    csv_files = CsvFiles()

    @gpu
    def run_batch(
        model_choice: str | None,
        images: list[Image.Image],
        class_name: str,
        store: References,
        knowledge: KnowledgeBase | None,
        owner: bool,
        shared: tuple[int, KnowledgeBase],
    ) -> list[Detection]:
        """One chunk's forward pass (the GPU work of a request), under the compute slot; references
        come and go on the CPU, the shared knowledge base with its version (:mod:`demo.gpu`); the
        visitor's own ``knowledge`` base (None: the shared one) serves this call only."""
        model = registry.get(model_choice, shared, owner=owner)
        with compute_slot(model):
            return model.detect_batch(images, class_name, references=move(store, model.device), knowledge=knowledge)

    @user_errors
    def detect_many(
        files: list[str] | None,
        class_name: str | None,
        model_choice: str | None = config.start_choice,
        stores: Stores | None = None,
        state: Session | None = None,
        profile: gr.OAuthProfile | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """Detect every uploaded image (or every image of an uploaded zip) of one class, sorted by score."""
        if not files:
            raise InputError("no images: upload several images of one class, or one zip of them")
        name = required_class_name(class_name)
        images, skipped = collect_images(list(files), config.max_batch)
        progress(0.0, desc="loading the model")
        state = state or Session()
        owner = state.is_owner(config.access, profile)
        model, session = session_for(ctx, model_choice, stores, owner)
        store, refs, whose = serving_references(model, session, name)
        results: list[Inspected] = []
        bad: list[str] = []
        note = ""
        for start in range(0, len(images), CHUNK):
            progress(start / len(images), desc=f"detecting: {start} of {len(images)} images")
            decoded = []
            for image in images[start : start + CHUNK]:
                try:
                    decoded.append((image.name, image.decode()))
                except ImageError as exc:
                    bad.append(str(exc))
            if not decoded:
                continue
            detections = run_batch(
                model_choice, [pil for _, pil in decoded], name, store, state.kb, owner, ctx.knowledge.versioned()
            )
            results += [Inspected.of(n, pil, det) for (n, pil), det in zip(decoded, detections)]
            note = detections[0].threshold_note
            del decoded, detections
        if not results:
            raise InputError("none of the files could be read: " + "; ".join(bad))
        results.sort(key=lambda r: r.score, reverse=True)
        table = results_table(results)
        extra = f"**References:** {refs.count} normal images ({whose})" if refs is not None and refs.count else ""
        if skipped:
            extra += (
                " · " if extra else ""
            ) + f"{skipped} zip entr{'y' if skipped == 1 else 'ies'} not an image, left out"
        summary = batch_summary(model, model.canonical_class(name)[0], results, bad, note, extra)
        gallery = [(r.picture, f"{r.score:.4f} · {r.verdict} · {r.name}") for r in results]
        return summary, gallery, table, str(csv_files.write(table, name))

    with gr.Tab("Batch", id="batch"):
        gr.Markdown(
            f"Upload several images of **one class**, or one zip of them (at most {config.max_batch} images), and get "
            "them sorted by anomaly score, highest first. The model and your normal references are the Detect tab's.",
            elem_id="batch-help",
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                files = gr.File(
                    file_count="multiple", type="filepath", label="Images or one zip", elem_id="batch-files"
                )
                classes = ctx.knowledge.snapshot().classes()
                class_name = class_dropdown(classes, "every image shows", elem_id="batch-class")
                button = gr.Button("Inspect all", variant="primary", elem_id="batch-button")
            with gr.Column(scale=3, min_width=420):
                summary = gr.Markdown(elem_id="batch-summary")
                gallery = gr.Gallery(
                    label="Anomaly maps over the images, highest score first (open one to see it full size)",
                    columns=4,
                    format="png",
                    elem_id="batch-gallery",
                )
                table = gr.DataFrame(headers=COLUMNS, label="Scores", interactive=False, elem_id="batch-table")
                csv_file = gr.File(label="The table as CSV", interactive=False, elem_id="batch-csv")
        button.click(
            detect_many,
            inputs=[files, class_name, detect.model, detect.stores, detect.visitor],
            outputs=[summary, gallery, table, csv_file],
            api_name="detect_many",
            concurrency_limit=config.concurrency,
            concurrency_id="detect",  # the same forward passes as a detection
        )
    return BatchTab(class_name=class_name)
