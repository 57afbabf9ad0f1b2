"""Tests for aigc.data.text: cleaning, loaders, errors and the train/val split.

Every test builds its own data under tmp_path; only the last one reads the real Debian
fortune files, and it is skipped where they are not installed.
"""

import hashlib
import json
from pathlib import Path

import pytest

from aigc.data.text import (
    CORPORA,
    EOT,
    FORTUNES_FILES,
    Corpus,
    clean_text,
    drop_shared_lines,
    join_docs,
    load_corpus,
    split_corpus,
)
from aigc.errors import UserError


def write(path: Path, text: str) -> Path:
    """Write UTF-8 text exactly (no newline translation) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def fortunes_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fake /usr/share/games/fortunes that the named corpora read from."""
    directory = tmp_path / "fortunes"
    directory.mkdir()
    monkeypatch.setenv("AIGC_FORTUNES_DIR", str(directory))
    return directory


# --- clean_text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "\x1b[32m《静夜思》\x1b[m",
            "《静夜思》",
        ),  # colour on, reset with no parameter
        ("\x1b[0;1;33mbold\x1b[0m text", "bold text"),  # several parameters
        ("a\x1b[2Kb", "ab"),  # erase-line CSI, final byte not "m"
        ("\x1b(Bplain\x1bM", "plain"),  # charset select and reverse index
        ("\x1b]0;title\x07body", "body"),  # OSC terminated by BEL
        ("\x1b]8;;http://x\x1b\\link", "link"),  # OSC terminated by ST
    ],
)
def test_clean_text_removes_ansi_escapes(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


def test_clean_text_normalises_newlines_and_nfc_only() -> None:
    decomposed = "cafe\u0301"  # "e" + combining acute accent
    assert clean_text(f"a\r\nb\rc\n{decomposed}") == "a\nb\nc\ncaf\u00e9"
    # Whitespace inside the text is left alone.
    assert clean_text("  two  spaces\t\n\n") == "  two  spaces\t\n\n"


# --- files ----------------------------------------------------------------------


def test_fortune_file_splits_into_entries(tmp_path: Path) -> None:
    path = write(
        tmp_path / "poems",
        "\x1b[32mfirst\x1b[m\nline two\n%\nsecond\n%\n  \n%\n%\nthird\n",
    )
    corpus = load_corpus(str(path))
    # One trailing newline stripped per entry; empty or blank entries dropped.
    assert corpus.docs == ("first\nline two", "second", "third")
    assert corpus.source == str(path.resolve())


def test_fortune_detection_needs_a_line_that_is_exactly_percent(tmp_path: Path) -> None:
    text = "100% sure\n %\n%%\nend\n"
    assert load_corpus(str(write(tmp_path / "plain.txt", text))).docs == (text,)


def test_fortune_file_with_crlf_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path / "dos", "one\r\n%\r\ntwo\r\n")
    assert load_corpus(str(path)).docs == ("one", "two")


def test_plain_file_is_one_cleaned_document_and_bom_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "story.md"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\n")
    assert load_corpus(str(path)).docs == ("line one\nline two\n",)


def test_jsonl_reads_the_text_field(tmp_path: Path) -> None:
    lines = [
        json.dumps({"body": "alpha\r\n", "id": 1}),
        "",
        "   ",
        json.dumps({"body": "\x1b[31mbeta\x1b[0m", "id": 2}),
    ]
    path = write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    assert load_corpus(str(path), text_field="body").docs == ("alpha\n", "beta")


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        load_corpus(str(path))


def test_jsonl_missing_field_names_field_line_and_existing_fields(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"title": "t", "body": "b"}\n')
    with pytest.raises(UserError) as info:
        load_corpus(str(path))
    message = str(info.value)
    assert "line 2" in message and "'text'" in message
    assert "title, body" in message


def test_jsonl_field_must_be_a_string(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": 3}\n')
    with pytest.raises(UserError, match=r"line 1 field 'text' is a int, not a string"):
        load_corpus(str(path))


def test_directory_loads_txt_and_jsonl_sorted_by_relative_path(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write(root / "b.txt", "B")
    write(root / "a" / "z.txt", "AZ")
    write(root / "a" / "m.jsonl", '{"text": "AM1"}\n{"text": "AM2"}\n')
    write(root / "c" / "fortunes.txt", "C1\n%\nC2\n")
    write(root / "ignored.md", "not loaded")
    write(root / "notes", "not loaded either")
    assert load_corpus(str(root)).docs == ("AM1", "AM2", "AZ", "B", "C1", "C2")


def test_directory_without_text_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "only.csv", "a,b\n")
    with pytest.raises(UserError, match=r"no \*\.txt or \*\.jsonl files"):
        load_corpus(str(tmp_path))


# --- errors ---------------------------------------------------------------------


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"abc\xe9def")
    with pytest.raises(UserError, match=r"latin1\.txt is not UTF-8.*byte offset 3"):
        load_corpus(str(path))


