#!/usr/bin/env python3
"""Write the wire constants of both relays from the spec, or check that they are current.

The spec's machine-readable half is ``docs/spec/wire.toml`` (the wire constants) and
``docs/spec/extensions.toml`` (which relay implements which named extension). From them, and from
the package version in ``bridge/__init__.py`` (the one place it is written), this script writes:

- ``bridge/wire/constants.py``: the Python constants (importable with no other bridge module);
- ``deployment/cloudflare/src/wire/constants.ts``: the same for the Cloudflare relay, plus VERSION;
- the tables between ``<!-- BEGIN GENERATED name -->`` and ``<!-- END GENERATED name -->`` in
  ``docs/spec/wire.md`` and ``docs/spec/relay.md``;
- the ``version`` of ``deployment/cloudflare/package.json`` and its lockfile.

Usage: ``python3 scripts/gen_wire.py`` rewrites what is stale; ``--check`` changes nothing and
exits 1, naming each stale file, when one differs (CI runs it through tests/unit/test_spec.py).
Standard library only: it runs before any set-up.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tomllib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "spec" / "wire.toml"
EXTENSIONS = ROOT / "docs" / "spec" / "extensions.toml"
PY_OUT = ROOT / "bridge" / "wire" / "constants.py"
TS_OUT = ROOT / "deployment" / "cloudflare" / "src" / "wire" / "constants.ts"
WIRE_MD = ROOT / "docs" / "spec" / "wire.md"
RELAY_MD = ROOT / "docs" / "spec" / "relay.md"
VERSION_SOURCE = ROOT / "bridge" / "__init__.py"
PACKAGE_JSON = ROOT / "deployment" / "cloudflare" / "package.json"
PACKAGE_LOCK = ROOT / "deployment" / "cloudflare" / "package-lock.json"

LINE = 110  # ruff's line-length (pyproject.toml)
COMMAND = "python3 scripts/gen_wire.py"
SENDER = {"bridge": ("bridge -> relay", "bridge → relay"), "relay": ("relay -> bridge", "relay → bridge")}
SENDER_BOTH = ("either way", "both")
ENUM_DOCS = {
    "FrameType": "The type byte of a frame; unknown types are ignored after the handshake.",
    "Flags": "The flags byte of a frame; undefined bits are sent as 0 and ignored on receipt.",
    "ErrorCode": "The code RESET and GOAWAY carry.",
    "CloseCode": "WebSocket close codes on a bridge's connection (the GOAWAY before them is what counts).",
}
HEX_ENUMS = frozenset({"FrameType", "Flags"})


class SpecError(Exception):
    """The spec file breaks a rule this script relies on."""


# ----------------------------------------------------------------------------------------- loading


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    """The parsed wire spec, checked: names unique, integer codes unique within each table."""
    spec = tomllib.loads(path.read_text(encoding="utf-8"))
    for table in ("constant", "frame_type", "flag", "error_code", "close_code"):
        rows = spec.get(table)
        if not isinstance(rows, list) or not rows:
            raise SpecError(f"{path.name}: [[{table}]] is missing")
        names = [row["name"] for row in rows]
        if len(set(names)) != len(names):
            raise SpecError(f"{path.name}: duplicate name in [[{table}]]")
        for row in rows:
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", row["name"]) or not row.get("doc"):
                raise SpecError(f"{path.name}: {table} {row['name']!r} needs an UPPER_CASE name and a doc")
        if table != "constant":
            values = [row["value"] for row in rows]
            if len(set(values)) != len(values) or not all(isinstance(v, int) for v in values):
                raise SpecError(f"{path.name}: [[{table}]] values must be distinct integers")
    return spec


def load_extensions(path: Path = EXTENSIONS) -> dict[str, Any]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    relays = data.get("relays")
    if not isinstance(relays, list) or not relays:
        raise SpecError(f"{path.name}: `relays` is missing")
    for ext in data.get("extension", []):
        missing = [r for r in relays if not isinstance(ext.get(r), bool)]
        if missing or not re.fullmatch(r"[a-z][a-z0-9-]*", ext["name"]):
            raise SpecError(f"{path.name}: extension {ext['name']!r} needs a lowercase name and {missing}")
    return data


def package_version(path: Path = VERSION_SOURCE) -> str:
    """``__version__`` of the Python package: a plain string assignment, read without importing."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    raise SpecError(f'{path.relative_to(ROOT)}: no `__version__ = "..."`')


