// The live dashboard: polls dashboard/state.json once a second (engine, workers, rings, PAS,
// throughput, upstreams, cache) and draws the broadcast's tokens from the browser feed (/v1/feed).
// Plain JS, no framework, nothing fetched from another host (docs/observability.md).
"use strict";

const POLL_MS = 1000;
const KEY_ITEM = "neuralpipe.dashboard.key";
const TOKEN = 2; // a token row's `kind` (shm/batch.py Kind.TOKEN)
const HISTORY_MAX = 600; // chart points kept (10 min at one a second)
const CHART_SPAN_S = [60, 300]; // the charts show the history they have: at least 1, at most 5 min
const GAP_S = 5; // a longer pause between points breaks a chart's line
const FADE_EVERY_MS = 100;
const FADE = Math.exp(-FADE_EVERY_MS / 2000); // a token's brightness halves in ~1.4 s
const TICKER_TOKENS = 80;
const PAS_SERIES = [
  ["pas", "PAS", "#ffffff", 2],
  ["integrity", "integrity", "#5fa8e0", 1],
  ["stability", "stability", "#5fbf77", 1],
  ["symmetry", "symmetry", "#c98ae0", 1],
  ["consistency", "consistency", "#e0b44c", 1],
];
const RATE_SERIES = [
  ["tokens_per_s", "tokens/s", "#5fa8e0", 2, "left", (v) => fmtNumber(v)],
  ["p99_s", "p99 latency", "#e0605c", 1, "right", (v) => fmtSeconds(v)],
];

const $ = (id) => document.getElementById(id);
const dash = { key: null, since: 0, history: [], fields: null, polling: false, feed: null, feedRetryMs: 1000 };

// ---- credentials --------------------------------------------------------------------------

