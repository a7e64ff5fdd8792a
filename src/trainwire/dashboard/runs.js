// The run list and the run page, as data: filtering, durations, "n s ago",
// the metrics summary and the environment. Pure; tested with node --test.
// (Sorting, picking and config flattening live in charts.js, where they were
// first; this module holds what the run list and run page added.)

/**
 * The runs that match a search (every whitespace-separated word must occur,
 * case-insensitively, in the run's name, project, id or status) and, when
 * given, a status.
 *
 * @param {Iterable<{id: string, project: string, name: string, status: string}>} runs
 * @param {string} query
 * @param {string} [status] "" for any
 * @returns {Array} the matching runs, in their input order
 */
export function filterRuns(runs, query, status = "") {
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  const out = [];
  for (const run of runs) {
    if (status && run.status !== status) continue;
    const text = `${run.name}\n${run.project}\n${run.id}\n${run.status}`.toLowerCase();
    if (words.every((w) => text.includes(w))) out.push(run);
  }
  return out;
}

/**
 * The part of the filtered run list that is drawn: the first `limit` runs, and
 * after them the selected runs that lie further down (a run on the charts keeps
 * its checkbox). A team's server holds thousands of runs; drawing every one took
 * half a second, at every run's status update.
 *
 * @template {{id: string}} R
 * @param {R[]} shown the runs that match, in list order
 * @param {string[]} selected ids of the runs on the charts
 * @param {number} limit
 * @returns {{listed: R[], hidden: number}} what to draw, and how many matches are not
 */
export function listedRuns(shown, selected, limit) {
  if (shown.length <= limit) return { listed: shown, hidden: 0 };
  const listed = shown.slice(0, limit);
  const wanted = new Set(selected);
  for (let i = limit; i < shown.length && wanted.size > 0; i++) {
    if (wanted.has(shown[i].id)) listed.push(shown[i]);
  }
  return { listed, hidden: shown.length - listed.length };
}

/**
 * The control of the run list that has the keyboard focus, as what finds it again
 * in the list drawn anew (see {@link findControl}): its run's id (null for the
 * "show more" button, which belongs to no run) and its class. Null when the focus
 * is elsewhere. The list is drawn anew at every status update of a running run
 * (once a second each), and its elements with it: the focus went to the page's
 * start each time, and a keyboard user could neither tick a run nor page through.
 *
 * @param {Element} list the run list (`ul#runs`), whose children are its items
 * @param {Element|null} active `document.activeElement`
 * @returns {{run: string|null, part: string}|null}
 */
export function focusedControl(list, active) {
  if (active === null || active === list || !list.contains(active)) return null;
  let item = active;
  while (item.parentElement !== list) item = item.parentElement;
  return { run: item.dataset.runId ?? null, part: active.classList[0] ?? "" };
}

/**
 * The control {@link focusedControl} described, in the list as drawn now; null if
 * its run is no longer listed (filtered out, deleted).
 *
 * @param {Element} list
 * @param {{run: string|null, part: string}} where
 * @returns {HTMLElement|null}
 */
export function findControl(list, where) {
  if (where.part === "") return null;
  for (const item of list.children) {
    if ((item.dataset.runId ?? null) === where.run) return item.querySelector(`.${where.part}`);
  }
  return null;
}

/**
 * A duration for people: "42 s", "3 min 05 s", "2 h 07 min", "3 d 4 h".
 *
 * @param {number} seconds
 * @returns {string}
 */
export function formatDuration(seconds) {
  if (!Number.isFinite(seconds)) return "\u2014";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

// One formatter for every run: `toLocaleString(locales, options)` builds one per
// call, 170 µs each, which was most of a second per render of 5,000 runs.
const STARTED = new Intl.DateTimeFormat([], { dateStyle: "short", timeStyle: "short" });

/**
 * When a run started, short, in the reader's locale and time zone: what
 * `new Date(seconds * 1000).toLocaleString([], {dateStyle: "short", timeStyle: "short"})`
 * says.
 *
 * @param {number} seconds Unix seconds
 * @returns {string}
 */
export function formatStarted(seconds) {
  if (!Number.isFinite(seconds)) return "\u2014";
  return STARTED.format(new Date(seconds * 1000));
}

/**
 * "just now", "12 s ago", "5 min ago", "3 h ago", "2 d ago".
 *
 * @param {number} seconds how long ago; a clock slightly ahead gives "just now"
 * @returns {string}
 */
export function formatAgo(seconds) {
  if (!Number.isFinite(seconds)) return "\u2014";
  if (seconds < 1) return "just now";
  if (seconds < 60) return `${Math.floor(seconds)} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

/**
 * How long a run has run: until now while running, else until its last update.
 *
 * @param {{status: string, created: number, updated: number}} run
 * @param {number} now Unix seconds
 * @returns {number} seconds
 */
export function runDuration(run, now) {
  return (run.status === "running" ? now : run.updated) - run.created;
}

/**
 * The summary table of a run page, one row per metric key, keys in code-unit
 * order; a key missing from `summary` is left out.
 *
 * @param {Object<string, {count: number, last: number|string|null, last_step: number|null,
 *   min: number|string|null, max: number|string|null}>} summary as GET /api/runs/{id} sends it
 * @returns {{key: string, last: number|null, lastStep: number|null, min: number|null,
 *   max: number|null, count: number}[]} values decoded (non-finite spellings to numbers)
 */
export function summaryRows(summary) {
  if (summary === null || typeof summary !== "object") return [];
  const num = (v) => (v === null || v === undefined ? null : typeof v === "string" ? Number(v) : v);
  return Object.keys(summary)
    .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
    .map((key) => {
      const s = summary[key] ?? {};
      return {
        key,
        last: num(s.last),
        lastStep: s.last_step ?? null,
        min: num(s.min),
        max: num(s.max),
        count: Number(s.count) || 0,
      };
    });
}

/**
 * Colour slots for selected runs: a run keeps its slot while selected, a new
 * run takes the lowest free one, so adding a run never repaints the others.
 *
 * @param {Map<string, number>} slots run id -> slot, updated in place
 * @param {string[]} selected the selected run ids
 * @param {number} palette how many colours there are
 * @returns {Map<string, number>} the same map
 */
export function assignColours(slots, selected, palette) {
  const keep = new Set(selected);
  for (const id of [...slots.keys()]) if (!keep.has(id)) slots.delete(id);
  for (const id of selected) {
    if (slots.has(id)) continue;
    const used = new Set(slots.values());
    let slot = 0;
    while (used.has(slot) && slot < palette) slot += 1;
    slots.set(id, slot < palette ? slot : slots.size % palette);
  }
  return slots;
}
