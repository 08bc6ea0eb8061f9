"""The :class:`Sample` record every dataset reader produces, and mask decoding.

A sample is a path plus its labels; nothing is decoded while datasets are listed
(except KolektorSDD's label masks, which are the only place its image labels live).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kanoclip.errors import DatasetError, first_line

#: File name endings recognised as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Modes whose pixel values are read as they are; every other mode (RGB, RGBA, P, 1,
# LA, CMYK, ...) is converted to 8-bit grey first, which drops any alpha channel.
_DIRECT_MODES = frozenset({"L", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclass(frozen=True)
class Sample:
    """One test image of a dataset.

    ``class_name`` is the canonical class name (the dataset's folder name for the
    class, see ``docs/datasets.md``); ``label`` is 0 for normal and 1 for anomalous;
    ``mask`` is the pixel ground truth of an anomalous image where the dataset has
    one (normal samples never carry a mask: their ground truth is all normal);
    ``dataset`` is the dataset kind (``"mvtec"``, ``"visa"``, ...); ``defect`` is the
    defect type where the layout names it, ``"good"`` for normal samples.
    """

    image: Path
    class_name: str
    label: int
    mask: Path | None
    dataset: str
    defect: str = ""


def is_image(path: Path) -> bool:
    """Whether ``path`` has an image file extension (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_mask_array(path: Path) -> np.ndarray:
    """The raw 2-D pixel values of a mask file; :class:`DatasetError` if unreadable."""
    try:
        with Image.open(path) as image:
            if image.mode not in _DIRECT_MODES:
                image = image.convert("L")
            values = np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"mask {path} cannot be read ({first_line(exc)}); restore the file from the dataset archive"
        ) from exc
    if values.ndim != 2:
        raise DatasetError(f"mask {path} has shape {values.shape}, expected a 2-D image; restore the file")
    return values


def binarize_mask(values: np.ndarray) -> np.ndarray:
    """Anomalous pixels of a mask: ``> 127``, or ``> 0`` for masks whose values are all <= 127.

    Most publishers save masks as 0/255, some with grey anti-aliased fringes (MTD), so
    the cut is at 127. VisA saves them as small label indices (0/1/2...), which a cut
    at 127 would erase; a mask with no value above 127 is therefore read as ``> 0``.
    """
    cut = 127 if values.size and values.max() > 127 else 0
    return values > cut
