// The Durable Object: one instance ("relay") holds every bridge's WebSocket and every stream.
//
// Bridges are accepted with the Hibernation API (ctx.acceptWebSocket): while nothing is in flight
// the object may be evicted from memory and the bridge's socket stays open; the text heartbeat
// `ping` is answered by setWebSocketAutoResponse without waking it. What must survive that lives in
// the socket's attachment (session, routes, limits, last stream id) and in ctx.storage (health
// timestamps, failed logins, each node's models, latest sample and facts from STATS, and in SQLite
// tables the answers kept for repeats and the jobs: src/store.ts). Streams live in memory: an object
// with a request in flight, or with a client WebSocket open (accepted with the standard API so that
// a client's own "ping" text is never auto-answered), is not evicted; nor is one with an answer
// still being produced for nobody in particular (a shared answer whose client left, a job), which
// holds a timer while it runs.
//
// The protocol itself is not here: src/wire/ holds the codec and the connection state machine, sans
// I/O (the same split as bridge/wire/ and its asyncio layers); the HTTP decisions are pure
// functions in src/rules.ts, src/shared.ts, src/jobs.ts, src/limits.ts and src/stats.ts. This file
// does the I/O: it feeds the bridge's messages to a RelayConnection, sends what it queues, and turns
// its events into HTTP responses and client WebSocket messages.

import { DurableObject } from "cloudflare:workers";
import {
  COOKIE_MAX_AGE,
  COOKIE_NAME,
  Env,
  INTERNAL_HEADER,
  LOGIN_RATE,
  Settings,
  checkKey,
  deny,
  forwardHeaders,
  withUser,
  headerOf,
  isoTime,
  issueCookie,
  json,
  loggedOut,
  loginPage,
  statusPage,
  safeNext,
  sameSecret,
  settings,
  sha256Hex,
  AuthMethod,
} from "./http";
import { streamFailed } from "./failures";
import type { Internal } from "./index";
import { JobSpec, MAX_SUBMISSION, describeJob, iso, parseJob, waitSeconds } from "./jobs";
import { KEY_RATE_REFUSAL, KeyRates, RouteLabels } from "./limits";
import {
  NODE_COOKIE,
  cleanResponseHeaders,
  cookieValues,
  scopedSetCookie,
  declaredLength,
  decodeNodeCookie,
  deterministic,
  encodeNodeCookie,
} from "./rules";
import { MemoryBudget, SharedAnswer } from "./shared";
import { Family, RelayStats, TTFB_BUCKETS, cleanFacts, cleanSample, modelList } from "./stats";
import { Store } from "./store";
import { HeaderPairs, ProtocolError, StreamError, concat, decodeWsClose, encodeWsClose, encodeWsRecord, fromUtf8, utf8, WsRecordReader } from "./wire/codec";
import { RelayConnection, WireEvent, WireState, newWireState } from "./wire/connection";
import {
  CloseCode,
  ErrorCode,
  HEARTBEAT_MISSES,
  HELLO_TIMEOUT,
  PING,
  PONG,
  PROTOCOL_VERSION,
  VERSION,
  WS_BINARY,
  WS_CLOSE,
  WS_TEXT,
} from "./wire/constants";

/** Request bodies up to this size (with a Content-Length) are read before a node is chosen: they
 * identify a repeated request (extension `idempotency`). Larger ones stream. */
const BUFFER_LIMIT = 1024 * 1024;
/** The largest answer kept for the clients that join it, a replay or a job (docs/spec/relay.md E.6). */
const SHARED_MAX_BYTES = 8 * 1024 * 1024;
/** Shared answers being produced at once, at most; a new one beyond is served uncached. */
const MAX_RUNNING_SHARED = 16;
/** Jobs running at once, at most; a submission beyond gets 429. */
const MAX_RUNNING_JOBS = 16;
/** Bytes all the answers being produced (shared ones and jobs) may hold together in the object's
 * 128 MB; an answer that would pass it is cut like one over SHARED_MAX_BYTES. */
const ANSWER_MEMORY = 48 * 1024 * 1024;
/** The reason of the RESET the relay sends when a client's request body stalled (as the Python relay's). */
const BODY_STALLED = "request body stalled";
/** The login form's largest body. */
const LOGIN_MAX = 8192;
/** Milliseconds the whole login form may take to arrive (or BODY_TIMEOUT, when shorter): it fits a
 * packet or two (the Python relay's LOGIN_BODY_DEADLINE). Then 408 and the connection closed. */
const LOGIN_BODY_DEADLINE_MS = 5000;

/** What a bridge socket carries through hibernation (serializeAttachment). */
interface BridgeMeta {
  cid: string;
  acceptedAt: number;
  client: string;
  session: string;
  node: string;
  routes: string[];
  connectedAt: number;
  info: Record<string, unknown>;
  /** The protocol state (phase, the bridge's limits, the last stream id, GOAWAY either way). */
  wire: WireState;
}

interface Head {
  status: number;
  headers: HeaderPairs;
  end: boolean;
}

const END = Symbol("end");
const NULL_BODY = new Set([101, 204, 205, 304]);
const HELLO_TIMEOUT_MS = HELLO_TIMEOUT * 1000;

