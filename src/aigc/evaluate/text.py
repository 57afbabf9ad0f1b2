"""Sample-quality metrics for generated text, and the run's HTML report.

All n-grams are over characters (Unicode code points), not tokens: the corpora are Chinese poems
and English text, and the families tokenize differently, so characters are the only unit that
compares across runs.

Metrics:
    distinct-n     diversity within the samples (Li et al. 2016, "A Diversity-Promoting
                   Objective Function for Neural Conversation Models").
    self-BLEU      similarity of each sample to the others (Zhu et al. 2018, "Texygen").
    novelty        share of sample n-grams absent from the training text (copying detector).
    longest copy   longest substring of a sample found verbatim in the training text.
    verse form     share of the verse lines (clauses ended by ，。？！；) that have 5 or 7 characters,
                   the line lengths of Tang regulated verse; measured on the training text too.

matplotlib and sacrebleu are imported inside the functions that need them, so importing this
module (e.g. from the CLI) stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

from aigc.fsutil import atomic_write_bytes

NO_CURVE_MESSAGE = "no training curve (this family is not trained by gradient descent)"


def _char_ngrams(text: str, n: int) -> list[str]:
    """All character n-grams of one text, in order, with repeats; [] when len(text) < n."""
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def _check_order(n: int, name: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


def _check_samples(samples: Sequence[str]) -> None:
    # A bare str is a Sequence[str] of characters; treating it as many one-character samples
    # would give plausible-looking nonsense, so refuse it.
    if isinstance(samples, str):
        raise TypeError("samples must be a sequence of strings, not a single string")
    for i, sample in enumerate(samples):
        if not isinstance(sample, str):
            raise TypeError(f"samples[{i}] is {type(sample).__name__}, expected str")


def _check_train_text(train_text: str) -> None:
    if not isinstance(train_text, str):
        raise TypeError(f"train_text is {type(train_text).__name__}, expected str")
    # Against an empty corpus everything is "novel"; that almost always means the wrong file
    # was read, so say so instead of reporting a perfect score.
    if not train_text:
        raise ValueError("train_text is empty; pass the training corpus the model was fitted on")


def distinct_n(samples: Sequence[str], n: int) -> float:
    """Distinct-n: distinct character n-grams / all character n-grams, pooled over the samples.

    n-grams never cross a sample boundary. Returns 0.0 when no sample is at least n long.
    """
    _check_order(n)
    _check_samples(samples)
    grams = [gram for sample in samples for gram in _char_ngrams(sample, n)]
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def self_bleu(samples: Sequence[str], max_n: int = 4) -> float:
    """Self-BLEU on a 0..1 scale: mean BLEU of each sample against all the other samples.

    Each sample is the hypothesis and every other sample is a reference (clipping by the
    maximum count over references, brevity penalty from the closest reference length), as in
    Texygen. BLEU is sacrebleu's sentence BLEU with its character tokenizer, n-grams 1..max_n:

    * smoothing: "exp", i.e. Chen & Cherry (2014) method 3 / NIST mteval: the k-th order with no
      match gets precision 1 / (2**k * total) instead of 0, so one missing 4-gram does not zero
      a short sample. A sample sharing no character at all with the others still scores 0.
    * effective order: a sample shorter than max_n characters is scored on the orders it has
      (geometric mean over n = 1..len), rather than scoring 0.
    * whitespace is not a token (sacrebleu's "char" tokenizer drops it, as chrF does), so
      "ab cd" and "abcd" are the same hypothesis. An empty sample scores 0.

    Higher means less diverse: identical samples give 1.0. Needs at least two samples. Cost
    grows with len(samples)**2 (every sample is a reference for every other one): about 4 s
    for 100 samples of 200 characters, so pass a subset when there are many more.
    """
    _check_order(max_n, "max_n")
    _check_samples(samples)
    if len(samples) < 2:
        raise ValueError(f"self-BLEU needs at least 2 samples to compare, got {len(samples)}")
    from sacrebleu.metrics import BLEU

    bleu = BLEU(
        tokenize="char",
        smooth_method="exp",
        effective_order=True,
        max_ngram_order=max_n,
    )
    scores = []
    for i, hypothesis in enumerate(samples):
        references = [*samples[:i], *samples[i + 1 :]]
        # sacrebleu reports BLEU in percent (0..100). exp(mean(log p)) of identical texts can
        # round to 100.00000000000001, so cap at 1 to keep the documented range.
        score = bleu.sentence_score(hypothesis, references).score / 100.0
        scores.append(min(score, 1.0))
    return sum(scores) / len(scores)


def novelty(samples: Sequence[str], train_text: str, n: int = 8) -> float:
    """Share of the samples' character n-grams (pooled, with repeats) absent from train_text.

    1.0 means no n-gram was copied from the training text; nan when no sample is n long.
    """
    _check_order(n)
    _check_samples(samples)
    _check_train_text(train_text)
    grams = [gram for sample in samples for gram in _char_ngrams(sample, n)]
    if not grams:
        return math.nan
    # Substring search instead of a set of every training n-gram: the set for a 2.5 M character
    # corpus costs hundreds of MB, while a search is a few ms. Each distinct gram is looked up
    # once because samples from a low-temperature model repeat themselves.
    seen: dict[str, bool] = {}
    n_new = 0
    for gram in grams:
        if gram not in seen:
            seen[gram] = gram in train_text
        n_new += not seen[gram]
    return n_new / len(grams)


def _longest_copy_one(sample: str, train_text: str) -> int:
    # Two pointers: if sample[i:j] occurs in train_text, so does sample[i+1:j], so the longest
    # match starting at i+1 ends no earlier than j. The end pointer only moves forward, which
    # bounds the substring searches at 2 * len(sample).
    best = 0
    j = 0
    for i in range(len(sample)):
        j = max(j, i)
        while j < len(sample) and sample[i : j + 1] in train_text:
            j += 1
        best = max(best, j - i)
        if j == len(sample):
            break  # no later start can give a longer match
    return best


def longest_copy(samples: Sequence[str], train_text: str) -> int:
    """Length of the longest substring of any sample that occurs verbatim in train_text."""
    _check_samples(samples)
    _check_train_text(train_text)
    return max((_longest_copy_one(s, train_text) for s in samples), default=0)


_VERSE_LINE = re.compile(r"([^，。？！；、：\s]+)[，。？！；]")  # a clause and the mark that ends it
VERSE_LENGTHS = (5, 7)  # characters per line of Tang regulated verse (五言, 七言)


def verse_lines(texts: Sequence[str]) -> list[str]:
    """The clauses of the texts that a Chinese punctuation mark ends (，。？！；), without the mark; a title
    or an author line (no such mark) and a cut-off last line are not verse lines."""
    _check_samples(texts)
    return [m.group(1) for text in texts for m in _VERSE_LINE.finditer(text)]


def verse_form(texts: Sequence[str]) -> float:
    """Share of the verse lines with 5 or 7 characters (nan when there is no verse line)."""
    lines = verse_lines(texts)
    if not lines:
        return math.nan
    return sum(len(line) in VERSE_LENGTHS for line in lines) / len(lines)


def text_sample_metrics(samples: Sequence[str], train_text: str) -> dict[str, float]:
    """All text sample metrics for one run. Needs at least two samples (for self-BLEU)."""
    return {
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
        "distinct_3": distinct_n(samples, 3),
        "self_bleu": self_bleu(samples),
        "novelty_8gram": novelty(samples, train_text, 8),
        "longest_copy": longest_copy(samples, train_text),
    }


def _curve_series(curves: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, sorted by step; points without the key are skipped."""
    points = []
    for i, point in enumerate(curves):
        if "step" not in point:
            raise ValueError(f"curves[{i}] has no 'step': {point!r}")
        # A missing key or a JSON null both mean "not logged at this step".
        if point.get(key) is not None:
            points.append((float(point["step"]), float(point[key])))
    points.sort()
    return [s for s, _ in points], [v for _, v in points]


def plot_curves_png(curves: Sequence[dict], ylabel: str = "loss (nats/token)") -> bytes | None:
    """PNG bytes of the loss curves (training "loss" and "val_loss" by "step", the records of metrics.jsonl), or
    None when there is no point to plot. Also the curves of the project's report (aigc.report)."""
    series = {
        "training loss": _curve_series(curves, "loss"),
        "validation loss": _curve_series(curves, "val_loss"),
    }
    if not any(steps for steps, _ in series.values()):
        return None

    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure registry
    # to leak, and it works on headless machines.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (steps, values) in series.items():
        if steps:
            # Markers, so a curve with a single point (one validation pass) is still visible.
            ax.plot(steps, values, label=label, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: dict, header: tuple[str, str]) -> str:
    lines = [
        "<table>",
        f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>",
    ]
    for key, value in rows.items():
        lines.append(
            f"<tr><td>{html.escape(str(key))}</td>"
            f"<td>{html.escape(_format_value(value))}</td></tr>"
        )
    lines.append("</table>")
    return "\n".join(lines)


# common CJK fonts first, so a page of Chinese samples shows them wherever one is installed
FONTS = ('"Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "PingFang SC", "Hiragino Sans GB", '
         '"Microsoft YaHei", sans-serif')
_CSS = """
body { font-family: FONTS; max-width: 60em; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
pre { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; font-family: inherit; }
img { max-width: 100%; }
""".replace("FONTS", FONTS)


def write_report(
    path: Path,
    *,
    title: str,
    metrics: dict,
    samples: Sequence[str],
    curves: Sequence[dict],
    settings: dict,
) -> Path:
    """Write a self-contained HTML report of one run and return its path.

    The page holds the title, the metrics (floats to 4 significant digits), the settings, the
    loss curves as an embedded PNG and the samples. The PNG is also written next to the report
    as ``<stem>_curves.png``; when ``curves`` has no loss point, the page says so and no PNG is
    written. ``curves`` are the records of metrics.jsonl: each has "step" and any of "loss",
    "val_loss" (a null value counts as absent). Both files are written atomically.
    """
    path = Path(path)
    _check_samples(samples)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"report directory {path.parent} does not exist")

    png = plot_curves_png(curves)
    if png is None:
        curve_html = f"<p>{html.escape(NO_CURVE_MESSAGE)}</p>"
    else:
        atomic_write_bytes(path.with_name(f"{path.stem}_curves.png"), png)
        data_uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        curve_html = f'<img alt="loss curves" src="{data_uri}">'

    sample_html = "\n".join(f"<pre>{html.escape(s)}</pre>" for s in samples)
    page = f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Metrics</h2>
{_table(metrics, ("metric", "value"))}
<h2>Settings</h2>
{_table(settings, ("setting", "value"))}
<h2>Loss curves</h2>
{curve_html}
<h2>Samples ({len(samples)})</h2>
{sample_html}
</body>
</html>
"""
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
