"""The KAnoCLIP model (paper Fig. 1), assembled from the paper's parts: a pure ``nn.Module``.

Tensors in, tensors out: CLIP-VV features of a normalised image batch (:meth:`encode_image`),
then maps and scores from those features and the [normal, abnormal] text features
(:meth:`forward`), and the joint loss (:meth:`losses`). It holds no images, caches, locks or
numpy; :class:`kanoclip.KAnoCLIP` (the service) decodes images, caches each class's text
features, and builds :class:`~kanoclip.detection.Detection` results around it.

Its mode is fixed when it is built (``trained``), never switched from outside:

* **trained** (a checkpoint is loaded, or the model is built to be trained): text = the learned
  prompts (:mod:`~kanoclip.modeling.prompts`), maps = Bi-CMCI over the 4 CLIP-VV stages
  (:mod:`~kanoclip.modeling.bicmci`), global feature through the Conv-Adapter
  (:mod:`~kanoclip.modeling.adapter`).
* **training-free** (:class:`~kanoclip.config.TrainingFreeConfig`): a symmetric state ensemble
  (the same templates for both states, WinCLIP-style), the class's knowledge-base descriptions
  joining the abnormal side, maps = CLIP-VV patch/text similarity on the V-V path of CLIP
  Surgery's length (6 blocks), weighted over the stages (default: the last one), global
  feature = CLIP's own.

Both end the same way (:mod:`~kanoclip.modeling.maps`): ``M^n, M^a`` = the stages' (weighted)
mean (eq. 9), ``M = G_σ(M^a + 1 − M^n)/2`` (eq. 10), score =
``(softmax(Î_G·F_textᵀ/τ)[abnormal] + max M) / 2`` (eq. 12, in [0, 1]). The backbone may run in
reduced precision (:mod:`~kanoclip.precision`); everything from the stage features on runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import CLIPModel, CLIPTokenizer

from kanoclip.config import KAnoCLIPConfig
from kanoclip.modeling.adapter import ConvAdapter
from kanoclip.modeling.bicmci import BiCMCI
from kanoclip.modeling.losses import kd_loss, total_loss
from kanoclip.modeling.maps import combine_maps, global_score, similarity_probabilities, stage_grid_maps, upsample
from kanoclip.modeling.prompts import PromptFeatures, PromptLearner, TextEncoder, mean_direction, state_ensemble
from kanoclip.modeling.vv_attention import CLIPVV, TowerEngine, VisualFeatures
from kanoclip.precision import backbone_autocast, full_precision, resolve_precision

TRAINABLE_MODULES = ("prompt_learner", "bicmci", "adapter")


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
    prompts: PromptFeatures | None = None  # the learned prompts' raw features per unique class (training)
    classes: list[str] = field(default_factory=list)  # the unique classes, in the order of ``prompts``
    # set by the service when normal references took part (kanoclip.references): (B, S, S), and k per image
    reference_map: torch.Tensor | None = None
    reference_counts: list[int] = field(default_factory=list)


@dataclass
class TrainingFreeText:
    """One class's training-free text side: the state ensemble and its features."""

    state: torch.Tensor  # (2, C) normalised [normal, abnormal] ensemble directions
    normal_texts: list[str]
    abnormal_texts: list[str]  # the template members only; descriptions are the caller's
    normal: torch.Tensor  # (N, C) raw features of normal_texts
    abnormal: torch.Tensor  # (A, C) raw features of abnormal_texts


