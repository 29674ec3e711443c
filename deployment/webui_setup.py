"""Open WebUI from PyPI, pinned, in its own virtual environment (its dependencies conflict with
ours), reused when the pinned version is already there (scripts/setup.d/20-open-webui.sh makes the
same one at ``.venv-webui``).

torch is pinned to the CPU wheel: Open WebUI needs torch only for local embeddings, which we turn
off (``RAG_EMBEDDING_ENGINE``), and without the pin pip resolves the CUDA build (several GB).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

OPEN_WEBUI_VERSION = "0.12.4"
TORCH_PIN = "torch==2.13.0+cpu"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

Say = Callable[[str], None]


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


def ensure(venv: Path, say: Say, *, version: str = OPEN_WEBUI_VERSION, install: bool = True) -> Path | None:
    """The ``open-webui`` executable in ``venv``; installed there when missing and ``install``."""
    have = installed_version(venv)
    exe = venv / "bin" / "open-webui"
    if have == version:
        say(f"open-webui {version}: reusing {venv}")
        return exe
    if not install:
        return None
    say(f"open-webui {version}: installing into {venv} (a few minutes, about 3 GB)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(TORCH_PIN + "\n")
        constraints = f.name
    subprocess.run(
        [
            str(venv / "bin" / "pip"),
            "install",
            "-q",
            "--extra-index-url",
            TORCH_CPU_INDEX,
            "-c",
            constraints,
            f"open-webui=={version}",
        ],
        check=True,
    )
    Path(constraints).unlink(missing_ok=True)
    if installed_version(venv) != version:
        raise RuntimeError(f"open-webui {version} did not install into {venv}")
    return exe


def environment(
    *,
    data_dir: Path,
    secret_key: str,
    ollama_url: str = "",
    openai_url: str = "",
    admin_email: str = "",
    admin_password: str = "",
) -> dict[str, str]:
    """Open WebUI's settings: one connection (Ollama's API or an OpenAI-compatible one, both through
    the bridge's local endpoint), no network at start, no extra model calls per chat message."""
    env = {
        "DATA_DIR": str(data_dir),
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
    if admin_email and admin_password:
        env["WEBUI_ADMIN_EMAIL"] = admin_email
        env["WEBUI_ADMIN_PASSWORD"] = admin_password
        env["WEBUI_ADMIN_NAME"] = "admin"
    return env
