"""The app as a public Hugging Face Space: the owner's secrets, shared state and machine stay the owner's.

One public app per module (in-process, tiny random CLIP) runs with ``SPACE_ID`` set and
``OPENAI_API_KEY`` holding a test secret, as a Space owner configures it; visitors and the owner
are separate gradio_client sessions. A loopback chat server stands in for a visitor's "endpoint",
another for the owner's configured one. Scores are plumbing, never accuracy.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_app import Running, ScriptedTrainer, app_config, error_text, launch, mini_mvtec, train_inputs  # noqa: E402
from test_app_browser import browser  # noqa: E402, F401 - a fixture (headless chromium), skipped where absent

from demo.access import AccessConfig, Endpoint, Limits, is_public_deployment, load_endpoints  # noqa: E402
from kanoclip import KAnoCLIP  # noqa: E402
from kanoclip.errors import CheckpointError  # noqa: E402

from chat_server import ChatServer  # noqa: E402

SECRET = "sk-test-OWNER-SECRET"
OWNER_TOKEN = "owner-token-for-tests-1234"
LISTED = "kanoclip-test/listed-model"


@pytest.fixture(scope="module")
def owner_llm() -> ChatServer:
    """The owner's configured endpoint (bound to OPENAI_API_KEY)."""
    with ChatServer() as server:
        yield server


@pytest.fixture(scope="module")
def trainer() -> ScriptedTrainer:
    return ScriptedTrainer()


@pytest.fixture(scope="module")
def public_app(tiny_backbone: Path, bottle_dir: Path, tmp_path_factory, owner_llm: ChatServer, trainer):
    """The app on a 'Space': roles, endpoints and models from the environment, as app.py reads them."""
    tmp = tmp_path_factory.mktemp("public-app")
    mini_mvtec(tmp / "data" / "mvtec-mini", bottle_dir)
    endpoints = [{"name": "owner-llm", "url": owner_llm.url, "model": "owner-model", "key_env": "OPENAI_API_KEY"}]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SPACE_ID", "someone/kanoclip-demo")
        env.setenv("OPENAI_API_KEY", SECRET)
        env.setenv("KANOCLIP_OWNER_TOKEN", OWNER_TOKEN)
        env.setenv("KANOCLIP_PUBLIC_TRAINING", "1")
        env.setenv("KANOCLIP_MODELS", LISTED)
        env.setenv("KANOCLIP_ENDPOINTS", json.dumps(endpoints))
        for name in ("OAUTH_CLIENT_ID", "KANOCLIP_PUBLIC", "KANOCLIP_VISITOR_URLS"):
            env.delenv(name, raising=False)
        access = AccessConfig.from_env()
        assert access.public and not access.visitor_urls
        running = launch(app_config(tmp, tiny_backbone, access=access), train_fn=trainer)
        yield running
        running.demo.close()


def server_files(app: Running) -> set[Path]:
    """Every file under the app's own folders (data, checkpoints, knowledge bases)."""
    root = app.config.data_root.parent
    return {p for p in root.rglob("*") if p.is_file()}


def owner(app: Running) -> Client:
    client = app.client()
    note = client.predict(OWNER_TOKEN, api_name="/owner_sign_in")
    assert "Signed in as the owner" in note
    return client


def generate(client: Client, url: str = "", key_env: str = "", endpoint: str = "", typed_key: str = "") -> tuple:
    return client.predict(
        "bottle", "LLM", url, "m", key_env, 2, None, endpoint, typed_key, api_name="/kb_generate"
    )  # fmt: skip


# ---------------------------------------------------------------------------- no leak
def test_the_owners_key_reaches_only_its_own_endpoint(public_app: Running, owner_llm: ChatServer) -> None:
    visitor = public_app.client()
    with ChatServer() as theirs:
        attempts = [
            {"url": theirs.url, "key_env": "OPENAI_API_KEY"},  # the reported attack
            {"url": theirs.url, "endpoint": "owner-llm"},  # a configured name with another URL
            {"url": theirs.url, "typed_key": "sk-visitor"},
        ]
        for attempt in attempts:
            with pytest.raises(AppError) as excinfo:
                generate(visitor, **attempt)
            assert "KANOCLIP_VISITOR_URLS=1" in error_text(excinfo)  # the setting that would allow it
        with pytest.raises(AppError) as excinfo:  # a URL as the endpoint's name
            generate(visitor, endpoint=theirs.url, key_env="OPENAI_API_KEY")
        assert "pick one of the configured endpoints (owner-llm)" in error_text(excinfo)
        owner_llm.requests.clear()
        out = generate(visitor, endpoint="owner-llm")  # the configured endpoint works for a visitor
        assert theirs.requests == []
    assert "Generated 2 new LLM descriptions" in out[3]
    assert owner_llm.requests and all(r.headers["Authorization"] == f"Bearer {SECRET}" for r in owner_llm.requests)
    assert all(r.body["model"] == "owner-model" for r in owner_llm.requests)
    assert SECRET not in json.dumps(out, default=str)  # not in the table, the provenance or the note


