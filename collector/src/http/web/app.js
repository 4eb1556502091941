// mxscope dashboard: three pages (overview, target, agents) over /api/v1, live through the
// server-sent events of /api/v1/events. No framework and nothing fetched from elsewhere: the
// collector embeds this file.
"use strict";

const view = document.getElementById("view");
const state = {
  page: "",
  filter: "",
  check: "",
  sort: "worst",
  since: "1h",
  events: [],        // live state changes since the page opened, newest first
  refreshTimer: null,
};
// What the browser tests (and anyone curious) read back: the last render and its duration.
window.mxscope = { renders: 0, lastRenderMs: 0, renderedAt: 0, page: "", events: 0 };

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const fmtMs = (v) => (v == null ? "–" : v < 10 ? v.toFixed(1) + " ms" : Math.round(v) + " ms");
const fmtPct = (v) => (v == null ? "–" : (v * 100).toFixed(v >= 0.999 || v === 0 ? 0 : 1) + " %");
const ago = (us) => {
  if (!us) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - us / 1e6));
  return s < 90 ? s + " s ago" : s < 5400 ? Math.round(s / 60) + " min ago" : s < 129600 ? Math.round(s / 3600) + " h ago" : Math.round(s / 86400) + " d ago";
};
// Whole days until an agent's client certificate expires (null: unknown, no mTLS).
const certDays = (us) => (us ? Math.floor((us / 1000 - Date.now()) / 86400000) : null);
const certLeft = (us) => {
  const d = certDays(us);
  if (d == null) return "–";
  return `${new Date(us / 1000).toISOString().slice(0, 10)} (${d < 0 ? "expired" : d + " d"})`;
};
const when = (us) => (us ? new Date(us / 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "–");
// A cell's class from its region state; a row's from its scope.
const CELL = { ok: "up", failing: "down", stale: "stale", agent: "agent" };
const CELL_LABEL = { ok: "up", failing: "down", stale: "stale", agent: "agent fault" };
const WORST = { down: 0, partial: 1, stale: 2, up: 3 };

async function api(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
  return body;
}

function stamp() {
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function showError(e) {
  view.innerHTML = `<p class="err">${esc(e.message || e)}</p>`;
}

// ---- overview -------------------------------------------------------------------------------

let overviewData = null;

async function loadOverview() {
  const [reach, p95] = await Promise.all([
    api("/api/v1/matrix?metric=reachability&since=1h"),
    api("/api/v1/matrix?metric=p95&since=1h"),
  ]);
  const p95Of = new Map();
  for (const row of p95.rows) {
    for (const c of row.cells) p95Of.set(row.target + "\u0000" + row.check + "\u0000" + c.region, c.value);
  }
  overviewData = { regions: reach.regions, rows: reach.rows, p95Of };
  renderOverview();
  stamp();
}

function renderOverview() {
  const t0 = performance.now();
  const d = overviewData;
  if (!d) return;
  const counts = { up: 0, partial: 0, down: 0, stale: 0 };
  for (const r of d.rows) counts[r.scope] = (counts[r.scope] || 0) + 1;
  document.getElementById("counts").innerHTML = Object.entries(counts)
    .map(([k, n]) => `<span class="pill ${k}" data-count="${k}"><b>${n}</b> ${k}</span>`)
    .join("");
  const checks = [...new Set(d.rows.map((r) => r.check))].sort();
  const f = state.filter.toLowerCase();
  let rows = d.rows.filter((r) => (!state.check || r.check === state.check) && (!f || (r.target + " " + r.check).toLowerCase().includes(f)));
  if (state.sort === "worst") {
    rows.sort((a, b) => (WORST[a.scope] ?? 9) - (WORST[b.scope] ?? 9) || a.target.localeCompare(b.target) || a.check.localeCompare(b.check));
  } else if (state.sort === "name") {
    rows.sort((a, b) => a.target.localeCompare(b.target) || a.check.localeCompare(b.check));
  } else {
    const region = state.sort;
    const val = (r) => r.cells.find((c) => c.region === region)?.value ?? 2;
    rows.sort((a, b) => val(a) - val(b) || a.target.localeCompare(b.target));
  }
  const head = `<tr><th data-sort="name">target</th><th>check</th><th data-sort="worst">verdict</th>${d.regions
    .map((r) => `<th data-sort="${esc(r)}">${esc(r)}</th>`)
    .join("")}</tr>`;
  const parts = [];
  for (const r of rows) {
    const byRegion = new Map(r.cells.map((c) => [c.region, c]));
    let cells = "";
    for (const region of d.regions) {
      const c = byRegion.get(region);
      if (!c) {
        cells += `<td class="cell none" data-region="${esc(region)}" data-state="none">·</td>`;
        continue;
      }
      const p95 = d.p95Of.get(r.target + "\u0000" + r.check + "\u0000" + region);
      cells += `<td class="cell ${CELL[c.state] || "stale"}" data-region="${esc(region)}" data-state="${esc(c.state)}" title="${esc(region)}: ${esc(CELL_LABEL[c.state] || c.state)}">${fmtPct(c.value)}<small>p95 ${fmtMs(p95)}</small></td>`;
    }
    parts.push(
      `<tr data-target="${esc(r.target)}" data-check="${esc(r.check)}" data-scope="${esc(r.scope)}"><td><a href="#/target/${encodeURIComponent(r.target)}">${esc(r.target)}</a></td><td>${esc(r.check)}</td><td><span class="pill ${esc(r.scope)}">${esc(r.scope)}</span></td>${cells}</tr>`
    );
  }
  const checkOptions = ['<option value="">all checks</option>']
    .concat(checks.map((c) => `<option ${c === state.check ? "selected" : ""}>${esc(c)}</option>`))
    .join("");
  view.innerHTML = `<div class="toolbar">
      <input id="filter" type="search" placeholder="filter targets" value="${esc(state.filter)}">
      <select id="check">${checkOptions}</select>
      <span class="muted">${rows.length} of ${d.rows.length} rows × ${d.regions.length} regions · last hour · reachability and p95 per cell</span>
      <span class="legend"><span><i class="up"></i>up</span><span><i class="down"></i>down</span><span><i class="agent"></i>agent fault</span><span><i class="stale"></i>stale</span></span>
    </div>
    <table id="grid"><thead>${head}</thead><tbody>${parts.join("")}</tbody></table>`;
  const input = document.getElementById("filter");
  input.addEventListener("input", () => {
    state.filter = input.value;
    renderOverview();
    const again = document.getElementById("filter");
    again.focus();
    again.setSelectionRange(again.value.length, again.value.length);
  });
  document.getElementById("check").addEventListener("change", (e) => {
    state.check = e.target.value;
    renderOverview();
  });
  for (const th of view.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      state.sort = th.dataset.sort;
      renderOverview();
    });
  }
  window.mxscope.renders += 1;
  window.mxscope.lastRenderMs = performance.now() - t0;
  window.mxscope.rows = rows.length;
  window.mxscope.renderedAt = performance.now();
}

