"""The validation report: ``report.md`` and PNG plots (matplotlib) from a run's ``results.json``,
and two runs side by side (``bridge validate --compare A B``).

Plots (medians with the p10-p90 spread as error bars or bands):
``ttft_vs_concurrency.png``, ``tokens_per_s_vs_concurrency.png`` (per request, and the aggregate
throughput of each batch), ``ttft_vs_prompt_length.png``, ``vram_over_time.png``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import spread

PLOTS = (
    "ttft_vs_concurrency.png",
    "tokens_per_s_vs_concurrency.png",
    "ttft_vs_prompt_length.png",
    "vram_over_time.png",
)


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - an install without the [report] extra
        raise RuntimeError("plots need matplotlib: pip install 'kaggle-bridge[validate]'") from exc
    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    return plt


def load(path: Path) -> dict[str, Any]:
    """A run's results: ``path`` is its folder or its results.json."""
    file = path / "results.json" if path.is_dir() else path
    data: dict[str, Any] = json.loads(file.read_text())
    return data


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _cell(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not stat:
        return "-"
    low, high = _fmt(stat["p10"], scale, digits), _fmt(stat["p90"], scale, digits)
    return f"{_fmt(stat['median'], scale, digits)} ({low}-{high})"


def _env_lines(env: dict[str, Any]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    nodes = env.get("nodes") or []
    gpus = (
        "; ".join(f"{n.get('node')}: {', '.join(n.get('gpus') or []) or 'no GPU'}" for n in nodes)
        or "unknown"
    )
    drivers = (
        "; ".join(
            f"{n.get('node')}: driver {n.get('driver') or '-'}, CUDA {n.get('cuda') or '-'}" for n in nodes
        )
        or "unknown"
    )
    for label, value in (
        ("model", env.get("model")),
        ("model digest", env.get("model_digest") or "-"),
        (
            "quantization / size",
            f"{env.get('model_quantization') or '-'} / {env.get('model_parameters') or '-'}",
        ),
        ("Ollama version", _ollama_version(env)),
        ("API", env.get("api")),
        ("GPU mode", env.get("gpu_mode") or "-"),
        ("GPUs", gpus),
        ("driver / CUDA", drivers),
        ("kaggle-bridge", f"{env.get('project_version')} (commit {env.get('git_commit') or 'unknown'})"),
        (
            "relay",
            f"{env.get('relay_url')} (route {env.get('route')}, relay {env.get('relay_version') or '-'})",
        ),
        ("client", f"{env.get('client_host')}, Python {env.get('python')}"),
        ("started", env.get("started_at")),
    ):
        lines.append(f"| {label} | {value} |")
    return lines


def _ollama_version(env: dict[str, Any]) -> str:
    """The Ollama version, and, where the Ollama API was the bridge's own layer over an
    OpenAI-compatible engine (``/api/version``'s ``served_by``), that it was: no Ollama ran."""
    version = env.get("ollama_version") or "-"
    if not env.get("ollama_served_by"):
        return version
    modes = {n.get("gpu_mode") for n in env.get("nodes") or []}
    engine = "the embedded llama.cpp engine" if "embedded" in modes else "an OpenAI-compatible engine"
    return f"{version} (the API it follows: the bridge's Ollama API over {engine}, no Ollama)"


def render_markdown(data: dict[str, Any]) -> str:
    suite = data["suite"]
    env = data["environment"]
    reqs = data["requests"]
    ok = [r for r in reqs if r["ok"]]
    joined = [r for r in ok if "bridge" in r]
    sources = {r.get("tokens_per_s_source") for r in ok if "tokens_per_s" in r}
    rate_from = {
        "engine": "the engine's own counters",
        "bridge": "the bridge next to the engine (the counters it saw, else its own clock)",
        "client": "the client's clock",
    }
    rates = "; ".join(rate_from[x] for x in ("engine", "bridge", "client") if x in sources) or "none measured"
    out = [
        f"# Validation run {data['run_id']}",
        "",
        f"Suite **{suite['version']}** (sha256 `{suite['sha256'][:12]}`), "
        f"temperature {suite['temperature']}, seed {suite['seed']}, {suite['repetitions']} repetition(s), "
        f"concurrency {', '.join(str(c) for c in suite['concurrency'])}; "
        f"{len(reqs)} requests ({len(reqs) - len(ok)} failed), "
        "one warm-up request not counted. Times are what the client saw through the relay "
        f"(its TTFT includes the tunnel); decode rates per request are from {rates}.",
        "",
        "## Environment",
        "",
        *_env_lines(env),
        "",
        "## Results (median, p10-p90 in brackets)",
        "",
        "| concurrency | case | n | errors | TTFT ms | bridge TTFT ms | tunnel ms | decode tok/s per request "
        "| aggregate tok/s | prompt tokens | completion tokens | total s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["summary"]:
        out.append(
            f"| {row['concurrency']} | {row['case']} | {row['requests']} | {row['errors']} "
            f"| {_cell(row['ttft_s'], 1000, 0)} | {_cell(row.get('bridge_ttft_s'), 1000, 0)} "
            f"| {_cell(row.get('tunnel_ttft_overhead_s'), 1000, 1)} | {_cell(row['tokens_per_s'])} "
            f"| {_cell(row['throughput_tokens_per_s'])} | {_cell(row['prompt_tokens'], 1, 0)} "
            f"| {_cell(row['completion_tokens'], 1, 0)} | {_cell(row['total_s'], 1, 2)} |"
        )
    out += [
        "",
        "## By concurrency (all cases)",
        "",
        "| concurrency | TTFT ms | decode tok/s | aggregate tok/s |",
        "|---:|---:|---:|---:|",
    ]
    for level in suite["concurrency"]:
        rs = [r for r in ok if r["concurrency"] == level]
        bs = [b for b in data["batches"] if b["concurrency"] == level]
        out.append(
            f"| {level} | {_cell(spread([r['ttft_s'] for r in rs if 'ttft_s' in r]), 1000, 0)} "
            f"| {_cell(spread([r['tokens_per_s'] for r in rs if 'tokens_per_s' in r]))} "
            f"| {_cell(spread([b['throughput_tokens_per_s'] for b in bs]))} |"
        )
    samples = data.get("samples") or []
    gpu_peaks: dict[str, float] = {}
    for s in samples:
        for g in s.get("gpus") or []:
            key = f"{s.get('node')} GPU {g.get('index')} ({g.get('name', '')})"
            used = g.get("memory_used_bytes")
            if isinstance(used, int | float):
                gpu_peaks[key] = max(gpu_peaks.get(key, 0.0), float(used))
    out += ["", "## GPU memory", ""]
    if gpu_peaks:
        for key, peak in sorted(gpu_peaks.items()):
            out.append(f"- {key}: peak {peak / 2**30:.2f} GiB used")
    else:
        reasons = {n.get("no_gpu") for n in env.get("nodes") or [] if n.get("no_gpu")}
        out.append(f"No GPU samples ({'; '.join(sorted(reasons)) or 'no bridge reported a GPU'}).")
    out += [
        "",
        "## Cross-check",
        "",
        f"{len(joined)} of {len(ok)} requests joined to the bridge's JSONL log by `X-Request-Id`"
        + (
            "; completion tokens agree for "
            f"{sum(1 for r in joined if r['bridge'].get('completion_tokens') == r['completion_tokens'])}."
            if joined
            else " (run with `--bridge-log` on the bridge's machine to join them)."
        ),
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in PLOTS],
        "",
    ]
    return "\n".join(out)


def _errorbar(
    ax: Any, xs: Sequence[float], stats: list[dict[str, float] | None], label: str, scale: float = 1.0
) -> None:
    pts = [(x, s) for x, s in zip(xs, stats, strict=True) if s]
    if not pts:
        return
    x = [p[0] for p in pts]
    med = [p[1]["median"] * scale for p in pts]
    lo = [(p[1]["median"] - p[1]["p10"]) * scale for p in pts]
    hi = [(p[1]["p90"] - p[1]["median"]) * scale for p in pts]
    ax.errorbar(x, med, yerr=[lo, hi], marker="o", capsize=4, label=label)


def write_plots(data: dict[str, Any], out: Path) -> list[Path]:
    plt = _plt()
    levels = data["suite"]["concurrency"]
    cases = [c["id"] for c in data["suite"]["cases"]]
    rows = {(r["concurrency"], r["case"]): r for r in data["summary"]}
    title = f"{data['environment'].get('model')} ({data['environment'].get('gpu_mode') or 'gpu mode -'})"
    made = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for case in cases:
        _errorbar(ax, levels, [rows.get((lv, case), {}).get("ttft_s") for lv in levels], case, 1000)
    ax.set(xlabel="concurrent requests", ylabel="time to first token (ms, client)", title=f"TTFT: {title}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(lv) for lv in levels])
    ax.grid(alpha=0.3)
    ax.legend()
    made.append(_save(plt, fig, out / PLOTS[0]))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for case in cases:
        _errorbar(a1, levels, [rows.get((lv, case), {}).get("tokens_per_s") for lv in levels], case)
        _errorbar(
            a2, levels, [rows.get((lv, case), {}).get("throughput_tokens_per_s") for lv in levels], case
        )
    a1.set(xlabel="concurrent requests", ylabel="decode tokens/s per request", title="per request")
    a2.set(xlabel="concurrent requests", ylabel="tokens/s, all requests together", title="aggregate")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(levels, [str(lv) for lv in levels])
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"Decoding: {title}")
    made.append(_save(plt, fig, out / PLOTS[1]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    timed = [r for r in data["requests"] if r["ok"] and "ttft_s" in r]
    # Prompt length in tokens where the engine reported them for every request (an OpenAI-style
    # stream without ``usage`` reports none), else in characters.
    length_key, length_label = "prompt_tokens", "prompt tokens"
    if not timed or not all("prompt_tokens" in r for r in timed):
        length_key, length_label = "prompt_chars", "prompt characters (the engine reported no token counts)"
    for level in levels:
        pts = [
            (r[length_key], r["ttft_s"] * 1000)
            for r in timed
            if r["concurrency"] == level and length_key in r
        ]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"concurrency {level}", alpha=0.7)
    ax.set(
        xlabel=length_label,
        ylabel="time to first token (ms, client)",
        title=f"TTFT vs prompt length: {title}",
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    made.append(_save(plt, fig, out / PLOTS[2]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for s in data.get("samples") or []:
        for g in s.get("gpus") or []:
            used = g.get("memory_used_bytes")
            if isinstance(used, int | float):
                series.setdefault(f"{s.get('node')} GPU {g.get('index')}", []).append((s["t"], used / 2**30))
    ylabel = "GPU memory used (GiB)"
    if not series:  # no GPU: show the host's memory instead, and say so
        ylabel = "host memory used (GiB): no GPU reported"
        for s in data.get("samples") or []:
            if isinstance(s.get("ram_used_bytes"), int | float):
                series.setdefault(f"{s.get('node')} host RAM", []).append(
                    (s["t"], s["ram_used_bytes"] / 2**30)
                )
    for name, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no samples from any bridge", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="seconds since the run started", ylabel=ylabel, title=f"Memory: {title}")
    ax.grid(alpha=0.3)
    made.append(_save(plt, fig, out / PLOTS[3]))
    return made


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(data: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_plots(data, out)
    path = out / "report.md"
    path.write_text(render_markdown(data))
    return path


# ---------------------------------------------------------------------------------- comparison
def compare(a_path: Path, b_path: Path, out: Path | None = None) -> str:
    """Two runs side by side: a markdown table by concurrency (and a plot when ``out`` is given)."""
    a, b = load(a_path), load(b_path)
    la = a["environment"].get("gpu_mode") or a_path.name or "A"
    lb = b["environment"].get("gpu_mode") or b_path.name or "B"
    if la == lb:
        la, lb = f"A ({la})", f"B ({lb})"

    def by_level(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
        rows: dict[int, dict[str, Any]] = {}
        ok = [r for r in data["requests"] if r["ok"]]
        for level in data["suite"]["concurrency"]:
            rows[level] = {
                "ttft_s": spread([r["ttft_s"] for r in ok if r["concurrency"] == level and "ttft_s" in r]),
                "tokens_per_s": spread(
                    [r["tokens_per_s"] for r in ok if r["concurrency"] == level and "tokens_per_s" in r]
                ),
                "throughput": spread(
                    [x["throughput_tokens_per_s"] for x in data["batches"] if x["concurrency"] == level]
                ),
            }
        return rows

    ra, rb = by_level(a), by_level(b)
    levels = sorted(set(ra) | set(rb))
    lines = [
        f"# {la} vs {lb}",
        "",
        f"- {la}: run {a['run_id']}, model {a['environment'].get('model')}, suite {a['suite']['version']}, "
        f"{len(a['requests'])} requests, commit {a['environment'].get('git_commit') or '-'}",
        f"- {lb}: run {b['run_id']}, model {b['environment'].get('model')}, suite {b['suite']['version']}, "
        f"{len(b['requests'])} requests, commit {b['environment'].get('git_commit') or '-'}",
        "",
        f"| concurrency | TTFT ms {la} | TTFT ms {lb} | decode tok/s {la} | decode tok/s {lb} "
        f"| aggregate tok/s {la} | aggregate tok/s {lb} | aggregate {lb}/{la} |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        x, y = ra.get(level, {}), rb.get(level, {})
        ratio = "-"
        if x.get("throughput") and y.get("throughput") and x["throughput"]["median"]:
            ratio = f"{y['throughput']['median'] / x['throughput']['median']:.2f}x"
        lines.append(
            f"| {level} | {_cell(x.get('ttft_s'), 1000, 0)} | {_cell(y.get('ttft_s'), 1000, 0)} "
            f"| {_cell(x.get('tokens_per_s'))} | {_cell(y.get('tokens_per_s'))} "
            f"| {_cell(x.get('throughput'))} | {_cell(y.get('throughput'))} | {ratio} |"
        )
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        plt = _plt()
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for label, rows in ((la, ra), (lb, rb)):
            lv = sorted(rows)
            _errorbar(a1, lv, [rows[v]["ttft_s"] for v in lv], label, 1000)
            _errorbar(a2, lv, [rows[v]["throughput"] for v in lv], label)
        a1.set(xlabel="concurrent requests", ylabel="TTFT (ms)", title="time to first token")
        a2.set(
            xlabel="concurrent requests",
            ylabel="tokens/s, all requests together",
            title="aggregate throughput",
        )
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(v) for v in levels])
            ax.grid(alpha=0.3)
            ax.legend()
        _save(plt, fig, out / "compare.png")
        (out / "compare.md").write_text(text + "\n![compare](compare.png)\n")
    return text
