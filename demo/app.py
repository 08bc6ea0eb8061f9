"""``build_app``: the whole Gradio Blocks app (Detect, Knowledge, Prompts, Train tabs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from demo.detect_tab import build_detect_tab
from demo.knowledge_tab import build_knowledge_tab
from demo.prompts_tab import build_prompts_tab
from demo.state import AppConfig, AppContext
from demo.train_tab import build_train_tab

TITLE = "KAnoCLIP — zero-shot anomaly detection"
INTRO = (
    "Upload an image, name what it shows, and KAnoCLIP marks what looks anomalous: CLIP with "
    "knowledge-driven prompts (an LLM-VQA knowledge base), CLIP-VV local features, Bi-CMCI fusion "
    "and a Conv-Adapter, as in the *KAnoCLIP* paper."
)
UPLOAD_LIMIT = "2gb"  # the largest upload (a training zip); see demo.uploads.ZipLimits


def build_app(
    config: AppConfig | None = None,
    *,
    training_api: tuple[type, Callable[..., Any]] | None = None,
) -> gr.Blocks:
    """The app for ``config`` (default: from the environment).

    The start model is loaded here (unless ``config.preload`` is False) so that the header can
    say which mode, backbone and device it runs on — or, when it cannot be loaded, why and how
    to fix it; the app comes up either way. ``training_api`` replaces ``(TrainConfig, train)``
    of :mod:`kanoclip.training` (tests use it).
    """
    config = config or AppConfig.from_env()
    ctx = AppContext.create(config)
    with gr.Blocks(title="KAnoCLIP") as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        status = gr.Markdown(ctx.startup, elem_id="app-status")
        with gr.Tabs():
            detect = build_detect_tab(ctx)
            build_knowledge_tab(ctx, [detect.class_name])
            prompts_model = build_prompts_tab(ctx, ctx.knowledge.snapshot().classes())
            if config.training:  # KANOCLIP_TRAINING=off / --no-training hides it (e.g. on a public Space)
                build_train_tab(ctx, [detect.model, prompts_model], training_api)
        demo.load(lambda: ctx.registry.status(config.start_choice), outputs=status, api_name="status")
    demo.queue(default_concurrency_limit=config.concurrency)
    return demo
