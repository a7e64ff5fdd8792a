// DOM, fetch and WebSocket wiring of the trainwire dashboard.
//
// Data flow, per selected run: its history comes once from
// GET /api/runs/{id}/metrics?points=N, min/max downsampled by the server to
// about twice the charts' pixel width; the response's `seq` is the run's
// commit counter at that read, so subscribing on /ws/dashboard with
// `after=seq` brings exactly the later points, live, no gap and no duplicate.
// Live points are merged into the downsampled view (series.insertPoints) and
// the view is compacted with the same min/max rule when it grows past its
// budget, so no spike is lost and memory stays bounded. A zoom fetches the
// visible step range again at the finer resolution, down to every raw point.
//
// All data shaping is in charts.js, series.js, runs.js and urlstate.js (pure,
// tested with node --test); uPlot glue is in plot.js. User-supplied strings
// (run names, projects, metric keys, config, environment) only ever reach the
// DOM as text nodes.
//
// Hooks for browser tests and bench/dashboard.py:
//   #conn[data-state]           "connecting" | "live" | "reconnecting" | "offline"
//   li[data-run-id]             one per run in the list (after filtering)
//   figure[data-key]            one per chart; data-points: points drawn (all runs),
//                               data-runs: run ids drawn, comma-separated,
//                               data-sampled: "true" when any drawn series is downsampled
//   window.__trainwire          {lastSeq, series, zooms, view, marks, zoom(min, max), resetZoom()}
//     series: run id -> metric key -> {step, time, value, sampled} (the full views)
//     marks:  {historyDrawnAt: {run: when its history was first drawn}, zoomRequested,
//              zoomDrawn (performance.now() times), renders: n, renderMs: time spent drawing}
//     drawn(key): the columns the chart of `key` draws (uPlot data: x, then each series)
//     shown(key): the x range the chart of `key` shows, [min, max]

import {
  applyPointsFrame,
  attemptAfterClose,
  backoffDelay,
  configEntries,
  decodeValue,
  formatValue,
  groupKeys,
  lastPoint,
  newStore,
  pickRun,
  resumeAfter,
  sortRuns,
} from "./charts.js";
import { CHART_HEIGHT, cssVar, plotOptions, savePng, uPlot } from "./plot.js";
import {
  assignColours,
  filterRuns,
  findControl,
  focusedControl,
  formatAgo,
  formatDuration,
  formatStarted,
  listedRuns,
  runDuration,
  summaryRows,
} from "./runs.js";
import {
  alignSeries,
  downsample,
  ema,
  insertPoints,
  nearestIndex,
  stepRange,
  xValues,
} from "./series.js";
import { formatState, parseState } from "./urlstate.js";

const PROTOCOL_VERSION = 1;
const STATUS_MS = 6000;
const PALETTE = 8;
/** A live view is compacted back to its budget once it holds this many times more. */
const COMPACT_FACTOR = 2;
/** Wait before fetching a run's history again after a failed fetch. */
const HISTORY_RETRY_MS = 2000;

// ---- state ----------------------------------------------------------------

/** What the user looks at; mirrored in the URL fragment (urlstate.js). */
const view = parseState(location.hash, location.search);

/** Full views of loaded runs: charts.applyPointsFrame shape (lastSeq, series). */
const state = { lastSeq: newStore(), series: newStore() };
/**
 * Run id -> finer data of the zoomed range: {range: [start, end] (end Infinity when
 * following), readEnd and readSeq (the last step and commit its read covered), seq (the
 * last live frame merged), series: key -> entry, generation}.
 */
const zooms = new Map();
/** Runs whose history is being fetched. */
const loading = new Set();
/** Run id -> the pending timer that retries its failed history fetch (one per run). */
const historyRetries = new Map();
/** Runs whose history arrived and whose charts are not drawn yet (for marks). */
const pendingHistory = new Set();
const marks = { historyDrawnAt: newStore(), zoomRequested: 0, zoomDrawn: 0, renders: 0, renderMs: 0 };

/** @type {Map<string, import("./charts.js").RunInfo>} */
const runs = new Map();
/** Run id -> colour slot, stable while the run stays selected. */
const colourSlots = new Map();

/** @type {WebSocket|null} */
let socket = null;
let attempt = 0;
let retryTimer = null;
let everConnected = false;
let runsReceived = false;
/** Wall time (ms) and lag (s) of the latest live point. */
let lastLive = { at: 0, lag: null };

/** Per metric key: {figure, last, plotBox, plot, signature, group, drawn}. */
const charts = new Map();
/** Per group: {section, grid}. */
const groups = new Map();
const chartOfBox = new WeakMap();
/** Keys whose chart needs drawing; ALL marks every chart. */
const dirty = new Set();
let renderTimer = null;
/** Bumped when the theme changes, so every plot is rebuilt with the new colours. */
let themeGeneration = 0;
/** Bumped by every zoom, so a late answer for an older zoom is dropped. */
let zoomGeneration = 0;
/** The chart under the mouse or finger, which shows the tooltip. */
let hovered = null;

const $ = (id) => document.getElementById(id);
const el = {
  conn: $("conn"),
  lag: $("lag"),
  status: $("status"),
  menu: $("menu"),
  sidebar: $("sidebar"),
  runs: $("runs"),
  runsEmpty: $("runs-empty"),
  search: $("run-search"),
  statusFilter: $("run-status-filter"),
  header: $("run-header"),
  name: $("run-name"),
  project: $("run-project"),
  runStatus: $("run-status"),
  created: $("run-created"),
  duration: $("run-duration"),
  runId: $("run-id"),
  pageToggle: $("run-page-toggle"),
  config: $("run-config"),
  configBox: $("run-config-box"),
  legend: $("legend"),
  page: $("run-page"),
  summary: $("run-summary"),
  pageConfig: $("run-page-config"),
  env: $("run-env"),
  toolbar: $("toolbar"),
  smooth: $("smooth"),
  smoothValue: $("smooth-value"),
  log: $("log"),
  xmode: $("xmode"),
  follow: $("follow"),
  metricFilter: $("metric-filter"),
  resetZoom: $("reset-zoom"),
  charts: $("charts"),
  chartsEmpty: $("charts-empty"),
};
const tooltip = make("div", "tooltip");
tooltip.hidden = true;
tooltip.setAttribute("role", "tooltip");
document.body.append(tooltip);

