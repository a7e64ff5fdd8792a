// Pure data shaping for the trainwire dashboard.
//
// Nothing here touches the DOM, a socket, a timer or a clock: every function
// takes its input and hands back its output (`mergePoints` and
// `applyPointsFrame` append to the store they are given, which is their whole
// job), so all of it runs under `node --test` (tests/dashboard/). The DOM and
// WebSocket wiring lives in app.js.
//
// Wire format (docs/protocol.md, "Dashboard <-> server"): a `points` frame is
//   {"type": "points", "run": ID, "seq": N,
//    "series": {KEY: {"step": [...], "time": [...], "value": [...]}}}
// where a non-finite value travels as the string "NaN", "Infinity" or
// "-Infinity".
//
// Stores are objects with a null prototype, not `{}`: their keys (run ids,
// metric keys) come from users, and a metric called `__proto__` must be an
// ordinary key, not a write to the prototype.

import { insertPoints } from "./series.js";

/** Group name for metric keys that have no `prefix/`. */
export const OTHER_GROUP = "other";

/** Spellings the protocol uses for non-finite values (as `String(x)` gives). */
const NON_FINITE = new Set(["NaN", "Infinity", "-Infinity"]);

/**
 * Decode one value of a `points` frame's `value` array.
 *
 * @param {number|string} v a number, or "NaN" / "Infinity" / "-Infinity"
 * @returns {number} the number, possibly NaN or +-Infinity
 * @throws {TypeError} on anything else (a protocol violation)
 */
export function decodeValue(v) {
  if (typeof v === "number") return v;
  if (typeof v === "string" && NON_FINITE.has(v)) return Number(v);
  throw new TypeError(`not a metric value: ${JSON.stringify(v)}`);
}

/**
 * The group a metric key belongs to: the part before its first `/`
 * (`train/loss` -> `train`, `a/b/c` -> `a`), or OTHER_GROUP when the key has
 * no slash or starts with one (`lr` -> `other`).
 *
 * @param {string} key
 * @returns {string}
 */
export function groupKey(key) {
  const slash = key.indexOf("/");
  return slash > 0 ? key.slice(0, slash) : OTHER_GROUP;
}