def test_invalid_utf8_offset_counts_the_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(UserError, match=r"byte offset 5"):
        load_corpus(str(path))


@pytest.mark.parametrize("text", ["", " \n\t\n", "\x1b[32m\x1b[m\n", "%\n  \n%\n"])
def test_empty_corpus_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "empty.txt", text)
    with pytest.raises(UserError, match=r"^empty corpus: "):
        load_corpus(str(path))


def test_missing_path_lists_named_corpora(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError) as info:
        load_corpus(str(missing))
    assert str(info.value) == (
        f"no such file or directory: {missing} "
        "(and it is not a named corpus: tang300, song100, fortunes-zh, fortunes-zh-notang, fortunes)"
    )


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_missing_named_corpus_names_the_package(fortunes_dir: Path, name: str) -> None:
    package = CORPORA[name].package
    with pytest.raises(UserError) as info:
        load_corpus(name)
    message = str(info.value)
    assert message.startswith(f"corpus '{name}' needs the Debian package {package}")
    assert message.endswith(f"sudo apt-get install {package}")


# --- named corpora --------------------------------------------------------------


def test_named_corpora_registry() -> None:
    assert list(CORPORA) == ["tang300", "song100", "fortunes-zh", "fortunes-zh-notang", "fortunes"]
    assert {c.package for c in CORPORA.values()} == {"fortunes-zh", "fortunes"}
    assert all(name == c.name for name, c in CORPORA.items())
    assert {c.language for c in CORPORA.values()} == {"zh", "en"}


@pytest.mark.parametrize(
    ("name", "filename"),
    [("tang300", "tang300"), ("song100", "song100"), ("fortunes-zh", "chinese")],
)
def test_named_fortune_corpus_is_one_document_per_entry(
    fortunes_dir: Path, name: str, filename: str
) -> None:
    write(
        fortunes_dir / filename,
        "\x1b[32m《甲》\x1b[m\n一\n%\n\x1b[32m《乙》\x1b[m\n二\n%\n",
    )
    corpus = load_corpus(name)
    assert corpus.docs == ("《甲》\n一", "《乙》\n二")
    assert corpus.source == name


def test_drop_shared_lines_drops_documents_that_quote_a_verse_line() -> None:
    reference = ["《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"]
    docs = [
        "李白说床前明月光疑是地上霜",  # a line quoted inside running text, no punctuation around it
        "举头望明月。",  # a whole line
        "明月光照床前",  # four characters of a line only: not a quotation
        "作者：李白",  # lines shorter than five characters are common words, not quotations
        "他读了《静夜思》。",  # the title is a line too
        "低头思故里",  # a different line
    ]
    kept, dropped = drop_shared_lines(docs, reference)
    assert dropped == [docs[0], docs[1], docs[4]]
    assert kept == [docs[2], docs[3], docs[5]]


def test_fortunes_zh_notang_drops_what_tang300_shares(fortunes_dir: Path) -> None:
    write(fortunes_dir / "tang300", "《静夜思》\n床前明月光，疑是地上霜。\n%\n")
    write(fortunes_dir / "chinese", "要有礼貌\n%\n古诗：床前明月光\n%\n海内存知己，天涯若比邻。\n%\n")
    assert load_corpus("fortunes-zh-notang").docs == ("要有礼貌", "海内存知己，天涯若比邻。")
    assert len(load_corpus("fortunes-zh").docs) == 3
    (fortunes_dir / "tang300").unlink()
    with pytest.raises(UserError, match="needs the Debian package fortunes-zh"):
        load_corpus("fortunes-zh-notang")


def test_fortunes_concatenates_the_40_files_keeping_percent_lines(
    fortunes_dir: Path,
) -> None:
    assert len(FORTUNES_FILES) == 40
    assert list(FORTUNES_FILES) == sorted(FORTUNES_FILES)
    assert {"art", "zippy", "translate-me"} <= set(FORTUNES_FILES)
    for name in FORTUNES_FILES:
        write(fortunes_dir / name, f"\x1b[1m{name}\x1b[0m one\n%\n{name} two\n%\n")
        # Files that are not part of the package's list must not be read.
        write(fortunes_dir / f"{name}.dat", "binary index")
    write(fortunes_dir / "literature", "from fortunes-min\n%\n")
    corpus = load_corpus("fortunes")
    expected = "".join(f"{n} one\n%\n{n} two\n%\n" for n in FORTUNES_FILES)
    assert corpus.docs == (expected,)
    assert corpus.n_chars == len(expected)


