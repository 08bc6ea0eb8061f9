"""KAnoCLIP, the detector service: images in, :class:`~kanoclip.detection.Detection` results out.

``KAnoCLIP`` holds the pure model (:class:`~kanoclip.modeling.model.KAnoCLIPModel`, the paper's
forward pass, tensors in and out) and does what sits around it: loading backbones and
checkpoints, decoding and preprocessing images, each class's text features (the learned prompts
or the training-free ensemble, with the knowledge base's descriptions), cached per class in
bounded caches it owns, and the guidance and results built from a forward. It is an
``nn.Module`` too (its parameters are the model's), so training can wrap it in DDP.

One model may be shared by any number of threads (a threaded server, the app on a GPU, models
sharing a backbone through ``backbone_cache``): each call's backbone capture is its own
(:mod:`~kanoclip.modeling.vv_attention`), the text caches compute each class once and keep nothing
computed across an invalidation (:class:`~kanoclip.cache.LRUCache`), a detection reads each class's
references once, and additions to one class's references merge under a lock. For batching
concurrent callers into one forward, see :mod:`kanoclip.serving`.

The mode comes from what was loaded: :meth:`from_pretrained` with a checkpoint gives the trained
mode, without one the training-free mode; :meth:`for_training` builds a model whose learned parts
are about to be trained (trained mode, fresh weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kanoclip.backbone import Backbone, load_backbone
from kanoclip.cache import LRUCache
from kanoclip.checkpoint import KB_NAME, read_checkpoint, write_checkpoint
from kanoclip.config import BACKBONE_ENV, KAnoCLIPConfig, with_overrides
from kanoclip.detection import Detection, Guidance, class_per_image, upsample_maps
from kanoclip.errors import CheckpointError, InputError
from kanoclip.images import ImageInput, describe, load_image, preprocess
from kanoclip.knowledge import Description, KnowledgeBase
from kanoclip.modeling.model import KAnoCLIPModel, KAnoCLIPOutput
from kanoclip.modeling.prompts import mean_direction
from kanoclip.modeling.vv_attention import VisualFeatures
from kanoclip.onnx_vision import OnnxInt8Tower
from kanoclip.precision import full_precision, int8_vision_copy, precision_at_load
from kanoclip.references import (
    References,
    ReferenceSet,
    Scoring,
    f1_max_threshold,
    fuse,
    identity_difference,
    model_identity,
    reference_maps,
)

MAX_CLASS_CHARS = 1000  # longer names are cut before tokenising (the tokenizer cuts to 77 tokens anyway)
_SHARED_PASS_KEYS = {
    "backbone", "image_size", "vv.stage_layers", "vv.position_interpolation", "vv.image_token",
    "training_free.image_token",
}  # fmt: skip
# Held while a backbone is looked up in, loaded into or quantised into a backbone cache: two models
# built at once on one cache (or its int8 copy) load it once.
_BACKBONE_CACHE_LOCK = threading.Lock()


@dataclass
class _ClassText:
    """Cached text side of one class: state features and the guidance prompts' features."""

    state: torch.Tensor  # (2, C) normalised [normal, abnormal]
    guidance_texts: list[tuple[str, str, str]]  # (text, source, state)
    guidance_features: torch.Tensor  # (G, C) normalised
    # sha256 of ``state``'s values, taken once when built: the references' scoring fingerprint reads
    # it on every detection with references, which would otherwise copy the features to the host each time
    state_digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.state_digest = hashlib.sha256(self.state.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class KAnoCLIP(nn.Module):
    """KAnoCLIP on a frozen transformers CLIP. Build it with :meth:`from_pretrained` (or :meth:`for_training`)."""

    def __init__(self, model: KAnoCLIPModel, backbone: Backbone, knowledge: KnowledgeBase | None = None) -> None:
        super().__init__()
        self.model = model
        self._backbone = backbone  # kept for :meth:`variant`, which shares it
        self.backbone_name = backbone.name
        self.random_backbone = backbone.random_init
        self.image_mean, self.image_std = backbone.image_mean, backbone.image_std
        self.knowledge = knowledge or KnowledgeBase.builtin()
        self.checkpoint_name: str | None = None
        # Per-class text caches, bounded (LRU, config.cache) and emptied in one place: _invalidate.
        max_classes = model.config.cache.max_classes
        # keyed by (class, digest of its descriptions): a per-call knowledge base never changes another's entries
        self._text_cache: LRUCache[tuple[str, str], _ClassText] = LRUCache(max_classes)
        self._knowledge_cache: LRUCache[tuple[str, str], torch.Tensor] = LRUCache(max_classes)
        self._weights_digest: str | None = None  # of the trained weights, for the references' provenance
        self.reference_store = References(self.reference_fingerprint())  # add_references fills it

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike[str] | None = None,
        backbone: str | None = None,
        device: str | torch.device = "auto",
        *,
        kb: str | os.PathLike[str] | KnowledgeBase | None = None,
        config: KAnoCLIPConfig | None = None,
        cache_dir: str | None = None,
        backbone_cache: MutableMapping[tuple[str, str], Backbone] | None = None,
        precision: str = "auto",
        int8_engine: str = "auto",
        overrides: Mapping[str, Any] | None = None,
        references: str | os.PathLike[str] | None = None,
    ) -> KAnoCLIP:
        """Load a model: training-free with ``checkpoint=None``, else trained from a checkpoint folder or hub id.

        Args:
            checkpoint: a checkpoint folder or hub repo id (None: the training-free mode).
            backbone: a hub id or local folder; default ``$KANOCLIP_BACKBONE`` (read here, once),
                else the checkpoint's (or ViT-L/14@336px).
            device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
            kb: a knowledge-base file or object; default the checkpoint's, else the built-in one.
            config: the model config (default: the checkpoint's, else the defaults).
            cache_dir: the hub cache to read from.
            backbone_cache: a mapping the caller owns, so that several models (say,
                training-free and a checkpoint) share one frozen backbone in memory.
            precision: the backbone's precision (:mod:`kanoclip.precision`; ``model.precision``
                says which is in force).
            int8_engine: what runs ``precision="int8"``: ``"auto"``, ``"torch"`` or ``"onnxruntime"``
                (:func:`kanoclip.precision.resolve_int8_engine`; ``model.engine`` says which runs).
            overrides: dotted config paths applied on top of ``config`` or the checkpoint's, e.g.
                ``{"training_free.stage_weights": (0, 0, 0, 1)}`` (:func:`kanoclip.config.with_overrides`).
            references: a folder of saved normal references (:meth:`save_references`), built
                with a model of the same backbone, input size and mode.

        Returns:
            The model in eval mode, ready for inference.
        """
        files = read_checkpoint(checkpoint, cache_dir=cache_dir) if checkpoint is not None else None
        cfg = config or (files.config if files else KAnoCLIPConfig())
        model = cls._build(
            cfg, backbone, device, trained=files is not None, precision=precision, int8_engine=int8_engine,
            overrides=overrides, cache_dir=cache_dir, backbone_cache=backbone_cache,
            knowledge=_knowledge_from(kb, files.folder if files else None),
        )  # fmt: skip
        if files is not None:
            model.load_trainable_state_dict(
                files.state_dict, source=str(files.folder), trained_backbone=files.config.backbone
            )
            model.checkpoint_name = str(checkpoint)
        if references is not None:
            model.reference_store = References.load(
                references, identity=model.reference_fingerprint(), device=model.device
            )
        return model.eval()  # like transformers' from_pretrained: ready for inference

    @classmethod
    def for_training(
        cls,
        backbone: str | None = None,
        device: str | torch.device = "auto",
        *,
        kb: str | os.PathLike[str] | KnowledgeBase | None = None,
        config: KAnoCLIPConfig | None = None,
        precision: str = "auto",
        int8_engine: str = "auto",
        backbone_cache: MutableMapping[tuple[str, str], Backbone] | None = None,
    ) -> KAnoCLIP:
        """A trained-mode model with freshly initialised prompts, Bi-CMCI and adapter, to be trained.

        Arguments as for :meth:`from_pretrained` (the initialisation follows torch's RNG).
        """
        return cls._build(
            config or KAnoCLIPConfig(), backbone, device, trained=True, precision=precision,
            int8_engine=int8_engine, knowledge=_knowledge_from(kb, None), backbone_cache=backbone_cache,
        )  # fmt: skip

    @classmethod
    def _build(
        cls,
        config: KAnoCLIPConfig,
        backbone: str | None,
        device: str | torch.device,
        *,
        trained: bool,
        precision: str,
        int8_engine: str = "auto",
        knowledge: KnowledgeBase,
        overrides: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
        backbone_cache: MutableMapping[tuple[str, str], Backbone] | None = None,
    ) -> KAnoCLIP:
        if overrides:
            try:
                config = with_overrides(config, overrides)
            except ValueError as exc:
                raise InputError(f"config override: {exc}") from None
        # backbone: the argument, else $KANOCLIP_BACKBONE (e.g. a local copy of the checkpoint's
        # hub backbone), else the checkpoint's or the config's; shapes are checked on load.
        config = replace(config, backbone=backbone or os.environ.get(BACKBONE_ENV) or config.backbone)
        torch_device = resolve_device(device)
        # a precision the device cannot run fails before loading; a slow one says so in one line
        engine = precision_at_load(precision, torch_device, int8_engine).int8_engine  # None unless int8
        fp32_key = (config.backbone, str(torch_device))
        # an int8 backbone is cached apart (a quantised copy, or the fp32 one with its onnxruntime engine):
        # models sharing the fp32 one never see it
        key = (config.backbone, f"{torch_device}:int8-{engine}") if engine else fp32_key
        cache = backbone_cache if backbone_cache is not None else {}
        with _BACKBONE_CACHE_LOCK:
            loaded = cache.get(key)
            if loaded is None:
                loaded = cache.get(fp32_key) or load_backbone(config.backbone, device=torch_device, cache_dir=cache_dir)
                if engine == "torch":
                    loaded = replace(loaded, model=int8_vision_copy(loaded.model))
                elif engine == "onnxruntime":
                    loaded = replace(loaded, tower_engine=OnnxInt8Tower(loaded.model))
                cache[key] = loaded
        model = _model_on(loaded, config, trained=trained, precision=precision, int8_engine=int8_engine)
        if loaded.tower_engine is not None:  # its graph now (minutes on a first build), not on the first image
            loaded.tower_engine.prepare(
                model.visual, model.image_size, [model.num_replaced_blocks()], model.image_token
            )
        return cls(model, loaded, knowledge).to(torch_device)

    def variant(self, overrides: Mapping[str, Any]) -> KAnoCLIP:
        """A model that differs from this one by config ``overrides`` and shares its backbone and weights.

        Used by sweeps (``kanoclip eval --sweep``), which run every variant on one backbone forward
        per image; so a variant may not change what that forward computes (``backbone``,
        ``image_size``, ``vv.stage_layers``, ``vv.position_interpolation``, the image token) nor the shapes of the
        trained parts.

        Args:
            overrides: dotted config paths and values, as for :meth:`from_pretrained`.

        Returns:
            A model in the same mode, in eval mode, on the same device.
        """
        fixed = sorted(set(overrides) & _SHARED_PASS_KEYS)
        if fixed:
            raise InputError(
                f"a sweep variant cannot set {', '.join(fixed)}: all variants share one backbone pass; "
                "evaluate that setting on its own with --set"
            )
        try:
            config = with_overrides(self.config, overrides)
        except ValueError as exc:
            raise InputError(f"config override: {exc}") from None
        model = _model_on(
            self._backbone, config, trained=self.trained, precision=self.model.requested_precision,
            int8_engine=self.model.requested_int8_engine,
        )  # fmt: skip
        other = type(self)(model, self._backbone, self.knowledge).to(self.device)
        if self.trained:
            try:
                other.load_trainable_state_dict(self.model.trainable_state_dict(), source="the trained weights")
            except CheckpointError:
                raise InputError(
                    "a sweep variant cannot change the shapes of the trained parts (e.g. bicmci.dim, prompts.n_ctx)"
                ) from None
        other.checkpoint_name = self.checkpoint_name
        return other.eval()

    def load_trainable_state_dict(
        self, state: dict[str, torch.Tensor], *, source: str = "checkpoint", trained_backbone: str | None = None
    ) -> None:
        """Load trained weights (a checkpoint's, or a resumed run's) after checking names and shapes.

        Only a trained-mode model takes them: a training-free model has no learned parts in use.
        """
        if not self.trained:
            raise InputError(
                f"{source}: trained weights need a trained-mode model; load it with from_pretrained(checkpoint=...)"
            )
        expected = self.model.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            detail = (
                f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} "
                f"vs {tuple(expected[wrong[0]].shape)})"
                if wrong
                else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
            trained_for = f" it was trained for backbone {trained_backbone!r}," if trained_backbone else ""
            raise CheckpointError(
                f"{source} does not fit this model:{trained_for} this model uses {self.backbone_name!r} ({detail}); "
                "load it with the backbone it was trained on"
            )
        for name, module in self.model.trainable_modules().items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        self._invalidate()

    def save_pretrained(self, folder: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint folder: config, trainable safetensors, knowledge base (atomically)."""
        meta = {"random_backbone": self.random_backbone, **(metadata or {})}
        return write_checkpoint(folder, self.config, self.model.trainable_state_dict(), self.knowledge.to_dict(), meta)

    # ------------------------------------------------------------------ state
    @property
    def config(self) -> KAnoCLIPConfig:
        return self.model.config

    @property
    def trained(self) -> bool:
        return self.model.trained

    @property
    def mode(self) -> Literal["training-free", "trained"]:
        return "trained" if self.trained else "training-free"

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def precision(self) -> str:
        """The backbone's precision in force on the current device: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``."""
        return self.model.precision

    @property
    def engine(self) -> str:
        """What runs the vision tower: ``"torch"`` or ``"onnxruntime"`` (int8 on :mod:`kanoclip.onnx_vision`)."""
        return self.model.engine

    def train(self, mode: bool = True) -> KAnoCLIP:
        if mode != self.training:  # the learned parts may change (or have changed) meanwhile
            self._invalidate()
        return super().train(mode)  # the model keeps its backbone in eval mode

    def _invalidate(self, *, descriptions: bool = False) -> None:
        """Empty the per-class text cache (and the description features'): the one place they are emptied.

        The state features depend on the learned prompts (new weights, a change between training
        and inference); the description features on the knowledge base, device and dtype only.
        """
        self._text_cache.clear()
        self._weights_digest = None  # the references' scores follow the weights (kanoclip.references)
        if descriptions:
            self._knowledge_cache.clear()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to()/.cuda()/.half() end here: cached text features belong to the old device and dtype
        self._invalidate(descriptions=True)
        module = super()._apply(fn, recurse)
        if "reference_store" in self.__dict__:  # the references follow the model to its device
            self.reference_store.to(self.device)
        return module

    def set_knowledge(self, knowledge: KnowledgeBase) -> None:
        """Use another knowledge base (e.g. after editing it in the app)."""
        self.knowledge = knowledge
        self._invalidate(descriptions=True)

    # ------------------------------------------------------------------ forward
    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Decoded RGB images -> the model's normalised input ``(B, 3, S, S)`` on its device."""
        return preprocess(list(images), self.image_size, self.image_mean, self.image_std, device=self.device)

    def encode_image(self, pixel_values: torch.Tensor) -> VisualFeatures:
        """CLIP-VV features of a normalised batch (see :meth:`KAnoCLIPModel.encode_image`)."""
        return self.model.encode_image(pixel_values)

    def forward(
        self,
        visual: VisualFeatures,
        class_names: Sequence[str],
        *,
        sigma: float | None = None,
        references: References | None = None,
        knowledge: KnowledgeBase | None = None,
    ) -> KAnoCLIPOutput:
        """Maps and scores from CLIP-VV features for each image's (canonical) class.

        In trained mode and ``self.training``, the learned prompts are encoded anew so gradients
        reach them, Bi-CMCI and the adapter (used by training; ``prompts`` and ``classes`` of the
        output are set for the loss); otherwise the text side comes from the per-class cache.
        Images of a class with normal references (``references``, default the model's own
        :attr:`reference_store`) get the fused map and score (:mod:`kanoclip.references`).
        ``knowledge`` (default :attr:`knowledge`) is the knowledge base of this call only.
        """
        classes = list(dict.fromkeys(class_names))
        index = torch.tensor([classes.index(c) for c in class_names], device=self.device)
        prompts = None
        if self.trained and self.training:  # learning the prompts: text features with gradients
            prompts = self.model.learned_prompts(classes)
            text = prompts.state_features()[index]  # (B, 2, C)
        else:  # inference: each class's text features are computed once and cached
            text = torch.stack([self._class_text(c, knowledge).state for c in classes])[index]
        out = replace(self.model(visual, text, sigma=sigma), prompts=prompts, classes=classes)
        store = self._store(references)
        serving = {c: store.serving(c, self) for c in classes}  # brought up to date for this model
        sets = [serving[c] for c in class_names]
        if any(refs is not None and refs.count for refs in sets):
            out = self._with_references(out, visual, sets, sigma)
        return out

    def _with_references(
        self, out: KAnoCLIPOutput, visual: VisualFeatures, sets: list[ReferenceSet | None], sigma: float | None
    ) -> KAnoCLIPOutput:
        """``out`` with each referenced image's map and score fused with its reference map."""
        config, size = self.config, self.image_size
        sigma = config.scoring.sigma if sigma is None else sigma
        weights = self.model.stage_weight_values()
        reference_map = torch.zeros_like(out.anomaly_map, dtype=torch.float32)
        anomaly_map, score = out.anomaly_map.float().clone(), out.score.float().clone()
        groups: dict[int, list[int]] = {}
        for i, refs in enumerate(sets):
            if refs is not None and refs.count:
                groups.setdefault(id(refs), []).append(i)
        with full_precision(self.device):  # the search and the fusion in fp32, as the maps, under any autocast
            for rows in groups.values():
                bank = sets[rows[0]].bank  # type: ignore[union-attr]
                idx = torch.tensor(rows, device=self.device)
                ref = reference_maps(
                    [s[idx] for s in visual.stages], bank, weights, visual.grid, size, sigma,
                    chunk=config.references.chunk,
                )  # fmt: skip
                reference_map[idx] = ref
                anomaly_map[idx] = fuse(anomaly_map[idx], ref, config.references.weight)
                score[idx] = fuse(score[idx], ref.flatten(1).amax(dim=1), config.references.weight)
        counts = [refs.count if refs is not None else 0 for refs in sets]
        return replace(out, anomaly_map=anomaly_map, score=score, reference_map=reference_map, reference_counts=counts)

    def knowledge_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """Mean raw CLIP text feature of each class's knowledge-base descriptions, ``(n, 1, C)`` (eq. 3's w̄k).

        The paper's descriptions come from an LLM and a VQA model; here every source counts.
        """
        return torch.stack([self.description_features(name).mean(dim=0, keepdim=True) for name in class_names])

    def description_features(self, class_name: str, knowledge: KnowledgeBase | None = None) -> torch.Tensor:
        """Raw CLIP text features of a class's knowledge-base descriptions, ``(D, C)``, encoded once.

        Shared by the knowledge-distillation target (eq. 3) and the text side of inference, so
        training never encodes the same descriptions twice. Cached by the descriptions' text, so a
        per-call ``knowledge`` (default :attr:`knowledge`) reuses what matches and adds only its own.
        """
        texts = [d.text for d in (knowledge or self.knowledge).descriptions(class_name)]

        def encode() -> torch.Tensor:
            with torch.no_grad():
                return self.model.text_encoder.encode(texts).float()

        return self._knowledge_cache.get_or_compute((class_name, _digest(texts)), encode)

    # ------------------------------------------------------------------ text side (cached per class)
    def canonical_class(self, class_name: str, knowledge: KnowledgeBase | None = None) -> tuple[str, bool]:
        """(the class to use, whether the knowledge base knows it) for a user's class text.

        ``knowledge``: the knowledge base to look in (default :attr:`knowledge`).
        """
        if not isinstance(class_name, str) or not class_name.strip():
            raise InputError("class name is empty; type what the image shows, e.g. 'bottle'")
        text = " ".join(class_name.split())[:MAX_CLASS_CHARS]
        resolved = (knowledge or self.knowledge).resolve(text)
        return (resolved, True) if resolved else (text, False)

    def _class_text(self, class_name: str, knowledge: KnowledgeBase | None = None) -> _ClassText:
        """The class's text side under ``knowledge`` (default :attr:`knowledge`).

        Keyed by the class and its descriptions (text and source), not by the knowledge base:
        a visitor's own copy shares the entries it agrees on and never changes another's.
        """
        descriptions = (knowledge or self.knowledge).descriptions(class_name)

        def build() -> _ClassText:
            with torch.no_grad():
                return self._build_class_text(class_name, descriptions, knowledge)

        key = (class_name, _digest([f"{d.source}\t{d.text}" for d in descriptions]))
        return self._text_cache.get_or_compute(key, build)

    def _build_class_text(
        self, class_name: str, descriptions: list[Description], knowledge: KnowledgeBase | None
    ) -> _ClassText:
        kb_texts = [(d.text, d.source, "abnormal") for d in descriptions]
        kb_features = self.description_features(class_name, knowledge)
        if self.trained:
            prompts = self.model.learned_prompts([class_name])
            state = prompts.state_features()[0]
            learned = [
                (text, "learned", state_name)
                for state_name, abnormal in (("normal", False), ("abnormal", True))
                for text in self.model.prompt_learner.prompt_texts(class_name, abnormal)
            ]
            guidance_texts = learned + kb_texts
            guidance = torch.cat([prompts.normal[0], prompts.abnormal[0], kb_features])
        else:
            ensemble = self.model.training_free_text(class_name)
            if self.config.training_free.use_descriptions:  # they join the abnormal side as members
                abnormal = mean_direction(torch.cat([ensemble.abnormal, kb_features]))
                state = torch.stack([ensemble.state[0], abnormal])
            else:
                kb_texts, kb_features, state = [], kb_features[:0], ensemble.state
            guidance_texts = (
                [(t, "template", "normal") for t in ensemble.normal_texts]
                + [(t, "template", "abnormal") for t in ensemble.abnormal_texts]
                + kb_texts
            )
            guidance = torch.cat([ensemble.normal, ensemble.abnormal, kb_features])
        return _ClassText(state=state, guidance_texts=guidance_texts, guidance_features=F.normalize(guidance, dim=-1))

    # ------------------------------------------------------------------ normal references (k-shot)
    # The store (kanoclip.references) owns the sets, their provenance and their recomputation;
    # these methods give it what only the model knows.
    def reference_fingerprint(self) -> dict[str, Any]:
        """What reference features depend on (:func:`~kanoclip.references.model_identity`): sets serve,
        and saved ones load into, only a model with the same."""
        return model_identity(
            backbone=self.backbone_name,
            image_size=self.image_size,
            vv_length=self.model.num_replaced_blocks(),
            stage_layers=self.model.visual.stage_layers,
            stages_read=[j for j, w in enumerate(self.model.stage_weight_values()) if w > 0],
            position_interpolation=self.config.vv.position_interpolation,
            image_token=self.model.image_token,
            # the engine's rounding differs: "int8 (onnxruntime)" references serve only that engine
            precision=self.precision if self.model.tower_engine is None else f"{self.precision} ({self.model.engine})",
        )

    def reference_scoring(self, class_name: str) -> Scoring:
        """How this model scores ``class_name``'s references: the scoring fingerprint and the values it holds."""
        config = self.config
        if self._weights_digest is None:  # emptied by _invalidate (new weights)
            digest = hashlib.sha256()
            for key, value in sorted(self.model.trainable_state_dict().items()) if self.trained else ():
                digest.update(key.encode() + value.detach().float().cpu().numpy().tobytes())
            self._weights_digest = digest.hexdigest()[:16] if self.trained else "training-free"
        weights = tuple(self.model.stage_weight_values())
        # the sections that shape the learned head's computation (e.g. bicmci.residual_logits) beside its weights
        head = {k: v for k, v in config.to_dict().items() if k in ("bicmci", "adapter", "scoring")}
        head["scoring"] = {k: v for k, v in head["scoring"].items() if k != "threshold"}
        fingerprint = {
            "mode": self.mode,
            "weights": self._weights_digest,
            "text": self._class_text(class_name).state_digest,  # the prompts, or the ensemble with the descriptions
            "stage_weights": list(weights),
            "sigma": config.scoring.sigma,
            "temperature": config.scoring.temperature,
            "weight": config.references.weight,
            "margin": config.references.margin,
            "head": hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()[:16],
        }
        if not self.trained:
            model = "the training-free model"
        else:
            model = f"checkpoint {self.checkpoint_name}" if self.checkpoint_name else "unsaved trained weights"
            model += f" (weights {self._weights_digest[:8]})"
        return Scoring(
            fingerprint, model, weights, self.image_size, config.scoring.sigma, config.references.weight,
            config.references.margin, config.references.chunk,
        )  # fmt: skip

    @torch.inference_mode()
    def score_features(self, class_name: str, visual: VisualFeatures) -> torch.Tensor:
        """Each image's own score without references, ``(B,)``, from its CLIP-VV features (references' scores)."""
        if self.training:
            self.eval()
        text = self._class_text(class_name).state[None].expand(visual.global_feature.shape[0], -1, -1)
        return self.model(visual, text).score

    def _store(self, store: References | None) -> References:
        """``store`` (default the model's own), refused when it was built for another model."""
        store = self.reference_store if store is None else store
        differs = identity_difference(store.identity, self.reference_fingerprint())
        if differs:
            raise InputError(f"these references were built for another model ({differs}); build them with this one")
        return store

    def _snapshot(self, store: References, classes: Sequence[str]) -> References:
        """The sets of ``classes`` in ``store``, brought up to date for this model, in a store of their own.

        One call reads each class's set once: a concurrent :meth:`add_references` or :meth:`calibrate`
        changes a later call, never the maps of this one apart from its threshold.
        """
        snapshot = References(store.identity)
        for name in dict.fromkeys(classes):
            refs = store.serving(name, self)
            if refs is not None:
                snapshot.keep(refs)
        return snapshot

    def add_references(
        self, class_name: str, images: Sequence[ImageInput], *, store: References | None = None
    ) -> ReferenceSet:
        """Add k >= 1 normal images of ``class_name`` as references; detect then fuses their map.

        With k >= 2 in all, the class's threshold is set from them (leave-one-out, see
        :mod:`kanoclip.references`) and recomputed whenever the model changes; it replaces a
        :meth:`calibrate` threshold, and the set's ``note`` says so.

        Args:
            class_name: the class, as for :meth:`detect`.
            images: paths, PIL images, arrays or bytes; another size than the test images is fine.
            store: where to keep them (default the model's own :attr:`reference_store`; the app
                passes a visitor's own).

        Returns:
            The class's :class:`~kanoclip.references.ReferenceSet`.

        Raises:
            ImageError: an image cannot be decoded (named; nothing is added).
            InputError: no images, too many, or NaN/Inf arrays.
        """
        store = self._store(store)
        name = self.canonical_class(class_name)[0]
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray, Image.Image)) or not len(images):
            raise InputError("images must be a non-empty list of normal images (paths, PIL images, arrays or bytes)")
        limit = self.config.references.max_per_class
        store.check_room(name, len(images), limit)  # before the encoding; checked again as they are added
        decoded = [load_image(_finite(image)) for image in images]  # all decoded before any is added
        visual = self._reference_features(decoded)
        return store.add(name, visual, [describe(image) for image in images], self, max_per_class=limit)

    def references(self, class_name: str, *, store: References | None = None) -> ReferenceSet | None:
        """The class's references and threshold, up to date for this model, or None."""
        return self._store(store).serving(self.canonical_class(class_name)[0], self)

    def remove_references(self, class_name: str, *, store: References | None = None) -> None:
        """Forget the class's references and its calibrated threshold."""
        (self.reference_store if store is None else store).remove(self.canonical_class(class_name)[0])

    def save_references(self, folder: str | os.PathLike[str]) -> Path:
        """Write the model's references to ``folder`` (load them with ``from_pretrained(references=folder)``)."""
        return self.reference_store.save(folder)

    def calibrate(
        self,
        class_name: str,
        images: Sequence[ImageInput],
        labels: Sequence[int] | None = None,
        *,
        store: References | None = None,
        batch_size: int = 8,
    ) -> float:
        """Set and return the class's threshold from validation images.

        With ``labels`` (0 normal, 1 anomalous): the F1-max threshold of their scores. Without:
        every image is taken as normal, and the threshold is their largest score plus
        ``references.margin``. The scores are the model's own, with the class's references if it
        has some. Images are decoded and scored ``batch_size`` at a time, and only their scores
        kept. Such a threshold cannot be recomputed: a change of the model (or new references)
        drops it, with a note.
        """
        store = self._store(store)
        name = self.canonical_class(class_name)[0]
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray, Image.Image)) or not len(images):
            raise InputError("calibration needs a non-empty list of images")
        if labels is not None and len(labels) != len(images):
            raise InputError(f"got {len(images)} images but {len(labels)} labels; give one label (0 or 1) per image")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        refs = store.serving(name, self)
        basis = refs.image_names if refs is not None else []
        scores = []
        for start in range(0, len(images), batch_size):
            chunk = [load_image(_finite(image)) for image in images[start : start + batch_size]]
            out, _ = self.infer(chunk, [name] * len(chunk), references=store)
            scores += out.score.float().clamp(0, 1).cpu().tolist()
        margin = self.config.references.margin
        if labels is None:
            threshold, source = float(min(max(scores) + margin, 1.0)), "normal"
            how = f"on {len(images)} normal images (largest score + {margin})"
        else:
            threshold, source = f1_max_threshold(np.array(scores), np.asarray(labels)), "labelled"
            how = f"on {len(images)} labelled images (F1-max)"
        store.set_threshold(name, threshold, source=source, how=how, scorer=self, basis=basis)  # type: ignore[arg-type]
        return threshold

    @torch.inference_mode()
    def _reference_features(self, images: Sequence[Image.Image], batch: int = 8) -> VisualFeatures:
        """Decoded images -> their CLIP-VV features (``batch`` at a time), kept by the store."""
        parts = [self.encode_image(self.pixel_values(images[s : s + batch])) for s in range(0, len(images), batch)]
        return VisualFeatures(
            global_feature=torch.cat([p.global_feature for p in parts]),
            stages=[torch.cat(stage) for stage in zip(*(p.stages for p in parts))],
            grid=parts[0].grid,
        )

    # ------------------------------------------------------------------ detection API
    @torch.inference_mode()
    def infer(
        self,
        images: Sequence[Image.Image],
        class_names: Sequence[str],
        *,
        sigma: float | None = None,
        references: References | None = None,
        knowledge: KnowledgeBase | None = None,
    ) -> tuple[KAnoCLIPOutput, VisualFeatures]:
        """Inference on decoded RGB images of canonical classes: eval mode, the backbone at :attr:`precision`.

        The tensor-level path shared by :meth:`detect_batch` and evaluation; maps are S×S.
        """
        visual = self.encode_images(images)
        return self.forward(visual, class_names, sigma=sigma, references=references, knowledge=knowledge), visual

    def detect(
        self,
        image: ImageInput,
        class_name: str,
        *,
        threshold: float | None = None,
        sigma: float | None = None,
        references: References | None = None,
        knowledge: KnowledgeBase | None = None,
    ) -> Detection:
        """Detect anomalies in one image of ``class_name`` (see :class:`~kanoclip.detection.Detection`)."""
        return self.detect_batch(
            [image], [class_name], threshold=threshold, sigma=sigma, references=references, knowledge=knowledge
        )[0]

    @torch.inference_mode()
    def detect_batch(
        self,
        images: Sequence[ImageInput],
        class_names: Sequence[str] | str,
        *,
        threshold: float | None = None,
        sigma: float | None = None,
        references: References | None = None,
        knowledge: KnowledgeBase | None = None,
    ) -> list[Detection]:
        """Detect anomalies in several images; ``class_names`` is one name or one per image.

        ``threshold`` (default: the class's calibrated one, else ``scoring.threshold``) decides
        ``is_anomalous``; ``references`` (default the model's own store) adds each class's normal
        references to its images' maps and scores. ``knowledge`` (default the model's
        :attr:`knowledge`) is the knowledge base of this call only (e.g. an app visitor's own copy):
        the model's is left as it is.
        """
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim <= 3  # one image's array, not a (B, H, W, 3) batch
        ):
            raise InputError(
                "images: a list is expected (of paths, PIL images, arrays or bytes); for one image use detect"
            )
        class_names = class_per_image(images, class_names)
        if not images:
            return []
        pil_images = [load_image(image) for image in images]
        visual = self.encode_images(pil_images)
        return self.detect_features(
            visual, pil_images, class_names, threshold=threshold, sigma=sigma, references=references,
            knowledge=knowledge, sources=[describe(image) for image in images],
        )  # fmt: skip

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> VisualFeatures:
        """CLIP-VV features of decoded RGB images in eval mode: the backbone forward of a detection.

        Args:
            images: decoded RGB images (any sizes; each is resized to :attr:`image_size`).

        Returns:
            fp32 :class:`~kanoclip.modeling.vv_attention.VisualFeatures` of the batch.
        """
        if self.training:
            self.eval()
        return self.encode_image(self.pixel_values(images))

    @torch.inference_mode()
    def detect_features(
        self,
        visual: VisualFeatures,
        images: Sequence[Image.Image],
        class_names: Sequence[str],
        *,
        threshold: float | None = None,
        sigma: float | None = None,
        references: References | None = None,
        knowledge: KnowledgeBase | None = None,
        sources: Sequence[str] | None = None,
    ) -> list[Detection]:
        """:meth:`detect_batch` from the images' features (:meth:`encode_images`), one class per image.

        So that a server can run one backbone forward for the images of several callers and
        build each caller's results with their own threshold, σ and references
        (:class:`kanoclip.serving.MicroBatcher`). Each class's references are read once, at the
        start: a concurrent :meth:`add_references` changes a later call, never half of this one.

        Args:
            visual: the images' features, batch order as ``images``.
            images: the decoded images (their sizes are the maps' sizes).
            class_names: one per image.
            threshold, sigma, references, knowledge: as for :meth:`detect_batch`.
            sources: how each result names its image (default: described from ``images``).

        Returns:
            One :class:`~kanoclip.detection.Detection` per image.
        """
        resolved = [self.canonical_class(name, knowledge) for name in class_names]
        classes = [c for c, _ in resolved]
        store = self._snapshot(self._store(references), classes)
        out = self.forward(visual, classes, sigma=sigma, references=store, knowledge=knowledge)
        # One device-to-host copy of each output per batch, not one per image (on a GPU, many
        # small copies and synchronisations would cost more than the maps themselves).
        scores = out.score.float().clamp(0, 1).cpu().tolist()
        anomaly_maps = out.anomaly_map.float().cpu()
        reference_maps_ = out.reference_map.float().cpu() if out.reference_map is not None else None
        model_maps = torch.cat([out.grid_maps, out.stage_maps[:, :, 1]], dim=1).cpu().numpy()  # (B, 2 + n, h, w)
        guidance = self._guidance(classes, out, visual, knowledge)
        sources = [describe(image) for image in images] if sources is None else sources
        detections = []
        for i, (pil, (name, known)) in enumerate(zip(images, resolved)):
            refs = store.stored(name)
            count = out.reference_counts[i] if out.reference_counts else 0
            default = self.config.scoring.threshold
            if threshold is not None:
                chosen, note = float(threshold), f"threshold {float(threshold):.3f}, given by the caller"
            elif refs is not None:
                chosen, note = float(refs.threshold if refs.calibrated else default), refs.describe(default)
            else:
                chosen, note = default, f"default threshold {default:.3f} (not calibrated)"
            size = (pil.height, pil.width)
            detections.append(
                Detection(
                    score=scores[i],
                    threshold=chosen,
                    anomaly_map=upsample_maps(anomaly_maps[i : i + 1], size)[0],
                    class_name=name,
                    known_class=known,
                    mode=self.mode,
                    guidance=guidance[i],
                    image=sources[i],
                    model_maps=model_maps[i],
                    reference_map=upsample_maps(reference_maps_[i : i + 1], size)[0] if count else None,
                    reference_count=count,
                    threshold_note=note,
                )
            )
        return detections

    def _guidance(
        self,
        classes: Sequence[str],
        out: KAnoCLIPOutput,
        visual: VisualFeatures,
        knowledge: KnowledgeBase | None = None,
    ) -> list[list[Guidance]]:
        """Each image's prompts ranked by similarity to the image and to its most anomalous patches."""
        image = F.normalize(out.global_feature.float(), dim=-1)  # (B, C)
        patches = visual.stages[-1]  # (B, L, C)
        grid_map = F.adaptive_avg_pool2d(out.anomaly_map[:, None].float(), visual.grid).flatten(1)  # (B, L)
        top = grid_map.topk(max(1, grid_map.shape[1] // 20), dim=1).indices  # (B, k): the top 5% of patches
        region = torch.gather(patches, 1, top[..., None].expand(-1, -1, patches.shape[-1])).mean(dim=1)
        # (B, 2, C) to the CPU at once; the similarities to a class's ~20 prompts are tiny products
        features = torch.stack([image, F.normalize(region, dim=-1)], dim=1).cpu()
        prompts = {name: self._class_text(name, knowledge) for name in dict.fromkeys(classes)}
        prompt_features = {name: texts.guidance_features.float().cpu() for name, texts in prompts.items()}
        ranked = []
        for name, feature in zip(classes, features):
            image_sim, region_sim = (feature @ prompt_features[name].T).tolist()
            items = [
                Guidance(text=t, source=src, state=state, image_similarity=a, region_similarity=r)  # type: ignore[arg-type]
                for (t, src, state), a, r in zip(prompts[name].guidance_texts, image_sim, region_sim)
            ]
            ranked.append(sorted(items, key=lambda g: g.image_similarity, reverse=True))
        return ranked


def _digest(texts: Sequence[str]) -> str:
    """A cache key for a list of texts (their SHA-256)."""
    return hashlib.sha256(json.dumps(list(texts)).encode("utf-8")).hexdigest()


def _knowledge_from(kb: str | os.PathLike[str] | KnowledgeBase | None, checkpoint_folder: Path | None) -> KnowledgeBase:
    if isinstance(kb, KnowledgeBase):
        return kb
    if kb is not None:
        return KnowledgeBase.load(kb)
    if checkpoint_folder is not None and (checkpoint_folder / KB_NAME).is_file():
        return KnowledgeBase.load(checkpoint_folder / KB_NAME)
    return KnowledgeBase.builtin()


def _model_on(
    backbone: Backbone, config: KAnoCLIPConfig, *, trained: bool, precision: str, int8_engine: str = "auto"
) -> KAnoCLIPModel:
    """The pure model on a loaded backbone (a config that does not fit it is one clear line)."""
    try:
        return KAnoCLIPModel(
            backbone.model, backbone.tokenizer, config, trained=trained,
            image_size=config.image_size or backbone.image_size, precision=precision, int8_engine=int8_engine,
            tower_engine=backbone.tower_engine,
        )  # fmt: skip
    except ValueError as exc:
        raise InputError(f"the config does not fit backbone {backbone.name!r}: {exc}") from None


def _finite(image: ImageInput) -> ImageInput:
    """``image``, refused in one line when it is an array holding NaN or Inf values."""
    if isinstance(image, np.ndarray) and image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputError("an image array holds NaN or infinite values; pass real pixel values")
    return image
