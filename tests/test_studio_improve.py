"""The feedback loop in the studio, in a real browser (Playwright driving Debian's Chromium, as tests/test_studio.py
does) against a real `aigc serve`: a tiny n-gram's outputs are rated through the API; its card's *Improve from
feedback* panel shows the counts and offers rerank only (sft and dpo say why not); starting it shows the job's
progress, then the new run with its before and after; the new run's card shows them too; its Generate page has the
best-of-N control, and a generation with it is stored with its best_of and what the reranking kept, which History
shows. In Chinese too; no request leaves the server and no page error.

Screenshots go to $AIGC_STUDIO_SHOTS (docs/images/studio-improve.png is a copy of improve.png).
"""

from __future__ import annotations

import httpx
import pytest
from tests.browser import CHROMIUM
from tests.test_server import start_server, stop_server, train_runs
from tests.test_studio import left_the_server, new_page, shot, visit

from aigc.db import Store

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium-headless-shell "
                                                         "fonts-wqy-microhei (the browser is never downloaded)"),
              pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
PROMPTS = ("春", "月")


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """The n-gram `poet` and a server; 8 of its outputs rated through the API (per prompt: 2 good, 2 bad)."""
    home = tmp_path_factory.mktemp("studio-improve")
    train_runs(home, ("poet",))
    proc, url = start_server(home)
    with httpx.Client(base_url=url, timeout=120) as http:
        for i, prompt in enumerate(PROMPTS):
            made = http.post("/v1/completions", json={"model": "poet", "prompt": prompt, "n": 4, "max_tokens": 10,
                                                      "seed": i})
            assert made.status_code == 200, made.text
            for index, score in enumerate((1, 1, -1, -1)):
                rated = http.post(f"/v1/generations/{made.json()['id']}/ratings", json={"score": score, "index": index})
                assert rated.status_code == 200, rated.text
    yield home, url
    stop_server(proc)


