"""The next Kaggle session, started by this one before it ends.

Kaggle ends a GPU session 12 hours after it started. ``--next-minutes`` before that (an hour, by
default; whatever the warnings are) the deployment pushes a new version of this notebook with the
Kaggle CLI; Kaggle runs it as a new batch session, which comes up and connects its bridge to the
same relay. Only once the relay shows that second bridge does this session drain (the relay then
sends every new request to the new one); if it never shows, this session keeps serving to its hard
end and says so.

What this relies on, read in Kaggle/kaggle-cli (2026-07: ``docs/kernels.md``,
``docs/kernels_metadata.md``, ``src/kaggle/cli.py``, ``src/kaggle/api/kaggle_api_extended.py``):

- ``kaggle kernels pull USER/SLUG -p DIR -m`` writes the notebook's source and its
  ``kernel-metadata.json``, ``machine_shape`` included (#856).
- ``kaggle kernels push -p DIR --accelerator NvidiaTeslaT4`` runs it on two T4s (#907); the
  metadata's ``machine_shape`` does the same (#1048). Before these, a push got a P100 whatever the
  notebook's settings said (#821).
- The CLI signs in with ``KAGGLE_USERNAME`` + ``KAGGLE_KEY`` (or ``KAGGLE_API_TOKEN``) from its
  environment. Inside a notebook those come from Kaggle Secrets, which are not environment variables
  (an HTTP lookup, Kaggle/docker-python ``patches/kaggle_secrets.py``): we read them and hand them to
  the CLI's environment, never its command line.
- A push the server refuses may still exit 0, printing ``Kernel push error: ...``
  (``kernels_push_cli``); a refused sign-in prints the authentication help and exits 1.

Everything the CLI prints is logged, through the deployment's redactor.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from deployment.children import Children, run_recorded
from deployment.session import Redactor, find_secret

Say = Callable[[str], None]

#: The accelerator id of Kaggle's "GPU T4 x2" (kaggle-cli docs/kernels.md).
T4X2 = "NvidiaTeslaT4"
CREDENTIALS = ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN")


@dataclass
class PushResult:
    ok: bool
    reason: str  # one line: what happened
    output: str = ""  # what the CLI printed, redacted


def credentials(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Kaggle CLI's credentials found in the environment or Kaggle Secrets."""
    found = {}
    for name in CREDENTIALS:
        value, _ = find_secret(name, env)
        if value:
            found[name] = value
    return found


def _complete(creds: Mapping[str, str]) -> bool:
    return ("KAGGLE_USERNAME" in creds and "KAGGLE_KEY" in creds) or "KAGGLE_API_TOKEN" in creds


def push_next_session(
    kernel: str,
    work: Path,
    say: Say,
    redact: Redactor,
    *,
    accelerator: str = T4X2,
    kaggle: str = "kaggle",
    children: Children | None = None,
    cancel: threading.Event | None = None,
) -> PushResult:
    """Pull notebook ``kernel`` (``USER/SLUG``) and push it again as a new version on
    ``accelerator``: the next session. Work files and the CLI's log go under ``work``."""
    creds = credentials()
    redact.add(*creds.values())
    if not _complete(creds):
        return PushResult(
            False,
            "no KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN) in Kaggle Secrets or the environment",
        )
    exe = shutil.which(kaggle)
    if exe is None:
        return PushResult(False, f"the Kaggle CLI ({kaggle}) is not installed: pip install kaggle")
    folder = work / "next-session"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log = work / "logs" / "kaggle-cli.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **creds}

    def cli(*args: str) -> tuple[int, str]:
        start = log.stat().st_size if log.exists() else 0
        code = run_recorded(
            "kaggle " + args[1], [exe, *args], log=log, children=children, cancel=cancel, env=env, timeout=300
        )
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        text = redact(text.split("\n", 2)[-1] if text.startswith("\n===") else text).strip()
        for line in text.splitlines()[-12:]:
            say(f"kaggle CLI: {line}")
        return code, text

    code, text = cli("kernels", "pull", kernel, "-p", str(folder), "-m")
    meta_path = folder / "kernel-metadata.json"
    if code != 0 or not meta_path.exists():
        return PushResult(False, f"kaggle kernels pull {kernel} failed (exit {code})", text)
    meta = json.loads(meta_path.read_text())
    meta.update(machine_shape=accelerator, enable_gpu=True, enable_internet=True)
    meta_path.write_text(json.dumps(meta, indent=2))
    code, text = cli("kernels", "push", "-p", str(folder), "--accelerator", accelerator)
    if code != 0 or "push error" in text.lower():
        return PushResult(False, f"kaggle kernels push failed (exit {code})", text)
    return PushResult(True, f"pushed {kernel} as a new version on {accelerator}", text)