# --- join_docs and sha256 -------------------------------------------------------


def test_join_docs_puts_eot_before_every_document() -> None:
    assert EOT == "<|endoftext|>"
    assert join_docs(["a", "bc"]) == "<|endoftext|>a<|endoftext|>bc"
    assert join_docs([]) == ""


def test_sha256_is_of_the_joined_utf8_text_and_stable(tmp_path: Path) -> None:
    corpus = Corpus(source="x", docs=("床前明月光", "hello\n"))
    joined = "<|endoftext|>床前明月光<|endoftext|>hello\n".encode()
    assert corpus.sha256 == hashlib.sha256(joined).hexdigest()
    assert corpus.n_chars == 11
    # The same text from a file gives the same digest, whatever the source.
    path = write(tmp_path / "p.txt", "\x1b[1m床前明月光\x1b[m\r\n%\r\nhello\r\n\r\n")
    assert load_corpus(str(path)).sha256 == corpus.sha256
    # Document boundaries are part of the identity.
    assert Corpus(source="x", docs=("床前明月光hello\n",)).sha256 != corpus.sha256


# --- split_corpus ---------------------------------------------------------------


def test_split_at_nearest_document_boundary() -> None:
    corpus = Corpus(source="x", docs=("a" * 50, "b" * 30, "c" * 15, "d" * 5))
    # Target 90 chars of train: boundaries at 50, 80, 95 -> 95 is nearest.
    assert split_corpus(corpus, 0.1) == (["a" * 50, "b" * 30, "c" * 15], ["d" * 5])
    # Target 60: 50 is nearer than 80.
    assert split_corpus(corpus, 0.4) == (["a" * 50], ["b" * 30, "c" * 15, "d" * 5])


def test_split_keeps_a_document_on_each_side() -> None:
    corpus = Corpus(source="x", docs=("a" * 10, "b" * 10))
    # Targets 19.8 and 0.2 are nearest the ends (20 and 0), but only boundaries
    # between documents count, so each side keeps one document.
    assert split_corpus(corpus, 0.01) == (["a" * 10], ["b" * 10])
    assert split_corpus(corpus, 0.99) == (["a" * 10], ["b" * 10])


def test_single_document_splits_after_the_next_newline() -> None:
    text = "".join(f"line {i:02d}\n" for i in range(20))  # 20 lines of 8 chars
    corpus = Corpus(source="x", docs=(text,))
    train, val = split_corpus(corpus, 0.1)
    # Cut at int(0.9 * 160) = 144, which is just after line 17's "\n": kept there.
    assert train == [text[:144]] and val == [text[144:]]
    train, val = split_corpus(corpus, 0.12)
    # Cut at int(0.88 * 160) = 140 is mid-line; moved to just after the "\n" at 143.
    assert train == [text[:144]] and val == [text[144:]]
    assert train[0].endswith("\n") and val[0].startswith("line 18")


def test_single_document_without_nearby_newline_is_cut_at_the_target() -> None:
    text = "x" * 5000 + "\nend"
    train, val = split_corpus(Corpus(source="x", docs=(text,)), 0.5)
    assert train == [text[:2502]] and val == [text[2502:]]


def test_split_too_small_is_an_error() -> None:
    # int(0.9 * 1) = 0 leaves train empty.
    with pytest.raises(
        UserError, match=r"too small to split: 1 characters.*--val-data"
    ):
        split_corpus(Corpus(source="x", docs=("a",)), 0.1)
    # Whitespace-only counts as empty: "ab\n" | "\n\n".
    with pytest.raises(UserError, match=r"too small to split"):
        split_corpus(Corpus(source="x", docs=("ab\n\n\n",)), 0.3)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_out_of_range_fraction(fraction: float) -> None:
    with pytest.raises(UserError, match=r"val_fraction"):
        split_corpus(Corpus(source="x", docs=("a", "b")), fraction)


# --- the real Debian files ------------------------------------------------------


@pytest.mark.skipif(
    not Path("/usr/share/games/fortunes/zippy").exists(),
    reason="Debian packages fortunes and fortunes-zh are not installed",
)
def test_real_debian_corpora(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIGC_FORTUNES_DIR", raising=False)
    assert load_corpus("fortunes").n_chars == 2_478_228
    assert len(load_corpus("tang300").docs) > 300
    notang, full = load_corpus("fortunes-zh-notang"), load_corpus("fortunes-zh")
    assert len(full.docs) - len(notang.docs) == 191  # docs/text.md: the documents that quote tang300
    tang_val = "".join(split_corpus(load_corpus("tang300"))[1])
    pretraining = "\n".join(notang.docs)
    assert not any(tang_val[i:i + 8] in pretraining for i in range(len(tang_val) - 7))  # no 8-gram of val left
