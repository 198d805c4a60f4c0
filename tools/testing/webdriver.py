"""Test helper: Debian's headless Chromium driven through Debian's chromedriver over the W3C WebDriver protocol.

The protocol is plain JSON over HTTP on loopback, so `requests` is the whole client: no browser download, no driver
package in the test environment. The browser resolves no host but 127.0.0.1, so a page can reach nothing else.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1800",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # loopback only
]
SELECT_ALL = "\ue009a\ue000"  # Ctrl+A, then release Ctrl: typed text replaces the field's value


def missing() -> str | None:
    """Why a browser test cannot run here, or None."""
    absent = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if absent:
        return f"{' and '.join(absent)} missing: `bash scripts/setup_playground.sh --browser` (as root) installs them"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebDriverError(RuntimeError):
    pass


class Browser:
    """One chromedriver process and one headless Chromium session with a fresh profile."""

    def __init__(self, profile_dir: Path, log_path: Path):
        port = _free_port()
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in close)
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={port}"], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.base = f"http://127.0.0.1:{port}"
        self._wait_for_driver()
        options = {"binary": CHROMIUM, "args": [*FLAGS, f"--user-data-dir={profile_dir}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _wait_for_driver(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base}/status", timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise WebDriverError("chromedriver did not start")

    def _call(self, method: str, path: str, body: dict | None = None):
        response = requests.request(method, f"{self.base}{path}", json=body, timeout=60)
        value = response.json().get("value")
        if response.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:500]}")
        return value

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    # What a test uses.

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def find_all(self, css: str) -> list[str]:
        found = self._session("POST", "/elements", {"using": "css selector", "value": css})
        return [item[ELEMENT] for item in found]

    def find(self, css: str, timeout: float = 20) -> str:
        return self.wait(lambda: (self.find_all(css) or [None])[0], timeout, f"no element {css!r}")

    def click(self, css: str) -> None:
        self._session("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        """Replace the value of the input at `css` by typing, as a person would (the page sees input events)."""
        self._session("POST", f"/element/{self.find(css)}/value", {"text": SELECT_ALL + text})

    def upload(self, css: str, path: Path) -> None:
        self._session("POST", f"/element/{self.find(css)}/value", {"text": str(path)})

    def text(self, css: str) -> str:
        return self._session("GET", f"/element/{self.find(css)}/text")

    def value(self, css: str) -> str:
        return self._session("GET", f"/element/{self.find(css)}/property/value")

    def attribute_all(self, css: str, name: str) -> list[str]:
        return [self._session("GET", f"/element/{element}/property/{name}") for element in self.find_all(css)]

    def script(self, source: str, *args):
        return self._session("POST", "/execute/sync", {"script": source, "args": list(args)})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return path

    def wait(self, condition, timeout: float = 30, what: str = "condition"):
        """Poll `condition` until it returns something truthy; that value is returned."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = condition()
            except WebDriverError:
                result = None
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} within {timeout} s")
            time.sleep(0.1)

    def close(self) -> None:
        try:
            self._session("DELETE", "")
        except (WebDriverError, requests.RequestException):
            pass
        if self.driver.poll() is None:
            os.killpg(self.driver.pid, signal.SIGTERM)
            try:
                self.driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.driver.pid, signal.SIGKILL)
        self._log.close()
