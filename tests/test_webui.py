"""Open WebUI in Debian's chromium through the relay (issue 3): log in to the relay, and only to it
(issue 17: Open WebUI, its auth on, opens signed in as the relay's key's own account), pick the model,
chat, watch the reply stream in over socket.io's WebSocket, reload and find the chat in the history;
a second key is a second account that sees none of the first's chats; a client cannot name another
user; and nothing the page loads goes around the relay.

Two engines sit behind Open WebUI (tests/webui.py): the STAND-IN Ollama server of tests/upstreams.py
(Ollama's own binary cannot run here), which streams a known sentence a token every TOKEN_DELAY s so
the page can be watched growing word by word; and the real llama.cpp engine (deployment/engine.py) on
a generated tiny model, through Open WebUI's OpenAI connection.

The stack starts once for the module: Open WebUI's first start runs ~80 migrations. These tests
fail, never skip, when Open WebUI, chromium or the llama.cpp engine is missing (the message names
the scripts/setup.d step); deselect them explicitly with ``-m "not webui"``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from bridge.httprules import user_email
from bridge.relay.auth import static_key_id

from .procs import API_KEY, NODE_TOKEN
from .webui import (
    LLAMA_CONTEXT,
    SECOND_LABEL,
    Traffic,
    WebUIStack,
    choose_model,
    launch_chromium,
    page_text_snapshots,
    record_page_text,
    relay_login,
    require_components,
    send_and_wait_done,
    send_message,
    socketio_reply_deltas,
    wait_reply_done,
    watch,
    watch_reply_growth,
    webui_signed_in,
    webui_stack,
    words_shown,
)

# `engine` too: the stack every test here shares chats with the embedded llama.cpp engine.
pytestmark = [pytest.mark.webui, pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(240)]

#: Seconds between the stand-in's tokens: slow enough to see the reply grow in the page.
TOKEN_DELAY = 0.25
ADMIN_PASSWORD = "webui-admin-" + secrets.token_urlsafe(12)
#: The Open WebUI account of the tests' key (from BRIDGE_API_KEYS): ``env-<8 hex>@relay.invalid``.
KEY_EMAIL = user_email(static_key_id(API_KEY))


@pytest.fixture(scope="module")
def webui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUIStack]:
    with webui_stack(
        tmp_path_factory.mktemp("webui"), token_delay=TOKEN_DELAY, admin_password=ADMIN_PASSWORD
    ) as stack:
        yield stack
        logs = {name: out for name, out in stack.logs().items() if name in ("relay", "bridge")}
    for name, out in logs.items():
        for secret, what in ((API_KEY, "the client key"), (NODE_TOKEN, "the node token")):
            assert secret not in out, f"{name} logged {what}"
        assert ADMIN_PASSWORD not in out, f"{name} logged the Open WebUI password of a request body"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    require_components()
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = launch_chromium(playwright)
    yield b
    b.close()


def _page(browser: Browser) -> tuple[Any, Traffic]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(60_000)
    traffic = Traffic()
    watch(context, traffic)
    return context, traffic


def test_chat_streams_through_the_relay_over_websocket(webui: WebUIStack, browser: Browser) -> None:
    context, traffic = _page(browser)
    page = context.new_page()
    try:
        relay_login(page, webui.url)
        account = webui_signed_in(page)
        # One login: Open WebUI signed the browser in as the relay's key's own account (a `user`:
        # the admin is the account made first), with no form of its own.
        assert account["email"] == KEY_EMAIL and account["role"] == "user", account
        assert not [u for u in traffic.requests if "/api/v1/auths/signup" in u]
        choose_model(page, webui.engine.model)

        generations_before = httpx.get(webui.engine.url + "/_counts").json()["generations"]
        watch_reply_growth(page, webui.engine.reply)
        prompt = "Say hello through the relay"
        send_message(page, prompt)
        samples = wait_reply_done(page, webui.engine.reply)
        assert httpx.get(webui.engine.url + "/_counts").json()["generations"] == generations_before + 1

        # It streamed: the page showed the reply part by part, over about the engine's pace.
        words = len(webui.engine.reply.split(" "))
        partial = [(t, n) for t, n in samples if 0 < n < words]
        assert len({n for _, n in partial}) >= words // 2, f"the reply did not grow token by token: {samples}"
        first_t = min(t for t, _ in partial)
        done_t = min(t for t, n in samples if n == words)
        assert done_t - first_t >= (words - 2) * TOKEN_DELAY * 1000 * 0.5, samples

        # Over socket.io's WebSocket, through the relay's port, carrying the reply.
        relay = urlsplit(webui.url).netloc
        sockets = [u for u in traffic.websockets if urlsplit(u).path.startswith("/ws/socket.io")]
        assert sockets, f"no socket.io WebSocket: {traffic.websockets}"
        assert all(urlsplit(u).netloc == relay for u in sockets), sockets
        assert any("transport=websocket" in u for u in sockets), sockets
        assert not [u for u in traffic.requests if "transport=polling" in u], "socket.io fell back to polling"
        assert webui.relay.health()["websockets_open"] >= 1, "the relay carries no WebSocket"
        # The reply's tokens came over that WebSocket, one socket.io message each, adding up to it.
        deltas = socketio_reply_deltas(traffic.ws_frames)
        assert len(deltas) >= words // 2, f"reply not streamed over the WebSocket: {deltas}"
        assert "".join(deltas).strip() == webui.engine.reply, deltas

        # Reload: the chat is in the history (the sidebar) and shows the whole reply again.
        chat_path = urlsplit(page.url).path
        assert re.fullmatch(r"/c/[0-9a-f-]+", chat_path), page.url
        page.reload()
        page.wait_for_selector("#chat-input")
        page.get_by_text(webui.engine.reply).first.wait_for()
        link = page.locator(f'a[href="{chat_path}"]').first
        link.wait_for(state="attached")
        assert prompt in (link.text_content() or ""), "the chat is not in the sidebar's history"
    finally:
        context.close()

    # Nothing went around the relay: every URL the page asked for is the relay's host:port.
    assert traffic.requests, "no requests recorded"
    foreign = traffic.foreign(webui.url)
    assert not foreign, f"requests that did not go through the relay: {foreign}"
    webui_port = f":{webui.webui.port}"
    assert not [u for u in traffic.network_urls() if webui_port in u], "Open WebUI's own port leaked"


def test_chat_with_the_llama_cpp_engine_over_openwebuis_openai_connection(
    webui: WebUIStack, browser: Browser
) -> None:
    """The real engine: llama.cpp on a tiny generated model, which answers as fast as it can with
    words not known in advance (about 490 of them, to the end of its context)."""
    assert webui.llama is not None
    context, traffic = _page(browser)
    page = context.new_page()
    try:
        relay_login(page, webui.url)
        webui_signed_in(page)
        choose_model(page, webui.llama.model)
        record_page_text(page)
        send_and_wait_done(page, traffic, "Tell me about the relay")

        # One socket.io message per engine token, over the relay's WebSocket.
        deltas = socketio_reply_deltas(traffic.ws_frames)
        reply = " ".join("".join(deltas).split())
        assert len(deltas) >= LLAMA_CONTEXT // 2, f"{len(deltas)} pieces: {deltas}"
        assert len(reply.split()) >= LLAMA_CONTEXT // 2, reply
        assert all(urlsplit(u).netloc == urlsplit(webui.url).netloc for u in traffic.websockets)

        # The page shows the whole reply, and showed it growing on the way.
        page.wait_for_function(
            "r => document.body.innerText.replace(/\\s+/g, ' ').includes(r)", arg=reply, timeout=30_000
        )
        shown = sorted({words_shown(text, reply) for _, text in page_text_snapshots(page)})
        total = len(reply.split())
        assert shown[-1] == total
        assert len([n for n in shown if 0 < n < total]) >= 3, f"the reply appeared at once: {shown}"
    finally:
        context.close()
    assert not traffic.foreign(webui.url)


def test_browser_without_the_relay_cookie_is_sent_to_the_login_page(
    webui: WebUIStack, browser: Browser
) -> None:
    context, traffic = _page(browser)
    page = context.new_page()
    socketio = webui.relay.ws_url + "/ws/socket.io/?EIO=4&transport=websocket"
    try:
        page.goto(webui.url + "/c/some-chat?x=1")
        page.wait_for_url("**/_relay/login**")
        assert "next=%2Fc%2Fsome-chat%3Fx%3D1" in page.url
        assert page.locator("input[name=key]").count() == 1
        # A wrong key keeps the browser on the login page, with no cookie.
        page.fill("input[name=key]", "bk_wrong_key")
        page.click("button[type=submit]")
        page.get_by_text("That key is not valid.").wait_for()
        assert not context.cookies(), "a cookie was set for a wrong key"

        # Open WebUI's socket.io is gated as well: from a page of the relay's origin (its health JSON:
        # the login page's CSP forbids scripts any connection), the upgrade is refused without the
        # cookie and accepted with it.
        page.goto(webui.url + "/_relay/health")
        assert _websocket_outcome(page, socketio).startswith("closed"), "socket.io opened without login"
        relay_login(page, webui.url)
        assert "bridge_session" in [c["name"] for c in context.cookies()]
        page.goto(webui.url + "/_relay/health")
        assert _websocket_outcome(page, socketio) == "open"
    finally:
        context.close()
    assert not traffic.foreign(webui.url)


def _websocket_outcome(page: Any, url: str) -> str:
    """Open a WebSocket from the page: ``open``, ``closed <code>``, or ``no answer`` after 20 s."""
    outcome: str = page.evaluate(
        """url => new Promise(done => {
             const ws = new WebSocket(url);
             ws.onopen = () => { done('open'); ws.close(); };
             ws.onclose = e => done('closed ' + e.code);
             setTimeout(() => done('no answer'), 20000);
           })""",
        url,
    )
    return outcome


def test_open_webui_api_through_the_relay_with_the_openai_client(webui: WebUIStack) -> None:
    """Programs reach Open WebUI's own API through the relay: the relay's key in X-Bridge-Key (which
    says who the user is), Open WebUI's token in Authorization (passed through untouched)."""
    relay = httpx.Client(base_url=webui.url, headers={"X-Bridge-Key": API_KEY}, timeout=60)
    # Signing in gives the key's own account, whatever the body says (even the admin's password).
    signin = relay.post(
        "/api/v1/auths/signin", json={"email": webui.admin_email, "password": webui.admin_password}
    )
    assert signin.status_code == 200, signin.text
    assert signin.json()["email"] == KEY_EMAIL and signin.json()["role"] == "user", signin.json()
    token = signin.json()["token"]
    client = openai.OpenAI(
        base_url=webui.url + "/api", api_key=token, default_headers={"X-Bridge-Key": API_KEY}, timeout=60
    )
    stream = client.chat.completions.create(
        model=webui.engine.model, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces).strip() == webui.engine.reply
    assert len([p for p in pieces if p]) > 3, pieces  # streamed in pieces, not one block
    # Open WebUI's auth is on: the relay's key alone (no Open WebUI token, no cookie) does not open
    # its API; its header only names who signs in.
    r = httpx.get(webui.url + "/api/models", headers={"X-Bridge-Key": API_KEY}, timeout=30)
    assert r.status_code == 401 and "error" not in r.json(), r.text
    # Without the relay's key the relay answers, not Open WebUI.
    r = httpx.get(webui.url + "/api/models", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 401 and "client key" in r.json()["error"]
    # The first account made the admin; signing up is closed after it.
    second = relay.post(
        "/api/v1/auths/signup",
        json={"name": "x", "email": "x@example.com", "password": "another-password-1"},
    )
    assert second.status_code == 403, second.text


def test_a_client_cannot_sign_in_as_someone_else(webui: WebUIStack) -> None:
    """The header Open WebUI believes comes from the relay only: a client that sends it itself (the
    admin's address, on the relay's own root or through another route) is still its key's user; an
    Open WebUI token of one account does not work with another key."""
    planted = {"X-Bridge-Key": API_KEY, "X-Bridge-User-Email": webui.admin_email, "X-Bridge-User-Name": "x"}
    r = httpx.post(
        webui.url + "/api/v1/auths/signin", json={"email": "a@b.c", "password": "x"}, headers=planted
    )
    assert r.status_code == 200, r.text
    assert r.json()["email"] == KEY_EMAIL and r.json()["role"] == "user", r.json()
    key_token = r.json()["token"]
    # The key's token with another key: Open WebUI sees another user in the header and refuses.
    second = httpx.get(
        webui.url + "/api/v1/auths/",
        headers={"X-Bridge-Key": webui.second_key, "Authorization": f"Bearer {key_token}"},
        timeout=30,
    )
    assert second.status_code == 401, second.text


def test_each_key_is_its_own_open_webui_account(webui: WebUIStack, browser: Browser) -> None:
    """A second key (``bridge keys add --label``) opens Open WebUI as a second account, named by the
    key's label, that sees none of the first key's chats."""
    first = httpx.Client(base_url=webui.url, headers={"X-Bridge-Key": API_KEY}, timeout=60)
    token = first.post("/api/v1/auths/signin", json={"email": "a@b.c", "password": "x"}).json()["token"]
    title = "first key's private chat " + secrets.token_hex(4)
    made = first.post(
        "/api/v1/chats/new",
        json={"chat": {"title": title, "messages": [], "history": {"messages": {}}}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert made.status_code == 200, made.text
    assert title in [
        c["title"] for c in first.get("/api/v1/chats/", headers={"Authorization": f"Bearer {token}"}).json()
    ]

    context, traffic = _page(browser)
    page = context.new_page()
    try:
        relay_login(page, webui.url, webui.second_key)
        account = webui_signed_in(page)
        key_id = webui.second_key.split("_")[1]
        assert account["email"] == f"{key_id}@relay.invalid", account
        assert account["name"] == SECOND_LABEL and account["role"] == "user", account
        chats = page.evaluate(
            """async () => (await fetch('/api/v1/chats/',
                 {headers: {Authorization: 'Bearer ' + localStorage.token}})).json()"""
        )
        assert title not in [c["title"] for c in chats], "the second key sees the first key's chat"
        assert title not in page.inner_text("body")
    finally:
        context.close()
    assert not traffic.foreign(webui.url)
