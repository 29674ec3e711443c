// Job submissions (src/jobs.ts): a submission is a request or a clean 400, never a 500; its headers
// pass the relay's forwarding rules.

import { test } from "node:test";
import assert from "node:assert/strict";

import { describeJob, parseJob, waitSeconds } from "../src/jobs";
import { fromUtf8, utf8 } from "../src/wire/codec";

const parse = (value: unknown): ReturnType<typeof parseJob> => parseJob(utf8(typeof value === "string" ? value : JSON.stringify(value)), "webui");

test("a submission becomes a request with a JSON body", () => {
  const spec = parse({ route: "ollama", path: "/api/chat", body: { model: "m" }, headers: { "X-Trace": "1" } });
  assert.ok(!("error" in spec));
  assert.equal(spec.method, "POST");
  assert.equal(fromUtf8(spec.body), '{"model":"m"}');
  assert.deepEqual(spec.headers, [["x-trace", "1"], ["content-type", "application/json"]]);
});

test("defaults: the default route, POST, /, and a missing body is an empty body", () => {
  const spec = parse({ method: "get" });
  assert.ok(!("error" in spec));
  assert.deepEqual([spec.route, spec.method, spec.path, spec.body.byteLength, spec.headers], ["webui", "GET", "/", 0, []]);
  const text = parse({ body: "plain" });
  assert.ok(!("error" in text));
  assert.equal(fromUtf8(text.body), "plain");
});

test("what is not a job is a 400 with a reason", () => {
  for (const bad of ["", "[]", "null", "{", '"x"', { route: 1 }, { path: "no-slash" }, { path: "/a b" }, { path: "/\u00e9" }, { method: "G T" }, { headers: [] }, { headers: { a: 1 } }, { headers: { "bad name": "x" } }, { headers: { a: "x\r\ny" } }, { headers: { a: "\u20ac" } }, { route: "../x" }]) {
    const spec = parse(bad);
    assert.ok("error" in spec && spec.error.startsWith("invalid job"), JSON.stringify(bad));
  }
});

test("a job's headers cannot set what an upstream believes about the client", () => {
  const spec = parse({
    headers: { "X-Forwarded-For": "6.6.6.6", Forwarded: "for=6.6.6.6", "X-Real-IP": "6.6.6.6", Host: "evil", "Content-Length": "9", Connection: "close", "X-Bridge-Key": "k", Cookie: "bridge_session=s; a=1", Authorization: "Bearer upstream" },
  });
  assert.ok(!("error" in spec));
  assert.deepEqual(spec.headers, [["cookie", "a=1"], ["authorization", "Bearer upstream"]]);
});

test("a job is described as the Python relay describes it", () => {
  const running = { id: "job_1", state: "running" as const, request: { route: "r" }, created: 0, finished: null, status: null, headers: [], body: new Uint8Array(0), error: null };
  assert.deepEqual(describeJob(running), { id: "job_1", state: "running", request: { route: "r" }, created_at: "1970-01-01T00:00:00Z", finished_at: null });
  const failed = { ...running, state: "failed" as const, finished: 61, status: 502, headers: [["a", "b"]] as [string, string][], body: utf8("{}"), error: "boom" };
  assert.deepEqual(describeJob(failed).response, { status: 502, headers: [["a", "b"]], body: "{}" });
  assert.equal(describeJob(failed).error, "boom");
  assert.equal(waitSeconds(new URLSearchParams("wait=5")), 5);
  assert.equal(waitSeconds(new URLSearchParams("wait=600")), 60);
  assert.equal(waitSeconds(new URLSearchParams("wait=x")), 0);
  assert.equal(waitSeconds(new URLSearchParams("")), 0);
});
