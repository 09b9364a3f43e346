"""A real headless browser for the page tests: Debian's Chromium driven by Playwright.

Nothing is downloaded by a test tool at run time (``playwright install`` is never run):
Playwright's Python package comes with the ``test`` extra, and Chromium is the
distribution's, installed here with apt-get if the machine lacks it. When it cannot be
installed the test fails, it does not skip: CI must prove the page works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.apt import ensure_package

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Page

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps calling Google's hosts, which
# this machine's closed network refuses; --no-sandbox because the tests run as root.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def ensure_chromium() -> Path:
    """Debian's Chromium, installed with apt-get if missing; the test fails if it can't be."""
    return ensure_package(CHROMIUM, "chromium")


@dataclass
class Console:
    """What the page said on its console, and the exceptions it did not catch."""

    errors: list[str] = field(default_factory=list)
    uncaught: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def on_pageerror(self, error: Exception) -> None:
        self.uncaught.append(str(error))

    def unexpected(self) -> list[str]:
        """Errors other than the browser's note on each 4xx/5xx response the page handled."""
        handled = "Failed to load resource: the server responded with a status of"
        return self.uncaught + [e for e in self.errors if not e.startswith(handled)]


@contextlib.contextmanager
def chromium_page(
    viewport: tuple[int, int] = (1000, 800),
) -> Iterator[tuple[Page, Console]]:
    """A fresh headless Chromium (own temporary profile) with one page, closed afterwards."""
    executable = ensure_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "Playwright's Python package is missing: install the test extra "
            "(.venv/bin/pip install -e '.[test]')"
        )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(executable), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(
                viewport={"width": viewport[0], "height": viewport[1]}, device_scale_factor=1
            )
            page = context.new_page()
            console = Console()
            page.on("console", console.on_console)
            page.on("pageerror", console.on_pageerror)
            yield page, console
            context.close()
        finally:
            browser.close()


def throttle_uploads(page: Page, bytes_per_second: int) -> None:
    """Slow the page's uploads (Chrome DevTools network emulation), so progress is seen."""
    cdp: Any = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {
            "offline": False,
            "latency": 0,
            "downloadThroughput": -1,
            "uploadThroughput": bytes_per_second,
        },
    )
