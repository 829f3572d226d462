// cai review: the page. Plain JS, no build step, nothing fetched from outside this server.
// Every text that comes from the store (prompts, model answers, critiques, reasoning, names) is put
// into the page with textContent / text nodes only, never as markup: a model that writes
// "<script>" gets it shown, not run.
"use strict";

const PAGE = 50;
const state = {
  info: null,
  tab: "pairs",
  pairs: { rows: [], total: 0, offset: 0, sel: -1, detail: null },
  chains: { rows: [], total: 0, offset: 0, sel: -1 },
  runs: { rows: [], total: 0, offset: 0, sel: -1 },
  busy: false,
};

// ---- tiny DOM helpers -----------------------------------------------------------------------
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = String(v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
// replaceChildren with h()'s rules: nested arrays flattened, null/false left out, strings as text.
function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}
const fmtP = (p) => (p === null || p === undefined ? "—" : Number(p).toFixed(3));
const fmtTime = (t) => (t ? String(t).replace("T", " ").slice(0, 19) : "—");
const short = (s, n = 12) => (s ? String(s).slice(0, n) : "—");

function message(text, kind = "info") {
  const m = $("#message");
  m.textContent = text;
  m.className = kind;
}

async function api(path, options) {
  const res = await fetch(path, options);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : res.statusText;
    const err = new Error(`${res.status}: ${detail}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

function reviewer() { return $("#reviewer").value.trim() || state.info.reviewer; }

function pager(container, page, load) {
  container.replaceChildren();
  const last = Math.max(0, Math.ceil(page.total / PAGE) - 1);
  const cur = Math.floor(page.offset / PAGE);
  container.append(
    h("button", { type: "button", disabled: cur <= 0, onclick: () => load(page.offset - PAGE) }, "‹ prev"),
    h("span", { class: "count" }, page.total ? `${page.offset + 1}–${Math.min(page.offset + PAGE, page.total)} of ${page.total}` : "none"),
    h("button", { type: "button", disabled: cur >= last, onclick: () => load(page.offset + PAGE) }, "next ›"),
  );
}

function fillSelect(select, values, labelOf) {
  for (const v of values) {
    const value = typeof v === "string" ? v : v.value;
    select.append(h("option", { value }, labelOf ? labelOf(v) : value));
  }
}

// ---- pairs ----------------------------------------------------------------------------------
function pairQuery(offset) {
  const form = $("#pair-filters");
  const q = new URLSearchParams();
  for (const el of form.elements) {
    if (!el.name) continue;
    if (el.type === "checkbox") { if (el.checked) q.set(el.name, "true"); }
    else if (el.value !== "") q.set(el.name, el.value);
  }
  q.set("offset", offset);
  q.set("limit", PAGE);
  q.set("reviewer", reviewer());
  return q;
}

async function loadPairs(offset = 0, select = 0) {
  const page = await api(`/api/pairs?${pairQuery(Math.max(0, offset))}`);
  Object.assign(state.pairs, page, { sel: -1 });
  renderPairList();
  if (page.rows.length) await selectPair(Math.min(select < 0 ? page.rows.length - 1 : select, page.rows.length - 1));
  else $("#pair-detail").replaceChildren(h("p", { class: "muted" }, "No pair matches these filters."));
}

function verdictMark(p) {
  if (p === null || p === undefined) return "";
  return p > 0.5 ? "A" : p < 0.5 ? "B" : "tie";
}

function renderPairList() {
  const body = $("#pair-list tbody");
  body.replaceChildren();
  state.pairs.rows.forEach((r, i) => {
    const pos = r.position_consistent === null ? "—" : r.position_consistent ? "✓" : "✗";
    const mine = verdictMark(r.my_p);
    body.append(h("tr", {
      class: [i === state.pairs.sel ? "selected" : "", r.people_disagree ? "people-disagree" : "", r.status !== "ok" ? "invalid" : ""].join(" ").trim(),
      dataset: { id: r.comparison_id }, onclick: () => selectPair(i),
    },
      h("td", { class: "num" }, fmtP(r.p_a)),
      h("td", { class: r.position_consistent === false ? "bad" : "" , title: "orderings " + (r.position_consistent === false ? "disagree" : "agree") }, pos),
      h("td", { class: "mark", title: mine ? `my verdict: ${mine}` : "" }, mine ? `✔${mine}` : (r.n_human ? String(r.n_human) : "")),
      h("td", { class: "prompt" }, h("div", { class: "clip" }, r.prompt || "")),
    ));
  });
  pager($("#pair-pager"), state.pairs, (o) => loadPairs(o));
}

async function selectPair(i) {
  const row = state.pairs.rows[i];
  if (!row) return;
  state.pairs.sel = i;
  for (const [j, tr] of [...$("#pair-list tbody").children].entries()) tr.classList.toggle("selected", j === i);
  const sel = $("#pair-list tbody").children[i];
  if (sel) sel.scrollIntoView({ block: "nearest" });
  const detail = await api(`/api/pairs/${encodeURIComponent(row.comparison_id)}`);
  if (state.pairs.sel !== i) return; // a later selection won
  state.pairs.detail = detail;
  renderPair(detail, row);
}

const SIDES = {
  initial_vs_revised: ["initial response", "revised response"],
  two_samples: ["sample 0", "sample 1"],
};

function probBar(label, p, note) {
  const fill = h("div", { class: "fill" });
  if (p !== null && p !== undefined) fill.style.width = `${Math.round(Number(p) * 100)}%`;
  return h("div", { class: "prob" },
    h("span", { class: "plabel" }, label),
    h("div", { class: "bar", title: `P(A better) = ${fmtP(p)}` }, fill, h("div", { class: "mid" })),
    h("span", { class: "pval" }, fmtP(p)),
    note ? h("span", { class: "pnote muted" }, note) : null);
}

function messagesBlock(d) {
  const msgs = Array.isArray(d.messages) ? d.messages : [{ role: "user", content: d.prompt_text || "" }];
  return h("div", { class: "conversation" }, msgs.map((m) =>
    h("div", { class: `turn ${m.role}` }, h("span", { class: "role" }, m.role), h("div", { class: "text" }, m.content || ""))));
}

function renderPair(d, row) {
  const side = SIDES[d.pair_kind] || ["response A", "response B"];
  const mine = d.human_verdicts.find((v) => v.reviewer === `human:${reviewer()}`);
  const judgePick = d.p_a === null ? null : d.p_a > 0.5 ? "A" : d.p_a < 0.5 ? "B" : "tie";
  const consistency = d.position_consistent === null ? h("span", { class: "badge" }, "one ordering")
    : d.position_consistent ? h("span", { class: "badge good" }, "orderings agree")
      : h("span", { class: "badge bad" }, "orderings disagree");

  const meta = h("dl", { class: "meta" },
    h("dt", {}, "pair"), h("dd", {}, `${d.pair_kind || "—"} · comparison ${d.comparison_id}`),
    h("dt", {}, "judge"), h("dd", {}, `${d.judge_name || "—"} (${d.method || "?"}) · spec ${short(d.judge_spec_hash)} · model ${d.judge_model_id || "—"} · engine ${d.judge_engine || "—"}`),
    h("dt", {}, "constitution"), h("dd", {}, `${d.constitution_name || "—"} version ${d.constitution_version || "—"} · ${short(d.constitution_hash)}`),
    h("dt", {}, "prompt"), h("dd", {}, `${d.prompt_id} · ${d.split || "—"}${d.category ? " · " + d.category : ""}${d.prompt_tags && d.prompt_tags.length ? " · tags: " + d.prompt_tags.join(", ") : ""}`),
    d.status !== "ok" ? [h("dt", {}, "status"), h("dd", { class: "bad" }, `${d.status}: ${d.reason || ""}`)] : null,
  );

  const principles = h("div", { class: "principles" }, (d.principles || []).map((p) => {
    const l = p.label || {};
    return h("div", { class: "principle" },
      h("div", { class: "pid" }, p.principle_id, p.tags && p.tags.length ? h("span", { class: "muted small" }, ` · tags: ${p.tags.join(", ")}`) : null),
      h("div", { class: "question" }, p.question || "(question not in the store)"),
      l.status ? h("div", { class: "muted small" },
        l.status === "ok" ? `A first: ${fmtP(l.p_first)} · swapped: ${fmtP(l.p_swapped)} · label ${fmtP(l.p)}`
          : `invalid: ${l.reason || ""}`) : null,
    );
  }));

  const labels = h("div", { class: "labels" },
    probBar("A shown first", d.p_a_first, "P(A better)"),
    probBar("B shown first", d.p_a_swapped, d.p_a_swapped === null ? "not asked" : "P(A better), swapped back"),
    probBar("final label", d.p_a, judgePick ? `judge prefers ${judgePick}` : "no label"),
    h("div", { class: "consistency" }, consistency),
  );

  const resp = (key, text, id, label) => h("div", { class: `response ${judgePick === key ? "judge-pick" : ""} ${mine && verdictMark(mine.p_a) === key ? "my-pick" : ""}`, id: `response-${key.toLowerCase()}` },
    h("div", { class: "rhead" },
      h("span", { class: "letter" }, key), h("span", {}, label),
      judgePick === key ? h("span", { class: "badge judge" }, "judge's pick") : null,
      mine && verdictMark(mine.p_a) === key ? h("span", { class: "badge mine" }, "your pick") : null,
      h("span", { class: "muted small rid" }, short(id, 16))),
    h("div", { class: "text" }, text || ""));

  const others = d.human_verdicts.map((v) => h("li", {}, `${v.reviewer}: ${verdictMark(v.p_a) === "tie" ? "tie" : verdictMark(v.p_a) + " better"} (${fmtTime(v.created_at)})`));
  const buttons = [["a", "A is better"], ["t", "tie"], ["b", "B is better"], ["s", "skip"], ["u", "withdraw"]].map(([k, label]) =>
    h("button", { type: "button", class: "verdict", dataset: { key: k }, onclick: () => onVerdictKey(k) }, h("kbd", {}, k), " ", label));
  const verdictBar = h("div", { class: "verdicts" },
    h("div", { class: "vbuttons" }, buttons),
    h("div", { class: "vstate" }, mine ? `your verdict: ${verdictMark(mine.p_a) === "tie" ? "tie" : verdictMark(mine.p_a) + " is better"}` : "no verdict from you yet",
      state.info.read_only ? h("span", { class: "badge bad" }, "read-only") : null),
    others.length ? h("ul", { class: "people" }, others) : null);

  const reasoning = (d.principles || []).filter((p) => p.label && p.label.reasoning).map((p) =>
    h("details", { class: "reasoning", open: true }, h("summary", {}, `judge's reasoning · ${p.principle_id}`),
      Object.entries(p.label.reasoning).map(([view, text]) => h("div", {}, h("div", { class: "muted small" }, view === "first" ? "A shown first" : view === "swapped" ? "B shown first" : view), h("pre", {}, text || "")))));

  fill($("#pair-detail"),
    h("div", { class: "pos muted small" }, `pair ${state.pairs.offset + state.pairs.sel + 1} of ${state.pairs.total}`),
    meta,
    h("h2", {}, "Prompt"), messagesBlock(d),
    h("h2", {}, "Principles asked"), principles,
    h("h2", {}, "The judge's label"), labels,
    h("div", { class: "responses" }, resp("A", d.response_a, d.response_a_id, side[0]), resp("B", d.response_b, d.response_b_id, side[1])),
    verdictBar,
    reasoning,
    d.revision_id ? h("p", {}, h("a", { href: "#", onclick: (e) => { e.preventDefault(); openChain(d.revision_id); } }, "show the critique-and-revise chain →")) : null,
    h("details", { class: "lineage" }, h("summary", {}, "lineage (judge spec parameters, raw output)"),
      h("pre", {}, JSON.stringify({ params: d.params, raw_output: d.raw_output, seed: d.seed, run_id: d.run_id, created_at: d.created_at }, null, 2))),
  );
}

