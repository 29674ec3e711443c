// The relay's browser-facing decisions and header rules, as pure functions (no Worker API: they run
// under node's test runner too, test/rules.test.ts). docs/security.md says why each exists:
//
//   * safeNext: the login redirect goes to a path on this relay whatever bytes arrive (§8, design
//     note 1): every byte outside RFC 3986's path and query characters is percent-encoded, then
//     anything that does not start with exactly one "/" becomes "/".
//   * needsOriginCheck / originAllowed: the Origin policy (§6) for cookie-authenticated writes and
//     WebSocket upgrades and for the login form.
//   * setCookieName / cleanResponseHeaders: an upstream never sets the relay's own cookies, whatever
//     the spelling of the name (RFC 6265bis §5.6 parse, §5), and the rest of extension
//     `response-cleaning` (docs/spec/relay.md E.13), on every response path.
//   * forwardedCookie: the relay's cookies never reach an upstream (matched by the parsed name).
//   * CLIENT_FORWARDING: request headers a client may not set because an upstream believes them.

import type { HeaderPairs } from "./wire/codec";

export const SESSION_COOKIE = "bridge_session";
/** The cookie that keeps a browser on its node (extension `sticky-nodes`). */
export const NODE_COOKIE = "bridge_node";
export const RELAY_COOKIES: ReadonlySet<string> = new Set([SESSION_COOKIE, NODE_COOKIE]);

