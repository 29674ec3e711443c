"""The deployment (``python -m deployment``: deployment/kaggle_ollama_webui.py, issue 4).

- The whole orchestration for real on the embedded engine: local relay + llama.cpp on the tiny model
  + bridge (+ Open WebUI, marker ``webui``), a streamed chat through the relay with the ``openai``
  client, the supervisor restarting a killed child, a clean stop that drains the bridge, and no
  secret in any output.
- The Ollama path against tests/standin/ollama (Ollama's binary cannot run here) and
  tests/standin/nvidia-smi (two "T4s"), started from inside a running event loop as in Jupyter:
  replicas (one server per GPU, own port, CUDA_VISIBLE_DEVICES, balanced by the bridge) and split.
- The Ollama install (resumable download, .tar.zst unpacking with and without the zstd command),
  the auto GPU-mode decision, secrets, the session deadline and the GPU-hours record as units.
- A run's states in status.json (``starting`` from its first moment, ``failed`` with the reason,
  ``stopped``) and the next session's own time (no warnings needed), in process.
- The notebook is valid nbformat: a settings cell and one cell that serves (tests/test_kaggle.py
  runs it as Kaggle does).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import nbformat
import ollama
import openai
import pytest

from deployment import cli, ollama_setup, serving
from deployment import gpus as gpumod
from deployment.kaggle_ollama_webui import Deployment, Settings, build_parser, parse_settings
from deployment.session import Deadline, GpuHours, Redactor, get_secret, mask
from deployment.stack import Stack

from .procs import ROOT, Proc, until

STANDIN = ROOT / "tests" / "standin"
#: The deployment's command line (a package: no path to a script, no sys.path edits).
DEPLOY = [sys.executable, "-m", "deployment"]
NOTEBOOK = ROOT / "notebooks" / "kaggle_ollama_webui.ipynb"
QWEN = gpumod.KNOWN_MODELS["qwen3:8b"]
T4 = gpumod.Gpu(0, "Tesla T4", 15360 * gpumod.MIB, 0)
GIB = gpumod.GIB

#: Secrets handed to the script through the environment; none may appear in any output.
NODE_TOKEN = "deploy-test-node-token-" + "x7Qm2pLk9sVb"
ADMIN_PASSWORD = "deploy-test-admin-pw-" + "R4nd0mS3cr3t"


# ------------------------------------------------------------------------------------ auto mode
def _t4s(n: int, used_mib: int = 0) -> list[gpumod.Gpu]:
    return [gpumod.Gpu(i, "Tesla T4", 15360 * gpumod.MIB, used_mib * gpumod.MIB) for i in range(n)]


def test_kv_cache_size_of_qwen3_8b() -> None:
    assert QWEN.kv_bytes_per_token("f16") == 144 * 1024  # 36 layers x 8 KV heads x 128 x 2 (K, V) x 2 B
    assert QWEN.kv_bytes_per_token("q8_0") == pytest.approx(144 * 1024 * 34 / 64)
    assert QWEN.kv_bytes_per_token("q4_0") < QWEN.kv_bytes_per_token("q8_0")


def test_auto_picks_replicas_when_the_model_fits_one_t4() -> None:
    d = gpumod.decide("auto", QWEN, _t4s(2), num_ctx=8192, num_parallel=2, kv_type="q8_0")
    assert (d.mode, d.replicas) == ("replicas", 2)
    assert 6 * GIB < d.need < 8 * GIB
    assert "fits one GPU" in d.reason and "replicas" in d.reason


def test_auto_picks_split_when_the_context_does_not_fit_one_t4() -> None:
    # 40k tokens x 2 parallel in f16: 11.25 GiB of KV cache + 4.7 GiB of weights > one T4
    d = gpumod.decide("auto", QWEN, _t4s(2), num_ctx=40960, num_parallel=2, kv_type="f16")
    assert (d.mode, d.replicas) == ("split", 1)
    assert "does not fit one GPU" in d.reason and "WARNING" not in d.reason
    # the same context with a q8_0 cache fits again
    d8 = gpumod.decide("auto", QWEN, _t4s(2), num_ctx=40960, num_parallel=1, kv_type="q8_0")
    assert d8.mode == "replicas"


def test_auto_counts_memory_already_used() -> None:
    free = gpumod.decide("auto", QWEN, _t4s(2), num_ctx=16384, num_parallel=2, kv_type="q8_0")
    busy = gpumod.decide("auto", QWEN, _t4s(2, used_mib=9000), num_ctx=16384, num_parallel=2, kv_type="q8_0")
    assert (free.mode, busy.mode) == ("replicas", "split")


def test_auto_warns_when_nothing_holds_the_model() -> None:
    d = gpumod.decide("auto", QWEN, _t4s(2), num_ctx=131072, num_parallel=4, kv_type="f16")
    assert d.mode == "split" and "WARNING" in d.reason


def test_explicit_modes_and_few_gpus() -> None:
    assert gpumod.decide("split", QWEN, _t4s(2), num_ctx=4096, num_parallel=1, kv_type="f16").mode == "split"
    forced = gpumod.decide("replicas", QWEN, _t4s(2), num_ctx=131072, num_parallel=4, kv_type="f16")
    assert forced.mode == "replicas" and "WARNING" in forced.reason
    assert gpumod.decide("auto", QWEN, _t4s(1), num_ctx=4096, num_parallel=1, kv_type="f16").mode == "single"
    assert gpumod.decide("auto", QWEN, [], num_ctx=4096, num_parallel=1, kv_type="f16").mode == "cpu"
    with pytest.raises(ValueError):
        gpumod.decide("both", QWEN, _t4s(2), num_ctx=4096, num_parallel=1, kv_type="f16")


def test_model_facts_from_ollama_show() -> None:
    show = {
        "model_info": {
            "general.architecture": "qwen3",
            "qwen3.block_count": 36,
            "qwen3.attention.head_count": 32,
            "qwen3.attention.head_count_kv": 8,
            "qwen3.attention.key_length": 128,
        }
    }
    assert gpumod.facts_from_show("qwen3:8b", QWEN.weights, show) == QWEN
    no_key_length = {
        "model_info": {
            "general.architecture": "llama",
            "llama.block_count": 2,
            "llama.attention.head_count": 4,
            "llama.embedding_length": 64,
        }
    }
    facts = gpumod.facts_from_show("x", 1, no_key_length)
    assert facts is not None and (facts.kv_heads, facts.head_dim) == (4, 16)
    assert gpumod.facts_from_show("x", 1, {}) is None


def test_nvidia_smi_parsing() -> None:
    gpus = gpumod.parse_nvidia_smi("0, Tesla T4, 15360, 5120\n1, Tesla T4, 15360, 0\nbad line\n")
    assert [(g.index, g.total // gpumod.MIB, g.used // gpumod.MIB) for g in gpus] == [
        (0, 15360, 5120),
        (1, 15360, 0),
    ]
    assert gpumod.describe_vram(gpus) == "GPU0 5.0/15.0 GiB GPU1 0.0/15.0 GiB"


# ------------------------------------------------------------------------------------ settings, secrets
def test_every_flag_has_an_env_variable_with_a_known_prefix() -> None:
    text = build_parser({}).format_help()
    flags = re.findall(r"^\s+(--[a-z-]+)", text, re.M)
    assert "--gpu-mode" in flags and "--relay" in flags and "--model-file" in flags
    envs = re.findall(r"\[env (\w+);", re.sub(r"\s+", " ", text))
    assert len(envs) == len(fields(Settings)) and all(e.startswith(("BRIDGE_", "DEPLOY_")) for e in envs)
    assert NODE_TOKEN not in build_parser({"BRIDGE_NODE_TOKEN": NODE_TOKEN}).format_help()


def test_every_setting_is_in_the_deployment_readme() -> None:
    from deployment.kaggle_ollama_webui import _FLAGS

    text = (ROOT / "deployment" / "README.md").read_text()
    for name, (var, _) in _FLAGS.items():
        assert f"`--{name.replace('_', '-')}` | `{var}` |" in text, f"--{name} is not in deployment/README.md"


def test_flags_win_over_env_and_env_over_defaults(tmp_path: Path) -> None:
    env = {"DEPLOY_GPU_MODE": "split", "DEPLOY_NUM_CTX": "4096", "DEPLOY_FLASH_ATTENTION": "0"}
    s = parse_settings(["--state-dir", str(tmp_path)], env)
    assert (s.gpu_mode, s.num_ctx, s.flash_attention) == ("split", 4096, False)
    s = parse_settings(["--state-dir", str(tmp_path), "--gpu-mode", "replicas", "--flash-attention"], env)
    assert (s.gpu_mode, s.flash_attention) == ("replicas", True)
    assert s.cache_dir == tmp_path / "cache"
    with pytest.raises(SystemExit):
        parse_settings(["--gpu-mode", "sideways"], {})


def test_secrets_from_env_then_kaggle_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for Kaggle's kaggle_secrets module (it exists only inside a Kaggle notebook).
    asked: list[str] = []

    class UserSecretsClient:
        def get_secret(self, name: str) -> str:
            asked.append(name)
            if name == "BRIDGE_NODE_TOKEN":
                return NODE_TOKEN
            raise KeyError(name)  # what an unattached secret does

    fake = type(sys)("kaggle_secrets")
    fake.UserSecretsClient = UserSecretsClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kaggle_secrets", fake)
    assert get_secret("BRIDGE_NODE_TOKEN", {}) == NODE_TOKEN
    assert get_secret("BRIDGE_NODE_TOKEN", {"BRIDGE_NODE_TOKEN": "from-env-wins"}) == "from-env-wins"
    assert get_secret("DEPLOY_WEBUI_ADMIN_PASSWORD", {}) == ""
    s = parse_settings([], {})
    assert s.node_token == NODE_TOKEN and s.webui_admin_password == ""
    assert "BRIDGE_RELAY" in asked


def test_redactor_masks_secrets() -> None:
    r = Redactor()
    r.add(NODE_TOKEN, "", "short")
    out = r(f"token={NODE_TOKEN} and short")
    assert NODE_TOKEN not in out and mask(NODE_TOKEN) in out and "short" in out
    assert mask("abc") == "***"


# ------------------------------------------------------------------------------------ session
def test_deadline_warnings_and_drain() -> None:
    d = Deadline(start=1000.0, hours=12, warn_minutes=(60, 30, 10), drain_minutes=5)
    end = 1000.0 + 12 * 3600
    assert d.due_warnings(end - 2 * 3600) == []
    assert d.due_warnings(end - 45 * 60) == [60]
    assert d.due_warnings(end - 44 * 60) == []  # each warning once
    assert sorted(d.due_warnings(end - 9 * 60)) == [10, 30]
    assert not d.must_drain(end - 6 * 60) and d.must_drain(end - 4 * 60)
    assert Deadline.fmt(3 * 3600 + 7 * 60) == "3h07m"
    unlimited = Deadline(start=1000.0, hours=0)  # not on Kaggle: no deadline
    assert unlimited.due_warnings(1e12) == [] and not unlimited.must_drain(1e12)


def test_serve_minutes_serves_its_minutes_whatever_the_drain_lead() -> None:
    """``--serve-minutes 5`` stops 5 minutes after READY: the drain's lead (5 minutes) is for the
    session's hard end only. Before, it drained at READY itself."""
    ready = 5000.0
    d = Deadline(start=1000.0, hours=12, warn_minutes=(1,), drain_minutes=5, stop_at=ready + 5 * 60)
    assert not d.ends_with_session
    assert not d.must_drain(ready) and not d.must_drain(ready + 5 * 60 - 1)
    assert d.must_drain(ready + 5 * 60)
    assert d.due_warnings(ready + 4 * 60) == [1]  # the warnings still count to that end
    late = Deadline(start=1000.0, hours=12, drain_minutes=5, stop_at=1000.0 + 12 * 3600 - 60)
    assert late.must_drain(1000.0 + 12 * 3600 - 5 * 60)  # the session's end comes first: its lead
    no_session = Deadline(start=1000.0, hours=0, drain_minutes=5, stop_at=ready + 60)
    assert not no_session.must_drain(ready + 59) and no_session.must_drain(ready + 60)