async function onVerdictKey(k) {
  if (state.tab !== "pairs") return;
  const row = state.pairs.rows[state.pairs.sel];
  if (!row) return;
  const verdict = { a: "a", b: "b", t: "tie", s: "skip", u: "clear" }[k];
  if (verdict === "skip") { message("skipped (nothing written)"); return nextPair(); }
  if (state.busy) return;
  state.busy = true;
  try {
    const res = await api("/api/verdicts", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ comparison_id: row.comparison_id, verdict, reviewer: reviewer() }),
    });
    if (verdict === "clear") {
      row.my_p = null;
      message(res.withdrawn ? "verdict withdrawn" : "you had no verdict on this pair");
      loadAgreement().catch(fail);
      renderPairList();
      await selectPair(state.pairs.sel);
      return;
    }
    row.my_p = res.p_a;
    row.n_human = (row.n_human || 0) + 1;
    message(`saved: ${verdict === "tie" ? "tie" : verdict.toUpperCase() + " is better"} as ${res.judge_name}`, "ok");
    renderPairList();
    loadAgreement().catch(fail);
    await nextPair();
  } catch (e) {
    message(`not saved: ${e.message}`, "error");
  } finally {
    state.busy = false;
  }
}

async function loadAgreement() {
  const res = await api("/api/agreement");
  const pct = (x) => `${Math.round(x * 100)}%`;
  fill($("#agreement"), res.judges.length ? ["judge vs people: ", res.judges.map((j, i) => [i ? " · " : "",
    h("b", {}, j.judge_name), ` (spec ${short(j.judge_spec_hash, 8)}) picks the same response on ${j.agree} of ${j.n} `,
    `reviewed pairs = ${pct(j.rate)} (95% CI ${pct(j.low)}–${pct(j.high)}), ${j.reviewers} reviewer${j.reviewers === 1 ? "" : "s"}`])]
    : "judge vs people: no pair with both a judge's label and a person's verdict yet (ties left out)");
}

