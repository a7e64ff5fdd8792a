// Tests of the URL fragment <-> view state (src/trainwire/dashboard/urlstate.js).
import { test } from "node:test";
import assert from "node:assert/strict";

import { defaultState, formatState, parseState } from "../../src/trainwire/dashboard/urlstate.js";

test("the default view is an empty fragment, and parses back", () => {
  assert.equal(formatState(defaultState()), "");
  assert.deepEqual(parseState(""), defaultState());
});

test("every setting round-trips through the fragment", () => {
  const state = {
    runs: ["a,b", "c d", "é/x"],
    focus: "c d",
    smooth: 0.6,
    log: true,
    x: "relative",
    follow: false,
    metrics: "train/ & loss",
    q: "resnet lr=0.1",
    zoom: [100.5, 2000],
  };
  const hash = formatState(state);
  assert.ok(hash.startsWith("#runs="));
  assert.deepEqual(parseState(hash), state);
});

test("a trainer's ?run= link opens that run", () => {
  assert.deepEqual(parseState("", "?run=abc").runs, ["abc"]);
  assert.deepEqual(parseState("#runs=x", "?run=abc").runs, ["x"]);
});

test("malformed values fall back to defaults", () => {
  const state = parseState("#smooth=7&x=banana&zoom=5,1&log=yes&runs=,,a,a&%E0%A4%A=1");
  assert.equal(state.smooth, 0.99);
  assert.equal(state.x, "step");
  assert.equal(state.zoom, null);
  assert.equal(state.log, false);
  assert.deepEqual(state.runs, ["a"]);
  assert.equal(parseState("#smooth=-1").smooth, 0);
  assert.equal(parseState("#zoom=1,x").zoom, null);
});

test("a narrow wall-time zoom round-trips through the URL", () => {
  // 45 ms of a fast run, in Unix seconds (x=wall): 12 significant digits snapped it to 10 ms.
  const zoom = [1700000000.123, 1700000000.168];
  const back = parseState(formatState({ ...defaultState(), x: "wall", zoom }));
  assert.deepEqual(back.zoom, zoom);
});

test("a zoom at large steps round-trips through the URL", () => {
  const zoom = [1234567890123, 1234567890456];
  const back = parseState(formatState({ ...defaultState(), zoom }));
  assert.deepEqual(back.zoom, zoom);
});
