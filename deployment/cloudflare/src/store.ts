// What the Durable Object keeps in its SQLite storage (ctx.storage.sql) for the answers that outlive
// their client: finished answers a repeat may replay (extension `idempotency`) and jobs (extension
// `jobs`). I/O, not sans-I/O: the Durable Object owns it; the decisions are in src/shared.ts and
// src/jobs.ts.
//
// The free plan's limits shape it (docs: developers.cloudflare.com/durable-objects/platform/limits
// and .../pricing, checked 2026-11): a row or value holds at most 2 MB, so a body is kept in parts
// of 1 MiB (the first in the row itself: an answer of up to 1 MiB is one row); storage is billed in
// rows read (5 million a day free) and rows written (100,000 a day free), so every query here is by
// primary key or index, and the running totals the eviction needs are kept in memory (recounted
// once when the object starts) rather than summed per request. `rowsRead` and `rowsWritten` count
// what the queries here cost (published on /_relay/metrics).

import type { HeaderPairs } from "./wire/codec";
import type { JobRecord } from "./jobs";

/** Bytes of a stored body per row. */
export const PART = 1024 * 1024;

type Row = Record<string, SqlStorageValue>;

function bytes(value: SqlStorageValue | undefined): Uint8Array {
  return value instanceof ArrayBuffer ? new Uint8Array(value) : new Uint8Array(0);
}

function blob(data: Uint8Array): ArrayBuffer {
  return data.slice().buffer as ArrayBuffer;
}

export class Store {
  rowsRead = 0;
  rowsWritten = 0;
  /** Finished answers kept, and their bytes, all keys together (for the bounds); counted when
   * first needed, not at every start (the object starts again after each hibernation). */
  private answers = 0;
  private answerBytes = 0;
  private counted = false;

  constructor(private readonly sql: SqlStorage) {}

  private run(query: string, ...bindings: SqlStorageValue[]): Row[] {
    const cursor = this.sql.exec<Row>(query, ...bindings);
    const rows = cursor.toArray();
    this.rowsRead += cursor.rowsRead;
    this.rowsWritten += cursor.rowsWritten;
    return rows;
  }

  /** Create the tables (once). WITHOUT ROWID: the primary key is the table, so a row written is
   * not also an index entry written; the only secondary indexes are those a query needs. */
  init(): void {
    this.sql.exec(`CREATE TABLE IF NOT EXISTS answers (
      key_id TEXT NOT NULL, identity TEXT NOT NULL, status INTEGER NOT NULL, headers TEXT NOT NULL,
      body BLOB, size INTEGER NOT NULL, finished REAL NOT NULL, PRIMARY KEY (key_id, identity)) WITHOUT ROWID`);
    this.sql.exec("CREATE INDEX IF NOT EXISTS answers_finished ON answers (finished)");
    this.sql.exec(`CREATE TABLE IF NOT EXISTS jobs (
      id TEXT PRIMARY KEY, key_id TEXT NOT NULL, created REAL NOT NULL, finished REAL, state TEXT NOT NULL,
      request TEXT NOT NULL, status INTEGER, headers TEXT, body BLOB, size INTEGER NOT NULL DEFAULT 0,
      error TEXT) WITHOUT ROWID`);
    this.sql.exec("CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key_id, created)");
    this.sql.exec("CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created)");
    this.sql.exec(`CREATE TABLE IF NOT EXISTS parts (
      owner TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (owner, seq)) WITHOUT ROWID`);
  }

  // bodies -------------------------------------------------------------------------------------
  /** Keep `body` for `owner`: the first part is returned for the owner's own row, the rest go to
   * `parts`. */
  private putBody(owner: string, body: Uint8Array): ArrayBuffer {
    for (let seq = 1; seq * PART < body.byteLength; seq++) {
      this.run("INSERT OR REPLACE INTO parts (owner, seq, data) VALUES (?, ?, ?)", owner, seq, blob(body.subarray(seq * PART, (seq + 1) * PART)));
    }
    return blob(body.subarray(0, PART));
  }

  private getBody(owner: string, first: SqlStorageValue | undefined, size: number): Uint8Array {
    const head = bytes(first);
    if (size <= head.byteLength) return head;
    const out = new Uint8Array(size);
    out.set(head);
    let at = head.byteLength;
    for (const row of this.run("SELECT data FROM parts WHERE owner = ? ORDER BY seq", owner)) {
      const part = bytes(row.data);
      out.set(part.subarray(0, size - at), at);
      at += part.byteLength;
    }
    return out;
  }

  private dropBody(owner: string, size: number): void {
    if (size > PART) this.run("DELETE FROM parts WHERE owner = ?", owner);
  }

  // answers ------------------------------------------------------------------------------------
  private static answerOwner(keyId: string, identity: string): string {
    return `answer\n${keyId}\n${identity}`;
  }

  /** A finished answer of `keyId` for `identity` still within `ttl` seconds, or null. */
  getAnswer(keyId: string, identity: string, now: number, ttl: number): { status: number; headers: HeaderPairs; body: Uint8Array; finished: number } | null {
    const [row] = this.run(
      "SELECT status, headers, body, size, finished FROM answers WHERE key_id = ? AND identity = ? AND finished >= ?",
      keyId,
      identity,
      now - ttl,
    );
    if (!row) return null;
    return {
      status: Number(row.status),
      headers: JSON.parse(String(row.headers)) as HeaderPairs,
      body: this.getBody(Store.answerOwner(keyId, identity), row.body, Number(row.size)),
      finished: Number(row.finished),
    };
  }

