"""Oracle tests for the text sample metrics and the HTML report.

Expected values are computed by hand (the arithmetic is in the comments) or by a brute-force
reference, never by calling the code under test a second way.
"""

import base64
import math
import random
import re

import pytest

from aigc.evaluate.text import (
    NO_CURVE_MESSAGE,
    distinct_n,
    longest_copy,
    novelty,
    self_bleu,
    text_sample_metrics,
    verse_form,
    verse_lines,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- verse form -----------------------------------------------------------------------------


def test_verse_lines_are_the_clauses_a_punctuation_mark_ends():
    poem = "《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n未完"
    assert verse_lines([poem]) == ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡"]  # no title, author, cut-off
    assert verse_lines(["一二三、四五六七！问君能有几多愁？"]) == ["四五六七", "问君能有几多愁"]


def test_verse_form_hand_computed():
    assert verse_form(["床前明月光，疑是地上霜。"]) == 1.0
    assert verse_form(["春眠，不觉晓处处闻啼鸟。", "夜来风雨声，花落知多少。"]) == 0.5  # 2, 9, 5, 5 characters
    assert verse_form(["两个黄鹂鸣翠柳，一行白鹭上青天。"]) == 1.0
    assert math.isnan(verse_form(["no verse here", "《题》"]))
    with pytest.raises(TypeError):
        verse_form("床前明月光，")


# --- distinct-n ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "n", "expected"),
    [
        (["aab"], 1, 2 / 3),  # a a b -> {a, b}
        (["abab"], 2, 2 / 3),  # ab ba ab -> {ab, ba}
        (["ab", "ab"], 2, 1 / 2),  # pooled: ab ab -> {ab}
        (["ab", "ba"], 2, 1.0),  # ab, ba; no "bb" across the sample boundary
        (["明月明月", "月光"], 1, 3 / 6),  # 明 月 明 月 月 光 -> {明, 月, 光}
        (["明月明月", "月光"], 2, 3 / 4),  # 明月 月明 明月 月光 -> 3 distinct
        (["床前明月光"], 5, 1.0),
        (["a", "a"], 2, 0.0),  # no bigram at all (a pooled string "aa" would have one)
        ([], 1, 0.0),
    ],
)
def test_distinct_n_hand_computed(samples, n, expected):
    assert distinct_n(samples, n) == pytest.approx(expected)


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_distinct_n_rejects_bad_order(n):
    with pytest.raises(ValueError, match="positive integer"):
        distinct_n(["abc"], n)


def test_a_single_string_is_not_a_list_of_samples():
    with pytest.raises(TypeError, match="sequence of strings"):
        distinct_n("abc", 1)


# --- self-BLEU -------------------------------------------------------------------------------


def test_self_bleu_identical_samples_is_one():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)
    assert self_bleu(["床前明月光", "床前明月光"]) == pytest.approx(1.0)


def test_self_bleu_is_at_most_one():
    assert self_bleu(["the cat sat on the mat"] * 5) <= 1.0


def test_self_bleu_disjoint_alphabets_is_zero():
    assert self_bleu(["abcabc", "xyzxyz", "床前明月光"]) == pytest.approx(0.0, abs=1e-12)


