"""k-shot normal references and calibrated thresholds (beyond the paper, after WinCLIP+).

Every piece of reference state, and what invalidates it, is in this file.

A user's few good images of a class become a **memory bank**: their CLIP-VV stage patch features
(the detection mode's own V-V path, projected, fp16) and their image-level features, on the
model's device. The backbone is frozen, so these features depend only on what the
:func:`identity <References>` records (backbone, input size, V-V path, stages kept, image token,
precision); a saved set loads only into a model with the same identity, and the refusal names
what differs.

* **Reference map.** Per stage, each test patch's ``1 − max_j cos(f, bank_j)`` (its nearest
  reference patch over all references' patches), clamped to [0, 1]; the stages combined with the
  mode's stage weights (eq. 9's, so stages of weight 0 are not searched, and a training-free set
  keeps only the stages of non-zero weight), upsampled to S×S and smoothed with eq. 10's ``G_σ``.
  An image used as its own reference maps to 0 everywhere. Everything after the backbone runs in
  fp32, also under a caller's autocast.
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

**Provenance.** Each set records the *scoring fingerprint* its derived values were computed
with (:class:`Scoring`: the trained weights' digest, the class's text features — so the knowledge
base's descriptions —, the stage weights, σ, τ, ``references.weight`` and ``margin``, the head's
config sections). When the model that serves the set has another fingerprint (a checkpoint
loaded, trained weights loaded, ``set_knowledge``, another config, another model loading a saved
set), the set is brought up to
date before it is used (:meth:`References.serving`): each reference's own score and the
leave-one-out threshold are recomputed from the kept features; a threshold from ``calibrate``
cannot be (its images are not kept), so it is dropped and the set's ``note`` says so
("calibrated ... with checkpoint A; recalibrate"). Adding references to a set whose threshold
came from ``calibrate`` replaces that threshold too, and ``note`` says with what.

The search is chunked over the bank (``references.chunk`` rows at a time) so that memory stays
flat: a chunk's similarity matrix is ``(B·L, chunk)`` floats. A store is safe to share between
threads: every change is made under its lock, and a set is replaced, never changed in place.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from kanoclip.errors import CheckpointError, InputError
from kanoclip.fileio import atomic_write_bytes, atomic_write_json
from kanoclip.modeling.maps import gaussian_blur, upsample
from kanoclip.modeling.vv_attention import VisualFeatures
from kanoclip.precision import full_precision

FORMAT = "kanoclip-references"
FORMAT_VERSION = 2
INDEX_NAME = "references.json"  # a readable copy of the index; the tensors file holds the one that is loaded
TENSORS_NAME = "references.safetensors"
INDEX_KEY = "kanoclip_references"  # the index in the tensors file's metadata

ThresholdSource = Literal["default", "leave-one-out", "labelled", "normal"]
RECOMPUTABLE: tuple[ThresholdSource, ...] = ("default", "leave-one-out")  # the others need images that are not kept


@dataclass(frozen=True)
class Scoring:
    """What a set's derived values (each reference's own score, the threshold) are computed with.

    The service gives one per class (:meth:`kanoclip.KAnoCLIP.reference_scoring`).
    ``fingerprint`` holds every input of those values besides the kept features; ``model`` names
    the model in notes ("checkpoint runs/a (weights 1f2e3d4c)").
    """

    fingerprint: dict[str, Any]
    model: str
    stage_weights: tuple[float, ...]
    image_size: int
    sigma: float
    weight: float
    margin: float
    chunk: int


class Scorer(Protocol):
    """What a store needs from the model that serves it (:class:`kanoclip.KAnoCLIP` is one)."""

    device: torch.device

    def reference_scoring(self, class_name: str) -> Scoring: ...

    def score_features(self, class_name: str, visual: VisualFeatures) -> torch.Tensor:
        """Each image's model score without references, ``(k,)``, from its CLIP-VV features."""
        ...