window.__trainwire = Object.freeze({
  lastSeq: state.lastSeq,
  series: state.series,
  zooms,
  view,
  marks,
  zoom: (min, max) => setZoom(min, max),
  drawn: (key) => charts.get(key)?.plot?.data ?? null,
  shown: (key) => {
    const x = charts.get(key)?.plot?.scales.x;
    return x === undefined ? null : [x.min, x.max];
  },
  resetZoom: () => resetZoom(),
});

/** Create an element with a class and, optionally, text (as a text node). */
function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A link to another view followed in a tab that shows the dashboard changes only
// the fragment: no reload, so it is applied here (writeUrl's replaceState fires no
// hashchange of its own).
window.addEventListener("hashchange", () => {
  Object.assign(view, parseState(location.hash, location.search));
  zoomGeneration += 1;
  zooms.clear();
  el.search.value = view.q; // the run list is filtered by the link's search
  syncToolbar();
  selectionChanged();
});

function writeUrl() {
  const url = new URL(location.href);
  url.searchParams.delete("run"); // the fragment holds it now
  url.hash = formatState(view);
  history.replaceState(history.state, "", url);
}

// ---- connection -----------------------------------------------------------

const CONN_TEXT = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", offline: "offline" };

function setConn(stateName) {
  const shown = stateName !== "live" && navigator.onLine === false ? "offline" : stateName;
  el.conn.dataset.state = shown;
  el.conn.textContent = CONN_TEXT[shown];
  renderLag();
}

function renderLag() {
  const fresh = el.conn.dataset.state === "live" && lastLive.lag !== null && performance.now() - lastLive.at < 10_000;
  el.lag.hidden = !fresh;
  if (fresh) el.lag.textContent = `lag ${formatLag(lastLive.lag)}`;
}

function formatLag(seconds) {
  const ms = Math.max(0, seconds * 1000);
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

let statusTimer = null;

/** Show a message in the status area: briefly, or with `keep` until the next one. */
function showStatus(text, { keep = false } = {}) {
  el.status.textContent = text;
  el.status.title = text;
  el.status.hidden = false;
  clearTimeout(statusTimer);
  if (keep) return;
  statusTimer = setTimeout(() => {
    el.status.hidden = true;
    el.status.textContent = "";
  }, STATUS_MS);
}

function socketUrl() {
  const url = new URL("/ws/dashboard", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  return url.href;
}

function connect() {
  retryTimer = null;
  setConn(everConnected || attempt > 0 ? "reconnecting" : "connecting");
  let sock;
  try {
    sock = new WebSocket(socketUrl());
  } catch (err) {
    console.error("trainwire: cannot open the WebSocket", err);
    scheduleReconnect();
    return;
  }
  socket = sock;
  let openedAt = null;
  sock.addEventListener("open", () => {
    if (socket !== sock) return;
    openedAt = performance.now();
    everConnected = true;
    setConn("live");
    // Loaded runs resume, and runs whose history failed load, once the server's
    // list of runs has come (onRuns): it is its first message on every connection.
  });
  sock.addEventListener("message", (event) => {
    if (socket !== sock) return;
    try {
      handleMessage(JSON.parse(event.data));
    } catch (err) {
      console.error("trainwire: could not handle a message:", err, event.data);
      showStatus(`could not handle a message from the server: ${err.message}`);
    }
  });
  sock.addEventListener("close", (event) => {
    if (socket !== sock) return;
    socket = null;
    attempt = attemptAfterClose(attempt, openedAt === null ? null : performance.now() - openedAt);
    if (event.reason) console.warn(`trainwire: connection closed: ${event.code} ${event.reason}`);
    if (event.code === 4401 || event.code === 4403) {
      // Its token revoked or expired (a share link), or this page's origin refused:
      // every reconnect is refused alike, which "reconnecting…" alone never said.
      showStatus(`refused by the server: ${event.reason || event.code}; open a new link`, { keep: true });
    }
    scheduleReconnect();
  });
}

function scheduleReconnect() {
  setConn("reconnecting");
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, backoffDelay(attempt));
  attempt += 1;
}

window.addEventListener("online", () => {
  setConn(el.conn.dataset.state === "offline" ? "reconnecting" : el.conn.dataset.state);
  if (retryTimer !== null) {
    clearTimeout(retryTimer);
    connect();
  }
});
window.addEventListener("offline", () => {
  if (el.conn.dataset.state !== "live") setConn("offline");
});

function send(message) {
  if (socket !== null && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify(message));
  }
}

// A loaded run stays subscribed for the life of the connection, selected or
// not: unsubscribing would let frames already in flight arrive after a later
// re-subscribe, and a frame cannot tell which subscription it answers.
function subscribe(id) {
  send({ type: "subscribe", run: id, after: resumeAfter(state.lastSeq, id) });
}

// ---- history (REST) ---------------------------------------------------------

/** About twice the widest chart's pixel width: what a chart can show, with min and max per pixel. */
function pointsBudget() {
  const width = el.charts.clientWidth || window.innerWidth || 1200;
  return Math.min(8000, Math.max(400, Math.round(2 * width)));
}