def test_the_handover_has_its_own_time() -> None:
    """The next session starts ``--next-minutes`` before the session's end whatever the warnings
    are (none, or others), and only for a run that ends with the session."""
    end = 1000.0 + 12 * 3600
    for warnings in ((), (60.0, 30.0, 10.0), (5.5,)):
        d = Deadline(start=1000.0, hours=12, warn_minutes=warnings, drain_minutes=5, handover_minutes=45)
        assert not d.handover_due(end - 46 * 60) and d.handover_due(end - 45 * 60), warnings
    assert Deadline(start=1000.0, hours=12).handover_due(end - 60 * 60)  # an hour by default
    served = Deadline(start=1000.0, hours=12, handover_minutes=45, stop_at=end - 3 * 3600)
    assert not served.handover_due(end - 10 * 60)  # --serve-minutes: the user's own end, no next session
    assert not Deadline(start=1000.0, hours=0).handover_due(1e12)  # no session limit
    with pytest.raises(SystemExit, match="--next-minutes"):  # it would start after this one drains
        parse_settings(["--next-session-cmd", "true", "--next-minutes", "5", "--drain-minutes", "5"], {})


def test_gpu_hours_record(tmp_path: Path) -> None:
    path = tmp_path / "gpu_hours.json"
    now = 1_800_000_000.0
    old = GpuHours(path, "old", now - 10 * 86400, ["T4", "T4"])
    old.touch(now - 10 * 86400 + 3600)  # 10 days ago: not this week
    a = GpuHours(path, "a", now - 3 * 86400, ["T4", "T4"])
    a.touch(now - 3 * 86400 + 2 * 3600)  # 2 h
    cpu = GpuHours(path, "cpu", now - 3600, [])
    cpu.touch(now)  # no GPU: not counted
    b = GpuHours(path, "b", now - 1800, ["T4", "T4"])
    summary = b.touch(now)  # 0.5 h so far
    assert summary == {"session_hours_7d": 2.5, "device_hours_7d": 5.0}
    data = json.loads(path.read_text())
    assert {s["id"] for s in data["sessions"]} == {"old", "a", "cpu", "b"}
    assert b.touch(now + 1800)["session_hours_7d"] == 3.0  # the same session, seen later


