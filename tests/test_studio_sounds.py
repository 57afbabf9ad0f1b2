"""Sounds in the studio, in a real browser (Playwright driving Debian's Chromium, as tests/test_studio_music.py does)
against a real `aigc serve` over a tiny conditional vae sound run (hits the test writes): the run's preview is a
sound to hear; a generation of a chosen class is played in the page (an <audio> element on the WAV, which the
browser decodes) beside its spectrogram, and rated; History finds sounds, plays them and makes them again to the
same WAV bytes; two sound runs meet in the arena on a class, and the vote names them and fills the sound leaderboard.
In Chinese too; no request leaves the server and no page error.
"""

from __future__ import annotations

import pytest
import soundfile
from tests.browser import CHROMIUM
from tests.test_server import start_server, stop_server
from tests.test_sounds import RATE, TINY, TINY_MODEL, burst, tone
from tests.test_studio import left_the_server, new_page, shot, visit
from tests.test_studio_music import rolls_drawn, wait_playable

from aigc import service
from aigc.db import Store

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium-headless-shell "
                                                         "fonts-wqy-microhei (the browser is never downloaded)"),
              pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def drumkit(tmp_path_factory):
    """Two conditional vaes on two classes of hits (tones and noise bursts), and a server over them."""
    home = tmp_path_factory.mktemp("studio-sounds")
    root = home / "hits"
    (root / "tone").mkdir(parents=True)
    (root / "noise").mkdir()
    for i in range(6):
        soundfile.write(root / "tone" / f"t{i}.wav", tone(110 + 20 * i), RATE, subtype="PCM_16")
        soundfile.write(root / "noise" / f"n{i}.flac", burst(i), RATE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        for name, seed in (("kit", "1337"), ("kit2", "1")):  # kit2: a rival in the arena
            service.train("vae", str(root), name=name, max_steps=3,
                          sets={**TINY, **TINY_MODEL["vae"], "conditional": "true", "seed": seed})
    proc, url = start_server(home)
    yield home, url
    stop_server(proc)


def test_a_person_listens_to_rates_and_regenerates_sounds(drumkit, browser):
    home, url = drumkit
    page = new_page(browser, "en-US")

    # Models: the sound run, with a sound to hear (the preview: class 0 at seed 0)
    visit(page, url, "models")
    card = page.locator("[data-model=kit]")
    playwright.expect(card.locator("audio")).to_have_count(1)
    assert wait_playable(page, "[data-model=kit]")[0] == pytest.approx(0.2, abs=0.01)  # 0.2 s hits
    assert rolls_drawn(page, "[data-model=kit]")[0] > 0

    # Generate: two noise hits, played beside their spectrograms; the second rated good
    visit(page, url, "generate?model=kit")
    page.get_by_label("Class").select_option("noise")
    page.get_by_label("How many").fill("2")
    with page.expect_response(lambda r: r.url.endswith("/v1/audio/generations")) as answer:
        page.get_by_role("button", name="Generate", exact=True).click()
    made = answer.value.json()
    pieces = page.locator(".piece")
    playwright.expect(pieces).to_have_count(2)
    assert all(d == pytest.approx(0.2, abs=0.01) for d in wait_playable(page, "main"))
    assert all(w > 0 for w in rolls_drawn(page, "main"))
    playwright.expect(pieces.nth(0)).to_contain_text("class: noise")
    playwright.expect(pieces.nth(0).locator("img.roll")).to_have_attribute("alt", "spectrogram of sound 1")
    pieces.nth(1).get_by_role("button", name="Good").click()
    playwright.expect(pieces.nth(1).locator(".rate")).to_contain_text("rating saved")
    shot(page, "sound-generate")

    # History: the sound generation, played again from the store and made again to the same bytes
    visit(page, url, "history")
    page.get_by_label("Kind").select_option("sound")
    page.get_by_role("button", name="Find").click()
    playwright.expect(page.locator("tbody tr")).to_have_count(1)
    page.locator("tbody tr").first.locator("button.open").click()
    playwright.expect(page.locator("section .piece audio")).to_have_count(2)
    wait_playable(page, "section")
    page.get_by_role("button", name="Regenerate exactly").click()
    playwright.expect(page.get_by_test_id("same")).to_have_text("Same as the stored result")
    shot(page, "sound-history")

    assert page.errors == [] and left_the_server(page, url) == []
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        gens = {g["id"]: g for g in db.list_generations(limit=100)}
    assert sorted(g["modality"] for g in gens.values()) == ["sound"] * 2  # + the one made again
    assert [(r["score"], r["index"]) for r in gens[made["generation_id"]]["ratings"]] == [(1, 1)]
    page.context.close()


def test_sounds_in_chinese(drumkit, browser):
    home, url = drumkit
    page = new_page(browser, "zh-CN")
    visit(page, url, "generate?model=kit")
    page.get_by_label("类别").select_option("tone")
    page.get_by_role("button", name="生成", exact=True).last.click()
    playwright.expect(page.locator(".piece")).to_contain_text("类别：tone")
    playwright.expect(page.locator(".piece audio")).to_have_attribute("aria-label", "播放第 1 个声音")
    playwright.expect(page.locator(".piece img.roll")).to_have_attribute("alt", "第 1 个声音的频谱图")
    wait_playable(page, "main")
    visit(page, url, "history")
    assert "声音" in page.get_by_label("类型").inner_text()
    visit(page, url, "arena")
    assert "声音" in page.get_by_label("类型").inner_text()
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()


def test_two_sound_runs_meet_in_the_arena(drumkit, browser):
    home, url = drumkit
    page = new_page(browser, "en-US")
    visit(page, url, "arena")
    page.get_by_label("Kind").select_option("sound")
    page.get_by_label("Prompt or class").fill("noise")
    page.get_by_role("button", name="New battle").click()
    playwright.expect(page.locator("[data-side] .piece audio")).to_have_count(2)
    assert wait_playable(page, "[data-side]") == [pytest.approx(0.2, abs=0.01)] * 2  # a hit each, to hear
    assert all(w > 0 for w in rolls_drawn(page, "[data-side]"))
    playwright.expect(page.locator("[data-side=right] .piece")).to_contain_text("class: noise")
    playwright.expect(page.locator("[data-side=left] .who")).to_have_text("")  # anonymous until the vote
    page.get_by_role("button", name="Model A").click()
    playwright.expect(page.locator("[data-side=left] .who")).to_contain_text("This was kit")
    playwright.expect(page.get_by_test_id("leaderboard").locator("tbody tr")).to_have_count(2)
    shot(page, "sound-arena")

    assert page.errors == [] and left_the_server(page, url) == []
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        votes = db.list_votes(modality="sound")
        battle = [g for g in db.list_generations(limit=100) if g["request"].get("endpoint") == "arena"]
    assert [v["winner"] for v in votes] == ["left"]
    assert sorted(g["run"] for g in battle) == ["kit", "kit2"] and {g["modality"] for g in battle} == {"sound"}
    page.context.close()