async function fetchMetrics(id, params) {
  const query = new URLSearchParams(params);
  const response = await fetch(`/api/runs/${encodeURIComponent(id)}/metrics?${query}`, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  const body = await response.json();
  const series = newStore();
  for (const [key, cols] of Object.entries(body.series ?? {})) {
    series[key] = {
      step: cols.step,
      time: cols.time,
      value: cols.value.map(decodeValue),
      sampled: cols.sampled === true,
    };
  }
  return { seq: Number(body.seq) || 0, series };
}

/** Load a run's history once, then follow it live. */
function ensureLoaded(id) {
  if (state.series[id] !== undefined || loading.has(id) || !runs.has(id)) return;
  loading.add(id);
  fetchMetrics(id, { points: pointsBudget() })
    .then(({ seq, series }) => {
      loading.delete(id);
      if (state.series[id] !== undefined) return;
      state.series[id] = series;
      state.lastSeq[id] = seq;
      subscribe(id);
      if (view.runs.includes(id)) {
        pendingHistory.add(id);
        layoutCharts();
        markAllDirty();
        if (view.zoom !== null) requestZoomData();
      }
    })
    .catch((err) => {
      loading.delete(id);
      console.warn(`trainwire: could not load run ${id}:`, err);
      // Retried in a while (a server busy or restarting), and when the socket reopens;
      // by one timer per run, however many selection changes asked for it meanwhile.
      if (historyRetries.has(id)) return;
      historyRetries.set(
        id,
        setTimeout(() => {
          historyRetries.delete(id);
          if (view.runs.includes(id)) ensureLoaded(id);
        }, HISTORY_RETRY_MS),
      );
    });
}

// ---- messages -------------------------------------------------------------

function handleMessage(msg) {
  switch (msg.type) {
    case "hello":
      if (msg.v !== PROTOCOL_VERSION) {
        showStatus(`server speaks protocol ${msg.v}, this page ${PROTOCOL_VERSION}: reload the page`);
      }
      break;
    case "runs":
      onRuns(msg.runs);
      break;
    case "run":
      onRun(msg.run);
      break;
    case "points":
      onPoints(msg);
      break;
    case "error":
      console.error("trainwire: server error:", msg.message);
      showStatus(`server: ${msg.message}`);
      break;
    default:
      throw new Error(`unknown message type ${JSON.stringify(msg.type)}`);
  }
}

function onRuns(list) {
  if (!Array.isArray(list)) throw new TypeError("runs message without a runs array");
  runsReceived = true;
  const before = new Map(runs);
  runs.clear();
  for (const info of list) runs.set(info.id, info);
  // Loaded runs resume where they left off. One deleted while this page was away
  // is forgotten; one deleted and made again under the same id (its commits
  // numbered afresh, so resuming by number would skip its first points) is
  // forgotten and loaded anew by selectionChanged.
  for (const id of Object.keys(state.series)) {
    const info = runs.get(id);
    if (info === undefined) {
      forget(id);
      view.runs = view.runs.filter((other) => other !== id);
      if (view.focus === id) view.focus = null;
    } else if (before.get(id)?.created !== info.created) {
      forget(id);
    } else {
      subscribe(id);
    }
  }
  if (view.runs.length === 0) {
    const pick = pickRun(runs.values());
    if (pick !== null) view.runs = [pick];
  }
  selectionChanged();
}

/** Drop what this page holds of a run's points; it loads them again if shown. */
function forget(id) {
  delete state.series[id];
  delete state.lastSeq[id];
  zooms.delete(id);
  recentFrames.delete(id);
}

function onRun(info) {
  if (info === null || typeof info !== "object" || typeof info.id !== "string") {
    throw new TypeError("run message without a RunInfo");
  }
  if (info.status === "deleted") {
    runs.delete(info.id);
    forget(info.id);
    view.runs = view.runs.filter((id) => id !== info.id);
    if (view.focus === info.id) view.focus = null;
    selectionChanged();
    return;
  }
  const known = runs.get(info.id);
  // Points frames may have moved `updated` past what this (older) event says.
  if (known !== undefined && known.updated > info.updated) info = { ...info, updated: known.updated };
  runs.set(info.id, info);
  if (view.runs.includes(info.id) && known === undefined) {
    selectionChanged(); // a run the URL named has appeared
    return;
  }
  if (view.runs.length === 0) {
    view.runs = [info.id]; // the first run to appear
    selectionChanged();
    return;
  }
  scheduleRunList();
  renderHeader();
  if (view.focus === info.id) refreshRunPage();
}

function onPoints(frame) {
  const id = frame.run;
  if (state.series[id] === undefined) return; // not loaded here (an old subscription)
  const result = applyPointsFrame(state, frame);
  if (result === null) return; // already seen
  const store = state.series[id];
  const budget = pointsBudget();
  let newest = -Infinity;
  for (const key of result.changed) {
    const entry = store[key];
    newest = Math.max(newest, entry.time[entry.time.length - 1]);
    if (entry.value.length > COMPACT_FACTOR * budget) store[key] = downsample(entry, budget);
  }
  mergeIntoZoom(id, frame);
  remember(frame);
  if (Number.isFinite(newest)) {
    lastLive = { at: performance.now(), lag: Date.now() / 1000 - newest };
    renderLag();
    const info = runs.get(id);
    if (info !== undefined && newest > info.updated) runs.set(id, { ...info, updated: newest });
  }
  // The server announces a run's commits at most once a second: its last points may
  // come with no announcement after them.
  if (view.focus === id) refreshRunPage();
  if (!view.runs.includes(id)) return; // kept for when it is selected again
  if (result.added.length > 0) layoutCharts();
  for (const key of result.changed) dirty.add(key);
  followLatest();
  // A following zoom takes every live point raw: read the window afresh once it
  // holds more than a full view may, so a long-lived tab stays bounded.
  if (zoomOutgrown(zooms.get(id))) requestZoomData();
  scheduleRender();
}

/** A current zoom holding more raw points than a full view may: to be read afresh. */
function zoomOutgrown(zoom) {
  if (zoom === undefined || zoom.generation !== zoomGeneration) return false;
  const most = COMPACT_FACTOR * pointsBudget();
  return Object.values(zoom.series).some((e) => e.value.length > most);
}

/**
 * Live points also extend a zoomed view whose range they reach. A frame is
 * merged when it ends after the zoom's read (`readSeq`); one that straddles it
 * (a catch-up) may repeat a few points there, which draws the same, where
 * skipping it would leave a gap. A frame the read already covers (committed
 * before it) still brings its points past the read's last step (`readEnd`): a
 * following zoom reads up to the newest step it knew of, and the trainer went
 * on meanwhile.
 */
function mergeIntoZoom(id, frame) {
  const zoom = zooms.get(id);
  if (zoom === undefined) return;
  const covered = frame.seq <= zoom.readSeq;
  if (!covered && frame.seq <= zoom.seq) return; // merged already
  const [lo, hi] = zoom.range;
  const from = covered ? Math.max(lo, Math.floor(zoom.readEnd) + 1) : lo;
  for (const [key, cols] of Object.entries(frame.series)) {
    const keep = [];
    for (let i = 0; i < cols.step.length; i++) {
      if (cols.step[i] >= from && cols.step[i] <= hi) keep.push(i);
    }
    if (keep.length === 0) continue;
    let entry = zoom.series[key];
    if (entry === undefined) entry = zoom.series[key] = { step: [], time: [], value: [], sampled: false };
    insertPoints(
      entry,
      keep.map((i) => cols.step[i]),
      keep.map((i) => cols.time[i]),
      keep.map((i) => decodeValue(cols.value[i])),
    );
  }
  if (!covered) zoom.seq = frame.seq;
}

/** Run id -> its latest points frames, replayed into a zoom whose read they outran. */
const recentFrames = new Map();
const RECENT_FRAMES = 256;

function remember(frame) {
  let list = recentFrames.get(frame.run);
  if (list === undefined) recentFrames.set(frame.run, (list = []));
  list.push(frame);
  if (list.length > RECENT_FRAMES) list.splice(0, list.length - RECENT_FRAMES);
}

// ---- selection ------------------------------------------------------------

function selectionChanged() {
  assignColours(colourSlots, view.runs, PALETTE);
  for (const id of view.runs) ensureLoaded(id);
  for (const id of [...zooms.keys()]) if (!view.runs.includes(id)) zooms.delete(id);
  writeUrl();
  renderRunList();
  renderHeader();
  renderLegend();
  renderPage();
  layoutCharts();
  markAllDirty();
  if (view.zoom !== null) requestZoomData();
}

/** Show one run alone. */
function selectOnly(id) {
  view.runs = [id];
  view.focus = null;
  closeMenu();
  selectionChanged();
}

/** Add a run to the overlay, or take it out. */
function toggleRun(id, on) {
  const has = view.runs.includes(id);
  if (on && !has) view.runs = [...view.runs, id];
  if (!on && has) view.runs = view.runs.filter((r) => r !== id);
  if (view.focus !== null && !view.runs.includes(view.focus)) view.focus = null;
  selectionChanged();
}

el.runs.addEventListener("click", (event) => {
  if (event.target.closest(".run-more") !== null) {
    const first = runListLimit;
    runListLimit += RUN_LIST_PAGE;
    renderRunList();
    // On to the first run now shown: the button pressed is at the end of the list
    // again, past them (and the focus, left on it, would skip them all).
    el.runs.children[first]?.querySelector(".run-open")?.focus();
    return;
  }
  const item = event.target.closest("li[data-run-id]");
  if (item === null || !el.runs.contains(item)) return;
  const id = item.dataset.runId;
  if (event.target.closest(".run-check") !== null) {
    toggleRun(id, event.target.checked);
  } else if (event.target.closest(".run-open") !== null) {
    selectOnly(id);
  }
});

el.search.value = view.q;
el.search.addEventListener("input", () => {
  view.q = el.search.value;
  writeUrl();
  runListLimit = RUN_LIST_PAGE; // a new search starts at its first page
  renderRunList();
});
el.statusFilter.addEventListener("change", () => {
  runListLimit = RUN_LIST_PAGE;
  renderRunList();
});

function closeMenu() {
  document.body.classList.remove("menu-open");
  el.menu.setAttribute("aria-expanded", "false");
}
el.menu.addEventListener("click", () => {
  const open = document.body.classList.toggle("menu-open");
  el.menu.setAttribute("aria-expanded", String(open));
});

// ---- run list, header, legend, run page -------------------------------------

function badge(status) {
  const node = make("span", "badge", status);
  node.dataset.status = status;
  return node;
}

/** Palette colours of the current theme (reading CSS per draw would force style work). */
let palette = null;

function colourOf(id) {
  if (palette === null) palette = Array.from({ length: PALETTE }, (_, i) => cssVar(`--series-${i}`));
  return palette[colourSlots.get(id) ?? 0];
}

// Runs drawn in the list before a "show more" button: a server a team has used for
// months holds thousands, and drawing 5,000 took 0.5 s, at every status update of
// every running run (once a second each). The search finds the others.
const RUN_LIST_PAGE = 200;
let runListLimit = RUN_LIST_PAGE;
let runListPending = false;

/** renderRunList once, at the next frame: the updates of many runs in one go. */
function scheduleRunList() {
  if (runListPending) return;
  runListPending = true;
  requestAnimationFrame(() => {
    runListPending = false;
    renderRunList();
  });
}

function renderRunList() {
  const focus = focusedControl(el.runs, document.activeElement);
  const now = Date.now() / 1000;
  const shown = filterRuns(sortRuns(runs.values()), view.q, el.statusFilter.value);
  const { listed, hidden } = listedRuns(shown, view.runs, runListLimit);
  const items = listed.map((info) => {
    const li = make("li", "run");
    li.dataset.runId = info.id;
    const on = view.runs.includes(info.id);
    if (on) li.setAttribute("aria-current", "true");
    const check = make("input", "run-check");
    check.type = "checkbox";
    check.checked = on;
    check.setAttribute("aria-label", `overlay ${info.name || info.id}`);
    if (on) check.style.setProperty("--c", colourOf(info.id));
    const open = make("button", "run-open", info.name || info.id);
    open.type = "button";
    open.title = `${info.project} / ${info.name || info.id}`;
    const meta = make("span", "run-meta-line");
    meta.append(make("span", "run-project-text", info.project), badge(info.status));
    const times = make("span", "run-times");
    times.append(
      make("span", "run-started", formatStarted(info.created)),
      make("span", "run-duration-text", formatDuration(runDuration(info, now))),
      make("span", "run-ago", `updated ${formatAgo(now - info.updated)}`),
    );
    li.append(check, open, meta, times);
    return li;
  });
  if (hidden > 0) {
    const more = make("li", "run-more-item");
    const button = make("button", "run-more", `show ${Math.min(hidden, RUN_LIST_PAGE)} more`);
    button.type = "button";
    more.append(button, make("span", "run-more-note", `${hidden} more match; the search narrows them`));
    items.push(more);
  }
  el.runs.replaceChildren(...items);
  // Where it was, without scrolling to it: this runs at every running run's update.
  if (focus !== null) findControl(el.runs, focus)?.focus({ preventScroll: true });
  el.runsEmpty.hidden = shown.length > 0;
  el.runsEmpty.textContent = !runsReceived
    ? "Waiting for the server…"
    : runs.size === 0
      ? "No runs yet. Start a training script that logs to this server and it appears here."
      : "No run matches the search and status filter.";
}

/** The run the header describes: the open run page's, else the only selected run. */
function headerRunId() {
  if (view.focus !== null) return view.focus;
  return view.runs.length === 1 ? view.runs[0] : null;
}

function renderHeader() {
  const id = headerRunId();
  const info = id === null ? undefined : runs.get(id);
  el.header.hidden = id === null;
  if (info === undefined) {
    el.name.textContent = id ?? "";
    el.project.textContent = "";
    el.runStatus.textContent = "unknown";
    el.runStatus.dataset.status = "unknown";
    el.created.textContent = el.duration.textContent = el.runId.textContent = "";
    el.config.replaceChildren();
    el.configBox.hidden = true;
    el.pageToggle.hidden = true;
    return;
  }
  el.name.textContent = info.name || info.id;
  document.title = `${info.name || info.id} · trainwire`;
  el.project.textContent = info.project;
  el.runStatus.textContent = info.status;
  el.runStatus.dataset.status = info.status;
  el.created.textContent = Number.isFinite(info.created) ? `started ${new Date(info.created * 1000).toLocaleString()}` : "";
  el.duration.textContent = formatDuration(runDuration(info, Date.now() / 1000));
  el.runId.textContent = info.id;
  el.pageToggle.hidden = false;
  el.pageToggle.textContent = view.focus === null ? "run page" : "back to charts";
  fillDl(el.config, configEntries(info.config));
  el.configBox.hidden = el.config.childElementCount === 0;
}

function fillDl(dl, rows) {
  if (rows.length === 0) {
    dl.replaceChildren(make("dd", "empty", "none recorded")); // not an empty box
    return;
  }
  dl.replaceChildren(...rows.flatMap(([key, value]) => [make("dt", "", key), make("dd", "", value)]));
}

function renderLegend() {
  el.legend.hidden = view.runs.length < 2 || view.focus !== null;
  el.legend.replaceChildren(
    ...view.runs.map((id) => {
      const info = runs.get(id);
      const li = make("li", "legend-item");
      li.dataset.legendRun = id;
      const swatch = make("span", "swatch");
      swatch.style.setProperty("--c", colourOf(id));
      const name = make("button", "legend-name", info?.name || id);
      name.type = "button";
      name.title = "open the run page";
      name.addEventListener("click", () => openPage(id));
      const remove = make("button", "legend-remove", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `remove ${info?.name || id} from the charts`);
      remove.addEventListener("click", () => toggleRun(id, false));
      li.append(swatch, name, info ? badge(info.status) : "", remove);
      return li;
    }),
  );
}

function openPage(id) {
  view.focus = id;
  selectionChanged();
}

el.pageToggle.addEventListener("click", () => {
  view.focus = view.focus === null ? headerRunId() : null;
  selectionChanged();
});

function renderPage() {
  const onPage = view.focus !== null;
  el.page.hidden = !onPage;
  el.toolbar.hidden = onPage || view.runs.length === 0;
  el.charts.hidden = onPage;
  if (onPage) refreshRunPage();
}

/** The run page's summary is fetched at most this often. */
const PAGE_REFRESH_MS = 2000;
let pageFetch = { id: null, at: 0 };
/** A refresh asked for within PAGE_REFRESH_MS of the last fetch, waiting its turn. */
let pageRefreshTimer = null;

/** Fetch the run page's summary and environment (at most every 2 s per run). */
async function refreshRunPage() {
  const id = view.focus;
  if (id === null) return;
  const now = performance.now();
  if (pageFetch.id === id && now - pageFetch.at < PAGE_REFRESH_MS) {
    // Put off, not dropped: a run's last points or its finish, coming within 2 s of
    // the last fetch, stayed off its summary for good (nothing asks again).
    if (pageRefreshTimer === null) {
      pageRefreshTimer = setTimeout(() => {
        pageRefreshTimer = null;
        refreshRunPage();
      }, PAGE_REFRESH_MS - (now - pageFetch.at));
    }
    return;
  }
  pageFetch = { id, at: now };
  let detail;
  try {
    const response = await fetch(`/api/runs/${encodeURIComponent(id)}`, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    detail = await response.json();
  } catch (err) {
    showStatus(`could not load the run page: ${err.message}`);
    return;
  }
  if (view.focus !== id) return;
  const body = el.summary.tBodies[0];
  body.replaceChildren(
    ...summaryRows(detail.summary).map((row) => {
      const tr = make("tr");
      const th = make("th", "", row.key);
      th.scope = "row";
      tr.append(
        th,
        make("td", "", row.last === null ? "\u2014" : `${formatValue(row.last)} @ ${row.lastStep}`),
        make("td", "", formatValue(row.min)),
        make("td", "", formatValue(row.max)),
        make("td", "", String(row.count)),
      );
      return tr;
    }),
  );
  fillDl(el.pageConfig, configEntries(detail.config ?? {}));
  fillDl(el.env, configEntries(detail.env ?? {}));
}

// Ticks "updated n s ago", durations and the lag once a second.
setInterval(() => {
  const now = Date.now() / 1000;
  for (const li of el.runs.children) {
    const info = runs.get(li.dataset.runId);
    if (info === undefined) continue;
    li.querySelector(".run-ago").textContent = `updated ${formatAgo(now - info.updated)}`;
    li.querySelector(".run-duration-text").textContent = formatDuration(runDuration(info, now));
  }
  const id = headerRunId();
  const info = id === null ? undefined : runs.get(id);
  if (info !== undefined) el.duration.textContent = formatDuration(runDuration(info, now));
  renderLag();
}, 1000);

// ---- toolbar --------------------------------------------------------------

function syncToolbar() {
  el.smooth.value = String(view.smooth);
  el.smoothValue.textContent = view.smooth.toFixed(2);
  el.log.checked = view.log;
  el.xmode.value = view.x;
  el.follow.checked = view.follow;
  el.metricFilter.value = view.metrics;
  el.resetZoom.hidden = view.zoom === null;
}

el.smooth.addEventListener("input", () => {
  view.smooth = Number(el.smooth.value);
  el.smoothValue.textContent = view.smooth.toFixed(2);
  writeUrl();
  markAllDirty();
});
el.log.addEventListener("change", () => {
  view.log = el.log.checked;
  writeUrl();
  markAllDirty();
});
el.xmode.addEventListener("change", () => {
  view.x = el.xmode.value;
  resetZoom(); // the old range is in the old axis' units
});
el.follow.addEventListener("change", () => {
  view.follow = el.follow.checked;
  const before = view.zoom;
  followLatest();
  writeUrl();
  if (view.zoom !== before) {
    // The window jumped to the newest data: the zoom's finer data was of the old one.
    zooms.clear();
    requestZoomData();
  } else if (view.follow) {
    // Already at the newest data: the zoom's read, made without following, ends at
    // its last step; read it again as a following one, or live points are not merged.
    requestZoomData();
  }
  markAllDirty();
});
el.metricFilter.addEventListener("input", () => {
  view.metrics = el.metricFilter.value;
  writeUrl();
  layoutCharts();
  markAllDirty();
});
el.resetZoom.addEventListener("click", () => resetZoom());

// ---- zoom -----------------------------------------------------------------

function setZoom(min, max) {
  if (!(max > min)) return;
  // Zooming into the past stops following; a range that reaches the newest data keeps it.
  if (view.follow && max < latestX()) view.follow = false;
  const old = view.zoom;
  view.zoom = [min, max];
  // Keep finer data already here if the new range lies inside it; else draw the
  // coarse full view at once while the finer data comes.
  if (old === null || min < old[0] || max > old[1]) zooms.clear();
  syncToolbar();
  writeUrl();
  requestZoomData();
  markAllDirty();
}

function resetZoom() {
  view.zoom = null;
  zoomGeneration += 1;
  zooms.clear();
  syncToolbar();
  writeUrl();
  markAllDirty();
}

/** The largest x drawn now, over the selected runs' full views. */
function latestX() {
  let latest = -Infinity;
  for (const id of view.runs) {
    const store = state.series[id];
    if (store === undefined) continue;
    const origin = runs.get(id)?.created ?? 0;
    for (const key of Object.keys(store)) {
      if (view.x === "step" && isSystemKey(key)) continue; // seconds, not steps
      const entry = store[key];
      const n = entry.step.length;
      if (n === 0) continue;
      // The last point only (entries are sorted by step; times follow in practice).
      const x = view.x === "step" ? entry.step[n - 1] : view.x === "wall" ? entry.time[n - 1] : entry.time[n - 1] - origin;
      latest = Math.max(latest, x);
    }
  }
  return latest;
}

/** Following and zoomed: slide the range so the newest point stays at its right edge. */
function followLatest() {
  if (!view.follow || view.zoom === null) return;
  const latest = latestX();
  const [min, max] = view.zoom;
  if (latest > max) view.zoom = [latest - (max - min), latest];
}

/** Fetch the zoomed range of every selected run that is downsampled there. */
function requestZoomData() {
  if (view.zoom === null) return;
  const generation = ++zoomGeneration;
  const [min, max] = view.zoom;
  marks.zoomRequested = performance.now();
  const widest = Math.max(200, ...[...charts.values()].map((c) => c.plot?.width ?? 0));
  for (const id of view.runs) {
    const store = state.series[id];
    if (store === undefined) continue;
    const keys = Object.keys(store);
    // Raw already (nothing downsampled): the full view has every point of the range.
    if (!keys.some((k) => store[k].sampled)) continue;
    // The steps of the x range, over every key (keys need not share their steps or times).
    let range = null;
    let newest = -Infinity;
    for (const key of keys) {
      const entry = store[key];
      if (entry.step.length > 0) newest = Math.max(newest, entry.step[entry.step.length - 1]);
      const r = stepRange(entry, view.x, runs.get(id)?.created ?? 0, min, max);
      if (r !== null) range = range === null ? r : [Math.min(range[0], r[0]), Math.max(range[1], r[1])];
    }
    if (range === null) continue;
    // Following the newest data: the zoom takes every later step, live. Its read
    // still ends at the newest step known here, or a fast trainer would make it a
    // downsampled read of everything logged since the request (mergeIntoZoom adds
    // the steps committed before the read but past its end).
    const readEnd = range[1];
    if (view.follow && range[1] >= newest) range = [range[0], Infinity];
    fetchMetrics(id, { points: Math.round(2 * widest), start: range[0], end: readEnd })
      .then(({ seq, series }) => {
        if (generation !== zoomGeneration || !view.runs.includes(id)) return;
        zooms.set(id, { range, readEnd, readSeq: seq, seq, series, generation });
        // Points that arrived live while the request was out: not in its read.
        for (const frame of recentFrames.get(id) ?? []) mergeIntoZoom(id, frame);
        // As many again as the read, from a fast trainer: read the window afresh.
        if (zoomOutgrown(zooms.get(id))) requestZoomData();
        markAllDirty();
      })
      .catch((err) => console.warn(`trainwire: zoom fetch for ${id} failed:`, err));
  }
}

// ---- charts ---------------------------------------------------------------

/** Metric keys to chart: every key of a selected, loaded run that passes the filter. */
function chartKeys() {
  const keys = new Set();
  const filter = view.metrics.toLowerCase().split(/\s+/).filter(Boolean);
  for (const id of view.runs) {
    const store = state.series[id];
    if (store === undefined) continue;
    for (const key of Object.keys(store)) {
      const lower = key.toLowerCase();
      if (filter.every((w) => lower.includes(w))) keys.add(key);
    }
  }
  return keys;
}

/** The entry drawn for a run's metric: the zoom's finer data when there is some. */
function entryFor(id, key) {
  const zoom = zoomed(key) ? zooms.get(id) : undefined;
  return zoom?.series[key] ?? state.series[id]?.[key];
}

/**
 * Whether the zoom applies to a chart. System metrics' steps are seconds since
 * init() (they are sampled by the clock, not by the training loop): a range of
 * training steps means nothing to them, and blanked them. On the time axes both
 * share a clock, and the zoom applies to every chart.
 */
function zoomed(key) {
  return view.zoom !== null && !(view.x === "step" && isSystemKey(key));
}

/** A system metric's key (`system/cpu`, or `rank1/system/cpu` of a rank). */
function isSystemKey(key) {
  return /^(rank\d+\/)?system\//.test(key);
}

const resizer = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const chart = chartOfBox.get(entry.target);
    const width = Math.floor(entry.contentRect.width);
    if (chart?.plot && width > 0 && width !== chart.plot.width) {
      chart.plot.setSize({ width, height: CHART_HEIGHT });
    }
  }
});

