/* Postbus BI dashboard (docs/dashboard.md). No build step; Chart.js is vendored next to this file.
 *
 * The token (admin token, BI principal token with bi:read, or a tenant API key) is kept in this tab's
 * sessionStorage only. `#token=...` in the URL fragment is accepted too (a fragment is never sent to
 * the server) and removed from the address bar as soon as it is read. Everything the API returns is
 * written with textContent or drawn on a canvas: tenant-chosen names never become markup. */
(function () {
  "use strict";

  var API = "/api/v1/bi/metrics";
  var STORE_KEY = "postbus.dashboard.token";
  var COUNTS = ["sent", "delivered", "bounced", "complained", "opened", "clicked", "deferred", "errors"];
  var RATES = ["delivery_rate", "bounce_rate", "complaint_rate", "open_rate", "click_rate"];
  // distinct messages (docs/bi.md): asked of the totals query only; the grouped queries show events
  var DISTINCT_COUNTS = ["messages_sent", "messages_delivered", "messages_bounced", "messages_complained",
                         "unique_opens", "unique_clicks"];
  var DISTINCT_RATES = ["message_delivery_rate", "message_bounce_rate", "message_complaint_rate",
                        "unique_open_rate", "unique_click_rate"];
  var GROUPS = ["tenant", "domain", "provider", "campaign"];
  var COLORS = { sent: "#3b6ea5", delivered: "#2e8b57", bounced: "#c0392b" };

  var state = { charts: {}, responses: {}, query: null, error: null, generation: 0 };
  window.postbusDashboard = state;

  function $(id) { return document.getElementById(id); }

  function setState(s) { document.body.setAttribute("data-state", s); }

  function showError(msg) {
    var el = $("error");
    el.textContent = msg;
    el.hidden = false;
    state.error = msg;
  }

  function clearError() {
    var el = $("error");
    el.textContent = "";
    el.hidden = true;
    state.error = null;
  }

  function readFragment() {
    var hash = window.location.hash.replace(/^#/, "");
    if (!hash) { return; }
    var params = new URLSearchParams(hash);
    var token = params.get("token");
    if (token) { sessionStorage.setItem(STORE_KEY, token); }
    if (params.get("window")) { $("window").value = params.get("window"); }
    if (params.get("bucket")) { $("bucket").value = params.get("bucket"); }
    if (params.get("tenant")) { $("tenant").value = params.get("tenant"); }
    params.delete("token");
    var rest = params.toString();
    // the token leaves the address bar (and the history entry) at once
    history.replaceState(null, "", window.location.pathname + window.location.search + (rest ? "#" + rest : ""));
  }

  function token() { return sessionStorage.getItem(STORE_KEY) || ""; }

  function keyLabel(key) {  // an empty group key: mail without that attribute (e.g. not from a campaign)
    var k = key === undefined || key === null ? "" : String(key);
    return k === "" ? "(none)" : k;
  }

  function fmtInt(n) { return String(n === undefined || n === null ? 0 : n); }

  function fmtRate(r) {
    if (r === undefined || r === null || isNaN(r)) { return "–"; }
    return (Number(r) * 100).toFixed(2) + "%";
  }

  function bucketLabel(ts, bucket) {
    var iso = new Date(ts * 1000).toISOString();  // UTC, like the API's buckets
    return bucket === "day" ? iso.slice(0, 10) : iso.slice(5, 10) + " " + iso.slice(11, 16);
  }

  function query(groupBy) {
    var q = state.query;
    var params = new URLSearchParams({ from_ts: String(q.from_ts), to_ts: String(q.to_ts), bucket: q.bucket });
    // the grouped panels show event counts: no distinct figures asked (a cheaper query)
    if (groupBy) { params.set("group_by", groupBy); params.set("top", "10"); params.set("distinct", "false"); }
    if (q.tenant_id) { params.set("tenant_id", q.tenant_id); }
    return API + "?" + params.toString();
  }

  function apiError(status, body) {
    var err = body && body.error;
    var message = err && (err.message || err.code);
    if (status === 401) { return "The token was not accepted: " + (message || "unauthorized"); }
    if (status === 403) { return "Not allowed: " + (message || "forbidden"); }
    if (status === 503) { return "Metrics are temporarily unavailable; try again shortly."; }
    return "The metrics API answered " + status + (message ? ": " + message : "");
  }

  function fetchJson(url) {
    return fetch(url, {
      headers: { "Authorization": "Bearer " + token(), "Accept": "application/json" },
      credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer"
    }).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (body) {
        if (!r.ok || !body || body.success !== true) {
          var e = new Error(apiError(r.status, body));
          e.status = r.status;
          throw e;
        }
        return body.data;
      });
    });
  }

  function chart(id, config) {
    if (state.charts[id]) { state.charts[id].destroy(); }
    config.options = Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, config.options);
    state.charts[id] = new window.Chart($(id), config);
    return state.charts[id];
  }

  function renderTotals(data) {
    var t = data.totals || {};
    COUNTS.forEach(function (k) { $("total-" + k).textContent = fmtInt(t[k]); });
    RATES.forEach(function (k) { $("rate-" + k).textContent = fmtRate(t[k]); });
    DISTINCT_COUNTS.forEach(function (k) { $("total-" + k).textContent = k in t ? fmtInt(t[k]) : "\u2013"; });
    DISTINCT_RATES.forEach(function (k) { $("rate-" + k).textContent = fmtRate(t[k]); });
  }

  function renderVolume(data) {
    var series = data.series || [];
    chart("chart-volume", {
      type: "line",
      data: {
        labels: series.map(function (p) { return bucketLabel(p.ts, data.bucket); }),
        datasets: ["sent", "delivered", "bounced"].map(function (k) {
          return { label: k, data: series.map(function (p) { return p[k] || 0; }),
                   borderColor: COLORS[k], backgroundColor: COLORS[k], tension: 0.2, pointRadius: 3 };
        })
      },
      options: { scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } }
    });
  }

  function renderBars(id, groups) {
    chart(id, {
      type: "bar",
      data: {
        labels: groups.map(function (g) { return keyLabel(g.key); }),
        datasets: ["sent", "delivered", "bounced"].map(function (k) {
          return { label: k, data: groups.map(function (g) { return g[k] || 0; }), backgroundColor: COLORS[k] };
        })
      },
      options: { indexAxis: "y", scales: { x: { beginAtZero: true, ticks: { precision: 0 } } } }
    });
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }

  function emptyRow(tbody, cols, text) {
    var tr = document.createElement("tr");
    var td = cell(tr, text, "empty");
    td.colSpan = cols;
    tbody.appendChild(tr);
  }

  function renderReputation(kind, groups) {
    var tbody = $("table-" + kind).querySelector("tbody");
    tbody.replaceChildren();
    if (!groups.length) { emptyRow(tbody, 6, "no mail in this window"); return; }
    groups.forEach(function (g) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-key", String(g.key));
      cell(tr, keyLabel(g.key), "key");
      cell(tr, fmtInt(g.sent), "num");
      cell(tr, fmtRate(g.delivery_rate), "num");
      cell(tr, fmtRate(g.bounce_rate), "num");
      cell(tr, fmtRate(g.complaint_rate), "num");
      var band = String(g.reputation_band || "");
      cell(tr, band.replace("_", " "), "band band-" + band.replace(/[^a-z_]/g, ""));
      tbody.appendChild(tr);
    });
  }

  function renderCampaigns(groups) {
    var tbody = $("table-campaign").querySelector("tbody");
    tbody.replaceChildren();
    if (!groups.length) { emptyRow(tbody, 7, "no campaign mail in this window"); return; }
    groups.forEach(function (g) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-key", String(g.key));
      cell(tr, keyLabel(g.key), "key");
      ["sent", "delivered", "bounced", "opened", "clicked"].forEach(function (k) { cell(tr, fmtInt(g[k]), "num"); });
      var td = cell(tr, "", "progress");
      var bar = document.createElement("progress");
      bar.max = Math.max(1, g.sent || 0);
      bar.value = g.delivered || 0;
      td.appendChild(bar);
      var pct = document.createElement("span");
      pct.textContent = " " + fmtRate(g.sent ? (g.delivered || 0) / g.sent : 0);
      td.appendChild(pct);
      tbody.appendChild(tr);
    });
  }

  function groupFailed(kind, err) {
    var id = { tenant: "table-tenant", domain: "table-domain", campaign: "table-campaign" }[kind];
    if (id) {
      var tbody = $(id).querySelector("tbody");
      tbody.replaceChildren();
      emptyRow(tbody, 7, err.message);
    }
  }

  function clearAll() {  // nothing of a previous answer stays on screen (it may be another token's)
    COUNTS.concat(DISTINCT_COUNTS).forEach(function (k) { $("total-" + k).textContent = "\u2013"; });
    RATES.concat(DISTINCT_RATES).forEach(function (k) { $("rate-" + k).textContent = "\u2013"; });
    Object.keys(state.charts).forEach(function (id) { state.charts[id].destroy(); delete state.charts[id]; });
    ["tenant", "domain", "campaign"].forEach(function (k) { $("table-" + k).querySelector("tbody").replaceChildren(); });
    state.responses = {};
  }

  function load() {
    clearError();
    clearAll();
    if (!token()) {
      setState("idle");
      $("status").textContent = "Enter a token to see the metrics.";
      return Promise.resolve();
    }
    var generation = ++state.generation;
    var now = Math.floor(Date.now() / 1000);
    state.query = {
      from_ts: now - parseInt($("window").value, 10), to_ts: now, bucket: $("bucket").value,
      tenant_id: $("tenant").value.trim() || null
    };
    setState("loading");
    $("status").textContent = "Loading…";
    var base = fetchJson(query(null));
    var groups = GROUPS.map(function (g) {
      return fetchJson(query(g)).then(function (d) { return { kind: g, data: d }; },
                                      function (e) { return { kind: g, error: e }; });
    });
    return base.then(function (data) {
      if (generation !== state.generation) { return; }
      state.responses.totals = data;
      renderTotals(data);
      renderVolume(data);
      return Promise.all(groups).then(function (results) {
        if (generation !== state.generation) { return; }
        results.forEach(function (r) {
          if (r.error) { groupFailed(r.kind, r.error); state.responses[r.kind] = null; return; }
          state.responses[r.kind] = r.data;
          var gs = r.data.groups || [];
          if (r.kind === "provider") { renderBars("chart-providers", gs); }
          if (r.kind === "domain") { renderBars("chart-domains", gs); renderReputation("domain", gs); }
          if (r.kind === "tenant") { renderReputation("tenant", gs); }
          if (r.kind === "campaign") { renderCampaigns(gs); }
        });
        $("status").textContent = "From " + new Date(state.query.from_ts * 1000).toISOString() + " to " +
          new Date(state.query.to_ts * 1000).toISOString() + (state.query.tenant_id ? ", tenant " + state.query.tenant_id : "");
        setState("ready");
      });
    }).catch(function (e) {
      if (generation !== state.generation) { return; }
      if (e.status === 401) { sessionStorage.removeItem(STORE_KEY); $("token").value = ""; }
      showError(e.message || "The metrics could not be loaded.");
      $("status").textContent = "";
      setState("error");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    readFragment();
    $("token").value = token();
    $("controls").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var t = $("token").value.trim();
      if (t) { sessionStorage.setItem(STORE_KEY, t); }
      load();
    });
    $("forget").addEventListener("click", function () {
      sessionStorage.removeItem(STORE_KEY);
      $("token").value = "";
      load();
    });
    load();
  });
}());
