"""The Detect tab: an image and a class name in, the anomaly map, region, score and guidance out.

The handler :func:`detect` is also the API endpoint ``/detect`` (inputs: image, class name,
then model, threshold, σ and "use the calibrated threshold" with defaults). It keeps nothing
between requests: every call loads its own image, gets its own
:class:`~kanoclip.detection.Detection` and draws its own pictures, so concurrent visitors never
see each other's results.

**Normal references** (k-shot, :mod:`kanoclip.references`): a visitor's good images of a class
serve their detections of that class (the panel and its rules: :mod:`demo.detect_references`).
With k >= 2 the class's threshold is calibrated (leave-one-out), and the verdict says which
threshold decided it.

The tab is built panel by panel: the inputs (:func:`build_input_panel`), the references
(:func:`demo.detect_references.build_references_panel`) and the results (:func:`build_result_panel`).

**Knowledge and roles** (:mod:`demo.access`): on a public app a visitor's own knowledge-base
copy (:class:`~demo.state.Session`) is passed to their detections only, the model box loads only
listed models unless the owner asks, and a reference upload is capped by the app's limits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from demo.components import (
    class_dropdown,
    decode_upload,
    dropdown_update,
    image_input,
    model_dropdown,
    required_class_name,
    unknown_class_hint,
    user_errors,
)
from demo.detect_references import Stores, build_references_panel, serving_references, session_for
from demo.gpu import gpu, move
from demo.memory import MemoryKeeper
from demo.state import AppContext, ModelRegistry, Session, describe_model, model_choices, serve_detection
from kanoclip import KAnoCLIP
from kanoclip.config import ScoringConfig
from kanoclip.detection import Detection, upsample_maps
from kanoclip.errors import InputError
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


# ---------------------------------------------------------------------------- the handler
def detection_call(registry: ModelRegistry) -> Callable[..., Detection]:
    """The Detect tab's model call, marked for the GPU boundary (:func:`demo.gpu.gpu`)."""

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

    return run_detection


def detect_handler(ctx: AppContext) -> Callable[..., tuple[Any, ...]]:
    """The ``/detect`` handler: one detection with the session's references and knowledge base."""
    run_detection = detection_call(ctx.registry)
    memory = MemoryKeeper()  # a public Space runs for weeks: keep glibc's freed pages from piling up

    @user_errors
    def detect(
        image: str | None,
        class_name: str | None,
        model_choice: str | None = ctx.config.start_choice,
        threshold: float = SCORING.threshold,
        sigma: float = SCORING.sigma,
        calibrated: bool = True,
        stores: Stores | None = None,
        state: Session | None = None,
        profile: gr.OAuthProfile | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        """One detection; ``calibrated``: the class's calibrated threshold wins over the slider."""
        if image is None or (isinstance(image, str) and not image):
            raise InputError("no image: upload an image, paste one from the clipboard or take one with the webcam")
        name = required_class_name(class_name)
        t, s = check_controls(threshold, sigma)
        pil = decode_upload(image)
        progress(0.1, desc="loading the model")
        state = state or Session()
        owner = state.is_owner(ctx.config.access, profile)
        model, session = session_for(ctx, model_choice, stores, owner)
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

    return detect


# ---------------------------------------------------------------------------- the panels
@dataclass
class DetectInputs:
    """The input panel's controls (the image, the class, the model and the scoring controls)."""

    image: gr.Image
    class_name: gr.Dropdown
    model: gr.Dropdown
    threshold: gr.Slider
    calibrated: gr.Checkbox
    sigma: gr.Slider


def build_input_panel(ctx: AppContext) -> DetectInputs:
    """The image, class name, model (with its refresh button), threshold, calibrated and σ controls."""
    config = ctx.config
    image = image_input(label="Image (upload, paste or webcam)", height=340, elem_id="detect-image")
    class_name = class_dropdown(ctx.knowledge.snapshot().classes(), elem_id="detect-class")
    with gr.Row():
        model = model_dropdown(model_choices(config), config.start_choice, scale=4, elem_id="detect-model")
        refresh = gr.Button("↻", scale=0, min_width=40, elem_id="detect-refresh")
    threshold = gr.Slider(0.0, 1.0, value=SCORING.threshold, step=0.01, label="Threshold (verdict and region)")
    calibrated = gr.Checkbox(
        value=True,
        label="Use the class's calibrated threshold when it has one (from its references) instead of the slider",
        elem_id="detect-calibrated",
    )
    sigma = gr.Slider(0.0, 16.0, value=SCORING.sigma, step=0.5, label="Smoothing σ (pixels at the model's input size)")
    refresh.click(lambda: dropdown_update(model_choices(config)), outputs=model, api_visibility="private")
    return DetectInputs(image, class_name, model, threshold, calibrated, sigma)


def build_examples(inputs: DetectInputs) -> None:
    """The example images (those shipped with the app) and their credits."""
    gr.Examples(
        examples=[[str(EXAMPLES_DIR / f), c] for f, c in EXAMPLES if (EXAMPLES_DIR / f).is_file()],
        inputs=[inputs.image, inputs.class_name],
        label="Examples (real images)",
        cache_examples=False,
    )
    gr.Markdown(EXAMPLES_CREDIT, elem_id="examples-credit")


def build_result_panel(ctx: AppContext) -> list[gr.components.Component]:
    """The result's components, in the order of :meth:`Rendered.outputs` (the ``/detect`` outputs)."""
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
        label="Prompts that guided this result (knowledge descriptions by source, learned or template prompts)",
        wrap=True,
        column_widths=GUIDANCE_WIDTHS,
        interactive=False,
        elem_id="detect-guidance",
    )
    return [summary, score, decision, overlay, region, gallery, guidance]


# ---------------------------------------------------------------------------- the tab
@dataclass
class DetectTab:
    """The Detect tab's controls that other tabs read (the Batch, Live and Video tabs detect as it does)."""

    model: gr.Dropdown
    class_name: gr.Dropdown
    threshold: gr.Slider
    calibrated: gr.Checkbox
    stores: gr.State  # the session's References, one per model (shared with the Batch, Live and Video tabs)
    visitor: gr.State  # the visitor's Session: their role and their own knowledge base (None: the shared one)


def build_detect_tab(ctx: AppContext, visitor: gr.State) -> DetectTab:
    """The tab; ``visitor`` is the app's per-visitor :class:`~demo.state.Session` state."""
    config = ctx.config
    with gr.Tab("Detect", id="detect"):
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                inputs = build_input_panel(ctx)
                stores = gr.State({}, time_to_live=SESSION_TTL)  # this session's References, one per model
                build_references_panel(ctx, inputs.class_name, inputs.model, stores, visitor)
                button = gr.Button("Detect", variant="primary", elem_id="detect-button")
                build_examples(inputs)
            with gr.Column(scale=3, min_width=420):
                results = build_result_panel(ctx)
        button.click(
            detect_handler(ctx),
            inputs=[inputs.image, inputs.class_name, inputs.model, inputs.threshold, inputs.sigma, inputs.calibrated,
                    stores, visitor],
            outputs=results,
            api_name="detect",
            concurrency_limit=config.concurrency,
            concurrency_id="detect",
        )  # fmt: skip
    return DetectTab(inputs.model, inputs.class_name, inputs.threshold, inputs.calibrated, stores, visitor)
