"""Text corpora: load a named corpus, a file or a directory; clean it; split it.

A corpus is a tuple of cleaned documents. Downstream code sees them as one token stream
in which every document is preceded by ``EOT`` (see ``join_docs``), so the model learns
where texts begin.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from aigc.errors import UserError

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus that ships as a Debian package, loadable by name."""

    name: str  # key in CORPORA, e.g. "tang300"
    package: str  # Debian package that installs it, e.g. "fortunes-zh"
    description: str  # one line for `aigc data list`
    language: str  # "zh" | "en"
    # a named corpus whose verse lines are removed: every document sharing a line of MIN_SHARED_LINE
    # or more characters with it is dropped (pretraining text that does not leak that corpus)
    without: str | None = None


CORPORA: dict[str, NamedCorpus] = {
    "tang300": NamedCorpus(
        "tang300", "fortunes-zh", "300 Tang poems, one poem per document", "zh"
    ),
    "song100": NamedCorpus(
        "song100", "fortunes-zh", "100 Song ci poems, one poem per document", "zh"
    ),
    "fortunes-zh": NamedCorpus(
        "fortunes-zh", "fortunes-zh", "Chinese fortune cookies, one per document", "zh"
    ),
    "fortunes-zh-notang": NamedCorpus(
        "fortunes-zh-notang", "fortunes-zh",
        "fortunes-zh without the documents that share a verse line with tang300 (for pretraining)", "zh",
        without="tang300",
    ),
    "fortunes": NamedCorpus(
        "fortunes",
        "fortunes",
        "English fortune cookies, 40 files as one document",
        "en",
    ),
}

# Fortune-format files (one document per entry) behind the named corpora that are split.
_ENTRY_FILES: dict[str, str] = {
    "tang300": "tang300",
    "song100": "song100",
    "fortunes-zh": "chinese",
    "fortunes-zh-notang": "chinese",
}

MIN_SHARED_LINE = 5  # characters: a shared clause this long is a quotation, not a common phrase
# a verse line ends at a Chinese punctuation mark, a colon or a line break
_LINE_END = re.compile(r"[，。？！；、：:\s]+")

# The files the Debian package `fortunes` installs, fixed so loading never calls dpkg.
# Other packages (fortunes-min, fortunes-zh) share the directory, so a glob is wrong.
FORTUNES_FILES: tuple[str, ...] = (
    "art", "ascii-art", "computers", "cookie", "debian", "definitions", "disclaimer",
    "drugs", "education", "ethnic", "food", "goedel", "humorists", "kids", "knghtbrd",
    "law", "linux", "linuxcookie", "love", "magic", "medicine", "men-women",
    "miscellaneous", "news", "paradoxum", "people", "perl", "pets", "platitudes",
    "politics", "pratchett", "science", "songs-poems", "sports", "startrek", "tao",
    "translate-me", "wisdom", "work", "zippy",
)  # fmt: skip

# ECMA-48 escapes: CSI ("\x1b[0;1;33m"), OSC ending in BEL or ST, and the short forms
# (intermediates 0x20-0x2F, then a final byte 0x30-0x7E, e.g. "\x1b(B", "\x1bM").
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[ -/]*[0-~]"
)
# A fortune separator: a line that is exactly "%" (with its newline, if any).
_SEPARATOR = re.compile(r"^%$\n?", re.MULTILINE)
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Corpus:
    """Cleaned documents and where they came from."""

    source: str  # a CORPORA name, or the absolute path that was loaded
    docs: tuple[str, ...]  # cleaned documents, none empty or whitespace-only

    @property
    def n_chars(self) -> int:
        """Total characters over all documents (EOT markers not counted)."""
        return sum(len(doc) for doc in self.docs)

    @cached_property
    def sha256(self) -> str:
        """Hex digest of ``join_docs(docs)`` in UTF-8: names the exact training text."""
        return hashlib.sha256(join_docs(self.docs).encode("utf-8")).hexdigest()


def clean_text(text: str) -> str:
    """Remove ANSI escapes, turn \\r\\n and lone \\r into \\n, and NFC-normalise.

    Nothing else changes: whitespace inside the text is kept.
    """
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


def join_docs(docs: Sequence[str]) -> str:
    """The canonical stream text: every document preceded by EOT."""
    return "".join(EOT + doc for doc in docs)


def load_corpus(spec: str, *, text_field: str = "text") -> Corpus:
    """Load a named corpus (a key of CORPORA), a file or a directory.

    A file is JSONL (``*.jsonl``, documents in ``text_field``), fortune format (has a
    line that is exactly "%"), or plain text (one document). A directory loads every
    *.txt and *.jsonl below it, sorted by relative path. ``source`` is the name or the
    absolute path. Documents empty or whitespace-only after cleaning are dropped.
    """
    if spec in CORPORA:
        docs = _load_named(CORPORA[spec])
        source = spec
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(
                f"no such file or directory: {spec} "
                f"(and it is not a named corpus: {', '.join(CORPORA)})"
            )
        path = path.resolve()
        source = str(path)
        if path.is_dir():
            docs = _load_dir(path, text_field)
        else:
            docs = _load_file(path, text_field)
    if not docs:
        raise UserError(f"empty corpus: {source} has no non-whitespace text")
    return Corpus(source=source, docs=tuple(docs))


