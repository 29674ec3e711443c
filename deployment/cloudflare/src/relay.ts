// The Durable Object: one instance ("relay") holds every bridge's WebSocket and every stream.
//
// Bridges are accepted with the Hibernation API (ctx.acceptWebSocket): while nothing is in flight
// the object may be evicted from memory and the bridge's socket stays open; the text heartbeat
// `ping` is answered by setWebSocketAutoResponse without waking it. What must survive that lives in
// the socket's attachment (session, routes, limits, last stream id) and in ctx.storage (health
// timestamps, failed logins). Streams live in memory: an object with a request in flight, or with
// a client WebSocket open (accepted with the standard API so that a client's own "ping" text is
// never auto-answered), is not evicted.
//
// The protocol itself is not here: src/wire/ holds the codec and the connection state machine, sans
// I/O (the same split as bridge/protocol.py and its asyncio layers). This file does the I/O: it
// feeds the bridge's messages to a RelayConnection, sends what it queues, and turns its events into
// HTTP responses and client WebSocket messages.

import { DurableObject } from "cloudflare:workers";
import {
  COOKIE_MAX_AGE,
  COOKIE_NAME,
  Env,
  INTERNAL_HEADER,
  LOGIN_RATE,
  Settings,
  checkKey,
  forwardHeaders,
  headerOf,
  isoTime,
  issueCookie,
  json,
  loginPage,
  statusPage,
  safeNext,
  sameSecret,
  settings,
  stripHopByHop,
  AuthMethod,
} from "./http";
import { streamFailed } from "./failures";
import type { Internal } from "./index";
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
      case "stats": // nothing on this relay publishes STATS (docs/spec/relay.md, status-models-gpus)
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

export class RelayObject extends DurableObject<Env> {
  private readonly cfg: Settings;
  private tunnels = new Map<string, Tunnel>();
  private waiters = new Set<() => void>();
  private inFlight = 0;
  private waiting = 0;
  private websockets = 0;
  private readonly startedAt = Date.now();
  private requests = new Map<string, number>();
  private bodyBytes = { request: 0, response: 0 };
  /** Messages from bridges that reached the object (billed 20:1; auto-answered pings excluded). */
  private messagesIn = 0;

