// DOM and WebSocket wiring of the trainwire dashboard.
//
// Speaks the JSON protocol of docs/protocol.md ("Dashboard <-> server") over
// /ws/dashboard on the page's own host. All data shaping is in charts.js
// (pure, tested with node --test); this module only moves data between the
// socket, that module and the DOM. User-supplied strings (run names,
// projects, metric keys, config) only ever reach the DOM as text nodes.
//
// Hooks for browser tests:
//   #conn[data-state]              "connecting" | "live" | "reconnecting"
//   [data-run-id]                  one per run-list entry (a button)
//   [data-key][data-points]        one per chart; data-points is the number
//                                  of points drawn, updated after each render
//   window.__trainwire             {lastSeq, series}: run id -> last applied
//                                  seq / run id -> metric key -> {step, time, value}

import uPlot from "./vendor/uplot/uPlot.esm.js";
import {
  applyPointsFrame,
  attemptAfterClose,
  backoffDelay,
  configEntries,
  formatValue,
  groupKeys,
  lastPoint,
  newStore,
  pickRun,
  resumeAfter,
  sortRuns,
  toUPlotData,
} from "./charts.js";

const PROTOCOL_VERSION = 1;
const CHART_HEIGHT = 200;
const STATUS_MS = 6000;

// ---- state ----------------------------------------------------------------

/** Points state, shaped by charts.applyPointsFrame. Holds the selected run only. */
const state = { lastSeq: newStore(), series: newStore() };
window.__trainwire = Object.freeze({ lastSeq: state.lastSeq, series: state.series });

/** @type {Map<string, import("./charts.js").RunInfo>} */
const runs = new Map();
/** @type {string|null} the selected run's id */
let selected = null;
/** The run asked for by the URL at load (`?run=ID`), until a run is selected. */
const wantedRun = new URLSearchParams(location.search).get("run");

/** @type {WebSocket|null} */
let socket = null;
/** Failed or short-lived connections since the last stable one (see attemptAfterClose). */
let attempt = 0;
let retryTimer = null;
let everConnected = false;
/** Whether a `runs` message has arrived yet (for the empty-state text). */
let runsReceived = false;

/** Per metric key: {figure, last, plotBox, plot, group}. */
const charts = new Map();
/** Per group: {section, grid}. */
const groups = new Map();
/** Group -> palette index, in order of first appearance. */
const groupColours = new Map();
/** Plot container -> its chart entry, for the ResizeObserver. */
const chartOfBox = new WeakMap();
/** Keys whose chart needs new data drawn at the next animation frame. */
const dirty = new Set();
let renderScheduled = false;

const $ = (id) => document.getElementById(id);
const el = {
  conn: $("conn"),
  status: $("status"),
  runs: $("runs"),
  runsEmpty: $("runs-empty"),
  header: $("run-header"),
  name: $("run-name"),
  project: $("run-project"),
  runStatus: $("run-status"),
  created: $("run-created"),
  runId: $("run-id"),
  config: $("run-config"),
  configBox: $("run-config-box"),
  charts: $("charts"),
  chartsEmpty: $("charts-empty"),
};

/** Create an element with a class and, optionally, text (as a text node). */
function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- connection -----------------------------------------------------------

const CONN_TEXT = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…" };

function setConn(stateName) {
  el.conn.dataset.state = stateName;
  el.conn.textContent = CONN_TEXT[stateName];
}

let statusTimer = null;

/** Show a message briefly in the status area. */
function showStatus(text) {
  el.status.textContent = text;
  el.status.title = text;
  el.status.hidden = false;
  clearTimeout(statusTimer);
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
    for (const id of subscribed) subscribe(id);
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
    scheduleReconnect();
  });
  // An "error" event is always followed by "close", which reconnects.
}

function scheduleReconnect() {
  setConn("reconnecting");
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, backoffDelay(attempt));
  attempt += 1;
}

/** Back online: retry now instead of waiting out the backoff. */
window.addEventListener("online", () => {
  if (retryTimer !== null) {
    clearTimeout(retryTimer);
    connect();
  }
});

function send(message) {
  if (socket !== null && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify(message));
  }
}

// Runs this page follows. A run stays subscribed after the user selects another:
// unsubscribing would let frames already in flight for it arrive after a later
// re-subscribe, and a frame cannot tell which subscription it answers. Kept, each
// run has one unbroken stream per connection, and re-selecting it draws at once.
const subscribed = new Set();

/** Subscribe to a run from where this page left it (0 = full snapshot). */
function subscribe(id) {
  subscribed.add(id);
  send({ type: "subscribe", run: id, after: resumeAfter(state.lastSeq, id) });
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
  runs.clear();
  for (const info of list) runs.set(info.id, info);
  renderRunList();
  if (selected === null) {
    const pick = pickRun(runs.values(), wantedRun);
    if (pick !== null) select(pick);
    else renderEmptyState();
  } else {
    renderHeader();
  }
}

