// Tests of the pure series shaping (src/trainwire/dashboard/series.js).
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  alignSeries,
  downsample,
  ema,
  insertPoints,
  lonePoints,
  minMaxIndices,
  nearestIndex,
  stepRange,
  xValues,
} from "../../src/trainwire/dashboard/series.js";

// A seeded generator, so a failure names the case that produced it.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

// The reference: for every bucket, brute force over its points.
function bruteBuckets(step, value, buckets, start, end) {
  const groups = new Map();
  for (let i = 0; i < step.length; i++) {
    const b = Math.min(buckets - 1, Math.max(0, Math.floor(((step[i] - start) / (end - start + 1)) * buckets)));
    if (!groups.has(b)) groups.set(b, []);
    groups.get(b).push(i);
  }
  return groups;
}

function randomSeries(random, n) {
  const step = [];
  const value = [];
  let s = Math.floor(random() * 10);
  for (let i = 0; i < n; i++) {
    s += Math.floor(random() * 3); // repeated steps too
    step.push(s);
    const r = random();
    value.push(r < 0.05 ? NaN : r < 0.07 ? Infinity : r < 0.09 ? -Infinity : Math.round(random() * 100));
  }
  return { step, value };
}

test("minMaxIndices keeps every bucket's min and max (brute-force reference)", () => {
  for (let seed = 1; seed <= 300; seed++) {
    const random = rng(seed);
    const { step, value } = randomSeries(random, Math.floor(random() * 400));
    if (step.length === 0) continue;
    const buckets = 1 + Math.floor(random() * 50);
    const kept = minMaxIndices(step, value, buckets);
    assert.deepEqual(kept, [...kept].sort((a, b) => a - b), `seed ${seed}: ascending`);
    assert.equal(new Set(kept).size, kept.length, `seed ${seed}: no index twice`);
    assert.ok(kept.length <= 2 * buckets, `seed ${seed}: at most two per bucket`);
    const keptSet = new Set(kept);
    for (const [b, idx] of bruteBuckets(step, value, buckets, step[0], step.at(-1))) {
      const real = idx.filter((i) => !Number.isNaN(value[i]));
      const inBucket = idx.filter((i) => keptSet.has(i));
      assert.ok(inBucket.length >= 1, `seed ${seed} bucket ${b}: represented`);
      if (real.length === 0) {
        assert.deepEqual(inBucket, [idx[0]], `seed ${seed} bucket ${b}: all NaN keeps its first`);
        continue;
      }
      const min = Math.min(...real.map((i) => value[i]));
      const max = Math.max(...real.map((i) => value[i]));
      assert.ok(inBucket.some((i) => value[i] === min), `seed ${seed} bucket ${b}: min ${min} survives`);
      assert.ok(inBucket.some((i) => value[i] === max), `seed ${seed} bucket ${b}: max ${max} survives`);
    }
  }
});

test("a single spike among a million points survives downsampling", () => {
  const n = 1_000_000;
  const step = Array.from({ length: n }, (_, i) => i);
  const value = new Array(n).fill(1);
  value[777_777] = 1e9;
  const out = downsample({ step, time: step, value }, 2000);
  assert.ok(out.value.length <= 2000);
  assert.equal(out.sampled, true);
  assert.ok(out.value.includes(1e9));
  assert.equal(out.step[out.value.indexOf(1e9)], 777_777);
});

test("downsample leaves small series raw", () => {
  const entry = { step: [1, 2, 3], time: [10, 20, 30], value: [3, 1, 2] };
  assert.deepEqual(downsample(entry, 3), { ...entry, sampled: false });
});

test("downsampling a downsampled series keeps the extremes (live compaction)", () => {
  const random = rng(7);
  const { step, value } = randomSeries(random, 5000);
  const entry = { step, time: step, value };
  const once = downsample(entry, 400);
  const twice = downsample(once, 100);
  const finite = value.filter((v) => !Number.isNaN(v));
  assert.ok(twice.value.includes(Math.max(...finite)));
  assert.ok(twice.value.includes(Math.min(...finite)));
});

test("ema is debiased, like TensorBoard's", () => {
  assert.deepEqual(ema([5, 5, 5], 0.9), [5, 5, 5].map((v) => v)); // a constant stays constant
  const [a, b] = ema([0, 10], 0.5);
  assert.equal(a, 0);
  assert.equal(b, (0.5 * 0 * 0.5 + 0.5 * 10) / (1 - 0.25)); // (0.5*0.5*0 + 0.5*10)/0.75
});

test("ema passes non-finite values through and leaves them out of the average", () => {
  const out = ema([1, NaN, Infinity, 1], 0.6);
  assert.ok(Number.isNaN(out[1]));
  assert.equal(out[2], Infinity);
  assert.ok(Math.abs(out[3] - 1) < 1e-12);
});

