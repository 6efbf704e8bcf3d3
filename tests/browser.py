"""Headless Chromium for end-to-end page tests: screenshots, console errors and axe-core.

The browser is Debian's `chromium` driven through `chromedriver` (both installed by
`tools/sysdeps.sh`, run by `make test`); axe-core comes from npm into `.venv/npm`. Locally a
missing piece skips the test with the command that installs it; under `CI=true` it fails,
as every end-to-end server must.

Use::

    with chromium() as browser:
        page = browser.check(url, "error-502", headers={"Accept-Language": "de"})
        assert page.title == "..."

`check` opens the page at desktop and phone widths, saves a screenshot of each under
`test-artifacts/browser/` (override with `GG_ARTIFACTS`), fails on any console error other
than the page's own HTTP status (an error page is *meant* to answer 502), and fails on any
axe-core violation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
AXE = ROOT / ".venv" / "npm" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

DESKTOP = (1280, 800)
PHONE = (390, 844)
WIDTHS: tuple[tuple[int, int], ...] = (DESKTOP, PHONE)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("GG_ARTIFACTS", ROOT / "test-artifacts" / "browser"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _missing(what: str) -> None:
    message = f"{what} is missing: run `bash tools/sysdeps.sh` (make test does)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Page:
    """What one visit found: the screenshots taken and the document's title and text."""

    url: str
    title: str
    text: str
    lang: str
    dir: str
    screenshots: list[Path] = field(default_factory=list)


class Browser:
    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self._axe = AXE.read_text(encoding="utf-8")

    def open(
        self,
        url: str,
        *,
        size: tuple[int, int] = DESKTOP,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Load `url` in a viewport of `size`, sending extra request `headers`."""
        width, height = size
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": dict(headers or {})})
        self.driver.get_log("browser")  # drop what earlier pages logged
        self.driver.get(url)

    def console_errors(self, url: str) -> list[str]:
        """Severe console entries, except the page's own (intended) HTTP error status."""
        errors = []
        for entry in self.driver.get_log("browser"):
            if entry.get("level") != "SEVERE":
                continue
            message = str(entry.get("message", ""))
            if (
                message.startswith(url.split("#", maxsplit=1)[0])
                and "responded with a status of" in message
            ):
                continue
            errors.append(message)
        return errors

    def axe_violations(self) -> list[dict[str, Any]]:
        self.driver.execute_script(self._axe)
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']})"
            ".then(r => done(r.violations)).catch(e => done({error: String(e)}));"
        )
        if isinstance(result, dict):
            raise AssertionError(f"axe-core failed to run: {result['error']}")
        return list(result)

    def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def check(
        self,
        url: str,
        name: str,
        *,
        headers: Mapping[str, str] | None = None,
        sizes: tuple[tuple[int, int], ...] = WIDTHS,
        axe: bool = True,
    ) -> Page:
        """Open `url` at each size: screenshot, no console errors, no axe violations."""
        page: Page | None = None
        for width, height in sizes:
            self.open(url, size=(width, height), headers=headers)
            errors = self.console_errors(url)
            assert errors == [], f"console errors on {name} at {width}px: {errors}"
            if axe:
                violations = self.axe_violations()
                summary = [(v["id"], v["impact"], v["help"]) for v in violations]
                assert violations == [], f"axe-core on {name} at {width}px: {summary}"
            shot = self.screenshot(f"{name}-{width}w")
            if page is None:
                page = Page(
                    url=url,
                    title=self.driver.title,
                    text=self.driver.find_element("tag name", "body").text,
                    lang=self.driver.execute_script("return document.documentElement.lang"),
                    dir=self.driver.execute_script("return document.documentElement.dir"),
                )
            page.screenshots.append(shot)
        assert page is not None
        return page

    def json_log(self) -> str:
        return json.dumps(self.driver.get_log("browser"))


@contextmanager
def chromium() -> Iterator[Browser]:
    """A fresh headless Chromium with an empty profile, quit on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # pragma: no cover - selenium is a dev dependency
        _missing("selenium (pip install -e '.[dev]')")
        raise
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            _missing(path)
    if not AXE.exists():
        _missing(str(AXE.relative_to(ROOT)))
    profile = tempfile.mkdtemp(prefix="gg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags that keep Chromium off the (closed) network and quiet at start.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    try:
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
