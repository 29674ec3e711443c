"""The shared byte vectors (docs/spec/vectors/) against the Python core, and the worked example of
docs/spec/wire.md section 13 against the vectors, byte for byte. The Cloudflare relay's TypeScript
core runs the same files (deployment/cloudflare/test/wire.test.ts)."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from bridge import wire as p
from bridge.errors import ProtocolError

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "docs" / "spec" / "vectors"
WIRE_MD = ROOT / "docs" / "spec" / "wire.md"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


FRAMES = load("frames.json")
CASES = load("cases.json")
RECORDS = load("ws-records.json")
EXAMPLE = load("worked-example.json")


# ------------------------------------------------------------------------------------------ helpers


def frame_type(value: str | int) -> int:
    return p.FrameType[value] if isinstance(value, str) else value


def code_of(value: str | int) -> int:
    return p.ErrorCode[value] if isinstance(value, str) else value


def code_name(code: int) -> str | int:
    return p.ErrorCode(code).name if code in p.ErrorCode._value2member_map_ else code


def payload_of(spec: dict[str, Any]) -> bytes:
    """A payload given as ``json``, ``text``, ``hex`` or ``fill`` (README.md; ``payload_*`` in the
    frame vectors, whose ``hex`` is the whole frame), or none."""
    for prefix in ("payload_", ""):
        if prefix + "json" in spec:
            return json.dumps(spec[prefix + "json"], separators=(",", ":"), ensure_ascii=False).encode()
        if prefix + "text" in spec:
            return str(spec[prefix + "text"]).encode()
        if prefix + "hex" in spec:
            return bytes.fromhex(str(spec[prefix + "hex"]))
        if prefix + "fill" in spec:
            byte, count = spec[prefix + "fill"]
            return bytes([int(byte)]) * int(count)
    return b""


def message_of(spec: dict[str, Any]) -> bytes:
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    return b"".join(
        p.encode_frame(frame_type(f["type"]), f.get("flags", 0), f["stream_id"], payload_of(f))
        for f in spec["frames"]
    )


def normalize(event: p.Event) -> dict[str, Any]:
    """An event in the vocabulary of docs/spec/vectors/README.md."""
    match event:
        case p.HelloReceived():
            keys = {"version": event.version, "token": event.token, "node": event.node}
            return {"event": "hello", **keys, "routes": event.routes, "info": event.info}
        case p.WelcomeReceived():
            keys = {"version": event.version, "session": event.session, "heartbeat": event.heartbeat}
            return {"event": "welcome", **keys, "info": event.info}
        case p.StreamOpened():
            return {
                "event": "open",
                "stream_id": event.stream_id,
                "method": event.method,
                "route": event.route,
                "target": event.target,
                "headers": [list(h) for h in event.headers],
                "end_stream": event.end_stream,
                "info": event.info,
            }
        case p.ResponseReceived():
            headers = [list(h) for h in event.headers]
            keys = {"stream_id": event.stream_id, "status": event.status, "headers": headers}
            return {"event": "response", **keys, "end_stream": event.end_stream}
        case p.DataReceived():
            keys = {"stream_id": event.stream_id, "data_hex": event.data.hex(), "length": len(event.data)}
            return {"event": "data", **keys, "end_stream": event.end_stream}
        case p.StreamReset():
            keys = {"stream_id": event.stream_id, "code": code_name(event.code), "reason": event.reason}
            return {"event": "reset", **keys, "remote": event.remote}
        case p.WindowUpdated():
            return {"event": "window", "stream_id": event.stream_id, "increment": event.increment}
        case p.GoAwayReceived():
            keys = {"code": code_name(event.code), "reason": event.reason}
            return {"event": "goaway", **keys, "last_stream_id": event.last_stream_id}
        case p.StatsReceived():
            return {"event": "stats", "body": event.body}
    raise AssertionError(f"unknown event {event!r}")


def sent(conn: p.Connection) -> list[dict[str, Any]]:
    """The frames ``conn`` queued, as README.md's ``sends``."""
    out: list[dict[str, Any]] = []
    for message in conn.data_to_send():
        for frame in p.iter_frames(message):
            entry: dict[str, Any] = {"type": p.FrameType(frame.type).name, "stream_id": frame.stream_id}
            if frame.type == p.FrameType.RESET:
                entry["code"] = code_name(struct.unpack_from(">I", frame.payload)[0])
            out.append(entry)
    return out