function loadKey() {
  // A link may carry the key in its fragment (#key=...): never sent to a server; dropped at once.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("key")) {
    sessionStorage.setItem(KEY_ITEM, fragment.get("key"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  dash.key = sessionStorage.getItem(KEY_ITEM);
}

function askForKey(why) {
  dash.key = null;
  sessionStorage.removeItem(KEY_ITEM);
  closeFeed();
  $("board").hidden = true;
  $("login").hidden = false;
  $("login-why").textContent = why;
  $("engine").textContent = "a key is needed";
  $("login-key").focus();
}

function onLogin(event) {
  event.preventDefault();
  const key = $("login-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  dash.key = key;
  $("login-key").value = "";
  $("login").hidden = true;
  poll();
}

// ---- polling ------------------------------------------------------------------------------

async function poll() {
  if (dash.polling) return;
  dash.polling = true;
  let again = true;
  try {
    const headers = dash.key ? { Authorization: "Bearer " + dash.key } : {};
    const answer = await fetch("dashboard/state.json?since=" + dash.since, { headers, cache: "no-store" });
    if (answer.status === 401 || answer.status === 403) {
      const body = await answer.json().catch(() => ({}));
      const why = (body.error && body.error.message) || answer.status;
      askForKey(dash.key ? `The gateway refused the key: ${why}` : "An API key or JWT of this gateway (the same as for /v1).");
      again = false;
      return;
    }
    if (!answer.ok) {
      setConn(`state.json answered ${answer.status}`, "bad");
      return;
    }
    render(await answer.json());
    setConn("live", "ok");
    openFeed();
  } catch (err) {
    setConn("gateway unreachable, retrying", "bad");
  } finally {
    dash.polling = false;
    if (again) setTimeout(poll, POLL_MS);
  }
}

function setConn(text, cls) {
  const el = $("conn");
  el.textContent = text;
  el.className = cls;
}

// ---- rendering ----------------------------------------------------------------------------

function render(s) {
  $("login").hidden = true;
  $("board").hidden = false;
  const e = s.engine;
  $("engine").textContent = e
    ? `engine ${e.instance} · ${e.state} · pid ${e.pid} · up ${fmtDuration(e.uptime_s)}`
    : "the supervisor does not answer";
  const pas = s.pas;
  const badge = $("pas-badge");
  badge.textContent = pas ? `PAS ${pas.score.toFixed(3)} ${pas.status}` : "PAS –";
  badge.className = "badge " + (pas ? pas.status : "");

  dash.fields = s.history.fields;
  for (const point of s.history.points) dash.history.push(point);
  if (dash.history.length > HISTORY_MAX) dash.history.splice(0, dash.history.length - HISTORY_MAX);
  if (dash.history.length) dash.since = dash.history[dash.history.length - 1][0];
  drawChart($("pas-chart"), PAS_SERIES.map(([k, n, c, w]) => ({ key: k, name: n, colour: c, width: w, axis: "left", fmt: (v) => v.toFixed(1) })), { min: 0, max: 1 });
  legend($("pas-legend"), PAS_SERIES, pas ? { pas: pas.score, ...pas } : {});
  drawChart($("rate-chart"), RATE_SERIES.map(([k, n, c, w, axis, fmt]) => ({ key: k, name: n, colour: c, width: w, axis, fmt })), null);
  legend($("rate-legend"), RATE_SERIES, {});

  const t = s.throughput;
  $("tokens-per-s").textContent = fmtNumber(t.delivered_per_s);
  $("latency-p50").textContent = fmtSeconds(t.latency_p50_s);
  $("latency-p99").textContent = fmtSeconds(t.latency_p99_s);
  $("tokens-per-s").dataset.total = t.tokens_delivered ?? "";
  table($("stages"), ["stage", "tokens/s"], Object.entries(t.tokens_per_s).map(([stage, rate]) => [stage, fmtNumber(rate)]));

  const c = s.cache, b = s.broadcast, g = s.gateway;
  const streams = Object.entries(t.streams).map(([k, v]) => `${k} ${fmtNumber(v)}`).join(", ") || "–";
  table($("flows"), ["", ""], [
    ["streams open", fmtNumber(t.streams_active)],
    ["streams ended", streams],
    ["tokens delivered", fmtNumber(t.tokens_delivered)],
    ["cache hits / misses", `${fmtNumber(c.hits)} / ${fmtNumber(c.misses)}`],
    ["cache hit ratio", c.hit_ratio == null ? "–" : (100 * c.hit_ratio).toFixed(1) + " %"],
    ["cache entries, size", `${fmtNumber(c.entries)}, ${fmtBytes(c.bytes)}`],
    ["cache evictions", fmtNumber(c.evictions)],
    ["broadcast subscribers", fmtNumber(b.subscribers)],
    ["broadcast messages, drops", `${fmtNumber(b.messages)}, ${fmtNumber(b.drops)}`],
    ["broadcast gap refills", fmtNumber(b.gap_refills)],
    ["gateway streams, requests/s", `${fmtNumber(g.active_streams)}, ${fmtNumber(g.requests_per_s)}`],
    ["metrics", s.metrics],
  ]);

  table($("workers"), ["worker", "state", "ready", "pid", "restarts", "up", "heartbeat", "records/s", "CPU", "RSS"],
    s.workers.map((w) => [
      w.name, [w.state, w.state === "running" ? "ok" : "warn"], w.ready ? "yes" : "no", w.pid ?? "–",
      [String(w.restarts), w.restarts ? "warn" : ""], fmtDuration(w.uptime_s),
      w.heartbeat_age_s == null ? "–" : fmtSeconds(w.heartbeat_age_s), fmtNumber(w.records_per_s),
      w.cpu == null ? "–" : (100 * w.cpu).toFixed(1) + " %", fmtBytes(w.rss_bytes),
    ]));
  rings($("rings"), s.rings);
  table($("upstreams"), ["upstream", "health", "in flight", "requests", "errors", "TTFT p50", "TTFT p99"],
    s.upstreams.map((u) => [
      u.name, u.up == null ? "?" : u.up ? ["up", "ok"] : ["down", "bad"], u.in_flight, u.requests,
      [String(u.errors), u.errors ? "warn" : ""], fmtSeconds(u.ttft_p50_s), fmtSeconds(u.ttft_p99_s),
    ]));
}

function table(el, heads, rows) {
  const head = document.createElement("tr");
  for (const h of heads) head.appendChild(cell("th", h));
  const body = rows.map((row) => {
    const tr = document.createElement("tr");
    for (const value of row) tr.appendChild(cell("td", value));
    return tr;
  });
  el.replaceChildren(...(heads.some((h) => h) ? [head] : []), ...body);
}

function cell(tag, value) {
  const el = document.createElement(tag);
  const [text, cls] = Array.isArray(value) ? value : [value, ""];
  el.textContent = text == null ? "–" : String(text);
  if (cls) el.className = cls;
  return el;
}

function rings(el, list) {
  el.replaceChildren(...list.map((r) => {
    const row = document.createElement("div");
    row.className = "ring";
    const name = cell("span", r.name);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    const occupancy = r.occupancy;
    fill.className = "fill" + (occupancy > 0.9 ? " bad" : occupancy > 0.5 ? " warn" : "");
    fill.style.width = occupancy == null ? "0" : Math.max(0.5, 100 * occupancy).toFixed(1) + "%";
    bar.appendChild(fill);
    const pct = cell("span", occupancy == null ? `n/a (${r.transport || "?"})` : (100 * occupancy).toFixed(1) + " %");
    const detail = cell("span", occupancy == null ? "" :
      `written ${fmtNumber(r.records_written)} · read ${fmtNumber(r.records_read)} · backpressure ${fmtNumber(r.backpressure_events)} · drops ${fmtNumber(r.drops)}`);
    detail.className = "detail";
    row.append(name, bar, pct, detail);
    return row;
  }));
}

function legend(el, series, now) {
  el.replaceChildren(...series.map(([key, name, colour]) => {
    const span = document.createElement("span");
    const mark = document.createElement("i");
    mark.style.background = colour;
    span.append(mark, name + (now[key] == null ? "" : " " + Number(now[key]).toFixed(3)));
    return span;
  }));
}

// A line chart of the recent history (CHART_SPAN_S): each series on the left or right axis
// (fixed `range`, else scaled to its own maximum).
function drawChart(canvas, series, range) {
  // drawn at the screen's resolution: the canvas' pixels follow its laid-out size
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const padL = 44, padR = 52, padT = 8, padB = 18;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "10px system-ui, sans-serif";
  ctx.strokeStyle = "#2a303a";
  ctx.fillStyle = "#8a93a3";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = padT + ((h - padT - padB) * i) / 4;
    ctx.beginPath(); ctx.moveTo(padL, y); ctx.lineTo(w - padR, y); ctx.stroke();
  }
  const points = dash.history;
  const fields = dash.fields || [];
  const now = points.length ? points[points.length - 1][0] : Date.now() / 1000;
  const had = points.length ? now - points[0][0] : 0;
  const span = Math.min(CHART_SPAN_S[1], Math.max(CHART_SPAN_S[0], Math.ceil(had / 60) * 60));
  const x = (t) => padL + ((w - padL - padR) * (t - (now - span))) / span;
  ctx.textAlign = "left";
  ctx.fillText(`-${span / 60} min`, padL, h - 4);
  ctx.textAlign = "right";
  ctx.fillText("now", w - padR, h - 4);
  for (const s of series) {
    const col = fields.indexOf(s.key);
    if (col < 0) continue;
    const shown = points.filter((p) => p[0] >= now - span);
    const max = range ? range.max : Math.max(1e-9, ...shown.map((p) => p[col] ?? 0)) * 1.1;
    const min = range ? range.min : 0;
    const y = (v) => padT + (h - padT - padB) * (1 - (v - min) / (max - min));
    ctx.fillStyle = s.colour;
    ctx.textAlign = s.axis === "left" ? "right" : "left";
    const labelX = s.axis === "left" ? padL - 4 : w - padR + 4;
    if (range ? s === series[0] : true) {
      ctx.fillText(s.fmt(max), labelX, padT + 8);
      ctx.fillText(s.fmt(min), labelX, h - padB);
    }
    ctx.strokeStyle = s.colour;
    ctx.lineWidth = s.width;
    ctx.beginPath();
    let last = null;
    for (const p of shown) {
      const v = p[col];
      if (v == null) { last = null; continue; }
      if (last === null || p[0] - last > GAP_S) ctx.moveTo(x(p[0]), y(v));
      else ctx.lineTo(x(p[0]), y(v));
      last = p[0];
    }
    ctx.stroke();
  }
}

// ---- the token view -----------------------------------------------------------------------

const view = { ctx: null, image: null, drawn: 0, lit: false, second: 0, perSecond: 0, recent: [], tickerDirty: false };

function setupView() {
  const canvas = $("token-view");
  view.ctx = canvas.getContext("2d", { willReadFrequently: true });
  view.image = view.ctx.createImageData(canvas.width, canvas.height);
  setInterval(fadeAndPaint, FADE_EVERY_MS);
  setInterval(() => {
    $("feed-rate").textContent = fmtNumber(view.perSecond);
    view.perSecond = 0;
  }, 1000);
}

function drawBatch(columns) {
  const { kind, hilbert, rgba, text } = columns;
  if (!kind || !hilbert || !rgba) {
    $("feed-state").textContent = "feed: no hilbert/rgba columns (is compute in the topology?)";
    return;
  }
  const { width, height, data } = view.image;
  let drawn = 0;
  for (let i = 0; i < kind.length; i++) {
    if (kind[i] !== TOKEN) continue;
    const px = Math.min(width - 2, Math.max(0, Math.floor(hilbert[i][0] * width) - 1));
    const py = Math.min(height - 2, Math.max(0, Math.floor(hilbert[i][1] * height) - 1));
    const [r, g, b, a] = rgba[i];
    for (let dy = 0; dy < 2; dy++) {
      for (let dx = 0; dx < 2; dx++) {
        const o = 4 * ((py + dy) * width + px + dx);
        data[o] = r; data[o + 1] = g; data[o + 2] = b; data[o + 3] = Math.max(a, 96);
      }
    }
    drawn++;
    if (text) {
      view.recent.push([text[i], `rgb(${r},${g},${b})`]);
      view.tickerDirty = true;
    }
  }
  if (view.recent.length > TICKER_TOKENS) view.recent.splice(0, view.recent.length - TICKER_TOKENS);
  if (drawn) {
    view.drawn += drawn;
    view.perSecond += drawn;
    view.lit = true;
  }
}

function fadeAndPaint() {
  if (!view.lit) return;
  const data = view.image.data;
  let lit = false;
  for (let o = 3; o < data.length; o += 4) {
    if (data[o]) { data[o] = (data[o] * FADE) | 0; lit = true; }
  }
  view.ctx.putImageData(view.image, 0, 0);
  // painted before the fade of the next tick: what the canvas shows is what was drawn
  view.lit = lit;
  $("token-view").dataset.drawn = view.drawn;
  if (view.tickerDirty) {
    view.tickerDirty = false;
    $("ticker").replaceChildren(...view.recent.map(([text, colour]) => {
      const span = document.createElement("span");
      span.textContent = text;
      span.style.color = colour;
      return span;
    }));
  }
}

function openFeed() {
  if (dash.feed || dash.feedTimer) return;
  const url = new URL("v1/feed", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("stream", "all");
  if (dash.key) url.searchParams.set("access_token", dash.key); // a WebSocket cannot carry headers
  const ws = new WebSocket(url);
  dash.feed = ws;
  ws.onopen = () => {
    dash.feedRetryMs = 1000;
    $("feed-state").textContent = "feed: connected";
  };
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.header && message.header.type === "batch" && message.payload) drawBatch(message.payload);
  };
  ws.onclose = (event) => {
    if (dash.feed !== ws) return;
    dash.feed = null;
    const why = event.code === 1013 ? "too slow for the engine" : `closed (${event.code})`;
    $("feed-state").textContent = `feed: ${why}, reconnecting`;
    dash.feedTimer = setTimeout(() => { dash.feedTimer = null; openFeed(); }, dash.feedRetryMs);
    dash.feedRetryMs = Math.min(10000, dash.feedRetryMs * 2);
  };
}

function closeFeed() {
  clearTimeout(dash.feedTimer);
  dash.feedTimer = null;
  if (dash.feed) {
    const ws = dash.feed;
    dash.feed = null;
    ws.close();
  }
}

// ---- formatting ---------------------------------------------------------------------------

function fmtNumber(v) {
  if (v == null || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(2) + " G";
  if (a >= 1e6) return (v / 1e6).toFixed(2) + " M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + " k";
  return Number.isInteger(v) ? String(v) : v.toFixed(a < 10 ? 2 : 0);
}

function fmtSeconds(v) {
  if (v == null) return "–";
  if (v === 0) return "0";
  if (v < 1e-3) return (v * 1e6).toFixed(0) + " µs";
  if (v < 1) return (v * 1e3).toFixed(v < 0.01 ? 2 : 1) + " ms";
  return v.toFixed(2) + " s";
}

function fmtDuration(s) {
  if (s == null) return "–";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function fmtBytes(v) {
  if (v == null) return "–";
  if (v >= 1 << 30) return (v / (1 << 30)).toFixed(2) + " GiB";
  if (v >= 1 << 20) return (v / (1 << 20)).toFixed(1) + " MiB";
  if (v >= 1 << 10) return (v / (1 << 10)).toFixed(1) + " KiB";
  return v + " B";
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", onLogin);
  setupView();
  loadKey();
  poll();
});
