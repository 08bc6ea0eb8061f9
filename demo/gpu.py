"""The app's GPU boundary: ``gpu`` marks the functions that run the model, and what may cross it.

On a Hugging Face **ZeroGPU** Space (``SPACES_ZERO_GPU`` set, the ``spaces`` package installed)
a function decorated with ``spaces.GPU`` runs in a worker process forked from the app, which
holds the GPU for the call; its arguments are sent to the worker and its result is pickled back
to the app's process, where CUDA must never be initialised. So:

* **Out:** what a ``@gpu`` function returns is moved to the CPU inside it (:func:`move`), on
  every machine: a session's references then hold CPU tensors, which also keeps many visitors'
  references out of a small GPU's memory (each call copies its class's few MB to the device).
* **In:** only CPU tensors and plain data are passed in (a session's references, the shared
  ``--references`` store, loaded on the CPU); the function moves what it needs to the model's
  device with :func:`move`.
* **The models:** ZeroGPU emulates CUDA in the app's main thread only, so the models a visitor
  can pick are loaded at start (:class:`demo.state.AppContext`) and no other is loaded later;
  training, which runs in a background thread, is off.
* **Knowledge:** a worker reused across calls keeps the models it was forked with, so each call
  passes the knowledge base's version (and the knowledge base): the worker's model takes it when
  its own is older (:meth:`demo.state.ModelRegistry.get`).

Anywhere else ``gpu`` only adds the move to the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from kanoclip.references import References

ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))


def _spaces_gpu() -> Callable[..., Any] | None:
    """``spaces.GPU`` on ZeroGPU (elsewhere it does nothing: None)."""
    if not ZERO_GPU:
        return None
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return None
    return spaces.GPU


def move(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it on ``device``: tensors, and those inside lists, tuples,
    dicts, dataclasses and reference stores (rebuilt where a tensor moved; the original is left as it is).

    A value whose tensors are all on ``device`` already comes back as the same object, so an
    in-process call (the CPU, or a GPU model given GPU tensors) still merges into the caller's
    own store (:meth:`kanoclip.KAnoCLIP.add_references` under its lock) rather than into a copy.

    Args:
        value: a result or argument of a ``@gpu`` function.
        device: where its tensors go.

    Returns:
        The moved value, or ``value`` itself when nothing in it had to move.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, References):  # a store with a lock of its own: moved as a copy, set by set
        moved = copy.copy(value)
        moved.to(torch.device(device))
        return value if all(moved.stored(c) is value.stored(c) for c in value.classes) else moved
    if isinstance(value, dict):
        items = {k: move(v, device) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    if isinstance(value, (list, tuple)):
        moved = [move(v, device) for v in value]
        if all(m is v for m, v in zip(moved, value)):
            return value
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)  # a named tuple, or not
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f.name for f in dataclasses.fields(value) if f.init]
        changes = {name: move(getattr(value, name), device) for name in fields}
        if all(changes[name] is getattr(value, name) for name in fields):
            return value
        return dataclasses.replace(value, **changes)
    return value


def gpu(fn: Callable[..., Any] | None = None, *, duration: int | None = None) -> Any:
    """Decorate a function that runs the model: ``spaces.GPU`` on ZeroGPU, and its result moved
    to the CPU before it leaves the function.

    Usable as ``@gpu`` or ``@gpu(duration=120)`` (ZeroGPU's time limit in seconds per call).

    Args:
        fn: the function.
        duration: ZeroGPU's limit for one call (its default when None).

    Returns:
        The decorated function (or the decorator, when ``fn`` is None).
    """
    if fn is None:
        return lambda f: gpu(f, duration=duration)

    @functools.wraps(fn)
    def on_the_gpu(*args: Any, **kwargs: Any) -> Any:
        return move(fn(*args, **kwargs), "cpu")

    spaces_gpu = _spaces_gpu()
    if spaces_gpu is None:
        return on_the_gpu
    return spaces_gpu(on_the_gpu) if duration is None else spaces_gpu(duration=duration)(on_the_gpu)
