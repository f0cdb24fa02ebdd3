"""JupyterLab in a real browser for the tests: a headless server on a free localhost port and Debian's
Chromium driven by Playwright (never a browser of Playwright's own).

The tests find the workbench only through its DOM hooks (`pgolf.lab.workbench.estimate_html` and the
`pgolf-control-<name>` classes), so the notebooks' layout can change freely.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import nbformat

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package `chromium` (make lab-test installs it)
# As the machine notes prescribe for this closed network: no background connections, no sandbox as root.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SERVER_START_S = 90
RUN_ALL_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def lab_server(root: Path, home: Path) -> Iterator[str]:
    """`jupyter lab` on 127.0.0.1 with no token, serving `root`; yields its base URL. Its settings,
    workspaces and runtime files live under `home`, so every test starts from a fresh JupyterLab."""
    port = free_port()
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    # No news or update checks: the machine has no network beyond localhost.
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": pythonpath,
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "OMP_NUM_THREADS": "1", "PGOLF_DEVICE": "cpu",
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", "--IdentityProvider.token=", "--ServerApp.password=",
           "--ServerApp.disable_check_xsrf=True", "--LabApp.expose_app_in_browser=True",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
           "--allow-root"]  # CI runs as root
    log = open(home / "jupyter.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"JupyterLab did not start:\n{(home / 'jupyter.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def browser_page(profile: Path) -> Iterator[Any]:
    """A Playwright page in Debian's Chromium with a fresh profile folder."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        raise AssertionError(f"{CHROMIUM} is missing: `make lab-test` installs Debian's chromium package "
                             "(apt-get install -y chromium); this test never skips")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True,
                                                   args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1300})
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            ctx.close()


def copy_notebook(name: str, dest: Path, parameters: dict[str, Any] | None = None,
                  prelude: str | None = None) -> Path:
    """notebooks/<name> into `dest`, with a cell after the parameters cell setting `parameters` (as
    papermill injects them) and, before that, an optional `prelude` cell."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    at = next((i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), 0)
    cells = []
    if parameters:
        cells.append(nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items())))
    if prelude:
        cells.append(nbformat.v4.new_code_cell(prelude))
    nb.cells[at:at] = cells
    path = dest / name
    nbformat.write(nb, path)
    return path


def notebook_parameters(name: str) -> dict[str, Any]:
    """The literal defaults of a notebook's parameters cell."""
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    values: dict[str, Any] = {}
    exec(cell.source, {}, values)  # the cell holds literals only (tests/test_notebooks.py checks it)
    return values


def open_and_run_all(page: Any, url: str, name: str, timeout_s: float = RUN_ALL_S) -> None:
    """Open notebook `name`, wait for its kernel, run all cells, wait until none is queued or running."""
    page.goto(f"{url}/lab/tree/{name}")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=timeout_s * 1000)
    # The file browser folded away (wider screenshots), then the notebook's own Run > Run All Cells command.
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(_SETTLED, timeout=timeout_s * 1000, polling=500)


# Done: no cell queued or running ([*]) and the kernel idle (queued cells after an error are dropped).
_SETTLED = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  return prompts.length > 0 && !prompts.some(t => t.includes('*')) && kernel.status === 'idle'
    && prompts.some(t => /\\d/.test(t));
}"""


def errors(page: Any) -> list[str]:
    """The text of every error output in the notebook."""
    return page.eval_on_selector_all(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                     "els => els.map(e => e.textContent)")


def code_cells_run(page: Any) -> list[bool]:
    prompts = page.eval_on_selector_all(".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent)")
    return [bool(re.search(r"\d", t)) for t in prompts]


def shown_estimate(page: Any) -> tuple[int, int]:
    """(params, bytes) that the live estimate line shows."""
    est = page.locator(".pgolf-estimate").first
    return int(est.locator(".pgolf-params").inner_text()), int(est.locator(".pgolf-bytes").inner_text())


def expect_estimate(page: Any, params: int, nbytes: int, timeout_s: float = 30) -> None:
    """Wait until the estimate line shows (params, nbytes); AssertionError naming both otherwise."""
    deadline = time.time() + timeout_s
    shown = None
    while time.time() < deadline:
        try:
            shown = shown_estimate(page)
        except Exception:  # not rendered yet, or mid-refresh
            shown = None
        if shown == (params, nbytes):
            return
        time.sleep(0.25)
    raise AssertionError(f"the estimate shows {shown}, expected {(params, nbytes)} (params, est. artifact bytes)")


def move_slider(page: Any, name: str, steps: int) -> None:
    """Move the slider of tweak `name` by `steps` steps with the keyboard, as a user does."""
    handle = page.locator(f".pgolf-control-{name} .noUi-handle").first
    handle.scroll_into_view_if_needed()
    handle.click()
    for _ in range(abs(steps)):
        handle.press("ArrowRight" if steps > 0 else "ArrowLeft")


def slider_value(page: Any, name: str) -> int:
    return int(page.locator(f".pgolf-control-{name} .widget-readout").first.inner_text())
