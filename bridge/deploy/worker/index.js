var __defProp = Object.defineProperty;
var __name = (target, value) => __defProp(target, "name", { value, configurable: true });

// src/rules.ts
var SESSION_COOKIE = "bridge_session";
var NODE_COOKIE = "bridge_node";
var RELAY_COOKIES = /* @__PURE__ */ new Set([SESSION_COOKIE, NODE_COOKIE]);
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
var NEXT_KEEP = /^[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]$/;
var utf8 = new TextEncoder();
function safeNext(raw) {
  if (!raw) return "/";
  let out = "";
  for (const byte of utf8.encode(raw)) {
    const c = String.fromCharCode(byte);
    out += byte < 128 && NEXT_KEEP.test(c) ? c : "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return out.startsWith("/") && !out.startsWith("//") ? out : "/";
}
__name(safeNext, "safeNext");
function needsOriginCheck(method, websocket, how) {
  if (how !== "cookie") return false;
  return websocket || method !== "GET" && method !== "HEAD";
}
__name(needsOriginCheck, "needsOriginCheck");
function originAllowed(origin, hosts, allowed) {
  const o = origin.trim().toLowerCase();
  if (!o || o === "null") return false;
  for (const host of hosts) {
    const h = host.trim().toLowerCase();
    if (h && (o === `http://${h}` || o === `https://${h}`)) return true;
  }
  return allowed.some((a) => a.trim().toLowerCase().replace(/\/+$/, "") === o);
}
__name(originAllowed, "originAllowed");
function originRefused(origin) {
  return { error: `cross-origin request refused: Origin ${origin} is not this relay's` };
}
__name(originRefused, "originRefused");
function trimWs(s) {
  return s.replace(/^[ \t]+|[ \t]+$/g, "");
}
__name(trimWs, "trimWs");
function setCookieName(value) {
  const pair = value.split(";", 1)[0] ?? "";
  const eq = pair.indexOf("=");
  const name = eq < 0 ? "" : trimWs(pair.slice(0, eq));
  if (name) return name;
  const bare = trimWs(eq < 0 ? pair : pair.slice(eq + 1));
  const eq2 = bare.indexOf("=");
  return trimWs(eq2 < 0 ? bare : bare.slice(0, eq2));
}
__name(setCookieName, "setCookieName");
function forwardedCookie(header) {
  return header.split(";").map((p) => trimWs(p)).filter((p) => {
    if (!p) return false;
    const eq = p.indexOf("=");
    return !RELAY_COOKIES.has(trimWs(eq < 0 ? p : p.slice(0, eq)));
  }).join("; ");
}
__name(forwardedCookie, "forwardedCookie");
function cookieValues(header, name) {
  const out = [];
  for (const part of (header ?? "").split(";")) {
    const eq = part.indexOf("=");
    if (eq >= 0 && trimWs(part.slice(0, eq)) === name) out.push(trimWs(part.slice(eq + 1)));
  }
  return out;
}
__name(cookieValues, "cookieValues");
function encodeNodeCookie(node) {
  return encodeURIComponent(node).replace(/[!'()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
}
__name(encodeNodeCookie, "encodeNodeCookie");
function decodeNodeCookie(value) {
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}
__name(decodeNodeCookie, "decodeNodeCookie");
function isClientForwarding(name) {
  return name.startsWith("x-forwarded-") || name.startsWith("cf-") || name === "forwarded" || name === "x-real-ip" || name === "true-client-ip" || name === "x-client-ip";
}
__name(isClientForwarding, "isClientForwarding");
var TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
var BAD_VALUE = /[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]/;
var OWN_RESPONSE_HEADERS = /* @__PURE__ */ new Set(["x-bridge-node", "x-bridge-idempotent"]);
function validHeaderName(name) {
  return TOKEN.test(name);
}
__name(validHeaderName, "validHeaderName");
function validHeaderValue(value) {
  return !BAD_VALUE.test(value);
}
__name(validHeaderValue, "validHeaderValue");
function cleanResponseHeaders(status, headers, prefix = "", target = "/") {
  if (!(status >= 200 && status <= 599)) return null;
  let out = [];
  for (const [name, value] of stripHopByHop(headers)) {
    const lname = name.toLowerCase();
    if (!TOKEN.test(name) || OWN_RESPONSE_HEADERS.has(lname) || BAD_VALUE.test(value)) continue;
    if (lname === "set-cookie" && RELAY_COOKIES.has(setCookieName(value))) continue;
    out.push([name, lname === "set-cookie" ? scopedSetCookie(value, prefix, target) : value]);
  }
  const lengths = new Set(out.filter(([k]) => k.toLowerCase() === "content-length").map(([, v]) => v.trim()));
  if (lengths.size) {
    out = out.filter(([k]) => k.toLowerCase() !== "content-length");
    const [length] = [...lengths];
    if (lengths.size === 1 && /^\d+$/.test(length) && status !== 204 && status !== 304) {
      out.push(["content-length", length]);
    }
  }
  return out;
}
__name(cleanResponseHeaders, "cleanResponseHeaders");
function scopedSetCookie(value, prefix, target) {
  const semi = value.indexOf(";");
  const pair = semi < 0 ? value : value.slice(0, semi);
  const rest = semi < 0 ? "" : value.slice(semi + 1);
  const kept = [];
  let path = null;
  let changed = false;
  for (const attribute of rest ? rest.split(";") : []) {
    const eq = attribute.indexOf("=");
    const key = trimWs(eq < 0 ? attribute : attribute.slice(0, eq)).toLowerCase();
    if (key === "domain") changed = true;
    else if (key === "path") path = trimWs(eq < 0 ? "" : attribute.slice(eq + 1));
    else kept.push(trimWs(attribute));
  }
  const targetPath = target.split("?", 1)[0] ?? "/";
  if (prefix && path !== null && path.startsWith("/")) {
    path = prefix + (path === "/" ? "" : path);
    changed = true;
  } else if (prefix && (path !== null || targetPath === "/")) {
    path = prefix + targetPath.slice(0, targetPath.lastIndexOf("/"));
    changed = true;
  }
  if (!changed) return value;
  if (path !== null) kept.push(`Path=${path}`);
  return [trimWs(pair), ...kept].join("; ");
}
__name(scopedSetCookie, "scopedSetCookie");
function declaredLength(headers) {
  for (const [k, v] of headers) if (k.toLowerCase() === "content-length") return Number(v);
  return null;
}
__name(declaredLength, "declaredLength");
function jsonObject(body) {
  if (!body || body.byteLength === 0 || body[0] !== 123) return null;
  try {
    const value = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(body));
    return value !== null && typeof value === "object" && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}
__name(jsonObject, "jsonObject");
function deterministic(body) {
  const value = jsonObject(body);
  if (value === null) return false;
  const options = value.options;
  const temperature = "temperature" in value ? value.temperature : options !== null && typeof options === "object" && !Array.isArray(options) ? options.temperature : void 0;
  return typeof temperature === "number" && temperature === 0;
}
__name(deterministic, "deterministic");

// src/http.ts
var COOKIE_NAME = SESSION_COOKIE;
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
    userRoute: env.USER_ROUTE === "-" ? null : env.USER_ROUTE || env.DEFAULT_ROUTE || "webui",
    graceMs: num(env.GRACE, 30, 0, 3600) * 1e3,
    heartbeat: num(env.HEARTBEAT, 5, 0.05, 3600),
    maxBody: Math.floor(num(env.MAX_BODY, 0, 0, Number.MAX_SAFE_INTEGER)),
    coalesce: num(env.COALESCE, 0.05, 0, 1),
    statsInterval: num(env.STATS_INTERVAL, 60, 0, 3600),
    bodyTimeoutMs: num(env.BODY_TIMEOUT, 60, 0, 3600) * 1e3,
    keyRate: num(env.KEY_RATE, 0, 0, 1e6),
    keyBurst: Math.floor(num(env.KEY_BURST, 0, 0, 1e9)),
    idempotencyTtl: num(env.IDEMPOTENCY_TTL, 300, 0, 7 * 86400),
    idempotencyEntries: Math.floor(num(env.IDEMPOTENCY_ENTRIES, 256, 0, 1e5)),
    idempotencyBytes: Math.floor(num(env.IDEMPOTENCY_BYTES, 64 * 1024 * 1024, 0, 2 ** 40)),
    jobTtl: num(env.JOB_TTL, 86400, 0, 365 * 86400),
    jobQuota: Math.floor(num(env.JOB_QUOTA, 100, 0, 1e6)),
    jobBytes: Math.floor(num(env.JOB_BYTES, 64 * 1024 * 1024, 0, 2 ** 40)),
    allowedOrigins: (env.ALLOWED_ORIGINS ?? "").split(",").map((o) => o.trim()).filter(Boolean),
    cookieRoutes: (env.COOKIE_ROUTES ?? "").split(/[\s,]+/).map((r) => r.trim()).filter(Boolean)
  };
}
__name(settings, "settings");
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
function b64url(bytes2) {
  let s = "";
  for (const b of new Uint8Array(bytes2)) s += String.fromCharCode(b);
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
  const nonce = new Uint8Array(16);
  crypto.getRandomValues(nonce);
  const payload = `${keyId}.${b64url(nonce.buffer)}.${Math.floor(Date.now() / 1e3) + COOKIE_MAX_AGE}`;
  return `${payload}.${await cookieMac(env, payload)}`;
}
__name(issueCookie, "issueCookie");
async function verifyCookie(env, value) {
  const parts = value.split(".");
  if (parts.length !== 4) return null;
  const [keyId, session, expiry, mac] = parts;
  if (!/^\d+$/.test(expiry) || !/^[A-Za-z0-9_-]+$/.test(session)) return null;
  if (!sameSecret(mac, await cookieMac(env, `${keyId}.${session}.${expiry}`))) return null;
  if (Number(expiry) < Date.now() / 1e3) return null;
  if (!keyHashes(env).some((h) => h.startsWith(keyId) && keyId.length === 16)) return null;
  return { keyId, session, expiry: Number(expiry) };
}
__name(verifyCookie, "verifyCookie");
async function authenticate(env, request) {
  for (const cookie of cookieValues(request.headers.get("cookie"), COOKIE_NAME)) {
    const found = await verifyCookie(env, cookie);
    if (found) {
      const key = await presentedKey(env, request);
      return key ? { how: "cookie", ...found, key } : { how: "cookie", ...found };
    }
  }
  return presentedKey(env, request);
}
__name(authenticate, "authenticate");
async function presentedKey(env, request) {
  const authz = request.headers.get("authorization");
  if (authz && authz.slice(0, 7).toLowerCase() === "bearer ") {
    const keyId = await checkKey(env, authz.slice(7).trim());
    if (keyId) return { how: "bearer", keyId };
  }
  const key = request.headers.get("x-bridge-key");
  if (key) {
    const keyId = await checkKey(env, key.trim());
    if (keyId) return { how: "header", keyId };
  }
  return null;
}
__name(presentedKey, "presentedKey");
function loggedOut() {
  return new Response(null, {
    status: 303,
    headers: { location: "/_relay/login", "set-cookie": `${COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax` }
  });
}
__name(loggedOut, "loggedOut");
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
function forwardHeaders(request, auth, prefix, client, scheme, cookieRoutes = []) {
  const sendCookies = !prefix || cookieRoutes.includes(prefix.slice(3));
  const raw = [];
  request.headers.forEach((value, name) => raw.push([name.toLowerCase(), value]));
  const out = [];
  let host = "";
  for (const [name, value] of stripHopByHop(raw)) {
    if (isClientForwarding(name) || name === "x-bridge-key" || name === INTERNAL_HEADER) continue;
    if (name === "authorization" && auth === "bearer") continue;
    let v = value;
    if (name === "cookie") {
      v = sendCookies ? forwardedCookie(v) : "";
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
function withUser(headers, route, userRoute, keyId) {
  const out = headers.filter(([k]) => !k.toLowerCase().startsWith("x-bridge-user-"));
  if (keyId && userRoute !== null && route === userRoute) {
    out.push(["x-bridge-user-email", `${keyId.toLowerCase()}@relay.invalid`]);
    out.push(["x-bridge-user-name", keyId]);
  }
  return out;
}
__name(withUser, "withUser");
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
function gib(value) {
  return typeof value === "number" ? (value / 2 ** 30).toFixed(1) : "?";
}
__name(gib, "gib");
function gpuCell(sample) {
  const gpus = sample?.gpus ?? [];
  if (!gpus.length) return '<span class="muted">no GPU reported</span>';
  return gpus.map((g) => {
    const util = typeof g.utilization_percent === "number" ? `, ${g.utilization_percent.toFixed(0)}% busy` : "";
    const name = escapeHtml(String(g.name ?? "GPU"));
    return `${escapeHtml(String(g.index ?? ""))}: ${name} ${gib(g.memory_used_bytes)}/${gib(g.memory_total_bytes)} GiB${util}`;
  }).join("<br>");
}
__name(gpuCell, "gpuCell");
function statusPage(status) {
  const nodes = status.nodes_detail ?? [];
  const state = status.node_connected ? '<span class="ok">serving</span>' : '<span class="bad">no bridge connected</span>';
  const muted = '<span class="muted">-</span>';
  const rows = nodes.map((n) => {
    const facts = n.facts ?? {};
    const listed = n.models?.length ? n.models : facts.models;
    const models = (listed ?? []).filter((m) => typeof m === "string").map(escapeHtml).join(", ");
    const ends = facts.session_ends_at;
    return `<tr><td>${escapeHtml(String(n.node ?? ""))}<br><span class="muted">since ${escapeHtml(String(n.connected_since ?? ""))}</span></td><td>${n.draining ? '<span class="warn">draining</span>' : '<span class="ok">up</span>'}</td><td>${escapeHtml((n.routes ?? []).join(", "))}</td><td>${models || muted}</td><td>${Number(n.streams ?? 0)}</td><td>${gpuCell(n.sample)}</td><td>${ends ? escapeHtml(String(ends)) : muted}</td></tr>`;
  });
  const table = rows.length ? `<table><tr><th>Node</th><th>State</th><th>Routes</th><th>Models</th><th>Streams</th><th>GPU memory</th><th>Session ends</th></tr>${rows.join("")}</table>` : '<p class="muted">No bridge is connected. Requests wait for one, then get 503.</p>';
  const tile = /* @__PURE__ */ __name((label2, key) => `<div><span class="muted">${label2}</span><b>${escapeHtml(String(status[key] ?? 0))}</b></div>`, "tile");
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
function utf82(text) {
  return encoder.encode(text);
}
__name(utf82, "utf8");
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
  const data = utf82(JSON.stringify(body));
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
function cutUtf8(bytes2, limit) {
  let end = limit;
  while (end > 0 && (bytes2[end] & 192) === 128) end--;
  return bytes2.subarray(0, end);
}
__name(cutUtf8, "cutUtf8");
function resetPayload(code, reason) {
  let bytes2 = utf82(reason);
  if (bytes2.byteLength > MAX_REASON) bytes2 = cutUtf8(bytes2, MAX_REASON);
  return concat([u32(code), bytes2]);
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
  let text = utf82(reason);
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

// src/jobs.ts
var MAX_SUBMISSION = 1024 * 1024;
var MAX_WAIT = 60;
function parseJob(submission, defaultRoute) {
  let spec;
  try {
    spec = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(submission));
  } catch {
    return { error: "invalid job: a JSON object is required" };
  }
  if (spec === null || typeof spec !== "object" || Array.isArray(spec)) {
    return { error: "invalid job: a JSON object is required" };
  }
  const s = spec;
  const route = s.route ?? defaultRoute;
  const method = s.method ?? "POST";
  const path = s.path ?? "/";
  const headers = s.headers ?? {};
  if (typeof route !== "string" || typeof method !== "string" || typeof path !== "string") {
    return { error: "invalid job: route, method and path must be strings" };
  }
  if (!route || route === "." || route === ".." || /[%/?#\s]/.test(route)) return { error: "invalid job: invalid route" };
  if (!validMethod(method) || !path.startsWith("/") || /[ \r\n\0]/.test(path) || /[^\x21-\x7e]/.test(path)) {
    return { error: "invalid job: invalid method or path" };
  }
  if (headers === null || typeof headers !== "object" || Array.isArray(headers)) {
    return { error: "invalid job: headers must be an object of strings" };
  }
  const out = [];
  for (const [name, value] of Object.entries(headers)) {
    if (typeof value !== "string") return { error: "invalid job: headers must be an object of strings" };
    if (!validHeaderName(name) || !validHeaderValue(value)) return { error: `invalid job: invalid header ${JSON.stringify(name)}` };
    const lname = name.toLowerCase();
    if (HOP_BY_HOP.has(lname) || isClientForwarding(lname) || ["host", "content-length", "x-bridge-key"].includes(lname)) continue;
    if (lname === "cookie") {
      const kept = forwardedCookie(value);
      if (kept) out.push([lname, kept]);
      continue;
    }
    out.push([lname, value]);
  }
  const payload = s.body;
  let body;
  if (payload === void 0 || payload === "") body = new Uint8Array(0);
  else if (typeof payload === "string") body = new TextEncoder().encode(payload);
  else body = new TextEncoder().encode(JSON.stringify(payload));
  if (body.byteLength && !out.some(([k]) => k === "content-type")) out.push(["content-type", "application/json"]);
  return { route, method: method.toUpperCase(), path, headers: out, body };
}
__name(parseJob, "parseJob");
function iso(seconds) {
  return seconds === null ? null : new Date(seconds * 1e3).toISOString().replace(/\.\d{3}Z$/, "Z");
}
__name(iso, "iso");
function describeJob(job) {
  const out = {
    id: job.id,
    state: job.state,
    request: job.request,
    created_at: iso(job.created),
    finished_at: iso(job.finished)
  };
  if (job.state !== "running") {
    out.response = {
      status: job.status ?? 0,
      headers: job.headers,
      body: new TextDecoder("utf-8").decode(job.body)
    };
    if (job.error) out.error = job.error;
  }
  return out;
}
__name(describeJob, "describeJob");
function waitSeconds(query) {
  const raw = query.get("wait");
  const n = raw === null ? 0 : Number(raw);
  return Number.isFinite(n) ? Math.max(0, Math.min(MAX_WAIT, n)) : 0;
}
__name(waitSeconds, "waitSeconds");

// src/limits.ts
var TokenBucket = class {
  constructor(rate, burst, now) {
    this.rate = rate;
    this.burst = burst;
    this.tokens = burst;
    this.at = now;
  }
  rate;
  burst;
  static {
    __name(this, "TokenBucket");
  }
  tokens;
  at;
  /** Take one token if there is one (time in seconds). */
  allow(now) {
    this.tokens = Math.min(this.burst, this.tokens + Math.max(0, now - this.at) * this.rate);
    this.at = now;
    if (this.tokens >= 1) {
      this.tokens -= 1;
      return true;
    }
    return false;
  }
};
var MAX_KEYS = 4096;
var KeyRates = class {
  /** `rate` requests a second per key (0: no limit), bursts of `burst` (0: 10 x rate, at least 1). */
  constructor(rate, burst) {
    this.rate = rate;
    this.burst = burst > 0 ? burst : Math.max(1, Math.floor(rate * 10));
  }
  rate;
  static {
    __name(this, "KeyRates");
  }
  buckets = /* @__PURE__ */ new Map();
  burst;
  /** 0 when the key may make a request now, else the seconds to tell it to wait (Retry-After). */
  check(keyId, now) {
    if (this.rate <= 0) return 0;
    let bucket = this.buckets.get(keyId);
    if (!bucket) {
      if (this.buckets.size >= MAX_KEYS) this.buckets.delete(this.buckets.keys().next().value);
      bucket = new TokenBucket(this.rate, this.burst, now);
      this.buckets.set(keyId, bucket);
    }
    return bucket.allow(now) ? 0 : Math.max(1, Math.ceil(1 / this.rate));
  }
};
var KEY_RATE_REFUSAL = "rate limit of this client key exceeded; slow down";
var MAX_ROUTE_LABELS = 64;
var ROUTE_NAME = /^[a-z0-9][a-z0-9_-]{0,62}$/;
var RouteLabels = class {
  static {
    __name(this, "RouteLabels");
  }
  seen = /* @__PURE__ */ new Set();
  /** The label to count `route` under. */
  label(route) {
    if (this.seen.has(route)) return route;
    if (this.seen.size < MAX_ROUTE_LABELS && ROUTE_NAME.test(route)) {
      this.seen.add(route);
      return route;
    }
    return "other";
  }
};

// src/shared.ts
var AnswerBroken = class extends Error {
  static {
    __name(this, "AnswerBroken");
  }
};
var MemoryBudget = class {
  constructor(limit) {
    this.limit = limit;
  }
  limit;
  static {
    __name(this, "MemoryBudget");
  }
  used = 0;
  take(n) {
    if (this.used + n > this.limit) return false;
    this.used += n;
    return true;
  }
  give(n) {
    this.used = Math.max(0, this.used - n);
  }
};
var SharedAnswer = class _SharedAnswer {
  constructor(maxBytes, budget = null) {
    this.maxBytes = maxBytes;
    this.budget = budget;
  }
  maxBytes;
  budget;
  static {
    __name(this, "SharedAnswer");
  }
  status = 0;
  headers = [];
  chunks = [];
  size = 0;
  done = false;
  /** Why the answer broke off mid-body (readers then get AnswerBroken), or null. */
  broken = null;
  /** The answer outgrew `maxBytes`: readers past what was kept get AnswerBroken. */
  overflow = false;
  /** The words of an error the relay answered in the upstream's place (served whole to every
   * reader, never replayed; a job with one failed), or null. */
  relayError = null;
  finishedAt = null;
  started = false;
  headWaiters = [];
  waiters = [];
  /** Bytes taken from `budget` (given back by `release`). */
  held = 0;
  // producer -----------------------------------------------------------------------------------
  start(status, headers) {
    if (this.started) return;
    this.status = status;
    this.headers = headers;
    this.started = true;
    for (const w of this.headWaiters.splice(0)) w();
    this.wake();
  }
  /** Record a chunk; false once the answer outgrew `maxBytes` (nothing more is kept). */
  append(chunk) {
    if (this.overflow || this.done) return false;
    if (this.size + chunk.byteLength > this.maxBytes || this.budget && !this.budget.take(chunk.byteLength)) {
      this.overflow = true;
      this.wake();
      return false;
    }
    if (this.budget) this.held += chunk.byteLength;
    this.chunks.push(chunk);
    this.size += chunk.byteLength;
    this.wake();
    return true;
  }
  finish(now) {
    if (this.done) return;
    this.done = true;
    this.finishedAt = now;
    if (!this.started) this.start(502, []);
    this.wake();
  }
  /** The stream failed mid-body: every reader's body breaks where the recording ends. */
  breakOff(reason, now) {
    if (this.done) return;
    this.broken = reason;
    this.finish(now);
  }
  /** The answer is the relay's own (the stream failed before its answer, no bridge, ...): a
   * complete response for every reader, not kept for repeats. */
  answerWith(status, headers, body, reason, now) {
    if (this.done) return;
    this.relayError = reason;
    this.start(status, [...headers, ["content-length", String(body.byteLength)]]);
    if (body.byteLength) this.append(body);
    this.finish(now);
  }
  /** The producer is done with the answer (it is stored, or nobody can join it any more): its
   * bytes no longer count against the budget (readers still reading keep them until they finish). */
  release() {
    this.budget?.give(this.held);
    this.held = 0;
  }
  /** Finished whole: worth serving again to a repeat. */
  get ok() {
    return this.done && this.broken === null && !this.overflow && this.relayError === null;
  }
  wake() {
    for (const w of this.waiters.splice(0)) w();
  }
  /** Resolves once the answer is over (finished, failed, broken). */
  async whenDone() {
    while (!this.done) await new Promise((res) => this.waiters.push(res));
  }
  // readers ------------------------------------------------------------------------------------
  async head() {
    while (!this.started) await new Promise((res) => this.headWaiters.push(res));
    return { status: this.status, headers: this.headers };
  }
  /** A reader from the first byte: next() gives each chunk, then null at the end; it throws
   * AnswerBroken where the answer cannot be given whole. */
  reader() {
    let index = 0;
    return {
      next: /* @__PURE__ */ __name(async () => {
        for (; ; ) {
          if (index < this.chunks.length) return this.chunks[index++];
          if (this.overflow) throw new AnswerBroken("answer too large to share");
          if (this.done) {
            if (this.broken !== null) throw new AnswerBroken(this.broken);
            return null;
          }
          await new Promise((res) => this.waiters.push(res));
        }
      }, "next")
    };
  }
  /** The whole body recorded (for storing a finished answer or a job's result). */
  body() {
    const out = new Uint8Array(this.size);
    let at = 0;
    for (const c of this.chunks) {
      out.set(c, at);
      at += c.byteLength;
    }
    return out;
  }
  /** A finished answer from storage, to replay. */
  static recorded(status, headers, body, finishedAt) {
    const answer = new _SharedAnswer(Math.max(body.byteLength, 1));
    answer.start(status, headers);
    if (body.byteLength) answer.append(body);
    answer.finish(finishedAt);
    return answer;
  }
};

// src/stats.ts
var MAX_LABEL = 64;
var MAX_SERIES_PER_NODE = 64;
var MAX_GPUS = 16;
var LATENCY_BUCKETS = [5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
var RATE_BUCKETS = [1, 2.5, 5, 10, 20, 30, 40, 60, 80, 120, 200, 500, 1e3, 2e3, 5e3];
var TTFB_BUCKETS = [1e-3, 25e-4, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
function escapeLabel(value) {
  return value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}
__name(escapeLabel, "escapeLabel");
function labelText(labels, extra = {}) {
  const all = { ...labels, ...extra };
  const parts = Object.entries(all).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
  return parts.length ? `{${parts.join(",")}}` : "";
}
__name(labelText, "labelText");
function num2(value) {
  if (value === Infinity) return "+Inf";
  return Number.isInteger(value) ? `${value}.0` : String(value);
}
__name(num2, "num");
var Family = class {
  constructor(name, help, type, bucketBounds = []) {
    this.name = name;
    this.help = help;
    this.type = type;
    this.bucketBounds = bucketBounds;
  }
  name;
  help;
  type;
  bucketBounds;
  static {
    __name(this, "Family");
  }
  series = /* @__PURE__ */ new Map();
  entry(labels) {
    const key = JSON.stringify(labels);
    let e = this.series.get(key);
    if (!e) {
      e = { labels, value: 0 };
      if (this.type === "histogram") {
        e.buckets = this.bucketBounds.map(() => 0);
        e.sum = 0;
      }
      this.series.set(key, e);
    }
    return e;
  }
  inc(labels, by = 1) {
    this.entry(labels).value += by;
  }
  set(labels, value) {
    this.entry(labels).value = value;
  }
  observe(labels, value) {
    const e = this.entry(labels);
    e.value += 1;
    e.sum += value;
    this.bucketBounds.forEach((bound, i) => {
      if (value <= bound) e.buckets[i] += 1;
    });
  }
  /** Drop every series whose labels match `where`. */
  remove(where) {
    for (const [k, e] of this.series) if (where(e.labels)) this.series.delete(k);
  }
  get size() {
    return this.series.size;
  }
  /** The family in Prometheus's text format (counters get `_total`, as prometheus_client writes). */
  render() {
    const metric = this.type === "counter" ? `${this.name}_total` : this.name;
    const lines = [`# HELP ${metric} ${this.help}`, `# TYPE ${metric} ${this.type}`];
    for (const e of this.series.values()) {
      if (this.type !== "histogram") {
        lines.push(`${metric}${labelText(e.labels)} ${num2(e.value)}`);
        continue;
      }
      this.bucketBounds.forEach((bound, i) => {
        lines.push(`${metric}_bucket${labelText(e.labels, { le: num2(bound) })} ${num2(e.buckets[i])}`);
      });
      lines.push(`${metric}_bucket${labelText(e.labels, { le: "+Inf" })} ${num2(e.value)}`);
      lines.push(`${metric}_count${labelText(e.labels)} ${num2(e.value)}`);
      lines.push(`${metric}_sum${labelText(e.labels)} ${num2(e.sum)}`);
    }
    return lines;
  }
};
function finite(body, key) {
  const v = body[key];
  return typeof v === "number" && Number.isFinite(v) && v >= 0 ? v : null;
}
__name(finite, "finite");
function label(value) {
  return typeof value === "string" ? value.slice(0, MAX_LABEL) : "";
}
__name(label, "label");
function modelList(value) {
  if (!Array.isArray(value)) return [];
  const out = /* @__PURE__ */ new Set();
  for (const m of value.slice(0, 256)) if (typeof m === "string" && m) out.add(m.slice(0, 128));
  return [...out].sort();
}
__name(modelList, "modelList");
function cleanSample(body) {
  const keys = ["index", "name", "memory_used_bytes", "memory_total_bytes", "utilization_percent", "temperature_c"];
  const gpus = Array.isArray(body.gpus) ? body.gpus.slice(0, MAX_GPUS) : [];
  const out = {
    gpus: gpus.filter((g) => g !== null && typeof g === "object" && !Array.isArray(g)).map((g) => Object.fromEntries(keys.filter((k) => ["string", "number"].includes(typeof g[k])).map((k) => [k, g[k]])))
  };
  for (const k of ["cpu_percent", "ram_used_bytes", "ram_total_bytes"]) {
    const v = finite(body, k);
    if (v !== null) out[k] = v;
  }
  return out;
}
__name(cleanSample, "cleanSample");
function cleanFacts(body) {
  const out = {};
  for (const [k, v] of Object.entries(body)) {
    if (k === "kind") continue;
    if (typeof v === "string" || typeof v === "number" && Number.isFinite(v) || Array.isArray(v)) out[k] = v;
  }
  return out;
}
__name(cleanFacts, "cleanFacts");
var RelayStats = class {
  static {
    __name(this, "RelayStats");
  }
  ttft = new Family("bridge_request_ttft_seconds", "Time to first token measured by the bridge at the engine (excludes the tunnel)", "histogram", LATENCY_BUCKETS);
  duration = new Family("bridge_request_duration_seconds", "Whole request time measured by the bridge", "histogram", LATENCY_BUCKETS);
  queue = new Family("bridge_request_queue_seconds", "Time a request waited in the bridge before it reached the engine", "histogram", LATENCY_BUCKETS);
  decodeRate = new Family("bridge_request_decode_tokens_per_second", "Decoding rate of each request", "histogram", RATE_BUCKETS);
  promptTokens = new Family("bridge_prompt_tokens", "Prompt tokens processed", "counter");
  completionTokens = new Family("bridge_completion_tokens", "Tokens generated", "counter");
  requests = new Family("bridge_node_requests", "Requests measured by bridges", "counter");
  gpuUsed = new Family("bridge_gpu_memory_used_bytes", "GPU memory in use", "gauge");
  gpuTotal = new Family("bridge_gpu_memory_total_bytes", "GPU memory", "gauge");
  gpuUtil = new Family("bridge_gpu_utilization_ratio", "GPU utilisation (0..1)", "gauge");
  gpuTemp = new Family("bridge_gpu_temperature_celsius", "GPU temperature", "gauge");
  gpuPower = new Family("bridge_gpu_power_watts", "GPU power draw", "gauge");
  cpu = new Family("bridge_host_cpu_utilization_ratio", "Host CPU utilisation (0..1)", "gauge");
  ram = new Family("bridge_host_memory_used_bytes", "Host memory in use", "gauge");
  pairs = /* @__PURE__ */ new Map();
  get families() {
    return [
      this.ttft,
      this.duration,
      this.queue,
      this.decodeRate,
      this.promptTokens,
      this.completionTokens,
      this.requests,
      this.gpuUsed,
      this.gpuTotal,
      this.gpuUtil,
      this.gpuTemp,
      this.gpuPower,
      this.cpu,
      this.ram
    ];
  }
  /** Take one STATS body from `node` into the series. */
  publish(node, body) {
    if (body.kind === "request") this.request(node, body);
    else if (body.kind === "sample") this.sample(node, body);
  }
  /** The node left: its gauges would lie, so drop them (histograms and counters stay). */
  forget(node) {
    for (const g of [this.gpuUsed, this.gpuTotal, this.gpuUtil, this.gpuTemp, this.gpuPower, this.cpu, this.ram]) {
      g.remove((l) => l.node === node);
    }
  }
  render() {
    return this.families.flatMap((f) => f.size ? f.render() : []);
  }
  request(node, body) {
    let route = label(body.route);
    let model = label(body.model);
    let seen = this.pairs.get(node);
    if (!seen) this.pairs.set(node, seen = /* @__PURE__ */ new Set());
    const pair = JSON.stringify([route, model]);
    if (!seen.has(pair)) {
      if (seen.size >= MAX_SERIES_PER_NODE) [route, model] = ["other", "other"];
      seen.add(JSON.stringify([route, model]));
    }
    const labels = { node, route, model };
    const status = body.status;
    this.requests.inc({ ...labels, status: typeof status === "number" && Number.isInteger(status) ? String(status) : "" });
    for (const [key, family] of [
      ["ttft_s", this.ttft],
      ["total_s", this.duration],
      ["queue_s", this.queue],
      ["tokens_per_s", this.decodeRate]
    ]) {
      const v = finite(body, key);
      if (v !== null) family.observe(labels, v);
    }
    for (const [key, family] of [
      ["prompt_tokens", this.promptTokens],
      ["completion_tokens", this.completionTokens]
    ]) {
      const v = finite(body, key);
      if (v !== null) family.inc(labels, v);
    }
  }
  sample(node, body) {
    const gpus = Array.isArray(body.gpus) ? body.gpus.slice(0, MAX_GPUS) : [];
    for (const gpu of gpus) {
      if (gpu === null || typeof gpu !== "object" || Array.isArray(gpu)) continue;
      const g = gpu;
      const labels = { node, gpu: String(g.index ?? "").slice(0, 8), name: label(g.name) };
      for (const [key, family, scale] of [
        ["memory_used_bytes", this.gpuUsed, 1],
        ["memory_total_bytes", this.gpuTotal, 1],
        ["utilization_percent", this.gpuUtil, 0.01],
        ["temperature_c", this.gpuTemp, 1],
        ["power_w", this.gpuPower, 1]
      ]) {
        const v = finite(g, key);
        if (v !== null) family.set(labels, v * scale);
      }
    }
    const cpu = finite(body, "cpu_percent");
    if (cpu !== null) this.cpu.set({ node }, cpu / 100);
    const ram = finite(body, "ram_used_bytes");
    if (ram !== null) this.ram.set({ node }, ram);
  }
};

// src/store.ts
var PART = 1024 * 1024;
function bytes(value) {
  return value instanceof ArrayBuffer ? new Uint8Array(value) : new Uint8Array(0);
}
__name(bytes, "bytes");
function blob(data) {
  return data.slice().buffer;
}
__name(blob, "blob");
var Store = class _Store {
  constructor(sql) {
    this.sql = sql;
  }
  sql;
  static {
    __name(this, "Store");
  }
  rowsRead = 0;
  rowsWritten = 0;
  /** Finished answers kept, and their bytes, all keys together (for the bounds); counted when
   * first needed, not at every start (the object starts again after each hibernation). */
  answers = 0;
  answerBytes = 0;
  counted = false;
  run(query, ...bindings) {
    const cursor = this.sql.exec(query, ...bindings);
    const rows = cursor.toArray();
    this.rowsRead += cursor.rowsRead;
    this.rowsWritten += cursor.rowsWritten;
    return rows;
  }
  /** Create the tables (once). WITHOUT ROWID: the primary key is the table, so a row written is
   * not also an index entry written; the only secondary indexes are those a query needs. */
  init() {
    this.sql.exec(`CREATE TABLE IF NOT EXISTS answers (
      key_id TEXT NOT NULL, identity TEXT NOT NULL, status INTEGER NOT NULL, headers TEXT NOT NULL,
      body BLOB, size INTEGER NOT NULL, finished REAL NOT NULL, PRIMARY KEY (key_id, identity)) WITHOUT ROWID`);
    this.sql.exec("CREATE INDEX IF NOT EXISTS answers_finished ON answers (finished)");
    this.sql.exec(`CREATE TABLE IF NOT EXISTS jobs (
      id TEXT PRIMARY KEY, key_id TEXT NOT NULL, created REAL NOT NULL, finished REAL, state TEXT NOT NULL,
      request TEXT NOT NULL, status INTEGER, headers TEXT, body BLOB, size INTEGER NOT NULL DEFAULT 0,
      error TEXT) WITHOUT ROWID`);
    this.sql.exec("CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key_id, created)");
    this.sql.exec("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created)");
    this.sql.exec(`CREATE TABLE IF NOT EXISTS parts (
      owner TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (owner, seq)) WITHOUT ROWID`);
  }
  // bodies -------------------------------------------------------------------------------------
  /** Keep `body` for `owner`: the first part is returned for the owner's own row, the rest go to
   * `parts`. */
  putBody(owner, body) {
    for (let seq = 1; seq * PART < body.byteLength; seq++) {
      this.run("INSERT OR REPLACE INTO parts (owner, seq, data) VALUES (?, ?, ?)", owner, seq, blob(body.subarray(seq * PART, (seq + 1) * PART)));
    }
    return blob(body.subarray(0, PART));
  }
  getBody(owner, first, size) {
    const head = bytes(first);
    if (size <= head.byteLength) return head;
    const out = new Uint8Array(size);
    out.set(head);
    let at = head.byteLength;
    for (const row of this.run("SELECT data FROM parts WHERE owner = ? ORDER BY seq", owner)) {
      const part = bytes(row.data);
      out.set(part.subarray(0, size - at), at);
      at += part.byteLength;
    }
    return out;
  }
  dropBody(owner, size) {
    if (size > PART) this.run("DELETE FROM parts WHERE owner = ?", owner);
  }
  // answers ------------------------------------------------------------------------------------
  static answerOwner(keyId, identity) {
    return `answer
${keyId}
${identity}`;
  }
  /** A finished answer of `keyId` for `identity` still within `ttl` seconds, or null. */
  getAnswer(keyId, identity, now, ttl) {
    const [row] = this.run(
      "SELECT status, headers, body, size, finished FROM answers WHERE key_id = ? AND identity = ? AND finished >= ?",
      keyId,
      identity,
      now - ttl
    );
    if (!row) return null;
    return {
      status: Number(row.status),
      headers: JSON.parse(String(row.headers)),
      body: this.getBody(_Store.answerOwner(keyId, identity), row.body, Number(row.size)),
      finished: Number(row.finished)
    };
  }
  /** Keep a finished answer for repeats. Then, over `maxEntries` answers or `maxBytes` bytes, the
   * key holding the most bytes loses its oldest answer (docs/security.md §7: one key cannot push
   * another's answers out); answers older than `ttl` go first. */
  putAnswer(keyId, identity, status, headers, body, now, ttl, maxEntries, maxBytes) {
    if (!this.counted) {
      const [count] = this.run("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM answers");
      this.answers = Number(count?.n ?? 0);
      this.answerBytes = Number(count?.b ?? 0);
      this.counted = true;
    }
    for (const old of this.run("SELECT key_id, identity, size FROM answers WHERE finished < ?", now - ttl)) {
      this.deleteAnswer(String(old.key_id), String(old.identity), Number(old.size));
    }
    const [existing] = this.run("SELECT size FROM answers WHERE key_id = ? AND identity = ?", keyId, identity);
    if (existing) this.deleteAnswer(keyId, identity, Number(existing.size));
    const owner = _Store.answerOwner(keyId, identity);
    const first = this.putBody(owner, body);
    this.run(
      "INSERT INTO answers (key_id, identity, status, headers, body, size, finished) VALUES (?, ?, ?, ?, ?, ?, ?)",
      keyId,
      identity,
      status,
      JSON.stringify(headers),
      first,
      body.byteLength,
      now
    );
    this.answers += 1;
    this.answerBytes += body.byteLength;
    while (this.answers > 0 && (this.answers > maxEntries || this.answerBytes > maxBytes)) {
      const [top] = this.run("SELECT key_id FROM answers GROUP BY key_id ORDER BY SUM(size) DESC LIMIT 1");
      if (!top) break;
      const [oldest] = this.run(
        "SELECT identity, size FROM answers WHERE key_id = ? ORDER BY finished LIMIT 1",
        String(top.key_id)
      );
      if (!oldest) break;
      this.deleteAnswer(String(top.key_id), String(oldest.identity), Number(oldest.size));
    }
  }
  deleteAnswer(keyId, identity, size) {
    this.run("DELETE FROM answers WHERE key_id = ? AND identity = ?", keyId, identity);
    this.dropBody(_Store.answerOwner(keyId, identity), size);
    this.answers -= 1;
    this.answerBytes -= size;
  }
  // jobs ---------------------------------------------------------------------------------------
  /** Jobs of `keyId` kept, and the bytes of their results (for the per-key quotas). */
  jobUsage(keyId) {
    const [row] = this.run("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM jobs WHERE key_id = ?", keyId);
    return { count: Number(row?.n ?? 0), bytes: Number(row?.b ?? 0) };
  }
  /** Forget jobs created before `before` (seconds). */
  expireJobs(before) {
    for (const old of this.run("SELECT id, size FROM jobs WHERE created < ?", before)) {
      this.deleteJobRow(String(old.id), Number(old.size));
    }
  }
  addJob(id, keyId, request, now) {
    this.run("INSERT INTO jobs (id, key_id, created, state, request) VALUES (?, ?, ?, 'running', ?)", id, keyId, now, JSON.stringify(request));
  }
  finishJob(id, state, status, headers, body, error, now) {
    const first = this.putBody(`job
${id}`, body);
    this.run(
      "UPDATE jobs SET finished = ?, state = ?, status = ?, headers = ?, body = ?, size = ?, error = ? WHERE id = ?",
      now,
      state,
      status,
      JSON.stringify(headers),
      first,
      body.byteLength,
      error,
      id
    );
  }
  /** A job of `keyId`. `alive` says whether a job stored as running is still running here: one
   * that is not was running when the object last stopped (its producer went with the memory that
   * held it) and is failed from now on. */
  getJob(id, keyId, alive) {
    let [row] = this.run("SELECT * FROM jobs WHERE id = ? AND key_id = ?", id, keyId);
    if (!row) return null;
    if (row.state === "running" && !alive(id)) {
      [row] = this.run(
        "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ? RETURNING *",
        Date.now() / 1e3,
        "the relay restarted before the job finished",
        id
      );
      if (!row) return null;
    }
    return {
      id: String(row.id),
      state: String(row.state),
      request: JSON.parse(String(row.request)),
      created: Number(row.created),
      finished: row.finished === null ? null : Number(row.finished),
      status: row.status === null ? null : Number(row.status),
      headers: row.headers === null ? [] : JSON.parse(String(row.headers)),
      body: this.getBody(`job
${id}`, row.body, Number(row.size)),
      error: row.error === null ? null : String(row.error)
    };
  }
  listJobs(keyId, alive, limit = 100) {
    return this.run("SELECT id, state, created FROM jobs WHERE key_id = ? ORDER BY created DESC LIMIT ?", keyId, limit).map(
      (r) => ({
        id: String(r.id),
        state: r.state === "running" && !alive(String(r.id)) ? "failed" : String(r.state),
        created: Number(r.created)
      })
    );
  }
  deleteJob(id, keyId) {
    const [row] = this.run("SELECT size FROM jobs WHERE id = ? AND key_id = ?", id, keyId);
    if (!row) return false;
    this.deleteJobRow(id, Number(row.size));
    return true;
  }
  deleteJobRow(id, size) {
    this.run("DELETE FROM jobs WHERE id = ?", id);
    this.dropBody(`job
${id}`, size);
  }
};

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
var BUFFER_LIMIT = 1024 * 1024;
var SHARED_MAX_BYTES = 8 * 1024 * 1024;
var MAX_RUNNING_SHARED = 16;
var MAX_RUNNING_JOBS = 16;
var ANSWER_MEMORY = 48 * 1024 * 1024;
var BODY_STALLED = "request body stalled";
var LOGIN_MAX = 8192;
var LOGIN_BODY_DEADLINE_MS = 5e3;
var END = /* @__PURE__ */ Symbol("end");
var NULL_BODY = /* @__PURE__ */ new Set([101, 204, 205, 304]);
var HELLO_TIMEOUT_MS = HELLO_TIMEOUT * 1e3;
function randomHex(bytes2) {
  return [...crypto.getRandomValues(new Uint8Array(bytes2))].map((b) => b.toString(16).padStart(2, "0")).join("");
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
      // the Durable Object takes these (RelayObject.onStats)
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
var BodyStalled = class extends Error {
  static {
    __name(this, "BodyStalled");
  }
};
async function readWithin(reader, ms) {
  if (ms <= 0) return reader.read();
  let timer;
  try {
    return await Promise.race([
      reader.read(),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new BodyStalled(BODY_STALLED)), ms);
      })
    ]);
  } finally {
    if (timer !== void 0) clearTimeout(timer);
  }
}
__name(readWithin, "readWithin");
var DISCARD_AFTER_413 = 1024 * 1024;
async function discard(reader, most) {
  let left = most;
  try {
    while (left > 0) {
      const { value, done } = await readWithin(reader, 1e3);
      if (done) return true;
      left -= value.byteLength;
    }
  } catch {
  }
  await reader.cancel().catch(() => void 0);
  return false;
}
__name(discard, "discard");
async function readBody(body, limit, stallMs, deadlineMs = 0) {
  if (!body) return new Uint8Array(0);
  const reader = body.getReader();
  const parts = [];
  let size = 0;
  const end = deadlineMs > 0 ? Date.now() + deadlineMs : 0;
  try {
    for (; ; ) {
      const left = end ? Math.max(1, end - Date.now()) : 0;
      const wait = end ? stallMs > 0 ? Math.min(stallMs, left) : left : stallMs;
      let read;
      try {
        read = await readWithin(reader, wait);
      } catch (err) {
        if (err instanceof BodyStalled && end && Date.now() >= end) {
          await reader.cancel().catch(() => void 0);
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
        await reader.cancel().catch(() => void 0);
        return "too-large";
      }
      parts.push(value);
    }
  } catch (err) {
    await reader.cancel().catch(() => void 0);
    return err instanceof BodyStalled ? "stalled" : "gone";
  }
}
__name(readBody, "readBody");
function randomToken(bytes2) {
  let s = "";
  for (const b of crypto.getRandomValues(new Uint8Array(bytes2))) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
__name(randomToken, "randomToken");
function nodeCookie(node, scheme) {
  return `${NODE_COOKIE}=${encodeNodeCookie(node)}; Path=/; HttpOnly; SameSite=Lax${scheme === "https" ? "; Secure" : ""}`;
}
__name(nodeCookie, "nodeCookie");
function sharedBody(answer) {
  const reader = answer.reader();
  return new ReadableStream(
    {
      async pull(controller) {
        try {
          const chunk = await reader.next();
          if (chunk === null) controller.close();
          else controller.enqueue(chunk);
        } catch (err) {
          controller.error(err);
        }
      }
    },
    { highWaterMark: 0 }
  );
}
__name(sharedBody, "sharedBody");
var RelayObject = class extends DurableObject {
  static {
    __name(this, "RelayObject");
  }
  cfg;
  store;
  tunnels = /* @__PURE__ */ new Map();
  waiters = /* @__PURE__ */ new Set();
  inFlight = 0;
  waiting = 0;
  websockets = 0;
  startedAt = Date.now();
  requests = /* @__PURE__ */ new Map();
  routeLabels = new RouteLabels();
  bodyBytes = { request: 0, response: 0 };
  /** Messages from bridges that reached the object (billed 20:1; auto-answered pings excluded). */
  messagesIn = 0;
  /** Round-robin among nodes tied on load. */
  turn = 0;
  rates;
  stats = new RelayStats();
  ttfb = new Family(
    "bridge_relay_time_to_first_byte_seconds",
    "From request to the first response body byte, seen by the relay",
    "histogram",
    TTFB_BUCKETS
  );
  joins = 0;
  /** What each node published, as in storage (`node:<name>`), loaded when first needed. */
  nodeStats = /* @__PURE__ */ new Map();
  /** Shared answers being produced, by `<key id>\n<identity>`. */
  running = /* @__PURE__ */ new Map();
  /** Jobs running here, by id: resolves once the result is stored. */
  jobsRunning = /* @__PURE__ */ new Map();
  answerMemory = new MemoryBudget(ANSWER_MEMORY);
  /** Answers produced for nobody in particular keep the object awake (a pending timer). */
  holds = 0;
  holdTimer = null;
  constructor(ctx, env) {
    super(ctx, env);
    this.cfg = settings(env);
    this.rates = new KeyRates(this.cfg.keyRate, this.cfg.keyBurst);
    this.store = new Store(ctx.storage.sql);
    ctx.setWebSocketAutoResponse(new WebSocketRequestResponsePair(PING, PONG));
    void ctx.blockConcurrencyWhile(async () => this.store.init());
    console.log(`relay object started with ${ctx.getWebSockets("bridge").length} bridge socket(s)`);
  }
  // The key-value API of the object's storage, counted with the SQL queries: each call reads or
  // writes one row of the SQLite database behind it (billed like the SQL API's rows).
  kvGet(key) {
    this.store.rowsRead += 1;
    return this.ctx.storage.get(key);
  }
  kvPut(key, value) {
    this.store.rowsWritten += 1;
    return this.ctx.storage.put(key, value);
  }
  kvDelete(key) {
    this.store.rowsWritten += 1;
    return this.ctx.storage.delete(key);
  }
  hold() {
    this.holds++;
    if (this.holdTimer === null) this.rearm();
  }
  rearm() {
    this.holdTimer = setTimeout(() => {
      this.holdTimer = null;
      if (this.holds > 0) this.rearm();
    }, 5e3);
  }
  release() {
    this.holds--;
    if (this.holds <= 0 && this.holdTimer !== null) {
      clearTimeout(this.holdTimer);
      this.holdTimer = null;
    }
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
  /** The node for a request (docs/spec/relay.md E.1, E.4): one that serves the route, the browser's
   * own node first, then the fewest open streams; ties go round-robin. */
  pick(want) {
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
    this.turn = (this.turn + 1) % 1e6;
    return tied[this.turn % tied.length];
  }
  notify() {
    const ws = [...this.waiters];
    this.waiters.clear();
    for (const w of ws) w();
  }
  /** A bridge for `want`, waiting up to `grace` for one to connect (docs/spec/relay.md section 11.6). */
  async acquire(want) {
    let t = this.pick(want);
    if (t) return t;
    const deadline = Date.now() + this.cfg.graceMs;
    this.waiting++;
    try {
      while ((t = this.pick(want)) === null) {
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
      await this.kvPut("last_disconnected_at", Date.now());
      if (!this.allTunnels().some((o) => o.phase === "open" && o.meta.node === t.meta.node)) {
        this.stats.forget(t.meta.node);
        this.nodeStats.delete(t.meta.node);
        await this.kvDelete(`node:${t.meta.node}`);
      }
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
    const { models, ...info } = hello.info;
    Object.assign(t.meta, {
      session: randomHex(8),
      node: hello.node || t.meta.client || "bridge",
      routes: hello.routes,
      connectedAt: now,
      info
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
    await this.kvPut("last_connected_at", now);
    if (models !== void 0) await this.updateNode(t.meta.node, { models: modelList(models) });
    await this.scheduleWatch();
  }
  // ================================================================================ STATS
  async nodeStatsOf(node) {
    let ns = this.nodeStats.get(node);
    if (!ns) {
      ns = await this.kvGet(`node:${node}`) ?? { models: [] };
      this.nodeStats.set(node, ns);
    }
    return ns;
  }
  async updateNode(node, change) {
    const ns = { ...await this.nodeStatsOf(node), ...change };
    this.nodeStats.set(node, ns);
    await this.kvPut(`node:${node}`, ns);
  }
  /** A STATS frame (docs/spec/wire.md section 12a): series for /_relay/metrics; the latest sample,
   * facts and models kept for /_relay/status and the status page. */
  async onStats(t, body) {
    const node = t.meta.node;
    this.stats.publish(node, body);
    if (body.kind === "sample") {
      await this.updateNode(node, { sample: { ...cleanSample(body), received_at: Date.now() / 1e3 } });
    } else if (body.kind === "node") {
      const change = { facts: cleanFacts(body) };
      if ("models" in body) change.models = modelList(body.models);
      await this.updateNode(node, change);
    }
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
        else if (event.event === "stats") await this.onStats(t, event.body);
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
    if (info.kind === "logout") return this.logout(info);
    if (info.auth === "cookie" && info.session && await this.sessionEnded(info.session)) {
      if (info.key) {
        info.auth = info.key.how;
        info.keyId = info.key.keyId;
        info.session = void 0;
        info.expiry = void 0;
      } else {
        await request.body?.cancel();
        if ((request.headers.get("upgrade") ?? "").toLowerCase() === "websocket") {
          return json(401, { error: "a valid client key or login cookie is required" });
        }
        return deny(request, new URL(request.url));
      }
    }
    if (info.keyId !== void 0) {
      const retry = this.rates.check(info.keyId, Date.now() / 1e3);
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
  ended = null;
  async endedSessions() {
    if (this.ended === null) {
      const stored = await this.ctx.storage.list({ prefix: "ended:" });
      this.store.rowsRead += stored.size;
      const now = Date.now() / 1e3;
      this.ended = /* @__PURE__ */ new Map();
      for (const [key, expiry] of stored) {
        if (expiry > now) this.ended.set(key.slice(6), expiry);
        else await this.kvDelete(key);
      }
    }
    return this.ended;
  }
  async sessionEnded(session) {
    return (await this.endedSessions()).has(session);
  }
  async logout(info) {
    if (info.session && info.expiry) {
      (await this.endedSessions()).set(info.session, info.expiry);
      await this.kvPut(`ended:${info.session}`, info.expiry);
    }
    return loggedOut();
  }
  async health() {
    const live = this.allTunnels().filter((t) => t.live);
    const [connected, left] = await Promise.all([
      this.kvGet("last_connected_at"),
      this.kvGet("last_disconnected_at")
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
    const open = this.allTunnels().filter((t) => t.phase === "open");
    const published = await Promise.all(open.map((t) => this.nodeStatsOf(t.meta.node)));
    return {
      ...await this.health(),
      uptime_s: Math.round((Date.now() - this.startedAt) / 100) / 10,
      bridge_messages_in: this.messagesIn,
      default_route: this.cfg.defaultRoute,
      route_ports: {},
      nodes_detail: open.map((t, i) => {
        const ns = published[i];
        return {
          node: t.meta.node,
          session: t.meta.session,
          routes: [...t.meta.routes].sort(),
          connected_since: isoTime(t.meta.connectedAt),
          streams: t.conn.openStreams,
          models: ns.models,
          draining: t.draining,
          info: t.meta.info,
          ...ns.sample ? { sample: ns.sample } : {},
          ...ns.facts ? { facts: ns.facts } : {}
        };
      })
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
      `bridge_relay_body_bytes_total{direction="response"} ${this.bodyBytes.response}`,
      "# HELP bridge_relay_idempotent_joins_total Repeated requests served from a generation in flight or finished",
      "# TYPE bridge_relay_idempotent_joins_total counter",
      `bridge_relay_idempotent_joins_total ${this.joins}`,
      "# HELP bridge_relay_storage_rows_total Rows of the object's SQLite storage read and written by the relay (billed; key-value calls count one each)",
      "# TYPE bridge_relay_storage_rows_total counter",
      `bridge_relay_storage_rows_total{op="read"} ${this.store.rowsRead}`,
      `bridge_relay_storage_rows_total{op="written"} ${this.store.rowsWritten}`,
      ...this.ttfb.render(),
      ...this.stats.render()
    );
    return lines.join("\n") + "\n";
  }
  count(route, status) {
    if (!status) return;
    const k = `${this.routeLabels.label(route)}
${status}`;
    this.requests.set(k, (this.requests.get(k) ?? 0) + 1);
  }
  async login(request, info) {
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
      return json(408, { error: `request body too slow: not complete within ${deadline / 1e3} s` }, { connection: "close" });
    }
    if (body === "gone") return json(400, { error: "the login form did not arrive" });
    const form = new URLSearchParams(fromUtf8(body));
    const key = (form.get("key") ?? "").trim();
    next = safeNext(form.get("next") ?? next);
    const keyId = await checkKey(this.env, key);
    if (keyId === null) {
      const storeKey = `login_failures:${info.client}`;
      const now = Date.now();
      const failures = (await this.kvGet(storeKey) ?? []).filter((ts) => ts > now - 6e4);
      if (failures.length >= LOGIN_RATE) {
        return json(429, { error: "too many failed logins; wait a minute" }, { "retry-after": "60" });
      }
      failures.push(now);
      await this.kvPut(storeKey, failures);
      console.warn(`failed login from ${info.client || "?"}`);
      return loginPage(401, next, "That key is not valid.");
    }
    const retry = this.rates.check(keyId, Date.now() / 1e3);
    if (retry) return json(429, { error: KEY_RATE_REFUSAL }, { "retry-after": String(retry) });
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
    const headers = withUser(
      forwardHeaders(
        request,
        info.auth,
        info.prefix ?? "",
        info.client,
        info.scheme,
        this.cfg.cookieRoutes
      ),
      info.route ?? "",
      this.cfg.userRoute,
      info.keyId
    );
    if (typeof info.acceptEncoding !== "string") return headers;
    const out = headers.filter(([k]) => k !== "accept-encoding");
    if (info.acceptEncoding) out.splice(0, 0, ["accept-encoding", info.acceptEncoding]);
    return out;
  }
  /** The node a logged-in browser was on (its `bridge_node` cookie), for cookie logins only. */
  sticky(request, info) {
    if (info.auth !== "cookie") return null;
    const [value] = cookieValues(request.headers.get("cookie"), NODE_COOKIE);
    return value ? decodeNodeCookie(value) : null;
  }
  // ================================================================================ proxied requests
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
    let body = hasBody ? null : new Uint8Array(0);
    if (hasBody && length !== void 0 && Number(length) <= BUFFER_LIMIT) {
      const read = await readBody(request.body, Number(length), this.cfg.bodyTimeoutMs);
      if (read === "stalled" || read === "late") {
        this.count(route, 408);
        return json(408, { error: BODY_STALLED }, { connection: "close" });
      }
      if (read === "gone" || read === "too-large") return json(400, { error: "the request body did not arrive whole" });
      body = read;
      this.bodyBytes.request += read.byteLength;
    }
    const want = { route, sticky: this.sticky(request, info) };
    if (body !== null) {
      const held = { method, route, target: info.target, headers, body, client: info.client };
      const identity = await this.identity(held);
      if (identity !== null) {
        const shared = this.sharedRequest(`${info.keyId ?? ""}
${identity}`, held, want, info.prefix ?? "");
        if (shared) return shared;
      }
    }
    return this.plain(request, info, headers, body, want);
  }
  /** Proxy one request for one client (the body held, or streamed from the client). */
  async plain(request, info, headers, held, want) {
    const route = want.route;
    const method = request.method;
    const started = Date.now();
    const hasBody = held === null || held.byteLength > 0;
    const discard2 = /* @__PURE__ */ __name(async () => {
      if (held === null) await request.body?.cancel().catch(() => void 0);
    }, "discard");
    this.inFlight++;
    let finished = false;
    const finish = /* @__PURE__ */ __name((status) => {
      if (finished) return;
      finished = true;
      this.inFlight--;
      this.count(route, status);
    }, "finish");
    try {
      const tunnel = await this.acquire(want);
      if (!tunnel) {
        await discard2();
        finish(503);
        return json(503, { error: "no bridge is connected; try again shortly" }, { "retry-after": "10" });
      }
      if (tunnel.meta.routes.length && !tunnel.meta.routes.includes(route)) {
        await discard2();
        finish(404);
        return json(404, { error: `unknown route '${route}'` });
      }
      let stream;
      try {
        stream = tunnel.open(method, route, info.target, headers, !hasBody, { client: info.client });
      } catch (err) {
        await discard2();
        if (err instanceof StreamError) {
          finish(503);
          return json(503, { error: "the bridge is serving as many requests as it can; try again shortly" }, { "retry-after": "5" });
        }
        finish(431);
        return json(431, { error: "request header fields too large" });
      }
      let pumped = null;
      if (held !== null && held.byteLength) this.ctx.waitUntil(stream.write(held, true).catch(() => void 0));
      else if (hasBody) {
        pumped = this.pumpRequest(request.body, stream);
        this.ctx.waitUntil(pumped);
      }
      let head;
      try {
        head = await stream.head;
      } catch (err) {
        const e = err;
        if (e.reason === BODY_STALLED) {
          finish(408);
          return json(408, { error: BODY_STALLED }, { connection: "close" });
        }
        const failed = streamFailed(e.code, route);
        console.warn(`stream ${stream.id} (${method} ${route}) failed before its answer: ${e.code} ${e.reason}`);
        finish(failed.status);
        if (e.code === 16 /* BODY_TOO_LARGE */ && pumped !== null && !await pumped) {
          return json(failed.status, failed.body, { ...failed.headers, connection: "close" });
        }
        return json(failed.status, failed.body, failed.headers);
      }
      let status = head.status;
      const passed = cleanResponseHeaders(status, head.headers, info.prefix ?? "", info.target ?? "/");
      if (passed === null) {
        console.warn(`node ${tunnel.meta.node} sent an invalid response head (status ${status})`);
        stream.reset(1 /* PROTOCOL_ERROR */, `status ${status} cannot be relayed here`);
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
      let left = declaredLength(passed);
      let first = true;
      const self = this;
      const body = new ReadableStream(
        {
          async pull(controller) {
            try {
              for (; ; ) {
                const chunk = await stream.read();
                if (first) {
                  first = false;
                  self.ttfb.observe({}, (Date.now() - started) / 1e3);
                }
                if (chunk === null) {
                  if (left) throw new StreamError(10 /* UPSTREAM_ERROR */, `ended ${left} bytes short`);
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
              console.warn(`stream ${stream.id} (${method} ${route}) cut mid-response: ${err.message}`);
              if (!stream.done) stream.reset(6 /* CANCEL */, "response cut");
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
  async pumpRequest(body, stream) {
    const reader = body.getReader();
    let total = 0;
    try {
      for (; ; ) {
        const { value, done } = await readWithin(reader, this.cfg.bodyTimeoutMs);
        if (done) {
          await stream.write(new Uint8Array(0), true);
          return true;
        }
        total += value.byteLength;
        this.bodyBytes.request += value.byteLength;
        if (this.cfg.maxBody && total > this.cfg.maxBody) {
          stream.reset(16 /* BODY_TOO_LARGE */, `body exceeds ${this.cfg.maxBody} bytes`);
          return await discard(reader, DISCARD_AFTER_413);
        }
        await stream.write(value);
      }
    } catch (err) {
      if (err instanceof BodyStalled) stream.reset(6 /* CANCEL */, BODY_STALLED);
      else if (!(err instanceof StreamError)) stream.reset(6 /* CANCEL */, "client went away");
      try {
        await reader.cancel();
      } catch {
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
  async identity(req) {
    if (this.cfg.idempotencyTtl <= 0) return null;
    const explicit = headerOf(req.headers, "idempotency-key");
    let identity;
    if (explicit) identity = `key:${req.route}:${explicit.slice(0, 256)}`;
    else if (req.method === "POST" && deterministic(req.body)) {
      const digest = await crypto.subtle.digest("SHA-256", concat([utf82(`${req.method} ${req.route} ${req.target}
`), req.body]));
      identity = `sha256:${[...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
    } else return null;
    const credentials = [headerOf(req.headers, "authorization"), headerOf(req.headers, "cookie")];
    if (credentials.some((c) => c !== void 0)) identity += `:credentials:${(await sha256Hex(JSON.stringify(credentials))).slice(0, 32)}`;
    return identity;
  }
  /** Serve a shared request: join the answer in flight, replay a finished one, or start it. Null
   * when it cannot be shared now (too many being produced): the caller serves it uncached. */
  sharedRequest(slot, req, want, prefix = "") {
    const [keyId, identity] = [slot.slice(0, slot.indexOf("\n")), slot.slice(slot.indexOf("\n") + 1)];
    let answer = this.running.get(slot);
    let how = "joined";
    if (answer === void 0) {
      const stored = this.store.getAnswer(keyId, identity, Date.now() / 1e3, this.cfg.idempotencyTtl);
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
            this.store.putAnswer(keyId, identity, made.status, made.headers, made.body(), made.finishedAt ?? Date.now() / 1e3, this.cfg.idempotencyTtl, this.cfg.idempotencyEntries, this.cfg.idempotencyBytes);
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
  async serveShared(answer, how, method, prefix = "", target = "/") {
    const { status, headers } = await answer.head();
    const out = new Headers();
    for (const [k, v] of headers) out.append(k, k.toLowerCase() === "set-cookie" ? scopedSetCookie(v, prefix, target) : v);
    out.set("x-bridge-idempotent", how);
    if (NULL_BODY.has(status) || method === "HEAD") return new Response(null, { status, headers: out });
    return new Response(sharedBody(answer), { status, headers: out, encodeBody: "manual" });
  }
  /** Run `req` on a node into `answer`, whoever reads it (a shared request's first client may
   * leave: the answer is still made). Every failure before the answer is a complete error response
   * (issue 20); a failure mid-body breaks every reader's body. */
  async produce(answer, req, want) {
    const now = /* @__PURE__ */ __name(() => Date.now() / 1e3, "now");
    let status = 0;
    let stream = null;
    const refuse = /* @__PURE__ */ __name((code, body, extra = {}) => {
      status = code;
      const headers = [["content-type", "application/json"], ["cache-control", "no-store"], ...Object.entries(extra)];
      answer.answerWith(code, headers, utf82(JSON.stringify(body)), body.error, now());
    }, "refuse");
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
      if (req.body.byteLength) this.ctx.waitUntil(stream.write(req.body, true).catch(() => void 0));
      let head;
      try {
        head = await stream.head;
      } catch (err) {
        const e = err;
        console.warn(`stream ${stream.id} (${req.method} ${req.route}) failed before its answer: ${e.code} ${e.reason}`);
        const failed = streamFailed(e.code, req.route);
        return refuse(failed.status, failed.body, failed.headers);
      }
      const passed = cleanResponseHeaders(head.status, head.headers);
      if (passed === null) {
        stream.reset(1 /* PROTOCOL_ERROR */, `status ${head.status} cannot be relayed here`);
        return refuse(502, { error: "bridge: invalid response from the upstream" });
      }
      status = head.status;
      answer.start(status, [...passed, ["x-bridge-node", tunnel.meta.node]]);
      let left = declaredLength(passed);
      for (; ; ) {
        const chunk = await stream.read();
        if (chunk === null) {
          if (left) throw new StreamError(10 /* UPSTREAM_ERROR */, `ended ${left} bytes short`);
          break;
        }
        stream.consumed(chunk.byteLength);
        this.bodyBytes.response += chunk.byteLength;
        const part = left === null ? chunk : chunk.subarray(0, left);
        if (left !== null) left -= part.byteLength;
        if (part.byteLength && !answer.append(part)) {
          stream.reset(6 /* CANCEL */, "answer too large to share");
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
      console.warn(`shared ${req.method} ${req.route} cut mid-response: ${err.message}`);
      answer.breakOff(`cut mid-response: ${err instanceof StreamError ? `code ${err.code}` : "relay error"}`, now());
      if (stream && !stream.done) stream.reset(6 /* CANCEL */, "response cut");
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
  async jobs(request, info) {
    const keyId = info.keyId;
    const url = new URL(request.url);
    const method = request.method;
    const id = url.pathname.slice("/_relay/jobs".length).replace(/^\/+|\/+$/g, "");
    if (!id) {
      if (method === "POST") return this.submitJob(request, info);
      await request.body?.cancel();
      if (method !== "GET") return json(405, { error: "use GET or POST" });
      this.store.expireJobs(Date.now() / 1e3 - this.cfg.jobTtl);
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
      let timer;
      await Promise.race([running, new Promise((res) => timer = setTimeout(res, wait * 1e3))]);
      if (timer !== void 0) clearTimeout(timer);
      job = this.store.getJob(id, keyId, this.jobAlive) ?? job;
    }
    return json(200, describeJob(job));
  }
  /** Whether a job is running in this instance of the object (one stored as running that is not
   * was running when the object last stopped). */
  jobAlive = /* @__PURE__ */ __name((id) => this.jobsRunning.has(id), "jobAlive");
  async submitJob(request, info) {
    const keyId = info.keyId;
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
    const now = Date.now() / 1e3;
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
    const run = this.produce(answer, req, { route: req.route, sticky: null }).then(() => {
      answer.release();
      const error = answer.relayError ?? answer.broken ?? (answer.overflow ? "response too large" : null);
      this.store.finishJob(id, error === null ? "done" : "failed", answer.status, answer.headers, answer.body(), error, Date.now() / 1e3);
    }).finally(() => this.jobsRunning.delete(id));
    this.jobsRunning.set(id, run);
    return json(202, { id, state: "running", url: `/_relay/jobs/${id}` });
  }
  heldJob(spec, info) {
    const headers = withUser(
      [
        ...spec.headers,
        ["content-length", String(spec.body.byteLength)],
        ["x-forwarded-for", info.client],
        ["x-forwarded-proto", info.scheme]
      ],
      spec.route,
      this.cfg.userRoute,
      info.keyId
    );
    return { method: spec.method, route: spec.route, target: spec.path, headers, body: spec.body, client: info.client };
  }
  // ================================================================================ client WebSockets
  async clientWebSocket(request, info) {
    const route = info.route;
    const own = /* @__PURE__ */ new Set(["sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"]);
    const headers = this.openHeaders(request, info).filter(([k]) => !own.has(k));
    this.websockets++;
    let handedOver = false;
    try {
      const tunnel = await this.acquire({ route, sticky: this.sticky(request, info) });
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
        const passed = cleanResponseHeaders(head.status, head.headers, info.prefix ?? "", info.target ?? "/");
        if (passed === null) return json(502, { error: "bridge: invalid response from the upstream" });
        const out2 = new Headers();
        for (const [k, v] of passed) {
          if (k.toLowerCase() !== "content-length" && !own.has(k.toLowerCase())) out2.append(k, v);
        }
        out2.set("x-bridge-node", tunnel.meta.node);
        return new Response(NULL_BODY.has(head.status) ? null : concat(parts), { status: head.status, headers: out2 });
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
      if (typeof data === "string") up(encodeWsRecord(WS_TEXT, utf82(data)));
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

// src/index.ts
function forward(env, request, info) {
  const headers = new Headers(request.headers);
  headers.set(INTERNAL_HEADER, JSON.stringify(info));
  const stub = env.RELAY.get(env.RELAY.idFromName("relay"));
  return stub.fetch(new Request(request, { headers }));
}
__name(forward, "forward");
function foreignOrigin(env, request, url, how, websocket, login = false) {
  const origin = request.headers.get("origin");
  if (origin === null) return null;
  if (!login && !needsOriginCheck(request.method, websocket, how)) return null;
  const hosts = [url.host, request.headers.get("host") ?? ""];
  if (originAllowed(origin, hosts, settings(env).allowedOrigins)) return null;
  console.warn(`refused a ${login ? "login" : request.method} from a foreign origin`);
  return json(403, originRefused(origin));
}
__name(foreignOrigin, "foreignOrigin");
function who(auth) {
  return { auth: auth.how, keyId: auth.keyId, session: auth.session, expiry: auth.expiry, key: auth.key };
}
__name(who, "who");
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
      if (path === "/_relay/jobs" || path.startsWith("/_relay/jobs/")) {
        const auth2 = await authenticate(env, request);
        if (auth2 === null) return deny(request, url);
        const refused2 = foreignOrigin(env, request, url, auth2.how, false);
        if (refused2) return refused2;
        return forward(env, request, { kind: "jobs", ...base, ...who(auth2) });
      }
      switch (path) {
        case "/_relay/connect":
          if (isUpgrade) return forward(env, request, { kind: "bridge", ...base });
          return json(method === "GET" || method === "HEAD" ? 404 : 405, { error: "WebSocket only" });
        case "/_relay/health":
          return forward(env, request, { kind: "health", ...base });
        case "/_relay":
        case "/_relay/":
        case "/_relay/status":
        case "/_relay/metrics": {
          const auth2 = await authenticate(env, request);
          if (auth2 === null) return deny(request, url);
          const kind = path === "/_relay/status" ? "status" : path === "/_relay/metrics" ? "metrics" : "status_page";
          return forward(env, request, { kind, ...base, ...who(auth2) });
        }
        case "/_relay/login": {
          if (method === "GET") return loginPage(200, safeNext(url.searchParams.get("next")), "");
          if (method !== "POST") return json(405, { error: "use GET or POST" });
          const refused2 = foreignOrigin(env, request, url, null, false, true);
          if (refused2) {
            await request.body?.cancel();
            return refused2;
          }
          return forward(env, request, { kind: "login", ...base });
        }
        case "/_relay/logout": {
          const auth2 = await authenticate(env, request);
          if (auth2?.session) return forward(env, request, { kind: "logout", ...base, ...who(auth2) });
          return loggedOut();
        }
        default:
          return json(method === "GET" || method === "HEAD" ? 404 : 405, { error: "not found" });
      }
    }
    const auth = await authenticate(env, request);
    if (auth === null) {
      if (isUpgrade) return json(401, { error: "a valid client key or login cookie is required" });
      return deny(request, url);
    }
    const refused = foreignOrigin(env, request, url, auth.how, isUpgrade);
    if (refused) {
      await request.body?.cancel();
      return refused;
    }
    const resolved = resolve(url, settings(env).defaultRoute);
    if (resolved === null) return json(404, { error: "unknown route" });
    if (!validMethod(request.method) || !resolved.target.startsWith("/")) {
      return json(400, { error: "invalid method or request target" });
    }
    return forward(env, request, { kind: "proxy", ...base, ...resolved, ...who(auth) });
  }
};
export {
  RelayObject,
  index_default as default
};
//# sourceMappingURL=index.js.map