def test_visitor_urls_when_allowed_reach_public_addresses_only(
    public_app: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(public_app.config, "access", replace(public_app.config.access, visitor_urls=True))
    visitor = public_app.client()
    with ChatServer() as theirs:
        port = theirs.url.split(":")[2].split("/")[0]
        inward = {
            theirs.url: "loopback",
            f"http://localhost:{port}/v1": "loopback",
            f"http://[::1]:{port}/v1": "loopback",
            "http://10.20.30.40/v1": "private",
            "http://192.168.1.1:8080/v1": "private",
            "http://169.254.169.254/v1": "link-local",  # the cloud metadata service
            "http://[::ffff:127.0.0.1]:9/v1": "loopback",
        }
        for url, kind in inward.items():
            with pytest.raises(AppError) as excinfo:
                generate(visitor, url=url, typed_key="sk-visitor-own-KEY")
            text = error_text(excinfo)
            assert f"a {kind} address" in text and "public addresses" in text, (url, text)
            assert "sk-visitor-own-KEY" not in text
        with pytest.raises(AppError) as excinfo:  # a server variable is never sent to a typed URL
            generate(visitor, url=theirs.url, key_env="OPENAI_API_KEY")
        assert "bound to" in error_text(excinfo)
        assert theirs.requests == []


# ---------------------------------------------------------------------------- edits stay with their visitor
def test_a_visitors_knowledge_edits_serve_only_their_own_detections(public_app: Running, bottle_image: Path) -> None:
    a, b = public_app.client(), public_app.client()
    vandal = ["VANDALISED description one of a bottle.", "VANDALISED description two of a bottle."]
    _, llm, _, note, *_ = a.predict("bottle", "\n".join(vandal), api_name="/kb_apply")
    assert llm.splitlines() == vandal and "this session only" in note
    *_, guidance_b = b.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
    assert not [row for row in guidance_b["data"] if "VANDALISED" in row[3]]
    assert {row[3] for row in guidance_b["data"] if row[1] == "built-in"}  # B still gets the shared ones
    *_, guidance_a = a.predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
    assert {row[3] for row in guidance_a["data"] if row[1] == "hand-written"} == set(vandal)
    _, llm_b, _, _, *_ = b.predict("bottle", "", api_name="/kb_apply")  # B's own edit starts from the shared base
    assert "VANDALISED" not in llm_b


def test_a_visitors_knowledge_edits_are_the_ones_their_prompts_tab_shows(public_app: Running) -> None:
    a, b = public_app.client(), public_app.client()
    own = ["A bottle with a SMEARED label.", "A bottle with a bent cap."]
    a.predict("bottle", "\n".join(own), api_name="/kb_apply")
    *_, texts_a = a.predict("training-free", "bottle", api_name="/prompts")
    *_, texts_b = b.predict("training-free", "bottle", api_name="/prompts")
    assert set(own) <= {row[2] for row in texts_a["data"]}  # A sees the descriptions A's detections use
    assert not [row for row in texts_b["data"] if "SMEARED" in row[2]]  # B sees the shared ones


def test_a_visitors_knowledge_edits_reach_their_batch_scores(public_app: Running, bottle_image: Path) -> None:
    a, b = public_app.client(), public_app.client()
    a.predict("bottle", "A bottle with a TEAR in its label.\nA bottle with a chipped rim.", api_name="/kb_apply")
    image = handle_file(str(bottle_image))
    score_a, score_b = (c.predict(image, "bottle", api_name="/detect")[1] for c in (a, b))
    assert score_a != pytest.approx(score_b, abs=1e-4)  # premise: A's descriptions change A's score
    for client, expected in ((a, score_a), (b, score_b)):
        _, _, table, _ = client.predict([image], "bottle", api_name="/detect_many")
        assert table["data"][0][1] == pytest.approx(expected, abs=1e-5)  # each with their own knowledge base


# ---------------------------------------------------------------------------- owner-only actions
def test_a_visitor_cannot_save_or_train(public_app: Running, trainer: ScriptedTrainer) -> None:
    visitor = public_app.client()
    before = server_files(public_app)
    for path in ("kb.json", "knowledge_base.json", "../escape.json"):
        with pytest.raises(AppError) as excinfo:
            visitor.predict(path, api_name="/kb_save")
        assert "saving the knowledge base is for the app's owner" in error_text(excinfo)
    trainer.release.set()
    with pytest.raises(AppError) as excinfo:
        visitor.predict(*train_inputs("visitor-run", "mvtec-mini"), api_name="/train")
    assert "training is for the app's owner" in error_text(excinfo)
    assert trainer.configs == []
    with pytest.raises(AppError) as excinfo:
        visitor.predict("not-the-token-at-all", api_name="/owner_sign_in")
    assert "not the owner token" in error_text(excinfo)
    assert server_files(public_app) == before


def test_an_unlisted_model_is_refused_without_a_download(
    public_app: Running, bottle_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list = []

    def stand_in(cls, checkpoint, *args, **kwargs):  # records what would be downloaded, then fails as offline
        loads.append(checkpoint)
        raise CheckpointError(f"{checkpoint} is not in the local cache (stand-in)")

    monkeypatch.setattr(KAnoCLIP, "from_pretrained", classmethod(stand_in))
    visitor = public_app.client()
    with pytest.raises(AppError) as excinfo:
        visitor.predict(handle_file(str(bottle_image)), "bottle", "someone/unlisted-model", api_name="/detect")
    text = error_text(excinfo)
    assert "'someone/unlisted-model' is not offered on this public app" in text and "KANOCLIP_MODELS" in text
    assert "\n" not in text and loads == []
    with pytest.raises(AppError):  # a listed id is looked up (here: the stand-in load fails)
        visitor.predict(handle_file(str(bottle_image)), "bottle", LISTED, api_name="/detect")
    assert loads == [LISTED]
    with pytest.raises(AppError):  # the owner may load an unlisted one
        owner(public_app).predict(handle_file(str(bottle_image)), "bottle", "someone/unlisted", api_name="/detect")
    assert loads == [LISTED, "someone/unlisted"]


def test_a_reference_upload_is_capped_on_a_public_app(public_app: Running, bottle_image: Path) -> None:
    visitor = public_app.client()
    limit = public_app.config.access.limits.max_images
    files = [handle_file(str(bottle_image))] * (limit + 1)
    with pytest.raises(AppError) as excinfo:
        visitor.predict(files, "bottle", "training-free", api_name="/add_references")
    assert f"at most {limit}" in error_text(excinfo)


# ---------------------------------------------------------------------------- the owner keeps the tools
def test_the_owner_edits_saves_and_trains(public_app: Running, trainer: ScriptedTrainer, bottle_image: Path) -> None:
    client = owner(public_app)
    shared = ["A bottle with a hairline crack the owner described."]
    _, _, _, note, *_ = client.predict("bottle", "\n".join(shared), api_name="/kb_apply")
    assert "every loaded model uses them now" in note
    *_, guidance = public_app.client().predict(handle_file(str(bottle_image)), "bottle", api_name="/detect")
    assert {row[3] for row in guidance["data"] if row[1] == "hand-written"} == set(shared)  # a new visitor sees it
    message = client.predict("owner.json", api_name="/kb_save")
    saved = public_app.config.kb_dir / "owner.json"
    assert str(saved.resolve()) in message and "hairline crack" in saved.read_text()
    trainer.release.set()
    status, *_ = client.predict(*train_inputs("owner-run", "mvtec-mini"), api_name="/train")
    assert "Finished: `checkpoints/owner-run`" in status
    assert (public_app.config.checkpoints_dir / "owner-run").is_dir()


# ---------------------------------------------------------------------------- the settings themselves
def test_public_is_decided_by_the_space_the_address_and_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPACE_ID", "KANOCLIP_PUBLIC", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert not is_public_deployment("127.0.0.1") and not is_public_deployment("localhost")
    assert not is_public_deployment("::1") and not is_public_deployment(None)
    assert is_public_deployment("0.0.0.0") and is_public_deployment("192.168.1.5")
    assert is_public_deployment("127.0.0.1", share=True) and is_public_deployment("127.0.0.1", public=True)
    assert not is_public_deployment("0.0.0.0", private=True)
    monkeypatch.setenv("KANOCLIP_PUBLIC", "1")
    assert is_public_deployment("127.0.0.1")
    monkeypatch.delenv("KANOCLIP_PUBLIC")
    monkeypatch.setenv("SPACE_ID", "someone/app")
    assert is_public_deployment("127.0.0.1") and not is_public_deployment("127.0.0.1", private=True)


def test_owners_are_recognised_by_token_or_hugging_face_profile() -> None:
    access = AccessConfig(public=True, owners=("alice",), oauth=True, owner_token=OWNER_TOKEN)
    assert access.is_owner(False, SimpleNamespace(username="alice"))
    assert not access.is_owner(False, SimpleNamespace(username="mallory")) and not access.is_owner(False, None)
    assert (
        access.token_matches(OWNER_TOKEN)
        and not access.token_matches(OWNER_TOKEN[:-1])
        and not access.token_matches("")
    )
    assert not replace(access, oauth=False).is_owner(False, SimpleNamespace(username="alice"))  # no OAuth set up
    assert AccessConfig(public=False).is_owner(False, None)  # a private app: everyone
    assert OWNER_TOKEN not in repr(access)
    with pytest.raises(ValueError, match="at least 12 characters"):
        AccessConfig(owner_token="short")
    with pytest.raises(ValueError, match="hub ids"):
        AccessConfig(models=("not-a-hub-id",))
    with pytest.raises(ValueError, match="queue_size"):
        Limits(queue_size=0)


def test_endpoints_are_read_from_json_or_a_file(tmp_path: Path) -> None:
    items = [{"name": "a", "url": "https://api.example.com/v1", "model": "m", "key_env": "A_KEY"}]
    assert load_endpoints(json.dumps(items)) == (Endpoint("a", "https://api.example.com/v1", "m", "A_KEY"),)
    (tmp_path / "endpoints.json").write_text(json.dumps(items))
    assert load_endpoints(str(tmp_path / "endpoints.json"))[0].key_env == "A_KEY"
    assert load_endpoints("") == ()
    for bad, message in (
        ("[", "not valid JSON"),
        (json.dumps(items * 2), "unique"),
        (json.dumps([{"name": "a", "url": "ftp://x", "model": "m"}]), "not an http"),
        (json.dumps([{"name": "a", "model": "m"}]), "lacks 'url'"),
        (str(tmp_path / "missing.json"), "cannot read"),
    ):
        with pytest.raises(ValueError, match=message):
            load_endpoints(bad)


def test_what_a_public_app_offers_depends_on_the_owners_settings(tiny_backbone: Path, tmp_path: Path) -> None:
    """Built, not launched: no Train tab unless enabled (then hidden until sign-in), sign-in only with a token.

    (Sign in with HF is not built here: outside a Space, Gradio's stand-in asks hf.co who is logged in.)
    """
    import gradio as gr

    from demo import build_app

    def built(access: AccessConfig) -> tuple[set, list]:
        demo = build_app(app_config(tmp_path, tiny_backbone, access=access, preload=False))
        return {f.api_name for f in demo.fns.values()}, list(demo.blocks.values())

    api, blocks = built(AccessConfig(public=True))
    assert "train" not in api and "owner_sign_in" not in api  # no training enabled, no owner token set
    assert {"detect", "kb_generate", "kb_apply", "kb_save"} <= api  # the endpoint names clients use
    api, blocks = built(AccessConfig(public=True, owner_token=OWNER_TOKEN, public_training=True))
    assert {"train", "owner_sign_in"} <= api
    train_tab = next(b for b in blocks if isinstance(b, gr.Tab) and b.label == "Train")
    assert train_tab.visible is False  # shown after an owner signs in
    api, blocks = built(AccessConfig())  # private, as on loopback: no sign-in, the Train tab shown
    assert "train" in api and "owner_sign_in" not in api
    assert next(b for b in blocks if isinstance(b, gr.Tab) and b.label == "Train").visible is True


@pytest.mark.browser
def test_the_train_tab_appears_in_the_browser_after_the_owner_signs_in(browser, public_app: Running) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from test_app_browser import _wait

    def tab_labels() -> set[str]:
        return {
            b.text.strip() for b in browser.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.is_displayed()
        }

    browser.get(public_app.url)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#owner-token input"), what="the owner token box")
    assert "you are a visitor" in browser.find_element(By.CSS_SELECTOR, "#app-role").text
    assert {"Detect", "Knowledge"} <= tab_labels() and "Train" not in tab_labels()
    box = browser.find_element(By.CSS_SELECTOR, "#owner-token input")
    assert box.get_attribute("type") == "password"
    box.send_keys(OWNER_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#owner-sign-in").click()
    _wait(browser, lambda d: "Train" in tab_labels(), what="the Train tab")
    assert "Signed in as the owner" in browser.find_element(By.CSS_SELECTOR, "#app-role").text


def test_app_py_takes_public_or_private_and_refuses_bad_endpoints(monkeypatch, capsys) -> None:
    import app

    assert app.parse_args(["--public"]).public and app.parse_args(["--private"]).private
    with pytest.raises(SystemExit):
        app.parse_args(["--public", "--private"])
    monkeypatch.setenv("KANOCLIP_ENDPOINTS", "[{not json")
    assert app.main(["--private"]) == 2  # before any model is loaded or port opened
    assert "KANOCLIP_ENDPOINTS: not valid JSON" in capsys.readouterr().err
