"""`aigc report`: one static page of every run. A small project of real runs (n-grams, tiny gpts, a tiny VAE, an AR
fit; one gpt and the AR evaluated), stored generations, ratings and arena votes, and the runs a report must survive:
a failed one, a running one, unreadable files, a parent that is gone, names and data that carry HTML."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from tests.conftest import TINY_SETS, make_poems
from typer.testing import CliRunner

from aigc import report, service, store
from aigc.cli import app
from aigc.db import Store
from aigc.evaluate.arena import leaderboard

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"

EVIL_DIR = "<img src=x onerror=alert(1)>"  # a run directory made by hand: no name rule applies to it
EVIL_DATA = "<script>alert(2)</script>.txt"
EVIL_SAMPLE = "<script>alert(3)</script>春江"
VAE = {"z_dim": "4", "base_channels": "8", "batch_size": "16", "eval_interval": "5", "warmup_steps": "2",
       "dtype": "fp32", "log_interval": "5"}
SIMVP = {"frames": "8", "context": "4", "size": "24", "val_clips": "12", "batch_size": "4", "warmup_steps": "2",
         "eval_interval": "2", "eval_batches": "1", "dtype": "fp32", "compile": "false", "hid_s": "8", "hid_t": "16",
         "n_t": "1"}
FEEDBACK = {"run": "gpt-a", "rating_ids": ["rating-1"], "vote_ids": ["vote-1"], "sha256": "ab12cd34" * 8,
            "liked": 12, "disliked": 3, "pairs": 5}


def edit_record(name: str, **changes) -> None:
    run_dir = store.runs_dir() / name
    store.write_record(run_dir, {**store.read_run(run_dir), **changes})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project's AIGC_HOME, its runs, its store."""
    home = tmp_path_factory.mktemp("report")
    old = os.environ.get("AIGC_HOME")
    os.environ["AIGC_HOME"] = str(home)
    try:
        poems = home / "poems.txt"
        poems.write_text("\n%\n".join(make_poems()) + "\n", encoding="utf-8")
        service.train("ngram", str(poems), name="ngram-base", sets={"order": "2"})
        for name, lr in (("gpt-a", "3e-3"), ("gpt-b", "1e-3"), ("gpt-a-sft", "1e-3")):
            service.train("gpt", str(poems), name=name, max_steps=4, sets={**TINY_SETS["gpt"], "lr": lr})
        service.evaluate("gpt-a")
        service.train("vae", "digits", name="vae-digits", max_steps=5, sets=VAE)
        service.train("ar", "sunspots", name="ar-sun", sets={"order": "2"})
        service.train("simvp", "moving-digits", name="simvp-digits", max_steps=2, sets=SIMVP)
        service.evaluate("ar-sun")
        for trial, order in enumerate(("1", "3")):
            service.train("ngram", str(poems), name=f"sweep-ngram-poems-t00{trial}", sets={"order": order})

        # Lineage made by features built elsewhere (aigc optimize, aigc sweep), written as they write it
        runs = store.runs_dir()
        edit_record("gpt-a-sft", init_from=str(runs / "gpt-a"),
                    optimize={"parent": "gpt-a", "parent_path": str(runs / "gpt-a"), "method": "sft",
                              "feedback": FEEDBACK})
        for trial in (0, 1):
            edit_record(f"sweep-ngram-poems-t00{trial}",
                        sweep={"study": "sweep-ngram-poems", "trial": trial, "best": trial == 1})
        shutil.copytree(runs / "gpt-b", runs / "orphan-dpo")
        edit_record("orphan-dpo", optimize={"parent": "deleted-run", "parent_path": str(runs / "deleted-run"),
                                            "method": "dpo", "feedback": {**FEEDBACK, "liked": 0, "pairs": 7}})

        # Runs that did not end well, and files that cannot be read
        shutil.copytree(runs / "gpt-b", runs / "gpt-failed")
        record = store.read_run(runs / "gpt-failed")
        del record["metrics"]
        store.write_record(runs / "gpt-failed", {**record, "status": "failed"})
        (runs / "gpt-failed" / "eval.json").write_text("[1, 2", encoding="utf-8")
        with open(runs / "gpt-failed" / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write("{not json\n")
        shutil.copytree(runs / "gpt-b", runs / "gpt-running")
        record = store.read_run(runs / "gpt-running")
        del record["metrics"]
        record["data"]["train"]["source"] = EVIL_DATA
        store.write_record(runs / "gpt-running", {**record, "status": "running", "init_from": str(home / "gone")})
        edit_record("gpt-failed", init_from=str(runs / "gpt-a"))  # as --init-from a run of the project records it
        (runs / "broken").mkdir()
        (runs / "broken" / "run.json").write_text("{\"family\": ", encoding="utf-8")
        (runs / EVIL_DIR).mkdir()
        (runs / EVIL_DIR / "run.json").write_text(json.dumps({"status": "done"}), encoding="utf-8")

        # The store: generations, ratings, arena votes (one image run is gone)
        with Store() as db:
            def text(run: str, output: str) -> str:
                return db.add_generation(run=run, modality="text", request={"prompt": "春"}, output=[output])

            a1, a2, b1 = text("gpt-a", "春江花月夜"), text("gpt-a", "春风"), text("gpt-b", EVIL_SAMPLE)
            n1 = text("ngram-base", "春山")
            for gen, score in ((a1, 1), (a2, 1), (a2, -1), (b1, 0)):
                db.add_rating(gen, score=score)
            for left, right, winner in ((a1, b1, "left"), (a2, b1, "left"), (b1, n1, "right"), (a1, n1, "tie"),
                                        (n1, b1, "left")):
                db.add_vote(left, right, winner, prompt="春")
            x = db.add_generation(run="vae-digits", modality="image", request={"class": 3})
            y = db.add_generation(run="vae-gone", modality="image", request={"class": 3})
            db.add_vote(x, y, "left")
        yield home
    finally:
        if old is None:
            os.environ.pop("AIGC_HOME")
        else:
            os.environ["AIGC_HOME"] = old


@pytest.fixture
def home(project, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(project))
    return project


@pytest.fixture
def page(home, tmp_path) -> Page:
    result = report.write(tmp_path / "report.html")
    assert result == {"report": str(tmp_path / "report.html"), "runs": 14, "problems": 3, "votes": 6,
                      "store_problems": []}
    return Page(Path(result["report"]).read_text(encoding="utf-8"))


class Page(HTMLParser):
    """The parsed page: every tag with its attributes, the text of each element with an id, and the tables as
    rows of (text, class, the hrefs in it) cells."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.html, self.tags, self.texts, self.tables = html, [], {}, []
        self._open: list[list] = []  # [id, text parts] of the elements with an id around this point
        self._cell = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = {"text": "", "class": attrs.get("class") or "", "hrefs": []}
            self.tables[-1][-1].append(self._cell)
        elif tag == "a" and self._cell is not None:
            self._cell["hrefs"].append(attrs.get("href"))
        if "id" in attrs:
            self._open.append([attrs["id"], tag, []])
            self.texts[attrs["id"]] = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        if self._open and self._open[-1][1] == tag:
            element_id, _, parts = self._open.pop()
            self.texts[element_id] = "".join(parts)
            if self._open:
                self._open[-1][2].extend(parts)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._open:
            self._open[-1][2].append(data)

    def run(self, name: str) -> str:
        """The text of a run's section."""
        return self.texts[report.anchor("run", name)]

    def rows_with(self, header: str) -> list[list[dict]]:
        """The rows (header first) of every table whose first row has a cell `header`."""
        return [table for table in self.tables if any(c["text"] == header for c in table[0])]


def row_of(table: list[list[dict]], run: str) -> dict[str, dict]:
    """A run's row of a table, by column header."""
    header = [c["text"] for c in table[0]]
    row = next(r for r in table[1:] if r[0]["text"] == run)
    return dict(zip(header, row, strict=True))


def metrics(name: str) -> dict:
    return store.read_run(store.runs_dir() / name)["metrics"]


# ----------------------------------------------------------------------------------


def test_every_run_has_a_section_and_a_row_with_its_facts(page, home):
    index = page.rows_with("dtype")[0]
    names = sorted(p.name for p in store.runs_dir().iterdir())
    assert sorted(r[0]["text"] for r in index[1:]) == names
    for name in names:
        assert report.anchor("run", name) in page.texts, name
    ngram = row_of(index, "ngram-base")
    assert [ngram[k]["text"] for k in ("family", "modality", "data", "status", "steps")] == \
        ["ngram", "text", str(home / "poems.txt"), "done", "0"]
    gpt = row_of(index, "gpt-a")
    created = store.read_run(store.runs_dir() / "gpt-a")["created"]  # 2025-06-01T12:00:00+00:00
    assert gpt["dtype"]["text"] == "fp32" and gpt["created"]["text"] == f"{created[:10]} {created[11:16]} UTC"
    evaluated = json.loads((store.runs_dir() / "gpt-a" / "eval.json").read_text())["metrics"]["val_bpc"]
    assert gpt["score"]["text"] == f"val_bpc {report.fmt(evaluated)}"


def test_runs_on_the_same_data_and_split_are_compared_and_the_best_is_marked(page):
    text = next(t for t in page.rows_with("val bpc") if any(r[0]["text"] == "gpt-a" for r in t[1:]))
    runs = {r[0]["text"] for r in text[1:]}
    assert runs == {"ngram-base", "gpt-a", "gpt-b", "gpt-a-sft", "sweep-ngram-poems-t000", "sweep-ngram-poems-t001",
                    "orphan-dpo", "gpt-failed"}  # gpt-running's data is another file, and the rest are not text
    bpc = {name: metrics(name)["val_bpc"] for name in runs - {"gpt-failed"}}
    for name, value in bpc.items():
        assert row_of(text, name)["val bpc"]["text"].startswith(report.fmt(value))
    best = min(bpc, key=bpc.get)
    assert sorted(bpc.values())[0] < sorted(bpc.values())[1]  # one best
    assert [r[0]["text"] for r in text[1:] if "best" in r[4]["class"]] == [best]
    assert row_of(text, best)["val bpc"]["text"].endswith("(best)")
    assert row_of(text, "gpt-failed")["val bpc"]["text"] == "–"
    # the n-gram baseline is the best n-gram on the same data; each neural run is measured against it
    ngrams = {n: v for n, v in bpc.items() if n.startswith(("ngram", "sweep"))}
    assert len(set(ngrams.values())) == 3
    baseline = min(ngrams, key=ngrams.get)
    assert f"n-gram baseline: {baseline}, val bpc {report.fmt(ngrams[baseline])}" in page.texts["compare"]
    assert row_of(text, "gpt-b")["bpc − n-gram"]["text"] == report.fmt(bpc["gpt-b"] - ngrams[baseline])
    assert row_of(text, "ngram-base")["bpc − n-gram"]["text"] == "–"
    image = page.rows_with("val nelbo")[0]
    assert row_of(image, "vae-digits")["val nelbo"]["text"] == report.fmt(metrics("vae-digits")["val_nelbo"])
    video = page.rows_with("SSIM")[0]  # a predictor's errors, from its run.json
    for column, key in (("MSE/frame", "mse"), ("SSIM", "ssim"), ("PSNR", "psnr")):
        assert row_of(video, "simvp-digits")[column]["text"].startswith(report.fmt(metrics("simvp-digits")[key]))
    series = page.rows_with("MASE")[0]
    evaluation = json.loads((store.runs_dir() / "ar-sun" / "eval.json").read_text())
    assert row_of(series, "ar-sun")["MASE"]["text"] == report.fmt(evaluation["metrics"]["mase"])
    assert row_of(series, "ar-sun")["naive MASE"]["text"] == report.fmt(evaluation["naive"]["mase"])


def test_the_arena_leaderboard_is_the_stores(page, home):
    with Store() as db:
        for modality in ("text", "image"):
            expected = leaderboard(db.list_votes(modality=modality))
            table = next(t for t in page.rows_with("95% interval")
                         if {r[1]["text"].split(" ")[0] for r in t[1:]} == {r["run"] for r in expected})
            assert [[c["text"] for c in r] for r in table[1:]] == [
                [str(r["rank"]), r["run"] + (" (no longer in this project)" if r["run"] == "vae-gone" else ""),
                 f"{r['rating']:.1f}", f"{r['lower']:.1f} – {r['upper']:.1f}", str(r["votes"]), str(r["wins"]),
                 str(r["losses"]), str(r["ties"])] for r in expected]
        gpt_a = next(r for r in leaderboard(db.list_votes(modality="text")) if r["run"] == "gpt-a")
    assert (f"arena rating {gpt_a['rating']:.1f} (95% {gpt_a['lower']:.1f} – {gpt_a['upper']:.1f}), rank "
            f"{gpt_a['rank']} of 3") in page.run("gpt-a")


def test_lineage_links_point_to_sections_that_exist(page, home):
    ids = {attrs["id"] for _, attrs in page.tags if "id" in attrs}
    links = [attrs["href"] for tag, attrs in page.tags if tag == "a"]
    assert links and all(href.startswith("#") and href[1:] in ids for href in links)
    sft = page.run("gpt-a-sft")
    assert ("made by aigc optimize --method sft from gpt-a, on 12 liked / 3 disliked / 5 pairs (feedback sha256 "
            "ab12cd34ab12…)") in sft
    lineage = page.texts["lineage"]
    assert "gpt-a-sft: made by aigc optimize --method sft from gpt-a" in lineage
    assert "gpt-failed: fine-tuned from gpt-a (--init-from)" in lineage
    assert f"gpt-running: fine-tuned from {home / 'gone'} (--init-from; no longer exists)" in lineage
    assert "orphan-dpo: made by aigc optimize --method dpo from deleted-run (no longer in this project)" in lineage
    assert "deleted-run (no longer in this project), on 0 liked / 3 disliked / 7 pairs" in page.run("orphan-dpo")
    sweep = page.texts[report.anchor("sweep", "sweep-ngram-poems")]
    assert sweep == ("sweep sweep-ngram-poems: sweep-ngram-poems-t000 (trial 0), sweep-ngram-poems-t001 "
                     "(trial 1, best)")
    assert "trial 1 of sweep sweep-ngram-poems (best)" in page.run("sweep-ngram-poems-t001")
    assert "trial 0 of sweep sweep-ngram-poems" in page.run("sweep-ngram-poems-t000")
    assert "(best)" not in page.run("sweep-ngram-poems-t000").split("sweep-ngram-poems")[1]


def test_nothing_on_the_page_leaves_it(page):
    assert "http://" not in page.html and "https://" not in page.html and "url(" not in page.html
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object", "embed", "base", "form")]
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            if name == "href":
                assert value.startswith("#")
            if name == "src":
                assert tag == "img" and value.startswith("data:image/png;base64,")
    assert ("meta", {"charset": "utf-8"}) in page.tags
    assert '"Noto Sans CJK SC"' in page.html and "WenQuanYi Micro Hei" in page.html


def test_pictures_and_curves_are_embedded_pngs(page):
    images = {attrs["alt"]: attrs["src"] for tag, attrs in page.tags if tag == "img"}
    for alt, src in images.items():
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        with Image.open(io.BytesIO(data)) as picture:
            assert picture.format == "PNG", alt
            picture.verify()
    assert {"loss curves of gpt-a", "loss curves of vae-digits", "samples at step 5", "pictures/reconstructions.png",
            "back-test (aigc eval)"} <= set(images)
    assert "loss curves of ngram-base" not in images and "loss curves of ar-sun" not in images  # fitted, not trained


def test_samples_come_from_eval_json_else_from_the_store(page):
    texts = json.loads((store.runs_dir() / "gpt-a" / "eval.json").read_text())["samples"]["texts"]
    assert len(texts) == 16 and "evaluation samples (eval.json)" in page.run("gpt-a")
    assert all(t.strip() in page.run("gpt-a") for t in texts[:report.EVAL_TEXTS])
    assert "latest generations in the store" in page.run("gpt-b") and EVIL_SAMPLE in page.run("gpt-b")
    assert "2 generations in the store; ratings: 2 liked, 1 disliked, 0 neutral; 3 arena votes" in page.run("gpt-a")


def test_every_string_from_a_file_or_the_store_is_escaped(page):
    assert "<script" not in page.html.lower() and "onerror=alert" not in page.html.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(2)&lt;/script&gt;.txt" in page.html  # the data path of gpt-running
    assert "&lt;script&gt;alert(3)&lt;/script&gt;春江" in page.html  # a stored sample
    assert EVIL_DIR in page.run(EVIL_DIR) and "&lt;img src=x onerror=alert(1)&gt;" in page.html


def test_what_cannot_be_read_is_said_and_the_rest_is_shown(page):
    broken = page.run("broken")
    assert "run.json cannot be read" in broken and "unknown" in broken
    failed = page.run("gpt-failed")
    assert "failed" in failed and "eval.json cannot be read" in failed and "No metrics: it failed." in failed
    assert "metrics.jsonl: 1 unreadable line skipped" in failed
    assert "No metrics: still running" in page.run("gpt-running")
    assert "Not evaluated (aigc eval gpt-b scores it)" in page.run("gpt-b")
    assert "run.json names no family" in page.run(EVIL_DIR)


@pytest.mark.parametrize("database", ["sqlite://", "not a url"])
def test_a_store_that_cannot_be_read_is_said_and_the_runs_are_still_shown(home, tmp_path, database):
    result = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "page.html"), "--database", database])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: the store could not be read: ")
    page = Page((tmp_path / "page.html").read_text(encoding="utf-8"))
    assert "the store could not be read" in page.html and "No arena votes yet" in page.texts["arena"]
    assert "generations in the store" not in page.run("gpt-a") and "val bpc" in page.texts["compare"]


