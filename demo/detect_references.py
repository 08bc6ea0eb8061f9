"""The Detect tab's normal-references panel: a session's own references and the app's shared ones.

A visitor's good images of a class (``/add_references``, ``/clear_references``) go into a
:class:`~kanoclip.references.References` store of that visitor's session (``gr.State``), one per
model (their features, and so their fingerprint, differ between models). They never reach
another session. Where a session has none of a class, the model's own store serves: the
references the app was started with (``--references``), shared by everyone. The Batch, Live and
Video tabs serve from the same stores (:func:`session_for`, :func:`serving_references`).
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr
from PIL import Image

from demo.components import class_name_text, decode_upload, required_class_name, user_errors
from demo.gpu import gpu, move
from demo.state import AppContext, ModelRegistry, Session, compute_slot
from kanoclip import KAnoCLIP
from kanoclip.errors import InputError
from kanoclip.knowledge import KnowledgeBase
from kanoclip.references import References, ReferenceSet

ModelKey = tuple[str | None, str | None]
Stores = dict[ModelKey, References]
SESSION_WHOSE = "yours: this session only"
SHARED_WHOSE = "the app's shared references, loaded with --references"
REFERENCES_HELP = (
    "**Normal references (optional):** a few good images of the class make a reference map "
    "(each patch's distance to the nearest reference patch), fused with the model's; with 2 or "
    "more the class's threshold is calibrated on them. They stay in your session only."
)


def session_store(stores: Stores, key: ModelKey, model: KAnoCLIP, max_images: int | None = None) -> References:
    """The session's store for the model of ``key``, made on first use, holding at most ``max_images`` images.

    Made anew when the model's fingerprint changed (e.g. its checkpoint folder now holds a model
    of another backbone): features of another model cannot be searched.
    """
    fingerprint = model.reference_fingerprint()
    store = stores.get(key)
    if store is None or store.identity != fingerprint:
        store = stores[key] = References(fingerprint, max_images=max_images)
    return store


def session_for(
    ctx: AppContext, model_choice: str | None, stores: Stores | None, owner: bool = False
) -> tuple[KAnoCLIP, References]:
    """(the model of ``model_choice``, loaded if needed; the session's store for it, capped by the app)."""
    model = ctx.registry.get(model_choice, owner=owner)
    key, cap = ctx.registry.key(model_choice, owner=owner), ctx.config.max_session_references
    return model, session_store({} if stores is None else stores, key, model, cap)


def serving_references(
    model: KAnoCLIP, session: References, class_name: str
) -> tuple[References, ReferenceSet | None, str]:
    """(store, the class's references or None, whose they are) for a request of ``class_name``.

    The session's own references of the class win; without them the model's own store serves
    (the shared ``--references``, if the app has some of that class).
    """
    own = model.references(class_name, store=session)
    if own is not None:
        return session, own, SESSION_WHOSE
    return model.reference_store, model.references(class_name), SHARED_WHOSE


def references_markdown(model: KAnoCLIP, session: References, class_name: str, problem: str | None = None) -> str:
    """What the Detect tab shows about the class's references: how many, whose, which threshold.

    Also names the shared references (``--references``) and that they serve every visitor
    without their own of that class, or why they do not serve this model (``problem``).
    """
    name = model.canonical_class(class_name)[0]
    _, refs, whose = serving_references(model, session, name)
    default = model.config.scoring.threshold
    if refs is None:
        text = (
            f"**Normal references of `{name}`:** none · default threshold {default:.3f} (not calibrated); "
            "add 2 or more good images to calibrate it."
        )
    else:
        text = f"**Normal references of `{name}`:** {refs.count} ({whose}) · {refs.describe(default)}"
    shared = sorted(model.reference_store.classes)
    if shared:
        text += (
            f"\n\nShared references (loaded with `--references`) of {', '.join(f'`{c}`' for c in shared)} serve every "
            "visitor whose session has none of that class; what you add here is yours alone and wins over them."
        )
    if problem:
        text += f"\n\nThe shared references (`--references`) do not serve this model: {problem}"
    return text


def describe_references(
    ctx: AppContext, model: KAnoCLIP, session: References, model_choice: str | None, name: str
) -> str:
    """:func:`references_markdown`, with the reason the shared references do not serve the chosen model."""
    problem = ctx.registry.reference_problems.get(ctx.registry.key(model_choice))
    return references_markdown(model, session, name, problem)


def add_references_call(registry: ModelRegistry) -> Callable[..., ReferenceSet]:
    """The reference images' model call, marked for the GPU boundary (:func:`demo.gpu.gpu`)."""

    @gpu
    def run_add_references(
        model_choice: str | None,
        class_name: str,
        images: list[Image.Image],
        store: References,
        owner: bool,
        shared: tuple[int, KnowledgeBase],
    ) -> ReferenceSet:
        """The reference images' forward passes and calibration, into (a copy of) the session's ``store``."""
        model = registry.get(model_choice, shared, owner=owner)
        with compute_slot(model):
            return model.add_references(class_name, images, store=move(store, model.device))

    return run_add_references


def add_references_handler(ctx: AppContext) -> Callable[..., tuple[str, None, Stores]]:
    """The ``/add_references`` handler: the uploaded good images into the session's references of the class."""
    config, run_add_references = ctx.config, add_references_call(ctx.registry)

    @user_errors
    def add_references(
        files: list[str] | None,
        class_name: str | None,
        model_choice: str | None,
        stores: Stores | None,
        state: Session | None,
        profile: gr.OAuthProfile | None,
    ) -> tuple[str, None, Stores]:
        """Add the uploaded good images to the session's references of the class (cleared from the upload box)."""
        if not files:
            raise InputError(
                "no reference images: upload one or more good (normal) images of the class, "
                "then press 'Add as references'"
            )
        name = required_class_name(class_name, "pick the class the reference images show, e.g. 'bottle'")
        owner = (state or Session()).is_owner(config.access, profile)
        limits = config.access.limits
        if config.public and len(files) > limits.max_images:
            raise InputError(f"{len(files)} images in one upload; this public app takes at most {limits.max_images}")
        stores = {} if stores is None else stores
        model, session = session_for(ctx, model_choice, stores, owner)
        canonical = model.canonical_class(name)[0]
        # one addition to this session's store at a time: each may run on a copy of it (below)
        with session.writing():
            have = model.references(canonical, store=session)
            count, limit = (have.count if have is not None else 0), model.config.references.max_per_class
            if config.public:
                limit = min(limit, limits.max_references)
            if count + len(files) > limit:  # checked before any image is decoded
                room = f"upload at most {limit - count} more" if count < limit else "clear them first"
                raise InputError(
                    f"{count + len(files)} reference images of {canonical!r} exceed the limit of {limit} per class; "
                    f"{room}"
                )
            images = [decode_upload(path) for path in files]  # all decoded (and named when bad) before any is added
            session.check_room(canonical, len(files), limit)  # the session's cap over all classes
            # kept from the returned set where the call ran on a copy of the store (on ZeroGPU, in a
            # worker whose changes would not come back); in-process the model merged it already
            before = session.stored(canonical)
            added = run_add_references(model_choice, canonical, images, session, owner, ctx.knowledge.versioned())
            if session.stored(canonical) is before:
                session.keep(added)
        return describe_references(ctx, model, session, model_choice, canonical), None, stores

    return add_references


def clear_references_handler(ctx: AppContext) -> Callable[..., tuple[str, Stores]]:
    """The ``/clear_references`` handler: forget the session's references of the class."""

    @user_errors
    def clear_references(class_name: str | None, model_choice: str | None, stores: Stores | None) -> tuple[str, Stores]:
        """Forget the session's references of the class (and its calibrated threshold)."""
        name = required_class_name(class_name, "pick the class whose references to clear")
        stores = {} if stores is None else stores
        model, session = session_for(ctx, model_choice, stores)
        model.remove_references(name, store=session)
        return describe_references(ctx, model, session, model_choice, name), stores

    return clear_references


def show_references(ctx: AppContext, class_name: str | None, model_choice: str | None, stores: Stores | None) -> str:
    """The class's references after a class or model change; never loads a model."""
    name = class_name_text(class_name)
    model = ctx.registry.peek(model_choice)
    if not name or not isinstance(model, KAnoCLIP):
        return REFERENCES_HELP
    cap = ctx.config.max_session_references
    session = session_store({} if stores is None else stores, ctx.registry.key(model_choice), model, cap)
    return describe_references(ctx, model, session, model_choice, name)


def references_intro(ctx: AppContext) -> str:
    """The panel's text before any class is picked, naming the start model's shared references."""
    start = ctx.registry.peek(ctx.config.start_choice)
    shared = sorted(start.reference_store.classes) if isinstance(start, KAnoCLIP) else []
    if not shared:
        return REFERENCES_HELP
    listed = ", ".join(f"`{c}`" for c in shared)
    return REFERENCES_HELP + f" Shared references (`--references`) of {listed} serve every visitor without their own."


def build_references_panel(
    ctx: AppContext, class_name: gr.Dropdown, model: gr.Dropdown, stores: gr.State, visitor: gr.State
) -> None:
    """The upload box, the add and clear buttons and the class's references status, wired.

    ``stores`` is the session's :class:`References` state (one per model), ``visitor`` its :class:`Session`.
    """
    with gr.Group():
        reference_files = gr.File(
            file_count="multiple",
            type="filepath",
            label="Normal reference images (optional): good images of the chosen class",
            height=140,
            elem_id="detect-references",
        )
        with gr.Row():
            add_button = gr.Button("Add as references", size="sm", elem_id="detect-add-references")
            clear_button = gr.Button("Clear this class's references", size="sm", elem_id="detect-clear-references")
        reference_status = gr.Markdown(references_intro(ctx), elem_id="detect-references-status")
    add_button.click(
        add_references_handler(ctx),
        inputs=[reference_files, class_name, model, stores, visitor],
        outputs=[reference_status, reference_files, stores],
        api_name="add_references",
        concurrency_limit=ctx.config.concurrency,
        concurrency_id="detect",  # the same forward passes as a detection
    )
    clear_button.click(
        clear_references_handler(ctx),
        inputs=[class_name, model, stores],
        outputs=[reference_status, stores],
        api_name="clear_references",
    )

    def show(name: str | None, model_choice: str | None, session: Stores | None) -> str:
        return show_references(ctx, name, model_choice, session)

    for trigger in (class_name.change, model.change):
        trigger(show, inputs=[class_name, model, stores], outputs=reference_status, api_visibility="private")
