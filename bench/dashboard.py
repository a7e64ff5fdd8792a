"""The dashboard under load, in headless Chromium (issue 6 targets).

1. Open: a run holding one series of 1,000,000 points; from navigation start to its
   first complete chart drawn (history fetched with min/max downsampling, drawn):
   ≤ 1 s. The first open is cold (the server's page cache); the figure is the median.
2. Zoom: into ranges of that series from 10% of it down to 0.01% (log-uniform,
   seeded), from the request to the finer data drawn: ≤ 300 ms (the figure is the
   worst zoom). Ranges holding fewer points than the chart is wide must come back raw.
3. Live: 8 runs × 6 metrics, each run logging one batch every 100 ms (10 batches/s),
   all 8 overlaid on the page: frames per second over the window, ≥ 30. An idle page
   is measured first as the reference (headless Chromium's own frame rate).

The server is ``python -m trainwire serve`` in its own process (default settings);
the trainers are threads of this process using the public client API.

Usage::

    .venv/bin/python bench/dashboard.py            # 7 opens, 20 zooms, 20 s live
    .venv/bin/python bench/dashboard.py --quick    # 3 opens, 8 zooms, 6 s live
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import threading
import time
from typing import Any

import _common as c

import trainwire

NAME = "dashboard"
POINTS = 1_000_000
OPEN_MS, ZOOM_MS, MIN_FPS = 1000.0, 300.0, 30.0
RUNS, METRICS, BATCHES_PER_S = 8, 6, 10.0
VIEWPORT = {"width": 1280, "height": 900}

# Counts animation frames from the moment it is called, for `seconds`.
FPS_JS = """(seconds) => new Promise((resolve) => {
  const start = performance.now();
  let frames = 0, worst = 0, last = start;
  const renders = window.__trainwire.marks.renders, renderMs = window.__trainwire.marks.renderMs;
  function tick(now) {
    frames += 1;
    worst = Math.max(worst, now - last);
    last = now;
    if (now - start < seconds * 1000) requestAnimationFrame(tick);
    else resolve({fps: frames / ((now - start) / 1000), worst_frame_ms: worst,
                  renders: window.__trainwire.marks.renders - renders,
                  render_ms: window.__trainwire.marks.renderMs - renderMs});
  }
  requestAnimationFrame(tick);
})"""


def seed_long_run(server: c.ServerProcess) -> str:
    """One run, one series of POINTS points: a noisy decay with a few spikes."""
    rng = random.Random(6)
    run = trainwire.init(
        project="bench", name=f"{NAME}-1M", url=server.url, token=c.TOKEN, system_metrics=False
    )
    spikes = {rng.randrange(POINTS) for _ in range(5)}
    for step in range(POINTS):
        value = 2.0 / (1 + step / 20_000) + rng.random() * 0.05
        run.log({"loss": 50.0 if step in spikes else value}, step=step)
    run.finish(timeout=300)
    assert run.delivered, "the 1M-point run was not delivered"
    return run.id


def open_page(browser: Any, server: c.ServerProcess, fragment: str) -> Any:
    page = browser.new_page(viewport=VIEWPORT)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    # The link a user gets: the token is swapped for a cookie by one redirect (the
    # fragment survives it), as for a person opening the printed link.
    page.goto(f"{server.url}/?token={c.TOKEN}{fragment}")
    return page


def open_times(browser: Any, server: c.ServerProcess, run_id: str, trials: int) -> list[float]:
    times = []
    for _ in range(trials):
        page = open_page(browser, server, f"#runs={run_id}")
        page.wait_for_function(
            "(id) => window.__trainwire?.marks.historyDrawnAt[id] !== undefined",
            arg=run_id,
            timeout=60_000,
        )
        # performance.now() counts from navigation start.
        times.append(page.evaluate("(id) => window.__trainwire.marks.historyDrawnAt[id]", run_id))
        assert not page.errors, page.errors
        page.close()
    return times


def zoom_times(
    browser: Any, server: c.ServerProcess, run_id: str, trials: int
) -> list[dict[str, Any]]:
    rng = random.Random(60)
    page = open_page(browser, server, f"#runs={run_id}")
    page.wait_for_function(
        "(id) => window.__trainwire?.marks.historyDrawnAt[id] !== undefined",
        arg=run_id,
        timeout=60_000,
    )
    width = page.evaluate(
        "() => document.querySelector('figure[data-key=\"loss\"] .u-over').clientWidth"
    )
    results = []
    for _ in range(trials):
        span = POINTS * 10 ** rng.uniform(-4, -1)
        start = rng.uniform(0, POINTS - span)
        page.evaluate("() => window.__trainwire.resetZoom()")
        before = page.evaluate("() => window.__trainwire.marks.zoomDrawn")
        page.evaluate("([a, b]) => window.__trainwire.zoom(a, b)", [start, start + span])
        page.wait_for_function(
            "(before) => window.__trainwire.marks.zoomDrawn > before", arg=before, timeout=30_000
        )
        marks = page.evaluate("() => window.__trainwire.marks")
        sampled = page.evaluate(
            "() => document.querySelector('figure[data-key=\"loss\"]').dataset.sampled"
        )
        results.append(
            {
                "span_steps": span,
                "ms": marks["zoomDrawn"] - marks["zoomRequested"],
                "raw": sampled == "false",
                "raw_expected": span < width,
            }
        )
    assert not page.errors, page.errors
    page.close()
    return results


class LiveRuns:
    """RUNS runs, each logging METRICS metrics once every 1/BATCHES_PER_S s."""

    def __init__(self, server: c.ServerProcess) -> None:
        self.runs = [
            trainwire.init(
                project="bench",
                name=f"{NAME}-live-{i}",
                url=server.url,
                token=c.TOKEN,
                system_metrics=False,
            )
            for i in range(RUNS)
        ]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(r, i)) for i, r in enumerate(self.runs)
        ]
        for run in self.runs:  # some history first
            for step in range(2000):
                run.log(self._row(step), step=step)

    @staticmethod
    def _row(step: int) -> dict[str, float]:
        return {f"m{k}/value": math.sin(step / (50 + 10 * k)) + k for k in range(METRICS)}

    def _loop(self, run: Any, offset: int) -> None:
        step = 2000
        period = 1 / BATCHES_PER_S
        next_at = time.monotonic() + offset * period / RUNS
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            run.log(self._row(step), step=step)
            step += 1
            next_at += period

    def __enter__(self) -> LiveRuns:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        for run in self.runs:
            run.finish(timeout=30)


def live_fps(browser: Any, server: c.ServerProcess, seconds: float) -> dict[str, Any]:
    idle = open_page(browser, server, "#runs=none")
    idle.wait_for_selector('#conn[data-state="live"]', timeout=30_000)
    reference = idle.evaluate(FPS_JS, seconds)
    idle.close()
    with LiveRuns(server) as live:
        # The same load with a page that draws nothing: what the trainers and the
        # server leave of the 2 cores to the browser.
        idle = open_page(browser, server, "#runs=none")
        idle.wait_for_selector('#conn[data-state="live"]', timeout=30_000)
        loaded = idle.evaluate(FPS_JS, seconds)
        idle.close()
        ids = ",".join(r.id for r in live.runs)
        page = open_page(browser, server, f"#runs={ids}")
        # Every run's history drawn, and every chart on screen drawing all the runs.
        # Charts below the fold are redrawn when scrolled to, not before (the page
        # spends no frames on what nobody sees): their figures may lag, by design.
        page.wait_for_function(
            """(ids) => ids.every((id) => window.__trainwire.marks.historyDrawnAt[id] !== undefined)
                && [...document.querySelectorAll('figure[data-key]')]
                    .filter((f) => f.getBoundingClientRect().top < window.innerHeight)
                    .every((f) => (f.dataset.runs || '').split(',').length === ids.length)""",
            arg=[r.id for r in live.runs],
            timeout=60_000,
        )
        measured = page.evaluate(FPS_JS, seconds)
        lag = page.evaluate("() => document.querySelector('#lag').textContent")
        assert not page.errors, page.errors
        page.close()
    return {"idle": reference, "loaded": loaded, "live": measured, "lag_shown": lag}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, a shorter live window")
    args = parser.parse_args(argv)
    opens, zooms, seconds = (3, 8, 6.0) if args.quick else (7, 20, 20.0)
    c.header(
        NAME, "1M-point open, zoom re-fetch, 8x6 live overlay in headless Chromium", args.quick
    )
    from playwright.sync_api import sync_playwright

    with c.client_environment(NAME) as tmp, c.ServerProcess(tmp / "server") as server:
        c.quiet_client_logs(tmp / "client.log")
        seeded = time.perf_counter()
        run_id = seed_long_run(server)
        print(f"  seeded {POINTS:,} points in {time.perf_counter() - seeded:.1f} s", flush=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=c.CHROMIUM, args=c.CHROMIUM_FLAGS, headless=True
            )
            try:
                opened = open_times(browser, server, run_id, opens)
                zoomed = zoom_times(browser, server, run_id, zooms)
                fps = live_fps(browser, server, seconds)
            finally:
                browser.close()
    zoom_ms = [z["ms"] for z in zoomed]
    raw_ok = all(z["raw"] for z in zoomed if z["raw_expected"])
    checks = [
        c.Check(
            f"open, {POINTS:,} points (median of {opens})",
            statistics.median(opened),
            "ms",
            OPEN_MS,
            note=f"cold first open {opened[0]:.0f} ms; all {', '.join(f'{t:.0f}' for t in opened)}",
        ),
        c.Check(
            f"zoom re-drawn finer (worst of {zooms})",
            max(zoom_ms),
            "ms",
            ZOOM_MS,
            note=f"median {statistics.median(zoom_ms):.0f} ms; raw points whenever the range is"
            f" narrower than the chart: {'yes' if raw_ok else 'NO'}",
        ),
        c.Check(
            f"frames/s, {RUNS} runs x {METRICS} metrics live at {BATCHES_PER_S:g} batches/s",
            fps["live"]["fps"],
            "fps",
            MIN_FPS,
            better="higher",
            note=f"idle page {fps['idle']['fps']:.0f} fps, {fps['loaded']['fps']:.0f} fps with the"
            f" same trainers running; worst frame {fps['live']['worst_frame_ms']:.0f} ms;"
            f" {fps['live']['renders']} renders took {fps['live']['render_ms']:.0f} ms",
        ),
    ]
    c.report(
        NAME,
        checks,
        quick=args.quick,
        params={"points": POINTS, "viewport": VIEWPORT, "runs": RUNS, "metrics": METRICS},
        data={"open_ms": opened, "zooms": zoomed, "fps": fps},
    )
    return 0 if all(ch.passed for ch in checks) and raw_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
