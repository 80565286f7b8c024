// The reflow dashboard: one WebSocket to the host's JSON-RPC API. `supervisor.watch` answers
// with a snapshot and then pushes every change of the tree, stats once a second and new log
// records; nothing here polls. All text goes in through textContent (never innerHTML).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
const HISTORY = 300; // stats ticks kept per actor for the sparklines (5 minutes at 1/s)
const SIGNALS = { 1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 13: "SIGPIPE",
  15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ", 31: "SIGSYS" };

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "style") Object.assign(e.style, v); // (CSSOM: the page's CSP refuses style attributes)
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
}
function s(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const kid of kids) if (kid) e.append(kid);
  return e;
}

// -- formatting --------------------------------------------------------------------------
function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const v = seconds * 1000;
  return v < 1 ? v.toFixed(2) + " ms" : v < 100 ? v.toFixed(1) + " ms" : v < 10000 ? Math.round(v) + " ms" : (v / 1000).toFixed(1) + " s";
}
function rate(r) { return r === undefined || r === null ? "–" : r >= 100 ? Math.round(r).toString() : r.toFixed(1); }
function ago(at) {
  if (!at) return "";
  const d = Math.max(0, Date.now() / 1000 - at);
  return d < 60 ? Math.round(d) + " s ago" : d < 3600 ? Math.round(d / 60) + " min ago" : Math.round(d / 3600) + " h ago";
}
function clock(at) { return new Date(at * 1000).toLocaleTimeString([], { hour12: false }); }
function causeText(err) {
  if (!err) return "";
  const bits = [];
  if (err.limit) bits.push(`broke its ${err.limit} limit`);
  if (err.signal !== undefined && err.signal !== null) bits.push(`killed by ${SIGNALS[err.signal] || "signal " + err.signal}`);
  if (err.exit_code !== undefined && err.exit_code !== null) bits.push(`exit code ${err.exit_code}`);
  const head = bits.length ? bits.join(", ") : (err.type || "error");
  return `${head} — ${err.message || ""}`;
}
function tracebackOf(err) {
  const tb = (err && (err.traceback || (err.data && err.data.traceback))) || null;
  if (!Array.isArray(tb) || !tb.length) return null;
  const d = err.data || {}; // the script's exception, last, as Python prints it
  return tb.join("\n") + (d.type ? `\n${d.type}: ${d.message || ""}` : "");
}

// -- state ---------------------------------------------------------------------------------
const st = {
  status: null, graph: { nodes: [], edges: [] }, stats: null, hosts: [], nodes: new Map(),
  history: new Map(), failureAt: new Map(), deadCount: null, selected: null, flash: new Set(),
};

function indexTree(node, parent) {
  node._parent = parent;
  st.nodes.set(node.name, node);
  for (const c of node.children || []) indexTree(c, node);
}

// -- the connection ------------------------------------------------------------------------
let token = sessionStorage.getItem("reflow-token") || "";
let ws = null, nextId = 1, retry = 0, watchSid = null;
const pending = new Map();

function rpc(method, params) {
  return new Promise((resolve, reject) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) { reject(new Error("not connected")); return; }
    const id = nextId++;
    pending.set(id, { resolve, reject });
    ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
  });
}

async function authorized() {
  try {
    const r = await fetch("/auth", { headers: token ? { Authorization: "Bearer " + token } : {}, cache: "no-store" });
    return r.status === 204;
  } catch (e) { return null; } // host unreachable: try the WebSocket anyway (and back off)
}

function setConn(cls, text) {
  const dot = $("#conn-dot"); dot.className = "dot " + cls; $("#conn-text").textContent = text;
}

async function start() {
  const ok = await authorized();
  if (ok === false) { askToken(Boolean(token)); return; }
  connect();
}

