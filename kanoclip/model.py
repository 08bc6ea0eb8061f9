"""KAnoCLIP: the whole model (paper Fig. 1) and its public API.

``KAnoCLIP`` is an ``nn.Module`` whose parameters are the frozen CLIP backbone's plus the
trainable parts — the KnPL context vectors (:mod:`~kanoclip.prompts`), Bi-CMCI
(:mod:`~kanoclip.bicmci`) and the Conv-Adapter (:mod:`~kanoclip.adapter`).

Two modes:

* **trained** (a checkpoint is loaded, or after training): text = the learned prompts,
  maps = Bi-CMCI over the 4 CLIP-VV stages, global feature through the Conv-Adapter.
* **training-free** (no checkpoint; :class:`~kanoclip.config.TrainingFreeConfig`): a symmetric
  state ensemble (the same templates for both states, WinCLIP-style), the class's
  knowledge-base descriptions joining the abnormal side, maps = CLIP-VV patch/text similarity
  on the V-V path of CLIP Surgery's length (6 blocks), weighted over the stages (default: the
  last one), global feature = CLIP's own. This is what runs before anyone has trained.

Both end the same way: ``M^n, M^a`` = the stages' (weighted) mean (eq. 9),
``M = G_σ(M^a + 1 − M^n)/2`` (eq. 10), score = ``(softmax(Î_G·F_textᵀ/τ)[abnormal] + max M) / 2``
(eq. 12, in [0, 1]). The backbone may run in reduced precision (:mod:`~kanoclip.precision`);
everything from the stage features on runs in fp32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kanoclip.adapter import ConvAdapter
from kanoclip.backbone import Backbone, load_backbone
from kanoclip.bicmci import BiCMCI
from kanoclip.cache import LRUCache
from kanoclip.checkpoint import KB_NAME, read_checkpoint, write_checkpoint
from kanoclip.config import BACKBONE_ENV, KAnoCLIPConfig, with_overrides
from kanoclip.detection import Detection, Guidance, upsample_maps
from kanoclip.errors import CheckpointError, InputError
from kanoclip.images import ImageInput, describe, load_image, preprocess
from kanoclip.knowledge import KnowledgeBase
from kanoclip.maps import combine_maps, global_score, similarity_probabilities, stage_grid_maps, upsample
from kanoclip.precision import backbone_autocast, full_precision, resolve_precision
from kanoclip.prompts import PromptFeatures, PromptLearner, TextEncoder, mean_direction, state_ensemble
from kanoclip.vv_attention import CLIPVV, VisualFeatures

TRAINABLE_MODULES = ("prompt_learner", "bicmci", "adapter")
MAX_CLASS_CHARS = 1000  # longer names are cut before tokenising (the tokenizer cuts to 77 tokens anyway)


@dataclass
class KAnoCLIPOutput:
    """Tensors of one forward pass (S = the model's input size, n = number of stages)."""

    score: torch.Tensor  # (B,) in [0, 1], eq. 12 halved
    anomaly_map: torch.Tensor  # (B, S, S), eq. 10
    normal: torch.Tensor  # (B, S, S), M^n of eq. 9
    abnormal: torch.Tensor  # (B, S, S), M^a of eq. 9
    stage_maps: torch.Tensor  # (B, n, 2, h, w), each stage's [M_i^n, M_i^a] on the patch grid
    grid_maps: torch.Tensor  # (B, 2, h, w), [M^n, M^a] of eq. 9 on the patch grid
    text: torch.Tensor  # (B, 2, C) normalised [normal, abnormal] text features used
    global_feature: torch.Tensor  # (B, C), through the adapter in trained mode
    prompts: PromptFeatures | None  # learned prompts' raw features per unique class (when training)
    classes: list[str]  # the unique classes, in the order of ``prompts``


@dataclass
class _ClassText:
    """Cached text side of one class: state features and the guidance prompts' features."""

    state: torch.Tensor  # (2, C) normalised [normal, abnormal]
    guidance_texts: list[tuple[str, str, str]]  # (text, source, state)
    guidance_features: torch.Tensor  # (G, C) normalised


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class KAnoCLIP(nn.Module):
    """KAnoCLIP on a frozen transformers CLIP. Build it with :meth:`from_pretrained`."""

    def __init__(
        self, backbone: Backbone, config: KAnoCLIPConfig, knowledge: KnowledgeBase | None = None, *, precision: str = "auto"
    ) -> None:
        super().__init__()
        self.config = config
        self.requested_precision = precision
        self._backbone = backbone  # kept for :meth:`variant`, which shares it
        self.backbone_name = backbone.name
        self.random_backbone = backbone.random_init
        self.tokenizer = backbone.tokenizer
        self.image_mean, self.image_std = backbone.image_mean, backbone.image_std
        self.image_size = config.image_size or backbone.image_size
        self.clip = backbone.model  # frozen: requires_grad False, kept in eval mode by train()
        self.visual = CLIPVV(self.clip, config.vv)
        self.text_encoder = TextEncoder(self.clip, self.tokenizer)
        dim = int(self.clip.config.projection_dim)
        self.prompt_learner = PromptLearner(config.prompts, self.text_encoder)
        self.bicmci = BiCMCI(dim, len(self.visual.stage_layers), config.bicmci, config.scoring.temperature)
        self.adapter = ConvAdapter(dim, config.adapter)
        n_stages = len(self.visual.stage_layers)
        if len(config.training_free.stage_weights) != n_stages:
            raise InputError(
                f"training_free.stage_weights has {len(config.training_free.stage_weights)} weights but the model has "
                f"{n_stages} stages (layers {list(self.visual.stage_layers)}); give one weight per stage"
            )
        self.visual.first_layer(config.training_free.num_replaced_blocks)  # checked against the depth now
        self.knowledge = knowledge or KnowledgeBase.builtin()
        self.trained = False  # set by a loaded checkpoint or by training
        self.checkpoint_name: str | None = None
        # Per-class text caches, bounded (LRU, config.cache) and emptied in one place: _invalidate.
        self._text_cache: LRUCache[tuple[str, str], _ClassText] = LRUCache(config.cache.max_classes)
        self._knowledge_cache: LRUCache[str, torch.Tensor] = LRUCache(config.cache.max_classes)

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
        overrides: Mapping[str, Any] | None = None,
    ) -> KAnoCLIP:
        """Load a model: training-free with ``checkpoint=None``, else a checkpoint folder or hub id.

        ``backbone`` defaults to ``$KANOCLIP_BACKBONE``, else the checkpoint's (or ViT-L/14@336px);
        ``kb`` defaults to the checkpoint's knowledge base (or the built-in one).
        ``backbone_cache``, a mapping the caller owns, lets several models (say, training-free and
        a checkpoint) share one frozen backbone in memory instead of loading it once each.
        ``precision``: the backbone's precision, see :mod:`kanoclip.precision` (``model.precision``
        says which is in force). ``overrides``: dotted config paths applied on top of ``config``
        or the checkpoint's, e.g. ``{"training_free.stage_weights": (0, 0, 0, 1)}``
        (:func:`kanoclip.config.with_overrides`).
        """
        files = read_checkpoint(checkpoint, cache_dir=cache_dir) if checkpoint is not None else None
        cfg = config or (files.config if files else KAnoCLIPConfig())
        if overrides:
            try:
                cfg = with_overrides(cfg, overrides)
            except ValueError as exc:
                raise InputError(f"config override: {exc}") from None
        # backbone: the argument, else $KANOCLIP_BACKBONE (e.g. a local copy of the checkpoint's
        # hub backbone), else the checkpoint's or the config's; shapes are checked on load.
        cfg = replace(cfg, backbone=backbone or os.environ.get(BACKBONE_ENV) or cfg.backbone)
        knowledge = _knowledge_from(kb, files.folder if files else None)
        torch_device = resolve_device(device)
        resolve_precision(precision, torch_device)  # a precision the device cannot run fails before loading
        key = (cfg.backbone, str(torch_device))
        loaded = backbone_cache.get(key) if backbone_cache is not None else None
        if loaded is None:
            loaded = load_backbone(cfg.backbone, device=torch_device, cache_dir=cache_dir)
            if backbone_cache is not None:
                backbone_cache[key] = loaded
        model = cls(loaded, cfg, knowledge, precision=precision)
        model.to(torch_device)
        if files is not None:
            model.load_trainable_state_dict(files.state_dict, source=str(files.folder), trained_backbone=files.config.backbone)
            model.checkpoint_name = str(checkpoint)
        return model.eval()  # like transformers' from_pretrained: ready for inference

    def variant(self, overrides: Mapping[str, Any]) -> KAnoCLIP:
        """A model that differs from this one by config ``overrides`` and shares its backbone and weights.

        Used by sweeps (``kanoclip eval --sweep``), which run every variant on one backbone forward
        per image; so a variant may not change what that forward computes (``backbone``,
        ``image_size``, ``vv.stage_layers``, ``vv.position_interpolation``) nor the shapes of the
        trained parts.

        Args:
            overrides: dotted config paths and values, as for :meth:`from_pretrained`.

        Returns:
            A model in the same mode, in eval mode, on the same device.
        """
        fixed = sorted(set(overrides) & {"backbone", "image_size", "vv.stage_layers", "vv.position_interpolation"})
        if fixed:
            raise InputError(f"a sweep variant cannot set {', '.join(fixed)}: all variants share one backbone pass; evaluate that setting on its own with --set")
        try:
            config = with_overrides(self.config, overrides)
        except ValueError as exc:
            raise InputError(f"config override: {exc}") from None
        other = type(self)(self._backbone, config, self.knowledge, precision=self.requested_precision).to(self.device)
        if self.trained:
            try:
                other.load_trainable_state_dict(self.trainable_state_dict(), source="the trained weights")
            except CheckpointError:
                raise InputError("a sweep variant cannot change the shapes of the trained parts (e.g. bicmci.dim, prompts.n_ctx)") from None
        other.checkpoint_name = self.checkpoint_name
        return other.eval()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in TRAINABLE_MODULES}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only, keyed ``<module>.<param>`` (what a checkpoint stores)."""
        return {f"{name}.{k}": v for name, module in self.trainable_modules().items() for k, v in module.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "checkpoint", trained_backbone: str | None = None) -> None:
        """Load trainable weights after checking names and shapes; switches to trained mode."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            detail = (
                f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)})"
                if wrong
                else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
            trained_for = f" it was trained for backbone {trained_backbone!r}," if trained_backbone else ""
            raise CheckpointError(
                f"{source} does not fit this model:{trained_for} this model uses {self.backbone_name!r} ({detail}); "
                "load it with the backbone it was trained on"
            )
        for name, module in self.trainable_modules().items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        self.trained = True
        self._invalidate()

    def save_pretrained(self, folder: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint folder: config, trainable safetensors, knowledge base (atomically)."""
        meta = {"random_backbone": self.random_backbone, **(metadata or {})}
        return write_checkpoint(folder, self.config, self.trainable_state_dict(), self.knowledge.to_dict(), meta)

    # ------------------------------------------------------------------ state
    @property
    def mode(self) -> Literal["training-free", "trained"]:
        return "trained" if self.trained else "training-free"

    @property
    def device(self) -> torch.device:
        return self.adapter.down.weight.device

    def train(self, mode: bool = True) -> KAnoCLIP:
        if mode != self.training:  # the learned parts may change (or have changed) meanwhile
            self._invalidate()
        super().train(mode)
        self.clip.eval()  # the backbone never leaves eval mode
        return self

    def _invalidate(self, *, descriptions: bool = False) -> None:
        """Empty the per-class text cache (and the description features'): the one place they are emptied.

        The state features depend on the learned prompts (new weights, a change between training
        and inference); the description features on the knowledge base, device and dtype only.
        """
        self._text_cache.clear()
        if descriptions:
            self._knowledge_cache.clear()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to()/.cuda()/.half() end here: cached text features belong to the old device and dtype
        self._invalidate(descriptions=True)
        return super()._apply(fn, recurse)

    def set_knowledge(self, knowledge: KnowledgeBase) -> None:
        """Use another knowledge base (e.g. after editing it in the app)."""
        self.knowledge = knowledge
        self._invalidate(descriptions=True)

    @property
    def precision(self) -> str:
        """The backbone's precision in force on the current device: ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
        return resolve_precision(self.requested_precision, self.device)

    def backbone_autocast(self):
        """The autocast context of the backbone's forward at :attr:`precision` (nothing for fp32)."""
        return backbone_autocast(self.precision, self.device)

    def num_replaced_blocks(self) -> int:
        """The V-V path's length in the current mode: ``config.vv``'s when trained, else ``config.training_free``'s."""
        if self.trained:
            return self.visual.depth - self.visual.first_replaced + 1
        return self.config.training_free.num_replaced_blocks

    def stage_weights(self) -> torch.Tensor:
        """Eq. 9's weights over the stages, summing to 1: equal when trained, the config's otherwise."""
        n = len(self.visual.stage_layers)
        weights = torch.ones(n) if self.trained else torch.tensor(self.config.training_free.stage_weights)
        return (weights / weights.sum()).to(self.device)

    # ------------------------------------------------------------------ forward
    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Decoded RGB images -> the model's normalised input ``(B, 3, S, S)`` on its device."""
        return preprocess(list(images), self.image_size, self.image_mean, self.image_std, device=self.device)

    def encode_image(self, pixel_values: torch.Tensor) -> VisualFeatures:
        """CLIP-VV features of a normalised batch ``(B, 3, S, S)`` for the current mode (frozen: no gradients).

        The backbone runs at :attr:`precision`; the features come out in fp32.
        """
        n = self.num_replaced_blocks()
        return self.encode_image_paths(pixel_values, [n])[n]

    def encode_image_paths(self, pixel_values: torch.Tensor, replaced: Sequence[int]) -> dict[int, VisualFeatures]:
        """CLIP-VV features for several V-V path lengths from one backbone forward (used by sweeps)."""
        with torch.no_grad(), self.backbone_autocast():
            paths = self.visual.features(pixel_values.to(self.device), replaced)
        return {
            n: VisualFeatures(global_feature=f.global_feature.float(), stages=[s.float() for s in f.stages], grid=f.grid)
            for n, f in paths.items()
        }

    def forward(self, visual: VisualFeatures, class_names: Sequence[str], *, sigma: float | None = None) -> KAnoCLIPOutput:
        """Maps and scores from CLIP-VV features, in the model's current mode.

        In trained mode and ``self.training``, the learned prompts are encoded anew so gradients
        reach them, Bi-CMCI and the adapter (used by training); otherwise the text side comes
        from the per-class cache. Everything here runs in fp32, also under a caller's autocast.
        """
        with full_precision(self.device):
            return self._forward(visual, class_names, sigma)

    def _forward(self, visual: VisualFeatures, class_names: Sequence[str], sigma: float | None) -> KAnoCLIPOutput:
        visual = VisualFeatures(visual.global_feature.float(), [s.float() for s in visual.stages], visual.grid)
        sigma = self.config.scoring.sigma if sigma is None else sigma
        classes = list(dict.fromkeys(class_names))
        index = torch.tensor([classes.index(c) for c in class_names], device=self.device)
        tau = self.config.scoring.temperature
        prompts = None
        if self.trained and self.training:  # learning the prompts: text features with gradients
            prompts = self.prompt_learner(classes)
            text = prompts.state_features()[index]  # (B, 2, C)
        else:  # inference: each class's text features are computed once and cached
            text = torch.stack([self._class_text(c).state for c in classes])[index]
        if self.trained:
            probs = self.bicmci(visual.stages, text, visual.grid)
            global_feature = self.adapter(visual.global_feature)
        else:
            probs = [similarity_probabilities(stage, text, tau) for stage in visual.stages]
            global_feature = visual.global_feature
        stage_maps = stage_grid_maps(probs, visual.grid)  # (B, n, 2, h, w)
        # Eq. 9 with Norm = the stages' weighted mean, taken on the grid before upsampling to
        # S x S: bilinear upsampling is linear, so this equals the mean of the upsampled stage
        # maps, for a quarter of the upsampling work.
        grid_maps = torch.einsum("n,bnkhw->bkhw", self.stage_weights(), stage_maps)  # (B, 2, h, w)
        normal, abnormal = upsample(grid_maps, (self.image_size, self.image_size)).unbind(dim=1)  # (B, S, S) each
        anomaly_map = combine_maps(normal, abnormal, sigma)  # eq. 10
        score = global_score(global_feature, text, anomaly_map, tau)  # eq. 12
        return KAnoCLIPOutput(
            score=score,
            anomaly_map=anomaly_map,
            normal=normal,
            abnormal=abnormal,
            stage_maps=stage_maps,
            grid_maps=grid_maps,
            text=text,
            global_feature=global_feature,
            prompts=prompts,
            classes=classes,
        )

    def knowledge_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """Mean raw CLIP text feature of each class's knowledge-base descriptions (eq. 3's LLM + VQA; any source), ``(n, 1, C)``."""
        return torch.stack([self.description_features(name).mean(dim=0, keepdim=True) for name in class_names])

    def description_features(self, class_name: str) -> torch.Tensor:
        """Raw CLIP text features of a class's knowledge-base descriptions, ``(D, C)``, encoded once.

        Shared by the knowledge-distillation target (eq. 3) and the text side of inference, so
        training never encodes the same descriptions twice.
        """
        def encode() -> torch.Tensor:
            with torch.no_grad():
                return self.text_encoder.encode([d.text for d in self.knowledge.descriptions(class_name)]).float()

        return self._knowledge_cache.get_or_compute(class_name, encode)

    # ------------------------------------------------------------------ text side (cached per class)
    def canonical_class(self, class_name: str) -> tuple[str, bool]:
        """(the class to use, whether the knowledge base knows it) for a user's class text."""
        if not isinstance(class_name, str) or not class_name.strip():
            raise InputError("class name is empty; type what the image shows, e.g. 'bottle'")
        text = " ".join(class_name.split())[:MAX_CLASS_CHARS]
        resolved = self.knowledge.resolve(text)
        return (resolved, True) if resolved else (text, False)

    def _class_text(self, class_name: str) -> _ClassText:
        def build() -> _ClassText:
            with torch.no_grad():
                return self._build_class_text(class_name)

        return self._text_cache.get_or_compute((self.mode, class_name), build)

    def _build_class_text(self, class_name: str) -> _ClassText:
        descriptions = self.knowledge.descriptions(class_name)
        kb_texts = [(d.text, d.source, "abnormal") for d in descriptions]
        kb_features = self.description_features(class_name)
        if self.trained:
            prompts = self.prompt_learner([class_name])
            state = prompts.state_features()[0]
            learned = [
                (text, "learned", state_name)
                for state_name, abnormal in (("normal", False), ("abnormal", True))
                for text in self.prompt_learner.prompt_texts(class_name, abnormal)
            ]
            guidance_texts = learned + kb_texts
            guidance = torch.cat([prompts.normal[0], prompts.abnormal[0], kb_features])
        else:
            # The symmetric state ensemble; the descriptions join the abnormal side as members.
            recipe = self.config.training_free
            normal_texts = state_ensemble(class_name, recipe.normal_states, recipe.templates)
            abnormal_texts = state_ensemble(class_name, recipe.abnormal_states, recipe.templates)
            features = self.text_encoder.encode(normal_texts + abnormal_texts).float()
            normal_features, abnormal_features = features[: len(normal_texts)], features[len(normal_texts) :]
            if not recipe.use_descriptions:
                kb_texts, kb_features = [], kb_features[:0]
            state = torch.stack([mean_direction(normal_features), mean_direction(torch.cat([abnormal_features, kb_features]))])
            guidance_texts = (
                [(t, "template", "normal") for t in normal_texts] + [(t, "template", "abnormal") for t in abnormal_texts] + kb_texts
            )
            guidance = torch.cat([normal_features, abnormal_features, kb_features])
        return _ClassText(state=state, guidance_texts=guidance_texts, guidance_features=F.normalize(guidance, dim=-1))

    # ------------------------------------------------------------------ detection API
    @torch.inference_mode()
    def infer(self, images: Sequence[Image.Image], class_names: Sequence[str], *, sigma: float | None = None) -> tuple[KAnoCLIPOutput, VisualFeatures]:
        """Inference on decoded RGB images of canonical classes: eval mode, the backbone at :attr:`precision`.

        The tensor-level path shared by :meth:`detect_batch` and evaluation; maps are S×S.
        """
        if self.training:
            self.eval()
        visual = self.encode_image(self.pixel_values(images))
        return self.forward(visual, class_names, sigma=sigma), visual

    def detect(self, image: ImageInput, class_name: str, *, threshold: float | None = None, sigma: float | None = None) -> Detection:
        """Detect anomalies in one image of ``class_name`` (see :class:`~kanoclip.detection.Detection`)."""
        return self.detect_batch([image], [class_name], threshold=threshold, sigma=sigma)[0]

    @torch.inference_mode()
    def detect_batch(
        self,
        images: Sequence[ImageInput],
        class_names: Sequence[str] | str,
        *,
        threshold: float | None = None,
        sigma: float | None = None,
    ) -> list[Detection]:
        """Detect anomalies in several images; ``class_names`` is one name or one per image."""
        if isinstance(class_names, str):
            class_names = [class_names] * len(images)
        if len(class_names) != len(images):
            raise InputError(f"got {len(images)} images but {len(class_names)} class names; pass one class name or one per image")
        if not images:
            return []
        resolved = [self.canonical_class(name) for name in class_names]
        pil_images = [load_image(image) for image in images]
        classes = [c for c, _ in resolved]
        out, visual = self.infer(pil_images, classes, sigma=sigma)
        threshold = self.config.scoring.threshold if threshold is None else float(threshold)
        # One device-to-host copy of each output per batch, not one per image (on a GPU, many
        # small copies and synchronisations would cost more than the maps themselves).
        scores = out.score.float().clamp(0, 1).cpu().tolist()
        anomaly_maps = out.anomaly_map.float().cpu()
        model_maps = torch.cat([out.grid_maps, out.stage_maps[:, :, 1]], dim=1).cpu().numpy()  # (B, 2 + n, h, w)
        guidance = self._guidance(classes, out, visual)
        return [
            Detection(
                score=scores[i],
                threshold=threshold,
                anomaly_map=upsample_maps(anomaly_maps[i : i + 1], (pil.height, pil.width))[0],
                class_name=name,
                known_class=known,
                mode=self.mode,
                guidance=guidance[i],
                image=describe(images[i]),
                model_maps=model_maps[i],
            )
            for i, (pil, (name, known)) in enumerate(zip(pil_images, resolved))
        ]

    def _guidance(self, classes: Sequence[str], out: KAnoCLIPOutput, visual: VisualFeatures) -> list[list[Guidance]]:
        """Each image's prompts ranked by similarity to the image and to its most anomalous patches."""
        image = F.normalize(out.global_feature.float(), dim=-1)  # (B, C)
        patches = visual.stages[-1]  # (B, L, C)
        grid_map = F.adaptive_avg_pool2d(out.anomaly_map[:, None].float(), visual.grid).flatten(1)  # (B, L)
        top = grid_map.topk(max(1, grid_map.shape[1] // 20), dim=1).indices  # (B, k): the top 5% of patches
        region = torch.gather(patches, 1, top[..., None].expand(-1, -1, patches.shape[-1])).mean(dim=1)
        # (B, 2, C) to the CPU at once; the similarities to a class's ~20 prompts are tiny products
        features = torch.stack([image, F.normalize(region, dim=-1)], dim=1).cpu()
        prompts = {name: self._class_text(name) for name in dict.fromkeys(classes)}
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


def _knowledge_from(kb: str | os.PathLike[str] | KnowledgeBase | None, checkpoint_folder: Path | None) -> KnowledgeBase:
    if isinstance(kb, KnowledgeBase):
        return kb
    if kb is not None:
        return KnowledgeBase.load(kb)
    if checkpoint_folder is not None and (checkpoint_folder / KB_NAME).is_file():
        return KnowledgeBase.load(checkpoint_folder / KB_NAME)
    return KnowledgeBase.builtin()
