"""The real thing: Debian's Chromium, driven by Playwright, watching a live run."""

from __future__ import annotations

import time
from typing import Any

import pytest
from tests.conftest import MS, SCREENSHOTS, LiveServer, wait_until

import trainwire
from trainwire.protocol.messages import Batch, RunSpec
from trainwire.settings import Settings
from trainwire.storage import SQLiteStore
from trainwire.storage.tokens import TokenStore

pytestmark = pytest.mark.browser


def points_in(page: Any, key: str) -> str:
    return f"document.querySelector('[data-key=\"{key}\"]')?.dataset.points"


def wait_for_points(page: Any, key: str, n: int) -> None:
    page.wait_for_function(
        f"() => Number({points_in(page, key)}) >= {n}", timeout=15_000 * MS * 1000
    )


def test_a_live_run_is_drawn_and_resumes_without_a_gap_after_a_dropped_connection(
    live_server: LiveServer, browser: Any
) -> None:
    errors: list[str] = []
    page = browser.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    run = trainwire.init(
        project="browser", name="<img src=x onerror=alert(1)>", url=live_server.url
    )
    run.log({"train/loss": 1.0, "val/acc": 0.1})
    page.goto(run.url)
    page.wait_for_selector('#conn[data-state="live"]')
    for step in range(1, 60):
        run.log({"train/loss": 1.0 / (step + 1), "lr": 0.01 * step})
    wait_for_points(page, "train/loss", 60)
    assert page.locator('[data-key="val/acc"]').count() == 1
    # The run's name is shown as text, never parsed as HTML.
    assert page.get_by_text("<img src=x onerror=alert(1)>").count() >= 1
    assert page.locator("img[src=x]").count() == 0

    # Drop every connection: the server goes away while training goes on.
    live_server.stop()
    page.wait_for_selector('#conn[data-state="reconnecting"]')
    for step in range(60, 120):
        run.log({"train/loss": 1.0 / (step + 1), "lr": 0.01 * step})
    live_server.start()
    page.wait_for_selector('#conn[data-state="live"]', timeout=30_000 * MS * 1000)
    for step in range(120, 150):
        run.log({"train/loss": 1.0 / (step + 1), "lr": 0.01 * step})
    run.finish()
    assert run.delivered
    wait_for_points(page, "train/loss", 150)
    steps = page.evaluate(
        f"() => Array.from(window.__trainwire.series[{run.id!r}]['train/loss'].step)"
    )
    assert steps == list(range(150))  # no gap, no duplicate
    assert page.locator(f'[data-run-id="{run.id}"]').count() == 1
    assert errors == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "live-run.png"), full_page=True)
    page.close()


def test_a_page_whose_share_token_is_revoked_says_so(live_server: LiveServer, browser: Any) -> None:
    """The server closes its socket 4401 and refuses every reconnect: the page says
    why, where it showed "reconnecting…" alone, as for a network outage."""
    tokens = TokenStore(Settings(data_dir=live_server.data_dir).db_path)
    token_id, secret = tokens.create("read", time.time(), None, "a colleague")
    run = trainwire.init(project="browser", url=live_server.url)
    run.log({"loss": 1.0})
    page = browser.new_page()
    page.goto(f"{live_server.url}/?token={secret}")
    page.wait_for_selector('#conn[data-state="live"]')
    assert tokens.revoke(token_id)
    tokens.close()
    status = page.locator("#status")

    def refused() -> bool:
        # Frames for the page: its token is read again at one of them (at most a
        # second after the last read, RECHECK_SECONDS).
        run.log({"loss": 0.5})
        return status.is_visible()

    assert wait_until(refused, 15_000 * MS, interval=100 * MS)
    run.finish()
    assert "token revoked or expired" in status.inner_text()
    page.wait_for_selector('#conn[data-state="reconnecting"]')
    page.close()


def test_a_run_deleted_and_made_again_while_the_page_was_away_is_loaded_anew(
    live_server: LiveServer, browser: Any
) -> None:
    """Its commits are numbered afresh: a page resuming it by number would keep the
    old run's points and skip as many of the new one's."""
    errors: list[str] = []
    page = browser.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with trainwire.init(id="reused", project="browser", url=live_server.url) as old:
        for step in range(10):
            old.log({"x": 1.0}, step=step)
    page.goto(old.url)
    wait_for_points(page, "x", 10)

    live_server.stop()
    page.wait_for_selector('#conn[data-state="reconnecting"]')
    store = SQLiteStore(live_server.store.path)  # the server's own closed with it
    assert store.delete_run("reused")
    again = RunSpec(id="reused", project="browser", name="second life")
    store.open_run(again, "main", now=time.time())
    store.append_batch(
        "reused",
        "main",
        Batch(seq=1, rows=[(s, 1.0, {"x": 2.0}) for s in range(5)]),
        now=time.time(),
    )
    store.close()
    live_server.start()
    page.wait_for_function(
        "() => window.__trainwire.series.reused?.x?.value.length === 5",
        timeout=30_000 * MS * 1000,
    )
    values = page.evaluate("() => Array.from(window.__trainwire.series.reused.x.value)")
    assert values == [2.0] * 5
    assert errors == []
    page.close()
