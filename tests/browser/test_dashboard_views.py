"""The dashboard for daily work, in Debian's Chromium: overlaying runs, smoothing, the
URL state, zoom re-fetch, the run page, downloads, and phone and desktop screenshots.

Screenshots land in ``build/screenshots/`` (git-ignored; see the README's Tests
section) so a person can look at them after a run of the suite.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any, Final

import pytest
from tests.conftest import MS, SCREENSHOTS, TOKEN, LiveServer, wait_until

import trainwire

pytestmark = pytest.mark.browser

WAIT_MS: Final = 20_000 * MS * 1000

# The columns a chart draws (uPlot's data: x, then one column per series), for
# comparing with a reference computed here.
DRAWN: Final = "(key) => window.__trainwire.drawn(key)"


def logged_run(server: LiveServer, name: str, values: list[float], **config: Any) -> str:
    run = trainwire.init(project="views", name=name, config=config, url=server.url)
    for step, value in enumerate(values):
        run.log({"train/loss": value, "train/acc": 1 - value / 10, "lr": 0.1}, step=step)
    run.finish()
    assert run.delivered
    return run.id


def open_page(browser: Any, server: LiveServer, fragment: str = "", **context: Any) -> Any:
    page = browser.new_context(**context).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(f"{server.url}/?token={TOKEN}{fragment}")
    page.wait_for_selector('#conn[data-state="live"]', timeout=WAIT_MS)
    return page


def wait_chart(page: Any, key: str, condition: str) -> None:
    """Wait until the chart of ``key`` satisfies a JS condition on ``f`` (its figure)."""
    page.wait_for_function(
        f"""(key) => {{
          const f = [...document.querySelectorAll("figure[data-key]")]
            .find((x) => x.dataset.key === key);
          return f !== undefined && ({condition});
        }}""",
        arg=key,
        timeout=WAIT_MS,
    )


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased EMA, the reference for the chart's smoothed line."""
    out, last = [], 0.0
    for n, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**n))
    return out


def test_overlay_smoothing_and_a_link_that_restores_the_view(
    live_server: LiveServer, browser: Any
) -> None:
    a_values = [math.sin(i / 5) + 2 for i in range(50)]
    b_values = [math.cos(i / 7) + 3 for i in range(30)]
    a = logged_run(live_server, "alpha", a_values, lr=0.1)
    b = logged_run(live_server, "beta", b_values, lr=0.2)
    page = open_page(browser, live_server, f"#runs={a},{b}")

    wait_chart(page, "train/loss", f"f.dataset.runs === '{a},{b}'")
    assert page.locator(".legend-item").count() == 2
    assert page.locator(".run-check:checked").count() == 2
    drawn = page.evaluate(DRAWN, "train/loss")
    # One x axis, both runs on it: alpha has steps 0..49, beta 0..29 (undefined beyond).
    assert drawn[0] == list(range(50))
    assert drawn[1] == pytest.approx(a_values)
    assert drawn[2][:30] == pytest.approx(b_values)
    assert all(v is None for v in drawn[2][30:])

    # The tooltip names every run with its value at the cursor (step 10 of 0..49,
    # where both runs have points).
    box = page.locator('figure[data-key="train/loss"] .u-over').bounding_box()
    page.mouse.move(box["x"] + box["width"] * 10 / 49, box["y"] + box["height"] / 2)
    page.wait_for_selector(".tooltip:not([hidden])", timeout=WAIT_MS)
    rows = page.locator(".tooltip-row").all_inner_texts()
    assert [r.split("\n")[0].strip() for r in rows] == ["alpha", "beta"]
    head = page.locator(".tooltip-head").inner_text()
    step = int(head.rsplit("step ", 1)[1])
    assert rows[0].split("\n")[-1].strip() == f"{a_values[step]:.6g}"

    page.evaluate(
        "() => { const s = document.querySelector('#smooth'); s.value = '0.6';"
        " s.dispatchEvent(new Event('input', {bubbles: true})); }"
    )
    page.wait_for_function("() => location.hash.includes('smooth=0.6')", timeout=WAIT_MS)
    wait_chart(page, "train/loss", "window.__trainwire.drawn(key).length === 5")
    drawn = page.evaluate(DRAWN, "train/loss")
    assert drawn[1] == pytest.approx(a_values)  # raw, drawn faint behind
    assert drawn[2] == pytest.approx(ema(a_values, 0.6))  # smoothed
    assert drawn[4][:30] == pytest.approx(ema(b_values, 0.6))

    page.check("#log")
    page.select_option("#xmode", "relative")
    page.fill("#metric-filter", "loss")
    wait_chart(page, "train/loss", "true")
    page.wait_for_function(
        "() => document.querySelectorAll('figure[data-key]').length === 1", timeout=WAIT_MS
    )
    url = page.url
    assert "log=1" in url and "x=relative" in url and "metrics=loss" in url

    # A colleague opens the link: same runs, same settings.
    other = open_page(browser, live_server, "#" + url.split("#", 1)[1])
    wait_chart(other, "train/loss", f"f.dataset.runs === '{a},{b}'")
    assert other.locator("#smooth").input_value() == "0.6"
    assert other.locator("#log").is_checked()
    assert other.locator("#xmode").input_value() == "relative"
    assert other.locator("figure[data-key]").count() == 1

    # The link followed in a tab that already shows the dashboard: only the
    # fragment changes, the page does not reload, and the view must follow it.
    page.evaluate(f"() => {{ location.hash = '#runs={b}&smooth=0.3&q=beta'; }}")
    wait_chart(page, "train/loss", f"f.dataset.runs === '{b}'")
    assert page.locator("#smooth").input_value() == "0.3"
    # The run list is filtered by the link's search, and its box says so.
    assert page.locator("li[data-run-id]").count() == 1
    assert page.locator("#run-search").input_value() == "beta"
    assert page.locator("#runs-empty").is_hidden()
    # A search that hides every run says so, rather than showing an empty list.
    page.fill("#run-search", "no such run")
    page.locator("#runs-empty").wait_for(state="visible", timeout=WAIT_MS)
    assert page.locator("#runs-empty").inner_text() == (
        "No run matches the search and status filter."
    )
    page.fill("#run-search", "beta")
    page.locator("#runs-empty").wait_for(state="hidden", timeout=WAIT_MS)
    assert not page.locator("#log").is_checked()
    assert page.locator("#xmode").input_value() == "step"
    assert page.locator("figure[data-key]").count() > 1  # no metric filter
    assert page.errors == [] and other.errors == []


