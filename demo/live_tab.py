"""The Live tab (a webcam stream) and the Video tab (a recorded clip): detection on moving pictures.

Both detect as the Detect tab does: with the class, model, threshold slider / "use the calibrated
threshold" box and the session's normal references chosen there (:class:`demo.detect_tab.DetectTab`),
and with the visitor's own knowledge base on a public app (:class:`demo.state.Session`).

**Live.** The webcam streams a frame every :data:`LIVE_EVERY` seconds; each processed frame shows
the map over the frame, the raw score, the verdict, that frame's latency, the frame rate actually
achieved, and a running chart of the last :data:`LIVE_WINDOW` scores with the threshold line. When
the model is slower than the stream, Gradio keeps only the newest frame sent while the previous
one was being processed (a new chunk replaces the waiting one), so frames are dropped, never
queued stale. One stream may run ``AppConfig.live_time_limit`` seconds; ``live_concurrency``
streams run at once (the others wait in the queue). Optional smoothing: an exponential moving
average of the score (weight of the past, 0 = off, the default); the verdict then follows the
smoothed score, and the raw score is always shown.

**Video.** An uploaded clip (``/detect_video``; inputs: video, class, model, threshold, calibrated,
stride) gives the overlay video (H.264 MP4) at the clip's frame rate / stride, a score-over-time
plot with the threshold, the frames over the threshold (the highest-scoring ones) with their
times, and the per-frame table and CSV. Clips longer than ``AppConfig.video_max_seconds`` are
scored up to that point (with a warning).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from demo.components import class_name_text, required_class_name, user_errors
from demo.detect_references import Stores, serving_references, session_for
from demo.detect_tab import SCORING, DetectTab, check_controls, chosen_threshold
from demo.gpu import gpu, move
from demo.state import AppContext, Session, compute_slot
from kanoclip.detection import Detection
from kanoclip.errors import InputError
from kanoclip.knowledge import KnowledgeBase
from kanoclip.references import References
from kanoclip.video import CSV_COLUMNS, VideoConfig, VideoResult, detect_video, write_frames_csv
from kanoclip.viz import overlay_with_colorbar

LIVE_EVERY = 0.25  # seconds between the webcam frames the browser sends
LIVE_WINDOW = 60  # the running chart shows the last N processed frames
RATE_FRAMES = 10  # the achieved frame rate is measured over the last N processed frames
STREAM_GAP = 10.0  # s without a frame: the next one starts a new stream (new chart, new average)
OUTPUT_FOLDERS = 16  # the newest video results kept on disk until Gradio has copied them


# ---------------------------------------------------------------------------- live: pure helpers
@dataclass
class LiveSession:
    """One visitor's webcam stream (a ``gr.State``): the last scores, the moving average, frame times."""

    window: int = LIVE_WINDOW
    count: int = 0
    smoothed: float | None = None
    points: deque = field(default_factory=deque)  # (frame, raw score, smoothed score, threshold)
    times: deque = field(default_factory=lambda: deque(maxlen=RATE_FRAMES))  # when frames were done (s)

    def record(self, score: float, threshold: float, weight: float, now: float) -> float:
        """Add a processed frame; returns its smoothed score (the raw one when ``weight`` is 0).

        ``weight`` is the moving average's weight of the past: smoothed = w·previous + (1 − w)·score.
        """
        if self.times and now - self.times[-1] > STREAM_GAP:  # a new stream: forget the old one
            self.count, self.smoothed = 0, None
            self.points.clear()
            self.times.clear()
        self.smoothed = score if self.smoothed is None or weight <= 0 else weight * self.smoothed + (1 - weight) * score
        self.count += 1
        self.points.append((self.count, score, self.smoothed, threshold))
        while len(self.points) > self.window:
            self.points.popleft()
        self.times.append(now)
        return self.smoothed

    def rate(self) -> float | None:
        """Frames processed per second over the last :data:`RATE_FRAMES` (None before two frames)."""
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def chart(self, smoothing: bool) -> pd.DataFrame:
        """The running chart's rows: ``frame, value, series`` (score, smoothed score when on, threshold)."""
        rows = []
        for frame, raw, smooth, threshold in self.points:
            rows.append((frame, raw, "score"))
            if smoothing:
                rows.append((frame, smooth, "smoothed"))
            rows.append((frame, threshold, "threshold"))
        return pd.DataFrame(rows, columns=["frame", "value", "series"])


