"""The Detection result: its short repr."""

from __future__ import annotations

import numpy as np

from kanoclip.detection import Detection, Guidance


def test_repr_is_short_and_names_the_verdict() -> None:
    guidance = [
        Guidance(text=f"prompt {i}", source="llm", state="abnormal", image_similarity=0.1, region_similarity=0.2)
        for i in range(3)
    ]
    det = Detection(
        score=0.73216, threshold=0.5, anomaly_map=np.full((900, 600), 0.123456, np.float32),
        class_name="bottle", known_class=True, mode="trained", guidance=guidance,
    )  # fmt: skip
    text = repr(det)
    assert text == (
        "Detection(score=0.7322, threshold=0.5000, verdict='anomalous', class_name='bottle', mode='trained', "
        "map_shape=(900, 600), guidance=3 prompts, references=0)"
    )
    normal = Detection(
        score=0.2,
        threshold=0.5,
        anomaly_map=np.zeros((4, 4), np.float32),
        class_name="x",
        known_class=False,
        mode="training-free",
    )
    assert "verdict='normal'" in repr(normal) and "guidance=0 prompts" in repr(normal)
    assert len(repr(det)) < 200 and "0.1234" not in text  # no array contents