  constructor(ctx: DurableObjectState, env: Env) {
    super(ctx, env);
    this.cfg = settings(env);
    // The heartbeat is answered without waking the object (docs/spec/wire.md section 2).
    ctx.setWebSocketAutoResponse(new WebSocketRequestResponsePair(PING, PONG));
    // Logged on every (re)build: after hibernation the object is rebuilt on the next event.
    console.log(`relay object started with ${ctx.getWebSockets("bridge").length} bridge socket(s)`);
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

  private pick(route: string): Tunnel | null {
    const live = this.allTunnels().filter((t) => t.live);
    const serving = live.filter((t) => t.meta.routes.includes(route));
    const pool = serving.length ? serving : live;
    let best: Tunnel | null = null;
    for (const t of pool) if (best === null || t.conn.openStreams < best.conn.openStreams) best = t;
    return best;
  }

  private notify(): void {
    const ws = [...this.waiters];
    this.waiters.clear();
    for (const w of ws) w();
  }

  /** A bridge for `route`, waiting up to `grace` for one to connect (docs/spec/relay.md section 11.6). */
  private async acquire(route: string): Promise<Tunnel | null> {
    let t = this.pick(route);
    if (t) return t;
    const deadline = Date.now() + this.cfg.graceMs;
    this.waiting++;
    try {
      while ((t = this.pick(route)) === null) {
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
      await this.ctx.storage.put("last_disconnected_at", Date.now());
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
    Object.assign(t.meta, {
      session: randomHex(8),
      node: hello.node || t.meta.client || "bridge",
      routes: hello.routes,
      connectedAt: now,
      info: hello.info,
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
    await this.ctx.storage.put("last_connected_at", now);
    await this.scheduleWatch();
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
      case "proxy":
        if ((request.headers.get("upgrade") ?? "").toLowerCase() === "websocket") return this.clientWebSocket(request, info);
        return this.proxy(request, info);
    }
    return json(400, { error: "unknown kind" });
  }

  async health(): Promise<Record<string, unknown>> {
    const live = this.allTunnels().filter((t) => t.live);
    const [connected, left] = await Promise.all([
      this.ctx.storage.get<number>("last_connected_at"),
      this.ctx.storage.get<number>("last_disconnected_at"),
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
    return {
      ...(await this.health()),
      uptime_s: Math.round((Date.now() - this.startedAt) / 100) / 10,
      bridge_messages_in: this.messagesIn,
      default_route: this.cfg.defaultRoute,
      route_ports: {},
      nodes_detail: this.allTunnels()
        .filter((t) => t.phase === "open")
        .map((t) => ({
          node: t.meta.node,
          session: t.meta.session,
          routes: [...t.meta.routes].sort(),
          connected_since: isoTime(t.meta.connectedAt),
          streams: t.conn.openStreams,
          draining: t.draining,
          info: t.meta.info,
        })),
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
    );
    return lines.join("\n") + "\n";
  }

  private count(route: string, status: number): void {
    const k = `${route}\n${status}`;
    this.requests.set(k, (this.requests.get(k) ?? 0) + 1);
  }

  private async login(request: Request, info: Internal): Promise<Response> {
    const url = new URL(request.url);
    let next = safeNext(url.searchParams.get("next"));
    const storeKey = `login_failures:${info.client}`;
    const now = Date.now();
    const failures = ((await this.ctx.storage.get<number[]>(storeKey)) ?? []).filter((ts) => ts > now - 60_000);
    if (failures.length >= LOGIN_RATE) {
      await request.body?.cancel();
      return json(429, { error: "too many failed logins; wait a minute" }, { "retry-after": "60" });
    }
    const body = await readLimited(request, 8192);
    if (body === null) return json(413, { error: "login form too large" });
    const form = new URLSearchParams(body);
    const key = (form.get("key") ?? "").trim();
    next = safeNext(form.get("next") ?? next);
    const keyId = await checkKey(this.env, key);
    if (keyId === null) {
      failures.push(now);
      await this.ctx.storage.put(storeKey, failures);
      console.warn(`failed login from ${info.client || "?"}`);
      return loginPage(401, next, "That key is not valid.");
    }
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
    const headers = forwardHeaders(request, info.auth as AuthMethod, info.prefix ?? "", info.client, info.scheme);
    if (typeof info.acceptEncoding !== "string") return headers;
    // Cloudflare rewrites Accept-Encoding; the upstream must see what the client can decode,
    // since the body comes back as the upstream encoded it (encodeBody "manual").
    const out = headers.filter(([k]) => k !== "accept-encoding");
    if (info.acceptEncoding) out.splice(0, 0, ["accept-encoding", info.acceptEncoding]);
    return out;
  }

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
    this.inFlight++;
    let finished = false;
    const finish = (status: number): void => {
      if (finished) return;
      finished = true;
      this.inFlight--;
      this.count(route, status);
    };
    try {
      const tunnel = await this.acquire(route);
      if (!tunnel) {
        await request.body?.cancel();
        finish(503);
        return json(503, { error: "no bridge is connected; try again shortly" }, { "retry-after": "10" });
      }
      if (tunnel.meta.routes.length && !tunnel.meta.routes.includes(route)) {
        await request.body?.cancel();
        finish(404);
        return json(404, { error: `unknown route '${route}'` });
      }
      let stream: TStream;
      try {
        stream = tunnel.open(method, route, info.target!, headers, !hasBody, { client: info.client });
      } catch (err) {
        await request.body?.cancel();
        if (err instanceof StreamError) {
          finish(503);
          return json(503, { error: err.reason }, { "retry-after": "10" });
        }
        finish(431);
        return json(431, { error: "request header fields too large" });
      }
      if (hasBody) this.ctx.waitUntil(this.pumpRequest(request.body!, stream));
      let head: Head;
      try {
        head = await stream.head;
      } catch (err) {
        const e = err as StreamError;
        const failed = streamFailed(e.code, route);
        console.warn(`stream ${stream.id} (${method} ${route}) failed before its answer: ${e.code} ${e.reason}`);
        finish(failed.status);
        return json(failed.status, failed.body, failed.headers);
      }
      let status = head.status;
      if (status < 200 || status > 599) {
        stream.reset(ErrorCode.PROTOCOL_ERROR, `status ${status} cannot be relayed here`);
        finish(502);
        return json(502, { error: `bridge: upstream answered ${status}` });
      }
      const out = new Headers();
      for (const [k, v] of stripHopByHop(head.headers)) out.append(k, v);
      const nullBody = NULL_BODY.has(status) || method === "HEAD";
      const self = this;
      const body = new ReadableStream<Uint8Array>(
        {
          async pull(controller) {
            try {
              const chunk = await stream.read();
              if (chunk === null) {
                controller.close();
                finish(status);
                return;
              }
              self.bodyBytes.response += chunk.byteLength;
              controller.enqueue(chunk);
              stream.consumed(chunk.byteLength);
            } catch (err) {
              // a RESET after RESPONSE: break the client's response, never finish it
              console.warn(`stream ${stream.id} (${method} ${route}) cut mid-response: ${(err as Error).message}`);
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
      if (nullBody) {
        this.ctx.waitUntil(drain(stream).finally(() => finish(status)));
        return new Response(null, { status, headers: out });
      }
      // "manual": the bytes are passed as they are (compressed or not), never re-encoded or
      // buffered for compression, so every chunk leaves as soon as it arrives.
      return new Response(body, { status, headers: out, encodeBody: "manual" });
    } catch (err) {
      finish(500);
      throw err;
    }
  }

  /** Send the request body as the bridge's credit allows, counting it against max_body. */
  private async pumpRequest(body: ReadableStream<Uint8Array>, stream: TStream): Promise<void> {
    const reader = body.getReader();
    let total = 0;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          await stream.write(new Uint8Array(0), true);
          return;
        }
        total += value.byteLength;
        this.bodyBytes.request += value.byteLength;
        if (this.cfg.maxBody && total > this.cfg.maxBody) {
          stream.reset(ErrorCode.BODY_TOO_LARGE, `body exceeds ${this.cfg.maxBody} bytes`);
          await reader.cancel();
          return;
        }
        await stream.write(value);
      }
    } catch (err) {
      if (!(err instanceof StreamError)) stream.reset(ErrorCode.CANCEL, "client went away");
      try {
        await reader.cancel();
      } catch {
        // already errored
      }
    }
  }

  // ================================================================================ client WebSockets
  private async clientWebSocket(request: Request, info: Internal): Promise<Response> {
    const route = info.route!;
    const own = new Set(["sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"]);
    const headers = this.openHeaders(request, info).filter(([k]) => !own.has(k));
    this.websockets++;
    let handedOver = false;
    try {
      const tunnel = await this.acquire(route);
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
        const out = new Headers();
        for (const [k, v] of stripHopByHop(head.headers)) {
          if (k.toLowerCase() !== "content-length" && !own.has(k.toLowerCase())) out.append(k, v);
        }
        const status = head.status >= 200 && head.status <= 599 ? head.status : 502;
        return new Response(NULL_BODY.has(status) ? null : concat(parts), { status, headers: out });
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

async function readLimited(request: Request, limit: number): Promise<string | null> {
  if (!request.body) return "";
  const reader = request.body.getReader();
  const parts: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      return null;
    }
    parts.push(value);
  }
  return fromUtf8(concat(parts));
}
