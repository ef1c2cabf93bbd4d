"""The report in a real browser: loads without console errors, sorts, filters, screenshots.

Runs headless Chromium through Selenium (Debian packages ``chromium`` and
``chromium-driver``). Skips when they are absent, unless
``KETAMAP_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs them).
The screenshot is kept in ``build/test-artifacts/report.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ketamap.report import render_report, write_report

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        if os.environ.get("KETAMAP_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail("chromium and chromedriver are required (KETAMAP_REQUIRE_BROWSER is set)")
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_bin)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def _cohort():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "report_cases", Path(__file__).with_name("test_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cohort()


def test_report_in_headless_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By

    study, subjects, qc, regions, counts = _cohort()
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts,
                         key_regions=("VTA", "SNc"))
    path = write_report(html, tmp_path / "report.html")
    browser.get(path.resolve().as_uri())

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    table = browser.find_element(By.ID, "region-table")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == len(regions)

    # sort by the acronym column: ascending, then descending on a second click
    headers = table.find_elements(By.CSS_SELECTOR, "thead th")
    names = [h.text.strip() for h in headers]
    col = names.index("acronym")
    header = headers[col]

    def column():
        return [r.find_elements(By.TAG_NAME, "td")[col].text
                for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

    header.click()
    first = column()
    header.click()
    second = column()
    assert first != second and sorted(first) == sorted(second)
    assert first in (sorted(first), sorted(first, reverse=True))
    assert second == first[::-1] or second in (sorted(first), sorted(first, reverse=True))

    box = browser.find_element(By.ID, "region-filter")
    box.send_keys("VTA")
    visible = [r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr") if r.is_displayed()]
    assert visible and len(visible) < len(regions)
    assert all("VTA" in r.text for r in visible)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "report.png"))
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
