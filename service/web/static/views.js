// The views: the home page (submit forms, experiments, studies), one experiment, one study
// and a comparison. Each view renders into ctx.view and registers what to stop on leaving
// (streams, timers, blob URLs) with ctx.onLeave.

import { ApiError, blobUrl, get, send } from "./api.js";
import {
  badge,
  bytes,
  eta,
  fill,
  h,
  isActive,
  num,
  progressBar,
  table,
  TERMINAL,
  when,
} from "./format.js";
import { watch } from "./live.js";

const LIST_POLL_MS = 4000;
const STUDY_POLL_MS = 3000;
const MAX_LIST_STREAMS = 3; // browsers allow 6 connections per host; keep room for the rest
const REFRESH_MS = 4000; // figures and results while running: at most this often

const enc = encodeURIComponent;

function errorBox(err) {
  const text = err instanceof ApiError ? err.describe() : String(err?.message || err);
  return h("pre", { class: "error", role: "alert" }, text);
}

/** Run fn, showing its error in box (and nothing else on a 401: the key prompt shows). */
async function guarded(box, fn) {
  try {
    return await fn();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) fill(box, errorBox(err));
    return undefined;
  }
}

function tags(doc) {
  return (doc.tags || []).map((t) => h("span", { class: "tag" }, t));
}

// -- home ---------------------------------------------------------------------------------------

export async function home(ctx) {
  const submitBox = h("section", { id: "submit", class: "card" });
  const studySubmitBox = h("section", { id: "study-submit", class: "card" });
  const listBox = h("section", { id: "experiments" });
  const studiesBox = h("section", { id: "studies" });
  fill(
    ctx.view,
    h("div", { class: "columns" }, submitBox, ctx.features.studySubmit ? studySubmitBox : null),
    listBox,
    ctx.features.studies ? studiesBox : null,
  );
  const presets = await guarded(submitBox, () => get("/v1/presets"));
  if (presets === undefined) return;
  submitForm(ctx, submitBox, presets);
  if (ctx.features.studySubmit) {
    const studyPresets = ctx.features.studyPresets
      ? ((await guarded(studySubmitBox, () => get("/v1/presets/studies"))) ?? [])
      : [];
    studyForm(ctx, studySubmitBox, presets, studyPresets);
  }
  experimentList(ctx, listBox);
  if (ctx.features.studies) studyList(ctx, studiesBox);
}

function presetOptions(presets) {
  return presets.map((p) => h("option", { value: p.name }, `${p.name}: ${p.description}`));
}

function submitForm(ctx, box, presets) {
  const select = h("select", { id: "preset", name: "preset", required: true }, presetOptions(presets));
  const name = h("input", { id: "submit-name", name: "name", placeholder: "the preset's name" });
  const estimate = h("p", { class: "muted", id: "preset-estimate" });
  const message = h("div", { id: "submit-message" });
  const button = h("button", { type: "submit", id: "submit-button" }, "Submit");
  const byName = Object.fromEntries(presets.map((p) => [p.name, p]));
  const small = presets.find((p) => p.name === "smoke") || presets[0];
  if (small) select.value = small.name;

  function showEstimate() {
    const p = byName[select.value];
    if (!p) return;
    fill(
      estimate,
      `${p.estimate.points} points · feature dimension ${num(p.estimate.feature_dim)} · `,
      `peak ${bytes(p.estimate.peak_bytes)} · ${num(p.estimate.flops)} flops`,
    );
  }
  select.addEventListener("change", showEstimate);
  showEstimate();

  const form = h(
    "form",
    { id: "submit-form" },
    h("h2", {}, "Submit a preset"),
    h("label", {}, "Preset ", select),
    estimate,
    h("label", {}, "Name ", name),
    h("div", { class: "actions" }, button),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const preset = byName[select.value];
    const spec = structuredClone(preset.spec);
    if (name.value.trim()) spec.name = name.value.trim();
    button.disabled = true;
    fill(message);
    const doc = await guarded(message, () => send("POST", "/v1/experiments", spec));
    button.disabled = false;
    if (doc) ctx.go(`#/experiments/${enc(doc.id)}`);
  });
  fill(box, form);
}

