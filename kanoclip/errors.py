"""User-facing errors.

Every error a user can cause (a bad path, a corrupt image, a wrong checkpoint, an
unreachable server) is raised as a :class:`KAnoCLIPError` subclass whose message is
one line naming the thing and the fix. The CLI prints that line without a traceback;
the app shows it in a ``gr.Error``.

A message that tells the caller to change an argument names it in the caller's language:
the error is raised with ``argument="backbone"`` and the placeholder :data:`ARG` in its text.
``str(error)`` is the Python API's wording (``backbone=``); :meth:`KAnoCLIPError.message`
with ``flags=True`` is the command line's (``--backbone``), used by the CLI and the app.
"""

from __future__ import annotations

ARG = "<arg>"  # where a message names its argument; rendered by KAnoCLIPError.message


def cli_flag(argument: str) -> str:
    """The command-line flag of an API argument: ``image_size`` -> ``--image-size``."""
    return "--" + argument.replace("_", "-")


class KAnoCLIPError(Exception):
    """Base class of every error whose message is meant for the user.

    Args:
        text: the one-line message; it may hold :data:`ARG` where the argument is named.
        argument: the API argument the message is about (e.g. ``"backbone"``), if any.
    """

    def __init__(self, text: str = "", *, argument: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.argument = argument

    def message(self, *, flags: bool = False) -> str:
        """The message naming the argument as the API does (``backbone=``) or, with ``flags``, as a flag."""
        if self.argument is None:
            return self.text
        return self.text.replace(ARG, cli_flag(self.argument) if flags else f"{self.argument}=")

    def __str__(self) -> str:
        return self.message()


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


class VideoError(KAnoCLIPError):
    """A video clip cannot be decoded, holds no frames, or exceeds the length limit."""


class DatasetError(KAnoCLIPError):
    """A dataset folder does not match its layout, or a sample cannot be read."""


class GenerationError(KAnoCLIPError):
    """An LLM / VQA endpoint failed after all retries."""


class InputError(KAnoCLIPError):
    """Any other invalid argument (empty class name, bad option value)."""
