// medfed dashboard: polls /api/state every 2 s and draws it. Plain JS and inline SVG, no
// libraries, so it works on hospital networks with no internet access.
"use strict";

const REFRESH_MS = 2000;
// Metrics that live in [0, 1] share a fixed axis, so curves are comparable between runs.
const UNIT_METRICS = new Set([
  "auc", "accuracy", "sensitivity", "specificity", "precision", "recall", "f1", "dice", "iou",
  "balanced_accuracy", "threshold", "ece", "brier",
]);
const ORDER = ["auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "threshold",
  "dice", "loss"];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

function text(id, value) {
  $(id).textContent = value;
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function fmtBytes(n) {
  if (!n) return "0";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}

function fmtNumber(x, digits = 3) {
  return x === null || x === undefined ? "-" : x.toFixed(digits);
}

function el(tag, attrs = {}, content = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (content !== null) node.textContent = content;
  return node;
}

function svg(tag, attrs = {}, content = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (content !== null) node.textContent = content;
  return node;
}

// --- header and progress ------------------------------------------------------------------

function renderRun(state) {
  const run = state.run;
  text("run-id", run.run_id ? `run ${run.run_id.slice(0, 12)}` : "run -");
  text("task", run.task || "-");
  text("strategy", run.strategy || "-");
  text("privacy", run.dp ? `DP-SGD, epsilon budget ${run.target_epsilon}` : "no DP");
  const status = $("status");
  status.textContent = run.status;
  status.className = "badge " + (run.status.startsWith("running") || run.status.startsWith("waiting")
    ? "running" : run.status);

  text("round", run.round);
  text("total-rounds", run.total_rounds || "?");
  const share = run.total_rounds ? Math.min(1, run.round / run.total_rounds) : 0;
  $("bar-fill").style.width = `${(share * 100).toFixed(1)}%`;
  const bar = $("progressbar");
  bar.setAttribute("aria-valuemax", run.total_rounds);
  bar.setAttribute("aria-valuenow", run.round);
  text("sites-connected", run.sites_connected ?? "-");
  text("sites-participating", run.sites_participating ?? "-");
  const last = state.history[state.history.length - 1];
  text("last-duration", last ? fmtSeconds(last.duration_s) : "-");
  text("elapsed", fmtSeconds(state.now - run.started_at));
}

// --- global metric curves -----------------------------------------------------------------

function metricNames(history) {
  const names = new Set();
  for (const h of history) for (const k of Object.keys(h.metrics)) names.add(k);
  return [...names].sort((a, b) => {
    const ia = ORDER.indexOf(a), ib = ORDER.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
}

function chart(name, points, totalRounds) {
  const W = 300, H = 150, L = 36, R = 10, T = 8, B = 22;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const xMax = Math.max(totalRounds, ...xs, 1);
  let yMin = 0, yMax = 1;
  if (!UNIT_METRICS.has(name)) {
    yMin = Math.min(...ys); yMax = Math.max(...ys);
    const pad = (yMax - yMin) * 0.1 || Math.abs(yMax) * 0.1 || 1;
    yMin = Math.max(0, yMin - pad); yMax += pad;
  }
  const x = (r) => L + ((r - 1) / Math.max(1, xMax - 1)) * (W - L - R);
  const y = (v) => T + (1 - (v - yMin) / (yMax - yMin)) * (H - T - B);

  const box = el("div", { class: "chart", "data-metric": name });
  const title = el("h3");
  title.append(el("span", {}, name), el("b", {}, fmtNumber(ys[ys.length - 1])));
  box.append(title);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `${name} per round` });
  plot.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  plot.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const v of [yMin, (yMin + yMax) / 2, yMax]) {
    plot.append(svg("line", { class: "axis", x1: L, y1: y(v), x2: W - R, y2: y(v),
      "stroke-dasharray": "2 3" }));
    plot.append(svg("text", { class: "tick", x: L - 4, y: y(v) + 3, "text-anchor": "end" },
      v.toFixed(yMax - yMin < 2 ? 2 : 0)));
  }
  const xTicks = [...new Set([1, Math.round((1 + xMax) / 2), xMax])];
  for (const r of xTicks) {
    plot.append(svg("text", { class: "tick", x: x(r), y: H - 6, "text-anchor": "middle" },
      `${r}`));
  }
  if (points.length > 1) {
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`);
    plot.append(svg("path", { class: "curve", d: d.join(" ") }));
  }
  for (const [r, v] of points) {
    const dot = svg("circle", { class: "dot", cx: x(r), cy: y(v), r: 3 });
    dot.append(svg("title", {}, `round ${r}: ${v.toFixed(4)}`));
    plot.append(dot);
  }
  box.append(plot);
  return box;
}

// The aggregator's warnings about the latest global model (results.json `warnings`): a model
// that calls every image one class, or falls below the balanced-accuracy floor.
function renderWarnings(state) {
  const last = state.history[state.history.length - 1];
  const warnings = (last && last.warnings) || [];
  const box = $("warnings");
  box.replaceChildren(...warnings.map((w) => el("p", {}, `Warning: ${w}`)));
  box.hidden = warnings.length === 0;
}

function renderCharts(state) {
  const history = state.history;
  const box = $("charts");
  if (!history.length) return;
  const last = history[history.length - 1];
  text("global-source", last.source === "central"
    ? "(central test set)" : "(sites' validation, aggregated)");
  box.replaceChildren();
  for (const name of metricNames(history)) {
    const points = history
      .filter((h) => h.metrics[name] !== null && h.metrics[name] !== undefined)
      .map((h) => [h.round, h.metrics[name]]);
    if (points.length) box.append(chart(name, points, state.run.total_rounds));
  }
}

// --- site table ---------------------------------------------------------------------------

function epsilonCell(site) {
  const cell = el("td", { class: "epsilon" });
  if (site.epsilon === null) {
    cell.textContent = site.budget_epsilon === null ? "no DP" : "-";
    return cell;
  }
  const wrap = el("div", { class: "eps" });
  const budget = site.budget_epsilon;
  wrap.append(el("span", {}, budget === null
    ? site.epsilon.toFixed(2) : `${site.epsilon.toFixed(2)} / ${budget}`));
  if (budget) {
    const share = site.epsilon / budget;
    const meter = el("div", { class: "meter", title: `${(share * 100).toFixed(0)}% of budget` });
    const fill = el("div", { class: share > 1.0001 ? "over" : share > 0.8 ? "high" : "" });
    fill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
    meter.append(fill);
    wrap.append(meter);
  }
  cell.append(wrap);
  return cell;
}

function renderSites(state) {
  const body = document.querySelector("#sites tbody");
  const rows = state.sites.map((s) => {
    const seen = s.last_seen_round === null ? "not yet"
      : `round ${s.last_seen_round}, ${fmtSeconds(Math.max(0, state.now - s.last_seen_at))} ago`;
    const tr = el("tr", { "data-site": s.name,
      class: s.failures ? "failed" : s.last_seen_round === null ? "waiting" : "" });
    tr.append(
      el("td", { class: "site" }, s.name),
      el("td", {}, seen),
      el("td", { class: "num" }, `${s.rounds_joined}`),
      el("td", { class: "num" }, s.train_seconds_last === null ? "-"
        : `${fmtSeconds(s.train_seconds_last)} / ${fmtSeconds(s.train_seconds_total)}`),
      epsilonCell(s),
      el("td", { class: "num" }, fmtNumber(s.val_auc)),
      el("td", { class: "num failures", title: s.last_failure || "" }, `${s.failures}`),
      el("td", { class: "num" }, `${fmtBytes(s.bytes_down)} / ${fmtBytes(s.bytes_up)}`),
    );
    return tr;
  });
  body.replaceChildren(...rows);
}

// --- polling ------------------------------------------------------------------------------

let lastOk = null;

async function refresh() {
  try {
    const response = await fetch("api/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const state = await response.json();
    renderRun(state);
    renderWarnings(state);
    renderCharts(state);
    renderSites(state);
    lastOk = new Date();
    text("connection", `updated ${lastOk.toLocaleTimeString()}`);
  } catch (err) {
    const since = lastOk ? ` since ${lastOk.toLocaleTimeString()}` : "";
    text("connection", `no answer from the aggregator${since}: the run may have ended`);
    const status = $("status");
    status.textContent = "lost contact";
    status.className = "badge lost";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
