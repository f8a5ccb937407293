// bitscout status pages: the job list and a job's page. Vanilla JS, no dependencies.
// Data come from the REST API with the bearer token kept in localStorage: typed into the login form,
// or given once in the address's fragment (/#token=..., which browsers never send to the server);
// the page takes it from there and removes it from the address bar at once.
// Untrusted strings are only ever written with textContent.
"use strict";

(function () {
  const API = "/api/v1";
  const TOKEN_KEY = "bitscout_token";
  const SVG = "http://www.w3.org/2000/svg";
  const ACTIVE = new Set(["queued", "running"]);
  const METHOD_COLORS = { kl: "#2f6fdf", hessian: "#9b3fd1", dnas: "#e0701b", nsga2: "#1f9d55", uniform: "#8a93a6" };
  const BIT_COLORS = {
    0: "#2b2b2b", 2: "#c62828", 3: "#ef6c00", 4: "#f9a825", 5: "#c0ca33",
    6: "#7cb342", 8: "#2e7d32", 16: "#1e88e5", 32: "#cfd8dc",
  };
  const COSTS = {
    size_mb: { label: "size (MB)", budget: "max_size_mb" },
    avg_bits: { label: "average bits", budget: "max_avg_bits" },
    bops: { label: "BOPs", budget: "max_bops" },
    latency_ms: { label: "latency (ms)", budget: "max_latency_ms" },
  };

  // ------------------------------------------------------------------ helpers

  const $ = (id) => document.getElementById(id);
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
    return v.toFixed(digits === undefined ? (a >= 100 ? 1 : a >= 1 ? 3 : 4) : digits);
  }
  function age(iso) {
    if (!iso) return "";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 86400) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  function modelName(spec) {
    const m = (spec && spec.model) || {};
    if (m.hf_id) return m.hf_id + "@" + String(m.revision || "").slice(0, 7);
    if (m.path) return m.path;
    if (m.upload_id) return "upload " + m.upload_id.slice(0, 8);
    return "?";
  }

  // ------------------------------------------------------------------ token and API

  // Returns a message for the login form when the address carried a token the page did not use.
  function takeTokenFromUrl() {
    const url = new URL(window.location.href);
    let note = "";
    const fragment = new URLSearchParams(url.hash.replace(/^#/, ""));
    const t = fragment.get("token");
    if (t !== null) {
      if (t.trim()) localStorage.setItem(TOKEN_KEY, t.trim());
      fragment.delete("token");
      url.hash = fragment.toString();
    }
    if (url.searchParams.has("token")) {
      // A token in the query string travels to the server (and its logs): never used.
      url.searchParams.delete("token");
      note = "A token in the address goes after '#' (/#token=...), never after '?': paste it here instead.";
    }
    if (t !== null || note) window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    return note;
  }
  function token() { return localStorage.getItem(TOKEN_KEY); }

  class AuthError extends Error {}

  async function api(path) {
    const t = token();
    if (!t) throw new AuthError("no token");
    const r = await fetch(API + path, { headers: { Authorization: "Bearer " + t, Accept: "application/json" } });
    if (r.status === 401) throw new AuthError("the token was refused");
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) {
      const err = new Error((body && body.message) || ("HTTP " + r.status));
      err.status = r.status;
      throw err;
    }
    return body;
  }

  let loginNote = "";  // said on the login form when the address carried a token in its query string
  function showLogin(message) {
    message = message || loginNote;
    $("content").classList.add("hidden");
    $("login").classList.remove("hidden");
    $("logout").classList.add("hidden");
    const e = $("login-error");
    if (message) { e.textContent = message; e.classList.remove("hidden"); } else { e.classList.add("hidden"); }
  }
  function showContent() {
    $("login").classList.add("hidden");
    $("content").classList.remove("hidden");
    $("logout").classList.remove("hidden");
  }
  function setupLogin(start) {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const v = $("token-input").value.trim();
      if (!v) return;
      localStorage.setItem(TOKEN_KEY, v);
      $("token-input").value = "";
      start();
    });
    $("logout").addEventListener("click", () => { localStorage.removeItem(TOKEN_KEY); showLogin(); });
  }

  // ------------------------------------------------------------------ job list

  function indexPage() {
    let offset = 0;
    const limit = 50;
    let timer = null;

    async function load() {
      if (timer) { clearTimeout(timer); timer = null; }
      if (!token()) { showLogin(); return; }
      const status = $("status-filter").value;
      let page;
      try {
        page = await api(`/jobs?limit=${limit}&offset=${offset}` + (status ? `&status=${status}` : ""));
      } catch (e) {
        if (e instanceof AuthError) { showLogin(e.message === "no token" ? "" : "That token was refused."); return; }
        $("count").textContent = "could not load jobs: " + e.message;
        timer = setTimeout(load, 5000);
        return;
      }
      showContent();
      const tbody = $("jobs").querySelector("tbody");
      clear(tbody);
      for (const job of page.items) {
        const tr = el("tr", { "data-job": job.id });
        const link = el("a", { href: "/jobs/" + encodeURIComponent(job.id) }, job.id.slice(0, 8));
        const td0 = el("td"); td0.appendChild(link); tr.appendChild(td0);
        const td1 = el("td"); td1.appendChild(el("span", { class: "badge " + job.status }, job.status)); tr.appendChild(td1);
        tr.appendChild(el("td", {}, (job.spec.methods || []).join(", ")));
        tr.appendChild(el("td", {}, modelName(job.spec)));
        const td4 = el("td");
        const bar = el("span", { class: "bar" });
        const fill = el("span");
        fill.style.width = Math.round(100 * (job.progress || 0)) + "%";
        bar.appendChild(fill);
        td4.appendChild(bar);
        td4.appendChild(el("span", { class: "muted small" }, " " + Math.round(100 * (job.progress || 0)) + "%"));
        tr.appendChild(td4);
        tr.appendChild(el("td", {}, job.stage || ""));
        tr.appendChild(el("td", { title: job.created_at }, age(job.created_at)));
        tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") window.location.href = link.href; });
        tbody.appendChild(tr);
      }
      $("empty").classList.toggle("hidden", page.total > 0);
      $("count").textContent = page.total ? `${offset + 1}–${offset + page.items.length} of ${page.total}` : "";
      $("prev").disabled = offset === 0;
      $("next").disabled = page.next_offset === null || page.next_offset === undefined;
      const anyActive = page.items.some((j) => ACTIVE.has(j.status));
      timer = setTimeout(load, anyActive ? 2000 : 10000);
    }
    $("status-filter").addEventListener("change", () => { offset = 0; load(); });
    $("prev").addEventListener("click", () => { offset = Math.max(0, offset - limit); load(); });
    $("next").addEventListener("click", () => { offset += limit; load(); });
    setupLogin(load);
    load();
  }

  // ------------------------------------------------------------------ job page

  function jobPage() {
    const jobId = decodeURIComponent(window.location.pathname.split("/").filter(Boolean).pop() || "");
    $("job-id-short").textContent = jobId.slice(0, 8);
    let job = null;
    let pareto = null;
    let selected = null;
    let lastEvent = null;
    let timer = null;
    let costChosen = false;
    const events = [];

    async function load() {
      if (timer) { clearTimeout(timer); timer = null; }
      if (!token()) { showLogin(); return; }
      try {
        job = await api("/jobs/" + encodeURIComponent(jobId));
        const evs = await api(`/jobs/${encodeURIComponent(jobId)}/events` + (lastEvent !== null ? `?after=${lastEvent}` : ""));
        for (const e of evs) { events.push(e); lastEvent = e.id; }
        if (job.n_points > 0 && (!pareto || pareto.points.length !== job.n_points)) {
          pareto = await api(`/jobs/${encodeURIComponent(jobId)}/pareto`);
          if (selected === null) selected = pareto.recommended !== null ? pareto.recommended : (pareto.points[0] || {}).id;
        }
      } catch (e) {
        if (e instanceof AuthError) { showLogin(e.message === "no token" ? "" : "That token was refused."); return; }
        showContent();
        $("job-title").textContent = e.status === 404 ? "No such job (or not yours)" : "Could not load the job";
        $("message").textContent = e.message;
        if (e.status !== 404) timer = setTimeout(load, 5000);
        return;
      }
      showContent();
      if (!costChosen) {
        costChosen = true;
        const limited = Object.keys(COSTS).find((k) => job.spec.budget[COSTS[k].budget] !== null && job.spec.budget[COSTS[k].budget] !== undefined);
        if (limited) $("cost-select").value = limited;
      }
      renderSummary();
      renderEvents();
      renderResults();
      if (ACTIVE.has(job.status) || (job.n_points > 0 && !pareto)) timer = setTimeout(load, 1500);
    }

    function renderSummary() {
      document.title = "bitscout — job " + job.id.slice(0, 8) + " (" + job.status + ")";
      $("job-title").textContent = "Job " + job.id;
      const badge = $("status");
      badge.textContent = job.status;
      badge.className = "badge " + job.status;
      $("cancel-note").textContent = job.cancel_requested ? "cancel requested" : "";
      $("progress-fill").style.width = Math.round(100 * (job.progress || 0)) + "%";
      $("stage").textContent = (job.stage || "") + " · " + Math.round(100 * (job.progress || 0)) + "%";
      $("message").textContent = job.message || "";
      const err = $("job-error");
      if (job.error_message && job.status !== "succeeded") {
        err.textContent = (job.error_code ? job.error_code + ": " : "") + job.error_message;
        err.classList.remove("hidden");
      } else err.classList.add("hidden");
      const facts = $("facts");
      clear(facts);
      const spec = job.spec;
      const budget = Object.entries(spec.budget).filter(([, v]) => v !== null).map(([k, v]) => `${k.replace("max_", "")} ≤ ${v}`).join(", ");
      const rows = [
        ["model", modelName(spec)], ["task", spec.task], ["methods", spec.methods.join(", ")],
        ["budget", budget], ["metric", spec.metric], ["bits", spec.space.bits.join(", ") + " (" + spec.space.granularity + ")"],
        ["tie", spec.space.tie == null ? "task default" : (spec.space.tie.length ? spec.space.tie.join(", ") : "none")],
        ["submitted", new Date(job.created_at).toLocaleString() + " (" + age(job.created_at) + " ago)"],
        ["attempts", String(job.attempts)], ["points", String(job.n_points)],
      ];
      if (job.finished_at) rows.push(["finished", new Date(job.finished_at).toLocaleString()]);
      for (const [k, v] of rows) { facts.appendChild(el("div", {}, k)); facts.appendChild(el("div", {}, v)); }
    }

    function renderEvents() {
      const tbody = $("events").querySelector("tbody");
      clear(tbody);
      for (const e of events.slice().reverse()) {
        const tr = el("tr");
        tr.appendChild(el("td", { title: e.at }, new Date(e.at).toLocaleTimeString()));
        tr.appendChild(el("td", {}, e.kind));
        tr.appendChild(el("td", {}, e.stage || ""));
        tr.appendChild(el("td", { class: "msg" }, e.message || ""));
        tbody.appendChild(tr);
      }
    }

    function metricOf(p) { return pareto && pareto.metric ? p.metrics[pareto.metric] : null; }

    // how a point was found, as bitscout.methods.provenance_text writes it: "kl r0", "kl r2 +ls", "kl guard", "reference"
    function foundText(p) {
      const v = p.provenance;
      if (!v) return "-";
      if (v.reference) return "reference";
      const score = v.score || "-";
      if (v.guard) return `${score} guard`;
      const text = v.round === null || v.round === undefined ? score : `${score} r${v.round}`;
      return text + (v.local_search ? " +ls" : "");
    }

    function renderResults() {
      const has = pareto && pareto.points.length > 0;
      $("no-points").classList.toggle("hidden", !!has);
      $("front-card").classList.toggle("hidden", !has);
      if (!has) return;
      renderTable();
      renderPlot();
      renderHeatmap();
    }

    function select(id) {
      selected = id;
      renderTable();
      renderPlot();
      renderHeatmap();
    }

    function renderTable() {
      $("metric-head").textContent = pareto.metric || "metric";
      const tbody = $("points").querySelector("tbody");
      clear(tbody);
      for (const p of pareto.points) {
        const tr = el("tr", { "data-point": p.id, class: (p.id === selected ? "selected" : "") + (p.refined ? " refined" : "") });
        if (p.refined) tr.setAttribute("data-refined-from", p.refined_from === null || p.refined_from === undefined ? "" : p.refined_from);
        tr.appendChild(el("td", { class: "num" }, p.id));
        tr.appendChild(el("td", {}, p.method));
        tr.appendChild(el("td", {}, p.label || ""));
        tr.appendChild(el("td", { class: "found", title: (p.provenance && p.provenance.how) || "" }, foundText(p)));
        tr.appendChild(el("td", { class: "num" }, fmt(p.cost.size_mb, 3)));
        tr.appendChild(el("td", { class: "num" }, fmt(p.cost.avg_bits, 2)));
        tr.appendChild(el("td", { class: "num" }, fmt(p.cost.bops)));
        tr.appendChild(el("td", { class: "num" }, fmt(p.cost.latency_ms)));
        tr.appendChild(el("td", { class: "num" }, fmt(metricOf(p))));
        tr.appendChild(el("td", {}, p.meets_budget ? "meets" : "over"));
        tr.appendChild(el("td", {}, p.on_front ? "yes" : ""));
        // a refined point is often the recommended one too: show both marks
        const last = el("td", {}, p.recommended ? "★ recommended" : "");
        if (p.refined) {
          const from = p.refined_from === null || p.refined_from === undefined ? "" : ` from #${p.refined_from}`;
          last.appendChild(el("span", { class: "refined-mark" }, (p.recommended ? " · " : "") + "refined" + from));
        }
        // every point downloads: one not stored in the chosen format is exported by the service first
        const a = el("a", { href: "#", class: "small", "data-download": p.id }, " download");
        a.addEventListener("click", (ev) => { ev.preventDefault(); ev.stopPropagation(); download(p.id, $("format-select").value); });
        last.appendChild(a);
        tr.appendChild(last);
        tr.addEventListener("click", () => select(p.id));
        tbody.appendChild(tr);
      }
    }

    // GET the artifact in `format`; while the service answers 202 (being exported), ask again after
    // its Retry-After; a failed export shows its error.
    async function download(pointId, format) {
      const note = $("download-note");
      const url = `${API}/jobs/${encodeURIComponent(jobId)}/points/${pointId}/artifact?format=${encodeURIComponent(format)}`;
      for (;;) {
        const r = await fetch(url, { headers: { Authorization: "Bearer " + token() } });
        if (r.status === 202) {
          const body = await r.json();
          note.textContent = body.message || `point ${pointId} is being exported as ${format}`;
          const wait = Math.max(1, parseFloat(r.headers.get("Retry-After") || "2"));
          await new Promise((done) => setTimeout(done, wait * 1000));
          continue;
        }
        if (!r.ok) {
          let message = `download failed (${r.status})`;
          try { message = (await r.json()).message || message; } catch (e) { /* not JSON */ }
          note.textContent = message;
          return;
        }
        note.textContent = "";
        const blob = await r.blob();
        const a = el("a", { href: URL.createObjectURL(blob), download: `job-${jobId.slice(0, 8)}-point-${pointId}-${format}.tar.gz` });
        document.body.appendChild(a); a.click(); a.remove();
        return;
      }
    }

    function niceTicks(lo, hi, n) {
      if (!(hi > lo)) { hi = lo + 1; }
      const step0 = (hi - lo) / n;
      const mag = Math.pow(10, Math.floor(Math.log10(step0)));
      const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
      const out = [];
      for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12 * Math.abs(hi); v += step) out.push(v);
      return out;
    }

    function renderPlot() {
      const costKey = $("cost-select").value;
      const plot = $("plot");
      clear(plot);
      const W = 900, H = 380, m = { l: 64, r: 20, t: 16, b: 44 };
      const pts = pareto.points;
      const xs = pts.map((p) => p.cost[costKey]);
      const ys = pts.map(metricOf).filter((v) => v !== null && v !== undefined);
      const budgetKey = COSTS[costKey].budget;
      const budget = pareto.budget ? pareto.budget[budgetKey] : null;
      let xlo = Math.min(...xs), xhi = Math.max(...xs);
      if (budget !== null && budget !== undefined) { xlo = Math.min(xlo, budget); xhi = Math.max(xhi, budget); }
      const bm = pareto.baseline_metrics && pareto.metric ? pareto.baseline_metrics[pareto.metric] : null;
      let ylo = ys.length ? Math.min(...ys) : 0, yhi = ys.length ? Math.max(...ys) : 1;
      if (bm !== null && bm !== undefined) { ylo = Math.min(ylo, bm); yhi = Math.max(yhi, bm); }
      const padx = (xhi - xlo || Math.abs(xhi) || 1) * 0.06, pady = (yhi - ylo || Math.abs(yhi) || 1) * 0.08;
      xlo -= padx; xhi += padx; ylo -= pady; yhi += pady;
      const X = (v) => m.l + (v - xlo) / (xhi - xlo) * (W - m.l - m.r);
      const Y = (v) => H - m.b - (v - ylo) / (yhi - ylo) * (H - m.t - m.b);
      // grid and axes
      const grid = svg("g", { class: "grid" }), axes = svg("g", { class: "axis" });
      for (const t of niceTicks(xlo, xhi, 8)) {
        grid.appendChild(svg("line", { x1: X(t), x2: X(t), y1: m.t, y2: H - m.b }));
        axes.appendChild(svg("text", { x: X(t), y: H - m.b + 16, "text-anchor": "middle" }, fmt(t)));
      }
      for (const t of niceTicks(ylo, yhi, 6)) {
        grid.appendChild(svg("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }));
        axes.appendChild(svg("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end" }, fmt(t)));
      }
      axes.appendChild(svg("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
      axes.appendChild(svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }));
      axes.appendChild(svg("text", { x: (m.l + W - m.r) / 2, y: H - 8, "text-anchor": "middle" }, COSTS[costKey].label));
      const dir = pareto.higher_is_better ? "higher is better" : "lower is better";
      axes.appendChild(svg("text", { x: 14, y: (m.t + H - m.b) / 2, transform: `rotate(-90 14 ${(m.t + H - m.b) / 2})`, "text-anchor": "middle" }, `${pareto.metric || "metric"} (${dir})`));
      plot.appendChild(grid);
      plot.appendChild(axes);
      // baseline metric of the unquantized model
      if (bm !== null && bm !== undefined) {
        plot.appendChild(svg("line", { class: "baseline", x1: m.l, x2: W - m.r, y1: Y(bm), y2: Y(bm) }));
        plot.appendChild(svg("text", { x: W - m.r - 4, y: Y(bm) - 4, "text-anchor": "end" }, "unquantized"));
      }
      // budget line
      if (budget !== null && budget !== undefined) {
        plot.appendChild(svg("line", { class: "budget", x1: X(budget), x2: X(budget), y1: m.t, y2: H - m.b }));
        plot.appendChild(svg("text", { x: X(budget) + 4, y: m.t + 10, fill: "#d64545" }, "budget " + fmt(budget)));
      }
      // lines: each method's front points, and the uniform baselines
      const byMethod = {};
      for (const p of pts) {
        const y = metricOf(p);
        if (y === null || y === undefined) continue;
        if (p.method !== "uniform" && !p.on_front) continue;
        (byMethod[p.method] = byMethod[p.method] || []).push(p);
      }
      for (const [method, list] of Object.entries(byMethod)) {
        list.sort((a, b) => a.cost[costKey] - b.cost[costKey]);
        const d = list.map((p, i) => (i ? "L" : "M") + X(p.cost[costKey]).toFixed(1) + " " + Y(metricOf(p)).toFixed(1)).join(" ");
        const attrs = method === "uniform" ? { class: "baseline", d } : { class: "frontline", d, stroke: METHOD_COLORS[method] || "#555" };
        plot.appendChild(svg("path", attrs));
      }
      // markers: one per stored point
      const tip = $("tooltip");
      for (const p of pts) {
        const y0 = metricOf(p);
        const cx = X(p.cost[costKey]);
        const cy = y0 === null || y0 === undefined ? H - m.b - 4 : Y(y0);
        const color = METHOD_COLORS[p.method] || "#555";
        const cls = "pt" + (p.on_front || p.method === "uniform" ? "" : " off") + (p.id === selected ? " selected" : "") + (p.method === "uniform" ? " uniform" : "");
        let mk;
        if (p.method === "uniform") mk = svg("rect", { x: cx - 5, y: cy - 5, width: 10, height: 10, fill: color, class: cls });
        else mk = svg("circle", { cx, cy, r: p.refined ? 7 : 6, fill: color, class: cls + (p.refined ? " refined" : "") });
        mk.setAttribute("data-point", p.id);
        mk.setAttribute("data-method", p.method);
        mk.addEventListener("mouseenter", () => {
          const lines = [
            `#${p.id} ${p.label || p.method}`, `method: ${p.method}${p.refined ? ` (refined${p.refined_from === null || p.refined_from === undefined ? "" : ` from #${p.refined_from}`})` : ""}`,
            `${pareto.metric}: ${fmt(y0)}`, `size: ${fmt(p.cost.size_mb, 3)} MB · ${fmt(p.cost.avg_bits, 2)} bits`,
            `BOPs: ${fmt(p.cost.bops)} · latency: ${fmt(p.cost.latency_ms)} ms`,
            p.meets_budget ? "meets the budget" : "over the budget",
            `found: ${foundText(p)}${p.provenance && p.provenance.how ? ` (${p.provenance.how})` : ""}`,
          ];
          if (p.recommended) lines.push("★ recommended");
          tip.textContent = lines.join("\n");
          tip.classList.remove("hidden");
          const box = plot.getBoundingClientRect();
          const sx = box.width / W, sy = box.height / H;
          tip.style.left = Math.min(cx * sx + 12, box.width - 220) + "px";
          tip.style.top = Math.max(0, cy * sy - 10) + "px";
        });
        mk.addEventListener("mouseleave", () => tip.classList.add("hidden"));
        mk.addEventListener("click", () => select(p.id));
        plot.appendChild(mk);
        if (p.recommended) {
          plot.appendChild(svg("circle", { class: "rec-ring", cx, cy, r: 11, "data-recommended": p.id }));
        }
      }
      const legend = $("plot-legend");
      clear(legend);
      const methods = [...new Set(pts.map((p) => p.method))];
      for (const mth of methods) {
        const item = el("span");
        const sw = el("span", { class: "sw" });
        sw.style.background = METHOD_COLORS[mth] || "#555";
        item.appendChild(sw);
        item.appendChild(document.createTextNode(mth === "uniform" ? "uniform baselines" : mth));
        legend.appendChild(item);
      }
      legend.appendChild(el("span", {}, "◯ recommended (gold ring) · dashed red: budget · faded: off the front"));
      $("plot-note").textContent = `${pts.length} points`;
    }

    function parseGroup(name) {
      // "bert.encoder.layer.3.attention.self.query" -> row "3", column "attention.self.query"
      // "model.layers.2.self_attn/head5" -> row "2", column "self_attn/head5"
      const parts = name.split(".");
      for (let i = 0; i < parts.length; i++) {
        const head = parts[i].split("/")[0];
        if (/^\d+$/.test(head)) {
          const col = [parts[i].slice(head.length).replace(/^\//, "")].concat(parts.slice(i + 1)).filter(Boolean).join(".");
          return { row: head, col: col || name };
        }
      }
      return { row: "other", col: name };
    }

    function renderHeatmap() {
      const hm = $("heatmap");
      clear(hm);
      const p = pareto.points.find((q) => q.id === selected);
      if (!p) return;
      $("heatmap-title").textContent = `point #${p.id} ${p.label || p.method}`;
      const rows = [], cols = [], cells = {};
      for (const [name, opt] of Object.entries(p.precision_map)) {
        const g = parseGroup(name);
        if (!rows.includes(g.row)) rows.push(g.row);
        if (!cols.includes(g.col)) cols.push(g.col);
        cells[g.row + "\u0000" + g.col] = { name, opt };
      }
      rows.sort((a, b) => (a === "other") - (b === "other") || Number(a) - Number(b));
      const cw = Math.max(18, Math.min(48, Math.floor(800 / Math.max(cols.length, 1)))), ch = 20;
      const left = 64, top = 120;
      const W = left + cols.length * cw + 10, H = top + rows.length * ch + 10;
      hm.setAttribute("width", W); hm.setAttribute("height", H); hm.setAttribute("viewBox", `0 0 ${W} ${H}`);
      cols.forEach((c, j) => {
        const x = left + j * cw + cw / 2;
        hm.appendChild(svg("text", { x, y: top - 6, transform: `rotate(-55 ${x} ${top - 6})` }, c.length > 26 ? "…" + c.slice(-25) : c));
      });
      rows.forEach((r, i) => {
        hm.appendChild(svg("text", { x: left - 6, y: top + i * ch + 14, "text-anchor": "end" }, r === "other" ? "other" : "layer " + r));
        cols.forEach((c, j) => {
          const cell = cells[r + "\u0000" + c];
          if (!cell) return;
          const bits = cell.opt.bits;
          const rect = svg("rect", {
            x: left + j * cw + 1, y: top + i * ch + 1, width: cw - 2, height: ch - 2,
            fill: BIT_COLORS[bits] || "#999", class: "cell", "data-group": cell.name, "data-bits": bits,
          });
          const group = cell.opt.group_size ? `, a scale per ${cell.opt.group_size} columns` : "";
          rect.appendChild(svg("title", {}, `${cell.name}: ${bits === 0 ? "pruned" : bits + " bits"}${cell.opt.symmetric ? "" : " (asymmetric)"}${group}`));
          hm.appendChild(rect);
          if (cw >= 22) hm.appendChild(svg("text", { x: left + j * cw + cw / 2, y: top + i * ch + 14, "text-anchor": "middle", fill: bits >= 16 || bits <= 3 ? "#fff" : "#222" }, bits === 0 ? "×" : bits + (cell.opt.group_size ? "g" : "")));
        });
      });
      const legend = $("heatmap-legend");
      clear(legend);
      for (const b of [0, 2, 3, 4, 5, 6, 8, 16, 32]) {
        const item = el("span");
        const sw = el("span", { class: "sw" });
        sw.style.background = BIT_COLORS[b];
        item.appendChild(sw);
        item.appendChild(document.createTextNode(b === 0 ? "pruned" : b + " bits"));
        legend.appendChild(item);
      }
    }

    $("cost-select").addEventListener("change", () => { if (pareto) renderPlot(); });
    setupLogin(load);
    load();
  }

  document.addEventListener("DOMContentLoaded", () => {
    loginNote = takeTokenFromUrl();
    const page = document.body.getAttribute("data-page");
    if (page === "index") indexPage(); else if (page === "job") jobPage();
  });
})();