def test_a_zoom_fetches_every_raw_point_of_the_range_and_no_spike_vanishes(
    live_server: LiveServer, browser: Any
) -> None:
    n = 30_000
    values = [1.0] * n
    values[12_345] = 1e6  # one spike among 30,000 points
    run = trainwire.init(project="views", name="long", url=live_server.url)
    for step, value in enumerate(values):
        run.log({"loss": value}, step=step)
    run.finish()
    page = open_page(
        browser, live_server, f"#runs={run.id}", viewport={"width": 900, "height": 700}
    )

    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    full = page.evaluate("(id) => window.__trainwire.series[id].loss", run.id)
    assert len(full["step"]) < 4000  # downsampled to about twice the width
    assert 1e6 in full["value"]
    assert full["step"][full["value"].index(1e6)] == 12_345

    # Drag across 2% of the chart with the mouse: about 600 steps, fewer than the
    # chart is wide, so every raw point comes back.
    box = page.locator('figure[data-key="loss"] .u-over').bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.4, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.42, y, steps=5)
    page.mouse.up()
    wait_chart(page, "loss", "f.dataset.sampled === 'false'")
    zoom = page.evaluate("(id) => window.__trainwire.zooms.get(id)", run.id)
    start, end = zoom["range"]
    assert 0 < start < end < n
    drawn = page.evaluate(DRAWN, "loss")
    assert drawn[0] == list(range(start, end + 1))  # every raw point of the range
    assert "zoom=" in page.url

    # Double-click: back to the whole run, downsampled.
    page.locator('figure[data-key="loss"] .u-over').dblclick()
    wait_chart(page, "loss", "f.dataset.sampled === 'true'")
    assert "zoom=" not in page.url
    assert page.errors == []


def test_live_points_merge_into_the_view_and_follow_latest_keeps_them_in_range(
    live_server: LiveServer, browser: Any
) -> None:
    run = trainwire.init(project="views", name="live", url=live_server.url)
    for step in range(100):
        run.log({"loss": float(step)}, step=step)
    page = open_page(browser, live_server, f"#runs={run.id}")
    wait_chart(page, "loss", "Number(f.dataset.points) >= 100")
    page.evaluate("() => window.__trainwire.zoom(50, 99)")
    for step in range(100, 160):
        run.log({"loss": float(step)}, step=step)
    wait_chart(page, "loss", "Number(f.dataset.points) >= 160")
    # Following: the zoom slid so the newest step is at its right edge, same width.
    page.wait_for_function("() => window.__trainwire.view.zoom[1] === 159", timeout=WAIT_MS)
    assert page.evaluate("() => window.__trainwire.view.zoom") == [110, 159]
    steps = page.evaluate("(id) => window.__trainwire.series[id].loss.step", run.id)
    assert steps == list(range(160))  # no gap, no duplicate between history and live
    run.finish()
    assert page.errors == []


