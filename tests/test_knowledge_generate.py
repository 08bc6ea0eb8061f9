"""kanoclip.knowledge.generate against a real HTTP chat-completions server (tests/chat_server.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

from kanoclip.errors import GenerationError, ImageError, InputError
from kanoclip.knowledge import LLM_TEMPLATE, VQA_TEMPLATE, KnowledgeBase
from kanoclip.knowledge import generate as gen

from conftest import write_test_image

try:
    from chat_server import ChatServer, Reply, server  # noqa: F401 - server is a fixture
except ImportError:  # tests/ imported as a package
    from tests.chat_server import ChatServer, Reply, server  # noqa: F401


def client(server: ChatServer, **kwargs) -> gen.ChatClient:
    options = {"timeout": 5.0, "retries": 2, "backoff": 0.01, **kwargs}
    return gen.ChatClient(server.url, "test-model", **options)


# ----------------------------------------------------------------------------- LLM
def test_llm_sends_paper_template_verbatim_and_keeps_n(server, tmp_path):
    out = tmp_path / "kb.json"
    with client(server) as llm:
        report = gen.build(out, ["metal_nut", "bottle"], llm=llm, n=5)
    prompts = sorted(r.prompt for r in server.requests)
    assert prompts == [
        "Describe what an abnormal image of bottle looks like?",
        "Describe what an abnormal image of metal nut looks like?",
    ]
    assert all(r.body["model"] == "test-model" and r.asked_n == 5 for r in server.requests)
    kb = KnowledgeBase.load(out)
    assert kb.counts() == {
        "bottle": {"llm": 5, "builtin": 0, "manual": 0, "vqa": 0},
        "metal_nut": {"llm": 5, "builtin": 0, "manual": 0, "vqa": 0},
    }
    assert report.llm_added == 10 and report.short == []
    (desc, prov), *_ = kb.provenance("metal_nut")
    assert "metal nut" in desc.text
    assert prov.model == "test-model"
    assert prov.endpoint == server.url + "/chat/completions"
    assert prov.template == LLM_TEMPLATE
    assert prov.date == time.strftime("%Y-%m-%d")


def test_llm_asks_again_for_missing_descriptions(server, tmp_path):
    server.queue(Reply.text("1. A first specific defect.\n2. A second specific defect.\n3. A third specific defect."))
    with client(server) as llm:
        texts = gen.generate_llm(llm, "screw", 5)
    assert len(texts) == 5 and len(set(texts)) == 5
    assert [r.asked_n for r in server.requests] == [5, 2]
    assert "A first specific defect." in json.dumps(server.requests[1].messages)  # told not to repeat


def test_llm_takes_only_n_and_bounds_follow_ups(server):
    server.queue(Reply.text("\n".join(f"{i}. Distinct defect number {i} here." for i in range(1, 8))))
    with client(server) as llm:
        assert len(gen.generate_llm(llm, "wood", 3)) == 3
    assert len(server.requests) == 1
    # A model that keeps repeating itself: 1 request + 2 follow-ups, then give up with what it has.
    server.requests.clear()
    server.responder = lambda request: Reply.text("1. The same defect every time.")
    with client(server) as llm:
        assert gen.generate_llm(llm, "wood", 4, extra_requests=2) == ["The same defect every time."]
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            (
                "Sure! Here they are:\n1. A crack on the rim.\n2) A chipped\n   neck edge.\n3: Dirt inside it."
                "\n\nHope it helps."
            ),
            ["A crack on the rim.", "A chipped neck edge.", "Dirt inside it."],
        ),
        (
            "- **Colour:** faded patchy areas\n* torn threads at edges\n• a hole in the middle",
            ["Colour: faded patchy areas", "torn threads at edges", "a hole in the middle"],
        ),
        (
            "It may show a crack across it. It could also have stains on top. Holes are possible too.",
            ["It may show a crack across it.", "It could also have stains on top.", "Holes are possible too."],
        ),
        (
            "First paragraph about cracks\nspanning two lines.\n\nSecond paragraph about stains.",
            ["First paragraph about cracks spanning two lines.", "Second paragraph about stains."],
        ),
        ("1. Same thing here.\n2. same thing here.\n3. Categories:\n4. ok", ["Same thing here."]),
    ],
)
def test_parse_descriptions_formats(answer, expected):
    assert gen.parse_descriptions(answer) == expected


# ----------------------------------------------------------------------------- VQA
def test_vqa_sends_template_and_image_data_url_and_keeps_m(server, tmp_path):
    images = [write_test_image(tmp_path / "imgs" / f"{i}.png", i) for i in range(2)]
    out = tmp_path / "kb.json"
    with client(server) as llm:
        report = gen.build(out, ["bottle"], llm=None, vqa=llm, images=[("bottle", p) for p in images], m=2)
    assert len(server.requests) == 4 and report.vqa_added == 4
    expected_prompt = VQA_TEMPLATE.replace("{class}", "bottle")
    assert expected_prompt == (
        "Identify anomalies in the input image of the specified class (bottle). "
        "Describe each anomaly's location, color, shape, size, and other characteristics."
    )
    for request in server.requests:
        text_part, image_part = request.user_content
        assert text_part == {"type": "text", "text": expected_prompt}
        assert image_part["type"] == "image_url"
    urls = {r.image_url for r in server.requests}
    assert urls == {"data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images}
    kb = KnowledgeBase.load(out)
    vqa = [d for d in kb.descriptions("bottle") if d.source == "vqa"]
    assert len(vqa) == 4
    assert {d.image for d in vqa} == {hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    assert {d.image_name for d in vqa} == {"0.png", "1.png"}
    assert {prov.template for _, prov in kb.provenance("bottle")} == {VQA_TEMPLATE}


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n truncated", b"not an image at all", b""])
def test_vqa_refuses_an_undecodable_image_before_asking(server, tmp_path, content):
    """A broken image is named in one line and never sent: detection's own decoding guards VQA too."""
    broken = tmp_path / "imgs" / "broken.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(content)
    with client(server) as vqa, pytest.raises(ImageError) as info:
        gen.generate_vqa(vqa, "bottle", broken)
    assert "broken.png" in str(info.value) and "\n" not in str(info.value)
    assert server.requests == []


