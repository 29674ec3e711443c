// The job API's pure parts (extension `jobs`, docs/spec/relay.md E.7): reading a submission into a
// request, and a stored job as the JSON a client gets. The Durable Object runs the job and keeps
// it in its SQLite storage (src/store.ts). The same answers as the Python relay's bridge/relay/jobs.py,
// with docs/security.md's rules for submissions (design note 13): a missing `body` is an empty body,
// bad names or values are a 400 (never a 500), the headers go through the relay's forwarding rules.

import { HOP_BY_HOP, forwardedCookie, isClientForwarding, validHeaderName, validHeaderValue } from "./rules";
import { validMethod } from "./wire/codec";
import type { HeaderPairs } from "./wire/codec";

/** The largest submission (the JSON object, body included). */
export const MAX_SUBMISSION = 1024 * 1024;
/** The longest `?wait=` a client may ask for, in seconds. */
export const MAX_WAIT = 60;

export interface JobSpec {
  route: string;
  method: string;
  path: string;
  /** Headers for OPEN, before the relay's own (content-length, x-forwarded-for) are added. */
  headers: HeaderPairs;
  body: Uint8Array;
}

/** A submission as a request, or the reason it is not one (a 400). */
export function parseJob(submission: Uint8Array, defaultRoute: string): JobSpec | { error: string } {
  let spec: unknown;
  try {
    spec = JSON.parse(new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(submission));
  } catch {
    return { error: "invalid job: a JSON object is required" };
  }
  if (spec === null || typeof spec !== "object" || Array.isArray(spec)) {
    return { error: "invalid job: a JSON object is required" };
  }
  const s = spec as Record<string, unknown>;
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
  const out: HeaderPairs = [];
  for (const [name, value] of Object.entries(headers as Record<string, unknown>)) {
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
  let body: Uint8Array;
  if (payload === undefined || payload === "") body = new Uint8Array(0);
  else if (typeof payload === "string") body = new TextEncoder().encode(payload);
  else body = new TextEncoder().encode(JSON.stringify(payload));
  if (body.byteLength && !out.some(([k]) => k === "content-type")) out.push(["content-type", "application/json"]);
  return { route, method: method.toUpperCase(), path, headers: out, body };
}

/** A job as stored (src/store.ts). */
export interface JobRecord {
  id: string;
  state: "running" | "done" | "failed";
  request: Record<string, unknown>;
  created: number;
  finished: number | null;
  status: number | null;
  headers: HeaderPairs;
  body: Uint8Array;
  error: string | null;
}

export function iso(seconds: number | null): string | null {
  return seconds === null ? null : new Date(seconds * 1000).toISOString().replace(/\.\d{3}Z$/, "Z");
}

/** What `GET /_relay/jobs/<id>` answers. */
export function describeJob(job: JobRecord): Record<string, unknown> {
  const out: Record<string, unknown> = {
    id: job.id,
    state: job.state,
    request: job.request,
    created_at: iso(job.created),
    finished_at: iso(job.finished),
  };
  if (job.state !== "running") {
    out.response = {
      status: job.status ?? 0,
      headers: job.headers,
      body: new TextDecoder("utf-8").decode(job.body),
    };
    if (job.error) out.error = job.error;
  }
  return out;
}

/** The `?wait=` of a job request, in seconds (0 .. MAX_WAIT; anything else is 0). */
export function waitSeconds(query: URLSearchParams): number {
  const raw = query.get("wait");
  const n = raw === null ? 0 : Number(raw);
  return Number.isFinite(n) ? Math.max(0, Math.min(MAX_WAIT, n)) : 0;
}
