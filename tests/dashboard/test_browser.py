"""The dashboard in a real headless Chromium (Debian's, through its chromedriver).

A real prefork worker runs a saga that completes and one that rolls back; the browser loads
the list and the rolled-back saga's page, and the test reads the DOM: the bars, their order
on the axis and their computed colours, the legend, the step table and the Flower links.
Screenshots of both pages go to ``tests/artifacts/``; with ``SAGA_UPDATE_SCREENSHOT=1`` the
saga's also replaces ``docs/dashboard.png`` (the README's).  Without chromium the test fails
when ``$CI`` is set (``.ci/run`` installs it) and is skipped otherwise.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.dashboard.dashboard_process import (
    FLOWER,
    PASSWORD,
    USER,
    Dashboard,
    start_dashboard,
)
from tests.dashboard.waiting_sagas import run_approved, start_held
from tests.integration.conftest import _in_ci
from tests.integration.harness import REPO_ROOT, WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("SAGA_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SAGA_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
README_SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"

GREEN, RED = "rgb(31, 136, 61)", "rgb(207, 34, 46)"
"""dashboard.css: a succeeded attempt's colour and a failed one's."""
GREY, AMBER = "rgb(140, 149, 159)", "rgb(191, 135, 0)"
"""dashboard.css: sleeping or waiting, and held."""


def _missing_browser() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing: apt-get install -y {package} (.ci/run does)"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium with basic auth on every request it makes to the dashboard."""
    problem = _missing_browser()
    if problem is not None:
        if _in_ci():
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path: no Selenium Manager
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1000", "--hide-scrollbars",
                     f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(argument)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                               {"headers": {"Authorization": f"Basic {token}"}})
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(shop: ModuleType, tmp_path: Path) -> Iterator[Dashboard]:
    board = start_dashboard(shop, log_dir=tmp_path)
    yield board
    board.stop()


def bars(driver: Any, lane: str) -> list[dict[str, Any]]:
    """The bars of one lane in DOM order, with what the eye sees of them."""
    script = """
        return Array.from(document.querySelectorAll('.bar[data-lane="' + arguments[0] + '"]'))
          .map(function (b) {
            var box = b.getBoundingClientRect();
            return {step: b.dataset.step, kind: b.dataset.kind, attempt: b.dataset.attempt,
                    outcome: b.dataset.outcome,
                    colour: getComputedStyle(b).backgroundColor, left: box.left,
                    right: box.right, top: box.top, text: b.textContent.trim(),
                    title: b.getAttribute('title'),
                    href: b.querySelector('a') ? b.querySelector('a').href : null};
          });
    """
    found: list[dict[str, Any]] = driver.execute_script(script, lane)
    return found


def _from_and_took(title: str) -> tuple[float, float]:
    """A bar's start (seconds after the saga's) and duration, from its hover text."""
    found = re.search(r"([0-9.]+) (s|ms) from \+([0-9.]+) (s|ms)", title)
    assert found is not None, title
    took, took_unit, start, start_unit = found.groups()
    return (float(start) / (1000 if start_unit == "ms" else 1),
            float(took) / (1000 if took_unit == "ms" else 1))