def live_status(det: Detection, value: float, smoothing: bool, latency: float, rate: float | None, frame: int) -> str:
    """The line under the live picture: verdict, raw (and smoothed) score, threshold, latency, rate."""
    word = "ANOMALOUS" if value >= det.threshold else "normal"
    smoothed = f" · smoothed {value:.4f}" if smoothing else ""
    achieved = f"{rate:.1f} frames/s processed" if rate is not None else "frame rate after 2 frames"
    return (
        f"**{word}** · score {det.score:.4f}{smoothed} · threshold {det.threshold:.3f} "
        f"· latency {latency * 1000:.0f} ms · {achieved} · frame {frame}"
    )


# ---------------------------------------------------------------------------- video: pure helpers
class OutputFolders:
    """The folders that video results are written to, one per request; only the newest ``keep`` stay.

    Gradio copies a returned file into its own cache (cleaned by the app's ``delete_cache``) as the
    request ends, so a folder is needed only briefly; older ones are deleted as new ones are made.
    """

    def __init__(self, keep: int = OUTPUT_FOLDERS) -> None:
        self.keep = keep
        self._folders: deque[Path] = deque()
        self._lock = threading.Lock()

    def new(self) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="kanoclip-video-"))
        with self._lock:
            self._folders.append(folder)
            while len(self._folders) > self.keep:
                shutil.rmtree(self._folders.popleft(), ignore_errors=True)
        return folder


def frames_table(result: VideoResult) -> pd.DataFrame:
    """The per-frame table (the CSV's columns)."""
    return pd.DataFrame([row.as_row() for row in result.frames], columns=list(CSV_COLUMNS))


def score_plot(result: VideoResult) -> pd.DataFrame:
    """The score-over-time plot's rows: ``time, value, series`` (score and threshold)."""
    rows = [(row.time, row.score, "score") for row in result.frames]
    rows += [(row.time, row.threshold, "threshold") for row in result.frames]
    return pd.DataFrame(rows, columns=["time", "value", "series"])


def flagged_gallery(result: VideoResult) -> list[tuple[Image.Image, str]]:
    """The kept frames over the threshold, captioned with their frame, time and score."""
    return [
        (picture, f"frame {row.frame} · {row.time:.2f} s · score {row.score:.3f}") for row, picture in result.flagged
    ]


def video_summary(class_name: str, result: VideoResult, whose: str | None, stride: int) -> str:
    flagged = sum(row.is_anomalous for row in result.frames)
    threshold = result.frames[0].threshold if result.frames else SCORING.threshold
    every = "every frame" if stride == 1 else f"every {stride}th frame"
    refs = f" · references: {whose}" if whose else ""
    text = (
        f"**Class:** `{class_name}` · {len(result.frames)} frames scored ({every}, overlay at {result.fps:g} frames/s)"
        f" · **{flagged} over the threshold** {threshold:.3f}{refs}"
    )
    if len(result.flagged) < flagged:
        text += f"\n\nThe gallery shows the {len(result.flagged)} highest-scoring of them."
    if result.stopped:
        text += f"\n\n⚠️ {result.stopped}."
    return text


