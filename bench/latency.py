"""End-to-end latency: from ``run.log()`` returning to a dashboard seeing the point.

Targets, at default settings (``flush_interval`` 0.02 s) with 100 steps/s:

- to a dashboard WebSocket receiving the point: p50 ≤ 20 ms and p99 ≤ 100 ms;
- to the point drawn in headless Chromium: p50 ≤ 50 ms.

The server is ``python -m trainwire serve`` in its own process (default settings);
the trainer is this process's main thread, logging ``{"train/loss", "train/acc",
"lr"}`` every 10 ms on a fixed schedule and noting ``time.time()`` when each
``log()`` returns (a step -> time map; the clocks are the same machine's).

Phase 1, WebSocket: a dashboard client (``websockets`` sync client, a thread of this
process) subscribes to the run and notes ``time.time()`` when each step first
arrives in a ``points`` frame.

Phase 2, browser: Debian's Chromium (headless, through Playwright) opens
``run.url``. A MutationObserver, installed before the page's own scripts, watches
the ``data-points`` attribute of the ``train/loss`` chart, which the dashboard
updates right after drawing; for each step newly drawn it notes
``performance.timeOrigin + performance.now()``. The offset between that clock and
Python's ``time.time()`` is estimated by round trips and reported (not
subtracted). The WebSocket client of phase 1 keeps listening in phase 2; its
figures there are reported too (with a browser drawing meanwhile).

The first 50 steps of each phase are a warm-up and not counted.

Usage::

    .venv/bin/python bench/latency.py            # 30 s per phase
    .venv/bin/python bench/latency.py --quick    # 5 s per phase
    .venv/bin/python bench/latency.py --no-browser
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import threading
import time
from typing import Any

import _common as c
from websockets.sync.client import connect

import trainwire

NAME = "latency"
KEY = "train/loss"
RATE = 100.0  # steps per second
WARMUP_STEPS = 50
WS_P50_MS, WS_P99_MS, BROWSER_P50_MS = 20.0, 100.0, 50.0

# Installed before the dashboard's scripts: notes when each step is drawn.
OBSERVER_JS = """
(() => {
  const KEY = %(key)s, RUN = %(run)s;
  window.__bench = [];
  let seen = 0;
  new MutationObserver((mutations) => {
    const now = performance.timeOrigin + performance.now();
    for (const m of mutations) {
      const el = m.target;
      if (el.dataset.key !== KEY) continue;
      const n = Number(el.dataset.points);
      if (n === 0) seen = 0;  // a chart made anew
      if (n <= seen) continue;
      const entry = window.__trainwire && window.__trainwire.series[RUN]?.[KEY];
      if (entry) for (let i = seen; i < n; i++) window.__bench.push([entry.step[i], now]);
      seen = n;
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ["data-points"] });
})();
"""


class Listener(threading.Thread):
    """A dashboard WebSocket client: the time each step of the followed runs arrives."""

    def __init__(self, ws_url: str) -> None:
        super().__init__(name="dashboard-listener", daemon=True)
        self.ws_url = ws_url + "/ws/dashboard"
        self.arrived: dict[str, dict[int, float]] = {}
        self.subscribed: dict[str, threading.Event] = {}
        self._ws: Any = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            with connect(
                self.ws_url,
                additional_headers={"Authorization": f"Bearer {c.TOKEN}"},
                compression=None,
                max_size=None,
            ) as ws:
                self._ws = ws
                self._ready.set()
                while not self._stopping.is_set():
                    try:
                        text = ws.recv(timeout=0.2)
                    except TimeoutError:
                        continue
                    now = time.time()
                    message = json.loads(text)
                    if message.get("type") != "points":
                        continue
                    run_id = message["run"]
                    arrived = self.arrived.setdefault(run_id, {})
                    for step in message["series"].get(KEY, {}).get("step", []):
                        arrived.setdefault(step, now)
                    if run_id in self.subscribed:
                        self.subscribed[run_id].set()  # the answer to subscribe came
        except Exception as exc:  # reported with the figures
            self.error = f"{type(exc).__name__}: {exc}"
            self._ready.set()

    def follow(self, run_id: str) -> None:
        self._ready.wait(30)
        self.subscribed[run_id] = threading.Event()
        self._ws.send(json.dumps({"type": "subscribe", "run": run_id, "after": 0}))
        self.subscribed[run_id].wait(30)

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)


def paced_steps(run: trainwire.Run, first: int, count: int) -> dict[int, float]:
    """Log steps ``first .. first + count - 1`` at RATE per second; returns step ->
    the time.time() at which its log() returned."""
    logged: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(count):
        pause = start + i / RATE - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        step = first + i
        run.log({KEY: 1.0 / (step + 1), "train/acc": step / 1e6, "lr": 3e-3}, step=step)
        logged[step] = time.time()
    return logged


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # other threads' or processes' progress: polled
    return True


def latencies_ms(
    logged: dict[int, float], seen: dict[int, float], offset_s: float = 0.0
) -> tuple[list[float], int]:
    """Per counted step, seen - logged in ms; and how many counted steps were not seen."""
    values, missing = [], 0
    for step in sorted(logged)[WARMUP_STEPS:]:
        if step in seen:
            values.append((seen[step] - offset_s - logged[step]) * 1000)
        else:
            missing += 1
    return values, missing


def clock_offset(page: Any) -> dict[str, float]:
    """The page clock (timeOrigin + now) minus time.time(), from the quickest of
    20 round trips; and the page's Date.now() minus its timeOrigin + now."""
    best = (math.inf, 0.0)
    for _ in range(20):
        t0 = time.time()
        page_ms = page.evaluate("performance.timeOrigin + performance.now()")
        t1 = time.time()
        if t1 - t0 < best[0]:
            best = (t1 - t0, page_ms / 1000 - (t0 + t1) / 2)
    date_skew = page.evaluate("Date.now() - (performance.timeOrigin + performance.now())")
    return {"offset_ms": best[1] * 1000, "uncertainty_ms": best[0] * 500, "date_skew_ms": date_skew}


def browser_phase(
    server: c.ServerProcess, listener: Listener, steps: int
) -> tuple[dict[str, Any], dict[int, float], dict[int, float], str]:
    from playwright.sync_api import sync_playwright

    run = trainwire.init(project="bench", name=f"{NAME}-browser", url=server.url, token=c.TOKEN)
    run.log({KEY: 1.0, "train/acc": 0.0, "lr": 3e-3}, step=0)
    wait_for(lambda: run.delivered, 30)
    listener.follow(run.id)
    assert run.url is not None
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=c.CHROMIUM, args=c.CHROMIUM_FLAGS, headless=True
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.add_init_script(OBSERVER_JS % {"key": json.dumps(KEY), "run": json.dumps(run.id)})
            page.goto(run.url)
            page.wait_for_selector('#conn[data-state="live"]', timeout=30_000)
            page.wait_for_function(
                f"() => Number(document.querySelector('[data-key={json.dumps(KEY)}]')"
                "?.dataset.points) >= 1",
                timeout=30_000,
            )
            offset = clock_offset(page)
            logged = paced_steps(run, 1, steps)
            page.wait_for_function(
                f"() => window.__bench.length > 0 && window.__bench.at(-1)[0] >= {steps}",
                timeout=30_000,
            )
            drawn = {int(s): t / 1000 for s, t in page.evaluate("window.__bench")}
            offset_after = clock_offset(page)
            offset["offset_after_ms"] = offset_after["offset_ms"]
            if errors:
                offset["page_errors"] = errors[:5]  # type: ignore[assignment]
        finally:
            browser.close()
    run.finish(timeout=30)
    return offset, logged, drawn, run.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s per phase instead of 30 s")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per phase")
    parser.add_argument("--no-browser", action="store_true", help="the WebSocket phase only")
    args = parser.parse_args(argv)
    seconds = args.seconds or (5.0 if args.quick else 30.0)
    steps = int(seconds * RATE)
    c.header(NAME, "log() to dashboard socket, and to a drawn point in Chromium", args.quick)
    data: dict[str, Any] = {}
    checks: list[c.Check] = []

    with c.client_environment(NAME) as tmp, c.ServerProcess(tmp / "server") as server:
        c.quiet_client_logs(tmp / "client.log")
        listener = Listener(server.ws_url)
        listener.start()
        load = c.MachineLoad([server.pid])

        # Phase 1: the dashboard WebSocket alone.
        run = trainwire.init(project="bench", name=f"{NAME}-ws", url=server.url, token=c.TOKEN)
        run.log({KEY: 1.0, "train/acc": 0.0, "lr": 3e-3}, step=0)
        wait_for(lambda: run.delivered, 30)
        listener.follow(run.id)
        print(f"  phase 1: {steps} steps at {RATE:.0f}/s, one dashboard socket", flush=True)
        logged = paced_steps(run, 1, steps)
        arrived = listener.arrived.setdefault(run.id, {})
        wait_for(lambda: max(arrived, default=0) >= steps, 10)
        run.finish(timeout=30)
        ws_ms, ws_missing = latencies_ms(logged, arrived)
        ws = c.distribution(ws_ms)
        data["websocket"] = ws | {"missing": ws_missing}
        print(
            f"  socket: p50 {ws['p50']:.1f} ms, p90 {ws['p90']:.1f}, p99 {ws['p99']:.1f},"
            f" max {ws['max']:.1f} ms ({ws['count']} steps, {ws_missing} missing)",
            flush=True,
        )
        checks += [
            c.Check("log() -> dashboard socket, p50", ws["p50"], "ms", WS_P50_MS),
            c.Check("log() -> dashboard socket, p99", ws["p99"], "ms", WS_P99_MS),
        ]

        # Phase 2: headless Chromium drawing the run (and the socket still listening).
        if args.no_browser:
            print("  phase 2 skipped (--no-browser)")
        elif not shutil.which(c.CHROMIUM):
            print(f"  phase 2 skipped: no chromium at {c.CHROMIUM}")
            checks.append(c.Check("log() -> drawn in Chromium, p50", None, "ms", BROWSER_P50_MS))
        else:
            print(f"  phase 2: {steps} steps at {RATE:.0f}/s, headless Chromium", flush=True)
            try:
                clock, logged2, drawn, run_id = browser_phase(server, listener, steps)
            except Exception as exc:  # reported, not raised: a benchmark, not a test
                print(f"  browser phase failed: {type(exc).__name__}: {exc}")
                data["browser_error"] = f"{type(exc).__name__}: {exc}"
                checks.append(
                    c.Check("log() -> drawn in Chromium, p50", None, "ms", BROWSER_P50_MS)
                )
            else:
                drawn_ms, drawn_missing = latencies_ms(logged2, drawn)
                br = c.distribution(drawn_ms)
                ws2_ms, _ = latencies_ms(logged2, listener.arrived.get(run_id, {}))
                ws2 = c.distribution(ws2_ms)
                data["browser"] = br | {"missing": drawn_missing, "clock": clock}
                data["websocket_with_browser"] = ws2
                print(
                    f"  drawn: p50 {br['p50']:.1f} ms, p90 {br['p90']:.1f}, p99 {br['p99']:.1f},"
                    f" max {br['max']:.1f} ms ({br['count']} steps, {drawn_missing} missing);"
                    f" page clock - time.time() = {clock['offset_ms']:+.2f} ms"
                    f" (± {clock['uncertainty_ms']:.2f}; {clock['offset_after_ms']:+.2f} after)"
                )
                print(
                    f"  socket meanwhile: p50 {ws2['p50']:.1f} ms, p99 {ws2['p99']:.1f} ms",
                    flush=True,
                )
                checks.append(
                    c.Check(
                        "log() -> drawn in Chromium, p50",
                        br["p50"],
                        "ms",
                        BROWSER_P50_MS,
                        note=f"p99 {br['p99']:.1f} ms; page clock offset"
                        f" {clock['offset_ms']:+.2f} ms, not subtracted",
                    )
                )
        listener.stop()
        machine_load = load.stop()
        if listener.error:
            data["listener_error"] = listener.error
            print(f"  listener error: {listener.error}")

    c.report(
        NAME,
        checks,
        quick=args.quick,
        params={
            "steps_per_phase": steps,
            "rate_per_s": RATE,
            "warmup_steps": WARMUP_STEPS,
            "flush_interval_s": 0.02,
        },
        data=data,
        load=machine_load,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
