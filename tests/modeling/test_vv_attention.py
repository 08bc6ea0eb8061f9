"""CLIP-VV (eq. 4-8): the V-V path beside an untouched original path."""

from __future__ import annotations

import pytest
import torch
from threads import in_threads

from kanoclip.backbone import load_backbone
from kanoclip.config import VVConfig
from kanoclip.modeling.vv_attention import CLIPVV, POSITION_CACHE_SIZE


@pytest.fixture(scope="module")
def clip(tiny_backbone):
    return load_backbone(str(tiny_backbone)).model


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(0)
    return torch.randn(2, 3, 112, 112)


def hidden_states(clip, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The vision tower's hidden states as transformers defines them: the input of block 1, then
    each block's output. Recorded with hooks on the library's own blocks, because not every
    transformers 5.x release fills ``output_hidden_states`` for ``vision_model``. At other sizes
    than 112 the library interpolates the position embeddings (at 112 it uses its own table)."""
    layers = clip.vision_model.encoder.layers
    states: list[torch.Tensor] = []
    handles = [layers[0].register_forward_pre_hook(lambda _m, args: states.append(args[0]))]
    handles += [layer.register_forward_hook(lambda _m, _i, out: states.append(out)) for layer in layers]
    try:
        with torch.no_grad():
            clip.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
    finally:
        for handle in handles:
            handle.remove()
    return states


def test_default_layout_scales_with_depth():
    assert VVConfig().resolve(24) == (6, (6, 12, 18, 24))  # ViT-L/14: blocks 6..24 replaced
    assert VVConfig().resolve(8) == (2, (2, 4, 6, 8))
    assert VVConfig(num_replaced_blocks=6).resolve(12) == (7, (3, 6, 9, 12))
    with pytest.raises(ValueError):
        VVConfig(num_replaced_blocks=30).resolve(24)


def test_shapes(clip, pixels):
    features = CLIPVV(clip, VVConfig())(pixels)
    c = clip.config.projection_dim
    assert features.global_feature.shape == (2, c)
    assert features.grid == (8, 8)
    assert [tuple(s.shape) for s in features.stages] == [(2, 64, c)] * 4


def test_four_stages_differ(clip, pixels):
    """Guards against the aliasing bug where every stored stage equals the last one."""
    stages = CLIPVV(clip, VVConfig())(pixels).stages
    for i in range(4):
        for j in range(i + 1, 4):
            assert (stages[i] - stages[j]).abs().max() > 1e-3, (i, j)


def test_global_feature_is_clips_own(clip, pixels):
    features = CLIPVV(clip, VVConfig())(pixels)
    torch.testing.assert_close(features.global_feature, clip.get_image_features(pixel_values=pixels).pooler_output)


def test_with_vv_off_hidden_states_equal_the_librarys(clip, pixels):
    reference = hidden_states(clip, pixels)
    view = CLIPVV(clip, VVConfig(), vv_enabled=False)
    stages = view(pixels).stages
    for stage, layer in zip(stages, view.stage_layers):
        torch.testing.assert_close(stage, view.project(reference[layer][:, 1:]), atol=1e-5, rtol=1e-5)


def test_vv_path_follows_eq_8(clip, pixels):
    """Recompute the first stage by hand: S_l = out_proj(softmax(V Vᵀ scale) V) + S_{l-1}."""
    view = CLIPVV(clip, VVConfig(num_replaced_blocks=7))  # blocks 2..8, first stage at layer 2
    hidden = hidden_states(clip, pixels)
    layer = clip.vision_model.encoder.layers[1]
    attn = layer.self_attn
    v = attn.v_proj(layer.layer_norm1(hidden[1]))  # V from the ORIGINAL path's input
    b, t, _ = v.shape
    heads = v.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    weights = torch.softmax(heads @ heads.transpose(-1, -2) * attn.scale, dim=-1)
    out = attn.out_proj((weights @ heads).transpose(1, 2).reshape(b, t, -1))
    expected = view.project((hidden[1] + out)[:, 1:])
    torch.testing.assert_close(view(pixels).stages[0], expected, atol=1e-5, rtol=1e-5)


def hook_counts(clip) -> list[tuple[int, int, int]]:
    """Per block: (its forward pre-hooks, its forward hooks, its v_proj's forward hooks)."""
    return [
        (len(layer._forward_pre_hooks), len(layer._forward_hooks), len(layer.self_attn.v_proj._forward_hooks))
        for layer in clip.vision_model.encoder.layers
    ]


def test_vv_leaves_the_original_path_untouched(clip, pixels):
    before = clip.vision_model(pixel_values=pixels).last_hidden_state
    CLIPVV(clip, VVConfig())(pixels)
    after = clip.vision_model(pixel_values=pixels).last_hidden_state
    assert torch.equal(before, after)


def test_capture_hooks_are_installed_once_per_module(clip, pixels):
    CLIPVV(clip, VVConfig())(pixels)
    installed = hook_counts(clip)
    assert all(counts == (1, 1, 1) for counts in installed)  # one of each, on every block
    for replaced in (2, 5, 8):  # more views of the same backbone, and more calls, add none
        CLIPVV(clip, VVConfig(num_replaced_blocks=replaced))(pixels)
    assert hook_counts(clip) == installed


def test_other_input_sizes_interpolate_positions(clip):
    features = CLIPVV(clip, VVConfig())(torch.randn(1, 3, 140, 140))
    assert features.grid == (10, 10)
    assert features.stages[0].shape[1] == 100


def test_stages_before_the_vv_path_are_the_original_tokens(clip, pixels):
    """With fewer replaced blocks, an early stage is the original path's tokens at that layer."""
    view = CLIPVV(clip, VVConfig(num_replaced_blocks=6))  # blocks 3..8; stages 2, 4, 6, 8
    assert view.first_replaced == 3
    hidden = hidden_states(clip, pixels)
    stages = view(pixels).stages
    torch.testing.assert_close(stages[0], view.project(hidden[2][:, 1:]), atol=1e-5, rtol=1e-5)
    assert (stages[1] - view.project(hidden[4][:, 1:])).abs().max() > 1e-3  # V-V by layer 4


def library_features(
    clip, pixels: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' own global feature and hidden states, with ``interpolate_pos_encoding=True``
    at other sizes; ``positions`` (1, T, width), when given, replaces the library's resized table."""
    embeddings = clip.vision_model.embeddings
    if positions is not None:
        embeddings.interpolate_pos_encoding = lambda _e, _h, _w: positions  # this instance only
    try:
        states = hidden_states(clip, pixels)
        with torch.no_grad():
            out = clip.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)
            global_feature = clip.visual_projection(out.pooler_output)
    finally:
        if positions is not None:
            del embeddings.interpolate_pos_encoding
    return global_feature, states


def assert_features_equal(
    view: CLIPVV, pixels: torch.Tensor, global_feature: torch.Tensor, states: list[torch.Tensor]
) -> None:
    with torch.no_grad():
        features = view(pixels)
    torch.testing.assert_close(features.global_feature, global_feature, atol=1e-6, rtol=1e-6)
    for layer, stage in zip(view.stage_layers, features.stages):
        torch.testing.assert_close(stage, view.project(states[layer][:, 1:]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_native_size_features_equal_the_librarys(clip, pixels, mode):
    global_feature, states = library_features(clip, pixels)  # 112: the library's table as is
    assert_features_equal(
        CLIPVV(clip, VVConfig(position_interpolation=mode), vv_enabled=False), pixels, global_feature, states
    )


def test_bicubic_at_another_size_equals_transformers_interpolation(clip):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 168, 168)  # a 12x12 grid on the 8x8-grid backbone
    global_feature, states = library_features(clip, pixels)
    view = CLIPVV(clip, VVConfig(position_interpolation="bicubic"), vv_enabled=False)
    assert_features_equal(view, pixels, global_feature, states)


def test_bilinear_at_another_size_is_f_interpolate_of_the_table(clip):
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 168, 168)
    table = clip.vision_model.embeddings.position_embedding.weight.detach()  # (1 + 64, 64)
    grid = table[1:].T.reshape(1, 64, 8, 8)  # (1, width, 8, 8): row-major patches
    resized = torch.nn.functional.interpolate(grid, size=(12, 12), mode="bilinear", align_corners=False)
    by_hand = torch.cat([table[:1], resized.reshape(64, 144).T]).unsqueeze(0)  # (1, 1 + 144, 64)
    view = CLIPVV(clip, VVConfig(position_interpolation="bilinear"), vv_enabled=False)
    torch.testing.assert_close(view.position_embeddings((12, 12)), by_hand)
    global_feature, states = library_features(clip, pixels, positions=by_hand)
    assert_features_equal(view, pixels, global_feature, states)
    bicubic, _ = library_features(clip, pixels)
    assert (global_feature - bicubic).abs().max() > 1e-4  # the two modes do differ


def test_resized_position_tables_are_kept_for_a_few_sizes(clip):
    view = CLIPVV(clip, VVConfig(position_interpolation="bilinear"))
    first = view.position_embeddings((12, 12))
    assert view.position_embeddings((12, 12)) is first  # computed once per size
    for side in (9, 10, 11, 13):
        view.position_embeddings((side, side))
    assert len(view._positions) == POSITION_CACHE_SIZE == 4
    assert view.position_embeddings((12, 12)) is not first  # the oldest size was dropped


def test_vv_path_runs_at_a_bilinear_size(clip):
    torch.manual_seed(2)
    features = CLIPVV(clip, VVConfig(position_interpolation="bilinear"))(torch.randn(1, 3, 168, 168))
    assert features.grid == (12, 12) and all(s.shape == (1, 144, 32) for s in features.stages)


# ---------------------------------------------------------------------------- concurrent calls
def test_concurrent_calls_on_views_sharing_a_backbone_get_their_own_features(clip):
    """Two views of one backbone (different V-V paths), 4 threads, each its own image: every
    thread's features equal its call run alone (the hooks fire in every thread's forward)."""
    views = [CLIPVV(clip, VVConfig(num_replaced_blocks=7)), CLIPVV(clip, VVConfig(num_replaced_blocks=4))]
    torch.manual_seed(3)
    images = [torch.randn(1, 3, 112, 112) for _ in range(4)]
    jobs = [(views[i % 2], images[i]) for i in range(4)]
    with torch.no_grad():
        alone = [view(image) for view, image in jobs]
        together = in_threads([lambda view=view, image=image: view(image) for view, image in jobs] * 5, len(jobs))
    for k, got in enumerate(together):  # thread k % 4 ran job k % 4 five times
        expected = alone[k % len(jobs)]
        torch.testing.assert_close(got.global_feature, expected.global_feature, atol=1e-6, rtol=0)
        for a, b in zip(got.stages, expected.stages):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