class KAnoCLIPModel(nn.Module):
    """KAnoCLIP on a frozen transformers ``CLIPModel``: CLIP-VV, KnPL, Bi-CMCI, Conv-Adapter.

    Args:
        clip: the frozen backbone (its parameters are never trained).
        tokenizer: the backbone's tokenizer.
        config: the model's configuration.
        trained: the mode (see the module docstring); fixed for the model's life.
        image_size: the input size S (``config.image_size`` or the backbone's native size).
        precision: the backbone's precision (:mod:`kanoclip.precision`).
        int8_engine: what runs int8 (:func:`kanoclip.precision.resolve_int8_engine`).
        tower_engine: what runs the vision tower instead of torch (:mod:`kanoclip.onnx_vision`; None: torch).

    Raises:
        ValueError: the config does not fit the backbone (stage weights, V-V path length).
    """

    def __init__(
        self,
        clip: CLIPModel,
        tokenizer: CLIPTokenizer,
        config: KAnoCLIPConfig,
        *,
        trained: bool,
        image_size: int,
        precision: str = "auto",
        int8_engine: str = "auto",
        tower_engine: TowerEngine | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._trained = trained
        self.image_size = image_size
        self.requested_precision = precision
        self.requested_int8_engine = int8_engine
        self.tower_engine = tower_engine
        self.clip = clip  # frozen: requires_grad False, kept in eval mode by train()
        self.visual = CLIPVV(clip, config.vv)
        self.text_encoder = TextEncoder(clip, tokenizer)
        dim = int(clip.config.projection_dim)
        self.prompt_learner = PromptLearner(config.prompts, self.text_encoder)
        self.bicmci = BiCMCI(dim, len(self.visual.stage_layers), config.bicmci, config.scoring.temperature)
        self.adapter = ConvAdapter(dim, config.adapter)
        n_stages = len(self.visual.stage_layers)
        if len(config.training_free.stage_weights) != n_stages:
            raise ValueError(
                f"training_free.stage_weights has {len(config.training_free.stage_weights)} weights but the model has "
                f"{n_stages} stages (layers {list(self.visual.stage_layers)}); give one weight per stage"
            )
        self.visual.first_layer(config.training_free.num_replaced_blocks)  # checked against the depth now

    # ------------------------------------------------------------------ state
    @property
    def trained(self) -> bool:
        """The mode: learned prompts, Bi-CMCI and adapter (True) or the training-free recipe."""
        return self._trained

    @property
    def device(self) -> torch.device:
        """The device of the trainable weights (the adapter's), where inputs are moved."""
        return self.adapter.down.weight.device

    @property
    def precision(self) -> str:
        """The backbone's precision in force on the current device: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``."""
        return resolve_precision(self.requested_precision, self.device)

    @property
    def engine(self) -> str:
        """What runs the vision tower: ``"torch"``, or the tower engine's name (``"onnxruntime"``)."""
        return "torch" if self.tower_engine is None else self.tower_engine.name

    def train(self, mode: bool = True) -> KAnoCLIPModel:
        """``nn.Module.train`` for the trainable modules; the frozen backbone stays in eval mode.

        Args:
            mode: training (True) or evaluation (False) mode.

        Returns:
            ``self``.
        """
        super().train(mode)
        self.clip.eval()  # the backbone never leaves eval mode
        return self

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The trained parts, whatever the mode.

        Returns:
            ``{"prompt_learner": ..., "bicmci": ..., "adapter": ...}`` (:data:`TRAINABLE_MODULES`).
        """
        return {name: getattr(self, name) for name in TRAINABLE_MODULES}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only (what a checkpoint stores).

        Returns:
            ``{"<module>.<param>": tensor}`` over :meth:`trainable_modules`, e.g.
            ``"prompt_learner.ctx_normal"``: (K, D).
        """
        return {
            f"{name}.{k}": v
            for name, module in self.trainable_modules().items()
            for k, v in module.state_dict().items()
        }

    def num_replaced_blocks(self) -> int:
        """The V-V path's length in this mode.

        Returns:
            The number of replaced blocks: ``config.vv``'s when trained, else ``config.training_free``'s.
        """
        if self.trained:
            return self.visual.depth - self.visual.first_replaced + 1
        return self.config.training_free.num_replaced_blocks

    @property
    def image_token(self) -> str:
        """The CLS token of the global feature in this mode: ``vv.image_token`` or ``training_free.image_token``."""
        return self.config.vv.image_token if self.trained else self.config.training_free.image_token

    def stage_weight_values(self) -> list[float]:
        """Eq. 9's weights over the stages, summing to 1: equal when trained, the config's otherwise.

        Plain numbers (known when the graph is built, so an export bakes them in as constants).

        Returns:
            n weights, one per stage, in stage order.
        """
        raw = [1.0] * len(self.visual.stage_layers) if self.trained else list(self.config.training_free.stage_weights)
        return [w / sum(raw) for w in raw]

    def stage_weights(self) -> torch.Tensor:
        """:meth:`stage_weight_values` as a tensor.

        Returns:
            (n,) float32 weights on :attr:`device`.
        """
        return torch.tensor(self.stage_weight_values(), device=self.device)

    # ------------------------------------------------------------------ image side
    def encode_image(self, pixel_values: torch.Tensor, precision: str | None = None) -> VisualFeatures:
        """CLIP-VV features of a normalised batch for this mode's V-V path (frozen: no gradients).

        Args:
            pixel_values: ``(B, 3, S, S)``, normalised with the backbone's mean and std.
            precision: the backbone's autocast for this call only (None: :attr:`precision`); an ONNX
                export passes ``"fp32"`` rather than changing the setting other callers share.

        Returns:
            fp32 :class:`~kanoclip.modeling.vv_attention.VisualFeatures`; the backbone ran at :attr:`precision`:
            ``global_feature`` (B, C), ``stages`` n x (B, L, C), ``grid`` (h, w) with h * w == L.
        """
        n = self.num_replaced_blocks()
        return self.encode_image_paths(pixel_values, [n], precision)[n]

    def encode_image_paths(
        self, pixel_values: torch.Tensor, replaced: Sequence[int], precision: str | None = None
    ) -> dict[int, VisualFeatures]:
        """CLIP-VV features for several V-V path lengths from one backbone forward (sweeps use it).

        Args:
            pixel_values: ``(B, 3, S, S)``, normalised.
            replaced: the V-V path lengths wanted, each in [1, depth].
            precision: as for :meth:`encode_image`.

        Returns:
            ``{length: fp32 VisualFeatures}``, each as :meth:`encode_image`'s.

        Raises:
            ValueError: a length is outside [1, depth].
        """
        precision = self.precision if precision is None else precision
        engine = self.tower_engine if precision == "int8" else None
        with torch.no_grad(), backbone_autocast(precision, self.device):
            paths = self.visual.features(pixel_values.to(self.device), replaced, self.image_token, engine)
        return {
            n: VisualFeatures(
                global_feature=f.global_feature.float(), stages=[s.float() for s in f.stages], grid=f.grid
            )
            for n, f in paths.items()
        }

    # ------------------------------------------------------------------ text side
    def learned_prompts(self, class_names: Sequence[str]) -> PromptFeatures:
        """The LNPs' and LAPs' raw text features (eq. 1) for each class, with gradients.

        Args:
            class_names: the n_classes classes.

        Returns:
            :class:`~kanoclip.modeling.prompts.PromptFeatures`: ``normal`` (n_classes, n_normal_adjectives, C),
            ``abnormal`` (n_classes, n_abnormal_adjectives, C).
        """
        return self.prompt_learner(class_names)

    def training_free_text(self, class_name: str) -> TrainingFreeText:
        """The symmetric state ensemble of one class (no gradients), before any descriptions join it.

        Args:
            class_name: the class, as a dataset writes it.

        Returns:
            :class:`TrainingFreeText`: ``state`` (2, C) normalised [normal, abnormal] directions, the
            texts, and their raw fp32 features ``normal`` (N, C) and ``abnormal`` (A, C).
        """
        recipe = self.config.training_free
        normal_texts = state_ensemble(class_name, recipe.normal_states, recipe.templates)
        abnormal_texts = state_ensemble(class_name, recipe.abnormal_states, recipe.templates)
        with torch.no_grad():
            features = self.text_encoder.encode(normal_texts + abnormal_texts).float()
        normal, abnormal = features[: len(normal_texts)], features[len(normal_texts) :]
        state = torch.stack([mean_direction(normal), mean_direction(abnormal)])
        return TrainingFreeText(state, normal_texts, abnormal_texts, normal, abnormal)

    # ------------------------------------------------------------------ maps and scores
    def forward(self, visual: VisualFeatures, text: torch.Tensor, *, sigma: float | None = None) -> KAnoCLIPOutput:
        """Maps and scores from CLIP-VV features and text features, in this model's mode (eq. 9-12).

        Everything here runs in fp32, also under a caller's autocast.

        Args:
            visual: the features of :meth:`encode_image`: ``global_feature`` (B, C), ``stages``
                n x (B, L, C), ``grid`` (h, w).
            text: ``(B, 2, C)`` [normal, abnormal] text features of each image's class.
            sigma: G_σ of eq. 10, in pixels of S (None: ``config.scoring.sigma``).

        Returns:
            :class:`KAnoCLIPOutput` (without ``prompts``/``classes``, which the caller knows): ``score``
            (B,), ``anomaly_map``/``normal``/``abnormal`` (B, S, S), ``stage_maps`` (B, n, 2, h, w),
            ``grid_maps`` (B, 2, h, w), ``text`` (B, 2, C), ``global_feature`` (B, C).
        """
        with full_precision(self.device):
            visual = VisualFeatures(visual.global_feature.float(), [s.float() for s in visual.stages], visual.grid)
            text = text.float()
            sigma = self.config.scoring.sigma if sigma is None else sigma
            tau = self.config.scoring.temperature
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
        )

    def losses(
        self,
        out: KAnoCLIPOutput,
        knowledge: torch.Tensor,
        *,
        label: torch.Tensor,
        mask: torch.Tensor,
        has_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The joint loss of eq. 13 on a training forward, in fp32.

        Args:
            out: a forward of the trained mode whose ``prompts`` are set (the service sets them).
            knowledge: ``(n_classes, D, C)`` raw features of each class's knowledge-base
                descriptions, in the order of ``out.classes`` (eq. 3).
            label: ``(B,)`` 0/1 image labels.
            mask: ``(B, S, S)`` pixel ground truth.
            has_mask: ``(B,)`` which samples have pixel ground truth.

        Returns:
            ``{"total", "kd", "global", "local"}`` scalars (see :func:`~kanoclip.modeling.losses.total_loss`).

        Raises:
            ValueError: ``out.prompts`` is None (not a training forward).
        """
        if out.prompts is None:
            raise ValueError("losses need the learned prompts' features: run the forward in training mode")
        with full_precision(self.device):
            kd = kd_loss(knowledge, out.prompts.abnormal, out.prompts.normal)
            return total_loss(
                self.config.loss, kd=kd, score=out.score, label=label, normal=out.normal, abnormal=out.abnormal,
                mask=mask, has_mask=has_mask, stage_maps=out.stage_maps,
            )  # fmt: skip