def matches(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> bool:
    """Every expected entry's keys equal the actual one's, in order, and as many entries."""
    return len(expected) == len(actual) and all(
        all(a.get(k) == v for k, v in e.items()) for e, a in zip(expected, actual, strict=True)
    )


def run_setup(conn: p.Connection, case: dict[str, Any]) -> None:
    for step in case["setup"]:
        if step == "handshake":
            if conn.role is p.Role.RELAY:
                hello = json.dumps(CASES["peer_hello"]).encode()
                conn.receive(p.encode_frame(p.FrameType.HELLO, 0, 0, hello))
                conn.accept("s", 5)
            else:
                conn.send_hello("t", "nb", ["r"])
                welcome = json.dumps(CASES["peer_welcome"]).encode()
                conn.receive(p.encode_frame(p.FrameType.WELCOME, 0, 0, welcome))
            continue
        ((name, args),) = step.items()
        if name == "receive":
            conn.receive(message_of(args))
        elif name == "open_stream":
            headers = [(k, v) for k, v in args["headers"]]
            conn.open_stream(
                args["stream_id"],
                args["method"],
                args["route"],
                args["target"],
                headers,
                end_stream=args["end_stream"],
            )
        elif name == "send_hello":
            conn.send_hello(args["token"], args["node"], args["routes"])
        elif name == "acknowledge":
            conn.acknowledge(args["stream_id"], args["nbytes"])
        elif name == "send_reset":
            conn.send_reset(args["stream_id"], code_of(args["code"]))
        elif name == "send_goaway":
            conn.send_goaway(code_of(args["code"]), args.get("reason", ""))
        else:
            raise AssertionError(f"unknown step {name}")
    conn.data_to_send()


# ------------------------------------------------------------------------------------------ frames


@pytest.mark.parametrize("vector", FRAMES["frames"], ids=lambda v: v["name"])
def test_frame_encodes_and_decodes_to_the_vector(vector: dict[str, Any]) -> None:
    payload = payload_of(vector)
    wire = bytes.fromhex(vector["hex"])
    assert p.encode_frame(frame_type(vector["type"]), vector["flags"], vector["stream_id"], payload) == wire
    (frame,) = p.iter_frames(wire)
    assert (frame.type, frame.flags, frame.stream_id, frame.payload) == (
        frame_type(vector["type"]),
        vector["flags"],
        vector["stream_id"],
        payload,
    )


@pytest.mark.parametrize("vector", FRAMES["messages"], ids=lambda v: v["name"])
def test_a_message_of_several_frames_decodes_in_order(vector: dict[str, Any]) -> None:
    by_name = {f["name"]: f for f in FRAMES["frames"]}
    decoded = [f.encode().hex() for f in p.iter_frames(bytes.fromhex(vector["hex"]))]
    assert decoded == [by_name[name]["hex"] for name in vector["frames"]]


def test_every_frame_type_has_a_vector() -> None:
    covered = {frame_type(v["type"]) for v in FRAMES["frames"]}
    assert set(p.FrameType) <= covered


# ------------------------------------------------------------------------------------------ cases


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: f"{c['role']}: {c['name']}")
def test_connection_case(case: dict[str, Any]) -> None:
    role = p.Role.RELAY if case["role"] == "relay" else p.Role.BRIDGE
    conn = p.Connection(role, **case.get("limits", {}))
    run_setup(conn, case)
    message = message_of(case["receive"])
    expect = case["expect"]
    if "connection_error" in expect:
        with pytest.raises(ProtocolError) as info:
            conn.receive(message)
        assert code_name(vars(info.value)["code"]) == expect["connection_error"], info.value
        return
    events = [normalize(e) for e in conn.receive(message)]
    assert matches(expect.get("events", []), events), events
    assert matches(expect.get("sends", []), sent(conn))


