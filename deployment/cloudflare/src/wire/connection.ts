// The relay's end of one bridge connection: the protocol's state machine, sans I/O (docs/spec/wire.md
// sections 3-7). The same shape as bridge/wire/connection.py's Connection in the relay role:
//
//   * feed each binary WebSocket message to receive(); act on the events it returns. A
//     ProtocolError thrown by receive() is a connection error: sendGoaway(err.code, err.message),
//     send what dataToSend() returns, and close the WebSocket.
//   * call accept()/reject() after a "hello" event, openStream() for each request, sendData(),
//     acknowledge() once DATA was passed on, sendReset(), sendGoaway();
//   * after every call (receive included: it may queue a RESET), send dataToSend() as binary
//     WebSocket messages.
//
// What must survive the Durable Object's hibernation is the WireState object the caller passes in
// and persists whenever takeChanged() says so (stream ids keep increasing across a rebuild). Streams
// live in memory only: none survive hibernation, and frames for them are then dropped as frames of
// ended streams. Nothing here touches a socket, a timer or a Cloudflare API.

import {
  ABSOLUTE_MAX_PAYLOAD,
  DEFAULT_MAX_FRAME,
  DEFAULT_MAX_STREAMS,
  DEFAULT_WINDOW,
  ErrorCode,
  Flags,
  FrameType,
  HEADER_SIZE,
  MAX_MESSAGE,
  MAX_NODE_NAME,
  MAX_REASON,
  MAX_STREAM_ID,
  MAX_WINDOW,
  PROTOCOL_VERSION,
  STREAM_FRAMES,
} from "./constants";
import {
  Frame,
  HeaderPairs,
  ProtocolError,
  StreamError,
  decodeJson,
  encodeFrame,
  encodeJson,
  fromUtf8,
  parseHeaders,
  parseMessage,
  resetPayload,
  u32,
} from "./codec";

/** The protocol state of a connection that must outlive the object holding it (plain JSON). */
export interface WireState {
  /** "hello": waiting for HELLO; "open": WELCOME sent; "closed": refused or failed. */
  phase: "hello" | "open" | "closed";
  /** The bridge's window and largest DATA payload (from HELLO). */
  peerWindow: number;
  peerMaxFrame: number;
  /** The highest stream id opened on this connection. */
  lastStreamId: number;
  goawaySent: boolean;
  goawayReceived: boolean;
}

export function newWireState(): WireState {
  return {
    phase: "hello",
    peerWindow: DEFAULT_WINDOW,
    peerMaxFrame: DEFAULT_MAX_FRAME,
    lastStreamId: 0,
    goawaySent: false,
    goawayReceived: false,
  };
}

export interface Limits {
  /** Credit granted to the bridge per stream (WELCOME `window`). */
  window?: number;
  /** Largest DATA payload accepted (WELCOME `max_frame`). */
  maxFrame?: number;
  /** Announced in WELCOME (informational). */
  maxStreams?: number;
}

export type WireEvent =
  | { event: "hello"; version: number; token: string; node: string; routes: string[]; info: Record<string, unknown> }
  | { event: "response"; streamId: number; status: number; headers: HeaderPairs; endStream: boolean }
  | { event: "data"; streamId: number; data: Uint8Array; endStream: boolean }
  /** remote: the bridge sent RESET; else this side reset the stream after a stream error. */
  | { event: "reset"; streamId: number; code: number; reason: string; remote: boolean }
  | { event: "window"; streamId: number; increment: number }
  | { event: "goaway"; code: number; reason: string; lastStreamId: number }
  | { event: "stats"; body: Record<string, unknown> };

/** Per-stream protocol state, as HTTP/2's: credit each way and which sides have ended. */
interface StreamState {
  sendWindow: number;
  recvWindow: number;
  recvUnacked: number;
  localClosed: boolean;
  remoteClosed: boolean;
  responseSeen: boolean;
}

const HELLO_KEYS = new Set(["version", "token", "node", "routes", "window", "max_frame"]);

