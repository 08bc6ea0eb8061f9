"""k-shot normal references and calibrated thresholds (beyond the paper, after WinCLIP+).

A user's few good images of a class become a **memory bank**: their CLIP-VV stage patch features
(the detection mode's own V-V path), L2-normalised, kept in fp16 on the model's device.

* **Reference map.** Per stage, each test patch's ``1 − max_j cos(f, bank_j)`` (its nearest
  reference patch over all references' patches), clamped to [0, 1]; the stages combined with the
  mode's stage weights (eq. 9's, so stages of weight 0 are not searched), upsampled to S×S and
  smoothed with eq. 10's ``G_σ``. An image used as its own reference maps to 0 everywhere.
* **Fusion** (:class:`~kanoclip.config.ReferenceConfig`): ``M = (1 − λ)·M_model + λ·M_ref`` and
  ``score = (1 − λ)·score_model + λ·max(M_ref)``, with λ = ``references.weight`` = 0.5, WinCLIP+'s
  mean of its zero-shot and few-shot maps (Jeong et al., CVPR 2023: 93.1 image / 95.2 pixel AUROC
  1-shot on MVTec-AD against 91.8 / 85.1 zero-shot).
* **Calibration.** A class's threshold is stored with its references:
  - from the references themselves (k ≥ 2): each is scored leave-one-out against the others, and
    the threshold is the largest such score plus ``references.margin`` (0.02): every reference
    would then be called normal, with a small margin for new good images. k = 1 leaves the
    default threshold (``scoring.threshold``) in force: one image cannot be scored against others.
  - :meth:`kanoclip.KAnoCLIP.calibrate` on labelled images: the F1-max threshold (as anomalib's
    adaptive threshold); on unlabelled images (all taken as normal): their largest score plus the
    margin.

The search is chunked over the bank (``references.chunk`` rows at a time) so that memory stays
flat: a chunk's similarity matrix is ``(B·L, chunk)`` floats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kanoclip.errors import CheckpointError, InputError
from kanoclip.fileio import atomic_write_json
from kanoclip.modeling.maps import gaussian_blur, upsample

FORMAT = "kanoclip-references"
FORMAT_VERSION = 1
INDEX_NAME = "references.json"
TENSORS_NAME = "references.safetensors"


@dataclass
class ReferenceSet:
    """One class's normal references and threshold.

    ``bank`` holds one ``(k·L, C)`` fp16 tensor of normalised patch features per stage (empty when
    only a threshold was calibrated, ``count == 0``), reference by reference. ``threshold`` is None
    while the default is in force; ``calibration`` says how it was set.
    """

    class_name: str
    bank: list[torch.Tensor]
    image_names: list[str]
    threshold: float | None = None
    calibration: str = "default"
    grid: tuple[int, int] = (0, 0)  # each reference's patch grid (h, w): h·w bank rows per image
    model_scores: list[float] = field(default_factory=list)  # each reference's own score without references

    @property
    def count(self) -> int:
        """k, the number of reference images."""
        return len(self.image_names)

    @property
    def calibrated(self) -> bool:
        return self.threshold is not None

    def describe(self, default_threshold: float) -> str:
        """One line for a verdict: the threshold and where it comes from."""
        if self.threshold is None:
            return f"default threshold {default_threshold:.3f} (not calibrated)"
        return f"threshold {self.threshold:.3f}, calibrated {self.calibration}"


@dataclass
class References:
    """Every class's :class:`ReferenceSet`: the model's own, or one per app session.

    Fingerprint: the features depend on the backbone, the input size and the mode's V-V path, so
    a saved set records them and loads only into a model with the same ones.
    """

    fingerprint: dict[str, Any]
    sets: dict[str, ReferenceSet] = field(default_factory=dict)

    def get(self, class_name: str) -> ReferenceSet | None:
        return self.sets.get(class_name)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``references.json`` and ``references.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        out = Path(folder).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        classes = []
        for i, (name, refs) in enumerate(self.sets.items()):
            for j, stage in enumerate(refs.bank):
                tensors[f"class{i}.stage{j}"] = stage.detach().to("cpu", torch.float16).contiguous()
            classes.append({
                "class": name, "image_names": refs.image_names, "threshold": refs.threshold,
                "calibration": refs.calibration, "stages": len(refs.bank), "grid": list(refs.grid),
                "model_scores": refs.model_scores,
            })  # fmt: skip
        tmp = out / (TENSORS_NAME + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out / TENSORS_NAME)
        atomic_write_json(
            out / INDEX_NAME,
            {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": self.fingerprint, "classes": classes},
        )
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, fingerprint: dict[str, Any], device: torch.device) -> References:
        """Read a saved set; refused, in one line, when it was built for another model."""
        from safetensors.torch import load_file

        path = Path(folder).expanduser()
        index_path = path / INDEX_NAME
        if not index_path.is_file() or not (path / TENSORS_NAME).is_file():
            raise CheckpointError(
                f"{path} holds no saved references (expected {INDEX_NAME} and {TENSORS_NAME}); "
                "build them with add_references or `kanoclip references build`"
            )
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            tensors = load_file(str(path / TENSORS_NAME), device=str(device))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: the saved references cannot be read ({exc})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{index_path} is not a kanoclip references index (format {FORMAT} version {FORMAT_VERSION})"
            )
        if index.get("fingerprint") != fingerprint:
            saved = index.get("fingerprint")
            raise CheckpointError(
                f"{path} was built for another model ({saved}); this model is {fingerprint}: "
                "build the references again with it"
            )
        refs = cls(fingerprint=fingerprint)
        for i, entry in enumerate(index["classes"]):
            bank = [tensors[f"class{i}.stage{j}"] for j in range(entry["stages"])]
            refs.sets[entry["class"]] = ReferenceSet(
                entry["class"], bank, list(entry["image_names"]), entry["threshold"], entry["calibration"],
                tuple(entry["grid"]), list(entry["model_scores"]),
            )  # fmt: skip
        return refs


def bank_from_stages(stages: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``n_stages x (k, L, C)`` patch features -> ``n_stages x (k·L, C)`` normalised fp16 banks."""
    return [F.normalize(s.float(), dim=-1).flatten(0, 1).half() for s in stages]


