// HTTP rules shared by the Worker and the Durable Object: configuration, addressing, client
// authentication (keys as SHA-256 hashes, the signed login cookie), header rewriting, own answers.

import type { HeaderPairs } from "./wire/codec";
import {
  AuthHow,
  SESSION_COOKIE,
  cookieValues,
  forwardedCookie,
  isClientForwarding,
  safeNext,
  stripHopByHop,
} from "./rules";

export { safeNext, stripHopByHop };

export interface Env {
  RELAY: DurableObjectNamespace;
  NODE_TOKEN?: string;
  CLIENT_KEY_HASHES?: string;
  COOKIE_SECRET?: string;
  DEFAULT_ROUTE?: string;
  USER_ROUTE?: string;
  GRACE?: string;
  HEARTBEAT?: string;
  MAX_BODY?: string;
  COALESCE?: string;
  STATS_INTERVAL?: string;
  BODY_TIMEOUT?: string;
  KEY_RATE?: string;
  KEY_BURST?: string;
  IDEMPOTENCY_TTL?: string;
  IDEMPOTENCY_ENTRIES?: string;
  IDEMPOTENCY_BYTES?: string;
  JOB_TTL?: string;
  JOB_QUOTA?: string;
  JOB_BYTES?: string;
  ALLOWED_ORIGINS?: string;
  COOKIE_ROUTES?: string;
}

export const COOKIE_NAME = SESSION_COOKIE;
export const COOKIE_MAX_AGE = 7 * 24 * 3600;
export const LOGIN_RATE = 10;
/** The Worker tells the Durable Object what it resolved in this header (clients' values dropped). */
export const INTERNAL_HEADER = "x-kaggle-bridge-internal";

export interface Settings {
  defaultRoute: string;
  /** The route whose requests carry X-Bridge-User-* (the client's identity), or null: none. */
  userRoute: string | null;
  graceMs: number;
  heartbeat: number;
  maxBody: number;
  coalesce: number;
  statsInterval: number;
  /** Milliseconds a request body may stall (no byte) before 408; 0: no limit. */
  bodyTimeoutMs: number;
  keyRate: number;
  keyBurst: number;
  /** Seconds a repeated request joins or replays an answer; 0: off. */
  idempotencyTtl: number;
  idempotencyEntries: number;
  idempotencyBytes: number;
  jobTtl: number;
  jobQuota: number;
  jobBytes: number;
  /** Origins besides the relay's own that cookie-authenticated writes may come from. */
  allowedOrigins: string[];
  /** Routes under /r/ that receive the browser's cookies as the default route does (§5). */
  cookieRoutes: string[];
}

function num(value: string | undefined, fallback: number, min: number, max: number): number {
  const n = value === undefined || value === "" ? fallback : Number(value);
  if (!Number.isFinite(n) || n < min || n > max) throw new Error(`setting out of range: ${value}`);
  return n;
}

export function settings(env: Env): Settings {
  return {
    defaultRoute: env.DEFAULT_ROUTE || "webui",
    userRoute: env.USER_ROUTE === "-" ? null : env.USER_ROUTE || env.DEFAULT_ROUTE || "webui",
    graceMs: num(env.GRACE, 30, 0, 3600) * 1000,
    heartbeat: num(env.HEARTBEAT, 5, 0.05, 3600),
    maxBody: Math.floor(num(env.MAX_BODY, 0, 0, Number.MAX_SAFE_INTEGER)),
    coalesce: num(env.COALESCE, 0.05, 0, 1),
    statsInterval: num(env.STATS_INTERVAL, 60, 0, 3600),
    bodyTimeoutMs: num(env.BODY_TIMEOUT, 60, 0, 3600) * 1000,
    keyRate: num(env.KEY_RATE, 0, 0, 1e6),
    keyBurst: Math.floor(num(env.KEY_BURST, 0, 0, 1e9)),
    idempotencyTtl: num(env.IDEMPOTENCY_TTL, 300, 0, 7 * 86400),
    idempotencyEntries: Math.floor(num(env.IDEMPOTENCY_ENTRIES, 256, 0, 100_000)),
    idempotencyBytes: Math.floor(num(env.IDEMPOTENCY_BYTES, 64 * 1024 * 1024, 0, 2 ** 40)),
    jobTtl: num(env.JOB_TTL, 86400, 0, 365 * 86400),
    jobQuota: Math.floor(num(env.JOB_QUOTA, 100, 0, 1e6)),
    jobBytes: Math.floor(num(env.JOB_BYTES, 64 * 1024 * 1024, 0, 2 ** 40)),
    allowedOrigins: (env.ALLOWED_ORIGINS ?? "")
      .split(",")
      .map((o) => o.trim())
      .filter(Boolean),
    cookieRoutes: (env.COOKIE_ROUTES ?? "")
      .split(/[\s,]+/)
      .map((r) => r.trim())
      .filter(Boolean),
  };
}