function parseValues(text) {
  return text
    .split(",")
    .map((v) => v.trim())
    .filter((v) => v !== "")
    .map((v) => {
      try {
        return JSON.parse(v);
      } catch {
        return v;
      }
    });
}

function studyForm(ctx, box, presets, studyPresets) {
  const select = h("select", { id: "study-base", name: "base" }, presetOptions(presets));
  const name = h("input", { id: "study-name", name: "name", placeholder: "the base's name" });
  const axes = h("div", { id: "study-axes" });
  const message = h("div", { id: "study-message" });
  const studyPreset = h(
    "select",
    { id: "study-preset", name: "study-preset" },
    h("option", { value: "" }, "none: a base preset and the axes below"),
    studyPresets.map((p) => h("option", { value: p.name }, `${p.name}: ${p.description}`)),
  );
  const studyByName = Object.fromEntries(studyPresets.map((p) => [p.name, p]));
  studyPreset.addEventListener("change", () => {
    const chosen = studyByName[studyPreset.value];
    select.disabled = Boolean(chosen);
    axes.replaceChildren();
    if (chosen) {
      for (const [path, values] of Object.entries(chosen.study.axes))
        addAxis(path, values.map((v) => JSON.stringify(v)).join(", "));
    } else addAxis("model.gamma", "0.6, 0.8, 1.0");
  });
  function addAxis(path = "", values = "") {
    axes.append(
      h(
        "div",
        { class: "axis" },
        h("input", { class: "axis-path", value: path, placeholder: "model.gamma" }),
        h("input", { class: "axis-values", value: values, placeholder: "0.6, 0.8, 1.0" }),
      ),
    );
  }
  addAxis("model.gamma", "0.6, 0.8, 1.0");
  const button = h("button", { type: "submit", id: "study-button" }, "Submit study");
  const form = h(
    "form",
    { id: "study-form" },
    h("h2", {}, "Submit a study"),
    studyPresets.length ? h("label", {}, "Study preset ", studyPreset) : null,
    h("label", {}, "Base preset ", select),
    h("label", {}, "Name ", name),
    h("p", { class: "muted" }, "Axes: a spec field and comma-separated values; the grid product."),
    axes,
    h("div", { class: "actions" }, h("button", { type: "button", onclick: () => addAxis() }, "Add axis"), button),
    message,
  );
  const byName = Object.fromEntries(presets.map((p) => [p.name, p]));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = studyByName[studyPreset.value];
    const body = chosen
      ? { ...structuredClone(chosen.study), axes: {} }
      : { base: byName[select.value].spec, axes: {} };
    if (name.value.trim()) body.name = name.value.trim();
    for (const row of axes.querySelectorAll(".axis")) {
      const path = row.querySelector(".axis-path").value.trim();
      if (path) body.axes[path] = parseValues(row.querySelector(".axis-values").value);
    }
    button.disabled = true;
    fill(message);
    const doc = await guarded(message, () => send("POST", "/v1/studies", body));
    button.disabled = false;
    if (doc) ctx.go(`#/studies/${enc(doc.id)}`);
  });
  fill(box, form);
}

