"""The Train page takes a person's own sounds (issue 17) in a real browser (Playwright driving Debian's Chromium, as
tests/test_studio.py does), in Chinese: kind 声音 offers the sound families, a zip of WAV/FLAC hits in class folders
uploads and becomes the chosen data, a tiny vae trains on it to the end; a zip with a corrupt WAV gets its message
next to the file field and leaves nothing in the uploads area. And clips (issue 18), in English: a zip of GIFs (made by
the project's own writer) uploads, a tiny vae trains on it with the clip length the upload found (the server applies
the upload's train_sets: the page sends none), and its clips play on the Generate page (the GIF and the MP4). No
request leaves the server and no page error."""

from __future__ import annotations

import json

import pytest
from tests.browser import CHROMIUM
from tests.test_server import start_server, stop_server
from tests.test_studio import left_the_server, new_page, shot, visit
from tests.test_studio_video import gifs_loaded, videos_loaded
from tests.test_uploads_media import SOUND_SETS, VIDEO_SETS, hits, make_zip, moving

from aigc.data import video as v

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium-headless-shell "
                                                         "fonts-wqy-microhei (the browser is never downloaded)"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    home = tmp_path_factory.mktemp("studio-uploads")
    proc, url = start_server(home, "--max-upload-mb", "1", timeout=300)  # a loaded 2-core machine starts slowly
    yield home, url
    stop_server(proc)


def test_a_person_uploads_sounds_and_trains_on_them_in_chinese(studio, browser):
    home, url = studio
    page = new_page(browser, "zh-CN")
    visit(page, url, "train")
    page.get_by_label("数据类型").select_option("sound")
    families = page.get_by_label("模型族").locator("option")
    playwright.expect(families).to_have_text(["vae", "dcgan", "diffusion"])
    upload = page.get_by_label("你的文件")
    error = page.locator(f"#{upload.get_attribute('id')}-error")

    # a corrupt WAV among good ones: refused next to the field, nothing kept
    upload.set_input_files(files=[{"name": "坏.zip", "mimeType": "application/zip",
                                   "buffer": make_zip({**hits(), "kit/low/bad.wav": b"RIFF\x00\x00\x00\x00WAVE"})}])
    page.get_by_role("button", name="上传").click()
    playwright.expect(error).to_contain_text("low/bad.wav: not a readable WAV/FLAC/OGG file")
    assert not (home / "uploads").exists() or [p.name for p in (home / "uploads").iterdir()] == []

    # the good zip: uploaded, chosen as the data ("你的: kit.zip"), and a conditional vae trains on it
    upload.set_input_files(files=[{"name": "kit.zip", "mimeType": "application/zip", "buffer": make_zip(hits())}])
    page.get_by_role("button", name="上传").click()
    page.wait_for_function("document.querySelector('select[name=data]').value.startsWith('upl-')")
    playwright.expect(error).to_be_empty()
    playwright.expect(page.get_by_label("数据", exact=True).locator("option:checked")).to_have_text("你的: kit.zip")
    page.get_by_label("按类别条件生成").check()
    # the page's own request, with the tiny model's configuration keys added (the page has no field for them)
    sets = {**SOUND_SETS, "conditional": "true"}
    page.route("**/v1/training", lambda route: route.continue_(post_data=json.dumps(
        {**json.loads(route.request.post_data), "sets": sets})))
    page.get_by_label("时间").select_option("custom")
    page.get_by_label("分钟").fill("0.05")
    page.get_by_label("运行名称").fill("mykit")
    page.get_by_role("button", name="开始训练").click()
    job = page.locator("[data-run=mykit]").first
    playwright.expect(job).to_have_attribute("data-status", "done", timeout=240_000)
    shot(page, "train-sounds-zh")
    record = json.loads((home / "runs" / "mykit" / "run.json").read_text())
    assert record["modality"] == "sound" and record["class_names"] == ["low", "noise"]
    assert page.errors == [] and left_the_server(page, url) == []


def test_a_person_uploads_clips_trains_on_them_and_watches_its_clips(studio, browser):
    home, url = studio
    page = new_page(browser, "en-US")
    visit(page, url, "train")
    page.get_by_label("Kind of data").select_option("video")
    playwright.expect(page.get_by_label("Model family").locator("option")).to_have_text(["vae", "diffusion", "simvp"])
    upload = page.get_by_label("Your file")
    zipped = make_zip({f"walk/{i}.gif": v.gif_bytes(clip) for i, clip in enumerate(moving(4))})  # 8 frames each
    upload.set_input_files(files=[{"name": "walks.zip", "mimeType": "application/zip", "buffer": zipped}])
    with page.expect_response(lambda r: "/v1/uploads" in r.url and r.request.method == "POST") as answer:
        page.get_by_role("button", name="Upload").click()
    made = answer.value.json()
    assert made["summary"]["train_sets"] == {"frames": "8", "context": "4"}  # shorter than a clip's default 20
    page.wait_for_function("document.querySelector('select[name=data]').value.startsWith('upl-')")
    sent = []

    def tiny(route):  # the page's own request, with the tiny model's keys added (the page has no field for them)
        body = json.loads(route.request.post_data)
        sent.append(body)
        route.continue_(post_data=json.dumps({**body, "sets": VIDEO_SETS}))

    page.route("**/v1/training", tiny)
    page.get_by_label("Time").select_option("custom")
    page.get_by_label("Minutes").fill("0.05")
    page.get_by_label("Run name").fill("walks")
    page.get_by_role("button", name="Start training").click()
    job = page.locator("[data-run=walks]").first
    playwright.expect(job).to_have_attribute("data-status", "done", timeout=240_000)
    assert "sets" not in sent[0] and sent[0]["data"] == made["id"]  # the clip length came from the server
    record = json.loads((home / "runs" / "walks" / "run.json").read_text())
    assert record["modality"] == "video" and record["clip_shape"] == [8, 24, 24, 1]

    visit(page, url, "generate?model=walks")
    page.get_by_label("How many").fill("2")
    page.get_by_role("button", name="Generate", exact=True).click()
    playwright.expect(page.locator(".clip")).to_have_count(2)
    assert gifs_loaded(page, "main") == [24, 24]
    assert videos_loaded(page, "main") == [pytest.approx(0.8, abs=1e-3)] * 2  # 8 frames at 10 a second
    shot(page, "train-clips")
    assert page.errors == [] and left_the_server(page, url) == []
    page.context.close()
