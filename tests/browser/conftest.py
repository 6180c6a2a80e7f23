"""A real headless browser for the pages the service serves (``/docs``, ``/redoc``, ``/``).

Debian's ``chromium`` driven by Playwright's Python API (``executable_path``: Playwright's own
browser download needs the internet, which CI machines do not have). ``hsl_server`` runs
``hsl serve`` (the embedded default) in a subprocess on a free port; ``page`` is a fresh browser
page that records console errors and every request that left the machine's loopback.

Without Chromium or Playwright the tests skip with the reason; with ``HSL_REQUIRE_BROWSER=1``
(set by ``.ci/run``, which installs both) they fail instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.integration.processes import Processes, base_env, wait_http
from tests.servers import free_port

CHROMIUM = os.environ.get("HSL_CHROMIUM", "/usr/bin/chromium")
# flags for a closed network: no background connections, no sandbox (root in CI)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _unavailable(reason: str) -> None:
    if os.environ.get("HSL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (HSL_REQUIRE_BROWSER=1: browser tests may not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Chromium for one test module.

    Module scope, not session scope: Playwright's sync API keeps an asyncio loop running in the
    main thread until it stops, and every later test that calls ``asyncio.run`` would fail with
    "cannot be called from a running event loop".
    """
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        _unavailable(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed (dev extra)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class BrowserPage:
    """A page plus what it did: console errors, page errors and requests to other hosts."""

    def __init__(self, page, base_url: str):
        self.page = page
        self.base_url = base_url
        self.console_errors: list[str] = []
        self.external_requests: list[str] = []
        host = urlsplit(base_url).hostname
        page.on(
            "console",
            lambda m: self.console_errors.append(m.text) if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: self.console_errors.append(str(e)))

        def _request(req) -> None:
            url = urlsplit(req.url)
            if url.scheme in ("http", "https", "ws", "wss") and url.hostname != host:
                self.external_requests.append(req.url)

        page.on("request", _request)

    def goto(self, path: str, **kwargs):
        return self.page.goto(self.base_url + path, **kwargs)


@pytest.fixture
def hsl_server(tmp_path) -> Iterator[tuple[Processes, str]]:
    """``hsl serve`` on the embedded default (keyless on loopback) in ``tmp_path``."""
    port = free_port()
    procs = Processes(tmp_path, base_env())
    url = f"http://127.0.0.1:{port}"
    procs.start("serve", "serve", "--port", str(port))
    try:
        wait_http(f"{url}/readyz", procs=procs, alive=True)
        yield procs, url
    finally:
        procs.stop_all()


@pytest.fixture
def page(browser, hsl_server) -> Iterator[BrowserPage]:
    _, url = hsl_server
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield BrowserPage(context.new_page(), url)
    finally:
        context.close()
