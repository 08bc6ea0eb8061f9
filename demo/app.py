"""``build_app``: the whole Gradio Blocks app (Detect, Knowledge, Prompts, Train tabs)."""

from __future__ import annotations

import logging

import gradio as gr

from demo.components import dropdown_update
from demo.detect_tab import build_detect_tab
from demo.gpu import ZERO_GPU
from demo.knowledge_tab import build_knowledge_tab
from demo.prompts_tab import build_prompts_tab
from demo.state import AppConfig, AppContext, model_choices
from demo.train_tab import TrainFn, build_train_tab
from demo.uploads import ZipLimits
from kanoclip.training import train

log = logging.getLogger("kanoclip.app")
TITLE = "KAnoCLIP — zero-shot anomaly detection"
INTRO = (
    "Upload an image, name what it shows, and KAnoCLIP marks what looks anomalous: CLIP with "
    "knowledge-driven prompts (an LLM-VQA knowledge base), CLIP-VV local features, Bi-CMCI fusion "
    "and a Conv-Adapter, as in the *KAnoCLIP* paper."
)
UPLOAD_LIMIT = ZipLimits().max_compressed  # bytes: the largest upload is a training zip
# Gradio's own cleanup of uploads and results: every hour, files older than an hour (and all at
# shutdown), so a public Space does not fill its disk. Training zips are deleted at once.
DELETE_CACHE = (3600, 3600)
# The verdict carries its threshold's note ("threshold 0.412, calibrated leave-one-out on its 3
# references"): at gr.Label's headline size it would fill the column. Pass to ``launch(css=CSS)``.
CSS = "#detect-verdict .output-class { font-size: 1.15rem; line-height: 1.35; padding: 1.6rem 0.75rem 0.5rem; }"


def build_app(
    config: AppConfig | None = None,
    *,
    train_fn: TrainFn = train,
) -> gr.Blocks:
    """The app for ``config`` (default: from the environment).

    The start model is loaded here (unless ``config.preload`` is False) so that the header can
    say which mode, backbone and device it runs on — or, when it cannot be loaded, why and how
    to fix it; the app comes up either way. The model lists are re-read on every page load
    (checkpoints trained since the app was built appear). ``train_fn`` replaces
    :func:`kanoclip.training.train` (tests pass a scripted trainer).
    """
    config = config or AppConfig.from_env()
    ctx = AppContext.create(config)
    with gr.Blocks(title="KAnoCLIP", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        status = gr.Markdown(ctx.registry.status(config.start_choice), elem_id="app-status")
        with gr.Tabs():
            detect = build_detect_tab(ctx)
            build_knowledge_tab(ctx, [detect.class_name])
            prompts_model = build_prompts_tab(ctx, ctx.knowledge.snapshot().classes())
            model_lists = [detect.model, prompts_model]
            if config.training and ZERO_GPU:  # it trains in a background thread: no GPU there (demo.gpu)
                log.warning("the Train tab is off on ZeroGPU: train elsewhere, then start with --checkpoint")
            elif config.training:  # KANOCLIP_TRAINING=off / --no-training hides it (e.g. on a public Space)
                build_train_tab(ctx, model_lists, train_fn)
        demo.load(lambda: ctx.registry.status(config.start_choice), outputs=status, api_name="status")

        def refresh_model_lists() -> list[dict]:
            choices = model_choices(config)  # lists the checkpoints folder once
            return [dropdown_update(choices) for _ in model_lists]

        demo.load(refresh_model_lists, outputs=model_lists, api_name="model_lists")
    demo.queue(default_concurrency_limit=config.concurrency)
    return demo
