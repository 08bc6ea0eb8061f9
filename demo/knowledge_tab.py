"""The Knowledge tab: browse, edit, save and extend the LLM-VQA knowledge base (paper §2.2.1).

The app has one shared knowledge base (``--kb``, else the built-in one), used by every model
it loads. On a public app (:mod:`demo.access`) a visitor's edits, uploads and generated
descriptions go to their own session copy (:class:`~demo.state.Session`), used for their
detections only; shared edits and *Save* are the owner's. Every description shows its true
source (LLM, VQA, built-in = hand-written by the kanoclip authors, hand-written = typed here by
a user). The editor holds a class's general descriptions (all but VQA): lines kept keep their
source, new lines are hand-written (``manual``). Shared edits apply at once to every loaded
model; *Save* writes the shared one atomically to the ``--kb`` file or to a ``.json`` under the
knowledge-base folder (``--kb-dir``), nowhere else.
*Generate* asks an OpenAI-compatible LLM (or a VQA model with an image) for new descriptions
through :mod:`kanoclip.knowledge.generate`, at an endpoint the owner configured
(``KANOCLIP_ENDPOINTS``: name, URL, model and the variable holding its key, which goes to that
URL only) or at a typed URL. A typed URL gets only a key typed with it (used for that request,
never stored or shown). On a private app it may also take a key from an allowed server variable
(``KANOCLIP_API_KEY_ENVS``), as before; on a public app typed URLs are the owner's unless
``KANOCLIP_VISITOR_URLS=1``, and then a visitor's URL must resolve to public addresses only.
"""

from __future__ import annotations

import datetime as dt
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from demo.access import ENDPOINTS_ENV, VISITOR_URLS_ENV, AccessConfig, owner_only
from demo.components import (
    class_choices,
    class_name_text,
    dropdown_update,
    image_input,
    required_class_name,
    unknown_class_hint,
    user_errors,
)
from demo.state import AppContext, Session
from kanoclip.errors import InputError
from kanoclip.knowledge import (
    LLM_TEMPLATE,
    SOURCE_LABELS,
    STORED_SOURCES,
    VQA_TEMPLATE,
    KnowledgeBase,
    Provenance,
    image_sha256,
)
from kanoclip.knowledge import classes as catalog
from kanoclip.knowledge import generate as gen

DEFAULT_KEY_ENV = gen.DEFAULT_API_KEY_ENV
MAX_GENERATED = 20


def allowed_key_envs() -> list[str]:
    """Environment variables the app may read an API key from: OPENAI_API_KEY plus ``$KANOCLIP_API_KEY_ENVS``."""
    extra = [v.strip() for v in os.environ.get("KANOCLIP_API_KEY_ENVS", "").split(",") if v.strip()]
    return list(dict.fromkeys([DEFAULT_KEY_ENV, *extra]))


def api_key(variable: str | None) -> str | None:
    name = (variable or "").strip()
    if not name:
        return None
    if name not in allowed_key_envs():
        raise InputError(
            f"environment variable {name!r} is not allowed as an API key source; use one of "
            f"{', '.join(allowed_key_envs())} (the server's KANOCLIP_API_KEY_ENVS lists more)"
        )
    return os.environ.get(name) or None  # unset: local servers (Ollama, vLLM) need no key


def counts_table(kb: KnowledgeBase) -> pd.DataFrame:
    """One row per class: its name, dataset(s) and how many descriptions of each source it has."""
    rows = [
        [name, ", ".join(catalog.datasets_of(name)), *(c[s] for s in STORED_SOURCES)] for name, c in kb.counts().items()
    ]
    return pd.DataFrame(rows, columns=["class", "dataset", *(SOURCE_LABELS[s] for s in STORED_SOURCES)])


DESCRIPTION_COLUMNS = ["source", "text", "image", "model", "date"]


def class_view(kb: KnowledgeBase, class_name: str | None) -> tuple[str, pd.DataFrame, str]:
    """(general descriptions one per line, a table of every description with its source and provenance, a note)."""
    name = class_name_text(class_name)
    columns = DESCRIPTION_COLUMNS
    if not name:
        return "", pd.DataFrame([], columns=columns), "Pick or type a class."
    resolved = kb.resolve(name)
    if resolved is None:
        return (
            "",
            pd.DataFrame([], columns=columns),
            (
                f"`{name}` is not in the knowledge base (detection would use generic descriptions)."
                f"{unknown_class_hint(kb, name)} "
                "Type descriptions, one per line, and press *Apply edits* to add it."
            ),
        )
    pairs = kb.provenance(resolved)
    general = "\n".join(d.text for d, _ in pairs if d.source != "vqa")
    rows = [[SOURCE_LABELS[d.source], d.text, d.image_name or "", p.model, p.date] for d, p in pairs]
    return general, pd.DataFrame(rows, columns=columns), f"`{resolved}`: {len(pairs)} descriptions."


