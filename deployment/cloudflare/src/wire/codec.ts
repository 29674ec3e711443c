// The tunnel's wire format (docs/spec/wire.md): frames, JSON header blocks, header lists, RESET
// payloads and the records of a tunnelled client WebSocket. Sans I/O: bytes in, values out, no
// sockets, no timers and no Cloudflare API (it runs under node's test runner as well as in workerd).
// The constants come from constants.ts, generated from docs/spec/wire.toml.

import {
  ABSOLUTE_MAX_PAYLOAD,
  DEFAULT_RESET_STATUS,
  ErrorCode,
  HEADER_SIZE,
  MAX_HEADER_BLOCK,
  MAX_METHOD,
  MAX_REASON,
  MAX_STREAM_ID,
  MAX_WS_CLOSE_REASON,
  MAX_WS_MESSAGE,
  STATUS_FOR_CODE,
  WS_BINARY,
  WS_CLOSE,
  WS_RECORD_HEADER,
  WS_TEXT,
} from "./constants";

/** HTTP status for a stream reset before its response head (docs/spec/wire.md section 9). */
export function statusForCode(code: number): number {
  return STATUS_FOR_CODE.get(code) ?? DEFAULT_RESET_STATUS;
}

/** A connection error: send GOAWAY with `code` and close the WebSocket. */
export class ProtocolError extends Error {
  constructor(
    message: string,
    readonly code: number = ErrorCode.PROTOCOL_ERROR,
  ) {
    super(message);
  }
}

/** A stream that ended abnormally (RESET either way, or the tunnel closed under it). */
export class StreamError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
  ) {
    super(reason || `stream failed (${code})`);
  }
}

export interface Frame {
  type: number;
  flags: number;
  streamId: number;
  payload: Uint8Array;
}

export type HeaderPairs = [string, string][];

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
const strictDecoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

export function utf8(text: string): Uint8Array {
  return encoder.encode(text);
}

export function fromUtf8(data: Uint8Array): string {
  return decoder.decode(data);
}

export function encodeFrame(type: number, flags: number, streamId: number, payload?: Uint8Array): Uint8Array {
  const length = payload ? payload.byteLength : 0;
  if (length > ABSOLUTE_MAX_PAYLOAD) throw new RangeError(`payload of ${length} bytes exceeds the 24-bit length`);
  if (streamId < 0 || streamId > MAX_STREAM_ID) throw new RangeError(`stream id ${streamId} out of range`);
  const out = new Uint8Array(HEADER_SIZE + length);
  const view = new DataView(out.buffer);
  view.setUint32(0, (length << 8) | (type & 0xff));
  view.setUint8(4, flags & 0xff);
  view.setUint32(5, streamId);
  if (payload) out.set(payload, HEADER_SIZE);
  return out;
}

/** The frames of one binary WebSocket message; throws ProtocolError on a malformed one. */
export function parseMessage(message: Uint8Array): Frame[] {
  const total = message.byteLength;
  if (total === 0) throw new ProtocolError("empty binary message");
  const view = new DataView(message.buffer, message.byteOffset, message.byteLength);
  const frames: Frame[] = [];
  let offset = 0;
  while (offset < total) {
    if (total - offset < HEADER_SIZE) throw new ProtocolError("truncated frame header");
    const word = view.getUint32(offset);
    const length = word >>> 8;
    const type = word & 0xff;
    const flags = view.getUint8(offset + 4);
    const sid = view.getUint32(offset + 5);
    if (sid & 0x80000000) throw new ProtocolError("reserved bit set in stream id");
    const start = offset + HEADER_SIZE;
    const end = start + length;
    if (end > total) throw new ProtocolError("frame length runs past the end of the message");
    frames.push({ type, flags, streamId: sid, payload: message.subarray(start, end) });
    offset = end;
  }
  return frames;
}

