"""A real browser (Debian's chromium through Playwright) uses the served page: type a prompt, generate two
candidates with few steps, see two images captioned with their CLIP scores. Screenshot in test-artifacts/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["tests.serve_fixtures"]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"
)


def set_number(page, elem_id: str, value: int) -> None:
    """Type into the number box of a Gradio slider/number and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")  # commit: Gradio updates slider values on change/blur


def test_browser_generates_two_candidates_with_scores(live_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(live_server.url, wait_until="domcontentloaded", timeout=60_000)
            prompt = page.locator("#prompt textarea")
            prompt.wait_for(timeout=60_000)
            prompt.fill("a red circle on a blue background")
            for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("candidates", 2)):
                set_number(page, elem_id, value)
            page.locator("#token-counter").get_by_text("7/75 tokens").wait_for(timeout=30_000)
            page.locator("button#generate").click()
            status = page.locator("#status")
            status.get_by_text(re.compile(r"Done: 2 image\(s\)")).wait_for(timeout=120_000)
            gallery = page.locator("#gallery")
            images = gallery.locator("img")
            images.nth(1).wait_for(timeout=30_000)
            captions = gallery.get_by_text(re.compile(r"CLIP \d+\.\d · seed \d+"))
            assert captions.count() == 2, gallery.inner_text()
            assert images.count() == 2
            page.screenshot(path=str(ARTIFACTS / "browser-generate.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser-generate-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
