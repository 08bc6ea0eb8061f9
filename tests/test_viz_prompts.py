"""kanoclip.viz_prompts: prompt features, similarity heat map, PCA and the KD distances of eq. 2.

Run on the tiny random CLIP: the numbers are plumbing, never accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from kanoclip.modeling.losses import kd_loss
from kanoclip.viz import figure_to_image
from kanoclip.viz_prompts import (
    PromptSet,
    cosine_similarity,
    kd_distances,
    pca_2d,
    pca_plot,
    prompt_set,
    set_kd_distances,
    similarity_heatmap,
)


def test_kd_distances_match_kd_loss() -> None:
    rng = np.random.default_rng(0)
    knowledge, abnormal, normal = rng.normal(size=(5, 16)), rng.normal(size=(4, 16)), rng.normal(size=(4, 16))
    d = kd_distances(knowledge, abnormal, normal)
    expected = kd_loss(*(torch.tensor(x)[None] for x in (knowledge, abnormal, normal)))
    assert d.loss == pytest.approx(float(expected), abs=1e-9)
    # normalised means: distances between unit vectors lie in [0, 2]
    assert 0 <= d.knowledge_abnormal <= 2 and 0 <= d.knowledge_normal <= 2


def test_kd_loss_is_zero_when_abnormal_prompts_sit_on_the_knowledge() -> None:
    rng = np.random.default_rng(1)
    knowledge = rng.normal(size=(3, 8))
    d = kd_distances(knowledge, knowledge * 2.0, -knowledge)
    assert d.knowledge_abnormal == pytest.approx(0.0, abs=1e-9)
    assert d.knowledge_normal == pytest.approx(2.0, abs=1e-9)
    assert d.loss == 0.0
    swapped = kd_distances(knowledge, -knowledge, knowledge)
    assert swapped.loss == pytest.approx(2.0, abs=1e-9)


def test_cosine_similarity_is_symmetric_with_unit_diagonal() -> None:
    features = np.random.default_rng(2).normal(size=(6, 10))
    sims = cosine_similarity(features * np.arange(1, 7)[:, None])  # scale must not matter
    assert np.allclose(sims, sims.T)
    assert np.allclose(np.diag(sims), 1.0)
    assert np.allclose(sims, cosine_similarity(features))


def test_pca_projects_extra_points_with_the_same_fit() -> None:
    features = np.random.default_rng(3).normal(size=(9, 12))
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    points, extra, ratio = pca_2d(features, unit[:2])
    assert points.shape == (9, 2) and extra is not None and extra.shape == (2, 2)
    assert np.allclose(extra, points[:2])  # the same rows, projected twice
    assert ratio[0] >= ratio[1] > 0 and ratio.sum() <= 1 + 1e-9


def test_pca_of_a_single_point_does_not_fail() -> None:
    points, extra, ratio = pca_2d(np.ones((1, 4)), np.ones((1, 4)))
    assert points.shape == (1, 2) and extra is not None and not ratio.any()


def test_prompt_set_from_the_tiny_model(tiny_model) -> None:
    prompts = prompt_set(tiny_model, "bottle")
    n_adj = len(tiny_model.config.prompts.normal_adjectives)
    n_kb = len(tiny_model.knowledge.descriptions("bottle"))
    assert prompts.groups.count("normal") == n_adj and prompts.groups.count("abnormal") == n_adj
    assert len(prompts.texts) == prompts.features.shape[0] == 2 * n_adj + n_kb
    assert prompts.labels[:2] == ["N1", "N2"] and prompts.labels[n_adj] == "A1"
    assert (
        prompts.groups[2 * n_adj :] == ["builtin"] * n_kb and "B1" in prompts.labels
    )  # the shipped KB is hand-written
    # the KB features are CLIP text features of the descriptions, in order
    first_kb = tiny_model.model.text_encoder.encode([prompts.texts[2 * n_adj]]).detach().float().numpy()[0]
    assert np.allclose(prompts.features[2 * n_adj], first_kb, atol=1e-5)
    # eq. 2 on the model's own tensors agrees with the distances shown
    with torch.no_grad():
        learned = tiny_model.model.prompt_learner(["bottle"])
        expected = kd_loss(tiny_model.knowledge_features(["bottle"]), learned.abnormal, learned.normal)
    assert set_kd_distances(prompts).loss == pytest.approx(float(expected), abs=1e-5)


def test_plots_render(tiny_model) -> None:
    prompts = prompt_set(tiny_model, "an unknown gadget")  # generic KB descriptions
    for fig in (similarity_heatmap(prompts), pca_plot(prompts)):
        assert isinstance(fig, Figure)
        image = figure_to_image(fig)
        assert image.width > 300 and image.height > 300
        colours = np.asarray(image).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 50  # something was drawn, not a blank canvas


def test_labels_count_per_group() -> None:
    prompts = PromptSet("x", ["a", "b", "c", "d", "e"], ["normal", "abnormal", "llm", "llm", "vqa"], np.eye(5))
    assert prompts.labels == ["N1", "A1", "LLM1", "LLM2", "VQA1"]
    assert prompts.group(("llm", "vqa")).shape == (3, 5)


def test_every_knowledge_source_is_knowledge_and_labelled_by_source() -> None:
    rng = np.random.default_rng(4)
    features = rng.normal(size=(7, 6))
    groups = ["normal", "normal", "abnormal", "builtin", "manual", "generic", "vqa"]
    prompts = PromptSet("x", list("abcdefg"), groups, features)
    assert prompts.labels == ["N1", "N2", "A1", "B1", "H1", "G1", "VQA1"]
    d = set_kd_distances(prompts)
    by_hand = kd_distances(features[3:], features[2:3], features[:2])  # rows 3.. are all knowledge
    assert (d.knowledge_abnormal, d.knowledge_normal) == pytest.approx(
        (by_hand.knowledge_abnormal, by_hand.knowledge_normal)
    )


def test_pca_legend_names_the_true_sources(tiny_model) -> None:
    for name, expected in (("bottle", "KB: built-in"), ("an unknown gadget", "KB: generic")):
        fig = pca_plot(prompt_set(tiny_model, name))
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert legend == ["normal prompts (LNPs)", "abnormal prompts (LAPs)", expected], name
