"""Hostile strings in a real browser: a run whose name, project, config and metric
keys are HTML/JS payloads is drawn with every payload shown as text, nothing run,
nothing injected, and nothing for the Content-Security-Policy to block."""

from __future__ import annotations

from typing import Any, Final

import pytest

import trainwire
from tests.conftest import MS, SCREENSHOTS, LiveServer

pytestmark = pytest.mark.browser

# Playwright counts in milliseconds.
WAIT_MS: Final = 15_000 * MS * 1000

PAYLOADS: Final = (
    "<img src=x onerror=window.__pwned=1>",
    "</script><script>window.__pwned=2</script>",
    '"><svg onload=window.__pwned=3>',
)
# Would open a dialog if it ever ran.
ALERT: Final = "<img src=x onerror=alert(4)>"
STEPS: Final = 12

# Before any page script, CSP or not (Playwright injects it through the debugger):
# collect violations as events too, in case the console wording ever changes.
RECORD_VIOLATIONS: Final = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""

POINTS_OF: Final = """([key, n]) => {
  const figure = [...document.querySelectorAll("figure[data-key]")].find(
    (f) => f.dataset.key === key,
  );
  return figure !== undefined && Number(figure.dataset.points) >= n;
}"""

INJECTED: Final = """() => ({
  imgs: document.querySelectorAll("img").length,
  svgs: [...document.querySelectorAll("svg")].filter((s) => !s.closest(".uplot")).length,
  handlers: document.querySelectorAll("[onerror], [onload]").length,
  scripts: [...document.scripts].map((s) => s.src || "inline: " + s.textContent),
  violations: window.__violations,
})"""


def test_payloads_in_every_user_string_are_shown_as_text_and_never_run(
    live_server: LiveServer, browser: Any
) -> None:
    dialogs: list[str] = []
    console: list[str] = []
    errors: list[str] = []

    def dismiss(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page = browser.new_page()
    page.on("dialog", dismiss)
    page.on("console", lambda message: console.append(message.text))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.add_init_script(RECORD_VIOLATIONS)

    config = {PAYLOADS[2]: PAYLOADS[0], PAYLOADS[0]: PAYLOADS[1], PAYLOADS[1]: PAYLOADS[2]}
    run = trainwire.init(
        project=PAYLOADS[1],
        name=PAYLOADS[0],
        config={**config, "alert": ALERT},
        url=live_server.url,
    )
    keys = [*PAYLOADS, ALERT]
    for step in range(STEPS // 2):
        run.log({key: float(step) for key in keys})
    assert run.url is not None
    page.goto(run.url)
    page.wait_for_selector('#conn[data-state="live"]', timeout=WAIT_MS)
    for step in range(STEPS // 2, STEPS):  # and some live, through the points frames
        run.log({key: float(step) for key in keys})
    run.finish(timeout=10_000 * MS)
    assert run.delivered
    for key in keys:
        page.wait_for_function(POINTS_OF, arg=[key, STEPS], timeout=WAIT_MS)
    # The header is drawn again when the run's status changes.
    page.wait_for_selector('#run-status[data-status="finished"]', timeout=WAIT_MS)
    page.click("#run-config-box summary")

    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    assert dialogs == []
    assert page.locator("img[src=x]").count() == 0
    injected = page.evaluate(INJECTED)
    assert injected == {
        "imgs": 0,
        "svgs": 0,
        "handlers": 0,
        "scripts": [f"{live_server.url}/app.js"],
        "violations": [],
    }
    for payload in PAYLOADS:
        # Run name, project, config key and value, metric key: each literally, as text.
        assert page.get_by_text(payload, exact=True).count() >= 3, payload
    assert page.get_by_text(ALERT, exact=True).count() >= 2  # config value, metric key
    assert page.title() == f"{PAYLOADS[0]} · trainwire"
    assert [text for text in console if "Content Security Policy" in text] == []
    assert errors == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "xss.png"), full_page=True)
    page.close()