  /** Keep a finished answer for repeats. Then, over `maxEntries` answers or `maxBytes` bytes, the
   * key holding the most bytes loses its oldest answer (docs/security.md §7: one key cannot push
   * another's answers out); answers older than `ttl` go first. */
  putAnswer(keyId: string, identity: string, status: number, headers: HeaderPairs, body: Uint8Array, now: number, ttl: number, maxEntries: number, maxBytes: number): void {
    if (!this.counted) {
      const [count] = this.run("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM answers");
      this.answers = Number(count?.n ?? 0);
      this.answerBytes = Number(count?.b ?? 0);
      this.counted = true;
    }
    for (const old of this.run("SELECT key_id, identity, size FROM answers WHERE finished < ?", now - ttl)) {
      this.deleteAnswer(String(old.key_id), String(old.identity), Number(old.size));
    }
    const [existing] = this.run("SELECT size FROM answers WHERE key_id = ? AND identity = ?", keyId, identity);
    if (existing) this.deleteAnswer(keyId, identity, Number(existing.size));
    const owner = Store.answerOwner(keyId, identity);
    const first = this.putBody(owner, body);
    this.run(
      "INSERT INTO answers (key_id, identity, status, headers, body, size, finished) VALUES (?, ?, ?, ?, ?, ?, ?)",
      keyId,
      identity,
      status,
      JSON.stringify(headers),
      first,
      body.byteLength,
      now,
    );
    this.answers += 1;
    this.answerBytes += body.byteLength;
    while (this.answers > 0 && (this.answers > maxEntries || this.answerBytes > maxBytes)) {
      const [top] = this.run("SELECT key_id FROM answers GROUP BY key_id ORDER BY SUM(size) DESC LIMIT 1");
      if (!top) break;
      const [oldest] = this.run(
        "SELECT identity, size FROM answers WHERE key_id = ? ORDER BY finished LIMIT 1",
        String(top.key_id),
      );
      if (!oldest) break;
      this.deleteAnswer(String(top.key_id), String(oldest.identity), Number(oldest.size));
    }
  }

  private deleteAnswer(keyId: string, identity: string, size: number): void {
    this.run("DELETE FROM answers WHERE key_id = ? AND identity = ?", keyId, identity);
    this.dropBody(Store.answerOwner(keyId, identity), size);
    this.answers -= 1;
    this.answerBytes -= size;
  }

  // jobs ---------------------------------------------------------------------------------------
  /** Jobs of `keyId` kept, and the bytes of their results (for the per-key quotas). */
  jobUsage(keyId: string): { count: number; bytes: number } {
    const [row] = this.run("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM jobs WHERE key_id = ?", keyId);
    return { count: Number(row?.n ?? 0), bytes: Number(row?.b ?? 0) };
  }

  /** Forget jobs created before `before` (seconds). */
  expireJobs(before: number): void {
    for (const old of this.run("SELECT id, size FROM jobs WHERE created < ?", before)) {
      this.deleteJobRow(String(old.id), Number(old.size));
    }
  }

  addJob(id: string, keyId: string, request: Record<string, unknown>, now: number): void {
    this.run("INSERT INTO jobs (id, key_id, created, state, request) VALUES (?, ?, ?, 'running', ?)", id, keyId, now, JSON.stringify(request));
  }

  finishJob(id: string, state: "done" | "failed", status: number, headers: HeaderPairs, body: Uint8Array, error: string | null, now: number): void {
    const first = this.putBody(`job\n${id}`, body);
    this.run(
      "UPDATE jobs SET finished = ?, state = ?, status = ?, headers = ?, body = ?, size = ?, error = ? WHERE id = ?",
      now,
      state,
      status,
      JSON.stringify(headers),
      first,
      body.byteLength,
      error,
      id,
    );
  }

  /** A job of `keyId`. `alive` says whether a job stored as running is still running here: one
   * that is not was running when the object last stopped (its producer went with the memory that
   * held it) and is failed from now on. */
  getJob(id: string, keyId: string, alive: (id: string) => boolean): JobRecord | null {
    let [row] = this.run("SELECT * FROM jobs WHERE id = ? AND key_id = ?", id, keyId);
    if (!row) return null;
    if (row.state === "running" && !alive(id)) {
      [row] = this.run(
        "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ? RETURNING *",
        Date.now() / 1000,
        "the relay restarted before the job finished",
        id,
      );
      if (!row) return null;
    }
    return {
      id: String(row.id),
      state: String(row.state) as JobRecord["state"],
      request: JSON.parse(String(row.request)) as Record<string, unknown>,
      created: Number(row.created),
      finished: row.finished === null ? null : Number(row.finished),
      status: row.status === null ? null : Number(row.status),
      headers: row.headers === null ? [] : (JSON.parse(String(row.headers)) as HeaderPairs),
      body: this.getBody(`job\n${id}`, row.body, Number(row.size)),
      error: row.error === null ? null : String(row.error),
    };
  }

  listJobs(keyId: string, alive: (id: string) => boolean, limit = 100): { id: string; state: string; created: number }[] {
    return this.run("SELECT id, state, created FROM jobs WHERE key_id = ? ORDER BY created DESC LIMIT ?", keyId, limit).map(
      (r) => ({
        id: String(r.id),
        state: r.state === "running" && !alive(String(r.id)) ? "failed" : String(r.state),
        created: Number(r.created),
      }),
    );
  }

  deleteJob(id: string, keyId: string): boolean {
    const [row] = this.run("SELECT size FROM jobs WHERE id = ? AND key_id = ?", id, keyId);
    if (!row) return false;
    this.deleteJobRow(id, Number(row.size));
    return true;
  }

  private deleteJobRow(id: string, size: number): void {
    this.run("DELETE FROM jobs WHERE id = ?", id);
    this.dropBody(`job\n${id}`, size);
  }
}
