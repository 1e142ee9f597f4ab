"""Look at the built docs site as a reader would: screenshots of pages and of a search, in headless Chromium.

    mkdocs build --strict -d /tmp/site && python scripts/docs_screenshots.py /tmp/site /tmp/shots

Needs Chromium (`apt-get install chromium`) and `websockets` (in the test extra). The site is served on 127.0.0.1
from a port the system picks; Chromium is driven through its DevTools protocol on loopback, so the search (a web
worker that builds its index after the page loads) has real time to start before the screenshot is taken.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets

PAGES = ["", "getting-started/", "guides/tools/", "guides/code-interpreter/#the-security-model",
         "reference/conversation/", "changelog/"]
SEARCH = "approval"
OPEN_SEARCH = ("var t = document.getElementById('__search'); t.checked = true;"
               "t.dispatchEvent(new Event('change', {bubbles: true}));"
               "var i = document.querySelector('.md-search__input'); i.focus(); i.value = %s;"
               "i.dispatchEvent(new Event('input', {bubbles: true})); 1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(site: Path) -> str:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


class _Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, socket_url: str) -> None:
        self._url = socket_url
        self._next = 0

    async def __aenter__(self) -> _Browser:
        self._ws = await websockets.connect(self._url, max_size=64_000_000)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._ws.close()

    async def command(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        await self._ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.recv())
            if message.get("id") == self._next:
                return message

    async def screenshot(self, url: str, out: Path, wait: float, search: str | None = None) -> None:
        await self.command("Page.navigate", url=url)
        await asyncio.sleep(wait)
        if search is not None:
            await self.command("Runtime.evaluate", expression=OPEN_SEARCH % json.dumps(search))
            await asyncio.sleep(wait)
        shot = await self.command("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["result"]["data"]))


def _page_socket(port: int) -> str:
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as answer:
                tabs = json.load(answer)
            return next(tab["webSocketDebuggerUrl"] for tab in tabs if tab["type"] == "page")
        except (OSError, StopIteration):
            time.sleep(0.2)
    raise SystemExit("Chromium did not open its DevTools port")


async def _shoot(base: str, out: Path, port: int) -> None:
    async with _Browser(_page_socket(port)) as browser:
        await browser.command("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                              mobile=False)
        for page in PAGES:
            name = page.strip("/").replace("/", "_").replace("#", "_") or "home"
            await browser.screenshot(base + page, out / f"{name}.png", wait=2)
        await browser.screenshot(base, out / "search.png", wait=3, search=SEARCH)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    site, out = Path(sys.argv[1]), Path(sys.argv[2])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not (site / "index.html").is_file():
        raise SystemExit("needs chromium on PATH and a built site (mkdocs build -d SITE)")
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_shoot(_serve(site), out, port))
    finally:
        browser.terminate()
        browser.wait(timeout=10)
    print("\n".join(sorted(str(path) for path in out.glob("*.png"))))


if __name__ == "__main__":
    main()
