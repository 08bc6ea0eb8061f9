"""One process, or several launched by ``accelerate launch`` or ``torchrun``, through accelerate.

Training (:mod:`kanoclip.training.trainer`) runs DDP through :class:`accelerate.Accelerator`;
``kanoclip detect`` and ``kanoclip eval`` shard their images across the processes with
:meth:`accelerate.PartialState.split_between_processes` and gather the results with
:func:`accelerate.utils.gather_object`, so that the main process merges them in the order a
single process would have. Several processes are recognised by ``WORLD_SIZE > 1`` (set by both
launchers); the CPU uses gloo, GPUs NCCL, and each process takes the GPU of its local rank.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

from kanoclip.errors import InputError

Item = TypeVar("Item")


TIMEOUT_ENV = "KANOCLIP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


def collective_timeout() -> timedelta:
    """How long a process waits in a collective (gather, barrier) for the others: 30 minutes, or
    ``$KANOCLIP_DIST_TIMEOUT`` seconds.

    Set for both backends because torch's defaults differ: 30 minutes for gloo, 10 for NCCL. A
    process waits while the main one computes a large class's pixel metrics or writes a
    checkpoint; past the timeout the run stops with a collective timeout error.
    """
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise InputError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds; e.g. {TIMEOUT_ENV}=3600") from None
    if not seconds > 0:
        raise InputError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def _on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


class Processes:
    """The processes of a run: their number, this one's rank and device, and collectives.

    Args:
        device: the ``device`` option ("auto", "cpu", "cuda", ...). With one process it is
            resolved as usual; with several, "cpu" (or "auto" without CUDA) runs every process
            on the CPU, anything else gives each process the GPU of its local rank.
        alone: this process alone, whatever the launcher set (what the API uses unless it is
            given the processes).
    """

    def __init__(self, device: str, *, alone: bool = False) -> None:
        self._option = device
        self._cpu = _on_cpu(device)
        self._accelerator: Any = None
        self.state: Any = None  # accelerate.PartialState with several processes
        if not alone and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=self._cpu, timeout=collective_timeout())
            self.rank, self.world = self.state.process_index, self.state.num_processes
        else:
            self.rank, self.world = 0, 1

    @property
    def device(self) -> torch.device:
        """This process's device (with one process, the option resolved; asked only when needed,
        so that a loader given :attr:`model_device` reports a bad option in its own words)."""
        if self.state is not None:
            return self.state.device
        from kanoclip.detector import resolve_device

        return resolve_device(self._option)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def model_device(self) -> str:
        """The ``device`` to load this process's model on: the option itself with one process
        (resolved by the loader as usual), this process's own device with several."""
        return self._option if self.state is None else str(self.device)

    @property
    def accelerator(self) -> Any:
        """The :class:`accelerate.Accelerator` of a run of several processes (training), made on first use."""
        if self._accelerator is None and self.state is not None:
            from accelerate import Accelerator

            # precision is the project's own setting (kanoclip.precision): pinned, so that
            # ACCELERATE_MIXED_PRECISION or an accelerate config cannot wrap the trainer in
            # autocast (without a loss scaler for fp16)
            self._accelerator = Accelerator(cpu=self._cpu, mixed_precision="no")
        return self._accelerator

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def shard(self, items: Sequence[Item]) -> list[Item]:
        """This process's contiguous part of ``items`` (accelerate's split: the first ranks take one more).

        Concatenating every process's part in rank order (:meth:`gather`) gives ``items`` back.
        """
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as part:
            return list(part)

    def gather(self, items: Sequence[Item]) -> list[Item]:
        """Every process's ``items``, concatenated in rank order (on every process)."""
        if self.state is None:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def gather_to_main(self, items: Sequence[Item]) -> list[Item]:
        """Every process's ``items``, concatenated in rank order, on the main process only ([] elsewhere).

        What evaluation gathers (every image's S×S maps) is large: sent to the main process alone,
        which computes the metrics, not to every process as :meth:`gather` does.
        """
        if self.state is None:
            return list(items)
        import torch.distributed as dist

        parts: list[list[Item]] | None = [[] for _ in range(self.world)] if self.is_main else None
        dist.gather_object(list(items), parts, dst=0)
        return [item for part in parts for item in part] if parts is not None else []

    def broadcast(self, value: Item) -> Item:
        """The main process's ``value``, on every process (``value`` is ignored elsewhere)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over processes of each value (every process passes the same keys)."""
        if self.state is None:
            return values
        keys = list(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        reduced = self.accelerator.reduce(tensor, reduction="mean")
        return dict(zip(keys, (float(v) for v in reduced.tolist())))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` wrapped for DDP training with several processes; itself with one."""
        if self.state is None:
            return model
        # Depthwise-conv gradients come in another memory layout than DDP's buckets: harmless, and
        # warned about once per process on every run.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return self.accelerator.prepare_model(model)