/** Compare strings by code unit (stable, locale-independent order). */
function byCodeUnit(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Arrange metric keys in groups, in display order: groups by name with
 * OTHER_GROUP last, keys by name within each group. Duplicates are dropped.
 *
 * @param {Iterable<string>} keys
 * @returns {{group: string, keys: string[]}[]}
 */
export function groupKeys(keys) {
  const groups = new Map();
  for (const key of new Set(keys)) {
    const group = groupKey(key);
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(key);
  }
  const names = [...groups.keys()].sort((a, b) => {
    if (a === OTHER_GROUP) return b === OTHER_GROUP ? 0 : 1;
    if (b === OTHER_GROUP) return -1;
    return byCodeUnit(a, b);
  });
  return names.map((group) => ({ group, keys: groups.get(group).sort(byCodeUnit) }));
}

/**
 * @typedef {{step: number[], time: number[], value: number[]}} SeriesEntry
 *   One metric's points, columnar, in arrival order; `value` holds decoded
 *   numbers (NaN and +-Infinity included).
 * @typedef {Object<string, SeriesEntry>} SeriesStore
 *   Metric key -> entry, for one run (null prototype; see newStore).
 */

/**
 * A fresh, empty store (an object with a null prototype, so any string,
 * `__proto__` included, is an ordinary key).
 *
 * @returns {Object<string, any>}
 */
export function newStore() {
  return Object.create(null);
}

/**
 * Add the columns of a frame's `series` to a per-key store, each entry kept
 * sorted by step (ties in arrival order; see series.insertPoints).
 *
 * Validates the whole frame before changing anything, so a malformed frame
 * leaves the store as it was.
 *
 * @param {SeriesStore} store appended to in place (entries are created as needed)
 * @param {Object<string, {step: number[], time: number[], value: (number|string)[]}>} series
 * @returns {{changed: string[], added: string[]}} keys that received points,
 *   and the subset that was not in the store before
 * @throws {TypeError} if a column is missing, columns differ in length, or a
 *   value cannot be decoded
 */
export function mergePoints(store, series) {
  if (series === null || typeof series !== "object" || Array.isArray(series)) {
    throw new TypeError("series must be an object");
  }
  const decoded = [];
  for (const [key, cols] of Object.entries(series)) {
    if (cols === null || typeof cols !== "object") throw new TypeError(`series ${JSON.stringify(key)} is not an object`);
    const { step, time, value } = cols;
    if (!Array.isArray(step) || !Array.isArray(time) || !Array.isArray(value)) {
      throw new TypeError(`series ${JSON.stringify(key)} lacks step/time/value arrays`);
    }
    if (step.length !== value.length || time.length !== value.length) {
      throw new TypeError(`series ${JSON.stringify(key)} has columns of different lengths`);
    }
    for (const s of step) if (typeof s !== "number") throw new TypeError(`series ${JSON.stringify(key)}: step is not a number`);
    decoded.push([key, step, time, value.map(decodeValue)]);
  }
  const changed = [];
  const added = [];
  for (const [key, step, time, value] of decoded) {
    if (value.length === 0) continue;
    let entry = store[key];
    if (entry === undefined) {
      entry = store[key] = { step: [], time: [], value: [] };
      added.push(key);
    }
    insertPoints(entry, step, time, value);
    changed.push(key);
  }
  return { changed, added };
}

/**
 * Apply a `points` frame to the dashboard state, honouring `seq`: a frame
 * whose seq is not above the last one applied for its run is ignored (it was
 * already seen).
 *
 * @param {{lastSeq: Object<string, number>, series: Object<string, SeriesStore>}} state
 *   per-run last applied seq and per-run stores (null-prototype objects);
 *   updated in place
 * @param {{run: string, seq: number, series: object}} frame a decoded `points` message
 * @returns {{changed: string[], added: string[]} | null} as mergePoints, or
 *   null if the frame was ignored
 * @throws {TypeError} on a malformed frame (state unchanged)
 */
export function applyPointsFrame(state, frame) {
  const { run, seq } = frame;
  if (typeof run !== "string") throw new TypeError("points frame without a run id");
  if (!Number.isInteger(seq)) throw new TypeError("points frame without an integer seq");
  const last = state.lastSeq[run] ?? 0;
  if (seq <= last) return null;
  let store = state.series[run];
  const fresh = store === undefined;
  if (fresh) store = newStore();
  const result = mergePoints(store, frame.series);
  if (fresh) state.series[run] = store;
  state.lastSeq[run] = seq;
  return result;
}

/**
 * The `after` to send in a `subscribe` for a run: the last seq applied for
 * it, or 0 (full snapshot) if none.
 *
 * @param {Object<string, number>} lastSeq
 * @param {string} run
 * @returns {number}
 */
export function resumeAfter(lastSeq, run) {
  return lastSeq[run] ?? 0;
}

/**
 * The last point of a series, for a "last value" label.
 *
 * @param {SeriesEntry} entry
 * @returns {{step: number, value: number} | null} null if the series is empty
 */
export function lastPoint(entry) {
  const n = entry.value.length;
  return n === 0 ? null : { step: entry.step[n - 1], value: entry.value[n - 1] };
}

/**
 * Format a metric value for display: non-finite values as "NaN",
 * "Infinity", "-Infinity" (so a user sees their loss went NaN), very large or
 * very small magnitudes in exponent form, others with up to 6 significant
 * digits. null/undefined give an em dash.
 *
 * @param {number|null|undefined} v
 * @param {number} [extra] digits to show beyond those (see formatTicks)
 * @returns {string}
 */
export function formatValue(v, extra = 0) {
  if (v === null || v === undefined) return "\u2014";
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return "0";
  const abs = Math.abs(v);
  if (abs >= 1e6 || abs < 1e-4) {
    const [mantissa, exponent] = v.toExponential(4 + extra).split("e");
    return `${String(Number(mantissa))}e${exponent}`;
  }
  return String(Number(v.toPrecision(6 + extra)));
}

/**
 * Seconds since a run started as a clock: 0:42, 3:05, 1:02:03; with ``decimals``,
 * fractions of the second (0:01.25). Negative times (the first points, timed before
 * the server recorded the run) read as 0.
 *
 * @param {number} seconds
 * @param {number} [decimals]
 * @returns {string}
 */
export function formatClock(seconds, decimals = 0) {
  const scale = 10 ** decimals;
  const total = Math.round(Math.max(0, seconds) * scale) / scale;
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total - h * 3600 - m * 60;
  const sec = s.toFixed(decimals).padStart(decimals > 0 ? 3 + decimals : 2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

/**
 * Labels of relative-time ticks: whole seconds, or as many decimals (up to 3) as the
 * ticks need to be written exactly (1.25 s is 0:01.25, not 0:01.3). In whole
 * seconds, a zoom into a couple of seconds labelled every tick 0:01.
 *
 * @param {Array<number|null>} splits ascending tick values, in seconds
 * @returns {string[]}
 */
export function formatClockTicks(splits) {
  const ticks = splits.filter((v) => v !== null && v !== undefined);
  let decimals = 0;
  const exact = (d) => ticks.every((v) => Math.abs(v * 10 ** d - Math.round(v * 10 ** d)) < 1e-6);
  while (decimals < 3 && !exact(decimals)) decimals++;
  return splits.map((v) => (v === null || v === undefined ? "" : formatClock(v, decimals)));
}

/**
 * Labels of an axis' ticks: formatValue's, with as many more digits as it takes for
 * neighbouring ticks to differ. At formatValue's precision a zoom into steps past a
 * million labelled its ticks 1.0001e+6, 1.0001e+6, 1.0002e+6, and a metric moving in
 * its sixth digit repeated its y labels. null ticks (uPlot's gaps) are blank.
 *
 * @param {Array<number|null>} splits ascending tick values
 * @returns {string[]}
 */
export function formatTicks(splits) {
  let labels = [];
  // 17 significant digits tell any two doubles apart.
  for (let extra = 0; extra <= 12; extra++) {
    labels = splits.map((v) => (v === null || v === undefined ? "" : formatValue(v, extra)));
    if (labels.every((label, i) => i === 0 || label === "" || label !== labels[i - 1])) break;
  }
  return labels;
}

/**
 * Reconnect delay, exponential backoff with jitter: the ceiling
 * `min(cap, base * 2**attempt)` is scaled by a factor in [0.5, 1), so
 * clients that lost the same server do not all come back at once.
 *
 * @param {number} attempt failed attempts since the last good connection (0 for the first retry)
 * @param {{base?: number, cap?: number, random?: () => number}} [opts]
 *   base and cap in milliseconds (defaults 500 and 10000); random in [0, 1)
 *   (default Math.random; pass a constant in tests)
 * @returns {number} milliseconds to wait
 */
export function backoffDelay(attempt, { base = 500, cap = 10000, random = Math.random } = {}) {
  const n = Math.max(0, Math.floor(attempt));
  const ceiling = Math.min(cap, base * 2 ** Math.min(n, 52));
  return ceiling * (0.5 + 0.5 * random());
}

/**
 * The backoff attempt number to use once a connection has closed: a
 * connection that stayed up for `stableMs` was a good one, so the backoff
 * starts afresh (0); one that failed to open (`uptimeMs` null) or dropped
 * soon after opening keeps counting, so a server that accepts and then
 * drops us at once is not hammered at the base delay.
 *
 * @param {number} attempt the attempt count before this connection
 * @param {number|null} uptimeMs how long the connection was open, or null if it never opened
 * @param {number} [stableMs] default 5000
 * @returns {number}
 */
export function attemptAfterClose(attempt, uptimeMs, stableMs = 5000) {
  return uptimeMs !== null && uptimeMs >= stableMs ? 0 : attempt;
}

// ---- Runs ---------------------------------------------------------------
// (Kept here rather than in a module of its own: the run list's shaping is
// as small and as pure as the series' shaping.)

/**
 * @typedef {{id: string, project: string, name: string,
 *   status: "running"|"finished"|"crashed", created: number, updated: number,
 *   config: object}} RunInfo
 */

/**
 * Runs newest first (by `created`, then by id for a stable order).
 *
 * @param {Iterable<RunInfo>} runs
 * @returns {RunInfo[]} a new array
 */
export function sortRuns(runs) {
  return [...runs].sort((a, b) => (b.created - a.created) || byCodeUnit(a.id, b.id));
}

/**
 * The run to select: `wanted` if it is among the runs, else the newest
 * running run, else the newest run, else null.
 *
 * @param {Iterable<RunInfo>} runs
 * @param {string|null} [wanted] e.g. the `?run=` of the URL
 * @returns {string|null} a run id
 */
export function pickRun(runs, wanted = null) {
  const sorted = sortRuns(runs);
  if (wanted !== null && sorted.some((r) => r.id === wanted)) return wanted;
  const running = sorted.find((r) => r.status === "running");
  if (running) return running.id;
  return sorted.length > 0 ? sorted[0].id : null;
}

/**
 * A run's config as display rows: nested objects flattened to dotted keys
 * (`{optim: {lr: 0.1}}` -> `["optim.lr", "0.1"]`), strings as they are, other
 * values as JSON. Key order is the config's own.
 *
 * @param {unknown} config
 * @returns {[string, string][]}
 */
export function configEntries(config) {
  const rows = [];
  const walk = (prefix, value) => {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      const entries = Object.entries(value);
      if (entries.length === 0 && prefix !== "") rows.push([prefix, "{}"]);
      for (const [k, v] of entries) walk(prefix === "" ? k : `${prefix}.${k}`, v);
    } else if (prefix !== "") {
      rows.push([prefix, typeof value === "string" ? value : JSON.stringify(value) ?? String(value)]);
    }
  };
  walk("", config);
  return rows;
}
