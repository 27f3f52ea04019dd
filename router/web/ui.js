// The router's operator page: reads /api/cluster (router/cluster_view.h describes the JSON)
// every 2 s and draws the shard groups, a warning for each group without a healthy replica,
// and the expert-load heatmap (rows: MoE layers, columns: experts; colour: tokens relative to
// the layer's mean). Every number drawn is also in the DOM (data-* attributes on the cells
// and rows), so a test can read what the page shows. No libraries, no build step.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";  // the SVG namespace name (no request is made)

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                   : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function fmt(x, digits) {
  if (x === null || x === undefined) return "n/a";
  return Number(x).toLocaleString("en-US", {maximumFractionDigits: digits === undefined ? 1 : digits});
}

// ratio = tokens / layer mean -> a colour from blue (<= 1/3) over white (1) to red (>= 3).
function colour(ratio) {
  const t = Math.max(-1, Math.min(1, Math.log(Math.max(ratio, 1e-9)) / Math.log(3)));
  const end = t < 0 ? [44, 123, 182] : [215, 25, 28];
  const a = Math.abs(t);
  const c = end.map((v) => Math.round(255 + (v - 255) * a));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// "layer 3", or "MTP 4" for a layer of the MTP module.
function layerName(c, layer) {
  return c.num_hidden_layers > 0 && layer >= c.num_hidden_layers ? `MTP ${layer}` : `layer ${layer}`;
}

function renderFacts(c) {
  document.getElementById("model").textContent = c.model;
  document.getElementById("version").textContent = "v" + c.placement_version;
  document.getElementById("n-groups").textContent = c.shard_groups.length;
  const tps = document.getElementById("tokens-per-s");
  tps.textContent = fmt(c.tokens_per_s, 1);
  tps.dataset.value = c.tokens_per_s === null ? "" : c.tokens_per_s;
  document.getElementById("window").textContent =
      `last ${fmt(c.load_span_s, 0)} s of ${fmt(c.load_window_s, 0)} s`;
  // The rebalancer's state (router/rebalancer.h), when the router reports one.
  const box = document.getElementById("rebalance");
  box.replaceChildren();
  const rb = c.rebalance;
  if (!rb) return;
  // label, the text shown, and optionally an id + the number as data-value.
  const fact = (label, text, id, value) => {
    const b = el("b", id === undefined ? {} : {id, "data-value": value}, text);
    const span = el("span", {}, label + " ");
    span.append(b);
    box.append(span);
  };
  fact("rebalancing", rb.automatic ? `automatic above ${fmt(rb.threshold, 2)}` : "by hand only");
  fact("predicted imbalance", fmt(rb.imbalance, 2), "rebalance-imbalance", rb.imbalance);
  fact("changes", rb.changes +
       (rb.last_change_ms_ago > 0 ? `, last ${fmt(rb.last_change_ms_ago / 1000, 0)} s ago` : ""));
  fact("redundant copies", rb.redundant_copies);
  if (rb.pending) fact("", "a new placement is loading on the shards");
  if (rb.last_result) box.append(el("span", {class: "last-result"}, rb.last_result));
}

function renderWarnings(c) {
  const box = document.getElementById("warnings");
  box.replaceChildren();
  for (const g of c.shard_groups) {
    if (g.healthy_replicas > 0) continue;
    box.append(el("p", {class: "warning", "data-shard": g.id},
                  `Shard group ${g.id} has no healthy replica (${g.replicas.length} registered): ` +
                  `steps that need its ${g.n_experts} experts fail until one registers.`));
  }
}

function renderGroups(c) {
  const body = document.querySelector("#groups tbody");
  body.replaceChildren();
  const useWindow = c.window_expert_tokens > 0;
  const all = c.shard_groups.reduce((s, g) => s + (useWindow ? g.window_tokens : g.total_tokens), 0);
  // max/mean of the groups' tokens: 1 is even; the busiest group sets the pace of every step.
  const most = c.shard_groups.reduce((m, g) => Math.max(m, useWindow ? g.window_tokens : g.total_tokens), 0);
  const imbalance = all > 0 ? most / (all / c.shard_groups.length) : null;
  const shown = document.getElementById("group-imbalance");
  shown.textContent = imbalance === null ? "-" : fmt(imbalance, 2);
  shown.dataset.value = imbalance === null ? "" : imbalance.toFixed(4);
  for (const g of c.shard_groups) {
    const tokens = useWindow ? g.window_tokens : g.total_tokens;
    const share = all > 0 ? `${fmt(100 * tokens / all, 1)} %` : "-";
    const attrs = {"data-shard": g.id, "data-healthy": g.healthy_replicas,
                   "data-replicas": g.replicas.length, "data-window-tokens": g.window_tokens,
                   "data-total-tokens": g.total_tokens};
    if (g.healthy_replicas === 0) attrs.class = "down";
    const replicas = g.replicas.length > 0 ? g.replicas : [null];
    replicas.forEach((r, i) => {
      // The group's first row carries its numbers and the cells spanning its replicas.
      const tr = el("tr", i === 0 ? attrs : {"data-shard": g.id});
      if (i === 0) {
        const span = replicas.length;
        tr.append(el("td", {rowspan: span}, g.id), el("td", {rowspan: span, class: "num"}, g.n_experts),
                  el("td", {rowspan: span, class: "num"}, share));
      }
      if (r === null) {
        tr.append(el("td", {colspan: 7, class: "unhealthy"}, "no replica registered"));
      } else {
        // A replica still loading its group's experts (joining, or a rebalance) serves nothing yet.
        const health = r.loading ? "loading" : r.healthy ? "healthy" : "UNHEALTHY";
        const weight = r.capacity_weight > 0 ? r.capacity_weight : 1;
        tr.append(el("td", {}, r.id), el("td", {}, r.address),
                  el("td", {class: r.loading ? "loading" : r.healthy ? "healthy" : "unhealthy"}, health),
                  el("td", {}, `${r.device_kind || "?"} (weight ${fmt(weight, 2)})`),
                  el("td", {class: "num"}, r.capacity), el("td", {class: "num"}, r.outstanding_rows),
                  el("td", {class: "num"}, `${r.last_heartbeat_ms_ago} ms ago`));
      }
      body.append(tr);
    });
  }
}

function renderHeatmap(c) {
  const svg = document.getElementById("heatmap");
  svg.replaceChildren();
  const useWindow = c.window_expert_tokens > 0;
  document.getElementById("load-source").textContent = useWindow
      ? `(the last ${fmt(c.load_span_s, 0)} s)`
      : "(since the router started: no load in the window)";
  svg.dataset.source = useWindow ? "window" : "total";
  const E = c.n_routed_experts, L = c.layers.length;
  const cw = Math.max(3, Math.min(28, Math.floor(1100 / Math.max(E, 1))));
  const ch = Math.max(6, Math.min(24, Math.floor(700 / Math.max(L, 1))));
  const left = 70, top = 22;
  svg.setAttribute("width", left + E * cw + 10);
  svg.setAttribute("height", top + L * ch + 10);
  const labelEvery = Math.ceil(28 / cw);
  for (let e = 0; e < E; e += labelEvery) {
    svg.append(el("svg:text", {x: left + e * cw + cw / 2, y: top - 6, "text-anchor": "middle"}, e));
  }
  const body = document.querySelector("#layers tbody");
  body.replaceChildren();
  c.layers.forEach((layer, row) => {
    const load = useWindow ? layer.window : layer.total;
    const sum = load.reduce((s, x) => s + x, 0);
    const mean = sum / Math.max(E, 1);
    let hottest = 0;
    load.forEach((x, e) => { if (x > load[hottest]) hottest = e; });
    const y = top + row * ch;
    if (L <= 64 || row % Math.ceil(L / 64) === 0) {
      svg.append(el("svg:text", {x: left - 6, y: y + ch / 2 + 4, "text-anchor": "end"}, layerName(c, layer.layer)));
    }
    let copies = 0;
    for (let e = 0; e < E; ++e) {
      const groups = layer.groups[e];
      const ratio = mean > 0 ? load[e] / mean : 1;
      const copy = groups.length > 1;
      copies += copy ? 1 : 0;
      const rect = el("svg:rect", {
        x: left + e * cw, y, width: cw, height: ch, fill: mean > 0 ? colour(ratio) : "#e4e8ec",
        class: copy ? "cell copy" : "cell",
        "data-layer": layer.layer, "data-expert": e, "data-window": layer.window[e],
        "data-total": layer.total[e], "data-ratio": ratio.toFixed(3), "data-groups": groups.join(","),
      });
      rect.append(el("svg:title", {},
                     `layer ${layer.layer}, expert ${e}: ${load[e]} tokens (${ratio.toFixed(2)} x the ` +
                     `layer mean); ${layer.total[e]} since start; shard group${groups.length > 1 ? "s" : ""} ` +
                     `${groups.join(", ")}`));
      svg.append(rect);
      if (copy && cw >= 6 && ch >= 6) {
        svg.append(el("svg:circle", {class: "copy", cx: left + e * cw + cw / 2, cy: y + ch / 2,
                                     r: Math.min(cw, ch) / 6}));
      }
    }
    body.append(el("tr", {"data-layer": layer.layer, "data-tokens": sum}));
    body.lastChild.append(
        el("td", {}, layerName(c, layer.layer)), el("td", {class: "num"}, fmt(sum, 0)),
        el("td", {class: "num"}, fmt(mean, 1)),
        el("td", {class: "num"}, mean > 0 ? fmt(load[hottest] / mean, 2) : "-"),
        el("td", {class: "num"}, mean > 0 ? hottest : "-"), el("td", {class: "num"}, copies));
  });
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const res = await fetch("api/cluster", {cache: "no-store"});
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const c = await res.json();
    renderFacts(c);
    renderWarnings(c);
    renderGroups(c);
    renderHeatmap(c);
    status.className = "";
    status.textContent = `updated ${new Date().toLocaleTimeString()} (every ${REFRESH_MS / 1000} s)`;
    document.body.dataset.version = c.placement_version;
    document.body.dataset.rendered = Number(document.body.dataset.rendered || 0) + 1;
  } catch (err) {
    status.className = "error";
    status.textContent = `cannot read api/cluster: ${err.message} (retrying every ${REFRESH_MS / 1000} s)`;
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