export function headerOf(headers: HeaderPairs, name: string): string | undefined {
  const lname = name.toLowerCase();
  for (const [k, v] of headers) if (k.toLowerCase() === lname) return v;
  return undefined;
}

export function json(status: number, body: unknown, extra: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", "cache-control": "no-store", ...extra },
  });
}

// ------------------------------------------------------------------------------------ addressing
export interface Resolved {
  route: string;
  target: string;
  prefix: string;
}

/** Route, target and X-Forwarded-Prefix of a request (docs/spec/relay.md section 11.1); null for a bad route name. */
export function resolve(url: URL, defaultRoute: string): Resolved | null {
  const path = url.pathname;
  const query = url.search; // "" or "?..."
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

// ------------------------------------------------------------------------------------ secrets
const enc = new TextEncoder();

export async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", enc.encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Constant-time comparison of two strings (their lengths are not secret here). */
export function sameSecret(a: string, b: string): boolean {
  const x = enc.encode(a);
  const y = enc.encode(b);
  let diff = x.byteLength ^ y.byteLength;
  for (let i = 0; i < Math.max(x.byteLength, y.byteLength); i++) diff |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return diff === 0;
}

function keyHashes(env: Env): string[] {
  return (env.CLIENT_KEY_HASHES ?? "")
    .split(",")
    .map((h) => h.trim().toLowerCase())
    .filter((h) => /^[0-9a-f]{64}$/.test(h));
}

/** The id (first 16 hex digits of its hash) of the key presented, or null. Compares with all. */
export async function checkKey(env: Env, presented: string): Promise<string | null> {
  if (!presented) return null;
  const digest = await sha256Hex(presented);
  let found: string | null = null;
  for (const known of keyHashes(env)) if (sameSecret(digest, known)) found = known.slice(0, 16);
  return found;
}

function b64url(bytes: ArrayBuffer): string {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function cookieMac(env: Env, payload: string): Promise<string> {
  const secret = env.COOKIE_SECRET || `cookie:${env.NODE_TOKEN ?? ""}`;
  const key = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, [
    "sign",
  ]);
  return b64url(await crypto.subtle.sign("HMAC", key, enc.encode(payload)));
}

/** A new login's cookie: `<key id>.<session>.<expiry>.<mac>`, the session a random nonce (two
 * logins of one key in the same second are two sessions; one can end without the other). */
export async function issueCookie(env: Env, keyId: string): Promise<string> {
  const nonce = new Uint8Array(16);
  crypto.getRandomValues(nonce);
  const payload = `${keyId}.${b64url(nonce.buffer as ArrayBuffer)}.${Math.floor(Date.now() / 1000) + COOKIE_MAX_AGE}`;
  return `${payload}.${await cookieMac(env, payload)}`;
}

/** The key id and session of a valid, unexpired cookie (the older three-part form is refused: one
 * more login); the Durable Object keeps the sessions that ended (logout) until they would expire. */
async function verifyCookie(env: Env, value: string): Promise<{ keyId: string; session: string; expiry: number } | null> {
  const parts = value.split(".");
  if (parts.length !== 4) return null;
  const [keyId, session, expiry, mac] = parts as [string, string, string, string];
  if (!/^\d+$/.test(expiry) || !/^[A-Za-z0-9_-]+$/.test(session)) return null;
  if (!sameSecret(mac, await cookieMac(env, `${keyId}.${session}.${expiry}`))) return null;
  if (Number(expiry) < Date.now() / 1000) return null;
  if (!keyHashes(env).some((h) => h.startsWith(keyId) && keyId.length === 16)) return null;
  return { keyId, session, expiry: Number(expiry) };
}

export function cookieValue(request: Request, name: string): string | null {
  return cookieValues(request.headers.get("cookie"), name)[0] ?? null;
}

export type AuthMethod = AuthHow;

export interface Auth {
  how: AuthHow;
  /** The key's id: the first 16 hex digits of its SHA-256 digest. */
  keyId: string;
  /** A cookie login's session (the cookie's MAC) and when it expires (Unix seconds). */
  session?: string;
  expiry?: number;
  /** A cookie login that also presented a valid key: what the object uses instead when the cookie's
   * session ended (logout), as the Python relay, which checks the session before the key, would. */
  key?: { how: AuthHow; keyId: string };
}

/** How the client authenticated and with which key (docs/spec/relay.md section 11.3), or null.
 * Several session cookies (browsers send every one that matches): the first valid one counts. */
export async function authenticate(env: Env, request: Request): Promise<Auth | null> {
  for (const cookie of cookieValues(request.headers.get("cookie"), COOKIE_NAME)) {
    const found = await verifyCookie(env, cookie);
    if (found) {
      const key = await presentedKey(env, request);
      return key ? { how: "cookie", ...found, key } : { how: "cookie", ...found };
    }
  }
  return presentedKey(env, request);
}

/** The first valid key the request presents (Authorization: Bearer, then X-Bridge-Key), or null. */
async function presentedKey(env: Env, request: Request): Promise<{ how: AuthHow; keyId: string } | null> {
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

/** Logout's answer: the cookie cleared, back to the login page. */
export function loggedOut(): Response {
  return new Response(null, {
    status: 303,
    headers: { location: "/_relay/login", "set-cookie": `${COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax` },
  });
}

export function deny(request: Request, url: URL): Response {
  const accept = request.headers.get("accept") ?? "";
  if (request.method === "GET" && accept.includes("text/html") && request.headers.get("upgrade") === null) {
    const next = encodeURIComponent(url.pathname + url.search);
    return new Response(null, {
      status: 303,
      headers: { location: `/_relay/login?next=${next}`, "cache-control": "no-store" },
    });
  }
  return json(
    401,
    { error: "a valid client key is required: Authorization: Bearer <key>, X-Bridge-Key, or log in at /_relay/login" },
    { "www-authenticate": 'Bearer realm="bridge"' },
  );
}

// ------------------------------------------------------------------------------------ forwarding
/** The request headers for OPEN (docs/spec/relay.md section 11.2, docs/security.md §5), lower-case
 * names: hop-by-hop headers, every forwarding header a client sent (an upstream would believe it),
 * the relay's own key and cookies (by parsed name) are dropped (every cookie for a route under /r/
 * not in `cookieRoutes`), the relay's X-Forwarded-* added. */
export function forwardHeaders(
  request: Request,
  auth: AuthMethod,
  prefix: string,
  client: string,
  scheme: string,
  cookieRoutes: readonly string[] = [],
): HeaderPairs {
  // The default route (at /) gets the browser's cookies; a route under /r/ only when listed.
  const sendCookies = !prefix || cookieRoutes.includes(prefix.slice(3));
  const raw: HeaderPairs = [];
  request.headers.forEach((value, name) => raw.push([name.toLowerCase(), value]));
  const out: HeaderPairs = [];
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

// ------------------------------------------------------------------------------------ the user
/** Who the client is, for an upstream that signs users in from a trusted proxy's headers (Open
 * WebUI's trusted-header sign-in), as the Python relay says it (bridge/httprules.py `with_user`):
 * every `x-bridge-user-*` header a client sent is dropped; on the user route, for an authenticated
 * key, `x-bridge-user-email: <key id>@relay.invalid` and `x-bridge-user-name: <key id>` are added. */
export function withUser(headers: HeaderPairs, route: string, userRoute: string | null, keyId: string | undefined): HeaderPairs {
  const out = headers.filter(([k]) => !k.toLowerCase().startsWith("x-bridge-user-"));
  if (keyId && userRoute !== null && route === userRoute) {
    out.push(["x-bridge-user-email", `${keyId.toLowerCase()}@relay.invalid`]);
    out.push(["x-bridge-user-name", keyId]);
  }
  return out;
}

// ------------------------------------------------------------------------------------ login page
function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

export function loginPage(status: number, next: string, error: string): Response {
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
      "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    },
  });
}

function gib(value: unknown): string {
  return typeof value === "number" ? (value / 2 ** 30).toFixed(1) : "?";
}

/** The GPU memory column: one line per GPU of the node's latest STATS sample. */
function gpuCell(sample: Record<string, unknown> | undefined): string {
  const gpus = (sample?.gpus as Array<Record<string, unknown>> | undefined) ?? [];
  if (!gpus.length) return '<span class="muted">no GPU reported</span>';
  return gpus
    .map((g) => {
      const util = typeof g.utilization_percent === "number" ? `, ${g.utilization_percent.toFixed(0)}% busy` : "";
      const name = escapeHtml(String(g.name ?? "GPU"));
      return `${escapeHtml(String(g.index ?? ""))}: ${name} ${gib(g.memory_used_bytes)}/${gib(g.memory_total_bytes)} GiB${util}`;
    })
    .join("<br>");
}

/** The page at `/_relay/` (authenticated): health at a glance and one row per bridge with its
 * routes, models, streams, GPU memory and session end (from STATS), as the Python relay's
 * (bridge/relay/pages.py). */
export function statusPage(status: Record<string, unknown>): Response {
  const nodes = (status.nodes_detail as Array<Record<string, unknown>> | undefined) ?? [];
  const state = status.node_connected
    ? '<span class="ok">serving</span>'
    : '<span class="bad">no bridge connected</span>';
  const muted = '<span class="muted">-</span>';
  const rows = nodes.map((n) => {
    const facts = (n.facts as Record<string, unknown> | undefined) ?? {};
    const listed = ((n.models as unknown[] | undefined)?.length ? n.models : facts.models) as unknown[] | undefined;
    const models = (listed ?? []).filter((m): m is string => typeof m === "string").map(escapeHtml).join(", ");
    const ends = facts.session_ends_at;
    return (
      `<tr><td>${escapeHtml(String(n.node ?? ""))}<br><span class="muted">since ${escapeHtml(String(n.connected_since ?? ""))}</span></td>` +
      `<td>${n.draining ? '<span class="warn">draining</span>' : '<span class="ok">up</span>'}</td>` +
      `<td>${escapeHtml(((n.routes as string[] | undefined) ?? []).join(", "))}</td>` +
      `<td>${models || muted}</td>` +
      `<td>${Number(n.streams ?? 0)}</td>` +
      `<td>${gpuCell(n.sample as Record<string, unknown> | undefined)}</td>` +
      `<td>${ends ? escapeHtml(String(ends)) : muted}</td></tr>`
    );
  });
  const table = rows.length
    ? "<table><tr><th>Node</th><th>State</th><th>Routes</th><th>Models</th><th>Streams</th>" +
      `<th>GPU memory</th><th>Session ends</th></tr>${rows.join("")}</table>`
    : '<p class="muted">No bridge is connected. Requests wait for one, then get 503.</p>';
  const tile = (label: string, key: string) =>
    `<div><span class="muted">${label}</span><b>${escapeHtml(String(status[key] ?? 0))}</b></div>`;
  const tiles = [
    tile("Bridges", "nodes"),
    tile("Requests in flight", "requests_in_flight"),
    tile("Waiting for a bridge", "requests_waiting"),
    tile("WebSockets open", "websockets_open"),
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
<a href="/_relay/status">JSON</a> · <a href="/_relay/metrics">metrics</a> · <a href="/">Open WebUI</a> ·
<a href="/_relay/logout">log out</a></p>
<div class="grid">${tiles}</div>
${table}</div></main></body></html>`;
  return new Response(page, {
    headers: {
      "content-type": "text/html; charset=utf-8",
      "cache-control": "no-store",
      "x-frame-options": "DENY",
      "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'",
    },
  });
}

export function isoTime(ms: number | null | undefined): string | null {
  if (ms === null || ms === undefined) return null;
  return new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");
}