async function nextPair() {
  const p = state.pairs;
  if (p.sel < p.rows.length - 1) return selectPair(p.sel + 1);
  if (p.offset + PAGE < p.total) return loadPairs(p.offset + PAGE, 0);
  const m = $("#message");
  const last = "that was the last pair of these filters";
  if (!m.textContent.includes(last)) message(`${m.textContent ? m.textContent + " · " : ""}${last}`, m.className || "info");
}

async function prevPair() {
  const p = state.pairs;
  if (p.sel > 0) return selectPair(p.sel - 1);
  if (p.offset > 0) return loadPairs(p.offset - PAGE, -1);
}

// ---- revisions ------------------------------------------------------------------------------
async function loadChains(offset = 0) {
  const q = new URLSearchParams(new FormData($("#revision-filters")));
  for (const [k, v] of [...q.entries()]) if (v === "") q.delete(k);
  q.set("offset", Math.max(0, offset));
  q.set("limit", PAGE);
  const page = await api(`/api/revisions?${q}`);
  Object.assign(state.chains, page, { sel: -1 });
  const body = $("#revision-list tbody");
  body.replaceChildren();
  page.rows.forEach((r, i) => body.append(h("tr", { onclick: () => { state.chains.sel = i; markSelected("#revision-list", i); openChain(r.revision_id, false).catch(fail); } },
    h("td", { class: "num" }, `${r.ok_rounds}/${r.rounds}`), h("td", { class: r.last_status === "ok" ? "" : "bad" }, r.last_status),
    h("td", { class: "prompt" }, h("div", { class: "clip" }, r.prompt || "")))));
  pager($("#revision-pager"), state.chains, loadChains);
  if (page.rows.length && !$("#revision-detail").dataset.loaded) { markSelected("#revision-list", 0); await openChain(page.rows[0].revision_id, false); }
}

