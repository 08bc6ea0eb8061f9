"""Build or extend a knowledge base with an OpenAI-compatible chat-completions server.

The prompts are the paper's (§2.2.1): :data:`~kanoclip.knowledge.base.LLM_TEMPLATE`
asks an LLM for *n* descriptions of a class, :data:`~kanoclip.knowledge.base.VQA_TEMPLATE`
asks a VQA model about one image (sent as a base64 data URL), *m* descriptions per
image. Any server speaking ``POST {base_url}/chat/completions`` works: OpenAI, or a
local Ollama / vLLM / llama.cpp server (no API key needed there).

:func:`build` writes the output file atomically after every completed class or
image, so an interrupted run loses nothing already generated, and a rerun only asks
for what the file still lacks.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import io
import ipaddress
import json
import os
import queue
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from kanoclip.data.sample import is_image
from kanoclip.errors import GenerationError, InputError
from kanoclip.images import load_image
from kanoclip.knowledge import classes as _catalog
from kanoclip.knowledge.base import LLM_TEMPLATE, VQA_TEMPLATE, KnowledgeBase, Provenance, image_sha256

#: File extensions searched for by :func:`find_images`.
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_MAX_BACKOFF_S = 30.0
_MAX_RETRY_AFTER_S = 120.0
#: The largest answer read (a chat answer is a few kB); a bigger one is cut off and refused.
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20


# ----------------------------------------------------------------------------- outbound addresses
def public_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, after checking that each one is public.

    Refused (:class:`InputError`, naming the host and the address): loopback, private, link-local,
    shared (CGNAT), multicast, reserved and unspecified addresses, IPv4-mapped IPv6 forms of
    those, and a host that does not resolve. All resolved addresses are checked, not just the
    first, so a name with one public and one private address is refused too.

    Args:
        host: a host name or IP literal (IPv6 without brackets).
        port: the port the request will go to.

    Returns:
        The resolved addresses, in resolver order.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"endpoint host {host!r} does not resolve ({exc}); check the URL") from None
    addresses = list(dict.fromkeys(info[4][0].split("%")[0] for info in infos))
    for text in addresses:
        address = ipaddress.ip_address(text)
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        if not address.is_global or address.is_multicast:
            kind = next(
                (
                    name
                    for name in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private")
                    if getattr(address, f"is_{name}")
                ),
                "non-public",
            ).replace("_", "-")
            raise InputError(
                f"endpoint host {host!r} resolves to {text}, a {kind} address; "
                "only endpoints on public addresses may be requested from here"
            )
    return addresses


# ----------------------------------------------------------------------------- client
class ChatClient:
    """A minimal OpenAI-compatible chat-completions client with timeouts and retries.

    ``retries`` is the number of retries after the first attempt. A retry follows a
    5xx or 429 answer (honouring ``Retry-After`` seconds), a timeout, a connection
    error, a malformed JSON body or an empty answer; the wait doubles each time
    starting at ``backoff`` seconds. Other 4xx answers fail at once, and so does a redirect
    (3xx): it is never followed, since it could lead the request (and its key) elsewhere.

    ``timeout`` bounds each attempt as a whole (connecting, waiting and reading), and
    ``max_response_bytes`` the answer's size: a server that drips or floods is cut off.
    With ``public_only`` (a public app sending a visitor's URL) the host is resolved before
    each attempt, every address must be public (:func:`public_addresses`), and the request
    goes to the checked address itself (the TLS name and ``Host`` header stay the URL's),
    so a name cannot be re-pointed inward between the check and the connection.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        temperature: float | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        public_only: bool = False,
    ) -> None:
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise InputError(f"endpoint URL {base_url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:11434/v1")
        if not model or not model.strip():
            raise InputError(f"no model named for {base_url}; pass the model name (e.g. --llm-model llama3.1)")
        if timeout <= 0 or retries < 0 or backoff < 0 or max_response_bytes < 1:
            raise InputError("timeout must be > 0 and retries, backoff >= 0; fix --timeout/--retries")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.model = model.strip()
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.temperature = temperature
        self.max_response_bytes = int(max_response_bytes)
        self.public_only = public_only
        self._api_key = api_key  # only for the header, and to scrub it from an echoing server's error text
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=self.timeout, headers=headers, follow_redirects=False)

    def close(self) -> None:
        """Close the underlying HTTP connections."""
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def complete(self, messages: list[dict[str, Any]]) -> str:
        """The text of the first choice's answer to ``messages``; :class:`GenerationError` after the last retry."""
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        attempts = self.retries + 1
        failure = "no attempt made"
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            try:
                status, headers, raw = self._post(body)
            except httpx.TimeoutException:
                failure = f"no answer within {self.timeout:g} s"
            except httpx.TransportError as exc:
                failure = f"connection failed ({type(exc).__name__}: {_one_line(str(exc)) or 'no detail'})"
            else:
                if status == 429 or status >= 500:
                    failure = f"HTTP {status}"
                    retry_after = _retry_after_seconds(headers.get("Retry-After"))
                elif 300 <= status < 400:
                    raise GenerationError(
                        f"{self.url}: HTTP {status}, a redirect; redirects are not followed, "
                        "give the URL the server answers on"
                    )
                elif status >= 400:
                    raise GenerationError(
                        f"{self.url}: HTTP {status} ({self._scrub(raw.decode('utf-8', 'replace'))[:200]}); "
                        f"check the URL, the model name {self.model!r} and the API key"
                    )
                else:
                    try:
                        return _answer_text(json.loads(raw))
                    except json.JSONDecodeError as exc:
                        failure = f"malformed JSON response ({exc.msg} at character {exc.pos})"
                    except ValueError as exc:
                        failure = str(exc)
            if attempt < attempts:
                delay = min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, _MAX_RETRY_AFTER_S))
                time.sleep(delay)
        noun = "attempt" if attempts == 1 else "attempts"
        raise GenerationError(
            f"{self.url}: {failure} after {attempts} {noun}; check that the server is up and serves "
            f"model {self.model!r}, or raise --retries/--timeout"
        )

    def _scrub(self, text: str) -> str:
        """``text`` on one line, with the API key (should a server echo it back) masked."""
        line = _one_line(text)
        return line.replace(self._api_key, "***") if self._api_key else line

    def _target(self) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(URL to request, extra headers, httpx extensions): the URL itself, or its checked public address."""
        if not self.public_only:
            return self.url, {}, {}
        parts = urllib.parse.urlsplit(self.url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        address = public_addresses(host, port)[0]
        literal = f"[{address}]" if ":" in address else address
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        pinned = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        return pinned, {"Host": parts.netloc.rsplit("@", 1)[-1]}, {"sni_hostname": host}

    def _post(self, body: dict[str, Any]) -> tuple[int, httpx.Headers, bytes]:
        """One attempt: (status, headers, body), the body cut off at ``max_response_bytes`` and the whole
        attempt at ``timeout`` seconds (``httpx.ReadTimeout`` then)."""
        url, headers, extensions = self._target()
        deadline = time.monotonic() + self.timeout
        with self._http.stream("POST", url, json=body, headers=headers, extensions=extensions) as response:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise GenerationError(
                        f"{self.url}: the answer exceeds {self.max_response_bytes} bytes; "
                        "a chat answer is a few kB, check the URL"
                    )
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the whole answer took too long")
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _plain(text: str) -> str:
    """One line of text without markdown emphasis or surrounding quotes."""
    return _one_line(re.sub(r"\*\*|__|`", "", text)).strip(" \"'")


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (a number, or an HTTP date), ``None`` if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - _dt.datetime.now(when.tzinfo)).total_seconds())


def _answer_text(payload: Any) -> str:
    """The first choice's message content; ``ValueError`` describing what is wrong otherwise."""
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("malformed JSON response (no choices[0].message.content)") from None
    if isinstance(content, list):  # some servers answer with content parts
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise ValueError("empty content in the response")
    return content


