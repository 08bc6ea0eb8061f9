"""The LLM-VQA knowledge base of KnPL (paper §2.2): anomaly descriptions per class.

``KnowledgeBase.builtin()`` is the knowledge base shipped with the package (every
class of the paper's 12 datasets plus MTD, written by hand: source ``"builtin"``);
:mod:`kanoclip.knowledge.generate` builds or extends one with an OpenAI-compatible
LLM / VQA server.
"""

from kanoclip.knowledge.base import (
    GENERIC_TEMPLATES,
    KNOWLEDGE_SOURCES,
    LLM_TEMPLATE,
    SOURCE_LABELS,
    STORED_SOURCES,
    VQA_TEMPLATE,
    Description,
    KnowledgeBase,
    Provenance,
    image_sha256,
)
from kanoclip.knowledge.classes import canonical_name, canonical_names, classes_matching, display_name

__all__ = [
    "GENERIC_TEMPLATES",
    "KNOWLEDGE_SOURCES",
    "LLM_TEMPLATE",
    "SOURCE_LABELS",
    "STORED_SOURCES",
    "VQA_TEMPLATE",
    "Description",
    "KnowledgeBase",
    "Provenance",
    "canonical_name",
    "canonical_names",
    "classes_matching",
    "display_name",
    "image_sha256",
]
