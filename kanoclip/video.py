"""Recorded video: score a clip's frames in batches and write an overlay video and a per-frame CSV.

A clip is decoded with PyAV (the ``video`` extra: ``pip install 'kanoclip[video]'``), every
``stride``-th frame is kept, the kept frames go through :meth:`kanoclip.KAnoCLIP.detect_batch`
``batch_size`` at a time (with the caller's class, threshold and references), and each scored
frame gives one :class:`FrameScore`. Optionally the heat map over each kept frame (with its colour
bar) is encoded into an overlay video at the clip's frame rate divided by the stride: H.264 in
MP4 where the PyAV build has an H.264 encoder (every browser plays it), else VP9, else MPEG-4 Part 2.

Bad input: a clip that cannot be opened or decoded, or that holds no video frames, raises
:class:`~kanoclip.errors.VideoError` before any frame is scored. A clip longer than
:attr:`VideoConfig.max_seconds`, or one that breaks off mid-stream, is scored up to that point: the
frames decoded so far are kept (scored, written to the overlay) and :attr:`VideoResult.stopped`
says why it ended early. Times are seconds from the clip's first frame.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from kanoclip.errors import VideoError
from kanoclip.fileio import atomic_write_text

if TYPE_CHECKING:
    from kanoclip.detection import Detection
    from kanoclip.detector import KAnoCLIP
    from kanoclip.knowledge import KnowledgeBase
    from kanoclip.references import References

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ogv")
INSTALL_HINT = "pip install 'kanoclip[video]'"
# Encoders tried in order: H.264 plays in every browser; VP9 in MP4 in all current ones; MPEG-4
# Part 2 only in desktop players (the last resort of a PyAV build without the other two).
ENCODERS = ("libx264", "h264", "libopenh264", "libvpx-vp9", "mpeg4")
CSV_COLUMNS = ("frame", "time", "score", "is_anomalous", "threshold")
NO_FRAMES = "holds no frames (zero length); give a clip with at least one frame"
DEFAULT_FPS = 25.0  # for a stream that states no frame rate


@dataclass(frozen=True)
class VideoConfig:
    """How a clip is read and scored.

    Args:
        stride: score every ``stride``-th decoded frame (1: all of them).
        batch_size: frames per :meth:`~kanoclip.KAnoCLIP.detect_batch` call.
        max_seconds: clip time after which decoding stops (the frames before it are kept); it
            bounds the work one clip can cause.
        max_flagged: at most this many frames over the threshold keep their overlay picture
            (the highest-scoring ones), so a long anomalous clip cannot fill the memory.
        crf: the overlay's quality for H.264 / VP9 (lower: better and larger).
    """

    stride: int = 1
    batch_size: int = 8
    max_seconds: float = 600.0
    max_flagged: int = 32
    crf: int = 23

    def __post_init__(self) -> None:
        for name in ("stride", "batch_size", "max_flagged"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"video.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_seconds, (int, float)) or not 0 < self.max_seconds < float("inf"):
            raise ValueError(f"video.max_seconds must be a positive number of seconds, got {self.max_seconds!r}")
        if not isinstance(self.crf, int) or not 0 <= self.crf <= 51:
            raise ValueError(f"video.crf must be an integer in [0, 51], got {self.crf!r}")


@dataclass(frozen=True)
class FrameScore:
    """One scored frame: its index among the clip's decoded frames, its time (s) and its verdict."""

    frame: int
    time: float
    score: float
    is_anomalous: bool
    threshold: float

    def as_row(self) -> dict[str, Any]:
        """The frame as a JSON / table row (the CSV's columns)."""
        return {
            "frame": self.frame,
            "time": round(self.time, 6),
            "score": self.score,
            "is_anomalous": self.is_anomalous,
            "threshold": self.threshold,
        }


@dataclass
class VideoResult:
    """A clip's scored frames, in order.

    ``flagged``: (frame, its overlay) for up to :attr:`VideoConfig.max_flagged` frames over the
    threshold, the highest-scoring ones, in time order. ``stopped``: why scoring ended before the
    clip did (length limit, a broken stream), or None.
    """

    frames: list[FrameScore]
    source_fps: float
    fps: float  # the overlay's frame rate: source_fps / stride
    overlay: Path | None = None
    codec: str | None = None
    flagged: list[tuple[FrameScore, Image.Image]] = field(default_factory=list)
    stopped: str | None = None


