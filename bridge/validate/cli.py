"""``bridge validate``: its flags, and the run or comparison they ask for."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import relay_url
from ..errors import ConfigError
from ..options import FOLDER, fail, log_level, opt, setup_logging


@click.command()
@opt(
    "--relay",
    "relay",
    env="RELAY",
    default="",
    help="The relay as a user reaches it: http(s):// (or the ws(s):// URL a bridge dials).",
)
@opt(
    "--relay-url",
    env="RELAY_URL",
    default="",
    hidden=True,
    help="Deprecated name of --relay (BRIDGE_RELAY_URL: use BRIDGE_RELAY).",
)
@opt("--key", env="KEY", default="", help="A client key for the relay.")
@opt("--model", env="MODEL", default="", help="The model to validate (e.g. qwen3:8b).")
@opt("--out", env="OUT", type=FOLDER, help="Folder for report.md, results.json and the plots.")
@opt("--suite", env="SUITE", default="v1", show_default=True, help="Prompt suite: a name or a JSON file.")
@opt("--repetitions", env="REPETITIONS", default=None, type=int, help="Repetitions (default: the suite's).")
@opt("--concurrency", env="CONCURRENCY", default="", help="Comma-separated levels (default: the suite's).")
@opt("--seed", env="SEED", default=None, type=int, help="Sampling seed (default: the suite's).")
@opt("--route", "route_name", env="VALIDATE_ROUTE", default="ollama", show_default=True, help="Relay route.")
@opt(
    "--api",
    env="API",
    default="ollama",
    show_default=True,
    type=click.Choice(["ollama", "openai"]),
    help="Client: Ollama's API or the OpenAI-compatible one.",
)
@opt("--gpu-mode", env="GPU_MODE", default="", help="Label the run (split, replicas, ...).")
@opt(
    "--bridge-log",
    env="METRICS_DIR",
    type=click.Path(path_type=Path),
    help="The bridge's --metrics-dir (or its JSONL file) to join per request, on the bridge's machine.",
)
@opt("--case", "cases", env="CASES", multiple=True, help="Only this case id (repeatable).")
@opt(
    "--compare",
    env="COMPARE",
    nargs=2,
    default=None,
    type=click.Path(exists=True, path_type=Path),
    help="Compare two finished runs (folders) side by side instead of running.",
)
@log_level
def validate(
    relay: str,
    relay_url: str,
    key: str,
    model: str,
    out: Path | None,
    suite: str,
    repetitions: int | None,
    concurrency: str,
    seed: int | None,
    route_name: str,
    api: str,
    gpu_mode: str,
    bridge_log: Path | None,
    cases: tuple[str, ...],
    compare: tuple[Path, Path] | None,
    log_level: str,
) -> None:
    """A reproducible validation run through the relay: report.md, results.json and plots."""
    setup_logging(log_level)
    from ..node.metering import LOG_NAME
    from .report import compare as compare_runs
    from .runner import Settings
    from .runner import run as run_validation

    try:
        if compare:
            click.echo(compare_runs(compare[0], compare[1], out))
            if out is not None:
                click.echo(f"written: {out / 'compare.md'}")
            return
        if not relay and relay_url:
            click.echo(
                "warning: --relay-url and BRIDGE_RELAY_URL are deprecated: use --relay or BRIDGE_RELAY "
                "(the name `bridge connect` uses for the same relay)",
                err=True,
            )
            relay = relay_url
        missing = [n for n, v in (("--relay", relay), ("--key", key), ("--model", model)) if not v]
        if missing or out is None:
            raise ConfigError(f"missing {', '.join(missing + ([] if out else ['--out']))}")
        try:
            levels = tuple(int(c) for c in concurrency.replace(" ", "").split(",") if c) or None
        except ValueError:
            raise ConfigError(f"--concurrency {concurrency!r}: expected numbers like 1,2,4,8") from None
        if bridge_log is not None and bridge_log.is_dir():
            bridge_log = bridge_log / LOG_NAME
        data = run_validation(
            Settings(
                relay_url=relay_url_for_clients(relay),
                key=key,
                model=model,
                out=out,
                suite=suite,
                route=route_name,
                api=api,
                repetitions=repetitions,
                concurrency=levels,
                seed=seed,
                gpu_mode=gpu_mode,
                bridge_log=bridge_log,
                cases=cases,
            )
        )
        failed = sum(1 for r in data["requests"] if not r["ok"])
        click.echo(f"validation {data['run_id']}: {len(data['requests'])} requests, {failed} failed")
        click.echo(f"report: {out / 'report.md'}")
        if failed:
            raise SystemExit(1)
    except ConfigError as exc:
        fail(exc)


def relay_url_for_clients(relay: str) -> str:
    """The relay's URL as HTTP clients reach it (a ws(s):// URL given for it becomes http(s)://)."""
    return relay_url(relay, "http")
