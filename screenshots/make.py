"""Write the README's screenshots: Open WebUI chatting through the relay, the relay's login page and its
status page, taken in Debian's chromium through the relay's URL only.

    .venv/bin/python screenshots/make.py            # writes screenshots/*.png (about 2 minutes)

Starts the same stack as ``tests/test_webui.py`` (``tests/webui.py``: the engines, Open WebUI with auth
on, relay and bridge on loopback; set-up: ``bash scripts/setup.d/10-chromium.sh``, ``20-open-webui.sh``
and ``35-gemma.sh``), stops it on exit. The browser logs in once, to the relay (Open WebUI opens
signed in: its trusted-header sign-in), and chats with the real model the deployment serves by
default: Gemma 3 270M (Gemma Terms of Use: https://ai.google.dev/gemma/terms) on the llama.cpp engine,
through Open WebUI's OpenAI connection. Its answer is whatever the model says, not a canned sentence.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.webui import (  # noqa: E402
    Traffic,
    WebUIStack,
    choose_model,
    launch_chromium,
    open_sidebar,
    relay_login,
    send_and_wait_done,
    socketio_reply_deltas,
    watch,
    webui_signed_in,
    webui_stack,
)

VIEWPORT = {"width": 1280, "height": 800}
#: Largest PNG the README should carry.
MAX_BYTES = 300_000
PROMPT = "What is the capital of France?"


def shoot(page: Any, path: Path, clip: dict[str, float] | None = None) -> None:
    page.evaluate("document.fonts.ready.then(() => true)")
    page.screenshot(path=str(path), animations="disabled", caret="hide", clip=clip)
    size = path.stat().st_size
    print(f"wrote {path} ({size // 1024} KB)")
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, over {MAX_BYTES}")


def make(stack: WebUIStack, out: Path, browser: Any) -> None:
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.set_default_timeout(60_000)
    traffic = Traffic()
    watch(context, traffic)
    page = context.new_page()

    # 1. The relay's login page: where a browser without the relay's cookie lands.
    page.goto(stack.url + "/")
    page.wait_for_url("**/_relay/login**")
    page.wait_for_load_state("networkidle")
    shoot(page, out / "relay-login.png")

    # 2. Open WebUI at the relay's root, signed in by the relay's login: the model, a streamed reply.
    relay_login(page, stack.url)
    webui_signed_in(page)
    assert stack.llama is not None
    choose_model(page, stack.llama.model)
    send_and_wait_done(page, traffic, PROMPT, timeout_ms=180_000)
    deltas = socketio_reply_deltas(traffic.ws_frames)
    reply = "".join(deltas).strip()
    print(f"{stack.llama.model} answered, in {len([d for d in deltas if d])} streamed pieces: {reply!r}")
    if len(reply.split()) < 2 or len([d for d in deltas if d]) < 3:
        raise SystemExit(f"the model's answer did not stream in words: {deltas}")
    # The message's action buttons appear when the reply is complete: a steady picture after them.
    page.locator("button[aria-label='Copy']").last.wait_for(state="visible", timeout=30_000)
    # Toasts ("You're now logged in.") closed, the sidebar with the chat history open.
    page.locator("[data-sonner-toast]").first.wait_for(state="detached", timeout=30_000)  # goes by itself
    open_sidebar(page)
    page.locator("a[href^='/c/']").first.wait_for(state="visible")
    page.get_by_text("Loading...").wait_for(state="hidden", timeout=30_000)  # the history's spinner
    page.mouse.move(VIEWPORT["width"] - 1, VIEWPORT["height"] / 2)
    shoot(page, out / "open-webui-chat.png")

    # 3. The relay's status page, opened beside the chat (whose socket.io WebSocket stays open).
    status = context.new_page()
    status.goto(stack.url + "/_relay/")
    status.wait_for_selector("table")
    card = status.locator(".card").bounding_box()
    assert card is not None
    bottom = min(VIEWPORT["height"], card["y"] + card["height"] + card["y"])  # the margin above, below
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": bottom}
    shoot(status, out / "relay-status.png", clip)

    context.close()
    foreign = traffic.foreign(stack.url)
    if foreign:
        raise SystemExit(f"requests that went around the relay: {foreign}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the PNGs (default: %(default)s)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="webui-screenshots-") as tmp,
        webui_stack(Path(tmp), token_delay=0.1, gemma=True) as stack,
        sync_playwright() as pw,
    ):
        browser = launch_chromium(pw)
        try:
            make(stack, args.out, browser)
        finally:
            browser.close()
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
