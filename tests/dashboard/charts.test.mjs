// Tests of the dashboard's pure module, src/trainwire/dashboard/charts.js.
// Run with: node --test tests/dashboard/
import { test } from "node:test";
import assert from "node:assert/strict";

import * as charts from "../../src/trainwire/dashboard/charts.js";
import { alignSeries } from "../../src/trainwire/dashboard/series.js";

const {
  OTHER_GROUP,
  applyPointsFrame,
  attemptAfterClose,
  backoffDelay,
  configEntries,
  decodeValue,
  formatClock,
  formatClockTicks,
  formatTicks,
  formatValue,
  groupKey,
  groupKeys,
  lastPoint,
  mergePoints,
  newStore,
  pickRun,
  resumeAfter,
  sortRuns,
} = charts;

test("the public API is exactly this", () => {
  assert.deepEqual(Object.keys(charts).sort(), [
    "OTHER_GROUP",
    "applyPointsFrame",
    "attemptAfterClose",
    "backoffDelay",
    "configEntries",
    "decodeValue",
    "formatClock",
    "formatClockTicks",
    "formatTicks",
    "formatValue",
    "groupKey",
    "groupKeys",
    "lastPoint",
    "mergePoints",
    "newStore",
    "pickRun",
    "resumeAfter",
    "sortRuns",
  ]);
});

// ---- decodeValue ----

test("decodeValue passes numbers through", () => {
  assert.equal(decodeValue(1.5), 1.5);
  assert.equal(decodeValue(0), 0);
  assert.equal(decodeValue(-3), -3);
});

test("decodeValue turns the protocol's strings into non-finite numbers", () => {
  assert.ok(Number.isNaN(decodeValue("NaN")));
  assert.equal(decodeValue("Infinity"), Infinity);
  assert.equal(decodeValue("-Infinity"), -Infinity);
});

test("decodeValue rejects anything else", () => {
  for (const bad of ["nan", "inf", "1.5", "", null, undefined, true, {}, []]) {
    assert.throws(() => decodeValue(bad), TypeError, JSON.stringify(bad));
  }
});

// ---- groupKey / groupKeys ----

test("groupKey takes the prefix before the first slash", () => {
  assert.equal(groupKey("train/loss"), "train");
  assert.equal(groupKey("val/acc"), "val");
  assert.equal(groupKey("a/b/c"), "a");
});

test("groupKey puts keys without a prefix in the other group", () => {
  assert.equal(OTHER_GROUP, "other");
  assert.equal(groupKey("lr"), OTHER_GROUP);
  assert.equal(groupKey("/odd"), OTHER_GROUP);
  assert.equal(groupKey(""), OTHER_GROUP);
});

test("groupKeys orders groups by name with other last, keys by name", () => {
  assert.deepEqual(groupKeys(["val/loss", "lr", "train/loss", "train/acc", "val/acc", "epoch"]), [
    { group: "train", keys: ["train/acc", "train/loss"] },
    { group: "val", keys: ["val/acc", "val/loss"] },
    { group: "other", keys: ["epoch", "lr"] },
  ]);
});

test("groupKeys drops duplicates and accepts any iterable", () => {
  assert.deepEqual(groupKeys(new Set(["b/x", "a/y"])), [
    { group: "a", keys: ["a/y"] },
    { group: "b", keys: ["b/x"] },
  ]);
  assert.deepEqual(groupKeys(["lr", "lr"]), [{ group: "other", keys: ["lr"] }]);
  assert.deepEqual(groupKeys([]), []);
});

// ---- mergePoints ----

const cols = (step, value, time = step.map((s) => 1000 + s)) => ({ step, time, value });

test("mergePoints creates entries and appends in arrival order", () => {
  const store = newStore();
  let r = mergePoints(store, { "train/loss": cols([1, 2], [0.9, 0.8]) });
  assert.deepEqual(r, { changed: ["train/loss"], added: ["train/loss"] });
  r = mergePoints(store, { "train/loss": cols([3], [0.7]), lr: cols([3], [0.1]) });
  assert.deepEqual(r, { changed: ["train/loss", "lr"], added: ["lr"] });
  assert.deepEqual({ ...store["train/loss"] }, { step: [1, 2, 3], time: [1001, 1002, 1003], value: [0.9, 0.8, 0.7] });
  assert.deepEqual(store.lr.value, [0.1]);
});