def test_vqa_converts_formats_chat_apis_do_not_take_to_png(server, tmp_path):
    image = write_test_image(tmp_path / "scan.bmp", 5)
    with client(server) as vqa:
        gen.generate_vqa(vqa, "bottle", image)
    (request,) = server.requests
    prefix = "data:image/png;base64,"
    assert request.image_url.startswith(prefix)
    sent = Image.open(io.BytesIO(base64.b64decode(request.image_url[len(prefix) :])))
    assert sent.format == "PNG" and np.array_equal(
        np.asarray(sent.convert("RGB")), np.asarray(Image.open(image).convert("RGB"))
    )


def test_assign_classes_by_folder(tmp_path):
    write_test_image(tmp_path / "Metal-Nut" / "test" / "a.png", 1)
    write_test_image(tmp_path / "screw" / "b.PNG", 2)
    write_test_image(tmp_path / "wood" / "c.jpg", 3)
    (tmp_path / "screw" / "notes.txt").write_text("not an image")
    pairs, skipped = gen.assign_classes(tmp_path, ["metal_nut", "screw"])
    assert [(c, p.name) for c, p in pairs] == [("metal_nut", "a.png"), ("screw", "b.PNG")]
    assert [p.name for p in skipped] == ["c.jpg"]
    single, skipped = gen.assign_classes(tmp_path, ["bottle"])
    assert {c for c, _ in single} == {"bottle"} and len(single) == 3 and skipped == []
    with pytest.raises(InputError, match="does not exist"):
        gen.find_images(tmp_path / "missing")