function askToken(refused) {
  const dlg = $("#token-dialog");
  $("#token-error").hidden = !refused;
  setConn("down", "token required");
  if (!dlg.open) dlg.showModal();
}
$("#token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  token = $("#token-input").value.trim();
  if (await authorized()) {
    sessionStorage.setItem("reflow-token", token);
    $("#token-dialog").close();
    connect();
  } else {
    $("#token-error").hidden = false;
  }
});

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${proto}//${location.host}/` + (token ? `?token=${encodeURIComponent(token)}` : "");
  setConn("", "connecting…");
  ws = new WebSocket(url);
  ws.onopen = async () => {
    retry = 0;
    setConn("live", "live");
    try {
      const r = await rpc("supervisor.watch");
      watchSid = r.subscription;
      applySnapshot(r.snapshot);
    } catch (e) { setConn("down", "watch failed: " + e.message); }
  };
  ws.onmessage = (m) => {
    let data;
    try { data = JSON.parse(m.data); } catch (e) { return; }
    for (const msg of Array.isArray(data) ? data : [data]) onMessage(msg);
  };
  ws.onclose = async () => {
    for (const p of pending.values()) p.reject(new Error("connection lost"));
    pending.clear();
    watchSid = null;
    const wait = Math.min(10000, 500 * 2 ** retry++);
    setConn("down", `disconnected — retrying in ${Math.round(wait / 1000)} s`);
    setTimeout(start, wait);
  };
}

// A fresh subscription, and so a fresh snapshot; the old one is dropped.
let rewatching = false;
async function rewatch() {
  if (rewatching) return;
  rewatching = true;
  const old = watchSid;
  try {
    const r = await rpc("supervisor.watch");
    watchSid = r.subscription;
    applySnapshot(r.snapshot);
    if (old) rpc("actor.unsubscribe", { subscription: old }).catch(() => {});
  } catch (e) { /* the connection's end starts over anyway */ }
  rewatching = false;
}

function onMessage(msg) {
  if (msg.id !== undefined && (msg.result !== undefined || msg.error !== undefined)) {
    const p = pending.get(msg.id);
    if (!p) return;
    pending.delete(msg.id);
    if (msg.error) p.reject(Object.assign(new Error(msg.error.message), { rpc: msg.error })); else p.resolve(msg.result);
    return;
  }
  if (msg.method === "supervisor.event" && msg.params && msg.params.subscription === watchSid) onEvent(msg.params);
}

function onEvent(ev) {
  switch (ev.event) {
    case "snapshot": applySnapshot(ev); break;
    case "stats": applyStats(ev); break;
    case "log": appendLog(ev.records || []); break;
    default: applyTreeEvent(ev);
  }
}

// -- applying what the host says ------------------------------------------------------------
function applySnapshot(snap) {
  st.status = snap.status;
  st.nodes = new Map();
  indexTree(st.status, null);
  st.graph = snap.graph || { nodes: [], edges: [] };
  st.hosts = snap.hosts || [];
  $("#log").replaceChildren();
  appendLog(snap.log || []);
  renderTree(); renderGraph(); renderActors(); renderHosts(); renderPools(); renderSummary();
  if (snap.stats) applyStats(snap.stats, true);
  refreshDeadletters();
}

function applyTreeEvent(ev) {
  const node = st.nodes.get(ev.actor);
  if (!node) { rewatch(); return; } // a node this snapshot has not seen (hot reload added it)
  if (ev.node) {
    const children = node.children;
    Object.assign(node, ev.node);
    if (children) node.children = children;
  } else {
    Object.assign(node, { state: ev.state, restarts: ev.restarts, last_error: ev.last_error });
  }
  node.state = ev.state;
  if (ev.event === "exited" || ev.event === "failed" || ev.event === "gave_up") st.flash.add(ev.actor);
  schedule();
}

function applyStats(ev, quiet) {
  st.stats = ev;
  let failures = false;
  for (const [name, a] of Object.entries(ev.actors || {})) {
    const seen = st.failureAt.get(name);
    const at = a.last_failure ? a.last_failure.at : undefined;
    if (at !== seen) { st.failureAt.set(name, at); failures = true; }
    let hist = st.history.get(name);
    if (!hist) st.history.set(name, hist = []);
    if (!quiet) hist.push({ t: ev.at, rate: a.rate, p99: a.p99 });
    if (hist.length > HISTORY) hist.splice(0, hist.length - HISTORY);
    const node = st.nodes.get(name);
    if (node) { node.pending = a.depth; node.processed = a.ok; }
  }
  if (failures) schedule(); else updateStats();
  if (ev.deadletters !== st.deadCount) { st.deadCount = ev.deadletters; refreshDeadletters(); }
  if (ev.pools && st.status) { st.status.pools = ev.pools; renderPools(); }
}

