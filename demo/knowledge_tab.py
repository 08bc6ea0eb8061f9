"""The Knowledge tab: browse, edit, save and extend the LLM-VQA knowledge base (paper §2.2.1).

The app has one knowledge base (``--kb``, else the built-in one), shared by every model it
loads. Every description shows its true source (LLM, VQA, built-in = hand-written by the
kanoclip authors, hand-written = typed here by a user). The editor holds a class's general
descriptions (all but VQA): lines kept keep their source, new lines are hand-written
(``manual``). Edits apply at once to every loaded model; *Save* writes it atomically to the ``--kb``
file or to a ``.json`` under the knowledge-base folder (``--kb-dir``), nowhere else.
*Generate* asks an OpenAI-compatible LLM (or a VQA model with an image) for new descriptions
through :mod:`kanoclip.knowledge.generate`; the API key is read from an environment variable
of the server, named here, and only from the allowed ones (``KANOCLIP_API_KEY_ENVS``), so a
visitor cannot make the server send an unrelated secret to an address of their choosing.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import gradio as gr
import pandas as pd

from demo.components import (
    class_choices,
    class_name_text,
    dropdown_update,
    image_input,
    required_class_name,
    unknown_class_hint,
    user_errors,
)
from demo.state import AppContext, KnowledgeStore
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


def generate_descriptions(
    store: KnowledgeStore,
    class_name: str,
    kind: str,
    url: str,
    model: str,
    key_env: str | None,
    n: int,
    image: str | None,
) -> tuple[int, KnowledgeBase]:
    """Ask the endpoint for ``n`` new descriptions of ``class_name`` and add them; returns (added, kb)."""
    name = required_class_name(class_name, "pick or type the class to describe")
    count = int(n or 0)
    if not 1 <= count <= MAX_GENERATED:
        raise InputError(f"number of descriptions must be between 1 and {MAX_GENERATED}")
    if kind == "VQA" and not image:
        raise InputError("VQA needs an image of the class; upload one")
    key = api_key(key_env)
    current = store.snapshot()
    existing = [d.text for d in current.descriptions(name)] if current.is_known(name) else []
    with gen.ChatClient((url or "").strip(), (model or "").strip(), api_key=key, timeout=120.0, retries=2) as client:
        today = dt.date.today().isoformat()
        if kind == "VQA":
            texts = gen.generate_vqa(client, name, image, count, avoid=existing)
            provenance = Provenance(model=client.model, endpoint=client.url, date=today, template=VQA_TEMPLATE)
            digest, image_name = image_sha256(image), os.path.basename(str(image))
            return store.edit(lambda kb: kb.add_vqa(name, digest, image_name, texts, provenance))
        texts = gen.generate_llm(client, name, count, avoid=existing)
        provenance = Provenance(model=client.model, endpoint=client.url, date=today, template=LLM_TEMPLATE)
        return store.edit(lambda kb: kb.add_llm(name, texts, provenance))


def build_knowledge_tab(ctx: AppContext, class_inputs: list[gr.Dropdown]) -> None:
    store = ctx.knowledge

    def refreshed(kb: KnowledgeBase, class_name: str | None, message: str) -> tuple[Any, ...]:
        llm, table, note = class_view(kb, class_name)
        # this tab's dropdown shows each class with its dataset; the other tabs' keep plain names,
        # so that a typed name stays what their box shows
        updates = [dropdown_update(class_choices(kb)), *(dropdown_update(kb.classes()) for _ in class_inputs)]
        return (counts_table(kb), llm, table, f"{message} {note}".strip(), *updates)

    @user_errors
    def select(class_name: str | None) -> tuple[Any, ...]:
        llm, table, note = class_view(store.snapshot(), class_name)
        return llm, table, note

    @user_errors
    def apply(class_name: str | None, text: str | None) -> tuple[Any, ...]:
        name = required_class_name(class_name, "pick or type the class whose descriptions you edit")
        lines = _lines(text)
        _, kb = store.edit(lambda kb: kb.set_general(name, lines))
        return refreshed(
            kb,
            name,
            f"Applied: `{name}` has {len(set(lines))} general descriptions (new lines are hand-written); "
            "every loaded model uses them now.",
        )

    @user_errors
    def save(path: str | None) -> str:
        written = store.save(path)
        return f"Saved the knowledge base to `{written}`."

    @user_errors
    def load(file: str | None, class_name: str | None) -> tuple[Any, ...]:
        if not file:
            raise InputError("no file: upload a knowledge-base .json file")
        kb = KnowledgeBase.load(file)
        store.replace(kb)
        return refreshed(store.snapshot(), class_name, f"Loaded a knowledge base with {len(kb.classes())} classes.")

    @user_errors
    def generate(
        class_name: str | None,
        kind: str,
        url: str,
        model: str,
        key_env: str,
        n: float,
        image: str | None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        progress(0.1, desc=f"asking {model or 'the model'} at {url or '?'}")
        added, kb = generate_descriptions(store, class_name or "", kind, url, model, key_env, int(n or 0), image)
        return refreshed(kb, class_name, f"Generated {added} new {kind} descriptions.")

    snapshot = store.snapshot()
    with gr.Tab("Knowledge", id="knowledge"):
        gr.Markdown(
            "The **LLM-VQA knowledge base** guides the prompts (KnPL): per class, general anomaly descriptions "
            "from an LLM and image-specific ones from a VQA model. The built-in one was written by hand by the "
            "kanoclip authors (source *built-in*); lines you type are *hand-written*. It is shared by every model "
            "of this app; edits apply at once. Save it to keep it."
        )
        with gr.Row():
            with gr.Column(scale=2):
                counts = gr.Dataframe(
                    counts_table(snapshot),
                    label="Classes: descriptions per source",
                    interactive=False,
                    max_height=420,
                    wrap=True,
                    column_widths=["26%", "22%", "13%", "13%", "13%", "13%"],
                )
                upload = gr.File(label="Load a knowledge-base .json", file_types=[".json"], type="filepath")
            with gr.Column(scale=3):
                class_name = gr.Dropdown(
                    choices=class_choices(snapshot),
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
                with gr.Row():
                    path = gr.Textbox(
                        value=ctx.config.default_kb_path(),
                        label="Save to (.json under the knowledge-base folder, or the --kb file)",
                        scale=3,
                    )
                    save_button = gr.Button("Save", scale=1)
                saved = gr.Markdown()
        with gr.Accordion("Generate descriptions with an LLM / VQA endpoint (OpenAI-compatible)", open=False):
            with gr.Row():
                kind = gr.Radio(["LLM", "VQA"], value="LLM", label="Kind")
                url = gr.Textbox(label="Endpoint URL", placeholder="http://127.0.0.1:11434/v1", scale=2)
                model = gr.Textbox(label="Model", placeholder="llama3.1")
                key_env = gr.Textbox(value=DEFAULT_KEY_ENV, label="API key environment variable (on the server)")
                n = gr.Number(value=5, precision=0, minimum=1, maximum=MAX_GENERATED, label="How many")
            image = image_input(label="Image (VQA only)", height=200, sources=["upload", "clipboard"])
            generate_button = gr.Button("Generate")

        class_outputs = [counts, llm_text, table, note, class_name, *class_inputs]
        class_name.change(select, inputs=class_name, outputs=[llm_text, table, note], api_visibility="private")
        apply_button.click(apply, inputs=[class_name, llm_text], outputs=class_outputs, api_name="kb_apply")
        save_button.click(save, inputs=path, outputs=saved, api_name="kb_save")
        upload.upload(load, inputs=[upload, class_name], outputs=class_outputs, api_visibility="private")
        generate_button.click(
            generate,
            inputs=[class_name, kind, url, model, key_env, n, image],
            outputs=class_outputs,
            api_name="kb_generate",
            concurrency_limit=2,
        )