/** Create, order and drop charts to match the keys to show. */
function layoutCharts() {
  const keys = view.focus === null ? chartKeys() : new Set();
  for (const [key, chart] of charts) {
    if (keys.has(key)) continue;
    resizer.unobserve(chart.plotBox);
    visibility.unobserve(chart.plotBox);
    chart.plot?.destroy();
    chart.figure.remove();
    charts.delete(key);
  }
  const layout = groupKeys(keys);
  const live = new Set(layout.map((g) => g.group));
  for (const [group, g] of groups) {
    if (!live.has(group)) {
      g.section.remove();
      groups.delete(group);
    }
  }
  for (const { group, keys: groupKeysList } of layout) {
    let g = groups.get(group);
    if (g === undefined) {
      const section = make("section", "group");
      section.dataset.group = group;
      const grid = make("div", "group-charts");
      section.append(make("h3", "group-title", group), grid);
      g = { section, grid };
      groups.set(group, g);
    }
    el.charts.append(g.section); // moves existing sections into order
    for (const key of groupKeysList) {
      let chart = charts.get(key);
      if (chart === undefined) chart = newChart(key, group);
      g.grid.append(chart.figure);
    }
  }
  renderEmptyState();
}

function newChart(key, group) {
  const figure = make("figure", "chart");
  figure.dataset.key = key;
  figure.dataset.points = "0";
  const caption = make("figcaption", "chart-caption");
  const name = make("span", "chart-key", key);
  name.title = key;
  const last = make("span", "chart-last");
  const actions = make("span", "chart-actions");
  const png = make("button", "chart-action", "PNG");
  png.type = "button";
  png.title = "download this chart as PNG";
  const csv = make("details", "chart-csv");
  const csvSummary = make("summary", "chart-action", "CSV");
  csvSummary.title = "download a run's series as CSV (every raw point)";
  const csvList = make("div", "chart-csv-list");
  csv.append(csvSummary, csvList);
  actions.append(png, csv);
  caption.append(name, last, actions);
  const plotBox = make("div", "chart-plot");
  figure.append(caption, plotBox);
  const chart = { key, figure, last, plotBox, plot: null, signature: "", group, csvList, runs: [], cache: null, visible: true };
  png.addEventListener("click", () => {
    if (chart.plot === null) return;
    const labels = chart.runs.map((id) => ({ label: runs.get(id)?.name || id, colour: colourOf(id) }));
    savePng(chart.plot, key, labels, `${fileSafe(chart.runs.length === 1 ? runs.get(chart.runs[0])?.name || chart.runs[0] : "runs")}-${fileSafe(key)}.png`);
  });
  csv.addEventListener("toggle", () => {
    if (!csv.open) return;
    csvList.replaceChildren(
      ...chart.runs.map((id) => {
        const a = make("a", "", runs.get(id)?.name || id);
        a.href = `/api/runs/${encodeURIComponent(id)}/csv?key=${encodeURIComponent(key)}`;
        a.download = "";
        return a;
      }),
    );
  });
  chartOfBox.set(plotBox, chart);
  charts.set(key, chart);
  resizer.observe(plotBox);
  visibility.observe(plotBox);
  dirty.add(key);
  return chart;
}

