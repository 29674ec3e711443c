// What the relay publishes from the bridges' STATS frames (extension `status-models-gpus`,
// docs/spec/relay.md E.14, wire.md section 12a), sans I/O: Prometheus series for /_relay/metrics and
// the latest sample and facts per node for /_relay/status and the status page. The same series,
// labels, buckets and bounds as the Python relay's (bridge/stats.py); unknown kinds and fields are
// ignored, wrong types dropped field by field.
//
// Written by hand rather than with a Prometheus client library: the text format needs a few dozen
// lines, and the JavaScript clients (prom-client) depend on Node's own modules, which a Worker lacks.

/** Label values are cut to this length; distinct (route, model) pairs per node are capped. */
export const MAX_LABEL = 64;
export const MAX_SERIES_PER_NODE = 64;
const MAX_GPUS = 16;

export const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
export const RATE_BUCKETS = [1, 2.5, 5, 10, 20, 30, 40, 60, 80, 120, 200, 500, 1000, 2000, 5000];
export const TTFB_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

type Labels = Record<string, string>;

function escapeLabel(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}

function labelText(labels: Labels, extra: Labels = {}): string {
  const all = { ...labels, ...extra };
  const parts = Object.entries(all).map(([k, v]) => `${k}="${escapeLabel(v)}"`);
  return parts.length ? `{${parts.join(",")}}` : "";
}

function num(value: number): string {
  if (value === Infinity) return "+Inf";
  return Number.isInteger(value) ? `${value}.0` : String(value);
}

/** One metric family: a counter, a gauge or a histogram, by label set. */
export class Family {
  private readonly series = new Map<string, { labels: Labels; value: number; buckets?: number[]; sum?: number }>();

  constructor(
    readonly name: string,
    readonly help: string,
    readonly type: "counter" | "gauge" | "histogram",
    readonly bucketBounds: number[] = [],
  ) {}

  private entry(labels: Labels): { labels: Labels; value: number; buckets?: number[]; sum?: number } {
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

  inc(labels: Labels, by = 1): void {
    this.entry(labels).value += by;
  }

  set(labels: Labels, value: number): void {
    this.entry(labels).value = value;
  }

  observe(labels: Labels, value: number): void {
    const e = this.entry(labels);
    e.value += 1;
    e.sum! += value;
    this.bucketBounds.forEach((bound, i) => {
      if (value <= bound) e.buckets![i]! += 1;
    });
  }

  /** Drop every series whose labels match `where`. */
  remove(where: (labels: Labels) => boolean): void {
    for (const [k, e] of this.series) if (where(e.labels)) this.series.delete(k);
  }

  get size(): number {
    return this.series.size;
  }

  /** The family in Prometheus's text format (counters get `_total`, as prometheus_client writes). */
  render(): string[] {
    const metric = this.type === "counter" ? `${this.name}_total` : this.name;
    const lines = [`# HELP ${metric} ${this.help}`, `# TYPE ${metric} ${this.type}`];
    for (const e of this.series.values()) {
      if (this.type !== "histogram") {
        lines.push(`${metric}${labelText(e.labels)} ${num(e.value)}`);
        continue;
      }
      this.bucketBounds.forEach((bound, i) => {
        lines.push(`${metric}_bucket${labelText(e.labels, { le: num(bound) })} ${num(e.buckets![i]!)}`);
      });
      lines.push(`${metric}_bucket${labelText(e.labels, { le: "+Inf" })} ${num(e.value)}`);
      lines.push(`${metric}_count${labelText(e.labels)} ${num(e.value)}`);
      lines.push(`${metric}_sum${labelText(e.labels)} ${num(e.sum!)}`);
    }
    return lines;
  }
}

function finite(body: Record<string, unknown>, key: string): number | null {
  const v = body[key];
  return typeof v === "number" && Number.isFinite(v) && v >= 0 ? v : null;
}

function label(value: unknown): string {
  return typeof value === "string" ? value.slice(0, MAX_LABEL) : "";
}

/** The models a node lists (HELLO `models` or a STATS `node` frame), bounded as the Python relay's. */
export function modelList(value: unknown): string[] {
  if (!Array.isArray(value)) return [];
  const out = new Set<string>();
  for (const m of value.slice(0, 256)) if (typeof m === "string" && m) out.add(m.slice(0, 128));
  return [...out].sort();
}

/** The fields of a `sample` STATS body shown in /_relay/status. */
export function cleanSample(body: Record<string, unknown>): Record<string, unknown> {
  const keys = ["index", "name", "memory_used_bytes", "memory_total_bytes", "utilization_percent", "temperature_c"];
  const gpus = Array.isArray(body.gpus) ? body.gpus.slice(0, MAX_GPUS) : [];
  const out: Record<string, unknown> = {
    gpus: gpus
      .filter((g): g is Record<string, unknown> => g !== null && typeof g === "object" && !Array.isArray(g))
      .map((g) => Object.fromEntries(keys.filter((k) => ["string", "number"].includes(typeof g[k])).map((k) => [k, g[k]]))),
  };
  for (const k of ["cpu_percent", "ram_used_bytes", "ram_total_bytes"]) {
    const v = finite(body, k);
    if (v !== null) out[k] = v;
  }
  return out;
}

/** The facts of a `node` STATS body (scalars and lists only). */
export function cleanFacts(body: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(body)) {
    if (k === "kind") continue;
    if (typeof v === "string" || (typeof v === "number" && Number.isFinite(v)) || Array.isArray(v)) out[k] = v;
  }
  return out;
}