# ------------------------------------------------------------------------------------ supervisor
#: A child that answers 200 on /health until FILE exists, then 503 (sick but alive).
_SICKLY = """
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if os.path.exists(sys.argv[2]) else 200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class _Said:
    """The supervisor's messages, awaitable: ``await said.until(pattern, n)``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()

    async def until(self, pattern: str, count: int = 1, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while sum(bool(re.search(pattern, x)) for x in self.lines) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_supervisor_backs_off_a_crash_loop(tmp_path: Path) -> None:
    from deployment.supervisor import ChildSpec, Supervisor

    said = _Said()
    sup = Supervisor(said, interval=0.05, backoff_initial=0.1, backoff_max=0.4, stable_after=60)
    spec = ChildSpec(
        "crashy",
        [sys.executable, "-c", "import time; time.sleep(0.3)"],
        dict(os.environ),
        tmp_path / "crashy.log",
    )
    await sup.add(spec)
    watch = asyncio.create_task(sup.watch())
    try:
        await said.until("restarting in", 4)
    finally:
        sup.request_stop()
        await watch
        await sup.stop()
    delays = [float(m.group(1)) for x in said.lines if (m := re.search(r"restarting in ([\d.]+) s", x))]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.4], said.lines  # doubling, capped
    assert all("exited with code 0" in x for x in said.lines if "restarting" in x)
    assert sup.child("crashy").restarts >= 3


async def test_supervisor_restarts_a_child_that_stops_answering(tmp_path: Path) -> None:
    from deployment.engine import free_port
    from deployment.supervisor import ChildSpec, Supervisor

    said = _Said()
    sup = Supervisor(said, interval=0.1, bad_checks=3, backoff_initial=0.1)
    port, sick = free_port(), tmp_path / "sick"
    spec = ChildSpec(
        "sickly",
        [sys.executable, "-c", _SICKLY, str(port), str(sick)],
        dict(os.environ),
        tmp_path / "sickly.log",
        health_url=f"http://127.0.0.1:{port}/health",
    )
    child = await sup.add(spec)
    first = child.pid
    watch = asyncio.create_task(sup.watch())
    try:
        assert child.restarts == 0 and child.healthy
        sick.touch()  # alive, but answering 503 now
        await said.until(r"sickly unhealthy: failed 3 health checks in a row \(answered 503")
        sick.unlink()
        await said.until("sickly is back")
        assert child.restarts == 1 and child.pid != first and not _alive(first)
    finally:
        sup.request_stop()
        await watch
        await sup.stop()
    assert not _alive(child.pid)


# ------------------------------------------------------------------------------------ Ollama install
class _RangeServer(http.server.ThreadingHTTPServer):
    """A release folder: one archive with Range support, and ``sha256sum.txt`` written as Ollama's
    release workflow writes it (``<hex>  ./<name>``). The first archive response is cut halfway (an
    interrupted download); ``corrupt`` responses in a row carry damaged bytes (ollama #15291)."""

    daemon_threads = True

    def __init__(self, payload: bytes, *, cut_first: bool = True, corrupt: int = 0) -> None:
        import hashlib

        self.payload = payload
        self.requests: list[str] = []
        self.cut_first = cut_first
        self.corrupt = corrupt
        digest = hashlib.sha256(payload).hexdigest()
        self.checksums = f"{'0' * 64}  ./ollama-darwin.tgz\n{digest}  ./ollama-linux-amd64.tar.zst\n"
        super().__init__(("127.0.0.1", 0), _RangeHandler)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    server: _RangeServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        data = self.server.payload
        if self.path.endswith("/sha256sum.txt"):
            body = self.server.checksums.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        rng = self.headers.get("Range", "")
        self.server.requests.append(rng)
        if not self.path.endswith(".tar.zst"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.server.corrupt and not rng:
            self.server.corrupt -= 1
            data = data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:]
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.server.cut_first:
            self.server.cut_first = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


def _release_archive() -> bytes:
    """An Ollama-release-shaped .tar.zst holding the stand-in as bin/ollama."""
    import zstandard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(STANDIN / "ollama", arcname="bin/ollama")
        pad = tarfile.TarInfo("lib/ollama/padding.bin")  # some bulk, so the cut is mid-file
        blob = os.urandom(256 * 1024)
        pad.size = len(blob)
        tar.addfile(pad, io.BytesIO(blob))
    return bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))


@pytest.mark.parametrize("prefer_cli", [True, False], ids=["zstd-command", "python-zstandard"])
def test_install_resumes_an_interrupted_download_and_unpacks_zstd(tmp_path: Path, prefer_cli: bool) -> None:
    if prefer_cli and shutil.which("zstd") is None:
        pytest.fail("the zstd command is missing (apt-get install zstd)")
    server = _RangeServer(_release_archive())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    said: list[str] = []
    try:
        url = f"http://127.0.0.1:{server.server_port}/v9.9.9/ollama-linux-amd64.tar.zst"
        exe = ollama_setup.install(tmp_path, said.append, version="9.9.9", url=url, prefer_cli=prefer_cli)
    finally:
        server.shutdown()
    assert (
        server.requests[0] == ""
        and server.requests[1].startswith("bytes=")
        and server.requests[1] != "bytes=0-"
    )
    assert any("resuming" in s or "interrupted" in s for s in said)
    assert exe == tmp_path / "ollama-9.9.9" / "bin" / "ollama"
    assert "stand-in" in ollama_setup.version_of(str(exe))
    assert any("sha256" in s and "matches sha256sum.txt" in s for s in said)
    # a second call reuses the install without downloading
    again: list[str] = []
    assert ollama_setup.install(tmp_path, again.append, version="9.9.9", url=url) == exe
    assert any("reusing" in s for s in again)


def _serve_release(server: _RangeServer) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/v9.9.9/ollama-linux-amd64.tar.zst"