# ----------------------------------------------------------------------------- failures
FAILURES = {
    "http-500": (lambda: Reply.error(500), "HTTP 500", {}),
    "http-429": (lambda: Reply.error(429, retry_after="1"), "HTTP 429", {"retries": 1}),
    "timeout": (lambda: Reply.slow(1.0), "no answer within 0.3 s", {"timeout": 0.3, "retries": 1}),
    "malformed-json": (Reply.malformed, "malformed JSON", {}),
    "empty-content": (lambda: Reply.text("   "), "empty content", {}),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_failure_retries_then_clear_error_and_keeps_earlier_results(server, tmp_path, kind):
    make_reply, reason, options = FAILURES[kind]
    server.responder = lambda request: make_reply() if "screw" in request.prompt else None
    out = tmp_path / "kb.json"
    with client(server, **options) as llm, pytest.raises(GenerationError) as info:
        gen.build(out, ["bottle", "screw"], llm=llm, n=5, concurrency=1)
    attempts = options.get("retries", 2) + 1
    message = str(info.value)
    assert "\n" not in message
    assert server.url + "/chat/completions" in message
    assert reason in message and f"after {attempts} attempts" in message
    screw_requests = [r for r in server.requests if "screw" in r.prompt]
    assert len(screw_requests) == attempts
    if kind == "http-429":  # Retry-After: 1 honoured (the backoff alone would be 0.01 s)
        assert screw_requests[1].time - screw_requests[0].time >= 0.9
    # What was generated before the failure is on disk; a rerun resumes with the missing class only.
    assert KnowledgeBase.load(out).counts() == {"bottle": {"llm": 5, "builtin": 0, "manual": 0, "vqa": 0}}
    server.responder = None
    server.requests.clear()
    with client(server) as llm:
        gen.build(out, ["bottle", "screw"], llm=llm, n=5)
    assert [r.prompt for r in server.requests] == ["Describe what an abnormal image of screw looks like?"]
    assert KnowledgeBase.load(out).counts()["screw"] == {"llm": 5, "builtin": 0, "manual": 0, "vqa": 0}


def test_connection_error_is_retried_then_reported(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    llm = gen.ChatClient(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(GenerationError, match=r"connection failed .* after 2 attempts"):
        gen.build(tmp_path / "kb.json", ["bottle"], llm=llm)
    assert not (tmp_path / "kb.json").exists()


def test_transient_failure_then_success(server, tmp_path):
    server.queue(Reply.error(503), Reply.malformed())
    with client(server) as llm:
        assert len(gen.generate_llm(llm, "bottle", 5)) == 5
    assert len(server.requests) == 3


def test_client_error_is_not_retried(server):
    server.queue(Reply.error(401))
    with client(server) as llm, pytest.raises(GenerationError, match="HTTP 401.*API key"):
        llm.complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1


# ----------------------------------------------------------------------------- cache / resume / progress
def test_rerun_asks_only_for_what_is_missing(server, tmp_path):
    out = tmp_path / "kb.json"
    images = [write_test_image(tmp_path / "imgs" / f"{i}.png", i) for i in range(3)]
    pairs = [("bottle", p) for p in images[:2]]
    with client(server) as c:
        gen.build(out, ["bottle", "grid"], llm=c, vqa=c, images=pairs, n=5, m=1)
        assert len(server.requests) == 4
        server.requests.clear()
        report = gen.build(out, ["bottle", "grid"], llm=c, vqa=c, images=pairs, n=5, m=1)
        assert server.requests == [] and report.cached == 4
        # Two more LLM descriptions per class, and one new image.
        gen.build(out, ["bottle", "grid"], llm=c, vqa=c, images=[*pairs, ("bottle", images[2])], n=7, m=1)
    assert sorted(r.asked_n for r in server.requests if not r.is_vqa) == [2, 2]
    assert [
        r.image_url.endswith(base64.b64encode(images[2].read_bytes()).decode()) for r in server.requests if r.is_vqa
    ] == [True]
    counts = KnowledgeBase.load(out).counts()
    assert counts == {
        "bottle": {"llm": 7, "builtin": 0, "manual": 0, "vqa": 3},
        "grid": {"llm": 7, "builtin": 0, "manual": 0, "vqa": 0},
    }


def test_build_extends_existing_file_and_reports_progress(server, tmp_path):
    out = tmp_path / "kb.json"
    KnowledgeBase.builtin().save(out)
    events = []
    with client(server) as llm:
        gen.build(out, ["wood", "widget"], llm=llm, n=6, progress=events.append)
    kb = KnowledgeBase.load(out)
    assert set(KnowledgeBase.builtin().classes()) < set(kb.classes())
    assert kb.counts()["wood"]["llm"] == 6 and kb.counts()["widget"]["llm"] == 6
    assert kb.counts()["wood"]["builtin"] == 5  # kept, and not counted as LLM descriptions
    assert [r.asked_n for r in server.requests if "wood" in r.prompt] == [6]
    assert events[0].kind == "start" and events[0].total == 2
    assert sorted(e.done for e in events[1:]) == [1, 2] and {e.class_name for e in events[1:]} == {"wood", "widget"}


def test_save_after_each_task(server, tmp_path, monkeypatch):
    out = tmp_path / "kb.json"
    seen = []
    original = KnowledgeBase.save

    def spy(self, path):
        original(self, path)
        seen.append(sorted(KnowledgeBase.load(path).classes()))

    monkeypatch.setattr(KnowledgeBase, "save", spy)
    with client(server) as llm:
        gen.build(out, ["bottle", "grid", "wood"], llm=llm, concurrency=1)
    assert seen == [["bottle"], ["bottle", "grid"], ["bottle", "grid", "wood"]]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_limit(server, tmp_path, concurrency):
    server.responder = lambda request: Reply.slow(0.15, server.default_reply(request))
    classes = ["bottle", "cable", "grid", "wood", "screw", "tile"]
    with client(server) as llm:
        gen.build(tmp_path / "kb.json", classes, llm=llm, concurrency=concurrency)
    assert server.max_in_flight == concurrency
    assert KnowledgeBase.load(tmp_path / "kb.json").classes() == sorted(classes)


def test_api_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert gen.api_key_from_env(None) == "sk-default"
    assert gen.api_key_from_env("MY_KEY") == "sk-mine"
    with gen.ChatClient(server.url, "m", api_key=gen.api_key_from_env("MY_KEY")) as c:
        c.complete([{"role": "user", "content": "x"}])
    assert server.requests[0].headers["Authorization"] == "Bearer sk-mine"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert gen.api_key_from_env(None) is None
    with pytest.raises(InputError, match="NOT_SET_ANYWHERE is not set"):
        gen.api_key_from_env("NOT_SET_ANYWHERE")


@pytest.mark.parametrize(
    ("url", "model", "match"),
    [("localhost:11434", "m", "not an http"), ("http://x/v1", " ", "no model"), ("http://x/v1", "m", None)],
)
def test_client_arguments(url, model, match):
    if match is None:
        assert gen.ChatClient(url + "/chat/completions/", model).url == "http://x/v1/chat/completions"
        return
    with pytest.raises(InputError, match=match):
        gen.ChatClient(url, model)


def test_redirects_are_not_followed_and_answers_are_capped(server):
    messages = [{"role": "user", "content": "hi"}]
    server.queue(Reply(status=302, headers={"Location": server.url + "/elsewhere/chat/completions"}))
    with client(server) as llm, pytest.raises(GenerationError, match="a redirect; redirects are not followed"):
        llm.complete(messages)
    assert len(server.requests) == 1  # neither followed nor retried
    server.queue(Reply.text("1. " + "a very long answer " * 200))
    with client(server, max_response_bytes=1000) as llm, pytest.raises(GenerationError, match="exceeds 1000 bytes"):
        llm.complete(messages)


def test_public_only_refuses_inward_addresses_before_sending(server, monkeypatch):
    with client(server, public_only=True) as llm, pytest.raises(InputError, match="a loopback address"):
        llm.complete([{"role": "user", "content": "hi"}])
    assert server.requests == []

    # a name with one public and one private address is refused; an all-public one is requested at its address
    answers = {"mixed.example": ["93.184.216.34", "10.0.0.7"], "api.example": ["93.184.216.34"]}
    monkeypatch.setattr(
        gen.socket, "getaddrinfo", lambda host, port, **kw: [(2, 1, 6, "", (a, port)) for a in answers[host]]
    )
    with pytest.raises(InputError, match="10.0.0.7, a private address"):
        gen.public_addresses("mixed.example", 443)
    llm = gen.ChatClient("https://api.example:8443/v1", "m", public_only=True)
    url, headers, extensions = llm._target()
    assert url == "https://93.184.216.34:8443/v1/chat/completions"
    assert headers == {"Host": "api.example:8443"} and extensions == {"sni_hostname": "api.example"}


def test_an_error_answer_echoing_the_key_does_not_show_it(server):
    server.queue(Reply(status=401, body=b'{"error": "invalid key sk-echoed-SECRET-123"}'))
    with client(server, api_key="sk-echoed-SECRET-123") as llm, pytest.raises(GenerationError) as excinfo:
        llm.complete([{"role": "user", "content": "hi"}])
    assert "HTTP 401" in str(excinfo.value) and "invalid key ***" in str(excinfo.value)
    assert "sk-echoed-SECRET-123" not in str(excinfo.value)
    assert server.requests[0].headers["Authorization"] == "Bearer sk-echoed-SECRET-123"
