"""A Kaggle-like machine for the SHIPPED notebook (tests only): what a real Kaggle session does that
a plain test run does not, as far as it can be built without Kaggle.

- A container: new PID and mount namespaces (``unshare --pid --fork --mount-proc --mount``, as root,
  or in a user namespace). Its first process starts with the "session" (the deployment counts the
  12 hours from it) and stays PID 1, reaping orphans as a container's init does; whatever is left
  when it exits dies with the namespace, so a failed test leaves nothing behind.
- Kaggle's folders under ``DEPLOY_KAGGLE_ROOT`` (``<tmp>/kaggle/working`` the saved output,
  ``<tmp>/kaggle/temp`` not saved); ``KAGGLE_KERNEL_RUN_TYPE=Batch``; the notebook executed
  unchanged by nbclient, as a saved version runs, from ``<root>/working``.
- Colab's Python: no ``ensurepip`` (its stdlib folder hidden under an empty bind mount, so
  ``python -m venv`` fails as on Kaggle), uv at ``~/.local/bin/uv`` and not on PATH (or nowhere), no
  ``zstd`` command (Kaggle's image has none).
- Kaggle Secrets over HTTP: tests/standin/python/kaggle_secrets.py (the module the image has) asks
  :class:`SecretsServer`, authenticated with ``KAGGLE_USER_SECRETS_TOKEN`` as the real one is.
- The notebook's ``git clone`` of the repository lands on a snapshot of this checkout (tracked and
  untracked files, uncommitted changes included) through git's ``url.<base>.insteadOf``.
- Ollama's release from :class:`ReleaseServer` (``DEPLOY_OLLAMA_URL``): tests/standin/ollama as
  ``bin/ollama`` in a ``.tar.zst`` with the release's ``sha256sum.txt``; the stand-in nvidia-smi
  (two T4s) and kaggle CLI on PATH.

The container runs ``python -m tests.kaggle_harness container SPEC``: PID 1 sets up the mounts and
starts ``driver SPEC``, which executes the runs the spec lists in order (the same /kaggle tree: a
second run sees what the first left) and writes a JSON of results after each:

- ``batch``: the whole notebook with nbclient (the executed notebook is kept beside the results);
- ``control``: the cells through a kernel client, with an ``action`` (``interrupt``, or ``kill``:
  SIGKILL to the kernel and nothing before it) once the serving cell printed ``at``;
- ``exec``: a command (``argv``), its output and exit code.

After each run it lists the processes still alive in the container (``leftovers``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "tests" / "standin"
NOTEBOOK = ROOT / "notebooks" / "kaggle_ollama_webui.ipynb"
OLLAMA_VERSION = "0.20.0"
ARCHIVE = "ollama-linux-amd64.tar.zst"


# ------------------------------------------------------------------------------------ servers
class SecretsServer(http.server.ThreadingHTTPServer):
    """Kaggle's secrets service as kaggle_secrets talks to it: ``POST
    /requests/GetUserSecretByLabelRequest`` with ``{"Label": NAME}`` and the kernel's bearer token;
    ``{"wasSuccessful": true, "result": {"secret": ...}}``, or (a label not attached) an
    unsuccessful answer whose message the real client turns into a BackendError."""

    daemon_threads = True

    def __init__(self, secrets: dict[str, str], token: str = "kaggle-kernel-jwt-for-tests") -> None:
        self.secrets = dict(secrets)
        self.token = token
        self.asked: list[str] = []
        super().__init__(("127.0.0.1", 0), _SecretsHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _SecretsHandler(http.server.BaseHTTPRequestHandler):
    server: SecretsServer

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.headers.get("X-Kaggle-Authorization") != f"Bearer {self.server.token}":
            return self._answer(401, {"error": "unauthorized"})
        if self.path != "/requests/GetUserSecretByLabelRequest":
            return self._answer(404, {"error": "not found"})
        label = str(body.get("Label", ""))
        self.server.asked.append(label)
        if label in self.server.secrets:
            return self._answer(
                200, {"wasSuccessful": True, "result": {"secret": self.server.secrets[label]}}
            )
        self._answer(
            200,
            {"wasSuccessful": False, "errors": [f"No user secrets exist for kernel id 1 and label {label}"]},
        )


def release_archive() -> bytes:
    """An Ollama-release-shaped ``.tar.zst``: the stand-in as ``bin/ollama`` and the CUDA library
    folders of a real release (``lib/ollama/cuda_v12``, ``cuda_v13``)."""
    import zstandard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(STANDIN / "ollama", arcname="bin/ollama")
        for lib in ("cuda_v12", "cuda_v13"):
            info = tarfile.TarInfo(f"lib/ollama/{lib}/libggml-cuda.so")
            blob = f"stand-in {lib}\n".encode()
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))


class ReleaseServer(http.server.ThreadingHTTPServer):
    """``/v<version>/ollama-linux-amd64.tar.zst`` and ``/v<version>/sha256sum.txt`` as GitHub serves
    a release (the checksums as Ollama's release workflow writes them: ``<hex>  ./<name>``)."""

    daemon_threads = True

    def __init__(self, payload: bytes | None = None) -> None:
        self.payload = payload if payload is not None else release_archive()
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _ReleaseHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def archive_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/v{OLLAMA_VERSION}/{ARCHIVE}"


class _ReleaseHandler(http.server.BaseHTTPRequestHandler):
    server: ReleaseServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name == ARCHIVE:
            body = self.server.payload
        elif name == "sha256sum.txt":
            body = f"{hashlib.sha256(self.server.payload).hexdigest()}  ./{ARCHIVE}\n".encode()
        else:
            body = b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# ------------------------------------------------------------------------------------ the repository
def notebook_repository(notebook: Path = NOTEBOOK) -> str:
    """The URL the shipped notebook clones (its settings cell's ``REPOSITORY``)."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)  # type: ignore[no-untyped-call]
    for cell in nb.cells:
        if cell.cell_type == "code" and "REPOSITORY" in cell.source:
            namespace: dict[str, Any] = {}
            exec(cell.source, namespace)
            return str(namespace["REPOSITORY"])
    raise AssertionError("the notebook names no REPOSITORY")


def snapshot(dest: Path) -> Path:
    """A bare repository whose ``main`` is this checkout as it is now (what ``git add -A`` would
    take: ignored files left out), made with a scratch index: the checkout's own index, branch and
    files are untouched."""

    def git(*args: str, env: dict[str, str] | None = None) -> str:
        r = subprocess.run(
            ["git", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if r.returncode:
            raise RuntimeError(f"git {' '.join(args)}: {r.stderr}")
        return r.stdout.strip()

    index = dest / "snapshot-index"
    with contextlib.suppress(OSError):
        shutil.copy(git("rev-parse", "--path-format=absolute", "--git-path", "index"), index)
    env = {
        **os.environ,
        "GIT_INDEX_FILE": str(index),
        "GIT_AUTHOR_NAME": "harness",
        "GIT_AUTHOR_EMAIL": "harness@localhost",
        "GIT_COMMITTER_NAME": "harness",
        "GIT_COMMITTER_EMAIL": "harness@localhost",
    }
    git("add", "-A", env=env)
    commit = git("commit-tree", git("write-tree", env=env), "-m", "kaggle harness snapshot", env=env)
    bare = dest / "kaggle-bridge.git"
    git("init", "-q", "--bare", str(bare))
    git("push", "-q", str(bare), f"{commit}:refs/heads/main")
    git("--git-dir", str(bare), "symbolic-ref", "HEAD", "refs/heads/main")
    return bare


# ------------------------------------------------------------------------------------ the machine
def unshare_prefix() -> list[str]:
    base = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
    return base if os.geteuid() == 0 else [*base[:1], "--user", "--map-root-user", *base[1:]]


def unshare_problem() -> str:
    """Why the container cannot be made here ("" when it can)."""
    if shutil.which("unshare") is None:
        return "no unshare (util-linux)"
    r = subprocess.run([*unshare_prefix(), "true"], capture_output=True, text=True, timeout=30)
    return "" if r.returncode == 0 else f"unshare failed: {r.stderr.strip()}"


class Machine:
    """A Kaggle-like machine in ``tmp``; :meth:`run` starts its container with some runs."""

    def __init__(
        self,
        tmp: Path,
        *,
        uv: str,
        secrets: dict[str, str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.root = tmp / "kaggle"
        (self.root / "working").mkdir(parents=True)
        self.state = self.root / "temp" / "kaggle-bridge"
        self.home = tmp / "home"
        self.home.mkdir()
        self.bin = tmp / "bin"
        self.bin.mkdir()
        # uv: "home" where Kaggle's image has it (~/.local/bin, which a literal "~" in the image's PATH
        # hides from programs), "path" on PATH, "none" nowhere
        if uv != "none":
            uv_exe = Path(sys.executable).parent / "uv"
            if not uv_exe.exists():
                raise AssertionError(f"uv is missing in {uv_exe.parent} (pip install -e '.[test]')")
            where = self.home / ".local" / "bin" if uv == "home" else self.bin
            where.mkdir(parents=True, exist_ok=True)
            (where / "uv").symlink_to(uv_exe)
        for tool in ("nvidia-smi", "kaggle"):
            (self.bin / tool).symlink_to(STANDIN / tool)
        self.secrets = SecretsServer(secrets)
        self.release = ReleaseServer()
        self.repo = snapshot(tmp)
        gitconfig = tmp / "gitconfig"
        gitconfig.write_text(f'[url "file://{self.repo}"]\n\tinsteadOf = {notebook_repository()}\n')
        self.results_dir = tmp / "results"
        self.results_dir.mkdir()
        self.kaggle_log = tmp / "kaggle-cli.jsonl"
        # this machine's way out to the package registries (a TLS-inspecting proxy's CA, say): Kaggle
        # has the internet, so downloads made there must work here too
        network = {
            k: v
            for k, v in os.environ.items()
            if any(part in k.upper() for part in ("SSL_", "CA_BUNDLE", "CA_CERTS", "PROXY", "PIP_", "UV_"))
        }
        self.env = {
            **network,
            "HOME": str(self.home),
            "PATH": f"{self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(STANDIN / "python"),  # kaggle_secrets, as the image has it
            "KAGGLE_KERNEL_RUN_TYPE": "Batch",
            "KAGGLE_URL_BASE": self.secrets.url,
            "KAGGLE_USER_SECRETS_TOKEN": self.secrets.token,
            "DEPLOY_KAGGLE_ROOT": str(self.root),
            "GIT_CONFIG_GLOBAL": str(gitconfig),
            "GIT_CONFIG_NOSYSTEM": "1",
            "STANDIN_GPUS": "15360,15360",
            "STANDIN_TOKEN_DELAY": "0.01",
            # the stand-in ollama is one of the tests' modules: the container's python3 lacks its
            # packages (uvicorn), so it runs on this one (tests/standin/ollama)
            "STANDIN_PYTHON": sys.executable,
            "STANDIN_KAGGLE_LOG": str(self.kaggle_log),
            # a local mirror of the release (the default is GitHub's); ports free on a shared machine
            "DEPLOY_OLLAMA_URL": self.release.archive_url,
            "DEPLOY_OLLAMA_PORT": "0",
            "DEPLOY_HEALTH_INTERVAL": "0.5",
            "DEPLOY_DRAIN_TIMEOUT": "5",
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    def run(self, runs: list[dict[str, Any]]) -> None:
        """Start the container with ``runs`` (returns at once; :meth:`wait` for the end)."""
        spec = {
            "env": self.env,
            "notebook": str(NOTEBOOK),
            "root": str(self.root),
            "state": str(self.state),
            "results": str(self.results_dir),
            "runs": runs,
        }
        spec_file = self.tmp / "spec.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        self.proc = subprocess.Popen(
            [*unshare_prefix(), sys.executable, "-m", "tests.kaggle_harness", "container", str(spec_file)],
            cwd=ROOT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()

    def wait(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
            raise AssertionError(
                f"the container ran past {timeout:.0f} s:\n" + "\n".join(self.output[-80:])
            ) from None
        results = self.results()
        if code != 0:
            raise AssertionError(f"the container exited {code}:\n" + "\n".join(self.output[-80:]))
        return results

    def results(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.results_dir / "results.json").read_text())
        except (OSError, ValueError):
            return {"runs": []}
        return data

    def status(self) -> dict[str, Any]:
        """The deployment's status.json now ({} when there is none)."""
        try:
            data: dict[str, Any] = json.loads((self.state / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return data

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.secrets.shutdown()
        self.release.shutdown()


# ------------------------------------------------------------------------------------ inside the container
def _hide(path: Path, empty: Path) -> None:
    """Bind an empty folder (or /dev/null over a file) on ``path``."""
    source = empty if path.is_dir() else Path("/dev/null")
    subprocess.run(["mount", "--bind", str(source), str(path)], check=True)


def container(spec_file: str) -> int:
    """PID 1: the mounts, then the driver; reap every orphan until the driver exits."""
    spec = json.loads(Path(spec_file).read_text())
    empty = Path(spec["results"]) / "empty"
    empty.mkdir(exist_ok=True)
    # Colab's Python has no ensurepip at all (Debian ships it in python3-venv): an empty folder would
    # still import as a namespace package, so the stand-in folder's __init__ says it is not there
    no_ensurepip = Path(spec["results"]) / "no-ensurepip"
    no_ensurepip.mkdir(exist_ok=True)
    (no_ensurepip / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    _hide(Path(sysconfig.get_paths()["stdlib"]) / "ensurepip", no_ensurepip)
    home = Path(spec["env"]["HOME"])
    for candidate in ("/usr/local/bin/uv", "/root/.local/bin/uv", "/usr/bin/zstd", "/usr/local/bin/zstd"):
        p = Path(candidate)
        if p.exists() and not p.is_relative_to(home):
            _hide(p, empty)
    os.environ.clear()
    os.environ.update(spec["env"])
    driver = subprocess.Popen([sys.executable, "-m", "tests.kaggle_harness", "driver", spec_file], cwd=ROOT)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if pid == driver.pid:
            return os.waitstatus_to_exitcode(status)


def _leftovers() -> list[dict[str, Any]]:
    import psutil

    mine = {1, os.getpid()}
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        if p.info["pid"] in mine or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        found.append(
            {"pid": p.info["pid"], "name": p.info["name"], "cmdline": " ".join(p.info["cmdline"] or [])}
        )
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _wait_gone(km: Any, timeout: float = 30) -> bool:
    """Wait for a signalled kernel's process to end (and reap it); False if it did not in time."""
    process = getattr(km.provisioner, "process", None)
    if process is not None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
    return True


def _alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _run_batch(spec: dict[str, Any], run: dict[str, Any], index: int) -> dict[str, Any]:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(spec["notebook"], as_version=4)  # type: ignore[no-untyped-call]
    client = NotebookClient(
        nb,
        timeout=run.get("timeout", 600),
        kernel_name="python3",
        resources={"metadata": {"path": str(Path(spec["root"]) / "working")}},
    )
    out: dict[str, Any] = {"error": ""}
    try:
        client.execute(env={**os.environ, **run.get("env", {})})
    except CellExecutionError as exc:
        out["error"] = str(exc)[-3000:]
    path = Path(spec["results"]) / f"run{index}.ipynb"
    nbformat.write(nb, path)  # type: ignore[no-untyped-call]
    out["notebook"] = str(path)
    return out


def _run_control(spec: dict[str, Any], run: dict[str, Any], index: int) -> dict[str, Any]:
    """The notebook's cells through a kernel client; at ``at`` in the serving cell's output,
    interrupt or kill the kernel."""
    import nbformat
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(spec["notebook"], as_version=4)  # type: ignore[no-untyped-call]
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(Path(spec["root"]) / "working"), env={**os.environ, **run.get("env", {})})
    kc = km.client()
    kc.start_channels()
    out: dict[str, Any] = {"text": "", "display": "", "acted": None, "idle_after_action": None}
    try:
        kc.wait_for_ready(timeout=60)
        for source in cells[:-1]:
            kc.execute_interactive(source, timeout=60, output_hook=lambda msg: None)
        msg_id = kc.execute(cells[-1])
        deadline = time.monotonic() + run.get("timeout", 300)
        acted = 0.0
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                msg = None
            if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out["text"] += content["text"]
                elif kind in ("display_data", "update_display_data"):
                    out["display"] = content["data"].get("text/plain", "")
                elif kind == "error":
                    out["text"] += "\n".join(content.get("traceback", []))
                elif kind == "status" and content["execution_state"] == "idle":
                    if acted:
                        out["idle_after_action"] = round(time.monotonic() - acted, 2)
                    break
            if not acted and run["at"] in out["text"] + out["display"]:
                if run.get("probe"):  # a request through the local relay, with its key, first
                    out["probe"] = _probe(spec, run["probe"])
                acted = time.monotonic()
                out["acted"] = time.time()
                if run["action"] == "interrupt":
                    km.interrupt_kernel()
                else:
                    recorded = _read_json(Path(spec["state"]) / "children.json") or {}
                    out["children_at_kill"] = recorded.get("children", [])
                    # Killed with no warning, as a dying container or a kill -9 does: SIGKILL to
                    # the kernel's process group and nothing first. (shutdown_kernel(now=True)
                    # interrupts the kernel before it kills it, jupyter_client 8 manager.py
                    # `_async_shutdown_kernel`, and an interrupt that wins that race lets the
                    # bring-up stop a child itself.)
                    km.signal_kernel(signal.SIGKILL)
                    out["kill_timeout"] = not _wait_gone(km)
                    out["alive_after_kill"] = [c["pid"] for c in out["children_at_kill"] if _alive(c["pid"])]
                    break
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=False)
        else:  # killed: its connection file, sockets and ports are still ours to let go of
            km.cleanup_resources()
    return out


def _probe(spec: dict[str, Any], path: str) -> dict[str, Any]:
    import httpx

    state = Path(spec["state"])
    status = _read_json(state / "status.json") or {}
    key = (state / "relay-client-key").read_text().strip()
    try:
        r = httpx.get(
            status["url"].rstrip("/") + path, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
    except (httpx.HTTPError, KeyError) as exc:
        return {"status": 0, "body": repr(exc)}
    return {"status": r.status_code, "body": r.text[:300]}


def driver(spec_file: str) -> int:
    import psutil

    spec = json.loads(Path(spec_file).read_text())
    results: dict[str, Any] = {
        "pid1_start": psutil.Process(1).create_time(),
        "ensurepip": subprocess.run(
            [sys.executable, "-c", "import ensurepip"], capture_output=True
        ).returncode
        == 0,
        "zstd": shutil.which("zstd"),
        "runs": [],
    }
    path = Path(spec["results"]) / "results.json"
    for index, run in enumerate(spec["runs"]):
        started = time.time()
        print(f"harness: run {index} ({run['kind']})", flush=True)
        if run["kind"] == "batch":
            out = _run_batch(spec, run, index)
        elif run["kind"] == "control":
            out = _run_control(spec, run, index)
        else:
            r = subprocess.run(run["argv"], capture_output=True, text=True, timeout=run.get("timeout", 300))
            out = {"code": r.returncode, "text": r.stdout + r.stderr}
        out.update(
            kind=run["kind"],
            started=started,
            took=round(time.time() - started, 2),
            status=_read_json(Path(spec["state"]) / "status.json"),
            children=_read_json(Path(spec["state"]) / "children.json"),
            leftovers=_leftovers(),
        )
        results["runs"].append(out)
        path.write_text(json.dumps(results, indent=1))
        print(f"harness: run {index} took {out['took']} s; leftovers {out['leftovers']}", flush=True)
    return 0


if __name__ == "__main__":
    role, arg = sys.argv[1], sys.argv[2]
    sys.exit(container(arg) if role == "container" else driver(arg))
