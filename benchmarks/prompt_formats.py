"""Which prompt format gets answers out of a base model: the Gemma 3 270M GGUF from PyPI (no chat
template in its metadata) on llama-cpp-python, greedy (temperature 0, repeat penalty 1.1 as the
server's chat default), for a few chat formats, over questions with a known answer and the
validation suite's (bridge/validate/prompts/v1.json) four prompts. Prints one line per format and every
answer::

    .venv/bin/python benchmarks/prompt_formats.py [--max-tokens 96] [--format NAME ...]

Needs scripts/setup.d/30-llama-cpp.sh and 35-gemma.sh. Columns: answered (non-empty), on topic (the
answer matches a pattern for the question), echoes (repeats the question), stopped (ended by itself
before max_tokens), repeated (share of word 3-grams seen before in the same answer, mean), tokens
(all answers) and seconds. The chosen format is ``dialogue`` (deployment/engine_server.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployment.engine import gemma_model_file  # noqa: E402
from deployment.engine_server import DIALOGUE_EXAMPLES, format_dialogue  # noqa: E402

Format = Callable[[str], tuple[str, list[str]]]

QUESTIONS: list[tuple[str, str]] = [
    ("What is the capital of France?", r"paris"),
    ("How many legs does a spider have?", r"eight|\b8\b"),
    ("Name the largest planet in the solar system.", r"jupiter"),
    ("What is 2 + 3?", r"\b5\b|five"),
    ("Say hello in one short sentence.", r"hello|\bhi\b"),
    ("Give me a synonym for 'happy'.", r"joy|glad|cheer|content|pleased|delight"),
]


def suite_prompts() -> list[tuple[str, str]]:
    suite = json.loads((ROOT / "bridge" / "validate" / "prompts" / "v1.json").read_text())
    out = []
    for case in suite["cases"]:
        text = suite["paragraph"] * int(case.get("paragraph_repeat", 0)) + case["prompt"]
        out.append((text, r"sky|light|scatter|lighthouse|bottle|memory|bandwidth|t4|token|card"))
    return out


def _fewshot_qa(q: str) -> tuple[str, list[str]]:
    shots = "".join(f"Question: {a}\nAnswer: {b}\n\n" for a, b in DIALOGUE_EXAMPLES)
    return f"{shots}Question: {q}\nAnswer:", ["\nQuestion:", "\n\n"]


FORMATS: dict[str, Format] = {
    "gemma-turns": lambda q: (
        f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n",
        ["<end_of_turn>"],
    ),
    "plain": lambda q: (f"{q}\n", []),
    "user-assistant": lambda q: (f"User: {q}\nAssistant:", ["\nUser:"]),
    "question-answer": lambda q: (f"Question: {q}\nAnswer:", ["\nQuestion:"]),
    "qa-fewshot": _fewshot_qa,
    "dialogue": lambda q: format_dialogue([{"role": "user", "content": q}]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--format", action="append", choices=list(FORMATS), help="only these (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from llama_cpp import Llama

    model = gemma_model_file(ROOT / ".cache" / "models")
    llm = Llama(
        model_path=str(model), n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
    )
    prompts = QUESTIONS + suite_prompts()
    print(f"model {model.name}, {len(prompts)} prompts, max_tokens {args.max_tokens}, greedy")
    print("| format | answered | on topic | echoes | stopped | repeated | tokens | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    details: list[str] = []
    for name in args.format or list(FORMATS):
        make = FORMATS[name]
        started = time.monotonic()
        answered = topic = echoes = stopped = tokens = 0
        repeated = 0.0
        for question, pattern in prompts:
            prompt, stop = make(question)
            out = llm.create_completion(
                prompt, max_tokens=args.max_tokens, temperature=0, repeat_penalty=1.1, stop=stop or None
            )
            choice = out["choices"][0]  # type: ignore[index]
            text = str(choice["text"]).strip()
            words = text.lower().split()
            grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
            answered += bool(text)
            topic += bool(re.search(pattern, text.lower()))
            echoes += question.lower()[-40:] in text.lower()
            stopped += choice["finish_reason"] == "stop"
            tokens += int(out["usage"]["completion_tokens"])  # type: ignore[index]
            repeated += (1 - len(set(grams)) / len(grams)) if grams else 0.0
            details.append(f"{name:>15} | {question[-50:]!r} -> {text[:150]!r}")
        n = len(prompts)
        print(
            f"| {name} | {answered}/{n} | {topic}/{n} | {echoes}/{n} | {stopped}/{n} | "
            f"{repeated / n:.2f} | {tokens} | {time.monotonic() - started:.0f} |",
            flush=True,
        )
    print()
    print("\n".join(details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