let scheduled = false;
function schedule() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => { scheduled = false; renderTree(); updateStats(); renderSummary(); renderDetail(); });
}

// -- the tree --------------------------------------------------------------------------------
function renderTree() {
  if (!st.status) return;
  const root = $("#tree");
  const actors = [...st.nodes.values()].filter((n) => n.kind === "actor");
  $("#tree-count").textContent = `${actors.length} actor${actors.length === 1 ? "" : "s"}`;
  root.replaceChildren(treeNode(st.status));
  st.flash.clear();
}

function treeNode(n) {
  const meta = [];
  if (n.kind === "actor") {
    if (n.pid) meta.push(`pid ${n.pid}`);
    if (n.tier) meta.push(n.tier);
    if (n.runtime) meta.push(n.runtime);
  } else if (n.strategy) meta.push(n.strategy);
  const row = h("div", { class: "trow" + (st.flash.has(n.name) ? " flash" : ""), "data-actor": n.name,
    onclick: () => select(n.name) },
    h("span", { class: "state " + n.state, text: n.state }),
    h("span", { class: "name", text: n.name }),
    n.kind === "supervisor" ? h("span", { class: "kind", text: "supervisor" }) : null,
    h("span", { class: "restarts" + (n.restarts ? "" : " zero"), title: "restarts", text: `↻ ${n.restarts || 0}` }),
    h("span", { class: "meta", text: meta.join(" · ") }));
  const wrap = h("div", { class: "tnode" }, row);
  if (n.last_error) wrap.append(causeBox(n.last_error, "cause", "last exit"));
  const failure = st.stats && st.stats.actors && st.stats.actors[n.name] && st.stats.actors[n.name].last_failure;
  if (failure) wrap.append(causeBox(failure, "cause soft", "last message failed"));
  for (const c of n.children || []) wrap.append(treeNode(c));
  return wrap;
}

function causeBox(err, cls, label) {
  const tb = tracebackOf(err);
  return h("div", { class: cls, "data-cause": label },
    h("div", { class: "what" }, h("b", { text: label + ": " }), causeText(err)),
    h("div", { class: "when", "data-at": err.at, text: err.at ? ago(err.at) : "" }),
    tb ? h("pre", { class: "traceback", text: tb }) : null);
}

// -- the graph -------------------------------------------------------------------------------
const graphRefs = { edges: [], nodes: new Map() };

function layout(nodes, edges) {
  const names = nodes.map((n) => n.name);
  const rank = new Map(names.map((n) => [n, 0]));
  if (edges.length) {
    for (let i = 0; i < names.length; i++) { // longest path from the sources (bounded: cycles)
      let moved = false;
      for (const e of edges) {
        if (!rank.has(e.src) || !rank.has(e.tgt) || e.src === e.tgt) continue;
        if (rank.get(e.tgt) < rank.get(e.src) + 1) { rank.set(e.tgt, rank.get(e.src) + 1); moved = true; }
      }
      if (!moved) break;
    }
  } else { // no connections: a grid
    const cols = Math.max(1, Math.ceil(Math.sqrt(names.length * 1.6)));
    names.forEach((n, i) => rank.set(n, i % cols));
  }
  const cols = new Map();
  for (const n of names) { const r = rank.get(n); if (!cols.has(r)) cols.set(r, []); cols.get(r).push(n); }
  const pos = new Map();
  const W = 170, H = 52, GX = 90, GY = 26;
  let maxRows = 0;
  for (const [r, list] of cols) { maxRows = Math.max(maxRows, list.length); list.forEach((n, i) => pos.set(n, { x: 20 + r * (W + GX), y: 20 + i * (H + GY) })); }
  const width = 40 + cols.size * (W + GX) - GX, height = 40 + maxRows * (H + GY) - GY;
  for (const [, list] of cols) { // centre short columns
    const off = ((maxRows - list.length) * (H + GY)) / 2;
    for (const n of list) pos.get(n).y += off;
  }
  return { pos, W, H, width: Math.max(width, 200), height: Math.max(height, 100) };
}

