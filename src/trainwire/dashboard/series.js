// Shaping one metric's series for drawing: min/max downsampling, EMA
// smoothing, live points merged into a (possibly downsampled) view, and runs
// aligned on one x axis for an overlay chart.
//
// Pure like charts.js: no DOM, socket, timer or clock; tested with node --test
// (tests/dashboard/series.test.mjs).
//
// A series ("entry") is columnar and sorted by step, ties in logging order:
//   {step: number[], time: number[], value: number[], sampled?: boolean}
// `value` holds decoded numbers (NaN and +-Infinity included). `sampled` is
// true when the entry is a min/max downsampling of more points than it holds.

/**
 * Indices of the points that min/max downsampling keeps: the steps
 * `[start, end]` are cut into `buckets` equal-width intervals and each
 * non-empty interval keeps its lowest and its highest value (one index when
 * they are the same point), so no spike vanishes. +-Infinity take part; NaN
 * does not, but an interval holding only NaN keeps its first point, so the
 * chart still shows the gap. The same rule as the server's
 * trainwire.storage.downsample, which is tested against the same reference.
 *
 * @param {number[]} step ascending
 * @param {number[]} value same length
 * @param {number} buckets at least 1
 * @param {number} [start] default step[0]
 * @param {number} [end] default the last step
 * @returns {number[]} ascending indices into the columns
 */
export function minMaxIndices(step, value, buckets, start = step[0], end = step[step.length - 1]) {
  const n = step.length;
  const kept = [];
  if (n === 0) return kept;
  const width = end - start + 1;
  let bucket = -1;
  let lo = -1;
  let hi = -1;
  let first = -1;
  const flush = () => {
    if (bucket < 0) return;
    if (lo < 0) kept.push(first);
    else if (lo === hi) kept.push(lo);
    else kept.push(Math.min(lo, hi), Math.max(lo, hi));
  };
  for (let i = 0; i < n; i++) {
    const b = Math.min(buckets - 1, Math.max(0, Math.floor(((step[i] - start) / width) * buckets)));
    if (b !== bucket) {
      flush();
      bucket = b;
      lo = hi = -1;
      first = i;
    }
    const v = value[i];
    if (Number.isNaN(v)) continue;
    if (lo < 0 || v < value[lo]) lo = i;
    if (hi < 0 || v > value[hi]) hi = i;
  }
  flush();
  return kept;
}

/**
 * Buckets for at most `points` points: two per bucket, and from 4 points on two
 * more for the first and the last point. The server's bucket_count.
 *
 * @param {number} points
 * @returns {number}
 */
export function bucketCount(points) {
  return points >= 4 ? Math.max(1, Math.floor((points - 2) / 2)) : Math.max(1, Math.floor(points / 2));
}

/**
 * An entry downsampled to about `maxPoints` values (two per bucket) if it holds
 * more (every bucket's extremes, and the first and last points); else the entry
 * itself. Downsampling a downsampled entry keeps every bucket's extremes, so live
 * compaction never loses a spike either.
 *
 * @param {{step: number[], time: number[], value: number[], sampled?: boolean}} entry
 * @param {number} maxPoints at least 2
 * @returns {{step: number[], time: number[], value: number[], sampled: boolean}}
 */
export function downsample(entry, maxPoints) {
  const n = entry.value.length;
  if (n <= maxPoints) return { ...entry, sampled: entry.sampled === true };
  let keep = minMaxIndices(entry.step, entry.value, bucketCount(maxPoints));
  if (maxPoints >= 4) {
    // The first and the newest point too (the caption's last value, follow's edge).
    if (keep[0] !== 0) keep.unshift(0);
    if (keep[keep.length - 1] !== n - 1) keep.push(n - 1);
  }
  return {
    step: keep.map((i) => entry.step[i]),
    time: keep.map((i) => entry.time[i]),
    value: keep.map((i) => entry.value[i]),
    sampled: true,
  };
}

/**
 * Exponential moving average as TensorBoard draws it: debiased (the first
 * values are not pulled towards 0), in x order, non-finite values passed
 * through unchanged and left out of the average.
 *
 * @param {number[]} values
 * @param {number} weight in [0, 1): 0 is no smoothing
 * @returns {number[]} a new array
 */
export function ema(values, weight) {
  const w = Math.min(Math.max(Number(weight) || 0, 0), 0.999);
  if (w === 0) return values.slice();
  const out = new Array(values.length);
  let last = 0;
  let count = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) {
      out[i] = v;
      continue;
    }
    last = last * w + (1 - w) * v;
    count += 1;
    out[i] = last / (1 - w ** count);
  }
  return out;
}

/**
 * Append points to an entry, keeping it sorted by step (ties in logging
 * order). The usual live case, every new step at or after the last one, is a
 * plain append; a step from the past (a resumed run logging again) is merged
 * in place.
 *
 * @param {{step: number[], time: number[], value: number[]}} entry changed in place
 * @param {number[]} step
 * @param {number[]} time
 * @param {number[]} value decoded
 */