export class RelayConnection {
  readonly localWindow: number;
  readonly localMaxFrame: number;
  readonly maxStreams: number;
  private readonly streams = new Map<number, StreamState>();
  private out: Uint8Array[] = [];
  private changed = false;
  private helloSeen: boolean;

  constructor(
    readonly state: WireState = newWireState(),
    limits: Limits = {},
  ) {
    this.localWindow = limits.window ?? DEFAULT_WINDOW;
    this.localMaxFrame = limits.maxFrame ?? DEFAULT_MAX_FRAME;
    this.maxStreams = limits.maxStreams ?? DEFAULT_MAX_STREAMS;
    if (!(this.localWindow > 0 && this.localWindow <= MAX_WINDOW)) throw new RangeError("window out of range");
    if (!(this.localMaxFrame > 0 && this.localMaxFrame <= ABSOLUTE_MAX_PAYLOAD)) {
      throw new RangeError("max_frame out of range");
    }
    this.helloSeen = state.phase !== "hello";
  }

  /** Whether `state` changed since the last call (persist it then). */
  takeChanged(): boolean {
    const changed = this.changed;
    this.changed = false;
    return changed;
  }

  get established(): boolean {
    return this.state.phase === "open";
  }

  /** Open streams, by id (read only: the state machine owns them). */
  get openStreams(): number {
    return this.streams.size;
  }

  isOpen(streamId: number): boolean {
    return this.streams.has(streamId);
  }

  // output --------------------------------------------------------------------------------------
  get hasOutput(): boolean {
    return this.out.length > 0;
  }

  /** Queued frames, coalesced into binary WebSocket messages of at most MAX_MESSAGE bytes. */
  dataToSend(): Uint8Array[] {
    if (this.out.length === 0) return [];
    const frames = this.out;
    this.out = [];
    const messages: Uint8Array[] = [];
    let batch: Uint8Array[] = [];
    let size = 0;
    const emit = (): void => {
      const message = new Uint8Array(size);
      let at = 0;
      for (const f of batch) {
        message.set(f, at);
        at += f.byteLength;
      }
      messages.push(message);
      batch = [];
      size = 0;
    };
    for (const f of frames) {
      if (batch.length && size + f.byteLength > MAX_MESSAGE) emit();
      batch.push(f);
      size += f.byteLength;
    }
    emit();
    return messages;
  }

  private queue(type: number, flags: number, streamId: number, payload?: Uint8Array): void {
    this.out.push(encodeFrame(type, flags, streamId, payload));
  }

  // handshake -----------------------------------------------------------------------------------
  /** Answer a "hello" event with WELCOME; streams may be opened from now on. `extra` adds keys. */
  accept(session: string, heartbeat: number, extra: Record<string, unknown> = {}): void {
    this.queue(
      FrameType.WELCOME,
      0,
      0,
      encodeJson({
        version: PROTOCOL_VERSION,
        session,
        heartbeat,
        window: this.localWindow,
        max_frame: this.localMaxFrame,
        max_streams: this.maxStreams,
        ...extra,
      }),
    );
    this.state.phase = "open";
    this.changed = true;
  }

  /** Refuse a "hello" event: GOAWAY with `code`; close the WebSocket after sending it. */
  reject(code: number, reason: string): void {
    this.sendGoaway(code, reason);
    this.state.phase = "closed";
    this.changed = true;
  }

  // streams -------------------------------------------------------------------------------------
  /** Queue OPEN for a new stream and return its id. Throws StreamError(REFUSED_STREAM) when no
   * stream may be opened (no session, GOAWAY either way, ids exhausted) and RangeError when the
   * head exceeds the header block limit. */
  openStream(
    method: string,
    route: string,
    target: string,
    headers: HeaderPairs,
    endStream: boolean,
    extra: Record<string, unknown> = {},
  ): number {
    if (!this.established) throw new StreamError(ErrorCode.REFUSED_STREAM, "no session");
    if (this.state.goawaySent || this.state.goawayReceived) {
      throw new StreamError(ErrorCode.REFUSED_STREAM, "connection is going away");
    }
    const sid = this.state.lastStreamId + 1;
    if (sid > MAX_STREAM_ID) throw new StreamError(ErrorCode.REFUSED_STREAM, "stream ids exhausted");
    const payload = encodeJson({ method, route, target, headers, ...extra });
    this.queue(FrameType.OPEN, endStream ? Flags.END_STREAM : 0, sid, payload);
    this.state.lastStreamId = sid;
    this.changed = true;
    this.streams.set(sid, {
      sendWindow: this.state.peerWindow,
      recvWindow: this.localWindow,
      recvUnacked: 0,
      localClosed: endStream,
      remoteClosed: false,
      responseSeen: false,
    });
    return sid;
  }