def _lines(text: str | None) -> list[str]:
    return [" ".join(line.split()) for line in (text or "").splitlines() if line.strip()]


def open_client(
    access: AccessConfig,
    owner: bool,
    endpoint: str | None,
    url: str | None,
    model: str | None,
    key_env: str | None,
    typed_key: str | None,
) -> gen.ChatClient:
    """The chat client of one generation request, sending each key only where it may go.

    An empty ``url`` means the configured ``endpoint`` (its URL, model and key, nothing typed).
    A typed ``url`` gets the ``typed_key`` (this request only); on a private app it may instead
    take a key from an allowed server variable (``key_env``). On a public app a typed URL is the
    owner's unless ``KANOCLIP_VISITOR_URLS=1``; a visitor's must resolve to public addresses only,
    and no server variable is ever sent to it. Answers are capped in size and time.
    """
    timeout = 60.0 if access.public else 120.0
    target = (url or "").strip()
    if not target:
        chosen = access.endpoint((endpoint or "").strip())
        if chosen is None:
            names = ", ".join(e.name for e in access.endpoints)
            raise InputError(
                f"pick one of the configured endpoints ({names})"
                if names
                else f"no endpoint is configured (the owner sets {ENDPOINTS_ENV}); type an endpoint URL"
            )
        return gen.ChatClient(chosen.url, chosen.model, api_key=chosen.api_key(), timeout=timeout, retries=2)
    if not access.public:
        key = (typed_key or "").strip() or api_key(key_env)
        return gen.ChatClient(target, (model or "").strip(), api_key=key, timeout=timeout, retries=2)
    if not owner and not access.visitor_urls:
        raise InputError(
            "typing an endpoint URL is off on this public app: leave the URL empty and pick a configured endpoint "
            f"(the owner allows visitors' own URLs with {VISITOR_URLS_ENV}=1)"
        )
    if (key_env or "").strip():
        raise InputError(
            "server-side keys go only to the endpoints they are bound to: leave the key variable empty and type "
            "your own key for your URL, or pick a configured endpoint"
        )
    return gen.ChatClient(
        target, (model or "").strip(), api_key=(typed_key or "").strip() or None, timeout=timeout, retries=1,
        public_only=not owner,
    )  # fmt: skip