def test_self_bleu_hand_computed_clipping_brevity_and_smoothing():
    # Samples S1 = "aaab", S2 = "ab", S3 = "aabb"; each against the other two, max_n = 4.
    # Clipped precision p_n = sum_g min(count_hyp(g), max_ref count_ref(g)) / sum_g count_hyp(g).
    #
    # S1 "aaab" vs {"ab", "aabb"}:
    #   1-grams a x3, b x1; max ref counts a 2, b 2      -> (2 + 1) / 4 = 3/4
    #   2-grams aa x2, ab x1; max ref counts aa 1, ab 1  -> (1 + 1) / 3 = 2/3
    #   3-grams aaa, aab; refs have aab                  -> 1/2
    #   4-gram  aaab; no match -> exp smoothing, 1st zero order: 1 / (2 * 1) = 1/2
    #   closest reference length 4 = hypothesis length   -> BP = 1
    #   BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4) = (1/8) ** (1/4)
    # S2 "ab" vs {"aaab", "aabb"}: only 1- and 2-grams exist (effective order 2)
    #   p1 = 2/2, p2 = 1/1; closest ref length 4 > 2  -> BP = exp(1 - 4/2) = exp(-1)
    # S3 "aabb" vs {"aaab", "ab"}:
    #   1-grams a x2, b x2; max ref counts a 3, b 1      -> (2 + 1) / 4 = 3/4
    #   2-grams aa, ab, bb; refs have aa 1, ab 1         -> 2/3
    #   3-grams aab, abb; refs have aab                  -> 1/2
    #   4-gram  aabb; no match                           -> 1/2
    #   BP = 1, BLEU = (1/8) ** (1/4)
    expected = (2 * (1 / 8) ** 0.25 + math.exp(-1)) / 3
    assert self_bleu(["aaab", "ab", "aabb"]) == pytest.approx(expected, rel=1e-12)


def test_self_bleu_max_n_two_hand_computed():
    # "abcde" vs "abxde": p1 = 4/5 (a b d e), p2 = 2/4 (ab, de), same length -> BP = 1.
    # Symmetric, so self-BLEU = sqrt(4/5 * 2/4).
    assert self_bleu(["abcde", "abxde"], max_n=2) == pytest.approx(math.sqrt(0.4), rel=1e-12)


def test_self_bleu_ignores_whitespace_as_documented():
    # sacrebleu's character tokenizer drops whitespace: both texts are a b c d.
    assert self_bleu(["ab cd", "abcd"]) == pytest.approx(1.0)


def test_self_bleu_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        self_bleu(["only one"])


# --- novelty ---------------------------------------------------------------------------------

TRAIN = "the quick brown fox jumps over the lazy dog"


def test_novelty_copied_and_new_8grams():
    assert novelty(["quick br"], TRAIN) == 0.0  # its only 8-gram is in TRAIN
    assert novelty(["zzzzzzzz"], TRAIN) == 1.0
    # "quick brX": "quick br" copied, "uick brX" new -> 1/2
    assert novelty(["quick brX"], TRAIN) == pytest.approx(1 / 2)
    # pooled with multiplicity: copied, copied, new -> 1/3
    assert novelty(["quick br", "quick br", "zzzzzzzz"], TRAIN) == pytest.approx(1 / 3)


def test_novelty_chinese_and_custom_order():
    train = "床前明月光疑是地上霜"
    # 3-grams of "明月光X": 明月光 (copied), 月光X (new)
    assert novelty(["明月光X"], train, n=3) == pytest.approx(1 / 2)


def test_novelty_nan_without_ngrams():
    assert math.isnan(novelty(["short", ""], TRAIN, n=8))


def test_novelty_rejects_empty_training_text():
    with pytest.raises(ValueError, match="train_text is empty"):
        novelty(["abcdefgh"], "")


# --- longest copy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "train", "expected"),
    [
        (["xxcdefyy"], "abcdefgh", 4),  # "cdef"
        (["abcdefgh"], "abcdefgh", 8),  # the whole sample
        (["xyz"], "abc", 0),
        (["xbcx", "zzcdefz"], "abcdefg", 4),  # max over samples: "cdef" in the second
        (["abab", ""], "aab bab", 3),  # "bab" (a later, longer match after a short one)
        (["月光疑是", "白日"], "床前明月光疑是地上霜", 4),
        ([], "abc", 0),
    ],
)
def test_longest_copy_crafted(samples, train, expected):
    assert longest_copy(samples, train) == expected


def _longest_copy_brute_force(samples, train):
    # O(n^3): every substring of every sample.
    best = 0
    for s in samples:
        for i in range(len(s)):
            for j in range(i + 1, len(s) + 1):
                if s[i:j] in train:
                    best = max(best, j - i)
    return best


