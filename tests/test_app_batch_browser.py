"""The Batch tab in a real headless browser: 3 images uploaded at once, the gallery sorted by score.

Uses test_app_browser's chromium and helpers; the tiny random CLIP makes the scores plumbing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from test_app_browser import _shot, _tab, _wait, browser  # noqa: F401 - fixtures used by name

pytestmark = pytest.mark.browser

CAPTION = re.compile(r"(\d\.\d{4}) · (ANOMALOUS|normal) · (\S+\.png)")


def test_batch_upload_gives_the_sorted_gallery(browser, app_url: str, bottle_dir: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(app_url)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#detect-button"), what="the app to render")
    _tab(driver, "Batch")
    upload = _wait(
        driver, lambda d: d.find_element(By.CSS_SELECTOR, "#batch-files input[type='file']"), what="the batch input"
    )
    test = bottle_dir / "test"
    images = [test / "broken_large" / "001.png", test / "good" / "002.png", test / "broken_small" / "003.png"]
    upload.send_keys("\n".join(str(p) for p in images))  # one selection of 3 files
    _wait(
        driver,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#batch-files tr, #batch-files .file")) >= 3,
        what="the 3 uploads",
    )
    box = driver.find_element(By.CSS_SELECTOR, "#batch-class input")
    box.click()
    box.send_keys("bottle")
    box.send_keys(Keys.ENTER)
    driver.find_element(By.TAG_NAME, "h1").click()  # blur: the dropdown commits the typed value
    _wait(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, "#batch-class input").get_attribute("value") == "bottle",
        what="the class",
    )
    driver.find_element(By.ID, "batch-button").click()
    _wait(
        driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#batch-gallery img")) >= 3, timeout=240, what="3 maps"
    )
    captions = _wait(
        driver,
        lambda d: (found := CAPTION.findall(d.find_element(By.ID, "batch-gallery").text)) and len(found) >= 3 and found,
        what="the captions",
    )
    scores = [float(score) for score, _, _ in captions]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert sorted(name for _, _, name in captions) == sorted(p.name for p in images)
    table = driver.find_element(By.ID, "batch-table").text
    assert all(f"{score:.4f}"[:5] in table for score in scores)
    assert "3 inspected" in driver.find_element(By.ID, "batch-summary").text
    time.sleep(0.5)
    assert _shot(driver, "batch").stat().st_size > 10_000
