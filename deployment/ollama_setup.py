"""Ollama on the notebook: install the official Linux release, pull a model, warm it.

Install: the release archive ``ollama-linux-amd64.tar.zst`` (older releases: ``.tgz``; the
``.tar.zst`` since 0.14, ollama PR #13651) from the project's GitHub releases, downloaded with HTTP
``Range`` so an interrupted download resumes where it stopped (the ``.part`` file is kept), with a
progress bar, then checked against the release's ``sha256sum.txt``: a corrupt archive (ollama #15291
shows one for v0.20.0) is deleted and fetched again, never unpacked, never reused. Unpacked into
``<cache>/ollama-<version>`` and reused when there. Kaggle's image has no ``zstd`` (the official
install.sh then fails): we use the ``zstd`` command when present, else Python's ``zstandard``
(pip-installed on demand), else ``apt-get install zstd``.

``sha256sum.txt`` is written by Ollama's release workflow as ``find . -type f | xargs sha256sum`` in
the folder of assets (ollama/ollama ``.github/workflows/release.yaml`` at v0.20.0), so its lines read
``<hex>  ./ollama-linux-amd64.tar.zst``.

Pull and warm-up go through Ollama's HTTP API: ``/api/pull`` streams the layers' progress (shown as
a bar), ``/api/generate`` with an empty prompt loads the model and ``keep_alive: -1`` keeps it
loaded, so the first user request does not pay the load. Where it then runs, GPU or CPU, and why:
deployment/placement.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from deployment.children import Cancelled

Say = Callable[[str], None]

OLLAMA_VERSION = "0.20.0"
RELEASE_URL = "https://github.com/ollama/ollama/releases/download/v{version}/ollama-linux-{arch}.{ext}"
CHECKSUMS = "sha256sum.txt"


class InstallError(RuntimeError):
    pass


class Progress:
    """A one-line progress bar: ``\\r`` updates on a terminal or in Jupyter, a line every 10 % in a
    log file (so CI logs stay short)."""

    def __init__(self, label: str, total: int | None, out: IO[str] | None = None) -> None:
        self.label = label
        self.total = total
        self.out = out or sys.stdout
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_decile = -1
        self._tty = bool(getattr(self.out, "isatty", lambda: False)()) or "ipykernel" in sys.modules

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total:
            self.total = total
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= 0.2 or (self.total and done >= self.total):
                self._last_draw = now
                self.out.write("\r" + self.line())
                self.out.flush()
        elif self.total:
            decile = int(10 * done / self.total)
            if decile != self._last_decile:
                self._last_decile = decile
                self.out.write(self.line() + "\n")
                self.out.flush()

    def line(self) -> str:
        rate = self.done / max(1e-6, time.monotonic() - self.started)
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            return (
                f"{self.label} [{bar}] {100 * frac:5.1f}% {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB "
                f"{rate / 1e6:.1f} MB/s"
            )
        return f"{self.label} {self.done / 1e6:,.0f} MB {rate / 1e6:.1f} MB/s"

    def finish(self) -> None:
        if self._tty:
            self.out.write("\r" + self.line() + "\n")
        elif self._last_decile != 10:
            self.out.write(self.line() + "\n")
        self.out.flush()


def download(
    url: str,
    dest: Path,
    say: Say,
    *,
    attempts: int = 8,
    timeout: float = 60.0,
    out: IO[str] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` with ``Range`` after an interruption
    (and across calls: a later session continues a cached part). Raises :class:`Cancelled` soon
    after ``cancel`` is set."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    bar: Progress | None = None
    last_exc: Exception | None = None
    for attempt in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with httpx.stream(
                "GET", url, headers=headers, follow_redirects=True, timeout=timeout, trust_env=True
            ) as r:
                if r.status_code == 416:  # the part is already whole
                    break
                if r.status_code == 404:
                    raise InstallError(f"{url}: 404 not found")
                r.raise_for_status()
                if have and r.status_code != 206:
                    have = 0  # the server ignored Range: start over
                length = int(r.headers.get("content-length", "0")) or None
                total = have + length if length is not None else None
                if bar is None:
                    bar = Progress(f"download {dest.name}", total, out)
                    if have:
                        say(f"resuming {dest.name} at {have / 1e6:,.0f} MB")
                with open(part, "ab" if have else "wb") as f:
                    done = have
                    for data in r.iter_bytes():  # as received: a cut loses nothing written
                        if cancel is not None and cancel.is_set():
                            raise Cancelled(f"download of {dest.name} cancelled")
                        f.write(data)
                        done += len(data)
                        bar.update(done, total)
                if total is not None and done < total:
                    raise httpx.ReadError(f"body ended at {done} of {total} bytes")
                break
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            last_exc = exc
            delay = min(30.0, 2.0**attempt)
            say(f"download interrupted ({exc}); resuming in {delay:.0f} s")
            if cancel is not None and cancel.wait(delay):
                raise Cancelled(f"download of {dest.name} cancelled") from exc
            if cancel is None:
                time.sleep(delay)
    else:
        raise InstallError(f"download of {url} failed after {attempts} attempts: {last_exc}")
    if bar is not None:
        bar.finish()
    part.rename(dest)
    return dest


def _zstd_reader(path: Path, say: Say, prefer_cli: bool = True) -> Iterator[IO[bytes]]:
    """A readable stream of the decompressed archive."""
    if prefer_cli and shutil.which("zstd"):
        proc = subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            if proc.wait() != 0:
                raise InstallError(f"zstd -dc {path} failed ({proc.returncode})")
        return
    zstandard: Any = None
    try:
        import zstandard
    except ImportError:
        say("no zstd command: installing Python's zstandard from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "zstandard"], check=False)
        with contextlib.suppress(ImportError):
            import zstandard
    if zstandard is None:  # last resort: Debian's zstd
        say("installing zstd with apt-get")
        subprocess.run(["apt-get", "install", "-y", "-q", "zstd"], check=True)
        yield from _zstd_reader(path, say, True)
        return
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        yield reader


def extract(archive: Path, dest: Path, say: Say, *, prefer_cli: bool = True) -> None:
    """Unpack a ``.tar.zst`` or ``.tgz`` release into ``dest`` (atomically: a temp dir renamed)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if archive.name.endswith(".zst"):
        for stream in _zstd_reader(archive, say, prefer_cli):
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(tmp, filter="tar")
    else:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter="tar")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def version_of(exe: str) -> str:
    """``ollama --version``'s version number ("" when it does not run). Without a server running
    the real one prints ``Warning: could not connect ...`` and ``Warning: client version is X``."""
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    out = r.stdout + r.stderr
    m = re.search(r"\b(\d+\.\d+\.\d+[\w.+-]*)", out)
    if m is None:
        return ""
    return m.group(1) + (" (stand-in)" if "stand-in" in out else "")


