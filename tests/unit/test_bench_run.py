"""benchmarks/run.py's pure parts for paired A/B runs (--baseline-src, --rounds): the routes' order
per round, the medians over rounds, the ratios paired by round, the tables' columns and the
options. No process is started."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = _load()


def _small(c1_p50: float, rps: float) -> dict[str, Any]:
    return {"body_bytes": 1024, "c1_ms": {"n": 200, "p50": c1_p50}, "c64_rps": rps, "c64_cpu_s": {}}


def _round(tunnel: tuple[float, float], baseline: tuple[float, float], frp: tuple[float, float]) -> Any:
    return {
        "small": {
            "direct": _small(0.5, 4000.0),
            "tunnel": _small(*tunnel),
            "baseline": _small(*baseline),
            "frp": _small(*frp),
        }
    }


# ------------------------------------------------------------------------------------------- rounds
def test_rounds_alternate_the_order_of_the_routes() -> None:
    routes = ["direct", "tunnel", "baseline", "frp"]
    orders = [run.round_order(routes, i) for i in range(4)]
    assert orders[0] == orders[2] == routes
    assert orders[1] == orders[3] == ["direct", "frp", "baseline", "tunnel"]
    for a, b in (("tunnel", "baseline"), ("tunnel", "frp")):  # each goes first in one of two rounds
        firsts = [next(r for r in order if r in (a, b)) for order in orders[:2]]
        assert sorted(firsts) == sorted([a, b])
    assert routes == ["direct", "tunnel", "baseline", "frp"]  # not reordered in place


def test_an_a_b_alone_swaps_places_and_no_route_runs_twice_in_a_row() -> None:
    routes = ["direct", "tunnel", "baseline"]
    orders = [run.round_order(routes, i) for i in range(4)]
    assert orders[:2] == [["direct", "tunnel", "baseline"], ["direct", "baseline", "tunnel"]]
    sequence = [r for order in orders for r in order]
    assert all(a != b for a, b in itertools.pairwise(sequence))
    assert run.round_order(["direct"], 1) == ["direct"]


def test_one_round_comes_back_unchanged() -> None:
    one = _round((1.234, 1500.0), (1.1, 1600.0), (0.6, 3000.0))
    one["small"]["tunnel"]["runs"] = [1.0, 2.0]
    assert run.median_results([one]) == one


def test_medians_over_rounds_keep_the_shape() -> None:
    rounds = [
        _round((1.0, 1000.0), (2.0, 900.0), (0.5, 3000.0)),
        _round((3.0, 1200.0), (2.2, 800.0), (0.7, 2000.0)),
        _round((2.0, 1100.0), (2.4, 700.0), (0.6, 2500.0)),
    ]
    merged = run.median_results(rounds)
    assert merged["small"]["tunnel"]["c1_ms"] == {"n": 200, "p50": 2.0}
    assert merged["small"]["baseline"]["c64_rps"] == 800.0
    assert merged["small"]["frp"]["c1_ms"]["p50"] == 0.6
    assert merged["small"]["tunnel"]["c64_cpu_s"] == {}
    # an even number of rounds: the mean of the middle two
    assert run.median_results(rounds[:2])["small"]["tunnel"]["c1_ms"]["p50"] == 2.0


def test_a_failed_round_leaves_the_others_median() -> None:
    ok = {"bulk": {"tunnel": {"download_MiB_s": 100.0, "download_runs": [100.0]}}}
    also = {"bulk": {"tunnel": {"download_MiB_s": 300.0, "download_runs": [300.0]}}}
    failed = {"bulk": {"tunnel": {"failed": "TimeoutError()", "download_MiB_s": None}}}
    merged = run.median_results([ok, failed, also])
    assert merged["bulk"]["tunnel"]["download_MiB_s"] == 200.0  # None is not a number
    assert merged["bulk"]["tunnel"]["download_runs"] == [100.0]  # lists: the first round's
    assert merged["bulk"]["tunnel"]["failed"] == "TimeoutError()"


def test_ratios_are_paired_within_each_round() -> None:
    # the tunnel is 10 % slower than the baseline in every round while the load moves both by up to
    # a factor of 3 between rounds: paired by round, 1.10 with no spread
    rounds = [
        _round((1.1, 1000.0), (1.0, 1100.0), (0.5, 2000.0)),
        _round((3.3, 500.0), (3.0, 550.0), (1.5, 1000.0)),
        _round((2.2, 400.0), (2.0, 440.0), (2.2, 400.0)),
    ]
    rows = [run.table_rows(r, run.QUICK, run.Errors(), run.table_routes(["baseline"])) for r in rounds]
    vs_base = run.paired_ratios(rows, "tunnel", "baseline")
    c1 = vs_base["small GET c=1 p50 ms (n=200)"]
    assert (c1.median, c1.low, c1.high, c1.rounds) == pytest.approx((1.1, 1.1, 1.1, 3))
    vs_frp = run.paired_ratios(rows, "tunnel", "frp")["small GET c=64 req/s"]
    assert (vs_frp.median, vs_frp.low, vs_frp.high) == pytest.approx((0.5, 0.5, 1.0))
    assert "failed requests / errors" not in vs_base  # counts are not ratios
    table = run.paired_table(rows, ["direct", "tunnel", "baseline", "frp"])
    assert table.splitlines()[0] == (
        "| metric | tunnel/baseline median (min-max) | tunnel/frp median (min-max) |"
    )
    assert "| small GET c=1 p50 ms (n=200) | 1.10x (1.10-1.10) | 2.20x (1.00-2.20) |" in table


def test_a_ratio_missing_in_a_round_is_left_out() -> None:
    rounds = [
        _round((1.2, 1000.0), (1.0, 1000.0), (0.5, 2000.0)),
        _round((1.2, 1000.0), (1.0, 1000.0), (0.5, 2000.0)),
    ]
    rounds[1]["small"]["baseline"] = {"failed": "RuntimeError()"}
    rows = [run.table_rows(r, run.QUICK, run.Errors(), run.table_routes(["baseline"])) for r in rounds]
    c1 = run.paired_ratios(rows, "tunnel", "baseline")["small GET c=1 p50 ms (n=200)"]
    assert c1.rounds == 1 and c1.median == pytest.approx(1.2)
    rows[0] = rows[1]
    assert run.paired_ratios(rows, "tunnel", "baseline")["small GET c=1 p50 ms (n=200)"] is None
    assert "| small GET c=1 p50 ms (n=200) | — |" in run.paired_table(rows, ["tunnel", "baseline"])


def test_no_pair_no_paired_table() -> None:
    rows = [run.table_rows(_round((1, 1), (1, 1), (1, 1)), run.QUICK, run.Errors())]
    assert run.paired_table(rows, ["direct", "tunnel"]) == ""


# ------------------------------------------------------------------------------------------- tables
def test_the_table_keeps_its_columns_without_a_baseline() -> None:
    text = run.table(_round((1.0, 1.0), (2.0, 2.0), (0.5, 3.0)), run.QUICK, run.Errors())
    assert text.splitlines()[:2] == [
        "| metric | direct | tunnel | frp | tunnel/direct | frp/direct |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    assert "| small GET c=1 p50 ms (n=200) | 0.50 | 1.00 | 0.50 | 2.00x | 1.00x |" in text


def test_the_baseline_gets_a_column_and_a_ratio_to_the_tunnel() -> None:
    routes = run.table_routes(["direct", "tunnel", "baseline"])
    assert routes == ("direct", "tunnel", "baseline", "frp")
    errors = run.Errors()
    errors.add("baseline/small", "status 502")
    text = run.table(_round((1.0, 1.0), (0.8, 2.0), (0.5, 3.0)), run.QUICK, errors, routes)
    lines = text.splitlines()
    assert lines[0] == (
        "| metric | direct | tunnel | baseline | frp | tunnel/direct | baseline/direct | frp/direct "
        "| tunnel/baseline |"
    )
    assert lines[1] == "|---" + "|---:" * 8 + "|"
    assert (
        "| small GET c=1 p50 ms (n=200) | 0.50 | 1.00 | 0.80 | 0.50 | 2.00x | 1.60x | 1.00x | 1.25x |"
        in lines
    )
    assert "| failed requests / errors | 0 | 0 | 1 | 0 | — | — | — | — |" in lines


def test_rss_rows_read_the_baselines_own_processes() -> None:
    rss = {
        "tunnel": {"peak_kib": {"relay": 2048, "bridge": 4096}},
        "baseline": {"peak_kib": {"relay": 1024, "bridge": 4096}},
        "_idle": {"relay": 1024, "baseline-relay": 2048, "bridge": 1024, "baseline-bridge": 1024},
    }
    rows = run.table_rows({"rss": rss}, run.QUICK, run.Errors(), run.table_routes(["baseline"]))
    by_metric = {row.metric: row for row in rows}
    assert by_metric["RSS MiB idle at start, relay / frps"].values["baseline"] == 2.0
    assert by_metric["RSS MiB peak, 200 open streams, relay / frps"].values == {
        "tunnel": 2.0,
        "baseline": 1.0,
        "frp": None,
    }
    assert run.proc_name("baseline", "relay") == "baseline-relay"
    assert run.proc_name("tunnel", "relay") == "relay"


def test_the_floor_comes_last_with_its_ratio_and_its_own_processes() -> None:
    routes = run.table_routes(["direct", "tunnel", "frp", "pump"])
    assert routes == ("direct", "tunnel", "frp", "pump")
    results = _round((1.0, 1.0), (2.0, 2.0), (0.5, 3.0))
    results["small"]["pump"] = _small(0.25, 8000.0)
    lines = run.table(results, run.QUICK, run.Errors(), routes).splitlines()
    head = (
        "| metric | direct | tunnel | frp | pump | tunnel/direct | frp/direct | pump/direct | tunnel/pump |"
    )
    assert lines[0] == head
    assert (
        "| small GET c=1 p50 ms (n=200) | 0.50 | 1.00 | 0.50 | 0.25 | 2.00x | 1.00x | 0.50x | 4.00x |"
        in lines
    )
    rss = {"pump": {"peak_kib": {"pump-front": 1024, "pump-back": 3072}}, "_idle": {"pump-back": 2048}}
    by_metric = {row.metric: row for row in run.table_rows({"rss": rss}, run.QUICK, run.Errors(), routes)}
    assert by_metric["RSS MiB peak, 200 open streams, relay / frps"].values["pump"] == 1.0
    assert by_metric["RSS MiB idle at start, bridge / frpc"].values["pump"] == 2.0
    assert (
        run.paired_table(
            [run.table_rows(results, run.QUICK, run.Errors(), routes)], list(routes)
        ).splitlines()[0]
        == "| metric | tunnel/frp median (min-max) | tunnel/pump median (min-max) |"
    )
    assert run.parse_args(["--routes", "tunnel,pump"]).routes == ["direct", "tunnel", "pump"]


def test_the_floor_pump_carries_bytes_both_ways(tmp_path: Path) -> None:
    """benchmarks/pump.py, the real process, in front of a plain echo server."""
    import socket
    import threading

    echo = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    def serve() -> None:  # every connection: start_pump's readiness probe connects too
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=answer, args=(echo.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    procs = run.Procs(tmp_path)
    try:
        _, port = run.start_pump(procs, "pump-front", echo.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            payload = b"abc" * 50_000
            client.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += client.recv(65536)
            assert got == payload.upper()
    finally:
        procs.stop_all()
        echo.close()


# ------------------------------------------------------------------------------------------- options
def test_without_the_new_options_nothing_changes() -> None:
    args = run.parse_args([])
    assert args.rounds == 1 and args.baseline_src is None
    assert args.routes == ["direct", "tunnel", "frp"]


def test_the_baseline_route_comes_right_after_the_tunnel() -> None:
    args = run.parse_args(["--baseline-src", "/tmp/base", "--rounds", "6", "--only", "small"])
    assert args.baseline_src == Path("/tmp/base")
    assert args.rounds == 6
    assert args.routes == ["direct", "tunnel", "baseline", "frp"]
    args = run.parse_args(["--routes", "tunnel", "--baseline-src", "/tmp/base"])
    assert args.routes == ["direct", "tunnel", "baseline"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "--rounds: at least 1"),
        (["--rounds", "x"], "invalid int value"),
        (["--routes", "frp", "--baseline-src", "/tmp/base"], "the tunnel route"),
        (["--routes", "baseline"], "unknown route 'baseline'"),
    ],
)
def test_bad_options_say_what_is_wrong(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_baseline_without_a_bridge_package_is_refused(tmp_path: Path) -> None:
    assert run.check_src("--baseline-src", tmp_path) == f"--baseline-src {tmp_path} has no bridge/cli.py"
    (tmp_path / "bridge").mkdir()
    (tmp_path / "bridge" / "cli.py").write_text("")
    assert run.check_src("--baseline-src", tmp_path) is None