function fileSafe(text) {
  return String(text).replace(/[^A-Za-z0-9._-]+/g, "_").slice(0, 80) || "chart";
}

function renderEmptyState() {
  let text = "";
  if (view.runs.length === 0) {
    text = !runsReceived ? "Waiting for the server…" : runs.size === 0 ? "No runs yet." : "Select a run.";
  } else if (view.focus === null && charts.size === 0) {
    text = view.runs.some((id) => state.series[id] === undefined)
      ? "Loading…"
      : view.metrics
        ? "No metric matches the filter."
        : "Waiting for metrics…";
  }
  el.chartsEmpty.textContent = text;
  el.chartsEmpty.hidden = text === "";
  syncToolbar();
}

function markAllDirty() {
  for (const key of charts.keys()) dirty.add(key);
  scheduleRender();
}

/** Drawing budget of one animation frame, in ms. */
const FRAME_BUDGET_MS = 8;

/**
 * Draw dirty charts at the next animation frame, time-sliced: a frame draws
 * charts until it has spent FRAME_BUDGET_MS (at least one), and the rest wait
 * for the next frame, oldest first. With many runs updating, every chart still
 * updates several times a second and no frame is held long enough to stutter.
 * Charts scrolled out of view are not drawn until they come back.
 */
function scheduleRender() {
  if (renderTimer !== null) return;
  renderTimer = requestAnimationFrame(render);
}

