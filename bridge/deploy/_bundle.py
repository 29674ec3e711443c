"""The Cloudflare relay's Worker as shipped in this package: the bundled ES module that
``wrangler deploy`` would upload, and a manifest of the configuration ``wrangler.toml`` gives it.

Both are built in the repository by ``scripts/build_worker.py`` (Node and wrangler from the pinned
``node_modules``), never on the user's machine. The manifest records a digest of the sources they were
built from (:func:`inputs_digest`), so a test fails when ``deployment/cloudflare`` changed and the
bundle was not rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MANIFEST = "manifest.json"
#: What the bundle is built from, relative to ``deployment/cloudflare``: every file under ``src/``
#: and the files that pin the build (the lockfile pins wrangler and its esbuild).
INPUTS = ("src", "wrangler.toml", "package.json", "package-lock.json", "tsconfig.json")


@dataclass(frozen=True)
class Bundle:
    """The Worker to upload: its main module and what ``wrangler.toml`` configures."""

    main_module: str
    code: bytes
    compatibility_date: str
    compatibility_flags: tuple[str, ...]
    #: ``(binding name, class name)`` of each Durable Object the Worker binds.
    durable_objects: tuple[tuple[str, str], ...]
    #: The ``[[migrations]]`` of ``wrangler.toml`` in order, each with its ``tag``.
    migrations: tuple[dict[str, Any], ...]
    #: The ``[vars]``: the relay's settings that are not secret, with their defaults.
    vars: dict[str, str]
    inputs_sha256: str


def inputs_digest(project: Path) -> str:
    """SHA-256 over the names and contents of the build's inputs in ``project``, in a fixed order."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for name in INPUTS:
        path = project / name
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.relative_to(project).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def manifest_from_wrangler_toml(path: Path) -> dict[str, Any]:
    """The part of ``wrangler.toml`` a deployment needs, as the manifest stores it."""
    config = tomllib.loads(path.read_text())
    return {
        "name": config["name"],
        "compatibility_date": config["compatibility_date"],
        "compatibility_flags": list(config.get("compatibility_flags", [])),
        "durable_objects": [
            {"name": b["name"], "class_name": b["class_name"]}
            for b in config.get("durable_objects", {}).get("bindings", [])
        ],
        "migrations": list(config.get("migrations", [])),
        "vars": {k: str(v) for k, v in config.get("vars", {}).items()},
    }


def load_bundle() -> Bundle:
    """The shipped Worker (fails with :class:`ConfigError` when the package lacks it)."""
    folder = resources.files(__package__) / "worker"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        code = (folder / manifest["main_module"]).read_bytes()
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"the Worker bundle is missing from the bridge package: {exc}") from None
    return Bundle(
        main_module=manifest["main_module"],
        code=code,
        compatibility_date=manifest["compatibility_date"],
        compatibility_flags=tuple(manifest["compatibility_flags"]),
        durable_objects=tuple((b["name"], b["class_name"]) for b in manifest["durable_objects"]),
        migrations=tuple(manifest["migrations"]),
        vars=dict(manifest["vars"]),
        inputs_sha256=manifest["inputs_sha256"],
    )
