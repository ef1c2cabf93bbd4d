"""The three reports in a real browser: no console errors, key results in view, screenshots.

Runs headless Chromium through Selenium (Debian packages ``chromium`` and
``chromium-driver``). Skips when they are absent, unless
``KETAMAP_REQUIRE_BROWSER=1`` (set by ``.ci/run``, which installs them).
The screenshots are kept in ``build/test-artifacts/``: ``report.png`` (census),
``report_ensembles.png`` and ``report_spines.png``.
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
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_bin)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def test_report_in_headless_chromium(browser, tmp_path, census_case):
    from selenium.webdriver.common.by import By

    study, subjects, qc, regions, counts = census_case
    html = render_report(
        study=study,
        subjects=subjects,
        qc=qc,
        regions=regions,
        counts=counts,
        key_regions=("VTA", "SNc"),
    )
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
        return [
            r.find_elements(By.TAG_NAME, "td")[col].text
            for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")
        ]

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

    box.clear()
    browser.execute_script("window.scrollTo(0, 0)")
    _key_box_in_view(browser)
    _screenshot(browser, "report.png")


def _key_box_in_view(browser):
    """The key-results box is shown, has results, and lies in the first screen."""
    from selenium.webdriver.common.by import By

    key = browser.find_element(By.ID, "key-results")
    assert key.is_displayed()
    assert "Key results" in key.text and len(key.find_elements(By.TAG_NAME, "li")) >= 1
    height = browser.execute_script("return window.innerHeight")
    assert key.location["y"] + key.size["height"] <= height, (key.location, height)
    return key


def _screenshot(browser, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / name))
    assert (ARTIFACTS / name).stat().st_size > 10_000


def _open(browser, path):
    browser.get(path.resolve().as_uri())
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_census_images_open_full_size_on_click(browser, tmp_path, census_case):
    """A click on a QC image or figure opens it at its own size over the page; a click
    or Esc closes it."""
    import base64

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from ketamap.atlas import make_phantom
    from ketamap.report.qc import registration_overlay_png

    atlas = make_phantom(resolution_um=100)
    png = registration_overlay_png(atlas.reference, atlas.annotation, ontology=atlas.ontology,
                                   title="saline-0")  # fmt: skip
    study, subjects, qc, regions, counts = census_case
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts,
                         images={"registration/saline-0": png}, qc_boundary_level=4)  # fmt: skip
    _open(browser, write_report(html, tmp_path / "report.html"))
    lightbox = browser.find_element(By.ID, "lightbox")
    assert not lightbox.is_displayed()
    thumb = browser.find_element(By.CSS_SELECTOR, "img.zoom[alt='registration/saline-0']")
    browser.execute_script("arguments[0].scrollIntoView()", thumb)
    assert thumb.size["width"] < 1500  # shown smaller than it is
    thumb.click()
    assert lightbox.is_displayed()
    big = browser.find_element(By.ID, "lightbox-img")
    natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].width]", big)
    assert natural[0] == 1500 and natural[1] == 1500  # drawn at full size
    assert big.get_attribute("src") == thumb.get_attribute("src")
    assert base64.b64decode(big.get_attribute("src").split(",", 1)[1]) == png
    _screenshot(browser, "report_lightbox.png")
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()
    assert not lightbox.is_displayed()
    figure = browser.find_element(By.CSS_SELECTOR, "#fig-volcano img.zoom")
    browser.execute_script("arguments[0].scrollIntoView()", figure)
    figure.click()
    assert lightbox.is_displayed()
    lightbox.click()
    assert not lightbox.is_displayed()


def test_ensembles_report_in_headless_chromium(browser, tmp_path):
    from ketamap.pipelines import run_ensembles
    from ketamap.simulate.calcium import simulate_calcium_study

    toml = simulate_calcium_study(tmp_path / "sim", seed=0, n_cells=60, n_ensembles=2,
                                  ensemble_size=10, duration_s=240.0)  # fmt: skip
    run_ensembles(toml, tmp_path / "out")
    _open(browser, tmp_path / "out" / "report.html")
    key = _key_box_in_view(browser)
    assert "stress" in key.text
    _screenshot(browser, "report_ensembles.png")


def test_spines_report_in_headless_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from ketamap.pipelines import run_spines
    from ketamap.simulate.spines import simulate_spine_study

    toml = simulate_spine_study(tmp_path / "study", seed=5, n_mice=1, dendrites_per_mouse=2)
    run_spines(toml, tmp_path / "out")
    _open(browser, tmp_path / "out" / "report.html")
    key = _key_box_in_view(browser)
    assert "formation" in key.text and "elimination" in key.text
    examples = browser.find_element(By.ID, "example-dendrites")
    assert examples.is_displayed()
    _screenshot(browser, "report_spines.png")
