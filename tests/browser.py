"""Headless Chromium for the web-page tests (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium with explicit paths, so nothing is downloaded).

Without a browser the tests skip only outside CI; in CI (``CI`` set) a missing browser
fails them, as ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

SCREENSHOTS_ENV = "FEDCARE_SCREENSHOTS"
"""A folder to save the tests' screenshots in (docs/screenshots when refreshing the docs)."""


def _found() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium WebDriver, quit afterwards."""
    found = _found()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs the browser tests: chromium and chromium-driver are missing")
        pytest.skip("no chromium and chromium-driver installed (CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot_path(default_dir: Path, name: str) -> Path:
    """Where a test saves screenshot ``name``: ``$FEDCARE_SCREENSHOTS`` or ``default_dir``."""
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or default_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
