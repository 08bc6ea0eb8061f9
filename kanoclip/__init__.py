"""KAnoCLIP: zero-shot anomaly detection with CLIP, knowledge-driven prompt learning and
enhanced cross-modal fusion.

    >>> from kanoclip import KAnoCLIP
    >>> model = KAnoCLIP.from_pretrained()           # training-free, ViT-L/14@336px
    >>> det = model.detect("bottle.png", "bottle")
    >>> det.score, det.is_anomalous, det.anomaly_map.shape

The public names are imported lazily, so that light commands (``kanoclip kb list``) do not
pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "KAnoCLIP": "kanoclip.detector",
    "KAnoCLIPConfig": "kanoclip.config",
    "Detection": "kanoclip.detection",
    "Guidance": "kanoclip.detection",
    "KnowledgeBase": "kanoclip.knowledge",
    "KAnoCLIPError": "kanoclip.errors",
}
__all__ = ["KAnoCLIP", "KAnoCLIPConfig", "Detection", "Guidance", "KnowledgeBase", "KAnoCLIPError"]

if TYPE_CHECKING:
    from kanoclip.config import KAnoCLIPConfig
    from kanoclip.detection import Detection, Guidance
    from kanoclip.detector import KAnoCLIP
    from kanoclip.errors import KAnoCLIPError
    from kanoclip.knowledge import KnowledgeBase


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kanoclip' has no attribute {name!r}")
