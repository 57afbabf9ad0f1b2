"""The studio's Sweeps page and the lineage on the Models page, in a real browser (Playwright driving Debian's
Chromium, as tests/test_studio.py does) against a real `aigc serve` over the sweep of tests/test_sweep_view.py
(five complete trials whose runs are tiny gpt runs, a pruned and a failed one) and a run that `aigc optimize` made
from the best trial's run.

The page lists the sweep; the sweep's page has the trials table with the best one marked, the importance bars,
and a parallel-coordinates SVG with one coloured polyline per complete trial; a trial's run links to that run's
card, which names the sweep; the optimized run's card links to its parent. In Chinese too; no request leaves the
server and no page error. The empty Sweeps page (no sweep yet) is checked in tests/test_studio.py.

The screenshot goes to $AIGC_STUDIO_SHOTS/sweeps.png (docs/images/studio-sweeps.png is a copy).
"""

from __future__ import annotations

import pytest
from tests.browser import CHROMIUM
from tests.test_server import start_server, stop_server
from tests.test_studio import left_the_server, new_page, shot, visit
from tests.test_sweep_view import STUDY, build_sweep

from aigc import service
from aigc.db import Store

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium-headless-shell "
                                                         "fonts-wqy-microhei (the browser is never downloaded)"),
              pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The sweep, an sft run made from its best trial's run (2 liked, 1 disliked outputs), and a server."""
    home = tmp_path_factory.mktemp("studio-sweeps")
    study = build_sweep(home)
    parent = study.best_trial.user_attrs["run"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGC_HOME", str(home))
        with Store(f"sqlite:///{home / 'aigc.db'}") as db:
            made = service.generate(parent, {"prompt": "春", "n": 3, "max_new_tokens": 8}, seed=1)
            [gen] = service.record(made, db, source="api", request={"prompt": "春"})
            for index, score in ((0, 1), (1, 1), (2, -1)):
                db.add_rating(gen, score=score, index=index)
            service.optimize(parent, "sft", name="poet-sft", max_steps=2, db=db)
    proc, url = start_server(home)
    yield home, url, study
    stop_server(proc)


def test_the_sweeps_page_shows_trials_importances_and_parallel_coordinates(swept, browser):
    home, url, study = swept
    page = new_page(browser, "en-US")
    best = study.best_trial
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]

    visit(page, url, "sweeps")
    row = page.locator(f"[data-testid=sweeps] tr[data-sweep={STUDY}]")
    playwright.expect(row).to_contain_text(f"{len(complete)} complete · 1 pruned · 1 failed")
    playwright.expect(row).to_contain_text(best.user_attrs["run"])
    row.get_by_role("link", name=STUDY, exact=True).click()
    page.wait_for_load_state("networkidle")

    # the trials: one row each, the best marked
    trials = page.get_by_test_id("trials").locator("tbody tr")
    playwright.expect(trials).to_have_count(len(study.trials))
    marked = page.locator("[data-testid=trials] tr.best")
    playwright.expect(marked).to_have_count(1)
    playwright.expect(marked).to_have_attribute("data-trial", str(best.number))
    playwright.expect(marked).to_contain_text("★ best")
    playwright.expect(page.locator("[data-testid=trials] tr[data-state=fail]")).to_contain_text(
        "the training ended failed")
    playwright.expect(page.get_by_test_id("sweep-best")).to_contain_text(f"#{best.number}")

    # the importance bars: one per parameter, the longest the most important
    bars = page.locator("[data-testid=importance] rect.bar")
    playwright.expect(bars).to_have_count(4)
    widths = [float(w) for w in bars.evaluate_all("els => els.map(e => e.getAttribute('width'))")]
    assert widths == sorted(widths, reverse=True)

    # parallel coordinates: an axis per parameter and the objective; a polyline per complete trial, coloured
    chart = page.locator("[data-testid=parallel] svg.parallel")
    playwright.expect(chart.locator("polyline.complete")).to_have_count(len(complete))
    playwright.expect(chart.locator("polyline.best")).to_have_count(1)
    assert chart.locator("polyline.best").get_attribute("data-trial") == str(best.number)
    playwright.expect(chart.locator("polyline.pruned")).to_have_count(1)
    assert chart.locator("polyline.pruned").get_attribute("stroke") == "#a8a8a8"  # greyed
    colours = set(chart.locator("polyline.complete").evaluate_all("els => els.map(e => e.getAttribute('stroke'))"))
    assert len(colours) == len(complete)  # coloured by value: five values, five colours
    names = chart.locator("text.axis-name").all_text_contents()
    assert sorted(names) == sorted(["lr (log)", "n_layer", "n_embd", "resid_pdrop", "val_bpc"])
    assert names[-1] == "val_bpc"
    playwright.expect(page.get_by_test_id("sweep-command")).to_contain_text("aigc sweep --family gpt --data")
    shot(page, "sweeps")

    # a trial's run links to its card, which names its sweep and links back
    page.locator(f"[data-testid=trials] tr[data-trial='{best.number}']").get_by_role(
        "link", name=best.user_attrs["run"]).click()
    page.wait_for_function(f"location.hash === '#/models?model={best.user_attrs['run']}'")
    card = page.locator(f"article[data-model='{best.user_attrs['run']}']")
    playwright.expect(page.locator("article.card")).to_have_count(1)
    playwright.expect(card.get_by_test_id("lineage")).to_have_text(f"trial {best.number} of sweep {STUDY} (best)")
    card.get_by_role("link", name=STUDY, exact=True).click()
    page.wait_for_function(f"location.hash === '#/sweeps?name={STUDY}'")
    playwright.expect(page.locator("[data-testid=trials] tr.best")).to_have_count(1)

    # the optimized run's card: its parent (a link to the parent's card), the method and the feedback
    visit(page, url, "models")
    lineage = page.locator("article[data-model=poet-sft]").get_by_test_id("lineage")
    parent = best.user_attrs["run"]
    playwright.expect(lineage).to_have_text(f"made from {parent} by sft, from 2 liked / 1 disliked / 2 pairs")
    assert lineage.locator("a.parent").get_attribute("href") == f"#/models?model={parent}"
    shot(page, "models-lineage")

    assert page.errors == []
    assert left_the_server(page, url) == []
    page.context.close()


def test_the_sweeps_page_in_chinese(swept, browser):
    home, url, study = swept
    page = new_page(browser, "zh-CN")
    visit(page, url, "sweeps")
    assert page.locator("#nav a").all_inner_texts() == ["模型", "生成", "历史", "竞技场", "训练", "扫参", "比较"]
    playwright.expect(page.locator("h1")).to_have_text("扫参")
    playwright.expect(page.get_by_test_id("sweeps").locator("thead")).to_contain_text("目标（越低越好）")
    visit(page, url, f"sweeps?name={STUDY}")
    playwright.expect(page.locator("main h2", has_text="参数重要性")).to_have_count(1)
    playwright.expect(page.locator("[data-testid=trials] tr.best")).to_contain_text("★ 最佳")
    playwright.expect(page.locator("[data-testid=trials] tr[data-state=pruned]")).to_contain_text("剪枝")
    shot(page, "sweeps-zh")
    visit(page, url, "models")
    playwright.expect(page.locator("article[data-model=poet-sft]").get_by_test_id("lineage")).to_contain_text(
        "经 sft 得到，用了 2 条喜欢 / 1 条不喜欢 / 2 对比较")
    assert page.errors == []
    assert left_the_server(page, url) == []
    page.context.close()
