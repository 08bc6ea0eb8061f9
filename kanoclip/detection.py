"""The result of :meth:`kanoclip.KAnoCLIP.detect`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Guidance:
    """A text prompt that guided a result, with its cosine similarity to the image.

    ``source`` is ``"llm"`` or ``"vqa"`` for knowledge-base descriptions and ``"learned"`` for
    the learned prompts (their K context slots shown as ``X``). ``image_similarity`` is against
    the image's global feature; ``region_similarity`` against the mean patch feature of the
    region the anomaly map marks (the whole image when nothing is marked).
    """

    text: str
    source: Literal["llm", "vqa", "learned", "template"]
    state: Literal["normal", "abnormal"]
    image_similarity: float
    region_similarity: float


@dataclass
class Detection:
    """One image's anomaly detection.

    ``anomaly_map`` (eq. 10) and the other maps are float32 arrays of the input image's
    (H, W) in [0, 1]. ``stage_maps`` are the per-stage anomaly probabilities ``M_i^a``;
    ``normal_map`` and ``abnormal_map`` are ``M^n`` and ``M^a`` of eq. 9.
    """

    score: float
    threshold: float
    anomaly_map: np.ndarray
    stage_maps: list[np.ndarray]
    normal_map: np.ndarray
    abnormal_map: np.ndarray
    class_name: str
    known_class: bool
    mode: Literal["training-free", "trained"]
    guidance: list[Guidance] = field(default_factory=list)
    image: str = ""

    @property
    def is_anomalous(self) -> bool:
        return self.score >= self.threshold

    def to_dict(self) -> dict:
        """A JSON-ready summary (without the maps)."""
        return {
            "image": self.image,
            "class": self.class_name,
            "score": self.score,
            "threshold": self.threshold,
            "is_anomalous": self.is_anomalous,
            "mode": self.mode,
        }