def test_run_page_and_downloads(live_server: LiveServer, browser: Any, tmp_path: Path) -> None:
    run_id = logged_run(live_server, "paged", [3.0, 2.0, float("nan"), 1.0, 4.0], depth=3)
    page = open_page(browser, live_server, f"#runs={run_id}")
    wait_chart(page, "train/loss", "Number(f.dataset.points) === 5")

    page.click("#run-page-toggle")
    page.wait_for_selector("#run-summary tbody tr", timeout=WAIT_MS)
    rows = page.locator("#run-summary tbody tr").all_inner_texts()
    loss = next(r for r in rows if r.startswith("train/loss"))
    assert loss.split("\t")[1:] == ["4 @ 4", "1", "4", "5"]  # last, min, max, points
    env = page.locator("#run-env").inner_text()
    assert "python" in env and "host" in env
    assert "depth" in page.locator("#run-page-config").inner_text()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "run-page.png"), full_page=True)
    page.click("#run-page-toggle")
    wait_chart(page, "train/loss", "true")

    with page.expect_download() as png:
        page.click('figure[data-key="train/loss"] button.chart-action')
    png_path = tmp_path / "chart.png"
    png.value.save_as(png_path)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page.click('figure[data-key="train/loss"] .chart-csv summary')
    with page.expect_download() as csv:
        page.click('figure[data-key="train/loss"] .chart-csv-list a')
    lines = Path(csv.value.path()).read_text().splitlines()
    assert lines[0] == "step,time,value"
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2", "3", "4"]
    assert lines[3].split(",")[2] == "NaN"
    assert page.errors == []


def test_the_run_page_shows_what_came_just_after_it_was_fetched(
    live_server: LiveServer, browser: Any
) -> None:
    """The page fetches a run's summary at most every 2 s: a change within that time
    (the run's last points, its finish) must be fetched once the 2 s are up, not
    dropped until the run changes again, which a finished run never does."""
    run = trainwire.init(project="views", name="short", url=live_server.url)
    run.log({"loss": 1.0}, step=0)
    assert wait_until(lambda: "loss" in live_server.store.summary(run.id), WAIT_MS / 1000)
    page = open_page(browser, live_server, f"#runs={run.id}&focus={run.id}")
    page.wait_for_selector("#run-summary tbody tr", timeout=WAIT_MS)
    run.log({"loss": 0.5}, step=1)
    run.finish()
    assert run.delivered
    page.wait_for_function(
        "() => document.querySelector('#run-status').textContent === 'finished'",
        timeout=WAIT_MS,
    )
    page.wait_for_function(
        "() => document.querySelector('#run-summary tbody tr').textContent.includes('0.5 @ 1')",
        timeout=WAIT_MS,
    )
    row = page.locator("#run-summary tbody tr").inner_text()
    assert row.split("\t")[1:] == ["0.5 @ 1", "0.5", "1", "2"]  # last, min, max, points
    assert page.errors == []


def test_a_metric_a_float32_ulp_either_side_of_1_is_drawn(
    live_server: LiveServer, browser: Any
) -> None:
    """uPlot rounds a padded y range of 0.99999994..1 to [1, 1]; laying out its
    ticks then froze the page for seconds and threw, leaving the chart empty."""
    below_one = struct.unpack("<f", struct.pack("<f", 0.99999994))[0]
    values = [1.0 if step % 3 else below_one for step in range(30)]
    run_id = logged_run(live_server, "float32", values)
    page = open_page(browser, live_server, f"#runs={run_id}&metrics=loss")
    wait_chart(page, "train/loss", "Number(f.dataset.points) === 30")
    # uPlot lays out the chart after the frame that made it.
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => setTimeout(done)))")
    assert page.errors == []
    assert page.evaluate(DRAWN, "train/loss")[1] == pytest.approx(values, abs=0)


