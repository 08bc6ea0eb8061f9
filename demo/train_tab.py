"""The Train tab: train a checkpoint on a dataset under the data root or in an uploaded zip.

One training runs at a time (:class:`TrainingManager`); a second request is told the app is
busy. The training runs in a background thread; the event handler is a generator that streams
its progress (a progress bar and live loss curves) and stops it when cancelled or when the
visitor leaves. The finished checkpoint is written to ``checkpoints/<name>`` and added to the
model lists of the Detect and Prompts tabs. The loss curve is drawn per training step (each
step reports the running means of its epoch), so a 1-epoch run is a curve, not one dot.
An uploaded zip is deleted as soon as it is extracted (or refused).

On a public app (:mod:`demo.access`) training is the owner's: the tab exists only where the
owner enables it (``KANOCLIP_PUBLIC_TRAINING=1``), stays hidden until an owner signs in, and
``/train`` refuses everyone else.
"""

from __future__ import annotations

import datetime as dt
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from demo.access import owner_only
from demo.components import dropdown_update, user_errors
from demo.state import CHECKPOINTS_PREFIX, AppContext, Session, list_checkpoints, model_choices
from demo.uploads import ZipLimits, confine, discard_upload, extract_zip
from kanoclip.data import KINDS, detect_kind, load_dataset, summarize
from kanoclip.errors import InputError
from kanoclip.training import TrainConfig, TrainProgress, TrainResult, train
from kanoclip.viz import plot_loss_curves

AUTO = "auto-detect"
SOURCES = ("folder under the data root", "uploaded zip")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PLOT_EVERY_S = 1.0  # the loss plot is redrawn at most this often
HEARTBEAT_S = 5.0  # without progress events, the status is re-sent this often
TrainFn = Callable[..., TrainResult]  # kanoclip.training.train's signature: (config, progress=, should_stop=)


@dataclass
class Hyper:
    epochs: int
    batch_size: int
    lr: float
    image_size: int | None


def check_hyper(epochs: Any, batch_size: Any, lr: Any, image_size: Any) -> Hyper:
    try:
        e, b, rate, size = int(epochs), int(batch_size), float(lr), int(image_size or 0)
    except (TypeError, ValueError):
        raise InputError(
            "epochs, batch size and image size must be whole numbers, and the learning rate a number"
        ) from None
    if not 1 <= e <= 1000:
        raise InputError(f"epochs must be between 1 and 1000, got {e}")
    if not 1 <= b <= 1024:
        raise InputError(f"batch size must be between 1 and 1024, got {b}")
    if not 0 < rate <= 1:
        raise InputError(f"learning rate must be in (0, 1], got {rate}")
    if size and not 32 <= size <= 1024:
        raise InputError(f"image size must be 0 (the backbone's own) or between 32 and 1024, got {size}")
    return Hyper(e, b, rate, size or None)


def check_name(checkpoints_dir: Path, name: str | None) -> tuple[str, Path]:
    text = (name or "").strip() or dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    if not _NAME.fullmatch(text):
        raise InputError(f"checkpoint name {text!r} may only hold letters, digits, '.', '_' and '-' (at most 64)")
    out = checkpoints_dir / text
    if out.exists():
        raise InputError(f"checkpoint {CHECKPOINTS_PREFIX}{text} already exists; choose another name")
    return text, out


def data_folders(root: Path, limit: int = 200) -> list[str]:
    """Folders under the data root, one and two levels down, for the folder dropdown."""
    if not root.is_dir():
        return []
    found: list[str] = []
    for first in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.append(first.name)
        found += [
            f"{first.name}/{p.name}" for p in sorted(first.iterdir()) if p.is_dir() and not p.name.startswith(".")
        ][:20]
        if len(found) >= limit:
            break
    return found[:limit]