// ---- target ---------------------------------------------------------------------------------

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];

// One SVG chart: a line per region (p50 or the value) and, for latency, a p95 band.
function chart(lines, { yLabel, band, from, to, percent }) {
  const W = 440, H = 150, L = 46, B = 18, T = 6;
  let max = 0;
  for (const l of lines) for (const p of l.points) max = Math.max(max, band ? p.hi ?? p.y ?? 0 : p.y ?? 0);
  if (percent) max = 1;
  if (!(max > 0)) max = 1;
  const x = (t) => L + ((t - from) / Math.max(1, to - from)) * (W - L - 4);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  let out = `<svg viewBox="0 0 ${W} ${H}" width="100%" role="img">`;
  out += `<line x1="${L}" y1="${y(0)}" x2="${W - 4}" y2="${y(0)}" stroke="#ccc"/>`;
  out += `<text x="2" y="${T + 8}">${percent ? "100 %" : fmtMs(max)}</text><text x="2" y="${y(0)}">${percent ? "0" : "0 ms"}</text>`;
  out += `<text x="${L}" y="${H - 4}">${esc(new Date(from).toLocaleString())}</text><text x="${W - 4}" y="${H - 4}" text-anchor="end">now</text>`;
  lines.forEach((l, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = l.points.filter((p) => p.y != null);
    if (!pts.length) return;
    if (band) {
      const hi = pts.map((p) => `${x(p.t).toFixed(1)},${y(p.hi ?? p.y).toFixed(1)}`);
      const lo = pts.map((p) => `${x(p.t).toFixed(1)},${y(p.y).toFixed(1)}`).reverse();
      out += `<polygon class="band" data-region="${esc(l.region)}" points="${hi.concat(lo).join(" ")}" fill="${color}" opacity="0.15"/>`;
    }
    const d = pts.map((p, j) => `${j ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.y).toFixed(1)}`).join("");
    out += `<path class="series" data-region="${esc(l.region)}" d="${d}" fill="none" stroke="${color}" stroke-width="1.5"/>`;
    if (pts.length === 1) out += `<circle class="point" cx="${x(pts[0].t)}" cy="${y(pts[0].y)}" r="2.5" fill="${color}"/>`;
  });
  out += "</svg>";
  const legend = lines.map((l, i) => `<span><i style="background:${COLORS[i % COLORS.length]}"></i>${esc(l.region)}</span>`).join("");
  return out + `<div class="legend">${legend}<span class="muted">${esc(yLabel)}</span></div>`;
}