export const HOP_BY_HOP: ReadonlySet<string> = new Set([
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

/** Drop hop-by-hop headers and every name listed in Connection (RFC 9110 section 7.6.1). */
export function stripHopByHop(headers: HeaderPairs): HeaderPairs {
  const named = new Set<string>();
  for (const [k, v] of headers) {
    if (k.toLowerCase() === "connection") for (const t of v.split(",")) named.add(t.trim().toLowerCase());
  }
  return headers.filter(([k]) => !HOP_BY_HOP.has(k.toLowerCase()) && !named.has(k.toLowerCase()));
}

// ------------------------------------------------------------------------------------ redirects
/** RFC 3986 unreserved, sub-delims, ":", "@", "/", "?" and "%" (an escape already made). */
const NEXT_KEEP = /^[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]$/;
const utf8 = new TextEncoder();

/** Where the login page may send a browser: always a path on this relay (docs/security.md §8). */
export function safeNext(raw: string | null | undefined): string {
  if (!raw) return "/";
  let out = "";
  for (const byte of utf8.encode(raw)) {
    const c = String.fromCharCode(byte);
    out += byte < 0x80 && NEXT_KEEP.test(c) ? c : "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return out.startsWith("/") && !out.startsWith("//") ? out : "/";
}

// ------------------------------------------------------------------------------------ Origin
export type AuthHow = "cookie" | "bearer" | "header";

/** Whether a request must come from one of the relay's own origins (docs/security.md §6): one the
 * browser's cookie authenticated that writes (any method but GET and HEAD) or opens a WebSocket.
 * A key-authenticated request is a program's, whatever its Origin. */
export function needsOriginCheck(method: string, websocket: boolean, how: AuthHow | null): boolean {
  if (how !== "cookie") return false;
  return websocket || (method !== "GET" && method !== "HEAD");
}

/** Whether `origin` (the request's Origin header, present) is the relay's own: `http://<host>` or
 * `https://<host>` for one of `hosts` (ASCII case-insensitive, exactly), or one of `allowed`
 * (ALLOWED_ORIGINS). `null` and anything else are not. */
export function originAllowed(origin: string, hosts: readonly string[], allowed: readonly string[]): boolean {
  const o = origin.trim().toLowerCase();
  if (!o || o === "null") return false;
  for (const host of hosts) {
    const h = host.trim().toLowerCase();
    if (h && (o === `http://${h}` || o === `https://${h}`)) return true;
  }
  return allowed.some((a) => a.trim().toLowerCase().replace(/\/+$/, "") === o);
}

export function originRefused(origin: string): { error: string } {
  return { error: `cross-origin request refused: Origin ${origin} is not this relay's` };
}

// ------------------------------------------------------------------------------------ cookies
function trimWs(s: string): string {
  return s.replace(/^[ \t]+|[ \t]+$/g, "");
}

/** The name a browser sends back for the cookie one `Set-Cookie` value makes (RFC 6265bis section
 * 5.6: whitespace around the name is dropped; a pair without a name is sent as its bare value, so
 * `=bridge_session=x` comes back as `bridge_session=x`). */
export function setCookieName(value: string): string {
  const pair = value.split(";", 1)[0] ?? "";
  const eq = pair.indexOf("=");
  const name = eq < 0 ? "" : trimWs(pair.slice(0, eq));
  if (name) return name;
  const bare = trimWs(eq < 0 ? pair : pair.slice(eq + 1));
  const eq2 = bare.indexOf("=");
  return trimWs(eq2 < 0 ? bare : bare.slice(0, eq2));
}

/** A `Cookie` request header without the relay's own cookies (by parsed name), or "" if none is
 * left. */
export function forwardedCookie(header: string): string {
  return header
    .split(";")
    .map((p) => trimWs(p))
    .filter((p) => {
      if (!p) return false;
      const eq = p.indexOf("=");
      return !RELAY_COOKIES.has(trimWs(eq < 0 ? p : p.slice(0, eq)));
    })
    .join("; ");
}

/** Every value of cookie `name` in a `Cookie` header, in order (browsers send all that match). */
export function cookieValues(header: string | null, name: string): string[] {
  const out: string[] = [];
  for (const part of (header ?? "").split(";")) {
    const eq = part.indexOf("=");
    if (eq >= 0 && trimWs(part.slice(0, eq)) === name) out.push(trimWs(part.slice(eq + 1)));
  }
  return out;
}

/** The `bridge_node` cookie's value for a node name: every byte but `A-Za-z0-9_.-~` escaped (as
 * Python's `quote(name, safe="")`, the Python relay's). */
export function encodeNodeCookie(node: string): string {
  return encodeURIComponent(node).replace(/[!'()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
}

export function decodeNodeCookie(value: string): string {
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

// ------------------------------------------------------------------------------------ requests
/** Request headers a client may not set, because an upstream believes what they say about the
 * client (docs/security.md §5): the relay sets its own X-Forwarded-* after dropping these. */
export function isClientForwarding(name: string): boolean {
  return (
    name.startsWith("x-forwarded-") ||
    name.startsWith("cf-") ||
    name === "forwarded" ||
    name === "x-real-ip" ||
    name === "true-client-ip" ||
    name === "x-client-ip"
  );
}

// ------------------------------------------------------------------------------------ responses
/** A header name (RFC 9110 token). */
const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
/** What a header value may not hold: control characters other than tab, or anything past Latin-1. */
const BAD_VALUE = /[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]/;
/** Response headers only the relay sets. */
export const OWN_RESPONSE_HEADERS: ReadonlySet<string> = new Set(["x-bridge-node", "x-bridge-idempotent"]);

export function validHeaderName(name: string): boolean {
  return TOKEN.test(name);
}

export function validHeaderValue(value: string): boolean {
  return !BAD_VALUE.test(value);
}

/** The headers of a bridge's answer as the relay passes them on (extension `response-cleaning`,
 * docs/spec/relay.md E.13, and docs/security.md §5), or null when the status cannot be passed on
 * (outside 200..599). Dropped: hop-by-hop headers, names that are not tokens, values with control
 * characters or past Latin-1, the relay's own headers, any `Set-Cookie` a browser would store as one
 * of the relay's cookies; at most one all-digits Content-Length is kept (none on 204 and 304). */
export function cleanResponseHeaders(status: number, headers: HeaderPairs, prefix = "", target = "/"): HeaderPairs | null {
  if (!(status >= 200 && status <= 599)) return null;
  let out: HeaderPairs = [];
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
    if (lengths.size === 1 && /^\d+$/.test(length!) && status !== 204 && status !== 304) {
      out.push(["content-length", length!]);
    }
  }
  return out;
}

/** An upstream's `Set-Cookie` as the relay passes it on (docs/security.md §5, the Python relay's
 * `httprules.scoped_set_cookie`): `Domain` removed; under a route prefix (`/r/<route>`) its `Path`
 * put under the prefix (an absent Path already is, but for a request to the bare prefix, and a
 * relative one becomes the prefix plus the target's directory). Unchanged when nothing applies. */
export function scopedSetCookie(value: string, prefix: string, target: string): string {
  const semi = value.indexOf(";");
  const pair = semi < 0 ? value : value.slice(0, semi);
  const rest = semi < 0 ? "" : value.slice(semi + 1);
  const kept: string[] = [];
  let path: string | null = null;
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

/** The declared body length of cleaned headers, or null. */
export function declaredLength(headers: HeaderPairs): number | null {
  for (const [k, v] of headers) if (k.toLowerCase() === "content-length") return Number(v);
  return null;
}

// ------------------------------------------------------------------------------------ bodies
function jsonObject(body: Uint8Array | null): Record<string, unknown> | null {
  if (!body || body.byteLength === 0 || body[0] !== 0x7b) return null; // "{"
  try {
    const value: unknown = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(body));
    return value !== null && typeof value === "object" && !Array.isArray(value) ? (value as Record<string, unknown>) : null;
  } catch {
    return null;
  }
}

/** A generation whose answer does not depend on chance: temperature 0 (OpenAI's top-level
 * `temperature` or Ollama's `options.temperature`), as the Python relay's `_deterministic`. */
export function deterministic(body: Uint8Array | null): boolean {
  const value = jsonObject(body);
  if (value === null) return false;
  const options = value.options;
  const temperature =
    "temperature" in value
      ? value.temperature
      : options !== null && typeof options === "object" && !Array.isArray(options)
        ? (options as Record<string, unknown>).temperature
        : undefined;
  return typeof temperature === "number" && temperature === 0;
}
