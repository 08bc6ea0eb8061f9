"""Drawings: heat-map overlays, loss curves and prompt-similarity plots (matplotlib).

All functions are pure: they take arrays / images and return PIL images or write PNG files,
using matplotlib's object API (no pyplot global state), so they are safe in server threads.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from kanoclip.fileio import atomic_write_bytes

CMAP = "jet"


def colorize(anomaly_map: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """A (H, W) map in [0, 1] -> (H, W, 3) uint8 colours."""
    rgba = colormaps[cmap](np.clip(anomaly_map, 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5, cmap: str = CMAP) -> Image.Image:
    """The heat map blended over the image, at the image's own size (RGB)."""
    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(f"map shape {anomaly_map.shape} does not match image size {(image.height, image.width)}")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1.0 - alpha) * base + alpha * colorize(anomaly_map, cmap).astype(np.float32)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=32)
def colorbar_image(height: int, cmap: str = CMAP, width: int = 90) -> Image.Image:
    """A vertical colour bar (0 at the bottom, 1 at the top) as an RGB image of the given height.

    Cached: it depends on its arguments alone (callers paste it, never modify it).
    """
    dpi = 100
    fig = Figure(figsize=(width / dpi, max(height, 120) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.15, 0.05, 0.25, 0.9))
    gradient = np.linspace(1, 0, 256)[:, None]
    ax.imshow(gradient, aspect="auto", cmap=cmap, extent=(0, 1, 0, 1))
    ax.set_xticks([])
    ax.yaxis.tick_right()
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.tick_params(labelsize=8)
    bar = figure_to_image(fig)
    return bar.resize((width, height), Image.Resampling.BILINEAR) if bar.height != height else bar


def overlay_with_colorbar(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The overlay at the image's size with the colour bar beside it (not inside it)."""
    overlay = heatmap_overlay(image, anomaly_map, alpha)
    bar = colorbar_image(overlay.height)
    canvas = Image.new("RGB", (overlay.width + bar.width, overlay.height), "white")
    canvas.paste(overlay, (0, 0))
    canvas.paste(bar, (overlay.width, 0))
    return canvas


def png_bytes(picture: Figure | Image.Image) -> bytes:
    """A matplotlib figure or a PIL image encoded as PNG (lossless)."""
    buffer = io.BytesIO()
    if isinstance(picture, Figure):
        picture.savefig(buffer, format="png")
    else:
        picture.save(buffer, format="PNG")
    return buffer.getvalue()


def figure_to_image(fig: Figure) -> Image.Image:
    """Render a matplotlib figure to an RGB PIL image."""
    return Image.open(io.BytesIO(png_bytes(fig))).convert("RGB")


MARKED_POINTS = 30  # curves with at most this many points mark each one


def plot_loss_curves(history: Sequence[Mapping[str, float]], title: str = "Training loss") -> Figure:
    """Loss terms against the (fractional) epoch.

    Args:
        history: one dict per point with ``epoch`` and the loss terms: one per epoch, or one
            per training step with ``epoch`` = epochs done so far (e.g. 0.25 after a quarter).
        title: the plot's title.

    Returns:
        The figure; each point is marked only on short curves.
    """
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if history:
        epochs = [h["epoch"] for h in history]
        marker = "o" if len(history) <= MARKED_POINTS else None
        for key in [k for k in history[0] if k != "epoch"]:
            ax.plot(epochs, [h[key] for h in history], marker=marker, label=key)
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_png(picture: Figure | Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write a figure or an image as PNG, atomically."""
    return atomic_write_bytes(path, png_bytes(picture))