function markSelected(table, i) {
  for (const [j, tr] of [...$(`${table} tbody`).children].entries()) tr.classList.toggle("selected", j === i);
}

function diffBlock(pieces) {
  return h("div", { class: "diff text" }, pieces.map(([op, text]) =>
    op === "same" ? document.createTextNode(text) : h(op === "ins" ? "ins" : "del", {}, text)));
}

async function openChain(revisionId, switchTab = true) {
  if (switchTab) showTab("revisions");
  state.chains.want = revisionId;
  const detail = $("#revision-detail");
  detail.dataset.loaded = "1";
  const c = await api(`/api/revisions/${encodeURIComponent(revisionId)}`);
  if (state.chains.want !== revisionId) return; // a later click won
  fill(detail,
    h("dl", { class: "meta" },
      h("dt", {}, "generation"), h("dd", {}, `${c.generation_id} · model ${c.generation_model_id || "—"}`),
      h("dt", {}, "reviser"), h("dd", {}, c.reviser_model_id || "—"),
      h("dt", {}, "constitution"), h("dd", {}, `${c.constitution_name || "—"} version ${c.constitution_version || "—"} · ${short(c.constitution_hash)}`)),
    h("h2", {}, "Prompt"), messagesBlock(c),
    h("h2", {}, "Initial response"), h("div", { class: "text box" }, c.text || ""),
    c.rounds.map((r) => h("section", { class: `round ${r.status === "ok" ? "" : "not-ok"}` },
      h("h3", {}, `Round ${r.round} · principle ${r.principle_id || "—"} `,
        h("span", { class: `badge ${r.status === "ok" ? "good" : "bad"}` }, r.status),
        h("span", { class: "muted small" }, ` −${r.diff_stats.removed} +${r.diff_stats.added} words${r.reason ? " · " + r.reason : ""}${r.cleaning && r.cleaning.length ? " · cleaned: " + r.cleaning.join(", ") : ""}`)),
      h("div", { class: "label" }, "critique request"), h("div", { class: "text quiet" }, r.critique_request || r.principle_critique || ""),
      h("div", { class: "label" }, "critique"), h("div", { class: "text box" }, r.critique || ""),
      h("div", { class: "label" }, "revision request"), h("div", { class: "text quiet" }, r.revision_request || ""),
      h("div", { class: "label" }, r.parent_revision_id ? `revision (diff against round ${(c.rounds.find((x) => x.revision_id === r.parent_revision_id) || {}).round})` : "revision (diff against the initial response)"),
      diffBlock(r.diff))),
  );
}

