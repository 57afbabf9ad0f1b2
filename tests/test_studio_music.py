"""Music in the studio, in a real browser (Playwright driving Debian's Chromium, as tests/test_studio.py does) against
a real `aigc serve` over two tiny n-gram music runs (chorales from the music21 corpus, written as MIDI by the test):
the runs are listed with a piece to hear; a generation is played in the page (an <audio> element on the WAV, which
the browser decodes) beside its piano roll, and rated; a music battle in the arena is voted on and fills the music
leaderboard; History finds music, plays it and makes it again exactly; a zip of MIDI files is uploaded and trained
on. In Chinese too; no request leaves the server and no page error.

Screenshots go to $AIGC_STUDIO_SHOTS (default: test-artifacts/studio/).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import soundfile
from tests.browser import CHROMIUM
from tests.test_server import start_server, stop_server
from tests.test_studio import TIMEOUT_MS, left_the_server, new_page, shot, visit

from aigc import service
from aigc.data import music as m
from aigc.db import Store

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium-headless-shell "
                                                         "fonts-wqy-microhei (the browser is never downloaded)"),
              pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def composers(tmp_path_factory):
    """Two n-gram music runs (orders 3 and 4) on four chorales as MIDI files, and a server over them."""
    home = tmp_path_factory.mktemp("studio-music")
    folder = home / "midi"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        for piece in m.bach_chorales(limit=4):
            (folder / f"{piece.name}.mid").write_bytes(m.midi_bytes(piece))
        for name, order in (("bach3", "3"), ("bach4", "4")):
            service.train("ngram", str(folder), name=name, sets={"max_order": order, "val_fraction": "0.25"})
    proc, url = start_server(home)
    yield home, url, folder
    stop_server(proc)


def wait_playable(page, selector: str) -> list[float]:
    """The durations (s) of the <audio> elements under `selector`, once the browser has decoded their headers."""
    page.wait_for_function(f"[...document.querySelectorAll('{selector} audio')].every(a => a.readyState >= 1)",
                           timeout=TIMEOUT_MS)
    return page.evaluate(f"[...document.querySelectorAll('{selector} audio')].map(a => a.duration)")


def rolls_drawn(page, selector: str) -> list[int]:
    page.wait_for_function(f"[...document.querySelectorAll('{selector} img.roll')].every(i => i.complete)")
    return page.evaluate(f"[...document.querySelectorAll('{selector} img.roll')].map(i => i.naturalWidth)")


def test_a_person_listens_rates_votes_and_regenerates_music(composers, browser):
    home, url, folder = composers
    page = new_page(browser, "en-US")

    # Models: both music runs, each with a piece to hear (the preview: 4 bars at seed 0)
    visit(page, url, "models")
    card = page.locator("[data-model=bach3]")
    playwright.expect(card).to_contain_text("music")
    playwright.expect(card.locator("audio")).to_have_count(1)
    assert wait_playable(page, "[data-model=bach3]")[0] > 4 * 4 * 60 / m.TEMPO_BPM - 0.5  # 4 bars of 4/4 at 90 bpm
    assert rolls_drawn(page, "[data-model=bach3]")[0] > 0
    shot(page, "music-models")

    # Generate: two pieces of 2 bars, played in the page beside their piano rolls; the second rated good
    visit(page, url, "generate?model=bach3")
    page.get_by_label("Bars").fill("2")
    page.get_by_label("How many").fill("2")
    with page.expect_response(lambda r: r.url.endswith("/v1/audio/generations")) as answer:
        page.get_by_role("button", name="Generate", exact=True).click()
    made = answer.value.json()
    pieces = page.locator(".piece")
    playwright.expect(pieces).to_have_count(2)
    durations = wait_playable(page, "main")
    # the page plays each whole WAV: the oracle is the file's own length (soundfile), not 2 bars, since a piece's
    # sound ends with its last note and a tiny model may leave the end of its last bar silent
    for i, played in enumerate(durations):
        wav_bytes = page.request.get(pieces.nth(i).locator("audio").get_attribute("src")).body()
        info = soundfile.info(io.BytesIO(wav_bytes))
        assert played == pytest.approx(info.frames / info.samplerate, abs=0.05), (i, durations)
    assert all(w > 0 for w in rolls_drawn(page, "main"))
    wav = page.request.get(pieces.nth(0).locator("audio").get_attribute("src"))
    assert wav.headers["content-type"] == "audio/wav" and wav.body()[:4] == b"RIFF"
    playwright.expect(pieces.nth(0)).to_contain_text("2 bars")
    pieces.nth(1).get_by_role("button", name="Good").click()
    playwright.expect(pieces.nth(1).locator(".rate")).to_contain_text("rating saved")
    shot(page, "music-generate")

    # Arena: two anonymous music runs compose; the prompt is not asked for; a vote names them
    visit(page, url, "arena")
    page.get_by_label("Kind").select_option("music")
    playwright.expect(page.get_by_label("Prompt or class")).to_be_disabled()
    page.get_by_role("button", name="New battle").click()
    playwright.expect(page.locator("[data-side] audio")).to_have_count(2)
    assert len(wait_playable(page, "[data-side]")) == 2
    page.get_by_role("button", name="Model B").click()
    playwright.expect(page.locator("[data-side=right] .who")).to_contain_text("This was bach")
    playwright.expect(page.get_by_test_id("leaderboard").locator("tbody tr")).to_have_count(2)
    shot(page, "music-arena")

    # History: the music generations; the Generate page's one played again from the store and made again exactly
    visit(page, url, "history")
    page.get_by_label("Kind").select_option("music")
    page.get_by_role("button", name="Find").click()
    playwright.expect(page.locator("tbody tr")).to_have_count(3)  # the generation and the battle's two
    page.locator("tbody tr", has_text="2 bars").locator("button.open").click()
    playwright.expect(page.locator("section .piece audio")).to_have_count(2)
    wait_playable(page, "section")
    page.get_by_role("button", name="Regenerate exactly").click()
    playwright.expect(page.get_by_test_id("same")).to_have_text("Same as the stored result")
    shot(page, "music-history")

    # Train: a zip of MIDI files uploaded, an n-gram counted on it
    visit(page, url, "train")
    page.get_by_label("Kind of data").select_option("music")
    assert "bach-chorales" in page.get_by_label("Data", exact=True).inner_text()
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as z:
        for path in sorted(folder.glob("*.mid")):
            z.write(path, path.name)
    page.get_by_label("Your file").set_input_files(
        files=[{"name": "mine.zip", "mimeType": "application/zip", "buffer": packed.getvalue()}])
    page.get_by_role("button", name="Upload").click()
    page.wait_for_function("document.querySelector('select[name=data]').value.startsWith('upl-')")
    page.get_by_label("Model family").select_option("ngram")
    page.get_by_label("Run name").fill("mine")
    page.get_by_role("button", name="Start training").click()
    playwright.expect(page.locator("[data-run=mine]").first).to_have_attribute("data-status", "done",
                                                                                timeout=180_000)

    assert page.errors == [] and left_the_server(page, url) == []
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        gens = {g["id"]: g for g in db.list_generations(limit=100)}
        votes = db.list_votes()
    assert sorted(g["modality"] for g in gens.values()) == ["music"] * 4  # + the one made again
    rated = gens[made["generation_id"]]["ratings"]
    assert [(r["score"], r["index"]) for r in rated] == [(1, 1)]
    assert [v["winner"] for v in votes] == ["right"]
    assert Path(gens[made["generation_id"]]["file"]).with_suffix(".wav").is_file()
    page.context.close()


def test_a_person_has_a_chorale_melody_harmonised(composers, browser):
    home, url, _ = composers
    [melody] = service.openings(str(home / "runs" / "bach3"))
    page = new_page(browser, "en-US")
    visit(page, url, "generate?model=bach3")
    page.get_by_label("Harmonise a melody").select_option(melody)
    playwright.expect(page.get_by_label("Continue an opening")).to_be_disabled()  # one or the other
    with page.expect_response(lambda r: r.url.endswith("/v1/audio/generations")) as answer:
        page.get_by_role("button", name="Generate", exact=True).click()
    made = answer.value.json()
    playwright.expect(page.get_by_test_id("harmonised")).to_have_text(
        f"The top voice is the soprano of {melody}, kept exactly; the voices below it are the model's.")
    val = next(json.loads(line) for line in (home / "runs" / "bach3" / "val.jsonl").read_text().splitlines())
    soprano = m.soprano_line(m.decode(val["tokens"].split()).notes)
    record = made["data"][0]["record"]
    assert record["settings"]["harmonise_piece"] == melody
    assert set(soprano) <= set(m.decode(record["tokens"].split()).notes)  # the melody kept exactly
    playwright.expect(page.locator(".piece")).to_contain_text(f"{m.bars_of(val['tokens'].split())} bars")
    wait_playable(page, "main")
    assert rolls_drawn(page, "main")[0] > 0
    shot(page, "music-harmonise")
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()

    page = new_page(browser, "zh-CN")  # the same in Chinese
    visit(page, url, "generate?model=bach3")
    page.get_by_label("为旋律配和声").select_option(melody)
    page.get_by_role("button", name="生成", exact=True).last.click()
    playwright.expect(page.get_by_test_id("harmonised")).to_have_text(
        f"最高声部是 {melody} 的女高音旋律，原样保留；其下的各声部是模型写的。")
    wait_playable(page, "main")
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()


def test_a_person_has_the_melody_of_their_own_midi_file_harmonised_and_an_opening_continued(composers, browser,
                                                                                              tmp_path):
    """The file inputs: a melody of one's own (its top voice kept exactly), then in Chinese an opening of one's own
    continued; each file goes inside the JSON request (no other request leaves the page)."""
    home, url, _ = composers
    melody = m.Piece("tune", "4/4", [(0, 4, 72), (4, 4, 74), (8, 8, 76), (16, 16, 72)])
    (tmp_path / "tune.mid").write_bytes(m.midi_bytes(melody))
    page = new_page(browser, "en-US")
    visit(page, url, "generate?model=bach3")
    page.get_by_label("or harmonise the melody of a MIDI file of your own").set_input_files(str(tmp_path / "tune.mid"))
    playwright.expect(page.get_by_label("Continue an opening")).to_be_disabled()  # one or the other
    playwright.expect(page.get_by_label("or continue a MIDI file of your own")).to_be_disabled()
    with page.expect_response(lambda r: r.url.endswith("/v1/audio/generations")) as answer:
        page.get_by_role("button", name="Generate", exact=True).click()
    made = answer.value.json()
    assert answer.value.status == 200, made
    playwright.expect(page.get_by_test_id("harmonised")).to_have_text(
        "The top voice is the melody of tune.mid, kept exactly; the voices below it are the model's.")
    record = made["data"][0]["record"]
    assert Path(record["settings"]["harmonise_midi"]).read_bytes() == (tmp_path / "tune.mid").read_bytes()
    notes = m.decode(record["tokens"].split()).notes
    assert set(melody.notes) <= set(notes) and m.soprano_line(notes) == melody.notes  # kept exactly, on top
    wait_playable(page, "main")
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()

    start = m.Piece("start", "4/4", [(0, 4, 60), (0, 4, 64), (4, 4, 67), (8, 8, 72), (16, 4, 62)])
    (tmp_path / "start.mid").write_bytes(m.midi_bytes(start))
    page = new_page(browser, "zh-CN")
    visit(page, url, "generate?model=bach3")
    page.get_by_label("或续写自己的 MIDI 文件").set_input_files(str(tmp_path / "start.mid"))
    page.get_by_label("开头长度（小节）").fill("1")
    with page.expect_response(lambda r: r.url.endswith("/v1/audio/generations")) as answer:
        page.get_by_role("button", name="生成", exact=True).last.click()
    made = answer.value.json()
    playwright.expect(page.get_by_test_id("continued")).to_have_text("前 1 小节是 start.mid 的开头，其余是模型写的。")
    tokens = made["data"][0]["record"]["tokens"].split()
    assert set(m.decode(m.first_bars(m.encode(start), 1)).notes) <= set(m.decode(tokens).notes)
    wait_playable(page, "main")
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()


def test_a_person_picks_a_chorale_opening_and_hears_it_continued(composers, browser):
    home, url, _ = composers
    [opening] = service.openings(str(home / "runs" / "bach3"))  # its one validation chorale (a quarter of four)
    page = new_page(browser, "en-US")
    visit(page, url, "generate?model=bach3")
    playwright.expect(page.get_by_label("Length of the opening")).to_be_disabled()  # nothing to continue yet
    page.get_by_label("Continue an opening").select_option(opening)
    page.get_by_label("Length of the opening").fill("1")
    page.get_by_label("Bars").fill("2")
    with page.expect_response(lambda r: r.url.endswith("/v1/audio/generations")) as answer:
        page.get_by_role("button", name="Generate", exact=True).click()
    made = answer.value.json()
    playwright.expect(page.get_by_test_id("continued")).to_have_text(
        f"The first 1 bar(s) are the opening of {opening}; the rest is the model's.")
    playwright.expect(page.locator(".piece")).to_contain_text("3 bars")  # the opening's bar and 2 of the model's
    [duration] = wait_playable(page, "main")
    record = made["data"][0]["record"]
    piece = m.decode(record["tokens"].split())  # the studio draws a fresh seed: the piece may end on rests
    sounding = max(onset + length for onset, length, _ in piece.notes) * m.seconds_per_step()
    assert duration > sounding - 0.5  # every note of it is heard
    assert rolls_drawn(page, "main")[0] > 0
    assert record["settings"]["prompt_piece"] == opening and record["settings"]["prompt_bars"] == 1
    val = next(json.loads(line) for line in (home / "runs" / "bach3" / "val.jsonl").read_text().splitlines())
    first_bar = m.first_bars(val["tokens"].split(), 1)
    assert record["tokens"].split()[:len(first_bar)] == first_bar  # the piece begins with the chorale's own bar
    shot(page, "music-continue")
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()

    page = new_page(browser, "zh-CN")  # the same in Chinese
    visit(page, url, "generate?model=bach3")
    page.get_by_label("续写开头").select_option(opening)
    page.get_by_label("小节数").fill("1")
    page.get_by_role("button", name="生成", exact=True).last.click()
    playwright.expect(page.get_by_test_id("continued")).to_have_text(f"前 2 小节是 {opening} 的开头，其余是模型写的。")
    playwright.expect(page.locator(".piece")).to_contain_text("3 小节")
    wait_playable(page, "main")
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()


def test_music_in_chinese(composers, browser):
    home, url, _ = composers
    page = new_page(browser, "zh-CN")
    visit(page, url, "generate?model=bach4")
    page.get_by_label("小节数").fill("1")
    page.get_by_role("button", name="生成", exact=True).last.click()
    playwright.expect(page.locator(".piece")).to_contain_text("1 小节")
    playwright.expect(page.locator(".piece audio")).to_have_attribute("aria-label", "播放第 1 首")
    playwright.expect(page.locator(".piece img.roll")).to_have_attribute("alt", "第 1 首的钢琴卷帘")
    wait_playable(page, "main")
    shot(page, "music-generate-zh")
    visit(page, url, "history")
    assert "音乐" in page.get_by_label("类型").inner_text()
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()
