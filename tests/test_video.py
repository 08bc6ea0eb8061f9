"""kanoclip.video: batches, the kept frames over the threshold, the config's checks, a missing PyAV.

On the tiny random backbone: plumbing, never accuracy.
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys

import pytest

from kanoclip.errors import VideoError
from kanoclip.video import VideoConfig, detect_video, frames_csv, require_av

from conftest import CLIP_FRAMES


@pytest.mark.parametrize(
    "field, value",
    [("stride", 0), ("batch_size", 1.5), ("max_seconds", 0), ("max_seconds", float("inf")), ("max_flagged", 0)],
)
def test_the_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=f"video.{field} must be"):
        VideoConfig(**{field: value})


def test_a_missing_pyav_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # what an environment without PyAV raises on import
    with pytest.raises(VideoError, match=r"pip install 'kanoclip\[video\]'"):
        require_av()


def test_frames_go_in_batches_and_the_best_flagged_frames_are_kept(tiny_model, bottle_clip):
    clip, _ = bottle_clip
    calls, seen = [], []

    @contextlib.contextmanager
    def guard():
        calls.append(len(seen))  # how many frames were scored before this batch
        yield

    config = VideoConfig(batch_size=5, max_flagged=3)
    result = detect_video(tiny_model, clip, "bottle", config=config, threshold=0.0, on_frame=seen.append, guard=guard)
    assert calls == [0, 5, 10, 15, 20]  # 24 frames in batches of 5
    assert seen == result.frames and len(seen) == CLIP_FRAMES
    assert result.overlay is None and result.stopped is None
    best = sorted(result.frames, key=lambda r: r.score, reverse=True)[:3]  # threshold 0: every frame is over it
    assert [row for row, _ in result.flagged] == sorted(best, key=lambda r: r.frame)
    assert all(picture.size[1] == 450 for _, picture in result.flagged)  # the overlay at the frame's height

    table = list(csv.reader(io.StringIO(frames_csv(result.frames))))
    assert table[0] == ["frame", "time", "score", "is_anomalous", "threshold"]
    assert [row[3] for row in table[1:]] == ["True"] * CLIP_FRAMES
