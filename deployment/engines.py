"""The engine: Ollama (the real path: a GPU and internet) or the embedded llama.cpp engine.

``--mode ollama``: ``ollama`` found or installed (``ollama_setup``), the model pulled by a server of
its own and its shape read, then the GPU mode decided (``gpus.decide``: one server per GPU, or one
over all of them), each server started, warmed (the first user request pays no load) and checked
for where the model sits (``placement``). ``--mode embedded``: llama-cpp-python's server behind
``engine_server.py`` on Gemma 3 270M, a tiny generated model, or ``--model-file``. Each returns the
URLs the bridge's engine route gets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployment import engine as eng
from deployment import gpus as gpumod
from deployment import ollama_setup, placement
from deployment.children import child_env
from deployment.engine import free_port
from deployment.engine_server import DIALOGUE_FORMAT
from deployment.settings import DEFAULT_OLLAMA_MODEL, Settings
from deployment.stack import Stack
from deployment.supervisor import ChildSpec, Supervisor


# ---------------------------------------------------------------------------------------- embedded
async def start_embedded(st: Stack, sup: Supervisor) -> str:
    """The embedded llama.cpp engine (llama-cpp-python's server, OpenAI's API only) on
    ``--model-file``: Gemma 3 270M from PyPI where installed, else the tiny generated model, else
    the file given. Returns its URL."""
    why = eng.engine_available()
    if why:
        raise RuntimeError(f"the embedded engine cannot run: {why}")
    s = st.s
    choice = s.model_file or "auto"
    notice = ""
    if choice in ("auto", "gemma"):
        why = eng.gemma_available()
        if why and choice == "gemma":
            raise RuntimeError(f"--model-file gemma: {why}")
        if why:
            st.say(f"engine: Gemma is not installed ({why}): serving the generated tiny model")
            choice = "tiny"
        else:
            choice = "gemma"
    model_id = s.model or None
    chat_format = None if s.chat_format == "auto" else s.chat_format
    if choice == "gemma":
        model_file = await asyncio.to_thread(eng.gemma_model_file, s.cache_dir / "models")
        model_id = model_id or eng.GEMMA_MODEL_ID
        notice = eng.GEMMA_NOTICE
        if s.chat_format == "auto":
            chat_format = eng.GEMMA_CHAT_FORMAT
    elif choice == "tiny":
        model_file = s.state_dir / "models" / "tiny.gguf"
        if not model_file.exists():
            model_file.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(eng.make_tiny_model, model_file, seed=0)
            st.say(f"engine: wrote the tiny model {model_file}")
    else:
        model_file = Path(choice)
        if s.chat_format == "auto" and not await asyncio.to_thread(eng.has_chat_template, model_file):
            chat_format = DIALOGUE_FORMAT
    port = free_port()
    n_ctx = min(s.num_ctx, eng.TINY_CONTEXT) if choice == "tiny" else s.num_ctx
    engine = eng.EmbeddedEngine(
        model_file,
        port=port,
        n_ctx=n_ctx,
        model_id=model_id,
        log_path=st.logs / "engine.log",
        chat_format=chat_format,
        max_queue=s.engine_queue,
        prompt_cache_mib=s.prompt_cache,
    )
    st.facts.model = engine.model
    st.facts.engine = "llama.cpp (llama-cpp-python), CPU"
    st.facts.placement = "CPU (the embedded engine)"
    await sup.add(
        ChildSpec(
            "engine",
            engine.command(),
            child_env(OMP_NUM_THREADS=str(engine.n_threads)),
            st.logs / "engine.log",
            # answered without waiting for the model: 503 only when it holds a request and makes
            # no progress (deployment/engine_server.py); the supervisor tells busy from hung
            health_url=engine.health_url,
            ready_timeout=s.ready_timeout,
        )
    )
    st.say(
        f"engine: llama.cpp on {engine.url} serving {engine.model} ({model_file.name}"
        f"{', chat format ' + chat_format if chat_format else ''}; "
        f"queue bound {s.engine_queue or 'none'}; prompt cache {s.prompt_cache} MiB)"
        + (f"; {notice}" if notice else "")
    )
    return engine.url


# ---------------------------------------------------------------------------------------- Ollama
def ollama_env(
    s: Settings, port: int, models: Path, *, gpu: int | None = None, spread: bool = False
) -> dict[str, str]:
    """One Ollama server's settings. Flash attention on: it is what lets the KV cache be quantised,
    and saves memory at long contexts. KV cache q8_0 by default: half the memory of f16 for a
    quality loss too small to measure in chat; q4_0 only for very long contexts."""
    env = child_env(
        OLLAMA_HOST=f"127.0.0.1:{port}",
        OLLAMA_MODELS=str(models),
        OLLAMA_FLASH_ATTENTION="1" if s.flash_attention else "0",
        OLLAMA_KV_CACHE_TYPE=s.kv_cache_type if s.flash_attention else "f16",
        OLLAMA_CONTEXT_LENGTH=str(s.num_ctx),
        OLLAMA_NUM_PARALLEL=str(s.num_parallel),
        OLLAMA_KEEP_ALIVE="-1",
        OLLAMA_MAX_LOADED_MODELS="1",
    )
    if spread:
        env["OLLAMA_SCHED_SPREAD"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


async def start_ollama(st: Stack, sup: Supervisor) -> list[str]:
    """Ollama: found or installed, the model pulled by a server of its own, the GPU mode decided
    (``gpus.decide``), then one server per GPU or one over all, each warmed. Returns their URLs."""
    s = st.s
    model = s.model or DEFAULT_OLLAMA_MODEL
    st.facts.model = model
    exe = await asyncio.to_thread(
        ollama_setup.find_ollama,
        s.ollama,
        s.cache_dir,
        st.say,
        version=s.ollama_version,
        url=s.ollama_url,
        sha256=s.ollama_sha256,
        out=st.progress_out,
        cancel=st.cancel,
    )
    version = await asyncio.to_thread(ollama_setup.version_of, str(exe))
    st.facts.engine = f"Ollama {version}" if version else "Ollama"
    st.say(f"ollama: {exe} ({version or 'version unknown'})")
    st.mark("install")
    models = s.cache_dir / "ollama-models"
    models.mkdir(parents=True, exist_ok=True)

    # pull with a server of its own (no GPU work), then decide how to use the GPUs
    port = free_port()
    pull_url = f"http://127.0.0.1:{port}"
    puller = await sup.add(
        ChildSpec(
            "ollama-pull",
            [str(exe), "serve"],
            ollama_env(s, port, models),
            st.logs / "ollama-pull.log",
            health_url=pull_url + "/api/version",
            ready_timeout=120,
        )
    )
    try:
        size = await asyncio.to_thread(ollama_setup.has_model, pull_url, model)
        if size is None:
            st.say(f"pulling {model}")
            await asyncio.to_thread(ollama_setup.pull, pull_url, model, st.say, st.progress_out, st.cancel)
            size = await asyncio.to_thread(ollama_setup.has_model, pull_url, model) or 0
        else:
            st.say(f"{model}: already pulled ({size / 1e9:.2f} GB)")
        st.mark("pull")
        shown = await asyncio.to_thread(ollama_setup.show, pull_url, model)
    finally:
        await puller.stop()
        sup.children.remove(puller)
    facts = gpumod.facts_from_show(model, size, shown) or gpumod.KNOWN_MODELS.get(model)
    if facts is None:
        facts = gpumod.ModelFacts(model, size, 1, 0, 0)  # unknown shape: weights only
    decision = gpumod.decide(
        s.gpu_mode,
        facts,
        st.gpus,
        num_ctx=s.num_ctx,
        num_parallel=s.num_parallel,
        kv_type=s.kv_cache_type if s.flash_attention else "f16",
    )
    st.facts.mode = decision.mode
    st.facts.decision = decision.reason
    st.say(f"gpu mode: {decision.reason}")

    # the servers: one per GPU (replicas) or one over all of them (split, single, cpu)
    base = s.ollama_port
    urls: list[str] = []
    names: list[str] = []
    for i in range(decision.replicas):
        port = base + i if base else free_port()
        url = f"http://127.0.0.1:{port}"
        if decision.mode == "replicas":
            env = ollama_env(s, port, models, gpu=st.gpus[i].index)
            name = f"ollama-gpu{st.gpus[i].index}"
        else:
            env = ollama_env(s, port, models, spread=decision.mode == "split")
            name = "ollama"
        await sup.add(
            ChildSpec(
                name,
                [str(exe), "serve"],
                env,
                st.logs / f"{name}.log",
                health_url=url + "/api/version",
                ready_timeout=120,
                on_ready=_warmer(st, url, model, name),
            )
        )
        urls.append(url)
        names.append(name)
    # warm every server at once: the first user request must not pay the load
    started = time.monotonic()
    took = await asyncio.gather(*(asyncio.to_thread(ollama_setup.warm, u, model) for u in urls))
    st.say(
        "warm: "
        + ", ".join(f"{u} {t:.1f} s" for u, t in zip(urls, took, strict=True))
        + f" (all {time.monotonic() - started:.1f} s); kept loaded (keep_alive -1)"
    )
    st.mark("warm")
    verdict = await asyncio.to_thread(placement.check, urls, names, model, st.gpus, st.logs)
    st.facts.on_cpu = verdict.on_cpu
    st.facts.placement = verdict.text
    st.say(verdict.message)
    return urls


def _warmer(st: Stack, url: str, model: str, name: str) -> Callable[[], Any]:
    """Loads the model again in a restarted server (its ``on_ready``)."""

    async def warm() -> None:
        took = await asyncio.to_thread(ollama_setup.warm, url, model)
        st.say(f"{name}: {model} loaded again in {took:.1f} s")

    return warm