function render() {
  renderTimer = null;
  const started = performance.now();
  for (const key of dirty) {
    const chart = charts.get(key);
    if (chart !== undefined && !chart.visible && chart.plot !== null) continue; // drawn when seen
    dirty.delete(key);
    if (chart !== undefined) drawChart(chart);
    if (performance.now() - started > FRAME_BUDGET_MS) break;
  }
  marks.renders += 1;
  const done = performance.now();
  marks.renderMs += done - started;
  for (const id of pendingHistory) {
    if (!view.runs.includes(id)) continue;
    if ([...charts.values()].some((c) => c.visible && c.plot === null && dirty.has(c.key))) continue;
    marks.historyDrawnAt[id] = done;
    pendingHistory.delete(id);
  }
  if (zooms.size > 0 && [...zooms.values()].some((z) => z.generation === zoomGeneration)) {
    if (![...charts.values()].some((c) => c.visible && dirty.has(c.key))) {
      marks.zoomDrawn = Math.max(marks.zoomDrawn, done);
    }
  }
  if ([...dirty].some((key) => charts.get(key)?.visible)) scheduleRender();
}

const visibility = new IntersectionObserver(
  (entries) => {
    for (const entry of entries) {
      const chart = chartOfBox.get(entry.target);
      if (chart === undefined) continue;
      chart.visible = entry.isIntersecting;
      if (chart.visible && dirty.has(chart.key)) scheduleRender();
    }
  },
  { rootMargin: "200px" },
);

