"""The dashboard live and zoomed at once: follow, live points merged into a zoom, time-mode
zooms, history retries, and the caption of a downsampled run."""

from __future__ import annotations

import time
from typing import Any, Final

import pytest
from tests.browser.test_dashboard_views import DRAWN, WAIT_MS, open_page, wait_chart
from tests.conftest import MS, LiveServer, wait_until

import trainwire

pytestmark = pytest.mark.browser

N: Final = 5000
VIEWPORT: Final = {"width": 900, "height": 700}


def live_run(server: LiveServer, name: str, n: int = N, sparse: bool = False) -> Any:
    run = trainwire.init(project="review", name=name, url=server.url)
    for step in range(n):
        metrics = {"a_sparse": 1.0} if sparse and step in (0, n - 1) else {}
        metrics["loss"] = float(step % 97)
        run.log(metrics, step=step)
    return run


def stored_until(server: LiveServer, run_id: str, step: int) -> None:
    def done() -> bool:
        _, series = server.store.history(run_id, ["loss"], start=step, end=None, points=None)
        return "loss" in series and step in list(series["loss"].step)

    assert wait_until(done, 20_000 * MS)


def seen_all(page: Any, server: LiveServer, run: Any, last: int) -> None:
    """Wait until the page has applied every commit up to step ``last``; finish the run."""
    stored_until(server, run.id, last)
    seq, _ = server.store.history(run.id, ["loss"], start=last, end=None, points=None)
    page.wait_for_function(
        f"(id) => window.__trainwire.lastSeq[id] >= {seq}", arg=run.id, timeout=WAIT_MS
    )
    run.finish()


def zoom_steps(page: Any, run_id: str) -> list[int] | None:
    return page.evaluate(
        "(id) => { const z = window.__trainwire.zooms.get(id);"
        " return z === undefined ? null : Array.from(z.series.loss.step); }",
        run_id,
    )