function onRun(info) {
  if (info === null || typeof info !== "object" || typeof info.id !== "string") {
    throw new TypeError("run message without a RunInfo");
  }
  if (info.status === "deleted") {
    // Deleted by an admin: forget it; if it was on screen, show the empty state.
    runs.delete(info.id);
    subscribed.delete(info.id);
    delete state.series[info.id];
    delete state.lastSeq[info.id];
    renderRunList();
    if (selected === info.id) {
      selected = null;
      clearCharts();
      renderHeader();
      renderEmptyState();
    }
    return;
  }
  runs.set(info.id, info);
  renderRunList();
  if (selected === null) select(info.id); // the first run to appear
  else if (selected === info.id) renderHeader();
}

function onPoints(frame) {
  const result = applyPointsFrame(state, frame);
  if (result === null) return; // already seen
  if (frame.run !== selected) return; // kept for when it is selected again
  if (result.added.length > 0) addCharts();
  for (const key of result.changed) dirty.add(key);
  scheduleRender();
}

// ---- selection ------------------------------------------------------------

function select(id) {
  if (id === selected) return;
  clearCharts();
  selected = id;
  const url = new URL(location.href);
  url.searchParams.set("run", id);
  history.replaceState(history.state, "", url);
  renderRunList();
  renderHeader();
  renderEmptyState();
  if (subscribed.has(id)) {
    // Followed all along: draw what is already here.
    if (state.series[id] !== undefined) {
      addCharts();
      for (const key of Object.keys(state.series[id])) dirty.add(key);
      scheduleRender();
    }
  } else {
    subscribe(id);
  }
}

el.runs.addEventListener("click", (event) => {
  const button = event.target.closest("[data-run-id]");
  if (button !== null && el.runs.contains(button)) select(button.dataset.runId);
});

// ---- run list and header ----------------------------------------------------

function badge(status) {
  const node = make("span", "badge", status);
  node.dataset.status = status;
  return node;
}

function renderRunList() {
  const items = sortRuns(runs.values()).map((info) => {
    const button = make("button", "run");
    button.type = "button";
    button.dataset.runId = info.id;
    button.title = `${info.project} / ${info.name || info.id}`;
    if (info.id === selected) button.setAttribute("aria-current", "true");
    button.append(
      make("span", "run-name-text", info.name || info.id),
      make("span", "run-project-text", info.project),
      badge(info.status),
    );
    const li = make("li");
    li.append(button);
    return li;
  });
  el.runs.replaceChildren(...items);
  el.runsEmpty.hidden = items.length > 0;
}

function renderHeader() {
  const info = selected === null ? undefined : runs.get(selected);
  if (info === undefined) {
    // Nothing selected, or a selected run that the server did not list.
    el.header.hidden = selected === null;
    el.name.textContent = selected ?? "";
    el.project.textContent = "";
    el.runStatus.textContent = "unknown";
    el.runStatus.dataset.status = "unknown";
    el.created.textContent = "";
    el.runId.textContent = "";
    el.config.replaceChildren();
    el.configBox.hidden = true;
    return;
  }
  el.header.hidden = false;
  el.name.textContent = info.name || info.id;
  document.title = `${info.name || info.id} · trainwire`;
  el.project.textContent = info.project;
  el.runStatus.textContent = info.status;
  el.runStatus.dataset.status = info.status;
  el.created.textContent = Number.isFinite(info.created)
    ? `started ${new Date(info.created * 1000).toLocaleString()}`
    : "";
  el.runId.textContent = info.id;
  const rows = configEntries(info.config);
  el.config.replaceChildren(...rows.flatMap(([key, value]) => [make("dt", "", key), make("dd", "", value)]));
  el.configBox.hidden = rows.length === 0;
}

function renderEmptyState() {
  let text = "";
  if (selected === null) {
    text = !runsReceived ? "Waiting for the server…" : runs.size === 0 ? "No runs yet." : "Select a run.";
  } else if (charts.size === 0) {
    text = "Waiting for metrics…";
  }
  el.chartsEmpty.textContent = text;
  el.chartsEmpty.hidden = text === "";
}

// ---- charts ---------------------------------------------------------------

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/**
 * uPlot axis size that fits the longest tick label (after uPlot's autosize
 * demo). uPlot lays out in up to 3 cycles; the first may see splits for a
 * stale plot height, so measure in cycles 1 and 2 and keep the size in the
 * last one (whose layout is not recomputed).
 */
function axisSize(u, values, axisIdx, cycleNum) {
  const axis = u.axes[axisIdx];
  if (cycleNum > 2) return axis._size;
  let size = axis.ticks.size + axis.gap;
  const longest = (values ?? []).reduce((acc, v) => (v.length > acc.length ? v : acc), "");
  if (longest !== "") {
    u.ctx.font = axis.font[0];
    size += u.ctx.measureText(longest).width / devicePixelRatio;
  }
  return Math.ceil(size);
}

/** Plots -> consecutive re-layouts asked by fitYAxis (to stop after a few). */
const refits = new WeakMap();

/**
 * After a draw, check that the y tick labels fit the axis; if not (uPlot
 * stops its layout after 3 cycles, which a first draw or axes appearing can
 * need more than), lay out once more from the settled plot size.
 */