# ---------------------------------------------------------------------------- the tabs
def build_live_tabs(ctx: AppContext, detect: DetectTab) -> None:
    """The Live and Video tabs, detecting with ``detect``'s class, model, threshold and references."""
    config, registry = ctx.config, ctx.registry
    folders = OutputFolders()

    def serving(model_choice: str | None, stores: Stores | None, name: str, owner: bool):
        model, session = session_for(ctx, model_choice, stores, owner)
        return (model, *serving_references(model, session, name))

    @gpu
    def run_frame(
        model_choice: str | None,
        frame: Image.Image,
        name: str,
        threshold: float | None,
        store: References,
        knowledge: KnowledgeBase | None,
        owner: bool,
        shared: tuple[int, KnowledgeBase],
    ) -> Detection:
        """One webcam frame's model call (the only GPU work of a live step), with the visitor's own
        ``knowledge`` base (None: the shared one)."""
        model = registry.get(model_choice, shared, owner=owner)
        with compute_slot(model):
            return model.detect(
                frame, name, threshold=threshold, references=move(store, model.device), knowledge=knowledge
            )

    @user_errors
    def live_frame(
        frame: Image.Image | None,
        class_name: str | None,
        model_choice: str | None,
        threshold: float,
        calibrated: bool,
        smoothing: float,
        stores: Stores | None,
        live: LiveSession | None,
        state: Session | None = None,
        profile: gr.OAuthProfile | None = None,
    ) -> tuple[Any, ...]:
        """One streamed webcam frame -> overlay, raw score, status line, running chart, the session."""
        live = live if isinstance(live, LiveSession) else LiveSession()
        name = class_name_text(class_name)
        if frame is None or not name:
            hint = "Pick or type the class on the Detect tab first." if not name else "Waiting for the webcam…"
            return gr.skip(), gr.skip(), hint, gr.skip(), live
        t, _ = check_controls(threshold, None)
        started = time.perf_counter()
        state = state or Session()
        owner = state.is_owner(config.access, profile)
        model, store, refs, _ = serving(model_choice, stores, name, owner)
        det = run_frame(
            model_choice, frame, name, chosen_threshold(model, refs, t, calibrated), store, state.kb, owner,
            ctx.knowledge.versioned(),
        )  # fmt: skip
        latency = time.perf_counter() - started
        weight = min(max(float(smoothing or 0.0), 0.0), 0.95)
        value = live.record(det.score, det.threshold, weight, time.perf_counter())
        status = live_status(det, value, weight > 0, latency, live.rate(), live.count)
        overlay = overlay_with_colorbar(frame, det.anomaly_map)
        return overlay, round(det.score, 6), status, live.chart(weight > 0), live

    @gpu
    def run_clip(
        model_choice: str | None,
        path: str,
        name: str,
        threshold: float | None,
        store: References,
        video: VideoConfig,
        overlay: Path,
        progress: gr.Progress,
        knowledge: KnowledgeBase | None,
        owner: bool,
        shared: tuple[int, KnowledgeBase],
    ) -> VideoResult:
        """A clip's decoding, model calls and encoding, with the visitor's own ``knowledge`` (None: the shared one)."""
        model = registry.get(model_choice, shared, owner=owner)
        store = move(store, model.device)

        def tick(row) -> None:
            progress((row.frame + 1, None), desc=f"frame {row.frame} ({row.time:.1f} s)", unit="frames")

        return detect_video(
            model, path, name, config=video, threshold=threshold, references=store, knowledge=knowledge,
            overlay=overlay, on_frame=tick, guard=lambda: compute_slot(model),
        )  # fmt: skip

    @user_errors
    def detect_clip(
        video: str | None,
        class_name: str | None,
        model_choice: str | None = config.start_choice,
        threshold: float = SCORING.threshold,
        calibrated: bool = True,
        stride: float = 1,
        stores: Stores | None = None,
        state: Session | None = None,
        profile: gr.OAuthProfile | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """A recorded clip -> summary, overlay video, score plot, flagged frames, per-frame table, CSV."""
        if not video:
            raise InputError("no video: upload a clip (MP4, WebM, MOV or MKV)")
        name = required_class_name(class_name, "pick or type the class on the Detect tab, e.g. 'bottle'")
        t, _ = check_controls(threshold, None)
        try:
            video_config = VideoConfig(stride=int(stride), max_seconds=config.video_max_seconds)
        except (TypeError, ValueError):
            raise InputError(f"stride {stride!r} must be a whole number of frames, 1 or more") from None
        progress(0.0, desc="loading the model")
        state = state or Session()
        owner = state.is_owner(config.access, profile)
        model, store, refs, whose = serving(model_choice, stores, name, owner)
        folder = folders.new()
        stem = Path(video).stem or "clip"
        result = run_clip(
            model_choice, video, name, chosen_threshold(model, refs, t, calibrated), store, video_config,
            folder / f"{stem}.overlay.mp4", progress, state.kb, owner, ctx.knowledge.versioned(),
        )  # fmt: skip
        if result.stopped:
            gr.Warning(result.stopped)
        table = write_frames_csv(result.frames, folder / f"{stem}.frames.csv")
        summary = video_summary(name, result, whose if refs is not None else None, video_config.stride)
        return (
            summary,
            str(result.overlay),
            score_plot(result),
            flagged_gallery(result),
            frames_table(result),
            str(table),
        )

    limit = f"{config.live_time_limit} s per stream"
    with gr.Tab("Live", id="live"):
        gr.Markdown(
            "Point the webcam at a part: each processed frame shows the anomaly map, its score and verdict. "
            "The class, model, threshold and your normal references are the **Detect** tab's. "
            f"A stream runs at most {limit}; when the model is slower than the camera, only the newest frame "
            "is processed.",
            elem_id="live-help",
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                webcam = gr.Image(sources=["webcam"], streaming=True, type="pil", label="Webcam", elem_id="live-webcam")
                smoothing = gr.Slider(
                    0.0, 0.95, value=0.0, step=0.05, label="Score smoothing (moving average: weight of the past; 0 off)"
                )
            with gr.Column(scale=3, min_width=420):
                status = gr.Markdown("Start the webcam to begin.", elem_id="live-status")
                score = gr.Number(label="Score of the last frame (raw)", interactive=False, elem_id="live-score")
                overlay = gr.Image(label="Map over the frame", type="pil", format="jpeg", elem_id="live-overlay")
                chart = gr.LinePlot(
                    x="frame", y="value", color="series", y_lim=[0, 1], label=f"Last {LIVE_WINDOW} scores",
                    elem_id="live-chart", height=220,
                )  # fmt: skip
        live = gr.State(None)
        webcam.stream(
            live_frame,
            inputs=[webcam, detect.class_name, detect.model, detect.threshold, detect.calibrated, smoothing,
                    detect.stores, live, detect.visitor],
            outputs=[overlay, score, status, chart, live],
            stream_every=LIVE_EVERY,
            time_limit=config.live_time_limit,
            concurrency_limit=config.live_concurrency,
            concurrency_id="live",
            api_name="live_frame",
            show_progress="hidden",
        )  # fmt: skip

    with gr.Tab("Video", id="video"):
        gr.Markdown(
            "Upload a clip: every frame (or every N-th) is scored with the **Detect** tab's class, model, threshold "
            f"and references. Clips are scored up to {config.video_max_seconds} s.",
            elem_id="video-help",
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                clip = gr.Video(sources=["upload"], include_audio=True, label="Clip", elem_id="video-input")
                stride = gr.Number(value=1, minimum=1, precision=0, label="Stride: score every N-th frame")
                run = gr.Button("Detect in the clip", variant="primary", elem_id="video-button")
            with gr.Column(scale=3, min_width=420):
                summary = gr.Markdown(elem_id="video-summary")
                overlay_video = gr.Video(label="Overlay video", interactive=False, elem_id="video-overlay")
                plot = gr.LinePlot(
                    x="time", y="value", color="series", y_lim=[0, 1], x_title="time (s)", y_title="score",
                    label="Score over time, with the threshold", elem_id="video-plot", height=240,
                )  # fmt: skip
                flagged = gr.Gallery(label="Frames over the threshold", columns=4, elem_id="video-flagged")
                table = gr.Dataframe(label="Per-frame scores", interactive=False, elem_id="video-table")
                csv_file = gr.File(label="Per-frame CSV", elem_id="video-csv")
        run.click(
            detect_clip,
            inputs=[
                clip,
                detect.class_name,
                detect.model,
                detect.threshold,
                detect.calibrated,
                stride,
                detect.stores,
                detect.visitor,
            ],
            outputs=[summary, overlay_video, plot, flagged, table, csv_file],
            api_name="detect_video",
            concurrency_limit=config.concurrency,
            concurrency_id="detect",
        )