function renderGraph() {
  const svg = $("#graph");
  const { nodes, edges } = st.graph;
  svg.replaceChildren();
  graphRefs.edges = []; graphRefs.nodes = new Map();
  if (!nodes.length) { svg.append(s("text", { x: 20, y: 30, fill: "#8a94b8", text: "no actors" })); return; }
  const L = layout(nodes, edges);
  svg.setAttribute("viewBox", `0 0 ${L.width} ${L.height}`);
  svg.style.height = Math.min(520, Math.max(220, L.height * 0.9)) + "px";
  svg.append(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 8, markerHeight: 8, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" },
    s("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#5b6bb0" }))));
  const eg = s("g", {}), ng = s("g", {});
  svg.append(eg, ng);
  for (const e of edges) {
    const a = L.pos.get(e.src), b = L.pos.get(e.tgt);
    if (!a || !b) continue;
    const x1 = a.x + L.W, y1 = a.y + L.H / 2, x2 = b.x, y2 = b.y + L.H / 2;
    const dx = Math.max(40, Math.abs(x2 - x1) / 2);
    const path = s("path", { class: "edge", d: `M ${x1} ${y1} C ${x1 + dx} ${y1}, ${x2 - dx} ${y2}, ${x2} ${y2}`, "marker-end": "url(#arrow)" });
    const label = s("text", { class: "edge-label", x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, "text-anchor": "middle", text: "" });
    const title = s("title", { text: `${e.src}.${e.sport} → ${e.tgt}.${e.tport}` });
    path.append(title);
    eg.append(path, label);
    graphRefs.edges.push({ e, path, label });
  }
  for (const n of nodes) {
    const p = L.pos.get(n.name);
    const node = st.nodes.get(n.name);
    const badge = s("circle", { class: "depth-bg zero", cx: L.W - 4, cy: 4, r: 11 });
    const depth = s("text", { class: "depth", x: L.W - 4, y: 7.5, "text-anchor": "middle", text: "0" });
    const g = s("g", { class: "node " + (node ? node.state : ""), transform: `translate(${p.x},${p.y})`, "data-node": n.name,
      onclick: () => select(n.name) },
      s("rect", { width: L.W, height: L.H }),
      s("text", { x: 12, y: 21, text: n.name.length > 20 ? n.name.slice(0, 19) + "…" : n.name }),
      s("text", { class: "sub", x: 12, y: 38, text: `${n.component !== n.name ? n.component + " · " : ""}${n.runtime}` }),
      badge, depth, s("title", { text: `${n.name}: mailbox depth` }));
    ng.append(g);
    graphRefs.nodes.set(n.name, { g, badge, depth });
  }
}

function updateGraph() {
  const actors = (st.stats && st.stats.actors) || {};
  for (const { e, path, label } of graphRefs.edges) {
    const r = ((actors[e.src] || {}).ports || {})[e.sport] || 0;
    label.textContent = r ? `${rate(r)}/s` : "";
    path.setAttribute("class", "edge" + (r ? " hot" : ""));
    path.style.strokeWidth = r ? Math.min(5, 1.6 + Math.log10(1 + r)) : "";
  }
  for (const [name, ref] of graphRefs.nodes) {
    const d = (actors[name] || {}).depth || 0;
    ref.depth.textContent = d > 999 ? Math.round(d / 1000) + "k" : String(d);
    ref.badge.setAttribute("class", "depth-bg" + (d ? "" : " zero"));
    const node = st.nodes.get(name);
    ref.g.setAttribute("class", "node " + (node ? node.state : ""));
  }
}

