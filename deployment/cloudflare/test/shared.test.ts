// Shared answers (src/shared.ts): every reader gets the answer from its first byte; a failure
// before the answer is a complete error for all of them, one mid-body breaks every body (issue 20).

import { test } from "node:test";
import assert from "node:assert/strict";

import { AnswerBroken, MemoryBudget, SharedAnswer } from "../src/shared";
import { fromUtf8, utf8 } from "../src/wire/codec";

async function readAll(answer: SharedAnswer): Promise<string> {
  const reader = answer.reader();
  let text = "";
  for (let chunk = await reader.next(); chunk !== null; chunk = await reader.next()) text += fromUtf8(chunk);
  return text;
}

test("a reader that joins late gets every byte from the first", async () => {
  const answer = new SharedAnswer(1024);
  const early = readAll(answer);
  answer.start(200, [["content-type", "application/x-ndjson"]]);
  answer.append(utf8("one\n"));
  const late = readAll(answer);
  answer.append(utf8("two\n"));
  answer.finish(1);
  assert.equal(await early, "one\ntwo\n");
  assert.equal(await late, "one\ntwo\n");
  assert.equal(await readAll(answer), "one\ntwo\n");
  assert.deepEqual(await answer.head(), { status: 200, headers: [["content-type", "application/x-ndjson"]] });
  assert.ok(answer.ok);
  assert.equal(fromUtf8(answer.body()), "one\ntwo\n");
});

test("a failure before the answer is the same complete response for every reader, never replayed", async () => {
  const answer = new SharedAnswer(1024);
  const first = Promise.all([answer.head(), readAll(answer)]);
  const joined = Promise.all([answer.head(), readAll(answer)]);
  const body = utf8('{"error":"unknown route \'x\'","code":3}');
  answer.answerWith(404, [["content-type", "application/json"]], body, "unknown route 'x'", 2);
  for (const [head, text] of await Promise.all([first, joined])) {
    assert.equal(head.status, 404);
    assert.deepEqual(head.headers, [["content-type", "application/json"], ["content-length", String(body.byteLength)]]);
    assert.equal(text, fromUtf8(body));
  }
  assert.equal(answer.ok, false);
  assert.equal(answer.relayError, "unknown route 'x'");
});

test("a failure mid-body breaks every reader's body, the late one's too", async () => {
  const answer = new SharedAnswer(1024);
  answer.start(200, []);
  answer.append(utf8("partial"));
  const early = readAll(answer);
  answer.breakOff("cut mid-response", 3);
  await assert.rejects(early, AnswerBroken);
  await assert.rejects(readAll(answer), AnswerBroken);
  assert.equal(answer.ok, false);
});

test("an answer larger than the limit is kept for nobody", async () => {
  const answer = new SharedAnswer(8);
  answer.start(200, []);
  assert.equal(answer.append(utf8("12345")), true);
  assert.equal(answer.append(utf8("67890")), false);
  answer.finish(4);
  await assert.rejects(readAll(answer), AnswerBroken);
  assert.equal(answer.ok, false);
});

test("a recorded answer replays whole", async () => {
  const answer = SharedAnswer.recorded(201, [["x", "y"]], utf8("done"), 5);
  assert.equal(await readAll(answer), "done");
  assert.equal(answer.finishedAt, 5);
  assert.ok(answer.ok);
});

test("answers being made share one memory budget, given back when their producer is done", async () => {
  const budget = new MemoryBudget(10);
  const a = new SharedAnswer(100, budget);
  const b = new SharedAnswer(100, budget);
  a.start(200, []);
  b.start(200, []);
  assert.equal(a.append(utf8("123456")), true);
  assert.equal(b.append(utf8("12345")), false); // 11 > 10: b is cut, a is not
  assert.equal(budget.used, 6);
  a.finish(1);
  a.release();
  assert.equal(budget.used, 0);
  assert.equal(await readAll(a), "123456"); // its readers still get it whole
  const c = new SharedAnswer(100, budget);
  c.start(200, []);
  assert.equal(c.append(utf8("1234567890")), true);
});
