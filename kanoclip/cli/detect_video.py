"""The video branch of ``kanoclip detect``: clips instead of images.

``kanoclip detect clip.mp4 --class bottle [--reference GOOD] [--stride N] --out OUT/`` scores every
``N``-th frame (in batches of ``--batch-size``) and writes ``OUT/<name>.overlay.mp4`` (the heat map
over each scored frame, at the clip's frame rate / N) and ``OUT/<name>.frames.csv`` (``frame, time,
score, is_anomalous, threshold``). stdout gets one line per frame as it is scored,
``CLIP<TAB>FRAME<TAB>TIME<TAB>SCORE<TAB>anomalous|normal``, or with ``--json`` one JSON object per
line and frame: ``{"image", "frame", "time", "score", "is_anomalous", "threshold"}``.

A clip that cannot be decoded or holds no frames is reported in one line and the others go on; a
clip over ``--max-seconds``, or one that breaks off, keeps the frames scored so far (printed and
written). Either way the exit status is then 1. The clips are scored by the main process alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kanoclip.errors import InputError, KAnoCLIPError
from kanoclip.video import VideoConfig, detect_video, is_video, write_frames_csv


def add_video_options(parser: argparse.ArgumentParser) -> None:
    """``--stride`` and ``--max-seconds`` (used when the inputs are video clips)."""
    defaults = VideoConfig()
    parser.add_argument(
        "--stride",
        type=int,
        default=defaults.stride,
        metavar="N",
        help=f"video clips: score every N-th frame (default {defaults.stride}: all)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=defaults.max_seconds,
        metavar="S",
        help=f"video clips: stop after S seconds of a clip, keeping what was scored (default {defaults.max_seconds:g})",
    )


def video_inputs(inputs: list[str]) -> list[Path]:
    """The inputs as video clips when they are all clips, [] when none is; a mix is an error."""
    videos = [Path(text).expanduser() for text in inputs if is_video(text)]
    if videos and len(videos) != len(inputs):
        raise InputError("give either images (and folders of images) or video clips, not both in one run")
    return videos


def video_config(args: argparse.Namespace) -> VideoConfig:
    """The :class:`VideoConfig` of the flags, its ValueError as the flags' one line."""
    try:
        return VideoConfig(stride=args.stride, batch_size=args.batch_size, max_seconds=args.max_seconds)
    except ValueError as exc:
        text = str(exc).replace("video.max_seconds", "--max-seconds").replace("video.stride", "--stride")
        raise InputError(text.replace("video.batch_size", "--batch-size")) from None


def run_videos(model: Any, class_name: str, videos: list[Path], args: argparse.Namespace) -> int:
    """Score each clip, print its frames and write its overlay and CSV; returns the exit status."""
    config = video_config(args)
    failed = 0
    names: set[str] = set()
    for path in videos:
        name, n = path.stem or "clip", 2
        while name in names:
            name, n = f"{path.stem}-{n}", n + 1
        names.add(name)

        def emit(row, clip: str = str(path)) -> None:
            if args.json:
                print(json.dumps({"image": clip, **row.as_row()}), flush=True)
            else:
                verdict = "anomalous" if row.is_anomalous else "normal"
                print(f"{clip}\t{row.frame}\t{row.time:.3f}\t{row.score:.4f}\t{verdict}", flush=True)

        overlay = args.out / f"{name}.overlay.mp4" if args.out is not None else None
        try:
            result = detect_video(
                model, path, class_name, config=config, threshold=args.threshold, overlay=overlay, on_frame=emit
            )
        except KAnoCLIPError as exc:  # this clip cannot be read (or its frames are unusable): the others go on
            print(f"kanoclip detect: error: {exc.message(flags=True)}", file=sys.stderr)
            failed = 1
            continue
        if args.out is not None:
            write_frames_csv(result.frames, args.out / f"{name}.frames.csv")
        if result.stopped:
            print(f"kanoclip detect: error: {result.stopped}", file=sys.stderr)
            failed = 1
        flagged = sum(row.is_anomalous for row in result.frames)
        written = f"; wrote {overlay} and {name}.frames.csv" if overlay is not None else ""
        print(
            f"kanoclip detect: {path.name}: {len(result.frames)} frames scored at {result.fps:g} frames/s, "
            f"{flagged} anomalous{written}",
            file=sys.stderr,
        )
    return failed