def test_install_discards_a_corrupt_archive_and_fetches_it_again(tmp_path: Path) -> None:
    """A download whose bytes do not match the release's sha256sum.txt is deleted and fetched again
    (never unpacked); so is a corrupt archive a previous session left in the cache."""
    payload = _release_archive()
    server = _RangeServer(payload, cut_first=False, corrupt=1)
    url = _serve_release(server)
    said: list[str] = []
    try:
        exe = ollama_setup.install(tmp_path, said.append, version="9.9.9", url=url)
        assert server.requests == ["", ""]  # the corrupt one, then a whole new download
        assert any("is corrupt" in s and "downloading it again" in s for s in said), said
        assert "stand-in" in ollama_setup.version_of(str(exe))

        # a corrupt archive in the cache (the unpacked copy gone): checked before it is unpacked
        shutil.rmtree(tmp_path / "ollama-9.9.9")
        cached = tmp_path / "downloads" / "9.9.9-ollama-linux-amd64.tar.zst"
        cached.write_bytes(b"\0" * len(payload))
        said.clear()
        ollama_setup.install(tmp_path, said.append, version="9.9.9", url=url)
        assert server.requests == ["", "", ""] and any("is corrupt" in s for s in said)
    finally:
        server.shutdown()

    # every download corrupt: an error, nothing unpacked, nothing kept
    bad = _RangeServer(payload, cut_first=False, corrupt=5)
    url = _serve_release(bad)
    try:
        with pytest.raises(ollama_setup.InstallError, match="corrupt"):
            ollama_setup.install(tmp_path / "2", said.append, version="9.9.9", url=url)
    finally:
        bad.shutdown()
    assert not (tmp_path / "2" / "ollama-9.9.9").exists()
    assert not any((tmp_path / "2" / "downloads").iterdir())


def test_find_ollama_by_flag_or_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    exe = ollama_setup.find_ollama(str(STANDIN / "ollama"), tmp_path, said.append, version="0")
    assert exe == STANDIN / "ollama"
    with pytest.raises(ollama_setup.InstallError):
        ollama_setup.find_ollama(str(tmp_path / "no-such-ollama"), tmp_path, said.append, version="0")
    monkeypatch.setenv("PATH", f"{STANDIN}{os.pathsep}{os.environ['PATH']}")
    assert ollama_setup.find_ollama("", tmp_path, said.append, version="0") == STANDIN / "ollama"
    assert said == []  # nothing downloaded


