"""Drawings of the learned prompts (KnPL, paper §2.2.2) next to the knowledge base.

* :func:`prompt_set` — the text features of a class's normal prompts (LNPs), abnormal prompts
  (LAPs) and knowledge-base descriptions, from a model. Each description is grouped by its true
  source (LLM, VQA, built-in or user hand-written, generic fallback); w̄k takes all of them.
* :func:`similarity_heatmap` — cosine similarity between all of them.
* :func:`pca_plot` — a 2-D PCA projection of their (L2-normalised) features, with the three
  means w̄n, w̄a, w̄k of eq. 2.
* :func:`kd_distances` — d(w̄k, w̄a) and d(w̄k, w̄n) of eq. 2 and the resulting L_KD, computed
  exactly as :func:`kanoclip.modeling.losses.kd_loss` does.

Like :mod:`kanoclip.viz`, everything uses matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kanoclip.knowledge import KNOWLEDGE_SOURCES, SOURCE_LABELS, KnowledgeBase

GROUP_COLORS = {
    "normal": "#1f77b4",
    "abnormal": "#d62728",
    "llm": "#2ca02c",
    "vqa": "#9467bd",
    "builtin": "#ff7f0e",
    "manual": "#8c564b",
    "generic": "#7f7f7f",
}
GROUP_NAMES = {
    "normal": "normal prompts (LNPs)",
    "abnormal": "abnormal prompts (LAPs)",
    **{source: f"KB: {SOURCE_LABELS[source]}" for source in KNOWLEDGE_SOURCES},
}
_PREFIX = {"normal": "N", "abnormal": "A", "llm": "LLM", "vqa": "VQA", "builtin": "B", "manual": "H", "generic": "G"}


@dataclass
class PromptSet:
    """Texts of one class with their raw text features ``(N, C)`` and groups (normal, abnormal, or a
    knowledge source of :data:`~kanoclip.knowledge.KNOWLEDGE_SOURCES`)."""

    class_name: str
    texts: list[str]
    groups: list[str]
    features: np.ndarray

    @property
    def labels(self) -> list[str]:
        """Short labels: ``N1``.. for normal prompts, ``A1``.. abnormal, then by knowledge source
        ``LLM1``.., ``VQA1``.., ``B1``.. built-in, ``H1``.. hand-written by a user, ``G1``.. generic."""
        counts: dict[str, int] = {}
        labels = []
        for group in self.groups:
            counts[group] = counts.get(group, 0) + 1
            labels.append(f"{_PREFIX[group]}{counts[group]}")
        return labels

    def group(self, name: str | tuple[str, ...]) -> np.ndarray:
        names = (name,) if isinstance(name, str) else name
        return self.features[[i for i, g in enumerate(self.groups) if g in names]]


def prompt_set(model, class_name: str, knowledge: KnowledgeBase | None = None) -> PromptSet:
    """The features of ``class_name``'s learned prompts and knowledge-base descriptions.

    The learned prompts are the model's KnPL prompts with its current context vectors — random
    initialisation in training-free mode. Knowledge-base features are CLIP text features of the
    descriptions (generic ones for a class the knowledge base does not know).

    Args:
        model: a loaded :class:`kanoclip.KAnoCLIP`.
        class_name: the class, canonical.
        knowledge: whose descriptions (a visitor's own copy in the app; None: the model's).

    Returns:
        The :class:`PromptSet`.
    """
    learner = model.model.prompt_learner
    with torch.no_grad():
        prompts = learner([class_name])
    descriptions = (knowledge or model.knowledge).descriptions(class_name)
    kb = model.description_features(class_name, knowledge)  # encoded once per class, shared with detection
    texts = (
        learner.prompt_texts(class_name, False)
        + learner.prompt_texts(class_name, True)
        + [d.text for d in descriptions]
    )
    groups = (
        ["normal"] * prompts.normal.shape[1]
        + ["abnormal"] * prompts.abnormal.shape[1]
        + [d.source for d in descriptions]
    )
    features = torch.cat([prompts.normal[0].float(), prompts.abnormal[0].float(), kb]).cpu().numpy()
    return PromptSet(class_name=class_name, texts=texts, groups=groups, features=features)


def cosine_similarity(features: np.ndarray) -> np.ndarray:
    """``(N, C)`` -> ``(N, N)`` cosine similarities."""
    unit = F.normalize(torch.as_tensor(features, dtype=torch.float64), dim=-1)
    return (unit @ unit.T).numpy()


def _mean_direction(features: np.ndarray) -> np.ndarray:
    """w̄/‖w̄‖ of eq. 2: the mean of the raw features, normalised (as :func:`~kanoclip.modeling.losses.kd_loss`)."""
    return F.normalize(torch.as_tensor(features, dtype=torch.float64).mean(dim=0), dim=-1).numpy()


@dataclass(frozen=True)
class KDDistances:
    """Eq. 2: ``L_KD = max(0, d(w̄k, w̄a) − d(w̄k, w̄n))`` with d the Euclidean distance of normalised means."""

    knowledge_abnormal: float  # d(w̄k, w̄a)
    knowledge_normal: float  # d(w̄k, w̄n)

    @property
    def loss(self) -> float:
        return max(0.0, self.knowledge_abnormal - self.knowledge_normal)


def kd_distances(knowledge: np.ndarray, abnormal: np.ndarray, normal: np.ndarray) -> KDDistances:
    """The distances of eq. 2 from raw features ``(n_k, C)``, ``(n_a, C)``, ``(n_n, C)``."""
    wk, wa, wn = (_mean_direction(x) for x in (knowledge, abnormal, normal))
    return KDDistances(
        knowledge_abnormal=float(np.linalg.norm(wk - wa)), knowledge_normal=float(np.linalg.norm(wk - wn))
    )


def set_kd_distances(prompts: PromptSet) -> KDDistances:
    """:func:`kd_distances` of a prompt set; the knowledge side is every description, whatever its source."""
    return kd_distances(prompts.group(KNOWLEDGE_SOURCES), prompts.group("abnormal"), prompts.group("normal"))


def pca_2d(features: np.ndarray, extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """2-D PCA (scikit-learn) of the L2-normalised features; ``extra`` rows are projected with the same fit.

    Returns (points ``(N, 2)``, extra points or ``None``, explained variance ratio ``(2,)``).
    With fewer than 3 points or one direction only, the missing components are zero.
    """
    from sklearn.decomposition import PCA

    unit = F.normalize(torch.as_tensor(features, dtype=torch.float64), dim=-1).numpy()
    n_components = max(1, min(2, unit.shape[0] - 1, unit.shape[1]))
    if unit.shape[0] < 2:
        return np.zeros((unit.shape[0], 2)), None if extra is None else np.zeros((len(extra), 2)), np.zeros(2)
    pca = PCA(n_components=n_components, random_state=0).fit(unit)
    points = _pad2(pca.transform(unit))
    extra_points = None if extra is None else _pad2(pca.transform(np.asarray(extra, dtype=np.float64)))
    ratio = np.zeros(2)
    ratio[:n_components] = pca.explained_variance_ratio_
    return points, extra_points, ratio


def _pad2(points: np.ndarray) -> np.ndarray:
    return points if points.shape[1] == 2 else np.hstack([points, np.zeros((points.shape[0], 2 - points.shape[1]))])


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def similarity_heatmap(prompts: PromptSet, title: str | None = None) -> Figure:
    """Cosine similarity between every prompt and description of ``prompts`` (labels as :attr:`PromptSet.labels`)."""
    sims = cosine_similarity(prompts.features)
    n = len(prompts.texts)
    size = min(11.0, 3.5 + 0.32 * n)
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(sims, cmap="viridis", vmin=float(sims.min()), vmax=1.0)
    labels = prompts.labels
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for tick_x, tick_y, group in zip(ax.get_xticklabels(), ax.get_yticklabels(), prompts.groups):
        tick_x.set_color(GROUP_COLORS[group])
        tick_y.set_color(GROUP_COLORS[group])
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{sims[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if sims[i, j] < sims.mean() else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title(title or f"Cosine similarity of text features — {prompts.class_name}", fontsize=10)
    fig.tight_layout()
    return fig


def pca_plot(prompts: PromptSet, title: str | None = None) -> Figure:
    """The features projected on their first two principal components, with the means of eq. 2 as stars."""
    means = np.stack([_mean_direction(prompts.group(g)) for g in ("normal", "abnormal", KNOWLEDGE_SOURCES)])
    points, mean_points, ratio = pca_2d(prompts.features, means)
    fig = _figure(7.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for group in GROUP_COLORS:
        idx = [i for i, g in enumerate(prompts.groups) if g == group]
        if idx:
            ax.scatter(
                points[idx, 0], points[idx, 1], c=GROUP_COLORS[group], label=GROUP_NAMES[group], s=40, alpha=0.85
            )
    for (x, y), label in zip(points, prompts.labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    assert mean_points is not None
    # w̄k's star takes the colour of the knowledge source with the most descriptions
    knowledge = max(KNOWLEDGE_SOURCES, key=prompts.groups.count)
    for (x, y), name, color in zip(
        mean_points, ("w̄n", "w̄a", "w̄k"), (GROUP_COLORS["normal"], GROUP_COLORS["abnormal"], GROUP_COLORS[knowledge])
    ):
        ax.scatter([x], [y], marker="*", s=260, c=color, edgecolors="black", linewidths=0.8, zorder=5)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, -10), fontsize=10, fontweight="bold")
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.set_title(
        title or f"PCA of text features — {prompts.class_name} (stars: normalised means of eq. 2)", fontsize=10
    )
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
