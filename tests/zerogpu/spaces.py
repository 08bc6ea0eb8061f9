"""A stand-in for Hugging Face's ``spaces`` package: ``spaces.GPU`` as ZeroGPU runs it, for tests.

Put this folder on ``PYTHONPATH`` (with ``SPACES_ZERO_GPU=1``) and ``import spaces`` gets it.
A decorated function runs in a worker process forked from the app on its first call and reused
for the next ones (so the worker keeps the models it was forked with); its arguments go to the
worker and its result comes back pickled, as on ZeroGPU. What crosses must hold CPU tensors only:
the app's process may not initialise CUDA. :func:`crossing_devices` lists the devices of the
tensors in an object (found while pickling it, so a fake tensor with no data can be checked
too); a crossing with any non-CPU tensor fails the call. With ``ZEROGPU_LOG`` set, every
crossing appends one JSON line: the function, the worker's pid, and the devices of the tensors
in its arguments and in its result.
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import torch

_functions: dict[str, Callable[..., Any]] = {}
_lock = threading.Lock()  # one call at a time through the worker's pipe
_worker: tuple[Any, Any] | None = None  # (process, connection)


class _DevicePickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, devices: list[str]) -> None:
        super().__init__(file)
        self.devices = devices

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            self.devices.append(str(obj.device))
            return torch.empty, (0,)  # the data is not needed to find the devices
        return NotImplemented


def crossing_devices(value: Any) -> list[str]:
    """The device of every tensor ``value`` holds, in the order pickle meets them."""
    devices: list[str] = []
    _DevicePickler(io.BytesIO(), devices).dump(value)
    return devices


def _cross(value: Any, what: str) -> tuple[bytes, list[str]]:
    devices = crossing_devices(value)
    bad = sorted({d for d in devices if d != "cpu"})
    if bad:
        raise RuntimeError(f"ZeroGPU: {what} holds tensors on {', '.join(bad)}; only CPU tensors may cross")
    return pickle.dumps(value), devices


def _log(name: str, pid: int, arguments: list[str], result: list[str]) -> None:
    path = os.environ.get("ZEROGPU_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"function": name, "pid": pid, "arguments": arguments, "result": result}) + "\n")


def _serve(connection: Any, apps_end: Any) -> None:
    """The worker: run each call sent down the pipe, send back the pickled result or the error.

    It closes its copy of the app's end, so that it sees the pipe close (and ends) when the app does.
    """
    apps_end.close()
    while True:
        try:
            key, payload = connection.recv()
        except EOFError:
            return
        try:
            if key not in _functions:  # decorated after the fork: the app starts a new worker
                connection.send(("unknown", None, []))
                continue
            args, kwargs = pickle.loads(payload)
            data, devices = _cross(_functions[key](*args, **kwargs), f"the result of {key}")
            connection.send(("ok", data, devices))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the app
            try:
                connection.send(("error", pickle.dumps(exc), []))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                connection.send(("error", pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}")), []))


def _start_worker() -> tuple[Any, Any]:
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(child, parent), daemon=True)
    process.start()
    child.close()
    return process, parent


def _call(key: str, args: tuple, kwargs: dict) -> Any:
    global _worker
    payload, devices = _cross((args, kwargs), f"the arguments of {key}")
    with _lock:
        for _ in range(2):
            if _worker is None or not _worker[0].is_alive():
                _worker = _start_worker()
            process, connection = _worker
            connection.send((key, payload))
            status, data, result_devices = connection.recv()
            if status != "unknown":
                break
            process.terminate()
            _worker = None
    _log(key, process.pid, devices, result_devices)
    if status == "error":
        raise pickle.loads(data)
    return pickle.loads(data)


def GPU(fn: Callable[..., Any] | None = None, *, duration: int | None = None) -> Any:  # noqa: N802 - spaces' name
    """``@spaces.GPU`` / ``@spaces.GPU(duration=...)``: ``fn`` runs in the forked worker."""
    if fn is None:
        return lambda f: GPU(f, duration=duration)
    key = f"{fn.__module__}.{fn.__qualname__}"
    _functions[key] = fn  # a later decoration of the same name (another app built) replaces it

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return _call(key, args, kwargs)

    return call
