// partita serve dashboard: plain JS, no dependencies. It reads /api/events (server-sent events:
// the state whenever it changed) and falls back to polling /api/state if the stream breaks.
"use strict";

(function () {
  const key = new URLSearchParams(window.location.search).get("key");
  const query = key ? "?key=" + encodeURIComponent(key) : "";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  function ms(seconds) {
    return seconds === null || seconds === undefined ? "–" : (seconds * 1e3).toFixed(2) + " ms";
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function el(tag, attrs, text) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderHeader(state) {
    $("model").textContent = state.model;
    const ready = $("ready");
    ready.textContent = state.ready ? "ready" : "not ready";
    ready.className = "badge " + (state.ready ? "ok" : "bad");
    ready.title = state.halted || "";
    const requests = state.requests || {};
    const total = Object.values(requests).reduce((a, b) => a + b, 0);
    $("requests-total").textContent = String(total);
    $("requests-failed").textContent = String(requests.failed || 0);
    $("epoch").textContent = String(state.plan.epoch);
    $("batching").textContent = "batch ≤ " + state.batching.max_batch + " rows, window " + state.batching.window_ms + " ms";
  }

  function renderGraph(state) {
    const svg = $("graph");
    svg.replaceChildren();
    const names = [state.source].concat(state.devices.map((d) => d.name));
    const cx = 260, cy = 180, r = 130;
    const at = {};
    names.forEach((name, i) => {
      const angle = -Math.PI / 2 + (2 * Math.PI * i) / names.length;
      at[name] = [cx + r * Math.cos(angle), cy + r * Math.sin(angle)];
    });
    const hops = new Set(state.links.map((l) => l.from + "→" + l.to));
    for (let i = 0; i < names.length; i++) {
      for (let j = i + 1; j < names.length; j++) {
        const a = names[i], b = names[j];
        if (hops.has(a + "→" + b) || hops.has(b + "→" + a)) continue;
        svg.appendChild(el("svg:line", { x1: at[a][0], y1: at[a][1], x2: at[b][0], y2: at[b][1], class: "edge" }));
      }
    }
    for (const link of state.links) {
      const a = at[link.from], b = at[link.to];
      if (!a || !b) continue;
      svg.appendChild(el("svg:line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: "edge hop",
        "data-from": link.from, "data-to": link.to }));
      svg.appendChild(el("svg:text", { x: (a[0] + b[0]) / 2, y: (a[1] + b[1]) / 2 - 4, class: "edge-label" },
        bytes(link.bytes)));
    }
    const byName = Object.fromEntries(state.devices.map((d) => [d.name, d]));
    for (const name of names) {
      const device = byName[name];
      const kind = device ? device.status : "source";
      const g = el("svg:g", { class: "node " + kind, "data-device": name, "data-status": kind });
      g.appendChild(el("svg:circle", { cx: at[name][0], cy: at[name][1], r: 26 }));
      g.appendChild(el("svg:text", { x: at[name][0], y: at[name][1] + 4 }, name));
      if (device && device.stage !== null) {
        g.appendChild(el("svg:text", { x: at[name][0], y: at[name][1] + 42 }, "stage " + device.stage));
      }
      svg.appendChild(g);
    }
  }

  function renderDevices(state) {
    const body = $("devices").querySelector("tbody");
    body.replaceChildren();
    for (const d of state.devices) {
      const row = el("tr", { class: d.status, "data-device": d.name, "data-status": d.status });
      row.appendChild(el("td", {}, d.name));
      row.appendChild(el("td", { class: "status-" + d.status }, d.status));
      row.appendChild(el("td", {}, d.stage === null ? "–" : String(d.stage)));
      row.appendChild(el("td", {}, d.speed === null ? "–" : d.speed.toFixed(3) + "×"));
      row.appendChild(el("td", {}, bytes(d.memory_bytes)));
      row.appendChild(el("td", {}, ms(d.measured_compute_s)));
      body.appendChild(row);
    }
  }

  function renderPlan(state) {
    const plan = state.plan;
    $("plan-summary").textContent = plan.planner + ", " + plan.objective + ": predicted period " +
      ms(plan.predicted_period_s) + ", measured " + ms(plan.measured_period_s);
    const box = $("plan");
    box.replaceChildren();
    box.dataset.epoch = String(plan.epoch);
    plan.stages.forEach((s, i) => {
      if (i > 0) box.appendChild(el("span", { class: "arrow" }, "→"));
      const stage = el("div", { class: "stage", "data-stage": String(s.index), "data-devices": s.devices.join(",") });
      stage.appendChild(el("b", {}, "stage " + s.index + ": " + s.devices.join(" + ")));
      stage.appendChild(el("span", {}, "segments [" + s.segments[0] + ", " + s.segments[1] + ")"));
      stage.appendChild(el("div", { class: "figures" },
        "period " + ms(s.predicted_period_s) + " predicted, " + ms(s.measured_period_s) + " measured"));
      box.appendChild(stage);
    });
    const body = $("links").querySelector("tbody");
    body.replaceChildren();
    for (const l of state.links) {
      const row = el("tr");
      [l.from, l.to, bytes(l.bytes), ms(l.predicted_transfer_s), ms(l.measured_transfer_s)]
        .forEach((v) => row.appendChild(el("td", {}, v)));
      body.appendChild(row);
    }
  }

  function chart(canvas, series, lines, unit) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 34;
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#d9dde5";
    ctx.fillStyle = "#6b7280";
    ctx.beginPath(); ctx.moveTo(pad, 6); ctx.lineTo(pad, h - 18); ctx.lineTo(w - 6, h - 18); ctx.stroke();
    if (series.length < 2) { ctx.fillText("waiting for data…", pad + 10, h / 2); return; }
    const t0 = series[0].time, t1 = series[series.length - 1].time;
    let top = 0;
    for (const p of series) for (const line of lines) top = Math.max(top, line.value(p) || 0);
    top = top > 0 ? top * 1.15 : 1;
    ctx.fillText(top.toFixed(top < 10 ? 1 : 0) + " " + unit, 2, 14);
    ctx.fillText("0", pad - 10, h - 20);
    ctx.fillText(Math.round(t1 - t0) + " s", w - 40, h - 4);
    const x = (t) => pad + ((w - pad - 8) * (t - t0)) / Math.max(t1 - t0, 1e-9);
    const y = (v) => h - 18 - ((h - 26) * v) / top;
    for (const line of lines) {
      ctx.strokeStyle = line.color; ctx.lineWidth = 2; ctx.beginPath();
      let started = false;
      for (const p of series) {
        const v = line.value(p);
        if (v === null || v === undefined) { started = false; continue; }
        if (started) ctx.lineTo(x(p.time), y(v)); else { ctx.moveTo(x(p.time), y(v)); started = true; }
      }
      ctx.stroke();
    }
    lines.forEach((line, i) => { ctx.fillStyle = line.color; ctx.fillText(line.label, w - 120 + 55 * i, 14); });
  }

  function renderCharts(state) {
    const series = state.series || [];
    chart($("throughput-chart"), series, [{ label: "req/s", color: "#2f5fd0", value: (p) => p.throughput_rps }], "req/s");
    chart($("latency-chart"), series, [
      { label: "p50", color: "#2f5fd0", value: (p) => (p.latency_p50_s === null ? null : p.latency_p50_s * 1e3) },
      { label: "p99", color: "#d97706", value: (p) => (p.latency_p99_s === null ? null : p.latency_p99_s * 1e3) },
    ], "ms");
    $("throughput-chart").dataset.points = String(series.length);
  }

  function renderEvents(state) {
    const list = $("events");
    list.replaceChildren();
    for (const e of state.events.slice().reverse()) {
      const when = new Date(e.time * 1000).toLocaleTimeString();
      list.appendChild(el("li", { class: e.kind, "data-kind": e.kind }, when + "  " + e.text));
    }
  }

  function render(state) {
    renderHeader(state);
    renderGraph(state);
    renderDevices(state);
    renderPlan(state);
    renderCharts(state);
    renderEvents(state);
    document.body.dataset.version = String(state.version);
  }

  let polling = null;
  function poll() {
    fetch("/api/state" + query).then((r) => (r.ok ? r.json() : Promise.reject(r.status))).then(render)
      .catch(() => { $("ready").textContent = "disconnected"; $("ready").className = "badge bad"; });
  }
  function connect() {
    if (!window.EventSource) { polling = setInterval(poll, 2000); poll(); return; }
    const source = new EventSource("/api/events" + query);
    source.addEventListener("state", (message) => render(JSON.parse(message.data)));
    source.onerror = () => {
      // The stream ends when the server drains or restarts: poll until it answers again.
      source.close();
      if (polling === null) polling = setInterval(poll, 2000);
    };
  }
  connect();
})();
