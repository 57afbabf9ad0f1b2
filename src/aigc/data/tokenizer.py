"""Tokenizers for the text families: character-level (default) and byte-level BPE.

Both are `tokenizers.Tokenizer` objects, so a run directory's `tokenizer.json` loads unchanged with
`transformers.AutoTokenizer`. Every vocabulary has the end-of-text token (id 0): documents are
separated by it, an empty prompt starts from it and generation stops at it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from aigc.data.text import EOT
from aigc.errors import UserError
from aigc.fsutil import write_json

UNK = "<unk>"
KINDS = ("char", "bpe")


class TextTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the project's special tokens."""

    def __init__(self, tokenizer: Tokenizer, kind: str, eot_token: str = EOT):
        self.tokenizer = tokenizer
        self.kind = kind  # "char", "bpe", or "hf" (the tokenizer of a Hugging Face folder)
        self.eot_id = tokenizer.token_to_id(eot_token)
        self.unk_id = tokenizer.token_to_id(UNK)  # None for byte-level BPE: every byte is in its vocabulary
        if self.eot_id is None:
            raise UserError(f"tokenizer has no end-of-text token {eot_token!r}")
        # The char tokenizer encodes a corpus with one dict lookup per character, ~20x faster than
        # the Rust pre-tokenizer on a 2.5 M character corpus; a test checks that both agree.
        self._char_ids = tokenizer.get_vocab() if kind == "char" else None
        self._pieces: list[str] | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if self._char_ids is not None:
            return [self._char_ids.get(c, self.unk_id) for c in text]
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_text(self, ids: Sequence[int]) -> str:
        """Decode generated ids for display: special tokens dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def pieces(self) -> list[str] | None:
        """A char tokenizer's text of each token id as `decode_text` shows it: decoding concatenates them, so a
        stream's text grows by one piece a token instead of decoding the whole sequence again (16 streams decoding
        100 tokens each, every step, held a batch's decoding thread for a tenth of its Python time). None for
        the other kinds, whose tokens' text depends on their neighbours."""
        if self._char_ids is None:
            return None
        if self._pieces is None:
            self._pieces = [self.decode_text([i]) for i in range(self.vocab_size)]
        return self._pieces

    def encode_docs(self, docs: Iterable[str]) -> np.ndarray:
        """The token stream EOT doc1 EOT doc2 ... as int32 (every document is preceded by EOT)."""
        out: list[int] = []
        for doc in docs:
            out.append(self.eot_id)
            out.extend(self.encode(doc))
        return np.asarray(out, dtype=np.int32)

    def save(self, directory: Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` so that AutoTokenizer loads it.

        `tokenizer.json` alone is loaded as a GPT2Tokenizer by transformers and mangles a char
        vocabulary, so the config names the fast tokenizer class and the special tokens.
        """
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
        if self.unk_id is not None:
            special["unk_token"] = UNK
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "aigc_tokenizer": self.kind,
            **special,
        }
        write_json(directory / "tokenizer_config.json", config)
        write_json(directory / "special_tokens_map.json", special)

    @classmethod
    def load(cls, directory: Path) -> TextTokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"no tokenizer.json in {directory}")
        config_path = directory / "tokenizer_config.json"
        kind = "bpe"
        if config_path.is_file():
            kind = json.loads(config_path.read_text(encoding="utf-8")).get("aigc_tokenizer", "bpe")
        return cls(Tokenizer.from_file(str(path)), kind)


def _chars(docs: Iterable[str], min_count: int) -> set[str]:
    if min_count <= 1:
        return set().union(*(set(doc) for doc in docs))
    counts = Counter()
    for doc in docs:
        counts.update(doc)
    return {c for c, n in counts.items() if n >= min_count}


def train_char(docs: Iterable[str], min_count: int = 1) -> TextTokenizer:
    """Character vocabulary from the training split: EOT (id 0), `<unk>` (id 1), then the characters seen at
    least `min_count` times, sorted.

    `<unk>` stands for any other character (first seen in validation or a prompt, or rarer than
    `min_count`); its probability is charged in the loss like any other token's.
    """
    chars = sorted(_chars(docs, min_count))
    vocab = {EOT: 0, UNK: 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    return _char_tokenizer(vocab)


def transfer_ids(new: TextTokenizer, old: TextTokenizer) -> tuple[list[int], int]:
    """For each id of the char tokenizer `new`, the id of the same token in `old` (a checkpoint's), or old's
    `<unk>` where old lacks it (the token that stood for that character there); and how many tokens were
    found. Fine-tuning a char model keeps the run's own vocabulary (its training split's, as a run from
    scratch has) and starts every embedding from the checkpoint's."""
    if new.kind != "char" or old.kind != "char":
        raise ValueError(f"transfer_ids needs two char tokenizers, got {new.kind} and {old.kind}")
    old_vocab = old.tokenizer.get_vocab()
    by_id = sorted(new.tokenizer.get_vocab().items(), key=lambda item: item[1])
    ids = [old_vocab.get(token, old.unk_id) for token, _ in by_id]
    return ids, sum(token in old_vocab for token, _ in by_id)


def _char_tokenizer(vocab: dict[str, int]) -> TextTokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # one pre-token per character (newlines included), and decoding concatenates them unchanged
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOT, UNK])
    return TextTokenizer(tok, "char")


def train_bpe(docs: Sequence[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE (GPT-2 style) trained with the `tokenizers` library on the training split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return TextTokenizer(tok, "bpe")

