"""attention.html: one self-contained page (no network, no CDN, no notebook) in which to pick a stack, layer and head,
hover (or click, to pin) a token to see what it attends to and how much, and see every head at once as thumbnails.

The weights travel inside the page, quantised and compressed: for each head only the entries its mask allows (the
lower triangle under a causal mask), each stored as round(levels x sqrt(weight)) in one byte, zlib-compressed and
base64-encoded; the page inflates them with the browser's DecompressionStream. sqrt keeps small weights apart (with
255 levels, 0.001 is stored as 8, not 0). Where the compressed weights would pass WEIGHTS_BUDGET, fewer levels are
used (63, then 15), so a 12-layer, 12-head model at 256 tokens stays well under 5 MB."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Callable

import numpy as np

WEIGHTS_BUDGET = 4_500_000  # bytes of base64 weights, all stacks together
LEVELS = (255, 63, 15)


def pack(data: np.ndarray) -> str:
    """uint8 bytes -> zlib -> base64 text."""
    return base64.b64encode(zlib.compress(np.ascontiguousarray(data, dtype=np.uint8).tobytes(), 6)).decode("ascii")


def quantise(weights: np.ndarray, allowed: np.ndarray, levels: int) -> np.ndarray:
    """(L, nh, T, S) weights -> uint8 (L * nh * allowed entries,): round(levels x sqrt(w)) of the allowed entries,
    head after head, row after row."""
    kept = weights[:, :, allowed]  # (L, nh, n): boolean indexing walks the allowed entries row by row
    return np.rint(levels * np.sqrt(np.clip(kept, 0.0, 1.0))).astype(np.uint8).ravel()


def payload(stacks, heads: list[dict], labels: Callable[[list[int]], list[str]], title: str) -> dict:
    """Everything the page shows, as JSON: per stack its tokens, mask and packed weights; the head scores."""
    for levels in LEVELS:
        packed = [pack(quantise(s.weights, s.allowed, levels)) for s in stacks]
        if sum(map(len, packed)) <= WEIGHTS_BUDGET:
            break
    return {
        "title": title,
        "levels": levels,
        "stacks": [{
            "name": s.name, "layers": s.n_layer, "heads": s.n_head, "kvHeads": s.kv_heads, "self": s.self_attention,
            "prefix": s.prefix, "window": s.window, "queries": labels(s.queries), "keys": labels(s.keys),
            "mask": pack(s.allowed.astype(np.uint8)), "weights": w,
        } for s, w in zip(stacks, packed)],
        "heads": heads,
    }


def render(stacks, heads: list[dict], labels: Callable[[list[int]], list[str]], title: str = "attention") -> str:
    data = json.dumps(payload(stacks, heads, labels, title), separators=(",", ":"))
    data = data.replace("</", "<\\/")  # nothing in the data can close the script element
    return PAGE.replace("__TITLE__", escape(title)).replace("__DATA__", data)


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 17px; margin: 0 0 8px; }
.controls { display: flex; gap: 14px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
.scores { font-family: ui-monospace, monospace; font-size: 12px; color: #444; }
.main { display: flex; gap: 20px; align-items: flex-start; flex-wrap: wrap; }
#map { image-rendering: pixelated; border: 1px solid #999; cursor: crosshair; }
#cell { font-family: ui-monospace, monospace; font-size: 12px; min-height: 1.4em; }
.strip { line-height: 1.9; max-width: 900px; font-family: ui-monospace, monospace; font-size: 13px;
         border: 1px solid #ddd; padding: 6px; margin: 4px 0 10px; max-height: 260px; overflow: auto; }
.tok { white-space: pre; padding: 1px 0; border-radius: 2px; cursor: pointer; }
.tok.query { outline: 2px solid #d62728; }
.tok.masked { color: #aaa; text-decoration: line-through; }
.tok.pinned { outline: 2px solid #000; }
#top { font-family: ui-monospace, monospace; font-size: 12px; border-collapse: collapse; }
#top td { padding: 1px 6px; }
#thumbs { display: grid; gap: 3px; margin-top: 6px; align-items: center; }
#thumbs canvas { image-rendering: pixelated; border: 2px solid transparent; cursor: pointer; }
#thumbs canvas.sel { border-color: #d62728; }
#thumbs .lab { font-size: 11px; color: #555; text-align: center; }
.legend { font-size: 12px; color: #555; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; border: 1px solid #999; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div class="controls">
  <label id="stackbox">stack <select id="stack"></select></label>
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span class="scores" id="scores"></span>
</div>
<div class="legend">Hover a token (click to pin it) to see the keys it attends to and how much; hover the map for one
weight; click a thumbnail to pick its head. Colour: the weight (square-root scale).
<span class="swatch" style="background:#fff"></span> zero weight
<span class="swatch" style="background:#08306b"></span> weight 1
<span class="swatch" style="background:repeating-linear-gradient(45deg,#ccc 0 2px,#eee 2px 4px)"></span> masked: the
query may not see that key. <span id="note"></span></div>
<div id="keyhead"></div>
<div class="strip" id="keys"></div>
<div id="queryhead"></div>
<div class="strip" id="queries"></div>
<div class="main">
  <div><canvas id="map"></canvas><div id="cell"></div></div>
  <div><b id="tophead">top keys</b><table id="top"></table></div>
</div>
<h2 style="font-size:15px;margin:14px 0 2px">every head</h2>
<div id="thumbs"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const LEVELS = DATA.levels;
const $ = (id) => document.getElementById(id);
const state = { stack: 0, layer: 0, head: 0, query: null, pinned: null };
const stacks = [];

async function inflate(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

async function load() {
  for (const s of DATA.stacks) {
    const T = s.queries.length, S = s.keys.length;
    const mask = await inflate(s.mask);
    const index = new Int32Array(T * S).fill(-1);
    let n = 0;
    for (let i = 0; i < T * S; i++) if (mask[i]) index[i] = n++;
    stacks.push({ ...s, T, S, index, n, w: await inflate(s.weights) });
  }
}

// the stored value of (layer, head, query t, key s): round(LEVELS * sqrt(weight)), or -1 where masked
function q(st, l, h, t, s) {
  const i = st.index[t * st.S + s];
  return i < 0 ? -1 : st.w[(l * st.heads + h) * st.n + i];
}
function weight(st, l, h, t, s) { const v = q(st, l, h, t, s); return v < 0 ? null : (v / LEVELS) ** 2; }

// white -> dark blue by the stored sqrt(weight); masked cells hatched grey
function paint(ctx, st, l, h) {
  const img = ctx.createImageData(st.S, st.T);
  for (let t = 0; t < st.T; t++) for (let s = 0; s < st.S; s++) {
    const v = q(st, l, h, t, s), o = 4 * (t * st.S + s);
    if (v < 0) { const g = (t + s) % 4 < 2 ? 204 : 238; img.data[o] = img.data[o + 1] = img.data[o + 2] = g; }
    else {
      const x = v / LEVELS;
      img.data[o] = 255 - 247 * x; img.data[o + 1] = 255 - 207 * x; img.data[o + 2] = 255 - 148 * x;
    }
    img.data[o + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

function headInfo(st, l, h) {
  return DATA.heads.find((x) => x.stack === st.name && x.layer === l && x.head === h);
}
function fmt(x, d = 3) { return x === null || x === undefined ? "-" : x.toFixed(d); }
function headName(st, h) {  // a GQA head is labelled with the key/value head it reads
  return st.kvHeads !== st.heads ? `H${h} (kv ${Math.floor(h / (st.heads / st.kvHeads))})` : `H${h}`;
}
function visible(label) { return label.replace(/\\n/g, "\\u21b5\\n").replace(/\\t/g, "\\u21e5\\t") || "\\u2205"; }

function fillSelect(sel, n, name) {
  sel.innerHTML = "";
  for (let i = 0; i < n; i++) {
    const o = document.createElement("option");
    o.value = i; o.textContent = name(i); sel.appendChild(o);
  }
}

function buildStrip(div, labels, role) {
  div.innerHTML = "";
  labels.forEach((label, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = visible(label);
    span.title = `${role} ${i}: ${JSON.stringify(label)}`;
    if (role === "query") {
      span.addEventListener("mouseenter", () => { if (state.pinned === null) { state.query = i; showQuery(); } });
      span.addEventListener("click", () => {
        state.pinned = state.pinned === i ? null : i; state.query = i; showQuery();
      });
    }
    div.appendChild(span);
  });
}

function selectStack() {
  const st = stacks[state.stack];
  fillSelect($("layer"), st.layers, (i) => `L${i}`);
  fillSelect($("head"), st.heads, (i) => headName(st, i));
  state.layer = Math.min(state.layer, st.layers - 1);
  state.head = Math.min(state.head, st.heads - 1);
  state.query = state.pinned = null;
  const same = st.self;
  $("keyhead").textContent = same ? "tokens (queries and keys)" : `keys: ${st.name === "cross" ? "source" : ""} tokens`;
  $("queryhead").textContent = same ? "" : `queries: ${st.name === "cross" ? "target" : ""} tokens (hover one)`;
  $("queries").style.display = same ? "none" : "";
  buildStrip($("keys"), st.keys, same ? "query" : "key");
  if (!same) buildStrip($("queries"), st.queries, "query");
  const notes = [];
  if (st.window) notes.push(`sliding window of ${st.window}`);
  if (st.prefix) notes.push(`prefix of ${st.prefix} tokens seeing each other`);
  if (LEVELS !== 255) notes.push(`weights stored at ${LEVELS + 1} levels to keep the page small`);
  $("note").textContent = notes.join("; ");
  const map = $("map");
  map.width = st.S; map.height = st.T;
  const scale = Math.max(1, Math.floor(560 / Math.max(st.S, st.T)));
  map.style.width = `${st.S * scale}px`; map.style.height = `${st.T * scale}px`;
  buildThumbs();
  selectHead();
}

function selectHead() {
  const st = stacks[state.stack];
  $("layer").value = state.layer; $("head").value = state.head;
  paint($("map").getContext("2d"), st, state.layer, state.head);
  const m = headInfo(st, state.layer, state.head);
  $("scores").textContent = m ? `entropy ${fmt(m.entropy)}  mean distance ${fmt(m.mean_distance, 2)}  ` +
    `previous-token ${fmt(m.previous_token)}  sink ${fmt(m.sink)}  induction ${fmt(m.induction)}  ` +
    `label: ${m.label || "-"}` : "";
  document.querySelectorAll("#thumbs canvas").forEach((c) => {
    c.classList.toggle("sel", +c.dataset.l === state.layer && +c.dataset.h === state.head);
  });
  showQuery();
}

function showQuery() {
  const st = stacks[state.stack], t = state.query;
  const keySpans = $("keys").children, querySpans = st.self ? keySpans : $("queries").children;
  for (const span of keySpans) { span.style.background = ""; span.classList.remove("masked", "query", "pinned"); }
  for (const span of querySpans) span.classList.remove("query", "pinned");
  const table = $("top");
  table.innerHTML = "";
  if (t === null) { $("tophead").textContent = "top keys (hover a query token)"; return; }
  querySpans[t].classList.add(state.pinned === t ? "pinned" : "query");
  const row = [];
  for (let s = 0; s < st.S; s++) {
    const w = weight(st, state.layer, state.head, t, s);
    if (w === null) { keySpans[s].classList.add("masked"); continue; }
    keySpans[s].style.background = `rgba(8, 81, 156, ${Math.sqrt(w).toFixed(3)})`;
    keySpans[s].title = `key ${s}: ${JSON.stringify(st.keys[s])}  weight ${w.toFixed(4)}`;
    row.push([w, s]);
  }
  row.sort((a, b) => b[0] - a[0]);
  $("tophead").textContent = `query ${t} ${JSON.stringify(st.queries[t])} attends to (${row.length} keys visible):`;
  for (const [w, s] of row.slice(0, 15)) {
    const tr = table.insertRow();
    tr.insertCell().textContent = `key ${s}`;
    tr.insertCell().textContent = JSON.stringify(st.keys[s]);
    tr.insertCell().textContent = w.toFixed(4);
  }
}

function buildThumbs() {
  const st = stacks[state.stack], div = $("thumbs");
  div.innerHTML = "";
  div.style.gridTemplateColumns = `auto repeat(${st.heads}, auto)`;
  const side = Math.max(40, Math.min(96, Math.floor(1100 / st.heads) - 8));
  div.appendChild(document.createElement("span"));
  for (let h = 0; h < st.heads; h++) {
    const lab = document.createElement("span");
    lab.className = "lab"; lab.textContent = headName(st, h); div.appendChild(lab);
  }
  for (let l = 0; l < st.layers; l++) {
    const lab = document.createElement("span"); lab.className = "lab"; lab.textContent = `L${l}`; div.appendChild(lab);
    for (let h = 0; h < st.heads; h++) {
      const c = document.createElement("canvas");
      c.width = st.S; c.height = st.T; c.dataset.l = l; c.dataset.h = h;
      c.style.width = `${side}px`; c.style.height = `${Math.round(side * st.T / st.S)}px`;
      const m = headInfo(st, l, h);
      c.title = `L${l} ${headName(st, h)}` + (m && m.label ? `: ${m.label}` : "");
      c.addEventListener("click", () => { state.layer = l; state.head = h; selectHead(); });
      paint(c.getContext("2d"), st, l, h);
      div.appendChild(c);
    }
  }
}

$("map").addEventListener("mousemove", (e) => {
  const st = stacks[state.stack], r = e.target.getBoundingClientRect();
  const s = Math.floor((e.clientX - r.left) / r.width * st.S), t = Math.floor((e.clientY - r.top) / r.height * st.T);
  if (t < 0 || s < 0 || t >= st.T || s >= st.S) return;
  const w = weight(st, state.layer, state.head, t, s);
  $("cell").textContent = `query ${t} ${JSON.stringify(st.queries[t])} \\u2192 ` +
    `key ${s} ${JSON.stringify(st.keys[s])}: ` +
    (w === null ? "masked" : w.toFixed(4));
  if (state.pinned === null) { state.query = t; showQuery(); }
});

load().then(() => {
  fillSelect($("stack"), stacks.length, (i) => stacks[i].name);
  $("stackbox").style.display = stacks.length > 1 ? "" : "none";
  $("stack").addEventListener("change", (e) => { state.stack = +e.target.value; selectStack(); });
  $("layer").addEventListener("change", (e) => { state.layer = +e.target.value; selectHead(); });
  $("head").addEventListener("change", (e) => { state.head = +e.target.value; selectHead(); });
  selectStack();
}).catch((err) => {
  document.body.insertAdjacentText("afterbegin", "This page needs a browser with DecompressionStream " +
    "(Chrome 80+, Firefox 113+, Safari 16.4+): " + err);
});
</script>
</body>
</html>
"""
