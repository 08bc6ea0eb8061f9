"""The Detect tab: an image and a class name in, the anomaly map, region, score and guidance out.

The handler :func:`detect` is also the API endpoint ``/detect`` (inputs: image, class name,
then model, threshold and σ with defaults). It keeps nothing between requests: every call
loads its own image, gets its own :class:`~kanoclip.detection.Detection` and draws its own
pictures, so concurrent visitors never see each other's results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from kanoclip import KAnoCLIP
from kanoclip.config import ScoringConfig
from kanoclip.detection import Detection, upsample_maps
from kanoclip.errors import ImageError, InputError
from kanoclip.images import load_image
from kanoclip.knowledge import SOURCE_LABELS as KNOWLEDGE_LABELS
from kanoclip.viz import colorize, overlay_with_colorbar

from demo.components import dropdown_update, gpu, image_input, required_class_name, unknown_class_hint, user_errors
from demo.state import AppContext, compute_slot, describe_model, model_choices

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
    """The 4 stage maps M_i^a, then M^n and M^a, coloured (jet, 0 blue .. 1 red), with captions
    short enough for a gallery cell (the gallery's label says what the maps are).

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
    return items


def guidance_table(det: Detection) -> pd.DataFrame:
    """The prompts that guided the result, ranked by similarity to the image (and to the region).

    Similarities are rounded to 3 decimals, which keeps them on one line of a narrow column
    (:attr:`Detection.guidance` has them in full).
    """
    by_region = sorted(range(len(det.guidance)), key=lambda i: det.guidance[i].region_similarity, reverse=True)
    region_rank = {index: rank for rank, index in enumerate(by_region, start=1)}
    rows = [
        [i + 1, SOURCE_LABELS.get(g.source, g.source), g.state, g.text, round(g.image_similarity, 3), round(g.region_similarity, 3), region_rank[i]]
        for i, g in enumerate(det.guidance)
    ]
    return pd.DataFrame(rows, columns=GUIDANCE_COLUMNS)


def verdict(det: Detection) -> str:
    word = "ANOMALOUS" if det.is_anomalous else "normal"
    sign = "≥" if det.is_anomalous else "<"
    return f"{word} (score {sign} {det.threshold:.2f})"


def result_summary(model: KAnoCLIP, det: Detection, region_fraction: float) -> str:
    """Markdown above the results: the model, the class and what the numbers mean."""
    if det.known_class:
        cls = f"**Class:** `{det.class_name}` (in the knowledge base)"
    else:
        hint = unknown_class_hint(model.knowledge, det.class_name)
        cls = f"**Class:** `{det.class_name}` — not in the knowledge base, so generic anomaly descriptions were used.{hint}"
    region = (
        f"{region_fraction:.1%} of the pixels reach the threshold {det.threshold:.2f}"
        if region_fraction > 0
        else f"no pixel reaches the threshold {det.threshold:.2f}"
    )
    return f"{describe_model(model)}\n\n{cls} · **Score:** {det.score:.4f} → {verdict(det)} · **Region:** {region}"


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


def render(model: KAnoCLIP, image: Image.Image, det: Detection) -> Rendered:
    mask = det.anomaly_map >= det.threshold
    label = f"{REGION_LABEL} (map ≥ {det.threshold:.2f})"
    return Rendered(
        summary=result_summary(model, det, float(mask.mean())),
        score=round(float(det.score), 6),  # float32 carries ~7 digits; 6 decimals keep it readable
        verdict=verdict(det),
        overlay=overlay_with_colorbar(image, det.anomaly_map),
        region=(image, [(mask.astype(np.float32), label)]),
        gallery=map_gallery(det, model.model.visual.stage_layers),
        guidance=guidance_table(det),
    )


def decode(image: str | Image.Image) -> Image.Image:
    """:func:`load_image`, naming an uploaded file by its name only (not the server's cache path)."""
    try:
        return load_image(image)
    except ImageError as exc:
        if isinstance(image, str):
            raise ImageError(str(exc).replace(image, Path(image).name)) from None
        raise


# ---------------------------------------------------------------------------- the tab
@dataclass
class DetectTab:
    model: gr.Dropdown
    class_name: gr.Dropdown


def build_detect_tab(ctx: AppContext) -> DetectTab:
    config, registry = ctx.config, ctx.registry

    @gpu
    def run_detection(model_choice: str | None, image: Image.Image, class_name: str, threshold: float, sigma: float) -> Detection:
        """The model call, the only GPU work of a request (``spaces.GPU`` on ZeroGPU Spaces).

        It takes the model's name, not the model: the model is already loaded (and cached) by
        the caller, and only plain values cross into a ZeroGPU worker.
        """
        model = registry.get(model_choice)
        with compute_slot(model):
            return model.detect(image, class_name, threshold=threshold, sigma=sigma)

    @user_errors
    def detect(
        image: str | None,
        class_name: str | None,
        model_choice: str | None = config.start_choice,
        threshold: float = SCORING.threshold,
        sigma: float = SCORING.sigma,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Any, ...]:
        if image is None or (isinstance(image, str) and not image):
            raise InputError("no image: upload an image, paste one from the clipboard or take one with the webcam")
        name = required_class_name(class_name)
        t, s = check_controls(threshold, sigma)
        pil = decode(image)
        progress(0.1, desc="loading the model")
        model = registry.get(model_choice)
        progress(0.3, desc="detecting")
        det = run_detection(model_choice, pil, name, t, s)
        progress(0.8, desc="drawing")
        return render(model, pil, det).outputs()

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
                threshold = gr.Slider(0.0, 1.0, value=SCORING.threshold, step=0.01, label="Threshold (verdict and region)")
                sigma = gr.Slider(0.0, 16.0, value=SCORING.sigma, step=0.5, label="Smoothing σ (pixels at the model's input size)")
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
                    label="Stage maps M₁ᵃ..M₄ᵃ (abnormal probability per stage), normal map Mⁿ, abnormal map Mᵃ (means over stages)",
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
        button.click(
            detect,
            inputs=[image, class_name, model, threshold, sigma],
            outputs=[summary, score, decision, overlay, region, gallery, guidance],
            api_name="detect",
            concurrency_limit=config.concurrency,
            concurrency_id="detect",
        )
        refresh.click(lambda: dropdown_update(model_choices(config)), outputs=model, api_visibility="private")
    return DetectTab(model=model, class_name=class_name)