# ---------------------------------------------------------------------------- one training at a time
@dataclass
class TrainingRun:
    owner: str
    started: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None
    result: TrainResult | None = None
    error: BaseException | None = None
    last: TrainProgress | None = None  # the latest progress event
    history: list[dict[str, float]] = field(default_factory=list)  # one loss-curve point per training step

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class TrainingManager:
    """Admits one training at a time; the slot is freed when its thread (or its preparation) ends."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self.current: TrainingRun | None = None

    def begin(self, owner: str) -> TrainingRun:
        with self._guard:
            if self.current is None:
                self.current = TrainingRun(owner=owner)
                return self.current
        raise InputError(
            f"the app is busy: {self.describe()}; one training runs at a time — wait for it to finish or cancel it"
        )

    def end(self, run: TrainingRun) -> None:
        with self._guard:
            if self.current is run:
                self.current = None

    def running(self) -> TrainingRun | None:
        with self._guard:
            return self.current

    def describe(self) -> str:
        run = self.running()
        if run is None:
            return "no training is running"
        since = dt.datetime.fromtimestamp(run.started).strftime("%H:%M:%S")
        where = f", {stage(run.last)}" if run.last is not None else ""
        return f"a training started at {since} is running{where}"

    def launch(self, run: TrainingRun, work: Callable[[TrainingRun], TrainResult], cleanup: Callable[[], None]) -> None:
        """Run ``work(run)`` in a thread; the slot is released (and ``cleanup`` run) when it ends."""

        def target() -> None:
            try:
                run.result = work(run)
            except BaseException as exc:  # noqa: BLE001 - handed to the streaming handler
                run.error = exc
            finally:
                cleanup()
                self.end(run)
                run.events.put(None)

        run.thread = threading.Thread(target=target, name="kanoclip-train", daemon=True)
        run.thread.start()

    def cancel(self, owner: str) -> str:
        run = self.running()
        if run is None:
            return "No training is running."
        if run.owner != owner:
            raise InputError("the running training was started by another visitor; only they can cancel it")
        run.stop.set()
        return "Cancelling: the training stops after the current step."


# ---------------------------------------------------------------------------- data
def prepare_data(ctx: AppContext, source: str, folder: str | None, zip_file: str | None, scratch: Path) -> Path:
    """The dataset folder: confined under the data root, or the checked and extracted zip."""
    if source == SOURCES[1]:
        if not zip_file:
            raise InputError("no zip uploaded; upload a dataset archive or choose a folder under the data root")
        return extract_zip(zip_file, scratch / "data", ZipLimits())
    if not ctx.config.data_root.is_dir():
        raise InputError(data_root_hint(ctx.config.data_root))
    return confine(ctx.config.data_root, folder or "", what="data folder")


def data_root_hint(root: Path) -> str:
    """Why the folder list is empty and how to fill it (``--data-root``); ``""`` when it is not."""
    if root.is_dir() and data_folders(root, limit=1):
        return ""
    state = "does not exist" if not root.is_dir() else "holds no dataset folders"
    return (
        f"the data root {root} {state}; start the app with --data-root /path/to/datasets "
        "(or KANOCLIP_DATA_ROOT), or upload a zip"
    )


def source_inputs(source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Updates showing only the chosen data source's input: (folder dropdown, zip upload)."""
    from_zip = source == SOURCES[1]
    return gr.update(visible=not from_zip), gr.update(visible=from_zip)


def summary_text(kind: str, samples: list) -> str:
    counts = summarize(samples)
    parts = [
        f"`{name}`: {c.get('n_normal', 0)} normal, {c.get('n_anomalous', 0)} anomalous"
        for name, c in list(counts.items())[:8]
    ]
    more = f" (+{len(counts) - 8} more classes)" if len(counts) > 8 else ""
    return f"Dataset **{kind}**, {len(samples)} images — " + "; ".join(parts) + more


def history_point(event: TrainProgress) -> dict[str, float] | None:
    """A loss-curve point (fractional epoch + loss terms) from a training step; None for preparation."""
    if event.epoch < 1 or not event.losses:
        return None
    return {
        "epoch": (event.epoch - 1) + event.step / max(1, event.steps),
        **{k: float(v) for k, v in event.losses.items()},
    }


def stage(event: TrainProgress) -> str:
    """``epoch e/E`` for a training step, ``preparing`` for a preparation step (epoch 0)."""
    return f"epoch {event.epoch}/{event.epochs}" if event.epoch >= 1 else "preparing (reading images, caching features)"


def fraction(event: TrainProgress) -> float:
    """The share of the whole training done (0 while preparing)."""
    if event.epoch < 1:
        return 0.0
    done = (event.epoch - 1) + event.step / max(1, event.steps)
    return min(1.0, done / max(1, event.epochs))


def _message(event: TrainProgress | None) -> str:
    return (event.message if event is not None else "") or "training…"


