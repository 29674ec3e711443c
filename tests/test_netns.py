"""A bad network between bridge and relay, for real: the bridge and its upstream run in their own
network namespace, joined to the relay by a veth pair whose links are impaired with the kernel's
own tools. ``tc`` shapes the bandwidth (tbf), ``tc netem`` adds delay where the kernel has it, and
nftables drops packets at random (loss) or all of them (a link that stops passing packets without
closing). What must hold: streams finish intact through a slow or lossy link without a false alarm,
and a dead link is noticed by the heartbeats within seconds on both sides, with every client
stream failing cleanly, then recovers.

Needs root and iproute2 (else skipped, with the reason: marked may_skip); packet loss needs nftables too (the
blackhole falls back to setting the link down without it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .procs import API_KEY, NODE_TOKEN, Proc, bridge_cmd, until

pytestmark = [
    pytest.mark.netns,
    # Root, a kernel with tbf/netem and nftables are the machine's, not the project's: these tests
    # skip (the reason printed by -rfEs) where they cannot run; any other test's skip fails.
    pytest.mark.may_skip(reason="needs root, iproute2, the kernel's tbf/netem qdiscs and nftables"),
]

HEARTBEAT = 1.0  # seconds: a link silent for 3 heartbeats is dead


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@dataclass
class Net:
    ns: str
    host_dev: str  # the relay's end of the veth (host namespace)
    ns_dev: str  # the bridge's end (inside ns)
    host_ip: str
    relay: Proc
    bridge: Proc
    upstream: Proc

    @property
    def url(self) -> str:
        port = self.relay.wait_for(r"relay listening on http://[\d.]+:(\d+)").group(1)
        return f"http://{self.host_ip}:{port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)

    def health(self) -> dict[str, object]:
        data: dict[str, object] = httpx.get(self.url + "/_relay/health", timeout=10).json()
        return data

    def nft(self, rules: str) -> None:
        """Replace the namespace's impairment table with ``rules`` (nft syntax, inside the chains)."""
        _sh("ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", "impair", check=False)
        if rules:
            script = (
                "table inet impair {\n"
                f"  chain out {{ type filter hook output priority 0; policy accept; {rules} }}\n"
                f"  chain in {{ type filter hook input priority 0; policy accept; {rules} }}\n"
                "}\n"
            )
            subprocess.run(
                ["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=script, text=True, check=True
            )

    def blackhole(self, on: bool) -> None:
        """Stop passing packets, without closing anything (no FIN, no RST), or pass them again:
        an nftables drop-all where nft is installed, else the bridge's end of the link set down."""
        if shutil.which("nft"):
            self.nft("drop;" if on else "")
        else:
            _ip("-n", self.ns, "link", "set", self.ns_dev, "down" if on else "up")

    def tc(self, *qdisc: str) -> None:
        """Set the root qdisc of both ends of the link (none: the default)."""
        for netns, dev in ((None, self.host_dev), (self.ns, self.ns_dev)):
            prefix = ["-n", netns] if netns else []
            _ip(*prefix, "link", "show", dev)
            subprocess.run(
                ["tc", *(["-n", netns] if netns else []), "qdisc", "del", "dev", dev, "root"],
                capture_output=True,
                check=False,
            )
            if qdisc:
                subprocess.run(
                    ["tc", *(["-n", netns] if netns else []), "qdisc", "add", "dev", dev, "root", *qdisc],
                    capture_output=True,
                    text=True,
                    check=True,
                )

    def connected(self) -> bool:
        return bool(self.health()["node_connected"])


def _tc_supports(net: Net, kind: str, *args: str) -> bool:
    """Whether this kernel has a qdisc (tried on the relay's end of the link, then removed)."""
    added = _sh("tc", "qdisc", "add", "dev", net.host_dev, "root", kind, *args, check=False).returncode == 0
    _sh("tc", "qdisc", "del", "dev", net.host_dev, "root", check=False)
    return added


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs root, iproute2 (ip) and tc")
    tag = f"{os.getpid() % 100000}"
    ns, host_dev, ns_dev = f"kbt{tag}", f"kbh{tag}", f"kbn{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    host_ip, ns_ip = f"{subnet}.1", f"{subnet}.2"
    made = _ip("netns", "add", ns, check=False)
    if made.returncode:
        pytest.skip(f"`ip netns add` failed: {made.stderr.strip()}")
    procs: list[Proc] = []
    data = Path(tempfile.mkdtemp(prefix="netns-relay-"))
    try:
        _ip("link", "add", host_dev, "type", "veth", "peer", "name", ns_dev)
        _ip("link", "set", ns_dev, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_dev)
        _ip("link", "set", host_dev, "up")
        _ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_dev)
        _ip("-n", ns, "link", "set", ns_dev, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        in_ns = ["ip", "netns", "exec", ns]
        upstream = Proc(
            [*in_ns, sys.executable, "-m", "tests.upstreams", "--port", "0", "--token-delay", "0.02"],
            "upstream",
        )
        procs.append(upstream)
        up_port = upstream.wait_for(r"^READY (\d+)").group(1)
        relay = Proc(
            bridge_cmd(
                "relay",
                "--host",
                host_ip,
                "--port",
                "0",
                "--data-dir",
                str(data),
                "--node-token",
                NODE_TOKEN,
                "--api-keys",
                API_KEY,
                "--heartbeat",
                str(HEARTBEAT),
                "--grace",
                "20",
                "--log-level",
                "debug",
            ),
            "relay",
        )
        procs.append(relay)
        port = relay.wait_for(r"relay listening on http://[\d.]+:(\d+)").group(1)
        bridge = Proc(
            [
                *in_ns,
                *bridge_cmd(
                    "connect",
                    "--relay",
                    f"ws://{host_ip}:{port}",
                    "--node-token",
                    NODE_TOKEN,
                    "--route",
                    f"up=http://127.0.0.1:{up_port}",
                    "--backoff-max",
                    "1",
                    "--log-level",
                    "debug",
                ),
            ],
            "bridge",
        )
        procs.append(bridge)
        relay.wait_for(r"bridge \S+ connected from " + ns_ip.replace(".", r"\."), 30)
        yield Net(ns, host_dev, ns_dev, host_ip, relay, bridge, upstream)
    finally:
        for proc in procs:
            proc.stop()
        _ip("link", "del", host_dev, check=False)
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(data, ignore_errors=True)
    for proc in procs:
        assert NODE_TOKEN not in proc.output and API_KEY not in proc.output


def _expected_bytes(n: int) -> str:
    block = bytes(range(256)) * 256
    return hashlib.sha256((block * (n // len(block) + 1))[:n]).hexdigest()


def _no_false_alarm(net: Net, relay_mark: int, bridge_mark: int) -> None:
    relay_after = "\n".join(net.relay.lines[relay_mark:])
    bridge_after = "\n".join(net.bridge.lines[bridge_mark:])
    assert "bridge silent" not in relay_after and "disconnected" not in relay_after, relay_after[-2000:]
    assert "no word from the relay" not in bridge_after and "lost the relay" not in bridge_after


def test_bandwidth_cap_streams_finish_intact_and_heartbeats_hold(net: Net) -> None:
    if not _tc_supports(net, "tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"):
        pytest.skip("this kernel has no tbf qdisc")
    relay_mark, bridge_mark = net.relay.mark(), net.bridge.mark()
    net.tc("tbf", "rate", "4mbit", "burst", "32kbit", "latency", "2s")
    try:
        size = 1_500_000  # 3 s at 4 Mbit/s: the link is saturated for longer than a heartbeat timeout
        with net.client() as c:
            t = time.monotonic()
            r = c.get(f"/r/up/bytes/{size}")
            took = time.monotonic() - t
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == _expected_bytes(size)
            assert took > size * 8 / 4e6 * 0.7, f"{took:.1f} s: the cap was not in force"
            print(f"\n4 Mbit/s cap: {size} bytes in {took:.1f} s")
            with c.stream("GET", "/r/up/stream", params={"n": 30, "interval": 0.02}) as s:
                lines = [line for line in s.iter_lines() if line]
            assert len(lines) == 30
    finally:
        net.tc()
    _no_false_alarm(net, relay_mark, bridge_mark)


def test_delay_streams_finish_and_heartbeats_hold(net: Net) -> None:
    if not _tc_supports(net, "netem", "delay", "10ms"):
        pytest.skip("this kernel has no tc netem (CONFIG_NET_SCH_NETEM is not set)")
    relay_mark, bridge_mark = net.relay.mark(), net.bridge.mark()
    net.tc("netem", "delay", "150ms", "30ms")
    try:
        with net.client() as c:
            t = time.monotonic()
            assert c.get("/r/up/small").status_code == 200
            assert time.monotonic() - t > 0.25  # two crossings of the delayed link
            with c.stream("GET", "/r/up/stream", params={"n": 60, "interval": 0.05}) as s:
                assert len([line for line in s.iter_lines() if line]) == 60
    finally:
        net.tc()
    _no_false_alarm(net, relay_mark, bridge_mark)


def _need_nft() -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs nftables (apt-get install nftables) for random packet loss")


def test_random_packet_loss_streams_finish_intact_without_false_alarms(net: Net) -> None:
    _need_nft()
    relay_mark, bridge_mark = net.relay.mark(), net.bridge.mark()
    net.nft("numgen random mod 100 < 5 drop;")  # 5 % of packets each way
    try:
        with net.client() as c:
            for _ in range(5):
                with c.stream("GET", "/r/up/stream", params={"n": 40, "interval": 0.02}) as s:
                    assert [int(line.split(":")[1].split(",")[0]) for line in s.iter_lines() if line] == list(
                        range(40)
                    )
            size = 500_000
            r = c.get(f"/r/up/bytes/{size}")
            assert hashlib.sha256(r.content).hexdigest() == _expected_bytes(size)
            r = c.post("/r/up/sha256", content=b"y" * size)
            assert r.json() == {"sha256": hashlib.sha256(b"y" * size).hexdigest(), "length": size}
    finally:
        net.nft("")
    _no_false_alarm(net, relay_mark, bridge_mark)


def test_blackholed_link_is_noticed_within_seconds_and_streams_fail_cleanly(net: Net) -> None:
    until(net.connected, 30, "the bridge to be connected")
    relay_mark, bridge_mark = net.relay.mark(), net.bridge.mark()
    lines: list[str] = []
    cut_at = 0.0
    with net.client() as c, c.stream("GET", "/r/up/stream", params={"n": 400, "interval": 0.05}) as s:
        assert s.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # a broken body, never a clean end
            for line in s.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    net.blackhole(True)  # nothing passes any more; no FIN, no RST
                    cut_at = time.monotonic()
        failed_after = time.monotonic() - cut_at
    try:
        assert 3 <= len(lines) < 400
        assert failed_after < 3 * HEARTBEAT + 3, f"the client waited {failed_after:.1f} s"
        net.relay.wait_for(r"bridge silent", 3 * HEARTBEAT + 3, start=relay_mark)
        relay_noticed = time.monotonic() - cut_at
        net.bridge.wait_for(r"no word from the relay", 3 * HEARTBEAT + 3, start=bridge_mark)
        bridge_noticed = time.monotonic() - cut_at
        print(
            f"\nblackhole: client error after {failed_after:.1f} s, relay noticed by {relay_noticed:.1f} s,"
            f" bridge by {bridge_noticed:.1f} s (heartbeat {HEARTBEAT:g} s)"
        )
        health = net.health()
        assert health["node_connected"] is False and health["requests_in_flight"] == 0
    finally:
        net.blackhole(False)
    healed = time.monotonic()
    net.relay.wait_for(r"bridge \S+ connected from", 15, start=relay_mark)
    print(f"reconnected {time.monotonic() - healed:.1f} s after the link healed")
    assert time.monotonic() - healed < 10
    with net.client() as c:
        assert c.get("/r/up/small").status_code == 200
