"""The result of :meth:`kanoclip.KAnoCLIP.detect`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from kanoclip.errors import InputError
from kanoclip.modeling.maps import upsample


@dataclass(frozen=True)
class Guidance:
    """A text prompt that guided a result, with its cosine similarity to the image.

    ``source`` is where the text came from: a knowledge-base description's own source (``"llm"``,
    ``"vqa"``, ``"builtin"`` and ``"manual"`` written by hand, ``"generic"`` for an unknown class;
    see :mod:`kanoclip.knowledge.base`), ``"learned"`` for the learned prompts (their K context
    slots shown as ``X``) or ``"template"`` for the training-free normal prompts. ``image_similarity`` is against
    the image's global feature; ``region_similarity`` against the mean patch feature of the
    region the anomaly map marks (the whole image when nothing is marked).
    """

    text: str
    source: Literal["llm", "vqa", "builtin", "manual", "generic", "learned", "template"]
    state: Literal["normal", "abnormal"]
    image_similarity: float
    region_similarity: float


@dataclass
class Detection:
    """One image's anomaly detection.

    ``anomaly_map`` (eq. 10) is a float32 array of the input image's (H, W) in [0, 1].
    ``stage_maps`` (the per-stage anomaly probabilities ``M_i^a``), ``normal_map`` and
    ``abnormal_map`` (``M^n`` and ``M^a`` of eq. 9) are too; they are kept on the patch grid
    (h × w, where the model computes them) and upsampled bilinearly to (H, W) on first access,
    so callers that only need the score and the map pay neither for them nor for their copies.
    """

    score: float
    threshold: float
    anomaly_map: np.ndarray
    class_name: str
    known_class: bool
    mode: Literal["training-free", "trained"]
    guidance: list[Guidance] = field(default_factory=list)
    image: str = ""
    # [M^n, M^a, M_1^a .. M_n^a] on the patch grid, (2 + n_stages, h, w)
    model_maps: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1), np.float32), repr=False)
    reference_map: np.ndarray | None = None  # (H, W) in [0, 1], the references' own map; None without references
    reference_count: int = 0  # k normal references of this class that took part
    threshold_note: str = ""  # where the threshold comes from: default, or calibrated on what

    @property
    def is_anomalous(self) -> bool:
        return self.score >= self.threshold

    def __repr__(self) -> str:
        # the dataclass repr would print every array element; this is what a reader looks for
        verdict = "anomalous" if self.is_anomalous else "normal"
        return (
            f"Detection(score={self.score:.4f}, threshold={self.threshold:.4f}, verdict={verdict!r}, "
            f"class_name={self.class_name!r}, mode={self.mode!r}, map_shape={tuple(self.anomaly_map.shape)}, "
            f"guidance={len(self.guidance)} prompts, references={self.reference_count})"
        )

    @cached_property
    def _full_maps(self) -> np.ndarray:
        return upsample_maps(self.model_maps, self.anomaly_map.shape)

    @property
    def normal_map(self) -> np.ndarray:
        return self._full_maps[0]

    @property
    def abnormal_map(self) -> np.ndarray:
        return self._full_maps[1]

    @property
    def stage_maps(self) -> list[np.ndarray]:
        return list(self._full_maps[2:])


def upsample_maps(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) maps -> (n, H, W) float32 in [0, 1], bilinear."""
    tensor = torch.as_tensor(maps, dtype=torch.float32)
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = upsample(tensor[None], tuple(size))[0]
    return tensor.clamp_(0.0, 1.0).numpy()


def class_per_image(images: Sequence[object], class_names: Sequence[str] | str) -> list[str]:
    """One class name per image: ``class_names`` as given, or one name repeated for every image.

    Raises:
        InputError: a list of class names whose length is not the number of images.
    """
    if isinstance(class_names, str):
        return [class_names] * len(images)
    if len(class_names) != len(images):
        raise InputError(
            f"got {len(images)} images but {len(class_names)} class names; pass one class name or one per image"
        )
    return list(class_names)
