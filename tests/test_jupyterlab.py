"""Notebook 02 in a real JupyterLab, driven by headless Chromium through Playwright: the block
picker renders, moving its sliders updates the figure and the table, and the next cell reads the
chosen block. Skipped where Chromium or Playwright is missing (`make setup` as root installs both).
KIT_SCREENSHOT=1 also refreshes docs/block_picker.png."""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest
from conftest import REPO
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

import kit
from kit.core.artifacts import atomic_path, read_json

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is missing: run `make setup`, or `pip install -c constraints.txt playwright`"
)
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Chromium is missing: run `make setup` as root, or `apt-get install chromium`", allow_module_level=True)

# Root needs --no-sandbox; the rest keeps an offline Chromium from calling home.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
MODEL, N = "smollm2-135m", 4
TIMEOUT_MS = 180_000  # for every wait; generous: the first cells import torch on a CPU other jobs may share
sync_api.expect.set_options(timeout=TIMEOUT_MS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(server: subprocess.Popen, url: str, token: str, log, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {server.returncode}:\n{log.read_text()}")
        try:
            request = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"jupyter lab did not answer within {timeout} s:\n{log.read_text()}")


def _stop(server: subprocess.Popen):
    """Stop the server and the kernels it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a copy of notebooks/ (02 with small parameters injected) and a run
    folder holding a scan of the embedded model; yields (url, token, root, distances)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    path = root / "notebooks" / "02_select_and_prune.ipynb"
    parameters = {"N": N, "RUN": "lab", "RUNS_ROOT": str(root / "runs"), "N_VAL_TEXTS": 2, "MAX_LENGTH": 32}
    nbformat.write(parameterize_notebook(load_notebook_node(str(path)), parameters), path)  # as papermill would
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    port, token, log = _free_port(), secrets.token_hex(16), root / "server.log"
    env = {
        **os.environ, "JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"),
    }  # fmt: skip
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0", "--allow-root", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        model, tokenizer = kit.load_model(MODEL)  # while the server starts
        texts = kit.loaders.data.corpus("train")[:4]
        distances = kit.angular_distances(model, tokenizer, texts, max_length=32, model_name=MODEL)
        distances.save(root / "runs" / "lab" / "distances.safetensors")
        url = f"http://127.0.0.1:{port}"
        _wait_until_up(server, url, token, log)
        yield url, token, root, distances
    finally:
        _stop(server)


@pytest.fixture
def page(lab):
    url, token, _, _ = lab
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{url}/lab/tree/notebooks/02_select_and_prune.ipynb?token={token}")
            yield page
        finally:
            browser.close()


def _expect_row(picker, name: str, block, distances):
    """The picker's table shows `block` in the row `name`, with its distance read off the matrix."""
    distance = float(distances.matrix[block.start, block.end])
    row = picker.locator("tr", has_text=name)
    sync_api.expect(row).to_contain_text(f"layers {block.start}\u2013{block.end - 1}")
    sync_api.expect(row).to_contain_text(f"distance {distance:.4f}")


def test_block_picker_in_jupyterlab(lab, page):
    _, _, root, distances = lab
    expect = sync_api.expect
    cells = page.locator(".jp-Notebook .jp-Cell")
    expect(page.locator(".jp-Toolbar-kernelName")).to_have_text("Python 3 (kit)")
    nb = nbformat.read(root / "notebooks" / "02_select_and_prune.ipynb", as_version=4)
    picker_cell = next(i for i, c in enumerate(nb.cells) if "BlockPicker(" in c.source)

    expect(page.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute("data-status", "idle")  # keys now reach it
    cells.first.click()
    page.keyboard.press("Escape")  # command mode: Shift+Enter runs a cell and selects the next
    for _ in range(picker_cell + 1):
        page.keyboard.press("Shift+Enter")
    expect(cells.nth(picker_cell + 1)).to_have_class(re.compile("jp-mod-active"))
    picker = page.locator(".kit-block-picker")
    try:
        expect(picker.locator(".widget-slider")).to_have_count(2)
    except AssertionError as error:
        outputs = "\n".join(page.locator(".jp-OutputArea").all_inner_texts())
        raise AssertionError(f"the picker did not render; the notebook's outputs:\n{outputs}") from error
    n_slider, start_slider = picker.locator(".widget-slider").nth(0), picker.locator(".widget-slider").nth(1)
    expect(n_slider).to_contain_text("n (layers)")
    best = distances.best_block(N)
    expect(start_slider.locator(".widget-readout")).to_have_text(str(best.start))
    _expect_row(picker, "chosen (similarity)", best, distances)
    figure = picker.locator("img")
    expect(figure).to_be_visible()

    before = figure.get_attribute("src")
    n_slider.locator(".noUi-handle").press("ArrowRight")  # n + 1: start follows the new best block
    best = distances.best_block(N + 1)
    expect(n_slider.locator(".widget-readout")).to_have_text(str(N + 1))
    expect(start_slider.locator(".widget-readout")).to_have_text(str(best.start))
    _expect_row(picker, "chosen (similarity)", best, distances)
    expect(figure).not_to_have_attribute("src", before)

    before = figure.get_attribute("src")
    step = 1 if best.start < distances.num_layers - best.n else -1
    start_slider.locator(".noUi-handle").press("ArrowRight" if step == 1 else "ArrowLeft")  # start moved by hand
    chosen = kit.Block(best.start + step, best.n)
    _expect_row(picker, "chosen (manual)", chosen, distances)
    expect(figure).not_to_have_attribute("src", before)
    if os.environ.get("KIT_SCREENSHOT") == "1":
        with atomic_path(REPO / "docs" / "block_picker.png") as tmp:
            picker.screenshot(path=tmp)

    prune_cell = next(i for i, c in enumerate(nb.cells) if "kit.steps.prune(" in c.source)
    selection_cell = cells.nth(prune_cell)  # prunes the picker's block and writes selection.json
    selection_cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    shown = selection_cell.locator(".jp-OutputArea-executeResult")
    for text in (f"'start': {chosen.start}", f"'n': {chosen.n}", "'source': 'manual'"):
        expect(shown).to_contain_text(text)
    distance = float(distances.matrix[chosen.start, chosen.end])
    assert read_json(root / "runs" / "lab" / "selection.json") == {
        "start": chosen.start, "n": chosen.n, "distance": pytest.approx(distance), "source": "manual", "model": MODEL,
    }  # fmt: skip
