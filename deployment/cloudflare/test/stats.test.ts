// STATS into Prometheus series (src/stats.ts): names, labels and bounds as the Python relay's
// bridge/stats.py; a bridge cannot break the text format or grow the series without bound.

import { test } from "node:test";
import assert from "node:assert/strict";

import { MAX_SERIES_PER_NODE, RelayStats, cleanFacts, cleanSample, modelList } from "../src/stats";

test("a request's measurements become histograms and counters labelled by node, route, model", () => {
  const stats = new RelayStats();
  stats.publish("n1", { kind: "request", route: "ollama", model: "qwen3:8b", status: 200, ttft_s: 0.2, total_s: 3, tokens_per_s: 31, prompt_tokens: 12, completion_tokens: 90 });
  const text = stats.render().join("\n");
  assert.match(text, /^# TYPE bridge_request_duration_seconds histogram$/m);
  assert.match(text, /^bridge_request_duration_seconds_bucket\{node="n1",route="ollama",model="qwen3:8b",le="5.0"\} 1.0$/m);
  assert.match(text, /^bridge_request_duration_seconds_bucket\{node="n1",route="ollama",model="qwen3:8b",le="2.5"\} 0.0$/m);
  assert.match(text, /^bridge_request_ttft_seconds_sum\{node="n1",route="ollama",model="qwen3:8b"\} 0.2$/m);
  assert.match(text, /^bridge_completion_tokens_total\{node="n1",route="ollama",model="qwen3:8b"\} 90.0$/m);
  assert.match(text, /^bridge_node_requests_total\{node="n1",route="ollama",model="qwen3:8b",status="200"\} 1.0$/m);
});

test("wrong types are dropped field by field, labels are escaped and bounded", () => {
  const stats = new RelayStats();
  stats.publish("n", { kind: "request", route: 'a"b\\c\nd', model: "m".repeat(100), total_s: "slow", ttft_s: -1, tokens_per_s: true, completion_tokens: Infinity });
  const text = stats.render().join("\n");
  assert.match(text, /route="a\\"b\\\\c\\nd"/);
  assert.match(text, new RegExp(`model="${"m".repeat(64)}"`));
  assert.doesNotMatch(text, /duration|ttft|decode|completion/);
  for (let i = 0; i < 200; i++) stats.publish("n", { kind: "request", route: "r", model: `m${i}` });
  assert.ok(stats.requests.size <= MAX_SERIES_PER_NODE + 1);
  assert.match(stats.render().join("\n"), /model="other"/);
});

test("a sample sets the node's gauges, which go when the node leaves", () => {
  const stats = new RelayStats();
  const sample = { kind: "sample", gpus: [{ index: 0, name: "Tesla T4", memory_used_bytes: 5e9, memory_total_bytes: 15e9, utilization_percent: 40, power_w: 30, bogus: 1 }], cpu_percent: 50, ram_used_bytes: 1e9 };
  stats.publish("n", sample);
  stats.publish("m", sample);
  let text = stats.render().join("\n");
  assert.match(text, /^bridge_gpu_utilization_ratio\{node="n",gpu="0",name="Tesla T4"\} 0.4$/m);
  assert.match(text, /^bridge_host_cpu_utilization_ratio\{node="n"\} 0.5$/m);
  stats.forget("n");
  text = stats.render().join("\n");
  assert.doesNotMatch(text, /node="n"/);
  assert.match(text, /node="m"/);
  assert.deepEqual(cleanSample(sample), {
    gpus: [{ index: 0, name: "Tesla T4", memory_used_bytes: 5e9, memory_total_bytes: 15e9, utilization_percent: 40 }],
    cpu_percent: 50,
    ram_used_bytes: 1e9,
  });
});

test("models and facts are bounded", () => {
  assert.deepEqual(modelList(["b", "a", "", 3, "a", "x".repeat(200)]), ["a", "b", "x".repeat(128)]);
  assert.deepEqual(modelList("qwen"), []);
  assert.equal(modelList(Array.from({ length: 400 }, (_, i) => `m${i}`)).length, 256);
  assert.deepEqual(cleanFacts({ kind: "node", software: "kaggle-bridge/0.1", gpus: 2, models: ["a"], nested: { x: 1 }, nan: NaN }), {
    software: "kaggle-bridge/0.1",
    gpus: 2,
    models: ["a"],
  });
});
