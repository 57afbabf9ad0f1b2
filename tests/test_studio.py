"""The web studio in a real browser: Playwright drives Debian's Chromium (never a downloaded one) against a real
`aigc serve` over tiny runs. A person's whole session: open the studio, generate text (streamed) and an image,
rate both, vote in the arena, upload a tiny text and train on it for 20 s while watching the progress, regenerate
from history; then the store must hold exactly those rows. Also bad input from the page (an empty or binary
upload, a zip with no images, a CSV with no numbers, a 200 MB upload, two tabs training one name), the Chinese
interface, labels and the keyboard, and that nothing is fetched from anywhere but the server.

Screenshots of every page go to $AIGC_STUDIO_SHOTS (default: test-artifacts/studio/); docs/studio.md shows them.
Without Chromium (apt-get install chromium-headless-shell) or Playwright the tests skip, saying why.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import PIL.Image
import pytest
from tests.browser import CHROMIUM
from tests.test_server import start_server, stop_server, train_runs

from aigc.db import Store

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium-headless-shell "
                                                         "fonts-wqy-microhei (the browser is never downloaded)"),
              pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
SHOTS = Path(os.environ.get("AIGC_STUDIO_SHOTS") or Path(__file__).resolve().parents[1] / "test-artifacts" / "studio")
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """Runs: two text n-grams (the arena needs two), a conditional VAE on digits, an AR on sunspots; a server."""
    home = tmp_path_factory.mktemp("studio")
    train_runs(home, ("poet", "poet3", "digits", "sun"))
    proc, url = start_server(home, "--max-upload-mb", "5")
    yield home, url
    stop_server(proc)


@pytest.fixture
def page(browser, studio):
    """A fresh page in English that records every request it makes."""
    context = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()


def new_page(browser, locale: str):
    """A fresh page in `locale` that records every request it makes and every page error (the other studio tests'
    pages; this module's own is the `page` fixture)."""
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    return page


def left_the_server(page, url: str) -> list[str]:
    return [u for u in page.requests if urlparse(u).scheme in ("http", "https") and not u.startswith(url)]


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def visit(page, url: str, where: str) -> None:
    page.goto(f"{url}/#/{where}")
    page.wait_for_load_state("networkidle")


def rows(home: Path) -> dict:
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        gens = db.list_generations(limit=1000)
        return {"generations": gens, "votes": db.list_votes()}


def test_a_person_generates_rates_votes_trains_and_regenerates(studio, page):
    home, url = studio
    before = rows(home)
    assert before["generations"] == [] and before["votes"] == []

    # Models: every run a card with its headline score; the text run against the n-gram baseline
    visit(page, url, "models")
    cards = page.locator("article.card")
    playwright.expect(cards).to_have_count(4)
    playwright.expect(page.locator("[data-model=poet]")).to_contain_text("val_bpc")
    playwright.expect(page.locator("[data-model=sun] svg")).to_have_count(1)  # the fan chart (AR has no loss curve)
    shot(page, "models")

    # Generate text: streamed (the answer is an event stream), then rated
    visit(page, url, "generate?model=poet")
    page.get_by_label("Prompt").fill("春")
    with page.expect_response(lambda r: r.url.endswith("/v1/completions")) as answer:
        page.get_by_role("button", name="Generate", exact=True).click()
    assert answer.value.headers["content-type"].startswith("text/event-stream")
    output = page.get_by_test_id("text-output")
    playwright.expect(page.locator(".rate")).to_have_count(1)
    streamed = output.inner_text()
    stored = rows(home)["generations"][0]["output"][0]  # the prompt and its continuation, as the server kept it
    assert stored.startswith("春") and len(stored) > 1
    assert "".join(streamed.split()) == "".join(stored.split())  # shown as streamed (the page may fold whitespace)
    page.get_by_role("button", name="Good").click()
    playwright.expect(page.locator(".rate")).to_contain_text("rating saved")
    shot(page, "generate-text")

    # Generate an image of class 3, rated bad with a comment
    visit(page, url, "generate?model=digits")
    page.get_by_label("Class").select_option("3")
    page.get_by_role("button", name="Generate", exact=True).click()
    playwright.expect(page.locator(".grid img")).to_have_count(1)
    page.get_by_label("comment (optional)").fill("too blurry")
    page.get_by_role("button", name="Bad").click()
    playwright.expect(page.locator(".rate")).to_contain_text("rating saved")
    shot(page, "generate-image")

    # Arena: two anonymous text runs answer one prompt; a vote names them and fills the leaderboard
    visit(page, url, "arena")
    page.get_by_label("Prompt or class").fill("月")
    page.get_by_role("button", name="New battle").click()
    playwright.expect(page.locator("[data-side] .output")).to_have_count(2)
    assert page.locator("[data-side] .who").all_inner_texts() == ["", ""]  # anonymous until the vote
    page.get_by_role("button", name="Model A").click()
    playwright.expect(page.locator("[data-side=left] .who")).to_contain_text("This was poet")
    playwright.expect(page.get_by_test_id("leaderboard").locator("tbody tr")).to_have_count(2)
    shot(page, "arena")

    # Train: upload a tiny text, train a gpt on it for 20 s, watch the progress bar move and the run finish
    visit(page, url, "train")
    poems = (home / "poems.txt").read_text(encoding="utf-8")
    page.get_by_label("Your file").set_input_files(
        files=[{"name": "mine.txt", "mimeType": "text/plain", "buffer": poems.encode("utf-8")}])
    page.get_by_role("button", name="Upload").click()
    page.wait_for_function("document.querySelector('select[name=data]').value.startsWith('upl-')")
    page.get_by_label("Model family").select_option("gpt")
    page.get_by_label("Time").select_option("custom")
    page.get_by_label("Minutes").fill(str(20 / 60))
    page.get_by_label("Run name").fill("mine")
    page.get_by_role("button", name="Start training").click()
    job = page.locator("[data-run=mine]").first
    playwright.expect(job).to_have_attribute("data-status", "running")
    page.wait_for_function("(() => { const b = document.querySelector('[data-run=mine] [role=progressbar]');"
                           " return b && +b.getAttribute('aria-valuenow') > 0; })()", timeout=TIMEOUT_MS)
    shot(page, "train")
    playwright.expect(job).to_have_attribute("data-status", "done", timeout=180_000)
    assert (home / "runs" / "mine" / "run.json").is_file()
    assert json.loads((home / "runs" / "mine" / "run.json").read_text())["status"] == "done"

    # History: newest first; open the text generation and make it again exactly
    visit(page, url, "history")
    playwright.expect(page.locator("tbody tr")).to_have_count(4)  # text, image, two arena answers
    page.get_by_label("Search prompts").fill("春")
    page.get_by_role("button", name="Find").click()
    playwright.expect(page.locator("tbody tr")).to_have_count(1)
    page.locator("button.open").first.click()
    page.get_by_role("button", name="Regenerate exactly").click()
    playwright.expect(page.get_by_test_id("same")).to_have_text("Same as the stored result")
    shot(page, "history")

    assert page.errors == []
    outside = [u for u in page.requests if urlparse(u).scheme in ("http", "https") and not u.startswith(url)]
    assert outside == []

    # the store holds exactly what the person did: 4 generations + 1 regenerated, 2 ratings, 1 vote
    after = rows(home)
    gens = after["generations"]
    assert sorted(g["modality"] for g in gens) == ["image", "text", "text", "text", "text"]
    assert {g["source"] for g in gens} == {"studio"}
    rated = {g["id"]: [(r["score"], r["comment"]) for r in g["ratings"]] for g in gens if g["ratings"]}
    assert sorted(rated.values()) == [[(-1, "too blurry")], [(1, None)]]
    assert [v["winner"] for v in after["votes"]] == ["left"]
    regenerated = [g for g in gens if g["modality"] == "text" and g["request"].get("prompt") == "春"]
    assert len(regenerated) == 2 and regenerated[0]["output"] == regenerated[1]["output"]


def test_bad_input_gets_a_message_next_to_the_field(studio, page, tmp_path):
    home, url = studio
    kept = sorted((home / "uploads").glob("*"))
    visit(page, url, "train")
    upload = page.get_by_label("Your file")
    error = page.locator(f"#{upload.get_attribute('id')}-error")

    def send(kind: str, name: str, content: bytes | None = None, path: Path | None = None) -> str:
        page.get_by_label("Kind of data").select_option(kind)
        if path is not None:
            upload.set_input_files(str(path))
        else:
            upload.set_input_files(files=[{"name": name, "mimeType": "application/octet-stream", "buffer": content}])
        page.get_by_role("button", name="Upload").click()
        playwright.expect(error).not_to_be_empty()
        return error.inner_text()

    assert "empty" in send("text", "empty.txt", b"")
    assert "binary" in send("text", "photo.txt", bytes(range(256)) * 40)
    empty_zip = io.BytesIO()
    with zipfile.ZipFile(empty_zip, "w") as z:
        z.writestr("notes.txt", "no pictures here")
    assert "no images" in send("image", "pictures.zip", empty_zip.getvalue())
    assert "numeric" in send("series", "table.csv", ("name,city\n" + "a,b\n" * 40).encode())
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(200 * 2**20)
    assert "5 MB" in send("text", "big.txt", path=big)
    shot(page, "train-errors")
    assert sorted((home / "uploads").glob("*")) == kept  # nothing was kept of them

    # two tabs start a training of the same name: the second is told
    second = page.context.new_page()
    for tab in (page, second):
        visit(tab, url, "train")
        tab.get_by_label("Kind of data").select_option("series")
        tab.get_by_label("Data", exact=True).select_option("sunspots")
        tab.get_by_label("Model family").select_option("rnn")
        tab.get_by_label("Time").select_option("custom")
        tab.get_by_label("Minutes").fill("0.2")
        tab.get_by_label("Run name").fill("twice")
    page.get_by_role("button", name="Start training").click()
    playwright.expect(page.locator("[data-run=twice]").first).to_be_visible()
    second.get_by_role("button", name="Start training").click()
    playwright.expect(second.locator("form .error:not(:empty)").first).to_contain_text("twice")
    page.locator("[data-run=twice] button", has_text="Stop").first.click()


def test_chinese_labels_keyboard_and_no_outside_requests(studio, browser):
    home, url = studio
    context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 900})
    page = context.new_page()
    seen = []
    page.on("request", lambda r: seen.append(r.url))
    for where in ("models", "generate", "history", "arena", "train", "sweeps", "compare"):
        visit(page, url, where)
        # every control has a label (or an aria-label)
        unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
            .filter(e => e.type !== 'hidden' && !e.labels.length && !e.getAttribute('aria-label'))
            .map(e => e.outerHTML)""")
        assert unlabeled == [], where
    nav = page.locator("#nav a").all_inner_texts()
    assert nav == ["模型", "生成", "历史", "竞技场", "训练", "扫参", "比较"]
    # no sweep yet: the Sweeps page says how to start one
    visit(page, url, "sweeps")
    command = page.get_by_test_id("sweep-command")
    playwright.expect(command).to_have_text("aigc sweep --family ngram --data tang300 --trials 7")
    playwright.expect(page.locator("main")).to_contain_text("还没有扫参")
    visit(page, url, "compare")
    page.get_by_label("poet", exact=True).check()
    page.get_by_label("poet3").check()
    page.get_by_role("button", name="比较").last.click()
    playwright.expect(page.get_by_test_id("compare")).to_contain_text("val_bpc")
    shot(page, "compare-zh")
    visit(page, url, "models")
    shot(page, "models-zh")
    # the keyboard, on a freshly loaded page: Tab reaches the navigation, Enter follows a link
    page.goto("about:blank")
    visit(page, url, "models")
    page.keyboard.press("Tab")  # the skip link
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_function("location.hash === '#/generate'")
    # English from the switch at the top
    page.get_by_label("语言").select_option("en")
    assert page.locator("#nav a").all_inner_texts()[:3] == ["Models", "Generate", "History"]
    outside = [u for u in seen if urlparse(u).scheme in ("http", "https") and not u.startswith(url)]
    assert outside == []
    context.close()


def test_on_a_server_with_keys_the_studio_shows_its_files_with_the_key(tmp_path, browser):
    """An <img> sends no Authorization header: on a server with API keys the studio fetches the API's files with the
    key and shows them from blob URLs. The oracle: the picture the page draws has the PNG's own size and the stored
    file's pixels reach the page (a blob of the same bytes), and the same page without the key gets the 401."""
    train_runs(tmp_path, ("digits",))
    with Store(f"sqlite:///{tmp_path / 'aigc.db'}") as db:
        _, secret = db.create_key("studio")
    proc, url = start_server(tmp_path)
    try:
        page = new_page(browser, "en-US")
        page.goto(f"{url}/#/models")
        page.locator("#apikey").fill(secret)
        page.locator("#apikey").press("Enter")  # the key is taken (a change event) and the page asks again
        playwright.expect(page.locator("[data-model=digits]")).to_have_count(1)
        visit(page, url, "generate?model=digits")
        page.get_by_label("Class").select_option("3")
        page.get_by_role("button", name="Generate", exact=True).click()
        image = page.locator(".grid img")
        playwright.expect(image).to_have_count(1)
        playwright.expect(image).to_have_attribute("src", re.compile(r"^blob:"))
        page.wait_for_function("document.querySelector('.grid img').naturalWidth > 0")
        drawn = page.evaluate("[document.querySelector('.grid img').naturalWidth, "
                              "document.querySelector('.grid img').naturalHeight]")
        [generation] = rows(tmp_path)["generations"]
        stored = httpx.get(f"{url}/v1/generations/{generation['id']}/file",
                           headers={"Authorization": f"Bearer {secret}"})
        assert stored.status_code == 200
        assert drawn == list(PIL.Image.open(io.BytesIO(stored.content)).size)
        blob = page.evaluate("""async () => {
            const r = await fetch(document.querySelector('.grid img').src);
            return Array.from(new Uint8Array(await r.arrayBuffer()));
        }""")
        assert bytes(blob) == stored.content
        assert httpx.get(f"{url}/v1/generations/{generation['id']}/file").status_code == 401
        assert page.errors == [] and left_the_server(page, url) == []
    finally:
        stop_server(proc)