/** A JSON header block: one object of at most MAX_HEADER_BLOCK bytes. */
export function decodeJson(payload: Uint8Array, what: string): Record<string, unknown> {
  if (payload.byteLength > MAX_HEADER_BLOCK) {
    throw new ProtocolError(`${what} block of ${payload.byteLength} bytes is too large`, ErrorCode.HEADERS_TOO_LARGE);
  }
  let value: unknown;
  try {
    value = JSON.parse(strictDecoder.decode(payload));
  } catch {
    throw new ProtocolError(`${what} payload is not valid JSON`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ProtocolError(`${what} payload must be a JSON object`);
  }
  return value as Record<string, unknown>;
}

export function encodeJson(body: unknown): Uint8Array {
  const data = utf8(JSON.stringify(body));
  if (data.byteLength > MAX_HEADER_BLOCK) throw new RangeError("header block too large");
  return data;
}

/** A header list from JSON, or null when it is not a valid one (docs/spec/wire.md section 4). */
export function parseHeaders(value: unknown): HeaderPairs | null {
  if (value === undefined) return [];
  if (!Array.isArray(value)) return null;
  const out: HeaderPairs = [];
  for (const item of value) {
    if (!Array.isArray(item) || item.length !== 2 || typeof item[0] !== "string" || typeof item[1] !== "string") {
      return null;
    }
    const [name, val] = item as [string, string];
    if (!name || /[ \t\r\n:]/.test(name) || /[\r\n\0]/.test(val)) return null;
    out.push([name, val]);
  }
  return out;
}

export function u32(value: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value >>> 0);
  return out;
}

export function concat(parts: Uint8Array[]): Uint8Array {
  let size = 0;
  for (const p of parts) size += p.byteLength;
  const out = new Uint8Array(size);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

/** The first `limit` bytes of UTF-8 `bytes`, without splitting a character. */
export function cutUtf8(bytes: Uint8Array, limit: number): Uint8Array {
  let end = limit;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--; // bytes[end] continues a character
  return bytes.subarray(0, end);
}

export function resetPayload(code: number, reason: string): Uint8Array {
  let bytes = utf8(reason);
  if (bytes.byteLength > MAX_REASON) bytes = cutUtf8(bytes, MAX_REASON);
  return concat([u32(code), bytes]);
}

// ------------------------------------------------------------------------------ WebSocket records
// A tunnelled client WebSocket (an OPEN with "websocket": true) carries its messages as records in
// the stream's DATA bytes: u8 opcode, u32 length, payload. Records may span DATA frames.

export function encodeWsRecord(opcode: number, payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(WS_RECORD_HEADER + payload.byteLength);
  const view = new DataView(out.buffer);
  view.setUint8(0, opcode);
  view.setUint32(1, payload.byteLength);
  out.set(payload, WS_RECORD_HEADER);
  return out;
}

export function encodeWsClose(code: number, reason: string): Uint8Array {
  let text = utf8(reason);
  if (text.byteLength > MAX_WS_CLOSE_REASON) text = cutUtf8(text, MAX_WS_CLOSE_REASON);
  const payload = new Uint8Array(2 + text.byteLength);
  new DataView(payload.buffer).setUint16(0, code);
  payload.set(text, 2);
  return encodeWsRecord(WS_CLOSE, payload);
}

export function decodeWsClose(payload: Uint8Array): [number, string] {
  if (payload.byteLength < 2) return [1005, ""];
  const code = new DataView(payload.buffer, payload.byteOffset, 2).getUint16(0);
  return [code, fromUtf8(payload.subarray(2))];
}

/** Reassembles records from DATA bytes. feed() throws StreamError on a bad record. */
export class WsRecordReader {
  private buffer: Uint8Array = new Uint8Array(0);

  get pending(): number {
    return this.buffer.byteLength;
  }

  feed(data: Uint8Array): [number, Uint8Array][] {
    this.buffer = this.buffer.byteLength ? concat([this.buffer, data]) : data.slice();
    const out: [number, Uint8Array][] = [];
    while (this.buffer.byteLength >= WS_RECORD_HEADER) {
      const view = new DataView(this.buffer.buffer, this.buffer.byteOffset, this.buffer.byteLength);
      const opcode = view.getUint8(0);
      const length = view.getUint32(1);
      if (opcode !== WS_TEXT && opcode !== WS_BINARY && opcode !== WS_CLOSE) {
        throw new StreamError(ErrorCode.PROTOCOL_ERROR, `unknown WebSocket record opcode ${opcode}`);
      }
      if (length > MAX_WS_MESSAGE) {
        throw new StreamError(ErrorCode.BODY_TOO_LARGE, `WebSocket message of ${length} bytes is too large`);
      }
      const end = WS_RECORD_HEADER + length;
      if (this.buffer.byteLength < end) break;
      out.push([opcode, this.buffer.slice(WS_RECORD_HEADER, end)]);
      this.buffer = this.buffer.subarray(end);
    }
    return out;
  }
}

const TCHAR = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** Whether `method` is an HTTP method token (RFC 9110 section 9.1) OPEN may carry. */
export function validMethod(method: string): boolean {
  return method.length <= MAX_METHOD && TCHAR.test(method);
}
