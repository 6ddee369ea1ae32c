"""Headless Chromium for the Space's browser test and the README screenshot.

Debian's ``chromium`` and ``chromium-driver`` packages, driven through
Selenium with the driver named explicitly, so nothing is downloaded. The
flags keep Chromium off the network: this project's machines reach none.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
)


def chromium_missing() -> str | None:
    """Why the browser cannot start here, or ``None`` when it can."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "Chromium is not installed (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def headless_chromium(width: int = 1400, height: int = 1000) -> Any:
    """A Selenium Chrome driver on Debian's Chromium; check :func:`chromium_missing` first."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def show_image(browser: Any, url: str, image: str | Path, box_ids: list[str], ready: Callable[[str], bool],
               timeout: float = 60, labels: str | None = None) -> dict[str, str]:
    """Open the Space at ``url``, upload ``image``, wait until every box's text is ``ready``; return the texts.

    ``box_ids`` are the ``elem_id``s of the app's prediction boxes (``merged``, ``source-1``…). ``labels``, for a
    zero-shot Space, is typed into its labels box first, in place of the default labels.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, timeout)
    if labels is not None:
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#labels textarea"))
        box.clear()
        box.send_keys(labels)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#input-image input[type=file]")).send_keys(str(image))
    wait.until(lambda b: all(ready(b.find_element(By.ID, box).text) for box in box_ids))
    return {box: browser.find_element(By.ID, box).text for box in box_ids}