function drawChart(chart) {
  const key = chart.key;
  const ids = view.runs.filter((id) => entryFor(id, key) !== undefined);
  const smoothed = view.smooth > 0;
  const xsList = [];
  const ysList = [];
  const entries = [];
  const smooth = [];
  for (const id of ids) {
    const entry = entryFor(id, key);
    const xs = xValues(entry, view.x, runs.get(id)?.created ?? 0);
    entries.push(entry);
    if (smoothed) {
      const s = ema(entry.value, view.smooth);
      smooth.push(s);
      xsList.push(xs, xs);
      ysList.push(entry.value, s);
    } else {
      xsList.push(xs);
      ysList.push(entry.value);
    }
  }
  const data = ids.length === 0 ? [[], []] : alignSeries(xsList, ysList);
  if (view.log) {
    for (let c = 1; c < data.length; c++) data[c] = data[c].map((v) => (v === undefined ? v : v > 0 ? v : null));
  }
  chart.runs = ids;
  chart.cache = { ids, entries, smooth };
  const signature = [ids.join("\u0000"), ids.map(colourOf).join(","), smoothed, view.log, view.x, themeGeneration].join("|");
  if (chart.plot === null || signature !== chart.signature || ids.length === 0) {
    chart.plot?.destroy();
    chart.plot = null;
    chart.signature = signature;
    if (ids.length > 0) {
      const width = Math.max(200, Math.floor(chart.plotBox.clientWidth) || 0);
      const spec = {
        width,
        runs: ids.map((id) => ({ label: runs.get(id)?.name || id, colour: colourOf(id) })),
        smoothed,
        log: view.log,
        xMode: view.x,
        // A drag on a system chart selects seconds, not steps (see zoomed).
        onZoom: (min, max) => (view.x === "step" && isSystemKey(key) ? undefined : setZoom(min, max)),
        onReset: () => resetZoom(),
        onCursor: (u) => showTooltip(chart, u),
      };
      chart.plot = new uPlot(plotOptions(spec), data, chart.plotBox);
      chart.plot.over.addEventListener("mouseenter", () => (hovered = chart));
      chart.plot.over.addEventListener("mouseleave", () => {
        if (hovered === chart) hovered = null;
        tooltip.hidden = true;
      });
      chart.plot.over.addEventListener("touchstart", () => (hovered = chart), { passive: true });
    }
  } else {
    // In one batch: uPlot draws once, now, inside this frame's time slice.
    chart.plot.batch(() => {
      chart.plot.setData(data, !zoomed(key));
      if (zoomed(key)) chart.plot.setScale("x", { min: view.zoom[0], max: view.zoom[1] });
    });
  }
  if (chart.plot !== null && zoomed(key) && chart.plot.scales.x.min !== view.zoom[0]) {
    chart.plot.setScale("x", { min: view.zoom[0], max: view.zoom[1] });
  }
  chart.figure.dataset.points = String(entries.reduce((n, e) => n + e.value.length, 0));
  chart.figure.dataset.runs = ids.join(",");
  chart.figure.dataset.sampled = String(entries.some((e) => e.sampled));
  updateLabel(chart);
}

