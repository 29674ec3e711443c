"""Open WebUI in the stack: whether it runs, its venv, its install, and its child.

Its install (``webui_setup``: minutes on a fresh Kaggle session) runs while the engine comes up;
the API never waits for it, and a failed install leaves the API up with the reason in the status
line (``Open WebUI FAILED: <why>``). It talks to the engine through the bridge's local endpoint
(``/r/ollama`` with Ollama, ``/r/engine/v1`` with the embedded engine), so every chat is metered
and balanced in one place; its secret key and admin password are kept in ``<state>``.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from deployment import webui_setup
from deployment.children import Cancelled, child_env
from deployment.session import read_or_make
from deployment.settings import ROOT
from deployment.stack import OLLAMA_ROUTE, Stack, first_line
from deployment.supervisor import ChildSpec, Supervisor


def wanted(st: Stack) -> bool:
    """Whether Open WebUI should run: ``--webui on``, with Ollama, or where it is installed."""
    if st.s.webui == "off":
        return False
    if st.s.webui == "on" or st.facts.mode == "ollama":
        return True
    return webui_setup.installed_version(venv(st)) != ""


def venv(st: Stack) -> Path:
    """``--webui-venv``, else the checkout's ``.venv-webui``, else ``<cache>/venv-webui``."""
    if st.s.webui_venv:
        return Path(st.s.webui_venv)
    repo = ROOT / ".venv-webui"
    return repo if repo.exists() else st.s.cache_dir / "venv-webui"


async def executable_or_none(st: Stack, mode: str) -> Path | None:
    """Open WebUI's executable, or None with the reason in ``facts.webui_error``."""
    try:
        return await asyncio.to_thread(executable, st, mode)
    except (Cancelled, asyncio.CancelledError):
        raise
    except Exception as exc:
        st.facts.webui_error = first_line(str(exc))
        st.say(
            f"Open WebUI FAILED to install: {exc}\n  the API keeps serving without it; "
            f"log: {st.logs / 'webui-install.log'}"
        )
        return None


def executable(st: Stack, mode: str) -> Path | None:
    """Open WebUI's executable: installed (with Ollama or ``--webui on``) or found; None without."""
    if st.s.webui == "off":
        return None
    install = st.s.webui == "on" or mode == "ollama"
    installer = webui_setup.Installer(
        st.s.cache_dir,
        st.logs / "webui-install.log",
        st.say,
        children=st.children,
        cancel=st.cancel,
    )
    exe = webui_setup.ensure(
        venv(st), st.say, version=st.s.webui_version, install=install, installer=installer
    )
    if exe is None:
        st.say(
            f"open-webui: not installed in {venv(st)} (bash scripts/setup.d/20-open-webui.sh "
            "or --webui on): running without it"
        )
    return exe


async def start(st: Stack, sup: Supervisor, exe: Path, port: int, route: str, local: str) -> None:
    """Open WebUI on ``port``, pointed at the bridge's local endpoint ``local``, route ``route``."""
    s = st.s
    data = s.state_dir / "webui"
    data.mkdir(parents=True, exist_ok=True)
    secret_key = read_or_make(s.state_dir / "webui-secret-key", lambda: secrets.token_urlsafe(48))
    password = s.webui_admin_password
    where = "your DEPLOY_WEBUI_ADMIN_PASSWORD"
    if not password:
        pw_file = s.state_dir / "webui-admin-password"
        password = read_or_make(pw_file, lambda: secrets.token_urlsafe(18))
        where = f"the file {pw_file}"
    st.redact.add(secret_key, password)
    base = f"{local}/r/{route}"
    admin = admin_email(st)
    from bridge.httprules import USER_EMAIL_HEADER, USER_NAME_HEADER  # installed by now

    env = child_env(
        **webui_setup.environment(
            data_dir=data,
            secret_key=secret_key,
            ollama_url=base if route == OLLAMA_ROUTE else "",
            openai_url=base + "/v1" if route != OLLAMA_ROUTE else "",
            admin_email=admin,
            admin_password=password,
            trusted_email_header=USER_EMAIL_HEADER,
            trusted_name_header=USER_NAME_HEADER,
        )
    )
    url = f"http://127.0.0.1:{port}"
    await sup.add(
        ChildSpec(
            "webui",
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env,
            st.logs / "webui.log",
            health_url=url + "/health",
            ready_timeout=s.ready_timeout,
            cwd=data,
        )
    )
    st.facts.webui = True
    st.say(
        f"open-webui: {url} -> {base} (signed in by the relay's login; admin {admin}, "
        f"made with the password in {where})"
    )


def admin_email(st: Stack) -> str:
    """Open WebUI's admin: ``--webui-admin-email``; else, with a local relay, the account of the key
    the deployment shows (so the operator's browser is the admin); else ``admin@localhost`` (on a
    relay elsewhere the deployment cannot know a key's id: set ``DEPLOY_WEBUI_ADMIN_EMAIL`` to
    ``<key id>@relay.invalid`` to make a key's account the admin)."""
    if st.s.webui_admin_email:
        return st.s.webui_admin_email
    from bridge.httprules import user_email  # installed by now (as in deployment/relay.py)
    from bridge.relay.auth import static_key_id

    if st.key:
        return user_email(static_key_id(st.key))
    return "admin@localhost"
