// Tests of the run list and run page shaping (src/trainwire/dashboard/runs.js).
import { test } from "node:test";
import assert from "node:assert/strict";

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
} from "../../src/trainwire/dashboard/runs.js";

const RUNS = [
  { id: "r1", project: "vision", name: "resnet-lr0.1", status: "running" },
  { id: "r2", project: "vision", name: "vit", status: "finished" },
  { id: "r3", project: "nlp", name: "gpt-small", status: "crashed" },
];

test("filterRuns matches every word anywhere, case-insensitively", () => {
  assert.deepEqual(filterRuns(RUNS, "").map((r) => r.id), ["r1", "r2", "r3"]);
  assert.deepEqual(filterRuns(RUNS, "VISION res").map((r) => r.id), ["r1"]);
  assert.deepEqual(filterRuns(RUNS, "crashed").map((r) => r.id), ["r3"]);
  assert.deepEqual(filterRuns(RUNS, "r2").map((r) => r.id), ["r2"]);
});

test("filterRuns filters on status", () => {
  assert.deepEqual(filterRuns(RUNS, "", "finished").map((r) => r.id), ["r2"]);
  assert.deepEqual(filterRuns(RUNS, "nlp", "running"), []);
});

test("formatDuration reads like a person wrote it", () => {
  assert.equal(formatDuration(42.9), "42 s");
  assert.equal(formatDuration(185), "3 min 05 s");
  assert.equal(formatDuration(2 * 3600 + 7 * 60), "2 h 07 min");
  assert.equal(formatDuration(3 * 86400 + 4 * 3600), "3 d 4 h");
  assert.equal(formatDuration(-5), "0 s");
  assert.equal(formatDuration(NaN), "\u2014");
});

test("formatAgo", () => {
  assert.equal(formatAgo(-0.3), "just now");
  assert.equal(formatAgo(12.7), "12 s ago");
  assert.equal(formatAgo(300), "5 min ago");
  assert.equal(formatAgo(3 * 3600), "3 h ago");
  assert.equal(formatAgo(2 * 86400), "2 d ago");
});

test("runDuration runs to now while running, else to the last update", () => {
  assert.equal(runDuration({ status: "running", created: 100, updated: 150 }, 200), 100);
  assert.equal(runDuration({ status: "finished", created: 100, updated: 150 }, 200), 50);
});

test("summaryRows decodes the server's summary in key order", () => {
  const rows = summaryRows({
    "val/acc": { count: 3, last: 0.9, last_step: 30, min: 0.5, max: 0.9 },
    loss: { count: 2, last: "NaN", last_step: 2, min: null, max: null },
  });
  assert.deepEqual(rows.map((r) => r.key), ["loss", "val/acc"]);
  assert.ok(Number.isNaN(rows[0].last));
  assert.equal(rows[0].min, null);
  assert.deepEqual(rows[1], { key: "val/acc", last: 0.9, lastStep: 30, min: 0.5, max: 0.9, count: 3 });
  assert.deepEqual(summaryRows(null), []);
});

test("assignColours keeps a run's colour while it stays selected", () => {
  const slots = new Map();
  assignColours(slots, ["a", "b", "c"], 8);
  assert.deepEqual([...slots], [["a", 0], ["b", 1], ["c", 2]]);
  assignColours(slots, ["a", "c", "d"], 8);
  assert.deepEqual([...slots], [["a", 0], ["c", 2], ["d", 1]]);
  assignColours(slots, ["a", "c", "d", "e", "f"], 3);
  assert.equal(slots.size, 5);
  for (const slot of slots.values()) assert.ok(slot >= 0 && slot < 3);
});

test("formatStarted says what toLocaleString says, from one formatter", () => {
  const options = { dateStyle: "short", timeStyle: "short" };
  for (const seconds of [0, 1.7e9, 1.7e9 + 59.9, 2e9 + 0.5]) {
    assert.equal(formatStarted(seconds), new Date(seconds * 1000).toLocaleString([], options));
  }
  assert.equal(formatStarted(Number.NaN), "\u2014"); // a formatter throws on an invalid date
});

test("listedRuns draws the first runs, then the selected ones further down", () => {
  const shown = Array.from({ length: 10 }, (_, i) => ({ id: `r${i}` }));
  assert.deepEqual(listedRuns(shown, [], 20), { listed: shown, hidden: 0 });
  const { listed, hidden } = listedRuns(shown, ["r1", "r8", "absent"], 3);
  assert.deepEqual(
    listed.map((r) => r.id),
    ["r0", "r1", "r2", "r8"],
  );
  assert.equal(hidden, 6); // r3-r7, r9
  assert.deepEqual(listedRuns(shown, [], 0), { listed: [], hidden: 10 });
});

/** As much of a DOM element as the run list's focus keeping uses. */
class Element {
  constructor(className = "", runId = undefined) {
    this.classList = className ? [className] : [];
    this.dataset = runId === undefined ? {} : { runId };
    this.children = [];
    this.parentElement = null;
  }
  append(...children) {
    for (const child of children) {
      child.parentElement = this;
      this.children.push(child);
    }
    return this;
  }
  contains(other) {
    for (let node = other; node !== null; node = node.parentElement) if (node === this) return true;
    return false;
  }
  querySelector(selector) {
    for (const child of this.children) {
      if (`.${child.classList[0]}` === selector) return child;
      const found = child.querySelector(selector);
      if (found !== null) return found;
    }
    return null;
  }
}

/** A run list as renderRunList draws it: an item per run, then the "show more" item. */
function drawnList(ids) {
  const list = new Element("runs");
  for (const id of ids) {
    list.append(new Element("run", id).append(new Element("run-check"), new Element("run-open")));
  }
  return list.append(new Element("run-more-item").append(new Element("run-more")));
}

test("the control with the focus is found again in the run list drawn anew", () => {
  const before = drawnList(["r1", 'say "hi"', "r3"]);
  const after = drawnList(["r0", "r1", 'say "hi"']); // a new run on top; r3 past the page
  const check = before.children[1].children[0];
  const where = focusedControl(before, check);
  assert.deepEqual(where, { run: 'say "hi"', part: "run-check" });
  assert.equal(findControl(after, where), after.children[2].children[0]);
  const more = focusedControl(before, before.children[3].children[0]);
  assert.deepEqual(more, { run: null, part: "run-more" });
  assert.equal(findControl(after, more), after.children[3].children[0]);
  // No longer listed: nowhere to go. Focus outside the list: nothing to keep.
  assert.equal(findControl(after, focusedControl(before, before.children[2].children[1])), null);
  assert.equal(focusedControl(before, new Element("search")), null);
  assert.equal(focusedControl(before, null), null);
  assert.equal(focusedControl(before, before), null);
});