def is_video(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a video clip by its extension (:data:`VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def require_av() -> Any:
    """The ``av`` module, or :class:`VideoError` naming the extra that installs it."""
    try:
        import av
    except ImportError:
        raise VideoError(f"video needs PyAV, which is not installed; {INSTALL_HINT}") from None
    return av


def pick_encoder(av: Any | None = None) -> str:
    """The first of :data:`ENCODERS` this PyAV build has."""
    av = av or require_av()
    for name in ENCODERS:
        if name in av.codecs_available:
            with contextlib.suppress(Exception):  # listed but unusable (e.g. a decoder-only "h264")
                av.CodecContext.create(name, "w")
                return name
    raise VideoError(f"this PyAV build has none of the video encoders {', '.join(ENCODERS)}; {INSTALL_HINT}")


@dataclass
class DecodedFrame:
    """A kept frame: its index among the decoded frames, its time from the first frame (s), its pixels."""

    index: int
    time: float
    image: Image.Image


class _Decoder:
    """The kept frames of one clip; ``stopped`` is set when decoding ends before the clip does."""

    def __init__(self, source: str | os.PathLike[str], config: VideoConfig) -> None:
        self.av = require_av()
        self.name = Path(source).name
        self.config = config
        self.stopped: str | None = None
        try:
            self.container = self.av.open(str(source))
        except FileNotFoundError:
            raise VideoError(f"video {source} does not exist; check the path") from None
        except self.av.error.EOFError:  # a header and nothing after it
            raise VideoError(f"video {self.name} {NO_FRAMES}") from None
        except (self.av.FFmpegError, OSError) as exc:
            why = _reason(exc)
            raise VideoError(f"video {self.name} cannot be decoded ({why}); give an MP4, MKV or WebM clip") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"video {self.name} holds no video stream; give a clip with moving pictures")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else DEFAULT_FPS

    def frames(self) -> Iterator[DecodedFrame]:
        limit, stride = self.config.max_seconds, self.config.stride
        start: float | None = None
        index = -1
        try:
            for frame in self.container.decode(self.stream):
                index += 1
                stamp = frame.time if frame.time is not None else index / self.fps
                start = stamp if start is None else start
                if stamp - start > limit:
                    self.stopped = (
                        f"video {self.name} is longer than the limit of {limit:g} s; "
                        f"the first {limit:g} s ({index} frames) were scored"
                    )
                    return
                if index % stride == 0:
                    yield DecodedFrame(index, stamp - start, frame.to_image())
        except self.av.error.EOFError:
            pass  # a stream that ends early without a proper end (e.g. a clip with no frames at all)
        except self.av.FFmpegError as exc:
            if index <= 0:
                why = _reason(exc)
                raise VideoError(f"video {self.name} cannot be decoded ({why}); the file may be damaged") from None
            self.stopped = (
                f"video {self.name} breaks off after frame {index - 1} ({_reason(exc)}); the frames before were scored"
            )
        if index < 0:
            raise VideoError(f"video {self.name} {NO_FRAMES}")

    def close(self) -> None:
        self.container.close()


class OverlayWriter:
    """Encodes RGB pictures of one size (padded to even sides, as 4:2:0 video needs) into a clip."""

    def __init__(self, path: str | os.PathLike[str], fps: float, *, crf: int = 23, encoder: str | None = None) -> None:
        self.av = require_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.codec = encoder or pick_encoder(self.av)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.container = self.av.open(str(self.path), "w", options={"movflags": "faststart"})
        self.stream: Any = None
        self.count = 0

    def write(self, picture: Image.Image) -> None:
        if self.stream is None:
            self.stream = self.container.add_stream(self.codec, rate=self.fps)
            self.stream.width, self.stream.height = _even(picture.width), _even(picture.height)
            self.stream.pix_fmt = "yuv420p"
            if self.codec != "mpeg4":
                self.stream.options = {"crf": str(self.crf), **({"preset": "veryfast"} if "264" in self.codec else {})}
        size = (self.stream.width, self.stream.height)
        if picture.size != size:  # padded with white, like the colour bar's margin
            canvas = Image.new("RGB", size, "white")
            canvas.paste(picture, (0, 0))
            picture = canvas
        frame = self.av.VideoFrame.from_image(picture.convert("RGB"))
        self.container.mux(self.stream.encode(frame))
        self.count += 1

    def close(self) -> None:
        if self.stream is not None:
            self.container.mux(self.stream.encode(None))  # flush the encoder's delayed frames
        self.container.close()


def detect_video(
    model: KAnoCLIP,
    source: str | os.PathLike[str],
    class_name: str,
    *,
    config: VideoConfig | None = None,
    threshold: float | None = None,
    sigma: float | None = None,
    references: References | None = None,
    knowledge: KnowledgeBase | None = None,
    overlay: str | os.PathLike[str] | None = None,
    on_frame: Callable[[FrameScore], None] | None = None,
    guard: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> VideoResult:
    """Score the frames of a clip of ``class_name`` (see the module's docstring).

    Args:
        model: the detector.
        source: the clip's path.
        class_name: what the clip shows.
        config: stride, batch size and limits (default :class:`VideoConfig`).
        threshold, sigma, references, knowledge: as for :meth:`~kanoclip.KAnoCLIP.detect_batch`
            (``knowledge``: the knowledge base of this call only, default the model's).
        overlay: write the overlay video here (None: no video).
        on_frame: called with each frame's score as soon as its batch is scored.
        guard: a context manager factory held around each batch's model call (the app passes
            its compute slot); None: nothing.

    Returns:
        The :class:`VideoResult` (with ``stopped`` set when the clip was cut short).

    Raises:
        VideoError: PyAV is missing, or the clip cannot be opened, decoded, or holds no frames.
    """
    from kanoclip.viz import overlay_with_colorbar  # matplotlib: loaded on use, not with the CLI

    config = config or VideoConfig()
    decoder = _Decoder(source, config)
    writer = OverlayWriter(overlay, decoder.fps / config.stride, crf=config.crf) if overlay is not None else None
    frames: list[FrameScore] = []
    flagged: list[tuple[float, int, Image.Image]] = []  # a min-heap of (score, frame, overlay)
    guard = guard or contextlib.nullcontext

    def score(batch: Sequence[DecodedFrame]) -> None:
        with guard():
            detections: list[Detection] = model.detect_batch(
                [f.image for f in batch],
                class_name,
                threshold=threshold,
                sigma=sigma,
                references=references,
                knowledge=knowledge,
            )
        for decoded, det in zip(batch, detections):
            row = FrameScore(decoded.index, decoded.time, det.score, det.is_anomalous, det.threshold)
            frames.append(row)
            picture = overlay_with_colorbar(decoded.image, det.anomaly_map) if writer or row.is_anomalous else None
            if writer is not None:
                writer.write(picture)
            if row.is_anomalous:
                entry = (row.score, row.frame, picture)
                if len(flagged) < config.max_flagged:
                    heapq.heappush(flagged, entry)
                else:
                    heapq.heappushpop(flagged, entry)
            if on_frame is not None:
                on_frame(row)

    try:
        batch: list[DecodedFrame] = []
        for decoded in decoder.frames():
            batch.append(decoded)
            if len(batch) == config.batch_size:
                score(batch)
                batch = []
        if batch:
            score(batch)
    finally:
        decoder.close()
        if writer is not None:
            writer.close()
    by_frame = {row.frame: row for row in frames}
    return VideoResult(
        frames=frames,
        source_fps=decoder.fps,
        fps=decoder.fps / config.stride,
        overlay=writer.path if writer is not None else None,
        codec=writer.codec if writer is not None else None,
        flagged=[(by_frame[index], picture) for _, index, picture in sorted(flagged, key=lambda e: e[1])],
        stopped=decoder.stopped,
    )


def frames_csv(frames: Sequence[FrameScore]) -> str:
    """The per-frame table as CSV text: ``frame, time, score, is_anomalous, threshold``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in frames:
        writer.writerow([row.frame, f"{row.time:.6f}", f"{row.score:.6f}", row.is_anomalous, f"{row.threshold:.6f}"])
    return buffer.getvalue()


def write_frames_csv(frames: Sequence[FrameScore], path: str | os.PathLike[str]) -> Path:
    """Write :func:`frames_csv` to ``path`` (atomically); returns the path."""
    return atomic_write_text(path, frames_csv(frames))


def _even(n: int) -> int:
    return n + (n % 2)


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())[:120] or type(exc).__name__