test("mergePoints decodes non-finite values", () => {
  const store = newStore();
  mergePoints(store, { loss: cols([1, 2, 3], [1, "NaN", "-Infinity"]) });
  const [a, b, c] = store.loss.value;
  assert.equal(a, 1);
  assert.ok(Number.isNaN(b));
  assert.equal(c, -Infinity);
});

test("mergePoints ignores empty columns", () => {
  const store = newStore();
  assert.deepEqual(mergePoints(store, { loss: cols([], []) }), { changed: [], added: [] });
  assert.equal(store.loss, undefined);
});

test("mergePoints treats __proto__ as an ordinary metric key", () => {
  const store = newStore();
  mergePoints(store, JSON.parse('{"__proto__": {"step": [1], "time": [0], "value": [2]}}'));
  assert.deepEqual(Object.keys(store), ["__proto__"]);
  assert.deepEqual(store["__proto__"].value, [2]);
  assert.equal({}.step, undefined);
});

test("mergePoints rejects a malformed frame without changing the store", () => {
  const store = newStore();
  mergePoints(store, { loss: cols([1], [1]) });
  const before = structuredClone({ ...store });
  const bad = [
    null,
    [],
    { loss: null },
    { loss: { step: [2], value: [1] } },
    { loss: cols([2, 3], [1]) },
    { loss: { step: [2], time: [], value: [1] } },
    { ok: cols([2], [1]), loss: cols([2], ["oops"]) },
    { loss: cols(["2"], [1]) },
  ];
  for (const series of bad) {
    assert.throws(() => mergePoints(store, series), TypeError, JSON.stringify(series));
    assert.deepEqual({ ...store }, before);
  }
});

// ---- applyPointsFrame / resumeAfter ----

const newState = () => ({ lastSeq: newStore(), series: newStore() });
const frame = (seq, series, run = "r1") => ({ type: "points", run, seq, series });

test("applyPointsFrame applies frames in seq order and records lastSeq", () => {
  const state = newState();
  assert.deepEqual(applyPointsFrame(state, frame(3, { loss: cols([1, 2, 3], [3, 2, 1]) })), {
    changed: ["loss"],
    added: ["loss"],
  });
  assert.equal(state.lastSeq.r1, 3);
  assert.deepEqual(applyPointsFrame(state, frame(4, { loss: cols([4], [0.5]) })), { changed: ["loss"], added: [] });
  assert.equal(state.lastSeq.r1, 4);
  assert.deepEqual(state.series.r1.loss.step, [1, 2, 3, 4]);
});

test("applyPointsFrame ignores a frame whose seq is not above the last", () => {
  const state = newState();
  applyPointsFrame(state, frame(5, { loss: cols([1], [1]) }));
  assert.equal(applyPointsFrame(state, frame(5, { loss: cols([1], [1]) })), null);
  assert.equal(applyPointsFrame(state, frame(2, { loss: cols([9], [9]) })), null);
  assert.deepEqual(state.series.r1.loss.step, [1]);
  assert.equal(state.lastSeq.r1, 5);
});

test("applyPointsFrame keeps runs apart", () => {
  const state = newState();
  applyPointsFrame(state, frame(7, { loss: cols([1], [1]) }, "a"));
  applyPointsFrame(state, frame(1, { loss: cols([1], [2]) }, "b"));
  assert.deepEqual({ ...state.lastSeq }, { a: 7, b: 1 });
  assert.deepEqual(state.series.b.loss.value, [2]);
});

test("applyPointsFrame advances lastSeq on a frame with no points", () => {
  const state = newState();
  assert.deepEqual(applyPointsFrame(state, frame(2, {})), { changed: [], added: [] });
  assert.equal(state.lastSeq.r1, 2);
});

test("applyPointsFrame leaves state unchanged on a malformed frame", () => {
  const state = newState();
  assert.throws(() => applyPointsFrame(state, frame(1, { loss: cols([1], ["x"]) })), TypeError);
  assert.throws(() => applyPointsFrame(state, frame(1.5, {})), TypeError);
  assert.throws(() => applyPointsFrame(state, frame("1", {})), TypeError);
  assert.throws(() => applyPointsFrame(state, { seq: 1, series: {} }), TypeError);
  assert.deepEqual({ ...state.lastSeq }, {});
  assert.deepEqual({ ...state.series }, {});
});

