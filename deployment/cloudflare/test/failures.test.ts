// What a client gets when its stream fails before the answer (src/failures.ts): the status of
// docs/spec/wire.md section 9, words from the code alone (never the bridge's reason, which may name
// an upstream's address), and Retry-After on a 503.

import { test } from "node:test";
import assert from "node:assert/strict";

import { streamFailed } from "../src/failures";
import { ErrorCode, STATUS_FOR_CODE } from "../src/wire/constants";

test("an unreachable upstream is a 502 that names the route, not the address", () => {
  const failed = streamFailed(ErrorCode.UPSTREAM_UNREACHABLE, "ollama");
  assert.equal(failed.status, 502);
  assert.deepEqual(failed.body, {
    error: "the bridge could not reach the upstream of route 'ollama' (unreachable: is it running?); try again shortly",
    code: ErrorCode.UPSTREAM_UNREACHABLE,
  });
  assert.deepEqual(failed.headers, {});
});

test("each code gets its status, and a 503 says when to retry", () => {
  for (const [code, status] of STATUS_FOR_CODE) {
    const failed = streamFailed(code, "r");
    assert.equal(failed.status, status);
    assert.equal(failed.body.code, code);
    assert.deepEqual(failed.headers, status === 503 ? { "retry-after": "5" } : {});
  }
  assert.equal(streamFailed(ErrorCode.NO_ROUTE, "absent").body.error, "unknown route 'absent'");
});

test("a code the spec gives no status gets 502 and generic words", () => {
  const failed = streamFailed(ErrorCode.CANCEL, "r");
  assert.equal(failed.status, 502);
  assert.equal(failed.body.error, "the bridge could not complete the request (error code 6); try again shortly");
});