# ------------------------------------------------------------------------------------ Ollama path (stand-in)
@pytest.fixture
def standin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two stand-in T4s and the stand-in ollama first on PATH; os.environ restored afterwards
    (a notebook deployment exports BRIDGE_* for `bridge validate`)."""
    saved = dict(os.environ)
    monkeypatch.setenv("PATH", f"{STANDIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_GPUS", "15360,15360")
    monkeypatch.setenv("STANDIN_TOKEN_DELAY", "0.05")
    yield
    os.environ.clear()
    os.environ.update(saved)


DEFAULT_ENV = {"DEPLOY_WEBUI_ADMIN_PASSWORD": ADMIN_PASSWORD, "BRIDGE_NODE_TOKEN": NODE_TOKEN}


def _settings(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    return parse_settings(
        [
            "--state-dir",
            str(tmp_path / "state"),
            "--webui",
            "off",
            "--ollama-port",
            "0",
            "--health-interval",
            "0.5",
            "--drain-timeout",
            "5",
            *extra,
        ],
        env if env is not None else DEFAULT_ENV,
    )


@pytest.mark.timeout(90)
async def test_ollama_replicas_from_a_running_event_loop(tmp_path: Path, standin_env: None) -> None:
    """As in Jupyter: called from inside a running loop, the supervisor runs in its own thread and
    the call returns once ready. Two stand-in Ollamas, one per GPU, each on its own port; the
    bridge spreads concurrent requests over both."""
    asyncio.get_running_loop()  # this test runs inside an event loop, like a notebook cell
    out = io.StringIO()
    dep = Deployment(_settings(tmp_path, "--mode", "ollama", "--export-env", "auto"), out=out)
    started = time.monotonic()
    dep.start_background(timeout=60)
    try:
        took = time.monotonic() - started
        text = out.getvalue()
        assert "auto chose replicas" in text and "fits one GPU" in text
        assert dep.facts.mode == "replicas" and len(dep.facts.upstreams) == 2
        assert re.search(
            r"READY in [\d.]+ s: open http://127\.0\.0\.1:\d+/ \| key bk_\S+ \| model qwen3:8b \| "
            r"mode replicas x2 .*\| VRAM GPU0 0\.0/15\.0 GiB GPU1 0\.0/15\.0 GiB",
            text,
        ), text
        assert "pull qwen3:8b" in text and "100.0%" in text  # the pull's progress bar
        # each replica: its own GPU, flash attention, q8_0 KV cache, kept loaded, the model warmed
        logs = dep.s.state_dir / "logs"
        for gpu in (0, 1):
            line = (logs / f"ollama-gpu{gpu}.log").read_text()
            assert f"CUDA_VISIBLE_DEVICES={gpu} " in line and "OLLAMA_SCHED_SPREAD= " in line
            assert "OLLAMA_FLASH_ATTENTION=1" in line and "OLLAMA_KV_CACHE_TYPE=q8_0" in line
            assert "OLLAMA_KEEP_ALIVE=-1" in line
        for url in dep.facts.upstreams:
            assert [m["name"] for m in ollama_setup.loaded(url)] == ["qwen3:8b"]
        # the notebook gets what `bridge validate` needs
        assert os.environ["BRIDGE_RELAY"] == dep.facts.url.rstrip("/")
        assert parse_settings([]).relay == ""  # a later run here still starts its own relay
        assert os.environ["BRIDGE_KEY"] == dep.key and os.environ["BRIDGE_VALIDATE_ROUTE"] == "ollama"

        base = dep.facts.url + "r/ollama"
        headers = {"Authorization": f"Bearer {dep.key}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:

            async def chat() -> str:
                body = {
                    "model": "qwen3:8b",
                    "messages": [{"role": "user", "content": "hi"}],
                    "options": {"num_predict": 10},
                }
                async with client.stream("POST", "/api/chat", json=body) as r:
                    assert r.status_code == 200
                    lines = [json.loads(x) async for x in r.aiter_lines() if x.strip()]
                assert lines[-1]["done"] and len(lines) == 11
                return r.headers["x-standin-ollama"].split()[0]

            served = await asyncio.gather(*(chat() for _ in range(6)))
        ports = {u.rsplit(":", 1)[1] for u in dep.facts.upstreams}
        assert set(served) == ports, served  # both replicas served
        assert max(served.count(p) for p in ports) <= 4
        # the real ollama client through the relay
        oclient = ollama.AsyncClient(host=base, headers=headers)
        reply = await oclient.chat(
            model="qwen3:8b", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3}
        )
        assert reply.message.content == "w0 w1 w2"
    finally:
        await asyncio.to_thread(dep.stop)
    assert dep.finished.is_set() and "stopped" in out.getvalue()
    status = json.loads((dep.s.state_dir / "status.json").read_text())
    assert status["state"] == "stopped"
    assert all(not _alive(c["pid"]) for c in status["children"].values())
    _assert_no_secrets(out.getvalue(), dep.s.state_dir)
    print(f"ollama stand-in replicas: ready in {took:.1f} s; timings {dep.facts.timings}")


# Start-up may take its whole 45 s on a loaded machine, then the 12-s session and its drain: the
# limit only catches a hang (the session's timing is checked by order in the test).
@pytest.mark.timeout(150)
def test_ollama_split_and_the_session_deadline(tmp_path: Path, standin_env: None, make_relay: Any) -> None:
    """Split: one server over both GPUs (OLLAMA_SCHED_SPREAD=1). And a session that ends 12 s after
    READY (the deadline is set once the stack is up, so a slow start-up on a loaded machine changes
    nothing): the warning comes and starts the next session (DEPLOY_NEXT_SESSION_CMD, its output
    logged), no next bridge connects, so this one serves to the end, says so, then drains and stops
    by itself."""
    from . import procs

    relay = make_relay()
    out = io.StringIO()
    marker = tmp_path / "next-session-started"
    settings = _settings(
        tmp_path,
        "--mode",
        "ollama",
        "--gpu-mode",
        "split",
        "--kv-cache-type",
        "f16",
        "--export-env",
        "off",
        "--next-session-cmd",
        f"touch {marker} && echo next session asked for",
        env={"BRIDGE_RELAY": relay.ws_url, "BRIDGE_NODE_TOKEN": procs.NODE_TOKEN},
    )
    dep = Deployment(settings, out=out)
    dep.start_background(timeout=45)
    try:
        dep.deadline = Deadline(time.time(), hours=12 / 3600, warn_minutes=(0.17,), drain_minutes=0.1)
        assert dep.facts.mode == "split" and len(dep.facts.upstreams) == 1
        line = (dep.s.state_dir / "logs" / "ollama.log").read_text()
        assert "OLLAMA_SCHED_SPREAD=1" in line and "CUDA_VISIBLE_DEVICES= " in line
        assert "OLLAMA_KV_CACHE_TYPE=f16" in line
        assert "split as asked" in out.getvalue()
        assert dep.finished.wait(30), out.getvalue()  # stopped by itself at the deadline
    finally:
        dep.stop()
    text = out.getvalue()
    assert "WARNING: this run ends in " in text
    assert marker.exists() and "next-session command: next session asked for" in text
    assert "next-session command exited 0" in text
    assert "the next session's bridge has not connected to the relay: this session served to its end" in text
    assert text.index("served to its end") < text.index("the session's end: draining the bridge")
    assert text.index("draining the bridge") < text.index("stopped")
    assert dep.stop_reason == "the session's end"


@pytest.mark.timeout(60)
def test_ollama_behind_a_configured_relay(tmp_path: Path, standin_env: None, make_relay: Any) -> None:
    """The real topology: the relay runs elsewhere (BRIDGE_RELAY, BRIDGE_NODE_TOKEN, BRIDGE_KEY from
    the environment or Kaggle Secrets); the bridge dials it, and neither the relay's URL, the token nor
    the key is printed."""
    from . import procs

    relay = make_relay()
    out = io.StringIO()
    settings = _settings(
        tmp_path,
        "--mode",
        "ollama",
        "--export-env",
        "off",
        env={
            "BRIDGE_RELAY": relay.ws_url,
            "BRIDGE_NODE_TOKEN": procs.NODE_TOKEN,
            "BRIDGE_KEY": procs.API_KEY,
        },
    )
    dep = Deployment(settings, out=out)
    dep.start_background(timeout=45)
    try:
        assert relay.health()["node_connected"]
        with relay.client() as client:
            r = client.post(
                "/r/ollama/api/chat",
                json={
                    "model": "qwen3:8b",
                    "stream": False,
                    "messages": [{"role": "user", "content": "hi"}],
                    "options": {"num_predict": 4},
                },
            )
            assert r.status_code == 200 and r.json()["message"]["content"] == "w0 w1 w2 w3"
        text = out.getvalue()
        assert "open <your relay (BRIDGE_RELAY)>/ | key your BRIDGE_KEY (bk_...ly) | model qwen3:8b" in text
    finally:
        dep.stop()
    text = out.getvalue() + (dep.s.state_dir / "status.json").read_text()
    text += (dep.s.state_dir / "logs" / "deploy.log").read_text()
    for secret in (procs.NODE_TOKEN, procs.API_KEY, relay.ws_url, f"127.0.0.1:{relay.port}"):
        assert secret not in text
    assert "stopped" in text


def test_a_failed_start_says_why_and_leaves_nothing_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = subprocess.run(
        [
            *DEPLOY,
            "--mode",
            "ollama",
            "--ollama",
            str(tmp_path / "no-ollama"),
            "--webui",
            "off",
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 1
    assert "FAILED: --ollama" in r.stdout and "not found" in r.stdout
    status = json.loads((state / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("--ollama"), status
    assert "not found" in status["error"] and "\n" not in status["error"]
    assert not any(_alive(c["pid"]) for c in status["children"].values())  # the local relay it had started


@pytest.mark.timeout(90)
def test_a_new_run_stops_what_a_killed_run_left_behind(tmp_path: Path, standin_env: None) -> None:
    """A notebook kernel killed outright leaves its children running (their own sessions), holding
    the ports; the next run in the same state dir stops them first."""
    from deployment.engine import free_port

    state, port = tmp_path / "state", free_port()
    argv = [
        *DEPLOY,
        "--mode",
        "ollama",
        "--webui",
        "off",
        "--state-dir",
        str(state),
        "--ollama-port",
        str(port),
        "--gpu-mode",
        "split",
        "--health-interval",
        "0.5",
    ]
    first = Proc(argv, "deploy-1")
    try:
        first.wait_for("READY in", 60)
        orphans = {n: c["pid"] for n, c in _status(state)["children"].items()}
        assert set(orphans) == {"relay", "ollama", "bridge"}
        os.kill(first.popen.pid, signal.SIGKILL)  # the script only: its children live on
        first.wait(10)
        assert all(_alive(pid) for pid in orphans.values())
        second = Proc(argv, "deploy-2")
        try:
            second.wait_for("READY in", 60)  # it could bind the same Ollama port again
            for name, pid in orphans.items():
                assert (
                    f"stopped {name} (pid {pid}), left running by a previous run that died" in second.output
                )
            until(lambda: not any(_alive(pid) for pid in orphans.values()), 10, "the orphans to be gone")
        finally:
            second.signal(signal.SIGTERM)
            assert second.wait(30) == 0
    finally:
        first.stop()
        _kill_children(state)
        for pid in orphans.values() if "orphans" in locals() else []:
            if _alive(pid):  # the second run failed before it stopped them
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def test_status_and_stop_tell_a_killed_run_and_stop_what_it_left(tmp_path: Path) -> None:
    """A run killed outright (SIGKILL, a dead kernel) never writes its end: status.json keeps
    saying "ready" and its children run on. `status` says the run is gone; `stop` does not wait for
    an answer nobody will give (it waited 120 s): it stops what the run left and records the end.
    The run is stood in by its two files and a `sleep` for its engine."""
    from deployment.session import process_start

    state = tmp_path / "state"
    state.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    engine = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        owner = {"pid": dead.pid, "started": time.time() - 5}
        child = {"name": "ollama", "pid": engine.pid, "started": process_start(engine.pid), "argv0": "sleep"}
        (state / "children.json").write_text(json.dumps({"owner": owner, "children": [child]}))
        (state / "status.json").write_text(json.dumps({"state": "ready", "pid": dead.pid, "error": ""}))
        run = [*DEPLOY, "--state-dir", str(state)]
        said = subprocess.run([*run[:3], "status", *run[3:]], capture_output=True, text=True, timeout=60)
        assert said.returncode == 1
        assert f"the run that wrote this (pid {dead.pid}) is gone: it was killed while ready" in said.stdout
        said = subprocess.run([*run[:3], "stop", *run[3:]], capture_output=True, text=True, timeout=60)
        assert said.returncode == 0, said.stdout + said.stderr
        assert f"stopped ollama (pid {engine.pid}), left running by a previous run that died" in said.stdout
        assert engine.wait(10) == -signal.SIGKILL
        assert _status(state)["state"] == "failed"
        assert _status(state)["error"] == f"killed while ready (pid {dead.pid} gone)"
        said = subprocess.run([*run[:3], "stop", *run[3:]], capture_output=True, text=True, timeout=60)
        assert said.returncode == 1 and "the last one failed: killed while ready" in said.stdout
    finally:
        engine.kill()
        engine.wait()


# ------------------------------------------------------------------------------------ a run's states
class _Heard(Stack):
    """A stack whose messages a test can await (``said``)."""

    def __init__(self, settings: Settings, said: _Said) -> None:
        super().__init__(settings, io.StringIO())
        self.said = said

    def say(self, msg: str) -> None:
        super().say(msg)
        self.said(msg)


@pytest.mark.timeout(60)
async def test_the_next_session_starts_at_its_own_time_with_no_warnings(tmp_path: Path) -> None:
    """``--warn-minutes ''`` (no warnings): the next session still starts, at ``--next-minutes``
    (by default an hour) before the session's end. Before, it started with the first warning only,
    so without warnings it never did."""
    marker = tmp_path / "next-session-started"
    settings = _settings(
        tmp_path,
        "--warn-minutes",
        "",
        "--session-start",
        str(time.time()),
        "--session-hours",
        str(60 / 3600),  # ends in a minute: the handover is due at once, the drain far off
        "--drain-minutes",
        "0.05",
        "--reports-dir",
        str(tmp_path / "reports"),
        "--next-session-cmd",
        f"touch {marker}",
        env={**DEFAULT_ENV, "BRIDGE_RELAY": "ws://127.0.0.1:9"},  # nothing listens: no bridge comes
    )
    said = _Said()
    st = _Heard(settings, said)
    st.facts.url = "http://127.0.0.1:9/"
    assert st.deadline.warn_minutes == () and st.deadline.ends_with_session
    stop = asyncio.Event()
    serving_task = asyncio.create_task(serving.until_the_end(st, stop))
    try:
        await said.until("waiting for its bridge on the relay", timeout=20)
    finally:
        stop.set()
        await serving_task
    assert marker.exists() and st.facts.handover == "started, waiting for its bridge"
    assert not any("WARNING: this run ends" in line for line in said.lines)


@pytest.mark.timeout(60)
def test_status_says_starting_from_the_moment_a_run_begins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A killed run left ``"state": "ready"`` in status.json; a new run says ``starting`` (its pid
    and start) from its first moment, before the bring-up does anything, and ``python -m deployment
    status``/``stop`` read it (the stop is honoured during the bring-up). Before, the killed run's
    "ready" was shown until READY."""
    settings = _settings(tmp_path, "--export-env", "off")
    settings.state_dir.mkdir(parents=True)
    killed = {"state": "ready", "pid": 2**22 + 1, "time": time.time() - 3600, "url": "http://gone/"}
    (settings.state_dir / "status.json").write_text(json.dumps(killed))
    seen: list[dict[str, Any]] = []
    entered = threading.Event()

    async def bring_up(self: Deployment, sup: Any) -> None:
        seen.append(json.loads((self.s.state_dir / "status.json").read_text()))
        entered.set()
        await asyncio.Event().wait()  # a long download: until the stop cancels it

    monkeypatch.setattr(Deployment, "_bring_up", bring_up)
    dep = Deployment(settings, out=io.StringIO())
    dep.start_thread()
    try:
        assert entered.wait(30)
        assert seen[0]["state"] == "starting", seen[0]
        assert seen[0]["pid"] == os.getpid() and seen[0]["started_at"] == dep.run_started
        assert cli.main(["status", "--state-dir", str(settings.state_dir)]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "starting"
        assert cli.main(["stop", "--state-dir", str(settings.state_dir)]) == 0
        assert f"(pid {os.getpid()}, starting) to drain and stop" in capsys.readouterr().out
    finally:
        dep.stop(timeout=30)
    assert dep.finished.is_set() and dep.stop_reason == "python -m deployment stop"
    assert _status(settings.state_dir)["state"] == "stopped"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["bring-up", "serving", "nowhere"])