  /** How many DATA bytes may be sent on the stream now (0: wait for a "window" event). */
  sendWindow(streamId: number): number {
    const s = this.streams.get(streamId);
    return s && !s.localClosed ? s.sendWindow : 0;
  }

  /** Whether this side already sent END_STREAM (or the stream is gone). */
  localClosed(streamId: number): boolean {
    const s = this.streams.get(streamId);
    return s === undefined || s.localClosed;
  }

  /** Queue DATA, split at the bridge's max_frame. `data` must fit sendWindow(streamId). */
  sendData(streamId: number, data: Uint8Array, endStream = false): void {
    const s = this.streams.get(streamId);
    if (!s) throw new StreamError(ErrorCode.CANCEL, `stream ${streamId} is not open`);
    if (s.localClosed) throw new StreamError(ErrorCode.PROTOCOL_ERROR, "stream already ended");
    if (data.byteLength > s.sendWindow) throw new RangeError("DATA beyond the send window");
    s.sendWindow -= data.byteLength;
    const step = this.state.peerMaxFrame;
    for (let at = 0; at < data.byteLength; at += step) {
      const last = at + step >= data.byteLength;
      this.queue(FrameType.DATA, endStream && last ? Flags.END_STREAM : 0, streamId, data.subarray(at, at + step));
    }
    if (data.byteLength === 0 && endStream) this.queue(FrameType.DATA, Flags.END_STREAM, streamId);
    if (endStream) {
      s.localClosed = true;
      this.maybeForget(streamId, s);
    }
  }

  /** Return credit for `n` DATA bytes passed on; one WINDOW once half the window was consumed. */
  acknowledge(streamId: number, n: number): void {
    const s = this.streams.get(streamId);
    if (!s || s.remoteClosed || n <= 0) return;
    s.recvUnacked += n;
    if (s.recvUnacked >= this.localWindow / 2) {
      const increment = s.recvUnacked;
      s.recvUnacked = 0;
      s.recvWindow += increment;
      this.queue(FrameType.WINDOW, 0, streamId, u32(increment));
    }
  }

  /** Abort a stream both ways and forget it; false (nothing sent) when it is already gone. */
  sendReset(streamId: number, code: number, reason = ""): boolean {
    if (!this.streams.delete(streamId)) return false;
    this.queue(FrameType.RESET, 0, streamId, resetPayload(code, reason));
    return true;
  }

  /** No new streams from now on (a drain when `code` is NO_ERROR, else a fatal error). */
  sendGoaway(code: number, reason = ""): void {
    this.state.goawaySent = true;
    this.changed = true;
    const body = { code, reason: reason.slice(0, MAX_REASON), last_stream_id: this.state.lastStreamId };
    this.queue(FrameType.GOAWAY, 0, 0, encodeJson(body));
  }

  /** Forget every stream (the connection is over); returns their ids. */
  dropStreams(): number[] {
    const ids = [...this.streams.keys()];
    this.streams.clear();
    return ids;
  }

  // input ---------------------------------------------------------------------------------------
  /** Process one binary WebSocket message; the events it carried, in order. Throws ProtocolError. */
  receive(message: Uint8Array): WireEvent[] {
    const events: WireEvent[] = [];
    for (const frame of parseMessage(message)) {
      const event = this.handle(frame);
      if (event) events.push(event);
    }
    return events;
  }

