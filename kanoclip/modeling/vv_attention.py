"""CLIP-VV: CLIP's vision encoder with the V-V attention path of CLIP Surgery (paper §2.3).

In each replaced block l, a second ("local-aware") path runs beside the original one:

    V_l = W_v · LN1(S^ori_{l-1})                                    (eq. 7; LN1 is the block's own)
    S_l = Project_l( softmax(V_l · V_lᵀ · scale) · V_l ) + S_{l-1}   (eq. 4, 8; no MLP)

``S^ori`` is the original path, left untouched; the V-V path starts from the original hidden
state at the input of the first replaced block. ``V_l`` is exactly the value projection the
original attention computes, so it is captured from the original forward (a hook on the
block's ``v_proj``) rather than computed twice. ``Project_l`` is the block's ``out_proj``.

The capture belongs to the call, so that any number of threads may share one backbone (and
several CLIP-VV views of it, e.g. models sharing it through ``backbone_cache``): the hooks are
installed once per module and stay; each call puts its own :class:`_Capture` record in a
``contextvars.ContextVar`` for the length of its forward, and a hook writes only into the
record of the context it fires in (PyTorch fires every hook of a module, whichever thread runs
it, and a thread's context is its own). With no record (a plain backbone forward, another
thread's call between two of ours) the hooks do nothing.

Input sizes other than the backbone's (``KAnoCLIPConfig.image_size``, e.g. 518 on a 336
backbone) resize the position embeddings of the patch grid: bicubically like transformers'
``interpolate_pos_encoding=True``, or bilinearly like CLIP Surgery and AnomalyCLIP
(``VVConfig.position_interpolation``). So that the choice lives in one place, CLIP-VV embeds
the patches itself and runs the library's ``pre_layrnorm``, encoder blocks and
``post_layernorm`` (the hooks above stay on the library's blocks).

The tower's part (:meth:`CLIPVV.tokens`: everything up to each path's tokens) is apart from their
post-layernorm and projection, so another runtime can run the tower: ``precision="int8"`` on
onnxruntime exports exactly :meth:`CLIPVV.tokens` (:mod:`kanoclip.onnx_vision`, a ``TowerEngine``).

Outputs (C = the joint embedding width, L = number of patches):
  * global feature ``(B, C)``: the original path's CLS through ``post_layernorm`` and the visual
    projection (= ``CLIPModel.get_image_features``);
  * 4 stage patch features ``(B, L, C)``: the V-V path's tokens 1: after the stage layers,
    each through ``post_layernorm`` and the visual projection.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from kanoclip.cache import LRUCache
from kanoclip.config import VVConfig

POSITION_CACHE_SIZE = 4  # resized position tables kept by a CLIPVV (one per input size)


@dataclass
class _Capture:
    """What one call records from the original forward, and which modules it reads it from.

    ``wanted`` maps a module of the backbone (a block, or a block's ``v_proj``) to where its
    tensor goes: ``("start", l)`` the input of block l, ``("values", l)`` block l's ``V_l``,
    ``("outputs", l)`` block l's output. Keyed by module, so a record only ever takes tensors of
    the modules its own call asked for.
    """

    wanted_inputs: dict[torch.nn.Module, int]  # block -> l, whose input is kept as start[l]
    wanted_outputs: dict[torch.nn.Module, tuple[str, int]]  # block or v_proj -> (kind, l)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    start: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


# The calling context's record (None: not capturing). A ContextVar, not a thread-local: a value
# set in one thread (or asyncio task) is never seen by another.
_RECORD: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("kanoclip_vv_capture", default=None)
_INSTALL_LOCK = threading.Lock()  # two views built at once on one backbone install its hooks once


def _keep_input(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of every block: its input, when the calling context's record wants it."""
    record = _RECORD.get()
    if record is not None and module in record.wanted_inputs:
        record.start[record.wanted_inputs[module]] = args[0]


def _keep_output(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook of every block and ``v_proj``: its output, when the calling context's record wants it."""
    record = _RECORD.get()
    if record is not None:
        wanted = record.wanted_outputs.get(module)
        if wanted is not None:
            kind, layer = wanted
            getattr(record, kind)[layer] = output


def _install_hooks(layers: Sequence[torch.nn.Module]) -> None:
    """The capture hooks on every block and ``v_proj`` that lacks them (once per module, for good).

    A module copied with its hooks (``copy.deepcopy``, as the int8 copy is made) keeps them, and
    a module replaced afterwards (the int8 copy's quantised ``v_proj``) gets its own.
    """
    with _INSTALL_LOCK:
        for layer in layers:
            if _keep_input not in layer._forward_pre_hooks.values():
                layer.register_forward_pre_hook(_keep_input)
            for module in (layer, layer.self_attn.v_proj):
                if _keep_output not in module._forward_hooks.values():
                    module.register_forward_hook(_keep_output)


@dataclass
class VisualFeatures:
    """What CLIP-VV gives the rest of the model."""

    global_feature: torch.Tensor  # (B, C) projected CLS of the original path
    stages: list[torch.Tensor]  # n_stages x (B, L, C) projected V-V patch tokens
    grid: tuple[int, int]  # (h, w) patch grid, h * w == L

    def select(self, rows: Sequence[int]) -> VisualFeatures:
        """The features of some images of the batch.

        Args:
            rows: batch indices, in the order wanted.

        Returns:
            :class:`VisualFeatures` of ``len(rows)`` images.
        """
        index = torch.as_tensor(list(rows), device=self.global_feature.device)
        return VisualFeatures(self.global_feature[index], [stage[index] for stage in self.stages], self.grid)


@dataclass
class PathTokens:
    """One V-V path's tokens before post-layernorm and the visual projection (width = the tower's)."""

    cls: torch.Tensor  # (B, width) the global feature's token: the original path's CLS, or S_l[0] ("vv")
    stages: list[torch.Tensor]  # n_stages x (B, L, width) the stages' patch tokens


class TowerEngine(Protocol):
    """Something that runs :meth:`CLIPVV.tokens` for a view, e.g. on another runtime (kanoclip.onnx_vision)."""

    name: str

    def tokens(
        self, visual: CLIPVV, pixel_values: torch.Tensor, replaced: Sequence[int | None], image_token: str
    ) -> dict[int | None, PathTokens]: ...


class CLIPVV:
    """A view of CLIP's frozen vision tower that adds the V-V dual path.

    It owns no parameters (it is not an ``nn.Module``): the weights stay in the ``CLIPModel``.

    Args:
        clip: the frozen backbone whose vision tower and ``visual_projection`` are used.
        config: the stage layers, the V-V path's length and the position interpolation.
        vv_enabled: False makes the stages the original path's tokens (the CLIP-VV ablation).

    Raises:
        ValueError: ``config`` does not fit the backbone's depth (from ``VVConfig.resolve``).
    """

    def __init__(self, clip: CLIPModel, config: VVConfig, vv_enabled: bool = True) -> None:
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.depth = len(self.vision_model.encoder.layers)
        self.first_replaced, self.stage_layers = config.resolve(self.depth)
        self.patch_size = int(clip.config.vision_config.patch_size)
        _install_hooks(self.vision_model.encoder.layers)
        self.position_interpolation = config.position_interpolation
        self._positions: LRUCache[tuple, torch.Tensor] = LRUCache(POSITION_CACHE_SIZE)  # resized position tables
        # With the V-V path off the "stages" are the original path's tokens: the ablation
        # of Table 3's CLIP-VV column, and the check that the original path is untouched.
        self.vv_enabled = vv_enabled

    def first_layer(self, num_replaced_blocks: int | None) -> int:
        """The first replaced layer (1-based) for a V-V path of ``num_replaced_blocks`` blocks.

        Args:
            num_replaced_blocks: the V-V path's length, in [1, depth] (None: the config's).

        Returns:
            ``depth − num_replaced_blocks + 1``, or the config's first replaced layer.

        Raises:
            ValueError: ``num_replaced_blocks`` is outside [1, depth].
        """
        if num_replaced_blocks is None:
            return self.first_replaced
        if not 1 <= num_replaced_blocks <= self.depth:
            raise ValueError(
                f"num_replaced_blocks must be in [1, {self.depth}] for this backbone, got {num_replaced_blocks}"
            )
        return self.depth - num_replaced_blocks + 1

    @contextmanager
    def _capture(self, starts: set[int]):
        """Record, during the original forward of this call only, what the V-V paths and the stages need.

        ``starts`` holds the first replaced layer of each V-V path wanted (empty: none).
        ``values[l]``: block l's value projection ``V_l``; ``start[f]``: the input of block f;
        ``outputs[l]``: the original path's output of block l, for stages that some path takes
        from the original path. Hooks rather than ``output_hidden_states``, which would keep
        every layer's tokens (measurably slower on ViT-L); the record is the calling context's
        own (see the module docstring).
        """
        layers = self.vision_model.encoder.layers
        outputs: dict[torch.nn.Module, tuple[str, int]] = {}
        if starts:
            for layer in range(min(starts), self.stage_layers[-1] + 1):
                outputs[layers[layer - 1].self_attn.v_proj] = ("values", layer)
        for layer in self.stage_layers:
            if not starts or layer < max(starts):
                outputs[layers[layer - 1]] = ("outputs", layer)
        record = _Capture(wanted_inputs={layers[first - 1]: first for first in starts}, wanted_outputs=outputs)
        token = _RECORD.set(record)
        try:
            yield record
        finally:
            _RECORD.reset(token)

    def _vv_attention(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        """``Project_l(softmax(V Vᵀ · scale) V)`` for one block; ``values``: (B, T, width)."""
        attn = self.vision_model.encoder.layers[layer - 1].self_attn
        b, t, _ = values.shape
        v = values.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(v, v, v, scale=attn.scale)  # (B, heads, T, head_dim)
        return attn.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embeddings of a ``grid`` of patches plus CLS: ``(1, 1 + h*w, width)``.

        The backbone's own at its native grid; else its patch part resized to ``grid`` with
        ``F.interpolate`` (``position_interpolation``, ``align_corners=False`` as transformers).
        Resizing ViT-L/14@336's table (24x24 -> 37x37 for 518 px) took about 9 ms on one CPU
        thread, a visible share of a GPU batch, so the last few sizes are kept; the key holds
        the table's storage and version, so new weights, devices or dtypes compute it anew.

        Args:
            grid: (h, w) the patch grid of the input.

        Returns:
            (1, 1 + h*w, width) position embeddings, CLS first (detached from the weights).
        """
        table = self.vision_model.embeddings.position_embedding.weight.detach().unsqueeze(0)  # (1, 1 + n*n, width)
        side = math.isqrt(table.shape[1] - 1)
        if grid == (side, side):
            return table
        key = (grid, table.data_ptr(), table._version, table.device, table.dtype)

        def resize() -> torch.Tensor:
            patches = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, width, n, n)
            patches = F.interpolate(patches, size=grid, mode=self.position_interpolation, align_corners=False)
            return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

        return self._positions.get_or_compute(key, resize)

    def _embed(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """CLS and patch embeddings plus position embeddings, as ``CLIPVisionEmbeddings``: (B, T, width)."""
        embeddings = self.vision_model.embeddings
        patches = embeddings.patch_embedding(pixel_values.to(dtype=embeddings.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls = embeddings.class_embedding.expand(pixel_values.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embeddings(grid)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Post-layernorm and visual projection, as for CLIP's CLS token.

        Args:
            tokens: (..., width) vision-tower tokens.

        Returns:
            (..., C) projected features.
        """
        return self.visual_projection(self.vision_model.post_layernorm(tokens))

    def __call__(self, pixel_values: torch.Tensor, num_replaced_blocks: int | None = None) -> VisualFeatures:
        """Global and stage features of one V-V path length.

        Args:
            pixel_values: (B, 3, S, S), normalised; the grid is S // patch size a side.
            num_replaced_blocks: the V-V path's length (None: the config's).

        Returns:
            :class:`VisualFeatures`: ``global_feature`` (B, C), ``stages`` n x (B, L, C), ``grid`` (h, w).

        Raises:
            ValueError: ``num_replaced_blocks`` is outside [1, depth].
        """
        return self.features(pixel_values, [num_replaced_blocks])[num_replaced_blocks]

    def features(
        self,
        pixel_values: torch.Tensor,
        replaced: Sequence[int | None],
        image_token: str = "original",
        engine: TowerEngine | None = None,
    ) -> dict[int | None, VisualFeatures]:
        """Features for several V-V path lengths from one forward of the original path.

        Each V-V path reads only the original path (its start state and each block's ``V_l``),
        so paths of several lengths cost one backbone forward plus each path's own V-V blocks.

        Args:
            pixel_values: (B, 3, S, S), normalised; the grid is S // patch size a side.
            replaced: V-V path lengths (numbers of replaced blocks; None: the config's).
            image_token: the global feature: ``"original"``, the original path's CLS (CLIP's image
                feature), or ``"vv"``, each V-V path's CLS after its last stage (the paper's S_l[0];
                the original one when the V-V path is disabled).
            engine: what runs the tower (:meth:`tokens`) instead of torch, e.g. the onnxruntime
                int8 engine (:mod:`kanoclip.onnx_vision`); None: torch. The projection runs here either way.

        Returns:
            ``{length: VisualFeatures}`` for each requested length: ``global_feature`` (B, C),
            ``stages`` n x (B, L, C) with L = (S // patch size)², ``grid`` (h, w).

        Raises:
            ValueError: a length is outside [1, depth].
        """
        size = pixel_values.shape[-1]
        grid = (size // self.patch_size, size // self.patch_size)
        paths = (
            self.tokens(pixel_values, replaced, image_token)
            if engine is None
            else engine.tokens(self, pixel_values, replaced, image_token)
        )
        return {n: self._projected(path, grid) for n, path in paths.items()}

    def tokens(
        self, pixel_values: torch.Tensor, replaced: Sequence[int | None], image_token: str = "original"
    ) -> dict[int | None, PathTokens]:
        """The tower's part of :meth:`features`: each path's tokens before post-layernorm and projection.

        Args:
            pixel_values: (B, 3, S, S), normalised.
            replaced: V-V path lengths (None: the config's).
            image_token: ``"original"`` or ``"vv"`` (see :meth:`features`).

        Returns:
            ``{length: PathTokens}``: ``cls`` (B, width), ``stages`` n x (B, L, width).

        Raises:
            ValueError: a length is outside [1, depth].
        """
        size = pixel_values.shape[-1]
        grid = (size // self.patch_size, size // self.patch_size)
        vision = self.vision_model
        firsts = {n: self.first_layer(n) for n in replaced}
        with self._capture(set(firsts.values()) if self.vv_enabled else set()) as captured:
            hidden = vision.pre_layrnorm(self._embed(pixel_values, grid))
            last = vision.encoder(inputs_embeds=hidden).last_hidden_state
        return {n: self._path(captured, first, last[:, 0], image_token) for n, first in firsts.items()}

    def _path(self, captured: _Capture, first: int, cls: torch.Tensor, image_token: str = "original") -> PathTokens:
        """One V-V path, starting at block ``first``, from the captured original forward (``cls``: its CLS)."""
        stages = {
            layer: captured.outputs[layer][:, 1:] for layer in self.stage_layers if not self.vv_enabled or layer < first
        }
        if self.vv_enabled:
            # Out-of-place additions only: each stored stage is its own tensor, so later
            # blocks cannot overwrite it (the bug that made public implementations' 4
            # "stages" all equal the last one).
            state = captured.start[first]  # S_{l-1} at the first replaced block, (B, T, width)
            for layer in range(first, self.stage_layers[-1] + 1):
                state = state + self._vv_attention(layer, captured.values[layer])
                if layer in self.stage_layers:
                    stages[layer] = state[:, 1:]
            if image_token == "vv":  # S_l[0]: the V-V path's CLS after its last stage
                cls = state[:, 0]
        return PathTokens(cls=cls, stages=[stages[layer] for layer in self.stage_layers])

    def _projected(self, path: PathTokens, grid: tuple[int, int]) -> VisualFeatures:
        """Post-layernorm and projection of one path: the CLS (= ``get_image_features`` for the
        original one) and all stages' tokens in one call (per-token ops, so the same as one each)."""
        projected = self.project(torch.cat(path.stages, dim=1))
        return VisualFeatures(
            global_feature=self.project(path.cls), stages=list(projected.chunk(len(path.stages), dim=1)), grid=grid
        )
