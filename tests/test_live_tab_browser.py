"""The Live tab in headless chromium with its fake camera: the stream runs and frames come back scored.

Chromium's ``--use-fake-device-for-media-stream`` gives a synthetic camera and
``--use-fake-ui-for-media-stream`` grants it without a prompt. Runs on the tiny random CLIP:
plumbing, not accuracy. A screenshot goes to test-output/screenshots/live.png.
"""

from __future__ import annotations

import re

import pytest
from test_app_browser import _shot, _tab, _wait, chromium

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def camera_browser():
    with chromium("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream") as driver:
        yield driver


def test_the_live_tab_scores_the_webcam_stream(camera_browser, app_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = camera_browser
    driver.get(app_url)
    box = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#detect-class input"), what="the app to render")
    box.click()
    box.send_keys("bottle", Keys.ENTER)
    driver.find_element(By.TAG_NAME, "h1").click()  # blur: the dropdown commits the typed value
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#detect-class input").get_attribute("value") == "bottle")

    _tab(driver, "Live")
    grant = _wait(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, "#live-webcam div[title='grant webcam access'] button"),
        what="the webcam button",
    )
    grant.click()
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#live-webcam button.capture-button"), what="Record")
    driver.find_element(By.CSS_SELECTOR, "#live-webcam button.capture-button").click()

    def frames(d) -> int:
        found = re.search(r"frame (\d+)", d.find_element(By.ID, "live-status").text)
        return int(found.group(1)) if found else 0

    _wait(driver, lambda d: frames(d) >= 3, timeout=240, what="3 processed frames")
    status = driver.find_element(By.ID, "live-status").text
    score = float(re.search(r"score (\d\.\d+)", status).group(1))
    assert 0.0 <= score <= 1.0
    assert re.search(r"latency \d+ ms", status) and re.search(r"\d+\.\d frames/s processed", status)
    assert ("ANOMALOUS" in status) == (score >= float(re.search(r"threshold (\d\.\d+)", status).group(1)))
    shown = driver.find_element(By.CSS_SELECTOR, "#live-score input").get_attribute("value")
    assert 0.0 <= float(shown) <= 1.0
    assert driver.find_elements(By.CSS_SELECTOR, "#live-overlay img")  # the map over the frame
    _shot(driver, "live")