// -- the actors table ------------------------------------------------------------------------
const rows = new Map();

function renderActors() {
  const body = $("#actors tbody");
  body.replaceChildren();
  rows.clear();
  for (const n of st.graph.nodes) {
    const cells = {
      state: h("span", { class: "state" }), rate: h("td", { class: "num" }), p50: h("td", { class: "num" }),
      p99: h("td", { class: "num" }), ok: h("td", { class: "num" }), failed: h("td", { class: "num failed-n" }),
      depth: h("td", { class: "num" }), spark: s("svg", { class: "spark", viewBox: "0 0 150 26", preserveAspectRatio: "none" }),
    };
    const tr = h("tr", { "data-row": n.name, onclick: () => select(n.name) },
      h("td", {}, h("b", { text: n.name })), h("td", {}, cells.state), cells.rate, h("td", {}, cells.spark),
      cells.p50, cells.p99, cells.ok, cells.failed, cells.depth);
    body.append(tr);
    rows.set(n.name, cells);
  }
  updateStats();
}

function spark(svg, hist) {
  svg.replaceChildren();
  if (hist.length < 2) return;
  const max = Math.max(1, ...hist.map((p) => p.rate || 0));
  const maxLat = Math.max(1e-6, ...hist.map((p) => p.p99 || 0));
  const span = Math.max(hist.length, 60); // (a short history fills the right of the line, not all of it)
  const x = (i) => 150 - ((hist.length - 1 - i) / (span - 1)) * 150;
  const y = (v) => 24 - (v / max) * 22;
  let d = "", lat = "";
  hist.forEach((p, i) => { d += `${i ? "L" : "M"}${x(i).toFixed(1)},${y(p.rate || 0).toFixed(1)} `; });
  hist.forEach((p, i) => { if (p.p99) lat += `${lat ? "L" : "M"}${x(i).toFixed(1)},${(24 - (p.p99 / maxLat) * 22).toFixed(1)} `; });
  svg.append(s("path", { class: "area", d: d + `L${x(hist.length - 1).toFixed(1)},25 L${x(0).toFixed(1)},25 Z` }),
    s("path", { class: "rate", d }), lat ? s("path", { class: "p99", d: lat }) : null);
}

function updateStats() {
  const actors = (st.stats && st.stats.actors) || {};
  for (const [name, c] of rows) {
    const a = actors[name] || {};
    const node = st.nodes.get(name) || {};
    c.state.className = "state " + (node.state || "");
    c.state.textContent = node.state || "?";
    c.rate.textContent = rate(a.rate);
    c.p50.textContent = ms(a.p50);
    c.p99.textContent = ms(a.p99);
    c.ok.textContent = a.ok ?? "–";
    c.failed.textContent = a.failed ?? "–";
    c.failed.classList.toggle("some", Boolean(a.failed));
    c.depth.textContent = a.depth ?? "–";
    spark(c.spark, st.history.get(name) || []);
  }
  updateGraph();
  renderSummary();
  renderOverall();
}

