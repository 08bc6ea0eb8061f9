"""The Live and Video tabs: the video endpoint over HTTP (gradio_client) and the live helpers.

The app runs in-process on 127.0.0.1 with the tiny random CLIP: plumbing, never accuracy.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_app import add_references, app_config, error_text, launch  # noqa: E402

from demo.live_tab import STREAM_GAP, LiveSession, OutputFolders  # noqa: E402
from kanoclip.references import References  # noqa: E402
from kanoclip.video import VideoConfig, detect_video  # noqa: E402

from conftest import CLIP_PAINTED  # noqa: E402


@pytest.fixture(scope="module")
def app(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory):
    running = launch(app_config(tmp_path_factory.mktemp("video-app"), tiny_backbone, video_max_seconds=2))
    yield running
    running.demo.close()


def test_the_video_endpoint_returns_the_table_the_overlay_and_the_flagged_frames(app, tiny_model, bottle_clip):
    clip, good = bottle_clip
    client: Client = app.client()  # a session of its own: its references serve its video
    add_references(client, sorted(good.glob("*.png")))
    summary, overlay, plot, gallery, table, csv_path = client.predict(
        handle_file(str(clip)), "bottle", api_name="/detect_video"
    )
    store = References(tiny_model.reference_fingerprint())
    tiny_model.add_references("bottle", sorted(good.glob("*.png")), store=store)
    direct = detect_video(tiny_model, clip, "bottle", references=store, config=VideoConfig(max_seconds=2))
    kept = len(direct.frames)
    assert kept == 17  # frames at 0 .. 2 s of the 8 frames/s clip; the rest is over the app's limit

    assert table["headers"] == ["frame", "time", "score", "is_anomalous", "threshold"]
    rows = table["data"]
    assert [row[0] for row in rows] == list(range(kept))
    np.testing.assert_allclose([row[2] for row in rows], [r.score for r in direct.frames], atol=1e-5)
    scores = np.array([row[2] for row in rows])
    painted = np.isin(np.arange(kept), list(CLIP_PAINTED))
    assert scores[painted].mean() > scores[~painted].mean()
    with av.open(overlay) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in container.decode(video=0)) == kept
    assert len(Path(csv_path).read_text().splitlines()) == kept + 1
    over = [row for row in direct.frames if row.is_anomalous]
    assert [item["caption"].split(" · ")[0] for item in gallery] == [f"frame {row.frame}" for row in over]
    assert f"{kept} frames scored" in summary and f"{len(over)} over the threshold" in summary
    assert "longer than the limit of 2 s" in summary
    points = {series: [value for _, value, s in plot["data"] if s == series] for series in ("score", "threshold")}
    np.testing.assert_allclose(points["score"], scores, atol=1e-6)
    np.testing.assert_allclose(points["threshold"], [r.threshold for r in direct.frames], atol=1e-6)


def test_the_video_endpoint_refuses_bad_input_in_one_line(app, tmp_path, bottle_clip):
    client: Client = app.client()
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(AppError) as excinfo:
        client.predict(handle_file(str(text)), "bottle", api_name="/detect_video")
    assert "notes.mp4 cannot be decoded" in error_text(excinfo)
    with pytest.raises(AppError) as excinfo:
        client.predict(handle_file(str(bottle_clip[0])), "", api_name="/detect_video")
    assert "class name is empty" in error_text(excinfo)


def test_the_live_session_averages_measures_its_rate_and_restarts_after_a_gap():
    live = LiveSession(window=3)
    assert live.record(0.2, 0.5, 0.0, now=10.0) == 0.2
    assert live.record(0.6, 0.5, 0.5, now=10.5) == pytest.approx(0.5 * 0.2 + 0.5 * 0.6)
    live.record(0.6, 0.5, 0.5, now=11.0)
    live.record(0.6, 0.5, 0.5, now=11.5)
    assert live.rate() == pytest.approx(3 / 1.5)  # 4 frames in 1.5 s
    chart = live.chart(smoothing=True)
    assert sorted(set(chart["frame"])) == [2, 3, 4]  # the window keeps the last 3
    assert set(chart["series"]) == {"score", "smoothed", "threshold"}
    assert live.record(0.9, 0.5, 0.5, now=11.5 + STREAM_GAP + 1) == 0.9  # a new stream starts afresh
    assert live.count == 1 and live.rate() is None


def test_output_folders_keep_only_the_newest(tmp_path):
    folders = OutputFolders(keep=2)
    made = [folders.new() for _ in range(3)]
    assert [p.is_dir() for p in made] == [False, True, True]