def model_identity(
    *,
    backbone: str,
    image_size: int,
    vv_length: int,
    stage_layers: Sequence[int],
    stages_read: Sequence[int],
    position_interpolation: str,
    image_token: str,
    precision: str,
) -> dict[str, Any]:
    """What a reference's features depend on: a set serves, and loads into, only a model with the same.

    Args:
        backbone: the backbone's name.
        image_size: the input size S.
        vv_length: the V-V path's number of replaced blocks in the model's mode.
        stage_layers: the layers read as stages.
        stages_read: the stages (positions in ``stage_layers``) of non-zero weight: the only ones kept.
        position_interpolation: how the position embeddings are resized (``vv.position_interpolation``).
        image_token: which CLS is the image-level feature (``vv.image_token`` or the training-free one).
        precision: the backbone's precision in force.

    Returns:
        A JSON-friendly dict, saved with the set.
    """
    return {
        "backbone": backbone,
        "image_size": int(image_size),
        "vv_length": int(vv_length),
        "stage_layers": [int(x) for x in stage_layers],
        "stages_kept": [int(x) for x in stages_read],
        "position_interpolation": position_interpolation,
        "image_token": image_token,
        "precision": precision,
    }


def identity_difference(built: dict[str, Any], here: dict[str, Any]) -> str:
    """``"image_size 224 there, 112 here; precision bf16 there, fp32 here"``; empty when they match."""
    keys = [k for k in dict.fromkeys([*built, *here]) if built.get(k) != here.get(k)]
    return "; ".join(f"{k} {built.get(k)} there, {here.get(k)} here" for k in keys)


@dataclass(frozen=True)
class ReferenceSet:
    """One class's normal references, their kept features and its threshold (replaced, never changed in place).

    ``features`` holds, per stage, the references' ``(k·L, C)`` fp16 projected V-V patch tokens
    (None for a stage the model does not read); ``global_features`` their ``(k, C)`` image-level
    features. Both are empty (``count == 0``) when only a threshold was calibrated. ``threshold``
    is None while the default is in force; ``source`` and ``calibration`` say how it was set;
    ``model_scores`` (each reference's own score without references) and a leave-one-out
    threshold belong to the scoring fingerprint ``scored_with`` (see the module docstring).
    """

    class_name: str
    features: list[torch.Tensor | None]
    global_features: torch.Tensor | None
    image_names: list[str]
    grid: tuple[int, int] = (0, 0)  # each reference's patch grid (h, w): h·w bank rows per image
    threshold: float | None = None
    source: ThresholdSource = "default"
    calibration: str = "default"
    model_scores: list[float] = field(default_factory=list)
    scored_with: dict[str, Any] | None = None
    scored_by: str = ""
    note: str = ""  # what happened to an earlier threshold, if anything

    @property
    def count(self) -> int:
        """k, the number of reference images."""
        return len(self.image_names)

    @property
    def bank(self) -> list[torch.Tensor | None]:
        """The memory bank searched by the reference map: ``features`` (normalised as it is searched)."""
        return self.features

    @property
    def calibrated(self) -> bool:
        return self.threshold is not None

    def describe(self, default_threshold: float) -> str:
        """One line for a verdict: the threshold, where it comes from, and what became of an earlier one."""
        if self.threshold is None:
            text = f"default threshold {default_threshold:.3f} (not calibrated)"
        else:
            text = f"threshold {self.threshold:.3f}, calibrated {self.calibration}"
        return f"{text}; {self.note}" if self.note else text

    def to(self, device: torch.device) -> ReferenceSet:
        """This set with its tensors on ``device`` (itself when they are there already)."""
        if self.global_features is None or self.global_features.device == device:
            return self
        return replace(
            self,
            features=[f.to(device) if f is not None else None for f in self.features],
            global_features=self.global_features.to(device),
        )

    def visual(self, start: int, stop: int) -> VisualFeatures:
        """References ``start:stop`` as fp32 :class:`VisualFeatures` (zeros for a stage not kept: its weight is 0)."""
        per = self.grid[0] * self.grid[1]
        glob = self.global_features[start:stop].float()  # type: ignore[index]
        shape = (glob.shape[0], per, glob.shape[1])
        stages = [
            f[start * per : stop * per].float().view(shape) if f is not None else glob.new_zeros(shape)
            for f in self.features
        ]
        return VisualFeatures(global_feature=glob, stages=stages, grid=self.grid)


