// The Cloudflare relay's browser-facing rules (src/rules.ts), judged by the standards browsers
// implement rather than by the relay's own code: where a `Location` leads by the WHATWG URL standard
// (Node's URL), which cookie a browser stores from a `Set-Cookie` by RFC 6265bis section 5.6 (the
// same reading as tests/security_rules.py, written out below). Random inputs come from a seeded
// generator, so a failure names its input and repeats.

import { test } from "node:test";
import assert from "node:assert/strict";

import {
  cleanResponseHeaders,
  cookieValues,
  decodeNodeCookie,
  deterministic,
  encodeNodeCookie,
  forwardedCookie,
  isClientForwarding,
  needsOriginCheck,
  originAllowed,
  safeNext,
  scopedSetCookie,
  setCookieName,
} from "../src/rules";
import { utf8 } from "../src/wire/codec";

/** A small seeded generator (mulberry32). */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Strings made of what breaks parsers: slashes, backslashes, whitespace, controls, escapes,
 * separators, letters, and characters beyond ASCII. */
function hostile(rand: () => number, n: number): string {
  const alphabet = ["/", "\\", "\t", "\r", "\n", " ", "\0", "\x7f", "%", "%2f", "%5c", ".", ":", "@", "?", "#", "e", "v", "l", "=", ";", "\u2028", "\u00e9", "\ufeff", "\u3000", "\u{1f600}"];
  let s = "";
  for (let i = 0; i < n; i++) s += alphabet[Math.floor(rand() * alphabet.length)];
  return s;
}

// ------------------------------------------------------------------------------------ next
const LOGIN = "http://relay.example:8000/_relay/login";

function staysOnRelay(location: string): boolean {
  return new URL(location, LOGIN).origin === new URL(LOGIN).origin;
}

test("the login redirect stays on the relay for the values issue 16 found", () => {
  for (const next of ["/\t/evil.example", "/\\evil.example", "//evil.example", "/\r\n/evil.example", "\t//evil.example", "https://evil.example", "/\u2028/evil", "\\\\evil.example", "/%09/evil"]) {
    const location = safeNext(next);
    assert.ok(location.startsWith("/") && !location.startsWith("//"), `${JSON.stringify(next)} -> ${location}`);
    assert.ok(staysOnRelay(location), `${JSON.stringify(next)} -> ${location}`);
    assert.ok(/^[\x21-\x7e]*$/.test(location), `${JSON.stringify(next)} -> ${location}: not a plain header value`);
  }
});

test("ordinary paths and queries come back unchanged", () => {
  for (const next of ["/", "/r/ollama/api/tags", "/c/123?model=qwen3:8b&x=%20y", "/_relay/"]) assert.equal(safeNext(next), next);
  assert.equal(safeNext(null), "/");
  assert.equal(safeNext(""), "/");
  assert.equal(safeNext("relative"), "/");
  assert.equal(safeNext("/a b"), "/a%20b");
  assert.equal(safeNext("/\u00e9"), "/%C3%A9");
});

test("no byte sequence sends the browser elsewhere (5,000 random values)", () => {
  const rand = random(16);
  for (let i = 0; i < 5000; i++) {
    const next = hostile(rand, 1 + Math.floor(rand() * 12));
    const location = safeNext(next);
    assert.ok(staysOnRelay(location), `${JSON.stringify(next)} -> ${location}`);
    assert.ok(/^\/(?!\/)[\x21-\x7e]*$/.test(location), `${JSON.stringify(next)} -> ${location}`);
  }
});

// ------------------------------------------------------------------------------------ Origin
test("only cookie-authenticated writes and WebSocket upgrades are checked", () => {
  assert.equal(needsOriginCheck("POST", false, "cookie"), true);
  assert.equal(needsOriginCheck("DELETE", false, "cookie"), true);
  assert.equal(needsOriginCheck("OPTIONS", false, "cookie"), true);
  assert.equal(needsOriginCheck("GET", true, "cookie"), true);
  assert.equal(needsOriginCheck("GET", false, "cookie"), false);
  assert.equal(needsOriginCheck("HEAD", false, "cookie"), false);
  for (const how of ["bearer", "header", null] as const) {
    assert.equal(needsOriginCheck("POST", true, how), false);
  }
});