def test_longest_copy_matches_brute_force_on_random_strings():
    rng = random.Random(1234)
    for _ in range(200):
        # A small alphabet so matches of many lengths occur.
        alphabet = "ab" if rng.random() < 0.5 else "abc"
        train = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        samples = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
            for _ in range(rng.randint(1, 3))
        ]
        assert longest_copy(samples, train) == _longest_copy_brute_force(samples, train)


# --- all metrics -----------------------------------------------------------------------------


def test_text_sample_metrics_keys_and_values():
    samples = ["quick brown", "lazy dogs!"]
    metrics = text_sample_metrics(samples, TRAIN)
    assert set(metrics) == {
        "distinct_1",
        "distinct_2",
        "distinct_3",
        "self_bleu",
        "novelty_8gram",
        "longest_copy",
    }
    assert metrics["distinct_1"] == distinct_n(samples, 1)
    assert metrics["longest_copy"] == len("quick brown")
    assert metrics["self_bleu"] == self_bleu(samples)
    # 8-grams: "quick brown" gives 4 copied; "lazy dogs!" gives 3, of which "lazy dog" is copied
    assert metrics["novelty_8gram"] == pytest.approx(2 / 7)


# --- report ----------------------------------------------------------------------------------

CURVES = [
    {"step": 0, "loss": 4.2},
    {"step": 100, "loss": 3.1, "val_loss": 3.3},
    {"step": 200, "loss": 2.5},
    {"step": 200, "val_loss": 2.8},
]


def _report(tmp_path, curves, samples=("床前明月光", "<script>alert(1)</script>")):
    path = write_report(
        tmp_path / "report.html",
        title="char-gpt on 唐诗",
        metrics={"distinct_1": 0.123456789, "self_bleu": 0.5, "longest_copy": 12},
        samples=list(samples),
        curves=curves,
        settings={"family": "gpt", "lr": 3e-4},
    )
    return path, path.read_text(encoding="utf-8")


def test_report_with_curves(tmp_path):
    path, page = _report(tmp_path, CURVES)
    assert path == tmp_path / "report.html"
    assert '<meta charset="utf-8">' in page
    assert "char-gpt on 唐诗" in page
    # metrics to 4 significant digits, ints as they are, settings shown
    assert "distinct_1" in page and "0.1235" in page and "0.123456789" not in page
    assert ">12<" in page
    assert "family" in page and "gpt" in page and "0.0003" in page
    # samples: Chinese as is, markup escaped
    assert "<pre>床前明月光</pre>" in page
    assert '"Noto Sans CJK SC"' in page  # a font stack that has Chinese glyphs, before the generic fallback
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page
    # self-contained: no external resources
    assert "http://" not in page and "https://" not in page
    # the curve picture is embedded and is the same PNG as the file next to the report
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match is not None
    embedded = base64.b64decode(match.group(1))
    assert embedded.startswith(PNG_MAGIC)
    png_path = tmp_path / "report_curves.png"
    assert png_path.read_bytes() == embedded
    assert NO_CURVE_MESSAGE not in page
    # atomic writes leave no temp files behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report_curves.png"]


def test_report_with_only_validation_loss_still_plots(tmp_path):
    _, page = _report(tmp_path, [{"step": 10, "val_loss": 2.0}, {"step": 20, "val_loss": None}])
    assert "data:image/png;base64," in page
    assert (tmp_path / "report_curves.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("curves", [[], [{"step": 0}, {"step": 1, "accuracy": 0.5}]])
def test_report_without_curves_says_so(tmp_path, curves):
    _, page = _report(tmp_path, curves)
    assert NO_CURVE_MESSAGE in page
    assert "data:image/png" not in page
    assert not (tmp_path / "report_curves.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_report_rejects_curve_point_without_step(tmp_path):
    with pytest.raises(ValueError, match="no 'step'"):
        _report(tmp_path, [{"loss": 1.0}])


def test_report_rejects_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(
            tmp_path / "missing" / "report.html",
            title="t",
            metrics={},
            samples=[],
            curves=[],
            settings={},
        )