function experimentList(ctx, box) {
  const rows = new Map(); // id -> {doc, tr}
  const streams = new Map(); // id -> watcher
  const selected = new Set();
  const tbody = h("tbody");
  const message = h("div");
  const more = h("button", { type: "button", id: "more", hidden: true }, "More");
  const compare = h(
    "button",
    { type: "button", id: "compare-selected", disabled: true, hidden: !ctx.features.compare },
    "Compare selected",
  );
  const statusFilter = h(
    "select",
    { id: "status-filter" },
    ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) =>
      h("option", { value: s }, s || "any status"),
    ),
  );
  const tagFilter = h("input", { id: "tag-filter", placeholder: "tag", hidden: !ctx.features.patch });
  let cursor = null;
  let timer = null;
  ctx.onLeave(() => {
    clearTimeout(timer);
    for (const s of streams.values()) s.close();
  });

  compare.addEventListener("click", () => ctx.go(`#/compare?ids=${[...selected].map(enc).join(",")}`));

  function row(doc) {
    const check = h("input", {
      type: "checkbox",
      class: "select",
      "aria-label": `select ${doc.name}`,
      checked: selected.has(doc.id),
      onchange: (e) => {
        if (e.target.checked) selected.add(doc.id);
        else selected.delete(doc.id);
        compare.disabled = selected.size < 1;
      },
    });
    return h(
      "tr",
      { dataset: { id: doc.id } },
      ctx.features.compare ? h("td", {}, check) : null,
      h("td", {}, h("a", { href: `#/experiments/${enc(doc.id)}` }, doc.name), " ", tags(doc)),
      h("td", {}, badge(doc.status)),
      h("td", {}, progressBar(doc.progress, doc.status)),
      h("td", { class: "eta" }, eta(doc.progress, doc.status)),
      h("td", {}, when(doc.created_at)),
    );
  }

  function update(doc) {
    const old = rows.get(doc.id);
    const tr = row(doc);
    if (old) old.tr.replaceWith(tr);
    else tbody.append(tr);
    rows.set(doc.id, { doc, tr });
  }

  function stream() {
    // live rows: the events stream for the first few active ones, the list poll for the rest
    for (const [id, s] of streams) {
      if (!rows.has(id) || !isActive(rows.get(id).doc.status)) {
        s.close();
        streams.delete(id);
      }
    }
    if (!ctx.features.events) return;
    for (const { doc } of rows.values()) {
      if (streams.size >= MAX_LIST_STREAMS) break;
      if (!isActive(doc.status) || streams.has(doc.id)) continue;
      streams.set(doc.id, watch(doc.id, { onStatus: update }, { events: true }));
    }
  }

  function query(extra = "") {
    const q = new URLSearchParams({ limit: "50" });
    if (statusFilter.value) q.set("status", statusFilter.value);
    if (tagFilter.value.trim()) q.set("tag", tagFilter.value.trim());
    return `/v1/experiments?${q}${extra}`;
  }

  async function load(reset) {
    clearTimeout(timer);
    const page = await guarded(message, () => get(query(reset || !cursor ? "" : `&cursor=${enc(cursor)}`)));
    if (page === undefined) return;
    fill(message);
    if (reset) {
      rows.clear();
      tbody.replaceChildren();
    }
    for (const doc of page.items) update(doc);
    cursor = page.next_cursor;
    more.hidden = !cursor;
    if (!rows.size) tbody.append(h("tr", {}, h("td", { colspan: "6", class: "muted" }, "No experiments yet.")));
    stream();
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    const active = [...rows.values()].some(({ doc }) => isActive(doc.status));
    timer = setTimeout(refresh, active ? LIST_POLL_MS : LIST_POLL_MS * 4);
  }

  async function refresh() {
    // the newest page again: new experiments and the status of the others
    const page = await guarded(message, () => get(query()));
    if (page !== undefined) {
      const fresh = page.items.filter((d) => !rows.has(d.id));
      for (const doc of page.items) if (rows.has(doc.id)) update(doc);
      if (fresh.length) return load(true);
      stream();
    }
    schedule();
  }

  statusFilter.addEventListener("change", () => load(true));
  tagFilter.addEventListener("change", () => load(true));
  more.addEventListener("click", () => load(false));
  fill(
    box,
    h("div", { class: "bar" }, h("h2", {}, "Experiments"), statusFilter, tagFilter, compare),
    message,
    h(
      "table",
      { id: "experiment-table" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ctx.features.compare ? h("th", {}, "") : null,
          ["Name", "Status", "Progress", "ETA", "Created"].map((c) => h("th", {}, c)),
        ),
      ),
      tbody,
    ),
    more,
  );
  load(true);
}

