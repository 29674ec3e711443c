"""The versioned prompt suites of a validation run (``bridge/validate/prompts/<suite>.json``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

SUITES = Path(__file__).resolve().parent / "prompts"


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    prompt_kind: str
    max_tokens: int
    prompt: str


@dataclass(frozen=True, slots=True)
class Suite:
    version: str
    cases: tuple[Case, ...]
    warmup: Case
    temperature: float
    seed: int
    repetitions: int
    concurrency: tuple[int, ...]
    sha256: str


def load_suite(name: str) -> Suite:
    """A suite by name (``v1`` -> bridge/validate/prompts/v1.json) or by path to a JSON file."""
    path = Path(name)
    if not path.suffix:
        path = SUITES / f"{name}.json"
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"prompt suite {name!r}: {exc}") from exc
    paragraph = str(data.get("paragraph", ""))
    try:
        cases = tuple(
            Case(
                id=str(c["id"]),
                prompt_kind=str(c.get("prompt_kind", "")),
                max_tokens=int(c["max_tokens"]),
                prompt=paragraph * int(c.get("paragraph_repeat", 0)) + str(c["prompt"]),
            )
            for c in data["cases"]
        )
        w = data["warmup"]
        return Suite(
            version=str(data["version"]),
            cases=cases,
            warmup=Case("warmup", "short", int(w["max_tokens"]), str(w["prompt"])),
            temperature=float(data.get("temperature", 0)),
            seed=int(data.get("seed", 42)),
            repetitions=int(data.get("repetitions", 3)),
            concurrency=tuple(int(c) for c in data.get("concurrency", [1])),
            sha256=hashlib.sha256(raw).hexdigest(),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"prompt suite {name!r} is malformed: {exc!r}") from exc