def saga_status(driver: Any) -> str:
    """The status the saga's page shows now, read in one script (the page may be swapping
    its content in: a found element can go stale before it is read)."""
    found: str = driver.execute_script(
        "var e = document.getElementById('saga-status'); return e ? e.textContent : '';")
    return found.strip()


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), path
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def test_a_rolled_back_saga_in_a_real_browser(shop: ModuleType, shop_worker: WorkerProcess,
                                              dashboard: Dashboard, browser: Any,
                                              saga_id: str) -> None:
    """The list shows both sagas newest first; the rolled-back saga's page draws each
    attempt as a bar on one axis, forward in start order, the rollback beneath in the order
    it ran (reverse start order), green for success and red for failure, each labelled with
    its step and attempt, its error on hover, and linked to its task in Flower."""
    done = shop.order.apply_async(saga_id=f"{saga_id}-ok").wait(timeout=60)
    back = shop.order.apply_async(saga_id=f"{saga_id}-back", params={
        "fail": {"shop.ticket": "always"}, "rollback_fail": {"shop.charge": "times:1"},
    }).wait(timeout=60)
    assert (done.status, back.status) == ("complete", "errored")

    browser.get(dashboard.base + "/")
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('tr.saga-row'))"
        ".map(function (r) { return [r.dataset.id, r.dataset.status]; });")
    assert rows[:2] == [[f"{saga_id}-back", "errored"], [f"{saga_id}-ok", "complete"]]
    screenshot(browser, "dashboard-list.png")

    browser.get(f"{dashboard.base}/sagas/{saga_id}-back")
    assert saga_status(browser) == "errored"
    forward, rollback = bars(browser, "forward"), bars(browser, "rollback")

    assert [(b["step"], b["attempt"]) for b in forward] == [
        ("shop.reserve", "1"), ("shop.charge", "1"),
        ("shop.ticket", "1"), ("shop.ticket", "2"), ("shop.ticket", "3")]
    assert [b["colour"] for b in forward] == [GREEN, GREEN, RED, RED, RED]
    assert [(b["step"], b["attempt"]) for b in rollback] == [
        ("shop.ticket", "1"), ("shop.charge", "1"), ("shop.charge", "2"), ("shop.reserve", "1")]
    assert [b["colour"] for b in rollback] == [GREEN, RED, GREEN, GREEN]

    # One time axis: each bar starts at or after the one before it in the order things ran,
    # and the rollback lane lies beneath the steps.
    ran = forward + rollback
    assert all(a["left"] <= b["left"] + 1 for a, b in itertools.pairwise(ran))
    assert min(b["top"] for b in rollback) > max(b["top"] for b in forward)
    assert all(b["right"] > b["left"] for b in ran)

    assert forward[3]["text"] == "shop.ticket #2"
    assert "RuntimeError: step failed on purpose" in forward[3]["title"]
    assert "RuntimeError" in rollback[1]["title"]
    assert all(b["href"].startswith(f"{FLOWER}/task/") for b in ran)
    assert len({b["href"] for b in forward if b["step"] == "shop.ticket"}) == 1  # retries
    legend = browser.find_element("css selector", ".legend").text
    assert "succeeded" in legend and "failed" in legend

    table = browser.find_element("id", "steps").text
    assert "shop.ticket" in table and "errored" in table
    events = browser.find_elements("css selector", "#events tbody tr")
    assert len(events) == len(shop.sagas.run(f"{saga_id}-back").events())

    path = screenshot(browser, "dashboard-saga.png")
    if os.environ.get("SAGA_UPDATE_SCREENSHOT"):
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, README_SCREENSHOT)


def test_a_running_saga_refreshes_by_itself(shop: ModuleType, shop_worker: WorkerProcess,
                                            dashboard: Dashboard, browser: Any,
                                            saga_id: str) -> None:
    """The list shows a saga started after it loaded, and the page of a running saga shows
    it running, then its end, both without a reload: the inline script polls the JSON API
    and swaps the page's content when it changed."""
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.integration.harness import wait_until

    browser.get(dashboard.base + "/")
    browser.execute_script("window.notReloaded = true;")
    shop.order.apply_async(saga_id=f"{saga_id}-new").wait(timeout=60)
    WebDriverWait(browser, 60, poll_frequency=0.2).until(lambda d: d.find_elements(
        "css selector", f'tr.saga-row[data-id="{saga_id}-new"][data-status="complete"]'))
    assert browser.execute_script("return window.notReloaded === true;")

    # charge and ticket sleep 4 s each (their timeout is 5 s): running while the page loads
    run = shop.order.apply_async(saga_id=saga_id, params={
        "fail": {"shop.charge": "sleep:4", "shop.ticket": "sleep:4"}})
    assert wait_until(lambda: run.status().step("shop.charge").status == "running",
                      timeout=30)
    browser.get(f"{dashboard.base}/sagas/{saga_id}")
    assert saga_status(browser) == "running"
    outcomes = [b["outcome"] for b in bars(browser, "forward")]
    assert outcomes in (["complete", "running"], ["complete", "complete", "running"])
    browser.execute_script("window.notReloaded = true;")

    WebDriverWait(browser, 60, poll_frequency=0.2).until(
        lambda d: saga_status(d) == "complete")
    assert browser.execute_script("return window.notReloaded === true;")
    assert [b["colour"] for b in bars(browser, "forward")] == [GREEN, GREEN, GREEN]
    assert browser.execute_script("return document.querySelector('main[data-refresh]');") is None