def test_a_failed_run_is_written_failed_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """status.json after a run that failed in the bring-up or in the serving loop: ``failed``, with
    the reason in one line and no secret; a run that ends as it should stays ``stopped``. Before, a
    failed run was written ``stopped``, like a clean one."""
    boom = RuntimeError(f"the engine refused the node token {NODE_TOKEN}\n  and more lines")

    async def bring_up(self: Deployment, sup: Any) -> None:
        if where == "bring-up":
            raise boom

    async def until_the_end(st: Stack, stop: asyncio.Event) -> None:
        if where == "serving":
            raise boom
        st.stop_reason = "--serve-minutes"

    monkeypatch.setattr(Deployment, "_bring_up", bring_up)
    monkeypatch.setattr(serving, "until_the_end", until_the_end)
    dep = Deployment(_settings(tmp_path, "--export-env", "off"), out=io.StringIO())
    code = dep.run()
    status = _status(dep.s.state_dir)
    text = (dep.s.state_dir / "status.json").read_text()
    if where == "nowhere":
        assert code == 0 and status["state"] == "stopped" and status["error"] == ""
        assert status["stop_reason"] == "--serve-minutes"
        return
    assert code == 1 and status["state"] == "failed", status
    assert status["error"] == f"the engine refused the node token {mask(NODE_TOKEN)}"
    assert NODE_TOKEN not in text and status["pid"] == os.getpid()
    # `stop` finds nothing to stop, and says why the last run ended
    assert cli.main(["stop", "--state-dir", str(dep.s.state_dir)]) == 1
    said = capsys.readouterr().out.strip()
    assert said == f"no running deployment (the last one failed: {status['error']})"


# ------------------------------------------------------------------------------------ embedded (real)
def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _assert_no_secrets(output: str, state_dir: Path) -> None:
    texts = {"output": output}
    for log in (state_dir / "logs").glob("*.log"):
        texts[log.name] = log.read_text(errors="replace")
    texts["status.json"] = (state_dir / "status.json").read_text()
    for name, text in texts.items():
        assert NODE_TOKEN not in text, f"{name} shows the node token"
        assert ADMIN_PASSWORD not in text, f"{name} shows the Open WebUI admin password"


