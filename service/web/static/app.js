// The page: hash routes (#/, #/experiments/ID, #/studies/ID, #/compare?ids=A,B), the key
// prompt, and which optional parts this service has.

import { clearKey, features, getKey, keysRequired, onUnauthorized, setKey } from "./api.js";
import { fill, h } from "./format.js";
import * as views from "./views.js";

const $ = (id) => document.getElementById(id);

const ctx = {
  features: {},
  view: null,
  leave: [],
  onLeave(fn) {
    this.leave.push(fn);
  },
  go(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
};

function showKeyState() {
  const key = getKey();
  $("key-state").textContent = key
    ? `key ${key.slice(0, 8)}…`
    : keysRequired
      ? "no key"
      : "keyless (local user)";
  $("key-forget").hidden = !key;
}

function askForKey(detail) {
  const dialog = $("key-dialog");
  const error = $("key-error");
  if (detail && getKey()) {
    // the stored key was refused: forget it
    clearKey();
    showKeyState();
  }
  error.hidden = !detail;
  error.textContent = detail || "";
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function stop() {
  for (const fn of ctx.leave.splice(0)) {
    try {
      fn();
    } catch {
      // a view's cleanup never stops the next view
    }
  }
}

async function route() {
  stop();
  $("banner").hidden = true;
  if (keysRequired && !getKey()) {
    fill(ctx.view, h("p", { class: "muted" }, "Enter an API key to see this tenant's experiments."));
    askForKey("");
    return;
  }
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  try {
    if (parts[0] === "experiments" && parts[1]) await views.experiment(ctx, parts[1]);
    else if (parts[0] === "studies" && parts[1] && ctx.features.studies) await views.study(ctx, parts[1]);
    else if (parts[0] === "compare" && ctx.features.compare)
      await views.compare(ctx, (params.get("ids") || "").split(",").filter(Boolean));
    else await views.home(ctx);
  } catch (err) {
    $("banner").hidden = false;
    $("banner").textContent = String(err?.message || err);
  }
}

async function main() {
  ctx.view = $("view");
  onUnauthorized(askForKey);
  $("key-form").addEventListener("submit", (event) => {
    const key = $("key-input").value.trim();
    if (!key) {
      event.preventDefault();
      return;
    }
    setKey(key);
    $("key-input").value = "";
    showKeyState();
    route();
  });
  $("key-dialog").addEventListener("cancel", (event) => {
    // without a key a keyed service shows nothing: keep asking
    if (keysRequired && !getKey()) event.preventDefault();
  });
  $("key-forget").addEventListener("click", () => {
    clearKey();
    showKeyState();
    route();
  });
  showKeyState();
  ctx.features = await features();
  $("nav-studies").hidden = !ctx.features.studies;
  $("nav-compare").hidden = !ctx.features.compare;
  document.body.dataset.features = Object.entries(ctx.features)
    .filter(([, on]) => on)
    .map(([name]) => name)
    .join(" ");
  window.addEventListener("hashchange", route);
  await route();
  document.body.dataset.ready = "1";
}

main();
