// The shared byte vectors (docs/spec/vectors/, see its README.md) against the Cloudflare relay's
// sans-I/O wire core: the codec, the WebSocket records and the relay's connection state machine.
// The Python core runs the same files (tests/unit/test_vectors.py). Run with test/run.sh.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";

import {
  ProtocolError,
  StreamError,
  WsRecordReader,
  decodeWsClose,
  encodeFrame,
  encodeWsClose,
  encodeWsRecord,
  parseMessage,
  statusForCode,
  utf8,
} from "../src/wire/codec";
import { Limits, RelayConnection, WireEvent } from "../src/wire/connection";
import { DEFAULT_RESET_STATUS, ErrorCode, FrameType, PING, PONG, STATUS_FOR_CODE, WS_BINARY, WS_CLOSE, WS_TEXT } from "../src/wire/constants";

type Json = any; // eslint-disable-line @typescript-eslint/no-explicit-any -- vectors are plain JSON

const VECTORS = process.env.VECTORS ?? join(__dirname, "..", "..", "..", "..", "docs", "spec", "vectors");
const load = (name: string): Json => JSON.parse(readFileSync(join(VECTORS, name), "utf8"));
const FRAMES = load("frames.json");
const CASES = load("cases.json");
const RECORDS = load("ws-records.json");
const EXAMPLE = load("worked-example.json");

// ------------------------------------------------------------------------------------------ helpers