// ---- runs -----------------------------------------------------------------------------------
async function loadRuns(offset = 0) {
  const page = await api(`/api/runs?offset=${Math.max(0, offset)}&limit=${PAGE}`);
  Object.assign(state.runs, page, { sel: -1 });
  const body = $("#run-list tbody");
  body.replaceChildren();
  page.rows.forEach((r, i) => body.append(h("tr", { onclick: () => { markSelected("#run-list", i); openRun(r.run_id).catch(fail); } },
    h("td", {}, r.stage), h("td", { class: statusClass(r.status) }, r.status), h("td", { class: "small" }, fmtTime(r.started_at)),
    h("td", { class: "num small" }, duration(r.started_at, r.finished_at)))));
  pager($("#run-pager"), state.runs, loadRuns);
  if (page.rows.length && !$("#run-detail").dataset.loaded) { markSelected("#run-list", 0); await openRun(page.rows[0].run_id); }
}

function statusClass(status) { return status === "ok" ? "" : status === "running" ? "muted" : "bad"; }

function duration(start, end) {
  if (!start || !end) return "";
  const s = (Date.parse(end) - Date.parse(start)) / 1000;
  return Number.isFinite(s) ? (s < 120 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`) : "";
}

function kvTable(obj) {
  if (!obj || typeof obj !== "object") return h("pre", {}, JSON.stringify(obj));
  return h("table", { class: "kv" }, Object.entries(obj).map(([k, v]) =>
    h("tr", {}, h("th", {}, k), h("td", {}, typeof v === "object" && v !== null ? h("pre", {}, JSON.stringify(v, null, 1)) : String(v)))));
}

async function openRun(runId) {
  state.runs.want = runId;
  $("#run-detail").dataset.loaded = "1";
  const r = await api(`/api/runs/${encodeURIComponent(runId)}`);
  if (state.runs.want !== runId) return; // a later click won
  fill($("#run-detail"),
    h("h2", {}, `${r.stage} · `, h("span", { class: `badge ${r.status === "ok" ? "good" : "bad"}` }, r.status)),
    h("dl", { class: "meta" }, h("dt", {}, "run"), h("dd", {}, r.run_id), h("dt", {}, "started"), h("dd", {}, fmtTime(r.started_at)),
      h("dt", {}, "finished"), h("dd", {}, fmtTime(r.finished_at)), h("dt", {}, "host"), h("dd", {}, `${r.host || "—"} · cai ${r.cai_version || "?"}`),
      r.metrics.length ? [h("dt", {}, "metrics"), h("dd", {}, r.metrics.join(", "))] : null),
    r.error ? [h("h3", {}, "error"), h("pre", { class: "bad" }, r.error)] : null,
    r.plots.length ? h("h3", {}, "plots") : null,
    r.plots.map((p) => p.available
      ? h("figure", {}, h("img", { src: `/api/runs/${encodeURIComponent(r.run_id)}/plots/${p.index}`, alt: p.path }), h("figcaption", { class: "muted small" }, p.path))
      : h("p", { class: "muted small" }, `${p.path}: not shown (missing, or outside the data and model folders)`)),
    h("h3", {}, "summary"), kvTable(r.summary),
    h("h3", {}, "parameters"), kvTable(r.params),
  );
}

// ---- tabs, keys, start ----------------------------------------------------------------------
function showTab(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll("#tabs .tab")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${tab}`;
  if (tab === "revisions" && !state.chains.loaded) { state.chains.loaded = true; loadChains().catch(fail); }
  if (tab === "runs" && !state.runs.loaded) { state.runs.loaded = true; loadRuns().catch(fail); }
}

function fail(e) { message(String(e.message || e), "error"); }

document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  // Typing into a text field or choosing in a list is not a shortcut; a ticked checkbox or a
  // pressed button keeps the focus but takes no letters, so the keys work there.
  const t = e.target;
  const typing = t && (t.tagName === "SELECT" || t.tagName === "TEXTAREA" ||
    (t.tagName === "INPUT" && !["checkbox", "radio", "button"].includes(t.type)));
  if (typing) {
    if (e.key === "Escape") t.blur();
    return;
  }
  if (state.tab !== "pairs") return;
  const k = e.key;
  const run = (p) => { e.preventDefault(); p.catch(fail); };
  if (k === "j" || k === "ArrowDown") run(nextPair());
  else if (k === "k" || k === "ArrowUp") run(prevPair());
  else if (k === "n") run(state.pairs.offset + PAGE < state.pairs.total ? loadPairs(state.pairs.offset + PAGE) : Promise.resolve());
  else if (k === "p") run(state.pairs.offset > 0 ? loadPairs(state.pairs.offset - PAGE) : Promise.resolve());
  else if (["a", "b", "t", "s", "u"].includes(k)) run(onVerdictKey(k));
});