# ----------------------------------------------------------------------------------------- Python


def _py_value(row: dict[str, Any]) -> str:
    value = row["value"]
    if isinstance(value, bool):
        raise SpecError(f"{row['name']}: booleans are not wire constants")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return hex(value) if row.get("hex") else (f"{value:_}" if value >= 100_000 else str(value))


def _ascii(text: str) -> str:
    """Comments in Python stay ASCII (ruff's RUF003 flags look-alike characters)."""
    for fancy, plain in (("≥", ">= "), ("→", "->"), ("—", "-"), ("\u00d7", "x")):
        text = text.replace(fancy, plain)
    return text


def _py_comment_lines(text: str, indent: str, marker: str = "#:") -> list[str]:
    """``text`` as comment lines of at most LINE characters."""
    words, lines, current = _ascii(text).split(), [], ""
    for word in words:
        candidate = f"{current} {word}" if current else word
        if len(indent) + len(marker) + 1 + len(candidate) > LINE and current:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return [f"{indent}{marker} {line}" for line in lines]


def _py_member(name: str, value: str, doc: str) -> list[str]:
    inline = f"    {name} = {value}  # {_ascii(doc)}"
    if len(inline) <= LINE:
        return [inline]
    return [*_py_comment_lines(doc, "    ", "#"), f"    {name} = {value}"]


def _frame_doc(row: dict[str, Any], arrow: int) -> str:
    sender = SENDER.get(row["sender"], SENDER_BOTH)[arrow]
    stream = "stream 0" if row["stream"] == "0" else "stream >= 1" if arrow == 0 else "stream ≥1"
    return f"{sender}, {stream}: {row['payload']}; {row['doc']}"


def render_python(spec: dict[str, Any]) -> str:
    out = [
        '"""The wire constants (docs/spec/wire.md), generated from docs/spec/wire.toml.',
        "",
        f"Do not edit: change the spec and run ``{COMMAND}``, which writes the TypeScript",
        "relay's constants from the same file. Importable with no other bridge module.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import enum",
        "",
    ]
    for row in spec["constant"]:
        if row.get("section"):
            out += ["", *_py_comment_lines(row["section"], "", "#")]
        out += _py_comment_lines(row["doc"], "")
        out.append(f"{row['name']} = {_py_value(row)}")

    def enum(name: str, base: str, doc: str, rows: list[dict[str, Any]], docs: Callable[..., str]) -> None:
        out.extend(["", "", f"class {name}(enum.{base}):", f'    """{doc}"""', ""])
        for row in rows:
            value = hex(row["value"]) if name in HEX_ENUMS else str(row["value"])
            out.extend(_py_member(row["name"], value, docs(row)))

    enum("FrameType", "IntEnum", ENUM_DOCS["FrameType"], spec["frame_type"], lambda row: _frame_doc(row, 0))
    enum("Flags", "IntFlag", ENUM_DOCS["Flags"], spec["flag"], _doc)
    enum("ErrorCode", "IntEnum", ENUM_DOCS["ErrorCode"], spec["error_code"], _doc)
    enum("CloseCode", "IntEnum", ENUM_DOCS["CloseCode"], spec["close_code"], _doc)
    stream_frames = ", ".join(f"FrameType.{r['name']}" for r in spec["frame_type"] if r["stream"] != "0")
    out += [
        "",
        "",
        "#: Frame types that belong to a stream (id >= 1); the others travel on stream 0.",
        "STREAM_FRAMES = frozenset(",
        f"    {{{stream_frames}}}",
        ")",
        "",
        "#: HTTP status a relay answers when a stream is reset before its response head started",
        "#: (any other code: DEFAULT_RESET_STATUS).",
        "STATUS_FOR_CODE: dict[int, int] = {",
        *(f"    ErrorCode.{r['name']}: {r['status']}," for r in spec["error_code"] if "status" in r),
        "}",
    ]
    return "\n".join(out) + "\n"


def _doc(row: dict[str, Any]) -> str:
    return str(row["doc"])


# ----------------------------------------------------------------------------------------- TypeScript