def test_the_cases_cover_every_error_a_receiver_raises() -> None:
    """Each code a peer's bad frame can cause has a case: connection errors and stream errors."""
    seen: set[str] = set()
    for case in CASES["cases"]:
        expect = case["expect"]
        seen.add(expect.get("connection_error", ""))
        seen.update(s.get("code", "") for s in expect.get("sends", []))
    wanted = {"PROTOCOL_ERROR", "FLOW_CONTROL_ERROR", "FRAME_TOO_LARGE", "HEADERS_TOO_LARGE"}
    assert wanted | {"REFUSED_STREAM", "TOO_MANY_STREAMS"} <= seen


# ------------------------------------------------------------------------------------------ records


@pytest.mark.parametrize("vector", RECORDS["encode"], ids=lambda v: v["name"])
def test_ws_record_encodes_to_the_vector(vector: dict[str, Any]) -> None:
    opcode = getattr(p, vector["opcode"])
    assert p.encode_ws_record(opcode, bytes.fromhex(vector["payload_hex"])).hex() == vector["hex"]


@pytest.mark.parametrize("vector", RECORDS["close"], ids=lambda v: str(v["code"]))
def test_ws_close_record_encodes_to_the_vector(vector: dict[str, Any]) -> None:
    assert p.encode_ws_close(vector["code"], vector["reason"]).hex() == vector["hex"]


@pytest.mark.parametrize("vector", RECORDS["decode_close"], ids=lambda v: v["payload_hex"] or "empty")
def test_ws_close_payload_decodes_to_the_vector(vector: dict[str, Any]) -> None:
    assert p.decode_ws_close(bytes.fromhex(vector["payload_hex"])) == (vector["code"], vector["reason"])


@pytest.mark.parametrize("vector", RECORDS["reader"], ids=lambda v: v["name"])
def test_ws_record_reader_follows_the_vector(vector: dict[str, Any]) -> None:
    reader = p.WsRecordReader()
    records: list[list[str]] = []
    try:
        for feed in vector["feeds"]:
            records += [[_ws_name(op), data.hex()] for op, data in reader.feed(bytes.fromhex(feed))]
    except ProtocolError as exc:
        assert code_name(vars(exc)["code"]) == vector.get("error"), exc
        return
    assert "error" not in vector, "the reader raised nothing"
    assert records == vector["records"]
    assert reader.pending == vector["pending"]


def _ws_name(opcode: int) -> str:
    return {p.WS_TEXT: "WS_TEXT", p.WS_BINARY: "WS_BINARY", p.WS_CLOSE: "WS_CLOSE"}[opcode]


# ------------------------------------------------------------------------------------------ worked example


def _call(conn: p.Connection, call: dict[str, Any]) -> None:
    ((name, a),) = call.items()
    headers = [(k, v) for k, v in a.get("headers", [])]
    if name == "send_hello":
        conn.send_hello(a["token"], a["node"], a["routes"], **a["info"])
    elif name == "accept":
        conn.accept(a["session"], a["heartbeat"])
    elif name == "open_stream":
        args = (a["stream_id"], a["method"], a["route"], a["target"], headers)
        conn.open_stream(*args, end_stream=a["end_stream"], **a["info"])
    elif name == "send_response":
        conn.send_response(a["stream_id"], a["status"], headers, end_stream=a["end_stream"])
    elif name == "send_data":
        conn.send_data(a["stream_id"], payload_of(a), end_stream=a["end_stream"])
    elif name == "acknowledge":
        conn.acknowledge(a["stream_id"], a["nbytes"])
    elif name == "send_goaway":
        conn.send_goaway(code_of(a["code"]), a["reason"])
    else:
        raise AssertionError(f"unknown call {name}")


def _expected_message(message: dict[str, Any]) -> bytes:
    data = b"".join(bytes.fromhex(f["header"]) + payload_of(f) for f in message["frames"])
    assert len(data) == message["length"]
    return data


