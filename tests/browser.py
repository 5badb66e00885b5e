"""Headless Chromium for UI tests: Debian's `chromium` driven by Playwright, local traffic only.

Setup: `apt-get install -y chromium` and `pip install playwright` (never `playwright install`: it downloads a browser).
A missing browser is a test failure, not a skip: the UI must be shown to work in a real browser.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MOCHI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL = ("http://127.0.0.1", "data:", "blob:")


def free_port() -> int:
    """A port nobody listens on right now (the kernel's choice, on the loopback interface)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], log: Path, cwd: Path, env: dict):
    """Run `cmd` in the background with its output in `log`; stop it afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    """Poll `url` until it answers; fail with the server's log if it exits or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)


@contextmanager
def chromium_page():
    """A page in headless Chromium whose requests to anywhere but 127.0.0.1 are blocked and listed in `.external`."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the UI tests need Playwright: pip install playwright (the dev extra), not `playwright install`")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get update && apt-get install -y chromium (or set MOCHI_CHROMIUM)")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Exception as e:  # Playwright's own error type varies across versions; the message is what matters
            pytest.fail(f"Chromium at {CHROMIUM} did not start under Playwright: {e}")
        try:
            page = browser.new_page()
            page.external = []

            def route(r):
                if r.request.url.startswith(LOCAL):
                    return r.continue_()
                page.external.append(r.request.url)
                return r.abort()

            page.route("**/*", route)
            yield page
        finally:
            browser.close()