class References:
    """Every class's :class:`ReferenceSet` for one model identity: the model's own, or one per app session.

    Args:
        identity: :func:`model_identity` of the models it serves.
        max_images: the most reference images it may hold over all classes (None: no cap but
            ``references.max_per_class`` per class); the app caps each session's.
    """

    def __init__(self, identity: dict[str, Any], *, max_images: int | None = None) -> None:
        self.identity = identity
        self.max_images = max_images
        self._sets: dict[str, ReferenceSet] = {}
        self._lock = threading.RLock()
        self._writer = threading.Lock()  # see writing()

    def __getstate__(self) -> dict[str, Any]:  # a copy (pickle, deepcopy) gets locks of its own
        with self._lock:
            return {**self.__dict__, "_sets": dict(self._sets), "_lock": None, "_writer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.RLock(), _writer=threading.Lock())

    def writing(self) -> threading.Lock:
        """The lock of a writer that works on a copy of this store and stores its result back.

        The app's GPU path adds references in a worker, to a copy of a session's store (ZeroGPU
        pickles it); the result comes back as a set to :meth:`keep`. Held from reading the class's
        set to keeping the result, it makes two concurrent additions to one store chain, where the
        later would otherwise replace the earlier. Readers (detections) never take it.

        Returns:
            The store's writer lock (a context manager).
        """
        return self._writer

    # ------------------------------------------------------------------ reading
    @property
    def classes(self) -> list[str]:
        """The classes that have references or a threshold, in the order they were added."""
        with self._lock:
            return list(self._sets)

    @property
    def total(self) -> int:
        """Reference images held over all classes."""
        with self._lock:
            return sum(refs.count for refs in self._sets.values())

    def stored(self, class_name: str) -> ReferenceSet | None:
        """The class's set as stored: possibly computed for another model (use :meth:`serving` to detect)."""
        with self._lock:
            return self._sets.get(class_name)

    def serving(self, class_name: str, scorer: Scorer) -> ReferenceSet | None:
        """The class's set, brought up to date for ``scorer`` (on its device, scored with its fingerprint).

        Returns:
            The set, or None when the class has none.
        """
        with self._lock:
            refs = self._sets.get(class_name)
            if refs is None:
                return None
            current = refs.to(scorer.device)
            scoring = scorer.reference_scoring(class_name)
            if current.scored_with != scoring.fingerprint:
                current = _rescored(current, scoring, scorer)
                # kept rescored, on the store's own device: a visitor's store on the CPU stays there
                # when a GPU serves it (only the copy this call returns is on the GPU)
                home = refs.global_features.device if refs.global_features is not None else scorer.device
                self._sets[class_name] = current.to(home)
            return current

    # ------------------------------------------------------------------ changing
    def check_room(self, class_name: str, adding: int, max_per_class: int) -> None:
        """Refuse, in one line, ``adding`` more references of ``class_name`` past either cap."""
        with self._lock:
            old = self._sets.get(class_name)
            have = old.count if old is not None else 0
            if have + adding > max_per_class:
                raise InputError(
                    f"{have + adding} references for {class_name!r} exceed the limit of {max_per_class} per class "
                    "(references.max_per_class): each takes memory for all its patch features; keep the most typical"
                )
            total = sum(refs.count for refs in self._sets.values())
            if self.max_images is not None and total + adding > self.max_images:
                raise InputError(
                    f"{total + adding} reference images over all classes exceed the limit of {self.max_images} "
                    "for one set of references; clear the references of a class you no longer need first"
                )

    def add(
        self,
        class_name: str,
        visual: VisualFeatures,
        image_names: Sequence[str],
        scorer: Scorer,
        *,
        max_per_class: int,
    ) -> ReferenceSet:
        """Add references (their CLIP-VV features) to the class's set and recompute what follows from them.

        Args:
            class_name: the canonical class.
            visual: the new references' features (``stages`` n x (k, L, C), ``global_feature`` (k, C)).
            image_names: one name per new reference.
            scorer: the model that serves the store.
            max_per_class: ``references.max_per_class``.

        Returns:
            The class's new set; its ``note`` says what became of an earlier threshold.
        """
        kept = set(self.identity["stages_kept"])
        new = [s.flatten(0, 1).half() if j in kept else None for j, s in enumerate(visual.stages)]
        new_global = visual.global_feature.half()
        with self._lock:  # the merge reads and writes the class's set at once: no concurrent add is lost
            self.check_room(class_name, len(image_names), max_per_class)
            old = self._sets.get(class_name)
            old = old.to(scorer.device) if old is not None else None
            if old is not None and old.count:
                new = [
                    torch.cat([a, b]) if a is not None and b is not None else None for a, b in zip(old.features, new)
                ]
                new_global = torch.cat([old.global_features, new_global])  # type: ignore[list-item]
            names = (old.image_names if old is not None else []) + list(image_names)
            refs = ReferenceSet(class_name, new, new_global, names, grid=visual.grid)
            refs = _rescored(refs, scorer.reference_scoring(class_name), scorer)
            refs = replace(refs, note=_what_became_of(old, refs))
            self._sets[class_name] = refs
            return refs

    def set_threshold(
        self,
        class_name: str,
        threshold: float,
        *,
        source: ThresholdSource,
        how: str,
        scorer: Scorer,
        basis: Sequence[str],
    ) -> ReferenceSet:
        """Record a threshold from :meth:`kanoclip.KAnoCLIP.calibrate` (it cannot be recomputed later).

        Args:
            class_name: the canonical class.
            threshold: the threshold.
            source: ``"labelled"`` (F1-max) or ``"normal"`` (largest score + margin).
            how: the calibration's description ("on 20 labelled images (F1-max)").
            scorer: the model whose scores it was set from.
            basis: the class's reference image names when the scores were taken.

        Raises:
            InputError: the class's references changed while the scores were taken.
        """
        with self._lock:
            old = self._sets.get(class_name)
            if (old.image_names if old is not None else []) != list(basis):
                raise InputError(f"the references of {class_name!r} changed during calibration; calibrate again")
            scoring = scorer.reference_scoring(class_name)
            base = old if old is not None else ReferenceSet(class_name, [], None, [])
            note = f"replaces the threshold {old.threshold:.3f} {old.calibration}" if old and old.calibrated else ""
            refs = replace(
                base, threshold=float(threshold), source=source, calibration=how,
                scored_with=scoring.fingerprint, scored_by=scoring.model, note=note,
            )  # fmt: skip
            self._sets[class_name] = refs
            return refs

    def keep(self, refs: ReferenceSet) -> None:
        """Store a set computed on a copy of this store (the app's GPU worker adds to a copy)."""
        with self._lock:
            self._sets[refs.class_name] = refs

    def remove(self, class_name: str) -> None:
        """Forget the class's references and threshold."""
        with self._lock:
            self._sets.pop(class_name, None)

    def to(self, device: torch.device) -> None:
        """Move every set's tensors to ``device`` (the model's :meth:`~torch.nn.Module.to` calls it)."""
        with self._lock:
            self._sets = {name: refs.to(device) for name, refs in self._sets.items()}

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the store into ``folder``: ``references.safetensors`` (the set) and ``references.json`` (a copy
        of its index, to read).

        The tensors and the index are one file, written to a temporary name and renamed, so a
        crash leaves the old set or the new one; the JSON copy is written after it.
        """
        from safetensors.torch import save

        with self._lock:
            sets = dict(self._sets)
        out = Path(folder).expanduser()
        tensors: dict[str, torch.Tensor] = {}
        classes = []
        for name, refs in sets.items():  # keyed by class name: a bank can never be read as another class's
            if refs.count:
                tensors[f"{name}/global"] = refs.global_features.detach().to("cpu", torch.float16).contiguous()  # type: ignore[union-attr]
                for j, stage in enumerate(refs.features):
                    if stage is not None:
                        tensors[f"{name}/stage{j}"] = stage.detach().to("cpu", torch.float16).contiguous()
            classes.append({
                "class": name, "image_names": refs.image_names, "grid": list(refs.grid),
                "threshold": refs.threshold, "source": refs.source, "calibration": refs.calibration,
                "model_scores": refs.model_scores, "scored_with": refs.scored_with, "scored_by": refs.scored_by,
                "note": refs.note,
            })  # fmt: skip
        index = {"format": FORMAT, "version": FORMAT_VERSION, "identity": self.identity, "classes": classes}
        atomic_write_bytes(out / TENSORS_NAME, save(tensors, metadata={INDEX_KEY: json.dumps(index)}))
        atomic_write_json(out / INDEX_NAME, index)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, identity: dict[str, Any], device: torch.device) -> References:
        """Read a saved store; refused, in one line, when it was built for another model or is damaged.

        Args:
            folder: a folder written by :meth:`save`.
            identity: the loading model's :func:`model_identity`.
            device: where the tensors go.

        Raises:
            CheckpointError: no set there, a damaged one, another format, another model (what
                differs is named), or a bank whose shape does not fit its grid and count.
        """
        path = Path(folder).expanduser()
        index, tensors = _read(path, device)
        differs = identity_difference(index.get("identity") or {}, identity)
        if differs:
            raise CheckpointError(f"{path} was built for another model ({differs}): build the references again with it")
        store = cls(identity)
        try:
            for entry in index["classes"]:
                store._sets[entry["class"]] = _loaded_set(entry, tensors, identity, path)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: the references index is damaged ({exc}); build the references again"
            ) from None
        return store


def read_index(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of a saved store (classes, counts, thresholds, provenance), its tensors left unread.

    Raises:
        CheckpointError: as :meth:`References.load`, for a missing, damaged or old folder.
    """
    return _read(Path(folder).expanduser(), None)[0]


def _read(path: Path, device: torch.device | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the index, the tensors on ``device``; none when None) of a saved store, checked to be one this code reads."""
    from safetensors import safe_open

    file = path / TENSORS_NAME
    if not file.is_file():
        raise CheckpointError(
            f"{path} holds no saved references (expected {TENSORS_NAME}); "
            "build them with add_references or `kanoclip references build`"
        )
    try:
        with safe_open(str(file), "pt", device=str(device or "cpu")) as handle:
            index = json.loads((handle.metadata() or {}).get(INDEX_KEY, "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if device is not None else {}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(
            f"{file} is damaged and cannot be read ({(str(exc) or type(exc).__name__).splitlines()[0]}); "
            "build the references again"
        ) from None
    if index is None and (path / INDEX_NAME).is_file():  # format 1 kept its index in the JSON file only
        try:
            index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{file} holds no kanoclip references index; build the references again")
    if index.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was saved in references format {index.get('version')}, which keeps no features to "
            f"recompute thresholds from (this kanoclip reads format {FORMAT_VERSION}); build the references again"
        )
    return index, tensors


def _loaded_set(
    entry: dict[str, Any], tensors: dict[str, torch.Tensor], identity: dict[str, Any], path: Path
) -> ReferenceSet:
    """One class's set from a saved index entry, its bank shapes checked against its grid and count."""
    name, count, grid = entry["class"], len(entry["image_names"]), (int(entry["grid"][0]), int(entry["grid"][1]))
    features: list[torch.Tensor | None] = []
    glob = None
    if count:
        glob = tensors.get(f"{name}/global")
        if glob is None or glob.dim() != 2 or glob.shape[0] != count:
            raise CheckpointError(
                f"{path}: the image features of {name!r} are missing or not ({count}, C); build the references again"
            )
        kept = set(identity["stages_kept"])
        for j in range(len(identity["stage_layers"])):
            stage = tensors.get(f"{name}/stage{j}")
            if j not in kept:
                features.append(None)
                continue
            expected = (count * grid[0] * grid[1], glob.shape[1])
            if stage is None or tuple(stage.shape) != expected:
                got = "missing" if stage is None else tuple(stage.shape)
                raise CheckpointError(
                    f"{path}: the stage {j} bank of {name!r} is {got}, not {expected} ({count} references of a "
                    f"{grid[0]}x{grid[1]} grid); build the references again"
                )
            features.append(stage)
    return ReferenceSet(
        name, features, glob, list(entry["image_names"]), grid=grid, threshold=entry["threshold"],
        source=entry["source"], calibration=entry["calibration"], model_scores=list(entry["model_scores"]),
        scored_with=entry["scored_with"], scored_by=entry["scored_by"], note=entry["note"],
    )  # fmt: skip


# ---------------------------------------------------------------------- recomputation
def _changed(before: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """The fingerprint entries that differ, for a note: ``"weights, sigma"``."""
    before = before or {}
    return ", ".join(k for k in dict.fromkeys([*before, *now]) if before.get(k) != now.get(k))


def _rescored(refs: ReferenceSet, scoring: Scoring, scorer: Scorer, batch: int = 8) -> ReferenceSet:
    """``refs`` with its derived values computed for ``scoring``: each reference's own score, the
    leave-one-out threshold; a ``calibrate`` threshold of another fingerprint dropped with a note."""
    scores: list[float] = []
    for start in range(0, refs.count, batch):
        stop = min(start + batch, refs.count)
        scores += scorer.score_features(refs.class_name, refs.visual(start, stop)).float().tolist()
    threshold, source, calibration, note = refs.threshold, refs.source, refs.calibration, refs.note
    if source not in RECOMPUTABLE:
        note = (
            f"the threshold {threshold:.3f} calibrated {calibration} with {refs.scored_by} was dropped "
            f"({_changed(refs.scored_with, scoring.fingerprint)} changed since); recalibrate"
        )
        threshold, source, calibration = None, "default", "default"
    refs = replace(refs, model_scores=scores, scored_with=scoring.fingerprint, scored_by=scoring.model, note=note)
    if refs.count >= 2:
        threshold, source = leave_one_out_threshold(refs, scoring), "leave-one-out"
        calibration = f"leave-one-out on its {refs.count} references"
    return replace(refs, threshold=threshold, source=source, calibration=calibration)


def _what_became_of(old: ReferenceSet | None, new: ReferenceSet) -> str:
    """The note of an add: what happened to the class's earlier threshold."""
    if old is None or old.threshold is None:
        return ""
    now = f"leave-one-out on its {new.count} references now" if new.calibrated else "the default threshold now"
    if old.source in RECOMPUTABLE:
        return f"the leave-one-out threshold of its {old.count} references ({old.threshold:.3f}) was recomputed"
    return f"the threshold {old.threshold:.3f} calibrated {old.calibration} was replaced ({now}); recalibrate"


def leave_one_out_threshold(refs: ReferenceSet, scoring: Scoring) -> float:
    """The largest leave-one-out fused score of a class's references, plus the margin, in fp32.

    Each reference's patches (its rows of the bank) are matched against the other references'
    only, and fused with its own score without references (``refs.model_scores``).
    """
    (h, w), device = refs.grid, refs.global_features.device  # type: ignore[union-attr]
    per = h * w
    rows = torch.arange(refs.count * per, device=device)
    fused = []
    with torch.inference_mode():
        for i in range(refs.count):
            own = [f[i * per : (i + 1) * per][None] if f is not None else None for f in refs.features]
            ref = reference_maps(
                own, refs.features, scoring.stage_weights, refs.grid, scoring.image_size, scoring.sigma,
                chunk=scoring.chunk, exclude=(rows // per == i)[None],
            )  # fmt: skip
            fused.append(fuse(refs.model_scores[i], float(ref.max()), scoring.weight))
    return float(min(max(fused) + scoring.margin, 1.0))


# ---------------------------------------------------------------------- the reference map
def nearest_distance(
    patches: torch.Tensor, bank: torch.Tensor, chunk: int, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 − max_j cos(patch, bank_j)`` for every patch, clamped to [0, 1]: ``(B, L, C) -> (B, L)``, in fp32.

    Args:
        patches: test patch features (any norm).
        bank: ``(N, C)`` reference patches (any norm; fp16 as stored), or ``(B, N, C)``, each image's own.
        chunk: bank rows compared at a time.
        exclude: optional ``(B, N)`` bool, bank rows each image may not match (leave-one-out).

    Returns:
        ``(B, L)`` float32 distances.
    """
    b, length, _ = patches.shape
    with full_precision(patches.device):
        queries = F.normalize(patches.float(), dim=-1)  # (B, L, C)
        best = torch.full((b, length), -1.0, device=patches.device)
        for start in range(0, bank.shape[-2], chunk):
            # normalised in fp32: fp16 storage would move a unit vector's norm by ~1e-3, and so
            # an image's distance to itself
            block = F.normalize(bank[..., start : start + chunk, :].float(), dim=-1)  # ([B,] n, C)
            sims = queries @ block.transpose(-1, -2)  # (B, L, n)
            if exclude is not None:
                sims = sims.masked_fill(exclude[:, None, start : start + chunk], -1.0)
            best = torch.maximum(best, sims.amax(dim=-1))
        return (1.0 - best).clamp(0.0, 1.0)


def reference_maps(
    stages: Sequence[torch.Tensor | None],
    bank: Sequence[torch.Tensor | None],
    weights: Sequence[float],
    grid: tuple[int, int],
    size: int,
    sigma: float,
    *,
    chunk: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference map of a batch: ``(B, S, S)`` float32 in [0, 1] (see the module docstring).

    ``stages``: n x (B, L, C) test features; ``bank``: n x (N, C) (or (B, N, C), each image's own);
    ``weights``: n numbers summing
    to 1 (a stage of weight 0 is not searched and may be None in both). Runs in fp32 under any autocast.
    """
    first = next(s for s, w in zip(stages, weights) if w > 0)
    b = first.shape[0]  # type: ignore[union-attr]
    with full_precision(first.device):  # type: ignore[union-attr]
        grid_map = torch.zeros(b, grid[0] * grid[1], dtype=torch.float32, device=first.device)  # type: ignore[union-attr]
        for weight, patches, stage_bank in zip(weights, stages, bank):
            if weight > 0:
                grid_map = grid_map + weight * nearest_distance(patches, stage_bank, chunk, exclude)  # type: ignore[arg-type]
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