/** The Prometheus series fed by STATS. The latest sample and facts are the caller's to keep (the
 * Durable Object keeps them in storage, so they survive hibernation; these series do not). */
export class RelayStats {
  readonly ttft = new Family("bridge_request_ttft_seconds", "Time to first token measured by the bridge at the engine (excludes the tunnel)", "histogram", LATENCY_BUCKETS);
  readonly duration = new Family("bridge_request_duration_seconds", "Whole request time measured by the bridge", "histogram", LATENCY_BUCKETS);
  readonly queue = new Family("bridge_request_queue_seconds", "Time a request waited in the bridge before it reached the engine", "histogram", LATENCY_BUCKETS);
  readonly decodeRate = new Family("bridge_request_decode_tokens_per_second", "Decoding rate of each request", "histogram", RATE_BUCKETS);
  readonly promptTokens = new Family("bridge_prompt_tokens", "Prompt tokens processed", "counter");
  readonly completionTokens = new Family("bridge_completion_tokens", "Tokens generated", "counter");
  readonly requests = new Family("bridge_node_requests", "Requests measured by bridges", "counter");
  readonly gpuUsed = new Family("bridge_gpu_memory_used_bytes", "GPU memory in use", "gauge");
  readonly gpuTotal = new Family("bridge_gpu_memory_total_bytes", "GPU memory", "gauge");
  readonly gpuUtil = new Family("bridge_gpu_utilization_ratio", "GPU utilisation (0..1)", "gauge");
  readonly gpuTemp = new Family("bridge_gpu_temperature_celsius", "GPU temperature", "gauge");
  readonly gpuPower = new Family("bridge_gpu_power_watts", "GPU power draw", "gauge");
  readonly cpu = new Family("bridge_host_cpu_utilization_ratio", "Host CPU utilisation (0..1)", "gauge");
  readonly ram = new Family("bridge_host_memory_used_bytes", "Host memory in use", "gauge");
  private readonly pairs = new Map<string, Set<string>>();

  get families(): Family[] {
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
      this.ram,
    ];
  }

  /** Take one STATS body from `node` into the series. */
  publish(node: string, body: Record<string, unknown>): void {
    if (body.kind === "request") this.request(node, body);
    else if (body.kind === "sample") this.sample(node, body);
  }

  /** The node left: its gauges would lie, so drop them (histograms and counters stay). */
  forget(node: string): void {
    for (const g of [this.gpuUsed, this.gpuTotal, this.gpuUtil, this.gpuTemp, this.gpuPower, this.cpu, this.ram]) {
      g.remove((l) => l.node === node);
    }
  }

  render(): string[] {
    return this.families.flatMap((f) => (f.size ? f.render() : []));
  }

  private request(node: string, body: Record<string, unknown>): void {
    let route = label(body.route);
    let model = label(body.model);
    let seen = this.pairs.get(node);
    if (!seen) this.pairs.set(node, (seen = new Set()));
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
      ["tokens_per_s", this.decodeRate],
    ] as const) {
      const v = finite(body, key);
      if (v !== null) family.observe(labels, v);
    }
    for (const [key, family] of [
      ["prompt_tokens", this.promptTokens],
      ["completion_tokens", this.completionTokens],
    ] as const) {
      const v = finite(body, key);
      if (v !== null) family.inc(labels, v);
    }
  }

  private sample(node: string, body: Record<string, unknown>): void {
    const gpus = Array.isArray(body.gpus) ? body.gpus.slice(0, MAX_GPUS) : [];
    for (const gpu of gpus) {
      if (gpu === null || typeof gpu !== "object" || Array.isArray(gpu)) continue;
      const g = gpu as Record<string, unknown>;
      const labels = { node, gpu: String(g.index ?? "").slice(0, 8), name: label(g.name) };
      for (const [key, family, scale] of [
        ["memory_used_bytes", this.gpuUsed, 1],
        ["memory_total_bytes", this.gpuTotal, 1],
        ["utilization_percent", this.gpuUtil, 0.01],
        ["temperature_c", this.gpuTemp, 1],
        ["power_w", this.gpuPower, 1],
      ] as const) {
        const v = finite(g, key);
        if (v !== null) family.set(labels, v * scale);
      }
    }
    const cpu = finite(body, "cpu_percent");
    if (cpu !== null) this.cpu.set({ node }, cpu / 100);
    const ram = finite(body, "ram_used_bytes");
    if (ram !== null) this.ram.set({ node }, ram);
  }
}