function studyList(ctx, box) {
  const message = h("div");
  const tbody = h("tbody");
  let timer = null;
  ctx.onLeave(() => clearTimeout(timer));
  async function load() {
    const page = await guarded(message, () => get("/v1/studies?limit=50"));
    if (page === undefined) return;
    tbody.replaceChildren(
      ...page.items.map((s) =>
        h(
          "tr",
          { dataset: { id: s.id } },
          h("td", {}, h("a", { href: `#/studies/${enc(s.id)}` }, s.name), " ", tags(s)),
          h("td", {}, badge(s.status)),
          h("td", {}, progressBar(s.progress, s.status)),
          h("td", {}, eta(s.progress, s.status)),
          h("td", {}, String(s.members?.length ?? "–")),
          h("td", {}, when(s.created_at)),
        ),
      ),
    );
    if (!page.items.length) tbody.append(h("tr", {}, h("td", { colspan: "6", class: "muted" }, "No studies yet.")));
    const active = page.items.some((s) => isActive(s.status));
    timer = setTimeout(load, active ? STUDY_POLL_MS : STUDY_POLL_MS * 5);
  }
  const t = table(["Name", "Status", "Progress", "ETA", "Members", "Created"], [], { id: "study-table" });
  t.querySelector("tbody").replaceWith(tbody);
  fill(box, h("h2", {}, "Studies"), message, t);
  load();
}

// -- figures -----------------------------------------------------------------------------------

/** A figure grid: figures.load(list of {name, path}) fetches each PNG (with the key) and shows
 * it as a blob URL; older URLs are revoked. */
function figureGrid(ctx, id) {
  const grid = h("div", { class: "figures", id });
  const urls = new Map();
  const latest = new Map(); // name -> number of the newest request: an older answer is dropped
  ctx.onLeave(() => {
    for (const u of urls.values()) URL.revokeObjectURL(u);
  });
  async function load(items) {
    await Promise.all(
      items.map(async ({ name, path, svg }) => {
        let fig = grid.querySelector(`figure[data-name="${CSS.escape(name)}"]`);
        if (!fig) {
          fig = h(
            "figure",
            { dataset: { name } },
            h("img", { alt: `${name} figure`, "data-plot": name }),
            h("figcaption", {}, name, svg ? [" · ", h("a", { href: "#", class: "svg" }, "SVG")] : null),
          );
          if (svg) {
            fig.querySelector("a.svg").addEventListener("click", async (e) => {
              e.preventDefault();
              const u = await blobUrl(svg);
              window.open(u, "_blank", "noopener");
            });
          }
          grid.append(fig);
        }
        const ticket = (latest.get(name) || 0) + 1;
        latest.set(name, ticket);
        fig.dataset.state = "loading";
        let url;
        try {
          url = await blobUrl(path);
        } catch (err) {
          if (latest.get(name) === ticket)
            fill(fig.querySelector("figcaption"), name, ": ", String(err.message || err));
          return;
        }
        if (latest.get(name) !== ticket) {
          URL.revokeObjectURL(url); // a newer figure was asked for meanwhile
          return;
        }
        const img = fig.querySelector("img");
        const old = urls.get(name);
        img.addEventListener("load", () => old && URL.revokeObjectURL(old), { once: true });
        img.src = url;
        urls.set(name, url);
        fig.dataset.state = "loaded";
      }),
    );
  }
  return { grid, load };
}