def test_ticking_follow_latest_while_zoomed_into_the_past_draws_the_newest_points(
    live_server: LiveServer, browser: Any
) -> None:
    run = live_run(live_server, "finished")
    run.finish()
    page = open_page(browser, live_server, f"#runs={run.id}", viewport=VIEWPORT)
    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    page.evaluate("() => window.__trainwire.zoom(1000, 1100)")  # into the past: follow off
    wait_chart(page, "loss", "f.dataset.sampled === 'false'")
    assert page.locator("#follow").is_checked() is False
    page.check("#follow")
    page.wait_for_function("() => window.__trainwire.view.zoom[1] === 4999", timeout=WAIT_MS)
    lo, hi = page.evaluate("() => window.__trainwire.view.zoom")

    def in_window() -> list[float]:
        return [x for x in page.evaluate(DRAWN, "loss")[0] if lo <= x <= hi]

    # The window [4899, 4999] holds 101 stored points; the chart must draw them. (It
    # drew none: the zoom's data stayed that of the old window.)
    for _ in range(int(WAIT_MS) // 50):
        if in_window():
            break
        page.wait_for_timeout(50)  # Playwright's own wait: the page runs meanwhile
    assert in_window(), f"nothing drawn in {lo}..{hi}"


def test_points_committed_while_a_following_zoom_is_fetched_are_not_lost(
    live_server: LiveServer, browser: Any
) -> None:
    run = live_run(live_server, "gap")
    stored_until(live_server, run.id, N - 1)
    page = open_page(browser, live_server, f"#runs={run.id}", viewport=VIEWPORT)
    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    held: list[Any] = []
    page.route("**/api/runs/*/metrics?*start=*", lambda route: held.append(route))
    page.evaluate(f"() => window.__trainwire.zoom(4000, {N - 1})")  # reaches the newest: follows
    for _ in range(500):
        if held:
            break
        page.wait_for_timeout(20)
    assert len(held) == 1
    assert page.evaluate("() => window.__trainwire.view.follow") is True
    # The trainer goes on while the zoom's request is on its way.
    for step in range(N, N + 50):
        run.log({"loss": float(step % 97)}, step=step)
    stored_until(live_server, run.id, N + 49)
    page.wait_for_function(
        f"(id) => window.__trainwire.series[id].loss.step.includes({N + 49})",
        arg=run.id,
        timeout=WAIT_MS,
    )
    held[0].continue_()
    page.wait_for_function(
        "(id) => window.__trainwire.zooms.get(id) !== undefined", arg=run.id, timeout=WAIT_MS
    )
    for step in range(N + 50, N + 60):
        run.log({"loss": float(step % 97)}, step=step)
    run.finish()
    page.wait_for_function(
        f"(id) => window.__trainwire.zooms.get(id).series.loss.step.includes({N + 59})",
        arg=run.id,
        timeout=WAIT_MS,
    )
    steps = zoom_steps(page, run.id)
    assert steps is not None
    missing = sorted(set(range(4000, N + 60)) - set(steps))
    assert missing == [], f"{len(missing)} steps missing from the zoomed view: {missing[:5]}..."


def test_a_zoom_into_the_past_does_not_collect_every_later_live_point(
    live_server: LiveServer, browser: Any
) -> None:
    run = live_run(live_server, "grow")
    page = open_page(browser, live_server, f"#runs={run.id}", viewport=VIEWPORT)
    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    page.evaluate("() => window.__trainwire.zoom(1000, 1100)")
    page.wait_for_function(
        "(id) => window.__trainwire.zooms.get(id) !== undefined", arg=run.id, timeout=WAIT_MS
    )
    extra = 4000
    for step in range(N, N + extra):
        run.log({"loss": float(step % 97)}, step=step)
    last = N + extra - 1
    seen_all(page, live_server, run, last)
    full = page.evaluate("(id) => window.__trainwire.series[id].loss.step.length", run.id)
    steps = zoom_steps(page, run.id)
    assert steps is not None
    lo, hi = page.evaluate("(id) => window.__trainwire.zooms.get(id).range", run.id)
    outside = [s for s in steps if s > hi]
    # The full view is compacted to its budget; the zoom keeps every raw point after it.
    assert outside == [], (
        f"zoom of {lo}..{hi} holds {len(steps)} points ({len(outside)} after its range); "
        f"the full view holds {full}"
    )


def test_a_zoom_in_time_mode_fetches_raw_points_even_if_the_first_key_is_sparse(
    live_server: LiveServer, browser: Any
) -> None:
    run = live_run(live_server, "sparse", sparse=True)
    run.finish()
    page = open_page(browser, live_server, f"#runs={run.id}&x=wall", viewport=VIEWPORT)
    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    keys = page.evaluate("(id) => Object.keys(window.__trainwire.series[id])", run.id)
    assert keys[0] == "a_sparse"
    t = page.evaluate("(id) => window.__trainwire.series[id].loss.time", run.id)
    lo, hi = t[len(t) * 2 // 5], t[len(t) * 2 // 5 + 20]
    page.evaluate(f"() => window.__trainwire.zoom({lo!r}, {hi!r})")
    # No raw data was fetched for the zoom: the first key had no point in the range.
    page.wait_for_function("(id) => window.__trainwire.zooms.has(id)", arg=run.id, timeout=WAIT_MS)
    wait_chart(page, "loss", "f.dataset.sampled === 'false'")


def test_a_failing_history_fetch_is_retried_by_one_timer_not_one_per_selection_change(
    live_server: LiveServer, browser: Any
) -> None:
    run = trainwire.init(project="review", name="broken", url=live_server.url)
    run.log({"loss": 1.0}, step=0)
    run.finish()
    context = browser.new_context()
    page = context.new_page()
    requests: list[float] = []

    def fail(route: Any) -> None:
        requests.append(time.monotonic())
        route.fulfill(status=503, body="busy")

    page.route("**/api/runs/*/metrics?*", fail)
    from tests.conftest import TOKEN

    page.goto(f"{live_server.url}/?token={TOKEN}#runs={run.id}")
    page.wait_for_selector('#conn[data-state="live"]', timeout=WAIT_MS)
    page.wait_for_selector(f'li[data-run-id="{run.id}"] .run-open', timeout=WAIT_MS)
    # The user clicks the run's name a few times while its history cannot be read.
    for _ in range(10):
        page.wait_for_timeout(150)
        page.click(f'li[data-run-id="{run.id}"] .run-open')
    page.wait_for_timeout(500)
    before = len(requests)
    page.wait_for_timeout(4000)
    during = len(requests) - before
    # HISTORY_RETRY_MS is 2 s: about 2 requests in 4 s.
    assert during <= 4, f"{during} history requests in 4 s"


def test_a_following_zoom_stays_bounded_in_a_long_lived_tab(
    live_server: LiveServer, browser: Any
) -> None:
    run = live_run(live_server, "follow-grow")
    stored_until(live_server, run.id, N - 1)
    page = open_page(browser, live_server, f"#runs={run.id}", viewport=VIEWPORT)
    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    page.evaluate(f"() => window.__trainwire.zoom(4500, {N - 1})")  # follows
    page.wait_for_function(
        "(id) => window.__trainwire.zooms.get(id) !== undefined", arg=run.id, timeout=WAIT_MS
    )
    assert page.evaluate("() => window.__trainwire.view.follow") is True
    extra = 8000
    for step in range(N, N + extra):
        run.log({"loss": float(step % 97)}, step=step)
    last = N + extra - 1
    seen_all(page, live_server, run, last)
    # A zoom outgrown by live points is read again; that read may still be on its way
    # (CI once checked in between: 2,279 points against a full view of 1,123). Wait
    # for the window's points, in a zoom back within its bound.
    page.wait_for_function(
        "([id, last]) => { const z = window.__trainwire.zooms.get(id);"
        " if (z === undefined) return false;"
        " const full = window.__trainwire.series[id].loss.step.length;"
        " if (z.series.loss.step.length > 2 * full) return false;"
        " const have = new Set(z.series.loss.step); const lo = window.__trainwire.view.zoom[0];"
        " for (let s = Math.floor(lo) + 1; s <= last; s++) if (!have.has(s)) return false;"
        " return true; }",
        arg=[run.id, last],
        timeout=WAIT_MS,
    )
    full = page.evaluate("(id) => window.__trainwire.series[id].loss.step.length", run.id)
    steps = zoom_steps(page, run.id)
    assert steps is not None
    lo, hi = page.evaluate("() => window.__trainwire.view.zoom")
    assert hi == last
    # Every point of the window is there, and the zoom holds no more than a full view may.
    assert set(range(int(lo) + 1, last + 1)) <= set(steps)
    assert len(steps) <= 2 * full, f"zoom holds {len(steps)} points, the full view {full}"


def test_the_caption_of_a_long_finished_run_shows_its_last_point(
    live_server: LiveServer, browser: Any
) -> None:
    run = trainwire.init(project="review", name="last", url=live_server.url)
    for step in range(N - 1):
        run.log({"loss": float(step % 2)}, step=step)
    run.log({"loss": 0.5}, step=N - 1)  # neither its bucket's lowest nor its highest
    run.finish()
    page = open_page(browser, live_server, f"#runs={run.id}", viewport=VIEWPORT)
    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    label = page.locator('figure[data-key="loss"] .chart-last').inner_text()
    assert label == f"last step {N - 1}: 0.5"


def test_ticking_follow_latest_on_a_zoom_that_already_ends_at_the_newest_point_follows(
    live_server: LiveServer, browser: Any
) -> None:
    """Follow off, zoomed onto the newest steps, then "follow latest" ticked: the
    window does not jump (it already ends at the newest point), so its zoom stays the
    one read without following, bounded at its last step. The window then slides with
    every live point, but the points were never merged into the zoom that is drawn."""
    run = live_run(live_server, "tick-follow")
    stored_until(live_server, run.id, N - 1)
    page = open_page(browser, live_server, f"#runs={run.id}", viewport=VIEWPORT)
    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    page.uncheck("#follow")
    page.evaluate(f"() => window.__trainwire.zoom(4000, {N - 1})")
    page.wait_for_function(
        "(id) => window.__trainwire.zooms.get(id) !== undefined", arg=run.id, timeout=WAIT_MS
    )
    page.check("#follow")
    for step in range(N, N + 50):
        run.log({"loss": float(step % 97)}, step=step)
    seen_all(page, live_server, run, N + 49)
    page.wait_for_function(
        f"() => window.__trainwire.view.zoom[1] === {N + 49}", timeout=WAIT_MS
    )  # the window followed
    for _ in range(int(WAIT_MS) // 50):
        steps = zoom_steps(page, run.id)
        if steps is None or N + 49 in steps:
            break
        page.wait_for_timeout(50)  # Playwright's own wait: the page runs meanwhile
    drawn = page.evaluate(DRAWN, "loss")[0]
    assert N + 49 in drawn, f"newest drawn: {max(drawn)}"


def test_a_step_zoom_leaves_the_system_charts_whole(live_server: LiveServer, browser: Any) -> None:
    """System metrics' steps are seconds since init(): a range of training steps
    blanked every one of them, the first charts on the page."""
    run = trainwire.init(project="review", name="system", url=live_server.url)
    for step in range(1000):
        run.log({"loss": float(step % 97)}, step=step)
    for second in range(21):
        run.log({"system/cpu": 50.0, "rank1/system/cpu": 40.0}, step=second)
    run.finish()
    page = open_page(browser, live_server, f"#runs={run.id}&zoom=500,900", viewport=VIEWPORT)
    shown = "(key) => window.__trainwire.shown(key)"
    for key in ("loss", "system/cpu", "rank1/system/cpu"):
        wait_chart(page, key, "f.dataset.points !== '0'")
    page.wait_for_function(f"() => ({shown})('loss')?.[0] === 500", timeout=WAIT_MS)
    assert page.evaluate(shown, "loss") == [500, 900]
    for key in ("system/cpu", "rank1/system/cpu"):
        low, high = page.evaluate(shown, key)
        assert low <= 0 and high >= 20, (key, low, high)
    assert page.errors == []