def test_an_empty_project_says_there_are_no_runs_and_makes_no_store(aigc_home):
    result = CliRunner().invoke(app, ["report", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out == {"report": str(aigc_home / "report.html"), "runs": 0, "problems": 0, "votes": 0,
                   "store_problems": []}
    html = (aigc_home / "report.html").read_text(encoding="utf-8")
    assert "No runs yet in" in html and "No arena votes yet" in html
    assert not (aigc_home / "aigc.db").exists()


def test_the_cli_prints_the_path_last_and_one_json_object(home, tmp_path):
    out = tmp_path / "page.html"
    result = CliRunner().invoke(app, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out) and out.is_file()
    assert "3 of 14 runs could not be read in full" in result.stderr
    result = CliRunner().invoke(app, ["report", "--out", str(out), "--json"])
    assert json.loads(result.stdout) == {"report": str(out), "runs": 14, "problems": 3, "votes": 6,
                                         "store_problems": []}
    for args, message in ((["--out", str(tmp_path / "no" / "page.html")], "no such folder"),
                          (["--out", str(tmp_path)], "is a directory"), (["--runs", str(tmp_path / "no")],
                                                                          "no such directory")):
        result = CliRunner().invoke(app, ["report", *args])
        assert result.exit_code == 1 and result.stderr.startswith("error: ") and message in result.stderr


def test_aigc_report_imports_no_torch(home):
    script = ("import sys\nfrom aigc.cli import app\n"
              "try:\n    app(['report'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"AIGC_HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-2:] == [str(home / "report.html"), "[]"]


def test_a_browser_shows_every_picture_and_no_request_leaves_the_page(page, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    chromium = next((p for p in ("/usr/bin/chromium-headless-shell", "/usr/bin/chromium", shutil.which("chromium"))
                     if p and Path(p).is_file()), None)
    if chromium is None:
        pytest.skip("no Chromium: apt-get install chromium-headless-shell (the browser is never downloaded)")
    url = (tmp_path / "report.html").as_uri()
    requests = []

    def only_the_page(route):
        requests.append(route.request.url)
        if route.request.url == url:
            route.continue_()
        else:
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            context = browser.new_context()
            context.route("**/*", only_the_page)
            tab = context.new_page()
            tab.goto(url)
            shown = tab.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth > 0)")
            title = tab.title()
        finally:
            browser.close()
    assert title == "AIGC Studio report" and requests == [url]
    assert len(shown) == len([t for t, _ in page.tags if t == "img"]) > 5 and all(shown)
