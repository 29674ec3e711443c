// What a client gets when its stream fails before the answer (docs/spec/relay.md section 11.5): the
// status of wire.md section 9 and words a user can act on, from the RESET code alone. The bridge's
// own reason goes to the log, never to the client: it may name an upstream's address. The same
// words as the Python relay's (bridge/httprules.py, failure_words). Sans I/O, no Worker API.

import { statusForCode } from "./wire/codec";
import { ErrorCode } from "./wire/constants";

export interface Failure {
  status: number;
  body: { error: string; code: number };
  /** Headers to add: Retry-After on a 503 (the request may well work a moment later). */
  headers: Record<string, string>;
}

export function streamFailed(code: number, route: string): Failure {
  const status = statusForCode(code);
  const name = JSON.stringify(route).slice(1, -1);
  const upstream = `the upstream of route '${name}'`;
  const retry = "try again shortly";
  const words: Partial<Record<number, string>> = {
    [ErrorCode.NO_ROUTE]: `unknown route '${name}'`,
    [ErrorCode.UPSTREAM_UNREACHABLE]: `the bridge could not reach ${upstream} (unreachable: is it running?); ${retry}`,
    [ErrorCode.UPSTREAM_TIMEOUT]: `${upstream} did not answer in time; ${retry}`,
    [ErrorCode.UPSTREAM_ERROR]: `${upstream} failed before answering; ${retry}`,
    [ErrorCode.REFUSED_STREAM]: `the bridge is shutting down or restarting; ${retry}`,
    [ErrorCode.GOING_AWAY]: `the bridge is shutting down or restarting; ${retry}`,
    [ErrorCode.TOO_MANY_STREAMS]: `the bridge is serving as many requests as it can; ${retry}`,
    [ErrorCode.HEADERS_TOO_LARGE]: "request header fields too large",
    [ErrorCode.BODY_TOO_LARGE]: "request body too large",
  };
  const error = words[code] ?? `the bridge could not complete the request (error code ${code}); ${retry}`;
  return { status, body: { error, code }, headers: status === 503 ? { "retry-after": "5" } : {} };
}
