// The Comox fleet page: reads /dashboard/events (server-sent events) and draws
// the fleet. No library, nothing loaded from elsewhere; text goes into the page
// as text nodes only.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const SVG_TAGS = new Set(["svg", "polyline", "line", "rect", "circle", "title"]);
  const body = document.body;
  const series = new Map(); // backend name -> [{t, state, inflight, latency, ttft, tps}]
  let historyS = 300;
  let intervalS = 1;
  let events = [];
  let lastMessage = 0;
  let signedOut = false;

  function h(tag, attrs, ...children) {
    const el = SVG_TAGS.has(tag) ? document.createElementNS(SVG, tag) : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  const num = (v, digits = 1) => (v === null || v === undefined ? "–" : v >= 100 ? Math.round(v).toString() : v.toFixed(digits));
  const ms = (v) => (v === null || v === undefined ? "–" : `${num(v)} ms`);
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  const usd = (v) => (v === null || v === undefined ? "no limit" : `$${v.toFixed(v < 1 ? 4 : 2)}`);

  // -- the data --------------------------------------------------------------

  function apply(msg) {
    historyS = msg.history_s;
    intervalS = msg.interval_s;
    if (msg.reset) {
      series.clear();
      events = [];
    }
    for (const sample of msg.samples) {
      for (const [name, [state, inflight, latency, ttft, tps]] of Object.entries(sample.b)) {
        if (!series.has(name)) series.set(name, []);
        series.get(name).push({ t: sample.t, state, inflight, latency, ttft, tps });
      }
    }
    const since = msg.now - historyS;
    for (const [name, points] of series) {
      const kept = points.filter((p) => p.t >= since);
      if (kept.length) series.set(name, kept);
      else series.delete(name);
    }
    events = msg.events.slice().reverse().concat(events).slice(0, 50);
    render(msg);
  }

  // -- charts ------------------------------------------------------------------

  function spark(label, points, key, now, format) {
    const W = 300;
    const H = 40;
    const start = now - historyS;
    let max = 0;
    let seen = false;
    for (const p of points) {
      if (p[key] === null || p[key] === undefined) continue;
      seen = true;
      if (p[key] > max) max = p[key];
    }
    const scale = max > 0 ? max : 1;
    const svg = h("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", class: "spark", role: "img",
      "aria-label": `${label} over the last ${Math.round(historyS / 60)} minutes; ${seen ? `highest ${format(max)}` : "no data"}` });
    svg.append(h("line", { x1: 0, y1: H - 0.5, x2: W, y2: H - 0.5, class: "axis" }));
    let run = [];
    const flush = () => {
      if (run.length === 1) svg.append(h("circle", { cx: run[0][0], cy: run[0][1], r: 1.5, class: "dot" }));
      else if (run.length > 1) svg.append(h("polyline", { points: run.map((xy) => xy.join(",")).join(" "), class: "line" }));
      run = [];
    };
    for (const p of points) {
      if (p[key] === null || p[key] === undefined) { flush(); continue; }
      const x = Math.max(0, ((p.t - start) / historyS) * W);
      run.push([x.toFixed(1), (H - 2 - (p[key] / scale) * (H - 6)).toFixed(1)]);
    }
    flush();
    return h("figure", { class: "chart" },
      h("figcaption", {}, h("span", {}, label), h("span", { class: "muted" }, seen ? `max ${format(max)}` : "no data")), svg);
  }

  function stateStrip(points, now) {
    const W = 300;
    const start = now - historyS;
    const svg = h("svg", { viewBox: `0 0 ${W} 8`, preserveAspectRatio: "none", class: "strip", role: "img",
      "aria-label": `state over the last ${Math.round(historyS / 60)} minutes` });
    for (let i = 0; i < points.length;) {
      let j = i;
      while (j + 1 < points.length && points[j + 1].state === points[i].state) j++;
      const from = Math.max(0, ((points[i].t - intervalS - start) / historyS) * W);
      const to = ((points[j].t - start) / historyS) * W;
      svg.append(h("rect", { x: from.toFixed(1), y: 0, width: Math.max(1, to - from).toFixed(1), height: 8, class: `st-${points[i].state}` },
        h("title", {}, `${points[i].state} ${clock(points[i].t)}–${clock(points[j].t)}`)));
      i = j + 1;
    }
    return h("figure", { class: "chart" },
      h("figcaption", {}, h("span", {}, "State"), h("span", { class: "muted" }, `last ${Math.round(historyS / 60)} min`)), svg);
  }

  // -- the page ----------------------------------------------------------------

  function lastOf(points, key) {
    for (let i = points.length - 1; i >= 0; i--) if (points[i][key] !== null && points[i][key] !== undefined) return points[i][key];
    return null;
  }

  function stat(label, value, attrs) {
    return h("div", {}, h("dt", {}, label), h("dd", attrs || {}, value));
  }

  function backendCard(b, now) {
    const points = series.get(b.name) || [];
    const stats = h("dl", { class: "stats" },
      stat("In flight", b.max_concurrency ? `${b.inflight} / ${b.max_concurrency}` : String(b.inflight), { "data-field": "inflight" }),
      stat("Latency (EWMA)", ms(b.ewma_latency_ms), { "data-field": "latency" }),
      stat("Time to first token", ms(lastOf(points, "ttft")), { "data-field": "ttft" }),
      stat("Tokens/s", num(b.decode_tokens_per_s), { "data-field": "tps" }),
      stat("Requests", String(b.requests)),
      stat("Failures", String(b.failures)),
      stat("Ejections", String(b.ejections), { "data-field": "ejections" }));
    if (b.ejected_for_s > 0) stats.append(stat("Back in", `${Math.ceil(b.ejected_for_s)} s`));
    return h("article", { class: "backend", "data-backend": b.name, "data-state": b.state },
      h("header", {},
        h("h3", {}, b.name),
        h("span", { class: "type" }, b.type),
        h("span", { class: `badge st-${b.state}`, "data-field": "state" }, b.state)),
      stats,
      b.last_error ? h("p", { class: "error" }, `Last error: ${b.last_error}`) : null,
      h("div", { class: "charts" },
        stateStrip(points, now),
        spark("In flight", points, "inflight", now, (v) => num(v, 0)),
        spark("Latency", points, "latency", now, ms),
        spark("Time to first token", points, "ttft", now, ms)));
  }

  function groupSection(g, now) {
    const total = g.backends.length;
    return h("section", { class: "group", "data-group": g.name },
      h("header", {},
        h("h2", {}, g.name),
        h("span", { class: "muted" }, `${g.policy || ""} · ${g.available ?? "?"} of ${total} in rotation`
          + (g.queued ? ` · ${g.queued} queued` : "")),
        g.panic ? h("span", { class: "badge st-ejected" }, "panic: routing to all") : null),
      h("div", { class: "backends" }, g.backends.map((b) => backendCard(b, now))));
  }

  function spendTable(spend) {
    const rows = spend.budgets.map((b) => {
      const used = (b.spent_usd || 0) + (b.reserved_usd || 0);
      const name = b.budget === "key" ? `key ${b.key_id}` : b.budget;
      return h("tr", {},
        h("th", { scope: "row" }, name, h("div", { class: "muted" }, b.period)),
        h("td", {}, usd(b.spent_usd)),
        h("td", {}, usd(b.reserved_usd)),
        h("td", {}, usd(b.limit_usd),
          b.limit_usd ? h("meter", { min: 0, max: b.limit_usd, high: b.limit_usd * 0.8, value: Math.min(used, b.limit_usd) }) : null));
    });
    return h("table", { class: "spend" },
      h("thead", {}, h("tr", {}, h("th", {}, "Budget"), h("th", {}, "Spent"), h("th", {}, "Reserved"), h("th", {}, "Limit"))),
      h("tbody", {}, rows));
  }

  function eventItem(e) {
    return h("li", { class: `level-${e.level}`, "data-event": e.event },
      h("time", {}, clock(e.t)), h("span", { class: "event-name" }, e.event), h("span", {}, e.message));
  }

  let shownSpend = "";

  function render(msg) {
    document.getElementById("groups").replaceChildren(...msg.groups.map((g) => groupSection(g, msg.now)));
    const spend = JSON.stringify(msg.spend);
    if (spend !== shownSpend) { // redrawn only when it changed, so a selection there stays
      shownSpend = spend;
      document.getElementById("spend-panel").hidden = !msg.spend;
      document.getElementById("spend").replaceChildren(msg.spend ? spendTable(msg.spend) : "");
    }
    if (msg.reset || msg.events.length) {
      const list = document.getElementById("events");
      list.replaceChildren(...(events.length ? events.map(eventItem) : [h("li", { class: "muted" }, "None yet.")]));
    }
  }

  // -- the stream --------------------------------------------------------------

  const status = document.getElementById("status");

  function showStatus() {
    if (signedOut) return;
    const age = Date.now() / 1000 - lastMessage;
    const live = lastMessage && age < 5;
    status.dataset.live = live ? "live" : "stale";
    status.textContent = live ? `live · ${clock(lastMessage)}` : lastMessage ? "reconnecting…" : "connecting…";
  }

  const source = new EventSource(body.dataset.events);
  source.onmessage = (event) => {
    lastMessage = Date.now() / 1000;
    apply(JSON.parse(event.data));
    showStatus();
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) { // refused: the session ended
      signedOut = true;
      status.dataset.live = "out";
      status.replaceChildren("signed out · ", h("a", { href: body.dataset.login }, "log in"));
    }
  };
  setInterval(showStatus, 1000);
})();