test("ema with weight 0 is a copy", () => {
  const values = [1, 2, 3];
  const out = ema(values, 0);
  assert.deepEqual(out, values);
  assert.notEqual(out, values);
});

test("insertPoints appends in order and merges a step from the past stably", () => {
  const entry = { step: [1, 2, 4], time: [1, 2, 4], value: [10, 20, 40] };
  insertPoints(entry, [5, 6], [5, 6], [50, 60]);
  assert.deepEqual(entry.step, [1, 2, 4, 5, 6]);
  insertPoints(entry, [3, 2], [3.5, 2.5], [30, 21]);
  assert.deepEqual(entry.step, [1, 2, 2, 3, 4, 5, 6]);
  assert.deepEqual(entry.value, [10, 20, 21, 30, 40, 50, 60]); // the old step 2 first
});

test("alignSeries merges runs on one x axis with undefined holes and null for non-finite", () => {
  const data = alignSeries([[1, 3], [2, 3, 4]], [[10, NaN], [20, 30, Infinity]]);
  assert.deepEqual(data, [
    [1, 2, 3, 4],
    [10, undefined, null, undefined],
    [undefined, 20, 30, null],
  ]);
});

test("alignSeries of one run is its own x array", () => {
  const xs = [1, 2];
  const data = alignSeries([xs], [[1, -Infinity]]);
  assert.equal(data[0], xs);
  assert.deepEqual(data[1], [1, null]);
});

test("nearestIndex finds the closest x", () => {
  assert.equal(nearestIndex([], 3), -1);
  assert.equal(nearestIndex([1, 5, 9], 6), 1);
  assert.equal(nearestIndex([1, 5, 9], 8), 2);
  assert.equal(nearestIndex([1, 5, 9], -100), 0);
  assert.equal(nearestIndex([1, 5, 9], 100), 2);
});

test("xValues and stepRange map the x modes to steps", () => {
  const entry = { step: [0, 10, 20, 30], time: [100, 101, 102, 103], value: [0, 0, 0, 0] };
  assert.equal(xValues(entry, "step"), entry.step);
  assert.deepEqual(xValues(entry, "relative", 100), [0, 1, 2, 3]);
  assert.deepEqual(stepRange(entry, "step", 0, 4.5, 12.2), [4, 13]);
  assert.deepEqual(stepRange(entry, "wall", 0, 101, 102), [0, 30]); // widened by a point each side
  assert.deepEqual(stepRange(entry, "relative", 100, 1.5, 1.6), null);
});

test("downsample keeps the first and the newest point (the caption's last value, follow's edge)", () => {
  const n = 5000;
  const step = Array.from({ length: n }, (_, i) => i);
  const value = step.map((i) => (i === n - 1 ? 0.5 : i % 2)); // neither extreme of its bucket
  const out = downsample({ step, time: step.slice(), value }, 1000);
  assert.equal(out.sampled, true);
  assert.ok(out.step.length <= 1000);
  assert.equal(out.step[0], 0);
  assert.equal(out.step.at(-1), n - 1);
  assert.equal(out.value.at(-1), 0.5);
});

test("lonePoints finds the values a line cannot show, and only those", () => {
  const U = undefined;
  assert.deepEqual(lonePoints([0.9], 0, 0), [0]); // logged once
  assert.deepEqual(lonePoints([1, 2, 3], 0, 2), null);
  // Another run's x values (undefined) are drawn across: still a line.
  assert.deepEqual(lonePoints([1, U, U, 2], 0, 3), null);
  // The first point of a per-epoch metric among a training loss's steps.
  assert.deepEqual(lonePoints([U, U, 0.7, U, U], 0, 4), [2]);
  // Between two NaNs (null), at either end beside one, and not beside a value.
  assert.deepEqual(lonePoints([1, null, 2, null, 3, 4], 0, 5), [0, 2]);
  assert.deepEqual(lonePoints([1, 2, null, 3], 0, 3), [3]);
  // A view that starts inside a line does not make its first point lone.
  assert.deepEqual(lonePoints([1, 2, 3, null, 5], 1, 4), [4]);
  assert.deepEqual(lonePoints([1, U, 2, null], 2, 3), null);
  assert.deepEqual(lonePoints([null, U, 2, null], 2, 3), [2]);
});

test("lonePoints looks past the view for a point's neighbours", () => {
  const U = undefined;
  assert.deepEqual(lonePoints([1, U, U, 2, null], 1, 4), null); // joined to the 1 before the view
  assert.deepEqual(lonePoints([null, U, U, 2, U], 1, 3), [3]);
});
