// The dashboard's view as a URL fragment, so a link shows a colleague the
// same runs, metrics and chart settings. Pure; tested with node --test.
//
// The fragment (`#runs=a,b&smooth=0.6&log=1&x=wall&metrics=loss&zoom=100,900`)
// never reaches the server: no log, no proxy sees what someone is looking
// at, and it cannot collide with the `?token=` hand-off. Defaults are left
// out so links stay short. `?run=ID` (the link a trainer prints) still opens
// that run.

import { X_MODES } from "./series.js";

/**
 * @typedef {{
 *   runs: string[],          selected runs, in selection order (colour order)
 *   focus: string|null,      the run whose page is open, or null for the charts
 *   smooth: number,          EMA weight in [0, 0.99]
 *   log: boolean,            log-scale y
 *   x: "step"|"wall"|"relative",
 *   follow: boolean,         keep the newest data in view while live
 *   metrics: string,         filter on metric keys (substring, case-insensitive)
 *   q: string,               filter on the run list
 *   zoom: [number, number]|null   the x range shown, in the x mode's units
 * }} ViewState
 */

/** @returns {ViewState} */
export function defaultState() {
  return { runs: [], focus: null, smooth: 0, log: false, x: "step", follow: true, metrics: "", q: "", zoom: null };
}

/**
 * Read a view from a URL's fragment and query; anything malformed falls back
 * to its default rather than failing.
 *
 * @param {string} hash e.g. location.hash ("" or "#...")
 * @param {string} [search] e.g. location.search, for `?run=ID`
 * @returns {ViewState}
 */
export function parseState(hash, search = "") {
  const state = defaultState();
  // Split by hand, not with URLSearchParams: that would decode `runs` before
  // it is split on commas, and a run id holding a comma would become two.
  const raw = new Map();
  for (const part of (hash.startsWith("#") ? hash.slice(1) : hash).split("&")) {
    const eq = part.indexOf("=");
    if (eq > 0) raw.set(part.slice(0, eq), part.slice(eq + 1));
  }
  const params = { get: (key) => (raw.has(key) ? safeDecode(raw.get(key)) : null) };
  const runs = raw.get("runs");
  if (runs) state.runs = [...new Set(runs.split(",").filter(Boolean).map(safeDecode))];
  const legacy = new URLSearchParams(search).get("run");
  if (state.runs.length === 0 && legacy) state.runs = [legacy];
  const focus = params.get("focus");
  if (focus) state.focus = focus;
  const smooth = Number(params.get("smooth"));
  if (Number.isFinite(smooth)) state.smooth = Math.min(Math.max(smooth, 0), 0.99);
  state.log = params.get("log") === "1";
  const x = params.get("x");
  if (X_MODES.includes(x)) state.x = x;
  state.follow = params.get("follow") !== "0";
  state.metrics = params.get("metrics") ?? "";
  state.q = params.get("q") ?? "";
  const zoom = (params.get("zoom") ?? "").split(",").map((v) => (v === "" ? NaN : Number(v)));
  if (zoom.length === 2 && zoom.every(Number.isFinite) && zoom[0] < zoom[1]) state.zoom = [zoom[0], zoom[1]];
  return state;
}

/**
 * The fragment for a view (with its `#`), or "" for the default view.
 *
 * @param {ViewState} state
 * @returns {string}
 */
export function formatState(state) {
  const parts = [];
  // Run ids are encoded one by one, so a comma inside an id stays inside it.
  if (state.runs.length > 0) parts.push(`runs=${state.runs.map(encodeURIComponent).join(",")}`);
  const add = (key, value) => parts.push(`${key}=${encodeURIComponent(value)}`);
  if (state.focus) add("focus", state.focus);
  if (state.smooth > 0) add("smooth", String(Number(state.smooth.toFixed(3))));
  if (state.log) add("log", "1");
  if (state.x !== "step") add("x", state.x);
  if (!state.follow) add("follow", "0");
  if (state.metrics) add("metrics", state.metrics);
  if (state.q) add("q", state.q);
  // Shortest exact spelling: rounding would move a narrow wall-time zoom (Unix seconds).
  if (state.zoom) parts.push(`zoom=${state.zoom.map((v) => String(v)).join(",")}`);
  return parts.length > 0 ? `#${parts.join("&")}` : "";
}

function safeDecode(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}