/** fn() at most every REFRESH_MS, and always when forced (a last call at the end). */
function throttle(ctx, fn) {
  let last = 0;
  let pending = null;
  ctx.onLeave(() => clearTimeout(pending));
  return (force = false) => {
    const wait = last + REFRESH_MS - Date.now();
    clearTimeout(pending);
    if (force || wait <= 0) {
      last = Date.now();
      fn();
    } else {
      pending = setTimeout(() => {
        last = Date.now();
        fn();
      }, wait);
    }
  };
}

// -- one experiment ----------------------------------------------------------------------------

export async function experiment(ctx, id) {
  const head = h("section", { id: "experiment", class: "card" });
  const actions = h("div", { class: "actions" });
  const figures = figureGrid(ctx, "figures");
  const results = h("section", { id: "results" });
  const message = h("div");
  const labels = h("section", { id: "labels" });
  fill(ctx.view, head, actions, message, labels, h("h2", {}, "Figures"), figures.grid, results);
  const path = `/v1/experiments/${enc(id)}`;
  let doc = await guarded(message, () => get(path));
  if (doc === undefined) return;
  let mode = ctx.features.events ? "events" : "polling";

  function renderHead() {
    fill(
      head,
      h("h1", {}, doc.name, " ", badge(doc.status)),
      h("div", { class: "live", id: "live-mode", dataset: { mode } }, `live: ${mode}`),
      progressBar(doc.progress, doc.status),
      h(
        "dl",
        {},
        h("dt", {}, "ETA"),
        h("dd", { id: "eta" }, eta(doc.progress, doc.status)),
        h("dt", {}, "id"),
        h("dd", {}, h("code", {}, doc.id)),
        h("dt", {}, "spec hash"),
        h("dd", {}, h("code", {}, doc.spec_hash)),
        h("dt", {}, "created"),
        h("dd", {}, when(doc.created_at)),
        h("dt", {}, "started"),
        h("dd", {}, when(doc.started_at)),
        h("dt", {}, "finished"),
        h("dd", {}, when(doc.finished_at)),
        h("dt", {}, "queue"),
        h("dd", {}, doc.queue || "–"),
        doc.tags?.length ? [h("dt", {}, "tags"), h("dd", {}, tags(doc))] : null,
        doc.notes ? [h("dt", {}, "notes"), h("dd", { class: "notes" }, doc.notes)] : null,
      ),
      doc.waiting ? h("p", { class: "warning" }, doc.waiting) : null,
      doc.error ? h("pre", { class: "error" }, `${doc.error.reason}: ${doc.error.message}`) : null,
    );
    fill(
      actions,
      isActive(doc.status)
        ? h("button", { type: "button", id: "cancel", onclick: cancel }, "Cancel")
        : null,
      h("button", { type: "button", id: "delete", onclick: remove }, "Delete"),
      h("button", { type: "button", onclick: () => download(`${path}/results`, `${doc.name}.json`) }, "Results JSON"),
      h("button", { type: "button", onclick: () => download(`${path}/results.csv`, `${doc.name}.csv`) }, "Points CSV"),
      ctx.features.compare
        ? h("a", { class: "button", href: `#/compare?ids=${enc(doc.id)}` }, "Compare with …")
        : null,
    );
  }

  async function cancel() {
    const d = await guarded(message, () => send("POST", `${path}/cancel`));
    if (d) {
      doc = d;
      renderHead();
    }
  }

  async function remove() {
    if (!window.confirm(`Delete ${doc.name} and its data?`)) return;
    const ok = await guarded(message, () => send("DELETE", path));
    if (ok !== undefined) ctx.go("#/");
  }

  async function download(url, filename) {
    const u = await guarded(message, () => blobUrl(url));
    if (!u) return;
    const a = h("a", { href: u, download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(u), 10000);
  }

  let asked = 0; // results requests made: only the newest answer is shown
  const refresh = throttle(ctx, async () => {
    if (!doc.progress?.points_done) return;
    const plots = doc.links?.plots || {};
    figures.load(Object.entries(plots).map(([name, l]) => ({ name, path: l.png, svg: l.svg })));
    const ticket = ++asked;
    const res = await guarded(results, () => get(`${path}/results`));
    if (res && ticket === asked) renderResults(results, res);
  });

  renderHead();
  if (ctx.features.patch) labelsForm(labels, path, doc, (d) => {
    doc = d;
    renderHead();
  });
  refresh(true);
  if (TERMINAL.has(doc.status)) return;
  const watcher = watch(
    id,
    {
      onStatus(d) {
        const changed = d.progress?.points_done !== doc.progress?.points_done || d.status !== doc.status;
        doc = d;
        renderHead();
        if (changed) refresh(TERMINAL.has(d.status));
      },
      onMode(m) {
        if (m === "done") return;
        mode = m;
        const node = head.querySelector("#live-mode");
        if (node) {
          node.dataset.mode = m;
          node.textContent = `live: ${m}`;
        }
      },
    },
    { events: ctx.features.events },
  );
  ctx.onLeave(() => watcher.close());
}

/** Tags and notes (not part of the spec), saved with PATCH. */
function labelsForm(box, path, doc, saved) {
  const tagsInput = h("input", {
    id: "tags-input",
    value: (doc.tags || []).join(", "),
    placeholder: "tag, another-tag",
  });
  const notes = h("textarea", { id: "notes-input", rows: "3", placeholder: "notes" });
  notes.value = doc.notes || "";
  const message = h("div", { id: "labels-message" });
  const form = h(
    "form",
    { id: "labels-form" },
    h("label", {}, "Tags ", tagsInput),
    h("label", {}, "Notes ", notes),
    h("div", { class: "actions" }, h("button", { type: "submit", id: "labels-save" }, "Save tags and notes")),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      tags: tagsInput.value.split(",").map((t) => t.trim()).filter(Boolean),
      notes: notes.value.trim() ? notes.value : null,
    };
    fill(message);
    const d = await guarded(message, () => send("PATCH", path, body));
    if (d) {
      fill(message, h("span", { class: "muted" }, "saved"));
      saved(d);
    }
  });
  fill(box, h("details", {}, h("summary", {}, "Tags and notes"), form));
}