def test_sagas_that_wait_in_a_real_browser(shop: ModuleType, shop_worker: WorkerProcess,
                                           dashboard: Dashboard, browser: Any,
                                           saga_id: str) -> None:
    """A saga that slept 2 s and then waited for an event draws its sleep and its wait as
    grey "sleeping or waiting" bars, on the time axis between the steps around them, the
    sleep about 2 s wide; a held saga's page says held and draws an amber held bar that
    runs on to now; the list filtered by ``held`` shows it."""
    state = run_approved(shop, f"{saga_id}-waited")
    assert state.status == "complete"
    start_held(shop, f"{saga_id}-held")

    browser.get(f"{dashboard.base}/sagas/{saga_id}-waited")
    assert saga_status(browser) == "complete"
    forward = bars(browser, "forward")
    assert [(b["step"], b["kind"], b["outcome"]) for b in forward] == [
        ("shop.reserve", "step", "complete"), ("cool-off", "sleep", "waiting"),
        ("wait:approval", "wait", "waiting"), ("shop.ticket", "step", "complete")]
    assert [b["colour"] for b in forward] == [GREEN, GREY, GREY, GREEN]
    assert all(a["left"] <= b["left"] + 1 and a["top"] < b["top"]
               for a, b in itertools.pairwise(forward))
    # The wait began when the sleep ended: in the hover texts (ms), and on the axis, but
    # where a short last bar sits at the very end of the axis, moved left to keep its
    # minimum width inside it (an event sent before the wait began ends it at once).
    sleep_from, sleep_took = _from_and_took(forward[1]["title"])
    wait_from, _ = _from_and_took(forward[2]["title"])
    assert abs(sleep_from + sleep_took - wait_from) <= 0.011, (forward[1], forward[2])
    track_right = browser.execute_script(
        "return document.querySelector('.bar[data-kind=\"wait\"]').parentElement"
        ".getBoundingClientRect().right;")
    if forward[2]["right"] < track_right - 1:
        assert forward[1]["right"] <= forward[2]["left"] + 1
    slept = re.match(r"sleep cool-off: sleeping or waiting, ([0-9.]+) s", forward[1]["title"])
    # 2 s, plus up to the 2 s a timer may take to fire (more on a loaded machine)
    assert slept is not None and 2.0 <= float(slept.group(1)) < 8.0, forward[1]["title"]
    assert [b["text"] for b in forward[1:3]] == ["cool-off", "wait:approval"]
    assert forward[1]["href"] is None and forward[2]["href"] is None  # no task in Flower
    legend = browser.find_element("css selector", ".legend").text
    assert "sleeping or waiting" in legend
    table = browser.find_element("id", "steps").text
    assert "sleep" in table and "wait" in table
    screenshot(browser, "dashboard-waiting.png")

    browser.get(f"{dashboard.base}/?status=held")
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('tr.saga-row'))"
        ".map(function (r) { return [r.dataset.id, r.dataset.status]; });")
    assert [f"{saga_id}-held", "held"] in rows and {status for _, status in rows} == {"held"}

    browser.get(f"{dashboard.base}/sagas/{saga_id}-held")
    assert saga_status(browser) == "held"
    [*steps, held] = bars(browser, "forward")
    assert [(b["step"], b["outcome"], b["colour"]) for b in steps] == [
        ("shop.reserve", "complete", GREEN), ("shop.ticket", "failed", RED)]
    assert (held["kind"], held["outcome"], held["colour"], held["text"]) == (
        "hold", "held", AMBER, "held")
    assert held["top"] > steps[-1]["top"] and held["left"] >= steps[-1]["left"] - 1
    assert "NonRetryableError" in held["title"]
    track = browser.execute_script(
        "return document.querySelector('.bar[data-kind=\"hold\"]').parentElement"
        ".getBoundingClientRect().right;")
    assert held["right"] == pytest.approx(track, abs=2)  # still held: up to now
    screenshot(browser, "dashboard-held.png")
