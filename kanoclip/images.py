"""Decoding user images safely and preprocessing them for CLIP.

Accepted: a path (str / ``os.PathLike``), raw bytes, a PIL image, or a numpy array of shape
``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` — uint8, uint16, bool, or float in
[0, 1]. Everything becomes an RGB PIL image in its displayed orientation: EXIF rotation is
applied, 16-bit and float data are rescaled, palette/greyscale/CMYK are converted, and alpha
is composited on a neutral grey. Anything else fails with one :class:`ImageError` line naming
the image and the reason — corrupt, truncated or empty files, text with an image extension,
and images over :data:`MAX_PIXELS` (decompression bombs, refused from the header, before any
pixel is decoded).

Preprocessing resizes the whole image to the model's square input (no centre crop, so the
anomaly map covers every pixel) and normalises with the backbone's mean and std, on the model's
device.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kanoclip.errors import ImageError, first_line

if TYPE_CHECKING:
    import torch

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

MAX_PIXELS = 100_000_000  # larger images are refused (decompression-bomb guard)
MIN_SIDE = 16  # a shorter side below this cannot be resized meaningfully to a patch grid
_BACKGROUND = (128, 128, 128)  # neutral grey under transparent pixels
_ORIENTATION = 0x0112  # the EXIF orientation tag


def describe(image: ImageInput) -> str:
    """A short name for an input, for messages and result listings."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, np.ndarray):
        return f"array{tuple(image.shape)}"
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"image {image.size[0]}x{image.size[1]}"
    return "image bytes"


def load_image(image: ImageInput) -> Image.Image:
    """Decode any accepted input to an RGB PIL image in display orientation."""
    name = describe(image)
    if isinstance(image, np.ndarray):
        pil = _from_array(image, name)
    elif isinstance(image, Image.Image):
        pil = image
        _check_size(pil.size, name)
    elif isinstance(image, (str, os.PathLike, bytes)):
        pil = _open(image, name)
    else:
        raise ImageError(
            f"{name}: unsupported image type {type(image).__name__}; pass a path, bytes, a PIL image or a numpy array"
        )
    try:
        rgb = _to_rgb(_upright(pil), name)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: cannot decode the image ({first_line(exc)})") from None
    return rgb


def _open(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        data = path.read_bytes()
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pil = Image.open(io.BytesIO(data))
            _check_size(pil.size, name)
            pil.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{name}: image is larger than {MAX_PIXELS // 1_000_000} megapixels (possible decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({first_line(exc)})") from None
    return pil


def _upright(pil: Image.Image) -> Image.Image:
    """The image in its displayed orientation; itself (no copy) when EXIF asks for no rotation."""
    if pil.getexif().get(_ORIENTATION, 1) in (0, 1):
        return pil
    return ImageOps.exif_transpose(pil)


def _check_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height / 1e6:.0f} megapixels, over the "
            f"{MAX_PIXELS // 1_000_000}-megapixel limit (possible decompression bomb); downscale it first"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name}: image is {width}x{height}; its shorter side must be at least {MIN_SIDE} pixels")


def _to_rgb(pil: Image.Image, name: str) -> Image.Image:
    mode = pil.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(pil)
        return _from_array(array.astype(np.float64) / _full_scale(array, mode), name)
    if mode in ("P", "LA", "PA"):
        pil = pil.convert("RGBA")
    if pil.mode == "RGBA":
        background = Image.new("RGB", pil.size, _BACKGROUND)
        background.paste(pil, mask=pil.getchannel("A"))
        return background
    # already RGB (e.g. decoded once by the caller): returned as it is, not copied
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def _full_scale(array: np.ndarray, mode: str) -> float:
    if mode == "F":
        return 1.0
    if mode.startswith("I;16") or array.max(initial=0) <= 65535:
        return 65535.0
    return float(np.iinfo(np.int32).max)


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"{name}: array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    _check_size((array.shape[1], array.shape[0]), name)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: float array holds NaN or infinite values")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ImageError(
                f"{name}: float array values must be in [0, 1], got [{array.min():.3g}, {array.max():.3g}]"
            )
        array = (array * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(
            f"{name}: array dtype {array.dtype} is not supported; use uint8, uint16, bool or float in [0, 1]"
        )
    # uint8 (H, W) / (H, W, 3) / (H, W, 4) arrays map to L / RGB / RGBA
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)), name)


def preprocess(
    images: list[Image.Image],
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """RGB images -> ``(B, 3, size, size)`` float32 on ``device``: whole image resized (bicubic), normalised.

    The batch travels to the device as uint8 (a quarter of the bytes of float32) and is converted
    and normalised there; images already ``size`` x ``size`` are not resampled.
    """
    import torch  # here, not at the top: decoding alone (the kb CLI's VQA images) needs no torch

    arrays = [
        np.asarray(img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BICUBIC))
        for img in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).to(device)  # (B, S, S, 3) uint8
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return batch.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean_t).div_(std_t)
