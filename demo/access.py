"""Who may do what in the app: the deployment's roles, its configured endpoints and its limits.

A **public** deployment (a Hugging Face Space, an app listening beyond loopback, ``--share``,
``--public`` / ``KANOCLIP_PUBLIC=1``) is shared by strangers. Its visitors can detect, keep
references and edit or generate knowledge in their own session; only an **owner** changes what
everyone sees (shared knowledge edits, *Save*), trains, or loads a model that is not listed. An
owner is recognised by Sign in with Hugging Face (usernames in ``KANOCLIP_OWNERS``) or by the
owner token (``KANOCLIP_OWNER_TOKEN``) typed into the app. A **private** deployment (``--private``,
or loopback without the public signals) treats everyone as the owner: today's local app.

* :class:`AccessConfig` — the role settings, validated on construction.
* :class:`Limits` — per-request caps and the queue size of a public deployment.
* :class:`Endpoint` — an LLM / VQA endpoint the owner configured, bound to its key's variable.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kanoclip.errors import InputError

# The settings, named in the app's messages and docs/app.md "Hosting publicly".
PUBLIC_ENV = "KANOCLIP_PUBLIC"
OWNERS_ENV = "KANOCLIP_OWNERS"
OWNER_TOKEN_ENV = "KANOCLIP_OWNER_TOKEN"
VISITOR_URLS_ENV = "KANOCLIP_VISITOR_URLS"
PUBLIC_TRAINING_ENV = "KANOCLIP_PUBLIC_TRAINING"
MODELS_ENV = "KANOCLIP_MODELS"
ENDPOINTS_ENV = "KANOCLIP_ENDPOINTS"
_TRUE = ("1", "on", "true", "yes")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _names(name: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in os.environ.get(name, "").split(",") if v.strip()))


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address the app listens on) is reachable from this machine only."""
    text = (host or "").strip().strip("[]")
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False  # a name or 0.0.0.0-like wildcard: other machines may reach it


def is_public_deployment(
    host: str | None = "127.0.0.1", *, share: bool = False, public: bool = False, private: bool = False
) -> bool:
    """Whether strangers may reach the app (see the module docstring).

    Args:
        host: the address the app listens on (``None``: Gradio's default, ``$GRADIO_SERVER_NAME``
            or 127.0.0.1).
        share: a gradio.live link is opened.
        public: ``--public`` was given (``KANOCLIP_PUBLIC=1`` counts too).
        private: ``--private`` was given: it wins over every other signal.

    Returns:
        True for a public deployment.
    """
    if private:
        return False
    listening = host if host is not None else os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    return public or share or _flag(PUBLIC_ENV) or bool(os.environ.get("SPACE_ID")) or not is_loopback(listening)


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint the owner configured; its key (if any) goes to its URL only."""

    name: str
    url: str
    model: str
    key_env: str | None = None  # the environment variable holding its key; None: no key

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.model.strip():
            raise ValueError(f"endpoint {self.name!r}: 'name' and 'model' must be non-empty")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {self.name!r}: url {self.url!r} is not an http(s) URL")

    def api_key(self) -> str | None:
        """The key from the server's environment (``None`` when it needs none or it is unset)."""
        if not self.key_env:
            return None
        return os.environ.get(self.key_env) or None


def load_endpoints(value: str | None) -> tuple[Endpoint, ...]:
    """Endpoints from ``KANOCLIP_ENDPOINTS``: a JSON list, or the path of a JSON file holding one.

    Each item: ``{"name": ..., "url": ..., "model": ..., "key_env": ...}`` (``key_env`` optional).

    Raises:
        ValueError: unreadable JSON, a duplicate name or a bad item (named).
    """
    text = (value or "").strip()
    if not text:
        return ()
    if not text.startswith("["):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{ENDPOINTS_ENV}: cannot read {value!r} ({exc.strerror})") from None
    try:
        items: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENDPOINTS_ENV}: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{ENDPOINTS_ENV}: expected a JSON list of {{name, url, model, key_env}} objects")
    try:
        endpoints = tuple(
            Endpoint(str(i["name"]), str(i["url"]), str(i["model"]), i.get("key_env") or None) for i in items
        )
    except KeyError as exc:
        raise ValueError(f"{ENDPOINTS_ENV}: an endpoint lacks {exc}") from None
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise ValueError(f"{ENDPOINTS_ENV}: endpoint names must be unique, got {names}")
    return endpoints