def release_checksum(archive_url: str, name: str) -> str:
    """The sha256 of asset ``name`` from ``sha256sum.txt`` in the same release folder as
    ``archive_url``; raises InstallError when there is none."""
    url = archive_url.rsplit("/", 1)[0] + "/" + CHECKSUMS
    try:
        r = httpx.get(url, follow_redirects=True, timeout=60, trust_env=True)
    except httpx.HTTPError as exc:
        raise InstallError(f"cannot fetch {url}: {exc}") from exc
    if r.status_code != 200:
        raise InstallError(
            f"{url}: HTTP {r.status_code}; without the release's checksums the archive cannot be "
            "verified (--ollama-sha256 HEX gives one, --ollama-sha256 skip does without)"
        )
    for line in r.text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*").removeprefix("./") == name:
            return parts[0].lower()
    raise InstallError(f"{url} lists no {name}")


def file_sha256(path: Path, cancel: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"checking {path.name} cancelled")
            digest.update(chunk)
    return digest.hexdigest()


def install(
    cache: Path,
    say: Say,
    *,
    version: str = OLLAMA_VERSION,
    url: str = "",
    sha256: str = "",
    prefer_cli: bool = True,
    out: IO[str] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """The ``ollama`` executable of ``version`` under ``cache`` (downloaded, verified and unpacked
    when not there yet). ``sha256``: the archive's checksum; "" reads the release's
    ``sha256sum.txt``; ``skip`` verifies nothing."""
    root = cache / f"ollama-{version}"
    exe = root / "bin" / "ollama"
    if exe.is_file() and os.access(exe, os.X_OK):
        say(f"ollama {version}: reusing {exe}")
        return exe
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "amd64")
    candidates = (
        [url] if url else [RELEASE_URL.format(version=version, arch=arch, ext=e) for e in ("tar.zst", "tgz")]
    )
    archive: Path | None = None
    errors = []
    for candidate in candidates:
        name = candidate.rsplit("/", 1)[-1].split("?")[0] or "ollama.tar.zst"
        try:
            archive = _fetch_verified(candidate, name, cache, version, sha256, say, out, cancel)
            break
        except InstallError as exc:
            errors.append(str(exc))
    if archive is None:
        raise InstallError("could not download Ollama: " + "; ".join(errors))
    say(f"ollama {version}: unpacking {archive.name}")
    extract(archive, root, say, prefer_cli=prefer_cli)
    if not exe.is_file():
        raise InstallError(f"{archive.name} has no bin/ollama")
    exe.chmod(exe.stat().st_mode | 0o111)
    return exe


