"""A learner's view, in a real browser: JupyterLab started at the repository root as the README says, notebook 10
run from its Run menu in headless Chromium (Debian's package, driven by Playwright), every image loads, no cell
errors, and moving the explorer's layer slider redraws its heatmap.

The server runs on a copy of notebooks/ and figures/ (same layout), with autosave off, so nothing in the checkout
is ever rewritten. Skipped where Chromium or Playwright is missing, except in CI (CI is set), where it must run."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import CHROMIUM, CHROMIUM_FLAGS, require_browser, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
require_browser("the browser test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_settings(folder: Path) -> None:
    """User settings for the test's JupyterLab: render every cell (no virtual scrolling), never autosave, no news."""
    for plugin, values in {"notebook-extension/tracker": {"windowingMode": "none"},
                           "docmanager-extension/plugin": {"autosave": False},
                           "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        package, name = plugin.split("/")
        path = folder / "@jupyterlab" / package / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture
def lab(tmp_path):
    root = tmp_path / "course"
    for folder in ("notebooks", "figures"):
        shutil.copytree(ROOT / folder, root / folder)
    _lab_settings(tmp_path / "settings")
    port, token = _free_port(), "browser-test"
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    env.pop("MPLBACKEND", None)  # the tests' Agg would leave the kernel without inline plots, unlike a learner's
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                               f"--IdentityProvider.token={token}", "--allow-root"],  # CI runs as root
                              cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start: " + (tmp_path / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_notebook_10_in_jupyterlab(lab):
    url, token = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/notebooks/10_attention_viz.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            time.sleep(2)
            if page.locator(".jp-Dialog").count():  # "Select Kernel": take the notebook's own
                page.locator(".jp-Dialog .jp-mod-accept").click()
            page.wait_for_selector("text=Python 3 (ipykernel) | Idle", timeout=90_000)
            page.get_by_role("menuitem", name="Run").click()
            page.locator("li[data-command='runmenu:run-all']").click()

            # the explorer is the last output: its sliders appear once every cell above has run
            page.wait_for_selector(".widget-slider .noUi-handle", timeout=300_000)
            errors = page.locator("[data-mime-type='application/vnd.jupyter.error']")
            assert errors.count() == 0, "a cell failed in the browser: " + errors.first.inner_text()[:1000]

            images = page.evaluate("""() => Array.from(document.querySelectorAll('.jp-Notebook img'))
                                       .map(i => [i.getAttribute('src').split('?')[0].slice(0, 80), i.complete && i.naturalWidth > 0])""")
            broken = [src for src, ok in images if not ok]
            assert not broken, f"images that did not load: {broken}"
            committed = [src for src, _ in images if "/files/figures/" in src]
            assert len(committed) >= 5, f"the markdown's ../figures/ images are missing from the page: {images}"

            heatmap = ".widget-output img"
            page.wait_for_selector(heatmap, state="attached", timeout=180_000)
            before = page.locator(heatmap).first.get_attribute("src")
            assert "tensor(" not in page.locator(".widget-output").first.inner_text(), "the callback's value is printed"
            page.locator(".widget-slider .noUi-handle").first.focus()  # the layer slider
            page.keyboard.press("ArrowRight")
            page.wait_for_function("([sel, old]) => { const i = document.querySelector(sel); "
                                   "return i && i.getAttribute('src') !== old; }", arg=[heatmap, before], timeout=180_000)
            assert page.locator(".widget-readout").first.inner_text().strip() == "1", "the layer slider did not move"
        finally:
            browser.close()