/** The caption's "last value" (single run): the newest point of the full view. */
function updateLabel(chart) {
  const id = chart.runs.length === 1 ? chart.runs[0] : null;
  const entry = id === null ? undefined : state.series[id]?.[chart.key];
  const point = entry === undefined ? null : lastPoint(entry);
  if (point === null) {
    chart.last.textContent = chart.runs.length > 1 ? `${chart.runs.length} runs` : "";
    chart.last.dataset.nonfinite = "false";
    return;
  }
  chart.last.textContent = `last step ${point.step}: ${formatValue(point.value)}`;
  chart.last.dataset.nonfinite = String(!Number.isFinite(point.value));
}

/** The tooltip of the chart under the cursor: every drawn run's value at that x. */
function showTooltip(chart, u) {
  if (hovered !== chart || u.cursor.left === undefined || u.cursor.left < 0 || chart.cache === null) {
    if (hovered === chart) tooltip.hidden = true;
    return;
  }
  const x = u.posToVal(u.cursor.left, "x");
  const { ids, entries, smooth } = chart.cache;
  const rows = [];
  let stepShown = null;
  ids.forEach((id, n) => {
    const entry = entries[n];
    const i = nearestIndex(xValues(entry, view.x, runs.get(id)?.created ?? 0), x);
    if (i < 0) return;
    if (stepShown === null) stepShown = entry.step[i];
    const row = make("div", "tooltip-row");
    const swatch = make("span", "swatch");
    swatch.style.setProperty("--c", colourOf(id));
    const value = smooth.length > 0 ? `${formatValue(smooth[n][i])} (raw ${formatValue(entry.value[i])})` : formatValue(entry.value[i]);
    row.append(swatch, make("span", "tooltip-name", runs.get(id)?.name || id), make("span", "tooltip-value", value));
    rows.push(row);
  });
  if (rows.length === 0) {
    tooltip.hidden = true;
    return;
  }
  const head = make("div", "tooltip-head", `${chart.key} · step ${stepShown}`);
  tooltip.replaceChildren(head, ...rows);
  tooltip.hidden = false;
  const rect = u.over.getBoundingClientRect();
  const left = rect.left + u.cursor.left + 14;
  const maxLeft = window.innerWidth - tooltip.offsetWidth - 8;
  tooltip.style.left = `${Math.max(8, Math.min(left, maxLeft))}px`;
  tooltip.style.top = `${Math.max(8, rect.top + (u.cursor.top ?? 0) + 14)}px`;
}

/** The theme changed: rebuild the plots with the new colours. */
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
  themeGeneration += 1;
  palette = null;
  renderRunList();
  renderLegend();
  markAllDirty();
});

// ---- start ----------------------------------------------------------------

syncToolbar();
renderRunList();
renderEmptyState();
connect();