def split_corpus(
    corpus: Corpus, val_fraction: float = 0.1
) -> tuple[list[str], list[str]]:
    """Split into (train, val) documents; val is about the last ``val_fraction``.

    Several documents split at the document boundary nearest the target; a single
    document is cut at the target, moved to just after a newline within 1000 characters.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(
            f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}"
        )
    docs = list(corpus.docs)
    target = (1.0 - val_fraction) * corpus.n_chars
    if len(docs) >= 2:
        # Boundary k puts docs[:k] in train; k in 1..n-1 gives both sides a document.
        cumulative, best_k, best_gap = 0, 1, float("inf")
        for k in range(1, len(docs)):
            cumulative += len(docs[k - 1])
            if abs(cumulative - target) < best_gap:
                best_k, best_gap = k, abs(cumulative - target)
        train, val = docs[:best_k], docs[best_k:]
    else:
        doc = docs[0] if docs else ""
        cut = int(target)
        # Search from one back so a cut already just after "\n" stays where it is.
        newline = doc.find("\n", max(cut - 1, 0), cut + 1000)
        if newline != -1:
            cut = newline + 1
        train, val = [doc[:cut]], [doc[cut:]]
    if not any(d.strip() for d in train) or not any(d.strip() for d in val):
        raise UserError(
            f"corpus too small to split: {corpus.n_chars} characters; give --val-data"
        )
    return train, val


def verse_lines(doc: str) -> list[str]:
    """The clauses of a text between punctuation marks and line breaks that have at least
    MIN_SHARED_LINE characters ("床前明月光", "疑是地上霜", "《静夜思》")."""
    return [line for line in _LINE_END.split(doc) if len(line) >= MIN_SHARED_LINE]


def drop_shared_lines(docs: Sequence[str], reference: Sequence[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped): a document is dropped when any verse line of `reference` occurs in it verbatim
    (anywhere, not only as a whole line of its own)."""
    by_head: dict[str, set[str]] = {}  # every line starts with its first MIN_SHARED_LINE characters
    for doc in reference:
        for line in verse_lines(doc):
            by_head.setdefault(line[:MIN_SHARED_LINE], set()).add(line)
    kept, dropped = [], []
    for doc in docs:
        shares = any(doc.startswith(line, i)
                     for i in range(len(doc) - MIN_SHARED_LINE + 1)
                     for line in by_head.get(doc[i:i + MIN_SHARED_LINE], ()))
        (dropped if shares else kept).append(doc)
    return kept, dropped


def _fortunes_dir() -> Path:
    # Tests (and unusual installs) point this elsewhere.
    return Path(os.environ.get("AIGC_FORTUNES_DIR") or "/usr/share/games/fortunes")


def corpus_installed(name: str) -> bool:
    """Whether the files of a named corpus are on this machine (without reading them)."""
    corpus = CORPORA[name]
    names = (_ENTRY_FILES[corpus.name],) if corpus.name in _ENTRY_FILES else FORTUNES_FILES
    return all((_fortunes_dir() / n).is_file() for n in names)


def _load_named(corpus: NamedCorpus) -> list[str]:
    directory = _fortunes_dir()
    names = (
        (_ENTRY_FILES[corpus.name],) if corpus.name in _ENTRY_FILES else FORTUNES_FILES
    )
    for name in names:
        if not (directory / name).is_file():
            raise UserError(
                f"corpus '{corpus.name}' needs the Debian package {corpus.package} "
                f"({directory / name} is missing): "
                f"sudo apt-get install {corpus.package}"
            )
    if corpus.name in _ENTRY_FILES:
        docs = _split_fortunes(_read_text(directory / names[0]))
        if corpus.without:
            docs = drop_shared_lines(docs, _load_named(CORPORA[corpus.without]))[0]
        return docs
    # One document, "%" lines kept: the model learns the fortune format itself.
    whole = "".join(_read_text(directory / name) for name in names)
    return [whole] if whole.strip() else []


def _load_dir(root: Path, text_field: str) -> list[str]:
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in (".txt", ".jsonl")
    ]
    if not files:
        raise UserError(f"no *.txt or *.jsonl files under directory {root} (nor .mid/.midi files for a music run)")
    docs: list[str] = []
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        docs.extend(_load_file(path, text_field))
    return docs


def _load_file(path: Path, text_field: str) -> list[str]:
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path, text_field)
    text = _read_text(path)
    if _SEPARATOR.search(text):
        return _split_fortunes(text)
    return [text] if text.strip() else []


def _load_jsonl(path: Path, text_field: str) -> list[str]:
    docs: list[str] = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}: line {number} is not valid JSON: {err.msg}"
            ) from None
        if not isinstance(obj, dict):
            raise UserError(
                f"{path}: line {number} is a JSON {type(obj).__name__}, not an object"
            )
        if text_field not in obj:
            raise UserError(
                f"{path}: line {number} has no field '{text_field}' "
                f"(fields: {', '.join(obj) or 'none'}); pick one with --set text_field=NAME"
            )
        value = obj[text_field]
        if not isinstance(value, str):
            raise UserError(
                f"{path}: line {number} field '{text_field}' is a "
                f"{type(value).__name__}, not a string"
            )
        value = clean_text(value)
        if value.strip():
            docs.append(value)
    return docs


def _split_fortunes(text: str) -> list[str]:
    # Entries lie between "%" lines; each loses only the newline before the "%".
    entries = (entry.removesuffix("\n") for entry in _SEPARATOR.split(text))
    return [entry for entry in entries if entry.strip()]


def _read_text(path: Path) -> str:
    """Read a file as UTF-8 (BOM removed) and clean it; errors name the byte offset."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    offset = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[offset:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8: invalid byte 0x{data[offset + err.start]:02x} "
            f"at byte offset {offset + err.start}; convert it, "
            "e.g. iconv -f LATIN1 -t UTF-8"
        ) from None
    return clean_text(text)