// The whole host over the last minutes: messages/s of all actors, and the slowest actor's p99.
function renderOverall() {
  const svg = $("#overall");
  const byTick = new Map();
  for (const hist of st.history.values()) {
    for (const p of hist) {
      const t = byTick.get(p.t) || { rate: 0, p99: 0 };
      t.rate += p.rate || 0; t.p99 = Math.max(t.p99, p.p99 || 0);
      byTick.set(p.t, t);
    }
  }
  const ticks = [...byTick.entries()].sort((a, b) => a[0] - b[0]).slice(-HISTORY);
  svg.replaceChildren();
  const W = 900, H = 120, P = 4;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const maxRate = Math.max(1, ...ticks.map(([, t]) => t.rate));
  const maxLat = Math.max(1e-6, ...ticks.map(([, t]) => t.p99));
  const span = Math.max(ticks.length, 60);
  const x = (i) => W - ((ticks.length - 1 - i) / (span - 1)) * W;
  for (let g = 1; g < 4; g++) svg.append(s("line", { class: "grid", x1: 0, x2: W, y1: (H * g) / 4, y2: (H * g) / 4 }));
  if (ticks.length >= 2) {
    let d = "", lat = "";
    ticks.forEach(([, t], i) => {
      d += `${i ? "L" : "M"}${x(i).toFixed(1)},${(H - P - (t.rate / maxRate) * (H - 2 * P)).toFixed(1)} `;
      lat += `${i ? "L" : "M"}${x(i).toFixed(1)},${(H - P - (t.p99 / maxLat) * (H - 2 * P)).toFixed(1)} `;
    });
    svg.append(s("path", { class: "area", d: d + `L${x(ticks.length - 1)},${H} L${x(0)},${H} Z` }), s("path", { class: "rate", d }),
      s("path", { class: "p99", d: lat }));
  }
  const last = ticks.length ? ticks[ticks.length - 1][1] : { rate: 0, p99: 0 };
  $("#overall-legend").replaceChildren(
    h("span", { class: "lg-rate", text: `${rate(last.rate)} msg/s now · peak ${rate(maxRate)}` }),
    h("span", { class: "lg-p99", text: `slowest p99 ${ms(last.p99 || null)} · peak ${ms(ticks.length ? maxLat : null)}` }));
}

// -- summary, hosts, pools -----------------------------------------------------------------
function renderSummary() {
  if (!st.status) return;
  const actors = [...st.nodes.values()].filter((n) => n.kind === "actor");
  const running = actors.filter((n) => n.state === "running").length;
  const total = Object.values((st.stats && st.stats.actors) || {}).reduce((acc, a) => acc + (a.rate || 0), 0);
  const restarts = actors.reduce((acc, n) => acc + (n.restarts || 0), 0);
  const stat = (label, value) => h("div", { class: "stat" }, h("span", { text: label }), h("b", { text: String(value) }));
  $("#summary").replaceChildren(
    stat("actors", `${running}/${actors.length} running`), stat("throughput", `${rate(total)} msg/s`),
    stat("restarts", restarts), stat("dead letters", st.deadCount ?? "–"),
    stat("sandbox", st.status.backend || "?"), stat("redis", st.status.redis && st.status.redis.connected ? "connected" : "down"));
}

function renderHosts() {
  $("#hosts").replaceChildren(...st.hosts.map((x) => h("li", { "data-host": x.id },
    h("span", { class: "dot live" }), h("span", { class: "id", text: x.id }),
    h("span", { class: "pill", text: `${x.processes ?? "?"} processes` }), h("span", { class: "url", text: x.url || "" }))));
}

function renderPools() {
  const pools = (st.status && st.status.pools) || {};
  $("#pools").replaceChildren(...Object.entries(pools).map(([rt, p]) => {
    const busy = Math.max(0, p.live - p.warm);
    const pct = (v) => `${(100 * v) / Math.max(1, p.max_size)}%`;
    return h("div", { class: "pool" },
      h("div", { class: "label" }, h("span", { text: rt }), h("span", { text: `${busy} busy · ${p.warm} warm · max ${p.max_size}` })),
      h("div", { class: "bar" }, h("div", { class: "busy", style: { width: pct(busy) } }), h("div", { class: "warm", style: { width: pct(p.warm) } })));
  }));
}

// -- dead letters ----------------------------------------------------------------------------
let deadBusy = false, deadAgain = false;
async function refreshDeadletters() {
  if (deadBusy) { deadAgain = true; return; }
  deadBusy = true;
  try {
    const r = await rpc("deadletters.list");
    renderDeadletters(r.deadletters || []);
  } catch (e) { /* not connected: the next snapshot asks again */ }
  deadBusy = false;
  if (deadAgain) { deadAgain = false; refreshDeadletters(); }
}

