"""The documentation site: `mkdocs build --strict` (what `make docs` runs; a warning fails it) builds every page,
the API reference from the docstrings and the notebooks; the pages hold what they must; headless Chromium
(Playwright on Debian's `chromium`, as tests/test_jupyterlab.py drives it) renders the home page and an API page.
The screenshot test is skipped where Chromium or Playwright is missing; KIT_SCREENSHOT=1 also writes
docs/home.png and docs/api.png."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import REPO

from kit.core.artifacts import atomic_path

# Root needs --no-sandbox; the rest keeps an offline Chromium from calling home.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built as `make docs` builds it, into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    return out


def page(site, path: str) -> str:
    return (site / path / "index.html").read_text() if path else (site / "index.html").read_text()


def test_the_site_builds_strictly_with_every_page_of_the_nav(site):
    for path in ["", "install", "quickstart", "concepts", "pipeline/scan", "pipeline/prune", "pipeline/heal",
                 "pipeline/evaluate", "pipeline/sweep", "pipeline/criteria", "pipeline/budget", "pipeline/report",
                 "sublayers", "uncertainty", "gpus", "families", "guarantees", "development", "migration", "api",
                 "api/pipeline"]:  # fmt: skip
        assert (site / path / "index.html").is_file(), f"{path or 'index'}: not built"
    assert "Gromov et al." in page(site, "")
    assert 'src="heatmap.png"' in page(site, "") and (site / "heatmap.png").is_file()


def test_the_api_reference_documents_the_kit_from_its_docstrings(site):
    scan = page(site, "api/scan")
    assert "kit.angular_distances" in scan
    assert "Distances between all residual-stream positions" in scan  # angular_distances' docstring
    assert 'id="kit.scan.distances.Distances.best_block"' in scan
    assert 'id="kit.prune.drop_layers"' in page(site, "api/prune")
    assert 'id="kit.core.config.ScanConfig"' in page(site, "api/core")
    assert "kit.Run" in page(site, "api/pipeline") and 'id="kit.steps.similarity.scan"' in page(site, "api/pipeline")


def test_the_generated_tables_and_the_notebooks_are_on_their_pages(site):
    assert "<code>llama</code>" in page(site, "families") and "<code>zaya</code>" in page(site, "families")
    assert "70B" in page(site, "gpus") and "✗" in page(site, "gpus")
    notebook = page(site, "notebooks/01_similarity")
    assert "Which layers are redundant?" in notebook and "kit.steps.scan" in notebook


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on a free local port, as a browser reads a published one."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_chromium_renders_the_home_page_and_an_api_page(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: run `make setup`")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium is missing: run `make setup` as root, or `apt-get install chromium`")
    shots = {"home": ("/", "deeper-layers kit"), "api": ("/api/scan/", "kit.angular_distances")}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            view = browser.new_page(viewport={"width": 1280, "height": 900})
            for name, (path, heading) in shots.items():
                view.goto(served + path, wait_until="load", timeout=60_000)
                sync_api.expect(view.locator("article h1, article h2").filter(has_text=heading).first).to_be_visible()
                sync_api.expect(view.locator("nav.md-nav--primary").first).to_contain_text("API reference")
                # the theme's stylesheet applied: Material's header bar is fixed at the top
                assert view.locator("header.md-header").evaluate("e => getComputedStyle(e).position") in ("sticky", "fixed")
                view.screenshot(path=tmp_path / f"{name}.png")
                assert (tmp_path / f"{name}.png").stat().st_size > 10_000
                if os.environ.get("KIT_SCREENSHOT") == "1":
                    with atomic_path(REPO / "docs" / f"{name}.png") as tmp:
                        shutil.copyfile(tmp_path / f"{name}.png", tmp)
        finally:
            browser.close()
