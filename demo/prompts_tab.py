"""The Prompts tab: the learned prompts (KnPL) made visible.

For a model and a class: each learnable context vector's nearest vocabulary tokens, the cosine
similarity between normal prompts, abnormal prompts and knowledge-base descriptions, a 2-D PCA
of their text features, and the distances d(w̄k, w̄a), d(w̄k, w̄n) of the KD loss (eq. 2).
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from demo.components import class_dropdown, dropdown_update, model_dropdown, required_class_name, user_errors
from demo.gpu import gpu
from demo.state import AppContext, Session, compute_slot, describe_model, model_choices
from kanoclip import KAnoCLIP, KnowledgeBase
from kanoclip.viz_prompts import PromptSet, pca_plot, prompt_set, set_kd_distances, similarity_heatmap

TOP_K = 3
DEFAULT_CLASS = "bottle"
UNTRAINED_NOTE = (
    "ℹ️ **Training-free mode: the context vectors are untrained** (random initialisation, std {std}). "
    "They do not take part in training-free detection, which uses the template prompts and the "
    "knowledge base; they are shown anyway so that you can compare them with a trained checkpoint."
)


def token_table(model: KAnoCLIP, top_k: int = TOP_K) -> pd.DataFrame:
    """One row per context vector: its state, slot and nearest vocabulary tokens (cosine)."""
    nearest = model.model.prompt_learner.nearest_tokens(top_k)
    rows = []
    for state, prefix in (("normal", "N"), ("abnormal", "A")):
        for slot, tokens in enumerate(nearest[state], start=1):
            rows.append([state, f"{prefix}{slot}", *(f"{tok or '∅'} ({sim:.2f})" for tok, sim in tokens)])
    return pd.DataFrame(rows, columns=["state", "vector", *(f"nearest token {i}" for i in range(1, top_k + 1))])


def text_table(prompts: PromptSet) -> pd.DataFrame:
    """The labels used in the plots and the texts they stand for (X = a learnable slot)."""
    return pd.DataFrame(list(zip(prompts.labels, prompts.groups, prompts.texts)), columns=["label", "group", "text"])


def kd_markdown(prompts: PromptSet) -> str:
    d = set_kd_distances(prompts)
    holds = (
        "the abnormal prompts are at least as close to the knowledge as the normal ones"
        if d.loss == 0
        else "the normal prompts are closer to the knowledge than the abnormal ones"
    )
    return (
        "**KD loss (eq. 2)** on normalised means: "
        f"d(w̄k, w̄a) = **{d.knowledge_abnormal:.4f}**, d(w̄k, w̄n) = **{d.knowledge_normal:.4f}**, "
        f"L_KD = max(0, d(w̄k, w̄a) − d(w̄k, w̄n)) = **{d.loss:.4f}** — {holds}."
    )


def build_prompts_tab(ctx: AppContext, class_choices: list[str], session: gr.State) -> gr.Dropdown:
    config, registry = ctx.config, ctx.registry

    @gpu
    def inspect_prompts(
        model_choice: str | None, class_name: str, own: KnowledgeBase | None, knowledge: tuple[int, KnowledgeBase]
    ) -> PromptSet:
        model = registry.get(model_choice, knowledge)  # already loaded by the caller
        with compute_slot(model):
            return prompt_set(model, class_name, own)

    @user_errors
    def show(
        model_choice: str | None, class_name: str | None, state: Session, progress: gr.Progress = gr.Progress()
    ) -> tuple[Any, ...]:
        name = required_class_name(class_name, "type or pick a class, e.g. 'bottle'")
        progress(0.1, desc="loading the model")
        model = registry.get(model_choice)
        resolved, _ = model.canonical_class(name, state.kb)
        progress(0.4, desc="encoding prompts")
        # the visitor's own knowledge base where they edited one, as their detections use
        prompts = inspect_prompts(model_choice, resolved, state.kb, ctx.knowledge.versioned())
        header = describe_model(model)
        if model.mode == "training-free":
            header += "\n\n" + UNTRAINED_NOTE.format(std=model.config.prompts.ctx_init_std)
        return (
            header,
            token_table(model),
            similarity_heatmap(prompts),
            pca_plot(prompts),
            kd_markdown(prompts),
            text_table(prompts),
        )

    with gr.Tab("Prompts", id="prompts"):
        gr.Markdown(
            "The learnable normal (N1..NK) and abnormal (A1..AK) context vectors of KnPL, the prompts they "
            "form (`[N1..NK] <adjective> <class>`), and how they sit next to the knowledge-base descriptions."
        )
        with gr.Row():
            model = model_dropdown(model_choices(config), config.start_choice, info=None, scale=3)
            class_name = class_dropdown(
                class_choices, value=DEFAULT_CLASS if DEFAULT_CLASS in class_choices else None, label="Class",
                info=None, scale=2,
            )  # fmt: skip
            button = gr.Button("Show prompts", variant="primary", scale=1, elem_id="prompts-button")
        header = gr.Markdown(elem_id="prompts-header")
        tokens = gr.Dataframe(
            label="Nearest vocabulary tokens of each context vector (cosine similarity)", interactive=False
        )
        kd = gr.Markdown()
        with gr.Row():
            # the figures carry their own titles; a Gradio label would cover them
            heatmap = gr.Plot(
                label="Cosine similarity: normal prompts, abnormal prompts, KB descriptions",
                format="png",
                show_label=False,
            )
            pca = gr.Plot(label="2-D PCA of the text features", format="png", show_label=False)
        texts = gr.Dataframe(label="What the labels stand for", wrap=True, interactive=False)
        button.click(
            show,
            inputs=[model, class_name, session],
            outputs=[header, tokens, heatmap, pca, kd, texts],
            api_name="prompts",
            concurrency_limit=config.concurrency,
            concurrency_id="detect",
        )
        model.focus(lambda: dropdown_update(model_choices(config)), outputs=model, api_visibility="private")
    return model
