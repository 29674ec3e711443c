// Per-key rates (src/limits.ts): a token bucket per key, time given by the test.

import { test } from "node:test";
import assert from "node:assert/strict";

import { KeyRates, MAX_ROUTE_LABELS, RouteLabels, TokenBucket } from "../src/limits";

test("a bucket allows its burst, then its rate", () => {
  const bucket = new TokenBucket(0.5, 3, 100);
  assert.deepEqual([1, 2, 3, 4].map(() => bucket.allow(100)), [true, true, true, false]);
  assert.equal(bucket.allow(101), false); // half a token
  assert.equal(bucket.allow(102), true); // one more after 2 s
  assert.equal(bucket.allow(1000), true);
  assert.deepEqual([1, 2, 3].map(() => bucket.allow(1000)), [true, true, false]); // refilled to the burst only
});

test("each key has its own bucket, and the refusal says when to retry", () => {
  const rates = new KeyRates(0.2, 3);
  assert.deepEqual([0, 0, 0, 0].map(() => rates.check("alice", 10)), [0, 0, 0, 5]);
  assert.equal(rates.check("bob", 10), 0);
  assert.equal(rates.check("alice", 15), 0);
});

test("no rate is no limit, and the default burst is ten times the rate", () => {
  const off = new KeyRates(0, 0);
  for (let i = 0; i < 1000; i++) assert.equal(off.check("k", 0), 0);
  assert.equal(new KeyRates(2, 0).burst, 20);
  assert.equal(new KeyRates(0.01, 0).burst, 1);
});

test("route labels of the request counter are bounded: bad names and names past 64 are 'other'", () => {
  const labels = new RouteLabels();
  assert.equal(labels.label("ollama"), "ollama");
  assert.equal(labels.label("x".repeat(40_000)), "other");
  assert.equal(labels.label("Not-A-Route"), "other");
  const seen = new Set<string>(["ollama"]);
  for (let i = 0; i < 1000; i++) seen.add(labels.label(`r${i}`));
  assert.equal(labels.label("ollama"), "ollama");
  assert.equal(seen.size, MAX_ROUTE_LABELS + 1);
  assert.ok(seen.has("other") && seen.has("r62") && !seen.has("r63"));
});
