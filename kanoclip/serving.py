"""Serving one model to many concurrent callers: a micro-batcher in front of :class:`~kanoclip.KAnoCLIP`.

A GPU's throughput comes from batches, not from threads: 8 visitors' images in one backbone
forward cost little more than one. :class:`MicroBatcher` gathers the ``detect`` requests that
arrive while it waits (at most ``max_wait_ms`` after the first, at most ``max_batch_size`` of
them) into one backbone forward (:meth:`KAnoCLIP.encode_images`), then builds each caller's
result from its own rows (:meth:`KAnoCLIP.detect_features`): its own class, references,
threshold and σ. Requests that differ in those are grouped for the cheap part after the
backbone (maps, reference search), one group per (references store, threshold, σ); the
expensive forward is shared by all. Each caller gets only its own result, equal to its own
``model.detect`` within float rounding (a batched matrix product may sum in another order).

No background thread: the first caller to find the batcher idle leads, collects the batch,
runs it in its own thread and hands the others their results; a later caller waits for its
turn. An exception of a caller's part (a group) reaches only that group's callers; one of the
shared forward reaches the whole batch. Decoding the image and checking the class run in each
caller's own thread before it joins a batch, so a bad input fails only its caller.

Where passes are serialised anyway (the CPU, where torch spreads one pass over every core),
batching rarely pays; :meth:`BatchingConfig.from_env` turns it off there by default.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from kanoclip.detection import Detection
from kanoclip.detector import KAnoCLIP
from kanoclip.errors import InputError
from kanoclip.images import ImageInput, describe, load_image
from kanoclip.knowledge import KnowledgeBase
from kanoclip.references import References

BATCH_SIZE_ENV = "KANOCLIP_BATCH_SIZE"
BATCH_WAIT_ENV = "KANOCLIP_BATCH_WAIT_MS"
AUTO_BATCH_SIZE = 8  # "auto" where passes run concurrently (a GPU); 1 (off) where they are serialised


@dataclass(frozen=True)
class BatchingConfig:
    """How concurrent detect requests are gathered.

    Args:
        max_batch_size: at most this many requests in one forward (1: no batching).
        max_wait_ms: how long the first request of a batch waits for others, in milliseconds.

    Raises:
        ValueError: ``max_batch_size`` < 1 or ``max_wait_ms`` outside [0, 1000].
    """

    max_batch_size: int = AUTO_BATCH_SIZE
    max_wait_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (1: no batching), got {self.max_batch_size}")
        if not 0.0 <= self.max_wait_ms <= 1000.0:
            raise ValueError(f"max_wait_ms must be between 0 and 1000 milliseconds, got {self.max_wait_ms}")

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    @classmethod
    def from_env(cls, *, serialised: bool) -> BatchingConfig:
        """The settings from ``KANOCLIP_BATCH_SIZE`` and ``KANOCLIP_BATCH_WAIT_MS``.

        Args:
            serialised: whether the model's passes run one at a time anyway (the CPU); then
                ``auto`` (the default) is 1, no batching, else :data:`AUTO_BATCH_SIZE`.

        Returns:
            The config.

        Raises:
            InputError: a variable holds something else than a number in range (named, with the fix).
        """
        size_text = os.environ.get(BATCH_SIZE_ENV, "auto").strip().lower() or "auto"
        wait_text = os.environ.get(BATCH_WAIT_ENV, "").strip() or str(cls.max_wait_ms)
        try:
            size = (1 if serialised else AUTO_BATCH_SIZE) if size_text == "auto" else int(size_text)
            return cls(max_batch_size=size, max_wait_ms=float(wait_text))
        except ValueError:
            raise InputError(
                f"{BATCH_SIZE_ENV}={size_text!r} / {BATCH_WAIT_ENV}={wait_text!r}: set {BATCH_SIZE_ENV} to 'auto' "
                f"or a whole number >= 1 (1 turns batching off) and {BATCH_WAIT_ENV} to milliseconds in [0, 1000]"
            ) from None


@dataclass
class _Request:
    """One caller's detect, decoded and checked, waiting for its result."""

    image: Image.Image
    class_name: str
    source: str
    threshold: float | None
    sigma: float | None
    references: References | None
    knowledge: KnowledgeBase | None
    result: Detection | None = None
    error: BaseException | None = None
    done: bool = False

    def group(self) -> tuple[Any, ...]:
        """Requests with the same key share the part after the backbone."""
        return (id(self.references), id(self.knowledge), self.threshold, self.sigma)


