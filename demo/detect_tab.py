"""The Detect tab: an image and a class name in, the anomaly map, region, score and guidance out.

The handler :func:`detect` is also the API endpoint ``/detect`` (inputs: image, class name,
then model, threshold, σ and "use the calibrated threshold" with defaults). It keeps nothing
between requests: every call loads its own image, gets its own
:class:`~kanoclip.detection.Detection` and draws its own pictures, so concurrent visitors never
see each other's results.

**Normal references** (k-shot, :mod:`kanoclip.references`): a visitor's good images of a class
(``/add_references``, ``/clear_references``) go into a :class:`~kanoclip.references.References`
store of that visitor's session (``gr.State``), one per model (their features, and so their
fingerprint, differ between models). They never reach another session. Where a session has
none of a class, the model's own store serves: the references the app was started with
(``--references``), shared by everyone. With k >= 2 the class's threshold is calibrated
(leave-one-out), and the verdict says which threshold decided it.

**Knowledge and roles** (:mod:`demo.access`): on a public app a visitor's own knowledge-base
copy (:class:`~demo.state.Session`) is passed to their detections only, the model box loads only
listed models unless the owner asks, and a reference upload is capped by the app's limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from demo.components import (
    class_name_text,
    dropdown_update,
    image_input,
    required_class_name,
    unknown_class_hint,
    user_errors,
)
from demo.gpu import gpu, move
from demo.memory import MemoryKeeper
from demo.state import AppContext, Session, compute_slot, describe_model, model_choices, serve_detection
from kanoclip import KAnoCLIP
from kanoclip.config import ScoringConfig
from kanoclip.detection import Detection, upsample_maps
from kanoclip.errors import ImageError, InputError
from kanoclip.images import load_image
from kanoclip.knowledge import SOURCE_LABELS as KNOWLEDGE_LABELS
from kanoclip.knowledge import KnowledgeBase
from kanoclip.references import References, ReferenceSet
from kanoclip.viz import colorize, overlay_with_colorbar

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES = [  # (file, class name); sources and licences in examples/CREDITS.md
    ("bottle_broken_large_000.png", "bottle"),
    ("mtd_crack_exp1_num_265613.jpg", "magnetic_tile"),
    ("mtd_free_exp0_num_743.jpg", "magnetic_tile"),
    ("headct_004.png", "head"),
]
EXAMPLES_CREDIT = (
    "Example images: **MVTec AD** bottle (Bergmann et al., CVPR 2019; CC BY-NC-SA 4.0), "
    "**Magnetic Tile Defect** (Huang et al., 2018) and **Head CT – hemorrhage** (Kaggle, F. Kitamura). "
    "Sources and licences: `demo/examples/CREDITS.md`."
)
SOURCE_LABELS = {**KNOWLEDGE_LABELS, "learned": "learned", "template": "template"}
# Short headers and fixed widths for the numbers, so that the prompt column gets the room (and wraps)
GUIDANCE_COLUMNS = ["rank", "source", "state", "prompt", "sim. image", "sim. region", "region rank"]
GUIDANCE_WIDTHS = ["8%", "14%", "12%", "36%", "10%", "10%", "10%"]
GALLERY_MAX_SIDE = 768  # the gallery's maps are shrunk to this; the main heat map keeps the input's size
REGION_LABEL = "anomalous region"
SCORING = ScoringConfig()
# A session's references are dropped an hour after they last changed (they hold every reference's
# patch features on the model's device, up to ~226 MB per class at ViT-L/14@336px).
SESSION_TTL = 3600
ModelKey = tuple[str | None, str | None]


# ---------------------------------------------------------------------------- pure helpers
def check_controls(threshold: float | None, sigma: float | None) -> tuple[float, float]:
    """Threshold in [0, 1] and σ >= 0, with the defaults for missing values."""
    t = SCORING.threshold if threshold is None else float(threshold)
    s = SCORING.sigma if sigma is None else float(sigma)
    if not np.isfinite(t) or not 0.0 <= t <= 1.0:
        raise InputError(f"threshold {t} is outside [0, 1]; scores and maps lie in [0, 1]")
    if not np.isfinite(s) or not 0.0 <= s <= 64.0:
        raise InputError(f"smoothing sigma {s} must be between 0 and 64 pixels")
    return t, s


def gallery_size(height: int, width: int, max_side: int = GALLERY_MAX_SIDE) -> tuple[int, int]:
    """The input's (H, W) shrunk so that its longer side is at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def map_gallery(det: Detection, stage_layers: tuple[int, ...] | list[int]) -> list[tuple[Image.Image, str]]:
    """The 4 stage maps M_i^a, then M^n and M^a, then (with references) the reference map, coloured
    (jet, 0 blue .. 1 red), with captions short enough for a gallery cell (the gallery's label
    says what the maps are).

    Upsampled from the model's resolution straight to the gallery's size, not via the input's.
    """
    maps = upsample_maps(det.model_maps, gallery_size(*det.anomaly_map.shape))  # [M^n, M^a, M_1^a ..]
    images = [Image.fromarray(colorize(m)) for m in maps]
    items = [
        (image, f"stage {i} · M{i}ᵃ · layer {layer}")
        for i, (image, layer) in enumerate(zip(images[2:], stage_layers), start=1)
    ]
    items.append((images[0], "normal Mⁿ (mean)"))
    items.append((images[1], "abnormal Mᵃ (mean)"))
    if det.reference_map is not None:  # already at the input's size: shrunk like the others
        reference = upsample_maps(det.reference_map[None], gallery_size(*det.reference_map.shape))[0]
        items.append((Image.fromarray(colorize(reference)), f"reference map ({det.reference_count} normal refs)"))
    return items


