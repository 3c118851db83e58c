// tunelab ui: sortable tables, live run pages (polling), the report frame's height, the playground (SSE).
// Served from the package; no other script runs on these pages (see the Content-Security-Policy).
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------------------------------ sortable tables

function makeSortable(table) {
  const heads = table.querySelectorAll("thead th");
  heads.forEach((th, column) => {
    th.addEventListener("click", () => {
      const numeric = th.dataset.type === "number";
      const descending = th.dataset.order !== "desc";
      heads.forEach((h) => delete h.dataset.order);
      th.dataset.order = descending ? "desc" : "asc";
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const key = (row) => {
        const value = row.cells[column].dataset.value ?? row.cells[column].textContent;
        return numeric ? parseFloat(value) : value.toLowerCase();
      };
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        const order = x < y ? -1 : x > y ? 1 : 0;
        return descending ? -order : order;
      });
      rows.forEach((row) => body.appendChild(row));
    });
  });
}

// ------------------------------------------------------------------------------------------ charts

function drawChart(svg, series) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const all = series.flatMap((s) => s.points);
  svg.dataset.points = String(series[0].points.length);
  if (!all.length) return;
  const W = 480, H = 220, left = 46, right = 10, top = 10, bottom = 26;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => left + (x - x0) / (x1 - x0) * (W - left - right);
  const Y = (y) => top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom);
  svg.appendChild(el("rect", {x: left, y: top, width: W - left - right, height: H - top - bottom, class: "frame"}));
  for (const v of [y0 + pad, (y0 + y1) / 2, y1 - pad]) {
    svg.appendChild(el("line", {x1: left, x2: W - right, y1: Y(v), y2: Y(v), class: "grid"}));
    svg.appendChild(el("text", {x: left - 4, y: Y(v) + 4, class: "tick", "text-anchor": "end"}, v.toPrecision(3)));
  }
  svg.appendChild(el("text", {x: left, y: H - 8, class: "tick"}, "step " + x0));
  svg.appendChild(el("text", {x: W - right, y: H - 8, class: "tick", "text-anchor": "end"}, "step " + x1));
  for (const s of series) {
    if (!s.points.length) continue;
    if (s.dots) {
      for (const [x, y] of s.points) svg.appendChild(el("circle", {cx: X(x), cy: Y(y), r: 3.5, class: s.cls}));
    } else {
      const d = s.points.map(([x, y], i) => (i ? "L" : "M") + X(x).toFixed(1) + " " + Y(y).toFixed(1)).join(" ");
      svg.appendChild(el("path", {d: d, class: s.cls}));
    }
  }
}

// ------------------------------------------------------------------------------------------ a run, live

function watchRun(root) {
  const name = root.dataset.run;
  const points = {loss: [], acc: [], vloss: [], vacc: []};
  let offset = 0;
  let wasLive = root.dataset.live === "yes";
  const url = (o) => "/api/runs/" + encodeURIComponent(name) + "/state?offset=" + o;

  function redraw() {
    drawChart(document.getElementById("chart-loss"),
      [{points: points.loss, cls: "train"}, {points: points.vloss, cls: "val", dots: true}]);
    drawChart(document.getElementById("chart-acc"),
      [{points: points.acc, cls: "train"}, {points: points.vacc, cls: "val", dots: true}]);
    document.getElementById("no-steps").hidden = points.loss.length > 0;
  }

  function show(data) {
    const s = data.state;
    const badge = document.getElementById("status");
    badge.textContent = s.status;
    badge.className = "status status-" + s.status;
    document.getElementById("detail").textContent = s.detail;
    document.getElementById("eta").textContent = s.eta_s === null ? "" : " · ETA " + formatSeconds(s.eta_s);
    const arms = document.getElementById("eval-arms");
    document.getElementById("eval-progress").hidden = !s.eval_progress.length;
    arms.replaceChildren(...s.eval_progress.map((a) => {
      const tr = document.createElement("tr");
      tr.dataset.arm = a.arm;
      for (const text of [a.arm, a.state, a.done + (a.total ? "/" + a.total : "")]) {
        const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
      }
      return tr;
    }));
    const consoleBox = document.getElementById("console");
    if (consoleBox && data.console) consoleBox.textContent = data.console.join("\n");
  }

  async function poll() {
    let data;
    try {
      const response = await fetch(url(offset), {headers: {Accept: "application/json"}});
      if (!response.ok) throw new Error(response.status);
      data = await response.json();
    } catch (err) {
      setTimeout(poll, 3000);
      return;
    }
    if (data.reset) for (const k of Object.keys(points)) points[k] = [];
    for (const r of data.records) {
      if (r.kind === "train") {
        if (typeof r.loss === "number") points.loss.push([r.step, r.loss]);
        if (typeof r.token_acc === "number") points.acc.push([r.step, r.token_acc]);
      } else if (r.kind === "eval") {
        if (typeof r.val_loss === "number") points.vloss.push([r.step, r.val_loss]);
        if (typeof r.val_token_acc === "number") points.vacc.push([r.step, r.val_token_acc]);
      }
    }
    offset = data.offset;
    redraw();
    show(data);
    const live = ["preparing", "training", "evaluating"].includes(data.state.status);
    if (wasLive && !live) { window.location.reload(); return; }
    wasLive = live;
    if (live) setTimeout(poll, 1000);
  }
  poll();
}