def nearest_distance(
    patches: torch.Tensor, bank: torch.Tensor, chunk: int, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 − max_j cos(patch, bank_j)`` for every patch, clamped to [0, 1]: ``(B, L, C) -> (B, L)``.

    Args:
        patches: test patch features (any norm).
        bank: ``(N, C)`` normalised fp16 reference patches.
        chunk: bank rows compared at a time.
        exclude: optional ``(B, N)`` bool, bank rows each image may not match (leave-one-out).

    Returns:
        ``(B, L)`` float32 distances.
    """
    b, length, _ = patches.shape
    queries = F.normalize(patches.float(), dim=-1)  # (B, L, C)
    best = torch.full((b, length), -1.0, device=patches.device)
    for start in range(0, bank.shape[0], chunk):
        # normalised again in fp32: fp16 storage moves a unit vector's norm by ~1e-3, which would
        # shift cosines (and an image's distance to itself) by as much
        block = F.normalize(bank[start : start + chunk].float(), dim=-1)  # (n, C)
        sims = queries @ block.T  # (B, L, n)
        if exclude is not None:
            sims = sims.masked_fill(exclude[:, None, start : start + chunk], -1.0)
        best = torch.maximum(best, sims.amax(dim=-1))
    return (1.0 - best).clamp(0.0, 1.0)


def reference_maps(
    stages: Sequence[torch.Tensor],
    bank: Sequence[torch.Tensor],
    weights: Sequence[float],
    grid: tuple[int, int],
    size: int,
    sigma: float,
    *,
    chunk: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference map of a batch: ``(B, S, S)`` in [0, 1] (see the module docstring).

    ``stages``: n x (B, L, C) test features; ``bank``: n x (N, C); ``weights``: n numbers summing to 1.
    """
    b = stages[0].shape[0]
    grid_map = stages[0].new_zeros(b, grid[0] * grid[1], dtype=torch.float32)
    for weight, patches, stage_bank in zip(weights, stages, bank):
        if weight > 0:
            grid_map = grid_map + weight * nearest_distance(patches, stage_bank, chunk, exclude)
    up = upsample(grid_map.view(b, 1, *grid), (size, size))[:, 0]  # (B, S, S)
    return gaussian_blur(up, sigma).clamp(0.0, 1.0)


def fuse(model_value: torch.Tensor, reference_value: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 − λ)·model + λ·reference``: WinCLIP+'s mean at λ = 0.5."""
    return (1.0 - weight) * model_value + weight * reference_value


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold of the largest F1 (predict anomalous when ``score >= threshold``).

    Over the thresholds that change a decision (each distinct score), as anomalib's adaptive
    threshold; ties in F1 go to the lowest such threshold.
    """
    from sklearn.metrics import precision_recall_curve

    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise InputError("calibrating with labels needs both normal (0) and anomalous (1) images")
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)[:-1]
    return float(thresholds[int(np.argmax(f1))])
