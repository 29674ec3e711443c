"""Where Ollama runs the model, GPU or CPU, and why.

After the warm-up, ``/api/ps`` says where the model lives: ``size_vram`` equal to ``size`` is all in
VRAM, 0 is the CPU (fields of ``ProcessModelResponse``, ``api/types.go`` at v0.20.0). Why it is on the
CPU is in the server's log: at start it prints one ``msg="inference compute"`` line per device it
will use, with ``library=CUDA``, ``libdirs=ollama,cuda_v12`` and the CUDA driver version, or a single
``library=cpu`` line when it found none (``discover/types.go`` ``LogDetails`` at v0.20.0). On a
driver older than 531 Ollama 0.20.0 runs on the CPU without a word (ollama #12770): :func:`check`
says so, with the driver and what the log says, for the READY and status lines.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import httpx

from deployment import gpus as gpumod
from deployment.ollama_setup import loaded


@dataclass(frozen=True)
class Placement:
    """Where a loaded model lives, from ``/api/ps``."""

    model: str
    size: int
    size_vram: int

    @property
    def on_gpu(self) -> bool:
        return self.size > 0 and self.size_vram >= self.size

    @property
    def where(self) -> str:
        if self.on_gpu:
            return "GPU"
        if self.size_vram <= 0:
            return "CPU"
        return f"partly CPU ({100 * self.size_vram / max(1, self.size):.0f}% in VRAM)"


def placement(base: str, model: str) -> Placement | None:
    """The model's entry in ``/api/ps`` (None when it is not loaded)."""
    for m in loaded(base):
        if model in (m.get("name"), m.get("model")):
            return Placement(model, int(m.get("size") or 0), int(m.get("size_vram") or 0))
    return None


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def inference_compute(log_text: str) -> list[dict[str, str]]:
    """The ``msg="inference compute"`` lines of the last start in an ``ollama serve`` log (the
    supervisor marks each start with ``=== ... start``), as ``{key: value}``."""
    last = log_text.rsplit("\n=== ", 1)[-1]
    found = []
    for line in last.splitlines():
        if 'msg="inference compute"' not in line:
            continue
        found.append({k: v.strip('"') for k, v in _FIELD.findall(line)})
    return found


def describe_compute(lines: list[dict[str, str]]) -> str:
    """``CUDA (cuda_v12, compute 7.5, CUDA driver 12.8) x2`` or ``cpu``; "" when the log had none."""
    if not lines:
        return ""
    if all(x.get("library", "").lower() == "cpu" for x in lines):
        return "cpu"
    gpu = [x for x in lines if x.get("library", "").lower() != "cpu"]
    first = gpu[0]
    libs = ",".join(d for d in first.get("libdirs", "").split(",") if d and d != "ollama")
    text = (
        f"{first.get('library', '?')} ({libs or 'no libdir'}, compute {first.get('compute', '?')}, "
        f"CUDA driver {first.get('driver', '?')})"
    )
    return text + (f" x{len(gpu)}" if len(gpu) > 1 else "")


@dataclass(frozen=True)
class Verdict:
    """What :func:`check` found: for the status line (``text``) and the log (``message``)."""

    on_cpu: bool
    text: str
    message: str


def check(urls: list[str], names: list[str], model: str, gpus: list[gpumod.Gpu], logs: Path) -> Verdict:
    """After the warm-up: each server's ``/api/ps`` says whether the model sits in VRAM; when it
    does not, say so and why (the GPUs Ollama found, the driver, the CUDA library it picked, from
    each server's log ``<logs>/<name>.log``)."""
    where: list[str] = []
    compute: list[str] = []
    cpu = False
    for url, name in zip(urls, names, strict=True):
        try:
            p = placement(url, model)
        except httpx.HTTPError as exc:
            where.append(f"{name}: /api/ps failed ({exc})")
            continue
        with contextlib.suppress(OSError):
            log = (logs / f"{name}.log").read_text(errors="replace")
            compute.append(describe_compute(inference_compute(log)))
        if p is None:
            where.append(f"{name}: {model} not loaded")
            cpu = True
        elif not p.on_gpu:
            where.append(f"{name}: {p.where}")
            cpu = True
    libs = sorted({c for c in compute if c})
    if not cpu:
        return Verdict(
            False,
            "GPU" + (f" ({'; '.join(libs)})" if libs else ""),
            f"placement: {model} is in VRAM on every server ({', '.join(libs) or 'library unknown'})",
        )
    why = []
    if not gpus:
        why.append("no GPU visible (nvidia-smi/NVML found none: is the accelerator on?)")
    problem = gpumod.driver_problem(gpus)
    if problem:
        why.append(problem)
    if "cpu" in libs:
        why.append("Ollama's log: inference compute library=cpu (it found no usable GPU)")
    elif libs:
        why.append(f"Ollama uses {', '.join(libs)} but the model does not fit: see the gpu mode")
    return Verdict(
        True,
        "RUNNING ON CPU: " + "; ".join([*where, *why]),
        f"WARNING: {model} is RUNNING ON CPU (slow): {'; '.join(where)}. Why: "
        + ("; ".join(why) or "unknown")
        + f". Logs: {logs}/ollama*.log; `python -m deployment doctor` checks the driver.",
    )
