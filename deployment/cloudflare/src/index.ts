// The Worker: the public entry of the Cloudflare relay. It answers what needs no state (the login
// page, logout, unknown /_relay/ paths), authenticates clients before anything reaches the Durable
// Object (so unauthenticated traffic costs no Durable Object request), checks the Origin of
// cookie-authenticated writes and WebSocket upgrades and of the login form (docs/security.md §6),
// resolves the route, and hands everything else to the one RelayObject, which holds the bridges'
// WebSockets, the streams and the state (rates, shared answers, jobs).

import { Auth, authenticate, deny, Env, INTERNAL_HEADER, json, loggedOut, loginPage, resolve, settings } from "./http";
import { needsOriginCheck, originAllowed, originRefused, safeNext } from "./rules";
import { validMethod } from "./wire/codec";

export { RelayObject } from "./relay";

export interface Internal {
  kind: "bridge" | "health" | "status" | "status_page" | "metrics" | "login" | "logout" | "proxy" | "jobs";
  client: string;
  scheme: string;
  route?: string;
  target?: string;
  prefix?: string;
  /** How the client authenticated ("cookie", "bearer", "header"). */
  auth?: string;
  /** The id of the client key (rates, shared answers and jobs are per key). */
  keyId?: string;
  /** A cookie login's session (the nonce in its cookie) and its expiry: the object refuses ended ones. */
  session?: string;
  expiry?: number;
  /** A valid key presented beside the cookie: used when the cookie's session ended. */
  key?: { how: string; keyId: string };
  /** The client's own Accept-Encoding (the runtime replaces the header with its own). */
  acceptEncoding?: string | null;
}

function forward(env: Env, request: Request, info: Internal): Promise<Response> {
  const headers = new Headers(request.headers);
  headers.set(INTERNAL_HEADER, JSON.stringify(info));
  const stub = env.RELAY.get(env.RELAY.idFromName("relay"));
  return stub.fetch(new Request(request, { headers }));
}

/** 403 when a browser page of another origin makes this request with the user's cookie (or logs
 * in), else null. A request without Origin is a program's: served. */
function foreignOrigin(env: Env, request: Request, url: URL, how: Auth["how"] | null, websocket: boolean, login = false): Response | null {
  const origin = request.headers.get("origin");
  if (origin === null) return null;
  if (!login && !needsOriginCheck(request.method, websocket, how)) return null;
  const hosts = [url.host, request.headers.get("host") ?? ""];
  if (originAllowed(origin, hosts, settings(env).allowedOrigins)) return null;
  console.warn(`refused a ${login ? "login" : request.method} from a foreign origin`);
  return json(403, originRefused(origin));
}

/** What the object is told about the client's credential. */
function who(auth: Auth): Pick<Internal, "auth" | "keyId" | "session" | "expiry" | "key"> {
  return { auth: auth.how, keyId: auth.keyId, session: auth.session, expiry: auth.expiry, key: auth.key };
}

export default {
  async fetch(request: Request, env: Env): Promise<Response> {
    const url = new URL(request.url);
    const path = url.pathname;
    const base = {
      client: request.headers.get("cf-connecting-ip") ?? "",
      scheme: url.protocol === "https:" ? "https" : "http",
      acceptEncoding: (request.cf?.clientAcceptEncoding as string | undefined) ?? null,
    };
    const isUpgrade = (request.headers.get("upgrade") ?? "").toLowerCase() === "websocket";
    if (path === "/_relay" || path.startsWith("/_relay/")) {
      const method = request.method;
      if (path === "/_relay/jobs" || path.startsWith("/_relay/jobs/")) {
        const auth = await authenticate(env, request);
        if (auth === null) return deny(request, url);
        const refused = foreignOrigin(env, request, url, auth.how, false);
        if (refused) return refused;
        return forward(env, request, { kind: "jobs", ...base, ...who(auth) });
      }
      switch (path) {
        case "/_relay/connect":
          if (isUpgrade) return forward(env, request, { kind: "bridge", ...base });
          return json(method === "GET" || method === "HEAD" ? 404 : 405, { error: "WebSocket only" });
        case "/_relay/health":
          return forward(env, request, { kind: "health", ...base });
        case "/_relay":
        case "/_relay/":
        case "/_relay/status":
        case "/_relay/metrics": {
          const auth = await authenticate(env, request);
          if (auth === null) return deny(request, url);
          const kind = path === "/_relay/status" ? "status" : path === "/_relay/metrics" ? "metrics" : "status_page";
          return forward(env, request, { kind, ...base, ...who(auth) });
        }
        case "/_relay/login": {
          if (method === "GET") return loginPage(200, safeNext(url.searchParams.get("next")), "");
          if (method !== "POST") return json(405, { error: "use GET or POST" });
          const refused = foreignOrigin(env, request, url, null, false, true);
          if (refused) {
            await request.body?.cancel();
            return refused;
          }
          return forward(env, request, { kind: "login", ...base });
        }
        case "/_relay/logout": {
          // Ends the session on the relay (the object remembers it until it would expire), not
          // only the browser's copy; without a valid cookie there is nothing to end.
          const auth = await authenticate(env, request);
          if (auth?.session) return forward(env, request, { kind: "logout", ...base, ...who(auth) });
          return loggedOut();
        }
        default:
          return json(method === "GET" || method === "HEAD" ? 404 : 405, { error: "not found" });
      }
    }
    const auth = await authenticate(env, request);
    if (auth === null) {
      if (isUpgrade) return json(401, { error: "a valid client key or login cookie is required" });
      return deny(request, url);
    }
    const refused = foreignOrigin(env, request, url, auth.how, isUpgrade);
    if (refused) {
      await request.body?.cancel();
      return refused;
    }
    const resolved = resolve(url, settings(env).defaultRoute);
    if (resolved === null) return json(404, { error: "unknown route" });
    if (!validMethod(request.method) || !resolved.target.startsWith("/")) {
      return json(400, { error: "invalid method or request target" });
    }
    return forward(env, request, { kind: "proxy", ...base, ...resolved, ...who(auth) });
  },
} satisfies ExportedHandler<Env>;
