"""Open WebUI from PyPI, pinned, in its own virtual environment (its dependencies conflict with
ours), reused when the pinned version is already there (scripts/setup.d/20-open-webui.sh makes the
same one at ``.venv-webui``).

The venv is made without ``ensurepip``. Kaggle's image is Colab's runtime image, whose system
Python has no ``ensurepip`` (microsoft/bioemu PR #120, Wytamma/snk #100), so ``python -m venv``
fails there. The image has ``uv``: Kaggle/docker-python's Dockerfile.tmpl installs everything with
``uv pip install --system``, and PR #1485 (2025-05) dropped its own uv install because "uv is
installed in the Colab base image". An older Dockerfile put it in ``~/.local/bin`` with
``ENV PATH="~/.local/bin:${PATH}"``, a literal ``~`` that ``execvp`` never expands, so a program may
not find it on PATH while a shell does: :func:`find_uv` also looks in the usual places itself.
Without uv, ``pip`` (which the image has) installs uv from PyPI into the cache; only without both
does the plain ``python -m venv`` (ensurepip) remain. ``uv venv --seed`` puts pip into the venv
(Open WebUI pip-installs the requirements of user tools at run time).

Open WebUI 0.12.4 needs Python >= 3.11, < 3.13: on another Python, ``uv venv --python 3.12`` finds
or downloads one.

torch is pinned to the CPU wheel: Open WebUI needs torch only for local embeddings, which we turn
off (``RAG_EMBEDDING_ENGINE``), and without the pin the resolver picks the CUDA build (several GB).

Settings: ``ENABLE_PERSISTENT_CONFIG=False``. Open WebUI 0.12.4 writes its settings to its database on
the first start and afterwards the database wins over the environment (``open_webui/config.py``:
``Config.configure(enable_persistent=...)``; ``models/config.py``: with persistence on, ``Config.get``
reads the stored row before the default taken from the environment). The deployment sets the engine's
URL through the environment, and that URL changes between starts (the bridge's local endpoint gets a
free port each run, and a state dir may switch between Ollama and the embedded engine): with
persistence on, any second start would point Open WebUI at a dead URL, listing no models. With it
off, every start reads the environment; what an admin changes in Open WebUI's settings page lasts
until Open WebUI restarts. (Users, chats and models' settings live in their own tables and are kept.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from deployment.children import Children, run_recorded, tail

OPEN_WEBUI_VERSION = "0.12.4"
TORCH_PIN = "torch==2.13.0+cpu"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: Open WebUI 0.12.4's ``requires-python``.
PYTHONS = ((3, 11), (3, 13))

Say = Callable[[str], None]


class WebUIUnavailable(RuntimeError):
    """Open WebUI could not be installed; the message says why (the API keeps serving)."""


def installed_version(venv: Path) -> str:
    py = venv / "bin" / "python"
    if not (venv / "bin" / "open-webui").exists() or not py.exists():
        return ""
    try:
        out = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('open-webui'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def uv_candidates(cache: Path | None = None) -> list[Path]:
    """Where uv may be, in order: PATH, then the places a literal ``~`` in PATH hides it, then a
    copy an earlier run installed into ``cache``."""
    found = shutil.which("uv")
    places = [Path(found)] if found else []
    places += [Path.home() / ".local" / "bin" / "uv", Path("/root/.local/bin/uv"), Path("/usr/local/bin/uv")]
    if cache is not None:
        places.append(cache / "tools" / "uv" / "bin" / "uv")
    return places


def find_uv(cache: Path | None = None) -> Path | None:
    for place in uv_candidates(cache):
        if place.is_file() and os.access(place, os.X_OK):
            return place
    return None


def has_module(python: str, module: str) -> bool:
    try:
        r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def venv_python() -> str:
    """This Python when Open WebUI supports it, else the version uv should find or fetch."""
    low, high = PYTHONS
    return sys.executable if low <= sys.version_info[:2] < high else "3.12"


class Installer:
    """Makes venvs and installs into them without ensurepip (see the module's docstring)."""

    def __init__(
        self,
        cache: Path,
        log: Path,
        say: Say,
        *,
        children: Children | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.cache = cache
        self.log = log
        self.say = say
        self.children = children
        self.cancel = cancel

    def _run(self, name: str, argv: list[str], timeout: float = 1800) -> None:
        code = run_recorded(
            name, argv, log=self.log, children=self.children, cancel=self.cancel, timeout=timeout
        )
        if code != 0:
            raise WebUIUnavailable(f"{name} failed (exit {code}):\n{tail(self.log)}")

    def uv(self) -> Path | None:
        """uv: found, else installed from PyPI with this Python's pip, else None."""
        found = find_uv(self.cache)
        if found is not None:
            return found
        if not has_module(sys.executable, "pip"):
            return None
        target = self.cache / "tools" / "uv"
        self.say(f"uv: not found; installing it from PyPI into {target}")
        self._run(
            "pip install uv", [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "uv"]
        )
        return find_uv(self.cache)

    def make_venv(self, venv: Path) -> str:
        """Create ``venv``; returns how (for the log)."""
        uv = self.uv()
        if uv is not None:
            self._run("uv venv", [str(uv), "venv", "--seed", "-q", "--python", venv_python(), str(venv)])
            return f"uv venv ({uv})"
        if not has_module(sys.executable, "ensurepip"):
            raise WebUIUnavailable(
                "no uv (looked on PATH and in "
                + ", ".join(str(p) for p in uv_candidates(self.cache)[1:])
                + "), no pip to install it, and this Python has no ensurepip for python -m venv"
            )
        self._run("python -m venv", [sys.executable, "-m", "venv", str(venv)])
        return "python -m venv"

    def install(self, venv: Path, requirements: Sequence[str], constraints: Sequence[str] = ()) -> None:
        """``uv pip install`` (or the venv's pip) of ``requirements`` into ``venv``."""
        cfile = self.cache / "webui-constraints.txt"
        cfile.parent.mkdir(parents=True, exist_ok=True)
        cfile.write_text("".join(c + "\n" for c in constraints))
        py = str(venv / "bin" / "python")
        uv = find_uv(self.cache)
        if uv is not None:
            argv = [str(uv), "pip", "install", "-q", "--python", py]
            # uv looks at the first index that has a package unless told to compare them all
            argv += ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]
        else:
            argv = [py, "-m", "pip", "install", "-q", "--extra-index-url", TORCH_CPU_INDEX]
        self._run("install " + " ".join(requirements), [*argv, "-c", str(cfile), *requirements])


def ensure(
    venv: Path,
    say: Say,
    *,
    version: str = OPEN_WEBUI_VERSION,
    install: bool = True,
    installer: Installer | None = None,
) -> Path | None:
    """The ``open-webui`` executable in ``venv``; installed there when missing and ``install``
    (raises :class:`WebUIUnavailable` with the reason when that fails)."""
    have = installed_version(venv)
    exe = venv / "bin" / "open-webui"
    if have == version:
        say(f"open-webui {version}: reusing {venv}")
        return exe
    if not install:
        return None
    if installer is None:
        raise WebUIUnavailable(f"open-webui {version} is not in {venv} and nothing may install it")
    say(f"open-webui {version}: installing into {venv} (a few minutes, about 3 GB)")
    if not (venv / "bin" / "python").exists():
        how = installer.make_venv(venv)
        say(f"open-webui: venv made with {how}")
    installer.install(venv, [f"open-webui=={version}"], [TORCH_PIN])
    if installed_version(venv) != version:
        raise WebUIUnavailable(f"open-webui {version} did not install into {venv}")
    return exe


def environment(
    *,
    data_dir: Path,
    secret_key: str,
    ollama_url: str = "",
    openai_url: str = "",
    admin_email: str = "",
    admin_password: str = "",
    trusted_email_header: str = "",
    trusted_name_header: str = "",
) -> dict[str, str]:
    """Open WebUI's settings: one connection (Ollama's API or an OpenAI-compatible one, both through
    the bridge's local endpoint), no network at start, no extra model calls per chat message.

    With ``trusted_email_header`` (the relay's ``X-Bridge-User-Email``), Open WebUI signs a browser
    in as the account that header names, making it on its first visit (Open WebUI 0.12.4,
    ``routers/auths.py`` ``signin``: its own password sign-in is then off, its auth stays on): the
    one login (the relay's). New accounts get the role ``user`` (``DEFAULT_USER_ROLE``; Open WebUI's
    default ``pending`` would wait for an admin's approval) and see the deployment's models
    (``BYPASS_MODEL_ACCESS_CONTROL``: else a ``user`` sees no model an admin has not granted); each
    sees only its own chats. The first account, made at start from ``admin_email``, is the admin."""
    env = {
        "DATA_DIR": str(data_dir),
        "ENABLE_PERSISTENT_CONFIG": "False",  # the environment wins at every start: see above
        "WEBUI_SECRET_KEY": secret_key,
        "WEBUI_AUTH": "True",
        "ENABLE_SIGNUP": "False",
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
        "ENABLE_TITLE_GENERATION": "false",
        "ENABLE_TAGS_GENERATION": "false",
        "ENABLE_FOLLOW_UP_GENERATION": "false",
        "ENABLE_AUTOCOMPLETE_GENERATION": "false",
        "ANONYMIZED_TELEMETRY": "false",
        "DO_NOT_TRACK": "true",
        "SCARF_NO_ANALYTICS": "true",
        "ENABLE_OLLAMA_API": "true" if ollama_url else "false",
        "ENABLE_OPENAI_API": "true" if openai_url else "false",
    }
    if ollama_url:
        env["OLLAMA_BASE_URL"] = ollama_url
        env["RAG_EMBEDDING_ENGINE"] = "ollama"
    if openai_url:
        env["OPENAI_API_BASE_URL"] = openai_url
        env["OPENAI_API_BASE_URLS"] = openai_url
        env["OPENAI_API_KEY"] = "none"
        env["OPENAI_API_KEYS"] = "none"
        env["RAG_EMBEDDING_ENGINE"] = "openai"
    if trusted_email_header:
        env["WEBUI_AUTH_TRUSTED_EMAIL_HEADER"] = trusted_email_header
        env["DEFAULT_USER_ROLE"] = "user"
        env["BYPASS_MODEL_ACCESS_CONTROL"] = "true"
        if trusted_name_header:
            env["WEBUI_AUTH_TRUSTED_NAME_HEADER"] = trusted_name_header
    if admin_email and admin_password:
        env["WEBUI_ADMIN_EMAIL"] = admin_email
        env["WEBUI_ADMIN_PASSWORD"] = admin_password
        env["WEBUI_ADMIN_NAME"] = "admin"
    return env
