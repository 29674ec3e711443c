"""GPUs: what is there (NVML, else ``nvidia-smi``), and the ``--gpu-mode auto`` decision.

The decision is a pure function of the model's facts, the context asked for and the GPUs' memory,
so it is unit-tested without a GPU. Memory needed on one GPU, as Ollama (llama.cpp) allocates it:

    weights + KV cache + overhead
    KV cache = 2 (K and V) x layers x kv_heads x head_dim x bytes per value x num_ctx x num_parallel
    overhead = 0.75 GiB (CUDA context, compute graph at this batch size) + 5 % of the weights

Bytes per KV value: f16 2, q8_0 34/32 (1.0625), q4_0 18/32 (0.5625). Qwen3-8B (36 layers, 8 KV heads
x 128): 144 KiB a token in f16, 76.5 KiB in q8_0. A GPU counts with 95 % of its free memory.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
MIB = 1024**2

#: Bytes per cached K or V value, by ``OLLAMA_KV_CACHE_TYPE``.
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
#: Fixed part of the per-GPU overhead (CUDA context + compute buffers).
OVERHEAD_FIXED = int(0.75 * GIB)
#: Part of the weights added to the overhead (output layer copies, alignment).
OVERHEAD_WEIGHTS = 0.05
#: Share of a GPU's free memory the plan may use.
USABLE = 0.95
#: Oldest NVIDIA driver Ollama's CUDA libraries run on ("driver version 531 and newer",
#: ollama/ollama docs/gpu.mdx at v0.20.0); below it Ollama silently runs on the CPU (ollama #12770).
MIN_DRIVER = 531


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    total: int  # bytes
    used: int  # bytes
    driver: str = ""  # the NVIDIA driver's version, e.g. "550.90.07"

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the memory plan needs to know about a model."""

    name: str
    weights: int  # bytes of the GGUF file
    layers: int
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, kv_type: str = "f16") -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES[kv_type]


#: Facts of models we deploy by default, for a decision before (or without) ``/api/show``.
KNOWN_MODELS = {
    "qwen3:8b": ModelFacts("qwen3:8b", 5_027_784_512, 36, 8, 128),
}


@dataclass(frozen=True, slots=True)
class Decision:
    mode: str  # "replicas", "split", "single" (one GPU) or "cpu" (none)
    replicas: int  # Ollama servers to start
    need: int  # bytes one copy of the model needs
    reason: str


def need_bytes(model: ModelFacts, num_ctx: int, num_parallel: int, kv_type: str) -> int:
    kv = model.kv_bytes_per_token(kv_type) * num_ctx * max(1, num_parallel)
    return int(model.weights + kv + OVERHEAD_FIXED + OVERHEAD_WEIGHTS * model.weights)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def decide(
    requested: str,
    model: ModelFacts,
    gpus: list[Gpu],
    *,
    num_ctx: int,
    num_parallel: int,
    kv_type: str,
) -> Decision:
    """Pick how to use the GPUs. ``requested``: ``auto``, ``split`` or ``replicas``."""
    if requested not in ("auto", "split", "replicas"):
        raise ValueError(f"gpu mode {requested!r}: expected auto, split or replicas")
    need = need_bytes(model, num_ctx, num_parallel, kv_type)
    kv = model.kv_bytes_per_token(kv_type) * num_ctx * max(1, num_parallel)
    sizes = (
        f"{model.name} needs about {_gib(need)} (weights {_gib(model.weights)} + KV cache {_gib(kv)} "
        f"for {num_ctx} tokens x {num_parallel} parallel in {kv_type} + overhead)"
    )
    if not gpus:
        return Decision("cpu", 1, need, f"no GPU found: one Ollama on the CPU; {sizes}")
    room = min(int(g.free * USABLE) for g in gpus)
    total_room = sum(int(g.free * USABLE) for g in gpus)
    fits_one = need <= room
    where = f"the smallest GPU has {_gib(room)} usable"
    if len(gpus) == 1:
        note = "fits" if fits_one else "does NOT fit: Ollama will offload layers to the CPU (slow)"
        return Decision("single", 1, need, f"one GPU: {sizes}; {where}: it {note}")
    if requested == "replicas":
        note = "" if fits_one else "; WARNING: it does not fit one GPU, each replica will offload to the CPU"
        return Decision("replicas", len(gpus), need, f"replicas as asked: {sizes}; {where}{note}")
    if requested == "split":
        note = "" if need <= total_room else "; WARNING: it does not fit all GPUs together either"
        return Decision("split", 1, need, f"split as asked: {sizes}; {len(gpus)} GPUs{note}")
    if fits_one:
        return Decision(
            "replicas",
            len(gpus),
            need,
            f"auto chose replicas (one Ollama per GPU, balanced by the bridge; about {len(gpus)}x the "
            f"throughput of a split): {sizes}; {where}, so it fits one GPU",
        )
    note = "" if need <= total_room else "; WARNING: not even all GPUs together hold it (CPU offload)"
    return Decision(
        "split",
        1,
        need,
        f"auto chose split (one Ollama, layers spread over {len(gpus)} GPUs): {sizes}; {where}, "
        f"so it does not fit one GPU{note}",
    )