def _kill_children(state: Path) -> None:
    """After a failed test: the script's children run in sessions of their own (nothing to do, and
    no pid to trust, once the script recorded a clean stop)."""
    status = _status(state)
    if status.get("state") in ("stopped", "failed"):  # its children were stopped
        return
    for child in status.get("children", {}).values():
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.killpg(child["pid"], signal.SIGKILL)


def _require_engine() -> None:
    from deployment.engine import engine_available

    why = engine_available()
    if why:
        pytest.fail(f"the embedded engine is missing: {why}")


def _status(state: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((state / "status.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def _start_embedded(tmp_path: Path, *extra: str) -> tuple[Proc, Path, str, str]:
    state = tmp_path / "state"
    proc = Proc(
        [
            *DEPLOY,
            "--mode",
            "embedded",
            "--model-file",
            "tiny",  # exact, instant output (the default is Gemma where it is installed)
            "--state-dir",
            str(state),
            "--health-interval",
            "0.5",
            "--drain-timeout",
            "5",
            *extra,
        ],
        "deploy",
        env={"BRIDGE_NODE_TOKEN": NODE_TOKEN, "DEPLOY_WEBUI_ADMIN_PASSWORD": ADMIN_PASSWORD},
    )
    m = proc.wait_for(r"READY in ([\d.]+) s: open (http://127\.0\.0\.1:\d+/) \| key (bk_\S+) ", timeout=240)
    return proc, state, m.group(2), m.group(3)


def _stream_chat(url: str, key: str, n: int = 8, prompt: str = "Say hello") -> list[str]:
    client = openai.OpenAI(base_url=url + "r/engine/v1", api_key=key, max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0, stream=True
    )
    return [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]


@pytest.mark.engine
@pytest.mark.timeout(180)
def test_embedded_stack_streams_restarts_and_drains(tmp_path: Path) -> None:
    _require_engine()
    started = time.monotonic()
    proc, state, url, key = _start_embedded(tmp_path, "--webui", "off")
    try:
        ready = time.monotonic() - started
        assert proc.wait_for(r"timings: ").string
        # a streamed answer through the relay with the openai client: 8 chunks, deterministic
        parts = _stream_chat(url, key)
        assert len(parts) == 8 and all(p.strip() for p in parts)
        # a wrong key is refused by the relay
        with pytest.raises(openai.AuthenticationError):
            _stream_chat(url, "bk_nope_not-a-key")

        # the supervisor restarts a killed child (the engine), health-checked, and it serves again
        before = _status(state)["children"]["engine"]
        os.killpg(before["pid"], signal.SIGKILL)
        mark = proc.mark()
        proc.wait_for(r"supervisor: engine exited with code -9; restarting in 1 s", 15, start=mark)
        proc.wait_for(r"supervisor: engine is back \(pid \d+\)", 60, start=mark)
        until(
            lambda: _status(state)["children"]["engine"]["restarts"] == 1,
            10,
            "status.json to count the restart",
        )
        after = _status(state)["children"]["engine"]
        assert after["pid"] != before["pid"] and _alive(after["pid"])
        # a new prompt (the relay would replay a repeated deterministic one without asking the engine)
        assert len(_stream_chat(url, key, 6, "Say hello again, after the restart")) == 6

        # the bridge too: killed, restarted on the same local port, connected to the relay again.
        # Its record of a request is written just after the answer's last chunk went out: wait for
        # the two so far before the SIGKILL (else the second can be lost with the process).
        until(lambda: len(_chat_records(state)) == 2, 15, "the bridge to log the two chats so far")
        bridge_pid = _status(state)["children"]["bridge"]["pid"]
        mark = proc.mark()
        os.killpg(bridge_pid, signal.SIGKILL)
        proc.wait_for(r"supervisor: bridge is back", 60, start=mark)
        until(
            lambda: httpx.get(url + "_relay/health").json()["node_connected"], 15, "the bridge to reconnect"
        )
        assert len(_stream_chat(url, key, 5, "And after the bridge's restart")) == 5

        # `status` from another process reads status.json; `stop` sends SIGTERM to the script
        shown = subprocess.run(
            [*DEPLOY, "status", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert json.loads(shown.stdout)["state"] == "ready"
        children = _status(state)["children"]
        subprocess.run(
            [*DEPLOY, "stop", "--state-dir", str(state)],
            check=True,
            capture_output=True,
            timeout=60,
            cwd=ROOT,
        )
        assert proc.wait(60) == 0
    finally:
        proc.stop()
        _kill_children(state)
    out = proc.output
    assert "draining the bridge" in out
    assert re.search(r"stopped \(python -m deployment stop\)$", out.rstrip()), out[-500:]
    bridge_log = (state / "logs" / "bridge.log").read_text()
    assert "draining" in bridge_log or "stopping" in bridge_log
    assert not any(_alive(c["pid"]) for c in children.values())
    chats = _chat_records(state)
    assert len(chats) == 3 and all(r["via"] == "tunnel" and r["status"] == 200 for r in chats)
    assert [r["completion_tokens"] for r in chats] == [8, 6, 5]
    assert json.loads((state / "reports" / "gpu_hours.json").read_text())["sessions"][0]["gpus"] == []
    _assert_no_secrets(out, state)
    print(f"embedded stack (no Open WebUI): ready in {ready:.1f} s")


def _chat_records(state: Path) -> list[dict[str, Any]]:
    """The bridge's records of chat completions so far (bridge-metrics.jsonl)."""
    log = state / "metrics" / "bridge-metrics.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return [r for r in records if r.get("kind") == "request" and r.get("path") == "/v1/chat/completions"]


def _require_webui() -> Path:
    from deployment import webui_setup

    venv = ROOT / ".venv-webui"
    if webui_setup.installed_version(venv) != webui_setup.OPEN_WEBUI_VERSION:
        pytest.fail(
            f"Open WebUI {webui_setup.OPEN_WEBUI_VERSION} is missing in {venv} "
            "(bash scripts/setup.d/20-open-webui.sh); deselect with -m 'not webui'"
        )
    return venv


def _webui_chat(url: str, key: str, model: str) -> None:
    """Through the relay (its key in X-Bridge-Key), signed in to Open WebUI by the relay's login (its
    trusted header: the body's address and password are not what counts): the local relay's key is
    Open WebUI's admin; the model is listed and a chat streams."""
    relay = httpx.Client(base_url=url.rstrip("/"), headers={"X-Bridge-Key": key}, timeout=60)
    r = relay.post("/api/v1/auths/signin", json={"email": "admin@localhost", "password": "not-this-one"})
    assert r.status_code == 200, r.text
    assert r.json()["email"].endswith("@relay.invalid") and r.json()["role"] == "admin", r.json()
    auth = {"Authorization": f"Bearer {r.json()['token']}"}
    assert [m["id"] for m in relay.get("/api/models", headers=auth).json()["data"]] == [model]
    body = {"model": model, "stream": True, "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]}
    with relay.stream("POST", "/api/chat/completions", headers=auth, json=body) as resp:
        assert resp.status_code == 200
        events = [x for x in resp.iter_lines() if x.startswith("data:") and "[DONE]" not in x]
    assert len([e for e in events if '"content"' in e]) >= 6


def _local_chats(state: Path, path: str) -> list[dict[str, Any]]:
    """Requests the bridge metered on its local endpoint (Open WebUI's)."""
    records = [json.loads(x) for x in (state / "metrics" / "bridge-metrics.jsonl").read_text().splitlines()]
    return [
        r for r in records if r.get("kind") == "request" and r.get("via") == "local" and r.get("path") == path
    ]


@pytest.mark.engine
@pytest.mark.webui
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_embedded_stack_with_open_webui(tmp_path: Path) -> None:
    """Open WebUI (from .venv-webui, scripts/setup.d/20-open-webui.sh) reaches the engine through the
    bridge's local endpoint (an OpenAI connection): its chats are metered there (``via: local``)."""
    _require_engine()
    venv = _require_webui()
    started = time.monotonic()
    proc, state, url, key = _start_embedded(tmp_path, "--webui", "on", "--webui-venv", str(venv))
    try:
        ready = time.monotonic() - started
        _webui_chat(url, key, "tiny")
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.stop()
        _kill_children(state)
    local = _local_chats(state, "/v1/chat/completions")
    assert local and local[-1]["route"] == "engine" and local[-1]["status"] == 200
    _assert_no_secrets(proc.output, state)
    print(f"embedded stack with Open WebUI: ready in {ready:.1f} s")


@pytest.mark.webui
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ollama_stack_with_open_webui(tmp_path: Path, standin_env: None) -> None:
    """The Ollama path with Open WebUI (an Ollama connection to the bridge's local endpoint, which
    balances the two stand-in replicas)."""
    venv = _require_webui()
    out = io.StringIO()
    dep = Deployment(
        _settings(
            tmp_path, "--mode", "ollama", "--webui", "on", "--webui-venv", str(venv), "--export-env", "off"
        ),
        out=out,
    )
    started = time.monotonic()
    dep.start_background(timeout=240)
    try:
        ready = time.monotonic() - started
        assert (
            "-> http://127.0.0.1:" in out.getvalue()
            and "/r/ollama (signed in by the relay's login; admin env-" in out.getvalue()
        )
        _webui_chat(dep.facts.url, dep.key, "qwen3:8b")
    finally:
        dep.stop()
    local = _local_chats(dep.s.state_dir, "/api/chat")
    assert local and local[-1]["route"] == "ollama" and local[-1]["upstream"] in dep.facts.upstreams
    _assert_no_secrets(out.getvalue(), dep.s.state_dir)
    print(f"Ollama stand-in stack with Open WebUI: ready in {ready:.1f} s")


# ------------------------------------------------------------------------------------ notebook
def test_notebook_is_a_settings_cell_and_a_serving_cell() -> None:
    """Two code cells: the settings (no secret, the repository's URL once), then the one that
    clones the project and serves; no cell after it could end the service."""
    nb = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 2
    assert all(not c.get("outputs") for c in code), "commit the notebook without outputs"
    settings, serve = (c.source for c in code)
    namespace: dict[str, Any] = {}
    exec(settings, namespace)  # plain assignments
    assert namespace["REPOSITORY"].startswith("https://github.com/")
    text = json.dumps(nb)
    assert text.count(namespace["REPOSITORY"]) == 1, "the repository's URL in one place"
    from deployment.notebook import settings_env

    assert settings_env(namespace["SETTINGS"])  # every name is a setting, none a secret
    assert "serve(SETTINGS)" in serve and "REPOSITORY" in serve and "sys.path" not in text
    for secret_name in ("BRIDGE_NODE_TOKEN", "DEPLOY_WEBUI_ADMIN_PASSWORD", "BRIDGE_KEY", "KAGGLE_KEY"):
        assert not re.search(secret_name + r"\s*[=:]", settings + serve), "a secret in the notebook"


@pytest.mark.timeout(180)
def test_serve_in_a_real_jupyter_kernel_with_validation(
    tmp_path: Path, standin_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deployment.notebook.serve() in a real IPython kernel (nbclient + ipykernel: the cell runs
    inside the kernel's event loop): it brings the stack up, runs the validation as an option of
    the flow while serving (the report shown in the cell), keeps serving with one live line until
    `python -m deployment stop` from outside, then drains and stops. The Ollama path on the
    stand-ins."""
    from nbclient import NotebookClient

    monkeypatch.setenv("STANDIN_TOKEN_DELAY", "0.002")
    monkeypatch.setenv("BRIDGE_NODE_TOKEN", NODE_TOKEN)
    monkeypatch.setenv("DEPLOY_WEBUI_ADMIN_PASSWORD", ADMIN_PASSWORD)
    state, reports = tmp_path / "state", tmp_path / "reports"
    settings = {
        "mode": "ollama",
        "webui": "off",
        "ollama_port": 0,
        "state_dir": str(state),
        "reports_dir": str(reports),
        "health_interval": 0.5,
        "drain_timeout": 5,
        "validate": True,
        "validate_args": "--case short-64 --repetitions 1 --concurrency 1",
    }
    cells = [f"%cd {ROOT}\nfrom deployment.notebook import serve", f"run = serve({settings!r})"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])  # type: ignore[no-untyped-call]
    client = NotebookClient(
        nb, timeout=150, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    failed: list[BaseException] = []

    def execute() -> None:
        try:
            client.execute()
        except BaseException as exc:
            failed.append(exc)

    started = time.monotonic()
    runner = threading.Thread(target=execute)
    runner.start()
    try:
        log = state / "logs" / "deploy.log"
        until(lambda: "validation: done" in _read(log) or not runner.is_alive(), 120, "the validation run")
        subprocess.run(
            [*DEPLOY, "stop", "--state-dir", str(state)],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=ROOT,
        )
    finally:
        runner.join(150)
    assert not failed, failed
    took = time.monotonic() - started
    outputs = nb.cells[1].outputs
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    displays = [o for o in outputs if o.output_type == "display_data"]
    assert (
        "READY in" in streams
        and "mode replicas x2" in streams
        and "placement: qwen3:8b is in VRAM" in streams
    )
    assert "validation: running `bridge validate`" in streams and "1 requests, 0 failed" in streams
    live = [d for d in displays if "text/plain" in d.data and "|" in d.data["text/plain"]]
    assert len(live) == 1, displays  # one line, updated in place
    assert (
        live[0].data["text/plain"].startswith("stopped (python -m deployment stop) | open http://127.0.0.1:")
    )
    assert any("short-64" in json.dumps(d.data) for d in displays)  # the report, shown as Markdown
    status = json.loads((state / "status.json").read_text())
    assert status["state"] == "stopped" and not any(_alive(c["pid"]) for c in status["children"].values())
    text = json.dumps(nb)
    assert NODE_TOKEN not in text and ADMIN_PASSWORD not in text
    print(f"serve() in a real kernel with a validation run: {took:.1f} s")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
