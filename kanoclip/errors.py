"""User-facing errors.

Every error a user can cause (a bad path, a corrupt image, a wrong checkpoint, an
unreachable server) is raised as a :class:`KAnoCLIPError` subclass whose message is
one line naming the thing and the fix. The CLI prints that line without a traceback;
the app shows it in a ``gr.Error``.
"""

from __future__ import annotations


class KAnoCLIPError(Exception):
    """Base class of every error whose message is meant for the user."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class BackboneError(KAnoCLIPError):
    """The CLIP backbone cannot be loaded (not cached, offline, malformed folder)."""


class ImageError(KAnoCLIPError):
    """An input image cannot be decoded or is unsuitable (too small, too large)."""


class CheckpointError(KAnoCLIPError):
    """A checkpoint is missing, unsafe (pickle), mismatched or corrupt."""


class KnowledgeBaseError(KAnoCLIPError):
    """A knowledge-base file is malformed, of the wrong version, or unreadable."""


class DatasetError(KAnoCLIPError):
    """A dataset folder does not match its layout, or a sample cannot be read."""


class GenerationError(KAnoCLIPError):
    """An LLM / VQA endpoint failed after all retries."""


class InputError(KAnoCLIPError):
    """Any other invalid argument (empty class name, bad option value)."""