def query(nvidia_smi: str = "nvidia-smi") -> list[Gpu]:
    """The GPUs and their memory now: NVML first, then ``nvidia-smi``; empty when neither works."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            out = []
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else str(driver)
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                name = pynvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                out.append(Gpu(i, name, int(mem.total), int(mem.used), driver))
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    exe = shutil.which(nvidia_smi)
    if exe is None:
        return []
    try:
        text = subprocess.run(
            [
                exe,
                "--query-gpu=index,name,memory.total,memory.used,driver_version",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(text)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    gpus = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 4:
            continue
        try:
            idx, name, total, used = (c.strip() for c in row[:4])
            driver = row[4].strip() if len(row) > 4 else ""
            gpus.append(Gpu(int(idx), name, int(float(total)) * MIB, int(float(used)) * MIB, driver))
        except ValueError:
            continue
    return gpus


def driver_major(version: str) -> int | None:
    """``550`` of ``"550.90.07"``; None when unknown."""
    head = version.split(".", 1)[0].strip()
    return int(head) if head.isdigit() else None


def driver_problem(gpus: list[Gpu]) -> str:
    """Why Ollama would not use these GPUs' driver ("" when it would, or when unknown)."""
    for g in gpus:
        major = driver_major(g.driver)
        if major is not None and major < MIN_DRIVER:
            return (
                f"NVIDIA driver {g.driver} is older than {MIN_DRIVER}, the oldest Ollama's CUDA libraries "
                "run on: Ollama falls back to the CPU"
            )
    return ""


def describe_vram(gpus: list[Gpu]) -> str:
    if not gpus:
        return "no GPU"
    return " ".join(f"GPU{g.index} {g.used / GIB:.1f}/{g.total / GIB:.1f} GiB" for g in gpus)


def facts_from_show(name: str, weights: int, show: Mapping[str, Any]) -> ModelFacts | None:
    """Model facts from Ollama's ``/api/show`` ``model_info`` (``<arch>.block_count``, ...)."""
    info = show.get("model_info")
    if not isinstance(info, dict):
        return None
    arch = str(info.get("general.architecture", ""))

    def num(key: str) -> int | None:
        value = info.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int | float) else None

    layers = num("block_count")
    heads = num("attention.head_count")
    kv_heads = num("attention.head_count_kv") or heads
    head_dim = num("attention.key_length")
    if head_dim is None and heads:
        emb = num("embedding_length")
        head_dim = emb // heads if emb else None
    if not (layers and kv_heads and head_dim):
        return None
    return ModelFacts(name, weights, layers, kv_heads, head_dim)