function fitYAxis(u) {
  const axis = u.axes[1];
  if (!axis._show || !axis._values) return;
  if (axisSize(u, axis._values, 1, 1) <= axis._size) {
    refits.delete(u);
    return;
  }
  const count = refits.get(u) ?? 0;
  if (count >= 2) return;
  refits.set(u, count + 1);
  queueMicrotask(() => u.setSize({ width: u.width, height: u.height }));
}

const tickValues = (u, splits) => splits.map((v) => (v === null ? "" : formatValue(v)));

function colourFor(group) {
  if (!groupColours.has(group)) groupColours.set(group, groupColours.size % 6);
  return cssVar(`--series-${groupColours.get(group)}`);
}

function plotOptions(key, group, width) {
  const axisColour = cssVar("--axis");
  const gridColour = cssVar("--grid");
  const axis = {
    stroke: axisColour,
    grid: { stroke: gridColour, width: 1 },
    ticks: { stroke: gridColour, width: 1 },
    values: tickValues,
  };
  return {
    width,
    height: CHART_HEIGHT,
    legend: { show: false },
    cursor: { drag: { x: false, y: false, setScale: false } },
    scales: { x: { time: false } },
    series: [{ label: "step" }, { label: key, stroke: colourFor(group), width: 1.5, spanGaps: false }],
    axes: [{ ...axis, size: 36 }, { ...axis, size: axisSize }],
    hooks: { setCursor: [(u) => updateLabel(key, u.cursor.idx)], draw: [fitYAxis] },
  };
}

/** The "last value" label; while hovering, the value under the cursor. */
function updateLabel(key, hoverIdx = null) {
  const chart = charts.get(key);
  const entry = selected === null ? undefined : state.series[selected]?.[key];
  if (chart === undefined || entry === undefined) return;
  let point = lastPoint(entry);
  let prefix = "last";
  if (hoverIdx !== null && hoverIdx !== undefined && hoverIdx < entry.value.length) {
    point = { step: entry.step[hoverIdx], value: entry.value[hoverIdx] };
    prefix = "at";
  }
  if (point === null) {
    chart.last.textContent = "";
    chart.last.dataset.nonfinite = "false";
    return;
  }
  chart.last.textContent = `${prefix} step ${point.step}: ${formatValue(point.value)}`;
  chart.last.dataset.nonfinite = String(!Number.isFinite(point.value));
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

function newPlot(chart, key) {
  const width = Math.max(200, Math.floor(chart.plotBox.clientWidth) || 0);
  // Built with the data it has: its first layout then sees the real ticks.
  const entry = state.series[selected]?.[key];
  const data = entry === undefined ? [[], []] : toUPlotData(entry);
  chart.plot = new uPlot(plotOptions(key, chart.group, width), data, chart.plotBox);
}

/** Create charts for new keys of the selected run and lay all out in order. */
function addCharts() {
  const store = state.series[selected];
  const layout = groupKeys(Object.keys(store));
  for (const { group, keys } of layout) {
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
    for (const key of keys) {
      let chart = charts.get(key);
      if (chart === undefined) {
        const figure = make("figure", "chart");
        figure.dataset.key = key;
        figure.dataset.points = "0";
        const caption = make("figcaption", "chart-caption");
        const last = make("span", "chart-last");
        caption.append(make("span", "chart-key", key), last);
        caption.firstChild.title = key;
        const plotBox = make("div", "chart-plot");
        figure.append(caption, plotBox);
        g.grid.append(figure);
        chart = { figure, last, plotBox, plot: null, group };
        chartOfBox.set(plotBox, chart);
        charts.set(key, chart);
        newPlot(chart, key);
        resizer.observe(plotBox);
        dirty.add(key);
      } else {
        g.grid.append(chart.figure);
      }
    }
  }
  renderEmptyState();
}

function clearCharts() {
  for (const chart of charts.values()) {
    resizer.unobserve(chart.plotBox);
    chart.plot.destroy();
  }
  charts.clear();
  groups.clear();
  groupColours.clear();
  dirty.clear();
  el.charts.replaceChildren();
}

function scheduleRender() {
  if (renderScheduled) return;
  renderScheduled = true;
  requestAnimationFrame(render);
}

/** Draw the new data of every dirty chart (at most once per frame). */
function render() {
  renderScheduled = false;
  const store = selected === null ? undefined : state.series[selected];
  for (const key of dirty) {
    const chart = charts.get(key);
    const entry = store?.[key];
    if (chart === undefined || entry === undefined) continue;
    chart.plot.setData(toUPlotData(entry));
    chart.figure.dataset.points = String(entry.value.length);
    updateLabel(key, chart.plot.cursor.idx);
  }
  dirty.clear();
}

/** The theme changed: rebuild the plots with the new colours. */
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
  for (const [key, chart] of charts) {
    chart.plot.destroy();
    newPlot(chart, key);
    dirty.add(key);
  }
  scheduleRender();
});

// ---- start ----------------------------------------------------------------

renderEmptyState();
connect();