  private handle(frame: Frame): WireEvent | null {
    const t = frame.type;
    if (!this.helloSeen && t !== FrameType.HELLO && t !== FrameType.GOAWAY) {
      throw new ProtocolError("expected HELLO");
    }
    if (!this.established && t !== FrameType.HELLO && t !== FrameType.WELCOME && t !== FrameType.GOAWAY) {
      throw new ProtocolError(`frame type ${t} before the handshake completed`);
    }
    if (t === FrameType.STATS) {
      if (frame.streamId !== 0) throw new ProtocolError("STATS must be on stream 0");
      return { event: "stats", body: decodeJson(frame.payload, "STATS") };
    }
    if (t === FrameType.HELLO || t === FrameType.WELCOME || t === FrameType.GOAWAY) {
      if (frame.streamId !== 0) throw new ProtocolError(`frame type ${t} must be on stream 0`);
      if (t === FrameType.HELLO) return this.onHello(frame);
      if (t === FrameType.WELCOME) throw new ProtocolError("a relay must not receive WELCOME");
      return this.onGoaway(frame);
    }
    if (!STREAM_FRAMES.has(t)) return null; // unknown types are ignored, for forward compatibility
    if (frame.streamId === 0) throw new ProtocolError(`frame type ${t} must not be on stream 0`);
    switch (t) {
      case FrameType.OPEN:
        throw new ProtocolError("a relay must not receive OPEN");
      case FrameType.RESPONSE:
        return this.onResponse(frame);
      case FrameType.DATA:
        return this.onData(frame);
      case FrameType.RESET:
        return this.onReset(frame);
      default:
        return this.onWindow(frame);
    }
  }