const hex = (bytes: Uint8Array): string => [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");

function unhex(text: string): Uint8Array {
  const clean = text.replace(/ /g, "");
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

const frameType = (value: string | number): number => (typeof value === "string" ? FrameType[value as keyof typeof FrameType] : value);
const codeOf = (value: string | number): number => (typeof value === "string" ? ErrorCode[value as keyof typeof ErrorCode] : value);
const codeName = (code: number): string | number => ErrorCode[code] ?? code;

/** A payload given as json, text, hex or fill (README.md; payload_* in the frame vectors). */
function payloadOf(spec: Json): Uint8Array {
  for (const prefix of ["payload_", ""]) {
    if (prefix + "json" in spec) return utf8(JSON.stringify(spec[prefix + "json"]));
    if (prefix + "text" in spec) return utf8(spec[prefix + "text"]);
    if (prefix + "hex" in spec) return unhex(spec[prefix + "hex"]);
    if (prefix + "fill" in spec) return new Uint8Array(spec[prefix + "fill"][1]).fill(spec[prefix + "fill"][0]);
  }
  return new Uint8Array(0);
}

function messageOf(spec: Json): Uint8Array {
  if ("hex" in spec) return unhex(spec.hex);
  return concat(spec.frames.map((f: Json) => encodeFrame(frameType(f.type), f.flags ?? 0, f.stream_id, payloadOf(f))));
}

/** An event in the vocabulary of docs/spec/vectors/README.md. */
function normalize(e: WireEvent): Json {
  switch (e.event) {
    case "hello":
      return { event: "hello", version: e.version, token: e.token, node: e.node, routes: e.routes, info: e.info };
    case "response":
      return { event: "response", stream_id: e.streamId, status: e.status, headers: e.headers, end_stream: e.endStream };
    case "data":
      return { event: "data", stream_id: e.streamId, data_hex: hex(e.data), length: e.data.byteLength, end_stream: e.endStream };
    case "reset":
      return { event: "reset", stream_id: e.streamId, code: codeName(e.code), reason: e.reason, remote: e.remote };
    case "window":
      return { event: "window", stream_id: e.streamId, increment: e.increment };
    case "goaway":
      return { event: "goaway", code: codeName(e.code), reason: e.reason, last_stream_id: e.lastStreamId };
    case "stats":
      return { event: "stats", body: e.body };
  }
}

/** The frames `conn` queued, as README.md's `sends`. */
function sent(conn: RelayConnection): Json[] {
  const out: Json[] = [];
  for (const message of conn.dataToSend()) {
    for (const f of parseMessage(message)) {
      const entry: Json = { type: FrameType[f.type] ?? f.type, stream_id: f.streamId };
      if (f.type === FrameType.RESET) entry.code = codeName(new DataView(f.payload.buffer, f.payload.byteOffset, 4).getUint32(0));
      out.push(entry);
    }
  }
  return out;
}

/** Every expected entry's keys equal the actual one's, in order, and as many entries. */
function assertMatches(expected: Json[], actual: Json[], what: string): void {
  assert.equal(actual.length, expected.length, `${what}: ${JSON.stringify(actual)}`);
  expected.forEach((e: Json, i: number) => {
    for (const [k, v] of Object.entries(e)) assert.deepEqual(actual[i][k], v, `${what} #${i} ${k}: ${JSON.stringify(actual[i])}`);
  });
}

function limitsOf(spec: Json | undefined): Limits {
  return spec ? { window: spec.window, maxFrame: spec.max_frame, maxStreams: spec.max_streams } : {};
}

function runSetup(conn: RelayConnection, steps: Json[]): void {
  for (const step of steps) {
    if (step === "handshake") {
      conn.receive(encodeFrame(FrameType.HELLO, 0, 0, utf8(JSON.stringify(CASES.peer_hello))));
      conn.accept("s", 5);
      continue;
    }
    const [[name, a]] = Object.entries(step) as [[string, Json]];
    if (name === "receive") conn.receive(messageOf(a));
    else if (name === "open_stream") assert.equal(conn.openStream(a.method, a.route, a.target, a.headers, a.end_stream), a.stream_id);
    else if (name === "acknowledge") conn.acknowledge(a.stream_id, a.nbytes);
    else if (name === "send_reset") conn.sendReset(a.stream_id, codeOf(a.code));
    else if (name === "send_goaway") conn.sendGoaway(codeOf(a.code), a.reason ?? "");
    else assert.fail(`unknown step ${name}`);
  }
  conn.dataToSend();
}

// ------------------------------------------------------------------------------------------ frames

for (const v of FRAMES.frames) {
  test(`frame: ${v.name}`, () => {
    const payload = payloadOf(v);
    assert.equal(hex(encodeFrame(frameType(v.type), v.flags, v.stream_id, payload)), v.hex);
    const [frame, ...rest] = parseMessage(unhex(v.hex));
    assert.equal(rest.length, 0);
    assert.deepEqual([frame!.type, frame!.flags, frame!.streamId, hex(frame!.payload)], [frameType(v.type), v.flags, v.stream_id, hex(payload)]);
  });
}

for (const v of FRAMES.messages) {
  test(`message: ${v.name}`, () => {
    const byName = new Map<string, Json>(FRAMES.frames.map((f: Json) => [f.name, f]));
    const decoded = parseMessage(unhex(v.hex)).map((f) => hex(encodeFrame(f.type, f.flags, f.streamId, f.payload)));
    assert.deepEqual(decoded, v.frames.map((n: string) => byName.get(n).hex));
  });
}

test("every frame type has a vector", () => {
  const covered = new Set(FRAMES.frames.map((v: Json) => frameType(v.type)));
  for (const value of Object.values(FrameType)) if (typeof value === "number") assert.ok(covered.has(value), FrameType[value]);
});

test("statuses of resets before the response head", () => {
  assert.equal(statusForCode(ErrorCode.NO_ROUTE), 404);
  assert.equal(statusForCode(ErrorCode.UPSTREAM_TIMEOUT), 504);
  assert.equal(statusForCode(ErrorCode.CANCEL), DEFAULT_RESET_STATUS);
  assert.equal(statusForCode(999), DEFAULT_RESET_STATUS);
  for (const [code, status] of STATUS_FOR_CODE) assert.equal(statusForCode(code), status);
});

// ------------------------------------------------------------------------------------------ cases

for (const c of CASES.cases) {
  const skip = c.role === "relay" ? false : "this core implements the relay's role only (the bridge is Python's)";
  test(`case ${c.role}: ${c.name}`, { skip }, () => {
    const conn = new RelayConnection(undefined, limitsOf(c.limits));
    runSetup(conn, c.setup);
    const message = messageOf(c.receive);
    const expect = c.expect;
    if ("connection_error" in expect) {
      assert.throws(
        () => conn.receive(message),
        (err) => err instanceof ProtocolError && codeName(err.code) === expect.connection_error,
        `a connection error ${expect.connection_error}`,
      );
      return;
    }
    const events = conn.receive(message).map(normalize);
    assertMatches(expect.events ?? [], events, "events");
    assertMatches(expect.sends ?? [], sent(conn), "sends");
  });
}

// ------------------------------------------------------------------------------------------ records

const OPCODES: Record<string, number> = { WS_TEXT, WS_BINARY, WS_CLOSE };
const opcodeName = (op: number): string => Object.entries(OPCODES).find(([, v]) => v === op)![0];

for (const v of RECORDS.encode) {
  test(`ws record: ${v.name}`, () => assert.equal(hex(encodeWsRecord(OPCODES[v.opcode]!, unhex(v.payload_hex))), v.hex));
}
for (const v of RECORDS.close) {
  test(`ws close record: ${v.code}`, () => assert.equal(hex(encodeWsClose(v.code, v.reason)), v.hex));
}
for (const v of RECORDS.decode_close) {
  test(`ws close payload: ${v.payload_hex || "empty"}`, () => assert.deepEqual(decodeWsClose(unhex(v.payload_hex)), [v.code, v.reason]));
}
for (const v of RECORDS.reader) {
  test(`ws record reader: ${v.name}`, () => {
    const reader = new WsRecordReader();
    const records: string[][] = [];
    try {
      for (const feed of v.feeds) for (const [op, data] of reader.feed(unhex(feed))) records.push([opcodeName(op), hex(data)]);
    } catch (err) {
      assert.ok(err instanceof StreamError, String(err));
      assert.equal(codeName(err.code), v.error);
      return;
    }
    assert.equal(v.error, undefined, "the reader raised nothing");
    assert.deepEqual(records, v.records);
    assert.equal(reader.pending, v.pending);
  });
}

// ------------------------------------------------------------------------------------------ worked example

/** The frames of `actual` are those of the vector's message: header fields and binary payloads
 * byte for byte, JSON payloads as values (another encoder writes 5.0 as 5: wire.md section 13). */
function assertSameMessage(actual: Uint8Array, expected: Json, label: string): void {
  const want = expected.frames.map((f: Json) => ({ header: unhex(f.header), payload: payloadOf(f), json: "payload_text" in f }));
  const got = parseMessage(actual);
  assert.equal(got.length, want.length, label);
  got.forEach((frame, i) => {
    const w = want[i];
    assert.deepEqual([frame.type, frame.flags, frame.streamId], [w.header[3], w.header[4], new DataView(w.header.buffer).getUint32(5)], label);
    if (w.json) assert.deepEqual(JSON.parse(new TextDecoder().decode(frame.payload)), JSON.parse(new TextDecoder().decode(w.payload)), label);
    else assert.equal(hex(frame.payload), hex(w.payload), label);
  });
}

test("the worked example, relay side", () => {
  const conn = new RelayConnection();
  let byteIdentical = 0;
  for (const step of EXAMPLE.steps) {
    if ("text" in step) {
      assert.equal(step.text, step.from === "bridge" ? PING : PONG);
      continue;
    }
    if (step.from === "bridge") {
      // what the bridge sent reaches this relay: the vector's events
      const events = step.messages.flatMap((m: Json) => conn.receive(concat(m.frames.map((f: Json) => concat([unhex(f.header), payloadOf(f)]))))).map(normalize);
      assertMatches(step.events.filter((e: Json) => e.event !== "welcome"), events, `step ${step.label}`);
      continue;
    }
    for (const call of step.calls) {
      const [[name, a]] = Object.entries(call) as [[string, Json]];
      if (name === "accept") conn.accept(a.session, a.heartbeat);
      else if (name === "open_stream") assert.equal(conn.openStream(a.method, a.route, a.target, a.headers, a.end_stream, a.info), a.stream_id);
      else if (name === "send_data") conn.sendData(a.stream_id, payloadOf(a), a.end_stream);
      else assert.fail(`unknown relay call ${name}`);
    }
    const messages = conn.dataToSend();
    assert.equal(messages.length, step.messages.length, `step ${step.label}`);
    messages.forEach((m, i) => {
      assertSameMessage(m, step.messages[i], `step ${step.label}`);
      if (m.byteLength === step.messages[i].length) byteIdentical++;
    });
  }
  assert.ok(byteIdentical >= 2, "the OPEN messages are byte for byte the Python core's");
});