test("a reconnect resumes after the last seq: no gap, no duplicate", () => {
  const state = newState();
  assert.equal(resumeAfter(state.lastSeq, "r1"), 0);
  applyPointsFrame(state, frame(2, { loss: cols([1, 2], [1, 2]) }));
  // Connection lost here; the dashboard re-subscribes with after = 2 ...
  assert.equal(resumeAfter(state.lastSeq, "r1"), 2);
  // ... and the server answers with what came after seq 2, then live deltas;
  // a late duplicate of an old frame is ignored.
  applyPointsFrame(state, frame(4, { loss: cols([3, 4], [3, 4]) }));
  assert.equal(applyPointsFrame(state, frame(2, { loss: cols([1, 2], [1, 2]) })), null);
  applyPointsFrame(state, frame(5, { loss: cols([5], [5]) }));
  assert.deepEqual(state.series.r1.loss.step, [1, 2, 3, 4, 5]);
});

// ---- uPlot data / lastPoint / formatValue ----

test("a run's uPlot data maps non-finite values to null and keeps the steps", () => {
  // What toUPlotData did here is series.alignSeries for one run now.
  const entry = { step: [1, 2, 3, 4], time: [0, 0, 0, 0], value: [1, NaN, Infinity, -Infinity] };
  const [x, y] = alignSeries([entry.step], [entry.value]);
  assert.equal(x, entry.step);
  assert.deepEqual(y, [1, null, null, null]);
  assert.ok(Number.isNaN(entry.value[1]), "the entry keeps its NaN");
});

test("lastPoint gives the last step and raw value", () => {
  assert.equal(lastPoint({ step: [], time: [], value: [] }), null);
  const p = lastPoint({ step: [1, 2], time: [0, 0], value: [0.5, NaN] });
  assert.equal(p.step, 2);
  assert.ok(Number.isNaN(p.value));
});

test("formatValue shows non-finite values by name", () => {
  assert.equal(formatValue(NaN), "NaN");
  assert.equal(formatValue(Infinity), "Infinity");
  assert.equal(formatValue(-Infinity), "-Infinity");
});

test("formatValue is compact for ordinary numbers", () => {
  assert.equal(formatValue(0), "0");
  assert.equal(formatValue(-0), "0");
  assert.equal(formatValue(42), "42");
  assert.equal(formatValue(0.123456789), "0.123457");
  assert.equal(formatValue(12345.678), "12345.7");
  assert.equal(formatValue(-2.5), "-2.5");
  assert.equal(formatValue(0.001), "0.001");
  assert.equal(formatValue(1e-5), "1e-5");
  assert.equal(formatValue(3.14159e-7), "3.1416e-7");
  assert.equal(formatValue(2.5e9), "2.5e+9");
  assert.equal(formatValue(null), "\u2014");
  assert.equal(formatValue(undefined), "\u2014");
});

test("formatTicks labels ticks as formatValue does when they differ", () => {
  assert.deepEqual(formatTicks([0, 0.5, 1, 1.5]), ["0", "0.5", "1", "1.5"]);
  assert.deepEqual(formatTicks([0, 2e9, 4e9]), ["0", "2e+9", "4e+9"]);
  assert.deepEqual(formatTicks([null, 1, null, 2]), ["", "1", "", "2"]);
  assert.deepEqual(formatTicks([]), []);
});

test("formatTicks adds digits until neighbouring ticks differ", () => {
  // A zoom past a million steps: formatValue gives 1.0001e+6 twice, 1.0002e+6 twice.
  const steps = [1000000, 1000050, 1000100, 1000150, 1000200];
  assert.deepEqual(formatTicks(steps), ["1e+6", "1.00005e+6", "1.0001e+6", "1.00015e+6", "1.0002e+6"]);
  // A metric moving in its sixth digit.
  assert.deepEqual(formatTicks([12345.6, 12345.65, 12345.7]), ["12345.6", "12345.65", "12345.7"]);
  // Any two doubles, however close, are told apart.
  const labels = formatTicks([1, 1 + 2 ** -52]);
  assert.notEqual(labels[0], labels[1]);
  assert.deepEqual(labels.map(Number), [1, 1 + 2 ** -52]);
});

test("formatClock reads seconds as a clock, fractions on request", () => {
  assert.equal(formatClock(42), "0:42");
  assert.equal(formatClock(185), "3:05");
  assert.equal(formatClock(3723), "1:02:03");
  assert.equal(formatClock(-0.4), "0:00"); // timed just before the run's start
  assert.equal(formatClock(1.25, 2), "0:01.25");
  assert.equal(formatClock(61.5, 1), "1:01.5");
  assert.equal(formatClock(59.96, 1), "1:00.0"); // rounds into the next minute
});