# ---------------------------------------------------------------------------- the tab
def _configure(
    ctx: AppContext,
    source: str,
    folder: str | None,
    kind: str | None,
    zip_file: str | None,
    scratch: Path,
    hyper: Any,
    out: Path,
) -> tuple[str, TrainConfig]:
    """The data's summary and the training's settings: the data checked (an upload extracted into ``scratch``)."""
    try:
        data = prepare_data(ctx, source, folder, zip_file, scratch)
    finally:
        if source == SOURCES[1] and zip_file:
            discard_upload(zip_file, get_upload_folder())
    chosen = None if not kind or kind == AUTO else kind
    found = chosen or detect_kind(data)
    described = summary_text(found, load_dataset(found, data))
    kb_file = scratch / "knowledge_base.json"
    ctx.knowledge.snapshot().save(kb_file)
    return described, TrainConfig(
        data=[f"{found}={data}"],
        out=out,
        epochs=hyper.epochs,
        batch_size=hyper.batch_size,
        lr=hyper.lr,
        image_size=hyper.image_size,
        kb=str(kb_file),
        backbone=ctx.config.backbone,  # None: from_pretrained reads $KANOCLIP_BACKBONE, else ViT-L
        device=ctx.config.device,
        on_bad_sample="skip",  # an unreadable upload is reported, not fatal
    )


def _follow(run: TrainingRun, progress: gr.Progress) -> Iterator[tuple[str, Any]]:
    """(status message, loss plot or ``gr.skip()``) while the run lasts: a plot every few seconds, else heartbeats."""
    last_plot = last_yield = time.time()
    finished = False
    while not finished:
        try:
            event = run.events.get(timeout=0.5)
        except queue.Empty:
            if time.time() - last_yield >= HEARTBEAT_S:  # a yield lets Gradio notice a visitor who left
                last_yield = time.time()
                yield _message(run.last), gr.skip()
            continue
        batch = [event]
        while not run.events.empty():
            batch.append(run.events.get_nowait())
        for item in batch:
            if item is None:
                finished = True
                continue
            run.last = item
            point = history_point(item)
            if point:
                run.history.append(point)
        if run.last is not None:
            progress(fraction(run.last), desc=stage(run.last))
        if finished or time.time() - last_plot >= PLOT_EVERY_S:
            last_plot = last_yield = time.time()
            yield _message(run.last), plot_loss_curves(run.history, "Training loss (live)")


def _outcome(checkpoints_dir: Path, run: TrainingRun) -> tuple[str, str | None, Any]:
    """(what happened, the new checkpoint's model choice or None, the final loss plot) of a finished run."""
    if run.error is not None:
        raise run.error
    result = run.result
    assert result is not None  # the thread ended without an error
    cancelled = result.cancelled
    if CHECKPOINTS_PREFIX + result.checkpoint.name in list_checkpoints(checkpoints_dir):
        choice = CHECKPOINTS_PREFIX + result.checkpoint.name
        verb = "Cancelled; the checkpoint so far was saved" if cancelled else "Finished"
        text = f"{verb}: `{choice}` — it is now in the model lists of Detect and Prompts."
    else:
        choice = None
        text = "Cancelled before a checkpoint was written." if cancelled else "The training ended without a checkpoint."
    if result.skipped:
        text += f" {len(result.skipped)} unreadable samples were skipped."
    return text, choice, plot_loss_curves(run.history or result.history, "Training loss")


