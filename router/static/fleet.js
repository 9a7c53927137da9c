// kvroute's fleet page: polls /admin/overview and draws it. No framework, no build.
// Everything the server sends is written with textContent (via el()), never as HTML:
// endpoint ids and model names come from config files and Consul.
"use strict";

(() => {
  const KEY = "kvroute-admin-token";
  const REFRESH_MS = 2000;
  const $ = (id) => document.getElementById(id);

  let lastOkAt = null; // Date.now() of the last good snapshot
  let paused = false;
  let needLogin = false;
  let running = false;
  let again = false;
  let timer = null;

  const token = () => sessionStorage.getItem(KEY);

  // -- DOM helpers: text only ---------------------------------------------------------

  function el(tag, opts, ...children) {
    const e = document.createElement(tag);
    if (opts) {
      if (opts.cls) e.className = opts.cls;
      if (opts.title) e.title = opts.title;
      if (opts.data) for (const [k, v] of Object.entries(opts.data)) e.dataset[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : String(c)); // a string becomes a text node
    }
    return e;
  }

  const badge = (text, kind, title) => el("span", { cls: "badge " + kind, title }, text);
  const dash = "\u2013";

  function meter(value, low, high) {
    const m = document.createElement("meter");
    m.min = 0;
    m.max = 1;
    m.value = value;
    if (low !== undefined) m.low = low;
    if (high !== undefined) m.high = high;
    m.optimum = 0;
    return m;
  }

  function pct(x) {
    return x === null || x === undefined ? dash : (100 * x).toFixed(x < 0.1 && x > 0 ? 1 : 0) + "%";
  }

  function secs(x) {
    if (x === null || x === undefined) return dash;
    return x < 1 ? (1000 * x).toFixed(x < 0.01 ? 1 : 0) + " ms" : x.toFixed(2) + " s";
  }

  function num(x) {
    if (x === null || x === undefined) return dash;
    return Number.isInteger(x) ? x.toLocaleString("en-US") : x.toFixed(1);
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return dash;
    const s = Math.max(0, Math.round(seconds));
    if (s < 90) return s + "s ago";
    if (s < 5400) return Math.round(s / 60) + "m ago";
    return Math.round(s / 3600) + "h ago";
  }

  // -- talking to /admin ----------------------------------------------------------------

  async function api(path, method = "GET") {
    const headers = {};
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const r = await fetch(path, { method, headers, cache: "no-store", credentials: "omit" });
    let body = null;
    try {
      body = await r.json();
    } catch (_) {
      body = null;
    }
    if (!r.ok) {
      const message = body && body.error ? body.error.message : r.statusText;
      const err = new Error(`${method} ${path}: HTTP ${r.status}: ${message}`);
      err.status = r.status;
      throw err;
    }
    return body;
  }

  function banner(text) {
    const b = $("banner");
    b.textContent = text || "";
    b.hidden = !text;
  }

  function clearFleet() {
    $("fleet").hidden = true;
    $("endpoints").tBodies[0].replaceChildren();
    $("models").replaceChildren();
    $("reload").replaceChildren();
    $("discovery").replaceChildren();
    $("summary").replaceChildren();
    lastOkAt = null;
  }

  function showLogin(message) {
    needLogin = true;
    clearFleet();
    $("login").hidden = false;
    $("forget").hidden = !token();
    banner(message);
    $("token").focus();
  }

  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    clearTimeout(timer);
    try {
      const data = await api("/admin/overview");
      needLogin = false;
      lastOkAt = Date.now();
      banner(null);
      $("login").hidden = true;
      $("forget").hidden = !token();
      render(data);
      $("fleet").hidden = false;
    } catch (err) {
      if (err.status === 401) {
        showLogin(
          token()
            ? "The admin token was refused (HTTP 401). Enter the router's admin token."
            : "This router's admin API needs its token (HTTP 401).",
        );
      } else {
        const stale = lastOkAt ? ` Showing the snapshot from ${ago((Date.now() - lastOkAt) / 1000)}.` : "";
        banner(`Refresh failed: ${err.message}.${stale}`);
      }
    } finally {
      running = false;
      tick();
      if (again) {
        again = false;
        refresh();
      } else if (!paused && !needLogin) {
        timer = setTimeout(refresh, REFRESH_MS);
      }
    }
  }

  function tick() {
    const u = $("updated");
    if (paused) u.textContent = "paused";
    else if (lastOkAt === null) u.textContent = needLogin ? "waiting for the token" : "not loaded yet";
    else u.textContent = "updated " + ago((Date.now() - lastOkAt) / 1000);
    u.classList.toggle("stale", lastOkAt !== null && Date.now() - lastOkAt > 3 * REFRESH_MS);
  }

  async function setDrained(id, drain, button) {
    button.disabled = true;
    try {
      await api(`/admin/endpoints/${encodeURIComponent(id)}/${drain ? "drain" : "undrain"}`, "POST");
    } catch (err) {
      banner(`${drain ? "Drain" : "Undrain"} failed: ${err.message}`);
    }
    refresh();
  }

  // -- drawing ----------------------------------------------------------------------------

  function render(data) {
    renderSummary(data);
    renderEndpoints(data);
    renderModels(data);
    renderReload(data);
    renderDiscovery(data);
  }

  function renderSummary(data) {
    const eps = data.endpoints;
    const up = eps.filter((e) => e.available).length;
    const draining = eps.filter((e) => e.draining).length;
    const inFlight = eps.reduce((s, e) => s + e.in_flight, 0);
    const item = (label, value) => el("span", null, label + " ", el("b", null, value));
    $("summary").replaceChildren(
      item("router", data.instance),
      item("endpoints up", `${up}/${eps.length}`),
      item("draining", draining),
      item("in flight", inFlight),
      item("models", data.models.length),
    );
  }

  function status(e) {
    if (e.draining) return badge("draining", "warn", "takes no new requests; those in flight finish");
    if (!e.healthy) return badge("unhealthy", "bad", "failing its health probes");
    if (e.cooldown_s > 0) return badge(`cooldown ${Math.ceil(e.cooldown_s)}s`, "warn");
    if (e.available) return badge("up", "ok");
    return badge("unavailable", "bad");
  }

  function circuit(c) {
    const kind = { closed: "mute", open: "bad", half_open: "warn" }[c.state] || "mute";
    return badge(c.state.replace("_", "-"), kind, `${c.failures} failures in a row`);
  }

  function indexCell(e) {
    const sources = [...new Set(Object.values(e.index_sources))];
    if (!sources.length) return dash;
    const title = Object.entries(e.index_sources)
      .map(([m, s]) => `${m}: ${s}`)
      .concat(e.kv_events && e.kv_events.stale ? [`events stale: ${e.kv_events.stale_reason}`] : [])
      .join("\n");
    const kind = { precise: "ok", approximate: "mute", stale: "warn" };
    const span = el("span");
    for (const s of sources) span.append(badge(s, kind[s] || "mute", title), " ");
    return span;
  }

  function renderEndpoints(data) {
    const rows = data.endpoints.map((e) => {
      const src = e.source && e.source.kind !== "static" ? `${e.source.kind}:${e.source.service}` : null;
      const kv = e.load.kv_usage;
      const kvTitle = e.load.kv_capacity_tokens ? `${num(e.load.kv_capacity_tokens)} tokens` : undefined;
      const kvCell =
        kv === null
          ? el("span", { cls: "dim", title: "not scraped" }, dash)
          : el("span", { cls: "bar", title: kvTitle }, meter(kv, 0.7, 0.9), pct(kv));
      const lat = e.latency || {};
      const button = el(
        "button",
        { cls: e.draining ? "undrain" : "drain", data: { action: e.draining ? "undrain" : "drain" } },
        e.draining ? "Undrain" : "Drain",
      );
      button.type = "button";
      button.addEventListener("click", () => setDrained(e.id, !e.draining, button));
      return el(
        "tr",
        { cls: e.available ? "" : "off", data: { endpoint: e.id } },
        el("td", { title: e.url }, el("span", { cls: "mono" }, e.id), src ? el("div", { cls: "dim" }, src) : null),
        el("td", null, e.kind),
        el("td", null, Object.keys(e.models).join(", ")),
        el("td", { cls: "status" }, status(e)),
        el("td", null, circuit(e.circuit)),
        el("td", { cls: "num" }, e.in_flight),
        el("td", { cls: "num" }, num(e.load.running)),
        el("td", { cls: "num" }, num(e.load.waiting)),
        el("td", null, kvCell),
        el("td", { cls: "num" }, secs(lat.ttft_s)),
        el("td", { cls: "num" }, secs(lat.duration_s)),
        el("td", null, indexCell(e)),
        el("td", { cls: "err", title: e.last_error || "" }, e.last_error || ""),
        el("td", null, button),
      );
    });
    $("endpoints").tBodies[0].replaceChildren(...rows);
  }

  function renderModels(data) {
    const cards = data.models.map((m) => {
      const requests = Object.values(m.requests).reduce((s, n) => s + n, 0);
      const errors = Object.entries(m.requests)
        .filter(([status]) => Number(status) >= 500)
        .reduce((s, [, n]) => s + n, 0);
      const decided = Object.values(m.decisions).reduce((s, n) => s + n, 0);
      const match = m.prefix_match;
      const share = m.tokens.cached_share;
      const facts = el(
        "dl",
        { cls: "facts" },
        el("dt", null, "policy"),
        el("dd", null, badge(m.policy, "info")),
        el("dt", null, "endpoints"),
        el("dd", null, `${m.available} of ${m.endpoints.length} available`),
        el("dt", null, "requests"),
        el("dd", { cls: "requests" }, `${num(requests)} answered, ${num(errors)} 5xx`),
        el("dt", null, "prefix match"),
        el(
          "dd",
          { cls: "bar match" },
          match ? meter(match.mean) : null,
          match ? `${pct(match.mean)} of the prompt, mean of ${num(match.decisions)}` : dash,
        ),
        el("dt", null, "cached tokens"),
        el(
          "dd",
          { cls: "bar cached" },
          share === null ? null : meter(share),
          share === null
            ? dash
            : `${pct(share)} (${num(m.tokens.cached)} of ${num(m.tokens.prompt)} prompt tokens)`,
        ),
      );
      const reasons = el("table", { cls: "reasons" });
      for (const [reason, n] of Object.entries(m.decisions).sort((a, b) => b[1] - a[1])) {
        reasons.append(
          el(
            "tr",
            { data: { reason } },
            el("td", { cls: "mono" }, reason),
            el("td", null, meter(decided ? n / decided : 0)),
            el("td", { cls: "num" }, num(n)),
            el("td", { cls: "num dim" }, pct(decided ? n / decided : 0)),
          ),
        );
      }
      const aliases = m.aliases.length ? el("span", { cls: "dim" }, " (also " + m.aliases.join(", ") + ")") : null;
      return el(
        "div",
        { cls: "card", data: { model: m.model } },
        el("h3", null, m.model, aliases),
        facts,
        el("div", { cls: "dim" }, decided ? "decisions by reason" : "no decisions yet"),
        reasons,
      );
    });
    $("models").replaceChildren(...cards);
  }

  function renderReload(data) {
    const r = data.reload;
    const items = [
      ["config file", r.path ? el("span", { cls: "mono" }, r.path) : "none (built in, or not from a file)"],
      ["watched", r.watch && r.path ? "yes (file changes reload it)" : "no"],
      ["loaded", r.last_success ? ago(data.time - r.last_success) : dash],
    ];
    if (r.last_error && r.last_error.length) {
      const list = el("ul", { cls: "errors" });
      for (const line of r.last_error) list.append(el("li", null, line));
      items.push(["last reload", el("div", null, badge("failed " + ago(data.time - r.last_error_at), "bad"), list)]);
    } else {
      items.push(["last reload", badge("ok", "ok")]);
    }
    $("reload").replaceChildren(...items.flatMap(([k, v]) => [el("dt", null, k), el("dd", null, v)]));
  }

  function renderDiscovery(data) {
    const sources = Object.entries(data.discovery);
    if (!sources.length) {
      $("discovery").replaceChildren(el("p", { cls: "dim" }, "Static endpoints only: no discovery configured."));
      return;
    }
    const parts = [];
    for (const [name, s] of sources) {
      const up = s.up === true ? badge("up", "ok") : s.up === false ? badge("down", "bad") : badge("starting", "mute");
      parts.push(el("h3", { data: { source: name } }, name, " ", up));
      const table = el(
        "table",
        null,
        el("tr", null, el("th", null, "service"), el("th", { cls: "num" }, "endpoints"), el("th", { cls: "num" }, "index"), el("th", null, "last error")),
      );
      for (const [service, st] of Object.entries(s.services || {})) {
        table.append(
          el(
            "tr",
            null,
            el("td", { cls: "mono" }, service),
            el("td", { cls: "num" }, num(st.endpoints)),
            el("td", { cls: "num" }, num(st.index)),
            el("td", { cls: "err", title: st.last_error || "" }, st.last_error || ""),
          ),
        );
      }
      parts.push(table);
    }
    $("discovery").replaceChildren(...parts);
  }

  // -- wiring -----------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      $("token").value = "";
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      needLogin = false;
      banner(null);
      refresh();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      clearTimeout(timer);
      showLogin("Token forgotten.");
    });
    $("pause").addEventListener("click", () => {
      paused = !paused;
      $("pause").textContent = paused ? "Resume" : "Pause";
      if (paused) clearTimeout(timer);
      else refresh();
      tick();
    });
    setInterval(tick, 1000);
    refresh();
  });
})();