function randomHex(bytes: number): string {
  return [...crypto.getRandomValues(new Uint8Array(bytes))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** One stream as its consumer sees it: the response head as a promise, the body as chunks to read,
 * a writer that waits for credit. The protocol state (windows, which side ended) is the
 * connection's (src/wire/connection.ts); this is the asynchronous glue around it. */
class TStream {
  error: StreamError | null = null;
  readonly head: Promise<Head>;
  private resolveHead!: (h: Head) => void;
  private rejectHead!: (e: StreamError) => void;
  private inbox: (Uint8Array | typeof END)[] = [];
  private readable: (() => void) | null = null;
  private credit: (() => void) | null = null;
  bytesIn = 0;

  constructor(
    readonly tunnel: Tunnel,
    readonly id: number,
  ) {
    this.head = new Promise<Head>((res, rej) => {
      this.resolveHead = res;
      this.rejectHead = rej;
    });
    this.head.catch(() => undefined); // a stream reset before anyone awaited its head
  }

  // from the tunnel ----------------------------------------------------------------------------
  onHead(head: Head): void {
    this.resolveHead(head);
    if (head.end) this.push(END);
  }

  push(item: Uint8Array | typeof END): void {
    this.inbox.push(item);
    this.wakeReader();
  }

  fail(error: StreamError): void {
    if (this.error === null) this.error = error;
    this.rejectHead(error);
    this.wakeReader();
    this.wakeWriter();
  }

  wakeWriter(): void {
    const w = this.credit;
    this.credit = null;
    w?.();
  }

  private wakeReader(): void {
    const r = this.readable;
    this.readable = null;
    r?.();
  }

  /** Over: reset, or ended both ways (the connection forgot it). */
  get done(): boolean {
    return this.error !== null || !this.tunnel.conn.isOpen(this.id);
  }

  get localClosed(): boolean {
    return this.tunnel.conn.localClosed(this.id);
  }

  // for the consumer ---------------------------------------------------------------------------
  /** The next body chunk, or null once the bridge ended its side. Throws StreamError on a reset.
   * Call consumed(n) once the chunk was passed on: that returns the credit. */
  async read(): Promise<Uint8Array | null> {
    while (this.inbox.length === 0) {
      if (this.error) throw this.error;
      await new Promise<void>((res) => (this.readable = res));
    }
    const item = this.inbox.shift()!;
    if (item === END) return null;
    this.bytesIn += item.byteLength;
    return item;
  }

  consumed(n: number): void {
    if (this.error) return;
    this.tunnel.conn.acknowledge(this.id, n);
    this.tunnel.schedule();
  }

  /** Send body bytes as the bridge's credit allows; `end` sends END_STREAM after them. */
  async write(data: Uint8Array, end = false): Promise<void> {
    const conn = this.tunnel.conn;
    let view = data;
    for (;;) {
      if (this.error) throw this.error;
      if (conn.localClosed(this.id)) throw new StreamError(ErrorCode.PROTOCOL_ERROR, "stream already ended");
      if (view.byteLength === 0) {
        if (end) {
          this.tunnel.send(() => conn.sendData(this.id, view, true));
          this.tunnel.forgetIfDone(this.id);
        }
        return;
      }
      const window = conn.sendWindow(this.id);
      if (window <= 0) {
        await new Promise<void>((res) => (this.credit = res));
        continue;
      }
      const n = Math.min(window, view.byteLength);
      const chunk = view.subarray(0, n);
      view = view.subarray(n);
      this.tunnel.send(() => conn.sendData(this.id, chunk, end && view.byteLength === 0));
      if (view.byteLength === 0) {
        if (end) this.tunnel.forgetIfDone(this.id);
        return;
      }
    }
  }

  /** Abort both ways (tells the bridge unless the stream is already over). */
  reset(code: number, reason: string): void {
    if (this.error) return;
    this.tunnel.send(() => this.tunnel.conn.sendReset(this.id, code, reason));
    this.tunnel.streams.delete(this.id);
    this.fail(new StreamError(code, reason));
  }
}

/** One bridge connection: the sans-I/O RelayConnection over one hibernatable WebSocket. This class
 * does the I/O: it sends what the connection queues (frames queued in one turn leave together) and
 * hands the connection's events to the streams. */
class Tunnel {
  readonly conn: RelayConnection;
  readonly streams = new Map<number, TStream>();
  private scheduled = false;
  closed = false;
  /** When the last message that reached this object arrived (0: none since it was rebuilt). */
  lastRx = 0;

  constructor(
    readonly ws: WebSocket,
    public meta: BridgeMeta,
  ) {
    this.conn = new RelayConnection(meta.wire);
  }

  save(): void {
    this.conn.takeChanged();
    this.ws.serializeAttachment(this.meta);
  }

  /** Persist the protocol state if it changed (the attachment survives hibernation). */
  saveIfChanged(): void {
    if (this.conn.takeChanged()) this.ws.serializeAttachment(this.meta);
  }

  get phase(): WireState["phase"] {
    return this.meta.wire.phase;
  }

  get draining(): boolean {
    return this.meta.wire.goawayReceived;
  }

  get live(): boolean {
    return !this.closed && this.phase === "open" && !this.draining;
  }

  // output ------------------------------------------------------------------------------------
  /** Run `op` on the connection, then send what it queued (at the end of this turn). */
  send<T>(op: () => T): T {
    const result = op();
    this.schedule();
    return result;
  }

  schedule(): void {
    if (this.closed || this.scheduled || !this.conn.hasOutput) return;
    this.scheduled = true;
    queueMicrotask(() => this.flush());
  }

  flush(): void {
    this.scheduled = false;
    for (const message of this.conn.dataToSend()) {
      if (this.closed) return;
      try {
        this.ws.send(message);
      } catch {
        // the socket is gone: webSocketClose/Error tears the tunnel down
      }
    }
  }

  // streams -------------------------------------------------------------------------------------
  /** Open a stream (throws StreamError when the connection takes no more, RangeError when the
   * head is too large). */
  open(method: string, route: string, target: string, headers: HeaderPairs, end: boolean, extra: Record<string, unknown>): TStream {
    const sid = this.send(() => this.conn.openStream(method, route, target, headers, end, extra));
    this.saveIfChanged(); // stream ids keep increasing after the object is rebuilt
    const stream = new TStream(this, sid);
    this.streams.set(sid, stream);
    return stream;
  }

  /** Fail every stream (the connection is over). */
  teardown(reason: string): void {
    if (this.closed) return;
    this.flush();
    this.closed = true;
    this.conn.dropStreams();
    for (const s of this.streams.values()) s.fail(new StreamError(ErrorCode.GOING_AWAY, `tunnel closed: ${reason}`));
    this.streams.clear();
  }

  /** Pass an event of an established connection to its stream. */
  dispatch(event: WireEvent): void {
    switch (event.event) {
      case "response": {
        const stream = this.streams.get(event.streamId);
        if (event.endStream) this.forgetIfDone(event.streamId);
        stream?.onHead({ status: event.status, headers: event.headers, end: event.endStream });
        return;
      }
      case "data": {
        const stream = this.streams.get(event.streamId);
        if (event.data.byteLength) stream?.push(event.data);
        if (event.endStream) {
          this.forgetIfDone(event.streamId);
          stream?.push(END);
        }
        return;
      }
      case "reset": {
        const stream = this.streams.get(event.streamId);
        this.streams.delete(event.streamId);
        stream?.fail(new StreamError(event.code, event.reason));
        return;
      }
      case "window":
        this.streams.get(event.streamId)?.wakeWriter();
        return;
      case "goaway":
      case "stats": // the Durable Object takes these (RelayObject.onStats)
      case "hello":
        return;
    }
  }

  /** Drop the stream from the map once the connection has forgotten it (ended both ways). */
  forgetIfDone(streamId: number): void {
    if (!this.conn.isOpen(streamId)) this.streams.delete(streamId);
  }
}

/** A close code an endpoint may send: 1005/1006 and other reserved ones are mapped. */
function sendableClose(code: number): number {
  if ([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011].includes(code) || (code >= 3000 && code < 5000)) {
    return code;
  }
  return code === 1006 || code === 1015 ? 1011 : 1000;
}

function tryClose(ws: WebSocket, code: number, reason = ""): void {
  try {
    ws.close(code, reason.slice(0, 120));
  } catch {
    // already closed
  }
}

/** What a node published about itself (HELLO `models`, STATS `node` and `sample`), kept in storage
 * under `node:<name>` so the status page has it after the object hibernated. */
interface NodeStats {
  models: string[];
  sample?: Record<string, unknown>;
  facts?: Record<string, unknown>;
}

/** A request the relay holds whole (its body read), to produce for several readers or as a job. */
interface HeldRequest {
  method: string;
  route: string;
  target: string;
  headers: HeaderPairs;
  body: Uint8Array;
  client: string;
}

/** What a request needs from a node: its route, and the node a browser was on (sticky-nodes). */
interface Want {
  route: string;
  sticky: string | null;
}

class BodyStalled extends Error {}

/** One read of a request body, failing with BodyStalled when no byte came for `ms` (0: wait for ever). */
async function readWithin(reader: ReadableStreamDefaultReader<Uint8Array>, ms: number): Promise<ReadableStreamReadResult<Uint8Array>> {
  if (ms <= 0) return reader.read();
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      reader.read(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new BodyStalled(BODY_STALLED)), ms);
      }),
    ]);
  } finally {
    if (timer !== undefined) clearTimeout(timer);
  }
}

/** Bytes of a refused body read and dropped before the rest is cancelled. A request body left unread
 * (cancelled, or unreadable because its answer was sent: workerd refuses "Can't read from request
 * stream after response has been sent") broke the client's next request on the same connection
 * under `wrangler dev` ("Network connection lost" from its proxy: tests/conformance/
 * test_extensions.py's 413 test failed about 1 run in 10, and again in stop 29's CI). So the 413
 * waits for this much to be read; a client that sends a slightly-too-large body finishes and keeps
 * its connection, as on the Python relay (which reads the rest for 5 s, LINGER). */
const DISCARD_AFTER_413 = 1024 * 1024;

/** Read and drop up to `most` bytes of a body: true when it ended within them, false when the rest
 * was cancelled (more, a stall of a second, or the client gone). */
async function discard(reader: ReadableStreamDefaultReader<Uint8Array>, most: number): Promise<boolean> {
  let left = most;
  try {
    while (left > 0) {
      const { value, done } = await readWithin(reader, 1000);
      if (done) return true;
      left -= value.byteLength;
    }
  } catch {
    // stalled or gone: cancel below
  }
  await reader.cancel().catch(() => undefined);
  return false;
}

/** A whole request body of at most `limit` bytes: the bytes, or why not (the caller answers 408,
 * 413, or nothing to a client that went away). */
async function readBody(
  body: ReadableStream<Uint8Array> | null,
  limit: number,
  stallMs: number,
  deadlineMs = 0,
): Promise<Uint8Array | "stalled" | "late" | "too-large" | "gone"> {
  if (!body) return new Uint8Array(0);
  const reader = body.getReader();
  const parts: Uint8Array[] = [];
  let size = 0;
  const end = deadlineMs > 0 ? Date.now() + deadlineMs : 0;
  try {
    for (;;) {
      // Each read waits at most the stall timeout and what is left of the deadline: a stall limit
      // alone let a client sending a byte now and then hold the connection as long as it liked.
      const left = end ? Math.max(1, end - Date.now()) : 0;
      const wait = end ? (stallMs > 0 ? Math.min(stallMs, left) : left) : stallMs;
      let read: ReadableStreamReadResult<Uint8Array>;
      try {
        read = await readWithin(reader, wait);
      } catch (err) {
        if (err instanceof BodyStalled && end && Date.now() >= end) {
          await reader.cancel().catch(() => undefined);
          return "late";
        }
        throw err;
      }
      const { value, done } = read;
      if (done) {
        reader.releaseLock();
        return concat(parts);
      }
      size += value.byteLength;
      if (size > limit) {
        await reader.cancel().catch(() => undefined);
        return "too-large";
      }
      parts.push(value);
    }
  } catch (err) {
    await reader.cancel().catch(() => undefined);
    return err instanceof BodyStalled ? "stalled" : "gone";
  }
}

