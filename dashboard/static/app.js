// glad-stream dashboard: polls the JSON API once a second, with `since` cursors for the chart
// series and the gallery, so each poll carries only what is new; charts are plain canvas.
// Every text from the server goes through textContent (frame ids come from producers).
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 600; // charts show at most the last 10 minutes
const MIN_SPAN_S = 60;
const SMOOTH = 5; // throughput is drawn as a moving mean of 5 one-second points
const STAGES = ["align", "extract", "score"];
const state = { seriesSeq: 0, gallerySeq: 0, points: [], cards: new Map(), token: null,
                needToken: false, versionsKey: "" };

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// Intl formatters are built once: building one per call costs ~0.3 ms, a page draws hundreds
const NUMBERS = new Map();
const TIME = new Intl.DateTimeFormat([], { timeStyle: "medium" });
const DATE_TIME = new Intl.DateTimeFormat([], { dateStyle: "short", timeStyle: "medium" });
const AXIS_MINUTES = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", hour12: false });
const AXIS_SECONDS = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });

function num(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e5 || abs < 1e-3)) return value.toExponential(2);
  if (!NUMBERS.has(digits)) NUMBERS.set(digits, new Intl.NumberFormat([], { maximumSignificantDigits: digits }));
  return NUMBERS.get(digits).format(value);
}
const ms = (seconds) => (seconds === null || seconds === undefined ? "–" : `${num(seconds * 1000)} ms`);
const pct = (share) => (share === null || share === undefined ? "–" : `${num(share * 100)} %`);
const clock = (t) => (t ? TIME.format(new Date(t * 1000)) : "–");
const stamp = (t) => (t ? DATE_TIME.format(new Date(t * 1000)) : "–");

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

// --- polling ------------------------------------------------------------------------------------