def guidance_table(det: Detection) -> pd.DataFrame:
    """The prompts that guided the result, ranked by similarity to the image (and to the region).

    Similarities are rounded to 3 decimals, which keeps them on one line of a narrow column
    (:attr:`Detection.guidance` has them in full).
    """
    by_region = sorted(range(len(det.guidance)), key=lambda i: det.guidance[i].region_similarity, reverse=True)
    region_rank = {index: rank for rank, index in enumerate(by_region, start=1)}
    rows = [
        [
            i + 1,
            SOURCE_LABELS.get(g.source, g.source),
            g.state,
            g.text,
            round(g.image_similarity, 3),
            round(g.region_similarity, 3),
            region_rank[i],
        ]
        for i, g in enumerate(det.guidance)
    ]
    return pd.DataFrame(rows, columns=GUIDANCE_COLUMNS)


def threshold_note(det: Detection, from_slider: bool) -> str:
    """Where the verdict's threshold comes from: the library's note, or the slider."""
    return f"threshold {det.threshold:.3f} set with the slider" if from_slider else det.threshold_note


def verdict(det: Detection, note: str) -> str:
    """``ANOMALOUS (score ≥ 0.41) · threshold 0.412, calibrated leave-one-out on its 3 references``."""
    word = "ANOMALOUS" if det.is_anomalous else "normal"
    sign = "≥" if det.is_anomalous else "<"
    return f"{word} (score {sign} {det.threshold:.2f}) · {note}"


def result_summary(model: KAnoCLIP, det: Detection, region_fraction: float, note: str, references: str) -> str:
    """Markdown above the results: the model, the class and what the numbers mean."""
    if det.known_class:
        cls = f"**Class:** `{det.class_name}` (in the knowledge base)"
    else:
        hint = unknown_class_hint(model.knowledge, det.class_name)
        cls = (
            f"**Class:** `{det.class_name}` — not in the knowledge base, "
            f"so generic anomaly descriptions were used.{hint}"
        )
    region = (
        f"{region_fraction:.1%} of the pixels reach the threshold {det.threshold:.2f}"
        if region_fraction > 0
        else f"no pixel reaches the threshold {det.threshold:.2f}"
    )
    refs = f" · **References:** {det.reference_count} normal images ({references})" if det.reference_count else ""
    return (
        f"{describe_model(model)}\n\n{cls} · **Score:** {det.score:.4f} → {verdict(det, note)} "
        f"· **Region:** {region}{refs}"
    )