test("formatClockTicks adds decimals only where whole seconds repeat", () => {
  assert.deepEqual(formatClockTicks([0, 30, 60, 90]), ["0:00", "0:30", "1:00", "1:30"]);
  // A zoom into two seconds: every tick read 0:01 or 0:02 before.
  assert.deepEqual(formatClockTicks([1, 1.5, 2, 2.5]), ["0:01.0", "0:01.5", "0:02.0", "0:02.5"]);
  assert.deepEqual(formatClockTicks([1, 1.25, 1.5]), ["0:01.00", "0:01.25", "0:01.50"]);
  assert.deepEqual(formatClockTicks([null, 5, 10]), ["", "0:05", "0:10"]);
});

// ---- backoffDelay ----

test("backoffDelay doubles from the base up to the cap", () => {
  const top = { random: () => 1 - Number.EPSILON };
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 10, 100].map((a) => Math.round(backoffDelay(a, top)));
  assert.deepEqual(ceilings, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000, 10000]);
});

test("backoffDelay jitters between half the ceiling and the ceiling", () => {
  assert.equal(backoffDelay(0, { random: () => 0 }), 250);
  assert.equal(backoffDelay(2, { random: () => 0.5 }), 1500);
  assert.equal(backoffDelay(9, { random: () => 0 }), 5000);
  for (let attempt = 0; attempt < 12; attempt++) {
    for (let i = 0; i < 50; i++) {
      const d = backoffDelay(attempt);
      const ceiling = Math.min(10000, 500 * 2 ** attempt);
      assert.ok(d >= ceiling / 2 && d < ceiling, `${attempt}: ${d}`);
    }
  }
});

test("backoffDelay honours base and cap and tolerates odd attempts", () => {
  assert.equal(backoffDelay(3, { base: 100, cap: 300, random: () => 0 }), 150);
  assert.equal(backoffDelay(-1, { random: () => 0 }), 250);
  assert.equal(backoffDelay(1e6, { random: () => 0 }), 5000);
});

test("attemptAfterClose resets the backoff only after a stable connection", () => {
  assert.equal(attemptAfterClose(4, null), 4); // never opened
  assert.equal(attemptAfterClose(4, 200), 4); // dropped at once
  assert.equal(attemptAfterClose(4, 5000), 0);
  assert.equal(attemptAfterClose(4, 60000), 0);
  assert.equal(attemptAfterClose(3, 900, 1000), 3);
  assert.equal(attemptAfterClose(3, 1000, 1000), 0);
});

// ---- runs ----

const run = (id, created, status = "finished") => ({
  id, project: "p", name: id, status, created, updated: created, config: {},
});

test("sortRuns puts the newest first, without changing its input", () => {
  const runs = [run("a", 1), run("c", 3), run("b", 2), run("d", 2)];
  assert.deepEqual(sortRuns(runs).map((r) => r.id), ["c", "b", "d", "a"]);
  assert.deepEqual(runs.map((r) => r.id), ["a", "c", "b", "d"]);
});

test("pickRun prefers the wanted run, then the newest running, then the newest", () => {
  const runs = [run("old-running", 1, "running"), run("mid-running", 2, "running"), run("new", 3, "crashed")];
  assert.equal(pickRun(runs, "old-running"), "old-running");
  assert.equal(pickRun(runs, "missing"), "mid-running");
  assert.equal(pickRun(runs), "mid-running");
  assert.equal(pickRun([run("a", 1), run("b", 2)]), "b");
  assert.equal(pickRun([]), null);
  assert.equal(pickRun([], "x"), null);
});

test("configEntries flattens nested config to dotted keys in its own order", () => {
  assert.deepEqual(
    configEntries({ model: "resnet", optim: { name: "adam", lr: 0.001, betas: [0.9, 0.99] }, epochs: 10, amp: true, seed: null, extra: {} }),
    [
      ["model", "resnet"],
      ["optim.name", "adam"],
      ["optim.lr", "0.001"],
      ["optim.betas", "[0.9,0.99]"],
      ["epochs", "10"],
      ["amp", "true"],
      ["seed", "null"],
      ["extra", "{}"],
    ],
  );
  assert.deepEqual(configEntries({}), []);
  assert.deepEqual(configEntries(null), []);
  assert.deepEqual(configEntries(undefined), []);
});