async function poll() {
  try {
    const [summary, series, gallery] = await Promise.all([
      getJSON("/api/summary"),
      getJSON(`/api/series?since=${state.seriesSeq}`),
      getJSON(`/api/gallery?since=${state.gallerySeq}`),
    ]);
    renderGallery(gallery);
    addPoints(series);
    // the rest in the next frame: the gallery's pictures start loading meanwhile
    await new Promise((resolve) => requestAnimationFrame(resolve));
    renderSummary(summary);
    renderCharts(summary);
    setStatus(`live · ${clock(summary.now)}`, "ok");
  } catch (error) {
    setStatus("disconnected", "down");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function setStatus(text, kind) {
  const badge = $("status");
  badge.textContent = text;
  badge.className = `badge ${kind}`;
}

function addPoints(series) {
  if (series.seq < state.seriesSeq) { // the dashboard restarted: start over
    state.points = [];
    state.seriesSeq = 0;
    return;
  }
  state.points.push(...series.points);
  state.seriesSeq = series.seq;
  const oldest = (state.points.length ? state.points[state.points.length - 1].t : 0) - WINDOW_S;
  const keep = state.points.findIndex((p) => p.t >= oldest);
  if (keep > 0) state.points.splice(0, keep);
}

// --- tiles and tables ---------------------------------------------------------------------------

function renderSummary(s) {
  $("line").textContent = `line ${s.line}`;
  $("model").textContent = s.current_model === null ? "no model" : `model v${s.current_model}`;
  $("t-frames").textContent = num(s.frames, 6);
  $("t-fps").textContent = `${num(s.fps)} frames/s`;
  $("t-anomaly").textContent = pct(s.anomaly_rate);
  $("t-anomalies").textContent = `${num(s.anomalies, 6)} anomalies`;
  const lat = s.frame_latency.quantiles;
  $("t-latency").textContent = `${ms(lat["0.5"])} / ${ms(lat["0.99"])}`;
  const q = s.scores.quantiles;
  $("t-score").textContent = `${num(q["0.5"])} / ${num(q["0.99"])}`;
  $("t-threshold").textContent = `threshold ${num(s.threshold)}`;
  const drift = s.drift;
  $("t-drift").textContent = drift.alarms ? `${drift.alarms} alarm${drift.alarms > 1 ? "s" : ""}` : "stable";
  $("t-drift").parentElement.classList.toggle("alarm", drift.alarms > 0);
  const last = drift.recent[drift.recent.length - 1];
  $("t-drift-note").textContent = last ? `last ${clock(last.at)}` : "ADWIN on scores";
  $("t-auc").textContent = s.roc_auc === null ? "–" : s.roc_auc.toFixed(3);
  $("t-labels").textContent = `${s.labels} operator labels`;
  $("t-align").textContent = pct(s.alignment_failure_rate);
  $("t-align-n").textContent = `${num(s.alignment_failures, 6)} frames`;
  const dead = Object.values(s.deadletters).reduce((a, b) => a + b, 0);
  $("t-dead").textContent = num(dead, 6);
  $("t-lag").textContent = `in flight ${num(s.lag, 6)}`;
  state.needToken = s.writes_need_token;
  $("token-form").hidden = !(state.needToken && !state.token);
  $("gallery-note").textContent = `(the ${s.gallery_size} latest, newest first)`;
  renderStages(s);
  renderVersions(s.versions);
  renderLog("alarms", [...drift.recent].reverse(), (a) =>
    `frame ${a.frame_id} · model v${a.model} · mean ${num(a.mean_before)} → ${num(a.mean_after)}`);
  $("dead-by-stage").textContent = Object.entries(s.deadletters).map(([k, v]) => `${k} ${v}`).join(" · ");
  renderLog("deadletters", [...s.recent_deadletters].reverse(), (d) => `${d.stage}: ${d.reason}`);
  renderLog("events", [...s.events].reverse(), (e) => `${e.event} ${flat(e, ["event", "at", "v"])}`);
  renderWorkers(s.workers);
}

function replaceRows(table, rows) {
  const body = $(table).tBodies[0];
  body.replaceChildren(...rows);
}

function renderStages(s) {
  const rows = [];
  const workers = (stage) => {
    const all = s.workers.filter((w) => w.stage === stage);
    return all.length ? `${all.filter((w) => w.healthy).length}/${all.length}` : "–";
  };
  const cell = (text) => el("td", { text });
  for (const stage of STAGES) {
    const latency = s.latency[stage].quantiles;
    const lag = s.lags[stage] || {};
    rows.push(el("tr", {}, [cell(stage), cell(lag.hop || "–"), cell(ms(latency["0.5"])),
      cell(ms(latency["0.99"])), cell(ms(s.work[stage])), cell(num(lag.lag, 6)),
      cell(num(lag.pending, 6)), cell(workers(stage))]));
  }
  const total = s.frame_latency.quantiles;
  rows.push(el("tr", {}, [cell("capture → score"), cell(""), cell(ms(total["0.5"])),
    cell(ms(total["0.99"])), cell(""), cell(""), cell(""), cell("")]));
  for (const [group, lag] of Object.entries(s.lags)) {
    if (STAGES.includes(group)) continue;
    rows.push(el("tr", {}, [cell(`${group} (group)`), cell(lag.hop), cell(""), cell(""), cell(""),
      cell(num(lag.lag, 6)), cell(num(lag.pending, 6)), cell(workers(group))]));
  }
  replaceRows("stages", rows);
}

function flat(record, skip = [], prefix = "") {
  // "key=value" pairs of a record, nested maps as dotted keys
  const parts = [];
  for (const [key, value] of Object.entries(record || {})) {
    if (skip.includes(key)) continue;
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      parts.push(flat(value, [], `${prefix}${key}.`));
    } else {
      const shown = typeof value === "number" ? num(value, 4) : JSON.stringify(value);
      parts.push(`${prefix}${key}=${shown}`);
    }
  }
  return parts.filter(Boolean).join("  ");
}

function renderVersions(versions) {
  const key = JSON.stringify(versions);
  if (key === state.versionsKey) return;
  state.versionsKey = key;
  const rows = [...versions].reverse().map((v) => {
    const validation = (v.provenance || {}).validation;
    const rejected = validation && validation.passed === false;
    const figures = el("td");
    const calibration = v.calibration || {};
    if (calibration.far !== undefined) {
      figures.append(el("span", { class: "kv" }, [el("b", { text: "false alarms " }),
        `${num(calibration.far, 3)} per normal part`]));
    }
    if (calibration.canary_recall !== undefined) {
      figures.append(el("span", { class: "kv" }, [el("b", { text: "canary recall " }),
        num(calibration.canary_recall, 3)]));
    }
    for (const [name, value] of Object.entries(v.provenance || {})) {
      const shown = value !== null && typeof value === "object" && !Array.isArray(value)
        ? flat(value) : (typeof value === "number" ? num(value, 4) : String(value));
      figures.append(el("span", { class: "kv" }, [el("b", { text: `${name} ` }), shown]));
    }
    const parent = v.parent ? ` (from v${v.parent})` : "";
    const row = el("tr", { class: [v.current ? "current" : "", rejected ? "rejected" : ""].join(" ") }, [
      el("td", { text: `v${v.version}${parent}` }), el("td", { text: stamp(v.created) }),
      el("td", { text: v.note || "" }), el("td", { text: num(v.frames_scored, 6) }), figures]);
    return row;
  });
  replaceRows("versions", rows);
}

function renderLog(id, records, describe) {
  $(id).replaceChildren(...records.map((r) =>
    el("li", {}, [el("time", { text: clock(r.at) }), describe(r)])));
}

function renderWorkers(workers) {
  replaceRows("workers", workers.map((w) => el("tr", { class: w.healthy ? "" : "stale" }, [
    el("td", { text: w.worker }), el("td", { text: w.stage || "" }),
    el("td", { text: w.healthy ? (w.state || "") : "stale" }),
    el("td", { text: w.model === null || w.model === undefined ? "–" : `v${w.model}` }),
    el("td", { text: num(w.processed, 8) }), el("td", { text: `${num(w.age_s, 2)} s ago` })])));
}

// --- charts -------------------------------------------------------------------------------------

function renderCharts(summary) {
  const p = state.points;
  const now = p.length ? p[p.length - 1].t : summary.now;
  const x0 = now - Math.min(WINDOW_S, Math.max(MIN_SPAN_S, p.length ? now - p[0].t : 0));
  const rates = smoothed(p, ["frames", "anomalies"]);
  draw($("c-throughput"), rates, x0, now, [
    { value: (d) => d.frames, color: "--c0" }, { value: (d) => d.anomalies, color: "--c1" }], { zero: true });
  draw($("c-latency"), p, x0, now, [
    { value: (d) => scale(d.latency_p50, 1000), color: "--c0" },
    { value: (d) => scale(d.latency_p99, 1000), color: "--c1" }], { zero: true });
  draw($("c-scores"), p, x0, now, [
    { value: (d) => d.score_p50, color: "--c0" }, { value: (d) => d.score_p90, color: "--c2" },
    { value: (d) => d.score_p99, color: "--c1" }, { value: (d) => d.threshold, color: "--c3", dash: [5, 4] }],
    { alarms: true });
  draw($("c-lag"), p, x0, now, [{ value: (d) => d.lag, color: "--c0" }], { zero: true });
}

const scale = (v, k) => (v === null || v === undefined ? null : v * k);

function smoothed(points, keys) {
  // moving means over SMOOTH points (per-second counts of a few frames a second are jagged)
  const sums = Object.fromEntries(keys.map((k) => [k, 0]));
  return points.map((d, i) => {
    const out = { t: d.t };
    for (const k of keys) {
      sums[k] += d[k] - (i >= SMOOTH ? points[i - SMOOTH][k] : 0);
      out[k] = sums[k] / Math.min(i + 1, SMOOTH);
    }
    return out;
  });
}

function draw(canvas, points, x0, x1, lines, options = {}) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  const left = 52, right = 8, top = 6, bottom = 20;
  const visible = points.filter((d) => d.t >= x0);
  let lo = Infinity, hi = -Infinity;
  for (const d of visible) for (const line of lines) {
    const v = line.value(d);
    if (v !== null && v !== undefined && Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  }
  if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
  if (options.zero) lo = Math.min(0, lo);
  if (hi - lo < 1e-9) { hi += 1; lo -= options.zero ? 0 : 1; }
  const pad = (hi - lo) * 0.08;
  hi += pad; if (!options.zero) lo -= pad;
  const X = (t) => left + ((t - x0) / (x1 - x0)) * (width - left - right);
  const Y = (v) => top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#6b7480";
  g.strokeStyle = "#e6e9ed";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4, y = Y(v);
    g.beginPath(); g.moveTo(left, y); g.lineTo(width - right, y); g.stroke();
    g.fillText(num(v), 4, y + 4);
  }
  const axis = x1 - x0 < 600 ? AXIS_SECONDS : AXIS_MINUTES;
  for (let i = 0; i <= 5; i++) {
    const t = x0 + ((x1 - x0) * i) / 5;
    const label = axis.format(new Date(t * 1000));
    g.fillText(label, Math.max(left - 14, Math.min(X(t) - 20, width - 50)), height - 5);
  }
  if (options.alarms) {
    g.fillStyle = "rgba(201, 42, 42, .35)";
    for (const d of visible) if (d.alarms > 0) g.fillRect(X(d.t) - 1, top, 3, height - top - bottom);
  }
  for (const line of lines) {
    g.strokeStyle = style.getPropertyValue(line.color).trim() || "#333";
    g.lineWidth = 1.6;
    g.setLineDash(line.dash || []);
    g.beginPath();
    let drawing = false;
    for (const d of visible) {
      const v = line.value(d);
      if (v === null || v === undefined || !Number.isFinite(v)) { drawing = false; continue; }
      if (drawing) g.lineTo(X(d.t), Y(v)); else g.moveTo(X(d.t), Y(v));
      drawing = true;
    }
    g.stroke();
  }
  g.setLineDash([]);
}