@dataclass
class Rendered:
    """Everything the Detect tab shows for one result (one per request)."""

    summary: str
    score: float
    verdict: str
    overlay: Image.Image
    region: tuple[Image.Image, list[tuple[np.ndarray, str]]]
    gallery: list[tuple[Image.Image, str]]
    guidance: pd.DataFrame

    def outputs(self) -> tuple[Any, ...]:
        return self.summary, self.score, self.verdict, self.overlay, self.region, self.gallery, self.guidance


def render(model: KAnoCLIP, image: Image.Image, det: Detection, *, from_slider: bool, references: str = "") -> Rendered:
    """The pictures and texts of one result; ``references`` says whose references took part."""
    mask = det.anomaly_map >= det.threshold
    label = f"{REGION_LABEL} (map ≥ {det.threshold:.2f})"
    note = threshold_note(det, from_slider)
    return Rendered(
        summary=result_summary(model, det, float(mask.mean()), note, references),
        score=round(float(det.score), 6),  # float32 carries ~7 digits; 6 decimals keep it readable
        verdict=verdict(det, note),
        overlay=overlay_with_colorbar(image, det.anomaly_map),
        region=(image, [(mask.astype(np.float32), label)]),
        gallery=map_gallery(det, model.model.visual.stage_layers),
        guidance=guidance_table(det),
    )


def chosen_threshold(model: KAnoCLIP, refs: ReferenceSet | None, slider: float, calibrated: bool) -> float | None:
    """The threshold to pass to the model: None lets the library pick (and name) it — the class's
    calibrated one (when ``calibrated`` is ticked), or the default while the slider is left at it;
    any other slider value is the user's choice."""
    has_calibration = refs is not None and refs.calibrated
    if (calibrated and has_calibration) or (not has_calibration and slider == model.config.scoring.threshold):
        return None
    return slider


def decode(image: str | Image.Image) -> Image.Image:
    """:func:`load_image`, naming an uploaded file by its name only (not the server's cache path)."""
    try:
        return load_image(image)
    except ImageError as exc:
        if isinstance(image, str):
            raise ImageError(str(exc).replace(image, Path(image).name)) from None
        raise


# ---------------------------------------------------------------------------- references
SESSION_WHOSE = "yours: this session only"
SHARED_WHOSE = "the app's shared references, loaded with --references"


def session_store(
    stores: dict[ModelKey, References], key: ModelKey, model: KAnoCLIP, max_images: int | None = None
) -> References:
    """The session's store for the model of ``key``, made on first use, holding at most ``max_images`` images.

    Made anew when the model's fingerprint changed (e.g. its checkpoint folder now holds a model
    of another backbone): features of another model cannot be searched.
    """
    fingerprint = model.reference_fingerprint()
    store = stores.get(key)
    if store is None or store.identity != fingerprint:
        store = stores[key] = References(fingerprint, max_images=max_images)
    return store


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


REFERENCES_HELP = (
    "**Normal references (optional):** a few good images of the class make a reference map "
    "(each patch's distance to the nearest reference patch), fused with the model's; with 2 or "
    "more the class's threshold is calibrated on them. They stay in your session only."
)


# ---------------------------------------------------------------------------- the tab
@dataclass
class DetectTab:
    """The Detect tab's controls that other tabs read (the Live and Video tabs detect as it does)."""

    model: gr.Dropdown
    class_name: gr.Dropdown
    threshold: gr.Slider
    calibrated: gr.Checkbox
    stores: gr.State  # the session's References, one per model (shared with the Batch, Live and Video tabs)


