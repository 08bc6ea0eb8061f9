"""UI building blocks shared by the tabs: error reporting, the image input, class choices."""

from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from kanoclip.errors import ImageError, InputError, KAnoCLIPError
from kanoclip.images import load_image
from kanoclip.knowledge import KnowledgeBase
from kanoclip.knowledge import classes as catalog

log = logging.getLogger("kanoclip.app")


def app_error(message: str) -> gr.Error:
    """A ``gr.Error`` carrying the app's own one-line message (HTML-escaped: it may quote user text)."""
    return gr.Error(html.escape(message, quote=False), duration=None, title="KAnoCLIP", print_exception=False)


def _translate(exc: Exception) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, KAnoCLIPError):
        return app_error(str(exc))
    log.exception("unexpected error in the app")
    detail = " ".join(str(exc).split())[:300] or "no detail"
    return app_error(f"unexpected error ({type(exc).__name__}: {detail}); the server log has the details")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an event handler so that every failure reaches the user as the app's own message.

    :class:`KAnoCLIPError` becomes ``gr.Error(its message)``; anything else is logged with its
    traceback on the server and shown as one line — never Gradio's bare "Error", never a traceback.
    Works for plain functions and generators (signatures are kept, so ``gr.Progress`` still works).
    """
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - translated for the user
                raise _translate(exc) from None

        return generator

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated for the user
            raise _translate(exc) from None

    return plain


def image_input(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (files, clipboard, webcam) whose upload reaches the app undecoded, as a file path.

    Gradio's own preprocessing opens every upload with PIL, so a text file renamed ``.png``
    or a truncated PNG would fail inside Gradio with its generic "Error". Here an uploaded
    file's path is passed on as it is and :func:`kanoclip.images.load_image` decodes it, with
    its own clear message for each way an image can be bad. Pasted (base64) images still go
    through Gradio's decoder, with its failures turned into the app's message. (The method is
    replaced on the instance: a subclass would make Gradio write a ``.pyi`` stub beside this file.)
    """
    kwargs.setdefault("type", "filepath")
    kwargs.setdefault("sources", ["upload", "clipboard", "webcam"])
    component = gr.Image(**kwargs)
    decode = component.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        path = getattr(payload, "path", None)
        if component.type == "filepath" and path and not url.startswith("data:"):
            return str(path)
        try:
            return decode(payload)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the user's file
            raise app_error(
                f"the image cannot be decoded ({type(exc).__name__}); upload a PNG, JPEG, BMP or TIFF image"
            ) from None

    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def decode_upload(image: str | Image.Image) -> Image.Image:
    """:func:`load_image`, naming an uploaded file by its name only (not the server's cache path)."""
    try:
        return load_image(image)
    except ImageError as exc:
        if isinstance(image, str):
            raise ImageError(str(exc).replace(image, Path(image).name)) from None
        raise


def class_name_text(value: Any) -> str:
    """A class name as typed, with runs of whitespace collapsed ('' when nothing was typed)."""
    return " ".join(str(value or "").split())


def required_class_name(value: Any, hint: str = "type or pick what the image shows, e.g. 'bottle'") -> str:
    """:func:`class_name_text`, or :class:`InputError` when it is empty."""
    name = class_name_text(value)
    if not name:
        raise InputError(f"class name is empty; {hint}")
    return name


def class_label(name: str) -> str:
    """A class name with its dataset(s), as ``kanoclip kb list`` prints them: ``01 (BTAD)``, ``Class3 (DAGM 2007)``."""
    datasets = ", ".join(catalog.datasets_of(name))
    return f"{name} ({datasets})" if datasets else name


def class_choices(kb: KnowledgeBase) -> list[tuple[str, str]]:
    """Dropdown choices of the knowledge base's classes: (:func:`class_label`, the class name)."""
    return [(class_label(name), name) for name in kb.classes()]


def unknown_class_hint(kb: KnowledgeBase, name: str) -> str:
    """`` Did you mean `pcb1`, `pcb2`?`` (Markdown) for a class the knowledge base lacks; '' when nothing is near."""
    near = kb.suggest(name)
    return f" Did you mean {', '.join(f'`{n}`' for n in near)}?" if near else ""


def class_dropdown(choices: list[str], what: str = "the image shows", **kwargs: Any) -> gr.Dropdown:
    """The class-name box every tab has: pick a known class or type any name.

    Args:
        choices: the known classes.
        what: the end of its hint ("What <what>; ...").
        **kwargs: more ``gr.Dropdown`` arguments (``value``, ``elem_id``, ``scale``, ...).
    """
    options = {"value": None, "label": "Class name", "info": f"What {what}; pick a known class or type any name."}
    return gr.Dropdown(choices=choices, allow_custom_value=True, **{**options, **kwargs})


def model_dropdown(choices: list[str], value: str, **kwargs: Any) -> gr.Dropdown:
    """The model box every tab has: training-free, a listed checkpoint, or a hub id.

    Args:
        choices: the listed models (``demo.state.model_choices``).
        value: the one selected at start.
        **kwargs: more ``gr.Dropdown`` arguments (``elem_id``, ``scale``, ...).
    """
    options = {"label": "Model", "info": "training-free, a checkpoint under checkpoints/, or a hub id (user/name)."}
    return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, **{**options, **kwargs})


def dropdown_update(choices: list[str] | list[tuple[str, str]], value: str | None = None) -> dict[str, Any]:
    """A dropdown update with new choices (keeping the current value unless ``value`` is given)."""
    return gr.update(choices=choices) if value is None else gr.update(choices=choices, value=value)