function renderDeadletters(list) {
  st.deadCount = list.length; // (what the next stats tick is compared with)
  $("#dead-count").textContent = list.length ? String(list.length) : "";
  const root = $("#deadletters");
  if (!list.length) { root.replaceChildren(h("p", { class: "empty", text: "No dead letters." })); return; }
  root.replaceChildren(...list.map((d) => {
    const detail = h("pre", { hidden: true, text: JSON.stringify({ inputs: d.inputs, error: d.error, message_id: d.message_id }, null, 2) });
    const err = typeof d.error === "string" ? d.error : (d.error && (d.error.message || d.error.type)) || "failed";
    const replay = h("button", { class: "replay", text: "replay", onclick: async (ev) => {
      ev.target.disabled = true;
      try { await rpc("deadletters.replay", { id: d.id }); } catch (e) { ev.target.textContent = e.message; return; }
      refreshDeadletters();
    } });
    return h("div", { class: "dl", "data-deadletter": d.id },
      h("div", { class: "top" }, h("span", { class: "tag", text: d.process }), h("span", { class: "muted", text: `${d.attempts} attempt${d.attempts === 1 ? "" : "s"}` }),
        h("span", { class: "when", "data-at": d.at, text: ago(d.at) }),
        h("button", { text: "inspect", onclick: () => { detail.hidden = !detail.hidden; } }), replay),
      h("div", { class: "err", text: err }), detail);
  }));
}

// -- the log ---------------------------------------------------------------------------------
function appendLog(records) {
  const root = $("#log");
  for (const r of records) {
    const fields = Object.entries(r.fields || {}).map(([k, v]) => `${k}=${v}`).join(" ");
    root.append(h("div", { class: "rec " + r.level },
      h("span", { class: "t", text: clock(r.at) + " " }), h("span", { class: "lg", text: `${r.level} ${r.logger}: ` }),
      r.message, fields ? h("span", { class: "f", text: "  " + fields }) : null,
      r.error ? h("span", { class: "f", text: "  " + r.error }) : null));
  }
  while (root.childElementCount > 500) root.firstElementChild.remove();
  if ($("#log-follow").checked) root.scrollTop = root.scrollHeight;
}

// -- the detail drawer -----------------------------------------------------------------------
function select(name) { st.selected = name; renderDetail(); }
$("#detail-close").addEventListener("click", () => { st.selected = null; renderDetail(); });

function renderDetail() {
  const pane = $("#detail");
  const n = st.selected && st.nodes.get(st.selected);
  if (!n) { pane.hidden = true; return; }
  pane.hidden = false;
  const a = (st.stats && st.stats.actors && st.stats.actors[n.name]) || {};
  const dl = h("dl", {});
  const add = (k, v) => { if (v !== undefined && v !== null && v !== "") dl.append(h("dt", { text: k }), h("dd", { text: String(v) })); };
  add("kind", n.kind); add("state", n.state); add("restarts", n.restarts); add("component", n.component);
  add("runtime", n.runtime); add("tier", n.tier); add("pid", n.pid); add("bytes path", n.bytes);
  add("uptime", n.uptime !== undefined && n.uptime !== null ? `${Math.round(n.uptime)} s` : null);
  add("messages ok", a.ok); add("failed", a.failed); add("rate", a.rate !== undefined ? `${rate(a.rate)} msg/s` : null);
  add("p50 / p99", a.p50 !== undefined ? `${ms(a.p50)} / ${ms(a.p99)}` : null); add("mailbox depth", a.depth);
  for (const [p, r] of Object.entries(a.ports || {})) add(`out ${p}`, `${rate(r)} msg/s`);
  const body = [h("h3", { text: n.name }), dl];
  if (n.last_error) body.push(causeBox(n.last_error, "cause", "last exit"));
  if (a.last_failure) body.push(causeBox(a.last_failure, "cause soft", "last message failed"));
  if (n.kind === "actor") body.push(h("p", {}, h("button", { text: "restart", onclick: () => rpc("actor.restart", { actor: n.name }).catch(() => {}) })));
  $("#detail-body").replaceChildren(...body);
}

// "3 s ago" stays true without a re-render.
setInterval(() => { for (const e of document.querySelectorAll("[data-at]")) e.textContent = ago(Number(e.dataset.at)); }, 5000);
start();