function randomToken(bytes: number): string {
  let s = "";
  for (const b of crypto.getRandomValues(new Uint8Array(bytes))) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function nodeCookie(node: string, scheme: string): string {
  return `${NODE_COOKIE}=${encodeNodeCookie(node)}; Path=/; HttpOnly; SameSite=Lax${scheme === "https" ? "; Secure" : ""}`;
}

/** A response body read from a shared answer, from its first byte (a broken answer breaks it). */
function sharedBody(answer: SharedAnswer): ReadableStream<Uint8Array> {
  const reader = answer.reader();
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        try {
          const chunk = await reader.next();
          if (chunk === null) controller.close();
          else controller.enqueue(chunk);
        } catch (err) {
          controller.error(err);
        }
      },
    },
    { highWaterMark: 0 },
  );
}

export class RelayObject extends DurableObject<Env> {
  private readonly cfg: Settings;
  private readonly store: Store;
  private tunnels = new Map<string, Tunnel>();
  private waiters = new Set<() => void>();
  private inFlight = 0;
  private waiting = 0;
  private websockets = 0;
  private readonly startedAt = Date.now();
  private requests = new Map<string, number>();
  private readonly routeLabels = new RouteLabels();
  private bodyBytes = { request: 0, response: 0 };
  /** Messages from bridges that reached the object (billed 20:1; auto-answered pings excluded). */
  private messagesIn = 0;
  /** Round-robin among nodes tied on load. */
  private turn = 0;
  private readonly rates: KeyRates;
  private readonly stats = new RelayStats();
  private readonly ttfb = new Family(
    "bridge_relay_time_to_first_byte_seconds",
    "From request to the first response body byte, seen by the relay",
    "histogram",
    TTFB_BUCKETS,
  );
  private joins = 0;
  /** What each node published, as in storage (`node:<name>`), loaded when first needed. */
  private nodeStats = new Map<string, NodeStats>();
  /** Shared answers being produced, by `<key id>\n<identity>`. */
  private running = new Map<string, SharedAnswer>();
  /** Jobs running here, by id: resolves once the result is stored. */
  private jobsRunning = new Map<string, Promise<void>>();
  private readonly answerMemory = new MemoryBudget(ANSWER_MEMORY);
  /** Answers produced for nobody in particular keep the object awake (a pending timer). */
  private holds = 0;
  private holdTimer: ReturnType<typeof setTimeout> | null = null;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.cfg = settings(env);
    this.rates = new KeyRates(this.cfg.keyRate, this.cfg.keyBurst);
    this.store = new Store(ctx.storage.sql);
    // The heartbeat is answered without waking the object (docs/spec/wire.md section 2).
    ctx.setWebSocketAutoResponse(new WebSocketRequestResponsePair(PING, PONG));
    void ctx.blockConcurrencyWhile(async () => this.store.init());
    // Logged on every (re)build: after hibernation the object is rebuilt on the next event.
    console.log(`relay object started with ${ctx.getWebSockets("bridge").length} bridge socket(s)`);
  }

  // The key-value API of the object's storage, counted with the SQL queries: each call reads or
  // writes one row of the SQLite database behind it (billed like the SQL API's rows).
  private kvGet<T>(key: string): Promise<T | undefined> {
    this.store.rowsRead += 1;
    return this.ctx.storage.get<T>(key);
  }

  private kvPut(key: string, value: unknown): Promise<void> {
    this.store.rowsWritten += 1;
    return this.ctx.storage.put(key, value);
  }

  private kvDelete(key: string): Promise<boolean> {
    this.store.rowsWritten += 1;
    return this.ctx.storage.delete(key);
  }

  private hold(): void {
    this.holds++;
    if (this.holdTimer === null) this.rearm();
  }

  private rearm(): void {
    this.holdTimer = setTimeout(() => {
      this.holdTimer = null;
      if (this.holds > 0) this.rearm();
    }, 5000);
  }

  private release(): void {
    this.holds--;
    if (this.holds <= 0 && this.holdTimer !== null) {
      clearTimeout(this.holdTimer);
      this.holdTimer = null;
    }
  }

  // ================================================================================ tunnels
  private tunnelOf(ws: WebSocket): Tunnel | null {
    const meta = ws.deserializeAttachment() as BridgeMeta | null;
    if (!meta || typeof meta.cid !== "string" || !meta.wire || meta.wire.phase === "closed") return null;
    let t = this.tunnels.get(meta.cid);
    if (!t) {
      // rebuilt after hibernation: streams never survive it (none were in flight)
      t = new Tunnel(ws, meta);
      this.tunnels.set(meta.cid, t);
    }
    return t;
  }

  private allTunnels(): Tunnel[] {
    for (const ws of this.ctx.getWebSockets("bridge")) this.tunnelOf(ws);
    return [...this.tunnels.values()].filter((t) => !t.closed);
  }

  /** The node for a request (docs/spec/relay.md E.1, E.4): one that serves the route, the browser's
   * own node first, then the fewest open streams; ties go round-robin. */
  private pick(want: Want): Tunnel | null {
    const live = this.allTunnels().filter((t) => t.live);
    const serving = live.filter((t) => t.meta.routes.includes(want.route));
    const pool = serving.length ? serving : live;
    if (!pool.length) return null;
    if (want.sticky) {
      const home = pool.find((t) => t.meta.node === want.sticky);
      if (home) return home;
    }
    const least = Math.min(...pool.map((t) => t.conn.openStreams));
    const tied = pool.filter((t) => t.conn.openStreams === least);
    this.turn = (this.turn + 1) % 1_000_000;
    return tied[this.turn % tied.length]!;
  }

  private notify(): void {
    const ws = [...this.waiters];
    this.waiters.clear();
    for (const w of ws) w();
  }

  /** A bridge for `want`, waiting up to `grace` for one to connect (docs/spec/relay.md section 11.6). */
  private async acquire(want: Want): Promise<Tunnel | null> {
    let t = this.pick(want);
    if (t) return t;
    const deadline = Date.now() + this.cfg.graceMs;
    this.waiting++;
    try {
      while ((t = this.pick(want)) === null) {
        const left = deadline - Date.now();
        if (left <= 0) return null;
        await new Promise<void>((res) => {
          const done = (): void => {
            clearTimeout(timer);
            this.waiters.delete(done);
            res();
          };
          const timer = setTimeout(done, left);
          this.waiters.add(done);
        });
      }
      return t;
    } finally {
      this.waiting--;
    }
  }

  private async scheduleWatch(): Promise<void> {
    let next = Infinity;
    for (const t of this.allTunnels()) {
      next = Math.min(
        next,
        t.phase === "hello" ? t.meta.acceptedAt + HELLO_TIMEOUT_MS : this.lastSeen(t) + this.deadAfterMs,
      );
    }
    if (next === Infinity) return;
    const current = await this.ctx.storage.getAlarm();
    if (current === null || current > next + 50) await this.ctx.storage.setAlarm(next + 50);
  }

  private lastSeen(t: Tunnel): number {
    let seen = Math.max(t.lastRx, t.meta.connectedAt || t.meta.acceptedAt);
    try {
      const auto = this.ctx.getWebSocketAutoResponseTimestamp(t.ws);
      if (auto) seen = Math.max(seen, auto.getTime());
    } catch {
      // not available: the in-memory time alone
    }
    return seen;
  }

  /** The watchdog: HELLO timeout (close 1008) and heartbeat timeout (close 1011). */
  async alarm(): Promise<void> {
    const now = Date.now();
    for (const t of this.allTunnels()) {
      if (t.phase === "hello" && now - t.meta.acceptedAt >= HELLO_TIMEOUT_MS) {
        console.warn(`bridge from ${t.meta.client || "?"} sent no HELLO within ${HELLO_TIMEOUT} s`);
        tryClose(t.ws, CloseCode.POLICY_VIOLATION, "no HELLO");
        await this.endTunnel(t, "no HELLO");
      } else if (t.phase === "open" && now - this.lastSeen(t) > this.deadAfterMs) {
        console.warn(`bridge ${t.meta.node} silent for ${this.deadAfterMs / 1000} s: closing its link`);
        tryClose(t.ws, CloseCode.INTERNAL_ERROR, "heartbeat timeout");
        await this.endTunnel(t, "heartbeat timeout");
      }
    }
    await this.scheduleWatch();
  }

  /** Seconds without any message after which a bridge's link is dead (3 heartbeats), in ms. */
  private get deadAfterMs(): number {
    return this.cfg.heartbeat * HEARTBEAT_MISSES * 1000;
  }

  private async endTunnel(t: Tunnel, reason: string): Promise<void> {
    if (t.closed) return;
    const wasOpen = t.phase === "open";
    t.teardown(reason);
    // The socket may linger (a peer that does not answer the close): mark it so that it is never
    // taken for a live bridge again, even after hibernation.
    t.meta.wire.phase = "closed";
    try {
      t.save();
    } catch {
      // already gone
    }
    this.tunnels.delete(t.meta.cid);
    if (wasOpen) {
      console.log(`bridge ${t.meta.node} disconnected (${reason})`);
      await this.kvPut("last_disconnected_at", Date.now());
      if (!this.allTunnels().some((o) => o.phase === "open" && o.meta.node === t.meta.node)) {
        // its last session left: what it published would lie (docs/spec/relay.md E.14)
        this.stats.forget(t.meta.node);
        this.nodeStats.delete(t.meta.node);
        await this.kvDelete(`node:${t.meta.node}`);
      }
    }
    this.notify();
  }

  private async connectionError(t: Tunnel, err: ProtocolError): Promise<void> {
    console.warn(`bridge ${t.meta.node || t.meta.client || "?"} broke the protocol: ${err.message}`);
    t.conn.sendGoaway(err.code, err.message);
    t.flush();
    tryClose(t.ws, CloseCode.PROTOCOL_ERROR, "protocol error");
    await this.endTunnel(t, `protocol error: ${err.message}`);
  }

  private acceptBridge(info: Internal): Response {
    const pair = new WebSocketPair();
    const [client, server] = Object.values(pair) as [WebSocket, WebSocket];
    this.ctx.acceptWebSocket(server, ["bridge"]);
    const meta: BridgeMeta = {
      cid: randomHex(8),
      acceptedAt: Date.now(),
      client: info.client,
      session: "",
      node: "",
      routes: [],
      connectedAt: 0,
      info: {},
      wire: newWireState(),
    };
    server.serializeAttachment(meta);
    this.tunnels.set(meta.cid, new Tunnel(server, meta));
    this.ctx.waitUntil(this.scheduleWatch());
    return new Response(null, { status: 101, webSocket: client });
  }

  /** A bridge said HELLO (the connection checked its shape): check version and node token,
   * then WELCOME it or refuse it with GOAWAY (docs/spec/wire.md section 5). */
  private async onHello(t: Tunnel, hello: Extract<WireEvent, { event: "hello" }>): Promise<void> {
    const refuse = async (code: number, reason: string, close: number): Promise<void> => {
      t.conn.reject(code, reason);
      t.flush();
      tryClose(t.ws, close, reason);
      await this.endTunnel(t, reason);
    };
    if (hello.version !== PROTOCOL_VERSION) {
      await refuse(ErrorCode.UNSUPPORTED_VERSION, `relay speaks version ${PROTOCOL_VERSION}`, CloseCode.PROTOCOL_ERROR);
      return;
    }
    const expected = this.env.NODE_TOKEN ?? "";
    if (!expected || !sameSecret(hello.token, expected)) {
      console.warn(`bridge from ${t.meta.client || "?"} refused: wrong node token`);
      await refuse(ErrorCode.UNAUTHORIZED, "wrong node token", CloseCode.UNAUTHORIZED);
      return;
    }
    const now = Date.now();
    // The models go to storage with the node's STATS (an attachment must stay small).
    const { models, ...info } = hello.info;
    Object.assign(t.meta, {
      session: randomHex(8),
      node: hello.node || t.meta.client || "bridge",
      routes: hello.routes,
      connectedAt: now,
      info,
    });
    t.conn.accept(t.meta.session, this.cfg.heartbeat, {
      // Extra key (ignored by bridges that do not know it): how long the bridge may hold
      // response frames to send them in fewer WebSocket messages; each message the bridge
      // sends is billed (20 messages = 1 Durable Object request).
      coalesce: this.cfg.coalesce,
      // Extra key: the shortest interval between the bridge's STATS samples; each one wakes the
      // object and is a billed message.
      stats_interval: this.cfg.statsInterval,
    });
    t.save();
    t.flush();
    console.log(`bridge ${t.meta.node} connected from ${t.meta.client || "?"} with routes ${t.meta.routes.join(",") || "-"}`);
    this.notify();
    await this.kvPut("last_connected_at", now);
    if (models !== undefined) await this.updateNode(t.meta.node, { models: modelList(models) });
    await this.scheduleWatch();
  }

  // ================================================================================ STATS
  private async nodeStatsOf(node: string): Promise<NodeStats> {
    let ns = this.nodeStats.get(node);
    if (!ns) {
      ns = (await this.kvGet<NodeStats>(`node:${node}`)) ?? { models: [] };
      this.nodeStats.set(node, ns);
    }
    return ns;
  }

  private async updateNode(node: string, change: Partial<NodeStats>): Promise<void> {
    const ns = { ...(await this.nodeStatsOf(node)), ...change };
    this.nodeStats.set(node, ns);
    await this.kvPut(`node:${node}`, ns);
  }

  /** A STATS frame (docs/spec/wire.md section 12a): series for /_relay/metrics; the latest sample,
   * facts and models kept for /_relay/status and the status page. */
  private async onStats(t: Tunnel, body: Record<string, unknown>): Promise<void> {
    const node = t.meta.node;
    this.stats.publish(node, body);
    if (body.kind === "sample") {
      await this.updateNode(node, { sample: { ...cleanSample(body), received_at: Date.now() / 1000 } });
    } else if (body.kind === "node") {
      const change: Partial<NodeStats> = { facts: cleanFacts(body) };
      if ("models" in body) change.models = modelList(body.models);
      await this.updateNode(node, change);
    }
  }

  // ================================================================================ hibernation handlers
  async webSocketMessage(ws: WebSocket, message: string | ArrayBuffer): Promise<void> {
    const t = this.tunnelOf(ws);
    if (!t || t.closed) return;
    t.lastRx = Date.now();
    this.messagesIn++;
    if (typeof message === "string") {
      if (message === PING) ws.send(PONG); // normally answered by the auto-response
      return;
    }
    try {
      const events = t.conn.receive(new Uint8Array(message));
      t.saveIfChanged();
      for (const event of events) {
        if (t.closed) break;
        if (event.event === "hello") await this.onHello(t, event);
        else if (event.event === "stats") await this.onStats(t, event.body);
        else t.dispatch(event);
      }
      t.schedule(); // a RESET the connection queued for a stream error
      if (t.draining) this.notify();
    } catch (err) {
      if (err instanceof ProtocolError) await this.connectionError(t, err);
      else throw err;
    }
  }

  async webSocketClose(ws: WebSocket, code: number): Promise<void> {
    const t = this.tunnelOf(ws);
    tryClose(ws, code === 1005 || code === 1006 ? CloseCode.NORMAL : sendableClose(code));
    if (t) await this.endTunnel(t, `closed by the bridge (${code})`);
  }

  async webSocketError(ws: WebSocket): Promise<void> {
    const t = this.tunnelOf(ws);
    if (t) await this.endTunnel(t, "socket error");
  }

  // ================================================================================ HTTP
  async fetch(request: Request): Promise<Response> {
    const raw = request.headers.get(INTERNAL_HEADER);
    if (!raw) return json(400, { error: "not for clients" });
    const info = JSON.parse(raw) as Internal;
    if (info.kind === "logout") return this.logout(info);
    if (info.auth === "cookie" && info.session && (await this.sessionEnded(info.session))) {
      // A copy of a cookie whose session ended (logout): no longer a login; a valid key presented
      // beside it still is (the Python relay checks the session before it falls back to the key).
      if (info.key) {
        info.auth = info.key.how;
        info.keyId = info.key.keyId;
        info.session = undefined;
        info.expiry = undefined;
      } else {
        await request.body?.cancel();
        if ((request.headers.get("upgrade") ?? "").toLowerCase() === "websocket") {
          return json(401, { error: "a valid client key or login cookie is required" });
        }
        return deny(request, new URL(request.url));
      }
    }
    if (info.keyId !== undefined) {
      // extension key-rate-limits: every authenticated request counts against its key
      const retry = this.rates.check(info.keyId, Date.now() / 1000);
      if (retry) {
        await request.body?.cancel();
        return json(429, { error: KEY_RATE_REFUSAL }, { "retry-after": String(retry) });
      }
    }
    switch (info.kind) {
      case "bridge":
        return this.acceptBridge(info);
      case "health":
        return json(200, await this.health());
      case "status":
        return json(200, await this.status());
      case "status_page":
        return statusPage(await this.status());
      case "metrics":
        return new Response(this.metrics(), { headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" } });
      case "login":
        return this.login(request, info);
      case "jobs":
        return this.jobs(request, info);
      case "proxy":
        if ((request.headers.get("upgrade") ?? "").toLowerCase() === "websocket") return this.clientWebSocket(request, info);
        return this.proxy(request, info);
    }
    return json(400, { error: "unknown kind" });
  }

  /** Sessions ended by logout (a cookie's session nonce -> its expiry, Unix seconds), kept in storage
   * under `ended:<session>` until the cookie would expire anyway; loaded once per object start. */
  private ended: Map<string, number> | null = null;

  private async endedSessions(): Promise<Map<string, number>> {
    if (this.ended === null) {
      const stored = await this.ctx.storage.list<number>({ prefix: "ended:" });
      this.store.rowsRead += stored.size;
      const now = Date.now() / 1000;
      this.ended = new Map();
      for (const [key, expiry] of stored) {
        if (expiry > now) this.ended.set(key.slice(6), expiry);
        else await this.kvDelete(key);
      }
    }
    return this.ended;
  }

  private async sessionEnded(session: string): Promise<boolean> {
    return (await this.endedSessions()).has(session);
  }

  private async logout(info: Internal): Promise<Response> {
    if (info.session && info.expiry) {
      (await this.endedSessions()).set(info.session, info.expiry);
      await this.kvPut(`ended:${info.session}`, info.expiry);
    }
    return loggedOut();
  }

  async health(): Promise<Record<string, unknown>> {
    const live = this.allTunnels().filter((t) => t.live);
    const [connected, left] = await Promise.all([
      this.kvGet<number>("last_connected_at"),
      this.kvGet<number>("last_disconnected_at"),
    ]);
    return {
      status: live.length ? "ok" : "no_node",
      node_connected: live.length > 0,
      nodes: live.length,
      connected_since: live.length ? isoTime(Math.min(...live.map((t) => t.meta.connectedAt))) : null,
      last_connected_at: isoTime(connected),
      last_disconnected_at: isoTime(left),
      requests_in_flight: this.inFlight,
      requests_waiting: this.waiting,
      websockets_open: this.websockets,
      draining: false,
      version: VERSION,
      protocol: PROTOCOL_VERSION,
      relay: "cloudflare",
    };
  }

  async status(): Promise<Record<string, unknown>> {
    const open = this.allTunnels().filter((t) => t.phase === "open");
    const published = await Promise.all(open.map((t) => this.nodeStatsOf(t.meta.node)));
    return {
      ...(await this.health()),
      uptime_s: Math.round((Date.now() - this.startedAt) / 100) / 10,
      bridge_messages_in: this.messagesIn,
      default_route: this.cfg.defaultRoute,
      route_ports: {},
      nodes_detail: open.map((t, i) => {
        const ns = published[i]!;
        return {
          node: t.meta.node,
          session: t.meta.session,
          routes: [...t.meta.routes].sort(),
          connected_since: isoTime(t.meta.connectedAt),
          streams: t.conn.openStreams,
          models: ns.models,
          draining: t.draining,
          info: t.meta.info,
          ...(ns.sample ? { sample: ns.sample } : {}),
          ...(ns.facts ? { facts: ns.facts } : {}),
        };
      }),
    };
  }

  private metrics(): string {
    const lines = [
      "# HELP bridge_relay_requests_total Requests proxied, by route and status (since the object started)",
      "# TYPE bridge_relay_requests_total counter",
    ];
    for (const [k, v] of this.requests) {
      const [route, status] = k.split("\n");
      lines.push(`bridge_relay_requests_total{route=${JSON.stringify(route)},status="${status}"} ${v}`);
    }
    lines.push(
      "# TYPE bridge_relay_requests_in_flight gauge",
      `bridge_relay_requests_in_flight ${this.inFlight}`,
      "# TYPE bridge_relay_nodes_connected gauge",
      `bridge_relay_nodes_connected ${this.allTunnels().filter((t) => t.live).length}`,
      "# HELP bridge_relay_bridge_messages_total WebSocket messages from bridges (billed 20 to 1)",
      "# TYPE bridge_relay_bridge_messages_total counter",
      `bridge_relay_bridge_messages_total ${this.messagesIn}`,
      "# TYPE bridge_relay_body_bytes_total counter",
      `bridge_relay_body_bytes_total{direction="request"} ${this.bodyBytes.request}`,
      `bridge_relay_body_bytes_total{direction="response"} ${this.bodyBytes.response}`,
      "# HELP bridge_relay_idempotent_joins_total Repeated requests served from a generation in flight or finished",
      "# TYPE bridge_relay_idempotent_joins_total counter",
      `bridge_relay_idempotent_joins_total ${this.joins}`,
      "# HELP bridge_relay_storage_rows_total Rows of the object's SQLite storage read and written by the relay (billed; key-value calls count one each)",
      "# TYPE bridge_relay_storage_rows_total counter",
      `bridge_relay_storage_rows_total{op="read"} ${this.store.rowsRead}`,
      `bridge_relay_storage_rows_total{op="written"} ${this.store.rowsWritten}`,
      ...this.ttfb.render(),
      ...this.stats.render(),
    );
    return lines.join("\n") + "\n";
  }

  private count(route: string, status: number): void {
    if (!status) return;
    const k = `${this.routeLabels.label(route)}\n${status}`;
    this.requests.set(k, (this.requests.get(k) ?? 0) + 1);
  }

  private async login(request: Request, info: Internal): Promise<Response> {
    const url = new URL(request.url);
    let next = safeNext(url.searchParams.get("next"));
    const length = request.headers.get("content-length");
    if (length !== null && /^\d+$/.test(length) && Number(length) > LOGIN_MAX) {
      await request.body?.cancel();
      return json(413, { error: "login form too large" }, { connection: "close" });
    }
    const stall = this.cfg.bodyTimeoutMs;
    const deadline = stall > 0 ? Math.min(LOGIN_BODY_DEADLINE_MS, stall) : LOGIN_BODY_DEADLINE_MS;
    const body = await readBody(request.body, LOGIN_MAX, stall, deadline);
    if (body === "too-large") return json(413, { error: "login form too large" }, { connection: "close" });
    if (body === "stalled") return json(408, { error: BODY_STALLED }, { connection: "close" });
    if (body === "late") {
      return json(408, { error: `request body too slow: not complete within ${deadline / 1000} s` }, { connection: "close" });
    }
    if (body === "gone") return json(400, { error: "the login form did not arrive" });
    const form = new URLSearchParams(fromUtf8(body));
    const key = (form.get("key") ?? "").trim();
    next = safeNext(form.get("next") ?? next);
    const keyId = await checkKey(this.env, key);
    if (keyId === null) {
      // The key is checked first: over the limit, wrong logins get 429, a right one is still let
      // in (as on the Python relay, docs/security.md §7).
      const storeKey = `login_failures:${info.client}`;
      const now = Date.now();
      const failures = ((await this.kvGet<number[]>(storeKey)) ?? []).filter((ts) => ts > now - 60_000);
      if (failures.length >= LOGIN_RATE) {
        return json(429, { error: "too many failed logins; wait a minute" }, { "retry-after": "60" });
      }
      failures.push(now);
      await this.kvPut(storeKey, failures);
      console.warn(`failed login from ${info.client || "?"}`);
      return loginPage(401, next, "That key is not valid.");
    }
    // A login is a request of its key: it counts against the key's rate, as every request with the
    // key or its cookie does; beyond it, 429 and no cookie.
    const retry = this.rates.check(keyId, Date.now() / 1000);
    if (retry) return json(429, { error: KEY_RATE_REFUSAL }, { "retry-after": String(retry) });
    const secure = info.scheme === "https" || request.headers.get("x-forwarded-proto") === "https" ? "; Secure" : "";
    return new Response(null, {
      status: 303,
      headers: {
        location: next,
        "set-cookie": `${COOKIE_NAME}=${await issueCookie(this.env, keyId)}; Path=/; Max-Age=${COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax${secure}`,
        "cache-control": "no-store",
      },
    });
  }

  private openHeaders(request: Request, info: Internal): HeaderPairs {
    const headers = withUser(
      forwardHeaders(
        request,
        info.auth as AuthMethod,
        info.prefix ?? "",
        info.client,
        info.scheme,
        this.cfg.cookieRoutes,
      ),
      info.route ?? "",
      this.cfg.userRoute,
      info.keyId,
    );
    if (typeof info.acceptEncoding !== "string") return headers;
    // Cloudflare rewrites Accept-Encoding; the upstream must see what the client can decode,
    // since the body comes back as the upstream encoded it (encodeBody "manual").
    const out = headers.filter(([k]) => k !== "accept-encoding");
    if (info.acceptEncoding) out.splice(0, 0, ["accept-encoding", info.acceptEncoding]);
    return out;
  }

  /** The node a logged-in browser was on (its `bridge_node` cookie), for cookie logins only. */
  private sticky(request: Request, info: Internal): string | null {
    if (info.auth !== "cookie") return null;
    const [value] = cookieValues(request.headers.get("cookie"), NODE_COOKIE);
    return value ? decodeNodeCookie(value) : null;
  }

  // ================================================================================ proxied requests
  private async proxy(request: Request, info: Internal): Promise<Response> {
    const route = info.route!;
    const method = request.method;
    const headers = this.openHeaders(request, info);
    const length = headerOf(headers, "content-length");
    if (length !== undefined && !/^\d+$/.test(length)) {
      await request.body?.cancel();
      return json(400, { error: "invalid Content-Length" });
    }
    const maxBody = this.cfg.maxBody;
    if (maxBody && length !== undefined && Number(length) > maxBody) {
      await request.body?.cancel();
      return json(413, { error: `body exceeds ${maxBody} bytes` });
    }
    const hasBody = request.body !== null && (length === undefined || Number(length) > 0);
    // A small body is read before a node is chosen: it identifies a repeated request. Larger
    // ones stream.
    let body: Uint8Array | null = hasBody ? null : new Uint8Array(0);
    if (hasBody && length !== undefined && Number(length) <= BUFFER_LIMIT) {
      const read = await readBody(request.body, Number(length), this.cfg.bodyTimeoutMs);
      if (read === "stalled" || read === "late") {
        this.count(route, 408);
        return json(408, { error: BODY_STALLED }, { connection: "close" });
      }
      if (read === "gone" || read === "too-large") return json(400, { error: "the request body did not arrive whole" });
      body = read;
      this.bodyBytes.request += read.byteLength;
    }
    const want: Want = { route, sticky: this.sticky(request, info) };
    if (body !== null) {
      const held: HeldRequest = { method, route, target: info.target!, headers, body, client: info.client };
      const identity = await this.identity(held);
      if (identity !== null) {
        const shared = this.sharedRequest(`${info.keyId ?? ""}\n${identity}`, held, want, info.prefix ?? "");
        if (shared) return shared;
      }
    }
    return this.plain(request, info, headers, body, want);
  }

  /** Proxy one request for one client (the body held, or streamed from the client). */
  private async plain(request: Request, info: Internal, headers: HeaderPairs, held: Uint8Array | null, want: Want): Promise<Response> {
    const route = want.route;
    const method = request.method;
    const started = Date.now();
    const hasBody = held === null || held.byteLength > 0;
    // A body not read yet is cancelled when the request is answered without it.
    const discard = async (): Promise<void> => {
      if (held === null) await request.body?.cancel().catch(() => undefined);
    };
    this.inFlight++;
    let finished = false;
    const finish = (status: number): void => {
      if (finished) return;
      finished = true;
      this.inFlight--;
      this.count(route, status);
    };
    try {
      const tunnel = await this.acquire(want);
      if (!tunnel) {
        await discard();
        finish(503);
        return json(503, { error: "no bridge is connected; try again shortly" }, { "retry-after": "10" });
      }
      if (tunnel.meta.routes.length && !tunnel.meta.routes.includes(route)) {
        await discard();
        finish(404);
        return json(404, { error: `unknown route '${route}'` });
      }
      let stream: TStream;
      try {
        stream = tunnel.open(method, route, info.target!, headers, !hasBody, { client: info.client });
      } catch (err) {
        await discard();
        if (err instanceof StreamError) {
          finish(503);
          return json(503, { error: "the bridge is serving as many requests as it can; try again shortly" }, { "retry-after": "5" });
        }
        finish(431);
        return json(431, { error: "request header fields too large" });
      }
      let pumped: Promise<boolean> | null = null;
      if (held !== null && held.byteLength) this.ctx.waitUntil(stream.write(held, true).catch(() => undefined));
      else if (hasBody) {
        pumped = this.pumpRequest(request.body!, stream);
        this.ctx.waitUntil(pumped);
      }
      let head: Head;
      try {
        head = await stream.head;
      } catch (err) {
        const e = err as StreamError;
        if (e.reason === BODY_STALLED) {
          finish(408);
          return json(408, { error: BODY_STALLED }, { connection: "close" });
        }
        const failed = streamFailed(e.code, route);
        console.warn(`stream ${stream.id} (${method} ${route}) failed before its answer: ${e.code} ${e.reason}`);
        finish(failed.status);
        // A body refused for its size is read to its end (up to DISCARD_AFTER_413) before the 413
        // goes: the runtime lets nobody read a request body once its answer is sent, and a body
        // left unread broke the client's next request on the same connection.
        if (e.code === ErrorCode.BODY_TOO_LARGE && pumped !== null && !(await pumped)) {
          return json(failed.status, failed.body, { ...failed.headers, connection: "close" });
        }
        return json(failed.status, failed.body, failed.headers);
      }
      let status = head.status;
      const passed = cleanResponseHeaders(status, head.headers, info.prefix ?? "", info.target ?? "/");
      if (passed === null) {
        console.warn(`node ${tunnel.meta.node} sent an invalid response head (status ${status})`);
        stream.reset(ErrorCode.PROTOCOL_ERROR, `status ${status} cannot be relayed here`);
        finish(502);
        return json(502, { error: "bridge: invalid response from the upstream" });
      }
      const out = new Headers();
      for (const [k, v] of passed) out.append(k, v);
      out.set("x-bridge-node", tunnel.meta.node);
      if (info.auth === "cookie" && want.sticky !== tunnel.meta.node) out.append("set-cookie", nodeCookie(tunnel.meta.node, info.scheme));
      const nullBody = NULL_BODY.has(status) || method === "HEAD";
      if (nullBody) {
        this.ctx.waitUntil(drain(stream).finally(() => finish(status)));
        return new Response(null, { status, headers: out });
      }
      // With a Content-Length the client sees a complete body once that many bytes came: the body
      // ends there whatever the stream does (extension response-cleaning), and breaks if it ends short.
      let left = declaredLength(passed);
      let first = true;
      const self = this;
      const body = new ReadableStream<Uint8Array>(
        {
          async pull(controller) {
            try {
              for (;;) {
                const chunk = await stream.read();
                if (first) {
                  first = false;
                  self.ttfb.observe({}, (Date.now() - started) / 1000);
                }
                if (chunk === null) {
                  if (left) throw new StreamError(ErrorCode.UPSTREAM_ERROR, `ended ${left} bytes short`);
                  controller.close();
                  finish(status);
                  return;
                }
                stream.consumed(chunk.byteLength);
                const part = left === null ? chunk : chunk.subarray(0, left);
                if (left !== null) left -= part.byteLength;
                if (part.byteLength) {
                  self.bodyBytes.response += part.byteLength;
                  controller.enqueue(part);
                }
                if (left === 0) {
                  controller.close();
                  finish(status);
                  self.ctx.waitUntil(drain(stream));
                  return;
                }
                if (part.byteLength) return;
              }
            } catch (err) {
              // a RESET after RESPONSE: break the client's response, never finish it
              console.warn(`stream ${stream.id} (${method} ${route}) cut mid-response: ${(err as Error).message}`);
              if (!stream.done) stream.reset(ErrorCode.CANCEL, "response cut");
              status = 599;
              finish(599);
              controller.error(err);
            }
          },
          cancel() {
            stream.reset(ErrorCode.CANCEL, "client went away");
            finish(status);
          },
        },
        { highWaterMark: 0 },
      );
      // "manual": the bytes are passed as they are (compressed or not), never re-encoded or
      // buffered for compression, so every chunk leaves as soon as it arrives.
      return new Response(body, { status, headers: out, encodeBody: "manual" });
    } catch (err) {
      finish(500);
      throw err;
    }
  }

  /** Send the request body as the bridge's credit allows, counting it against max_body; a body
   * from which no byte comes for BODY_TIMEOUT seconds resets the stream (the client gets 408).
   * Resolves true when the body was read to its end (a body over max_body included: see
   * `discard`), false when it was cancelled. */
  private async pumpRequest(body: ReadableStream<Uint8Array>, stream: TStream): Promise<boolean> {
    const reader = body.getReader();
    let total = 0;
    try {
      for (;;) {
        const { value, done } = await readWithin(reader, this.cfg.bodyTimeoutMs);
        if (done) {
          await stream.write(new Uint8Array(0), true);
          return true;
        }
        total += value.byteLength;
        this.bodyBytes.request += value.byteLength;
        if (this.cfg.maxBody && total > this.cfg.maxBody) {
          stream.reset(ErrorCode.BODY_TOO_LARGE, `body exceeds ${this.cfg.maxBody} bytes`);
          return await discard(reader, DISCARD_AFTER_413);
        }
        await stream.write(value);
      }
    } catch (err) {
      if (err instanceof BodyStalled) stream.reset(ErrorCode.CANCEL, BODY_STALLED);
      else if (!(err instanceof StreamError)) stream.reset(ErrorCode.CANCEL, "client went away");
      try {
        await reader.cancel();
      } catch {
        // already errored
      }
      return false;
    }
  }

  // ================================================================================ shared answers
  /** What makes a request the same as an earlier one of the same client key (extension
   * `idempotency`, docs/spec/relay.md E.6): its Idempotency-Key, or the SHA-256 of a deterministic
   * body (temperature 0); null: not shared. The upstream credentials the client sent
   * (Authorization when it is not the relay's key, Cookie as forwarded) are part of it, so a
   * request made with other credentials never gets another's answer (docs/security.md §7). */
  private async identity(req: HeldRequest): Promise<string | null> {
    if (this.cfg.idempotencyTtl <= 0) return null;
    const explicit = headerOf(req.headers, "idempotency-key");
    let identity: string;
    if (explicit) identity = `key:${req.route}:${explicit.slice(0, 256)}`;
    else if (req.method === "POST" && deterministic(req.body)) {
      const digest = await crypto.subtle.digest("SHA-256", concat([utf8(`${req.method} ${req.route} ${req.target}\n`), req.body]));
      identity = `sha256:${[...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
    } else return null;
    const credentials = [headerOf(req.headers, "authorization"), headerOf(req.headers, "cookie")];
    if (credentials.some((c) => c !== undefined)) identity += `:credentials:${(await sha256Hex(JSON.stringify(credentials))).slice(0, 32)}`;
    return identity;
  }

  /** Serve a shared request: join the answer in flight, replay a finished one, or start it. Null
   * when it cannot be shared now (too many being produced): the caller serves it uncached. */
  private sharedRequest(slot: string, req: HeldRequest, want: Want, prefix = ""): Promise<Response> | null {
    const [keyId, identity] = [slot.slice(0, slot.indexOf("\n")), slot.slice(slot.indexOf("\n") + 1)];
    let answer = this.running.get(slot);
    let how: "new" | "joined" | "replayed" = "joined";
    if (answer === undefined) {
      const stored = this.store.getAnswer(keyId, identity, Date.now() / 1000, this.cfg.idempotencyTtl);
      if (stored) {
        answer = SharedAnswer.recorded(stored.status, stored.headers, stored.body, stored.finished);
        how = "replayed";
      } else {
        if (this.running.size >= MAX_RUNNING_SHARED) return null;
        answer = new SharedAnswer(SHARED_MAX_BYTES, this.answerMemory);
        how = "new";
        this.running.set(slot, answer);
        const made = answer;
        void this.produce(made, req, want).finally(() => {
          this.running.delete(slot);
          made.release();
          if (made.ok && this.cfg.idempotencyEntries > 0) {
            this.store.putAnswer(keyId, identity, made.status, made.headers, made.body(), made.finishedAt ?? Date.now() / 1000, this.cfg.idempotencyTtl, this.cfg.idempotencyEntries, this.cfg.idempotencyBytes);
          }
        });
      }
    } else if (answer.done) how = "replayed";
    if (how !== "new") {
      this.joins++;
      console.log(`repeated ${req.method} ${req.route}: ${how}`);
    }
    return this.serveShared(answer, how, req.method, prefix, req.target);
  }

  private async serveShared(answer: SharedAnswer, how: string, method: string, prefix = "", target = "/"): Promise<Response> {
    const { status, headers } = await answer.head();
    const out = new Headers();
    // Stored cleaned (the relay's cookies dropped); scoped for this reader's route prefix.
    for (const [k, v] of headers) out.append(k, k.toLowerCase() === "set-cookie" ? scopedSetCookie(v, prefix, target) : v);
    out.set("x-bridge-idempotent", how);
    if (NULL_BODY.has(status) || method === "HEAD") return new Response(null, { status, headers: out });
    return new Response(sharedBody(answer), { status, headers: out, encodeBody: "manual" });
  }

  /** Run `req` on a node into `answer`, whoever reads it (a shared request's first client may
   * leave: the answer is still made). Every failure before the answer is a complete error response
   * (issue 20); a failure mid-body breaks every reader's body. */
  private async produce(answer: SharedAnswer, req: HeldRequest, want: Want): Promise<void> {
    const now = (): number => Date.now() / 1000;
    let status = 0;
    let stream: TStream | null = null;
    const refuse = (code: number, body: { error: string; code?: number }, extra: Record<string, string> = {}): void => {
      status = code;
      const headers: HeaderPairs = [["content-type", "application/json"], ["cache-control", "no-store"], ...Object.entries(extra)];
      answer.answerWith(code, headers, utf8(JSON.stringify(body)), body.error, now());
    };
    this.inFlight++;
    this.hold();
    try {
      const tunnel = await this.acquire(want);
      if (!tunnel) return refuse(503, { error: "no bridge is connected; try again shortly" }, { "retry-after": "10" });
      if (tunnel.meta.routes.length && !tunnel.meta.routes.includes(req.route)) {
        return refuse(404, { error: `unknown route '${req.route}'` });
      }
      try {
        stream = tunnel.open(req.method, req.route, req.target, req.headers, req.body.byteLength === 0, { client: req.client });
      } catch (err) {
        if (err instanceof StreamError) {
          return refuse(503, { error: "the bridge is serving as many requests as it can; try again shortly" }, { "retry-after": "5" });
        }
        return refuse(431, { error: "request header fields too large" });
      }
      if (req.body.byteLength) this.ctx.waitUntil(stream.write(req.body, true).catch(() => undefined));
      let head: Head;
      try {
        head = await stream.head;
      } catch (err) {
        const e = err as StreamError;
        console.warn(`stream ${stream.id} (${req.method} ${req.route}) failed before its answer: ${e.code} ${e.reason}`);
        const failed = streamFailed(e.code, req.route);
        return refuse(failed.status, failed.body, failed.headers);
      }
      const passed = cleanResponseHeaders(head.status, head.headers);
      if (passed === null) {
        stream.reset(ErrorCode.PROTOCOL_ERROR, `status ${head.status} cannot be relayed here`);
        return refuse(502, { error: "bridge: invalid response from the upstream" });
      }
      status = head.status;
      answer.start(status, [...passed, ["x-bridge-node", tunnel.meta.node]]);
      let left = declaredLength(passed);
      for (;;) {
        const chunk = await stream.read();
        if (chunk === null) {
          if (left) throw new StreamError(ErrorCode.UPSTREAM_ERROR, `ended ${left} bytes short`);
          break;
        }
        stream.consumed(chunk.byteLength);
        this.bodyBytes.response += chunk.byteLength;
        const part = left === null ? chunk : chunk.subarray(0, left);
        if (left !== null) left -= part.byteLength;
        if (part.byteLength && !answer.append(part)) {
          stream.reset(ErrorCode.CANCEL, "answer too large to share");
          break;
        }
        if (left === 0) {
          this.ctx.waitUntil(drain(stream));
          break;
        }
      }
      answer.finish(now());
    } catch (err) {
      status = 599;
      console.warn(`shared ${req.method} ${req.route} cut mid-response: ${(err as Error).message}`);
      answer.breakOff(`cut mid-response: ${err instanceof StreamError ? `code ${err.code}` : "relay error"}`, now());
      if (stream && !stream.done) stream.reset(ErrorCode.CANCEL, "response cut");
    } finally {
      if (!answer.done) answer.breakOff("relay stopped", now());
      this.inFlight--;
      this.count(req.route, status);
      this.release();
      this.notify();
    }
  }

  // ================================================================================ jobs
  /** `/_relay/jobs[/<id>]` (extension `jobs`, docs/spec/relay.md E.7), for one client key. */
  private async jobs(request: Request, info: Internal): Promise<Response> {
    const keyId = info.keyId!;
    const url = new URL(request.url);
    const method = request.method;
    const id = url.pathname.slice("/_relay/jobs".length).replace(/^\/+|\/+$/g, "");
    if (!id) {
      if (method === "POST") return this.submitJob(request, info);
      await request.body?.cancel();
      if (method !== "GET") return json(405, { error: "use GET or POST" });
      this.store.expireJobs(Date.now() / 1000 - this.cfg.jobTtl);
      const jobs = this.store.listJobs(keyId, this.jobAlive).map((j) => ({ id: j.id, state: j.state, created_at: iso(j.created) }));
      return json(200, { jobs });
    }
    await request.body?.cancel();
    if (method === "DELETE") {
      const found = this.store.deleteJob(id, keyId);
      return json(found ? 200 : 404, { deleted: found });
    }
    if (method !== "GET") return json(405, { error: "use GET or DELETE" });
    let job = this.store.getJob(id, keyId, this.jobAlive);
    if (job === null) return json(404, { error: "no such job" });
    const wait = waitSeconds(url.searchParams);
    const running = this.jobsRunning.get(id);
    if (job.state === "running" && running && wait > 0) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([running, new Promise<void>((res) => (timer = setTimeout(res, wait * 1000)))]);
      if (timer !== undefined) clearTimeout(timer);
      job = this.store.getJob(id, keyId, this.jobAlive) ?? job;
    }
    return json(200, describeJob(job));
  }

  /** Whether a job is running in this instance of the object (one stored as running that is not
   * was running when the object last stopped). */
  private readonly jobAlive = (id: string): boolean => this.jobsRunning.has(id);

  private async submitJob(request: Request, info: Internal): Promise<Response> {
    const keyId = info.keyId!;
    const length = request.headers.get("content-length");
    if (length !== null && /^\d+$/.test(length) && Number(length) > MAX_SUBMISSION) {
      await request.body?.cancel();
      return json(413, { error: `job exceeds ${MAX_SUBMISSION} bytes` }, { connection: "close" });
    }
    const body = await readBody(request.body, MAX_SUBMISSION, this.cfg.bodyTimeoutMs);
    if (body === "too-large") return json(413, { error: `job exceeds ${MAX_SUBMISSION} bytes` }, { connection: "close" });
    if (body === "stalled" || body === "late") return json(408, { error: BODY_STALLED }, { connection: "close" });
    if (body === "gone") return json(400, { error: "the job did not arrive whole" });
    const spec = parseJob(body, this.cfg.defaultRoute);
    if ("error" in spec) return json(400, spec);
    const now = Date.now() / 1000;
    this.store.expireJobs(now - this.cfg.jobTtl);
    const usage = this.store.jobUsage(keyId);
    if (this.cfg.jobQuota && usage.count >= this.cfg.jobQuota) {
      return json(429, { error: `job quota reached: ${usage.count} jobs kept for this key; delete some or let them expire` }, { "retry-after": "60" });
    }
    if (this.cfg.jobBytes && usage.bytes >= this.cfg.jobBytes) {
      return json(429, { error: `job storage quota reached: ${usage.bytes} bytes of results kept for this key; delete some jobs` }, { "retry-after": "60" });
    }
    if (this.jobsRunning.size >= MAX_RUNNING_JOBS) {
      return json(429, { error: "too many jobs running on this relay; try again shortly" }, { "retry-after": "5" });
    }
    const id = `job_${randomToken(12)}`;
    const req = this.heldJob(spec, info);
    this.store.addJob(id, keyId, { route: req.route, method: req.method, path: req.target }, now);
    const answer = new SharedAnswer(SHARED_MAX_BYTES, this.answerMemory);
    const run = this.produce(answer, req, { route: req.route, sticky: null })
      .then(() => {
        answer.release();
        const error = answer.relayError ?? answer.broken ?? (answer.overflow ? "response too large" : null);
        this.store.finishJob(id, error === null ? "done" : "failed", answer.status, answer.headers, answer.body(), error, Date.now() / 1000);
      })
      .finally(() => this.jobsRunning.delete(id));
    this.jobsRunning.set(id, run);
    return json(202, { id, state: "running", url: `/_relay/jobs/${id}` });
  }

  private heldJob(spec: JobSpec, info: Internal): HeldRequest {
    const headers = withUser(
      [
        ...spec.headers,
        ["content-length", String(spec.body.byteLength)],
        ["x-forwarded-for", info.client],
        ["x-forwarded-proto", info.scheme],
      ],
      spec.route,
      this.cfg.userRoute,
      info.keyId,
    );
    return { method: spec.method, route: spec.route, target: spec.path, headers, body: spec.body, client: info.client };
  }

  // ================================================================================ client WebSockets
  private async clientWebSocket(request: Request, info: Internal): Promise<Response> {
    const route = info.route!;
    const own = new Set(["sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"]);
    const headers = this.openHeaders(request, info).filter(([k]) => !own.has(k));
    this.websockets++;
    let handedOver = false;
    try {
      const tunnel = await this.acquire({ route, sticky: this.sticky(request, info) });
      if (!tunnel) return json(503, { error: "no bridge is connected; try again shortly" }, { "retry-after": "10" });
      if (tunnel.meta.routes.length && !tunnel.meta.routes.includes(route)) {
        return json(404, { error: `unknown route '${route}'` });
      }
      let stream: TStream;
      try {
        stream = tunnel.open("GET", route, info.target!, headers, false, { client: info.client, websocket: true });
      } catch {
        return json(431, { error: "request header fields too large" });
      }
      let head: Head;
      try {
        head = await stream.head;
      } catch (err) {
        const e = err as StreamError;
        const failed = streamFailed(e.code, route);
        return json(failed.status, failed.body, failed.headers);
      }
      if (head.status !== 101) {
        const parts: Uint8Array[] = [];
        let size = 0;
        try {
          let chunk: Uint8Array | null;
          while (size < 65536 && (chunk = await stream.read()) !== null) {
            parts.push(chunk);
            size += chunk.byteLength;
            stream.consumed(chunk.byteLength);
          }
        } catch {
          // what arrived is what we show
        }
        if (!stream.done) stream.reset(ErrorCode.CANCEL, "refused");
        // the same cleaning as every other response: an upstream's refusal sets no relay cookie
        const passed = cleanResponseHeaders(head.status, head.headers, info.prefix ?? "", info.target ?? "/");
        if (passed === null) return json(502, { error: "bridge: invalid response from the upstream" });
        const out = new Headers();
        for (const [k, v] of passed) {
          if (k.toLowerCase() !== "content-length" && !own.has(k.toLowerCase())) out.append(k, v);
        }
        out.set("x-bridge-node", tunnel.meta.node);
        return new Response(NULL_BODY.has(head.status) ? null : concat(parts), { status: head.status, headers: out });
      }
      const pair = new WebSocketPair();
      const [client, server] = Object.values(pair) as [WebSocket, WebSocket];
      server.accept(); // the standard API: see the module comment
      handedOver = true;
      this.splice(server, stream);
      const out = new Headers();
      const proto = headerOf(head.headers, "sec-websocket-protocol");
      if (proto) out.set("sec-websocket-protocol", proto);
      return new Response(null, { status: 101, webSocket: client, headers: out });
    } finally {
      if (!handedOver) this.websockets--;
    }
  }

  /** Carry messages both ways between the client's WebSocket and the stream's records. */
  private splice(server: WebSocket, stream: TStream): void {
    let chain: Promise<void> = Promise.resolve();
    let over = false;
    const finish = (): void => {
      if (over) return;
      over = true;
      this.websockets--;
    };
    const up = (record: Uint8Array | Promise<Uint8Array>, end = false): void => {
      chain = chain
        .then(async () => (stream.localClosed || stream.error ? undefined : stream.write(await record, end)))
        .catch(() => undefined);
    };
    server.addEventListener("message", (ev: MessageEvent) => {
      const data: unknown = ev.data;
      if (typeof data === "string") up(encodeWsRecord(WS_TEXT, utf8(data)));
      else if (data instanceof ArrayBuffer) up(encodeWsRecord(WS_BINARY, new Uint8Array(data.slice(0))));
      else if (ArrayBuffer.isView(data)) {
        up(encodeWsRecord(WS_BINARY, new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength))));
      } else if (data instanceof Blob) up(data.arrayBuffer().then((b) => encodeWsRecord(WS_BINARY, new Uint8Array(b))));
      else console.warn(`client WebSocket message of unexpected type ${Object.prototype.toString.call(data)}`);
    });
    server.addEventListener("close", (ev: CloseEvent) => {
      up(encodeWsClose(ev.code || 1005, ev.reason || ""), true);
      tryClose(server, sendableClose(ev.code || 1000), ev.reason || "");
      finish();
    });
    server.addEventListener("error", () => {
      stream.reset(ErrorCode.CANCEL, "client went away");
      finish();
    });
    const down = async (): Promise<void> => {
      const reader = new WsRecordReader();
      try {
        let chunk: Uint8Array | null;
        while ((chunk = await stream.read()) !== null) {
          stream.consumed(chunk.byteLength);
          for (const [opcode, payload] of reader.feed(chunk)) {
            if (opcode === WS_TEXT) server.send(fromUtf8(payload));
            else if (opcode === WS_BINARY) server.send(payload);
            else if (opcode === WS_CLOSE) {
              const [code, reason] = decodeWsClose(payload);
              tryClose(server, sendableClose(code), reason);
              return;
            }
          }
        }
        tryClose(server, 1011, "upstream ended without closing");
      } catch (err) {
        if (err instanceof StreamError && err.code === ErrorCode.PROTOCOL_ERROR && !stream.error) {
          stream.reset(err.code, err.message);
          tryClose(server, 1002, "bad message from bridge");
        } else {
          if (err instanceof StreamError && !stream.error) stream.reset(err.code, err.message);
          tryClose(server, 1011, "tunnel stream failed");
        }
      } finally {
        finish();
      }
    };
    this.ctx.waitUntil(down());
  }
}

async function drain(stream: TStream): Promise<void> {
  try {
    let chunk: Uint8Array | null;
    while ((chunk = await stream.read()) !== null) stream.consumed(chunk.byteLength);
  } catch {
    // reset: nothing to deliver
  }
}