@dataclass
class BatchStats:
    """What a batcher has done: backbone forwards run and requests served."""

    forwards: int = 0
    requests: int = 0
    largest_batch: int = 0


@dataclass
class MicroBatcher:
    """Concurrent ``detect`` calls on one model, gathered into shared backbone forwards.

    Args:
        model: the model every request runs on.
        config: batch size and wait (default :class:`BatchingConfig`'s).
        slot: a context manager factory held around each batch's computation (the app's
            ``compute_slot``: one pass at a time on the CPU); default none.

    Example::

        batcher = MicroBatcher(model, BatchingConfig(max_batch_size=8, max_wait_ms=5))
        detection = batcher.detect("bottle.png", "bottle", references=my_store)  # from any thread
    """

    model: KAnoCLIP
    config: BatchingConfig = field(default_factory=BatchingConfig)
    slot: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        self._queue: list[_Request] = []
        self._busy = False  # a leader is gathering or running a batch
        self._cond = threading.Condition()

    def detect(
        self,
        image: ImageInput,
        class_name: str,
        *,
        threshold: float | None = None,
        sigma: float | None = None,
        references: References | None = None,
        knowledge: KnowledgeBase | None = None,
    ) -> Detection:
        """:meth:`KAnoCLIP.detect`, run in a batch with the other callers' concurrent requests.

        Args:
            image, class_name, threshold, sigma, references, knowledge: as for :meth:`KAnoCLIP.detect`.

        Returns:
            This caller's :class:`~kanoclip.detection.Detection`.

        Raises:
            ImageError, InputError: this request's image or class (before it joins a batch); or
            what the batch's computation raised.
        """
        self.model.canonical_class(class_name, knowledge)  # an empty class fails here, for this caller only
        request = _Request(load_image(image), class_name, describe(image), threshold, sigma, references, knowledge)
        with self._cond:
            self._queue.append(request)
            self._cond.notify_all()  # a leader gathering a batch counts it
            while not request.done:
                if self._busy:
                    self._cond.wait()
                else:
                    self._lead()
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[return-value]

    def _lead(self) -> None:
        """Gather a batch (the lock held, waiting releases it), run it unlocked, hand out the results."""
        self._busy = True
        deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
        while len(self._queue) < self.config.max_batch_size and (left := deadline - time.monotonic()) > 0:
            self._cond.wait(left)
        batch = self._queue[: self.config.max_batch_size]
        del self._queue[: len(batch)]
        self._cond.release()
        try:
            self._run(batch)
        finally:
            self._cond.acquire()
            self._busy = False
            for request in batch:
                request.done = True
            self._cond.notify_all()

    def _run(self, batch: Sequence[_Request]) -> None:
        """One backbone forward for ``batch``, then each group's results; errors go to their requests."""
        try:
            with self.slot():
                visual = self.model.encode_images([r.image for r in batch])
                self.stats.forwards += 1
                self.stats.requests += len(batch)
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
                groups: dict[tuple[Any, ...], list[int]] = {}
                for i, request in enumerate(batch):
                    groups.setdefault(request.group(), []).append(i)
                for rows in groups.values():
                    self._run_group(visual, [batch[i] for i in rows], rows)
        except BaseException as exc:  # the shared forward failed: every caller gets its error
            for request in batch:
                if request.result is None and request.error is None:
                    request.error = exc
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: the leader's thread stops too
                raise

    def _run_group(self, visual, requests: Sequence[_Request], rows: Sequence[int]) -> None:
        first = requests[0]
        try:
            results = self.model.detect_features(
                visual.select(rows), [r.image for r in requests], [r.class_name for r in requests],
                threshold=first.threshold, sigma=first.sigma, references=first.references,
                knowledge=first.knowledge, sources=[r.source for r in requests],
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - this group's callers get it, the others their results
            for request in requests:
                request.error = exc
            return
        for request, result in zip(requests, results):
            request.result = result
