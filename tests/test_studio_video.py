"""Video in the studio, in a real browser (Playwright driving Debian's Chromium, as tests/test_studio.py does) against
a real `aigc serve` over three tiny video runs on moving-digits (scikit-learn's digits, no apt package): a simvp
predictor and two conditional vae clip generators (frames as channels). The runs are listed with clips to watch; a
generation's GIFs play in the page (the browser animates them: the picture changes while we look) beside the frame
sheet, and so does each clip's MP4 in an HTML5 player (the browser decodes the H.264 we write: its first frame is
the GIF's, it lasts the clip's frames / fps and it plays); a clip is rated; a video battle in the arena is voted on
and fills the video leaderboard; History finds the clips, plays them and makes them again byte for byte. In Chinese
too; no request leaves the server and no page error.

Screenshots go to $AIGC_STUDIO_SHOTS (default: test-artifacts/studio/).
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image
from tests.browser import CHROMIUM
from tests.test_server import start_server, stop_server
from tests.test_studio import TIMEOUT_MS, left_the_server, new_page, shot, visit

from aigc import service
from aigc.db import Store

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium-headless-shell "
                                                         "fonts-wqy-microhei (the browser is never downloaded)"),
              pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

TINY = {"frames": "8", "context": "4", "size": "24", "val_clips": "8", "batch_size": "4", "warmup_steps": "2",
        "eval_interval": "3", "eval_batches": "1", "log_interval": "1", "dtype": "fp32", "compile": "false"}
RUNS = {"mover": ("simvp", {"hid_s": "8", "hid_t": "16", "n_t": "1"}),
        "clips-a": ("vae", {"z_dim": "4", "base_channels": "8", "conditional": "true"}),
        "clips-b": ("vae", {"z_dim": "4", "base_channels": "8", "conditional": "true", "seed": "1"})}


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    """A predictor and two conditional clip generators (8 frames of 24x24, 6 steps each), and a server over them."""
    home = tmp_path_factory.mktemp("studio-video")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        for name, (family, sets) in RUNS.items():
            service.train(family, "moving-digits", name=name, max_steps=6, sets={**TINY, **sets})
    proc, url = start_server(home)
    yield home, url
    stop_server(proc)


def gifs_loaded(page, selector: str) -> list[int]:
    """The decoded widths of the clips' GIFs under `selector`, once the browser has loaded them."""
    page.wait_for_function(f"[...document.querySelectorAll('{selector} img.gif')].every(i => i.complete)",
                           timeout=TIMEOUT_MS)
    return page.evaluate(f"[...document.querySelectorAll('{selector} img.gif')].map(i => i.naturalWidth)")


def videos_loaded(page, selector: str) -> list[float]:
    """The durations (s) of the MP4 players under `selector`, once the browser has decoded their first frame."""
    page.wait_for_function(f"[...document.querySelectorAll('{selector} video.mp4')].every(v => v.readyState >= 2)",
                           timeout=TIMEOUT_MS)
    return page.evaluate(f"[...document.querySelectorAll('{selector} video.mp4')].map(v => v.duration)")


def decoded_frame(player) -> np.ndarray:
    """The frame a <video> shows now, as the browser decoded it: drawn into a canvas, read back (H, W) (red)."""
    rgba = player.evaluate("""v => {
        const c = document.createElement("canvas");
        c.width = v.videoWidth; c.height = v.videoHeight;
        const ctx = c.getContext("2d");
        ctx.drawImage(v, 0, 0);
        return [c.width, c.height, [...ctx.getImageData(0, 0, c.width, c.height).data]];
    }""")
    w, h, data = rgba
    return np.array(data, dtype=np.uint8).reshape(h, w, 4)[..., 0]


def plays(player) -> bool:
    """Whether the <video> plays: started from its beginning, its currentTime advances."""
    player.evaluate("v => { v.currentTime = 0; return v.play(); }")
    player.page.wait_for_function("v => v.currentTime > 0.15", arg=player.element_handle(), timeout=TIMEOUT_MS)
    return player.evaluate("v => v.error === null")


def distinct_pictures(locator, looks: int = 8, every_s: float = 0.13) -> int:
    """How many different pictures an element shows over `looks` screenshots: above 1 for a GIF that plays."""
    seen = set()
    for _ in range(looks):
        seen.add(locator.screenshot())
        time.sleep(every_s)
    return len(seen)