function formatSeconds(s) {
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
  return Math.floor(s / 3600) + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + " min";
}

// ------------------------------------------------------------------------------------------ the report frame

function fitFrame(frame) {
  const fit = () => {
    try { frame.style.height = frame.contentDocument.documentElement.scrollHeight + 20 + "px"; } catch (e) { /* not same-origin */ }
  };
  frame.addEventListener("load", fit);
  fit();
}

// ------------------------------------------------------------------------------------------ playground

function playground(form) {
  const answers = document.getElementById("answers");
  const statusBox = document.getElementById("pg-status");
  const runSelect = document.getElementById("pg-run");
  let source = null;
  runSelect.addEventListener("change", () => { window.location.search = "?run=" + encodeURIComponent(runSelect.value); });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (source) source.close();
    const arms = Array.from(form.querySelectorAll("input[name=arm]:checked")).map((b) => b.value);
    const params = new URLSearchParams({
      run: runSelect.value, prompt: document.getElementById("pg-prompt").value,
      system: document.getElementById("pg-system").value, arms: arms.join(","),
      max_new_tokens: document.getElementById("pg-max").value,
    });
    answers.replaceChildren();
    const columns = {};
    statusBox.textContent = "sending…";
    document.getElementById("pg-send").disabled = true;
    source = new EventSource("/api/playground/stream?" + params.toString());
    const finish = (message) => {
      statusBox.textContent = message;
      source.close();
      document.getElementById("pg-send").disabled = false;
    };
    source.addEventListener("status", (e) => { statusBox.textContent = JSON.parse(e.data).message; });
    source.addEventListener("start", (e) => {
      const d = JSON.parse(e.data);
      const box = document.createElement("article");
      box.className = "answer";
      box.dataset.arm = d.arm;
      const head = document.createElement("h3"); head.textContent = d.arm;
      const text = document.createElement("pre"); text.className = "answer-text";
      const stats = document.createElement("p"); stats.className = "small answer-stats";
      stats.textContent = d.prompt_tokens + " prompt tokens";
      box.append(head, text, stats);
      answers.appendChild(box);
      columns[d.arm] = {text, stats, box};
      statusBox.textContent = "generating…";
    });
    source.addEventListener("piece", (e) => {
      const d = JSON.parse(e.data);
      columns[d.arm].text.textContent += d.text;
    });
    source.addEventListener("end", (e) => {
      const d = JSON.parse(e.data);
      columns[d.arm].box.dataset.done = "yes";
      columns[d.arm].stats.textContent = d.prompt_tokens + " prompt tokens · " + d.completion_tokens +
        " completion tokens · " + d.latency_ms.toFixed(0) + " ms (first token " + d.first_token_ms.toFixed(0) +
        " ms) · " + d.finish_reason;
    });
    source.addEventListener("done", () => finish("done"));
    source.addEventListener("failure", (e) => finish(JSON.parse(e.data).message));
    source.addEventListener("error", () => { if (source.readyState !== EventSource.OPEN) finish("connection closed"); });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.sortable").forEach(makeSortable);
  const run = document.getElementById("run");
  if (run) watchRun(run);
  const frame = document.getElementById("report");
  if (frame) fitFrame(frame);
  const form = document.getElementById("playground");
  if (form) playground(form);
});