def _ts_value(row: dict[str, Any]) -> str:
    value = row["value"]
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return hex(value) if row.get("hex") else (f"{value:_}" if value >= 100_000 else str(value))


def render_typescript(spec: dict[str, Any], version: str) -> str:
    out = [
        f"// The wire constants (docs/spec/wire.md), generated by `{COMMAND}` from",
        "// docs/spec/wire.toml: do not edit. The Python constants (bridge/wire/constants.py) come from",
        "// the same file. No I/O and no Cloudflare API here.",
        "",
        "/** The kaggle-bridge version (bridge/__init__.py), shown by /_relay/health. */",
        f"export const VERSION = {json.dumps(version)};",
    ]
    for row in spec["constant"]:
        if row.get("section"):
            out += ["", f"// {row['section']}"]
        out += [f"/** {row['doc']} */", f"export const {row['name']} = {_ts_value(row)};"]

    def enum(name: str, rows: list[dict[str, Any]], docs: Callable[..., str]) -> None:
        out.extend(["", f"/** {ENUM_DOCS[name]} */", f"export enum {name} {{"])
        for row in rows:
            value = hex(row["value"]) if name in HEX_ENUMS else str(row["value"])
            out.append(f"  /** {docs(row)} */")
            out.append(f"  {row['name']} = {value},")
        out.append("}")

    enum("FrameType", spec["frame_type"], lambda row: _frame_doc(row, 1))
    enum("Flags", spec["flag"], _doc)
    enum("ErrorCode", spec["error_code"], _doc)
    enum("CloseCode", spec["close_code"], _doc)
    out += [
        "",
        "/** Frame types that belong to a stream (id ≥ 1); the others travel on stream 0. */",
        "export const STREAM_FRAMES: ReadonlySet<number> = new Set([",
        *(f"  FrameType.{r['name']}," for r in spec["frame_type"] if r["stream"] != "0"),
        "]);",
        "",
        "/** HTTP status a relay answers when a stream is reset before its response head started",
        " * (any other code: DEFAULT_RESET_STATUS). */",
        "export const STATUS_FOR_CODE: ReadonlyMap<number, number> = new Map([",
        *(f"  [ErrorCode.{r['name']}, {r['status']}]," for r in spec["error_code"] if "status" in r),
        "]);",
    ]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------- Markdown


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _num(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def md_tables(spec: dict[str, Any]) -> dict[str, str]:
    """The generated tables of wire.md, by block name."""
    frames = ["| Type | Name | Direction | Stream | Payload | Meaning |", "|---|---|---|---|---|---|"]
    for r in spec["frame_type"]:
        sender = SENDER.get(r["sender"], SENDER_BOTH)[1]
        cells = [f"{r['value']:#x}", r["name"], sender, r["stream"], _md(r["payload"]), _md(r["doc"])]
        frames.append("| " + " | ".join(cells) + " |")
    flags = ["| Flag | Value | Meaning |", "|---|---|---|"]
    flags += [f"| {r['name']} | {r['value']:#x} | {_md(r['doc'])} |" for r in spec["flag"]]
    default = next(r["value"] for r in spec["constant"] if r["name"] == "DEFAULT_RESET_STATUS")
    errors = ["| Code | Name | Meaning | HTTP |", "|---|---|---|---|"]
    for r in spec["error_code"]:
        status = r.get("status", default)
        shown = f"({status}; GOAWAY only)" if r.get("scope") == "goaway" else str(status)
        errors.append(f"| {r['value']} | {r['name']} | {_md(r['doc'])} | {shown} |")
    limits = ["| Name | Value | Applies to | When exceeded |", "|---|---|---|---|"]
    for r in spec["constant"]:
        if "limit" in r:
            unit = " s" if isinstance(r["value"], float) else ""
            limits.append(
                f"| `{r['name']}` | {_num(r['value'])}{unit} | {_md(r['limit']['applies'])} "
                f"| {_md(r['limit']['exceeded'])} |"
            )
    records = ["| Opcode | Name | Payload |", "|---|---|---|"]
    records += [
        f"| {r['value']:#x} | {r['name']} | {_md(r['doc'].removeprefix('Record opcode: '))} |"
        for r in spec["constant"]
        if r.get("record")
    ]
    closes = ["| Code | Name | When |", "|---|---|---|"]
    closes += [f"| {r['value']} | {r['name']} | {_md(r['doc'])} |" for r in spec["close_code"]]
    return {
        "frame-types": "\n".join(frames),
        "flags": "\n".join(flags),
        "error-codes": "\n".join(errors),
        "limits": "\n".join(limits),
        "ws-records": "\n".join(records),
        "close-codes": "\n".join(closes),
    }


def extension_table(data: dict[str, Any]) -> str:
    relays: list[str] = data["relays"]
    head = "| Extension | What it adds | " + " | ".join(f"{r} relay" for r in relays) + " |"
    rows = [head, "|---|---|" + "---|" * len(relays)]
    for ext in data["extension"]:
        marks = " | ".join("yes" if ext[r] else "no" for r in relays)
        rows.append(f"| `{ext['name']}` | {_md(ext['summary'])} | {marks} |")
    return "\n".join(rows)


def _fill(body: str, match: re.Match[str]) -> str:
    return match.group(1) + body + match.group(2)


def fill_blocks(text: str, blocks: dict[str, str], where: str) -> str:
    """``text`` with each GENERATED block replaced; every block must be there exactly once."""
    for name, body in blocks.items():
        begin, end = (
            rf"<!-- BEGIN GENERATED {re.escape(name)} [^>]*-->\n",
            rf"\n<!-- END GENERATED {re.escape(name)} -->",
        )
        pattern = re.compile(f"({begin}).*?({end})", re.S)
        text, count = pattern.subn(partial(_fill, body), text)
        if count != 1:
            raise SpecError(f"{where}: the GENERATED block {name!r} must appear exactly once (found {count})")
    return text


# ----------------------------------------------------------------------------------------- package.json


def with_version(text: str, version: str, lock: bool) -> str:
    """``text`` (package.json or its lockfile) with the package's own version set, nothing else
    touched: the version of the top object and, in the lockfile, of ``packages[""]``."""
    data = json.loads(text)
    top = re.compile(r'\A(\{\s*"name":\s*"[^"]*",\s*"version":\s*)"[^"]*"')
    text, n = top.subn(lambda m: m.group(1) + json.dumps(version), text)
    if lock:
        root = re.compile(r'("packages":\s*\{\s*"":\s*\{\s*"name":\s*"[^"]*",\s*"version":\s*)"[^"]*"')
        text, m = root.subn(lambda mm: mm.group(1) + json.dumps(version), text)
        n += m
    if n != (2 if lock else 1) or not isinstance(data, dict):
        raise SpecError("package.json/lock: expected `name`, then `version`, at the top and in packages['']")
    return text


# ----------------------------------------------------------------------------------------- main


def outputs() -> dict[Path, str]:
    """Every generated file with the content it must have."""
    spec = load_spec()
    version = package_version()
    result = {
        PY_OUT: render_python(spec),
        TS_OUT: render_typescript(spec, version),
    }
    if WIRE_MD.exists():
        result[WIRE_MD] = fill_blocks(WIRE_MD.read_text(encoding="utf-8"), md_tables(spec), "wire.md")
    if RELAY_MD.exists():
        blocks = {"extensions": extension_table(load_extensions())}
        result[RELAY_MD] = fill_blocks(RELAY_MD.read_text(encoding="utf-8"), blocks, "relay.md")
    result[PACKAGE_JSON] = with_version(PACKAGE_JSON.read_text(encoding="utf-8"), version, lock=False)
    result[PACKAGE_LOCK] = with_version(PACKAGE_LOCK.read_text(encoding="utf-8"), version, lock=True)
    return result


def stale() -> list[Path]:
    """The generated files whose content differs from what the spec gives (missing ones too)."""
    return [
        path
        for path, text in outputs().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    try:
        wanted = outputs()
    except (SpecError, KeyError, ValueError) as exc:
        print(f"gen_wire: {exc}", file=sys.stderr)
        return 2
    behind = [p for p, text in wanted.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for path in behind:
            print(f"gen_wire: {path.relative_to(ROOT)} is stale: run `{COMMAND}`", file=sys.stderr)
        return 1 if behind else 0
    for path in behind:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path], encoding="utf-8")
        print(f"gen_wire: wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