test("the relay's own origins and the allowed ones pass, nothing else", () => {
  const hosts = ["relay.example:8000"];
  assert.ok(originAllowed("http://relay.example:8000", hosts, []));
  assert.ok(originAllowed("HTTPS://Relay.Example:8000", hosts, []));
  assert.ok(originAllowed("https://app.example", hosts, ["https://app.example/"]));
  for (const origin of ["null", "", "http://evil.example", "http://relay.example", "http://relay.example:8001", "http://relay.example:8000/", "http://relay.example:8000.evil.example", "http://sub.relay.example:8000"]) {
    assert.equal(originAllowed(origin, hosts, []), false, origin);
  }
});

// ------------------------------------------------------------------------------------ cookies
/** RFC 6265bis section 5.6 (the reading of tests/security_rules.py): the name a browser sends back
 * for the cookie a Set-Cookie value stores, or null when it stores none. */
function browserStores(header: string): string | null {
  if (/[\x00-\x08\x0a-\x1f\x7f]/.test(header)) return null;
  const pair = header.split(";")[0]!;
  const eq = pair.indexOf("=");
  const trim = (s: string): string => s.replace(/^[ \t]+|[ \t]+$/g, "");
  const [name, value] = eq < 0 ? ["", trim(pair)] : [trim(pair.slice(0, eq)), trim(pair.slice(eq + 1))];
  if (!name && !value) return null;
  if (name) return name;
  return value.includes("=") ? trim(value.split("=")[0]!) : "";
}

test("a Set-Cookie of the relay's cookies is dropped however its name is spelled", () => {
  const spoofed = ["bridge_session=PLANTED; Path=/", "bridge_session =PLANTED", "=bridge_session=PLANTED", "bridge_node=PLANTED", " \tbridge_node\t= x", "= bridge_session =x"];
  const headers: [string, string][] = [...spoofed.map((v): [string, string] => ["Set-Cookie", v]), ["Set-Cookie", "app=kept"], ["set-cookie", "bridge_sessionx=kept"]];
  const out = cleanResponseHeaders(200, headers)!;
  assert.deepEqual(out.filter(([k]) => k.toLowerCase() === "set-cookie").map(([, v]) => v), ["app=kept", "bridge_sessionx=kept"]);
});

test("no Set-Cookie that a browser stores as a relay cookie passes (5,000 random values)", () => {
  const rand = random(6265);
  const parts = ["bridge_session", "bridge_node", "=", " ", "\t", ";", "x", "PLANTED", "Path=/", "bridge"];
  for (let i = 0; i < 5000; i++) {
    let value = "";
    for (let j = 0, n = 1 + Math.floor(rand() * 6); j < n; j++) value += parts[Math.floor(rand() * parts.length)];
    const out = cleanResponseHeaders(200, [["set-cookie", value]])!;
    const stored = browserStores(value);
    if (stored === "bridge_session" || stored === "bridge_node") assert.equal(out.length, 0, JSON.stringify(value));
    if (out.length) assert.equal(["bridge_session", "bridge_node"].includes(setCookieName(value)), false);
  }
});

test("the relay's cookies never reach an upstream, by parsed name", () => {
  assert.equal(forwardedCookie("a=1; bridge_session=s; bridge_node=n; b=2"), "a=1; b=2");
  assert.equal(forwardedCookie(" bridge_session =s;bridge_node;token=t"), "token=t");
  assert.equal(forwardedCookie("bridge_session=s"), "");
  assert.deepEqual(cookieValues("x=1; bridge_session=a; bridge_session = b", "bridge_session"), ["a", "b"]);
  assert.deepEqual(cookieValues(null, "bridge_session"), []);
});

