"""The app in a real headless browser (Debian's chromium + chromedriver through Selenium).

Uploads the real bottle image, types the class, adds 3 good bottles as normal references, clicks
Detect, waits for the heat map, the score, the reference map and the calibrated verdict, then
opens every tab. Screenshots go to test-output/screenshots/; with
KANOCLIP_UPDATE_SCREENSHOT=1 the Detect result is also saved as docs/screenshot.png.
Runs on the tiny random CLIP: the screenshot shows plumbing (and says so), not accuracy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-output" / "screenshots"
CHROMIUM = Path(os.environ.get("KANOCLIP_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("KANOCLIP_CHROMEDRIVER", "/usr/bin/chromedriver"))
TABS = ("Knowledge", "Prompts", "Train", "Detect")
DOCS_HEIGHT = 1360  # px of the Detect screenshot kept for docs/screenshot.png


@contextlib.contextmanager
def chromium(*extra_flags: str) -> Iterator:
    """A headless Debian chromium driven by Selenium (``extra_flags`` added to the usual ones); skips without it."""
    if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
        pytest.skip(
            f"needs Debian's chromium ({CHROMIUM}) and chromedriver ({CHROMEDRIVER}); "
            "install them with apt (no browser is downloaded)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="kanoclip-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1440,2200",
        "--force-device-scale-factor=1",
        *extra_flags,
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def _shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _wait(driver, condition, timeout: float = 60, what: str = "condition"):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
        condition, message=f"timed out waiting for {what}"
    )


def _tab(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    buttons = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text.strip() == label]
    assert buttons, f"no tab button {label!r}"
    buttons[0].click()


def _open_and_fill(driver, url: str, image: Path, class_name: str) -> None:
    """Load the app, upload ``image`` and type ``class_name`` (committed by leaving the box)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#detect-button"), what="the app to render")
    upload = _wait(
        driver, lambda d: d.find_element(By.CSS_SELECTOR, "#detect-image input[type='file']"), what="the image input"
    )
    upload.send_keys(str(image))
    box = driver.find_element(By.CSS_SELECTOR, "#detect-class input")
    box.click()
    box.send_keys(class_name)
    box.send_keys(Keys.ENTER)
    driver.find_element(By.TAG_NAME, "h1").click()  # blur: the dropdown commits the typed value
    _wait(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, "#detect-class input").get_attribute("value") == class_name,
        what="the class",
    )


def test_detect_in_a_real_browser(browser, app_url: str, bottle_image: Path, bottle_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    _open_and_fill(driver, app_url, bottle_image, "bottle")
    assert "Random test backbone" in driver.find_element(By.ID, "app-status").text
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#detect-image img"), what="the uploaded image preview")

    references = sorted((bottle_dir / "test" / "good").glob("*.png"))[:3]
    driver.find_element(By.CSS_SELECTOR, "#detect-references input[type='file']").send_keys(
        "\n".join(str(p) for p in references)
    )
    _wait(
        driver,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#detect-references tr, #detect-references .file")) >= 3,
        what="the 3 reference uploads",
    )
    driver.find_element(By.ID, "detect-add-references").click()

    def status(d) -> str:
        return d.find_element(By.ID, "detect-references-status").text

    _wait(
        driver,
        lambda d: "calibrated leave-one-out on its 3 references" in status(d),
        timeout=90,
        what="the references to be added",
    )
    assert "3 (yours: this session only)" in status(driver)

    driver.find_element(By.ID, "detect-button").click()
    score_input = _wait(
        driver,
        lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, "#detect-score input") if e.get_attribute("value")), False
        ),
        timeout=90,
        what="the score",
    )
    score = float(score_input.get_attribute("value"))
    assert 0.0 <= score <= 1.0
    overlay = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#detect-overlay img"), what="the heat map")[0]
    _wait(
        driver,
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", overlay),
        what="the heat map to load",
    )
    natural = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay)
    assert natural[1] == 900 and natural[0] > 900  # the 900x900 heat map with its colour bar beside it
    verdict = driver.find_element(By.ID, "detect-verdict").text
    assert "ANOMALOUS" in verdict or "normal" in verdict
    assert "calibrated leave-one-out on its 3 references" in verdict
    _wait(
        driver,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#detect-gallery img")) >= 7,
        what="the stage maps and the reference map",
    )
    assert "reference map (3 normal refs)" in driver.find_element(By.ID, "detect-gallery").text
    _wait(driver, lambda d: "template" in d.find_element(By.ID, "detect-guidance").text, what="the guidance table")
    summary = driver.find_element(By.ID, "detect-summary").text
    assert "meaningless" in summary and "bottle" in summary
    time.sleep(0.5)  # let the images finish painting
    shot = _shot(driver, "detect")
    if os.environ.get("KANOCLIP_UPDATE_SCREENSHOT") == "1":
        from PIL import Image

        with Image.open(shot) as full:  # the top of the page: header, inputs, score and heat map
            full.crop((0, 0, full.width, min(full.height, DOCS_HEIGHT))).save(
                REPO / "docs" / "screenshot.png", optimize=True
            )

    for label in TABS:
        _tab(driver, label)
        time.sleep(0.7)
        assert _shot(driver, f"tab-{label.lower()}").stat().st_size > 10_000

    _tab(driver, "Prompts")
    driver.find_element(By.ID, "prompts-button").click()
    _wait(driver, lambda d: "untrained" in d.find_element(By.ID, "prompts-header").text, timeout=90, what="the prompts")
    time.sleep(1.0)
    _shot(driver, "prompts-result")


def test_bad_upload_shows_the_apps_message(browser, app_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    _open_and_fill(driver, app_url, fake, "bottle")
    driver.find_element(By.ID, "detect-button").click()
    _wait(
        driver,
        lambda d: "not an image file" in d.find_element(By.TAG_NAME, "body").text,
        timeout=60,
        what="the error message",
    )
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in body
    _shot(driver, "bad-upload")