def recorded_endpoint(url: str) -> str:
    """The endpoint as provenance records it: scheme, host and path (no user info, query or fragment)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def generate_descriptions(
    client: gen.ChatClient,
    current: KnowledgeBase,
    class_name: str,
    kind: str,
    n: int,
    image: str | None,
    limit: int = MAX_GENERATED,
) -> Callable[[KnowledgeBase], int]:
    """Ask ``client`` for ``n`` new descriptions of ``class_name``; returns the change adding them to a knowledge base.

    ``current`` is the knowledge base they must not repeat; ``limit`` caps ``n``.
    """
    name = required_class_name(class_name, "pick or type the class to describe")
    count = int(n or 0)
    if not 1 <= count <= limit:
        raise InputError(f"number of descriptions must be between 1 and {limit}")
    if kind == "VQA" and not image:
        raise InputError("VQA needs an image of the class; upload one")
    existing = [d.text for d in current.descriptions(name)] if current.is_known(name) else []
    today = dt.date.today().isoformat()
    endpoint = recorded_endpoint(client.url)
    if kind == "VQA":
        texts = gen.generate_vqa(client, name, image, count, avoid=existing)
        provenance = Provenance(model=client.model, endpoint=endpoint, date=today, template=VQA_TEMPLATE)
        digest, image_name = image_sha256(image), os.path.basename(str(image))
        return lambda kb: kb.add_vqa(name, digest, image_name, texts, provenance)
    texts = gen.generate_llm(client, name, count, avoid=existing)
    provenance = Provenance(model=client.model, endpoint=endpoint, date=today, template=LLM_TEMPLATE)
    return lambda kb: kb.add_llm(name, texts, provenance)


# ---------------------------------------------------------------------------- the panels
def whose(owner: bool) -> str:
    """Who an edit serves: everyone (an owner's) or the visitor's own detections."""
    return "every loaded model uses them now" if owner else "your own detections use them (this session only)"


@dataclass
class KnowledgeView:
    """The components that show the knowledge base, refreshed together after every change."""

    counts: gr.Dataframe
    class_name: gr.Dropdown
    llm_text: gr.Textbox
    table: gr.Dataframe
    note: gr.Markdown
    class_inputs: list[gr.Dropdown]  # the other tabs' class boxes
    session: gr.State

    def outputs(self) -> list[Any]:
        """The outputs of every change: the views, every class box, then the session."""
        return [self.counts, self.llm_text, self.table, self.note, self.class_name, *self.class_inputs, self.session]

    def refreshed(self, kb: KnowledgeBase, class_name: str | None, message: str, state: Session) -> tuple[Any, ...]:
        """The values of :meth:`outputs` after a change to ``kb``, with ``message`` in the note."""
        llm, table, note = class_view(kb, class_name)
        # this tab's dropdown shows each class with its dataset; the other tabs' keep plain names,
        # so that a typed name stays what their box shows
        updates = [dropdown_update(class_choices(kb)), *(dropdown_update(kb.classes()) for _ in self.class_inputs)]
        return (counts_table(kb), llm, table, f"{message} {note}".strip(), *updates, state)


def build_class_panel(
    ctx: AppContext, counts: gr.Dataframe, class_inputs: list[gr.Dropdown], session: gr.State
) -> KnowledgeView:
    """The class box, its general descriptions (editable, *Apply edits*) and its provenance table, wired."""
    store, access = ctx.knowledge, ctx.config.access
    class_name = gr.Dropdown(
        choices=class_choices(store.snapshot()),
        value=None,
        allow_custom_value=True,
        label="Class (dataset)",
        elem_id="kb-class",
    )
    llm_text = gr.Textbox(
        label="General descriptions: LLM, built-in, hand-written (one per line; edit, then Apply)",
        lines=8,
        elem_id="kb-llm",
    )
    apply_button = gr.Button("Apply edits", variant="primary")
    table = gr.Dataframe(
        headers=DESCRIPTION_COLUMNS,
        label="All descriptions of the class, with provenance",
        wrap=True,
        interactive=False,
    )
    note = gr.Markdown(elem_id="kb-note")
    view = KnowledgeView(counts, class_name, llm_text, table, note, class_inputs, session)

    @user_errors
    def select(class_name: str | None, state: Session | None) -> tuple[Any, ...]:
        return class_view((state or Session()).knowledge(store), class_name)

    @user_errors
    def apply(
        class_name: str | None, text: str | None, state: Session | None, profile: gr.OAuthProfile | None
    ) -> tuple[Any, ...]:
        name = required_class_name(class_name, "pick or type the class whose descriptions you edit")
        lines = _lines(text)
        state = state or Session()
        owner = state.is_owner(access, profile)
        _, kb = state.edit(store, owner, lambda kb: kb.set_general(name, lines))
        count = len(set(lines))
        message = f"Applied: `{name}` has {count} general descriptions (new lines are hand-written); {whose(owner)}."
        return view.refreshed(kb, name, message, state)

    class_name.change(select, inputs=[class_name, session], outputs=[llm_text, table, note], api_visibility="private")
    apply_button.click(apply, inputs=[class_name, llm_text, session], outputs=view.outputs(), api_name="kb_apply")
    return view


def build_save_panel(ctx: AppContext, session: gr.State) -> None:
    """The path box and *Save* (the owner's on a public app), wired."""
    store, config = ctx.knowledge, ctx.config
    with gr.Row():
        path = gr.Textbox(
            value=config.default_kb_path(),
            label="Save to (.json under the knowledge-base folder, or the --kb file)"
            + (" — the owner's" if config.public else ""),
            scale=3,
        )
        save_button = gr.Button("Save", scale=1)
    saved = gr.Markdown()

    @user_errors
    def save(path: str | None, state: Session | None, profile: gr.OAuthProfile | None) -> str:
        if not (state or Session()).is_owner(config.access, profile):
            raise owner_only("saving the knowledge base", config.access)
        written = store.save(path)
        return f"Saved the knowledge base to `{written}`."

    save_button.click(save, inputs=[path, session], outputs=saved, api_name="kb_save")


def wire_load(ctx: AppContext, upload: gr.File, view: KnowledgeView) -> None:
    """Loading an uploaded knowledge base: the owner's replaces the shared one, a visitor's is their own."""
    store, access = ctx.knowledge, ctx.config.access

    @user_errors
    def load(
        file: str | None, class_name: str | None, state: Session | None, profile: gr.OAuthProfile | None
    ) -> tuple[Any, ...]:
        if not file:
            raise InputError("no file: upload a knowledge-base .json file")
        kb = KnowledgeBase.load(file)
        state = state or Session()
        if state.is_owner(access, profile):
            store.replace(kb)
            state.kb = None
        else:
            state.kb = kb
        message = f"Loaded a knowledge base with {len(kb.classes())} classes."
        return view.refreshed(state.knowledge(store), class_name, message, state)

    upload.upload(
        load, inputs=[upload, view.class_name, view.session], outputs=view.outputs(), api_visibility="private"
    )


def generate_handler(ctx: AppContext, view: KnowledgeView) -> Callable[..., tuple[Any, ...]]:
    """The ``/kb_generate`` handler: new descriptions from an LLM / VQA endpoint into the session's knowledge base."""
    store, config = ctx.knowledge, ctx.config

    @user_errors
    def generate(
        class_name: str | None,
        kind: str,
        url: str | None,
        model: str | None,
        key_env: str | None,
        n: float,
        image: str | None,
        endpoint: str | None = None,
        typed_key: str | None = None,
        state: Session | None = None,
        profile: gr.OAuthProfile | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        state = state or Session()
        owner = state.is_owner(config.access, profile)
        limit = min(MAX_GENERATED, config.access.limits.max_generated) if config.public else MAX_GENERATED
        with open_client(config.access, owner, endpoint, url, model, key_env, typed_key) as client:
            progress(0.1, desc=f"asking {client.model} at {recorded_endpoint(client.url)}")
            change = generate_descriptions(
                client, state.knowledge(store), class_name or "", kind, int(n or 0), image, limit
            )
        added, kb = state.edit(store, owner, change)
        return view.refreshed(kb, class_name, f"Generated {added} new {kind} descriptions; {whose(owner)}.", state)

    return generate


def build_generate_panel(ctx: AppContext, view: KnowledgeView) -> None:
    """The *Generate descriptions* accordion (endpoint, URL, model, key, count, VQA image), wired."""
    config = ctx.config
    endpoints = [e.name for e in config.access.endpoints]
    with gr.Accordion("Generate descriptions with an LLM / VQA endpoint (OpenAI-compatible)", open=False):
        with gr.Row():
            kind = gr.Radio(["LLM", "VQA"], value="LLM", label="Kind")
            endpoint = gr.Dropdown(
                choices=endpoints,
                value=endpoints[0] if endpoints else "",
                label="Configured endpoint (used when the URL is empty)",
                allow_custom_value=True,  # an unknown name gets the app's own message
                visible=bool(endpoints),
            )
            url = gr.Textbox(
                label="Endpoint URL (empty: the configured endpoint)",
                placeholder="http://127.0.0.1:11434/v1",
                scale=2,
                visible=not config.public or config.access.visitor_urls or bool(config.access.owner_token),
            )
            model = gr.Textbox(label="Model (for a typed URL)", placeholder="llama3.1")
            key_env = gr.Textbox(
                value="" if config.public else DEFAULT_KEY_ENV,
                label="API key environment variable (on the server)",
                visible=not config.public,
            )
            typed_key = gr.Textbox(
                label="Your API key for a typed URL (this request only; never stored)", type="password"
            )
            n = gr.Number(
                value=5,
                precision=0,
                minimum=1,
                maximum=config.access.limits.max_generated if config.public else MAX_GENERATED,
                label="How many",
            )
        image = image_input(label="Image (VQA only)", height=200, sources=["upload", "clipboard"])
        generate_button = gr.Button("Generate")
    generate_button.click(
        generate_handler(ctx, view),
        inputs=[view.class_name, kind, url, model, key_env, n, image, endpoint, typed_key, view.session],
        outputs=view.outputs(),
        api_name="kb_generate",
        concurrency_limit=2,
    )


# ---------------------------------------------------------------------------- the tab
def build_knowledge_tab(ctx: AppContext, class_inputs: list[gr.Dropdown], session: gr.State) -> None:
    """The tab; ``session`` is the app's per-visitor :class:`~demo.state.Session` state."""
    config = ctx.config
    scope = (
        "On this public app your edits, uploads and generated descriptions are yours: they serve your own "
        "detections in this session only; the owner edits and saves the shared one."
        if config.public
        else "It is shared by every model of this app; edits apply at once. Save it to keep it."
    )
    with gr.Tab("Knowledge", id="knowledge"):
        gr.Markdown(
            "The **LLM-VQA knowledge base** guides the prompts (KnPL): per class, general anomaly descriptions "
            "from an LLM and image-specific ones from a VQA model. The built-in one was written by hand by the "
            f"kanoclip authors (source *built-in*); lines you type are *hand-written*. {scope}"
        )
        with gr.Row():
            with gr.Column(scale=2):
                counts = gr.Dataframe(
                    counts_table(ctx.knowledge.snapshot()),
                    label="Classes: descriptions per source",
                    interactive=False,
                    max_height=420,
                    wrap=True,
                    column_widths=["26%", "22%", "13%", "13%", "13%", "13%"],
                )
                upload = gr.File(label="Load a knowledge-base .json", file_types=[".json"], type="filepath")
            with gr.Column(scale=3):
                view = build_class_panel(ctx, counts, class_inputs, session)
                build_save_panel(ctx, session)
        wire_load(ctx, upload, view)
        build_generate_panel(ctx, view)