function renderResults(box, res) {
  const weights = res.weights || [];
  const thresholds = res.thresholds || [];
  const finite = thresholds.some((t) => t.n_half_finite_size !== undefined);
  const pl = res.power_law;
  fill(
    box,
    h("h2", {}, "Recovery thresholds"),
    h(
      "p",
      { class: "muted" },
      "n_half: smallest n where the seed-mean cos² of direction i reaches 1/2 (interpolated in log n).",
    ),
    table(
      ["i", "|λ_i|", "n_half", "theory n_half", "ratio", "theory onset", finite ? "finite-size n_half" : null].filter(
        (x) => x !== null,
      ),
      thresholds.map((t) =>
        h(
          "tr",
          {},
          h("td", {}, t.feature),
          h("td", {}, num(t.weight ?? weights[t.feature - 1])),
          h("td", {}, num(t.n_half)),
          h("td", {}, num(t.n_half_theory)),
          h("td", {}, t.n_half && t.n_half_theory ? num(t.n_half / t.n_half_theory) : "–"),
          h("td", {}, num(t.n_onset_theory)),
          finite ? h("td", {}, num(t.n_half_finite_size)) : null,
        ),
      ),
      { id: "thresholds" },
    ),
    h("h2", {}, "Power law"),
    pl
      ? h(
          "p",
          { id: "power-law" },
          `${pl.method}: exponent ${num(pl.exponent)}`,
          pl.exponent_ci ? ` [${num(pl.exponent_ci[0])}, ${num(pl.exponent_ci[1])}]` : "",
          ` · theory ${pl.exponent_theory === null ? "none (gamma ≤ 1/2)" : num(pl.exponent_theory)}`,
          pl.n_range ? ` · n in [${num(pl.n_range[0])}, ${num(pl.n_range[1])}]` : "",
        )
      : h("p", { id: "power-law", class: "muted" }, "Not enough points for a fit yet."),
    h("p", { class: "muted", id: "results-summary" }, `${res.points?.length ?? 0} points · d1 = ${res.d1 ?? "–"} · feature dimension ${res.feature_dim ?? "–"} · engine ${res.engine_version ?? (res.engine_versions || []).join(", ")}${res.complete ? "" : " · partial"}`),
    h("h2", {}, "Spec"),
    h("pre", { id: "spec" }, JSON.stringify(res.spec, null, 2)),
  );
}

