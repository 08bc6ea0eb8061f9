"""``build_app``: the whole Gradio Blocks app (Detect, Batch, Live, Video, Knowledge, Prompts, Train tabs)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from demo.access import OWNER_TOKEN_ENV, AccessConfig
from demo.batch_tab import build_batch_tab
from demo.components import dropdown_update, user_errors
from demo.detect_tab import build_detect_tab
from demo.gpu import ZERO_GPU
from demo.knowledge_tab import build_knowledge_tab
from demo.live_tab import build_live_tabs
from demo.prompts_tab import build_prompts_tab
from demo.state import AppConfig, AppContext, Session, model_choices
from demo.train_tab import TrainFn, build_train_tab
from demo.uploads import ZipLimits
from kanoclip.errors import InputError
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
SESSION_TTL = 3600  # a visitor's session state (their own knowledge base) goes an hour after its last change
SIGN_IN_DELAY_S = 1.0  # a wrong owner token waits this long before the answer
VISITOR_NOTE = (
    "**Public app** — you are a visitor: detections, references and knowledge edits stay in your session; "
    "saving, training and unlisted models are the owner's (docs/app.md, *Hosting publicly*)."
)
OWNER_NOTE = "**Signed in as the owner** — knowledge edits change the shared knowledge base; Save and Train are yours."
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

    On a public deployment (``config.access``, :mod:`demo.access`) the header offers the owner's
    sign-in (Sign in with Hugging Face and/or the owner token, ``/owner_sign_in``), the queue is
    bounded, and the Train tab exists only where the owner enables it, shown to a signed-in owner.
    """
    config = config or AppConfig.from_env()
    ctx = AppContext.create(config)
    access = config.access
    with gr.Blocks(title="KAnoCLIP", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        status = gr.Markdown(ctx.registry.status(config.start_choice), elem_id="app-status")
        session = gr.State(Session(), time_to_live=SESSION_TTL)  # this visitor's role and own knowledge base
        if config.public:
            sign_in = owner_sign_in_row(config)
        with gr.Tabs():
            detect = build_detect_tab(ctx, session)
            batch = build_batch_tab(ctx, detect)
            build_live_tabs(ctx, detect)  # Live (webcam) and Video (recorded clips)
            build_knowledge_tab(ctx, [detect.class_name, batch.class_name], session)
            prompts_model = build_prompts_tab(ctx, ctx.knowledge.snapshot().classes(), session)
            model_lists = [detect.model, prompts_model]
            train_tab = None
            if config.training and ZERO_GPU:  # it trains in a background thread: no GPU there (demo.gpu)
                log.warning("the Train tab is off on ZeroGPU: train elsewhere, then start with --checkpoint")
            elif config.show_training:  # KANOCLIP_TRAINING=off hides it; a public app needs KANOCLIP_PUBLIC_TRAINING=1
                train_tab = build_train_tab(ctx, model_lists, session, train_fn)
        if config.public:  # a signed-in owner sees the Train tab
            sign_in.wire(demo, access, session, [train_tab] if train_tab is not None else [])
        demo.load(lambda: ctx.registry.status(config.start_choice), outputs=status, api_name="status")

        def refresh_model_lists() -> list[dict]:
            choices = model_choices(config)  # lists the checkpoints folder once
            return [dropdown_update(choices) for _ in model_lists]

        demo.load(refresh_model_lists, outputs=model_lists, api_name="model_lists")
    # a public app turns requests away once the queue is full, rather than letting it grow without bound
    demo.queue(
        default_concurrency_limit=config.concurrency, max_size=access.limits.queue_size if config.public else None
    )
    return demo


@dataclass
class SignIn:
    """The owner's sign-in components of a public app's header."""

    note: gr.Markdown
    token: gr.Textbox | None
    button: gr.Button | None

    def wire(self, demo: gr.Blocks, access: AccessConfig, session: gr.State, reveal: list[gr.Tab]) -> None:
        """The sign-in events: the token button (``/owner_sign_in``) and, with OAuth, a check on page load.

        Both show the ``reveal`` tabs to an owner; the token marks the visitor's ``session`` as the owner's.
        """

        @user_errors
        def token_sign_in(token: str | None, state: Session | None) -> tuple[Any, ...]:
            if not access.token_matches((token or "").strip()):
                time.sleep(SIGN_IN_DELAY_S)  # with the event's concurrency of 1: guesses are slow
                raise InputError(f"that is not the owner token ({OWNER_TOKEN_ENV}); check it and sign in again")
            state = state or Session()
            state.signed_in = True
            return (OWNER_NOTE, state, *(gr.update(visible=True) for _ in reveal))

        def profile_sign_in(profile: gr.OAuthProfile | None) -> tuple[Any, ...]:
            owner = access.is_owner(False, profile)
            return (OWNER_NOTE if owner else VISITOR_NOTE, *(gr.update(visible=owner) for _ in reveal))

        if self.token is not None and self.button is not None:
            self.button.click(
                token_sign_in,
                inputs=[self.token, session],
                outputs=[self.note, session, *reveal],
                api_name="owner_sign_in",
                concurrency_limit=1,
                concurrency_id="owner_sign_in",
            )
        if access.oauth:  # Sign in with HF reloads the page: the load reads the signed-in profile
            demo.load(profile_sign_in, outputs=[self.note, *reveal], api_visibility="private")


def owner_sign_in_row(config: AppConfig) -> SignIn:
    """Sign in with Hugging Face (owners in ``KANOCLIP_OWNERS``) and/or the owner token, as configured."""
    access = config.access
    with gr.Row(equal_height=True):
        note = gr.Markdown(VISITOR_NOTE, elem_id="app-role")
        if access.oauth:
            gr.LoginButton(scale=0)
        token = button = None
        if access.owner_token:
            token = gr.Textbox(label="Owner token", type="password", scale=1, elem_id="owner-token")
            button = gr.Button("Sign in as owner", scale=0, elem_id="owner-sign-in")
    return SignIn(note=note, token=token, button=button)