def build_train_tab(
    ctx: AppContext, model_dropdowns: list[gr.Dropdown], session: gr.State, train_fn: TrainFn = train
) -> gr.Tab:
    """The tab (hidden on a public app until an owner signs in); returns it.

    ``session`` is the app's per-visitor :class:`~demo.state.Session` state; ``train_fn`` runs a
    training (:func:`kanoclip.training.train`; tests pass a scripted one).
    """
    config = ctx.config
    manager = TrainingManager()

    def model_updates(value: str | None = None) -> list[Any]:
        choices = model_choices(config)  # lists the checkpoints folder once
        return [dropdown_update(choices, value if i == 0 else None) for i, _ in enumerate(model_dropdowns)]

    # A new checkpoint appears only when a training ends: progress updates leave the lists alone.
    unchanged = [gr.skip() for _ in model_dropdowns]

    @user_errors
    def train(
        source: str,
        folder: str | None,
        kind: str | None,
        zip_file: str | None,
        name: str | None,
        epochs: float,
        batch_size: float,
        lr: float,
        image_size: float,
        state: Session | None,
        request: gr.Request,
        profile: gr.OAuthProfile | None,
        progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple[Any, ...]]:
        if not config.access.is_owner(state is not None and state.signed_in, profile):
            raise owner_only("training", config.access)
        hyper = check_hyper(epochs, batch_size, lr, image_size)
        checkpoint_name, out = check_name(config.checkpoints_dir, name)
        run = manager.begin(getattr(request, "session_hash", None) or "anonymous")
        scratch = Path(tempfile.mkdtemp(prefix="kanoclip-train-"))
        launched = False
        try:
            yield ("", None, *unchanged)  # clear the last run's status and curves
            # on the progress bar, not in the status: it goes when the event ends, error or not
            progress(0.0, desc="Checking the data…")
            described, train_config = _configure(ctx, source, folder, kind, zip_file, scratch, hyper, out)

            def work(run: TrainingRun) -> TrainResult:
                return train_fn(train_config, progress=run.events.put, should_stop=run.stop.is_set)

            manager.launch(run, work, lambda: shutil.rmtree(scratch, ignore_errors=True))
            launched = True
            yield (f"{described}\n\nTraining started → `{CHECKPOINTS_PREFIX}{checkpoint_name}`.", None, *unchanged)
            for message, curve in _follow(run, progress):
                yield (f"{described}\n\n{message}", curve, *unchanged)
            text, choice, curve = _outcome(config.checkpoints_dir, run)
            yield (f"{described}\n\n{text}", curve, *model_updates(choice))
        finally:
            if not launched:
                shutil.rmtree(scratch, ignore_errors=True)
                manager.end(run)
            elif run.running:
                run.stop.set()  # the visitor left or the handler failed: do not train for nobody

    @user_errors
    def cancel(request: gr.Request) -> str:
        return manager.cancel(getattr(request, "session_hash", None) or "anonymous")

    with gr.Tab("Train", id="train", visible=not config.public) as tab:
        gr.Markdown(
            "Train the prompts, Bi-CMCI and the Conv-Adapter on an auxiliary dataset (paper §2.5). "
            f"Data comes from a folder under the data root (`{config.data_root}`) or from an uploaded zip in one of "
            f"the supported layouts ({', '.join(KINDS)}). One training runs at a time."
        )
        with gr.Row():
            with gr.Column():
                source = gr.Radio(list(SOURCES), value=SOURCES[0], label="Data source")
                hint = data_root_hint(config.data_root)
                folder = gr.Dropdown(
                    choices=data_folders(config.data_root),
                    value=None,
                    allow_custom_value=True,
                    label="Folder (relative to the data root)",
                    info=hint or None,
                    elem_id="train-folder",
                )
                zip_file = gr.File(
                    label=f"Dataset zip ({ZipLimits().describe()})",
                    file_types=[".zip"],
                    type="filepath",
                    visible=False,
                    elem_id="train-zip",
                )
                kind = gr.Dropdown(choices=[AUTO, *KINDS], value=AUTO, label="Dataset kind")
            with gr.Column():
                name = gr.Textbox(
                    label="Checkpoint name (→ checkpoints/<name>)", placeholder="empty: run-<date>-<time>"
                )
                with gr.Row():
                    epochs = gr.Number(value=5, precision=0, minimum=1, label="Epochs")
                    batch_size = gr.Number(value=8, precision=0, minimum=1, label="Batch size")
                with gr.Row():
                    lr = gr.Number(value=1e-3, label="Learning rate")
                    image_size = gr.Number(value=0, precision=0, minimum=0, label="Image size (0 = backbone's)")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary")
                    stop = gr.Button("Cancel", variant="stop")
        status = gr.Markdown(elem_id="train-status")
        curves = gr.Plot(label="Loss curves", format="png")
        start.click(
            train,
            inputs=[source, folder, kind, zip_file, name, epochs, batch_size, lr, image_size, session],
            outputs=[status, curves, *model_dropdowns],
            api_name="train",
            concurrency_limit=4,
            concurrency_id="train",
        )
        stop.click(cancel, outputs=status, api_name="cancel_training", queue=False)
        folder.focus(lambda: dropdown_update(data_folders(config.data_root)), outputs=folder, api_visibility="private")
        source.change(source_inputs, inputs=source, outputs=[folder, zip_file], api_name="train_source", queue=False)
    return tab
