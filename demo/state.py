"""The app's shared state: its settings, the model registry and the knowledge base.

Everything here is shared by all visitors and guarded by locks; nothing per request is
stored on it (each request gets its own :class:`~kanoclip.detection.Detection`).

* :class:`AppConfig` — flags and environment variables.
* :class:`ModelRegistry` — models loaded lazily, one per (checkpoint, backbone), kept in a
  small LRU cache; loading is serialised by a lock so two visitors never load the same model twice.
* :class:`KnowledgeStore` — the app's knowledge base, edited in the Knowledge tab and pushed
  to every loaded model.
* :class:`Session` — one visitor's own state (a ``gr.State``): whether they gave the owner
  token, and on a public app their own copy of the knowledge base, which only their requests use.

A visitor's own normal references are not here: they live in that visitor's session
(``gr.State``, see :mod:`demo.detect_tab`). Only the references saved with ``--references`` are
shared: each model loads them into its own store, where they serve every visitor whose session
has none of that class.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from demo.access import MODELS_ENV, AccessConfig
from demo.gpu import ZERO_GPU
from demo.uploads import confine
from kanoclip import KAnoCLIP, KnowledgeBase
from kanoclip.backbone import Backbone
from kanoclip.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from kanoclip.config import DEFAULT_BACKBONE
from kanoclip.detection import Detection
from kanoclip.detector import resolve_device
from kanoclip.errors import CheckpointError, InputError, KAnoCLIPError
from kanoclip.precision import explain_precision
from kanoclip.references import INDEX_NAME, TENSORS_NAME, References
from kanoclip.serving import BatchingConfig, MicroBatcher

log = logging.getLogger("kanoclip.app")
TRAINING_FREE = "training-free"
T = TypeVar("T")
CHECKPOINTS_PREFIX = "checkpoints/"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_KB_NAME = "knowledge_base.json"


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


@dataclass
class AppConfig:
    """The app's settings (flags of ``app.py``, else environment variables, else defaults)."""

    backbone: str | None = None  # None: the checkpoint's backbone, else $KANOCLIP_BACKBONE / ViT-L/14@336px
    checkpoint: str | None = None  # the model selected at start; None = training-free
    kb: Path | None = None  # knowledge base file; None = the built-in one
    data_root: Path = field(default_factory=lambda: Path(os.environ.get("KANOCLIP_DATA_ROOT", "data")))
    checkpoints_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("KANOCLIP_CHECKPOINTS_DIR", "checkpoints"))
    )
    kb_dir: Path = field(default_factory=lambda: Path(os.environ.get("KANOCLIP_KB_DIR", "kb")))
    references: Path | None = None  # saved normal references shared by every visitor; None = none
    device: str = field(default_factory=lambda: os.environ.get("KANOCLIP_DEVICE", "auto"))
    precision: str = field(default_factory=lambda: os.environ.get("KANOCLIP_PRECISION", "auto"))  # the backbone's
    int8_engine: str = field(default_factory=lambda: os.environ.get("KANOCLIP_INT8_ENGINE", "auto"))  # runs int8
    concurrency: int = field(default_factory=lambda: _env_int("KANOCLIP_CONCURRENCY", 2))
    max_models: int = field(default_factory=lambda: _env_int("KANOCLIP_MAX_MODELS", 2))
    max_batch: int = field(default_factory=lambda: _env_int("KANOCLIP_MAX_BATCH", 32))  # images per Batch request
    # Live and Video tabs (demo/live_tab.py): seconds one webcam stream may run, streams at once, clip length
    live_time_limit: int = field(default_factory=lambda: _env_int("KANOCLIP_LIVE_TIME_LIMIT", 60))
    live_concurrency: int = field(default_factory=lambda: _env_int("KANOCLIP_LIVE_CONCURRENCY", 1))
    video_max_seconds: int = field(default_factory=lambda: _env_int("KANOCLIP_VIDEO_MAX_SECONDS", 120))
    # reference images one session may hold over all its classes (each is ~0.9 MB per stage kept at ViT-L/14@336)
    max_session_references: int = field(default_factory=lambda: _env_int("KANOCLIP_MAX_SESSION_REFERENCES", 32))
    preload: bool = True  # load the start model while building the app (to report its state)
    training: bool = field(
        default_factory=lambda: os.environ.get("KANOCLIP_TRAINING", "on").lower() not in ("0", "off", "false", "no")
    )
    # roles, endpoints and limits (demo.access); the default is private, as on loopback
    access: AccessConfig = field(default_factory=AccessConfig)

    @classmethod
    def from_env(cls, **overrides) -> AppConfig:
        """Defaults from ``KANOCLIP_*`` variables, with ``overrides`` (``None`` values ignored) on top."""
        config = cls(
            access=overrides.pop("access", None) or AccessConfig.from_env(),
            backbone=os.environ.get("KANOCLIP_BACKBONE") or None,
            checkpoint=os.environ.get("KANOCLIP_CHECKPOINT") or None,
            kb=Path(os.environ["KANOCLIP_KB"]) if os.environ.get("KANOCLIP_KB") else None,
            references=Path(os.environ["KANOCLIP_REFERENCES"]) if os.environ.get("KANOCLIP_REFERENCES") else None,
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(
                    config,
                    key,
                    Path(value) if key in ("kb", "data_root", "checkpoints_dir", "kb_dir", "references") else value,
                )
        return config

    @property
    def start_choice(self) -> str:
        return self.checkpoint or TRAINING_FREE

    @property
    def public(self) -> bool:
        return self.access.public

    @property
    def show_training(self) -> bool:
        """Whether the app has a Train tab: on, and on a public app only where the owner enables it."""
        return self.training and (not self.public or self.access.public_training)

    def default_kb_path(self) -> str:
        return str(self.kb) if self.kb else str(self.kb_dir / DEFAULT_KB_NAME)


# ---------------------------------------------------------------------------- model choices
def list_checkpoints(checkpoints_dir: Path) -> list[str]:
    """``checkpoints/<name>`` for every folder under ``checkpoints_dir`` that holds a checkpoint."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        CHECKPOINTS_PREFIX + p.name
        for p in checkpoints_dir.iterdir()
        if p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()
    )


def model_choices(config: AppConfig) -> list[str]:
    """What the model dropdowns offer: training-free, the start checkpoint, the listed hub ids, local checkpoints."""
    choices = [TRAINING_FREE]
    for listed in (config.checkpoint, *config.access.models):
        if listed and listed not in choices:
            choices.append(listed)
    return choices + [c for c in list_checkpoints(config.checkpoints_dir) if c not in choices]


def resolve_choice(config: AppConfig, choice: str | None, *, owner: bool = False) -> str | None:
    """The checkpoint (folder or hub id) a dropdown value means; ``None`` for training-free.

    Accepted: ``training-free``, the start checkpoint, ``checkpoints/<name>`` (a folder under
    the checkpoints folder — no other local path), or a hub id ``user/name``. On a public app a
    hub id must be listed (``KANOCLIP_MODELS``) unless ``owner``: an unlisted one is refused
    here, before anything is downloaded.
    """
    text = (choice or "").strip()
    if not text or text == TRAINING_FREE:
        return None
    if config.checkpoint and text == config.checkpoint:
        return text
    name = text[len(CHECKPOINTS_PREFIX) :] if text.startswith(CHECKPOINTS_PREFIX) else text
    if "/" not in name and (config.checkpoints_dir / name).is_dir():
        return str(confine(config.checkpoints_dir, name, what="checkpoint", root_name="checkpoints folder"))
    # a hub id only: the library would load a local folder of that name first, and no local
    # path outside the checkpoints folder may be opened from the app
    if _HUB_ID.fullmatch(text) and ".." not in text and not Path(text).exists():
        if config.public and not owner and text not in config.access.models:
            raise InputError(
                f"model {text!r} is not offered on this public app; pick one from the list "
                f"(the owner lists hub ids in {MODELS_ENV})"
            )
        return text
    raise InputError(
        f"model {text!r} is not '{TRAINING_FREE}', a checkpoint under {config.checkpoints_dir}/ "
        "or a Hugging Face hub id like 'user/kanoclip-mvtec'; pick one from the list"
    )


# ---------------------------------------------------------------------------- running a model
_CPU_COMPUTE = threading.Lock()


def one_pass_at_a_time(model: KAnoCLIP) -> bool:
    """Whether the model's passes are serialised by :func:`compute_slot`: on the CPU, not on a GPU.

    The one place the choice is made, so that a test can take the GPU's path on a CPU.
    """
    return model.device.type == "cpu"


@contextlib.contextmanager
def compute_slot(model: KAnoCLIP) -> Iterator[None]:
    """Held around a model's forward pass: on the CPU one pass at a time, on a GPU no wait.

    On the CPU torch already spreads one pass over every core, so running two at once gains
    nothing, and concurrent passes there can differ in the last digits (thread scheduling
    changes the order of float sums); serialising them keeps every visitor's result identical
    to a direct ``model.detect``. Decoding and drawing still run concurrently. On a GPU passes
    run concurrently (the model is thread-safe) and are batched by :func:`serve_detection`.
    """
    if not one_pass_at_a_time(model):
        yield
        return
    with _CPU_COMPUTE:
        yield


# Each loaded model's batcher, made on its first batched request. Weak keys, and the batcher
# holds a proxy of its model, so a model evicted from the registry takes its batcher with it.
_BATCHERS: weakref.WeakKeyDictionary[KAnoCLIP, MicroBatcher] = weakref.WeakKeyDictionary()
_BATCHERS_LOCK = threading.Lock()


def batcher_for(model: KAnoCLIP) -> MicroBatcher | None:
    """The model's micro-batcher, or None where batching is off (``KANOCLIP_BATCH_SIZE``, default: on a GPU).

    Raises:
        InputError: ``KANOCLIP_BATCH_SIZE`` or ``KANOCLIP_BATCH_WAIT_MS`` is not a valid setting.
    """
    config = BatchingConfig.from_env(serialised=one_pass_at_a_time(model))
    if not config.enabled:
        return None
    with _BATCHERS_LOCK:
        batcher = _BATCHERS.get(model)
        if batcher is None or batcher.config != config:
            proxy = weakref.proxy(model)
            batcher = _BATCHERS[model] = MicroBatcher(proxy, config, slot=functools.partial(compute_slot, proxy))
        return batcher


def serve_detection(
    model: KAnoCLIP,
    image: Image.Image,
    class_name: str,
    *,
    threshold: float | None,
    sigma: float,
    references: References,
    knowledge: KnowledgeBase | None = None,
) -> Detection:
    """One visitor's ``model.detect``: batched with other visitors' concurrent requests where batching
    is on (:func:`batcher_for`), else alone in :func:`compute_slot`. Either way the result is the
    visitor's own, with their references and threshold."""
    batcher = batcher_for(model)
    if batcher is None:
        with compute_slot(model):
            return model.detect(
                image, class_name, threshold=threshold, sigma=sigma, references=references, knowledge=knowledge
            )
    return batcher.detect(
        image, class_name, threshold=threshold, sigma=sigma, references=references, knowledge=knowledge
    )


# ---------------------------------------------------------------------------- status text
RANDOM_WARNING = (
    "⚠️ **Random test backbone** — `{backbone}` has random weights: every score, map and ranking "
    "shown here is meaningless plumbing, not anomaly detection. Start the app with a real CLIP "
    "(`--backbone openai/clip-vit-large-patch14-336`) for real results."
)


def describe_model(model: KAnoCLIP) -> str:
    """One Markdown paragraph: mode (and checkpoint), backbone, device, precision and why, and the warnings."""
    mode = (
        "training-free (no checkpoint)"
        if model.mode == "training-free"
        else f"trained — checkpoint `{model.checkpoint_name}`"
    )
    choice = explain_precision(model.model.requested_precision, model.device, model.model.requested_int8_engine)
    why = f"auto: {choice.reason}" if choice.reason else f"chosen with --precision {choice.requested}"
    if choice.engine_reason:
        why += f"; engine {choice.int8_engine}: {choice.engine_reason}"
    text = (
        f"**Mode:** {mode} · **Backbone:** `{model.backbone_name}` · **Device:** `{model.device}`"
        f" · **Precision:** backbone {choice.resolved} on {choice.engine} ({why}; {choice.hardware}), maps fp32"
    )
    if choice.warning:
        text += f"\n\n⚠️ {choice.warning}"
    if model.random_backbone:
        text += "\n\n" + RANDOM_WARNING.format(backbone=model.backbone_name)
    return text


def describe_failure(error: KAnoCLIPError, what: str) -> str:
    """Markdown shown where results would be when a model cannot be loaded."""
    return (
        f"❌ **{what} could not be loaded.** {error}\n\n"
        "The app is running; Detect, Prompts and Train need a loaded model. Fix the cause above "
        "and press the button again (or restart the app)."
    )


# ---------------------------------------------------------------------------- the registry
class ModelRegistry:
    """Models loaded on first use and cached, one per (checkpoint, backbone), least recently used evicted."""

    def __init__(self, config: AppConfig, knowledge: KnowledgeStore) -> None:
        self.config = config
        self.knowledge = knowledge
        self._models: OrderedDict[tuple[str | None, str | None], KAnoCLIP] = OrderedDict()
        self._errors: dict[tuple[str | None, str | None], KAnoCLIPError] = {}
        # why the shared references (--references) do not serve a loaded model, by model key
        self.reference_problems: dict[tuple[str | None, str | None], str] = {}
        self._lock = threading.Lock()  # guards _models and _errors
        self._load_lock = threading.Lock()  # serialises loading
        # Models of the same backbone share it (frozen, never written): one copy in memory,
        # dropped with the last cached model that uses it.
        self._backbones: dict[tuple[str, str], Backbone] = {}
        self._knowledge_versions: dict[tuple[str | None, str | None], int] = {}  # what each model holds
        # ZeroGPU: the models are loaded at start, in the main thread (demo.gpu); no other later
        self.loading_closed = False

    def key(self, choice: str | None, *, owner: bool = False) -> tuple[str | None, str | None]:
        return resolve_choice(self.config, choice, owner=owner), self.config.backbone

    def get(
        self, choice: str | None, knowledge: tuple[int, KnowledgeBase] | None = None, *, owner: bool = False
    ) -> KAnoCLIP:
        """The model for a dropdown value, loading it if needed (raises the load's :class:`KAnoCLIPError`).

        ``knowledge``: the app's (version, knowledge base) (:meth:`KnowledgeStore.versioned`), given
        inside a ``@gpu`` function: a model holding an older version takes it. On ZeroGPU the
        function runs in a forked worker, which never sees the app's later knowledge edits.
        ``owner``: the request comes from an owner, who may load a hub id that is not listed.
        """
        key = self.key(choice, owner=owner)
        model = self._cached(key) or self._load(key, choice, owner=owner)
        if knowledge is not None:
            self._sync_knowledge(key, model, knowledge)
        return model

    def _sync_knowledge(
        self, key: tuple[str | None, str | None], model: KAnoCLIP, knowledge: tuple[int, KnowledgeBase]
    ) -> None:
        version, kb = knowledge
        with self._lock:
            stale = self._knowledge_versions.get(key) != version
            self._knowledge_versions[key] = version
        if stale:
            model.set_knowledge(kb.copy())

    def _load(self, key: tuple[str | None, str | None], choice: str | None, *, owner: bool = False) -> KAnoCLIP:
        with self._load_lock:  # one load at a time; cached models stay usable meanwhile
            model = self._cached(key)
            if model is not None:
                return model
            with self._lock:
                full = len(self._models) >= self.config.max_models
            if full and self.config.public and not owner:
                # a visitor's pick would evict a model other visitors are using: only the owner may
                loaded = ", ".join(f"'{m.checkpoint_name or TRAINING_FREE}'" for m in self.loaded())
                raise InputError(
                    f"model {choice or TRAINING_FREE!r} is not loaded, and this public app already holds as many "
                    f"models as it may (KANOCLIP_MAX_MODELS={self.config.max_models}), which a visitor's pick does "
                    f"not replace; pick one of {loaded}"
                )
            if self.loading_closed:
                loaded = ", ".join(f"'{m.checkpoint_name or TRAINING_FREE}'" for m in self.loaded())
                raise InputError(
                    f"model {choice or TRAINING_FREE!r} was not loaded when this ZeroGPU Space started and cannot be "
                    f"loaded now; pick one of {loaded}, or restart the Space with it as --checkpoint"
                )
            checkpoint, backbone = key
            version, kb = self.knowledge.versioned()
            try:
                model = KAnoCLIP.from_pretrained(
                    checkpoint,
                    backbone=backbone,
                    device=self.config.device,
                    precision=self.config.precision,
                    int8_engine=self.config.int8_engine,
                    kb=kb.copy(),
                    backbone_cache=self._backbones,
                )
            except KAnoCLIPError as exc:
                error = type(exc)(exc.message(flags=True))  # the app is started with flags: name them
                with self._lock:
                    self._errors[key] = error
                raise error from None
            self._load_shared_references(key, model)
            with self._lock:
                self._errors.pop(key, None)
                self._models[key] = model
                self._knowledge_versions[key] = version
                while len(self._models) > self.config.max_models:
                    evicted, _ = self._models.popitem(last=False)
                    self._knowledge_versions.pop(evicted, None)
                in_use = {id(m._backbone) for m in self._models.values()}
                for name in [name for name, b in self._backbones.items() if id(b) not in in_use]:
                    del self._backbones[name]  # its last model is gone: bounded with max_models
            return model

    def _load_shared_references(self, key: tuple[str | None, str | None], model: KAnoCLIP) -> None:
        """Put the ``--references`` folder into ``model``'s own store (what ``from_pretrained(references=)`` does).

        Loaded apart from the model: references saved for one model (their fingerprint) do not
        fit another, and a checkpoint picked from the list must still load without them; the
        Detect tab then says why they do not serve it.
        """
        folder = self.config.references
        if folder is None:
            return
        try:
            # on the CPU: they are passed into the @gpu functions, which move them (demo.gpu)
            model.reference_store = References.load(
                folder, identity=model.reference_fingerprint(), device=torch.device("cpu")
            )
        except CheckpointError as exc:
            log.warning("the shared references in %s do not serve %s: %s", folder, model.backbone_name, exc)
            self.reference_problems[key] = str(exc)
            return
        self.reference_problems.pop(key, None)
        log.info(
            "shared references loaded from %s: %s", folder, ", ".join(model.reference_store.classes) or "no classes"
        )

    def _cached(self, key: tuple[str | None, str | None]) -> KAnoCLIP | None:
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def peek(self, choice: str | None, *, owner: bool = False) -> KAnoCLIP | KAnoCLIPError | None:
        """The loaded model, or the error of its last failed load, or ``None`` (never loads)."""
        try:
            key = self.key(choice, owner=owner)
        except KAnoCLIPError as exc:
            return exc
        with self._lock:
            return self._models.get(key) or self._errors.get(key)

    def refresh_knowledge(self, knowledge: tuple[int, KnowledgeBase]) -> None:
        """Give every loaded model the knowledge base of ``knowledge`` (version, knowledge base)."""
        with self._lock:
            models = list(self._models.items())
        for key, model in models:
            self._sync_knowledge(key, model, knowledge)

    def loaded(self) -> list[KAnoCLIP]:
        with self._lock:
            return list(self._models.values())

    def describe_choice(self, choice: str | None) -> str:
        """``model (<choice>, backbone <name>)``: what a load of ``choice`` uses."""
        training_free = (choice or TRAINING_FREE) == TRAINING_FREE
        backbone = self.config.backbone or (DEFAULT_BACKBONE if training_free else "the checkpoint's")
        return f"model ({choice or TRAINING_FREE}, backbone {backbone})"

    def status(self, choice: str | None) -> str:
        """Markdown describing the model of ``choice`` as far as it is known (never loads)."""
        state = self.peek(choice)
        if isinstance(state, KAnoCLIP):
            return describe_model(state)
        if isinstance(state, KAnoCLIPError):
            return describe_failure(state, "The " + self.describe_choice(choice))
        return f"**Model:** `{choice or TRAINING_FREE}` — not loaded yet (it loads on the first request)."


# ---------------------------------------------------------------------------- knowledge base
class KnowledgeStore:
    """The app's knowledge base: one master copy, edited under a lock; models get copies."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._kb = KnowledgeBase.load_or_builtin(config.kb)
        self.version = 0  # counts the edits: a model holding an older one is refreshed (ZeroGPU's workers)
        self._lock = threading.Lock()
        self.registry: ModelRegistry | None = None  # set by the app so edits reach loaded models

    def snapshot(self) -> KnowledgeBase:
        with self._lock:
            return self._kb.copy()

    def versioned(self) -> tuple[int, KnowledgeBase]:
        """The version and the master copy itself (never edited in place: an edit replaces it); read only."""
        with self._lock:
            return self.version, self._kb

    def replace(self, kb: KnowledgeBase) -> None:
        with self._lock:
            self._kb = kb.copy()
            self.version += 1
        self._push()

    def edit(self, change: Callable[[KnowledgeBase], T]) -> tuple[T, KnowledgeBase]:
        """Apply ``change(kb)`` to the master copy and push it to the loaded models.

        Returns what ``change`` returned and a snapshot of the edited knowledge base.
        """
        with self._lock:
            work = self._kb.copy()
            result = change(work)
            self._kb = work
            self.version += 1
        self._push()
        return result, self.snapshot()

    def _push(self) -> None:
        if self.registry is not None:
            self.registry.refresh_knowledge(self.versioned())

    def save_path(self, text: str | None) -> Path:
        """Where a save may write: the ``--kb`` file itself, or a ``.json`` under the KB folder."""
        raw = (text or "").strip() or self.config.default_kb_path()
        if self.config.kb is not None and Path(raw).expanduser().resolve() == self.config.kb.expanduser().resolve():
            return self.config.kb
        if not raw.lower().endswith(".json"):
            raise InputError(f"knowledge-base path {raw!r} must end in .json")
        kb_dir = self.config.kb_dir
        relative = raw[len(str(kb_dir)) + 1 :] if raw.startswith(str(kb_dir) + os.sep) else raw
        kb_dir.mkdir(parents=True, exist_ok=True)
        target = confine(
            kb_dir, relative, what="knowledge-base path", must_exist=False, root_name="knowledge-base folder"
        )
        if target.is_dir():
            raise InputError(f"knowledge-base path {raw!r} is a folder; name a .json file")
        return target

    def save(self, text: str | None) -> Path:
        path = self.save_path(text)
        snapshot = self.snapshot()
        snapshot.save(path)
        return path


@dataclass
class Session:
    """One visitor's own state, kept in a ``gr.State`` (never on a shared object).

    ``kb`` is the visitor's own knowledge base on a public app: made from the shared one on
    their first edit, changed by their edits and generations only, and passed to their own
    detections (``KAnoCLIP.detect(knowledge=...)``). ``None``: the shared one serves.
    """

    signed_in: bool = False  # gave the owner token (demo.access.AccessConfig.token_matches)
    kb: KnowledgeBase | None = None

    def is_owner(self, access: AccessConfig, profile: object = None) -> bool:
        """Whether this visitor is an owner: signed in with the token, or by their ``gr.OAuthProfile``."""
        return access.is_owner(self.signed_in, profile)

    def knowledge(self, store: KnowledgeStore) -> KnowledgeBase:
        """The knowledge base this visitor sees: their own copy, else a snapshot of the shared one."""
        return self.kb.copy() if self.kb is not None else store.snapshot()

    def edit(self, store: KnowledgeStore, owner: bool, change: Callable[[KnowledgeBase], T]) -> tuple[T, KnowledgeBase]:
        """Apply ``change``: an owner's to the shared knowledge base, a visitor's to their own copy.

        An owner's edit also drops their own copy, so their detections see what everyone sees.
        Returns what ``change`` returned and a snapshot of the edited knowledge base.
        """
        if owner:
            self.kb = None
            return store.edit(change)
        work = self.knowledge(store)
        result = change(work)
        self.kb = work  # swapped in whole: a detection running meanwhile keeps the copy it was given
        return result, work.copy()


@dataclass
class AppContext:
    """What every tab needs: the settings, the shared knowledge base and models, the start status."""

    config: AppConfig
    knowledge: KnowledgeStore
    registry: ModelRegistry
    startup: str = ""  # Markdown for the Detect summary before the first result

    @classmethod
    def create(cls, config: AppConfig) -> AppContext:
        """The context; with ``config.preload`` the start model is loaded, saying so on the terminal.

        The terminal (the ``kanoclip.app`` log) gets what loads (model, backbone, device) and,
        when it fails, the same one-line reason the page's header shows. The header alone
        explains a failure; the Detect summary then only points at it.
        """
        if config.references is not None and not all(
            (config.references / name).is_file() for name in (INDEX_NAME, TENSORS_NAME)
        ):
            raise CheckpointError(
                f"--references / KANOCLIP_REFERENCES {config.references} holds no saved references "
                f"(expected {INDEX_NAME} and {TENSORS_NAME}); "
                "save them there with KAnoCLIP.save_references"
            )
        knowledge = KnowledgeStore(config)
        registry = ModelRegistry(config, knowledge)
        knowledge.registry = registry
        ctx = cls(config=config, knowledge=knowledge, registry=registry)
        if config.preload:
            what = registry.describe_choice(config.start_choice)
            device = f"auto ({resolve_device('auto')})" if config.device == "auto" else config.device
            log.info("loading the %s on device %s", what, device)
            try:
                model = registry.get(config.start_choice)
            except KAnoCLIPError as exc:
                log.error("the %s could not be loaded: %s", what, exc)
                ctx.startup = "No model is loaded: the message at the top of the page says why and how to fix it."
                if ZERO_GPU:
                    ctx.preload_for_zero_gpu()
                return ctx
            log.info("loaded %s on %s", model.backbone_name, model.device)
        if ZERO_GPU:
            ctx.preload_for_zero_gpu()
        ctx.startup = registry.status(config.start_choice)
        return ctx

    def preload_for_zero_gpu(self) -> None:
        """Load the models a visitor can pick (up to ``max_models``), then no other (:mod:`demo.gpu`).

        ZeroGPU emulates CUDA in the main thread only: a model loaded later, in a request's
        thread, would fail to move to the GPU.
        """
        for choice in model_choices(self.config)[: self.config.max_models]:
            try:
                self.registry.get(choice)
            except KAnoCLIPError as exc:
                log.error("ZeroGPU: the %s could not be loaded: %s", self.registry.describe_choice(choice), exc)
        self.registry.loading_closed = True
