// The Worker: the public entry of the Cloudflare relay. It answers what needs no state (the login
// page, logout, unknown /_relay/ paths), authenticates clients before anything reaches the Durable
// Object (so unauthenticated traffic costs no Durable Object request), resolves the route, and hands
// everything else to the one RelayObject, which holds the bridges' WebSockets and the streams.

import { authenticate, deny, Env, INTERNAL_HEADER, json, loginPage, resolve, safeNext, settings } from "./http";
import { validMethod } from "./wire/codec";

export { RelayObject } from "./relay";

export interface Internal {
  kind: "bridge" | "health" | "status" | "status_page" | "metrics" | "login" | "proxy";
  client: string;
  scheme: string;
  route?: string;
  target?: string;
  prefix?: string;
  auth?: string;
  /** The client's own Accept-Encoding (the runtime replaces the header with its own). */
  acceptEncoding?: string | null;
}

function forward(env: Env, request: Request, info: Internal): Promise<Response> {
  const headers = new Headers(request.headers);
  headers.set(INTERNAL_HEADER, JSON.stringify(info));
  const stub = env.RELAY.get(env.RELAY.idFromName("relay"));
  return stub.fetch(new Request(request, { headers }));
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
      switch (path) {
        case "/_relay/connect":
          if (isUpgrade) return forward(env, request, { kind: "bridge", ...base });
          return json(method === "GET" || method === "HEAD" ? 404 : 405, { error: "WebSocket only" });
        case "/_relay/health":
          return forward(env, request, { kind: "health", ...base });
        case "/_relay":
        case "/_relay/":
          if ((await authenticate(env, request)) === null) return deny(request, url);
          return forward(env, request, { kind: "status_page", ...base });
        case "/_relay/status":
        case "/_relay/metrics":
          if ((await authenticate(env, request)) === null) return deny(request, url);
          return forward(env, request, { kind: path === "/_relay/status" ? "status" : "metrics", ...base });
        case "/_relay/login":
          if (method === "GET") return loginPage(200, safeNext(url.searchParams.get("next")), "");
          if (method !== "POST") return json(405, { error: "use GET or POST" });
          return forward(env, request, { kind: "login", ...base });
        case "/_relay/logout":
          return new Response(null, {
            status: 303,
            headers: {
              location: "/_relay/login",
              "set-cookie": "bridge_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax",
            },
          });
        default:
          return json(method === "GET" || method === "HEAD" ? 404 : 405, { error: "not found" });
      }
    }
    const auth = await authenticate(env, request);
    if (auth === null) {
      if (isUpgrade) return json(401, { error: "a valid client key or login cookie is required" });
      return deny(request, url);
    }
    const resolved = resolve(url, settings(env).defaultRoute);
    if (resolved === null) return json(404, { error: "unknown route" });
    if (!validMethod(request.method) || !resolved.target.startsWith("/")) {
      return json(400, { error: "invalid method or request target" });
    }
    return forward(env, request, { kind: "proxy", ...base, ...resolved, auth });
  },
} satisfies ExportedHandler<Env>;