@dataclass(frozen=True)
class Limits:
    """Caps a stranger cannot get around, applied on a public deployment (defaults sized for a free CPU Space).

    Every field has an environment variable: ``KANOCLIP_QUEUE_SIZE``, ``KANOCLIP_MAX_IMAGES``,
    ``KANOCLIP_MAX_REFERENCES``, ``KANOCLIP_MAX_GENERATED``.
    """

    queue_size: int = 16  # requests waiting in the queue; more are turned away at once
    max_images: int = 8  # images in one request (reference uploads)
    max_references: int = 8  # a session's references per class
    max_generated: int = 10  # descriptions generated by one request

    def __post_init__(self) -> None:
        for name in ("queue_size", "max_images", "max_references", "max_generated"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"limit {name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls) -> Limits:
        """The defaults, with ``KANOCLIP_*`` variables on top (ValueError names a bad one)."""
        values: dict[str, int] = {}
        for name in ("queue_size", "max_images", "max_references", "max_generated"):
            variable = f"KANOCLIP_{name.upper()}"
            if os.environ.get(variable):
                try:
                    values[name] = int(os.environ[variable])
                except ValueError:
                    raise ValueError(f"{variable} must be a whole number, got {os.environ[variable]!r}") from None
        return cls(**values)


@dataclass(frozen=True)
class AccessConfig:
    """The deployment's roles (see the module docstring); private by default, as on loopback."""

    public: bool = False
    owners: tuple[str, ...] = ()  # Hugging Face usernames recognised through Sign in with HF
    owner_token: str | None = field(default=None, repr=False)  # a secret: never printed
    oauth: bool = False  # Sign in with HF is set up (a Space with `hf_oauth: true` sets OAUTH_CLIENT_ID)
    visitor_urls: bool = False  # visitors may type an endpoint URL (with their own key) on a public app
    public_training: bool = False  # a public app shows the Train tab (to a signed-in owner)
    models: tuple[str, ...] = ()  # hub ids offered besides training-free and checkpoints/
    endpoints: tuple[Endpoint, ...] = ()
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.owner_token is not None and len(self.owner_token) < 12:
            raise ValueError(f"{OWNER_TOKEN_ENV} must be at least 12 characters (a guessable token is no lock)")
        if any("/" not in m for m in self.models):
            raise ValueError(f"{MODELS_ENV} lists hub ids like 'user/kanoclip-mvtec', got {list(self.models)}")

    @classmethod
    def from_env(cls, *, public: bool | None = None) -> AccessConfig:
        """From the environment; ``public`` None: :func:`is_public_deployment` with its defaults."""
        return cls(
            public=is_public_deployment() if public is None else public,
            owners=_names(OWNERS_ENV),
            owner_token=os.environ.get(OWNER_TOKEN_ENV) or None,
            oauth=bool(os.environ.get("OAUTH_CLIENT_ID")),
            visitor_urls=_flag(VISITOR_URLS_ENV),
            public_training=_flag(PUBLIC_TRAINING_ENV),
            models=_names(MODELS_ENV),
            endpoints=load_endpoints(os.environ.get(ENDPOINTS_ENV)),
            limits=Limits.from_env(),
        )

    def token_matches(self, token: str | None) -> bool:
        """Whether ``token`` is the owner token (compared in constant time)."""
        if not self.owner_token or not token:
            return False
        return hmac.compare_digest(token.encode("utf-8"), self.owner_token.encode("utf-8"))

    def is_owner(self, signed_in: bool = False, profile: Any = None) -> bool:
        """Whether a request comes from an owner.

        Args:
            signed_in: the session gave the owner token (:meth:`token_matches`).
            profile: the request's ``gr.OAuthProfile`` (Sign in with HF), or None.

        Returns:
            Always True on a private deployment.
        """
        if not self.public or signed_in:
            return True
        username = getattr(profile, "username", None) if profile is not None else None
        return bool(self.oauth and username and username in self.owners)

    def endpoint(self, name: str) -> Endpoint | None:
        """The configured endpoint called ``name``, or None."""
        return next((e for e in self.endpoints if e.name == name), None)


def owner_only(what: str, access: AccessConfig) -> InputError:
    """The one-line refusal of an owner's action to a visitor, saying how an owner gets in."""
    how = []
    if access.oauth and access.owners:
        how.append("sign in with Hugging Face")
    if access.owner_token:
        how.append("enter the owner token")
    way = f" ({' or '.join(how)})" if how else f" (no owner is configured: set {OWNER_TOKEN_ENV} or {OWNERS_ENV})"
    return InputError(f"{what} is for the app's owner on this public app{way}")