@pytest.mark.parametrize(
    ("name", "context"),
    [
        ("desktop-light", {"viewport": {"width": 1280, "height": 800}, "color_scheme": "light"}),
        ("desktop-dark", {"viewport": {"width": 1280, "height": 800}, "color_scheme": "dark"}),
        (
            "phone",
            {
                "viewport": {"width": 390, "height": 844},
                "device_scale_factor": 2,
                "is_mobile": True,
                "has_touch": True,
                "color_scheme": "dark",
            },
        ),
    ],
)
def test_screenshots_and_a_phone_that_works(
    live_server: LiveServer, browser: Any, name: str, context: dict[str, Any]
) -> None:
    a = logged_run(live_server, "resnet-a", [2 / (1 + i / 10) for i in range(200)], lr=0.1)
    b = logged_run(live_server, "resnet-b", [2.5 / (1 + i / 12) for i in range(200)], lr=0.05)
    page = open_page(browser, live_server, f"#runs={a},{b}&smooth=0.5", **context)
    wait_chart(page, "train/loss", f"f.dataset.runs === '{a},{b}'")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)
    # Nothing wider than the screen: no sideways scrolling.
    width = context["viewport"]["width"]
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    if name != "phone":
        assert page.errors == []
        return

    # The run list is a drawer behind the Runs button.
    assert not page.locator("#runs").is_visible()
    page.click("#menu")
    assert page.locator("#runs").is_visible()
    page.screenshot(path=str(SCREENSHOTS / "phone-runs.png"))
    page.click(f'li[data-run-id="{a}"] .run-open')  # shows it alone, closes the drawer
    wait_chart(page, "train/loss", f"f.dataset.runs === '{a}'")
    assert not page.locator("#runs").is_visible()

    # Pinch on the chart: two fingers moving apart zoom the x axis in.
    box = page.locator('figure[data-key="train/loss"] .u-over').bounding_box()
    cdp = page.context.new_cdp_session(page)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def touch(kind: str, spread: float) -> None:
        points = (
            []
            if kind == "touchEnd"
            else [
                {"x": cx - spread, "y": cy, "id": 1},
                {"x": cx + spread, "y": cy, "id": 2},
            ]
        )
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    touch("touchStart", 20)
    for spread in (40, 60, 80):
        touch("touchMove", spread)
    touch("touchEnd", 0)
    page.wait_for_function("() => window.__trainwire.view.zoom !== null", timeout=WAIT_MS)
    low, high = page.evaluate("() => window.__trainwire.view.zoom")
    assert high - low < 199 / 2  # four times closer, around the middle
    page.screenshot(path=str(SCREENSHOTS / "phone-zoomed.png"))
    assert page.errors == []


def test_a_long_run_list_draws_a_page_keeps_the_selected_and_shows_more_on_demand(
    live_server: LiveServer, browser: Any
) -> None:
    """A team's server holds thousands of runs: drawn whole, the list took half a
    second at every running run's status update."""
    from trainwire.protocol.messages import RunSpec

    for n in range(450):
        run_id = f"sweep-{n:03d}"
        live_server.store.open_run(
            RunSpec(id=run_id, project="sweep", name=f"lr-{n:03d}"), "s", now=1000.0 + n
        )
        live_server.store.set_status(run_id, "s", "finished", seq=1, now=1000.0 + n)
    page = open_page(browser, live_server, "#runs=sweep-005")
    listed = "#runs li[data-run-id]"
    page.wait_for_function(f"() => document.querySelectorAll('{listed}').length > 0")
    # The newest 200 (sweep-449 to sweep-250), then the selected run further down.
    assert page.locator(listed).count() == 201
    assert page.locator(f'{listed}[data-run-id="sweep-005"] .run-check').is_checked()
    assert page.locator(".run-more-note").inner_text() == "249 more match; the search narrows them"
    page.focus(".run-more")
    page.keyboard.press("Enter")
    assert page.locator(listed).count() == 401  # the next 200, the selected run still last
    # The focus goes on to the first of them, not to the page's start with the
    # button drawn anew; and it stays where it is when the list is redrawn.
    focused = "() => document.activeElement.closest('li')?.dataset.runId"
    assert page.evaluate(focused) == "sweep-249"
    page.focus(f'{listed}[data-run-id="sweep-300"] .run-check')
    page.keyboard.press("Space")  # ticked: the selection changes, the list is redrawn
    assert page.locator(f'{listed}[data-run-id="sweep-300"] .run-check').is_checked()
    assert page.evaluate(focused) == "sweep-300"
    page.fill("#run-search", "lr-007")
    assert page.locator(listed).count() == 1
    assert page.locator(".run-more").count() == 0
    assert page.errors == []
    page.close()
