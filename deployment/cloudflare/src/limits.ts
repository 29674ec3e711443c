// Per-key request rates (extension `key-rate-limits`, docs/spec/relay.md E.9), sans I/O: the caller
// passes the time. The same token bucket as the Python relay's (bridge/ratelimit.py RateLimiter).
//
// The buckets live in the Durable Object's memory: after the object hibernates (it does only after
// about 10 s without any event) they start full again. With the default burst (10 x the rate) a
// bucket left alone that long has refilled anyway; a burst larger than that is, after hibernation,
// refilled early. Keeping them in storage would cost a row written per request.

export class TokenBucket {
  private tokens: number;
  private at: number;

  constructor(
    readonly rate: number,
    readonly burst: number,
    now: number,
  ) {
    this.tokens = burst;
    this.at = now;
  }

  /** Take one token if there is one (time in seconds). */
  allow(now: number): boolean {
    this.tokens = Math.min(this.burst, this.tokens + Math.max(0, now - this.at) * this.rate);
    this.at = now;
    if (this.tokens >= 1) {
      this.tokens -= 1;
      return true;
    }
    return false;
  }
}

/** At most this many keys' buckets are kept (keys come from the relay's own list, so few). */
const MAX_KEYS = 4096;

export class KeyRates {
  private readonly buckets = new Map<string, TokenBucket>();
  readonly burst: number;

  /** `rate` requests a second per key (0: no limit), bursts of `burst` (0: 10 x rate, at least 1). */
  constructor(
    readonly rate: number,
    burst: number,
  ) {
    this.burst = burst > 0 ? burst : Math.max(1, Math.floor(rate * 10));
  }

  /** 0 when the key may make a request now, else the seconds to tell it to wait (Retry-After). */
  check(keyId: string, now: number): number {
    if (this.rate <= 0) return 0;
    let bucket = this.buckets.get(keyId);
    if (!bucket) {
      if (this.buckets.size >= MAX_KEYS) this.buckets.delete(this.buckets.keys().next().value!);
      bucket = new TokenBucket(this.rate, this.burst, now);
      this.buckets.set(keyId, bucket);
    }
    return bucket.allow(now) ? 0 : Math.max(1, Math.ceil(1 / this.rate));
  }
}

export const KEY_RATE_REFUSAL = "rate limit of this client key exceeded; slow down";

/** Distinct route labels of the request counter (`bridge_relay_requests`), as the Python relay
 * bounds them (bridge/relay/metrics.py MAX_ROUTE_LABELS): any client may ask for /r/<anything>/ (a
 * 404 at most), and each new label was a series kept for the object's life. Names no bridge could
 * serve (bridge/config.py ROUTE_NAME) and names past the first 64 count as "other". */
export const MAX_ROUTE_LABELS = 64;
const ROUTE_NAME = /^[a-z0-9][a-z0-9_-]{0,62}$/;

export class RouteLabels {
  private readonly seen = new Set<string>();

  /** The label to count `route` under. */
  label(route: string): string {
    if (this.seen.has(route)) return route;
    if (this.seen.size < MAX_ROUTE_LABELS && ROUTE_NAME.test(route)) {
      this.seen.add(route);
      return route;
    }
    return "other";
  }
}
