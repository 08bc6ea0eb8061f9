"""``kanoclip detect CLIP``: per-frame JSON lines, the overlay video, the frames CSV, and bad clips.

On the tiny random backbone with 3 good references: plumbing (the painted frames score higher
than the clean ones because the reference map marks the square), never accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np

from kanoclip.cli import main

from conftest import CLIP_FPS, CLIP_FRAMES, CLIP_PAINTED


def _detect(capsys, tiny_backbone, *args: str) -> tuple[int, str, str]:
    code = main(["detect", *args, "--class", "bottle", "--backbone", str(tiny_backbone), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _decoded_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_clip_gives_one_row_per_frame_an_overlay_video_and_a_csv(capsys, tiny_backbone, bottle_clip, tmp_path):
    clip, good = bottle_clip
    out = tmp_path / "out"
    code, stdout, _ = _detect(capsys, tiny_backbone, str(clip), "--reference", str(good), "--out", str(out), "--json")
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["frame"] for r in rows] == list(range(CLIP_FRAMES))
    assert {r["image"] for r in rows} == {str(clip)}
    np.testing.assert_allclose([r["time"] for r in rows], np.arange(CLIP_FRAMES) / CLIP_FPS, atol=1e-3)
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0 and r["is_anomalous"] == (r["score"] >= r["threshold"])
    scores = np.array([r["score"] for r in rows])
    painted = np.isin(np.arange(CLIP_FRAMES), list(CLIP_PAINTED))
    assert scores[painted].mean() > scores[~painted].mean()

    table = _csv_rows(out / "clip.frames.csv")
    assert list(table[0]) == ["frame", "time", "score", "is_anomalous", "threshold"]
    assert [int(r["frame"]) for r in table] == list(range(CLIP_FRAMES))
    np.testing.assert_allclose([float(r["score"]) for r in table], scores, atol=1e-6)
    assert _decoded_frames(out / "clip.overlay.mp4") == CLIP_FRAMES
    with av.open(str(out / "clip.overlay.mp4")) as container:  # H.264 plays in every browser
        assert container.streams.video[0].codec_context.name == "h264"


def test_a_stride_scores_every_nth_frame_at_the_reduced_rate(capsys, tiny_backbone, bottle_clip, tmp_path):
    clip, _ = bottle_clip
    code, stdout, _ = _detect(capsys, tiny_backbone, str(clip), "--stride", "5", "--out", str(tmp_path))
    assert code == 0
    assert [int(line.split("\t")[1]) for line in stdout.splitlines()] == [0, 5, 10, 15, 20]
    with av.open(str(tmp_path / "clip.overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == CLIP_FPS / 5
        assert sum(1 for _ in container.decode(stream)) == 5


def test_a_clip_over_the_limit_keeps_the_frames_before_it(capsys, tiny_backbone, bottle_clip, tmp_path):
    clip, _ = bottle_clip
    code, stdout, err = _detect(capsys, tiny_backbone, str(clip), "--max-seconds", "1", "--out", str(tmp_path))
    kept = [i for i in range(CLIP_FRAMES) if i / CLIP_FPS <= 1.0]
    assert code == 1
    assert "longer than the limit of 1 s" in err and "Traceback" not in err
    assert [int(line.split("\t")[1]) for line in stdout.splitlines()] == kept
    assert [int(r["frame"]) for r in _csv_rows(tmp_path / "clip.frames.csv")] == kept
    assert _decoded_frames(tmp_path / "clip.overlay.mp4") == len(kept)


def test_bad_clips_get_one_line_each_and_the_others_go_on(capsys, tiny_backbone, bottle_clip, tmp_path):
    clip, _ = bottle_clip
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    empty = tmp_path / "empty.mkv"
    container = av.open(str(empty), "w")
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()  # a header, no frames
    container.close()
    code, stdout, err = _detect(capsys, tiny_backbone, str(text), str(empty), str(clip))
    assert code == 1
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "Traceback" not in err
    assert "notes.mp4 cannot be decoded" in errors[0]
    assert "empty.mkv holds no frames" in errors[1]
    assert len(stdout.splitlines()) == CLIP_FRAMES  # the good clip after them was scored


def test_images_and_clips_in_one_run_are_refused(capsys, tiny_backbone, bottle_clip, bottle_image):
    code, _, err = _detect(capsys, tiny_backbone, str(bottle_clip[0]), str(bottle_image))
    assert code == 2 and "either images" in err and "not both" in err


def test_a_bad_stride_names_the_flag(capsys, tiny_backbone, bottle_clip):
    code, _, err = _detect(capsys, tiny_backbone, str(bottle_clip[0]), "--stride", "0")
    assert code == 2 and "--stride must be an integer >= 1" in err