  private onHello(frame: Frame): WireEvent {
    if (this.helloSeen) throw new ProtocolError("second HELLO");
    this.helloSeen = true;
    const body = decodeJson(frame.payload, "HELLO");
    const version = body.version;
    if (typeof version !== "number" || !Number.isInteger(version)) {
      throw new ProtocolError("HELLO: field 'version' missing or of the wrong type");
    }
    const routes = body.routes ?? [];
    if (!Array.isArray(routes) || !routes.every((r) => typeof r === "string")) {
      throw new ProtocolError("HELLO: routes must be a list of strings");
    }
    const window = body.window ?? DEFAULT_WINDOW;
    const maxFrame = body.max_frame ?? DEFAULT_MAX_FRAME;
    if (typeof window !== "number" || !Number.isInteger(window) || window <= 0 || window > MAX_WINDOW) {
      throw new ProtocolError("HELLO: window out of range", ErrorCode.FLOW_CONTROL_ERROR);
    }
    if (typeof maxFrame !== "number" || !Number.isInteger(maxFrame) || maxFrame <= 0 || maxFrame > ABSOLUTE_MAX_PAYLOAD) {
      throw new ProtocolError("HELLO: max_frame out of range", ErrorCode.FRAME_TOO_LARGE);
    }
    const token = body.token ?? "";
    const node = body.node ?? "";
    if (typeof token !== "string" || typeof node !== "string") throw new ProtocolError("HELLO: token and node must be strings");
    // A frame must fit in one WebSocket message of at most MAX_MESSAGE bytes.
    this.state.peerWindow = window;
    this.state.peerMaxFrame = Math.min(maxFrame, MAX_MESSAGE - HEADER_SIZE);
    this.changed = true;
    const info: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(body)) if (!HELLO_KEYS.has(k)) info[k] = v;
    return { event: "hello", version, token, node: node.slice(0, MAX_NODE_NAME), routes: routes as string[], info };
  }

  private onGoaway(frame: Frame): WireEvent {
    const body = decodeJson(frame.payload, "GOAWAY");
    const code = body.code;
    if (typeof code !== "number" || !Number.isInteger(code)) {
      throw new ProtocolError("GOAWAY: field 'code' missing or of the wrong type");
    }
    this.state.goawayReceived = true;
    this.changed = true;
    const reason = typeof body.reason === "string" ? body.reason : "";
    const last = typeof body.last_stream_id === "number" ? body.last_stream_id : 0;
    return { event: "goaway", code, reason, lastStreamId: last };
  }

  private onResponse(frame: Frame): WireEvent | null {
    const s = this.streams.get(frame.streamId);
    if (!s) return this.unknownStream(frame);
    const body = decodeJson(frame.payload, "RESPONSE");
    const status = body.status;
    if (typeof status !== "number" || !Number.isInteger(status) || status < 100 || status > 999) {
      return this.streamError(frame.streamId, ErrorCode.PROTOCOL_ERROR, "RESPONSE: invalid status");
    }
    const headers = parseHeaders(body.headers);
    if (headers === null) return this.streamError(frame.streamId, ErrorCode.PROTOCOL_ERROR, "RESPONSE: invalid headers");
    if (s.responseSeen) return this.streamError(frame.streamId, ErrorCode.PROTOCOL_ERROR, "second RESPONSE");
    s.responseSeen = true;
    const endStream = (frame.flags & Flags.END_STREAM) !== 0;
    if (endStream) {
      s.remoteClosed = true;
      this.maybeForget(frame.streamId, s);
    }
    return { event: "response", streamId: frame.streamId, status, headers, endStream };
  }

  private onData(frame: Frame): WireEvent | null {
    const s = this.streams.get(frame.streamId);
    if (!s) return this.unknownStream(frame);
    const sid = frame.streamId;
    if (s.remoteClosed) return this.streamError(sid, ErrorCode.PROTOCOL_ERROR, "DATA after END_STREAM");
    if (!s.responseSeen) return this.streamError(sid, ErrorCode.PROTOCOL_ERROR, "DATA before RESPONSE");
    const size = frame.payload.byteLength;
    if (size > this.localMaxFrame) {
      return this.streamError(sid, ErrorCode.FRAME_TOO_LARGE, `DATA of ${size} bytes exceeds max_frame`);
    }
    if (size > s.recvWindow) return this.streamError(sid, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the flow-control window");
    s.recvWindow -= size;
    const endStream = (frame.flags & Flags.END_STREAM) !== 0;
    if (endStream) {
      s.remoteClosed = true;
      this.maybeForget(sid, s);
    }
    // a copy: the message's buffer is not ours to keep
    return { event: "data", streamId: sid, data: frame.payload.slice(), endStream };
  }

  private onReset(frame: Frame): WireEvent | null {
    if (frame.payload.byteLength < 4) throw new ProtocolError("RESET payload shorter than 4 bytes");
    const code = new DataView(frame.payload.buffer, frame.payload.byteOffset, 4).getUint32(0);
    if (!this.streams.delete(frame.streamId)) return null; // already gone here: nothing to tell
    return { event: "reset", streamId: frame.streamId, code, reason: fromUtf8(frame.payload.subarray(4)), remote: true };
  }

  private onWindow(frame: Frame): WireEvent | null {
    if (frame.payload.byteLength !== 4) throw new ProtocolError("WINDOW payload must be 4 bytes");
    const increment = new DataView(frame.payload.buffer, frame.payload.byteOffset, 4).getUint32(0);
    const s = this.streams.get(frame.streamId);
    if (!s) return null; // the stream ended meanwhile: a harmless race
    if (increment === 0 || s.sendWindow + increment > MAX_WINDOW) {
      return this.streamError(frame.streamId, ErrorCode.FLOW_CONTROL_ERROR, "bad WINDOW increment");
    }
    s.sendWindow += increment;
    return { event: "window", streamId: frame.streamId, increment };
  }

  // helpers -------------------------------------------------------------------------------------
  private unknownStream(frame: Frame): null {
    if (frame.streamId > this.state.lastStreamId) {
      throw new ProtocolError(`frame type ${frame.type} on stream ${frame.streamId} that was never opened`);
    }
    return null; // a stream that ended recently: frames in flight are dropped
  }

  private streamError(streamId: number, code: number, reason: string): WireEvent {
    this.streams.delete(streamId);
    this.queue(FrameType.RESET, 0, streamId, resetPayload(code, reason));
    return { event: "reset", streamId, code, reason, remote: false };
  }

  private maybeForget(streamId: number, s: StreamState): void {
    if (s.localClosed && s.remoteClosed) this.streams.delete(streamId);
  }
}
