var __defProp = Object.defineProperty;
var __name = (target, value) => __defProp(target, "name", { value, configurable: true });

// src/http.ts
var COOKIE_NAME = "bridge_session";
var COOKIE_MAX_AGE = 7 * 24 * 3600;
var LOGIN_RATE = 10;
var INTERNAL_HEADER = "x-kaggle-bridge-internal";
function num(value, fallback, min, max) {
  const n = value === void 0 || value === "" ? fallback : Number(value);
  if (!Number.isFinite(n) || n < min || n > max) throw new Error(`setting out of range: ${value}`);
  return n;
}
__name(num, "num");
function settings(env) {
  return {
    defaultRoute: env.DEFAULT_ROUTE || "webui",
    graceMs: num(env.GRACE, 30, 0, 3600) * 1e3,
    heartbeat: num(env.HEARTBEAT, 5, 0.05, 3600),
    maxBody: Math.floor(num(env.MAX_BODY, 0, 0, Number.MAX_SAFE_INTEGER)),
    coalesce: num(env.COALESCE, 0.05, 0, 1),
    statsInterval: num(env.STATS_INTERVAL, 60, 0, 3600)
  };
}
__name(settings, "settings");
var HOP_BY_HOP = /* @__PURE__ */ new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade"
]);
function stripHopByHop(headers) {
  const named = /* @__PURE__ */ new Set();
  for (const [k, v] of headers) {
    if (k.toLowerCase() === "connection") for (const t of v.split(",")) named.add(t.trim().toLowerCase());
  }
  return headers.filter(([k]) => !HOP_BY_HOP.has(k.toLowerCase()) && !named.has(k.toLowerCase()));
}
__name(stripHopByHop, "stripHopByHop");
function headerOf(headers, name) {
  const lname = name.toLowerCase();
  for (const [k, v] of headers) if (k.toLowerCase() === lname) return v;
  return void 0;
}
__name(headerOf, "headerOf");
function json(status, body, extra = {}) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", "cache-control": "no-store", ...extra }
  });
}
__name(json, "json");
function resolve(url, defaultRoute) {
  const path = url.pathname;
  const query = url.search;
  if (path.startsWith("/r/")) {
    const rest = path.slice(3);
    const slash = rest.indexOf("/");
    const route = slash < 0 ? rest : rest.slice(0, slash);
    const target = (slash < 0 ? "/" : rest.slice(slash)) + query;
    if (!route || route === "." || route === ".." || route.includes("%")) return null;
    return { route, target, prefix: `/r/${route}` };
  }
  return { route: defaultRoute, target: path + query, prefix: "" };
}
__name(resolve, "resolve");
var enc = new TextEncoder();
async function sha256Hex(text) {
  const digest = await crypto.subtle.digest("SHA-256", enc.encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}
__name(sha256Hex, "sha256Hex");
function sameSecret(a, b) {
  const x = enc.encode(a);
  const y = enc.encode(b);
  let diff = x.byteLength ^ y.byteLength;
  for (let i = 0; i < Math.max(x.byteLength, y.byteLength); i++) diff |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return diff === 0;
}
__name(sameSecret, "sameSecret");
function keyHashes(env) {
  return (env.CLIENT_KEY_HASHES ?? "").split(",").map((h) => h.trim().toLowerCase()).filter((h) => /^[0-9a-f]{64}$/.test(h));
}
__name(keyHashes, "keyHashes");
async function checkKey(env, presented) {
  if (!presented) return null;
  const digest = await sha256Hex(presented);
  let found = null;
  for (const known of keyHashes(env)) if (sameSecret(digest, known)) found = known.slice(0, 16);
  return found;
}
__name(checkKey, "checkKey");
function b64url(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
__name(b64url, "b64url");
async function cookieMac(env, payload) {
  const secret = env.COOKIE_SECRET || `cookie:${env.NODE_TOKEN ?? ""}`;
  const key = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, [
    "sign"
  ]);
  return b64url(await crypto.subtle.sign("HMAC", key, enc.encode(payload)));
}
__name(cookieMac, "cookieMac");
async function issueCookie(env, keyId) {
  const payload = `${keyId}.${Math.floor(Date.now() / 1e3) + COOKIE_MAX_AGE}`;
  return `${payload}.${await cookieMac(env, payload)}`;
}
__name(issueCookie, "issueCookie");
async function verifyCookie(env, value) {
  const parts = value.split(".");
  if (parts.length !== 3) return null;
  const [keyId, expiry, mac] = parts;
  if (!/^\d+$/.test(expiry)) return null;
  if (!sameSecret(mac, await cookieMac(env, `${keyId}.${expiry}`))) return null;
  if (Number(expiry) < Date.now() / 1e3) return null;
  return keyHashes(env).some((h) => h.startsWith(keyId) && keyId.length === 16) ? keyId : null;
}
__name(verifyCookie, "verifyCookie");
function cookieValue(request, name) {
  const header = request.headers.get("cookie");
  if (!header) return null;
  for (const part of header.split(";")) {
    const p = part.trim();
    if (p.startsWith(name + "=")) return p.slice(name.length + 1);
  }
  return null;
}
__name(cookieValue, "cookieValue");
async function authenticate(env, request) {
  const cookie = cookieValue(request, COOKIE_NAME);
  if (cookie && await verifyCookie(env, cookie)) return "cookie";
  const authz = request.headers.get("authorization");
  if (authz && authz.slice(0, 7).toLowerCase() === "bearer " && await checkKey(env, authz.slice(7).trim())) {
    return "bearer";
  }
  const key = request.headers.get("x-bridge-key");
  if (key && await checkKey(env, key.trim())) return "header";
  return null;
}
__name(authenticate, "authenticate");
function deny(request, url) {
  const accept = request.headers.get("accept") ?? "";
  if (request.method === "GET" && accept.includes("text/html") && request.headers.get("upgrade") === null) {
    const next = encodeURIComponent(url.pathname + url.search);
    return new Response(null, {
      status: 303,
      headers: { location: `/_relay/login?next=${next}`, "cache-control": "no-store" }
    });
  }
  return json(
    401,
    { error: "a valid client key is required: Authorization: Bearer <key>, X-Bridge-Key, or log in at /_relay/login" },
    { "www-authenticate": 'Bearer realm="bridge"' }
  );
}
__name(deny, "deny");
var FORWARDED = /* @__PURE__ */ new Set(["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix"]);
function forwardHeaders(request, auth, prefix, client, scheme) {
  const raw = [];
  request.headers.forEach((value, name) => raw.push([name.toLowerCase(), value]));
  const out = [];
  let host = "";
  for (const [name, value] of stripHopByHop(raw)) {
    if (FORWARDED.has(name) || name === "x-bridge-key" || name === INTERNAL_HEADER) continue;
    if (name.startsWith("cf-") || name === "x-real-ip") continue;
    if (name === "authorization" && auth === "bearer") continue;
    let v = value;
    if (name === "cookie") {
      v = v.split(";").map((p) => p.trim()).filter((p) => p && !p.startsWith(COOKIE_NAME + "=")).join("; ");
      if (!v) continue;
    }
    if (name === "host") host = v;
    out.push([name, v]);
  }
  out.push(["x-forwarded-for", client]);
  out.push(["x-forwarded-proto", scheme]);
  if (host) out.push(["x-forwarded-host", host]);
  if (prefix) out.push(["x-forwarded-prefix", prefix]);
  return out;
}
__name(forwardHeaders, "forwardHeaders");
function safeNext(value) {
  if (!value || !value.startsWith("/") || value.startsWith("//") || /[\\\r\n]/.test(value)) return "/";
  return value;
}
__name(safeNext, "safeNext");
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
__name(escapeHtml, "escapeHtml");
function loginPage(status, next, error) {
  const err = error ? `<p class="err">${escapeHtml(error)}</p>` : "";
  const page = `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>Relay login</title>
<style>
body{font-family:system-ui,sans-serif;background:#0f172a;color:#e2e8f0;display:flex;min-height:100vh;
align-items:center;justify-content:center;margin:0}
form{background:#1e293b;padding:2rem 2.5rem;border-radius:12px;width:22rem;box-shadow:0 10px 30px #0008}
h1{font-size:1.3rem;margin:0 0 .3rem} p{color:#94a3b8;font-size:.9rem}
input{width:100%;box-sizing:border-box;padding:.6rem;border-radius:6px;border:1px solid #475569;
background:#0f172a;color:#e2e8f0;font-family:monospace}
button{margin-top:1rem;width:100%;padding:.6rem;border:0;border-radius:6px;background:#6366f1;color:white;
font-size:1rem;cursor:pointer} .err{color:#fca5a5}
</style></head><body>
<form method="post" action="/_relay/login">
<h1>Private LLM relay</h1>
<p>Enter your client key.</p>
${err}
<input type="password" name="key" placeholder="bk_..." autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="${escapeHtml(next)}">
<button type="submit">Log in</button>
</form></body></html>`;
  return new Response(page, {
    status,
    headers: {
      "content-type": "text/html; charset=utf-8",
      "cache-control": "no-store",
      "x-frame-options": "DENY",
      "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
    }
  });
}
__name(loginPage, "loginPage");
function statusPage(status) {
  const nodes = status.nodes_detail ?? [];
  const state = status.node_connected ? '<span class="ok">serving</span>' : '<span class="bad">no bridge connected</span>';
  const rows = nodes.map(
    (n) => `<tr><td>${escapeHtml(String(n.node ?? ""))}<br><span class="muted">since ${escapeHtml(String(n.connected_since ?? ""))}</span></td><td>${n.draining ? '<span class="warn">draining</span>' : '<span class="ok">up</span>'}</td><td>${escapeHtml((n.routes ?? []).join(", "))}</td><td>${Number(n.streams ?? 0)}</td></tr>`
  );
  const table = rows.length ? `<table><tr><th>Node</th><th>State</th><th>Routes</th><th>Streams</th></tr>${rows.join("")}</table>` : '<p class="muted">No bridge is connected. Requests wait for one, then get 503.</p>';
  const tile = /* @__PURE__ */ __name((label, key) => `<div><span class="muted">${label}</span><b>${escapeHtml(String(status[key] ?? 0))}</b></div>`, "tile");
  const tiles = [
    tile("Bridges", "nodes"),
    tile("Requests in flight", "requests_in_flight"),
    tile("Waiting for a bridge", "requests_waiting"),
    tile("WebSockets open", "websockets_open")
  ].join("");
  const page = `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="10">
<title>Relay status</title>
<style>
body{font-family:system-ui,sans-serif;background:#0f172a;color:#e2e8f0;margin:0}
main{max-width:72rem;margin:2rem auto;padding:0 1rem}
.card{background:#1e293b;padding:2rem 2.5rem;border-radius:12px;box-shadow:0 10px 30px #0008}
h1{font-size:1.3rem;margin:0 0 .3rem} p,.muted{color:#94a3b8;font-size:.9rem}
table{border-collapse:collapse;width:100%;margin-top:1rem}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid #334155;font-size:.9rem;vertical-align:top;white-space:nowrap}
th{color:#94a3b8;font-weight:600} .ok{color:#86efac}.bad{color:#fca5a5}.warn{color:#fcd34d}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(10rem,1fr));gap:.8rem;margin-top:1rem}
.grid div{background:#0f172a;border-radius:8px;padding:.7rem}.grid b{display:block;font-size:1.4rem}
a{color:#a5b4fc;white-space:nowrap}
</style></head><body>
<main><div class="card"><h1>Private LLM relay: ${state}</h1>
<p>Version ${escapeHtml(String(status.version ?? ""))}, protocol ${escapeHtml(String(status.protocol ?? ""))}, up ${escapeHtml(String(status.uptime_s ?? ""))} s (Cloudflare).
Last bridge connected at ${escapeHtml(String(status.last_connected_at ?? "never"))}.
<a href="/_relay/status">JSON</a> \xB7 <a href="/_relay/metrics">metrics</a> \xB7 <a href="/">Open WebUI</a> \xB7
<a href="/_relay/logout">log out</a></p>
<div class="grid">${tiles}</div>
${table}</div></main></body></html>`;
  return new Response(page, {
    headers: {
      "content-type": "text/html; charset=utf-8",
      "cache-control": "no-store",
      "x-frame-options": "DENY",
      "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'"
    }
  });
}
__name(statusPage, "statusPage");
function isoTime(ms) {
  if (ms === null || ms === void 0) return null;
  return new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");
}
__name(isoTime, "isoTime");

// src/wire/constants.ts
var VERSION = "0.1.0";
var PROTOCOL_VERSION = 1;
var HEADER_SIZE = 9;
var ABSOLUTE_MAX_PAYLOAD = 16777215;
var DEFAULT_MAX_FRAME = 65536;
var MAX_HEADER_BLOCK = 65536;
var DEFAULT_WINDOW = 262144;
var MAX_WINDOW = 2147483647;
var DEFAULT_MAX_STREAMS = 4096;
var MAX_STREAM_ID = 2147483647;
var MAX_MESSAGE = 1048576;
var MAX_REASON = 1024;
var MAX_METHOD = 32;
var MAX_NODE_NAME = 128;
var HELLO_TIMEOUT = 10;
var HEARTBEAT_MISSES = 3;
var PING = "ping";
var PONG = "pong";
var DEFAULT_RESET_STATUS = 502;
var WS_TEXT = 1;
var WS_BINARY = 2;
var WS_CLOSE = 8;
var WS_RECORD_HEADER = 5;
var MAX_WS_MESSAGE = 16777216;
var MAX_WS_CLOSE_REASON = 123;
var STREAM_FRAMES = /* @__PURE__ */ new Set([
  3 /* OPEN */,
  4 /* RESPONSE */,
  5 /* DATA */,
  6 /* RESET */,
  7 /* WINDOW */
]);
var STATUS_FOR_CODE = /* @__PURE__ */ new Map([
  [5 /* REFUSED_STREAM */, 503],
  [7 /* NO_ROUTE */, 404],
  [8 /* UPSTREAM_UNREACHABLE */, 502],
  [9 /* UPSTREAM_TIMEOUT */, 504],
  [10 /* UPSTREAM_ERROR */, 502],
  [13 /* GOING_AWAY */, 503],
  [14 /* TOO_MANY_STREAMS */, 503],
  [15 /* HEADERS_TOO_LARGE */, 431],
  [16 /* BODY_TOO_LARGE */, 413]
]);

// src/wire/codec.ts
function statusForCode(code) {
  return STATUS_FOR_CODE.get(code) ?? DEFAULT_RESET_STATUS;
}
__name(statusForCode, "statusForCode");
var ProtocolError = class extends Error {
  constructor(message, code = 1 /* PROTOCOL_ERROR */) {
    super(message);
    this.code = code;
  }
  code;
  static {
    __name(this, "ProtocolError");
  }
};
var StreamError = class extends Error {
  constructor(code, reason) {
    super(reason || `stream failed (${code})`);
    this.code = code;
    this.reason = reason;
  }
  code;
  reason;
  static {
    __name(this, "StreamError");
  }
};
var encoder = new TextEncoder();
var decoder = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
var strictDecoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
function utf8(text) {
  return encoder.encode(text);
}
__name(utf8, "utf8");
function fromUtf8(data) {
  return decoder.decode(data);
}
__name(fromUtf8, "fromUtf8");
function encodeFrame(type, flags, streamId, payload) {
  const length = payload ? payload.byteLength : 0;
  if (length > ABSOLUTE_MAX_PAYLOAD) throw new RangeError(`payload of ${length} bytes exceeds the 24-bit length`);
  if (streamId < 0 || streamId > MAX_STREAM_ID) throw new RangeError(`stream id ${streamId} out of range`);
  const out = new Uint8Array(HEADER_SIZE + length);
  const view = new DataView(out.buffer);
  view.setUint32(0, length << 8 | type & 255);
  view.setUint8(4, flags & 255);
  view.setUint32(5, streamId);
  if (payload) out.set(payload, HEADER_SIZE);
  return out;
}
__name(encodeFrame, "encodeFrame");
function parseMessage(message) {
  const total = message.byteLength;
  if (total === 0) throw new ProtocolError("empty binary message");
  const view = new DataView(message.buffer, message.byteOffset, message.byteLength);
  const frames = [];
  let offset = 0;
  while (offset < total) {
    if (total - offset < HEADER_SIZE) throw new ProtocolError("truncated frame header");
    const word = view.getUint32(offset);
    const length = word >>> 8;
    const type = word & 255;
    const flags = view.getUint8(offset + 4);
    const sid = view.getUint32(offset + 5);
    if (sid & 2147483648) throw new ProtocolError("reserved bit set in stream id");
    const start = offset + HEADER_SIZE;
    const end = start + length;
    if (end > total) throw new ProtocolError("frame length runs past the end of the message");
    frames.push({ type, flags, streamId: sid, payload: message.subarray(start, end) });
    offset = end;
  }
  return frames;
}
__name(parseMessage, "parseMessage");
function decodeJson(payload, what) {
  if (payload.byteLength > MAX_HEADER_BLOCK) {
    throw new ProtocolError(`${what} block of ${payload.byteLength} bytes is too large`, 15 /* HEADERS_TOO_LARGE */);
  }
  let value;
  try {
    value = JSON.parse(strictDecoder.decode(payload));
  } catch {
    throw new ProtocolError(`${what} payload is not valid JSON`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ProtocolError(`${what} payload must be a JSON object`);
  }
  return value;
}
__name(decodeJson, "decodeJson");
function encodeJson(body) {
  const data = utf8(JSON.stringify(body));
  if (data.byteLength > MAX_HEADER_BLOCK) throw new RangeError("header block too large");
  return data;
}
__name(encodeJson, "encodeJson");
function parseHeaders(value) {
  if (value === void 0) return [];
  if (!Array.isArray(value)) return null;
  const out = [];
  for (const item of value) {
    if (!Array.isArray(item) || item.length !== 2 || typeof item[0] !== "string" || typeof item[1] !== "string") {
      return null;
    }
    const [name, val] = item;
    if (!name || /[ \t\r\n:]/.test(name) || /[\r\n\0]/.test(val)) return null;
    out.push([name, val]);
  }
  return out;
}
__name(parseHeaders, "parseHeaders");
function u32(value) {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, value >>> 0);
  return out;
}
__name(u32, "u32");
function concat(parts) {
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
__name(concat, "concat");
function cutUtf8(bytes, limit) {
  let end = limit;
  while (end > 0 && (bytes[end] & 192) === 128) end--;
  return bytes.subarray(0, end);
}
__name(cutUtf8, "cutUtf8");
function resetPayload(code, reason) {
  let bytes = utf8(reason);
  if (bytes.byteLength > MAX_REASON) bytes = cutUtf8(bytes, MAX_REASON);
  return concat([u32(code), bytes]);
}
__name(resetPayload, "resetPayload");
function encodeWsRecord(opcode, payload) {
  const out = new Uint8Array(WS_RECORD_HEADER + payload.byteLength);
  const view = new DataView(out.buffer);
  view.setUint8(0, opcode);
  view.setUint32(1, payload.byteLength);
  out.set(payload, WS_RECORD_HEADER);
  return out;
}
__name(encodeWsRecord, "encodeWsRecord");
function encodeWsClose(code, reason) {
  let text = utf8(reason);
  if (text.byteLength > MAX_WS_CLOSE_REASON) text = cutUtf8(text, MAX_WS_CLOSE_REASON);
  const payload = new Uint8Array(2 + text.byteLength);
  new DataView(payload.buffer).setUint16(0, code);
  payload.set(text, 2);
  return encodeWsRecord(WS_CLOSE, payload);
}
__name(encodeWsClose, "encodeWsClose");
function decodeWsClose(payload) {
  if (payload.byteLength < 2) return [1005, ""];
  const code = new DataView(payload.buffer, payload.byteOffset, 2).getUint16(0);
  return [code, fromUtf8(payload.subarray(2))];
}
__name(decodeWsClose, "decodeWsClose");
var WsRecordReader = class {
  static {
    __name(this, "WsRecordReader");
  }
  buffer = new Uint8Array(0);
  get pending() {
    return this.buffer.byteLength;
  }
  feed(data) {
    this.buffer = this.buffer.byteLength ? concat([this.buffer, data]) : data.slice();
    const out = [];
    while (this.buffer.byteLength >= WS_RECORD_HEADER) {
      const view = new DataView(this.buffer.buffer, this.buffer.byteOffset, this.buffer.byteLength);
      const opcode = view.getUint8(0);
      const length = view.getUint32(1);
      if (opcode !== WS_TEXT && opcode !== WS_BINARY && opcode !== WS_CLOSE) {
        throw new StreamError(1 /* PROTOCOL_ERROR */, `unknown WebSocket record opcode ${opcode}`);
      }
      if (length > MAX_WS_MESSAGE) {
        throw new StreamError(16 /* BODY_TOO_LARGE */, `WebSocket message of ${length} bytes is too large`);
      }
      const end = WS_RECORD_HEADER + length;
      if (this.buffer.byteLength < end) break;
      out.push([opcode, this.buffer.slice(WS_RECORD_HEADER, end)]);
      this.buffer = this.buffer.subarray(end);
    }
    return out;
  }
};
var TCHAR = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
function validMethod(method) {
  return method.length <= MAX_METHOD && TCHAR.test(method);
}
__name(validMethod, "validMethod");

// src/relay.ts
import { DurableObject } from "cloudflare:workers";

// src/failures.ts
function streamFailed(code, route) {
  const status = statusForCode(code);
  const name = JSON.stringify(route).slice(1, -1);
  const upstream = `the upstream of route '${name}'`;
  const retry = "try again shortly";
  const words = {
    [7 /* NO_ROUTE */]: `unknown route '${name}'`,
    [8 /* UPSTREAM_UNREACHABLE */]: `the bridge could not reach ${upstream} (unreachable: is it running?); ${retry}`,
    [9 /* UPSTREAM_TIMEOUT */]: `${upstream} did not answer in time; ${retry}`,
    [10 /* UPSTREAM_ERROR */]: `${upstream} failed before answering; ${retry}`,
    [5 /* REFUSED_STREAM */]: `the bridge is shutting down or restarting; ${retry}`,
    [13 /* GOING_AWAY */]: `the bridge is shutting down or restarting; ${retry}`,
    [14 /* TOO_MANY_STREAMS */]: `the bridge is serving as many requests as it can; ${retry}`,
    [15 /* HEADERS_TOO_LARGE */]: "request header fields too large",
    [16 /* BODY_TOO_LARGE */]: "request body too large"
  };
  const error = words[code] ?? `the bridge could not complete the request (error code ${code}); ${retry}`;
  return { status, body: { error, code }, headers: status === 503 ? { "retry-after": "5" } : {} };
}
__name(streamFailed, "streamFailed");

// src/wire/connection.ts
function newWireState() {
  return {
    phase: "hello",
    peerWindow: DEFAULT_WINDOW,
    peerMaxFrame: DEFAULT_MAX_FRAME,
    lastStreamId: 0,
    goawaySent: false,
    goawayReceived: false
  };
}
__name(newWireState, "newWireState");
var HELLO_KEYS = /* @__PURE__ */ new Set(["version", "token", "node", "routes", "window", "max_frame"]);
var RelayConnection = class {
  constructor(state = newWireState(), limits = {}) {
    this.state = state;
    this.localWindow = limits.window ?? DEFAULT_WINDOW;
    this.localMaxFrame = limits.maxFrame ?? DEFAULT_MAX_FRAME;
    this.maxStreams = limits.maxStreams ?? DEFAULT_MAX_STREAMS;
    if (!(this.localWindow > 0 && this.localWindow <= MAX_WINDOW)) throw new RangeError("window out of range");
    if (!(this.localMaxFrame > 0 && this.localMaxFrame <= ABSOLUTE_MAX_PAYLOAD)) {
      throw new RangeError("max_frame out of range");
    }
    this.helloSeen = state.phase !== "hello";
  }
  state;
  static {
    __name(this, "RelayConnection");
  }
  localWindow;
  localMaxFrame;
  maxStreams;
  streams = /* @__PURE__ */ new Map();
  out = [];
  changed = false;
  helloSeen;
  /** Whether `state` changed since the last call (persist it then). */
  takeChanged() {
    const changed = this.changed;
    this.changed = false;
    return changed;
  }
  get established() {
    return this.state.phase === "open";
  }
  /** Open streams, by id (read only: the state machine owns them). */
  get openStreams() {
    return this.streams.size;
  }
  isOpen(streamId) {
    return this.streams.has(streamId);
  }
  // output --------------------------------------------------------------------------------------
  get hasOutput() {
    return this.out.length > 0;
  }
  /** Queued frames, coalesced into binary WebSocket messages of at most MAX_MESSAGE bytes. */
  dataToSend() {
    if (this.out.length === 0) return [];
    const frames = this.out;
    this.out = [];
    const messages = [];
    let batch = [];
    let size = 0;
    const emit = /* @__PURE__ */ __name(() => {
      const message = new Uint8Array(size);
      let at = 0;
      for (const f of batch) {
        message.set(f, at);
        at += f.byteLength;
      }
      messages.push(message);
      batch = [];
      size = 0;
    }, "emit");
    for (const f of frames) {
      if (batch.length && size + f.byteLength > MAX_MESSAGE) emit();
      batch.push(f);
      size += f.byteLength;
    }
    emit();
    return messages;
  }
  queue(type, flags, streamId, payload) {
    this.out.push(encodeFrame(type, flags, streamId, payload));
  }
  // handshake -----------------------------------------------------------------------------------
  /** Answer a "hello" event with WELCOME; streams may be opened from now on. `extra` adds keys. */
  accept(session, heartbeat, extra = {}) {
    this.queue(
      2 /* WELCOME */,
      0,
      0,
      encodeJson({
        version: PROTOCOL_VERSION,
        session,
        heartbeat,
        window: this.localWindow,
        max_frame: this.localMaxFrame,
        max_streams: this.maxStreams,
        ...extra
      })
    );
    this.state.phase = "open";
    this.changed = true;
  }
  /** Refuse a "hello" event: GOAWAY with `code`; close the WebSocket after sending it. */
  reject(code, reason) {
    this.sendGoaway(code, reason);
    this.state.phase = "closed";
    this.changed = true;
  }
  // streams -------------------------------------------------------------------------------------
  /** Queue OPEN for a new stream and return its id. Throws StreamError(REFUSED_STREAM) when no
   * stream may be opened (no session, GOAWAY either way, ids exhausted) and RangeError when the
   * head exceeds the header block limit. */
  openStream(method, route, target, headers, endStream, extra = {}) {
    if (!this.established) throw new StreamError(5 /* REFUSED_STREAM */, "no session");
    if (this.state.goawaySent || this.state.goawayReceived) {
      throw new StreamError(5 /* REFUSED_STREAM */, "connection is going away");
    }
    const sid = this.state.lastStreamId + 1;
    if (sid > MAX_STREAM_ID) throw new StreamError(5 /* REFUSED_STREAM */, "stream ids exhausted");
    const payload = encodeJson({ method, route, target, headers, ...extra });
    this.queue(3 /* OPEN */, endStream ? 1 /* END_STREAM */ : 0, sid, payload);
    this.state.lastStreamId = sid;
    this.changed = true;
    this.streams.set(sid, {
      sendWindow: this.state.peerWindow,
      recvWindow: this.localWindow,
      recvUnacked: 0,
      localClosed: endStream,
      remoteClosed: false,
      responseSeen: false
    });
    return sid;
  }
  /** How many DATA bytes may be sent on the stream now (0: wait for a "window" event). */
  sendWindow(streamId) {
    const s = this.streams.get(streamId);
    return s && !s.localClosed ? s.sendWindow : 0;
  }
  /** Whether this side already sent END_STREAM (or the stream is gone). */
  localClosed(streamId) {
    const s = this.streams.get(streamId);
    return s === void 0 || s.localClosed;
  }
  /** Queue DATA, split at the bridge's max_frame. `data` must fit sendWindow(streamId). */
  sendData(streamId, data, endStream = false) {
    const s = this.streams.get(streamId);
    if (!s) throw new StreamError(6 /* CANCEL */, `stream ${streamId} is not open`);
    if (s.localClosed) throw new StreamError(1 /* PROTOCOL_ERROR */, "stream already ended");
    if (data.byteLength > s.sendWindow) throw new RangeError("DATA beyond the send window");
    s.sendWindow -= data.byteLength;
    const step = this.state.peerMaxFrame;
    for (let at = 0; at < data.byteLength; at += step) {
      const last = at + step >= data.byteLength;
      this.queue(5 /* DATA */, endStream && last ? 1 /* END_STREAM */ : 0, streamId, data.subarray(at, at + step));
    }
    if (data.byteLength === 0 && endStream) this.queue(5 /* DATA */, 1 /* END_STREAM */, streamId);
    if (endStream) {
      s.localClosed = true;
      this.maybeForget(streamId, s);
    }
  }
  /** Return credit for `n` DATA bytes passed on; one WINDOW once half the window was consumed. */
  acknowledge(streamId, n) {
    const s = this.streams.get(streamId);
    if (!s || s.remoteClosed || n <= 0) return;
    s.recvUnacked += n;
    if (s.recvUnacked >= this.localWindow / 2) {
      const increment = s.recvUnacked;
      s.recvUnacked = 0;
      s.recvWindow += increment;
      this.queue(7 /* WINDOW */, 0, streamId, u32(increment));
    }
  }
  /** Abort a stream both ways and forget it; false (nothing sent) when it is already gone. */
  sendReset(streamId, code, reason = "") {
    if (!this.streams.delete(streamId)) return false;
    this.queue(6 /* RESET */, 0, streamId, resetPayload(code, reason));
    return true;
  }
  /** No new streams from now on (a drain when `code` is NO_ERROR, else a fatal error). */
  sendGoaway(code, reason = "") {
    this.state.goawaySent = true;
    this.changed = true;
    const body = { code, reason: reason.slice(0, MAX_REASON), last_stream_id: this.state.lastStreamId };
    this.queue(8 /* GOAWAY */, 0, 0, encodeJson(body));
  }
  /** Forget every stream (the connection is over); returns their ids. */
  dropStreams() {
    const ids = [...this.streams.keys()];
    this.streams.clear();
    return ids;
  }
  // input ---------------------------------------------------------------------------------------
  /** Process one binary WebSocket message; the events it carried, in order. Throws ProtocolError. */
  receive(message) {
    const events = [];
    for (const frame of parseMessage(message)) {
      const event = this.handle(frame);
      if (event) events.push(event);
    }
    return events;
  }
  handle(frame) {
    const t = frame.type;
    if (!this.helloSeen && t !== 1 /* HELLO */ && t !== 8 /* GOAWAY */) {
      throw new ProtocolError("expected HELLO");
    }
    if (!this.established && t !== 1 /* HELLO */ && t !== 2 /* WELCOME */ && t !== 8 /* GOAWAY */) {
      throw new ProtocolError(`frame type ${t} before the handshake completed`);
    }
    if (t === 9 /* STATS */) {
      if (frame.streamId !== 0) throw new ProtocolError("STATS must be on stream 0");
      return { event: "stats", body: decodeJson(frame.payload, "STATS") };
    }
    if (t === 1 /* HELLO */ || t === 2 /* WELCOME */ || t === 8 /* GOAWAY */) {
      if (frame.streamId !== 0) throw new ProtocolError(`frame type ${t} must be on stream 0`);
      if (t === 1 /* HELLO */) return this.onHello(frame);
      if (t === 2 /* WELCOME */) throw new ProtocolError("a relay must not receive WELCOME");
      return this.onGoaway(frame);
    }
    if (!STREAM_FRAMES.has(t)) return null;
    if (frame.streamId === 0) throw new ProtocolError(`frame type ${t} must not be on stream 0`);
    switch (t) {
      case 3 /* OPEN */:
        throw new ProtocolError("a relay must not receive OPEN");
      case 4 /* RESPONSE */:
        return this.onResponse(frame);
      case 5 /* DATA */:
        return this.onData(frame);
      case 6 /* RESET */:
        return this.onReset(frame);
      default:
        return this.onWindow(frame);
    }
  }
  onHello(frame) {
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
      throw new ProtocolError("HELLO: window out of range", 3 /* FLOW_CONTROL_ERROR */);
    }
    if (typeof maxFrame !== "number" || !Number.isInteger(maxFrame) || maxFrame <= 0 || maxFrame > ABSOLUTE_MAX_PAYLOAD) {
      throw new ProtocolError("HELLO: max_frame out of range", 4 /* FRAME_TOO_LARGE */);
    }
    const token = body.token ?? "";
    const node = body.node ?? "";
    if (typeof token !== "string" || typeof node !== "string") throw new ProtocolError("HELLO: token and node must be strings");
    this.state.peerWindow = window;
    this.state.peerMaxFrame = Math.min(maxFrame, MAX_MESSAGE - HEADER_SIZE);
    this.changed = true;
    const info = {};
    for (const [k, v] of Object.entries(body)) if (!HELLO_KEYS.has(k)) info[k] = v;
    return { event: "hello", version, token, node: node.slice(0, MAX_NODE_NAME), routes, info };
  }
  onGoaway(frame) {
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
  onResponse(frame) {
    const s = this.streams.get(frame.streamId);
    if (!s) return this.unknownStream(frame);
    const body = decodeJson(frame.payload, "RESPONSE");
    const status = body.status;
    if (typeof status !== "number" || !Number.isInteger(status) || status < 100 || status > 999) {
      return this.streamError(frame.streamId, 1 /* PROTOCOL_ERROR */, "RESPONSE: invalid status");
    }
    const headers = parseHeaders(body.headers);
    if (headers === null) return this.streamError(frame.streamId, 1 /* PROTOCOL_ERROR */, "RESPONSE: invalid headers");
    if (s.responseSeen) return this.streamError(frame.streamId, 1 /* PROTOCOL_ERROR */, "second RESPONSE");
    s.responseSeen = true;
    const endStream = (frame.flags & 1 /* END_STREAM */) !== 0;
    if (endStream) {
      s.remoteClosed = true;
      this.maybeForget(frame.streamId, s);
    }
    return { event: "response", streamId: frame.streamId, status, headers, endStream };
  }
  onData(frame) {
    const s = this.streams.get(frame.streamId);
    if (!s) return this.unknownStream(frame);
    const sid = frame.streamId;
    if (s.remoteClosed) return this.streamError(sid, 1 /* PROTOCOL_ERROR */, "DATA after END_STREAM");
    if (!s.responseSeen) return this.streamError(sid, 1 /* PROTOCOL_ERROR */, "DATA before RESPONSE");
    const size = frame.payload.byteLength;
    if (size > this.localMaxFrame) {
      return this.streamError(sid, 4 /* FRAME_TOO_LARGE */, `DATA of ${size} bytes exceeds max_frame`);
    }
    if (size > s.recvWindow) return this.streamError(sid, 3 /* FLOW_CONTROL_ERROR */, "DATA beyond the flow-control window");
    s.recvWindow -= size;
    const endStream = (frame.flags & 1 /* END_STREAM */) !== 0;
    if (endStream) {
      s.remoteClosed = true;
      this.maybeForget(sid, s);
    }
    return { event: "data", streamId: sid, data: frame.payload.slice(), endStream };
  }
  onReset(frame) {
    if (frame.payload.byteLength < 4) throw new ProtocolError("RESET payload shorter than 4 bytes");
    const code = new DataView(frame.payload.buffer, frame.payload.byteOffset, 4).getUint32(0);
    if (!this.streams.delete(frame.streamId)) return null;
    return { event: "reset", streamId: frame.streamId, code, reason: fromUtf8(frame.payload.subarray(4)), remote: true };
  }
  onWindow(frame) {
    if (frame.payload.byteLength !== 4) throw new ProtocolError("WINDOW payload must be 4 bytes");
    const increment = new DataView(frame.payload.buffer, frame.payload.byteOffset, 4).getUint32(0);
    const s = this.streams.get(frame.streamId);
    if (!s) return null;
    if (increment === 0 || s.sendWindow + increment > MAX_WINDOW) {
      return this.streamError(frame.streamId, 3 /* FLOW_CONTROL_ERROR */, "bad WINDOW increment");
    }
    s.sendWindow += increment;
    return { event: "window", streamId: frame.streamId, increment };
  }
  // helpers -------------------------------------------------------------------------------------
  unknownStream(frame) {
    if (frame.streamId > this.state.lastStreamId) {
      throw new ProtocolError(`frame type ${frame.type} on stream ${frame.streamId} that was never opened`);
    }
    return null;
  }
  streamError(streamId, code, reason) {
    this.streams.delete(streamId);
    this.queue(6 /* RESET */, 0, streamId, resetPayload(code, reason));
    return { event: "reset", streamId, code, reason, remote: false };
  }
  maybeForget(streamId, s) {
    if (s.localClosed && s.remoteClosed) this.streams.delete(streamId);
  }
};

// src/relay.ts
var END = /* @__PURE__ */ Symbol("end");
var NULL_BODY = /* @__PURE__ */ new Set([101, 204, 205, 304]);
var HELLO_TIMEOUT_MS = HELLO_TIMEOUT * 1e3;
function randomHex(bytes) {
  return [...crypto.getRandomValues(new Uint8Array(bytes))].map((b) => b.toString(16).padStart(2, "0")).join("");
}
__name(randomHex, "randomHex");
var TStream = class {
  constructor(tunnel, id) {
    this.tunnel = tunnel;
    this.id = id;
    this.head = new Promise((res, rej) => {
      this.resolveHead = res;
      this.rejectHead = rej;
    });
    this.head.catch(() => void 0);
  }
  tunnel;
  id;
  static {
    __name(this, "TStream");
  }
  error = null;
  head;
  resolveHead;
  rejectHead;
  inbox = [];
  readable = null;
  credit = null;
  bytesIn = 0;
  // from the tunnel ----------------------------------------------------------------------------
  onHead(head) {
    this.resolveHead(head);
    if (head.end) this.push(END);
  }
  push(item) {
    this.inbox.push(item);
    this.wakeReader();
  }
  fail(error) {
    if (this.error === null) this.error = error;
    this.rejectHead(error);
    this.wakeReader();
    this.wakeWriter();
  }
  wakeWriter() {
    const w = this.credit;
    this.credit = null;
    w?.();
  }
  wakeReader() {
    const r = this.readable;
    this.readable = null;
    r?.();
  }
  /** Over: reset, or ended both ways (the connection forgot it). */
  get done() {
    return this.error !== null || !this.tunnel.conn.isOpen(this.id);
  }
  get localClosed() {
    return this.tunnel.conn.localClosed(this.id);
  }
  // for the consumer ---------------------------------------------------------------------------
  /** The next body chunk, or null once the bridge ended its side. Throws StreamError on a reset.
   * Call consumed(n) once the chunk was passed on: that returns the credit. */
  async read() {
    while (this.inbox.length === 0) {
      if (this.error) throw this.error;
      await new Promise((res) => this.readable = res);
    }
    const item = this.inbox.shift();
    if (item === END) return null;
    this.bytesIn += item.byteLength;
    return item;
  }
  consumed(n) {
    if (this.error) return;
    this.tunnel.conn.acknowledge(this.id, n);
    this.tunnel.schedule();
  }
  /** Send body bytes as the bridge's credit allows; `end` sends END_STREAM after them. */
  async write(data, end = false) {
    const conn = this.tunnel.conn;
    let view = data;
    for (; ; ) {
      if (this.error) throw this.error;
      if (conn.localClosed(this.id)) throw new StreamError(1 /* PROTOCOL_ERROR */, "stream already ended");
      if (view.byteLength === 0) {
        if (end) {
          this.tunnel.send(() => conn.sendData(this.id, view, true));
          this.tunnel.forgetIfDone(this.id);
        }
        return;
      }
      const window = conn.sendWindow(this.id);
      if (window <= 0) {
        await new Promise((res) => this.credit = res);
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
  reset(code, reason) {
    if (this.error) return;
    this.tunnel.send(() => this.tunnel.conn.sendReset(this.id, code, reason));
    this.tunnel.streams.delete(this.id);
    this.fail(new StreamError(code, reason));
  }
};
var Tunnel = class {
  constructor(ws, meta) {
    this.ws = ws;
    this.meta = meta;
    this.conn = new RelayConnection(meta.wire);
  }
  ws;
  meta;
  static {
    __name(this, "Tunnel");
  }
  conn;
  streams = /* @__PURE__ */ new Map();
  scheduled = false;
  closed = false;
  /** When the last message that reached this object arrived (0: none since it was rebuilt). */
  lastRx = 0;
  save() {
    this.conn.takeChanged();
    this.ws.serializeAttachment(this.meta);
  }
  /** Persist the protocol state if it changed (the attachment survives hibernation). */
  saveIfChanged() {
    if (this.conn.takeChanged()) this.ws.serializeAttachment(this.meta);
  }
  get phase() {
    return this.meta.wire.phase;
  }
  get draining() {
    return this.meta.wire.goawayReceived;
  }
  get live() {
    return !this.closed && this.phase === "open" && !this.draining;
  }
  // output ------------------------------------------------------------------------------------
  /** Run `op` on the connection, then send what it queued (at the end of this turn). */
  send(op) {
    const result = op();
    this.schedule();
    return result;
  }
  schedule() {
    if (this.closed || this.scheduled || !this.conn.hasOutput) return;
    this.scheduled = true;
    queueMicrotask(() => this.flush());
  }
  flush() {
    this.scheduled = false;
    for (const message of this.conn.dataToSend()) {
      if (this.closed) return;
      try {
        this.ws.send(message);
      } catch {
      }
    }
  }
  // streams -------------------------------------------------------------------------------------
  /** Open a stream (throws StreamError when the connection takes no more, RangeError when the
   * head is too large). */
  open(method, route, target, headers, end, extra) {
    const sid = this.send(() => this.conn.openStream(method, route, target, headers, end, extra));
    this.saveIfChanged();
    const stream = new TStream(this, sid);
    this.streams.set(sid, stream);
    return stream;
  }
  /** Fail every stream (the connection is over). */
  teardown(reason) {
    if (this.closed) return;
    this.flush();
    this.closed = true;
    this.conn.dropStreams();
    for (const s of this.streams.values()) s.fail(new StreamError(13 /* GOING_AWAY */, `tunnel closed: ${reason}`));
    this.streams.clear();
  }
  /** Pass an event of an established connection to its stream. */
  dispatch(event) {
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
      case "stats":
      // nothing on this relay publishes STATS (docs/spec/relay.md, status-models-gpus)
      case "hello":
        return;
    }
  }
  /** Drop the stream from the map once the connection has forgotten it (ended both ways). */
  forgetIfDone(streamId) {
    if (!this.conn.isOpen(streamId)) this.streams.delete(streamId);
  }
};
function sendableClose(code) {
  if ([1e3, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011].includes(code) || code >= 3e3 && code < 5e3) {
    return code;
  }
  return code === 1006 || code === 1015 ? 1011 : 1e3;
}
__name(sendableClose, "sendableClose");
function tryClose(ws, code, reason = "") {
  try {
    ws.close(code, reason.slice(0, 120));
  } catch {
  }
}
__name(tryClose, "tryClose");
var RelayObject = class extends DurableObject {
  static {
    __name(this, "RelayObject");
  }
  cfg;
  tunnels = /* @__PURE__ */ new Map();
  waiters = /* @__PURE__ */ new Set();
  inFlight = 0;
  waiting = 0;
  websockets = 0;
  startedAt = Date.now();
  requests = /* @__PURE__ */ new Map();
  bodyBytes = { request: 0, response: 0 };
  /** Messages from bridges that reached the object (billed 20:1; auto-answered pings excluded). */
  messagesIn = 0;
  constructor(ctx, env) {
    super(ctx, env);
    this.cfg = settings(env);
    ctx.setWebSocketAutoResponse(new WebSocketRequestResponsePair(PING, PONG));
    console.log(`relay object started with ${ctx.getWebSockets("bridge").length} bridge socket(s)`);
  }
  // ================================================================================ tunnels
  tunnelOf(ws) {
    const meta = ws.deserializeAttachment();
    if (!meta || typeof meta.cid !== "string" || !meta.wire || meta.wire.phase === "closed") return null;
    let t = this.tunnels.get(meta.cid);
    if (!t) {
      t = new Tunnel(ws, meta);
      this.tunnels.set(meta.cid, t);
    }
    return t;
  }
  allTunnels() {
    for (const ws of this.ctx.getWebSockets("bridge")) this.tunnelOf(ws);
    return [...this.tunnels.values()].filter((t) => !t.closed);
  }
  pick(route) {
    const live = this.allTunnels().filter((t) => t.live);
    const serving = live.filter((t) => t.meta.routes.includes(route));
    const pool = serving.length ? serving : live;
    let best = null;
    for (const t of pool) if (best === null || t.conn.openStreams < best.conn.openStreams) best = t;
    return best;
  }
  notify() {
    const ws = [...this.waiters];
    this.waiters.clear();
    for (const w of ws) w();
  }
  /** A bridge for `route`, waiting up to `grace` for one to connect (docs/spec/relay.md section 11.6). */
  async acquire(route) {
    let t = this.pick(route);
    if (t) return t;
    const deadline = Date.now() + this.cfg.graceMs;
    this.waiting++;
    try {
      while ((t = this.pick(route)) === null) {
        const left = deadline - Date.now();
        if (left <= 0) return null;
        await new Promise((res) => {
          const done = /* @__PURE__ */ __name(() => {
            clearTimeout(timer);
            this.waiters.delete(done);
            res();
          }, "done");
          const timer = setTimeout(done, left);
          this.waiters.add(done);
        });
      }
      return t;
    } finally {
      this.waiting--;
    }
  }
  async scheduleWatch() {
    let next = Infinity;
    for (const t of this.allTunnels()) {
      next = Math.min(
        next,
        t.phase === "hello" ? t.meta.acceptedAt + HELLO_TIMEOUT_MS : this.lastSeen(t) + this.deadAfterMs
      );
    }
    if (next === Infinity) return;
    const current = await this.ctx.storage.getAlarm();
    if (current === null || current > next + 50) await this.ctx.storage.setAlarm(next + 50);
  }
  lastSeen(t) {
    let seen = Math.max(t.lastRx, t.meta.connectedAt || t.meta.acceptedAt);
    try {
      const auto = this.ctx.getWebSocketAutoResponseTimestamp(t.ws);
      if (auto) seen = Math.max(seen, auto.getTime());
    } catch {
    }
    return seen;
  }
  /** The watchdog: HELLO timeout (close 1008) and heartbeat timeout (close 1011). */
  async alarm() {
    const now = Date.now();
    for (const t of this.allTunnels()) {
      if (t.phase === "hello" && now - t.meta.acceptedAt >= HELLO_TIMEOUT_MS) {
        console.warn(`bridge from ${t.meta.client || "?"} sent no HELLO within ${HELLO_TIMEOUT} s`);
        tryClose(t.ws, 1008 /* POLICY_VIOLATION */, "no HELLO");
        await this.endTunnel(t, "no HELLO");
      } else if (t.phase === "open" && now - this.lastSeen(t) > this.deadAfterMs) {
        console.warn(`bridge ${t.meta.node} silent for ${this.deadAfterMs / 1e3} s: closing its link`);
        tryClose(t.ws, 1011 /* INTERNAL_ERROR */, "heartbeat timeout");
        await this.endTunnel(t, "heartbeat timeout");
      }
    }
    await this.scheduleWatch();
  }
  /** Seconds without any message after which a bridge's link is dead (3 heartbeats), in ms. */
  get deadAfterMs() {
    return this.cfg.heartbeat * HEARTBEAT_MISSES * 1e3;
  }
  async endTunnel(t, reason) {
    if (t.closed) return;
    const wasOpen = t.phase === "open";
    t.teardown(reason);
    t.meta.wire.phase = "closed";
    try {
      t.save();
    } catch {
    }
    this.tunnels.delete(t.meta.cid);
    if (wasOpen) {
      console.log(`bridge ${t.meta.node} disconnected (${reason})`);
      await this.ctx.storage.put("last_disconnected_at", Date.now());
    }
    this.notify();
  }
  async connectionError(t, err) {
    console.warn(`bridge ${t.meta.node || t.meta.client || "?"} broke the protocol: ${err.message}`);
    t.conn.sendGoaway(err.code, err.message);
    t.flush();
    tryClose(t.ws, 1002 /* PROTOCOL_ERROR */, "protocol error");
    await this.endTunnel(t, `protocol error: ${err.message}`);
  }
  acceptBridge(info) {
    const pair = new WebSocketPair();
    const [client, server] = Object.values(pair);
    this.ctx.acceptWebSocket(server, ["bridge"]);
    const meta = {
      cid: randomHex(8),
      acceptedAt: Date.now(),
      client: info.client,
      session: "",
      node: "",
      routes: [],
      connectedAt: 0,
      info: {},
      wire: newWireState()
    };
    server.serializeAttachment(meta);
    this.tunnels.set(meta.cid, new Tunnel(server, meta));
    this.ctx.waitUntil(this.scheduleWatch());
    return new Response(null, { status: 101, webSocket: client });
  }
  /** A bridge said HELLO (the connection checked its shape): check version and node token,
   * then WELCOME it or refuse it with GOAWAY (docs/spec/wire.md section 5). */
  async onHello(t, hello) {
    const refuse = /* @__PURE__ */ __name(async (code, reason, close) => {
      t.conn.reject(code, reason);
      t.flush();
      tryClose(t.ws, close, reason);
      await this.endTunnel(t, reason);
    }, "refuse");
    if (hello.version !== PROTOCOL_VERSION) {
      await refuse(12 /* UNSUPPORTED_VERSION */, `relay speaks version ${PROTOCOL_VERSION}`, 1002 /* PROTOCOL_ERROR */);
      return;
    }
    const expected = this.env.NODE_TOKEN ?? "";
    if (!expected || !sameSecret(hello.token, expected)) {
      console.warn(`bridge from ${t.meta.client || "?"} refused: wrong node token`);
      await refuse(11 /* UNAUTHORIZED */, "wrong node token", 4401 /* UNAUTHORIZED */);
      return;
    }
    const now = Date.now();
    Object.assign(t.meta, {
      session: randomHex(8),
      node: hello.node || t.meta.client || "bridge",
      routes: hello.routes,
      connectedAt: now,
      info: hello.info
    });
    t.conn.accept(t.meta.session, this.cfg.heartbeat, {
      // Extra key (ignored by bridges that do not know it): how long the bridge may hold
      // response frames to send them in fewer WebSocket messages; each message the bridge
      // sends is billed (20 messages = 1 Durable Object request).
      coalesce: this.cfg.coalesce,
      // Extra key: the shortest interval between the bridge's STATS samples; each one wakes the
      // object and is a billed message.
      stats_interval: this.cfg.statsInterval
    });
    t.save();
    t.flush();
    console.log(`bridge ${t.meta.node} connected from ${t.meta.client || "?"} with routes ${t.meta.routes.join(",") || "-"}`);
    this.notify();
    await this.ctx.storage.put("last_connected_at", now);
    await this.scheduleWatch();
  }
  // ================================================================================ hibernation handlers
  async webSocketMessage(ws, message) {
    const t = this.tunnelOf(ws);
    if (!t || t.closed) return;
    t.lastRx = Date.now();
    this.messagesIn++;
    if (typeof message === "string") {
      if (message === PING) ws.send(PONG);
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
      t.schedule();
      if (t.draining) this.notify();
    } catch (err) {
      if (err instanceof ProtocolError) await this.connectionError(t, err);
      else throw err;
    }
  }
  async webSocketClose(ws, code) {
    const t = this.tunnelOf(ws);
    tryClose(ws, code === 1005 || code === 1006 ? 1e3 /* NORMAL */ : sendableClose(code));
    if (t) await this.endTunnel(t, `closed by the bridge (${code})`);
  }
  async webSocketError(ws) {
    const t = this.tunnelOf(ws);
    if (t) await this.endTunnel(t, "socket error");
  }
  // ================================================================================ HTTP
  async fetch(request) {
    const raw = request.headers.get(INTERNAL_HEADER);
    if (!raw) return json(400, { error: "not for clients" });
    const info = JSON.parse(raw);
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
  async health() {
    const live = this.allTunnels().filter((t) => t.live);
    const [connected, left] = await Promise.all([
      this.ctx.storage.get("last_connected_at"),
      this.ctx.storage.get("last_disconnected_at")
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
      relay: "cloudflare"
    };
  }
  async status() {
    return {
      ...await this.health(),
      uptime_s: Math.round((Date.now() - this.startedAt) / 100) / 10,
      bridge_messages_in: this.messagesIn,
      default_route: this.cfg.defaultRoute,
      route_ports: {},
      nodes_detail: this.allTunnels().filter((t) => t.phase === "open").map((t) => ({
        node: t.meta.node,
        session: t.meta.session,
        routes: [...t.meta.routes].sort(),
        connected_since: isoTime(t.meta.connectedAt),
        streams: t.conn.openStreams,
        draining: t.draining,
        info: t.meta.info
      }))
    };
  }
  metrics() {
    const lines = [
      "# HELP bridge_relay_requests_total Requests proxied, by route and status (since the object started)",
      "# TYPE bridge_relay_requests_total counter"
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
      `bridge_relay_body_bytes_total{direction="response"} ${this.bodyBytes.response}`
    );
    return lines.join("\n") + "\n";
  }
  count(route, status) {
    const k = `${route}
${status}`;
    this.requests.set(k, (this.requests.get(k) ?? 0) + 1);
  }
  async login(request, info) {
    const url = new URL(request.url);
    let next = safeNext(url.searchParams.get("next"));
    const storeKey = `login_failures:${info.client}`;
    const now = Date.now();
    const failures = (await this.ctx.storage.get(storeKey) ?? []).filter((ts) => ts > now - 6e4);
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
        "cache-control": "no-store"
      }
    });
  }
  openHeaders(request, info) {
    const headers = forwardHeaders(request, info.auth, info.prefix ?? "", info.client, info.scheme);
    if (typeof info.acceptEncoding !== "string") return headers;
    const out = headers.filter(([k]) => k !== "accept-encoding");
    if (info.acceptEncoding) out.splice(0, 0, ["accept-encoding", info.acceptEncoding]);
    return out;
  }
  async proxy(request, info) {
    const route = info.route;
    const method = request.method;
    const headers = this.openHeaders(request, info);
    const length = headerOf(headers, "content-length");
    if (length !== void 0 && !/^\d+$/.test(length)) {
      await request.body?.cancel();
      return json(400, { error: "invalid Content-Length" });
    }
    const maxBody = this.cfg.maxBody;
    if (maxBody && length !== void 0 && Number(length) > maxBody) {
      await request.body?.cancel();
      return json(413, { error: `body exceeds ${maxBody} bytes` });
    }
    const hasBody = request.body !== null && (length === void 0 || Number(length) > 0);
    this.inFlight++;
    let finished = false;
    const finish = /* @__PURE__ */ __name((status) => {
      if (finished) return;
      finished = true;
      this.inFlight--;
      this.count(route, status);
    }, "finish");
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
      let stream;
      try {
        stream = tunnel.open(method, route, info.target, headers, !hasBody, { client: info.client });
      } catch (err) {
        await request.body?.cancel();
        if (err instanceof StreamError) {
          finish(503);
          return json(503, { error: err.reason }, { "retry-after": "10" });
        }
        finish(431);
        return json(431, { error: "request header fields too large" });
      }
      if (hasBody) this.ctx.waitUntil(this.pumpRequest(request.body, stream));
      let head;
      try {
        head = await stream.head;
      } catch (err) {
        const e = err;
        const failed = streamFailed(e.code, route);
        console.warn(`stream ${stream.id} (${method} ${route}) failed before its answer: ${e.code} ${e.reason}`);
        finish(failed.status);
        return json(failed.status, failed.body, failed.headers);
      }
      let status = head.status;
      if (status < 200 || status > 599) {
        stream.reset(1 /* PROTOCOL_ERROR */, `status ${status} cannot be relayed here`);
        finish(502);
        return json(502, { error: `bridge: upstream answered ${status}` });
      }
      const out = new Headers();
      for (const [k, v] of stripHopByHop(head.headers)) out.append(k, v);
      const nullBody = NULL_BODY.has(status) || method === "HEAD";
      const self = this;
      const body = new ReadableStream(
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
              console.warn(`stream ${stream.id} (${method} ${route}) cut mid-response: ${err.message}`);
              status = 599;
              finish(599);
              controller.error(err);
            }
          },
          cancel() {
            stream.reset(6 /* CANCEL */, "client went away");
            finish(status);
          }
        },
        { highWaterMark: 0 }
      );
      if (nullBody) {
        this.ctx.waitUntil(drain(stream).finally(() => finish(status)));
        return new Response(null, { status, headers: out });
      }
      return new Response(body, { status, headers: out, encodeBody: "manual" });
    } catch (err) {
      finish(500);
      throw err;
    }
  }
  /** Send the request body as the bridge's credit allows, counting it against max_body. */
  async pumpRequest(body, stream) {
    const reader = body.getReader();
    let total = 0;
    try {
      for (; ; ) {
        const { value, done } = await reader.read();
        if (done) {
          await stream.write(new Uint8Array(0), true);
          return;
        }
        total += value.byteLength;
        this.bodyBytes.request += value.byteLength;
        if (this.cfg.maxBody && total > this.cfg.maxBody) {
          stream.reset(16 /* BODY_TOO_LARGE */, `body exceeds ${this.cfg.maxBody} bytes`);
          await reader.cancel();
          return;
        }
        await stream.write(value);
      }
    } catch (err) {
      if (!(err instanceof StreamError)) stream.reset(6 /* CANCEL */, "client went away");
      try {
        await reader.cancel();
      } catch {
      }
    }
  }
  // ================================================================================ client WebSockets
  async clientWebSocket(request, info) {
    const route = info.route;
    const own = /* @__PURE__ */ new Set(["sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"]);
    const headers = this.openHeaders(request, info).filter(([k]) => !own.has(k));
    this.websockets++;
    let handedOver = false;
    try {
      const tunnel = await this.acquire(route);
      if (!tunnel) return json(503, { error: "no bridge is connected; try again shortly" }, { "retry-after": "10" });
      if (tunnel.meta.routes.length && !tunnel.meta.routes.includes(route)) {
        return json(404, { error: `unknown route '${route}'` });
      }
      let stream;
      try {
        stream = tunnel.open("GET", route, info.target, headers, false, { client: info.client, websocket: true });
      } catch {
        return json(431, { error: "request header fields too large" });
      }
      let head;
      try {
        head = await stream.head;
      } catch (err) {
        const e = err;
        const failed = streamFailed(e.code, route);
        return json(failed.status, failed.body, failed.headers);
      }
      if (head.status !== 101) {
        const parts = [];
        let size = 0;
        try {
          let chunk;
          while (size < 65536 && (chunk = await stream.read()) !== null) {
            parts.push(chunk);
            size += chunk.byteLength;
            stream.consumed(chunk.byteLength);
          }
        } catch {
        }
        if (!stream.done) stream.reset(6 /* CANCEL */, "refused");
        const out2 = new Headers();
        for (const [k, v] of stripHopByHop(head.headers)) {
          if (k.toLowerCase() !== "content-length" && !own.has(k.toLowerCase())) out2.append(k, v);
        }
        const status = head.status >= 200 && head.status <= 599 ? head.status : 502;
        return new Response(NULL_BODY.has(status) ? null : concat(parts), { status, headers: out2 });
      }
      const pair = new WebSocketPair();
      const [client, server] = Object.values(pair);
      server.accept();
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
  splice(server, stream) {
    let chain = Promise.resolve();
    let over = false;
    const finish = /* @__PURE__ */ __name(() => {
      if (over) return;
      over = true;
      this.websockets--;
    }, "finish");
    const up = /* @__PURE__ */ __name((record, end = false) => {
      chain = chain.then(async () => stream.localClosed || stream.error ? void 0 : stream.write(await record, end)).catch(() => void 0);
    }, "up");
    server.addEventListener("message", (ev) => {
      const data = ev.data;
      if (typeof data === "string") up(encodeWsRecord(WS_TEXT, utf8(data)));
      else if (data instanceof ArrayBuffer) up(encodeWsRecord(WS_BINARY, new Uint8Array(data.slice(0))));
      else if (ArrayBuffer.isView(data)) {
        up(encodeWsRecord(WS_BINARY, new Uint8Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength))));
      } else if (data instanceof Blob) up(data.arrayBuffer().then((b) => encodeWsRecord(WS_BINARY, new Uint8Array(b))));
      else console.warn(`client WebSocket message of unexpected type ${Object.prototype.toString.call(data)}`);
    });
    server.addEventListener("close", (ev) => {
      up(encodeWsClose(ev.code || 1005, ev.reason || ""), true);
      tryClose(server, sendableClose(ev.code || 1e3), ev.reason || "");
      finish();
    });
    server.addEventListener("error", () => {
      stream.reset(6 /* CANCEL */, "client went away");
      finish();
    });
    const down = /* @__PURE__ */ __name(async () => {
      const reader = new WsRecordReader();
      try {
        let chunk;
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
        if (err instanceof StreamError && err.code === 1 /* PROTOCOL_ERROR */ && !stream.error) {
          stream.reset(err.code, err.message);
          tryClose(server, 1002, "bad message from bridge");
        } else {
          if (err instanceof StreamError && !stream.error) stream.reset(err.code, err.message);
          tryClose(server, 1011, "tunnel stream failed");
        }
      } finally {
        finish();
      }
    }, "down");
    this.ctx.waitUntil(down());
  }
};
async function drain(stream) {
  try {
    let chunk;
    while ((chunk = await stream.read()) !== null) stream.consumed(chunk.byteLength);
  } catch {
  }
}
__name(drain, "drain");
async function readLimited(request, limit) {
  if (!request.body) return "";
  const reader = request.body.getReader();
  const parts = [];
  let size = 0;
  for (; ; ) {
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
__name(readLimited, "readLimited");

// src/index.ts
function forward(env, request, info) {
  const headers = new Headers(request.headers);
  headers.set(INTERNAL_HEADER, JSON.stringify(info));
  const stub = env.RELAY.get(env.RELAY.idFromName("relay"));
  return stub.fetch(new Request(request, { headers }));
}
__name(forward, "forward");
var index_default = {
  async fetch(request, env) {
    const url = new URL(request.url);
    const path = url.pathname;
    const base = {
      client: request.headers.get("cf-connecting-ip") ?? "",
      scheme: url.protocol === "https:" ? "https" : "http",
      acceptEncoding: request.cf?.clientAcceptEncoding ?? null
    };
    const isUpgrade = (request.headers.get("upgrade") ?? "").toLowerCase() === "websocket";
    if (path === "/_relay" || path.startsWith("/_relay/")) {
      const method = request.method;
      switch (path) {
        case "/_relay/connect":
          if (isUpgrade) return forward(env, request, { kind: "bridge", ...base });
          return json(method === "GET" || method === "HEAD" ? 404 : 405, { error: "WebSocket only" });
        case "/_relay/health":
          return forward(env, request, { kind: "health", ...base });
        case "/_relay":
        case "/_relay/":
          if (await authenticate(env, request) === null) return deny(request, url);
          return forward(env, request, { kind: "status_page", ...base });
        case "/_relay/status":
        case "/_relay/metrics":
          if (await authenticate(env, request) === null) return deny(request, url);
          return forward(env, request, { kind: path === "/_relay/status" ? "status" : "metrics", ...base });
        case "/_relay/login":
          if (method === "GET") return loginPage(200, safeNext(url.searchParams.get("next")), "");
          if (method !== "POST") return json(405, { error: "use GET or POST" });
          return forward(env, request, { kind: "login", ...base });
        case "/_relay/logout":
          return new Response(null, {
            status: 303,
            headers: {
              location: "/_relay/login",
              "set-cookie": "bridge_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
            }
          });
        default:
          return json(method === "GET" || method === "HEAD" ? 404 : 405, { error: "not found" });
      }
    }
    const auth = await authenticate(env, request);
    if (auth === null) {
      if (isUpgrade) return json(401, { error: "a valid client key or login cookie is required" });
      return deny(request, url);
    }
    const resolved = resolve(url, settings(env).defaultRoute);
    if (resolved === null) return json(404, { error: "unknown route" });
    if (!validMethod(request.method) || !resolved.target.startsWith("/")) {
      return json(400, { error: "invalid method or request target" });
    }
    return forward(env, request, { kind: "proxy", ...base, ...resolved, auth });
  }
};
export {
  RelayObject,
  index_default as default
};
//# sourceMappingURL=index.js.map