test("a node name survives the bridge_node cookie", () => {
  for (const node of ["alpha", "kaggle-7f3a.b_c", "name with spaces", "a;b=c", "é!'()*"]) {
    const value = encodeNodeCookie(node);
    assert.ok(/^[A-Za-z0-9%._~-]*$/.test(value), value);
    assert.equal(decodeNodeCookie(value), node);
  }
  assert.equal(decodeNodeCookie("%E0%A4%A"), "%E0%A4%A"); // malformed: taken as it is
});

// ------------------------------------------------------------------------------------ headers
test("a bridge's response head is cleaned (response-cleaning)", () => {
  const out = cleanResponseHeaders(200, [
    ["content-type", "text/plain"],
    ["x-bridge-node", "forged"],
    ["X-Bridge-Idempotent", "replayed"],
    ["x-control", "a\x01b"],
    ["x-wide", "\u20ac"],
    ["bad name", "x"],
    ["connection", "x-hop"],
    ["x-hop", "1"],
    ["transfer-encoding", "chunked"],
    ["content-length", "5"],
    ["content-length", "7"],
  ]);
  assert.deepEqual(out, [["content-type", "text/plain"]]);
  assert.deepEqual(cleanResponseHeaders(200, [["content-length", "5"], ["Content-Length", " 5 "]]), [["content-length", "5"]]);
  assert.deepEqual(cleanResponseHeaders(204, [["content-length", "5"]]), []);
  assert.equal(cleanResponseHeaders(101, []), null);
  assert.equal(cleanResponseHeaders(600, []), null);
});

test("clients cannot set the forwarding headers an upstream believes", () => {
  for (const name of ["forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip", "x-forwarded-for", "x-forwarded-anything"]) {
    assert.ok(isClientForwarding(name), name);
  }
  for (const name of ["authorization", "cookie", "x-request-id", "origin"]) assert.equal(isClientForwarding(name), false, name);
});

// ------------------------------------------------------------------------------------ bodies
test("temperature 0, at the top or in options, makes a request deterministic", () => {
  const yes = ['{"temperature": 0}', '{"options": {"temperature": 0.0}}', '{"model": "m", "temperature": -0}'];
  const no = ['{"temperature": 0.1}', '{"temperature": null, "options": {"temperature": 0}}', '{"temperature": false}', '{"options": [0]}', "[0]", "", "{", '{"temperature": "0"}'];
  for (const body of yes) assert.equal(deterministic(utf8(body)), true, body);
  for (const body of no) assert.equal(deterministic(utf8(body)), false, body);
  assert.equal(deterministic(null), false);
});

test("a route under /r/ sets cookies only under its prefix; Domain is always removed", () => {
  // [value, target, request path as the browser sent it]
  const cases: [string, string, string][] = [
    ["t=1", "/", "/r/up"],
    ["t=1", "/", "/r/up/"],
    ["t=1", "/x", "/r/up/x"],
    ["t=1; Path=/", "/x", "/r/up/x"],
    ["t=1; Path=/r", "/x", "/r/up/x"],
    ["t=1; path=rel; Domain=relay.example", "/a/b?q=1", "/r/up/a/b"],
    ["t=1; Path=; HttpOnly", "/a/b", "/r/up/a/b"],
  ];
  for (const [value, target, requestPath] of cases) {
    const scoped = scopedSetCookie(`${value}; Domain=relay.example`, "/r/up", target);
    assert.ok(!scoped.toLowerCase().includes("domain"), scoped);
    const path = /;\s*path=([^;]*)/i.exec(scoped)?.[1]?.trim() ?? "";
    const where = path.startsWith("/") ? path : requestPath.slice(0, requestPath.lastIndexOf("/")) || "/";
    assert.ok(where === "/r/up" || where.startsWith("/r/up/"), `${value} at ${requestPath}: ${scoped}`);
  }
  assert.equal(scopedSetCookie("token=1; Path=/; HttpOnly", "", "/x"), "token=1; Path=/; HttpOnly");
  assert.equal(scopedSetCookie("app_cookie=kept", "/r/up", "/say"), "app_cookie=kept");
  assert.equal(scopedSetCookie("token=1; Domain=.relay.example; Path=/", "", "/"), "token=1; Path=/");
});
