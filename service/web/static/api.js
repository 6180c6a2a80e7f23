// The page's one way to reach the API: same origin, JSON, the key (if any) as a bearer token.
// A 401 asks for a key (the handler set by app.js) and fails the request.

const KEY = "hsl.api-key";

/** Whether this service requires keys (from the page's <meta name="hsl-keys">). */
export const keysRequired =
  document.querySelector('meta[name="hsl-keys"]')?.getAttribute("content") === "required";

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key.trim());
}

export function clearKey() {
  sessionStorage.removeItem(KEY);
}

/** An error answer of the API: status and its problem+json document. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }

  /** The message with each {field, message} of a validation problem. */
  describe() {
    const errors = this.problem.errors || [];
    const fields = errors
      .filter((e) => e.field && !this.message.includes(e.message))
      .map((e) => `${e.field}: ${e.message}`);
    return [this.message, ...fields].join("\n");
  }
}

let unauthorized = () => {};

/** fn(detail) runs on every 401. */
export function onUnauthorized(fn) {
  unauthorized = fn;
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function problemOf(resp) {
  try {
    return await resp.json();
  } catch {
    return { title: resp.statusText, status: resp.status };
  }
}

/** fetch with the key; the Response if ok, else ApiError (after the 401 handler). */
export async function raw(path, { method = "GET", body, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal, cache: "no-store" };
  if (method !== "GET") {
    // the keyless service's CSRF guard lets same-origin JSON through; send JSON even bodyless
    init.headers["Content-Type"] = "application/json";
    if (body !== undefined) init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.ok) return resp;
  const problem = await problemOf(resp);
  if (resp.status === 401) unauthorized(problem.detail || "this service needs an API key");
  throw new ApiError(resp.status, problem);
}

export async function get(path, options) {
  const resp = await raw(path, { ...options, headers: { Accept: "application/json" } });
  return resp.json();
}

export async function send(method, path, body) {
  const resp = await raw(path, { method, body, headers: { Accept: "application/json" } });
  return resp.status === 204 ? null : resp.json();
}

/** A blob: URL for a figure or a download fetched with the key (revoke it when done). */
export async function blobUrl(path, options) {
  const resp = await raw(path, options);
  return URL.createObjectURL(await resp.blob());
}

/** Which of the optional routes this service has, from its OpenAPI document: the events
 * stream, studies, comparisons, PATCH of tags and notes. Missing ones are hidden, never
 * probed (a probe's 404 would be noise). */
export async function features() {
  let paths = {};
  try {
    const resp = await fetch("/openapi.json", { cache: "no-store" });
    if (resp.ok) paths = (await resp.json()).paths || {};
  } catch {
    // no OpenAPI document: only the core routes
  }
  const exp = paths["/v1/experiments/{experiment_id}"] || {};
  return {
    events: "/v1/experiments/{experiment_id}/events" in paths,
    studies: "/v1/studies" in paths,
    studySubmit: "post" in (paths["/v1/studies"] || {}),
    compare: "/v1/compare" in paths,
    comparePlots: Object.keys(paths).some((p) => p.startsWith("/v1/compare/plots/")),
    patch: "patch" in exp,
    studyPresets: "/v1/presets/studies" in paths,
  };
}