def _fetch_verified(
    url: str,
    name: str,
    cache: Path,
    version: str,
    sha256: str,
    say: Say,
    out: IO[str] | None,
    cancel: threading.Event | None,
    attempts: int = 2,
) -> Path:
    """Download (or find in the cache) one archive and check it; a bad one is deleted and
    downloaded again, up to ``attempts`` times."""
    dest = cache / "downloads" / f"{version}-{name}"
    part = dest.with_name(dest.name + ".part")
    if sha256 == "skip":
        expected = ""
    elif sha256:
        expected = sha256.lower()
    else:
        say(f"ollama {version}: reading {CHECKSUMS} of the release")
        expected = release_checksum(url, name)
    for attempt in range(1, attempts + 1):
        if not dest.exists():
            say(f"ollama {version}: downloading {url}")
        download(url, dest, say, out=out, cancel=cancel)
        if not expected:
            say(f"ollama {version}: WARNING: {name} not verified (--ollama-sha256 skip)")
            return dest
        got = file_sha256(dest, cancel)
        if got == expected:
            say(f"ollama {version}: {name} sha256 {got[:12]}... matches {CHECKSUMS}")
            return dest
        say(
            f"ollama {version}: {name} is corrupt (sha256 {got[:12]}..., the release says "
            f"{expected[:12]}...): deleted" + ("; downloading it again" if attempt < attempts else "")
        )
        dest.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    raise InstallError(f"{url}: every download was corrupt (sha256 mismatch)")


def find_ollama(
    given: str,
    cache: Path,
    say: Say,
    *,
    version: str,
    url: str = "",
    sha256: str = "",
    out: IO[str] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """``given`` (a path or a name on PATH), else ``ollama`` on PATH, else install into ``cache``."""
    for name in (given, "" if given else "ollama"):
        if not name:
            continue
        found = shutil.which(name)
        if found:
            return Path(found)
        if given:
            raise InstallError(f"--ollama {given}: not found or not executable")
    return install(cache, say, version=version, url=url, sha256=sha256, out=out, cancel=cancel)


# ---------------------------------------------------------------------------------------- API
def has_model(base: str, model: str) -> int | None:
    """The model's size in bytes if the server has it, else None."""
    r = httpx.get(base + "/api/tags", timeout=30, trust_env=False)
    r.raise_for_status()
    for m in r.json().get("models", []):
        if m.get("name") == model or m.get("model") == model:
            return int(m.get("size", 0))
    return None


def pull(
    base: str, model: str, say: Say, out: IO[str] | None = None, cancel: threading.Event | None = None
) -> None:
    """``/api/pull`` with a progress bar per layer."""
    bar: Progress | None = None
    digest = ""
    with httpx.stream(
        "POST",
        base + "/api/pull",
        json={"model": model, "stream": True},
        timeout=httpx.Timeout(30, read=600),
        trust_env=False,
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"pull of {model} cancelled")
            if not line.strip():
                continue
            msg: dict[str, Any] = json.loads(line)
            if "error" in msg:
                raise InstallError(f"ollama pull {model}: {msg['error']}")
            status = str(msg.get("status", ""))
            if msg.get("total"):
                if msg.get("digest") != digest:
                    if bar is not None:
                        bar.finish()
                    digest = str(msg.get("digest", ""))
                    bar = Progress(f"pull {model} {digest[7:19]}", int(msg["total"]), out)
                assert bar is not None
                bar.update(int(msg.get("completed", 0)), int(msg["total"]))
            elif status:
                if bar is not None:
                    bar.finish()
                    bar = None
                    digest = ""
                say(f"pull {model}: {status}")


def show(base: str, model: str) -> dict[str, Any]:
    r = httpx.post(base + "/api/show", json={"model": model}, timeout=60, trust_env=False)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def warm(base: str, model: str, keep_alive: str | int = -1) -> float:
    """Load the model and keep it loaded; then one token so the first request pays nothing.
    Returns the seconds it took."""
    start = time.monotonic()
    timeout = httpx.Timeout(30, read=900)
    r = httpx.post(
        base + "/api/generate",
        json={"model": model, "prompt": "", "keep_alive": keep_alive},
        timeout=timeout,
        trust_env=False,
    )
    r.raise_for_status()
    r = httpx.post(
        base + "/api/generate",
        json={
            "model": model,
            "prompt": "Hello",
            "stream": False,
            "keep_alive": keep_alive,
            "options": {"num_predict": 1},
        },
        timeout=timeout,
        trust_env=False,
    )
    r.raise_for_status()
    return time.monotonic() - start


def loaded(base: str) -> list[dict[str, Any]]:
    """``/api/ps``: the models loaded, with ``size_vram``."""
    r = httpx.get(base + "/api/ps", timeout=10, trust_env=False)
    r.raise_for_status()
    models: list[dict[str, Any]] = r.json().get("models", [])
    return models
