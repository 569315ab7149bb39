"""The demo page in a real browser: headless Debian Chromium driven by Playwright's Python package.

Playwright's own browser download is never used (it needs network); the test launches the system
Chromium through ``executable_path`` and skips, saying why, when either is missing. The setup
installs them with ``apt-get install -y chromium`` and ``pip install -c constraints.txt playwright``.
The screenshot goes to ``test-artifacts/demo.png`` (gitignored) for a human to look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
pytest.importorskip("gradio", reason="the demo needs gradio: pip install -c constraints.txt gradio")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="pip install -c constraints.txt playwright (no `playwright install`)")

from encoder.video_io import sample_clip_path  # noqa: E402
from test_demo import serve, tiny_videollm  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records the text of the newest bot message every time the chat's DOM changes, so the test sees
# the streamed intermediate states no matter how fast the tiny model is.
WATCH_BOT = """() => {
  window.__botTexts = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    if (bots.length) {
      const text = bots[bots.length - 1].innerText.trim();
      const seen = window.__botTexts;
      if (text && text !== seen[seen.length - 1]) seen.push(text);
    }
  }).observe(chat, {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def demo_url():
    from demo.examples import bundled_examples

    model, processor = tiny_videollm()
    app, url = serve(model, processor, max_new_tokens=48, examples=bundled_examples())
    yield url
    app.close()


@pytest.fixture()
def page(tmp_path):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1280, "height": 1000})
        try:
            yield context.new_page()
        finally:
            context.close()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_upload_ask_and_see_the_answer_stream(demo_url, page):
    page.goto(demo_url)
    page.locator("#video input[type=file]").set_input_files(str(sample_clip_path("bikes")))
    page.wait_for_selector("#video video", timeout=30_000)  # the upload is shown in the player

    page.evaluate(WATCH_BOT)
    box = page.locator("#question textarea")
    box.fill("What happens in the video?")
    box.press("Enter")
    page.wait_for_function("document.querySelector('#info').innerText.includes('tokens/s')", timeout=60_000)

    user = page.locator('#chatbot [data-testid="user"]')
    bot = page.locator('#chatbot [data-testid="bot"]')
    assert user.count() == 1 and "What happens in the video?" in user.inner_text()
    answer = bot.last.inner_text().strip()
    assert len(answer.split()) == 48  # the tiny model never stops early: one word per token
    seen = page.evaluate("window.__botTexts")
    assert len(seen) >= 2, f"the answer appeared at once, not streamed: {seen}"
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen  # it only grew
    assert seen[-1] == answer
    assert page.locator("#gallery img").count() == 8  # the 8 sampled frames
    assert "8 frames" in page.locator("#info").inner_text()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000

    # A second turn keeps the first; once it has finished (the info line is rewritten), clearing
    # empties the chat.
    page.evaluate("window.__info = document.querySelector('#info').innerText")
    box.fill("And then?")
    box.press("Enter")
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length == 2",
                           timeout=60_000)
    page.wait_for_function("(() => { const t = document.querySelector('#info').innerText; "
                           "return t !== window.__info && t.includes('tokens/s'); })()", timeout=60_000)
    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length == 0",
                           timeout=30_000)


def test_bad_upload_is_answered_in_the_chat(demo_url, page, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(sample_clip_path("bikes").read_bytes()[:3000])
    page.goto(demo_url)
    page.locator("#video input[type=file]").set_input_files(str(bad))
    page.wait_for_timeout(1000)
    box = page.locator("#question textarea")
    box.fill("What is this?")
    box.press("Enter")
    bot = page.locator('#chatbot [data-testid="bot"]')
    bot.last.wait_for(timeout=30_000)
    assert "cannot read video 'broken.mp4'" in bot.last.inner_text()


def test_example_clip_fills_the_video_and_question(demo_url, page):
    page.goto(demo_url)
    page.get_by_text("carphone_pristine", exact=True).first.click()
    page.wait_for_selector("#video video", timeout=30_000)
    box = page.locator("#question textarea")
    assert box.input_value() == "What happens in this video?"
    box.press("Enter")
    page.wait_for_function("document.querySelector('#info').innerText.includes('tokens/s')", timeout=60_000)
    assert page.locator('#chatbot [data-testid="bot"]').last.inner_text().strip()