// --- gallery ------------------------------------------------------------------------------------

function renderGallery(gallery) {
  if (gallery.seq < state.gallerySeq) { // the dashboard restarted
    state.cards.forEach((card) => card.remove());
    state.cards.clear();
    state.gallerySeq = 0;
    return;
  }
  state.gallerySeq = gallery.seq;
  const box = $("gallery");
  for (const item of [...gallery.items].reverse()) { // oldest new item first: newest ends on top
    if (!state.cards.has(item.frame_id)) {
      const card = makeCard(item);
      state.cards.set(item.frame_id, card);
      box.prepend(card);
    }
  }
  const keep = new Set(gallery.ids);
  for (const [id, card] of state.cards) {
    if (!keep.has(id)) { card.remove(); state.cards.delete(id); }
  }
  for (const [id, verdict] of Object.entries(gallery.verdicts)) {
    const card = state.cards.get(id);
    if (card) showVerdict(card, verdict);
  }
}

function makeCard(item) {
  const score = item.score === null ? "not scored" : `score ${num(item.score, 4)}`;
  const normal = el("button", { class: "normal", type: "button", text: "Confirm normal" });
  const defect = el("button", { class: "defect", type: "button", text: "Confirm defect" });
  const card = el("figure", { class: "card" }, [
    el("img", { src: item.image, alt: `frame ${item.frame_id} beside its heat map`, width: "512", height: "256",
                decoding: "async", fetchpriority: "high" }),
    el("figcaption", {}, [
      el("span", { class: "id", text: item.frame_id }),
      el("span", { class: "meta", text: `${score} / threshold ${num(item.threshold, 4)} · ` +
        `${item.status} · model v${item.model} · ${clock(item.captured_at)} · ${item.camera}` }),
      el("div", { class: "actions" }, [normal, defect, el("span", { class: "verdict" })]),
      el("span", { class: "error" }),
    ]),
  ]);
  card.dataset.frame = item.frame_id;
  normal.addEventListener("click", () => confirmFrame(card, item.frame_id, "normal"));
  defect.addEventListener("click", () => confirmFrame(card, item.frame_id, "anomalous"));
  if (item.verdict) showVerdict(card, item.verdict);
  return card;
}