def test_a_person_watches_rates_votes_and_regenerates_clips(movies, browser):
    home, url = movies
    page = new_page(browser, "en-US")

    # Models: each video run with clips to watch (the preview: 2 clips at seed 0) and their frame sheet
    visit(page, url, "models")
    card = page.locator("[data-model=mover]")
    playwright.expect(card).to_contain_text("video")
    playwright.expect(card.locator("img.gif")).to_have_count(2)
    assert all(w == 24 for w in gifs_loaded(page, "[data-model=mover]"))
    assert videos_loaded(page, "[data-model=mover]") == [pytest.approx(0.8, abs=1e-3)] * 2  # their MP4s (data URLs)
    playwright.expect(card.locator("img.sheet")).to_have_count(1)
    shot(page, "video-models")

    # Generate: two predicted clips, played in the page (the GIF animates) beside the sheet; the second rated good
    visit(page, url, "generate?model=mover")
    page.get_by_label("How many").fill("2")
    with page.expect_response(lambda r: r.url.endswith("/v1/videos/generations")) as answer:
        page.get_by_role("button", name="Generate", exact=True).click()
    made = answer.value.json()
    clips = page.locator(".clip")
    playwright.expect(clips).to_have_count(2)
    assert gifs_loaded(page, "main") == [24, 24]
    assert distinct_pictures(clips.nth(0).locator("img.gif")) > 1  # it plays: the moving digit changes the picture
    gif = page.request.get(clips.nth(0).locator("img.gif").get_attribute("src"))
    assert gif.headers["content-type"] == "image/gif" and gif.body()[:6] == b"GIF89a"
    mp4 = clips.nth(0).get_by_role("link", name="MP4 file")  # the clip's MP4, to download: the answer's own file
    assert mp4.get_attribute("download") == "clip-1.mp4"
    video = page.request.get(mp4.get_attribute("href"))
    assert video.headers["content-type"] == "video/mp4" and video.body()[4:8] == b"ftyp"
    assert mp4.get_attribute("href") == made["data"][0]["mp4_url"]
    # each clip's MP4 plays in the page (an HTML5 player): it lasts frames / fps of the answer, its first frame as the
    # browser decodes it is the GIF's first frame (the exact clip) up to H.264's loss, and it plays
    durations = videos_loaded(page, "main")
    assert durations == [pytest.approx(d["frames"] / d["fps"], abs=1e-3) for d in made["data"]]
    assert made["data"][0]["frames"] == 8 and made["data"][0]["fps"] == 10
    player = clips.nth(0).locator("video.mp4")
    assert player.get_attribute("src") == made["data"][0]["mp4_url"]
    first = np.asarray(Image.open(io.BytesIO(gif.body())).convert("L"), dtype=int)  # the GIF's frame 0
    shown = decoded_frame(player).astype(int)
    assert shown.shape == first.shape == (24, 24) and first.std() > 10
    assert np.abs(shown - first).mean() < 3, np.abs(shown - first).mean()
    assert plays(player)
    sheet = page.locator("main img.sheet")
    page.wait_for_function("document.querySelector('main img.sheet').complete")
    assert sheet.evaluate("i => [i.naturalWidth, i.naturalHeight]")[1] > 2 * 24  # the truth above each prediction
    playwright.expect(page.locator("main .sheet figcaption")).to_contain_text("above its prediction")
    playwright.expect(clips.nth(1)).to_contain_text(f"seed {made['seed'] + 1}")
    clips.nth(1).get_by_role("button", name="Good").click()
    playwright.expect(clips.nth(1).locator(".rate")).to_contain_text("rating saved")
    shot(page, "video-generate")

    # Arena: the two clip generators draw class 7 (the predictor cannot: it is not drawn); a vote names them
    visit(page, url, "arena")
    page.get_by_label("Kind").select_option("video")
    page.get_by_label("Prompt or class").fill("7")
    page.get_by_role("button", name="New battle").click()
    playwright.expect(page.locator("[data-side] img.gif")).to_have_count(2)
    assert gifs_loaded(page, "[data-side]") == [24, 24]
    assert videos_loaded(page, "[data-side]") == [pytest.approx(0.8, abs=1e-3)] * 2  # 8 frames at 10 a second
    page.get_by_role("button", name="Model B").click()
    playwright.expect(page.locator("[data-side=right] .who")).to_contain_text("This was clips-")
    playwright.expect(page.get_by_test_id("leaderboard").locator("tbody tr")).to_have_count(2)
    shot(page, "video-arena")

    # History: the video generations; the Generate page's one played again from the store and made again exactly
    visit(page, url, "history")
    page.get_by_label("Kind").select_option("video")
    page.get_by_role("button", name="Find").click()
    playwright.expect(page.locator("tbody tr")).to_have_count(3)  # the generation and the battle's two
    page.locator("tbody tr", has_text="2 clip(s)").locator("button.open").click()
    playwright.expect(page.locator("section .clip img.gif")).to_have_count(2)
    assert gifs_loaded(page, "section") == [24, 24]
    assert videos_loaded(page, "section") == [pytest.approx(0.8, abs=1e-3)] * 2
    page.get_by_role("button", name="Regenerate exactly").click()
    playwright.expect(page.get_by_test_id("same")).to_have_text("Same as the stored result")
    shot(page, "video-history")

    assert page.errors == [] and left_the_server(page, url) == []
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        gens = {g["id"]: g for g in db.list_generations(limit=100)}
        votes = db.list_votes()
    assert sorted(g["modality"] for g in gens.values()) == ["video"] * 4  # + the one made again
    assert sorted(g["run"] for g in gens.values() if g["request"].get("endpoint") == "arena") == ["clips-a", "clips-b"]
    rated = gens[made["generation_id"]]["ratings"]
    assert [(r["score"], r["index"]) for r in rated] == [(1, 1)]
    assert [v["winner"] for v in votes] == ["right"]
    page.context.close()


def test_video_in_chinese(movies, browser):
    home, url = movies
    page = new_page(browser, "zh-CN")
    visit(page, url, "generate?model=clips-a")
    page.get_by_label("类别").select_option("3")
    page.get_by_role("button", name="生成", exact=True).last.click()
    playwright.expect(page.locator(".clip img.gif")).to_have_attribute("alt", "第 1 段视频（循环播放）")
    playwright.expect(page.locator(".clip video.mp4")).to_have_attribute("aria-label", "第 1 段视频（MP4 播放器）")
    playwright.expect(page.locator(".sheet figcaption")).to_have_text("帧图：每段视频一行，每帧一列。")
    gifs_loaded(page, "main")
    shot(page, "video-generate-zh")
    visit(page, url, "history")
    assert "视频" in page.get_by_label("类型").inner_text()
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()
