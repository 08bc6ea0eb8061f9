"""KAnoCLIP: zero-shot anomaly detection with CLIP, knowledge-driven prompt learning and
enhanced cross-modal fusion.

    >>> from kanoclip import KAnoCLIP
    >>> model = KAnoCLIP.from_pretrained()           # training-free, ViT-L/14@336px
    >>> det = model.detect("bottle.png", "bottle")
    >>> det.score, det.is_anomalous, det.anomaly_map.shape
"""

from kanoclip.config import KAnoCLIPConfig
from kanoclip.detection import Detection, Guidance
from kanoclip.errors import KAnoCLIPError
from kanoclip.knowledge import KnowledgeBase
from kanoclip.model import KAnoCLIP

__all__ = ["KAnoCLIP", "KAnoCLIPConfig", "Detection", "Guidance", "KnowledgeBase", "KAnoCLIPError"]
__version__ = "0.1.0"
