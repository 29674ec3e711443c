"""The spec as the single source: generated files current, constants identical in both languages,
one version string, every extension of the table described and tested."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

import bridge
from bridge import wire as p
from bridge.wire import constants as c

ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = ROOT / "docs" / "spec"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_wire", ROOT / "scripts" / "gen_wire.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def test_generated_files_are_current() -> None:
    """What CI checks: `python3 scripts/gen_wire.py --check` finds nothing stale."""
    stale = [str(path.relative_to(ROOT)) for path in gen.stale()]
    assert not stale, f"stale: {stale}; run `python3 scripts/gen_wire.py`"


def test_check_mode_names_a_stale_file_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "constants.py"
    current = gen.render_python(gen.load_spec())
    stale.write_text(current.replace("DEFAULT_WINDOW = 262_144", "DEFAULT_WINDOW = 1"))
    monkeypatch.setattr(gen, "PY_OUT", stale)
    monkeypatch.setattr(gen, "ROOT", tmp_path.parent)
    assert gen.main(["--check"]) == 1
    assert "constants.py is stale" in capsys.readouterr().err
    assert "DEFAULT_WINDOW = 1\n" in stale.read_text()  # --check changes nothing
    assert gen.main([]) == 0
    assert "DEFAULT_WINDOW = 262_144" in stale.read_text()
    assert gen.main(["--check"]) == 0


def test_the_command_line_check_passes() -> None:
    command = [sys.executable, "scripts/gen_wire.py", "--check"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_spec_that_breaks_its_rules_is_refused(tmp_path: Path) -> None:
    text = (SPEC_DIR / "wire.toml").read_text(encoding="utf-8")
    bad = tmp_path / "wire.toml"
    bad.write_text(text.replace('name = "WINDOW"\nvalue = 7', 'name = "WINDOW"\nvalue = 6'))
    with pytest.raises(gen.SpecError, match="distinct"):
        gen.load_spec(bad)


def test_constants_import_with_no_other_bridge_module() -> None:
    """The generated file stands alone: loaded by path, it pulls in no bridge module."""
    code = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('wire_constants', sys.argv[1]); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "extra = sorted(m for m in sys.modules if m.split('.')[0] == 'bridge'); "
        "print(extra); assert not extra and module.PROTOCOL_VERSION == 1"
    )
    command = [sys.executable, "-c", code, str(gen.PY_OUT)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


#: The wire names bridge/protocol.py had (the redesign's contract): bridge/wire/constants.py defines them.
PROTOCOL_NAMES = [
    "PROTOCOL_VERSION",
    "HEADER_SIZE",
    "ABSOLUTE_MAX_PAYLOAD",
    "DEFAULT_MAX_FRAME",
    "MAX_HEADER_BLOCK",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "DEFAULT_MAX_STREAMS",
    "MAX_MESSAGE",
    "MAX_STREAM_ID",
    "PING",
    "PONG",
    "STATUS_FOR_CODE",
    "WS_TEXT",
    "WS_BINARY",
    "WS_CLOSE",
    "WS_RECORD_HEADER",
    "MAX_WS_MESSAGE",
]


@pytest.mark.parametrize("name", PROTOCOL_NAMES)
def test_generated_constant_equals_the_protocol_modules(name: str) -> None:
    assert getattr(c, name) == getattr(p, name)


@pytest.mark.parametrize("name", ["FrameType", "Flags", "ErrorCode"])
def test_generated_enum_equals_the_protocol_modules(name: str) -> None:
    generated, current = getattr(c, name), getattr(p, name)
    assert [(k, m.value) for k, m in generated.__members__.items()] == [
        (k, m.value) for k, m in current.__members__.items()
    ]
    assert generated.__bases__ == current.__bases__


def test_typescript_constants_carry_the_same_values() -> None:
    """Read back from the generated TypeScript: every constant and enum member, same value."""
    ts = gen.TS_OUT.read_text(encoding="utf-8")
    consts = dict(re.findall(r"^export const (\w+) = (.+);$", ts, re.M))
    for name in PROTOCOL_NAMES:
        if name == "STATUS_FOR_CODE":
            pairs = dict(re.findall(r"\[ErrorCode\.(\w+), (\d+)\]", ts))
            assert {c.ErrorCode[k]: int(v) for k, v in pairs.items()} == c.STATUS_FOR_CODE
            continue
        value = getattr(c, name)
        assert ast.literal_eval(consts[name]) == value, name
    for enum_name in ("FrameType", "Flags", "ErrorCode", "CloseCode"):
        body = re.search(rf"export enum {enum_name} \{{(.*?)\n\}}", ts, re.S)
        assert body is not None
        found = re.findall(r"^  (\w+) = (0x[0-9a-f]+|\d+),$", body.group(1), re.M)
        members = {k: int(v, 0) for k, v in found}
        assert members == {k: m.value for k, m in getattr(c, enum_name).__members__.items()}, enum_name


def test_one_version_string() -> None:
    """The version is written once, in bridge/__init__.py: pyproject reads it from there, the
    Cloudflare relay's package.json, lockfile and VERSION constant are generated from it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bridge.__version__"}
    cloudflare = ROOT / "deployment" / "cloudflare"
    package = json.loads((cloudflare / "package.json").read_text(encoding="utf-8"))
    lock = json.loads((cloudflare / "package-lock.json").read_text(encoding="utf-8"))
    assert package["version"] == lock["version"] == lock["packages"][""]["version"] == bridge.__version__
    assert f'export const VERSION = "{bridge.__version__}";' in gen.TS_OUT.read_text(encoding="utf-8")


def test_a_version_bump_is_carried_into_package_json() -> None:
    text = (ROOT / "deployment" / "cloudflare" / "package-lock.json").read_text(encoding="utf-8")
    bumped = json.loads(gen.with_version(text, "9.8.7", lock=True))
    assert bumped["version"] == bumped["packages"][""]["version"] == "9.8.7"
    unchanged = json.loads(text)
    assert bumped["packages"]["node_modules/wrangler"] == unchanged["packages"]["node_modules/wrangler"]


def test_every_extension_is_described_and_has_a_conformance_test() -> None:
    extensions = gen.load_extensions()
    relay_md = (SPEC_DIR / "relay.md").read_text(encoding="utf-8")
    suite = "\n".join(path.read_text() for path in (ROOT / "tests" / "conformance").glob("test_*.py"))
    tested = set(re.findall(r"@pytest\.mark\.extension\(\"([a-z0-9-]+)\"\)", suite))
    names = [ext["name"] for ext in extensions["extension"]]
    for name in names:
        assert re.search(rf"^### E\.\d+ `{re.escape(name)}`$", relay_md, re.M), f"relay.md lacks {name}"
        assert name in tested, f"no conformance test is marked extension({name!r})"
    assert tested <= set(names), f"tests name unknown extensions: {tested - set(names)}"