def build_detect_tab(ctx: AppContext, visitor: gr.State) -> DetectTab:
    """The tab; ``visitor`` is the app's per-visitor :class:`~demo.state.Session` state."""
    config, registry = ctx.config, ctx.registry
    memory = MemoryKeeper()  # a public Space runs for weeks: keep glibc's freed pages from piling up

    @gpu
    def run_detection(
        model_choice: str | None,
        image: Image.Image,
        class_name: str,
        threshold: float | None,
        sigma: float,
        references: References,
        knowledge: KnowledgeBase | None,
        owner: bool,
        shared: tuple[int, KnowledgeBase],
    ) -> Detection:
        """The model call, the only GPU work of a request (``spaces.GPU`` on ZeroGPU Spaces).

        It takes the model's name, not the model: the model is already loaded (and cached) by
        the caller. ``threshold`` None: the class's calibrated one, else the default. The
        visitor's own ``knowledge`` base (None: the shared one) serves this call only. References
        come and go on the CPU, the ``shared`` knowledge base with its version (:mod:`demo.gpu`).
        """
        model = registry.get(model_choice, shared, owner=owner)  # batched with other visitors' where batching is on
        return serve_detection(
            model, image, class_name, threshold=threshold, sigma=sigma, references=move(references, model.device),
            knowledge=knowledge,
        )  # fmt: skip

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

    def session_for(
        model_choice: str | None, stores: dict[ModelKey, References] | None, owner: bool = False
    ) -> tuple[KAnoCLIP, References]:
        model = registry.get(model_choice, owner=owner)
        key, cap = registry.key(model_choice, owner=owner), config.max_session_references
        return model, session_store({} if stores is None else stores, key, model, cap)

    def owner_of(state: Session | None, profile: gr.OAuthProfile | None) -> bool:
        return config.access.is_owner(state is not None and state.signed_in, profile)

    def describe_references(model: KAnoCLIP, session: References, model_choice: str | None, name: str) -> str:
        return references_markdown(model, session, name, registry.reference_problems.get(registry.key(model_choice)))

    @user_errors
    def detect(
        image: str | None,
        class_name: str | None,
        model_choice: str | None = config.start_choice,
        threshold: float = SCORING.threshold,
        sigma: float = SCORING.sigma,
        calibrated: bool = True,
        stores: dict[ModelKey, References] | None = None,
        state: Session | None = None,
        profile: gr.OAuthProfile | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """One detection; ``calibrated``: the class's calibrated threshold wins over the slider."""
        if image is None or (isinstance(image, str) and not image):
            raise InputError("no image: upload an image, paste one from the clipboard or take one with the webcam")
        name = required_class_name(class_name)
        t, s = check_controls(threshold, sigma)
        pil = decode(image)
        progress(0.1, desc="loading the model")
        state = state or Session()
        owner = owner_of(state, profile)
        model, session = session_for(model_choice, stores, owner)
        store, refs, whose = serving_references(model, session, name)
        chosen = chosen_threshold(model, refs, t, calibrated)
        progress(0.3, desc="detecting")
        serving = References(store.identity)  # what crosses: the class's set alone
        if refs is not None:
            serving.keep(refs)
        det = run_detection(model_choice, pil, name, chosen, s, serving, state.kb, owner, ctx.knowledge.versioned())
        progress(0.8, desc="drawing")
        outputs = render(model, pil, det, from_slider=chosen is not None, references=whose).outputs()
        memory.tick()
        return outputs

    @user_errors
    def add_references(
        files: list[str] | None,
        class_name: str | None,
        model_choice: str | None,
        stores: dict[ModelKey, References] | None,
        state: Session | None,
        profile: gr.OAuthProfile | None,
    ) -> tuple[str, None, dict[ModelKey, References]]:
        """Add the uploaded good images to the session's references of the class (cleared from the upload box)."""
        if not files:
            raise InputError(
                "no reference images: upload one or more good (normal) images of the class, "
                "then press 'Add as references'"
            )
        name = required_class_name(class_name, "pick the class the reference images show, e.g. 'bottle'")
        owner = owner_of(state, profile)
        limits = config.access.limits
        if config.public and len(files) > limits.max_images:
            raise InputError(f"{len(files)} images in one upload; this public app takes at most {limits.max_images}")
        stores = {} if stores is None else stores
        model, session = session_for(model_choice, stores, owner)
        canonical = model.canonical_class(name)[0]
        have = model.references(canonical, store=session)
        count, limit = (have.count if have is not None else 0), model.config.references.max_per_class
        if config.public:
            limit = min(limit, limits.max_references)
        if count + len(files) > limit:  # checked before any image is decoded
            room = f"upload at most {limit - count} more" if count < limit else "clear them first"
            raise InputError(
                f"{count + len(files)} reference images of {canonical!r} exceed the limit of {limit} per class; {room}"
            )
        images = [decode(path) for path in files]  # every file decoded (and named when bad) before any is added
        session.check_room(canonical, len(files), limit)  # the session's cap over all classes
        # kept from the returned set where the call ran on a copy of the store (on ZeroGPU, in a
        # worker whose changes would not come back); in-process the model merged it already, and a
        # concurrent addition of this session may have merged after it
        before = session.stored(canonical)
        added = run_add_references(model_choice, canonical, images, session, owner, ctx.knowledge.versioned())
        if session.stored(canonical) is before:
            session.keep(added)
        return describe_references(model, session, model_choice, canonical), None, stores

    @user_errors
    def clear_references(
        class_name: str | None, model_choice: str | None, stores: dict[ModelKey, References] | None
    ) -> tuple[str, dict[ModelKey, References]]:
        """Forget the session's references of the class (and its calibrated threshold)."""
        name = required_class_name(class_name, "pick the class whose references to clear")
        stores = {} if stores is None else stores
        model, session = session_for(model_choice, stores)
        model.remove_references(name, store=session)
        return describe_references(model, session, model_choice, name), stores

    def show_references(
        class_name: str | None, model_choice: str | None, stores: dict[ModelKey, References] | None
    ) -> str:
        """The class's references after a class or model change; never loads a model."""
        name = class_name_text(class_name)
        model = registry.peek(model_choice)
        if not name or not isinstance(model, KAnoCLIP):
            return REFERENCES_HELP
        cap = config.max_session_references
        session = session_store({} if stores is None else stores, registry.key(model_choice), model, cap)
        return describe_references(model, session, model_choice, name)

    classes = ctx.knowledge.snapshot().classes()
    with gr.Tab("Detect", id="detect"):
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                image = image_input(label="Image (upload, paste or webcam)", height=340, elem_id="detect-image")
                class_name = gr.Dropdown(
                    choices=classes,
                    value=None,
                    allow_custom_value=True,
                    label="Class name",
                    info="What the image shows; pick a known class or type any name.",
                    elem_id="detect-class",
                )
                with gr.Row():
                    model = gr.Dropdown(
                        choices=model_choices(config),
                        value=config.start_choice,
                        allow_custom_value=True,
                        label="Model",
                        info="training-free, a checkpoint under checkpoints/, or a hub id (user/name).",
                        scale=4,
                        elem_id="detect-model",
                    )
                    refresh = gr.Button("↻", scale=0, min_width=40, elem_id="detect-refresh")
                threshold = gr.Slider(
                    0.0, 1.0, value=SCORING.threshold, step=0.01, label="Threshold (verdict and region)"
                )
                calibrated = gr.Checkbox(
                    value=True,
                    label=(
                        "Use the class's calibrated threshold when it has one (from its references) "
                        "instead of the slider"
                    ),
                    elem_id="detect-calibrated",
                )
                sigma = gr.Slider(
                    0.0, 16.0, value=SCORING.sigma, step=0.5, label="Smoothing σ (pixels at the model's input size)"
                )
                stores = gr.State({}, time_to_live=SESSION_TTL)  # this session's References, one per model
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
                        clear_button = gr.Button(
                            "Clear this class's references", size="sm", elem_id="detect-clear-references"
                        )
                    start = registry.peek(config.start_choice)
                    shared = sorted(start.reference_store.classes) if isinstance(start, KAnoCLIP) else []
                    intro = REFERENCES_HELP + (
                        f" Shared references (`--references`) of {', '.join(f'`{c}`' for c in shared)} "
                        "serve every visitor without their own."
                        if shared
                        else ""
                    )
                    reference_status = gr.Markdown(intro, elem_id="detect-references-status")
                button = gr.Button("Detect", variant="primary", elem_id="detect-button")
                gr.Examples(
                    examples=[[str(EXAMPLES_DIR / f), c] for f, c in EXAMPLES if (EXAMPLES_DIR / f).is_file()],
                    inputs=[image, class_name],
                    label="Examples (real images)",
                    cache_examples=False,
                )
                gr.Markdown(EXAMPLES_CREDIT, elem_id="examples-credit")
            with gr.Column(scale=3, min_width=420):
                summary = gr.Markdown(ctx.startup, label="summary", elem_id="detect-summary")
                with gr.Row():
                    score = gr.Number(label="Anomaly score [0, 1]", interactive=False, elem_id="detect-score")
                    decision = gr.Label(label="Verdict", elem_id="detect-verdict")
                overlay = gr.Image(
                    label="Anomaly map over the image (input size; colour bar on the right)",
                    format="png",
                    type="pil",
                    interactive=False,
                    elem_id="detect-overlay",
                )
                region = gr.AnnotatedImage(
                    label="Thresholded anomaly region", format="png", color_map={}, height=420, elem_id="detect-region"
                )
                gallery = gr.Gallery(
                    label=(
                        "Stage maps M₁ᵃ..M₄ᵃ (abnormal probability per stage), normal map Mⁿ, "
                        "abnormal map Mᵃ (means over stages), "
                        "and with references the reference map (distance to the nearest normal patch)"
                    ),
                    columns=3,
                    format="png",
                    elem_id="detect-gallery",
                )
                guidance = gr.Dataframe(
                    headers=GUIDANCE_COLUMNS,
                    label=(
                        "Prompts that guided this result "
                        "(knowledge descriptions by source, learned or template prompts)"
                    ),
                    wrap=True,
                    column_widths=GUIDANCE_WIDTHS,
                    interactive=False,
                    elem_id="detect-guidance",
                )
        button.click(
            detect,
            inputs=[image, class_name, model, threshold, sigma, calibrated, stores, visitor],
            outputs=[summary, score, decision, overlay, region, gallery, guidance],
            api_name="detect",
            concurrency_limit=config.concurrency,
            concurrency_id="detect",
        )
        add_button.click(
            add_references,
            inputs=[reference_files, class_name, model, stores, visitor],
            outputs=[reference_status, reference_files, stores],
            api_name="add_references",
            concurrency_limit=config.concurrency,
            concurrency_id="detect",  # the same forward passes as a detection
        )
        clear_button.click(
            clear_references,
            inputs=[class_name, model, stores],
            outputs=[reference_status, stores],
            api_name="clear_references",
        )
        for trigger in (class_name.change, model.change):
            trigger(
                show_references, inputs=[class_name, model, stores], outputs=reference_status, api_visibility="private"
            )
        refresh.click(lambda: dropdown_update(model_choices(config)), outputs=model, api_visibility="private")
    return DetectTab(model=model, class_name=class_name, threshold=threshold, calibrated=calibrated, stores=stores)
