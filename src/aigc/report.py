"""`aigc report`: one static HTML page of every run in the project (docs/report.md).

The page is made from what is on disk and in the store; it loads no model and imports no torch:
- each run's record (run.json), its evaluation (eval.json), its training curves (metrics.jsonl) and its pictures
  (image runs: the last grid of samples/ and pictures/*.png; series runs: backtest.png and the last fan chart);
- from the store (aigc.db): each run's generations and their ratings, and the arena's votes, scored by
  aigc.evaluate.arena.leaderboard as GET /v1/arena/leaderboard scores them.

It opens offline: no URL leaves the page; pictures are PNGs inside it (data: URIs), and the curves are drawn by
aigc.evaluate.text.plot_curves_png, as `aigc eval` draws them. Every string read from a file or the store is
escaped. A run that cannot be read in full (a malformed file, no metrics, a parent that is gone) is shown with
what is wrong: nothing about one run stops the page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import sqlalchemy as sa

from aigc import store
from aigc.db import Store, default_url
from aigc.errors import BadRequest, NotFound, UserError
from aigc.evaluate.arena import leaderboard
from aigc.evaluate.text import FONTS, plot_curves_png
from aigc.fsutil import atomic_write_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PICTURE_BYTES = 4 * 2**20  # a picture larger than this is named, not embedded (the page stays light)
EVAL_TEXTS = 6  # of a text run's evaluation samples, shown
STORED_TEXTS = 3  # of its stored generations, shown when it has no evaluation samples
MAX_TEXT_CHARS = 600  # of one sample shown


@dataclass(frozen=True)
class Column:
    """A metric compared side by side in a table of runs on the same data and split."""

    key: str  # in the run's metrics (run.json's, then eval.json's on top) or one the report derives
    label: str
    better: str | None = None  # "lower" or "higher": the best is marked; None: shown, not ranked
    scope: str | None = None  # "family" or "horizon": the best is marked among the runs that share it


COLUMNS = {
    "text": (Column("val_bpc", "val bpc", "lower"), Column("vs_ngram", "bpc − n-gram"),
             Column("distinct_2", "distinct-2"), Column("self_bleu", "self-BLEU"),
             Column("novelty_8gram", "novelty (8-gram)"), Column("verse_form", "verse form")),
    # fid and co. share one feature space per training split; val_loss is each family's own objective (for dcgan
    # the discriminator's), so it is shown, not ranked
    "image": (Column("val_nelbo", "val nelbo", "lower"), Column("val_loss", "val loss"),
              Column("fid", "FID", "lower"), Column("kid", "KID", "lower"), Column("precision", "precision", "higher"),
              Column("recall", "recall", "higher"), Column("memorization_rate", "memorization")),
    # back-test scores compare at one horizon; an rnn's val_loss compares with other rnns
    "series": (Column("mase", "MASE", "lower", "horizon"), Column("mase_seasonal", "seasonal MASE", "lower", "horizon"),
               Column("rmse", "RMSE", "lower", "horizon"), Column("coverage", "coverage"),
               Column("naive_mase", "naive MASE"), Column("horizon", "horizon"),
               Column("val_loss", "val loss", "lower", "family")),
    # notes and tokens of one encoding (the split is the run's); the n-gram's NLL on the same split beside
    "music": (Column("val_nll_per_token", "val NLL/token", "lower"),
              Column("val_nll_per_note", "val NLL/note", "lower"), Column("ngram_nll_per_token", "n-gram NLL/token")),
    # a predictor's errors (the floors are in each run's page) and a clip generator's frames
    "video": (Column("mse", "MSE/frame", "lower"), Column("mae", "MAE/frame", "lower"),
              Column("psnr", "PSNR", "higher"), Column("ssim", "SSIM", "higher"),
              Column("beats_floors", "beats the floors"), Column("val_nelbo", "val nelbo", "lower", "family"),
              Column("frame_fid", "frame FID", "lower"),
              Column("class_consistency", "class consistency", "higher")),
    # spectrograms in the drum classifier's features (the floors are in each run's page)
    "sound": (Column("kid", "KID", "lower"), Column("class_accuracy", "class accuracy", "higher"),
              Column("val_nelbo", "val nelbo", "lower", "family"), Column("val_loss", "val loss")),
}
FLOORED = ("fid", "kid", "precision", "recall", "memorization_rate")  # eval.json has their floors: METRIC_floor
CURVE_LABELS = {"text": "loss (nats/token)"}  # the y axis; image and series losses are each family's own

CSS = """
body { font-family: FONTS; max-width: 72em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #e3f4e1; font-weight: bold; }
pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; font-family: inherit; margin: 0.3em 0; }
img { max-width: 100%; image-rendering: pixelated; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { min-width: 8em; }
img.curves { width: 36em; }
.problem { color: #a40000; }
.muted { color: #777; }
.status-done { color: #176f2c; } .status-failed { color: #a40000; } .status-running { color: #8a5a00; }
section.run { border-top: 1px solid #ccc; margin-top: 1.5em; }
""".replace("FONTS", FONTS)


@dataclass
class Entry:
    """One run as the page shows it; `problems` says what could not be read."""

    name: str
    path: Path
    record: dict = field(default_factory=dict)  # run.json; {} when it cannot be read
    evaluation: dict = field(default_factory=dict)  # eval.json; {} when there is none or it cannot be read
    metrics: dict = field(default_factory=dict)  # run.json's final metrics, eval.json's on top
    problems: list[str] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return anchor("run", self.name)

    @property
    def modality(self) -> str | None:
        return store.modality_of(self.record) if self.record else None

    def get(self, *keys: str):
        """record[keys[0]][keys[1]]...; None where a level is missing or not a mapping."""
        return dig(self.record, *keys)


@dataclass
class StoreView:
    """What the report reads from the store."""

    url: str | None  # None: there is no store yet
    counts: dict[str, dict] = field(default_factory=dict)  # run -> generations, liked, neutral, disliked
    votes: list[dict] = field(default_factory=list)
    boards: dict[str, list[dict]] = field(default_factory=dict)  # modality -> leaderboard rows
    texts: dict[str, list[str]] = field(default_factory=dict)  # run -> the latest stored outputs
    read: bool = False  # False: there is no store, or it could not be read
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------
# the report


def write(out: str | Path | None = None, *, runs: str | Path | None = None, database: str | None = None) -> dict:
    """Write the report of every run in `runs` (default $AIGC_HOME/runs) to `out` (default
    $AIGC_HOME/report.html), atomically. Returns {"report": its path, "runs": how many, "problems": how many runs
    could not be read in full, "votes": arena votes read, "store_problems": what could not be read from the
    store}."""
    root = Path(runs).expanduser().resolve() if runs is not None else store.runs_dir()
    if runs is not None and not root.is_dir():
        raise NotFound(f"--runs {runs}: no such directory")
    path = Path(out).expanduser() if out is not None else store.aigc_home() / "report.html"
    if path.is_dir():
        raise BadRequest(f"--out {path}: is a directory; give the file to write (e.g. {path / 'report.html'})")
    if not path.parent.is_dir():
        raise NotFound(f"--out {path}: no such folder {path.parent}")
    entries = [read_entry(p) for p in (sorted(root.iterdir()) if root.is_dir() else []) if store.is_run(p)]
    view = read_store(database, [e.name for e in entries if e.modality == "text" and not eval_texts(e)])
    atomic_write_text(path, render(entries, view, root))
    return {"report": str(path.resolve()), "runs": len(entries), "problems": sum(bool(e.problems) for e in entries),
            "votes": len(view.votes), "store_problems": view.problems}


def read_entry(run_dir: Path) -> Entry:
    """A run's record, evaluation and metrics, each read on its own: what cannot be read is a problem, not an
    error."""
    entry = Entry(run_dir.name, run_dir.resolve())
    record = read_object(run_dir / store.RECORD, entry.problems)
    if record is not None and not isinstance(dig(record, "family"), str):
        entry.problems.append(f"{store.RECORD} names no family")
    entry.record = record or {}
    if (run_dir / "eval.json").is_file():
        entry.evaluation = read_object(run_dir / "eval.json", entry.problems) or {}
    for source in (entry.record, entry.evaluation):
        found = source.get("metrics")
        entry.metrics.update(found if isinstance(found, dict) else {})
    if entry.modality == "series":  # the back-test's reference and horizon, compared beside the run's scores
        entry.metrics.update(naive_mase=dig(entry.evaluation, "naive", "mase"),
                             horizon=dig(entry.evaluation, "backtest", "horizon"))
    return entry


def read_store(database: str | None, text_runs: list[str]) -> StoreView:
    """Counts, votes and leaderboards from the store, and the latest outputs of `text_runs`. A store that does
    not exist yet is not made; one that cannot be read is a problem shown on the page."""
    url = database or default_url()
    if database is None and not os.environ.get("AIGC_DATABASE_URL") and not (store.aigc_home() / "aigc.db").is_file():
        return StoreView(None)
    view = StoreView("a URL that SQLAlchemy cannot read")
    try:
        view.url = sa.make_url(url).render_as_string(hide_password=True)
        with Store(url) as db:
            view.counts = db.run_counts()
            view.votes = db.list_votes()
            for run in text_runs:
                outputs = [g["output"] for g in db.list_generations(run=run, modality="text", limit=STORED_TEXTS)]
                texts = [t for output in outputs if isinstance(output, list) for t in output if isinstance(t, str)]
                if texts:
                    view.texts[run] = texts[:STORED_TEXTS]
    except (UserError, sa.exc.SQLAlchemyError, OSError) as e:
        view.problems.append(f"the store could not be read: {str(e).strip().splitlines()[0]}")
        return view
    view.read = True
    for modality in sorted({v["modality"] for v in view.votes}):
        try:
            rows = leaderboard([v for v in view.votes if v["modality"] == modality])
        except (UserError, RuntimeError) as e:  # a vote the store should have refused; a fit that did not converge
            view.problems.append(f"the {modality} leaderboard could not be computed: {e}")
            continue
        if rows:  # [] when every vote compares a run with itself
            view.boards[modality] = rows
    return view


# ----------------------------------------------------------------------------------
# the page


def render(entries: list[Entry], view: StoreView, root: Path) -> str:
    by_name = {e.name: e for e in entries}
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>AIGC Studio: {len(entries)} run{'s' if len(entries) != 1 else ''}</h1>",
             f"<p class=\"muted\">{escape(str(root))}, written {escape(written)}; store: "
             f"{escape(view.url) if view.url else 'none yet (no generations recorded)'}</p>"]
    parts += [f"<p class=\"problem\">{escape(p)}</p>" for p in view.problems]
    if not entries:
        parts.append(f"<p>No runs yet in {escape(str(root))}. Start one with <code>aigc train --family gpt --data "
                     f"tang300</code> (or <code>aigc quickstart</code>).</p>")
    else:
        parts += [index_html(entries), lineage_html(entries, by_name), comparison_html(entries)]
    parts.append(arena_html(view, by_name))
    parts += [run_html(e, view, by_name) for e in entries]
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>AIGC Studio report</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def index_html(entries: list[Entry]) -> str:
    rows = []
    for e in entries:
        headline = headline_of(e)
        rows.append(f"<tr><td>{link(e.name)}</td>{cells(e.get('family'), e.modality, e.get('data', 'train', 'source'))}"
                    f"<td>{status_html(e)}</td>"
                    f"{cells(e.metrics.get('steps'), when(e.get('created')), e.get('dtype'))}"
                    f"<td>{escape(headline) if headline else '–'}</td></tr>")
    return ("<section id=\"runs\">\n<h2>Runs</h2>\n<table>\n<tr><th>run</th><th>family</th><th>modality</th>"
            "<th>data</th><th>status</th><th>steps</th><th>created</th><th>dtype</th><th>score</th></tr>\n"
            + "\n".join(rows) + "\n</table>\n</section>")


def lineage_html(entries: list[Entry], by_name: dict[str, Entry]) -> str:
    """Parents and their children as nested lists, a run whose parent is gone, and each sweep's trials."""
    children: dict[str, list[Entry]] = {}
    for e in entries:
        parent, _ = parent_of(e, by_name)
        if parent in by_name and parent != e.name:
            children.setdefault(parent, []).append(e)

    def tree(name: str, seen: set[str]) -> str:
        if name in seen:  # records that name each other as parents: each run is shown once
            return ""
        seen.add(name)
        items = [f"<li>{link(c.name)}: {parent_of(c, by_name)[1]}{tree(c.name, seen)}</li>"
                 for c in children.get(name, [])]
        return f"<ul>{''.join(items)}</ul>" if items else ""

    # the roots: runs with children, or with a parent that is gone, whose parent is not a run here
    seen: set[str] = set()
    items = []
    for e in entries:
        parent, how = parent_of(e, by_name)
        if parent not in by_name and (e.name in children or parent is not None):
            items.append(f"<li>{link(e.name)}{': ' + how if how else ''}{tree(e.name, seen)}</li>")
    sweeps: dict[str, list[Entry]] = {}
    for e in entries:
        if isinstance(e.get("sweep", "study"), str):
            sweeps.setdefault(e.get("sweep", "study"), []).append(e)
    for study, trials in sorted(sweeps.items()):
        trials.sort(key=lambda t: (trial_number(t) is None, trial_number(t) or 0, t.name))
        shown = ", ".join(f"{link(t.name)} (trial {escape(str(t.get('sweep', 'trial')))}"
                          f"{', <b>best</b>' if t.get('sweep', 'best') is True else ''})" for t in trials)
        items.append(f"<li id=\"{anchor('sweep', study)}\">sweep <b>{escape(study)}</b>: {shown}</li>")
    shown = f"<ul>{''.join(items)}</ul>" if items else "<p class=\"muted\">No run was made from another one.</p>"
    return f"<section id=\"lineage\">\n<h2>Lineage</h2>\n{shown}\n</section>"


def parent_of(e: Entry, by_name: dict[str, Entry]) -> tuple[str | None, str]:
    """(the parent's run name or path, or None; how the run was made from it, as HTML)."""
    made = e.get("optimize")
    if isinstance(made, dict) and isinstance(made.get("parent"), str):
        parent = made["parent"]
        fb = made.get("feedback") if isinstance(made.get("feedback"), dict) else {}
        digest = fb.get("sha256")
        counts = " / ".join(f"{escape(str(fb.get(k, '?')))} {k}" for k in ("liked", "disliked", "pairs"))
        how = (f"made by aigc optimize --method {escape(str(made.get('method')))} from "
               f"{link(parent) if parent in by_name else missing(parent)}, on {counts}"
               + (f" (feedback sha256 {escape(str(digest)[:12])}…)" if digest else ""))
        return parent, how
    init_from = e.get("init_from")
    if isinstance(init_from, str) and init_from:
        try:
            path = Path(init_from).expanduser().resolve()
            where = "not a run of this project" if path.exists() else "no longer exists"
        except (OSError, ValueError, RuntimeError):  # a path the system refuses (a NUL byte, a symlink loop)
            path, where = None, "not a path"
        found = next((p for p in by_name.values() if p.path == path), None)
        if found is not None:
            return found.name, f"fine-tuned from {link(found.name)} (--init-from)"
        return init_from, f"fine-tuned from {escape(init_from)} (--init-from; {where})"
    return None, ""


def comparison_html(entries: list[Entry]) -> str:
    """A table per modality, data and validation split: the runs side by side, the best of each ranked metric
    marked, and for text the n-gram baseline."""
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        if e.modality in COLUMNS and isinstance(e.get("family"), str) and e.get("data", "train", "source"):
            groups.setdefault(group_key(e), []).append(e)
    parts = ["<section id=\"compare\">", "<h2>Compared on the same data and split</h2>"]
    if not groups:
        parts.append("<p class=\"muted\">No run can be compared (every record is unreadable).</p>")
    for key, members in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        modality, data, split = key
        columns = COLUMNS[modality]
        baseline = ngram_baseline(members) if modality == "text" else None
        best = {c.key: best_of(members, c) for c in columns if c.better}
        first = columns[0]
        members = sorted(members, key=lambda m: (number(m.metrics.get(first.key)) is None,
                                                 number(m.metrics.get(first.key)) or 0.0, m.name))
        shown = [c for c in columns if any(number(m.metrics.get(c.key)) is not None for m in members)]
        head = "".join(f"<th>{escape(c.label)}</th>" for c in shown)
        rows = []
        for m in members:
            tds = "".join(metric_cell(m, c, m.name in best.get(c.key, set())) for c in shown)
            rows.append(f"<tr><td>{link(m.name)}</td>{cells(m.get('family'))}<td>{status_html(m)}</td>"
                        f"{cells(m.metrics.get('steps'))}{tds}</tr>")
        parts.append(f"<h3>{escape(modality)} on {escape(str(data))}, {escape(split)}</h3>")
        if modality == "text":
            parts.append(f"<p>n-gram baseline: {link(baseline.name)}, val bpc {fmt(baseline.metrics['val_bpc'])}</p>"
                         if baseline is not None else
                         f"<p class=\"muted\">No n-gram baseline on this data and split (<code>aigc train --family "
                         f"ngram --data {escape(str(data))}</code>).</p>")
        parts.append(f"<table>\n<tr><th>run</th><th>family</th><th>status</th><th>steps</th>{head}</tr>\n"
                     + "\n".join(rows) + "\n</table>")
    parts.append("<p class=\"muted\">bpc − n-gram: the run's val bpc minus the baseline's (above 0: worse than the "
                 "n-gram). Lower is better for val bpc, val nelbo, FID, KID, memorization, MASE and RMSE; "
                 "higher for precision and recall. Floors (real images against held-out ones) are in brackets.</p>")
    parts.append("</section>")
    return "\n".join(parts)


def ngram_baseline(members: list[Entry]) -> Entry | None:
    """The n-gram run with the lowest val bpc among runs on one data set and split; each other family's run gets
    `vs_ngram` in its metrics: its val bpc minus the baseline's (above 0: the n-gram is better)."""
    ngrams = [m for m in members if m.get("family") == "ngram" and number(m.metrics.get("val_bpc")) is not None]
    baseline = min(ngrams, key=lambda m: m.metrics["val_bpc"], default=None)
    for m in members:
        bpc = number(m.metrics.get("val_bpc"))
        ranked = baseline is not None and bpc is not None and m.get("family") != "ngram"
        m.metrics["vs_ngram"] = bpc - baseline.metrics["val_bpc"] if ranked else None
    return baseline


def group_key(e: Entry) -> tuple[str, str, str]:
    """(modality, training data, validation split): runs compared side by side share all three. The split is
    told by its sha256 where the record has one (the same documents, whatever the tokenizer)."""
    data = e.get("data", "train", "source")
    val = e.get("data", "val")
    if isinstance(val, dict):
        digest = val.get("sha256")
        split = f"validation: {val.get('source')}" + (f" (sha256 {str(digest)[:8]})" if digest else "")
    else:
        digest = e.get("data", "train", "sha256")
        split = "the whole series" + (f" (sha256 {str(digest)[:8]})" if digest else "")
    return e.modality, str(data), split


def best_of(members: list[Entry], column: Column) -> set[str]:
    """The names of the runs with the best value of `column`, within each of its scopes."""
    scoped: dict = {}
    for m in members:
        value = number(m.metrics.get(column.key))
        if value is not None:
            scope = m.get("family") if column.scope == "family" else m.metrics.get(column.scope)
            scoped.setdefault(scope, []).append((value, m.name))
    sign = 1.0 if column.better == "lower" else -1.0
    best = set()
    for values in scoped.values():
        if len(values) > 1:  # a run alone is the best of nothing
            top = min(sign * v for v, _ in values)
            best |= {name for v, name in values if sign * v == top}
    return best


def metric_cell(m: Entry, column: Column, best: bool) -> str:
    value = number(m.metrics.get(column.key))
    if value is None:
        return "<td class=\"num muted\">–</td>"
    text = fmt(value)
    floor = number(m.metrics.get(f"{column.key}_floor")) if column.key in FLOORED else None
    if floor is not None:
        text += f" [{fmt(floor)}]"
    return f"<td class=\"num{' best' if best else ''}\">{escape(text)}{' (best)' if best else ''}</td>"


def arena_html(view: StoreView, by_name: dict[str, Entry]) -> str:
    parts = ["<section id=\"arena\">", "<h2>Arena</h2>"]
    if not view.boards:
        parts.append("<p class=\"muted\">No arena votes yet (the studio's Arena page, or POST "
                     "/v1/arena/battles).</p>")
    for modality, rows in view.boards.items():
        n_votes = plural(sum(v["modality"] == modality for v in view.votes), "vote")
        body = "\n".join(
            f"<tr>{cells(r['rank'])}<td>{link(r['run']) if r['run'] in by_name else missing(r['run'])}</td>"
            f"<td class=\"num\">{r['rating']:.1f}</td><td class=\"num\">{r['lower']:.1f} – {r['upper']:.1f}</td>"
            f"{cells(r['votes'], r['wins'], r['losses'], r['ties'])}</tr>" for r in rows)
        parts.append(f"<h3>{escape(modality)} ({n_votes})</h3>\n<table>\n<tr><th>rank</th><th>run</th>"
                     f"<th>rating</th><th>95% interval</th><th>votes</th><th>wins</th><th>losses</th><th>ties</th>"
                     f"</tr>\n{body}\n</table>")
    if view.boards:
        parts.append("<p class=\"muted\">Bradley-Terry ratings on the Elo scale (mean 1000), 95% intervals from 1000 "
                     "bootstrap resamples of the votes; runs whose intervals overlap share a rank (docs/store.md).</p>")
    parts.append("</section>")
    return "\n".join(parts)


def run_html(e: Entry, view: StoreView, by_name: dict[str, Entry]) -> str:
    parts = [f"<section class=\"run\" id=\"{e.anchor}\">",
             f"<h2>{escape(e.name)} <span class=\"muted\">{escape(str(e.get('family') or ''))} "
             f"{escape(str(e.modality or ''))}</span></h2>"]
    parts += [f"<p class=\"problem\">{escape(p)}</p>" for p in e.problems]
    _, made = parent_of(e, by_name)
    if made:
        parts.append(f"<p>{made}</p>")
    sweep = e.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("study"), str):
        parts.append(f"<p>trial {escape(str(sweep.get('trial')))} of sweep <a href=\"#{anchor('sweep', sweep['study'])}"
                     f"\">{escape(sweep['study'])}</a>{' (<b>best</b>)' if sweep.get('best') is True else ''}</p>")
    val = e.get("data", "val")
    facts = {"data": e.get("data", "train", "source"),
             "validation": validation_of(val),
             "status": None, "steps": e.metrics.get("steps"), "created": e.get("created"),
             "finished": e.get("finished"), "dtype": e.get("dtype"), "path": str(e.path)}
    rows = "".join(f"<tr><th>{k}</th><td>{status_html(e) if k == 'status' else escape(str(v))}</td></tr>"
                   for k, v in facts.items() if v is not None or k == "status")
    parts.append(f"<table>{rows}</table>")
    parts.append(metrics_html(e))
    parts.append(feedback_html(e, view))
    parts.append(curves_html(e))
    parts.append(gallery_html(e, view))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def metrics_html(e: Entry) -> str:
    found = {}
    for origin, source in (("run.json", e.record), ("eval.json", e.evaluation)):
        metrics = source.get("metrics")
        for key, value in (metrics.items() if isinstance(metrics, dict) else ()):
            if number(value) is not None:
                found[key] = (value, origin)
    if not found:
        status = e.get("status") if isinstance(e.get("status"), str) else None
        why = {"running": "still running (or it stopped without recording why)", "failed": "it failed",
               "interrupted": "it was interrupted"}.get(status, "none recorded")
        return f"<p class=\"muted\">No metrics: {escape(why)}.</p>"
    rows = "".join(f"<tr><td>{escape(str(k))}</td><td class=\"num\">{escape(fmt(v))}</td>"
                   f"<td class=\"muted\">{origin}</td></tr>" for k, (v, origin) in found.items())
    note = "" if e.evaluation else (f"<p class=\"muted\">Not evaluated (<code>aigc eval {escape(e.name)}</code> "
                                    f"scores it).</p>")
    return f"<details><summary>metrics ({len(found)})</summary><table>{rows}</table></details>{note}"


def feedback_html(e: Entry, view: StoreView) -> str:
    """Generations, ratings and arena votes of the run, and its place on its modality's leaderboard."""
    if not view.read:
        return ""
    counts = view.counts.get(e.name, {})
    mine = [v for v in view.votes if e.name in (v["left_run"], v["right_run"]) and v["left_run"] != v["right_run"]]
    text = (f"{plural(counts.get('generations', 0), 'generation')} in the store; ratings: {counts.get('liked', 0)} "
            f"liked, {counts.get('disliked', 0)} disliked, {counts.get('neutral', 0)} neutral; "
            f"{plural(len(mine), 'arena vote')}")
    row = next((r for r in view.boards.get(e.modality, []) if r["run"] == e.name), None)
    if row is not None:
        text += (f"; arena rating {row['rating']:.1f} (95% {row['lower']:.1f} – {row['upper']:.1f}), rank "
                 f"{row['rank']} of {len(view.boards[e.modality])}")
    return f"<p>{escape(text)}.</p>"


def curves_html(e: Entry) -> str:
    path = e.path / "metrics.jsonl"
    if not path.is_file():
        return ""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as err:
        return f"<p class=\"problem\">metrics.jsonl cannot be read: {escape(str(err))}</p>"
    points, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and number(row.get("step")) is not None:
            point = {k: row[k] for k in ("loss", "val_loss") if number(row.get(k)) is not None}
            if point:
                points.append({"step": row["step"], **point})
    note = f"<p class=\"problem\">metrics.jsonl: {plural(bad, 'unreadable line')} skipped</p>" if bad else ""
    png = plot_curves_png(points, CURVE_LABELS.get(e.modality, "loss")) if points else None
    if png is None:
        return note or "<p class=\"muted\">No loss curve logged.</p>"
    shown = img(png, f"loss curves of {e.name}", "curves")
    return f"{note}<figure>{shown}<figcaption>loss curves</figcaption></figure>"


def gallery_html(e: Entry, view: StoreView) -> str:
    """Samples: text from eval.json (else the store); the pictures the run wrote, as embedded PNGs."""
    parts = []
    texts = eval_texts(e)
    where = "evaluation samples (eval.json)"
    if not texts and e.name in view.texts:
        texts, where = view.texts[e.name], "latest generations in the store"
    if texts:
        shown = "".join(f"<pre>{escape(clip(t))}</pre>" for t in texts[:EVAL_TEXTS])
        parts.append(f"<h3>Samples <span class=\"muted\">({where})</span></h3>{shown}")
    pictures = []
    for label, picture in pictures_of(e):
        try:
            size = picture.stat().st_size
            data = picture.read_bytes() if size <= MAX_PICTURE_BYTES else b""
        except OSError as err:
            pictures.append(f"<p class=\"problem\">{escape(label)}: {escape(str(err))}</p>")
            continue
        if size > MAX_PICTURE_BYTES:
            pictures.append(f"<p class=\"muted\">{escape(label)}: {size / 2**20:.1f} MB, not embedded "
                            f"({escape(str(picture))})</p>")
        elif not data.startswith(PNG_SIGNATURE):
            pictures.append(f"<p class=\"problem\">{escape(label)}: not a PNG file</p>")
        else:
            pictures.append(f"<figure>{img(data, label)}<figcaption>{escape(label)}</figcaption></figure>")
    if pictures:
        parts.append("<h3>Pictures</h3>" + "".join(pictures))
    return "\n".join(parts)


def pictures_of(e: Entry) -> list[tuple[str, Path]]:
    """(caption, PNG) of what the run wrote: the last training grid and pictures/ (image runs), the back-test and
    the latest fan chart (series runs)."""
    found = []
    grids = [p for p in (e.path / "samples").glob("step-*.png") if p.stem[5:].isdigit()]
    if grids:
        last = max(grids, key=lambda p: int(p.stem[5:]))
        found.append((f"samples at step {int(last.stem[5:])}", last))
    found += [(f"pictures/{p.name}", p) for p in sorted((e.path / "pictures").glob("*.png"))]
    if (e.path / "backtest.png").is_file():
        found.append(("back-test (aigc eval)", e.path / "backtest.png"))
    fans = sorted((e.path / "generated").glob("*/fan_chart.png"), key=lambda p: p.stat().st_mtime)
    if fans:
        found.append((f"fan chart ({fans[-1].parent.name})", fans[-1]))
    return found


# ----------------------------------------------------------------------------------
# small helpers


def read_object(path: Path, problems: list[str]) -> dict | None:
    """A JSON object from a file; None, with the reason in `problems`, when it cannot be read."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} cannot be read: {e}")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return value


def dig(value, *keys: str):
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def number(value) -> float | None:
    """A finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def fmt(value) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, float) else str(value)


def clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + "…"


def trial_number(e: Entry) -> int | None:
    trial = e.get("sweep", "trial")
    return trial if isinstance(trial, int) and not isinstance(trial, bool) else None


def eval_texts(e: Entry) -> list[str]:
    texts = dig(e.evaluation, "samples", "texts")
    return [t for t in texts if isinstance(t, str)] if isinstance(texts, list) else []


def validation_of(val) -> str | None:
    """The validation split as a run's facts show it: its source and size."""
    if not isinstance(val, dict):
        return None
    size = next((f"{val[k]} {k}" for k in ("docs", "images") if isinstance(val.get(k), int)), None)
    return f"{val.get('source')}" + (f", {size}" if size else "")


def headline_of(e: Entry) -> str | None:
    for metric in store.HEADLINES.get(e.modality, ()):
        if number(e.metrics.get(metric)) is not None:
            return f"{metric} {fmt(e.metrics[metric])}"
    return None


def anchor(kind: str, name: str) -> str:
    """An element id for a run or a sweep: its name where that is a valid run name, else a digest of it."""
    return f"{kind}-{name}" if store.valid_name(name) else f"{kind}-h{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def link(name: str) -> str:
    return f"<a href=\"#{anchor('run', name)}\">{escape(name)}</a>"


def missing(name: str) -> str:
    return f"{escape(name)} <span class=\"problem\">(no longer in this project)</span>"


def status_html(e: Entry) -> str:
    status = e.get("status")
    if not isinstance(status, str):
        return "<span class=\"problem\">unknown</span>"
    return f"<span class=\"status-{escape(status)}\">{escape(status)}</span>"


def cells(*values) -> str:
    return "".join(f"<td>{'–' if v is None else escape(str(v))}</td>" for v in values)


def img(png: bytes, alt: str, kind: str = "picture") -> str:
    return (f"<img class=\"{kind}\" alt=\"{escape(alt)}\" "
            f"src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\">")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def when(value) -> str | None:
    """An ISO time as the index shows it: 2025-06-01 12:00 (UTC where it was recorded so)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    zone = " UTC" if moment.utcoffset() is not None and not moment.utcoffset() else ""
    return moment.strftime("%Y-%m-%d %H:%M") + zone