# ----------------------------------------------------------------------------- prompts and parsing
def llm_messages(class_name: str, n: int, avoid: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The chat messages asking for ``n`` descriptions; the user message is the paper's template verbatim."""
    system = (
        "You describe what visual anomalies and defects look like. Answer with a numbered list of "
        f"exactly {n} different descriptions, one sentence each, covering colour, shape, texture, "
        "structure and position. Write nothing else."
    )
    if avoid:
        system += " Do not repeat these descriptions: " + " | ".join(avoid)
    prompt = LLM_TEMPLATE.replace("{class}", _catalog.display_name(class_name))
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def vqa_messages(class_name: str, image: bytes, mime: str) -> list[dict[str, Any]]:
    """The chat message with the paper's VQA template verbatim and the image as a base64 data URL."""
    prompt = VQA_TEMPLATE.replace("{class}", _catalog.display_name(class_name))
    url = f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[.):\]]|[-*•·+])\s+(.*\S)\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def parse_descriptions(answer: str) -> list[str]:
    """Split a free-text answer into descriptions: numbered or bulleted items, else paragraphs, else sentences.

    Text before the first item ("Here are five descriptions:") and after the list
    (a closing remark after a blank line) is dropped; markdown emphasis is removed;
    duplicates (ignoring case) are dropped.
    """
    lines = [ln for ln in answer.replace("\r\n", "\n").split("\n") if not ln.strip().startswith("```")]
    items: list[str] = []
    in_item = False
    for line in lines:
        match = _ITEM.match(line)
        if match:
            items.append(match.group(1))
            in_item = True
        elif not line.strip():
            in_item = False
        elif in_item:
            items[-1] += " " + line.strip()
    if not items:
        paragraphs = [p for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
        items = paragraphs if len(paragraphs) > 1 else _SENTENCE_END.split(" ".join(paragraphs))
    result: list[str] = []
    seen: set[str] = set()
    for item in items:
        text = _plain(item)
        if not text or text.endswith(":") or len(text.split()) < 3 or text.lower() in seen:
            continue
        seen.add(text.lower())
        result.append(text)
    return result


def _collect(
    ask: Callable[[int, list[str]], Iterable[str]], want: int, max_requests: int, avoid: Sequence[str]
) -> list[str]:
    """Call ``ask(missing, known)`` until ``want`` new distinct texts are gathered or ``max_requests`` is spent."""
    known = {t.lower() for t in avoid}
    got: list[str] = []
    for _ in range(max_requests):
        missing = want - len(got)
        if missing <= 0:
            break
        for text in ask(missing, [*avoid, *got]):
            if len(got) < want and text.lower() not in known:
                known.add(text.lower())
                got.append(text)
    return got


def generate_llm(
    client: ChatClient, class_name: str, n: int = 5, *, avoid: Sequence[str] = (), extra_requests: int = 2
) -> list[str]:
    """Up to ``n`` new LLM descriptions of a class: one request for all, then at most ``extra_requests`` for the
    missing ones."""
    return _collect(
        lambda missing, known: parse_descriptions(client.complete(llm_messages(class_name, missing, known))),
        n,
        1 + extra_requests,
        avoid,
    )


def generate_vqa(
    client: ChatClient,
    class_name: str,
    image: str | os.PathLike[str],
    m: int = 1,
    *,
    avoid: Sequence[str] = (),
    extra_requests: int = 2,
) -> list[str]:
    """Up to ``m`` new VQA descriptions of one image: one request per description (each answer is one description)."""
    data, mime = _image_payload(Path(image))
    return _collect(
        lambda missing, known: [_plain(client.complete(vqa_messages(class_name, data, mime)))],
        m,
        m + extra_requests,
        avoid,
    )


def _image_payload(path: Path) -> tuple[bytes, str]:
    """The bytes and MIME type to send, after the same safe decoding as detection's inputs.

    PNG and JPEG files go as they are; other formats (BMP, TIFF, ...) are sent as PNG.
    """
    decoded = load_image(path)  # corrupt, truncated, bomb or missing files: one ImageError line naming the path
    mime = _MIME.get(path.suffix.lower())
    if mime is not None:
        return path.read_bytes(), mime
    buffer = io.BytesIO()
    decoded.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


# ----------------------------------------------------------------------------- images
def find_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image under ``folder`` (searched recursively), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist or is not a folder; pass --images DIR")
    return sorted(p for p in root.rglob("*") if p.is_file() and is_image(p))


def assign_classes(folder: str | os.PathLike[str], classes: Sequence[str]) -> tuple[list[tuple[str, Path]], list[Path]]:
    """Pair each image under ``folder`` with its class; returns ``(pairs, skipped)``.

    With one class, every image belongs to it. With several, an image belongs to the
    first folder on its path (from ``folder`` down) that names one of ``classes``,
    compared via aliases (``metal-nut`` matches ``metal_nut``); images under no such
    folder are skipped.
    """
    root = Path(folder)
    images = find_images(root)
    if len(classes) == 1:
        return [(classes[0], p) for p in images], []
    by_key = {_catalog.class_key(c): c for c in classes}
    pairs: list[tuple[str, Path]] = []
    skipped: list[Path] = []
    for path in images:
        owner = next(
            (by_key[k] for k in map(_catalog.class_key, path.relative_to(root).parts[:-1]) if k in by_key), None
        )
        if owner is None:
            skipped.append(path)
        else:
            pairs.append((owner, path))
    return pairs, skipped


# ----------------------------------------------------------------------------- build
@dataclass(frozen=True)
class Progress:
    """One step of :func:`build`, passed to its ``progress`` hook (``done == 0`` before the first task)."""

    done: int
    total: int
    kind: Literal["start", "llm", "vqa"]
    class_name: str = ""
    image_name: str | None = None
    added: int = 0  #: descriptions added by this step
    wanted: int = 0  #: descriptions this step asked for


@dataclass
class BuildReport:
    """What :func:`build` did."""

    path: Path
    llm_added: int = 0
    vqa_added: int = 0
    cached: int = 0  #: classes/images skipped because the file already had enough
    short: list[str] = field(default_factory=list)  #: tasks that got fewer descriptions than asked


@dataclass(frozen=True)
class _Task:
    kind: Literal["llm", "vqa"]
    class_name: str
    want: int
    avoid: tuple[str, ...]
    image: Path | None = None
    image_hash: str | None = None


def build(
    out: str | os.PathLike[str],
    classes: Sequence[str],
    *,
    llm: ChatClient | None,
    vqa: ChatClient | None = None,
    images: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    n: int = 5,
    m: int = 1,
    concurrency: int = 4,
    progress: Callable[[Progress], None] | None = None,
) -> BuildReport:
    """Generate what ``out`` lacks and save it after every completed class or image.

    ``n`` counts a class's LLM descriptions only: hand-written ones (``builtin``,
    ``manual``) are kept but are not LLM answers, so they do not make a class complete.

    ``out`` is extended if it exists (and must then be a valid knowledge base).
    ``images`` pairs a class with an image file for VQA. The first
    :class:`GenerationError` stops new requests; results of requests already running
    are still saved before it is raised.
    """
    if n < 1 or m < 1 or concurrency < 1:
        raise InputError(
            f"n, m and concurrency must be >= 1 (got n={n}, m={m}, concurrency={concurrency}); "
            "fix --n/--m/--concurrency"
        )
    if images and vqa is None:
        raise InputError("images were given but no VQA endpoint; pass --vqa-url and --vqa-model")
    path = Path(out)
    kb = KnowledgeBase.load(path) if path.exists() else KnowledgeBase()
    report = BuildReport(path=path)
    tasks: list[_Task] = []
    if llm is not None:
        for name in classes:
            have = _known_texts(kb, name, "llm")
            if len(have) >= n:
                report.cached += 1
            else:
                tasks.append(_Task("llm", name, n - len(have), tuple(have)))
    for name, image in images:
        digest = image_sha256(image)
        have = _known_texts(kb, name, "vqa", digest)
        if len(have) >= m:
            report.cached += 1
        else:
            tasks.append(_Task("vqa", name, m - len(have), tuple(have), Path(image), digest))

    today = _dt.date.today().isoformat()
    notify = progress or (lambda event: None)
    notify(Progress(0, len(tasks), "start"))

    def run(task: _Task) -> list[str]:
        if task.kind == "llm":
            assert llm is not None
            return generate_llm(llm, task.class_name, task.want, avoid=task.avoid)
        assert vqa is not None and task.image is not None
        return generate_vqa(vqa, task.class_name, task.image, task.want, avoid=task.avoid)

    def record(task: _Task, texts: list[str]) -> int:
        client = llm if task.kind == "llm" else vqa
        assert client is not None
        template = LLM_TEMPLATE if task.kind == "llm" else VQA_TEMPLATE
        prov = Provenance(model=client.model, endpoint=client.url, date=today, template=template)
        if task.kind == "llm":
            added = kb.add_llm(task.class_name, texts, prov)
            report.llm_added += added
        else:
            assert task.image is not None and task.image_hash is not None
            added = kb.add_vqa(task.class_name, task.image_hash, task.image.name, texts, prov)
            report.vqa_added += added
        if added:
            kb.save(path)
        if added < task.want:
            label = task.class_name if task.image is None else f"{task.class_name}/{task.image.name}"
            report.short.append(f"{task.kind} {label}: {added} of {task.want}")
        return added

    _run_pool(tasks, run, record, concurrency, notify)
    return report


def _known_texts(kb: KnowledgeBase, class_name: str, source: str, image: str | None = None) -> list[str]:
    """The texts ``kb`` already has for a class (never the generic fallback), of one source / image."""
    if not kb.is_known(class_name):
        return []
    return [d.text for d in kb.descriptions(class_name) if d.source == source and d.image == image]


def _run_pool(
    tasks: list[_Task],
    run: Callable[[_Task], list[str]],
    record: Callable[[_Task, list[str]], int],
    concurrency: int,
    notify: Callable[[Progress], None],
) -> None:
    """Run tasks on ``concurrency`` worker threads; record (and save) each result in this thread.

    The workers are daemon threads: on Ctrl-C this thread stops at once (everything
    recorded is already on disk) instead of waiting for requests in flight.
    """
    todo: queue.SimpleQueue[_Task] = queue.SimpleQueue()
    for task in tasks:
        todo.put(task)
    results: queue.SimpleQueue[tuple[_Task, list[str], Exception | None]] = queue.SimpleQueue()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                task = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((task, run(task), None))
            except Exception as exc:  # noqa: BLE001 - handed to the main thread
                results.put((task, [], exc))

    threads = [
        threading.Thread(target=worker, name=f"kanoclip-kb-{i}", daemon=True)
        for i in range(min(concurrency, len(tasks)))
    ]
    for thread in threads:
        thread.start()
    first_error: Exception | None = None
    done = 0
    try:
        while True:
            try:
                task, texts, error = results.get(timeout=0.05)
            except queue.Empty:
                if any(t.is_alive() for t in threads) or not results.empty():
                    continue
                break
            if error is not None:
                first_error = first_error or error
                stop.set()
                continue
            added = record(task, texts)
            done += 1
            image_name = task.image.name if task.image is not None else None
            notify(Progress(done, len(tasks), task.kind, task.class_name, image_name, added, task.want))
    finally:
        stop.set()
    if first_error is not None:
        raise first_error


def api_key_from_env(variable: str | None) -> str | None:
    """The API key from ``variable`` (default ``OPENAI_API_KEY``, which may be unset for local servers)."""
    if variable is None:
        return os.environ.get(DEFAULT_API_KEY_ENV) or None
    value = os.environ.get(variable)
    if not value:
        raise InputError(f"environment variable {variable} is not set; export it or drop --api-key-env")
    return value