def test_the_worked_example_is_what_the_core_produces() -> None:
    """Both sides replay their calls; every message is the vector's, byte for byte, and gives the
    other side the vector's events."""
    sides = {"bridge": p.Connection(p.Role.BRIDGE), "relay": p.Connection(p.Role.RELAY)}
    for step in EXAMPLE["steps"]:
        if "text" in step:
            assert step["text"].encode().hex() == step["hex"]
            assert step["text"] == (p.PING if step["from"] == "bridge" else p.PONG)
            continue
        sender = sides[step["from"]]
        receiver = sides["relay" if step["from"] == "bridge" else "bridge"]
        for call in step["calls"]:
            _call(sender, call)
        messages = sender.data_to_send()
        assert messages == [_expected_message(m) for m in step["messages"]], step["label"]
        events = [normalize(e) for m in messages for e in receiver.receive(m)]
        assert matches(step["events"], events), (step["label"], events)


#: A frame header in the doc: ``00 00 a6 | 01 | 00 | 00 00 00 00``.
HEADER_LINE = re.compile(
    r"^((?:[0-9a-f]{2} ){2}[0-9a-f]{2}) \| ([0-9a-f]{2}) \| ([0-9a-f]{2}) \| ((?:[0-9a-f]{2} ?){4})"
)
HEX_LINE = re.compile(r"^((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:\s{2,}.*)?$")


def _doc_blocks() -> list[tuple[str, int | None, list[list[Any]]]]:
    """The code blocks of section 13 of wire.md as (the prose before, the message size it states,
    frames): each frame is [header bytes, payload bytes or None when the doc leaves it out, repeat]."""
    text = WIRE_MD.read_text(encoding="utf-8")
    parts = text[text.index("## 13. Worked example") :].split("```")
    blocks = []
    for prose, body in zip(parts[0::2], parts[1::2], strict=False):
        size = re.findall(r"\((?:message of )?([\d,]+) bytes", prose)
        frames: list[list[Any]] = []
        for line in body.splitlines():
            if head := HEADER_LINE.match(line):
                header = bytes.fromhex("".join(head.groups()).replace(" ", ""))
                repeat = re.search(r"\(\u00d7(\d+)\)", line)
                frames.append([header, None, int(repeat.group(1)) if repeat else 1])
            elif line.startswith("{") and frames:
                frames[-1][1] = line.encode()
            elif (hexa := HEX_LINE.match(line)) and frames:
                frames[-1][1] = bytes.fromhex(hexa.group(1).replace(" ", ""))
        title = prose.strip().splitlines()[-1] if prose.strip() else ""
        blocks.append((title, int(size[-1].replace(",", "")) if size else None, frames))
    return blocks


def test_wire_md_shows_the_worked_example_byte_for_byte() -> None:
    binary = [(m, s) for s in EXAMPLE["steps"] if "messages" in s for m in s["messages"]]
    blocks = [b for b in _doc_blocks() if b[2]]
    assert len(blocks) == len(binary), [b[0] for b in blocks]
    for (title, size, doc_frames), (message, step) in zip(blocks, binary, strict=True):
        wanted = [(bytes.fromhex(f["header"]), payload_of(f)) for f in message["frames"]]
        shown = [(header, payload) for header, payload, repeat in doc_frames for _ in range(repeat)]
        if step["label"] == "6" and step["from"] == "relay":
            assert size is None  # the doc shows the body's frame heads only
        else:
            assert size == message["length"], title
        assert [h for h, _ in shown] == [h for h, _ in wanted], title
        for (_, doc_payload), (_, payload) in zip(shown, wanted, strict=True):
            assert doc_payload is None or doc_payload == payload, title
    pings = re.findall(r"`ping` \(`([0-9a-f ]+)`\).*?`pong`\s+\(`([0-9a-f ]+)`\)", WIRE_MD.read_text(), re.S)
    assert pings == [("70 69 6e 67", "70 6f 6e 67")]


def test_the_reset_example_of_section_4_matches_its_vector() -> None:
    text = WIRE_MD.read_text(encoding="utf-8")
    block = text[text.index("Example, RESET on stream 2") :]
    body = block[block.index("```\n") + 4 : block.index("\n```", block.index("```\n") + 4)]
    doc = b"".join(bytes.fromhex(re.split(r"\s{2,}", line)[0].replace("|", "")) for line in body.splitlines())
    (vector,) = [f for f in FRAMES["frames"] if f["name"].startswith("RESET UPSTREAM_TIMEOUT")]
    assert doc.hex() == vector["hex"]