function showVerdict(card, verdict) {
  card.classList.remove("confirmed-normal", "confirmed-anomalous");
  card.classList.add(`confirmed-${verdict}`);
  card.querySelector(".verdict").textContent = verdict === "normal" ? "confirmed normal" : "confirmed defect";
  card.querySelectorAll("button").forEach((b) => { b.disabled = true; });
}

async function confirmFrame(card, frameId, verdict) {
  const error = card.querySelector(".error");
  error.textContent = "";
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers["X-Glad-Token"] = state.token;
  card.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    const response = await fetch("/api/confirm", {
      method: "POST", headers, body: JSON.stringify({ frame_id: frameId, verdict }) });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `error ${response.status}`);
    showVerdict(card, verdict);
  } catch (failure) {
    error.textContent = failure.message;
    card.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    if (state.needToken) $("token-form").hidden = false;
  }
}

// --- access token (only asked for when the dashboard is exposed beyond loopback) -----------------

function setupToken() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("glad-token", fromHash);
    history.replaceState(null, "", location.pathname);
  }
  state.token = sessionStorage.getItem("glad-token");
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value || null;
    if (state.token) sessionStorage.setItem("glad-token", state.token);
    $("token-form").hidden = Boolean(state.token);
  });
}

setupToken();
poll();