def test_a_person_improves_a_model_from_ratings_and_generates_best_of_n(rated, browser):
    home, url = rated
    page = new_page(browser, "en-US")

    # the panel: the counts, sft and rerank offered, dpo not (an n-gram is counted, not trained)
    visit(page, url, "models?model=poet")
    panel = page.locator("article[data-model=poet]").get_by_test_id("improve")
    playwright.expect(panel.get_by_test_id("feedback-counts")).to_have_text(
        "4 liked · 4 disliked · 8 pairs (from 8 ratings and 0 arena votes)")
    playwright.expect(panel.locator("button[data-method=dpo]")).to_be_disabled()
    playwright.expect(panel.locator(".method[data-method=dpo]").get_by_test_id("reason")).to_have_text(
        "--method dpo fine-tunes a gradient-trained family; ngram is counted: use --method sft (its counts) or rerank")
    playwright.expect(panel.locator("button[data-method=sft]")).to_be_enabled()
    rerank = panel.get_by_role("button", name="Pick the best of several (rerank)")
    playwright.expect(rerank).to_be_enabled()
    playwright.expect(panel.locator(".method[data-method=rerank]")).to_contain_text("keeps the one it judges best")

    # start it: a job with a progress bar, then the new run and its before and after
    panel.get_by_label("New run's name (optional)").fill("poet-picky")
    rerank.click()
    job = panel.locator("[data-kind=optimize][data-run=poet-picky]")
    playwright.expect(job.get_by_role("progressbar")).to_have_count(1)
    playwright.expect(job).to_contain_text("Improvement: poet-picky")
    playwright.expect(job).to_have_attribute("data-status", "done", timeout=240_000)
    playwright.expect(job.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    link = job.get_by_role("link", name="New run: poet-picky")
    assert link.get_attribute("href") == "#/models?model=poet-picky"
    table = job.get_by_test_id("before-after")
    liked = table.locator("tr[data-metric=liked]")
    playwright.expect(liked).to_contain_text("liked share")
    cells = liked.locator("td").all_inner_texts()
    assert len(cells) == 2 and all("%" in c and "–" in c for c in cells)  # share and 95% interval, before and after
    playwright.expect(table).to_contain_text("of 200 fresh outputs")
    shot(page, "improve")

    # what the job made: the run's record says the same
    record = (home / "runs" / "poet-picky" / "run.json").read_text(encoding="utf-8")
    assert '"method": "rerank"' in record and '"parent": "poet"' in record

    # the new run's card: its lineage and its before and after
    link.click()
    page.wait_for_function("location.hash === '#/models?model=poet-picky'")
    card = page.locator("article[data-model=poet-picky]")
    playwright.expect(card.get_by_test_id("lineage")).to_have_text(
        "made from poet by rerank, from 4 liked / 4 disliked / 8 pairs")
    playwright.expect(card.get_by_test_id("before-after").locator("tr[data-metric=liked] td")).to_have_text(cells)

    # Generate with it: best of N, its default the run's own 4; a generation with 3 is recorded with it
    visit(page, url, "generate?model=poet-picky")
    best_of = page.get_by_label("Best of N")
    playwright.expect(best_of).to_have_value("4")
    playwright.expect(page.locator("form.generate")).to_contain_text("learned taste")
    best_of.fill("3")
    page.get_by_label("Prompt").fill("春")
    page.get_by_role("button", name="Generate", exact=True).click()
    playwright.expect(page.locator(".rate")).to_have_count(1)
    shot(page, "improve-generate")
    with Store(f"sqlite:///{home / 'aigc.db'}") as db:
        [row] = db.list_generations(run="poet-picky")
    assert row["request"]["best_of"] == 3 and row["source"] == "studio"
    assert row["rerank"]["best_of"] == 3 and row["rerank"]["candidates"] == 3 and len(row["rerank"]["chosen"]) == 1
    assert "".join(page.get_by_test_id("text-output").inner_text().split()) == "".join(row["output"][0].split())

    # History shows what the reranking kept
    visit(page, url, "history")
    page.locator("button.open").first.click()
    playwright.expect(page.get_by_test_id("rerank")).to_have_text(
        f"Best of 3 (3 candidates): the learned taste kept candidate {row['rerank']['chosen'][0] + 1} "
        f"(score {row['rerank']['scores'][0]:.3f}).")

    # a run without a reward model shows no such control
    visit(page, url, "generate?model=poet")
    playwright.expect(page.get_by_label("Temperature")).to_have_count(1)
    playwright.expect(page.get_by_label("Best of N")).to_have_count(0)

    assert page.errors == []
    assert left_the_server(page, url) == []
    page.context.close()


def test_the_improve_panel_and_best_of_n_in_chinese(rated, browser):
    home, url = rated
    if not (home / "runs" / "poet-picky").is_dir():
        pytest.skip("needs the run the first test makes")
    page = new_page(browser, "zh-CN")
    visit(page, url, "models?model=poet")
    panel = page.locator("article[data-model=poet]").get_by_test_id("improve")
    playwright.expect(panel.locator("summary")).to_have_text("用反馈改进（4 条喜欢 · 4 条不喜欢 · 8 对比较）")
    playwright.expect(panel.get_by_role("button", name="多个里挑最好的（rerank）")).to_be_enabled()
    playwright.expect(panel).to_contain_text("从评分中学会你的口味")
    playwright.expect(panel.locator("[data-kind=optimize]")).to_have_count(0)
    visit(page, url, "models?model=poet-picky")
    playwright.expect(page.get_by_test_id("before-after")).to_contain_text("喜欢比例")
    shot(page, "improve-zh")
    visit(page, url, "generate?model=poet-picky")
    playwright.expect(page.get_by_label("每次取 N 选 1")).to_have_value("4")
    playwright.expect(page.locator("form.generate")).to_contain_text("学到的口味")
    assert page.errors == []
    assert left_the_server(page, url) == []
    page.context.close()
