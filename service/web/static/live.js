// Live progress of one experiment: the Server-Sent Events stream
// GET /v1/experiments/{id}/events ("point" and "status" events), read with fetch so the key
// travels as Authorization (EventSource cannot send headers), resumed with Last-Event-ID after
// a dropped connection. Where the route is missing (404), refused (429/503) or keeps failing,
// the status document is polled every few seconds instead.

import { ApiError, authHeaders, get } from "./api.js";
import { TERMINAL } from "./format.js";

const POLL_MS = 2000;
const RETRY_MS = 2000;
const MAX_RETRIES = 3;

/**
 * watch(id, {onStatus(doc), onPoint(point), onMode(mode)}, {events: bool}) -> {close()}.
 * mode: "events" while the stream is read, "polling" after a fallback, "done" at the end.
 */
export function watch(id, handlers, { events = true } = {}) {
  const { onStatus = () => {}, onPoint = () => {}, onMode = () => {} } = handlers;
  const path = `/v1/experiments/${encodeURIComponent(id)}`;
  let closed = false;
  let controller = null;
  let timer = null;
  let lastEventId = null;
  let retries = 0;

  function finish() {
    onMode("done");
    closed = true;
  }

  function status(doc) {
    onStatus(doc);
    if (TERMINAL.has(doc.status)) {
      finish();
      return true;
    }
    return false;
  }

  async function poll() {
    if (closed) return;
    onMode("polling");
    try {
      if (status(await get(path))) return;
    } catch (err) {
      if (err instanceof ApiError && (err.status === 401 || err.status === 404)) {
        finish();
        return;
      }
    }
    if (!closed) timer = setTimeout(poll, POLL_MS);
  }

  async function stream() {
    if (closed) return;
    controller = new AbortController();
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
    let resp;
    try {
      resp = await fetch(`${path}/events`, { headers, signal: controller.signal, cache: "no-store" });
    } catch {
      return retry();
    }
    if (!resp.ok || !resp.body) {
      // 404: no events route (or the experiment is gone: polling says which); 429/503: too
      // many streams; 401: the poll's 401 asks for a key
      resp.body?.cancel();
      return poll();
    }
    onMode("events");
    let ended = false;
    try {
      ended = await read(resp.body);
    } catch {
      // the connection dropped
    }
    if (closed || ended) return;
    return retry();
  }

  function retry() {
    if (closed) return;
    retries += 1;
    if (retries > MAX_RETRIES) return poll();
    timer = setTimeout(stream, RETRY_MS);
  }

  /** Reads events until the stream ends; true once a terminal status arrived. */
  async function read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = { type: "message", data: [], id: null };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += value;
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line === "") {
          if (event.id !== null) lastEventId = event.id;
          if (event.data.length && dispatch(event.type, event.data.join("\n"))) {
            reader.cancel();
            return true;
          }
          event = { type: "message", data: [], id: null };
          continue;
        }
        if (line.startsWith(":")) continue; // keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event.type = val;
        else if (field === "data") event.data.push(val);
        else if (field === "id") event.id = val;
      }
      if (closed) {
        reader.cancel();
        return true;
      }
      retries = 0;
    }
  }

  function dispatch(type, data) {
    let doc;
    try {
      doc = JSON.parse(data);
    } catch {
      return false;
    }
    if (type === "point") onPoint(doc);
    else if (type === "status") return status(doc);
    return false;
  }

  if (events) stream();
  else poll();

  return {
    close() {
      closed = true;
      clearTimeout(timer);
      controller?.abort();
    },
  };
}