export function insertPoints(entry, step, time, value) {
  let sorted = true;
  let last = entry.step.length > 0 ? entry.step[entry.step.length - 1] : -Infinity;
  for (let i = 0; i < step.length; i++) {
    if (step[i] < last) sorted = false;
    last = step[i];
  }
  if (sorted) {
    for (let i = 0; i < step.length; i++) {
      entry.step.push(step[i]);
      entry.time.push(time[i]);
      entry.value.push(value[i]);
    }
    return;
  }
  const order = step.map((_, i) => i).sort((a, b) => step[a] - step[b] || a - b);
  const old = { step: entry.step.slice(), time: entry.time.slice(), value: entry.value.slice() };
  entry.step.length = entry.time.length = entry.value.length = 0;
  let i = 0;
  let j = 0;
  while (i < old.step.length || j < order.length) {
    const takeOld = j >= order.length || (i < old.step.length && old.step[i] <= step[order[j]]);
    if (takeOld) {
      entry.step.push(old.step[i]);
      entry.time.push(old.time[i]);
      entry.value.push(old.value[i]);
      i += 1;
    } else {
      const k = order[j];
      entry.step.push(step[k]);
      entry.time.push(time[k]);
      entry.value.push(value[k]);
      j += 1;
    }
  }
}

/**
 * Align several runs' series on one ascending x axis, for a uPlot overlay:
 * `[xs, ys0, ys1, ...]`. Where a run has no point at an x, its column holds
 * `undefined` (uPlot draws across it); a non-finite value becomes `null`
 * (uPlot draws a gap: the user sees where the loss went NaN).
 *
 * @param {number[][]} xs one ascending x array per run
 * @param {number[][]} ys the values, same shapes
 * @returns {Array<Array<number|null|undefined>>}
 */
export function alignSeries(xs, ys) {
  const k = xs.length;
  const clean = (v) => (Number.isFinite(v) ? v : null);
  if (k === 1) return [xs[0], ys[0].map(clean)];
  const out = [[]];
  for (let s = 0; s < k; s++) out.push([]);
  const pos = new Array(k).fill(0);
  for (;;) {
    let x = Infinity;
    for (let s = 0; s < k; s++) if (pos[s] < xs[s].length && xs[s][pos[s]] < x) x = xs[s][pos[s]];
    if (x === Infinity) break;
    out[0].push(x);
    for (let s = 0; s < k; s++) {
      if (pos[s] < xs[s].length && xs[s][pos[s]] === x) {
        out[s + 1].push(clean(ys[s][pos[s]]));
        pos[s] += 1;
      } else {
        out[s + 1].push(undefined);
      }
    }
  }
  return out;
}

/**
 * The indices, from `i0` to `i1`, of the points a line cannot show: values whose
 * neighbours on both sides (skipping `undefined`, which uPlot draws across) are
 * gaps (`null`) or the ends of the data. A metric logged once (a test accuracy),
 * the first point of a per-epoch one, a value between two NaNs: drawn as a line
 * alone, each is nothing at all; uPlot draws these as dots. null if there are none.
 *
 * @param {Array<number|null|undefined>} ys one aligned column
 * @param {number} i0 first index in view
 * @param {number} i1 last index in view
 * @returns {number[] | null}
 */
export function lonePoints(ys, i0, i1) {
  const lone = [];
  let k = i0 - 1;
  while (k >= 0 && ys[k] === undefined) k--;
  let before = k >= 0 ? ys[k] : null; // the last defined value before i: null for a gap or none
  for (let i = i0; i <= i1; i++) {
    const v = ys[i];
    if (v === undefined) continue;
    if (v !== null && before === null) {
      let j = i + 1;
      while (j < ys.length && ys[j] === undefined) j++;
      if (j >= ys.length || ys[j] === null) lone.push(i);
    }
    before = v;
  }
  return lone.length > 0 ? lone : null;
}

/**
 * Index of the x nearest to `x` in an ascending array, or -1 if it is empty.
 *
 * @param {number[]} xs
 * @param {number} x
 * @returns {number}
 */
export function nearestIndex(xs, x) {
  if (xs.length === 0) return -1;
  let lo = 0;
  let hi = xs.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  if (lo > 0 && Math.abs(xs[lo - 1] - x) <= Math.abs(xs[lo] - x)) return lo - 1;
  return lo;
}

/** The x axes a chart can use. */
export const X_MODES = Object.freeze(["step", "wall", "relative"]);

/**
 * A series' x values for an x mode: its steps, its wall-clock times (Unix
 * seconds), or seconds since `origin` (the run's start).
 *
 * @param {{step: number[], time: number[]}} entry
 * @param {"step"|"wall"|"relative"} mode
 * @param {number} origin
 * @returns {number[]}
 */
export function xValues(entry, mode, origin = 0) {
  if (mode === "wall") return entry.time;
  if (mode === "relative") return entry.time.map((t) => t - origin);
  return entry.step;
}

/**
 * The steps to fetch for an x range drawn in any mode: in step mode the range
 * itself (widened to whole steps); in a time mode, from the points of `entry`
 * whose x falls inside, widened by one point on each side so the line reaches
 * the chart's edges. null when nothing of the entry is in range.
 *
 * @param {{step: number[], time: number[]}} entry
 * @param {"step"|"wall"|"relative"} mode
 * @param {number} origin
 * @param {number} min
 * @param {number} max
 * @returns {[number, number] | null}
 */
export function stepRange(entry, mode, origin, min, max) {
  if (mode === "step") return [Math.floor(min), Math.ceil(max)];
  const xs = xValues(entry, mode, origin);
  let first = -1;
  let last = -1;
  for (let i = 0; i < xs.length; i++) {
    if (xs[i] >= min && xs[i] <= max) {
      if (first < 0) first = i;
      last = i;
    }
  }
  if (first < 0) return null;
  first = Math.max(0, first - 1);
  last = Math.min(xs.length - 1, last + 1);
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = first; i <= last; i++) {
    lo = Math.min(lo, entry.step[i]);
    hi = Math.max(hi, entry.step[i]);
  }
  return [lo, hi];
}
