// An answer that outlives its client (extensions `idempotency` and `jobs`, docs/spec/relay.md E.6,
// E.7), sans I/O: one producer records it as it arrives, any number of readers follow it from the
// first byte, while it is still arriving or after it finished. The same shape as the Python relay's
// bridge/relay/shared.py, with issue 20's rule: a stream that fails before its answer gives every reader
// the same complete error response (`answerWith`), and one that fails mid-body gives every reader a
// broken body (`breakOff`), never one that looks complete.

import type { HeaderPairs } from "./wire/codec";

/** Reading past what a broken or oversized answer holds. */
export class AnswerBroken extends Error {}

/** Bytes that all the answers being recorded at once may hold together (the Durable Object has
 * 128 MB): an answer that would pass it is cut, as one over its own limit. */
export class MemoryBudget {
  used = 0;

  constructor(readonly limit: number) {}

  take(n: number): boolean {
    if (this.used + n > this.limit) return false;
    this.used += n;
    return true;
  }

  give(n: number): void {
    this.used = Math.max(0, this.used - n);
  }
}

export class SharedAnswer {
  status = 0;
  headers: HeaderPairs = [];
  readonly chunks: Uint8Array[] = [];
  size = 0;
  done = false;
  /** Why the answer broke off mid-body (readers then get AnswerBroken), or null. */
  broken: string | null = null;
  /** The answer outgrew `maxBytes`: readers past what was kept get AnswerBroken. */
  overflow = false;
  /** The words of an error the relay answered in the upstream's place (served whole to every
   * reader, never replayed; a job with one failed), or null. */
  relayError: string | null = null;
  finishedAt: number | null = null;
  private started = false;
  private headWaiters: (() => void)[] = [];
  private waiters: (() => void)[] = [];

  /** Bytes taken from `budget` (given back by `release`). */
  private held = 0;

  constructor(
    readonly maxBytes: number,
    private readonly budget: MemoryBudget | null = null,
  ) {}

  // producer -----------------------------------------------------------------------------------
  start(status: number, headers: HeaderPairs): void {
    if (this.started) return;
    this.status = status;
    this.headers = headers;
    this.started = true;
    for (const w of this.headWaiters.splice(0)) w();
    this.wake();
  }

  /** Record a chunk; false once the answer outgrew `maxBytes` (nothing more is kept). */
  append(chunk: Uint8Array): boolean {
    if (this.overflow || this.done) return false;
    if (this.size + chunk.byteLength > this.maxBytes || (this.budget && !this.budget.take(chunk.byteLength))) {
      this.overflow = true;
      this.wake();
      return false;
    }
    if (this.budget) this.held += chunk.byteLength;
    this.chunks.push(chunk);
    this.size += chunk.byteLength;
    this.wake();
    return true;
  }

  finish(now: number): void {
    if (this.done) return;
    this.done = true;
    this.finishedAt = now;
    if (!this.started) this.start(502, []);
    this.wake();
  }

  /** The stream failed mid-body: every reader's body breaks where the recording ends. */
  breakOff(reason: string, now: number): void {
    if (this.done) return;
    this.broken = reason;
    this.finish(now);
  }

  /** The answer is the relay's own (the stream failed before its answer, no bridge, ...): a
   * complete response for every reader, not kept for repeats. */
  answerWith(status: number, headers: HeaderPairs, body: Uint8Array, reason: string, now: number): void {
    if (this.done) return;
    this.relayError = reason;
    this.start(status, [...headers, ["content-length", String(body.byteLength)]]);
    if (body.byteLength) this.append(body);
    this.finish(now);
  }

  /** The producer is done with the answer (it is stored, or nobody can join it any more): its
   * bytes no longer count against the budget (readers still reading keep them until they finish). */
  release(): void {
    this.budget?.give(this.held);
    this.held = 0;
  }

  /** Finished whole: worth serving again to a repeat. */
  get ok(): boolean {
    return this.done && this.broken === null && !this.overflow && this.relayError === null;
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Resolves once the answer is over (finished, failed, broken). */
  async whenDone(): Promise<void> {
    while (!this.done) await new Promise<void>((res) => this.waiters.push(res));
  }

  // readers ------------------------------------------------------------------------------------
  async head(): Promise<{ status: number; headers: HeaderPairs }> {
    while (!this.started) await new Promise<void>((res) => this.headWaiters.push(res));
    return { status: this.status, headers: this.headers };
  }

  /** A reader from the first byte: next() gives each chunk, then null at the end; it throws
   * AnswerBroken where the answer cannot be given whole. */
  reader(): { next(): Promise<Uint8Array | null> } {
    let index = 0;
    return {
      next: async (): Promise<Uint8Array | null> => {
        for (;;) {
          if (index < this.chunks.length) return this.chunks[index++]!;
          if (this.overflow) throw new AnswerBroken("answer too large to share");
          if (this.done) {
            if (this.broken !== null) throw new AnswerBroken(this.broken);
            return null;
          }
          await new Promise<void>((res) => this.waiters.push(res));
        }
      },
    };
  }

  /** The whole body recorded (for storing a finished answer or a job's result). */
  body(): Uint8Array {
    const out = new Uint8Array(this.size);
    let at = 0;
    for (const c of this.chunks) {
      out.set(c, at);
      at += c.byteLength;
    }
    return out;
  }

  /** A finished answer from storage, to replay. */
  static recorded(status: number, headers: HeaderPairs, body: Uint8Array, finishedAt: number): SharedAnswer {
    const answer = new SharedAnswer(Math.max(body.byteLength, 1));
    answer.start(status, headers);
    if (body.byteLength) answer.append(body);
    answer.finish(finishedAt);
    return answer;
  }
}
