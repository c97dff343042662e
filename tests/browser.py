"""What the two browser tests share: headless Chromium (Debian's package) driven by Playwright, with the flags that
keep it from calling out of this machine. require_browser skips a test module where either is missing, except in CI
(CI is set), where .ci/run installs both and a missing one is an error."""
import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # no calls out of this machine
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    expect = sync_playwright = None


def require_browser(test: str) -> None:
    """Call at a test module's top: skip the module (or fail in CI) when Chromium or Playwright is missing."""
    if CHROMIUM and sync_playwright:
        return
    missing = "chromium (apt-get install chromium)" if not CHROMIUM else "playwright (pip install playwright)"
    if os.environ.get("CI"):
        raise RuntimeError(f"{test} needs {missing}: .ci/run installs it")
    pytest.skip(f"needs {missing}", allow_module_level=True)