// -- one study ---------------------------------------------------------------------------------

export async function study(ctx, id) {
  const head = h("section", { id: "study", class: "card" });
  const message = h("div");
  const members = h("section", { id: "members" });
  const figures = figureGrid(ctx, "study-figures");
  const results = h("section", { id: "study-results" });
  fill(ctx.view, head, message, members, h("h2", {}, "Figures"), figures.grid, results);
  const path = `/v1/studies/${enc(id)}`;
  let timer = null;
  ctx.onLeave(() => clearTimeout(timer));
  let lastDone = -1;
  let asked = 0;
  const refresh = throttle(ctx, async () => {
    const plots = doc.links?.plots || {};
    figures.load(Object.entries(plots).map(([name, l]) => ({ name, path: l.png, svg: l.svg })));
    const ticket = ++asked;
    const res = await guarded(results, () => get(`${path}/results`));
    if (res && ticket === asked) renderStudyResults(results, res);
  });
  let doc;

  async function load() {
    const d = await guarded(message, () => get(path));
    if (d === undefined) return;
    doc = d;
    const ids = doc.members.map((m) => m.experiment_id).filter(Boolean);
    fill(
      head,
      h("h1", {}, doc.name, " ", badge(doc.status)),
      progressBar(doc.progress, doc.status),
      h("p", {}, `ETA ${eta(doc.progress, doc.status)} · created ${when(doc.created_at)} · `, tags(doc)),
      h("p", {}, "axes: ", h("code", {}, JSON.stringify(doc.axes))),
      doc.notes ? h("p", { class: "notes" }, doc.notes) : null,
      h(
        "div",
        { class: "actions" },
        isActive(doc.status)
          ? h("button", { type: "button", id: "study-cancel", onclick: () => send("POST", `${path}/cancel`).then(load) }, "Cancel")
          : null,
        ctx.features.compare && ids.length
          ? h("a", { class: "button", href: `#/compare?ids=${ids.map(enc).join(",")}` }, "Compare members")
          : null,
      ),
    );
    fill(
      members,
      h("h2", {}, "Members"),
      table(
        ["Experiment", "Params", "Status", "Progress"],
        doc.members.map((m) =>
          h(
            "tr",
            {},
            h("td", {}, m.experiment_id ? h("a", { href: `#/experiments/${enc(m.experiment_id)}` }, m.experiment_id.slice(0, 8)) : "deleted"),
            h("td", {}, Object.entries(m.params).map(([k, v]) => `${k} = ${JSON.stringify(v)}`).join(", ")),
            h("td", {}, badge(m.status)),
            h("td", {}, m.progress ? progressBar(m.progress, m.status) : "–"),
          ),
        ),
        { id: "member-table" },
      ),
    );
    if (doc.progress.points_done !== lastDone) {
      lastDone = doc.progress.points_done;
      if (lastDone > 0) refresh(TERMINAL.has(doc.status));
    }
    if (isActive(doc.status)) timer = setTimeout(load, STUDY_POLL_MS);
  }
  await load();
}