async function loadTarget(name) {
  const since = state.since;
  const [diag, hist, facts] = await Promise.all([
    api("/api/v1/diagnose/" + encodeURIComponent(name)),
    api("/api/v1/history/" + encodeURIComponent(name) + "?since=" + since),
    api("/api/v1/target/" + encodeURIComponent(name)).catch(() => ({ series: [] })),
  ]);
  if (state.page !== "target:" + name) return;
  const from = hist.since_ms, to = Date.now();
  // Latency charts: one per (check, phase), a line per region.
  const groups = new Map();
  for (const l of hist.latency) {
    const key = l.check + " · " + l.phase;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push({ region: l.region, points: l.points.map(([t, p50, p95]) => ({ t, y: p50, hi: p95 })) });
  }
  const order = (k) => (k.endsWith("· total") ? 0 : k.includes("· connect") ? 1 : 2);
  const latencyCards = [...groups.entries()]
    .sort((a, b) => order(a[0]) - order(b[0]) || a[0].localeCompare(b[0]))
    .map(([key, lines]) => `<div class="card chart" data-chart="latency" data-key="${esc(key)}"><h3>${esc(key)} latency (p50 line, p95 band)</h3>${chart(lines, { yLabel: "ms", band: true, from, to })}</div>`)
    .join("");
  const reachByCheck = new Map();
  for (const r of hist.reachability) {
    if (!reachByCheck.has(r.check)) reachByCheck.set(r.check, []);
    reachByCheck.get(r.check).push({ region: r.region, points: r.points.map(([t, v]) => ({ t, y: v })) });
  }
  const reachCards = [...reachByCheck.entries()]
    .map(([check, lines]) => `<div class="card chart" data-chart="reachability" data-key="${esc(check)}"><h3>${esc(check)} reachability</h3>${chart(lines, { yLabel: "share of ok results", from, to, percent: true })}</div>`)
    .join("");
  const findings = (diag.findings || [])
    .map((f) => `<li><span class="pill ${f.severity === "fail" ? "down" : f.severity === "warn" ? "partial" : "up"}">${esc(f.severity)}</span> <b>${esc(f.layer)}</b> ${esc(f.kind)} (${esc(f.scope)}${f.regions.length ? ": " + esc(f.regions.join(", ")) : ""}) — ${esc(f.summary)}${f.evidence.length ? `<ul>${f.evidence.map((e) => `<li class="muted">${esc(e)}</li>`).join("")}</ul>` : ""}</li>`)
    .join("");
  // Certificates and policy records from the facts of each series' latest result.
  const certs = [], policy = [];
  for (const s of facts.series) {
    const f = s.facts || {};
    const certKeys = Object.keys(f).filter((k) => k.startsWith("cert.") || k.startsWith("tls."));
    if (certKeys.length) certs.push({ s, f, keys: certKeys });
    const recordKeys = Object.keys(f).filter((k) => /^(spf|dmarc|mta_sts|mtasts|tlsrpt|dkim|dane|tlsa|bimi)\./.test(k) || k.includes("record"));
    if (recordKeys.length) policy.push({ s, f, keys: recordKeys });
  }
  const certRows = certs
    .map(({ s, f }) => `<tr><td>${esc(s.endpoint)}</td><td>${esc(s.check)}</td><td>${esc(s.region)}</td><td>${esc(f["cert.days_left"] ?? "–")}</td><td>${esc(f["cert.subject"] ?? "")}</td><td>${esc(f["cert.issuer"] ?? "")}</td><td>${esc(f["tls.version"] ?? "")}</td><td class="muted">${esc(f["cert.not_after"] ?? "")}</td></tr>`)
    .join("");
  const policyRows = policy
    .map(({ s, f, keys }) => keys.map((k) => `<tr><td>${esc(s.check)}</td><td>${esc(s.region)}</td><td>${esc(k)}</td><td>${esc(f[k])}</td></tr>`).join(""))
    .join("");
  // Stored changes (every collector, the last 30 days) and live ones since, each shown once.
  const seen = new Set();
  const changes = (facts.changes || [])
    .concat(state.events.filter((e) => e.target === name))
    .filter((e) => {
      const key = `${e.at_us}|${e.check}|${e.endpoint}|${e.region}|${e.new_state}`;
      return !seen.has(key) && seen.add(key);
    })
    .map((e) => ({ at: e.at_us, change: true, text: `${when(e.at_us)} ${e.check} ${e.endpoint || "(mail)"} from ${e.region}: ${e.old_state} → ${e.new_state} ${e.error_class || ""}` }));
  const timeline = changes
    .concat(facts.series.map((s) => ({ at: s.state_since_us, change: false, text: `${s.check} ${s.endpoint} from ${s.region}: ${s.failing ? "failing" : "ok"} since ${when(s.state_since_us)}${s.last_error ? " (" + s.last_error + ")" : ""}` })))
    .sort((a, b) => b.at - a.at)
    .map((e) => `<li class="${e.change ? "change" : "current"}">${esc(e.text)}</li>`)
    .join("");
  const windows = ["1h", "24h", "7d", "30d"].map((w) => `<option ${w === since ? "selected" : ""}>${w}</option>`).join("");
  view.innerHTML = `<h2>${esc(name)}</h2>
    <div class="toolbar"><label>window <select id="since">${windows}</select></label><span class="muted">from ${esc(hist.source)} (${Math.round(hist.bucket_ms / 60000)} min buckets)</span></div>
    <h3>Diagnosis</h3><div class="explanation" id="explanation">${esc(diag.explanation || diag.summary || "no findings")}</div>
    <ul class="findings">${findings}</ul>
    <h3>Latency per region and phase</h3><div class="cards">${latencyCards || '<p class="muted">no results in this window</p>'}</div>
    <h3>Reachability per region</h3><div class="cards">${reachCards}</div>
    <h3>Timeline</h3><ul class="timeline" id="timeline">${timeline}</ul>
    <h3>Certificates seen</h3><table id="certs"><thead><tr><th>endpoint</th><th>check</th><th>region</th><th>days left</th><th>subject</th><th>issuer</th><th>TLS</th><th>not after</th></tr></thead><tbody>${certRows}</tbody></table>
    <h3>Policy records</h3><table><thead><tr><th>check</th><th>region</th><th>fact</th><th>value</th></tr></thead><tbody>${policyRows}</tbody></table>`;
  document.getElementById("since").addEventListener("change", (e) => {
    state.since = e.target.value;
    loadTarget(name).catch(showError);
  });
  window.mxscope.renders += 1;
  stamp();
}

