"""The Kaggle notebook as it really runs (issue 14).

The shipped notebook, unchanged, in a Kaggle-like machine (tests/kaggle_harness.py: a container
whose first process starts the session, Kaggle's folders, a batch run through nbclient, a Python
without ensurepip, uv only at ~/.local/bin or nowhere, no zstd, Kaggle Secrets over HTTP, the clone
redirected to this checkout, Ollama's release with its checksums from a local mirror, stand-in
Ollama, nvidia-smi and kaggle CLI):

- a batch run serves through the relay without a gap from READY to the drain, ends after the drain
  with nothing left running, saves no secret in the notebook or the saved output; a second run in
  the same tree reuses the caches and Open WebUI lists the model again (its settings follow the new
  endpoint); the deadline counts from the container's start in both;
- an interrupted bring-up stops everything; a kernel killed during the bring-up leaves children the
  next run stops before it starts; a failed Open WebUI install leaves the API up and the status line
  says why; Interrupt after READY drains, then stops;
- Open WebUI's venv is made without ensurepip, with uv from ~/.local/bin or with uv that pip
  installs.

Beside it, in-process: the handover to the next session (kaggle CLI push with T4 x2, the old
session draining only once the new bridge is on the relay, else serving to the end), the model on
the CPU said with its reason, the doctor, the record of children, the session's start.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest

from deployment.children import AlreadyRunning, Children, Record, same_process
from deployment.kaggle_ollama_webui import Deployment, parse_settings
from deployment.session import Deadline, KagglePaths, process_start, session_start

from . import procs
from .kaggle_harness import Machine, unshare_problem
from .procs import ROOT, until

STANDIN = ROOT / "tests" / "standin"
ADMIN_PASSWORD = "kaggle-test-admin-pw-" + "Qx7Lm2Vb9sR4"
KAGGLE_KEY = "kaggle-test-api-key-" + "0c9d8e7f6a5b"


def _container() -> None:
    why = unshare_problem()
    if why:
        # Fails, never skips: the notebook run is the deployment README.md promises (tests/conftest.py).
        pytest.fail(f"the Kaggle-like container needs PID and mount namespaces (root): {why}")


def _require_webui() -> Path:
    from deployment import webui_setup

    venv = ROOT / ".venv-webui"
    if webui_setup.installed_version(venv) != webui_setup.OPEN_WEBUI_VERSION:
        pytest.fail(f"Open WebUI is missing in {venv} (bash scripts/setup.d/20-open-webui.sh)")
    return venv


def _texts_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _cell_outputs(notebook: str) -> tuple[str, list[dict[str, Any]]]:
    nb = nbformat.read(notebook, as_version=4)  # type: ignore[no-untyped-call]
    serving = [c for c in nb.cells if c.cell_type == "code"][-1]
    streams = "".join(o.get("text", "") for o in serving.outputs if o.output_type == "stream")
    displays = [o for o in serving.outputs if o.output_type == "display_data"]
    return streams, displays


class _Prober:
    """Through the relay, as a client would, every 0.2 s while the container runs: Ollama's
    /api/tags (with the client key); and once per READY, Open WebUI's model list (signed in as its
    admin through the relay)."""

    def __init__(self, relay: procs.Relay, machine: Machine) -> None:
        self.relay = relay
        self.machine = machine
        self.probes: list[tuple[float, float, bool]] = []
        self.webui: dict[float, Any] = {}  # ready_at -> the models Open WebUI lists
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = httpx.Client(base_url=self.relay.url, timeout=10)
        key = {"Authorization": f"Bearer {procs.API_KEY}"}
        while self.machine.proc is not None and self.machine.proc.poll() is None:
            started = time.time()
            try:
                r = client.get("/r/ollama/api/tags", headers=key)
                ok = r.status_code == 200 and "qwen3:8b" in r.text
            except httpx.HTTPError:
                ok = False
            self.probes.append((started, time.time(), ok))
            status = self.machine.status()
            ready_at = status.get("ready_at") or 0.0
            if status.get("state") == "ready" and ready_at and ready_at not in self.webui:
                self.webui[ready_at] = self._webui_models(client)
            time.sleep(0.2)  # pacing between probes, not a wait for anything

    def _webui_models(self, client: httpx.Client) -> Any:
        try:
            headers = {"X-Bridge-Key": procs.API_KEY}
            r = client.post(
                "/api/v1/auths/signin",
                json={"email": "admin@localhost", "password": ADMIN_PASSWORD},
                headers=headers,
                timeout=60,
            )
            token = r.json()["token"]
            models = client.get(
                "/api/models", headers={**headers, "Authorization": f"Bearer {token}"}, timeout=60
            )
            return [m["id"] for m in models.json()["data"]]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            return f"failed: {exc!r}"

    def join(self) -> None:
        self._thread.join(30)


@pytest.mark.webui
@pytest.mark.timeout(480)
def test_the_notebook_in_a_kaggle_batch_run_twice(tmp_path: Path, make_relay: Any) -> None:
    _container()
    venv = _require_webui()
    relay = make_relay()
    secrets = {
        "BRIDGE_RELAY": relay.ws_url,
        "BRIDGE_NODE_TOKEN": procs.NODE_TOKEN,
        "BRIDGE_KEY": procs.API_KEY,
        "DEPLOY_WEBUI_ADMIN_PASSWORD": ADMIN_PASSWORD,
    }
    machine = Machine(
        tmp_path,
        uv="home",
        secrets=secrets,
        # serve 15 s after READY (instead of 12 h), the drain at that end; Open WebUI from the
        # checkout's venv (installing it takes minutes: tests/test_kaggle.py's venv test covers how)
        env={"DEPLOY_SERVE_MINUTES": "0.25", "DEPLOY_DRAIN_MINUTES": "0", "DEPLOY_WEBUI_VENV": str(venv)},
    )
    try:
        machine.run([{"kind": "batch"}, {"kind": "batch"}])
        prober = _Prober(relay, machine)
        results = machine.wait(420)
        prober.join()
    finally:
        machine.close()
    print("\n".join(machine.output[-6:]))
    assert results["ensurepip"] is False and results["zstd"] is None  # Colab's Python, no zstd
    runs = results["runs"]
    assert len(runs) == 2
    pid1 = results["pid1_start"]
    for i, run in enumerate(runs):
        status = run["status"]
        streams, displays = _cell_outputs(run["notebook"])
        assert not run["error"], run["error"]
        # served from READY to the drain, through the relay, without a single failed request
        assert status["state"] == "stopped" and status["stop_reason"] == "--serve-minutes", status
        window = [
            ok for t0, t1, ok in prober.probes if t0 >= status["ready_at"] and t1 <= status["draining_at"]
        ]
        assert len(window) >= 5 and all(window), (i, window)
        # the run ended after the drain with nothing left running in the container
        assert run["leftovers"] == [], run["leftovers"]
        assert streams.index("--serve-minutes: draining the bridge") < streams.index(
            "stopped (--serve-minutes)"
        )
        # the session's deadline counts from the container's start (its PID 1), not the kernel's
        assert abs(status["session_start"] - pid1) < 0.05, (status["session_start"], pid1)
        assert status["session_start_from"] == "the container's start (pid 1)"
        assert status["session_end"] == pytest.approx(pid1 + 12 * 3600, abs=0.05)
        # one live status line, updated in place: its last text is how the run ended
        live = [d for d in displays if "|" in d["data"].get("text/plain", "")]
        assert len(live) == 1, displays
        line = live[0]["data"]["text/plain"]
        assert line.startswith(
            "stopped (--serve-minutes) | open <your relay (BRIDGE_RELAY)>/ | key your BRIDGE_KEY"
        )
        assert "| GPU (CUDA (cuda_v12, compute 7.5" in line and "| Open WebUI on |" in line, line
        after_ready = streams[streams.index("READY in") :].splitlines()
        assert len(after_ready) < 20, after_ready  # events only, no periodic flood
        # Open WebUI lists the model, in the second run too (its settings follow the new endpoint)
        assert prober.webui.get(status["ready_at"]) == ["qwen3:8b"], (i, prober.webui)
    # the second run reused the caches: no download, no pull
    archive = [p for p in machine.release.requests if p.endswith(".tar.zst")]
    assert len(archive) == 1 and sum(p.endswith("sha256sum.txt") for p in machine.release.requests) == 1
    first, _ = _cell_outputs(runs[0]["notebook"])
    second, _ = _cell_outputs(runs[1]["notebook"])
    assert "matches sha256sum.txt" in first and "pulling qwen3:8b" in first
    assert "ollama 0.20.0: reusing" in second and "qwen3:8b: already pulled" in second
    assert runs[1]["status"]["session_start"] == runs[0]["status"]["session_start"]
    # secrets: asked from Kaggle Secrets over HTTP, never in the notebook nor the saved output
    assert {"BRIDGE_RELAY", "BRIDGE_NODE_TOKEN", "BRIDGE_KEY"} <= set(machine.secrets.asked)
    state = KagglePaths(machine.root).state
    never = [*secrets.values(), f"127.0.0.1:{relay.port}", machine.secrets.token]
    never.append((state / "webui-secret-key").read_text().strip())
    saved = {f"run{i}.ipynb": Path(r["notebook"]).read_bytes() for i, r in enumerate(runs)}
    saved.update(_texts_under(machine.root / "working"))
    for name, data in saved.items():
        for secret in never:
            assert secret.encode() not in data, f"{name} holds a secret"
    kept = set(_texts_under(machine.root / "working"))
    assert kept == {"kaggle-bridge/gpu_hours.json", "kaggle-bridge/last-run.txt"}, kept
    assert (state / "webui" / "webui.db").exists() and (state / "logs" / "bridge.log").exists()


@pytest.mark.timeout(360)
def test_interrupt_and_a_killed_kernel_during_the_bring_up(tmp_path: Path) -> None:
    """Three runs in one container, no uv and no way to get it (pip has no index), no external relay:
    an Interrupt during the model's pull stops everything; a kernel killed during the pull leaves
    its recorded children running, and the next run stops them before it starts; that run comes up
    although Open WebUI cannot be installed (the API answers, the status line says why), and an
    Interrupt after READY drains, then stops."""
    _container()
    machine = Machine(
        tmp_path,
        uv="none",
        secrets={"DEPLOY_WEBUI_ADMIN_PASSWORD": ADMIN_PASSWORD},
        env={
            "STANDIN_PULL_DELAY": "1",
            "PIP_NO_INDEX": "1",
            "PIP_CONFIG_FILE": "/dev/null",
            "PIP_FIND_LINKS": str(tmp_path),
        },
    )
    pulling = "pulling qwen3:8b"
    try:
        machine.run(
            [
                {"kind": "control", "at": pulling, "action": "interrupt"},
                {"kind": "control", "at": pulling, "action": "kill"},
                {
                    "kind": "control",
                    "at": "READY in",
                    "action": "interrupt",
                    "probe": "/r/ollama/api/tags",
                    "env": {"STANDIN_PULL_DELAY": "0.01"},
                },
            ]
        )
        results = machine.wait(300)
    finally:
        machine.close()
    interrupted, killed, full = results["runs"]
    # 1. Interrupt during the pull: the bring-up stops, the cell ends, nothing is left
    assert interrupted["acted"] and interrupted["idle_after_action"] is not None
    assert "stopping during the bring-up: interrupted" in interrupted["text"], interrupted["text"]
    assert interrupted["leftovers"] == [] and interrupted["status"]["state"] == "stopped"
    assert interrupted["display"].startswith("stopped (interrupted)"), interrupted["display"]
    # 2. the kernel killed during the pull: its children were recorded as they started, and live on
    assert not killed.get("kill_timeout"), "the kernel outlived its SIGKILL"
    recorded = {c["name"]: c["pid"] for c in killed["children_at_kill"]}
    assert {"relay", "ollama-pull"} <= set(recorded), recorded
    servers = [pid for name, pid in recorded.items() if not name.startswith("pip ")]  # an installer
    assert set(servers) <= set(killed["alive_after_kill"]), recorded  # may end by itself meanwhile
    assert {x["pid"] for x in killed["leftovers"]} >= set(servers)
    # 3. the next run stops them first, then comes up; Open WebUI's install fails, the API does not
    for name in ("relay", "ollama-pull"):  # servers; an installer may have ended by itself meanwhile
        pid = recorded[name]
        assert f"stopped {name} (pid {pid}), left running by a previous run that died" in full["text"]
    assert "Open WebUI FAILED to install: pip install uv failed" in full["text"], full["text"]
    assert full["probe"]["status"] == 200 and "qwen3:8b" in full["probe"]["body"], full["probe"]
    assert "| Open WebUI FAILED: pip install uv failed" in full["display"], full["display"]
    assert full["display"].startswith("stopped (interrupted) | open http://127.0.0.1:")
    assert full["text"].index("stopping: draining the bridge") < full["text"].index("stopped (interrupted)")
    assert full["leftovers"] == [] and full["status"]["state"] == "stopped"
    assert results["ensurepip"] is False


#: In the container: Open WebUI's venv made as the deployment makes it, then checked; and what a
#: plain `python -m venv` does there. argv: cache, log, venv.
_MAKE_VENV = """
import subprocess, sys
from pathlib import Path
from deployment import webui_setup
cache, log, venv = map(Path, sys.argv[1:4])
print("made with", webui_setup.Installer(cache, log, print).make_venv(venv))
r = subprocess.run([venv / "bin" / "python", "-m", "pip", "--version"], capture_output=True, text=True)
print("pip in the venv:", r.stdout.strip(), r.returncode)
r = subprocess.run([sys.executable, "-m", "venv", str(venv) + "-plain"], capture_output=True, text=True)
print("python -m venv exit", r.returncode)
"""


@pytest.mark.parametrize("uv", ["home", "path", "none"])
@pytest.mark.timeout(240)
def test_open_webui_venv_without_ensurepip(tmp_path: Path, uv: str) -> None:
    """Colab's Python has no ensurepip, so `python -m venv` fails there; Open WebUI's venv is made
    with uv: at ~/.local/bin (not on PATH, as in Kaggle's image), on PATH, else installed with pip.
    The venv works and has pip (Open WebUI installs tools' requirements with it)."""
    _container()
    machine = Machine(tmp_path, uv=uv, secrets={})
    venv, cache = tmp_path / "venv", tmp_path / "cache"
    argv = [sys.executable, "-c", _MAKE_VENV, str(cache), str(tmp_path / "install.log"), str(venv)]
    try:
        machine.run([{"kind": "exec", "argv": argv}])
        results = machine.wait(200)
    finally:
        machine.close()
    run = results["runs"][0]
    assert results["ensurepip"] is False
    assert run["code"] == 0, run["text"]
    assert "python -m venv exit 1" in run["text"]  # what Kaggle's Python does
    where = {
        "home": machine.home / ".local" / "bin" / "uv",
        "path": machine.bin / "uv",
        "none": cache / "tools" / "uv" / "bin" / "uv",
    }[uv]
    assert f"made with uv venv ({where})" in run["text"], run["text"]
    assert re.search(r"pip in the venv: pip [\d.]+ from .* 0$", run["text"], re.M), run["text"]
    assert ("installing it from PyPI" in run["text"]) is (uv == "none")


# ------------------------------------------------------------------------------------ in-process
@pytest.fixture
def kaggle_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Two stand-in T4s, stand-in ollama and kaggle CLI on PATH, Kaggle Secrets over HTTP (the
    stand-in kaggle_secrets module asking a SecretsServer); os.environ restored afterwards."""
    from .kaggle_harness import SecretsServer

    saved = dict(os.environ)
    server = SecretsServer({"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": KAGGLE_KEY})
    monkeypatch.setenv("PATH", f"{STANDIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_GPUS", "15360,15360")
    monkeypatch.setenv("STANDIN_TOKEN_DELAY", "0.01")
    monkeypatch.setenv("STANDIN_KAGGLE_LOG", str(tmp_path / "kaggle-cli.jsonl"))
    monkeypatch.setenv("KAGGLE_URL_BASE", server.url)
    monkeypatch.setenv("KAGGLE_USER_SECRETS_TOKEN", server.token)
    monkeypatch.syspath_prepend(str(STANDIN / "python"))
    sys.modules.pop("kaggle_secrets", None)
    try:
        yield {"secrets": server, "log": tmp_path / "kaggle-cli.jsonl"}
    finally:
        server.shutdown()
        sys.modules.pop("kaggle_secrets", None)
        os.environ.clear()
        os.environ.update(saved)


def _deployment(tmp_path: Path, relay: procs.Relay, *extra: str) -> tuple[Deployment, io.StringIO]:
    flags = (
        "--mode ollama --webui off --ollama-port 0 --health-interval 0.5 --drain-timeout 5 --export-env off"
    )
    dirs = ["--state-dir", str(tmp_path / "state"), "--reports-dir", str(tmp_path / "reports")]
    settings = parse_settings(
        [*flags.split(), *dirs, *extra],
        {"BRIDGE_RELAY": relay.ws_url, "BRIDGE_NODE_TOKEN": procs.NODE_TOKEN, "BRIDGE_KEY": procs.API_KEY},
    )
    out = io.StringIO()
    return Deployment(settings, out=out), out


@pytest.mark.timeout(120)
def test_handover_pushes_the_next_session_and_drains_once_its_bridge_is_connected(
    tmp_path: Path, kaggle_env: dict[str, Any], make_relay: Any, make_bridge: Any, upstream: str
) -> None:
    relay = make_relay()
    dep, out = _deployment(tmp_path, relay, "--next-kernel", "someone/qwen-on-two-t4s")
    dep.start_background(timeout=60)
    try:
        # the session's end 70 s from now, the warning (and the push) at once, the drain 5 s before
        dep.deadline = Deadline(time.time(), hours=70 / 3600, warn_minutes=(60,), drain_minutes=5 / 60)
        log: Path = kaggle_env["log"]
        until(lambda: "pushed" in log.read_text() if log.exists() else False, 30, "the push")
        pushed = [json.loads(x) for x in log.read_text().splitlines()]
        assert [p["result"] for p in pushed] == ["pulled", "pushed"]
        push = pushed[-1]
        assert push["argv"][:3] == ["kernels", "push", "-p"] and push["accelerator"] == "NvidiaTeslaT4"
        assert push["metadata"]["machine_shape"] == "NvidiaTeslaT4"
        assert push["metadata"]["enable_gpu"] is True and push["metadata"]["enable_internet"] is True
        # the credentials came from Kaggle Secrets (HTTP), into the CLI's environment
        assert (
            push["user"] == "someone"
            and push["key_sha256"] == hashlib.sha256(KAGGLE_KEY.encode()).hexdigest()
        )
        assert {"KAGGLE_USERNAME", "KAGGLE_KEY"} <= set(kaggle_env["secrets"].asked)
        assert not dep.finished.is_set()  # no drain before the next bridge is there
        # the next session's bridge connects: this one drains, well before the end
        make_bridge(relay, {"ollama": upstream})
        assert dep.finished.wait(30), out.getvalue()
        assert dep.deadline.left() > 20
    finally:
        dep.stop()
    text = out.getvalue()
    assert "kaggle CLI: Kernel version 2 successfully pushed." in text
    assert "next session: its bridge is connected (2 bridges on the relay): draining this one" in text
    assert dep.stop_reason == "handed over to the next session"
    assert (
        KAGGLE_KEY not in text
        and KAGGLE_KEY not in (tmp_path / "state" / "logs" / "kaggle-cli.log").read_text()
    )


@pytest.mark.timeout(120)
def test_a_refused_push_is_logged_and_the_session_serves_to_its_end(
    tmp_path: Path, kaggle_env: dict[str, Any], make_relay: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kaggle-cli prints "Kernel push error: ..." and exits 0 when the server refuses a push: that is
    a failure, logged; no next bridge comes, so this session serves to its hard end and says so."""
    monkeypatch.setenv("STANDIN_KAGGLE_PUSH_ERROR", "Notebook not found")
    relay = make_relay()
    dep, out = _deployment(tmp_path, relay, "--next-kernel", "someone/qwen-on-two-t4s")
    dep.start_background(timeout=60)
    try:
        dep.deadline = Deadline(time.time(), hours=12 / 3600, warn_minutes=(0.15,), drain_minutes=0.05)
        assert dep.finished.wait(40), out.getvalue()
    finally:
        dep.stop()
    text = out.getvalue()
    assert "kaggle CLI: Kernel push error: Notebook not found" in text
    failed = "next session: FAILED: kaggle kernels push failed (exit 0); this session serves to its end"
    assert text.count(failed) == 1, text  # said once, not at every check after
    assert "bridge has not connected" not in text  # no push, so no bridge was awaited
    assert (
        "the next session was not started (FAILED: kaggle kernels push failed (exit 0)): this session "
        "served to its end" in text
    )
    assert text.index("served to its end") < text.index("the session's end: draining the bridge")
    assert dep.stop_reason == "the session's end" and dep.facts.handover.startswith("FAILED")


@pytest.mark.timeout(90)
def test_a_model_on_the_cpu_is_said_with_its_reason(
    tmp_path: Path, kaggle_env: dict[str, Any], make_relay: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NVIDIA driver older than 531: Ollama 0.20.0 finds no usable GPU and loads the model on the
    CPU without a word (ollama #12770). After the warm-up /api/ps shows it (size_vram 0), and READY
    and the status line say RUNNING ON CPU, with the driver and what Ollama's log says."""
    monkeypatch.setenv("STANDIN_DRIVER", "525.105.17")
    relay = make_relay()
    dep, out = _deployment(tmp_path, relay)
    dep.start_background(timeout=60)
    try:
        text = out.getvalue()
        ready = next(x for x in text.splitlines() if "READY in" in x)
        assert "| RUNNING ON CPU: " in ready and "driver 525.105.17 is older than 531" in ready, ready
        assert "inference compute library=cpu" in ready
        assert "WARNING: qwen3:8b is RUNNING ON CPU (slow)" in text
        assert "RUNNING ON CPU" in dep.live_line()
    finally:
        dep.stop()


@pytest.mark.timeout(120)
def test_the_doctor_checks_the_machine_and_its_output_is_safe_to_paste(
    tmp_path: Path, kaggle_env: dict[str, Any], make_relay: Any
) -> None:
    relay = make_relay()
    env = {
        **os.environ,
        "BRIDGE_RELAY": relay.ws_url,
        "BRIDGE_NODE_TOKEN": procs.NODE_TOKEN,
        "DEPLOY_WEBUI_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PYTHONPATH": str(STANDIN / "python"),
        "DEPLOY_STATE_DIR": str(tmp_path / "state"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "deployment", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    text = r.stdout + r.stderr
    assert "[  ok] gpus: 2: GPU0 Tesla T4 (stand-in) 15.0 GiB" in text, text
    assert "[  ok] driver: NVIDIA driver 550.90.07 (Ollama needs >= 531)" in text
    assert "[  ok] relay: reachable" in text and "[  ok] node token: accepted" in text
    assert "[  ok] secret BRIDGE_NODE_TOKEN: set (environment)" in text
    assert "[  ok] secret KAGGLE_KEY: set (Kaggle Secrets)" in text  # over HTTP, by name only
    assert "[info] secret BRIDGE_KEY: not set" in text and "disk temp" in text
    for secret in (procs.NODE_TOKEN, ADMIN_PASSWORD, KAGGLE_KEY, relay.ws_url, f"127.0.0.1:{relay.port}"):
        assert secret not in text
    # a wrong token: refused, with the fix
    bad = subprocess.run(
        [sys.executable, "-m", "deployment", "doctor"],
        env={**env, "BRIDGE_NODE_TOKEN": "not-the-token-" + "a" * 20, "STANDIN_DRIVER": "470.82.01"},
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert bad.returncode == 1
    assert "[FAIL] node token: refused" in bad.stdout and "fix: copy the token again" in bad.stdout
    assert "[FAIL] driver: NVIDIA driver 470.82.01 is older than 531" in bad.stdout


# ------------------------------------------------------------------------------------ units
def test_children_are_recorded_and_a_dead_owners_are_stopped(tmp_path: Path) -> None:
    """The record (<state>/children.json): a previous owner that is gone leaves its children to be
    stopped; a pid now used by another process is left alone; a live owner's are not touched."""
    said: list[str] = []
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    path = tmp_path / "children.json"
    try:
        records = [
            Record("ollama", orphan.pid, process_start(orphan.pid), "ollama"),
            Record("relay", stranger.pid, process_start(stranger.pid) - 100, "python"),  # a reused pid
        ]
        dead_owner = {"pid": 999_999_999, "started": 1.0}
        path.write_text(json.dumps({"owner": dead_owner, "children": [r.__dict__ for r in records]}))
        stopped = Children(path).claim(said.append)
        assert [r.name for r in stopped] == ["ollama"] and orphan.wait(10) == -signal.SIGKILL
        assert stranger.poll() is None and said == [
            f"stopped ollama (pid {orphan.pid}), left running by a previous run that died"
        ]
        assert json.loads(path.read_text())["children"] == []
        # a live owner (another process) with live children: refused, nothing killed
        live = {"pid": stranger.pid, "started": process_start(stranger.pid)}
        rec = Record("bridge", stranger.pid, process_start(stranger.pid), "python")
        path.write_text(json.dumps({"owner": live, "children": [rec.__dict__]}))
        with pytest.raises(AlreadyRunning):
            Children(path).claim(said.append)
        assert same_process(stranger.pid, process_start(stranger.pid))
    finally:
        for p in (orphan, stranger):
            p.kill()
            p.wait()


def test_the_session_starts_with_the_container() -> None:
    now = time.time()
    pid1 = process_start(1)
    assert pid1 > 0
    # on Kaggle: PID 1's start, when a session could have begun then
    start, source = session_start(container=True, now=pid1 + 3600)
    assert (start, source) == (pid1, "the container's start (pid 1)")
    # a PID 1 older than any session (a laptop's init): this process's start instead
    start, source = session_start(container=True, now=pid1 + 30 * 3600)
    assert source == "this process's start" and start == process_start()
    assert session_start(123.0, container=True) == (123.0, "DEPLOY_SESSION_START")
    assert session_start(container=False)[1] == "this process's start"
    d = Deadline(now, hours=12)
    d.stop_at = now + 600
    assert d.end == now + 600 and not d.ends_with_session and d.session_end == now + 12 * 3600
    assert Deadline.fmt(14 * 60 + 5) == "14m05s"


def test_kaggle_folders_secrets_in_temp_reports_in_working(tmp_path: Path) -> None:
    env = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "DEPLOY_KAGGLE_ROOT": str(tmp_path)}
    s = parse_settings([], env)
    assert s.state_dir == tmp_path / "temp" / "kaggle-bridge"
    assert s.cache_dir == tmp_path / "temp" / "kaggle-bridge-cache"
    assert s.reports_dir == tmp_path / "working" / "kaggle-bridge"
    off = parse_settings([], {"DEPLOY_KAGGLE_ROOT": str(tmp_path / "none")})
    assert off.state_dir == ROOT / ".data" / "deploy" and off.reports_dir == off.state_dir / "reports"


def test_open_webui_settings_follow_the_environment() -> None:
    """Open WebUI 0.12.4 keeps settings in its database, which then wins over the environment
    (ENABLE_PERSISTENT_CONFIG defaults to True): the deployment turns that off, so a new endpoint
    reaches it at every start (the batch-run test shows it with a second run)."""
    from deployment import webui_setup

    env = webui_setup.environment(
        data_dir=Path("/x"), secret_key="k" * 40, ollama_url="http://127.0.0.1:1/r/ollama"
    )
    assert env["ENABLE_PERSISTENT_CONFIG"] == "False" and env["OLLAMA_BASE_URL"].endswith("/r/ollama")


def test_open_webui_signs_in_whom_the_relay_says() -> None:
    """The one login (issue 17): Open WebUI's trusted-header sign-in on the relay's X-Bridge-User-*
    headers, new accounts usable at once (role `user`, never `pending`) and seeing the models."""
    from bridge.httprules import USER_EMAIL_HEADER, USER_NAME_HEADER
    from deployment import webui_setup

    env = webui_setup.environment(
        data_dir=Path("/x"),
        secret_key="k" * 40,
        openai_url="http://127.0.0.1:1/r/engine/v1",
        trusted_email_header=USER_EMAIL_HEADER,
        trusted_name_header=USER_NAME_HEADER,
    )
    assert env["WEBUI_AUTH_TRUSTED_EMAIL_HEADER"] == "x-bridge-user-email"
    assert env["WEBUI_AUTH_TRUSTED_NAME_HEADER"] == "x-bridge-user-name"
    assert env["DEFAULT_USER_ROLE"] == "user" and env["BYPASS_MODEL_ACCESS_CONTROL"] == "true"
    assert env["WEBUI_AUTH"] == "True"  # Open WebUI's own auth stays on
    plain = webui_setup.environment(data_dir=Path("/x"), secret_key="k" * 40)
    assert "WEBUI_AUTH_TRUSTED_EMAIL_HEADER" not in plain and "DEFAULT_USER_ROLE" not in plain