function renderStudyResults(box, res) {
  fill(
    box,
    h("h2", {}, "Members' results"),
    table(
      ["Params", "Status", "Exponent", "CI", "Theory", "n_half (first directions)"],
      res.members.map((m) =>
        h(
          "tr",
          {},
          h("td", {}, Object.entries(m.params).map(([k, v]) => `${k} = ${JSON.stringify(v)}`).join(", ")),
          h("td", {}, badge(m.status)),
          h("td", {}, num(m.power_law?.exponent)),
          h("td", {}, m.power_law?.exponent_ci ? `[${num(m.power_law.exponent_ci[0])}, ${num(m.power_law.exponent_ci[1])}]` : "–"),
          h("td", {}, num(m.power_law?.exponent_theory)),
          h("td", {}, (m.thresholds || []).slice(0, 4).map((t) => `${num(t.n_half)} (${num(t.n_half_theory)})`).join(" · ")),
        ),
      ),
      { id: "study-results-table" },
    ),
  );
}

// -- comparison --------------------------------------------------------------------------------

export async function compare(ctx, ids) {
  const message = h("div");
  if (!ids.length) {
    fill(ctx.view, h("h1", {}, "Compare"), h("p", {}, "Select experiments on the home page and press “Compare selected”."));
    return;
  }
  const q = `ids=${ids.map(enc).join(",")}`;
  const figures = figureGrid(ctx, "compare-figures");
  const tableBox = h("section", { id: "compare-table" });
  const xAxis = h(
    "select",
    { id: "compare-x" },
    h("option", { value: "" }, "x: n"),
    h("option", { value: "n_over_n_half" }, "x: n / n_half theory (collapses d and gamma)"),
  );
  fill(ctx.view, h("div", { class: "bar" }, h("h1", {}, `Compare ${ids.length} experiments`), xAxis), message, figures.grid, tableBox);
  const doc = await guarded(message, () => get(`/v1/compare?${q}`));
  if (doc === undefined) return;
  const plots = doc.plots && Object.keys(doc.plots).length ? Object.keys(doc.plots) : ["mse"];
  function loadFigures() {
    const x = xAxis.value ? `&x=${enc(xAxis.value)}` : "";
    const link = (name, fmt) => (doc.plots?.[name]?.[fmt] || `/v1/compare/plots/${name}.${fmt}?${q}`) + x;
    figures.load(plots.map((name) => ({ name, path: link(name, "png"), svg: link(name, "svg") })));
  }
  xAxis.addEventListener("change", loadFigures);
  loadFigures();
  const diffs = Object.entries(doc.differences || {});
  fill(
    tableBox,
    table(
      ["Experiment", "Status", "d1", "Exponent", "CI", "Theory", "n_half (first directions)"],
      doc.experiments.map((e) =>
        h(
          "tr",
          {},
          h("td", {}, h("a", { href: `#/experiments/${enc(e.experiment_id)}` }, e.name), " ", h("code", { class: "muted" }, e.experiment_id.slice(0, 8))),
          h("td", {}, badge(e.status)),
          h("td", {}, e.d1 ?? "–"),
          h("td", {}, num(e.power_law?.exponent)),
          h("td", {}, e.power_law?.exponent_ci ? `[${num(e.power_law.exponent_ci[0])}, ${num(e.power_law.exponent_ci[1])}]` : "–"),
          h("td", {}, num(e.power_law?.exponent_theory)),
          h("td", {}, (e.thresholds || []).slice(0, 4).map((t) => `${num(t.n_half)} (${num(t.n_half_theory)})`).join(" · ")),
        ),
      ),
      { id: "compare-experiments" },
    ),
    h("h2", {}, "Spec differences"),
    diffs.length
      ? table(
          ["Field", ...doc.experiments.map((e) => `${e.name} ${e.experiment_id.slice(0, 8)}`)],
          diffs.map(([field, values]) => h("tr", {}, h("td", {}, h("code", {}, field)), values.map((v) => h("td", {}, JSON.stringify(v))))),
          { id: "compare-differences" },
        )
      : h("p", { class: "muted" }, "The specs are the same."),
  );
}