async function start() {
  const info = await api("/api/info");
  state.info = info;
  $("#store").textContent = `${info.db} · ${info.counts.pairs} pairs · ${info.counts.verdicts} verdicts`;
  const saved = localStorage.getItem("cai-review-reviewer");
  $("#reviewer").value = saved || info.reviewer;
  $("#reviewer").addEventListener("change", () => { localStorage.setItem("cai-review-reviewer", $("#reviewer").value.trim()); loadPairs(0).catch(fail); });
  const mode = $("#mode");
  if (info.read_only) { mode.textContent = "read-only: verdicts are not saved"; mode.classList.add("bad"); document.body.classList.add("read-only"); }
  else { mode.textContent = "verdicts are saved to the store"; mode.classList.add("good"); }
  const pf = $("#pair-filters");
  fillSelect(pf.elements.principle, info.principles.map((p) => ({ value: p.principle_id, q: p.question })), (p) => p.value);
  for (const o of pf.elements.principle.options) { const p = info.principles.find((x) => x.principle_id === o.value); if (p && p.question) o.title = p.question; }
  fillSelect(pf.elements.tag, info.tags);
  fillSelect(pf.elements.pair_kind, info.pair_kinds);
  fillSelect(pf.elements.judge, info.judges);
  fillSelect($("#revision-filters").elements.principle, info.principles.map((p) => p.principle_id));
  pf.addEventListener("change", (e) => {
    if (e.target.tagName === "SELECT") e.target.blur(); // so j/k and the verdict keys work right away
    loadPairs(0).catch(fail);
  });
  $("#revision-filters").addEventListener("change", () => { delete $("#revision-detail").dataset.loaded; loadChains(0).catch(fail); });
  for (const b of document.querySelectorAll("#tabs .tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  await Promise.all([loadPairs(0), loadAgreement()]);
  document.body.dataset.ready = "1";
}

start().catch(fail);
