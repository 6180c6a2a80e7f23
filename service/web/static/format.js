// DOM and number helpers. Text from the API (names, notes, tags, messages) only ever goes
// into text nodes and attribute values, never into markup.

/** h("a", {href: "#/"}, "text", child...): an element; null/undefined/false children are skipped. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace the children of node. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function isActive(status) {
  return status === "queued" || status === "running";
}

/** A number for a table: 3 significant digits, exponent notation beyond 1e5. */
export function num(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (!Number.isFinite(x)) return String(x);
  if (Number.isInteger(x) && Math.abs(x) < 1e5) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return x.toExponential(digits - 1);
  return x.toPrecision(digits).replace(/\.?0+$/, (m) => (m.startsWith(".") ? "" : m));
}

export function bytes(x) {
  if (x === null || x === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i += 1;
  }
  return `${x.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function percent(fraction) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  return `${Math.floor(f * 100)} %`;
}

/** A progress bar for a progress object {points_done, points_total, fraction, eta_seconds}. */
export function progressBar(progress, status) {
  const p = progress || {};
  const f = Math.max(0, Math.min(1, p.fraction || 0));
  const bar = h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-valuemin": "0",
      "aria-valuemax": "100",
      "aria-valuenow": String(Math.floor(f * 100)),
    },
    h("div", { class: `fill ${status || ""}` }),
    h("span", { class: "label" }, `${percent(f)} · ${p.points_done ?? 0}/${p.points_total ?? "?"}`),
  );
  // the width through the CSSOM: the policy allows no inline style attribute
  bar.firstChild.style.width = `${f * 100}%`;
  return bar;
}

export function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status);
}

export function eta(progress, status) {
  if (!isActive(status)) return "–";
  return duration(progress?.eta_seconds);
}

export function table(headers, rows, attrs = {}) {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, headers.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows),
  );
}