// ---- agents ---------------------------------------------------------------------------------

async function loadAgents() {
  const d = await api("/api/v1/agents");
  const rows = d.agents
    .map((a) => `<tr data-agent="${esc(a.id)}" data-state="${esc(a.state)}"><td>${esc(a.id)}</td><td>${esc(a.region)}</td><td><span class="pill ${a.connected ? "up" : "stale"}">${a.connected ? "connected" : "not connected"}</span></td><td>${esc(a.collector)}</td><td>${esc(ago(a.last_seen_us))}</td><td>${a.results_per_min.toFixed(1)}</td><td>${a.spool_depth}</td><td>${a.dropped_total}</td><td>${a.stored_up_to_seq}</td><td>${esc(a.version)}</td><td class="cert" data-left-days="${certDays(a.cert_not_after_us) ?? ""}">${esc(certLeft(a.cert_not_after_us))}</td><td><span class="pill ${a.state === "ok" ? "up" : "stale"}">${esc(a.state)}</span></td></tr>`)
    .join("");
  view.innerHTML = `<table id="agents"><thead><tr><th>agent</th><th>region</th><th>session</th><th>collector</th><th>last seen</th><th>results/min</th><th>spool depth</th><th>dropped</th><th>stored up to seq</th><th>version</th><th>certificate expires</th><th>state</th></tr></thead><tbody>${rows}</tbody></table>`;
  window.mxscope.renders += 1;
  stamp();
}

// ---- routing and the live stream ------------------------------------------------------------

function route() {
  const hash = location.hash || "#/";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("href") === hash);
  let load;
  if (hash.startsWith("#/target/")) {
    const name = decodeURIComponent(hash.slice(9));
    state.page = "target:" + name;
    load = () => loadTarget(name);
  } else if (hash === "#/agents") {
    state.page = "agents";
    load = loadAgents;
  } else {
    state.page = "overview";
    load = loadOverview;
  }
  window.mxscope.page = state.page;
  state.reload = load;
  load().catch(showError);
}

// Reloads the page's data soon (several events in a burst make one reload).
function soon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => state.reload && state.reload().catch(showError), 300);
}

function live() {
  const dot = document.getElementById("live");
  const es = new EventSource("/api/v1/events");
  es.onopen = () => dot.classList.add("on");
  es.onerror = () => dot.classList.remove("on");
  es.addEventListener("state", (m) => {
    try {
      state.events.unshift(JSON.parse(m.data));
      state.events.length = Math.min(state.events.length, 500);
    } catch (_) { /* a malformed event changes nothing */ }
    window.mxscope.events += 1;
    soon();
  });
  es.addEventListener("lagged", soon);
}

window.addEventListener("hashchange", route);
route();
live();
// Latency and reachability move without state changes: refresh every 30 s as well.
setInterval(() => state.page !== "" && soon(), 30000);
